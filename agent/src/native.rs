//! The native containerizer: `command` tasks as Linux processes, each in its own cgroup
//! (v1, v2 or hybrid, whatever the host has) with memory, CPU and pids limits, in its own
//! session, with rlimits; killed as a whole (SIGTERM, a grace period, then every process of
//! the cgroup); OOM kills reported with the peak usage.
//!
//! Without usable cgroups (not root, or none mounted), tasks still run, in a process group
//! with rlimits, and the agent reports `isolation: none`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agora_core::TaskState;
use agora_executor_native::{Cgroups, Limits, Namespaces, Rlimits, TaskCgroup, confine};
use agora_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::containerizer::{Container, Containerizer, LaunchSpec, Termination};

/// Settings of the native containerizer.
#[derive(Debug, Clone)]
pub struct NativeConfig {
    /// Where cgroups are mounted. Point it at an empty directory to run without cgroups.
    pub cgroup_root: PathBuf,
    /// The agent's cgroup, under which each task gets one.
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
    /// the task writes its files directly).
    pub log_max_bytes: Option<u64>,
    /// Rotated files kept (`stdout.1` … `stdout.N`).
    pub log_keep: usize,
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
            log_max_bytes: None,
            log_keep: 3,
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
        let mut parts = Vec::new();
        if self.cgroups != Cgroups::None {
            parts.push(self.cgroups.describe());
        }
        if self.namespaces {
            if self.init.is_some() {
                parts.push("pid-ns".into());
            }
            parts.push("mnt-ns+uts-ns+ipc-ns+net-ns(on request)".into());
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.push("process-group+rlimits".into());
            parts.join("+")
        }
    }

    fn supports(&self, task: &v1::TaskInfo) -> bool {
        matches!(task.payload, Some(v1::task_info::Payload::Command(_)))
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination> {
        let Some(v1::task_info::Payload::Command(c)) = &spec.task.payload else {
            return Err(invalid("not a command task"));
        };
        if c.value.trim().is_empty() {
            return Err(invalid("the command is empty"));
        }
        let network_none = c.network() == v1::command_task::Network::None;
        if network_none && !self.namespaces {
            return Err(invalid(
                "the task asks for network: none, which needs a network namespace; this agent cannot make one (it is not root, or namespaces are off)",
            ));
        }
        let argv: Vec<std::ffi::OsString> = if c.shell {
            vec!["/bin/sh".into(), "-c".into(), c.value.clone().into()]
        } else {
            std::iter::once(&c.value)
                .chain(&c.arguments)
                .map(Into::into)
                .collect()
        };
        // With a PID namespace the task runs under the init, which becomes PID 1 there.
        let argv: Vec<std::ffi::OsString> = match self.init.as_ref().filter(|_| self.namespaces) {
            Some(init) => init.iter().cloned().chain(argv).collect(),
            None => argv,
        };
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if !c.user.is_empty() {
            let Some((uid, gid)) = lookup_user(&c.user) else {
                return Err(invalid(format!(
                    "user {:?} does not exist on this agent",
                    c.user
                )));
            };
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let sandbox = spec.sandbox.to_string_lossy().into_owned();
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            )
            .env("HOME", &sandbox)
            .envs(c.env.iter().map(|e| (e.name.as_str(), e.value.as_str())))
            .env("AGORA_TASK_ID", spec.task_id.as_str())
            .env("AGORA_FRAMEWORK_ID", spec.framework_id.as_str())
            .env("AGORA_SANDBOX", &sandbox)
            .env("MESOS_TASK_ID", spec.task_id.as_str())
            .env("MESOS_SANDBOX", &sandbox)
            .current_dir(&spec.sandbox)
            .stdin(Stdio::null());
        if let Some(a) = &spec.agent_id {
            cmd.env("AGORA_AGENT_ID", a.as_str());
        }
        let open = |name: &str| {
            std::fs::File::create(spec.sandbox.join(name)).map_err(|e| {
                Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("creating the sandbox's {name}: {e}"),
                )
            })
        };
        let rotate = self.config.log_max_bytes.map(|max| Rotation {
            dir: spec.sandbox.clone(),
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

        let mem = spec.resources.mem();
        let cpus = spec.resources.cpus();
        let limits = Limits {
            memory_bytes: (mem > 0.0).then_some((mem * (1u64 << 20) as f64) as u64),
            no_swap: true,
            cpus: (cpus > 0.0).then_some(cpus),
            cpu_hard_cap: self.config.cgroups_enable_cfs,
            pids_max: self.config.pids_max,
        };
        let cgroup = if self.cgroups == Cgroups::None {
            None
        } else {
            let name = format!(
                "{}-{}-{}",
                spec.framework_id,
                spec.task_id,
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
                spec.task_id.to_string()
            } else {
                c.hostname.clone()
            }),
            network_none,
            pid: self.namespaces && self.init.is_some(),
        };
        confine(&mut cmd, cgroup.as_ref(), &self.config.rlimits, &ns).map_err(|e| {
            Termination::new(
                TaskState::Failed,
                v1::Reason::ContainerLaunchFailed,
                e.to_string(),
            )
        })?;
        let limit =
            (spec.task.max_duration > 0.0).then(|| Duration::from_secs_f64(spec.task.max_duration));
        let grace = spec
            .task
            .kill_policy
            .as_ref()
            .map(|k| k.grace_period_seconds)
            .filter(|g| g.is_finite() && *g > 0.0)
            .map_or(self.config.kill_grace, |g| {
                Duration::from_secs_f64(g.min(3600.0))
            });
        Ok(Box::new(NativeContainer {
            cmd,
            cgroup,
            rotate,
            grace,
            limit,
            mem_limit: limits.memory_bytes,
        }))
    }
}

struct NativeContainer {
    cmd: std::process::Command,
    cgroup: Option<TaskCgroup>,
    rotate: Option<Rotation>,
    grace: Duration,
    limit: Option<Duration>,
    mem_limit: Option<u64>,
}

enum End {
    Exited(std::process::ExitStatus),
    Killed,
    TimedOut,
}

impl NativeContainer {
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

    async fn run(mut self: Box<Self>, kill: CancellationToken) -> Termination {
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
        t.usage = Some(v1::TaskUsage {
            fuel_used: 0,
            cpu_seconds: usage.map_or(0.0, |u| u.cpu_seconds),
            wall_seconds: wall,
            mem_peak_bytes: usage.map_or(0, |u| u.memory_peak_bytes),
            ..Default::default()
        });
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
            return std::fs::File::create(path(0)).map(|_| ());
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
        let mut file = match tokio::fs::OpenOptions::new()
            .append(true)
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
                    file = match tokio::fs::File::create(self.dir.join(name)).await {
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
