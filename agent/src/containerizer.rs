//! How the agent runs a task: the [`Containerizer`] trait and what its implementations
//! share.
//!
//! A containerizer turns a task into a [`Container`] in two steps, so the agent can report
//! TASK_STARTING while the task is prepared (a module compiled, a file fetched) and
//! TASK_RUNNING once it is under way. Each task picks its containerizer by its payload; the
//! native one (processes in cgroups) and custom executors plug in beside Wasm.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use agora_core::limits::{self, LimitError};
use agora_core::{AgentId, ExecutorId, FrameworkId, Resources, TaskId, TaskState};
use agora_executor_wasm::CancellationToken;
use agora_proto::v1;

/// Everything a containerizer needs to start one task.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The agent's id, once it has registered.
    pub agent_id: Option<AgentId>,
    pub framework_id: FrameworkId,
    /// The framework as the master last described it (empty if it never did).
    pub framework: v1::FrameworkInfo,
    pub task_id: TaskId,
    pub task: v1::TaskInfo,
    pub resources: Resources,
    /// The task's sandbox directory (it exists).
    pub sandbox: PathBuf,
}

/// A change of a task's state — how it ended, or a step on the way — in the terms of a
/// status update.
#[derive(Debug, Clone, PartialEq)]
pub struct Termination {
    pub state: TaskState,
    pub reason: v1::Reason,
    pub message: String,
    pub exit_code: Option<i32>,
    /// Boxed: most changes carry none, and a smaller change keeps `Result`s small.
    pub usage: Option<Box<v1::TaskUsage>>,
    /// Bytes for the framework (an executor's or a guest's data).
    pub data: Vec<u8>,
    /// Who made the change: the agent, or the task's executor.
    pub source: v1::StatusSource,
    /// The isolation the task got, once known.
    pub isolation: Option<String>,
    /// How far the task has come (a progress report on a TASK_RUNNING update).
    pub progress: Option<f32>,
    /// A digest of the uuid the task's executor gave the update ([`origin_of`]); 0 when it
    /// came from no executor.
    pub origin: u64,
}

/// The first 8 bytes of the uuid's SHA-256, never 0: what identifies an executor's update.
pub fn origin_of(uuid: &[u8]) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(uuid);
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b).max(1)
}

impl Termination {
    pub fn new(state: TaskState, reason: v1::Reason, message: impl Into<String>) -> Self {
        Termination {
            state,
            reason,
            message: message.into(),
            exit_code: None,
            usage: None,
            data: Vec::new(),
            source: v1::StatusSource::SourceAgent,
            isolation: None,
            progress: None,
            origin: 0,
        }
    }
}

/// A TASK_ERROR / REASON_TASK_INVALID naming the field that is out of range.
pub fn invalid_field(e: &LimitError) -> Termination {
    Termination::new(TaskState::Error, v1::Reason::TaskInvalid, e.to_string())
}

/// The numbers of a task that become durations, checked once against
/// [`agora_core::limits`], so that no containerizer converts raw wire values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskTimes {
    /// `max_duration`; `None` when it is 0 (no limit).
    pub max_duration: Option<Duration>,
    /// `kill_policy.grace_period_seconds`; `None` when there is no kill policy or it is 0
    /// (the agent's default grace period applies).
    pub kill_grace: Option<Duration>,
}

/// Checks the durations, `pids_max` and list sizes of `task`.
///
/// # Errors
/// A TASK_ERROR naming the first field out of range (`NaN`, negative, infinite, or past its
/// bound in [`agora_core::limits`]).
pub fn task_times(task: &v1::TaskInfo) -> Result<TaskTimes, Termination> {
    let check = || -> Result<TaskTimes, LimitError> {
        let max_duration = if task.max_duration == 0.0 {
            None
        } else {
            Some(limits::seconds(
                "max_duration",
                task.max_duration,
                limits::MAX_TASK_DURATION_SECS,
            )?)
        };
        let kill_grace = match &task.kill_policy {
            Some(k) if k.grace_period_seconds != 0.0 => Some(limits::seconds(
                "kill_policy.grace_period_seconds",
                k.grace_period_seconds,
                limits::MAX_GRACE_SECS,
            )?),
            _ => None,
        };
        limits::count("uris", task.uris.len(), limits::MAX_LIST)?;
        limits::count("resources", task.resources.len(), limits::MAX_LIST)?;
        if let Some(v1::task_info::Payload::Command(c)) = &task.payload {
            check_command("command", c)?;
        }
        if let Some(e) = &task.executor
            && let Some(c) = &e.command
        {
            check_command("executor.command", c)?;
        }
        Ok(TaskTimes {
            max_duration,
            kill_grace,
        })
    };
    check().map_err(|e| invalid_field(&e))
}

