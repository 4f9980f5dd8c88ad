//! The native containerizer: `command` tasks as Linux processes, each in its own cgroup
//! (v1, v2 or hybrid, whatever the host has) with memory, CPU and pids limits, in its own
//! session, with rlimits; killed as a whole (SIGTERM, a grace period, then every process of
//! the cgroup); OOM kills reported with the peak usage.
//!
//! Without usable cgroups (not root, or none mounted), tasks still run, in a process group
//! with rlimits, and the agent reports `isolation: none`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agora_core::TaskState;
use agora_executor_native::{Cgroups, Limits, Namespaces, Rlimits, TaskCgroup, confine};
use agora_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::containerizer::{Container, Containerizer, LaunchSpec, Termination, Updates};

/// Settings of the native containerizer.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    /// Where cgroups are mounted. Point it at an empty directory to run without cgroups.
    pub cgroup_root: PathBuf,
    /// The agent's cgroup, under which each task gets one. Leftovers under it are removed
    /// when the agent starts, so two agents on one host need different parents.
    pub cgroup_parent: String,
    /// Cap CPU time at the task's `cpus` (CFS quota / `cpu.max`), not only weight it.
    pub cgroups_enable_cfs: bool,
    /// `pids.max` of each task's cgroup.
    pub pids_max: Option<u64>,
    /// Give each task mount (private `/tmp`), UTS and IPC namespaces, and a network
    /// namespace when it asks for `network: none`. Needs root; ignored without it.
    pub namespaces: bool,
    /// The command that runs a task as PID 1's child in a PID namespace of its own, e.g.
    /// `["/usr/bin/agora", "__init", "--"]` (the task's argv follows). Default: this
    /// program when it is `agora`. Without it, tasks share the agent's PID namespace.
    pub init: Option<Vec<std::ffi::OsString>>,
    /// Between SIGTERM and SIGKILL when a task is killed.
    pub kill_grace: Duration,
    /// Rotate a task's stdout and stderr when they reach this size (`None`: no rotation,
    /// the task writes its files directly). Default 10 MiB.
    pub log_max_bytes: Option<u64>,
    /// Rotated files kept (`stdout.1` … `stdout.N`). Default 2: a stream holds at most
    /// `log_max_bytes × (log_keep + 1)`.
    pub log_keep: usize,
    /// How often a task's sandbox is measured against its `disk` resource (a task over it
    /// fails with REASON_CONTAINER_LIMITATION_DISK); `None`: `disk` is not enforced.
    /// Default 15 s. See [`crate::disk`].
    pub disk_watch_interval: Option<Duration>,
    /// Run a task as the user it names (`CommandTask.user`); off, tasks run as the agent's
    /// user. Default on.
    pub switch_user: bool,
    pub rlimits: Rlimits,
}

impl Default for NativeConfig {
    fn default() -> Self {
        NativeConfig {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "agora".into(),
            cgroups_enable_cfs: false,
            pids_max: Some(4096),
            namespaces: true,
            init: std::env::current_exe()
                .ok()
                .filter(|p| p.file_name().is_some_and(|n| n == "agora"))
                .map(|p| vec![p.into_os_string(), "__init".into(), "--".into()]),
            kill_grace: Duration::from_secs(3),
            log_max_bytes: Some(10 << 20),
            log_keep: 2,
            disk_watch_interval: Some(crate::disk::DEFAULT_WATCH_INTERVAL),
            switch_user: true,
            rlimits: Rlimits::default(),
        }
    }
}

/// Runs `command` tasks. See the module documentation.
pub struct NativeContainerizer {
    config: NativeConfig,
    cgroups: Cgroups,
    init: Option<Vec<std::ffi::OsString>>,
    /// Namespaces are on and the agent may make them.
    namespaces: bool,
}

