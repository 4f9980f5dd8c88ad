//! The native containerizer: `command` tasks as Linux processes, each in its own cgroup
//! (v1, v2 or hybrid, whatever the host has) with memory, CPU and pids limits, in its own
//! session, with rlimits; killed as a whole (SIGTERM, a grace period, then every process of
//! the cgroup); OOM kills reported with the peak usage.
//!
//! Without usable cgroups (not root, or none mounted), tasks still run, in a process group
//! with rlimits, and the agent reports `isolation: none`.
//!
//! A task runs as the user it names, or as the agent's default user (`nobody` unless
//! configured); never as root unless the agent allows root tasks. Its sandbox and logs are
//! its user's alone (0700, 0600). In a PID namespace the init starts with an empty
//! environment and hands the task its environment only at the task's exec, so variables
//! such as `LD_PRELOAD` never reach a root process.

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agora_core::{TaskState, limits};
use agora_executor_native::{Cgroups, Limits, Namespaces, Rlimits, TaskCgroup, confine};
use agora_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::containerizer::{
    Container, Containerizer, LaunchSpec, Termination, Updates, invalid_field, task_times,
};
use crate::state::{Attachment, ProcessRecord};

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
    /// Run a task as the user it names (`CommandTask.user`), or as `default_user` when it
    /// names none; off, tasks run as the agent's user (refused when that is root, unless
    /// `allow_root`). Default on.
    pub switch_user: bool,
    /// The user of tasks and custom executors that name none. Default `nobody`. Applies
    /// when the agent can switch users (it runs as root); an agent that cannot runs them as
    /// itself.
    pub default_user: String,
    /// Let tasks and custom executors run as root (uid 0, by any name). Default off: such a
    /// task ends in TASK_ERROR.
    pub allow_root: bool,
    pub rlimits: Rlimits,
    /// Start tasks and custom executors under the default seccomp filters and
    /// `no_new_privs` ([`agora_executor_native::seccomp`]). Default on.
    pub seccomp: bool,
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
            default_user: "nobody".into(),
            allow_root: false,
            rlimits: Rlimits::default(),
            seccomp: true,
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
    /// The agent runs as root, so it can switch users.
    root: bool,
    /// The seccomp filters processes start under; `None` when off or unavailable.
    filters: Option<agora_executor_native::seccomp::Filters>,
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
        let filters = config
            .seccomp
            .then(agora_executor_native::seccomp::Filters::new)
            .and_then(|f| {
                f.inspect_err(|e| tracing::warn!(error = %e, "native tasks run without seccomp"))
                    .ok()
            });
        tracing::info!(isolation = %cgroups.describe(), namespaces, seccomp = filters.is_some(), "native containerizer ready");
        NativeContainerizer {
            init: config.init.clone(),
            config,
            cgroups,
            namespaces,
            root,
            filters,
        }
    }
}

impl NativeContainerizer {
    /// Ends every container a previous agent left under the agent's cgroup but `keep` (those
    /// it re-attaches to): nothing runs that no agent accounts for.
    pub fn remove_leftovers(&self, keep: &std::collections::HashSet<String>) {
        for name in self.cgroups.children(&self.config.cgroup_parent) {
            if keep.contains(&name) {
                continue;
            }
            tracing::warn!(cgroup = %format!("{}/{name}", self.config.cgroup_parent), "removing a container a previous agent left behind");
            if let Err(e) = self
                .cgroups
                .adopt(&self.config.cgroup_parent, &name)
                .destroy()
            {
                tracing::warn!(error = %e, "could not remove a leftover container");
            }
        }
    }

