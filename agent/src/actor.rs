//! The agent's owner task: carries out what the agent's state machine ([`crate::state`])
//! decides — sends to the master, starts and kills tasks' runners, writes the checkpoint.
//!
//! ```text
//!  RunTask ──> STAGING ──(runner)──> STARTING ──> fetch uris ──> prepare ──> RUNNING ──> run
//!                                                                   ──> terminal
//!  KillTask / ShutdownFramework ──> the runner's kill token is cancelled
//!
//!  each turn: events in ──> state.step ──> commands ──> the turn's saves in one durable
//!  commit ──> then its sends and launches, in order
//!  a runner that panics: its task fails (the agent keeps serving).
//! ```
//!
//! A restarted agent first restores the checkpoint's tasks: a task whose container can be
//! found again (a supervised process, a task in an executor) gets a runner that re-attaches
//! to it and reports how it ends; one that had not started its container fails with
//! REASON_AGENT_RESTARTED. Unacknowledged updates go again once the agent is registered.
//!
//! Every number from the master that becomes a duration is checked with
//! [`agora_core::limits`]: a task out of range ends in TASK_ERROR naming the field.
//!
//! The link task ([`crate::link`]) owns the connection; this task only sees "link up"
//! (with a sender), "registered", messages, and "link down".

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_core::{AgentId, FrameworkId, TaskId, TaskState};
use agora_executor_wasm::CancellationToken;
use agora_proto::v1::{self, agent_message, master_message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::checkpoint::{Checkpoint, CheckpointError, FrameworkWrite, TaskWrite};
use crate::containerizer::{
    ContainerEntry, ContainerKey, Containerizer, Containers, LaunchSpec, Termination, Updates,
};
use crate::fetcher::Fetcher;
use crate::sandbox;
use crate::state::{AgentState, Attachment, Command, Input, TaskKey};
pub use crate::updates::RetryPolicy;

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
    /// A task's runner reports a change; `durable` hears once it is checkpointed.
    Task {
        framework: FrameworkId,
        task: TaskId,
        change: Termination,
        durable: Option<oneshot::Sender<()>>,
    },
    /// A task's container can be found again this way (after a restart of the agent);
    /// `durable` hears once that is checkpointed.
    Attached {
        framework: FrameworkId,
        task: TaskId,
        how: Attachment,
        durable: Option<oneshot::Sender<()>>,
    },
    /// A task (or its executor) sends its framework bytes.
    FrameworkMessage {
        framework: FrameworkId,
        executor: Option<agora_core::ExecutorId>,
        task: Option<TaskId>,
        data: Vec<u8>,
    },
}

/// What the agent does with its tasks when it stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExit {
    /// Kill every task and executor (a development cluster, tests).
    #[default]
    Kill,
    /// Leave them running, for the next agent on this work directory to re-attach to.
    Leave,
}

/// What a turn does once its saves are durable.
enum Deferred {
    Send(agent_message::Message),
    Launch {
        key: TaskKey,
        task: Box<v1::TaskInfo>,
        resources: agora_core::Resources,
    },
}

