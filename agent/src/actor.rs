//! The agent's owner task: its tasks, their status updates, and what it says to the master.
//!
//! ```text
//!  RunTask ──> STAGING ──(runner)──> STARTING ──> fetch uris ──> prepare ──> RUNNING ──> run
//!                                                                   ──> terminal
//!  KillTask / ShutdownFramework ──> the runner's kill token is cancelled
//!
//!  every status update: uuid + timestamp, queued per task, sent now if registered,
//!  re-sent with backoff until the master forwards the framework's acknowledgement;
//!  a task is forgotten once its terminal update is acknowledged.
//! ```
//!
//! The link task ([`crate::link`]) owns the connection; this task only sees "link up"
//! (with a sender), "registered", messages, and "link down".

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_core::{AgentId, FrameworkId, TaskId, TaskState};
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

/// What reaches the owner task.
pub enum Event {
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

/// Timing of the status-update retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

struct Pending {
    status: v1::TaskStatus,
    next_retry: Instant,
    backoff: Duration,
}

struct TaskEntry {
    info: v1::TaskInfo,
    state: TaskState,
    /// What the task's container gives it, once known; carried by every later update.
    isolation: String,
    kill: CancellationToken,
    pending: VecDeque<Pending>,
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
                Some(_) = self.runners.join_next(), if !self.runners.is_empty() => {}
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

    fn handle(&mut self, ev: Event) {
        match ev {
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
                if r.heartbeat_interval_seconds > 0.0 {
                    self.heartbeat_interval = Duration::from_secs_f64(r.heartbeat_interval_seconds);
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
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.pending.retain(|p| p.status.uuid != ack.uuid);
                    if t.state.is_terminal() && t.pending.is_empty() {
                        self.tasks.remove(&key);
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
            key,
            TaskEntry {
                info: strip_module(&task),
                state: TaskState::Staging,
                isolation: String::new(),
                kill: kill.clone(),
                pending: VecDeque::new(),
            },
        );
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
        self.runners.spawn(runner.run().instrument(span));
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
        entry.pending.push_back(Pending {
            status: status.clone(),
            next_retry: Instant::now() + self.retry.initial,
            backoff: self.retry.initial,
        });
        if self.registered {
            self.send(agent_message::Message::StatusUpdate(
                agent_message::StatusUpdate {
                    framework_id: Some((&framework).into()),
                    status: Some(status),
                },
            ));
        }
    }

    /// After (re-)registering: every unacknowledged update goes again, in order per task.
    fn resend_all(&mut self) {
        let mut out = Vec::new();
        for ((fw, _), t) in &mut self.tasks {
            for p in &mut t.pending {
                p.status.agent_id = self.agent_id.as_ref().map(Into::into);
                p.next_retry = Instant::now() + p.backoff;
                out.push((fw.clone(), p.status.clone()));
            }
        }
        for (fw, status) in out {
            self.send(agent_message::Message::StatusUpdate(
                agent_message::StatusUpdate {
                    framework_id: Some((&fw).into()),
                    status: Some(status),
                },
            ));
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
        let mut due = Vec::new();
        let max = self.retry.max;
        for ((fw, _), t) in &mut self.tasks {
            for p in &mut t.pending {
                if p.next_retry <= now {
                    p.backoff = (p.backoff * 2).min(max);
                    p.next_retry = now + p.backoff;
                    due.push((fw.clone(), p.status.clone()));
                }
            }
        }
        for (fw, status) in due {
            tracing::debug!(framework_id = %fw, task_id = ?status.task_id.as_ref().map(|t| &t.value), "retrying unacknowledged status update");
            self.send(agent_message::Message::StatusUpdate(
                agent_message::StatusUpdate {
                    framework_id: Some((&fw).into()),
                    status: Some(status),
                },
            ));
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
        {
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
            let budget = (disk > 0.0).then_some((disk * (1u64 << 20) as f64) as u64);
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