impl NativeContainerizer {
    /// Detects the host's cgroups and checks that the agent can make its own; falls back to
    /// no cgroups (and says so in [`Containerizer::isolation`]) when it cannot.
    pub fn new(config: NativeConfig) -> Self {
        let mut cgroups = Cgroups::detect(&config.cgroup_root);
        if cgroups != Cgroups::None {
            let probe = format!("probe-{}", std::process::id());
            match cgroups.create(&config.cgroup_parent, &probe, &Limits::default()) {
                Ok(cg) => {
                    let _ = cg.destroy();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cgroups found but not writable; native tasks run without them");
                    cgroups = Cgroups::None;
                }
            }
        }
        // An agent that died (killed, crashed) left its containers behind; this one cannot
        // reattach to them yet, so it ends them: nothing runs that no agent accounts for.
        for name in cgroups.children(&config.cgroup_parent) {
            tracing::warn!(cgroup = %format!("{}/{name}", config.cgroup_parent), "removing a container a previous agent left behind");
            if let Err(e) = cgroups.adopt(&config.cgroup_parent, &name).destroy() {
                tracing::warn!(error = %e, "could not remove a leftover container");
            }
        }
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let namespaces = config.namespaces && root;
        tracing::info!(isolation = %cgroups.describe(), namespaces, "native containerizer ready");
        NativeContainerizer {
            init: config.init.clone(),
            config,
            cgroups,
            namespaces,
        }
    }
}

impl Drop for NativeContainerizer {
    fn drop(&mut self) {
        self.cgroups.remove_parent(&self.config.cgroup_parent);
    }
}

fn invalid(msg: impl Into<String>) -> Termination {
    Termination::new(TaskState::Error, v1::Reason::TaskInvalid, msg)
}

/// The uid and gid of `user`, or `None` when there is no such user.
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let name = std::ffi::CString::new(user).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy the two ids
    // out at once. The agent looks users up only here, on the owner's task.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is non-null and points at a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some((uid, gid))
}

#[async_trait::async_trait]
impl Containerizer for NativeContainerizer {
    fn name(&self) -> &'static str {
        "native"
    }

    fn isolation(&self) -> String {
        let base = self.isolation_of(false);
        if self.namespaces {
            base.replace("ipc-ns", "ipc-ns+net-ns(on request)")
        } else {
            base
        }
    }

    fn supports(&self, task: &v1::TaskInfo) -> bool {
        matches!(task.payload, Some(v1::task_info::Payload::Command(_)))
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination> {
        let Some(v1::task_info::Payload::Command(c)) = &spec.task.payload else {
            return Err(invalid("not a command task"));
        };
        let env = vec![
            ("AGORA_TASK_ID".to_owned(), spec.task_id.to_string()),
            ("MESOS_TASK_ID".to_owned(), spec.task_id.to_string()),
        ];
        let mut container = self.process(&ProcessSpec {
            command: c,
            framework: &spec.framework_id,
            agent: spec.agent_id.as_ref(),
            name: spec.task_id.as_str(),
            env,
            sandbox: &spec.sandbox,
            resources: &spec.resources,
            max_duration: spec.task.max_duration,
            kill_policy: spec.task.kill_policy.as_ref(),
            required_isolation: &spec.task.required_isolation,
            visible: vec![spec.sandbox.clone()],
        })?;
        container.disk = crate::disk::Quota::of(
            &spec.sandbox,
            spec.resources.disk(),
            self.config.disk_watch_interval,
        );
        Ok(Box::new(container))
    }
}

/// A process to start in a container: a task's command, or a custom executor.
pub(crate) struct ProcessSpec<'a> {
    pub command: &'a v1::CommandTask,
    pub framework: &'a agora_core::FrameworkId,
    pub agent: Option<&'a agora_core::AgentId>,
    /// Names the cgroup and, by default, the host name.
    pub name: &'a str,
    /// Added to the environment every process gets.
    pub env: Vec<(String, String)>,
    pub sandbox: &'a std::path::Path,
    pub resources: &'a agora_core::Resources,
    /// Seconds; 0 is none.
    pub max_duration: f64,
    pub kill_policy: Option<&'a v1::KillPolicy>,
    pub required_isolation: &'a [String],
    /// Directories the process must see at their paths even when its private `/tmp`
    /// hides them (default: its sandbox).
    pub visible: Vec<std::path::PathBuf>,
}

