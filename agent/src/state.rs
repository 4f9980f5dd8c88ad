//! The agent's rules as a pure state machine: `step(now, input) -> commands`.
//!
//! ```text
//!  Master(RunTask)      ──> task STAGING, Save, Launch (after the save is durable)
//!  Changed(task, change) ──> legal transition? ──> update (uuid, time) queued, Save,
//!                            Send when it is the task's oldest unacknowledged one
//!  Master(Acknowledge)  ──> the head leaves the queue, Save; the next one is Sent;
//!                            a terminal task whose last update is acknowledged is forgotten
//!  Attached(task, how)  ──> how to find the task's container again, Save
//!  Registered           ──> SaveId, every task's head Sent again
//!  Tick                 ──> heartbeat when due; heads whose retry is due Sent again
//! ```
//!
//! A framework is known from its first task here until its last one is forgotten: a
//! RunTask whose framework info is new or changed saves it (`SaveFramework`), and so does
//! the framework's forgetting.
//!
//! The state is exactly what the agent checkpoints ([`crate::checkpoint`]): its id, per
//! framework its info, and per task its info, state, isolation, unacknowledged updates and
//! how to re-attach to its container. Time comes in; nothing here sends, spawns or writes — the owner task
//! ([`crate::actor`]) carries the commands out, and writes every `Save` of a turn in one
//! durable commit before it sends or launches anything of that turn, so an update is on
//! disk before it is sent and a task before it starts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agora_core::{AgentId, ExecutorId, FrameworkId, TaskId, TaskState, limits};
use agora_proto::v1::{self, agent_message, master_message};
use agora_proto::{now_timestamp, resources_from_proto, state_to_proto};

use crate::containerizer::Termination;
pub use crate::updates::RetryPolicy;
use crate::updates::{Acked, UpdateQueue};

pub type TaskKey = (FrameworkId, TaskId);

/// How a restarted agent finds a task's container again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Attachment {
    /// A process under the agent's supervisor (`agora __init`), which outlives the agent and
    /// writes the task's exit status to `status_file`.
    Process(ProcessRecord),
    /// The task runs in this executor of its framework; the executor is re-attached (and
    /// tells what became of the task) when it subscribes again.
    Executor(String),
}

/// A supervised process: enough to know it is still the same process and to stop it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessRecord {
    /// The supervisor's host pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22): a pid reused by
    /// another process has another.
    pub start_ticks: u64,
    /// The container's cgroup, under the agent's parent.
    pub cgroup: Option<String>,
    /// Where the supervisor writes the exit status.
    pub status_file: PathBuf,
    pub sandbox: PathBuf,
    /// What the task's container gives it.
    pub isolation: String,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Its memory limit, for reporting an OOM kill.
    pub mem_limit: Option<u64>,
    /// The uid and gid it runs as, when not the agent's.
    pub user: Option<(u32, u32)>,
    /// When it must have ended (`max_duration`), in milliseconds since the Unix epoch.
    pub deadline_ms: Option<u64>,
    /// The host's boot it ran in (`/proc/sys/kernel/random/boot_id`): after a reboot a pid
    /// and start time may name another process.
    pub boot_id: String,
}