    /// Ends a supervised process a previous agent started (`--recover=cleanup`), and its
    /// container.
    pub async fn end(&self, rec: &ProcessRecord) {
        if rec.alive() {
            // SAFETY: kill(2) on a pid whose boot and start time show it is still the
            // supervisor, and on its process group (it leads one; PID 1 of its namespace,
            // which dies with it anyway, is in it).
            unsafe {
                libc::kill(-(rec.pid as i32), libc::SIGKILL);
                libc::kill(rec.pid as i32, libc::SIGKILL);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), exited(rec.pid, rec.start_ticks))
                .await;
        }
        if let Some(name) = &rec.cgroup {
            let cg = self.cgroups.adopt(&self.config.cgroup_parent, name);
            if let Err(e) = cg
                .kill_all(Duration::from_secs(5))
                .and_then(|()| cg.destroy())
            {
                tracing::warn!(error = %e, cgroup = %name, "could not remove a container");
            }
        }
    }

    /// Re-attaches to a process a previous agent started under the supervisor.
    pub(crate) fn reattach(&self, rec: &ProcessRecord) -> NativeContainer {
        let cgroup = rec
            .cgroup
            .as_ref()
            .map(|name| self.cgroups.adopt(&self.config.cgroup_parent, name));
        NativeContainer {
            cmd: std::process::Command::new("/bin/true"),
            cgroup,
            cgroup_name: rec.cgroup.clone(),
            rotate: None,
            grace: rec.grace,
            // What is left of its time limit.
            limit: rec
                .deadline_ms
                .map(|d| Duration::from_millis(d.saturating_sub(unix_ms()))),
            mem_limit: rec.mem_limit,
            isolation: rec.isolation.clone(),
            pid: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(rec.pid)),
            env_payload: None,
            user: rec.user,
            disk: None,
            exit_file: Some(rec.status_file.clone()),
            sandbox: rec.sandbox.clone(),
            // From before a reboot: certainly gone (no pid names it).
            recovered: Some(if rec.boot_id == boot_id() {
                (rec.pid, rec.start_ticks)
            } else {
                (0, 0)
            }),
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The host's boot id, or an empty string where the kernel gives none.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of process `pid` in clock ticks since boot (`/proc/PID/stat` field 22),
/// or `None` when there is no such process.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count from the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Resolves once process `pid` (started at `ticks`) is gone; at once when it already is,
/// or when the pid now names another process.
pub async fn exited(pid: u32, ticks: u64) {
    use std::os::fd::FromRawFd;
    if start_ticks(pid) != Some(ticks) {
        return;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    let watched = if fd >= 0 {
        // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // The pid may have been reused between the first look and the open.
        if start_ticks(pid) != Some(ticks) {
            return;
        }
        // SAFETY: an OwnedFd keeps its descriptor open, and names the same one, for as
        // long as the AsyncFd holds it.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ok()
    } else {
        None
    };
    match watched {
        // Readable once the process has exited.
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => {
            while start_ticks(pid) == Some(ticks) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
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

/// The uid and gid of `user`, or `None` when there is no such user. Thread-safe
/// (`getpwnam_r`): tasks are prepared concurrently.
fn lookup_user(user: &str) -> Option<(u32, u32)> {
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(user, error = %e, "looking the user up");
            None
        }
    }
}

/// As whom a process runs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RunAs<'a> {
    /// The user a task or custom executor names; empty: the agent's default user.
    Named(&'a str),
    /// The agent's own user: only for the agent's own programs (its Wasm executor), never
    /// for a framework's.
    Agent,
}

/// Bytes of a task's environment the init reads from its stdin: `NAME=VALUE` entries, each
/// ended by a NUL.
fn env_payload(env: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in env {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    // The end: an init that reads end of file without it was given nothing to start.
    out.push(0);
    out
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
        let times = task_times(&spec.task)?;
        if spec.resources.mem() <= 0.0 {
            return Err(invalid(
                "the task has no `mem` resource: a native task needs one, it is the task's memory limit",
            ));
        }
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
            max_duration: times.max_duration,
            kill_grace: times.kill_grace,
            required_isolation: &spec.task.required_isolation,
            visible: vec![spec.sandbox.clone()],
            // A task that names no user runs as its framework's, else the agent's default.
            run_as: RunAs::Named(if c.user.is_empty() {
                &spec.framework.user
            } else {
                &c.user
            }),
        })?;
        container.disk = crate::disk::Quota::of(
            &spec.sandbox,
            spec.resources.disk(),
            self.config.disk_watch_interval,
        );
        Ok(Box::new(container))
    }

    async fn recover(
        &self,
        spec: &LaunchSpec,
        how: &Attachment,
    ) -> Result<Box<dyn Container>, Termination> {
        let Attachment::Process(rec) = how else {
            return Err(Termination::new(
                TaskState::Lost,
                v1::Reason::AgentRestarted,
                "the agent restarted and the task's container is not a process it can find again",
            ));
        };
        let mut container = self.reattach(rec);
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
    /// Checked already ([`task_times`]); `None`: no limit.
    pub max_duration: Option<Duration>,
    /// Checked already; `None`: the agent's default.
    pub kill_grace: Option<Duration>,
    pub required_isolation: &'a [String],
    /// Directories the process must see at their paths even when its private `/tmp`
    /// hides them (default: its sandbox).
    pub visible: Vec<std::path::PathBuf>,
    pub run_as: RunAs<'a>,
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
        if self.filters.is_some() {
            parts.push(agora_executor_native::seccomp::ISOLATION.into());
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.push("process-group+rlimits".into());
            parts.join("+")
        }
    }

    /// Who a process runs as: `Some((uid, gid))` to switch to, `None` to stay the agent's
    /// user. Root only when the agent allows it.
    fn resolve_user(&self, run_as: RunAs<'_>) -> Result<Option<(u32, u32)>, Termination> {
        let named = match run_as {
            RunAs::Agent => return Ok(None),
            RunAs::Named(n) => n,
        };
        if !self.config.switch_user {
            if self.root && !self.config.allow_root {
                return Err(invalid(
                    "this agent runs tasks as its own user (--switch-user=false), which is root; \
                     it refuses root tasks unless started with --allow-root-tasks",
                ));
            }
            return Ok(None);
        }
        let (name, field) = if named.is_empty() {
            if !self.root {
                // It cannot switch: the task runs as the agent's own, unprivileged, user.
                return Ok(None);
            }
            (self.config.default_user.as_str(), "--default-user")
        } else {
            (named, "user")
        };
        let Some((uid, gid)) = lookup_user(name) else {
            return Err(invalid(if named.is_empty() {
                format!("the agent's default user {name:?} ({field}) does not exist on this agent")
            } else {
                format!("user {name:?} does not exist on this agent")
            }));
        };
        // The root group is as good as root for files (gid 0 keeps after setgroups([])).
        if (uid == 0 || gid == 0) && !self.config.allow_root {
            return Err(invalid(format!(
                "the task would run as root ({field} {name:?}, uid {uid}, gid {gid}); this agent \
                 refuses root tasks unless started with --allow-root-tasks"
            )));
        }
        Ok(Some((uid, gid)))
    }

    /// Builds the container of one process: command line, user, environment, sandbox
    /// files, cgroup, namespaces. Nothing runs until [`Container::run`].
    pub(crate) fn process(&self, p: &ProcessSpec<'_>) -> Result<NativeContainer, Termination> {
        let c = p.command;
        if c.value.trim().is_empty() {
            return Err(invalid("the command is empty"));
        }
        // Bounds first, so nothing is made for a process that cannot run.
        limits::count("env", c.env.len(), limits::MAX_LIST)
            .and_then(|()| limits::count("arguments", c.arguments.len(), limits::MAX_LIST))
            .map_err(|e| invalid_field(&e))?;
        let pids_max = match (c.pids_max, self.config.pids_max) {
            (Some(0), _) => return Err(invalid("pids_max must be at least 1")),
            (Some(n), _) if n > limits::MAX_PIDS => {
                return Err(invalid_field(&limits::LimitError::new(
                    "pids_max",
                    format!("{n} is more than {} processes", limits::MAX_PIDS),
                )));
            }
            // A task may lower the agent's bound, never raise it.
            (Some(n), Some(agent)) if n > agent => {
                tracing::info!(
                    asked = n,
                    pids_max = agent,
                    "capping the task's pids_max at the agent's"
                );
                Some(agent)
            }
            (Some(n), _) => Some(n),
            (None, agent) => agent,
        };
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
        let user = self.resolve_user(p.run_as)?;
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
        // and drops to the user just before exec (it needs root to mount /proc). The init
        // gets no environment: the task's comes on its stdin, for the task's exec alone.
        // The init is also its supervisor: it holds the logs and records the exit status,
        // so the process outlives the agent.
        let supervise = agora_executor_native::init::Supervise {
            exit_file: Some(p.sandbox.join(EXIT_FILE)),
            logs: self
                .config
                .log_max_bytes
                .map(|max| agora_executor_native::init::Logs {
                    dir: p.sandbox.to_owned(),
                    max: max.max(1),
                    keep: self.config.log_keep,
                }),
            seccomp: pid_ns && self.filters.is_some(),
        };
        let argv: Vec<std::ffi::OsString> = match self.init.as_ref().filter(|_| pid_ns) {
            Some(init) => {
                let mut v: Vec<std::ffi::OsString> =
                    init.iter().filter(|a| *a != "--").cloned().collect();
                v.extend(agora_executor_native::init::args(user, true, &supervise));
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
        let sandbox = p.sandbox.to_string_lossy().into_owned();
        // Later entries replace earlier ones, as `Command::env` would.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".into(),
        );
        env.insert("HOME".into(), sandbox.clone());
        env.extend(c.env.iter().map(|e| (e.name.clone(), e.value.clone())));
        for (k, v) in [
            ("AGORA_FRAMEWORK_ID", p.framework.as_str()),
            ("AGORA_SANDBOX", &sandbox),
            ("MESOS_FRAMEWORK_ID", p.framework.as_str()),
            ("MESOS_SANDBOX", &sandbox),
            ("MESOS_DIRECTORY", &sandbox),
        ] {
            env.insert(k.into(), v.into());
        }
        env.extend(p.env.iter().cloned());
        if let Some(a) = p.agent {
            env.insert("AGORA_AGENT_ID".into(), a.to_string());
            env.insert("MESOS_AGENT_ID".into(), a.to_string());
        }
        if let Some(bad) = env
            .iter()
            .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(invalid(format!(
                "environment variable {:?} has an empty name, or a '=' or NUL where it may not",
                bad.0
            )));
        }
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).env_clear();
        let env_payload = if pid_ns {
            cmd.stdin(Stdio::piped());
            Some(env_payload(&env))
        } else {
            cmd.envs(&env).stdin(Stdio::null());
            None
        };
        cmd.current_dir(p.sandbox);
        let launch_failed = |what: String| {
            Termination::new(TaskState::Failed, v1::Reason::ContainerLaunchFailed, what)
        };
        // The sandbox is the task's alone: its user's (the agent's, when it stays the agent's
        // user), 0700; the agent reads it as root.
        make_private(p.sandbox, user).map_err(|e| {
            launch_failed(format!(
                "giving the sandbox to the task's user {:?}: {e}",
                user.map(|u| u.0)
            ))
        })?;
        let open = |name: &str| {
            open_log(&p.sandbox.join(name), user)
                .map_err(|e| launch_failed(format!("creating the sandbox's {name}: {e}")))
        };
        // Supervised, the init rotates the logs (it outlives the agent); else the agent does.
        let rotate = self
            .config
            .log_max_bytes
            .filter(|_| !pid_ns)
            .map(|max| Rotation {
                dir: p.sandbox.to_owned(),
                max: max.max(1),
                keep: self.config.log_keep,
                user,
            });
        if pid_ns && self.config.log_max_bytes.is_some() {
            open("stdout")?;
            open("stderr")?;
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        } else if rotate.is_some() {
            // Pumped through pipes into rotating files once the task runs.
            open("stdout")?;
            open("stderr")?;
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(open("stdout")?).stderr(open("stderr")?);
        }

        let mut limits = limits(p.resources, &self.config);
        limits.pids_max = pids_max;
        let (cgroup, cgroup_name) = if self.cgroups == Cgroups::None {
            (None, None)
        } else {
            let name = format!(
                "{}-{}-{}",
                p.framework,
                p.name,
                uuid::Uuid::new_v4().simple()
            );
            let cg = self
                .cgroups
                .create(&self.config.cgroup_parent, &name, &limits)
                .map_err(|e| launch_failed(format!("creating the task's cgroup: {e}")))?;
            (Some(cg), Some(name))
        };
        let ns = Namespaces {
            enabled: self.namespaces,
            hostname: Some(if c.hostname.is_empty() {
                default_hostname(p.name)
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
            self.filters.as_ref().filter(|_| !pid_ns),
        )
        .map_err(|e| launch_failed(e.to_string()))?;
        Ok(NativeContainer {
            cmd,
            cgroup,
            cgroup_name,
            rotate,
            grace: p.kill_grace.unwrap_or(self.config.kill_grace),
            limit: p.max_duration,
            mem_limit: limits.memory_bytes,
            isolation,
            pid: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0)),
            env_payload,
            user,
            disk: None,
            exit_file: pid_ns.then(|| p.sandbox.join(EXIT_FILE)),
            sandbox: p.sandbox.to_owned(),
            recovered: None,
        })
    }
}