/// The limits of a container holding `resources`.
pub(crate) fn limits(resources: &agora_core::Resources, config: &NativeConfig) -> Limits {
    let mem = resources.mem();
    let cpus = resources.cpus();
    Limits {
        memory_bytes: (mem > 0.0).then_some((mem * (1u64 << 20) as f64) as u64),
        no_swap: true,
        cpus: (cpus > 0.0).then_some(cpus),
        cpu_hard_cap: config.cgroups_enable_cfs,
        pids_max: config.pids_max,
    }
}

impl NativeContainerizer {
    pub(crate) fn config(&self) -> &NativeConfig {
        &self.config
    }

    /// The isolation a process with (or without) `network: none` gets here.
    fn isolation_of(&self, network_none: bool) -> String {
        let mut parts = Vec::new();
        if self.cgroups != Cgroups::None {
            parts.push(self.cgroups.describe());
        }
        if self.namespaces {
            if self.init.is_some() {
                parts.push("pid-ns".into());
            }
            parts.push("mnt-ns+uts-ns+ipc-ns".into());
            if network_none {
                parts.push("net-ns".into());
            }
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.push("process-group+rlimits".into());
            parts.join("+")
        }
    }

    /// Builds the container of one process: command line, user, environment, sandbox
    /// files, cgroup, namespaces. Nothing runs until [`Container::run`].
    pub(crate) fn process(&self, p: &ProcessSpec<'_>) -> Result<NativeContainer, Termination> {
        let c = p.command;
        if c.value.trim().is_empty() {
            return Err(invalid("the command is empty"));
        }
        let network_none = c.network() == v1::command_task::Network::None;
        if network_none && !self.namespaces {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::IsolationUnavailable,
                "the task asks for network: none, which needs a network namespace; this agent cannot make one (it is not root, or namespaces are off)",
            ));
        }
        let isolation = self.isolation_of(network_none);
        crate::containerizer::check_required(p.required_isolation, &isolation)?;
        let user = if c.user.is_empty() || !self.config.switch_user {
            None
        } else {
            let Some(ids) = lookup_user(&c.user) else {
                return Err(invalid(format!(
                    "user {:?} does not exist on this agent",
                    c.user
                )));
            };
            Some(ids)
        };
        let argv: Vec<std::ffi::OsString> = if c.shell {
            vec!["/bin/sh".into(), "-c".into(), c.value.clone().into()]
        } else {
            std::iter::once(&c.value)
                .chain(&c.arguments)
                .map(Into::into)
                .collect()
        };
        let pid_ns = self.namespaces && self.init.is_some();
        // With a PID namespace the process runs under the init, which becomes PID 1 there
        // and drops to the user just before exec (it needs root to mount /proc).
        let argv: Vec<std::ffi::OsString> = match self.init.as_ref().filter(|_| pid_ns) {
            Some(init) => {
                let mut v: Vec<std::ffi::OsString> =
                    init.iter().filter(|a| *a != "--").cloned().collect();
                v.extend(agora_executor_native::init::args(user));
                v.extend(argv);
                v
            }
            None => argv,
        };
        // The private /tmp must not hide what is about to run: the init, and the program the
        // init runs (both may live under /tmp, as a checkout built there does).
        let mut keep = p.visible.clone();
        let program = if c.shell { "/bin/sh" } else { c.value.as_str() };
        for prog in [Path::new(&argv[0]), Path::new(program)] {
            // Resolved, so that `/tmp/x/..` cannot name (and expose) the host's /tmp itself.
            let dir = prog
                .parent()
                .filter(|_| prog.is_absolute())
                .and_then(|d| std::fs::canonicalize(d).ok())
                .filter(|d| d != Path::new("/tmp"));
            if let Some(dir) = dir
                && !keep.contains(&dir)
            {
                keep.push(dir);
            }
        }
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        let sandbox = p.sandbox.to_string_lossy().into_owned();
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            )
            .env("HOME", &sandbox)
            .envs(c.env.iter().map(|e| (e.name.as_str(), e.value.as_str())))
            .env("AGORA_FRAMEWORK_ID", p.framework.as_str())
            .env("AGORA_SANDBOX", &sandbox)
            .env("MESOS_FRAMEWORK_ID", p.framework.as_str())
            .env("MESOS_SANDBOX", &sandbox)
            .env("MESOS_DIRECTORY", &sandbox)
            .envs(p.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(p.sandbox)
            .stdin(Stdio::null());
        if let Some(a) = p.agent {
            cmd.env("AGORA_AGENT_ID", a.as_str())
                .env("MESOS_AGENT_ID", a.as_str());
        }
        if let Some((uid, gid)) = user {
            // The task owns its sandbox, as under Mesos.
            std::os::unix::fs::chown(p.sandbox, Some(uid), Some(gid)).map_err(|e| {
                Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("giving the sandbox to user {:?}: {e}", c.user),
                )
            })?;
        }
        let open = |name: &str| {
            crate::fetcher::create_nofollow(&p.sandbox.join(name)).map_err(|e| {
                Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("creating the sandbox's {name}: {e}"),
                )
            })
        };
        let rotate = self.config.log_max_bytes.map(|max| Rotation {
            dir: p.sandbox.to_owned(),
            max: max.max(1),
            keep: self.config.log_keep,
        });
        if rotate.is_some() {
            // Pumped through pipes into rotating files once the task runs.
            open("stdout")?;
            open("stderr")?;
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(open("stdout")?).stderr(open("stderr")?);
        }

        let mut limits = limits(p.resources, &self.config);
        if let Some(n) = c.pids_max {
            if n == 0 {
                return Err(invalid("pids_max must be at least 1"));
            }
            limits.pids_max = Some(n);
        }
        let cgroup = if self.cgroups == Cgroups::None {
            None
        } else {
            let name = format!(
                "{}-{}-{}",
                p.framework,
                p.name,
                uuid::Uuid::new_v4().simple()
            );
            Some(
                self.cgroups
                    .create(&self.config.cgroup_parent, &name, &limits)
                    .map_err(|e| {
                        Termination::new(
                            TaskState::Failed,
                            v1::Reason::ContainerLaunchFailed,
                            format!("creating the task's cgroup: {e}"),
                        )
                    })?,
            )
        };
        let ns = Namespaces {
            enabled: self.namespaces,
            hostname: Some(if c.hostname.is_empty() {
                p.name.to_owned()
            } else {
                c.hostname.clone()
            }),
            network_none,
            pid: pid_ns,
            keep,
        };
        confine(
            &mut cmd,
            cgroup.as_ref(),
            &self.config.rlimits,
            &ns,
            user.filter(|_| !pid_ns),
        )
        .map_err(|e| {
            Termination::new(
                TaskState::Failed,
                v1::Reason::ContainerLaunchFailed,
                e.to_string(),
            )
        })?;
        let limit = (p.max_duration > 0.0).then(|| Duration::from_secs_f64(p.max_duration));
        let grace = p
            .kill_policy
            .map(|k| k.grace_period_seconds)
            .filter(|g| g.is_finite() && *g > 0.0)
            .map_or(self.config.kill_grace, |g| {
                Duration::from_secs_f64(g.min(3600.0))
            });
        Ok(NativeContainer {
            cmd,
            cgroup,
            rotate,
            grace,
            limit,
            mem_limit: limits.memory_bytes,
            isolation,
            pid: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0)),
            disk: None,
        })
    }
}

