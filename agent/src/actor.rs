//! The agent's owner task: its tasks, their status updates, and what it says to the master.
//!
//! ```text
//!  RunTask ──> STAGING ──(runner)──> STARTING ──> fetch uris ──> prepare ──> RUNNING ──> run
//!                                                                   ──> terminal
//!  KillTask / ShutdownFramework ──> the runner's kill token is cancelled
//!
//!  every status update: uuid + timestamp, queued per task; only the oldest unacknowledged
//!  one is in flight (sent when it becomes the oldest, if registered, re-sent with backoff
//!  until the master forwards the framework's acknowledgement, then the next one goes);
//!  a task is forgotten once its terminal update is acknowledged.
//!  a runner that panics: its task fails (the agent keeps serving).
//! ```
//!
//! Every number from the master that becomes a duration is checked with
//! [`agora_core::limits`]: a task out of range ends in TASK_ERROR naming the field.
//!
//! The link task ([`crate::link`]) owns the connection; this task only sees "link up"
//! (with a sender), "registered", messages, and "link down".

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_core::{AgentId, FrameworkId, TaskId, TaskState, limits};
use agora_executor_wasm::CancellationToken;
use agora_proto::v1::{self, agent_message, master_message};
use agora_proto::{now_timestamp, resources_from_proto, state_to_proto};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::containerizer::{
    ContainerEntry, ContainerKey, Containerizer, Containers, LaunchSpec, Termination, Updates,
};
use crate::fetcher::Fetcher;
use crate::sandbox;
pub use crate::updates::RetryPolicy;
use crate::updates::{Acked, UpdateQueue};

/// What reaches the owner task.
pub enum Event {
    /// A fault injected by tests: the owner task panics.
    #[cfg(test)]
    Crash,
    /// The link task is connecting and needs the registration to send first.
    Connecting {
        reply: oneshot::Sender<v1::AgentMessage>,
    },
    /// The link is open; messages to the master go through `tx`.
    LinkUp {
        tx: mpsc::Sender<v1::AgentMessage>,
    },
    /// Boxed: a RunTask carries a whole task.
    FromMaster(Box<master_message::Message>),
    LinkDown,
    /// A task's runner reports a change.
    Task {
        framework: FrameworkId,
        task: TaskId,
        change: Termination,
    },
    /// A task (or its executor) sends its framework bytes.
    FrameworkMessage {
        framework: FrameworkId,
        executor: Option<agora_core::ExecutorId>,
        task: Option<TaskId>,
        data: Vec<u8>,
    },
}

struct TaskEntry {
    info: v1::TaskInfo,
    state: TaskState,
    /// What the task's container gives it, once known; carried by every later update.
    isolation: String,
    kill: CancellationToken,
    pending: UpdateQueue,
}

type TaskKey = (FrameworkId, TaskId);

pub struct Actor {
    pub(crate) work_dir: PathBuf,
    pub(crate) info: v1::AgentInfo,
    pub(crate) containerizers: Vec<Arc<dyn Containerizer>>,
    containers: Containers,
    fetcher: Option<Fetcher>,
    pub(crate) retry: RetryPolicy,
    pub(crate) events: mpsc::Sender<Event>,
    agent_id: Option<AgentId>,
    link: Option<mpsc::Sender<v1::AgentMessage>>,
    registered: bool,
    heartbeat_interval: Duration,
    last_heartbeat: Instant,
    tasks: HashMap<TaskKey, TaskEntry>,
    runners: JoinSet<()>,
    /// Which task each runner drives, to fail the task should its runner panic.
    runner_tasks: HashMap<tokio::task::Id, TaskKey>,
    /// Collects a task's sandbox once its runner has ended.
    gc: Option<crate::gc::Gc>,
}