/// Who hears of a supervised process once it runs, to find it again after a restart.
pub(crate) enum OnStart<'a> {
    /// A task's: the owner task, through its updates.
    Task(&'a Updates),
    /// An executor's: its containerizer, which checkpoints it (true once it has).
    Executor(&'a (dyn Fn(ProcessRecord) -> bool + Send + Sync)),
}

/// Where, in a supervised process's sandbox, its supervisor records the exit status.
pub const EXIT_FILE: &str = ".agora-exit";

/// Makes `dir` (a sandbox) belong to `user` (the agent's user when `None`), mode 0700, with
/// everything already in it (what was fetched), as Mesos gives a task its sandbox.
///
/// # Errors
/// When an owner or the mode cannot be set.
pub(crate) fn make_private(dir: &Path, user: Option<(u32, u32)>) -> std::io::Result<()> {
    fn give(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            // The link itself, never what it points at.
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
            if entry.file_type()?.is_dir() {
                give(&path, uid, gid)?;
            }
        }
        Ok(())
    }
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        give(dir, uid, gid)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates (or truncates) a log of the task's in its sandbox: 0600, its user's, never
/// through a link the task planted.
fn open_log(path: &Path, user: Option<(u32, u32)>) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // An existing file keeps its mode through `open`: set it on the handle.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    Ok(f)
}