impl ProcessRecord {
    /// It is still running: the same boot, and its pid names a process started when it was.
    pub fn alive(&self) -> bool {
        self.boot_id == crate::native::boot_id()
            && crate::native::start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// One task on this agent.
#[derive(Debug)]
pub struct Task {
    pub info: v1::TaskInfo,
    pub state: TaskState,
    /// What the task's container gives it, once known; carried by every later update.
    pub isolation: String,
    pub pending: UpdateQueue,
    pub attachment: Option<Attachment>,
    /// The uuids of the executor's latest updates of the task (at most [`ORIGINS`]): one
    /// it sends again (it had no acknowledgement before the agent restarted) is dropped.
    pub origins: std::collections::VecDeque<u64>,
}

/// Executor update uuids remembered per task.
pub const ORIGINS: usize = 16;

/// What happened.
#[derive(Debug)]
pub enum Input {
    /// The link is open (not yet registered).
    LinkUp,
    LinkDown,
    /// Boxed: a RunTask carries a whole task.
    Master(Box<master_message::Message>),
    /// A task's container reports a change.
    Changed {
        key: TaskKey,
        change: Termination,
    },
    /// A task's container can be found again this way.
    Attached {
        key: TaskKey,
        how: Attachment,
    },
    Tick,
}

/// What the owner task must do.
#[derive(Debug, PartialEq)]
pub enum Command {
    /// To the master, after this turn's saves are durable.
    Send(agent_message::Message),
    /// Start the task, after its save is durable.
    Launch {
        key: TaskKey,
        task: Box<v1::TaskInfo>,
        resources: agora_core::Resources,
    },
    /// End the task's container (it reports how it ended).
    Kill(TaskKey),
    /// End everything of the framework's on this agent.
    ShutdownFramework(FrameworkId),
    /// Checkpoint the task as it is now, or its absence.
    Save(TaskKey),
    /// Checkpoint the agent's id.
    SaveId,
    /// Checkpoint the framework's info as it is now, or its absence.
    SaveFramework(FrameworkId),
}

/// A framework with tasks on this agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Framework {
    /// As the master last sent it.
    pub info: v1::FrameworkInfo,
    /// Its tasks in [`AgentState::tasks`]: it is forgotten with the last.
    tasks: usize,
}

/// The agent's state. See the module documentation.
#[derive(Debug)]
pub struct AgentState {
    pub info: v1::AgentInfo,
    pub agent_id: Option<AgentId>,
    /// Insert and remove tasks only through [`AgentState::add_task`] and
    /// [`AgentState::forget_task`], which keep [`AgentState::frameworks`].
    pub tasks: HashMap<TaskKey, Task>,
    frameworks: HashMap<FrameworkId, Framework>,
    pub retry: RetryPolicy,
    linked: bool,
    registered: bool,
    heartbeat_interval: Duration,
    last_heartbeat: Instant,
}

/// The task as the agent keeps it: a module carried inline is replaced by its digest (it is
/// in the module store), so neither memory nor the checkpoint holds it twice.
pub fn strip_module(task: &v1::TaskInfo) -> v1::TaskInfo {
    let mut t = task.clone();
    if let Some(v1::task_info::Payload::Wasm(w)) = &mut t.payload
        && let Some(v1::wasm_task::Module::ModuleBytes(b)) = &w.module
    {
        w.module = Some(v1::wasm_task::Module::Digest(agora_executor_wasm::digest(
            b,
        )));
    }
    t
}

fn uuid_bytes() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

impl AgentState {
    pub fn new(info: v1::AgentInfo, retry: RetryPolicy, now: Instant) -> Self {
        AgentState {
            info,
            agent_id: None,
            tasks: HashMap::new(),
            frameworks: HashMap::new(),
            retry,
            linked: false,
            registered: false,
            heartbeat_interval: Duration::from_secs(5),
            last_heartbeat: now,
        }
    }

    pub fn registered(&self) -> bool {
        self.registered
    }

    /// The frameworks with tasks here, as the master last described them.
    pub fn frameworks(&self) -> impl Iterator<Item = (&FrameworkId, &v1::FrameworkInfo)> {
        self.frameworks.iter().map(|(id, f)| (id, &f.info))
    }

    /// The framework's info, when it has tasks here.
    pub fn framework(&self, id: &FrameworkId) -> Option<&v1::FrameworkInfo> {
        self.frameworks.get(id).map(|f| &f.info)
    }

    /// Restores a framework's info from the checkpoint; tasks restored after it count
    /// towards it. One left without tasks is forgotten by [`AgentState::forget_idle`].
    pub fn restore_framework(&mut self, id: FrameworkId, info: v1::FrameworkInfo) {
        self.frameworks
            .entry(id)
            .and_modify(|f| f.info = info.clone())
            .or_insert(Framework { info, tasks: 0 });
    }

    /// Forgets the frameworks that have no tasks left (a checkpoint can hold one only if
    /// its last task's record was lost), each with its `SaveFramework`.
    pub fn forget_idle(&mut self) -> Vec<Command> {
        let idle: Vec<FrameworkId> = self
            .frameworks
            .iter()
            .filter(|(_, f)| f.tasks == 0)
            .map(|(id, _)| id.clone())
            .collect();
        idle.into_iter()
            .map(|id| {
                self.frameworks.remove(&id);
                Command::SaveFramework(id)
            })
            .collect()
    }

