//! Custom executors: long-lived processes, one per (framework, executor id) on this agent,
//! that run the tasks the agent hands them over the Executor API (`agora.v1.Executor`).
//!
//! ```text
//!  task with ExecutorInfo ──> executor running? ── no ──> fetch its uris, start its
//!        │                          │ yes                 process (native container)
//!        v                          v
//!  slot for the task ──> LAUNCH on the executor's stream (queued until it subscribes)
//!  executor Update(status) ──> the task's updates (RUNNING, …, terminal) ──> ACKNOWLEDGED
//!  KILL ──> KILL event; no terminal update within the grace period + 5 s: the executor
//!           is killed
//!  process ends ──> every task still in it: TASK_FAILED, REASON_EXECUTOR_TERMINATED
//!  no tasks for idle_timeout, framework shut down, agent stopping ──> SHUTDOWN event,
//!           then SIGTERM, grace, SIGKILL of its whole cgroup
//! ```
//!
//! An executor's cgroup is sized to the sum of its tasks' resources and follows them as
//! tasks come and go. It runs with the agent's isolation on the host network, and reaches
//! the agent at `AGORA_AGENT_ENDPOINT` with the secret `AGORA_EXECUTOR_TOKEN`. A Mesos
//! executor finds the same in Mesos's variables (`MESOS_AGENT_ENDPOINT`,
//! `MESOS_EXECUTOR_AUTHENTICATION_TOKEN`, …) and talks to [`crate::mesos`] instead.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_core::limits::{self, LimitError};
use agora_core::{AgentId, ExecutorId, FrameworkId, Resources, TaskId, TaskState};
use agora_proto::v1::{self, executor_event};
use agora_proto::{required, state_from_proto};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::checkpoint::{Checkpoint, SavedExecutor};
use crate::containerizer::{
    Container, ContainerEntry, ContainerKey, Containerizer, Containers, LaunchSpec, Termination,
    Updates,
};
use crate::fetcher::Fetcher;
use crate::native::{NativeContainerizer, OnStart, ProcessSpec, RunAs};
use crate::state::{Attachment, ProcessRecord};

/// Timing of custom executors.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// An executor that has not subscribed this long after it started is killed and its
    /// tasks fail with REASON_EXECUTOR_REGISTRATION_TIMEOUT. Default 20 s.
    pub registration_timeout: Duration,
    /// An executor re-attached after the agent restarted that has not subscribed again this
    /// long after the agent came back is killed, as `registration_timeout` (Mesos's
    /// `--executor_reregistration_timeout`). Shorter: a live executor only has to reconnect,
    /// and its tasks' updates wait on it. Default 5 s (executors of the SDK retry every
    /// second).
    pub reregistration_timeout: Duration,
    /// An executor without tasks this long is shut down. Default 5 s.
    pub idle_timeout: Duration,
    /// Between the SHUTDOWN event and SIGTERM. Default 3 s.
    pub shutdown_grace: Duration,
    /// Memory an executor's cgroup gets beyond its tasks', for the executor itself, in MiB.
    /// Default 32 (the Wasm executor gets more: it holds the engine and compiled code).
    pub overhead_mem_mib: f64,
    /// How long an executor waits for its agent to come back after losing it
    /// (`AGORA_RECOVERY_TIMEOUT`) before it gives up and ends its tasks. Default 15 min.
    pub recovery_timeout: Duration,
    /// The cluster CA (PEM) executors verify the agent's TLS with: written into each
    /// executor's sandbox as `ca.pem`, named by `AGORA_CA`. The agent sets it when it serves
    /// TLS.
    pub tls_ca: Option<Vec<u8>>,
    /// How often a Mesos executor subscribed over `/api/v1/executor` is sent HEARTBEAT.
    /// Default 30 min, as Mesos's agent.
    pub mesos_heartbeat: Duration,
}

impl ExecutorConfig {
    /// How long an executor has to subscribe: a new one, or one `recovered` from a
    /// previous agent.
    fn subscribe_within(&self, recovered: bool) -> Duration {
        if recovered {
            self.reregistration_timeout
        } else {
            self.registration_timeout
        }
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            registration_timeout: Duration::from_secs(20),
            reregistration_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(3),
            overhead_mem_mib: 32.0,
            recovery_timeout: Duration::from_secs(15 * 60),
            tls_ca: None,
            mesos_heartbeat: crate::mesos::HEARTBEAT,
        }
    }
}

type Key = (FrameworkId, ExecutorId);
/// An executor's event stream. Unbounded, unlike the master's streams: what goes on it is
/// bounded by the executor's own tasks (a launch, a kill and a few acknowledgements each),
/// and a launch must never be dropped because a burst of them outran the executor.
type EventTx = mpsc::UnboundedSender<Result<v1::ExecutorEvent, Status>>;

struct Slot {
    /// The executor's updates of the task, each with who to tell once it is checkpointed
    /// (the agent acknowledges it to the executor then, not before).
    updates: mpsc::UnboundedSender<(v1::TaskStatus, oneshot::Sender<()>)>,
    resources: Resources,
    /// LAUNCH was sent on a stream (not only queued).
    sent: bool,
    /// The latest usage the executor reported for the task.
    usage: Arc<Mutex<Option<v1::TaskUsage>>>,
}

/// How an executor is started, beyond its ExecutorInfo.
#[derive(Debug, Clone, Default)]
pub(crate) struct LaunchOptions {
    /// Memory for the executor itself, beyond its tasks', in MiB.
    pub overhead_mem_mib: f64,
    /// Directories it must see even under a private /tmp (its framework's is always kept).
    pub visible: Vec<PathBuf>,
    /// Put before the native isolation in its tasks' isolation (e.g. the Wasm sandbox).
    pub isolation_prefix: Option<String>,
    /// Run it as the agent's own user, not a task user: only for the agent's own programs
    /// (its Wasm executor).
    pub as_agent: bool,
}

#[derive(Default)]
struct ExecState {
    stream: Option<EventTx>,
    tasks: HashMap<TaskId, Slot>,
    queued: Vec<(TaskId, v1::ExecutorEvent)>,
    idle_since: Option<Instant>,
    shutting_down: bool,
    /// Why the agent stopped it, when it did.
    stopped_because: Option<(v1::Reason, String)>,
    /// The tasks a re-attached executor said it has when it subscribed again; the agent's
    /// other tasks for it never reached it.
    listed: Option<std::collections::HashSet<TaskId>>,
    /// The receiving ends of re-attached tasks' slots, made when the executor was (so that
    /// an update it sends again at once has a slot), until their runners take them.
    parked: HashMap<TaskId, mpsc::UnboundedReceiver<(v1::TaskStatus, oneshot::Sender<()>)>>,
    /// Its framework, as the agent last heard of it (the executor is told when it
    /// subscribes).
    framework: v1::FrameworkInfo,
}