/// Bounds of a command's lists and its `pids_max` (capped later at the agent's own).
fn check_command(field: &str, c: &v1::CommandTask) -> Result<(), LimitError> {
    limits::count(
        &format!("{field}.arguments"),
        c.arguments.len(),
        limits::MAX_LIST,
    )?;
    limits::count(&format!("{field}.env"), c.env.len(), limits::MAX_LIST)?;
    if let Some(n) = c.pids_max
        && !(1..=limits::MAX_PIDS).contains(&n)
    {
        return Err(LimitError::new(
            format!("{field}.pids_max"),
            format!(
                "{n} is not a number of processes from 1 to {}",
                limits::MAX_PIDS
            ),
        ));
    }
    Ok(())
}

/// `mib` of a resource as bytes, refusing amounts whose bytes a `u64` cannot hold.
///
/// # Errors
/// Naming `field` when the amount is out of range.
pub fn mib_to_bytes(field: &str, mib: f64) -> Result<u64, LimitError> {
    const MIB: f64 = (1u64 << 20) as f64;
    let mib = limits::number(field, mib, 0.0, (u64::MAX >> 21) as f64)?;
    Ok((mib * MIB) as u64)
}

/// Lets each task's user reach its own sandbox without listing anyone else's: every directory
/// from `work_dir` down to the parent of `run_dir` becomes 0711 (traversable, not readable).
/// The run directory itself is made private to the task's user when its process is built.
///
/// # Errors
/// When a directory's mode cannot be read or set.
pub fn traversable_parents(
    work_dir: &std::path::Path,
    run_dir: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(rel) = run_dir.strip_prefix(work_dir) else {
        return Ok(());
    };
    let set = |dir: &std::path::Path| -> std::io::Result<()> {
        let m = std::fs::symlink_metadata(dir)?;
        if m.is_dir() && m.permissions().mode() & 0o7777 != 0o711 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(())
    };
    let mut at = work_dir.to_path_buf();
    set(&at)?;
    let parts: Vec<_> = rel.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        set(&at)?;
    }
    Ok(())
}

/// Where a running container sends the changes it makes before its end (an executor's
/// TASK_RUNNING, a progress report).
#[derive(Clone)]
pub struct Updates {
    pub(crate) events: tokio::sync::mpsc::Sender<crate::actor::Event>,
    pub(crate) framework: FrameworkId,
    pub(crate) task: TaskId,
    pub(crate) isolation: Option<String>,
}

impl Updates {
    /// Passes bytes from the task to its framework (not retried).
    pub async fn message(&self, executor: Option<ExecutorId>, data: Vec<u8>) {
        let _ = self
            .events
            .send(crate::actor::Event::FrameworkMessage {
                framework: self.framework.clone(),
                executor,
                task: Some(self.task.clone()),
                data,
            })
            .await;
    }

    /// Tells the agent how to find the task's container again, should it restart; returns
    /// once that is checkpointed (true), or the agent is stopping or cannot (false).
    pub async fn attached(&self, how: crate::state::Attachment) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self
            .events
            .send(crate::actor::Event::Attached {
                framework: self.framework.clone(),
                task: self.task.clone(),
                how,
                durable: Some(tx),
            })
            .await;
        sent.is_ok() && rx.await.is_ok()
    }

    /// A change, as [`Updates::send`]; `durable` hears once it is checkpointed.
    pub async fn send_acked(&self, change: Termination, durable: tokio::sync::oneshot::Sender<()>) {
        self.emit(change, Some(durable)).await;
    }

    pub async fn send(&self, change: Termination) {
        self.emit(change, None).await;
    }

    async fn emit(
        &self,
        mut change: Termination,
        durable: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        if change.isolation.is_none() {
            change.isolation.clone_from(&self.isolation);
        }
        let _ = self
            .events
            .send(crate::actor::Event::Task {
                framework: self.framework.clone(),
                task: self.task.clone(),
                change,
                durable,
            })
            .await;
    }
}

/// The isolation words a task may require, and what each means.
pub const ISOLATION_WORDS: &[&str] = &[
    "cgroups",
    "cgroups-v1",
    "cgroups-v2",
    "memory",
    "cpu",
    "pids",
    "pid-ns",
    "mnt-ns",
    "uts-ns",
    "ipc-ns",
    "net-ns",
    "process-group",
    "rlimits",
    "wasm",
];

/// Checks a task's `required_isolation` against what it would get (`actual`, as in
/// [`Containerizer::isolation`]: `+`-joined parts, controllers in parentheses).
///
/// # Errors
/// A TASK_ERROR naming the first requirement that is unknown or not met.
pub fn check_required(required: &[String], actual: &str) -> Result<(), Termination> {
    let parts: Vec<(&str, Vec<&str>)> = actual
        .split('+')
        .map(|p| match p.split_once('(') {
            Some((name, rest)) => (
                name,
                rest.trim_end_matches(')')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .collect(),
            ),
            None => (p, Vec::new()),
        })
        .collect();
    for want in required {
        let want = want.trim();
        if !ISOLATION_WORDS.contains(&want) {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::TaskInvalid,
                format!(
                    "unknown isolation {want:?} in required_isolation (known: {})",
                    ISOLATION_WORDS.join(", ")
                ),
            ));
        }
        let met = parts.iter().any(|(name, inner)| {
            *name == want
                || (want == "cgroups" && name.starts_with("cgroups-v"))
                || (name.starts_with("cgroups-v") && inner.contains(&want))
        });
        if !met {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::IsolationUnavailable,
                format!(
                    "the task requires isolation {want:?}, which this agent cannot give it (it would get {actual})"
                ),
            ));
        }
    }
    Ok(())
}