fn strip_module(task: &v1::TaskInfo) -> v1::TaskInfo {
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

impl Actor {
    pub fn new(
        work_dir: PathBuf,
        info: v1::AgentInfo,
        containerizers: Vec<Arc<dyn Containerizer>>,
        containers: Containers,
        fetcher: Option<Fetcher>,
        retry: RetryPolicy,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Actor {
            work_dir,
            info,
            containerizers,
            containers,
            fetcher,
            retry,
            events,
            agent_id: None,
            link: None,
            registered: false,
            heartbeat_interval: Duration::from_secs(5),
            last_heartbeat: Instant::now(),
            tasks: HashMap::new(),
            runners: JoinSet::new(),
            runner_tasks: HashMap::new(),
            gc: None,
        }
    }

    /// Finished tasks' sandboxes are scheduled with `gc`.
    pub fn with_gc(mut self, gc: crate::gc::Gc) -> Self {
        self.gc = Some(gc);
        self
    }

    /// Runs until `shutdown`; then kills every task.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Event>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                ev = rx.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                _ = tick.tick() => self.tick(),
                Some(done) = self.runners.join_next_with_id(), if !self.runners.is_empty() => {
                    self.runner_ended(done);
                }
            }
        }
        tracing::info!(
            tasks = self.tasks.len(),
            "agent shutting down; killing its tasks"
        );
        for t in self.tasks.values() {
            t.kill.cancel();
        }
        // Runners end their tasks when told; give them a moment before cutting them off.
        let drain = async { while self.runners.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            self.runners.abort_all();
            while self.runners.join_next().await.is_some() {}
        }
        for c in &self.containerizers {
            c.shutdown().await;
        }
    }

    /// A runner ended: normally it has reported its task's end; one that panicked has not,
    /// so its task fails here rather than staying in its last state for ever.
    fn runner_ended(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, panic) = match done {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e.to_string())),
        };
        let key = self.runner_tasks.remove(&id);
        if let (Some((fw, task)), Some(panic)) = (key, panic) {
            tracing::error!(framework_id = %fw, task_id = %task, error = %panic, "a task's runner failed");
            if let Some(t) = self.tasks.get(&(fw.clone(), task.clone())) {
                t.kill.cancel();
            }
            self.task_changed(
                fw,
                task,
                Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("the agent's runner of the task failed: {panic}"),
                ),
            );
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            #[cfg(test)]
            Event::Crash => panic!("injected fault"),
            Event::Connecting { reply } => {
                let _ = reply.send(self.registration());
            }
            Event::LinkUp { tx } => {
                self.link = Some(tx);
                self.registered = false;
            }
            Event::LinkDown => {
                if self.link.take().is_some() {
                    tracing::warn!("lost the link to the master; reconnecting");
                }
                self.registered = false;
            }
            Event::FromMaster(msg) => self.on_master_message(*msg),
            Event::Task {
                framework,
                task,
                change,
            } => self.task_changed(framework, task, change),
            Event::FrameworkMessage {
                framework,
                executor,
                task,
                data,
            } => {
                // Like Mesos's framework messages: best effort, not retried.
                if self.registered {
                    self.send(agent_message::Message::FrameworkMessage(
                        agent_message::FrameworkMessage {
                            framework_id: Some((&framework).into()),
                            executor_id: executor.as_ref().map(Into::into),
                            task_id: task.as_ref().map(Into::into),
                            data,
                        },
                    ));
                } else {
                    tracing::debug!(framework_id = %framework, "dropping a framework message: not registered");
                }
            }
        }
    }

    fn registration(&self) -> v1::AgentMessage {
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

    fn send(&mut self, message: agent_message::Message) -> bool {
        let Some(link) = &self.link else { return false };
        match link.try_send(v1::AgentMessage {
            message: Some(message),
        }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("link to the master is congested; will retry");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.link = None;
                self.registered = false;
                false
            }
        }
    }

    fn on_master_message(&mut self, msg: master_message::Message) {
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
                if self.agent_id.as_ref() != Some(&id) {
                    tracing::info!(agent_id = %id, master_id = %r.master_id, "registered with the master");
                } else {
                    tracing::info!(agent_id = %id, master_id = %r.master_id, "re-registered with the master");
                }
                self.agent_id = Some(id);
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
                self.registered = true;
                self.last_heartbeat = Instant::now();
                self.resend_all();
            }
            master_message::Message::RunTask(run) => self.run_task(run),
            master_message::Message::KillTask(kill) => {
                let key = kill
                    .framework_id
                    .as_ref()
                    .and_then(|f| FrameworkId::try_from(f).ok())
                    .zip(kill.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()));
                match key.as_ref().and_then(|k| self.tasks.get(k)) {
                    Some(t) => {
                        tracing::info!(task_id = ?key.as_ref().map(|k| k.1.as_str()), "killing task");
                        t.kill.cancel();
                    }
                    None => tracing::debug!("kill for a task this agent does not have"),
                }
            }
            master_message::Message::Acknowledge(ack) => {
                let key = ack
                    .framework_id
                    .as_ref()
                    .and_then(|f| FrameworkId::try_from(f).ok())
                    .zip(ack.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()));
                let Some(key) = key else { return };
                let Some(t) = self.tasks.get_mut(&key) else {
                    return;
                };
                match t
                    .pending
                    .acknowledge(&ack.uuid, Instant::now(), &self.retry)
                {
                    Acked::Head(Some(next)) => {
                        if self.registered {
                            self.send_update(&key.0, *next);
                        }
                    }
                    Acked::Head(None) => {
                        if t.state.is_terminal() {
                            self.tasks.remove(&key);
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
                for ((f, _), t) in &self.tasks {
                    if *f == fw {
                        t.kill.cancel();
                    }
                }
                for c in self.containerizers.clone() {
                    let fw = fw.clone();
                    self.runners
                        .spawn(async move { c.shutdown_framework(&fw).await });
                }
            }
            master_message::Message::Heartbeat(_) => {}
        }
    }

    fn run_task(&mut self, run: master_message::RunTask) {
        let Some(task) = run.task else { return };
        let parsed = (|| {
            let fw = FrameworkId::try_from(run.framework_id.as_ref().ok_or("no framework id")?)
                .map_err(|e| e.to_string())?;
            let tid = TaskId::try_from(task.task_id.as_ref().ok_or("no task id")?)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((fw, tid))
        })();
        let (fw, tid) = match parsed {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "master sent an invalid task; ignored");
                return;
            }
        };
        let key = (fw.clone(), tid.clone());
        if self.tasks.get(&key).is_some_and(|t| !t.state.is_terminal()) {
            tracing::warn!(framework_id = %fw, task_id = %tid, "task is already running here; duplicate launch ignored");
            return;
        }
        let kill = CancellationToken::new();
        self.tasks.insert(
            key.clone(),
            TaskEntry {
                info: strip_module(&task),
                state: TaskState::Staging,
                isolation: String::new(),
                kill: kill.clone(),
                pending: UpdateQueue::default(),
            },
        );
        // The agent does not trust the master to have checked: out-of-range numbers end the
        // task here, before anything is made for it.
        if let Err(t) = crate::containerizer::task_times(&task) {
            tracing::warn!(framework_id = %fw, task_id = %tid, error = %t.message, "refusing a task");
            self.task_changed(fw, tid, t);
            return;
        }
        let resources = match resources_from_proto(&task.resources) {
            Ok(r) => r,
            Err(e) => {
                self.task_changed(
                    fw,
                    tid,
                    Termination::new(TaskState::Error, v1::Reason::TaskInvalid, e.to_string()),
                );
                return;
            }
        };
        let Some(containerizer) = self
            .containerizers
            .iter()
            .find(|c| c.supports(&task))
            .cloned()
        else {
            let kind = match task.payload {
                Some(v1::task_info::Payload::Command(_)) => "command",
                Some(v1::task_info::Payload::Wasm(_)) => "wasm",
                None => "empty",
            };
            let msg = format!("this agent has no containerizer for {kind} tasks");
            self.task_changed(
                fw,
                tid,
                Termination::new(TaskState::Error, v1::Reason::ContainerizerUnavailable, msg),
            );
            return;
        };
        let span = tracing::info_span!("task", framework_id = %fw, task_id = %tid, containerizer = containerizer.name());
        let runner = Runner {
            containerizer,
            containers: self.containers.clone(),
            fetcher: self.fetcher.clone(),
            agent_id: self.agent_id.clone(),
            work_dir: self.work_dir.clone(),
            framework: fw,
            task_id: tid,
            task,
            resources,
            kill,
            events: self.events.clone(),
            gc: self.gc.clone(),
        };
        let handle = self.runners.spawn(runner.run().instrument(span));
        self.runner_tasks.insert(handle.id(), key);
    }

    fn send_update(&mut self, framework: &FrameworkId, status: v1::TaskStatus) {
        let latest_state = status
            .task_id
            .as_ref()
            .and_then(|t| TaskId::try_from(t).ok())
            .and_then(|t| self.tasks.get(&(framework.clone(), t)))
            .map_or(status.state, |e| state_to_proto(e.state) as i32);
        self.send(agent_message::Message::StatusUpdate(
            agent_message::StatusUpdate {
                framework_id: Some(framework.into()),
                status: Some(status),
                latest_state,
            },
        ));
    }

    fn task_changed(&mut self, framework: FrameworkId, task: TaskId, change: Termination) {
        let key = (framework.clone(), task.clone());
        let Some(entry) = self.tasks.get_mut(&key) else {
            return;
        };
        if !entry.state.can_transition(change.state) {
            tracing::debug!(task_id = %task, from = %entry.state, to = %change.state, "ignoring illegal transition");
            return;
        }
        entry.state = change.state;
        if let Some(iso) = change.isolation {
            entry.isolation = iso;
        }
        let status = v1::TaskStatus {
            task_id: Some((&task).into()),
            state: state_to_proto(change.state) as i32,
            reason: change.reason as i32,
            message: change.message,
            source: change.source as i32,
            uuid: uuid_bytes(),
            timestamp: now_timestamp(),
            agent_id: self.agent_id.as_ref().map(Into::into),
            exit_code: change.exit_code,
            data: change.data,
            usage: change.usage.map(|u| *u),
            isolation: entry.isolation.clone(),
            progress: change.progress,
        };
        if change.state.is_terminal() {
            tracing::info!(state = %change.state, message = %status.message, "task ended");
        }
        // Sent now only when nothing older of this task awaits its acknowledgement.
        if let Some(status) = entry.pending.push(status, Instant::now(), &self.retry)
            && self.registered
        {
            self.send_update(&framework, status);
        }
    }

    /// After (re-)registering: the oldest unacknowledged update of each task goes again.
    fn resend_all(&mut self) {
        let now = Instant::now();
        let agent_id: Option<v1::AgentId> = self.agent_id.as_ref().map(Into::into);
        let out: Vec<_> = self
            .tasks
            .iter_mut()
            .filter_map(|((fw, _), t)| {
                t.pending
                    .resend(now, agent_id.as_ref())
                    .map(|s| (fw.clone(), s))
            })
            .collect();
        for (fw, status) in out {
            self.send_update(&fw, status);
        }
    }

    fn tick(&mut self) {
        if !self.registered {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last_heartbeat) >= self.heartbeat_interval {
            self.last_heartbeat = now;
            self.send(agent_message::Message::Heartbeat(
                agent_message::Heartbeat {},
            ));
        }
        let retry = self.retry.clone();
        let due: Vec<_> = self
            .tasks
            .iter_mut()
            .filter_map(|((fw, _), t)| t.pending.due(now, &retry).map(|s| (fw.clone(), s)))
            .collect();
        for (fw, status) in due {
            tracing::debug!(framework_id = %fw, task_id = ?status.task_id.as_ref().map(|t| &t.value), "retrying unacknowledged status update");
            self.send_update(&fw, status);
        }
    }
}