/// One executor process and what the agent knows of it.
struct Exec {
    key: Key,
    info: v1::ExecutorInfo,
    agent_id: Option<AgentId>,
    token: String,
    state: Mutex<ExecState>,
    subscribed: watch::Sender<bool>,
    /// Cancelled to end the process (SIGTERM, grace, then its whole cgroup).
    stop: CancellationToken,
    /// Cancelled once the process has ended and `end` is set.
    dead: CancellationToken,
    end: Mutex<Option<Termination>>,
    limiter: Option<agora_executor_native::Limiter>,
    /// The uid and gid it runs as, when not the agent's: its tasks' sandboxes are given to it.
    user: Option<(u32, u32)>,
    /// Memory for the executor itself, in MiB, on top of its tasks'.
    overhead_mem_mib: f64,
    /// Held from reading the tasks' total to writing the cgroup's limits, so two resizes
    /// cannot write their totals in the wrong order.
    resizing: Mutex<()>,
    /// A previous agent started it; this one re-attached to it.
    recovered: bool,
}

impl Exec {
    /// An executor whose process is `container`, new or `recovered` from a previous agent;
    /// idle until a task arrives (or re-attaches), so that one without tasks cannot run for
    /// ever.
    #[allow(clippy::too_many_arguments)]
    fn new(
        key: Key,
        info: v1::ExecutorInfo,
        agent_id: Option<AgentId>,
        token: String,
        container: &crate::native::NativeContainer,
        overhead_mem_mib: f64,
        recovered: bool,
    ) -> Arc<Exec> {
        let (subscribed, _) = watch::channel(false);
        Arc::new(Exec {
            key,
            info,
            agent_id,
            token,
            state: Mutex::new(ExecState {
                idle_since: Some(Instant::now()),
                ..ExecState::default()
            }),
            resizing: Mutex::new(()),
            subscribed,
            stop: CancellationToken::new(),
            dead: CancellationToken::new(),
            end: Mutex::new(None),
            limiter: container.limiter(),
            user: container.user(),
            overhead_mem_mib,
            recovered,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExecState> {
        // A panic while holding this lock leaves plain data behind; carry on with it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn id(&self) -> &ExecutorId {
        &self.key.1
    }

    /// Sends `event` on the executor's stream; false when there is no stream (or it is
    /// closed, and then it is dropped: the executor must subscribe again).
    fn send(&self, state: &mut ExecState, event: executor_event::Event) -> bool {
        let Some(tx) = &state.stream else {
            return false;
        };
        match tx.send(Ok(v1::ExecutorEvent { event: Some(event) })) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(executor_id = %self.id(), "executor's event stream is closed; dropping it");
                state.stream = None;
                false
            }
        }
    }

    fn begin_shutdown(self: &Arc<Self>, grace: Duration, why: Option<(v1::Reason, String)>) {
        let mut st = self.lock();
        if st.shutting_down {
            return;
        }
        st.shutting_down = true;
        if st.stopped_because.is_none() {
            st.stopped_because = why;
        }
        let told = self.send(
            &mut st,
            executor_event::Event::Shutdown(executor_event::Shutdown {
                grace_period_seconds: grace.as_secs_f64(),
            }),
        );
        drop(st);
        let me = self.clone();
        tokio::spawn(async move {
            if told {
                let _ = tokio::time::timeout(grace, me.dead.cancelled()).await;
            }
            me.stop.cancel();
        });
    }

    /// Sets the cgroup's limits to the sum of the tasks' resources.
    fn resize(&self, config: &crate::native::NativeConfig) {
        let Some(limiter) = &self.limiter else { return };
        let _turn = self
            .resizing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total = {
            let st = self.lock();
            if st.tasks.is_empty() {
                return;
            }
            let mut total = Resources::default();
            for s in st.tasks.values() {
                total += &s.resources;
            }
            total
        };
        let mut limits = crate::native::limits(&total, config);
        limits.memory_bytes = limits
            .memory_bytes
            .map(|m| m + (self.overhead_mem_mib * (1u64 << 20) as f64) as u64);
        if let Err(e) = limiter.set(&limits) {
            tracing::warn!(executor_id = %self.id(), error = %e, "resizing the executor's cgroup");
        }
    }

    /// What a task still in the executor ends with, once the executor is gone.
    fn terminated(&self) -> Termination {
        let end = self
            .end
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(|t| t.message.clone()))
            .unwrap_or_else(|| "it ended".into());
        let because = self.lock().stopped_because.clone();
        match because {
            Some((reason, why)) => Termination::new(
                TaskState::Failed,
                reason,
                format!("executor {} was stopped: {why}", self.id()),
            ),
            None => Termination::new(
                TaskState::Failed,
                v1::Reason::ExecutorTerminated,
                format!("executor {} terminated: {end}", self.id()),
            ),
        }
    }
}

struct Inner {
    native: Arc<NativeContainerizer>,
    fetcher: Option<Fetcher>,
    work_dir: PathBuf,
    endpoint: String,
    config: ExecutorConfig,
    containers: Containers,
    /// The agent's owner task, for framework messages.
    events: mpsc::Sender<crate::actor::Event>,
    running: Mutex<HashMap<Key, Arc<Exec>>>,
    /// One lock per executor being looked up or started, so two tasks for a new executor
    /// start it once — without one framework's slow start holding up the others.
    launching: Mutex<HashMap<Key, std::sync::Weak<tokio::sync::Mutex<()>>>>,
    lifecycles: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Collects an executor's sandbox once its process has ended.
    gc: std::sync::OnceLock<crate::gc::Gc>,
    /// Where executors are recorded, for a restarted agent to re-attach to.
    checkpoint: std::sync::OnceLock<Arc<Checkpoint>>,
}