    fn add_task(&mut self, key: TaskKey, task: Task) {
        if self.tasks.insert(key.clone(), task).is_none() {
            self.frameworks
                .entry(key.0)
                .or_insert_with(|| Framework {
                    info: v1::FrameworkInfo::default(),
                    tasks: 0,
                })
                .tasks += 1;
        }
    }

    fn forget_task(&mut self, key: &TaskKey, out: &mut Vec<Command>) {
        if self.tasks.remove(key).is_none() {
            return;
        }
        if let Some(f) = self.frameworks.get_mut(&key.0) {
            f.tasks = f.tasks.saturating_sub(1);
            if f.tasks == 0 {
                self.frameworks.remove(&key.0);
                out.push(Command::SaveFramework(key.0.clone()));
            }
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// The registration the link sends first: the agent's id once it has one, and every
    /// task with its state.
    pub fn registration(&self) -> v1::AgentMessage {
        let tasks = self
            .tasks
            .iter()
            .map(|((fw, _), t)| v1::AgentTask {
                framework_id: Some(fw.into()),
                task: Some(t.info.clone()),
                state: state_to_proto(t.state) as i32,
            })
            .collect();
        v1::AgentMessage {
            message: Some(agent_message::Message::Register(agent_message::Register {
                info: Some(self.info.clone()),
                agent_id: self.agent_id.as_ref().map(Into::into),
                tasks,
            })),
        }
    }

    /// Takes one input; returns what to do, in order.
    pub fn step(&mut self, now: Instant, input: Input) -> Vec<Command> {
        let mut out = Vec::new();
        match input {
            Input::LinkUp => {
                self.linked = true;
                self.registered = false;
            }
            Input::LinkDown => {
                self.linked = false;
                self.registered = false;
            }
            Input::Master(msg) => self.on_master(now, *msg, &mut out),
            Input::Changed { key, change } => self.changed(now, key, change, &mut out),
            Input::Attached { key, how } => {
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.attachment = Some(how);
                    out.push(Command::Save(key));
                }
            }
            Input::Tick => self.tick(now, &mut out),
        }
        out
    }

    fn on_master(&mut self, now: Instant, msg: master_message::Message, out: &mut Vec<Command>) {
        match msg {
            master_message::Message::Registered(r) => {
                let id = r
                    .agent_id
                    .as_ref()
                    .and_then(|id| AgentId::try_from(id).ok());
                let Some(id) = id else {
                    tracing::error!("master sent a registration without a valid agent id");
                    return;
                };
                if let Some(old) = self.agent_id.as_ref().filter(|old| **old != id) {
                    // The master does not know the id this agent checkpointed (it was
                    // removed): the agent is a new one now, and its tasks' later updates
                    // carry the new id.
                    tracing::warn!(old = %old, agent_id = %id, master_id = %r.master_id, "registered under a new id");
                } else {
                    tracing::info!(agent_id = %id, master_id = %r.master_id, "registered with the master");
                }
                if self.agent_id.as_ref() != Some(&id) {
                    self.agent_id = Some(id);
                    out.push(Command::SaveId);
                }
                if r.heartbeat_interval_seconds != 0.0 {
                    match limits::seconds(
                        "heartbeat_interval_seconds",
                        r.heartbeat_interval_seconds,
                        limits::MAX_HEARTBEAT_SECS,
                    ) {
                        Ok(d) => self.heartbeat_interval = d,
                        Err(e) => {
                            tracing::warn!(error = %e, interval = ?self.heartbeat_interval, "the master asks for an impossible heartbeat interval; keeping this one");
                        }
                    }
                }
                self.registered = self.linked;
                self.last_heartbeat = now;
                self.resend_all(now, out);
            }
            master_message::Message::RunTask(run) => self.run_task(now, run, out),
            master_message::Message::KillTask(kill) => {
                match key_of(kill.framework_id.as_ref(), kill.task_id.as_ref()) {
                    Some(key) if self.tasks.contains_key(&key) => {
                        tracing::info!(framework_id = %key.0, task_id = %key.1, "killing task");
                        out.push(Command::Kill(key));
                    }
                    _ => tracing::debug!("kill for a task this agent does not have"),
                }
            }
            master_message::Message::Acknowledge(ack) => {
                let Some(key) = key_of(ack.framework_id.as_ref(), ack.task_id.as_ref()) else {
                    return;
                };
                let Some(t) = self.tasks.get_mut(&key) else {
                    return;
                };
                match t.pending.acknowledge(&ack.uuid, now, &self.retry) {
                    Acked::Head(next) => {
                        if t.state.is_terminal() && next.is_none() {
                            self.forget_task(&key, out);
                        }
                        out.push(Command::Save(key.clone()));
                        if let Some(next) = next
                            && self.registered
                        {
                            self.send_update(&key.0, *next, out);
                        }
                    }
                    Acked::Ignored => {
                        tracing::debug!(framework_id = %key.0, task_id = %key.1, "acknowledgement of an update not in flight; ignored");
                    }
                }
            }
            master_message::Message::ShutdownFramework(s) => {
                let Some(fw) = s
                    .framework_id
                    .as_ref()
                    .and_then(|f| FrameworkId::try_from(f).ok())
                else {
                    return;
                };
                tracing::info!(framework_id = %fw, "shutting down framework's tasks");
                for (f, t) in self.tasks.keys() {
                    if *f == fw {
                        out.push(Command::Kill((f.clone(), t.clone())));
                    }
                }
                out.push(Command::ShutdownFramework(fw));
            }
            master_message::Message::Heartbeat(_) => {}
        }
    }

    fn run_task(&mut self, now: Instant, run: master_message::RunTask, out: &mut Vec<Command>) {
        let Some(task) = run.task else { return };
        let Some(key) = key_of(run.framework_id.as_ref(), task.task_id.as_ref()) else {
            tracing::warn!("master sent a task without a valid framework or task id; ignored");
            return;
        };
        if self.tasks.contains_key(&key) {
            // Running, or ended with its last update not yet acknowledged: either way the
            // task id is taken here.
            tracing::warn!(framework_id = %key.0, task_id = %key.1, "the task is already on this agent; duplicate launch ignored");
            return;
        }
        self.add_task(
            key.clone(),
            Task {
                info: strip_module(&task),
                state: TaskState::Staging,
                isolation: String::new(),
                pending: UpdateQueue::default(),
                attachment: None,
                origins: Default::default(),
            },
        );
        out.push(Command::Save(key.clone()));
        // The master describes the framework with each task: a changed description (the
        // framework updated its info) replaces the one kept.
        if let Some(info) = run.framework_info
            && let Some(f) = self.frameworks.get_mut(&key.0)
            && f.info != info
        {
            f.info = info;
            out.push(Command::SaveFramework(key.0.clone()));
        }
        // The agent does not trust the master to have checked: out-of-range numbers end the
        // task here, before anything is made for it.
        if let Err(t) = crate::containerizer::task_times(&task) {
            tracing::warn!(framework_id = %key.0, task_id = %key.1, error = %t.message, "refusing a task");
            self.changed(now, key, t, out);
            return;
        }
        match resources_from_proto(&task.resources) {
            Ok(resources) => out.push(Command::Launch {
                key,
                task: Box::new(task),
                resources,
            }),
            Err(e) => self.changed(
                now,
                key,
                Termination::new(TaskState::Error, v1::Reason::TaskInvalid, e.to_string()),
                out,
            ),
        }
    }

    fn changed(&mut self, now: Instant, key: TaskKey, change: Termination, out: &mut Vec<Command>) {
        let agent_id = self.agent_id.as_ref().map(Into::into);
        let Some(entry) = self.tasks.get_mut(&key) else {
            return;
        };
        if change.origin != 0 {
            if entry.origins.contains(&change.origin) {
                tracing::debug!(task_id = %key.1, "an update the executor sent again; dropped");
                return;
            }
            if entry.origins.len() == ORIGINS {
                entry.origins.pop_front();
            }
            entry.origins.push_back(change.origin);
        }
        if !entry.state.can_transition(change.state) {
            tracing::debug!(task_id = %key.1, from = %entry.state, to = %change.state, "ignoring illegal transition");
            return;
        }
        entry.state = change.state;
        if let Some(iso) = change.isolation {
            entry.isolation = iso;
        }
        let status = v1::TaskStatus {
            task_id: Some((&key.1).into()),
            state: state_to_proto(change.state) as i32,
            reason: change.reason as i32,
            message: change.message,
            source: change.source as i32,
            uuid: uuid_bytes(),
            timestamp: now_timestamp(),
            agent_id,
            exit_code: change.exit_code,
            data: change.data,
            usage: change.usage.map(|u| *u),
            isolation: entry.isolation.clone(),
            progress: change.progress,
        };
        if change.state.is_terminal() {
            tracing::info!(framework_id = %key.0, task_id = %key.1, state = %change.state, message = %status.message, "task ended");
        }
        let head = entry.pending.push(status, now, &self.retry);
        out.push(Command::Save(key.clone()));
        // Sent now only when nothing older of this task awaits its acknowledgement.
        if let Some(status) = head
            && self.registered
        {
            self.send_update(&key.0, status, out);
        }
    }

    fn send_update(&self, framework: &FrameworkId, status: v1::TaskStatus, out: &mut Vec<Command>) {
        let latest_state = status
            .task_id
            .as_ref()
            .and_then(|t| TaskId::try_from(t).ok())
            .and_then(|t| self.tasks.get(&(framework.clone(), t)))
            .map_or(status.state, |e| state_to_proto(e.state) as i32);
        out.push(Command::Send(agent_message::Message::StatusUpdate(
            agent_message::StatusUpdate {
                framework_id: Some(framework.into()),
                status: Some(status),
                latest_state,
            },
        )));
    }

    /// After (re-)registering: the oldest unacknowledged update of each task goes again.
    fn resend_all(&mut self, now: Instant, out: &mut Vec<Command>) {
        if !self.registered {
            return;
        }
        let agent_id: Option<v1::AgentId> = self.agent_id.as_ref().map(Into::into);
        let heads: Vec<_> = self
            .tasks
            .iter_mut()
            .filter_map(|((fw, _), t)| {
                t.pending
                    .resend(now, agent_id.as_ref())
                    .map(|s| (fw.clone(), s))
            })
            .collect();
        for (fw, status) in heads {
            self.send_update(&fw, status, out);
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Command>) {
        if !self.registered {
            return;
        }
        if now.duration_since(self.last_heartbeat) >= self.heartbeat_interval {
            self.last_heartbeat = now;
            out.push(Command::Send(agent_message::Message::Heartbeat(
                agent_message::Heartbeat {},
            )));
        }
        let retry = self.retry.clone();
        let due: Vec<_> = self
            .tasks
            .iter_mut()
            .filter_map(|((fw, _), t)| t.pending.due(now, &retry).map(|s| (fw.clone(), s)))
            .collect();
        for (fw, status) in due {
            tracing::debug!(framework_id = %fw, task_id = ?status.task_id.as_ref().map(|t| &t.value), "retrying unacknowledged status update");
            self.send_update(&fw, status, out);
        }
    }

    /// A task as recovered from the checkpoint: its updates queued again, oldest first.
    pub fn restore(&mut self, key: TaskKey, saved: crate::checkpoint::SavedTask, now: Instant) {
        let mut pending = UpdateQueue::default();
        for s in saved.pending {
            pending.push(s, now, &self.retry);
        }
        self.add_task(
            key,
            Task {
                info: saved.info,
                state: saved.state,
                isolation: saved.isolation,
                pending,
                attachment: saved.attachment,
                origins: saved.origins.into(),
            },
        );
    }

    /// Tasks of `executor` (of framework `fw`) that are not over.
    pub fn tasks_in_executor(&self, fw: &FrameworkId, executor: &ExecutorId) -> Vec<TaskId> {
        self.tasks
            .iter()
            .filter(|((f, _), t)| {
                f == fw
                    && !t.state.is_terminal()
                    && matches!(&t.attachment, Some(Attachment::Executor(e)) if e == executor.as_str())
            })
            .map(|((_, t), _)| t.clone())
            .collect()
    }
}

fn key_of(fw: Option<&v1::FrameworkId>, task: Option<&v1::TaskId>) -> Option<TaskKey> {
    let fw = FrameworkId::try_from(fw?).ok()?;
    let task = TaskId::try_from(task?).ok()?;
    Some((fw, task))
}

#[cfg(test)]
mod tests;