/// A process, ready to start, and the cgroup it will run in.
pub(crate) struct NativeContainer {
    cmd: std::process::Command,
    cgroup: Option<TaskCgroup>,
    rotate: Option<Rotation>,
    grace: Duration,
    limit: Option<Duration>,
    mem_limit: Option<u64>,
    isolation: String,
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// The task's `disk`, enforced while it runs (tasks only, not executors).
    disk: Option<crate::disk::Quota>,
}

enum End {
    Exited(std::process::ExitStatus),
    Killed,
    TimedOut,
}

impl NativeContainer {
    /// Changes the limits of the container's cgroup while it runs, if it has one.
    pub(crate) fn limiter(&self) -> Option<agora_executor_native::Limiter> {
        self.cgroup.as_ref().map(TaskCgroup::limiter)
    }

    fn signal(&self, pid: Option<u32>, signal: i32) {
        match (&self.cgroup, pid) {
            (Some(cg), _) => cg.signal_all(signal),
            (None, Some(pid)) => {
                // SAFETY: kill(2) on the task's process group (it leads its own session).
                unsafe {
                    libc::kill(-(pid as i32), signal);
                }
            }
            (None, None) => {}
        }
    }

    /// Ends every process of the task and waits for the main one.
    async fn stop(&self, child: &mut tokio::process::Child, grace: Duration) {
        self.signal(child.id(), libc::SIGTERM);
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            tracing::info!(?grace, "task ignored SIGTERM; killing it");
        }
        self.kill_rest(child.id());
        let _ = child.wait().await;
    }

    fn kill_rest(&self, pid: Option<u32>) {
        match &self.cgroup {
            Some(cg) => {
                if let Err(e) = cg.kill_all(Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "processes of the task would not die");
                }
            }
            None => self.signal(pid, libc::SIGKILL),
        }
    }
}