fn uuid_bytes() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

/// Drives one task through its containerizer, reporting each step to the owner task.
struct Runner {
    containerizer: Arc<dyn Containerizer>,
    containers: Containers,
    fetcher: Option<Fetcher>,
    agent_id: Option<AgentId>,
    work_dir: PathBuf,
    framework: FrameworkId,
    task_id: TaskId,
    task: v1::TaskInfo,
    resources: agora_core::Resources,
    kill: CancellationToken,
    events: mpsc::Sender<Event>,
    gc: Option<crate::gc::Gc>,
}

impl Runner {
    async fn report(&self, change: Termination) {
        let _ = self
            .events
            .send(Event::Task {
                framework: self.framework.clone(),
                task: self.task_id.clone(),
                change,
            })
            .await;
    }

    async fn run(self) {
        self.report(Termination::new(
            TaskState::Starting,
            v1::Reason::Unspecified,
            "",
        ))
        .await;
        let sandbox = match sandbox::create_run_dir(&self.work_dir, &self.framework, &self.task_id)
            .and_then(|dir| {
                crate::containerizer::traversable_parents(&self.work_dir, &dir)?;
                Ok(dir)
            }) {
            Ok(dir) => dir,
            Err(e) => {
                let msg = format!("creating the task's sandbox: {e}");
                self.report(Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    msg,
                ))
                .await;
                return;
            }
        };
        // However the runner ends, the sandbox is collected after the GC delay.
        let _collect = self.gc.as_ref().map(|gc| gc.on_drop(sandbox.clone()));
        let spec = LaunchSpec {
            agent_id: self.agent_id.clone(),
            framework_id: self.framework.clone(),
            task_id: self.task_id.clone(),
            task: self.task.clone(),
            resources: self.resources.clone(),
            sandbox,
        };
        if !self.task.uris.is_empty() {
            let Some(fetcher) = &self.fetcher else {
                self.report(Termination::new(
                    TaskState::Failed,
                    v1::Reason::FetcherFailed,
                    "the task has uris but this agent has no fetcher",
                ))
                .await;
                return;
            };
            let disk = self.resources.disk();
            let budget = (disk > 0.0)
                .then(|| crate::containerizer::mib_to_bytes("resources.disk", disk).ok())
                .flatten();
            let fetch = fetcher.fetch_all(&self.task.uris, &spec.sandbox, budget);
            let fetched = tokio::select! {
                r = fetch => Some(r),
                () = self.kill.cancelled() => None,
            };
            let failed = match fetched {
                None => Some(Termination::new(
                    TaskState::Killed,
                    v1::Reason::TaskKilled,
                    "killed while its uris were being fetched",
                )),
                Some(Err(e)) => Some(Termination::new(
                    TaskState::Failed,
                    v1::Reason::FetcherFailed,
                    e.to_string(),
                )),
                Some(Ok(())) => None,
            };
            if let Some(t) = failed {
                self.report(t).await;
                return;
            }
        }
        let end = match self.containerizer.prepare(&spec).await {
            Err(t) => t,
            Ok(_) if self.kill.is_cancelled() => Termination::new(
                TaskState::Killed,
                v1::Reason::TaskKilled,
                "killed before it started",
            ),
            Ok(container) => {
                let isolation = container.isolation();
                let updates = Updates {
                    events: self.events.clone(),
                    framework: self.framework.clone(),
                    task: self.task_id.clone(),
                    isolation: isolation.clone(),
                };
                if !container.reports_running() {
                    let mut running =
                        Termination::new(TaskState::Running, v1::Reason::Unspecified, "");
                    running.isolation.clone_from(&isolation);
                    self.report(running).await;
                }
                let key = ContainerKey {
                    framework: self.framework.clone(),
                    task: Some(self.task_id.clone()),
                    executor: container.executor(),
                };
                if let Ok(mut c) = self.containers.lock() {
                    c.insert(
                        key.clone(),
                        ContainerEntry {
                            containerizer: self.containerizer.name(),
                            probe: container.usage_probe(),
                            pid: container.pid().unwrap_or_default(),
                        },
                    );
                }
                let mut end = container.run(self.kill.clone(), updates).await;
                if let Ok(mut c) = self.containers.lock() {
                    c.remove(&key);
                }
                if end.isolation.is_none() {
                    end.isolation = isolation;
                }
                end
            }
        };
        self.report(end).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An actor with no containerizers, registered, whose messages to the master land in
    /// the returned receiver.
    fn registered() -> (Actor, mpsc::Receiver<v1::AgentMessage>) {
        let (events, _rx) = mpsc::channel(16);
        let mut a = Actor::new(
            std::env::temp_dir(),
            v1::AgentInfo::default(),
            Vec::new(),
            Containers::default(),
            None,
            RetryPolicy {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(60),
            },
            events,
        );
        let (tx, rx) = mpsc::channel(64);
        a.handle(Event::LinkUp { tx });
        a.on_master_message(registered_message(5.0));
        (a, rx)
    }