/// A process, ready to start, and the cgroup it will run in.
pub(crate) struct NativeContainer {
    cmd: std::process::Command,
    cgroup: Option<TaskCgroup>,
    cgroup_name: Option<String>,
    rotate: Option<Rotation>,
    grace: Duration,
    limit: Option<Duration>,
    mem_limit: Option<u64>,
    isolation: String,
    pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// The task's environment, for the init's stdin (with a PID namespace).
    env_payload: Option<Vec<u8>>,
    user: Option<(u32, u32)>,
    /// The task's `disk`, enforced while it runs (tasks only, not executors).
    disk: Option<crate::disk::Quota>,
    /// Where its supervisor records the exit status (supervised processes only).
    exit_file: Option<PathBuf>,
    sandbox: PathBuf,
    /// The supervisor's pid and start time, when a previous agent started it.
    recovered: Option<(u32, u64)>,
}

enum End {
    /// The exit code, or the signal that ended it.
    Exited(Option<i32>, Option<i32>),
    Killed,
    TimedOut,
    /// Gone while no agent watched, without a recorded status.
    Vanished,
}

impl NativeContainer {
    /// Changes the limits of the container's cgroup while it runs, if it has one.
    pub(crate) fn limiter(&self) -> Option<agora_executor_native::Limiter> {
        self.cgroup.as_ref().map(TaskCgroup::limiter)
    }