#[async_trait::async_trait]
impl Container for NativeContainer {
    fn usage_probe(&self) -> Option<crate::containerizer::UsageProbe> {
        let reader = self.cgroup.as_ref()?.reader();
        Some(std::sync::Arc::new(move || {
            let u = reader.usage();
            v1::TaskUsage {
                cpu_seconds: u.cpu_seconds,
                mem_peak_bytes: u.memory_peak_bytes,
                mem_bytes: u.memory_bytes,
                pids: u.pids,
                ..Default::default()
            }
        }))
    }

    fn pid(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU32>> {
        Some(self.pid.clone())
    }

    fn isolation(&self) -> Option<String> {
        Some(self.isolation.clone())
    }

    async fn run(mut self: Box<Self>, kill: CancellationToken, _updates: Updates) -> Termination {
        let quota = self.disk.take();
        crate::disk::enforce(quota, kill, |kill| self.run_process(kill)).await
    }
}

impl NativeContainer {
    /// Runs the process until it ends, or `kill` asks for it to end (SIGTERM, the grace
    /// period, then every process of the container); cleans the cgroup up.
    pub(crate) async fn run_process(mut self, kill: CancellationToken) -> Termination {
        let started = Instant::now();
        let std_cmd = std::mem::replace(&mut self.cmd, std::process::Command::new("/bin/true"));
        let mut child = match tokio::process::Command::from(std_cmd).spawn() {
            Ok(c) => c,
            Err(e) => {
                return Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("starting the command: {e}"),
                );
            }
        };
        self.pid.store(
            child.id().unwrap_or_default(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut pumps = Vec::new();
        if let Some(r) = &self.rotate {
            if let Some(out) = child.stdout.take() {
                pumps.push(tokio::spawn(r.clone().pump(out, "stdout")));
            }
            if let Some(err) = child.stderr.take() {
                pumps.push(tokio::spawn(r.clone().pump(err, "stderr")));
            }
        }
        let limit = self.limit;
        let end = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => End::Exited(s),
                Err(_) => End::Killed,
            },
            () = kill.cancelled() => End::Killed,
            () = async { match limit { Some(l) => tokio::time::sleep(l).await, None => std::future::pending().await } } => End::TimedOut,
        };
        match end {
            End::Exited(_) => self.kill_rest(child.id()),
            End::Killed | End::TimedOut => self.stop(&mut child, self.grace).await,
        }
        // Every writer is gone now, so the pumps reach end of file.
        for mut p in pumps {
            // A process that escaped a task without cgroups may still hold a pipe open.
            if tokio::time::timeout(Duration::from_secs(2), &mut p)
                .await
                .is_err()
            {
                p.abort();
            }
        }
        let usage = self.cgroup.as_ref().map(TaskCgroup::usage);
        let oom = self.cgroup.as_ref().is_some_and(TaskCgroup::oom_killed);
        let wall = started.elapsed().as_secs_f64();
        let mut t = match end {
            _ if oom => {
                let peak = usage.map_or(0, |u| u.memory_peak_bytes);
                Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLimitationMemory,
                    format!(
                        "out of memory: the kernel killed the task at its limit of {} MiB (peak {:.1} MiB)",
                        self.mem_limit.unwrap_or(0) >> 20,
                        peak as f64 / (1u64 << 20) as f64
                    ),
                )
            }
            End::Killed => Termination::new(TaskState::Killed, v1::Reason::TaskKilled, "killed"),
            End::TimedOut => Termination::new(
                TaskState::Failed,
                v1::Reason::MaxCompletionTimeReached,
                format!("ran past its time limit of {:?}", limit.unwrap_or_default()),
            ),
            End::Exited(status) => {
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(0), _) => {
                        let mut t = Termination::new(
                            TaskState::Finished,
                            v1::Reason::Unspecified,
                            "exited with status 0",
                        );
                        t.exit_code = Some(0);
                        t
                    }
                    (Some(code), _) => {
                        let mut t = Termination::new(
                            TaskState::Failed,
                            v1::Reason::CommandExited,
                            format!("exited with status {code}"),
                        );
                        t.exit_code = Some(code);
                        t
                    }
                    (None, Some(sig)) => Termination::new(
                        TaskState::Failed,
                        v1::Reason::CommandExited,
                        format!("killed by signal {sig}"),
                    ),
                    (None, None) => {
                        Termination::new(TaskState::Failed, v1::Reason::CommandExited, "ended")
                    }
                }
            }
        };
        t.usage = Some(Box::new(v1::TaskUsage {
            fuel_used: 0,
            cpu_seconds: usage.map_or(0.0, |u| u.cpu_seconds),
            wall_seconds: wall,
            mem_peak_bytes: usage.map_or(0, |u| u.memory_peak_bytes),
            ..Default::default()
        }));
        if let Some(cg) = self.cgroup.take()
            && let Err(e) = cg.destroy()
        {
            tracing::warn!(error = %e, "could not remove the task's cgroup");
        }
        t
    }
}