pub struct Actor {
    pub(crate) work_dir: PathBuf,
    pub(crate) containerizers: Vec<Arc<dyn Containerizer>>,
    containers: Containers,
    fetcher: Option<Fetcher>,
    pub(crate) events: mpsc::Sender<Event>,
    pub(crate) state: AgentState,
    checkpoint: Option<Arc<Checkpoint>>,
    link: Option<mpsc::Sender<v1::AgentMessage>>,
    kills: HashMap<TaskKey, CancellationToken>,
    runners: JoinSet<()>,
    /// Which task each runner drives, to fail the task should its runner panic.
    runner_tasks: HashMap<tokio::task::Id, TaskKey>,
    /// Collects a task's sandbox once its runner has ended.
    gc: Option<crate::gc::Gc>,
    on_exit: OnExit,
    /// This turn's tasks to checkpoint, whether the id is to be, and what waits for them.
    dirty: BTreeSet<TaskKey>,
    frameworks_dirty: BTreeSet<FrameworkId>,
    id_dirty: bool,
    outbox: Vec<Deferred>,
    /// Registrations the link waits for.
    replies: Vec<oneshot::Sender<v1::AgentMessage>>,
    /// Told once this turn's saves are durable (an executor's update, a task's attachment).
    durable: Vec<oneshot::Sender<()>>,
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
            containerizers,
            containers,
            fetcher,
            events,
            state: AgentState::new(info, retry, Instant::now()),
            checkpoint: None,
            link: None,
            kills: HashMap::new(),
            runners: JoinSet::new(),
            runner_tasks: HashMap::new(),
            gc: None,
            on_exit: OnExit::Kill,
            dirty: BTreeSet::new(),
            frameworks_dirty: BTreeSet::new(),
            id_dirty: false,
            outbox: Vec::new(),
            replies: Vec::new(),
            durable: Vec::new(),
        }
    }

    /// Finished tasks' sandboxes are scheduled with `gc`.
    pub fn with_gc(mut self, gc: crate::gc::Gc) -> Self {
        self.gc = Some(gc);
        self
    }

    /// Every change is checkpointed in `checkpoint`; at exit, tasks are left running or
    /// killed as `on_exit` says.
    pub fn with_checkpoint(mut self, checkpoint: Arc<Checkpoint>, on_exit: OnExit) -> Self {
        self.checkpoint = Some(checkpoint);
        self.on_exit = on_exit;
        self
    }

    /// Takes over what a previous agent on this work directory checkpointed: its id and its
    /// tasks, re-attaching to the containers that can be found again.
    pub fn recover(&mut self, saved: crate::checkpoint::Saved) {
        let now = Instant::now();
        if let Some(id) = saved.agent_id {
            tracing::info!(agent_id = %id, tasks = saved.tasks.len(), "recovering from the checkpoint");
            self.state.agent_id = Some(id);
            // The info may differ where recovery allows (a detected disk): save the new one.
            self.id_dirty = true;
        }
        for (id, info) in saved.frameworks {
            self.state.restore_framework(id, info);
        }
        for (key, task) in saved.tasks {
            let attachment = task.attachment.clone();
            let over = task.state.is_terminal();
            let info = task.info.clone();
            self.state.restore(key.clone(), task, now);
            if over {
                continue;
            }
            match attachment {
                Some(how) => self.reattach(key, info, how),
                None => self.apply(Input::Changed {
                    key,
                    change: Termination::new(
                        TaskState::Lost,
                        v1::Reason::AgentRestarted,
                        "the agent restarted and cannot find the task's container again (it had not started, or it ran in the agent's own process)",
                    ),
                }),
            }
        }
        for c in self.state.forget_idle() {
            self.apply_command(c);
        }
    }

    /// Runs until `shutdown`; then kills every task (or leaves them, see [`OnExit`]).
    ///
    /// # Errors
    /// When the checkpoint cannot be written: the agent cannot keep its promises and stops.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Event>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), CheckpointError> {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut result = self.flush();
        while result.is_ok() {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                ev = rx.recv() => match ev {
                    Some(ev) => {
                        self.handle(ev);
                        // A turn takes what has arrived, so that one commit covers it all.
                        for _ in 0..255 {
                            match rx.try_recv() {
                                Ok(ev) => self.handle(ev),
                                Err(_) => break,
                            }
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.apply(Input::Tick),
                Some(done) = self.runners.join_next_with_id(), if !self.runners.is_empty() => {
                    self.runner_ended(done);
                }
            }
            result = self.flush();
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot checkpoint; the agent stops");
        }
        if self.on_exit == OnExit::Leave {
            tracing::info!(
                tasks = self.state.tasks.len(),
                "agent stopping; its tasks keep running for the next agent on this work directory"
            );
            // Their sandboxes are still in use: the runners' guards must not schedule them.
            if let Some(gc) = &self.gc {
                gc.freeze();
            }
            // A task no supervisor holds would be left with no one to find it: it ends now.
            let unsupervised: Vec<TaskKey> = self
                .state
                .tasks
                .iter()
                .filter(|(_, t)| !t.state.is_terminal() && t.attachment.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            for k in &unsupervised {
                if let Some(kill) = self.kills.get(k) {
                    kill.cancel();
                }
            }
            let ids: std::collections::HashSet<tokio::task::Id> = self
                .runner_tasks
                .iter()
                .filter(|(_, k)| unsupervised.contains(k))
                .map(|(id, _)| *id)
                .collect();
            let drain = async {
                let mut left = ids.len();
                while left > 0 {
                    match self.runners.join_next_with_id().await {
                        Some(Ok((id, ()))) if ids.contains(&id) => left -= 1,
                        Some(Err(e)) if ids.contains(&e.id()) => left -= 1,
                        Some(_) => {}
                        None => break,
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
            self.runners.abort_all();
            while self.runners.join_next().await.is_some() {}
            let _ = self.flush();
            return result;
        }
        tracing::info!(
            tasks = self.state.tasks.len(),
            "agent shutting down; killing its tasks"
        );
        for k in self.kills.values() {
            k.cancel();
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
        result
    }

    /// A runner ended: normally it has reported its task's end; one that panicked has not,
    /// so its task fails here rather than staying in its last state for ever.
    fn runner_ended(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (id, panic) = match done {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), Some(e.to_string())),
        };
        let Some(key) = self.runner_tasks.remove(&id) else {
            return;
        };
        if let Some(k) = self.kills.remove(&key) {
            k.cancel();
        }
        if let Some(panic) = panic {
            tracing::error!(framework_id = %key.0, task_id = %key.1, error = %panic, "a task's runner failed");
            self.apply(Input::Changed {
                key,
                change: Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("the agent's runner of the task failed: {panic}"),
                ),
            });
        }
    }

    pub(crate) fn handle(&mut self, ev: Event) {
        match ev {
            #[cfg(test)]
            Event::Crash => panic!("injected fault"),
            // Answered once the turn is durable: the master must not hear of a state a
            // restart would take back.
            Event::Connecting { reply } => self.replies.push(reply),
            Event::LinkUp { tx } => {
                self.link = Some(tx);
                self.apply(Input::LinkUp);
            }
            Event::LinkDown => {
                if self.link.take().is_some() {
                    tracing::warn!("lost the link to the master; reconnecting");
                }
                self.apply(Input::LinkDown);
            }
            Event::FromMaster(msg) => self.apply(Input::Master(msg)),
            Event::Task {
                framework,
                task,
                change,
                durable,
            } => {
                self.apply(Input::Changed {
                    key: (framework, task),
                    change,
                });
                self.durable.extend(durable);
            }
            Event::Attached {
                framework,
                task,
                how,
                durable,
            } => {
                self.apply(Input::Attached {
                    key: (framework, task),
                    how,
                });
                self.durable.extend(durable);
            }
            Event::FrameworkMessage {
                framework,
                executor,
                task,
                data,
            } => {
                // Like Mesos's framework messages: best effort, not retried.
                if self.state.registered() {
                    self.outbox
                        .push(Deferred::Send(agent_message::Message::FrameworkMessage(
                            agent_message::FrameworkMessage {
                                framework_id: Some((&framework).into()),
                                executor_id: executor.as_ref().map(Into::into),
                                task_id: task.as_ref().map(Into::into),
                                data,
                            },
                        )));
                } else {
                    tracing::debug!(framework_id = %framework, "dropping a framework message: not registered");
                }
            }
        }
    }

    /// One input through the state machine; its commands are carried out or deferred to
    /// the end of the turn.
    pub(crate) fn apply(&mut self, input: Input) {
        for c in self.state.step(Instant::now(), input) {
            self.apply_command(c);
        }
    }

    fn apply_command(&mut self, c: Command) {
        match c {
            Command::Send(m) => self.outbox.push(Deferred::Send(m)),
            Command::Launch {
                key,
                task,
                resources,
            } => {
                // The token exists from now: a kill in this same turn reaches the task.
                self.kills.entry(key.clone()).or_default();
                self.outbox.push(Deferred::Launch {
                    key,
                    task,
                    resources,
                });
            }
            Command::Kill(key) => {
                if let Some(k) = self.kills.get(&key) {
                    k.cancel();
                }
            }
            Command::ShutdownFramework(fw) => {
                for c in self.containerizers.clone() {
                    let fw = fw.clone();
                    self.runners
                        .spawn(async move { c.shutdown_framework(&fw).await });
                }
            }
            Command::Save(key) => {
                self.dirty.insert(key);
            }
            Command::SaveId => self.id_dirty = true,
            Command::SaveFramework(fw) => {
                self.frameworks_dirty.insert(fw);
            }
        }
    }

    /// Ends the turn: its saves in one durable commit, then what waited for them.
    ///
    /// # Errors
    /// When the commit fails.
    fn flush(&mut self) -> Result<(), CheckpointError> {
        while !self.dirty.is_empty()
            || !self.frameworks_dirty.is_empty()
            || self.id_dirty
            || !self.outbox.is_empty()
        {
            if let Some(cp) = &self.checkpoint
                && (!self.dirty.is_empty() || !self.frameworks_dirty.is_empty() || self.id_dirty)
            {
                let frameworks: Vec<FrameworkWrite<'_>> = self
                    .frameworks_dirty
                    .iter()
                    .map(|f| (f, self.state.framework(f)))
                    .collect();
                let writes: Vec<TaskWrite<'_>> = self
                    .dirty
                    .iter()
                    .map(|k| match self.state.tasks.get(k) {
                        Some(t) => TaskWrite::Put(k, t),
                        None => TaskWrite::Remove(k),
                    })
                    .collect();
                let identity = self
                    .state
                    .agent_id
                    .as_ref()
                    .filter(|_| self.id_dirty)
                    .map(|id| (id, &self.state.info));
                crate::checkpoint::off_the_runtime(|| cp.write(identity, &frameworks, &writes))?;
            }
            self.dirty.clear();
            self.frameworks_dirty.clear();
            self.id_dirty = false;
            for d in std::mem::take(&mut self.outbox) {
                match d {
                    Deferred::Send(m) => self.send(m),
                    Deferred::Launch {
                        key,
                        task,
                        resources,
                    } => self.launch(key, *task, resources, None),
                }
            }
        }
        for d in self.durable.drain(..) {
            let _ = d.send(());
        }
        if !self.replies.is_empty() {
            let registration = self.state.registration();
            for r in self.replies.drain(..) {
                let _ = r.send(registration.clone());
            }
        }
        Ok(())
    }

    fn send(&mut self, message: agent_message::Message) {
        let Some(link) = &self.link else { return };
        match link.try_send(v1::AgentMessage {
            message: Some(message),
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("link to the master is congested; will retry");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.link = None;
                self.apply(Input::LinkDown);
            }
        }
    }

    /// Starts a runner for the task (`how`: re-attaching to its container).
    fn launch(
        &mut self,
        key: TaskKey,
        task: v1::TaskInfo,
        resources: agora_core::Resources,
        how: Option<Attachment>,
    ) {
        let wanted = match &how {
            None => None,
            Some(Attachment::Process(_)) => Some("native"),
            Some(Attachment::Executor(_)) => Some("executor"),
        };
        let found = self
            .containerizers
            .iter()
            .find(|c| match wanted {
                Some(name) => c.name() == name,
                None => c.supports(&task),
            })
            .cloned();
        let Some(containerizer) = found else {
            let kind = match task.payload {
                Some(v1::task_info::Payload::Command(_)) => "command",
                Some(v1::task_info::Payload::Wasm(_)) => "wasm",
                None => "empty",
            };
            let msg = format!("this agent has no containerizer for {kind} tasks");
            self.apply(Input::Changed {
                key,
                change: Termination::new(
                    TaskState::Error,
                    v1::Reason::ContainerizerUnavailable,
                    msg,
                ),
            });
            return;
        };
        let (fw, tid) = key.clone();
        let span = tracing::info_span!("task", framework_id = %fw, task_id = %tid, containerizer = containerizer.name());
        let kill = self.kills.entry(key.clone()).or_default().clone();
        let runner = Runner {
            containerizer,
            containers: self.containers.clone(),
            fetcher: self.fetcher.clone(),
            agent_id: self.state.agent_id.clone(),
            work_dir: self.work_dir.clone(),
            framework_info: self.state.framework(&fw).cloned().unwrap_or_default(),
            framework: fw,
            task_id: tid,
            task,
            resources,
            kill,
            events: self.events.clone(),
            gc: self.gc.clone(),
            recover: how,
        };
        let handle = self.runners.spawn(runner.run().instrument(span));
        self.runner_tasks.insert(handle.id(), key);
    }

    /// A runner that finds the task's container again and follows it to its end.
    fn reattach(&mut self, key: TaskKey, task: v1::TaskInfo, how: Attachment) {
        let resources = agora_proto::resources_from_proto(&task.resources).unwrap_or_default();
        tracing::info!(framework_id = %key.0, task_id = %key.1, ?how, "re-attaching to a task");
        self.launch(key, task, resources, Some(how));
    }
}

/// Drives one task through its containerizer, reporting each step to the owner task.
struct Runner {
    containerizer: Arc<dyn Containerizer>,
    containers: Containers,
    fetcher: Option<Fetcher>,
    agent_id: Option<AgentId>,
    work_dir: PathBuf,
    framework: FrameworkId,
    framework_info: v1::FrameworkInfo,
    task_id: TaskId,
    task: v1::TaskInfo,
    resources: agora_core::Resources,
    kill: CancellationToken,
    events: mpsc::Sender<Event>,
    gc: Option<crate::gc::Gc>,
    /// Re-attach to the task's container instead of starting it.
    recover: Option<Attachment>,
}

impl Runner {
    async fn report(&self, change: Termination) {
        let _ = self
            .events
            .send(Event::Task {
                framework: self.framework.clone(),
                task: self.task_id.clone(),
                change,
                durable: None,
            })
            .await;
    }

    fn spec(&self, sandbox: PathBuf) -> LaunchSpec {
        LaunchSpec {
            agent_id: self.agent_id.clone(),
            framework_id: self.framework.clone(),
            framework: self.framework_info.clone(),
            task_id: self.task_id.clone(),
            task: self.task.clone(),
            resources: self.resources.clone(),
            sandbox,
        }
    }

    async fn run(self) {
        if let Some(how) = self.recover.clone() {
            return self.run_recovered(how).await;
        }
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
        let spec = self.spec(sandbox);
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
            Ok(container) => self.follow(container, true).await,
        };
        self.report(end).await;
    }

    /// Finds the task's container again after the agent restarted, and follows it.
    async fn run_recovered(self, how: Attachment) {
        let sandbox = match &how {
            Attachment::Process(p) => Some(p.sandbox.clone()),
            Attachment::Executor(_) => {
                sandbox::latest_run_dir(&self.work_dir, &self.framework, &self.task_id)
            }
        };
        let Some(sandbox) = sandbox else {
            self.report(Termination::new(
                TaskState::Lost,
                v1::Reason::AgentRestarted,
                "the agent restarted and the task's sandbox is gone",
            ))
            .await;
            return;
        };
        let _collect = self.gc.as_ref().map(|gc| gc.on_drop(sandbox.clone()));
        let spec = self.spec(sandbox);
        let end = match self.containerizer.recover(&spec, &how).await {
            Err(t) => t,
            Ok(container) => self.follow(container, false).await,
        };
        self.report(end).await;
    }

    /// Runs a prepared (or re-attached) container to its end; `started`: it is new, so the
    /// agent reports TASK_RUNNING unless the container does.
    async fn follow(
        &self,
        container: Box<dyn crate::containerizer::Container>,
        started: bool,
    ) -> Termination {
        let isolation = container.isolation();
        let updates = Updates {
            events: self.events.clone(),
            framework: self.framework.clone(),
            task: self.task_id.clone(),
            isolation: isolation.clone(),
        };
        if started && !container.reports_running() {
            let mut running = Termination::new(TaskState::Running, v1::Reason::Unspecified, "");
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::SavedTask;

    /// An actor with no containerizers, not linked, working in `work_dir`.
    fn bare(work_dir: PathBuf) -> Actor {
        let (events, _rx) = mpsc::channel(16);
        Actor::new(
            work_dir,
            v1::AgentInfo::default(),
            Vec::new(),
            Containers::default(),
            None,
            RetryPolicy {
                initial: Duration::from_secs(10),
                max: Duration::from_secs(60),
            },
            events,
        )
    }

    /// A task as a previous agent checkpointed it, in `state`, with nothing waiting.
    fn saved(state: TaskState) -> SavedTask {
        SavedTask {
            info: v1::TaskInfo::default(),
            state,
            isolation: String::new(),
            pending: Vec::new(),
            attachment: None,
            origins: Vec::new(),
        }
    }

    /// An actor with no containerizers, registered, whose messages to the master land in
    /// the returned receiver.
    fn registered() -> (Actor, mpsc::Receiver<v1::AgentMessage>) {
        let mut a = bare(std::env::temp_dir());
        let (tx, rx) = mpsc::channel(64);
        a.handle(Event::LinkUp { tx });
        a.handle(Event::FromMaster(Box::new(
            master_message::Message::Registered(master_message::Registered {
                agent_id: Some(v1::AgentId {
                    value: "m-A000001".into(),
                }),
                master_id: "m".into(),
                heartbeat_interval_seconds: 5.0,
            }),
        )));
        a.flush().unwrap();
        (a, rx)
    }

    fn key() -> TaskKey {
        (FrameworkId::new("fw").unwrap(), TaskId::new("t").unwrap())
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

    #[tokio::test]
    async fn a_task_whose_runner_panics_fails_instead_of_hanging() {
        let (mut a, mut rx) = registered();
        a.state
            .restore(key(), saved(TaskState::Staging), Instant::now());
        let (fw, t) = key();
        a.handle(Event::Task {
            framework: fw.clone(),
            task: t.clone(),
            change: Termination::new(TaskState::Starting, v1::Reason::Unspecified, ""),
            durable: None,
        });
        a.flush().unwrap();
        let starting = sent(&mut rx);
        assert_eq!(starting.len(), 1);
        let kill = CancellationToken::new();
        a.kills.insert(key(), kill.clone());
        let handle = a.runners.spawn(async { panic!("a bug") });
        a.runner_tasks.insert(handle.id(), key());
        let done = a.runners.join_next_with_id().await.unwrap();
        a.runner_ended(done);
        assert_eq!(a.state.tasks[&key()].state, TaskState::Failed);
        assert!(kill.is_cancelled());
        a.handle(Event::FromMaster(Box::new(
            master_message::Message::Acknowledge(master_message::AcknowledgeUpdate {
                framework_id: Some((&fw).into()),
                task_id: Some((&t).into()),
                uuid: starting[0].uuid.clone(),
            }),
        )));
        a.flush().unwrap();
        let failed = sent(&mut rx);
        assert_eq!(failed[0].state(), v1::TaskState::TaskFailed);
        assert!(failed[0].message.contains("a bug"), "{}", failed[0].message);
    }

    /// What waits on a turn hears only once the turn's saves are committed: an executor's
    /// update (the executor is told it was received only then, so an agent killed before the
    /// commit has the executor send it again), and the registration the link sends (which
    /// must not report a state a restart would take back).
    #[test]
    fn updates_and_the_registration_wait_for_the_turns_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, _) = Checkpoint::open(dir.path()).unwrap();
        let mut a = bare(dir.path().to_path_buf()).with_checkpoint(Arc::new(cp), OnExit::Leave);
        a.state
            .restore(key(), saved(TaskState::Starting), Instant::now());
        let (fw, t) = key();
        let (durable, mut received) = oneshot::channel();
        a.handle(Event::Task {
            framework: fw,
            task: t,
            change: Termination::new(TaskState::Running, v1::Reason::Unspecified, ""),
            durable: Some(durable),
        });
        let (reply, mut registration) = oneshot::channel();
        a.handle(Event::Connecting { reply });
        assert!(
            received.try_recv().is_err(),
            "acknowledged before the commit"
        );
        assert!(
            registration.try_recv().is_err(),
            "registered before the commit"
        );

        a.flush().unwrap();
        received.try_recv().expect("acknowledged after the commit");
        let Some(agent_message::Message::Register(r)) =
            registration.try_recv().expect("registration").message
        else {
            panic!("not a registration");
        };
        assert_eq!(r.tasks[0].state(), v1::TaskState::TaskRunning);
        drop(a);
        let (_, saved) = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(saved.tasks[0].1.state, TaskState::Running);
        assert_eq!(
            saved.tasks[0].1.pending.len(),
            1,
            "the update, unacknowledged"
        );
    }

    /// A restarted agent takes its frameworks back from the checkpoint with their tasks; one
    /// left there without tasks is dropped, from memory and from the checkpoint.
    #[test]
    fn frameworks_come_back_with_their_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let (cp, _) = Checkpoint::open(dir.path()).unwrap();
        let (fw, idle) = (key().0, FrameworkId::new("idle").unwrap());
        let info = |name: &str| v1::FrameworkInfo {
            name: name.into(),
            ..Default::default()
        };
        let (batch, gone) = (info("batch"), info("gone"));
        cp.write(None, &[(&fw, Some(&batch)), (&idle, Some(&gone))], &[])
            .unwrap();
        drop(cp);
        let (cp, mut found) = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(found.frameworks.len(), 2);
        found.tasks.push((key(), saved(TaskState::Finished)));
        let mut a = bare(dir.path().to_path_buf()).with_checkpoint(Arc::new(cp), OnExit::Leave);
        a.recover(found);
        a.flush().unwrap();
        assert_eq!(a.state.framework(&fw), Some(&batch));
        assert_eq!(a.state.framework(&idle), None);
        drop(a);
        let (_, found) = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(found.frameworks, vec![(fw, batch)]);
    }

    #[test]
    fn a_kill_in_the_launchs_own_turn_reaches_the_task() {
        let (mut a, _rx) = registered();
        let (fw, t) = key();
        a.handle(Event::FromMaster(Box::new(
            master_message::Message::RunTask(master_message::RunTask {
                framework_id: Some((&fw).into()),
                task: Some(v1::TaskInfo {
                    task_id: Some((&t).into()),
                    resources: agora_proto::resources_to_proto(
                        &agora_core::parse_resources("cpus:1;mem:32").unwrap(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )));
        a.handle(Event::FromMaster(Box::new(
            master_message::Message::KillTask(master_message::KillTask {
                framework_id: Some((&fw).into()),
                task_id: Some((&t).into()),
            }),
        )));
        // Before the turn ends (and the launch is carried out), the kill has a token to cancel.
        assert!(a.kills[&key()].is_cancelled());
    }
}