impl Inner {
    /// Records `exec` (`Some`) or its end; a failure only costs its recovery.
    fn save(&self, key: &Key, record: Option<&SavedExecutor>) -> bool {
        match self.checkpoint.get() {
            Some(cp) => match crate::checkpoint::off_the_runtime(|| {
                cp.write_executor(&key.0, &key.1, record)
            }) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(executor_id = %key.1, error = %e, "checkpointing an executor");
                    false
                }
            },
            None => true,
        }
    }
}

impl Inner {
    fn get(&self, key: &Key) -> Option<Arc<Exec>> {
        self.running.lock().ok().and_then(|r| r.get(key).cloned())
    }
}

/// Runs tasks that name an executor. Cheap to clone; [`ExecutorService`] serves the
/// executors' side.
#[derive(Clone)]
pub struct ExecutorContainerizer {
    inner: Arc<Inner>,
}

impl ExecutorContainerizer {
    /// `endpoint` is the agent's own address, which executors dial.
    pub fn new(
        native: Arc<NativeContainerizer>,
        fetcher: Option<Fetcher>,
        work_dir: PathBuf,
        endpoint: String,
        config: ExecutorConfig,
        containers: Containers,
        events: mpsc::Sender<crate::actor::Event>,
    ) -> Self {
        ExecutorContainerizer {
            inner: Arc::new(Inner {
                native,
                fetcher,
                work_dir,
                endpoint,
                config,
                containers,
                events,
                running: Mutex::new(HashMap::new()),
                launching: Mutex::new(HashMap::new()),
                lifecycles: Mutex::new(Vec::new()),
                gc: std::sync::OnceLock::new(),
                checkpoint: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Executors' sandboxes are scheduled with `gc` once their processes end.
    pub fn collect_with(&self, gc: crate::gc::Gc) {
        let _ = self.inner.gc.set(gc);
    }

    /// Executors are checkpointed in `checkpoint`, and told to wait for a restarted agent.
    pub fn checkpoint_with(&self, checkpoint: Arc<Checkpoint>) {
        let _ = self.inner.checkpoint.set(checkpoint);
    }

    /// Re-attaches to the executors a previous agent on this work directory started: each
    /// whose process still runs waits (`reregistration_timeout`) for its executor to subscribe
    /// again; the records of the others are dropped, and their tasks fail when recovered.
    pub fn recover(
        &self,
        saved: Vec<((FrameworkId, ExecutorId), SavedExecutor)>,
        agent_id: Option<&AgentId>,
        tasks: &HashMap<Key, Vec<(TaskId, Resources)>>,
        frameworks: &HashMap<FrameworkId, v1::FrameworkInfo>,
    ) {
        use prost::Message;
        for (key, rec) in saved {
            let alive = rec.process.as_ref().filter(|p| p.alive());
            let info = v1::ExecutorInfo::decode(rec.info.as_slice());
            let (Some(process), Ok(info)) = (alive, info) else {
                tracing::warn!(framework_id = %key.0, executor_id = %key.1, "an executor of the previous agent is gone");
                self.inner.save(&key, None);
                continue;
            };
            tracing::info!(framework_id = %key.0, executor_id = %key.1, pid = process.pid, "re-attaching to an executor");
            let container = self.inner.native.reattach(process);
            let exec = Exec::new(
                key.clone(),
                info,
                agent_id.cloned(),
                rec.token.clone(),
                &container,
                self.inner.config.overhead_mem_mib,
                true,
            );
            {
                let mut st = exec.lock();
                st.framework = frameworks.get(&key.0).cloned().unwrap_or_default();
                for (task, resources) in tasks.get(&key).into_iter().flatten() {
                    let (tx, rx) = mpsc::unbounded_channel();
                    st.tasks.insert(
                        task.clone(),
                        Slot {
                            updates: tx,
                            resources: resources.clone(),
                            sent: true,
                            usage: Arc::default(),
                        },
                    );
                    st.parked.insert(task.clone(), rx);
                }
                if !st.tasks.is_empty() {
                    st.idle_since = None;
                }
            }
            let sandbox = process.sandbox.clone();
            self.start(exec, container, rec, sandbox);
        }
    }

    /// Registers `exec` and runs its process's lifecycle.
    fn start(
        &self,
        exec: Arc<Exec>,
        container: crate::native::NativeContainer,
        record: SavedExecutor,
        sandbox: PathBuf,
    ) {
        let key = exec.key.clone();
        let entry_key = ContainerKey {
            framework: key.0.clone(),
            task: None,
            executor: Some(key.1.clone()),
        };
        if let Ok(mut c) = self.inner.containers.lock() {
            c.insert(
                entry_key.clone(),
                ContainerEntry {
                    containerizer: "executor",
                    probe: container.usage_probe(),
                    pid: container
                        .pid()
                        .unwrap_or_else(|| Arc::new(AtomicU32::new(0))),
                },
            );
        }
        if let Ok(mut r) = self.inner.running.lock() {
            r.insert(key, exec.clone());
        }
        let collect = self.inner.gc.get().map(|gc| gc.on_drop(sandbox));
        let lifecycle = lifecycle(self.inner.clone(), exec, container, entry_key, record);
        let handle = tokio::spawn(async move {
            let _collect = collect;
            lifecycle.await;
        });
        if let Ok(mut l) = self.inner.lifecycles.lock() {
            l.retain(|h| !h.is_finished());
            l.push(handle);
        }
    }

    /// The gRPC service executors talk to.
    pub fn service(&self) -> ExecutorService {
        ExecutorService {
            inner: self.inner.clone(),
        }
    }

    /// Executors running now.
    pub fn running(&self) -> usize {
        self.inner.running.lock().map(|r| r.len()).unwrap_or(0)
    }

    async fn get_or_launch(
        &self,
        spec: &LaunchSpec,
        info: &v1::ExecutorInfo,
        id: ExecutorId,
        opts: &LaunchOptions,
    ) -> Result<Arc<Exec>, Termination> {
        let key = (spec.framework_id.clone(), id.clone());
        let lock = {
            let mut l = self
                .inner
                .launching
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            l.retain(|_, w| w.strong_count() > 0);
            match l.get(&key).and_then(std::sync::Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    l.insert(key.clone(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        let _turn = lock.lock().await;
        if let Some(e) = self.inner.get(&key)
            && !e.dead.is_cancelled()
            && !e.lock().shutting_down
        {
            if e.info.command != info.command {
                return Err(Termination::new(
                    TaskState::Error,
                    v1::Reason::TaskInvalid,
                    format!(
                        "executor {id} is already running on this agent with another command; give the new one another executor id"
                    ),
                ));
            }
            e.lock().framework = spec.framework.clone();
            return Ok(e);
        }
        let failed = |reason, msg: String| Termination::new(TaskState::Failed, reason, msg);
        let sandbox =
            crate::sandbox::create_executor_run_dir(&self.inner.work_dir, &spec.framework_id, &id)
                .and_then(|dir| {
                    crate::containerizer::traversable_parents(&self.inner.work_dir, &dir)?;
                    Ok(dir)
                })
                .map_err(|e| {
                    failed(
                        v1::Reason::ContainerLaunchFailed,
                        format!("creating executor {id}'s sandbox: {e}"),
                    )
                })?;
        if !info.uris.is_empty() {
            let Some(fetcher) = &self.inner.fetcher else {
                return Err(failed(
                    v1::Reason::FetcherFailed,
                    "the executor has uris but this agent has no fetcher".into(),
                ));
            };
            fetcher
                .fetch_all(&info.uris, &sandbox, None)
                .await
                .map_err(|e| {
                    failed(
                        v1::Reason::FetcherFailed,
                        format!("fetching executor {id}'s uris: {e}"),
                    )
                })?;
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let endpoint = self.inner.endpoint.clone();
        let host_port = endpoint
            .split_once("://")
            .map_or(endpoint.as_str(), |(_, rest)| rest)
            .to_owned();
        let command = info.command.clone().unwrap_or_default();
        let mut env = vec![
            ("AGORA_EXECUTOR_ID".to_owned(), id.to_string()),
            ("AGORA_EXECUTOR_TOKEN".to_owned(), token.clone()),
            ("AGORA_AGENT_ENDPOINT".to_owned(), endpoint),
            // What a Mesos executor reads, as Mesos's agent sets it.
            (
                "MESOS_FRAMEWORK_ID".to_owned(),
                spec.framework_id.to_string(),
            ),
            ("MESOS_EXECUTOR_ID".to_owned(), id.to_string()),
            ("MESOS_AGENT_ENDPOINT".to_owned(), host_port),
            ("MESOS_DIRECTORY".to_owned(), sandbox.display().to_string()),
            ("MESOS_SANDBOX".to_owned(), sandbox.display().to_string()),
            (
                "MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD".to_owned(),
                format!("{}secs", self.inner.config.shutdown_grace.as_secs_f64()),
            ),
            (
                "MESOS_EXECUTOR_AUTHENTICATION_TOKEN".to_owned(),
                token.clone(),
            ),
        ];
        if let Some(ca) = &self.inner.config.tls_ca {
            // In the sandbox: an executor may not see the agent's files.
            let path = sandbox.join("ca.pem");
            std::fs::write(&path, ca).map_err(|e| {
                failed(
                    v1::Reason::ContainerLaunchFailed,
                    format!("writing the cluster CA into executor {id}'s sandbox: {e}"),
                )
            })?;
            env.push((
                agora_proto::tls::ENV_CA.to_owned(),
                path.display().to_string(),
            ));
        }
        if self.inner.checkpoint.get().is_some() {
            // As Mesos's MESOS_RECOVERY_TIMEOUT: how long to wait for a restarted agent.
            let secs = self.inner.config.recovery_timeout.as_secs_f64().to_string();
            env.push(("AGORA_RECOVERY_TIMEOUT".to_owned(), secs.clone()));
            env.push(("MESOS_RECOVERY_TIMEOUT".to_owned(), format!("{secs}secs")));
            env.push(("MESOS_CHECKPOINT".to_owned(), "1".to_owned()));
            // The longest pause between an executor's attempts to subscribe again.
            env.push((
                "MESOS_SUBSCRIPTION_BACKOFF_MAX".to_owned(),
                "2secs".to_owned(),
            ));
        } else {
            env.push(("MESOS_CHECKPOINT".to_owned(), "0".to_owned()));
        }
        let name = format!("executor-{id}");
        // The cgroup starts at the first task's size plus the executor's own.
        let mut first = spec.resources.clone();
        if opts.overhead_mem_mib > 0.0 {
            let own = agora_core::Resource::scalar("mem", opts.overhead_mem_mib)
                .map_err(|e| failed(v1::Reason::ContainerLaunchFailed, e.to_string()))?;
            first += &Resources::from_iter([own]);
        }
        let mut visible = vec![
            self.inner
                .work_dir
                .join("frameworks")
                .join(spec.framework_id.as_str()),
        ];
        visible.extend(opts.visible.iter().cloned());
        let container = self.inner.native.process(&ProcessSpec {
            command: &command,
            framework: &spec.framework_id,
            agent: spec.agent_id.as_ref(),
            name: &name,
            env,
            sandbox: &sandbox,
            resources: &first,
            max_duration: None,
            kill_grace: None,
            required_isolation: &[],
            // It runs its tasks in their sandboxes, all under its framework's directory.
            visible,
            run_as: if opts.as_agent {
                RunAs::Agent
            } else if command.user.is_empty() {
                // As a task: its framework's user, else the agent's default.
                RunAs::Named(&spec.framework.user)
            } else {
                RunAs::Named(&command.user)
            },
        })?;
        let exec = Exec::new(
            key.clone(),
            info.clone(),
            spec.agent_id.clone(),
            token,
            &container,
            opts.overhead_mem_mib,
            false,
        );
        exec.lock().framework = spec.framework.clone();
        tracing::info!(framework_id = %spec.framework_id, executor_id = %id, sandbox = %sandbox.display(), "starting executor");
        use prost::Message;
        let record = SavedExecutor {
            token: exec.token.clone(),
            info: info.encode_to_vec(),
            process: None,
        };
        // Recorded before it starts, so that a restarted agent knows its token.
        if !self.inner.save(&key, Some(&record)) {
            return Err(failed(
                v1::Reason::ContainerLaunchFailed,
                format!("executor {id} could not be checkpointed"),
            ));
        }
        self.start(exec.clone(), container, record, sandbox);
        Ok(exec)
    }
}

impl ExecutorContainerizer {
    /// Hands `task` to the framework's executor `info` (started if need be): what
    /// [`Containerizer::prepare`] does for custom executors, and the Wasm containerizer for
    /// its out-of-process executor.
    pub(crate) async fn prepare_in(
        &self,
        spec: &LaunchSpec,
        info: &v1::ExecutorInfo,
        task: v1::TaskInfo,
        opts: &LaunchOptions,
    ) -> Result<Box<dyn Container>, Termination> {
        let invalid =
            |msg: String| Termination::new(TaskState::Error, v1::Reason::TaskInvalid, msg);
        let id = info
            .executor_id
            .as_ref()
            .ok_or_else(|| invalid("the executor has no executor_id".into()))
            .and_then(|i| {
                ExecutorId::try_from(i).map_err(|e| invalid(format!("executor_id: {e}")))
            })?;
        let Some(command) = &info.command else {
            return Err(invalid(format!("executor {id} has no command")));
        };
        if command.network() == v1::command_task::Network::None {
            return Err(invalid(format!(
                "executor {id} asks for network: none, but an executor needs the host network to reach the agent"
            )));
        }
        let native = self
            .inner
            .native
            .isolation()
            .replace("+net-ns(on request)", "");
        let isolation = match &opts.isolation_prefix {
            Some(p) if native == "none" => p.clone(),
            Some(p) => format!("{p}+{native}"),
            None => native,
        };
        crate::containerizer::check_required(&spec.task.required_isolation, &isolation)?;
        let times = crate::containerizer::task_times(&spec.task)?;
        if spec.resources.mem() <= 0.0 {
            return Err(invalid(
                "the task has no `mem` resource: a task in an executor needs one, its executor's memory limit grows by it".into(),
            ));
        }
        let exec = self.get_or_launch(spec, info, id, opts).await?;
        // The executor runs the task in its sandbox, as the executor's user.
        crate::native::make_private(&spec.sandbox, exec.user).map_err(|e| {
            Termination::new(
                TaskState::Failed,
                v1::Reason::ContainerLaunchFailed,
                format!("giving the task's sandbox to executor {}: {e}", exec.id()),
            )
        })?;
        let grace = times
            .kill_grace
            .unwrap_or(self.inner.native.config().kill_grace);
        Ok(Box::new(ExecutorTask {
            inner: self.inner.clone(),
            exec,
            task,
            task_id: spec.task_id.clone(),
            sandbox: spec.sandbox.clone(),
            resources: spec.resources.clone(),
            grace,
            isolation,
            usage: Arc::new(Mutex::new(None)),
            recovered: false,
            end_ack: Mutex::new(None),
        }))
    }
}

/// Runs the executor's process until it ends; stops it when it does not subscribe in
/// time or stays idle.
async fn lifecycle(
    inner: Arc<Inner>,
    exec: Arc<Exec>,
    container: crate::native::NativeContainer,
    entry_key: ContainerKey,
    record: SavedExecutor,
) {
    let pid = container.pid();
    let hook = {
        let (inner, key) = (inner.clone(), exec.key.clone());
        move |process: ProcessRecord| {
            let mut record = record.clone();
            record.process = Some(process);
            inner.save(&key, Some(&record))
        }
    };
    let run = container.run_process(exec.stop.clone(), Some(OnStart::Executor(&hook)));
    tokio::pin!(run);
    let wait = inner.config.subscribe_within(exec.recovered);
    let registration = tokio::time::sleep(wait);
    tokio::pin!(registration);
    let subscribed = exec.subscribed.subscribe();
    let mut timed_out = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let end = loop {
        tokio::select! {
            end = &mut run => break end,
            () = &mut registration, if !timed_out && !*subscribed.borrow() => {
                timed_out = true;
                let why = format!(
                    "it did not subscribe {}within {wait:?}",
                    if exec.recovered { "again after the agent restarted " } else { "" },
                );
                tracing::warn!(executor_id = %exec.id(), "{why}");
                exec.lock().stopped_because = Some((v1::Reason::ExecutorRegistrationTimeout, why));
                exec.stop.cancel();
            }
            _ = tick.tick() => {
                let idle = {
                    let st = exec.lock();
                    !st.shutting_down
                        && st.idle_since.is_some_and(|t| t.elapsed() >= inner.config.idle_timeout)
                };
                if idle {
                    tracing::info!(executor_id = %exec.id(), "executor has no tasks; shutting it down");
                    exec.begin_shutdown(inner.config.shutdown_grace, None);
                }
            }
        }
    };
    tracing::info!(executor_id = %exec.id(), state = %end.state, message = %end.message, "executor ended");
    inner.save(&exec.key, None);
    if let Ok(mut e) = exec.end.lock() {
        *e = Some(end);
    }
    exec.lock().stream = None;
    exec.dead.cancel();
    if let Ok(mut r) = inner.running.lock()
        && r.get(&exec.key).is_some_and(|e| Arc::ptr_eq(e, &exec))
    {
        r.remove(&exec.key);
    }
    if let Ok(mut c) = inner.containers.lock()
        && c.get(&entry_key)
            .is_some_and(|e| pid.as_ref().is_some_and(|p| Arc::ptr_eq(&e.pid, p)))
    {
        // Only our own entry: a successor of the same id may have taken the key.
        c.remove(&entry_key);
    }
}

#[async_trait::async_trait]
impl Containerizer for ExecutorContainerizer {
    fn name(&self) -> &'static str {
        "executor"
    }

    fn isolation(&self) -> String {
        format!("executor({})", self.inner.native.isolation())
    }

    fn supports(&self, task: &v1::TaskInfo) -> bool {
        // A Wasm task runs in the agent's Wasm executor, under the agent's capability
        // policy; naming an executor of its own would go around it.
        task.executor.is_some() && !matches!(task.payload, Some(v1::task_info::Payload::Wasm(_)))
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination> {
        let Some(info) = &spec.task.executor else {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::TaskInvalid,
                "the task names no executor",
            ));
        };
        if info
            .executor_id
            .as_ref()
            .is_some_and(|i| i.value == crate::wasm::WASM_EXECUTOR_ID)
        {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::TaskInvalid,
                format!(
                    "executor id {:?} is the agent's own Wasm executor's; give yours another",
                    crate::wasm::WASM_EXECUTOR_ID
                ),
            ));
        }
        let opts = LaunchOptions {
            overhead_mem_mib: self.inner.config.overhead_mem_mib,
            ..LaunchOptions::default()
        };
        self.prepare_in(spec, info, spec.task.clone(), &opts).await
    }

    async fn recover(
        &self,
        spec: &LaunchSpec,
        how: &Attachment,
    ) -> Result<Box<dyn Container>, Termination> {
        let gone =
            |msg: String| Termination::new(TaskState::Failed, v1::Reason::ExecutorTerminated, msg);
        let Attachment::Executor(id) = how else {
            return Err(gone("the task's container is not an executor".into()));
        };
        let id = ExecutorId::new(id.clone()).map_err(|e| gone(e.to_string()))?;
        let exec = self
            .inner
            .get(&(spec.framework_id.clone(), id.clone()))
            .filter(|e| !e.dead.is_cancelled())
            .ok_or_else(|| {
                gone(format!(
                    "its executor {id} did not survive the agent's restart"
                ))
            })?;
        let grace = crate::containerizer::task_times(&spec.task)
            .ok()
            .and_then(|t| t.kill_grace)
            .unwrap_or(self.inner.native.config().kill_grace);
        Ok(Box::new(ExecutorTask {
            inner: self.inner.clone(),
            exec,
            task: spec.task.clone(),
            task_id: spec.task_id.clone(),
            sandbox: spec.sandbox.clone(),
            resources: spec.resources.clone(),
            grace,
            isolation: String::new(),
            usage: Arc::new(Mutex::new(None)),
            recovered: true,
            end_ack: Mutex::new(None),
        }))
    }

    async fn shutdown_framework(&self, framework: &FrameworkId) {
        let execs: Vec<Arc<Exec>> = self
            .inner
            .running
            .lock()
            .map(|r| {
                r.values()
                    .filter(|e| e.key.0 == *framework)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for e in &execs {
            e.begin_shutdown(
                self.inner.config.shutdown_grace,
                Some((
                    v1::Reason::FrameworkRemoved,
                    "its framework was shut down".into(),
                )),
            );
        }
        for e in execs {
            e.dead.cancelled().await;
        }
    }

    async fn shutdown(&self) {
        let execs: Vec<Arc<Exec>> = self
            .inner
            .running
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        for e in &execs {
            e.begin_shutdown(
                self.inner.config.shutdown_grace,
                Some((v1::Reason::AgentRestarted, "the agent is stopping".into())),
            );
        }
        let handles: Vec<_> = self
            .inner
            .lifecycles
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for h in handles {
            let _ = h.await;
        }
    }
}

/// A task handed to an executor.
struct ExecutorTask {
    inner: Arc<Inner>,
    exec: Arc<Exec>,
    task: v1::TaskInfo,
    task_id: TaskId,
    sandbox: PathBuf,
    resources: Resources,
    grace: Duration,
    isolation: String,
    usage: Arc<Mutex<Option<v1::TaskUsage>>>,
    /// Re-attached after the agent restarted: the executor has (or had) the task already.
    recovered: bool,
    /// Who hears once the executor's terminal update is checkpointed.
    end_ack: Mutex<Option<oneshot::Sender<()>>>,
}

/// Largest framework message an executor may send, in bytes.
pub const MAX_FRAMEWORK_MESSAGE: usize = 1 << 20;

/// Margin past the grace period for an executor to report a killed task.
const KILL_MARGIN: Duration = Duration::from_secs(5);

impl ExecutorTask {
    fn change(status: v1::TaskStatus) -> Option<Termination> {
        let state = state_from_proto(status.state())?;
        let mut t = Termination::new(state, status.reason(), status.message);
        t.exit_code = status.exit_code;
        t.data = status.data;
        t.usage = status.usage.map(Box::new);
        t.progress = status.progress;
        t.source = v1::StatusSource::SourceExecutor;
        if !status.uuid.is_empty() {
            t.origin = crate::containerizer::origin_of(&status.uuid);
        }
        Some(t)
    }

    async fn watch(&self, kill: CancellationToken, updates: &Updates) -> Termination {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let exec = &self.exec;
        {
            let mut st = exec.lock();
            let parked = if self.recovered {
                st.parked.remove(&self.task_id)
            } else {
                None
            };
            if let Some(parked) = parked {
                rx = parked;
                if let Some(slot) = st.tasks.get_mut(&self.task_id) {
                    slot.usage = self.usage.clone();
                }
            } else {
                if exec.dead.is_cancelled() {
                    drop(st);
                    return exec.terminated();
                }
                if self.recovered
                    && st
                        .listed
                        .as_ref()
                        .is_some_and(|l| !l.contains(&self.task_id))
                {
                    drop(st);
                    return unknown_to(exec.id());
                }
                st.tasks.insert(
                    self.task_id.clone(),
                    Slot {
                        updates: tx,
                        resources: self.resources.clone(),
                        sent: self.recovered,
                        usage: self.usage.clone(),
                    },
                );
                st.idle_since = None;
                // A re-attached task is in the executor already.
                if !self.recovered {
                    self.launch(exec, &mut st);
                }
            }
        }
        exec.resize(self.inner.native.config());
        self.follow(kill, updates, rx).await
    }

    /// Sends (or queues, until the executor subscribes) the task's LAUNCH.
    fn launch(&self, exec: &Exec, st: &mut ExecState) {
        let launch = executor_event::Event::Launch(executor_event::Launch {
            task: Some(self.task.clone()),
            sandbox: self.sandbox.to_string_lossy().into_owned(),
        });
        if exec.send(st, launch.clone()) {
            if let Some(s) = st.tasks.get_mut(&self.task_id) {
                s.sent = true;
            }
        } else {
            st.queued.push((
                self.task_id.clone(),
                v1::ExecutorEvent {
                    event: Some(launch),
                },
            ));
        }
    }

    /// Passes the executor's updates on until the task ends.
    async fn follow(
        &self,
        kill: CancellationToken,
        updates: &Updates,
        mut rx: mpsc::UnboundedReceiver<(v1::TaskStatus, oneshot::Sender<()>)>,
    ) -> Termination {
        let exec = &self.exec;
        let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let mut killing = false;
        loop {
            tokio::select! {
                biased;
                Some((status, durable)) = rx.recv() => {
                    let Some(change) = Self::change(status) else { continue };
                    if change.state.is_terminal() {
                        // Acknowledged once the end (which the disk watch may still replace)
                        // is checkpointed: see `run`.
                        if let Ok(mut a) = self.end_ack.lock() {
                            *a = Some(durable);
                        }
                        return change;
                    }
                    updates.send_acked(change, durable).await;
                }
                () = exec.dead.cancelled() => return exec.terminated(),
                () = kill.cancelled(), if !killing => {
                    killing = true;
                    let mut st = exec.lock();
                    let before = st.queued.len();
                    st.queued.retain(|(t, _)| *t != self.task_id);
                    if st.queued.len() < before {
                        return Termination::new(
                            TaskState::Killed,
                            v1::Reason::TaskKilled,
                            "killed before its executor subscribed",
                        );
                    }
                    let event = executor_event::Event::Kill(executor_event::Kill {
                        task_id: Some((&self.task_id).into()),
                        kill_policy: Some(v1::KillPolicy {
                            grace_period_seconds: self.grace.as_secs_f64(),
                        }),
                    });
                    let mut limit = self.grace + KILL_MARGIN;
                    if !exec.send(&mut st, event.clone()) {
                        // A re-attached executor not yet back: it hears of it when it is.
                        st.queued.push((self.task_id.clone(), v1::ExecutorEvent { event: Some(event) }));
                        limit += self.inner.config.subscribe_within(exec.recovered);
                    }
                    deadline = Some(Box::pin(tokio::time::sleep(limit)));
                }
                () = async { match deadline.as_mut() { Some(d) => d.await, None => std::future::pending().await } } => {
                    let why = format!(
                        "it did not end task {} within {:?} of being told to kill it",
                        self.task_id,
                        self.grace + KILL_MARGIN
                    );
                    tracing::warn!(executor_id = %exec.id(), "{why}; killing the executor");
                    exec.lock().stopped_because = Some((v1::Reason::ExecutorTerminated, why));
                    exec.stop.cancel();
                    return Termination::new(
                        TaskState::Killed,
                        v1::Reason::TaskKilled,
                        format!(
                            "killed with its executor {}, which did not end it within {:?}",
                            exec.id(),
                            self.grace + KILL_MARGIN
                        ),
                    );
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Container for ExecutorTask {
    async fn run(self: Box<Self>, kill: CancellationToken, updates: Updates) -> Termination {
        // LAUNCH goes only once a restarted agent would know the task is in the executor.
        if !self.recovered
            && !updates
                .attached(Attachment::Executor(self.exec.id().to_string()))
                .await
        {
            return Termination::new(
                TaskState::Failed,
                v1::Reason::ContainerLaunchFailed,
                "the task could not be checkpointed; it was not launched",
            );
        }
        // The task's `disk` against its sandbox, as for a native task.
        let quota = crate::disk::Quota::of(
            &self.sandbox,
            self.resources.disk(),
            self.inner.native.config().disk_watch_interval,
        );
        let end = crate::disk::enforce(quota, kill, |kill| self.watch(kill, &updates)).await;
        let ack = self.end_ack.lock().ok().and_then(|mut a| a.take());
        if let Some(ack) = ack {
            // The end goes now, so that the executor hears of it only once it is on disk;
            // the runner's report of it after this is the same update, and dropped.
            updates.send_acked(end.clone(), ack).await;
        }
        {
            let mut st = self.exec.lock();
            st.tasks.remove(&self.task_id);
            st.queued.retain(|(t, _)| *t != self.task_id);
            if st.tasks.is_empty() {
                st.idle_since = Some(Instant::now());
            }
        }
        self.exec.resize(self.inner.native.config());
        end
    }

    fn isolation(&self) -> Option<String> {
        // A re-attached task keeps the isolation it was reported with.
        (!self.isolation.is_empty()).then(|| self.isolation.clone())
    }

    fn reports_running(&self) -> bool {
        true
    }

    fn executor(&self) -> Option<ExecutorId> {
        Some(self.exec.id().clone())
    }

    fn usage_probe(&self) -> Option<crate::containerizer::UsageProbe> {
        let usage = self.usage.clone();
        Some(Arc::new(move || {
            usage.lock().ok().and_then(|u| *u).unwrap_or_default()
        }))
    }
}

/// The end of a task the agent gave an executor that, re-attached, does not have it.
fn unknown_to(executor: &ExecutorId) -> Termination {
    Termination::new(
        TaskState::Lost,
        v1::Reason::AgentRestarted,
        format!(
            "executor {executor} does not have the task after the agent restarted (it never reached the executor)"
        ),
    )
}

/// Checks the numbers and sizes of a usage report from an executor: every amount finite and
/// not negative.
fn check_usage(field: &str, u: &v1::TaskUsage) -> Result<(), LimitError> {
    for (name, v) in [
        ("cpu_seconds", u.cpu_seconds),
        ("wall_seconds", u.wall_seconds),
    ] {
        limits::number(&format!("{field}.{name}"), v, 0.0, f64::MAX)?;
    }
    Ok(())
}

/// Checks what an executor says of a task before it becomes a status update: a message of
/// at most [`limits::MAX_ARG`] bytes, data of at most the largest output a status carries,
/// a progress from 0 to 1, a sane usage.
fn check_status(s: &v1::TaskStatus) -> Result<(), LimitError> {
    limits::text("status.message", &s.message, limits::MAX_ARG)?;
    if s.data.len() > crate::wasm::MAX_OUTPUT_IN_STATUS {
        return Err(LimitError::new(
            "status.data",
            format!(
                "{} bytes; at most {} are allowed",
                s.data.len(),
                crate::wasm::MAX_OUTPUT_IN_STATUS
            ),
        ));
    }
    if let Some(p) = s.progress {
        limits::number("status.progress", f64::from(p), 0.0, 1.0)?;
    }
    if let Some(u) = &s.usage {
        check_usage("status.usage", u)?;
    }
    Ok(())
}

fn refused(e: &LimitError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The Executor API: where executors subscribe for their tasks and send status updates.
#[derive(Clone)]
pub struct ExecutorService {
    inner: Arc<Inner>,
}

impl ExecutorService {
    /// How often a Mesos executor is sent HEARTBEAT.
    pub(crate) fn heartbeat(&self) -> Duration {
        self.inner.config.mesos_heartbeat
    }

    /// Whether `header` names an executor running here, with its token (a HEARTBEAT).
    pub(crate) fn check(&self, header: Option<v1::ExecutorHeader>) -> Result<(), Status> {
        self.authorise(header).map(drop)
    }

    fn authorise(&self, header: Option<v1::ExecutorHeader>) -> Result<Arc<Exec>, Status> {
        let h = header.filter(|h| !h.token.is_empty()).ok_or_else(|| {
            Status::unauthenticated(
                "an executor call carries its header: framework, executor id and token (AGORA_EXECUTOR_TOKEN)",
            )
        })?;
        let framework = FrameworkId::try_from(required(h.framework_id.as_ref(), "framework_id")?)?;
        let executor = ExecutorId::try_from(required(h.executor_id.as_ref(), "executor_id")?)?;
        let exec = self
            .inner
            .get(&(framework.clone(), executor.clone()))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no executor {executor} of framework {framework} runs on this agent"
                ))
            })?;
        if h.token != exec.token {
            return Err(Status::permission_denied(format!(
                "wrong token for executor {executor}"
            )));
        }
        if exec.dead.is_cancelled() {
            return Err(Status::failed_precondition(format!(
                "executor {executor} has ended"
            )));
        }
        Ok(exec)
    }
}

#[tonic::async_trait]
impl v1::executor_server::Executor for ExecutorService {
    type SubscribeStream =
        tokio_stream::wrappers::UnboundedReceiverStream<Result<v1::ExecutorEvent, Status>>;

    async fn subscribe(
        &self,
        request: Request<v1::ExecutorSubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let r = request.into_inner();
        let exec = self.authorise(r.header)?;
        limits::count("tasks", r.tasks.len(), limits::MAX_LIST).map_err(|e| refused(&e))?;
        let listed: std::collections::HashSet<TaskId> = r
            .tasks
            .iter()
            .filter_map(|t| TaskId::try_from(t).ok())
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let framework = exec.lock().framework.clone();
        let subscribed = v1::ExecutorEvent {
            event: Some(executor_event::Event::Subscribed(
                executor_event::Subscribed {
                    agent_id: exec.agent_id.as_ref().map(Into::into),
                    executor_info: Some(exec.info.clone()),
                    framework_info: Some(framework),
                },
            )),
        };
        let _ = tx.send(Ok(subscribed));
        {
            let mut st = exec.lock();
            if st.stream.is_some() {
                tracing::info!(executor_id = %exec.id(), "executor subscribed again; the old stream is closed");
            }
            st.stream = Some(tx);
            if exec.recovered && st.listed.is_none() {
                // The tasks the agent re-attached to but the executor does not have end now.
                for (task, slot) in &st.tasks {
                    if !listed.contains(task) {
                        let t = unknown_to(exec.id());
                        let (durable, _) = oneshot::channel();
                        let _ = slot.updates.send((
                            v1::TaskStatus {
                                task_id: Some(task.into()),
                                state: agora_proto::state_to_proto(t.state) as i32,
                                reason: t.reason as i32,
                                message: t.message,
                                ..Default::default()
                            },
                            durable,
                        ));
                    }
                }
                st.listed = Some(listed);
            }
            for (task, event) in std::mem::take(&mut st.queued) {
                if let Some(e) = event.event
                    && exec.send(&mut st, e)
                    && let Some(s) = st.tasks.get_mut(&task)
                {
                    s.sent = true;
                }
            }
            if st.shutting_down {
                exec.send(
                    &mut st,
                    executor_event::Event::Shutdown(executor_event::Shutdown {
                        grace_period_seconds: self.inner.config.shutdown_grace.as_secs_f64(),
                    }),
                );
            }
        }
        exec.subscribed.send_replace(true);
        tracing::info!(framework_id = %exec.key.0, executor_id = %exec.id(), "executor subscribed");
        Ok(Response::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ))
    }

    async fn message(
        &self,
        request: Request<v1::ExecutorMessageRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        let exec = self.authorise(r.header)?;
        if r.data.len() > MAX_FRAMEWORK_MESSAGE {
            return Err(Status::invalid_argument(format!(
                "a framework message may hold at most {MAX_FRAMEWORK_MESSAGE} bytes, not {}",
                r.data.len()
            )));
        }
        let task = r.task_id.as_ref().map(TaskId::try_from).transpose()?;
        let _ = self
            .inner
            .events
            .send(crate::actor::Event::FrameworkMessage {
                framework: exec.key.0.clone(),
                executor: Some(exec.id().clone()),
                task,
                data: r.data,
            })
            .await;
        Ok(Response::new(v1::CallResponse {}))
    }

    async fn usage(
        &self,
        request: Request<v1::ExecutorUsageRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        let exec = self.authorise(r.header)?;
        limits::count("tasks", r.tasks.len(), limits::MAX_LIST).map_err(|e| refused(&e))?;
        for t in &r.tasks {
            if let Some(u) = &t.usage {
                check_usage("tasks.usage", u).map_err(|e| refused(&e))?;
            }
        }
        let st = exec.lock();
        for t in r.tasks {
            let Some(id) = t.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()) else {
                continue;
            };
            if let Some(slot) = st.tasks.get(&id)
                && let Ok(mut u) = slot.usage.lock()
            {
                *u = t.usage;
            }
        }
        Ok(Response::new(v1::CallResponse {}))
    }

    async fn update(
        &self,
        request: Request<v1::ExecutorUpdateRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        let exec = self.authorise(r.header)?;
        let status = required(r.status, "status")?;
        let task = TaskId::try_from(required(status.task_id.as_ref(), "status.task_id")?)?;
        check_status(&status).map_err(|e| refused(&e))?;
        let state = v1::TaskState::try_from(status.state)
            .ok()
            .and_then(state_from_proto)
            .filter(|s| !matches!(s, TaskState::Staging | TaskState::Unknown))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "status.state {} is not a state an executor may report",
                    status.state
                ))
            })?;
        let uuid = status.uuid.clone();
        let st = exec.lock();
        let slot = st.tasks.get(&task).ok_or_else(|| {
            Status::not_found(format!(
                "task {task} is not a running task of executor {}",
                exec.id()
            ))
        })?;
        tracing::debug!(executor_id = %exec.id(), task_id = %task, %state, "status update from executor");
        let (durable, checkpointed) = oneshot::channel();
        let _ = slot.updates.send((status, durable));
        drop(st);
        // Acknowledged to the executor once the agent has it on disk, as Mesos does: an
        // update the agent loses in a crash is one the executor still holds.
        let exec = exec.clone();
        tokio::spawn(async move {
            if checkpointed.await.is_ok() {
                let mut st = exec.lock();
                exec.send(
                    &mut st,
                    executor_event::Event::Acknowledged(executor_event::Acknowledged {
                        task_id: Some((&task).into()),
                        uuid,
                    }),
                );
            }
        });
        Ok(Response::new(v1::CallResponse {}))
    }
}