/// Size-bounded logs: `NAME` grows to `max` bytes, then becomes `NAME.1` (older ones shift
/// up to `NAME.keep`, the oldest is dropped) and a new `NAME` starts.
#[derive(Debug, Clone)]
struct Rotation {
    dir: PathBuf,
    max: u64,
    keep: usize,
}

impl Rotation {
    fn rotate(&self, name: &str) -> std::io::Result<()> {
        let path = |i: usize| {
            if i == 0 {
                self.dir.join(name)
            } else {
                self.dir.join(format!("{name}.{i}"))
            }
        };
        if self.keep == 0 {
            return crate::fetcher::create_nofollow(&path(0)).map(|_| ());
        }
        let _ = std::fs::remove_file(path(self.keep));
        for i in (0..self.keep).rev() {
            if path(i).exists() {
                std::fs::rename(path(i), path(i + 1))?;
            }
        }
        Ok(())
    }

    async fn pump(self, mut from: impl tokio::io::AsyncRead + Unpin, name: &'static str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 64 * 1024];
        // The sandbox may belong to the task's user, who could plant links where the agent
        // writes: never follow one.
        let mut file = match tokio::fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.dir.join(name))
            .await
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, name, "cannot open the task's log");
                return;
            }
        };
        let mut size = 0u64;
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut data = &buf[..n];
            while !data.is_empty() {
                // Rotate only when more comes, so a full file is not followed by an empty one.
                if size >= self.max {
                    let _ = file.flush().await;
                    if let Err(e) = self.rotate(name) {
                        tracing::warn!(error = %e, name, "rotating the task's log");
                    }
                    file = match tokio::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(self.dir.join(name))
                        .await
                    {
                        Ok(f) => f,
                        Err(_) => return,
                    };
                    size = 0;
                }
                let take = ((self.max - size) as usize).min(data.len());
                if file.write_all(&data[..take]).await.is_err() {
                    return;
                }
                size += take as u64;
                data = &data[take..];
            }
        }
        let _ = file.flush().await;
    }
}