    /// The uid and gid it runs as, when not the agent's.
    pub(crate) fn user(&self) -> Option<(u32, u32)> {
        self.user
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

    async fn run(mut self: Box<Self>, kill: CancellationToken, updates: Updates) -> Termination {
        let quota = self.disk.take();
        crate::disk::enforce(quota, kill, |kill| {
            self.run_process(kill, Some(OnStart::Task(&updates)))
        })
        .await
    }
}

impl NativeContainer {
    /// Runs the process until it ends, or `kill` asks for it to end (SIGTERM, the grace
    /// period, then every process of the container); cleans the cgroup up.
    /// What a restarted agent needs to find this process again, once it runs.
    pub(crate) fn record(&self, pid: u32) -> Option<ProcessRecord> {
        Some(ProcessRecord {
            pid,
            start_ticks: start_ticks(pid)?,
            cgroup: self.cgroup_name.clone(),
            status_file: self.exit_file.clone()?,
            sandbox: self.sandbox.clone(),
            isolation: self.isolation.clone(),
            grace: self.grace,
            mem_limit: self.mem_limit,
            user: self.user,
            deadline_ms: self
                .limit
                .map(|l| unix_ms().saturating_add(l.as_millis() as u64)),
            boot_id: boot_id(),
        })
    }

    /// Follows a process a previous agent started until it ends, or `kill` asks for it to
    /// end, or what is left of its time limit runs out (SIGTERM to its supervisor, which
    /// passes it on; the grace period; then every process of the container).
    async fn follow_recovered(&self, pid: u32, ticks: u64, kill: &CancellationToken) -> End {
        let read_exit = || {
            let code = self
                .exit_file
                .as_deref()
                .and_then(agora_executor_native::init::read_exit_file);
            match code {
                Some(c) => End::Exited(Some(c), None),
                None => End::Vanished,
            }
        };
        let limit = self.limit;
        let timed_out = async {
            match limit {
                Some(l) => tokio::time::sleep(l).await,
                None => std::future::pending().await,
            }
        };
        let stop = tokio::select! {
            () = exited(pid, ticks) => return read_exit(),
            () = kill.cancelled() => End::Killed,
            () = timed_out => End::TimedOut,
        };
        if start_ticks(pid) == Some(ticks) {
            // SAFETY: kill(2) on a pid whose start time shows it is still ours.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(self.grace, exited(pid, ticks))
            .await
            .is_err()
        {
            tracing::info!(grace = ?self.grace, "task ignored SIGTERM; killing it");
        }
        self.kill_rest(Some(pid));
        stop
    }

    pub(crate) async fn run_process(
        mut self,
        kill: CancellationToken,
        on_start: Option<OnStart<'_>>,
    ) -> Termination {
        let started = Instant::now();
        if let Some((pid, ticks)) = self.recovered {
            let end = self.follow_recovered(pid, ticks, &kill).await;
            if let Some(cg) = &self.cgroup {
                let _ = cg.kill_all(Duration::from_secs(5));
            }
            return self.ended(end, started);
        }
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
        // The supervisor waits for the environment before it starts anything: it gets it
        // only once a restarted agent could find the process, so that nothing runs that no
        // agent would account for.
        let mut recorded = true;
        if let Some(rec) = child.id().and_then(|pid| self.record(pid)) {
            recorded = match on_start {
                Some(OnStart::Task(updates)) => updates.attached(Attachment::Process(rec)).await,
                Some(OnStart::Executor(hook)) => hook(rec),
                None => true,
            };
        }
        if !recorded {
            tracing::warn!("the process could not be checkpointed; it is not started");
            drop(self.env_payload.take());
            drop(child.stdin.take());
        }
        if let (Some(payload), Some(mut stdin)) = (self.env_payload.take(), child.stdin.take()) {
            // Written while the init reads; closing the pipe ends the environment. An init
            // that died first only makes this fail, which its own end reports.
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stdin.write_all(&payload).await;
            });
        }
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
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    End::Exited(s.code(), s.signal())
                }
                Err(_) => End::Killed,
            },
            () = kill.cancelled() => End::Killed,
            () = async { match limit { Some(l) => tokio::time::sleep(l).await, None => std::future::pending().await } } => End::TimedOut,
        };
        match end {
            End::Exited(..) | End::Vanished => self.kill_rest(child.id()),
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
        self.ended(end, started)
    }

    /// How the process ended, as a status; removes its cgroup and exit file.
    fn ended(mut self, end: End, started: Instant) -> Termination {
        let limit = self.limit;
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
            End::Vanished => Termination::new(
                TaskState::Lost,
                v1::Reason::AgentRestarted,
                "the task ended while the agent was restarting, and its supervisor recorded no exit status",
            ),
            End::Exited(code, signal) => match (code, signal) {
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
            },
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
        // The exit file stays (with the sandbox): a restart before this end is checkpointed
        // reads it again.
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
    /// Owner of the files it makes.
    user: Option<(u32, u32)>,
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
            return open_log(&path(0), self.user).map(|_| ());
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
                    file = match open_log(&self.dir.join(name), self.user) {
                        Ok(f) => tokio::fs::File::from_std(f),
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

/// The host name of a task that names none: its id, cut to the 64 bytes a host name may
/// have (task ids may be longer; frameworks such as Mesos's often make them so).
fn default_hostname(task: &str) -> String {
    let mut end = task.len().min(64);
    while !task.is_char_boundary(end) {
        end -= 1;
    }
    task[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_core::{FrameworkId, TaskId, parse_resources};

    /// A containerizer without cgroups (its root is an empty directory): nothing is made on
    /// the host, and what these tests check happens before anything would be.
    fn containerizer(
        tweak: impl FnOnce(&mut NativeConfig),
    ) -> (NativeContainerizer, tempfile::TempDir) {
        let empty = tempfile::tempdir().unwrap();
        let mut config = NativeConfig {
            cgroup_root: empty.path().to_owned(),
            cgroup_parent: format!("agora-unit-{}", std::process::id()),
            init: None,
            ..NativeConfig::default()
        };
        tweak(&mut config);
        (NativeContainerizer::new(config), empty)
    }

    fn spec(task: v1::TaskInfo, resources: &str, sandbox: &Path) -> LaunchSpec {
        LaunchSpec {
            agent_id: None,
            framework_id: FrameworkId::new("fw").unwrap(),
            framework: v1::FrameworkInfo::default(),
            task_id: TaskId::new("t").unwrap(),
            resources: parse_resources(resources).unwrap(),
            task,
            sandbox: sandbox.to_owned(),
        }
    }

    fn command(f: impl FnOnce(&mut v1::TaskInfo, &mut v1::CommandTask)) -> v1::TaskInfo {
        let mut c = v1::CommandTask {
            value: "true".into(),
            shell: true,
            ..Default::default()
        };
        let mut t = v1::TaskInfo {
            task_id: Some(v1::TaskId { value: "t".into() }),
            ..Default::default()
        };
        f(&mut t, &mut c);
        t.payload = Some(v1::task_info::Payload::Command(c));
        t
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[tokio::test]
    async fn numbers_out_of_range_and_a_missing_mem_are_refused_by_name() {
        let (n, _root) = containerizer(|_| {});
        let cases: Vec<(v1::TaskInfo, &str, &str)> = vec![
            (
                command(|t, _| t.max_duration = 1e20),
                "mem:32",
                "field `max_duration`",
            ),
            (
                command(|t, _| t.max_duration = f64::NAN),
                "mem:32",
                "field `max_duration`",
            ),
            (
                command(|t, _| t.max_duration = -1.0),
                "mem:32",
                "field `max_duration`",
            ),
            (
                command(|t, _| {
                    t.kill_policy = Some(v1::KillPolicy {
                        grace_period_seconds: f64::NAN,
                    });
                }),
                "mem:32",
                "field `kill_policy.grace_period_seconds`",
            ),
            (
                command(|t, _| {
                    t.kill_policy = Some(v1::KillPolicy {
                        grace_period_seconds: 1e20,
                    });
                }),
                "mem:32",
                "field `kill_policy.grace_period_seconds`",
            ),
            (
                command(|_, c| c.pids_max = Some(u64::MAX)),
                "mem:32",
                "field `command.pids_max`",
            ),
            (command(|_, _| {}), "cpus:1", "`mem`"),
        ];
        for (task, resources, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            let Err(err) = n.prepare(&spec(task, resources, dir.path())).await else {
                panic!("{says}: accepted")
            };
            assert_eq!(
                (err.state, err.reason),
                (TaskState::Error, v1::Reason::TaskInvalid),
                "{}",
                err.message
            );
            assert!(
                err.message.contains(says),
                "{says:?} not in {:?}",
                err.message
            );
        }
        // In range, the same task is prepared.
        let dir = tempfile::tempdir().unwrap();
        let ok = command(|t, _| {
            t.max_duration = limits::MAX_TASK_DURATION_SECS;
            t.kill_policy = Some(v1::KillPolicy {
                grace_period_seconds: limits::MAX_GRACE_SECS,
            });
        });
        assert!(n.prepare(&spec(ok, "mem:32", dir.path())).await.is_ok());
    }

    #[test]
    fn tasks_default_to_an_unprivileged_user_and_root_needs_allowing() {
        let (n, _root) = containerizer(|_| {});
        assert_eq!(n.resolve_user(RunAs::Agent).unwrap(), None);
        let err = n
            .resolve_user(RunAs::Named("no-such-user-here"))
            .unwrap_err();
        assert!(err.message.contains("does not exist"), "{}", err.message);
        if !is_root() {
            // An agent that cannot switch runs tasks naming none as itself.
            assert_eq!(n.resolve_user(RunAs::Named("")).unwrap(), None);
            return;
        }
        assert_eq!(
            n.resolve_user(RunAs::Named("")).unwrap(),
            Some((65534, 65534)),
            "nobody"
        );
        let err = n.resolve_user(RunAs::Named("root")).unwrap_err();
        assert_eq!(err.reason, v1::Reason::TaskInvalid);
        assert!(
            err.message.contains("--allow-root-tasks") && err.message.contains("uid 0"),
            "{}",
            err.message
        );
        let (allowed, _r) = containerizer(|c| c.allow_root = true);
        assert_eq!(
            allowed.resolve_user(RunAs::Named("root")).unwrap(),
            Some((0, 0))
        );
        let (as_agent, _r) = containerizer(|c| c.switch_user = false);
        let err = as_agent.resolve_user(RunAs::Named("nobody")).unwrap_err();
        assert!(
            err.message.contains("--allow-root-tasks"),
            "{}",
            err.message
        );
        let (ghost, _r) = containerizer(|c| c.default_user = "no-such-user-here".into());
        let err = ghost.resolve_user(RunAs::Named("")).unwrap_err();
        assert!(err.message.contains("--default-user"), "{}", err.message);
    }

    #[test]
    fn users_are_looked_up_safely_from_many_threads() {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                std::thread::spawn(move || {
                    for j in 0..500 {
                        let (name, uid) = if (i + j) % 2 == 0 {
                            ("root", 0)
                        } else {
                            ("nobody", 65534)
                        };
                        assert_eq!(lookup_user(name).map(|u| u.0), Some(uid), "{name}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn sandboxes_and_logs_are_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("run");
        std::fs::create_dir_all(sandbox.join("fetched/deep")).unwrap();
        std::fs::set_permissions(&sandbox, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(sandbox.join("fetched/deep/f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", sandbox.join("link")).unwrap();
        let user = is_root().then_some((65534, 65534));
        make_private(&sandbox, user).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&sandbox).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700);
        if let Some((uid, _)) = user {
            for p in ["", "fetched", "fetched/deep", "fetched/deep/f"] {
                assert_eq!(
                    std::fs::metadata(sandbox.join(p)).unwrap().uid(),
                    uid,
                    "{p}"
                );
            }
            // The link was given, not what it points at.
            assert_eq!(std::fs::metadata("/etc/hostname").unwrap().uid(), 0);
            assert_eq!(
                std::fs::symlink_metadata(sandbox.join("link"))
                    .unwrap()
                    .uid(),
                uid
            );
        }
        let log = sandbox.join("stdout");
        std::fs::write(&log, "old").unwrap();
        drop(open_log(&log, user).unwrap());
        let m = std::fs::metadata(&log).unwrap();
        assert_eq!((m.mode() & 0o777, m.len()), (0o600, 0));
        std::fs::remove_file(&log).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &log).unwrap();
        assert!(
            open_log(&log, user).is_err(),
            "a planted link is not followed"
        );
    }

    #[test]
    fn a_long_task_id_makes_a_host_name_the_kernel_takes() {
        let id = format!("{}é{}", "a".repeat(63), "b".repeat(100));
        let h = default_hostname(&id);
        assert!(h.len() <= 64 && id.starts_with(&h), "{h}");
        assert_eq!(
            h.len(),
            63,
            "cut before the two-byte character that would cross 64"
        );
        assert_eq!(default_hostname("short"), "short");
    }
}