    fn registered_message(heartbeat: f64) -> master_message::Message {
        master_message::Message::Registered(master_message::Registered {
            agent_id: Some(v1::AgentId {
                value: "m-A000001".into(),
            }),
            master_id: "m".into(),
            heartbeat_interval_seconds: heartbeat,
        })
    }

    fn key() -> TaskKey {
        (FrameworkId::new("fw").unwrap(), TaskId::new("t").unwrap())
    }

    fn add_task(a: &mut Actor) {
        a.tasks.insert(
            key(),
            TaskEntry {
                info: v1::TaskInfo::default(),
                state: TaskState::Staging,
                isolation: String::new(),
                kill: CancellationToken::new(),
                pending: UpdateQueue::default(),
            },
        );
    }

    fn sent(rx: &mut mpsc::Receiver<v1::AgentMessage>) -> Vec<v1::TaskStatus> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let Some(agent_message::Message::StatusUpdate(u)) = m.message {
                out.extend(u.status);
            }
        }
        out
    }

    fn change(state: TaskState) -> Termination {
        Termination::new(state, v1::Reason::Unspecified, "")
    }

    #[test]
    fn a_task_has_one_update_in_flight_and_the_next_goes_on_acknowledgement() {
        let (mut a, mut rx) = registered();
        add_task(&mut a);
        let (fw, t) = key();
        for s in [TaskState::Starting, TaskState::Running, TaskState::Finished] {
            a.task_changed(fw.clone(), t.clone(), change(s));
        }
        let first = sent(&mut rx);
        assert_eq!(first.len(), 1, "only STARTING goes out: {first:?}");
        assert_eq!(first[0].state(), v1::TaskState::TaskStarting);
        // Re-registration resends the head only.
        a.on_master_message(registered_message(5.0));
        let again = sent(&mut rx);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].uuid, first[0].uuid);
        let ack = |uuid: &[u8]| {
            master_message::Message::Acknowledge(master_message::AcknowledgeUpdate {
                framework_id: Some((&fw).into()),
                task_id: Some((&t).into()),
                uuid: uuid.to_vec(),
            })
        };
        let mut order = vec![first[0].state()];
        let mut head = first[0].uuid.clone();
        loop {
            a.on_master_message(ack(&head));
            let next = sent(&mut rx);
            if next.is_empty() {
                break;
            }
            assert_eq!(next.len(), 1, "{next:?}");
            order.push(next[0].state());
            head = next[0].uuid.clone();
        }
        assert_eq!(
            order,
            [
                v1::TaskState::TaskStarting,
                v1::TaskState::TaskRunning,
                v1::TaskState::TaskFinished
            ]
        );
        assert!(
            a.tasks.is_empty(),
            "forgotten once its terminal update is acknowledged"
        );
    }

    #[test]
    fn a_heartbeat_interval_out_of_range_is_refused_not_a_panic() {
        let (mut a, _rx) = registered();
        assert_eq!(a.heartbeat_interval, Duration::from_secs(5));
        for bad in [1e20, f64::NAN, f64::INFINITY, -1.0] {
            a.on_master_message(registered_message(bad));
            assert_eq!(a.heartbeat_interval, Duration::from_secs(5), "{bad}");
        }
        a.on_master_message(registered_message(0.5));
        assert_eq!(a.heartbeat_interval, Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_task_whose_runner_panics_fails_instead_of_hanging() {
        let (mut a, mut rx) = registered();
        add_task(&mut a);
        let (fw, t) = key();
        a.task_changed(fw.clone(), t.clone(), change(TaskState::Starting));
        let starting = sent(&mut rx);
        let handle = a.runners.spawn(async { panic!("a bug") });
        a.runner_tasks.insert(handle.id(), key());
        let done = a.runners.join_next_with_id().await.unwrap();
        a.runner_ended(done);
        assert_eq!(a.tasks[&key()].state, TaskState::Failed);
        assert!(a.tasks[&key()].kill.is_cancelled());
        a.on_master_message(master_message::Message::Acknowledge(
            master_message::AcknowledgeUpdate {
                framework_id: Some((&fw).into()),
                task_id: Some((&t).into()),
                uuid: starting[0].uuid.clone(),
            },
        ));
        let failed = sent(&mut rx);
        assert_eq!(failed[0].state(), v1::TaskState::TaskFailed);
        assert!(failed[0].message.contains("a bug"), "{}", failed[0].message);
    }
}