/// Runs tasks of some kind.
#[async_trait::async_trait]
pub trait Containerizer: Send + Sync {
    /// A short name for logs, e.g. `wasm`.
    fn name(&self) -> &'static str;
    /// The isolation this containerizer gives, as reported to the master.
    fn isolation(&self) -> String;
    /// Whether it runs this task's payload.
    fn supports(&self, task: &v1::TaskInfo) -> bool;
    /// Gets the task ready to run; a refusal ends the task with the returned status.
    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination>;
    /// Finds a task's container again after the agent restarted (`how` is what it reported
    /// through [`Updates::attached`]); a refusal ends the task with the returned status.
    async fn recover(
        &self,
        _spec: &LaunchSpec,
        _how: &crate::state::Attachment,
    ) -> Result<Box<dyn Container>, Termination> {
        Err(Termination::new(
            TaskState::Lost,
            v1::Reason::AgentRestarted,
            format!(
                "the agent restarted and its {} containerizer cannot re-attach to the task",
                self.name()
            ),
        ))
    }
    /// The framework is gone from this agent: stop anything of its that outlives tasks.
    async fn shutdown_framework(&self, _framework: &FrameworkId) {}
    /// The agent is stopping: stop everything.
    async fn shutdown(&self) {}
}

/// Reads a running task's resource usage.
pub type UsageProbe = Arc<dyn Fn() -> v1::TaskUsage + Send + Sync>;

/// What [`Containers`] lists: a task's container, or an executor's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerKey {
    pub framework: FrameworkId,
    pub task: Option<TaskId>,
    pub executor: Option<ExecutorId>,
}

#[derive(Clone)]
pub struct ContainerEntry {
    pub containerizer: &'static str,
    pub probe: Option<UsageProbe>,
    /// The host pid of the container's first process (0 until it starts).
    pub pid: Arc<AtomicU32>,
}

/// The running containers of this agent, for GetContainers.
pub type Containers =
    Arc<std::sync::Mutex<std::collections::HashMap<ContainerKey, ContainerEntry>>>;

/// A prepared task.
#[async_trait::async_trait]
pub trait Container: Send {
    /// Runs until the task ends or `kill` is cancelled; changes before the end go to
    /// `updates`.
    async fn run(self: Box<Self>, kill: CancellationToken, updates: Updates) -> Termination;
    /// Reads the task's usage while it runs, where the containerizer can.
    fn usage_probe(&self) -> Option<UsageProbe> {
        None
    }
    /// The host pid of the task's first process, once it runs.
    fn pid(&self) -> Option<Arc<AtomicU32>> {
        None
    }
    /// The isolation this task gets.
    fn isolation(&self) -> Option<String> {
        None
    }
    /// The container reports TASK_RUNNING itself (an executor does, when it starts the
    /// task); otherwise the agent reports it once the container is prepared.
    fn reports_running(&self) -> bool {
        false
    }
    /// The executor the task runs in, if any.
    fn executor(&self) -> Option<ExecutorId> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn required_isolation_is_matched_word_by_word() {
        let full = "cgroups-v1(memory,cpu,pids)+pid-ns+mnt-ns+uts-ns+ipc-ns+process-group+rlimits";
        assert!(check_required(&req(&["cgroups", "memory", "pid-ns", "cgroups-v1"]), full).is_ok());
        let err = check_required(&req(&["cgroups-v2"]), full).unwrap_err();
        assert_eq!(
            (err.state, err.reason),
            (TaskState::Error, v1::Reason::IsolationUnavailable)
        );
        assert!(err.message.contains("\"cgroups-v2\"") && err.message.contains(full));
        let err = check_required(&req(&["net-ns"]), full).unwrap_err();
        assert_eq!(err.reason, v1::Reason::IsolationUnavailable);
        let err = check_required(&req(&["memory"]), "none").unwrap_err();
        assert!(err.message.contains("it would get none"), "{}", err.message);
        let err = check_required(&req(&["selinux"]), full).unwrap_err();
        assert_eq!(err.reason, v1::Reason::TaskInvalid);
        assert!(err.message.contains("unknown isolation"));
        assert!(check_required(&[], "none").is_ok());
        assert!(
            check_required(
                &req(&["wasm"]),
                "wasm(epoch-cpu,fuel,memory-ceiling,wasi-sandbox)"
            )
            .is_ok()
        );
    }
}
