//! Write custom executors: processes the agent starts for a framework, which receive tasks
//! over the agent's Executor API and report their status.
//!
//! The agent starts an executor with its address, ids and a secret in the environment;
//! [`ExecutorEnv::from_env`] reads them and [`ExecutorEnv::subscribe`] connects:
//!
//! ```no_run
//! use agora_sdk::executor::{ExecutorEnv, ExecutorEvent, status};
//! use agora_sdk::core::TaskState;
//!
//! # async fn demo() -> Result<(), agora_sdk::Error> {
//! let (executor, mut events) = ExecutorEnv::from_env()?.subscribe().await?;
//! while let Some(event) = events.next().await {
//!     match event? {
//!         ExecutorEvent::Launch { task, .. } => {
//!             let id = agora_sdk::core::TaskId::try_from(task.task_id.as_ref().unwrap()).unwrap();
//!             executor.update(status(&id, TaskState::Running, "started")).await?;
//!             executor.update(status(&id, TaskState::Finished, "done")).await?;
//!         }
//!         ExecutorEvent::Shutdown { .. } => break,
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! An executor the agent starts with `AGORA_RECOVERY_TIMEOUT` outlives the agent: when the
//! event stream breaks, [`ExecutorEvents::next`] subscribes again (every second, until the
//! agent is back or the timeout has passed), tells the agent which tasks it still has, and
//! sends again every update the agent has not acknowledged, in order. Meanwhile
//! [`Executor::update`] keeps updates it cannot deliver for then.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_core::{ExecutorId, FrameworkId, TaskId, TaskState};
use agora_proto::v1::{self, executor_client::ExecutorClient, executor_event};
use agora_proto::{MAX_MESSAGE_BYTES, now_timestamp, state_to_proto};
use tonic::transport::Channel;

use crate::Error;

/// Where and who an executor is, as the agent told it.
#[derive(Debug, Clone)]
pub struct ExecutorEnv {
    /// The agent's address, e.g. `http://127.0.0.1:5051`.
    pub endpoint: String,
    pub framework_id: FrameworkId,
    pub executor_id: ExecutorId,
    pub token: String,
    /// How long to wait for a restarted agent (`AGORA_RECOVERY_TIMEOUT`); `None`: the
    /// executor ends with its first stream.
    pub recovery_timeout: Option<Duration>,
}

impl ExecutorEnv {
    /// Reads `AGORA_AGENT_ENDPOINT`, `AGORA_FRAMEWORK_ID`, `AGORA_EXECUTOR_ID` and
    /// `AGORA_EXECUTOR_TOKEN`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the variable that is missing or malformed.
    pub fn from_env() -> Result<Self, Error> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                Error::Invalid(format!(
                    "{name} is not set: run this program as an Agora executor (the agent sets it)"
                ))
            })
        };
        Ok(ExecutorEnv {
            endpoint: var("AGORA_AGENT_ENDPOINT")?,
            framework_id: FrameworkId::new(var("AGORA_FRAMEWORK_ID")?)
                .map_err(|e| Error::Invalid(format!("AGORA_FRAMEWORK_ID: {e}")))?,
            executor_id: ExecutorId::new(var("AGORA_EXECUTOR_ID")?)
                .map_err(|e| Error::Invalid(format!("AGORA_EXECUTOR_ID: {e}")))?,
            token: var("AGORA_EXECUTOR_TOKEN")?,
            recovery_timeout: match std::env::var("AGORA_RECOVERY_TIMEOUT") {
                Ok(v) => Some(
                    v.parse::<f64>()
                        .ok()
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "AGORA_RECOVERY_TIMEOUT is {v:?}, not a number of seconds"
                            ))
                        })?,
                ),
                Err(_) => None,
            },
        })
    }

    /// Connects to the agent and subscribes.
    ///
    /// # Errors
    /// [`Error::Connection`] when the agent cannot be reached, [`Error::Refused`] when it
    /// does not know this executor or its token.
    pub async fn subscribe(self) -> Result<(Executor, ExecutorEvents), Error> {
        // An agent that serves TLS gives its executors the cluster CA (`AGORA_CA`).
        let tls = crate::masters::env_credentials()?;
        let channel = agora_proto::tls::endpoint(&self.endpoint, tls.as_ref())
            .map_err(|e| Error::Invalid(format!("agent address {:?}: {e}", self.endpoint)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Error::Connection(format!("connecting to {}: {e}", self.endpoint)))?;
        let client = ExecutorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let header = v1::ExecutorHeader {
            framework_id: Some((&self.framework_id).into()),
            executor_id: Some((&self.executor_id).into()),
            token: self.token.clone(),
        };
        let executor = Executor {
            client,
            header,
            env: self,
            shared: Arc::default(),
        };
        let stream = executor.subscribe_once(Vec::new()).await?;
        Ok((executor.clone(), ExecutorEvents { stream, executor }))
    }
}

/// Calls to the agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Executor {
    client: ExecutorClient<Channel>,
    header: v1::ExecutorHeader,
    env: ExecutorEnv,
    shared: Arc<Mutex<Unacked>>,
}

/// What an executor must tell a restarted agent: its tasks, and its updates the agent has
/// not acknowledged, oldest first.
#[derive(Debug, Default)]
struct Unacked {
    tasks: BTreeSet<TaskId>,
    updates: VecDeque<v1::TaskStatus>,
}

impl Unacked {
    fn acknowledged(&mut self, task: &TaskId, uuid: &[u8]) {
        let Some(i) = self.updates.iter().position(|u| u.uuid == uuid) else {
            return;
        };
        if self.updates.remove(i).is_some_and(|u| {
            v1::TaskState::try_from(u.state)
                .ok()
                .and_then(agora_proto::state_from_proto)
                .is_some_and(TaskState::is_terminal)
        }) {
            self.tasks.remove(task);
        }
    }
}

/// A call that failed because the agent is away (restarting), not because it refused.
fn agent_away(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

impl Executor {
    pub fn executor_id(&self) -> &ExecutorId {
        &self.env.executor_id
    }

    pub fn framework_id(&self) -> &FrameworkId {
        &self.env.framework_id
    }

    /// Reports a task's status (build one with [`status`]). With a recovery timeout, an
    /// update the agent is away for is kept and sent again when the executor subscribes
    /// again, and this returns `Ok`.
    ///
    /// # Errors
    /// [`Error::Refused`] when the agent refuses it (e.g. not a task of this executor).
    pub async fn update(&self, status: v1::TaskStatus) -> Result<(), Error> {
        let recovers = self.env.recovery_timeout.is_some() && !status.uuid.is_empty();
        if recovers && let Ok(mut u) = self.shared.lock() {
            u.updates.push_back(status.clone());
        }
        let uuid = status.uuid.clone();
        match self.send_update(status).await {
            Ok(()) => Ok(()),
            Err(e) if recovers && agent_away(&e) => {
                tracing::info!(error = %e, "the agent is away; the update goes again once it is back");
                // Again every second while it is not acknowledged: the stream may stay up
                // through a passing failure, and then nothing would resubscribe.
                let me = self.clone();
                let timeout = self.env.recovery_timeout.unwrap_or_default();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + timeout;
                    while tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let Some(status) = me
                            .shared
                            .lock()
                            .ok()
                            .and_then(|u| u.updates.iter().find(|s| s.uuid == uuid).cloned())
                        else {
                            return;
                        };
                        match me.send_update(status).await {
                            Ok(()) => return,
                            Err(e) if agent_away(&e) => {}
                            Err(_) => {
                                if let Ok(mut u) = me.shared.lock() {
                                    u.updates.retain(|s| s.uuid != uuid);
                                }
                                return;
                            }
                        }
                    }
                });
                Ok(())
            }
            Err(e) => {
                if let Ok(mut u) = self.shared.lock() {
                    u.updates.retain(|s| s.uuid != uuid);
                }
                Err(e.into())
            }
        }
    }

    async fn send_update(&self, status: v1::TaskStatus) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .update(v1::ExecutorUpdateRequest {
                header: Some(self.header.clone()),
                status: Some(status),
            })
            .await?;
        Ok(())
    }

    async fn subscribe_once(
        &self,
        tasks: Vec<TaskId>,
    ) -> Result<tonic::Streaming<v1::ExecutorEvent>, tonic::Status> {
        Ok(self
            .client
            .clone()
            .subscribe(v1::ExecutorSubscribeRequest {
                header: Some(self.header.clone()),
                tasks: tasks.iter().map(Into::into).collect(),
            })
            .await?
            .into_inner())
    }

    /// Subscribes again after the stream broke, until the agent is back or `timeout` has
    /// passed; then sends the updates it has not acknowledged again.
    async fn resubscribe(
        &self,
        timeout: Duration,
    ) -> Result<tonic::Streaming<v1::ExecutorEvent>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            let tasks: Vec<TaskId> = self
                .shared
                .lock()
                .map(|u| u.tasks.iter().cloned().collect())
                .unwrap_or_default();
            match self.subscribe_once(tasks).await {
                Ok(s) => break s,
                Err(e) if agent_away(&e) && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "the agent is not back yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(Error::Connection(format!(
                        "the agent did not take this executor back within {timeout:?}: {e}"
                    )));
                }
            }
        };
        tracing::info!("subscribed to the agent again");
        let again: Vec<v1::TaskStatus> = self
            .shared
            .lock()
            .map(|u| u.updates.iter().cloned().collect())
            .unwrap_or_default();
        for s in again {
            let uuid = s.uuid.clone();
            if let Err(e) = self.send_update(s).await
                && !agent_away(&e)
                && let Ok(mut u) = self.shared.lock()
            {
                // Refused (its task is not the agent's any more): it will never be taken.
                u.updates.retain(|s| s.uuid != uuid);
            }
        }
        Ok(stream)
    }
}

impl Executor {
    /// Sends bytes to the framework (an Event::Message there), about `task` if given.
    ///
    /// # Errors
    /// [`Error::Refused`] when the agent refuses it (too large).
    pub async fn message(&self, task: Option<&TaskId>, data: Vec<u8>) -> Result<(), Error> {
        self.client
            .clone()
            .message(v1::ExecutorMessageRequest {
                header: Some(self.header.clone()),
                task_id: task.map(Into::into),
                data,
            })
            .await?;
        Ok(())
    }

    /// Reports the running tasks' usage, for the agent's GetContainers.
    ///
    /// # Errors
    /// When the agent cannot be reached.
    pub async fn usage(&self, tasks: Vec<(TaskId, v1::TaskUsage)>) -> Result<(), Error> {
        self.client
            .clone()
            .usage(v1::ExecutorUsageRequest {
                header: Some(self.header.clone()),
                tasks: tasks
                    .into_iter()
                    .map(|(t, u)| v1::executor_usage_request::TaskUsageReport {
                        task_id: Some((&t).into()),
                        usage: Some(u),
                    })
                    .collect(),
            })
            .await?;
        Ok(())
    }
}

/// A status update for `task`, with a fresh uuid and the time now.
pub fn status(task: &TaskId, state: TaskState, message: impl Into<String>) -> v1::TaskStatus {
    v1::TaskStatus {
        task_id: Some(task.into()),
        state: state_to_proto(state) as i32,
        message: message.into(),
        source: v1::StatusSource::SourceExecutor as i32,
        uuid: uuid_v4(),
        timestamp: now_timestamp(),
        ..Default::default()
    }
}

fn uuid_v4() -> Vec<u8> {
    uuid::Uuid::new_v4().as_bytes().to_vec()
}

/// What the agent tells an executor.
#[derive(Debug, Clone)]
pub enum ExecutorEvent {
    Subscribed {
        agent_id: Option<agora_core::AgentId>,
        info: Box<v1::ExecutorInfo>,
        /// The executor's framework, as its agent last heard of it from the master.
        framework: Box<v1::FrameworkInfo>,
    },
    /// Run this task; its sandbox directory exists.
    Launch {
        task: Box<v1::TaskInfo>,
        sandbox: std::path::PathBuf,
    },
    /// End this task within the grace period and report it.
    Kill {
        task_id: TaskId,
        grace: Duration,
    },
    /// The agent has the update with this uuid.
    Acknowledged {
        task_id: TaskId,
        uuid: Vec<u8>,
    },
    /// End every task and exit within the grace period.
    Shutdown {
        grace: Duration,
    },
    Error(String),
}

/// The events of a subscription, in order.
pub struct ExecutorEvents {
    stream: tonic::Streaming<v1::ExecutorEvent>,
    executor: Executor,
}

impl std::fmt::Debug for ExecutorEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorEvents").finish_non_exhaustive()
    }
}

impl ExecutorEvents {
    /// Keeps what a restarted agent must be told: launched tasks, acknowledged updates.
    fn track(&self, msg: &v1::ExecutorEvent) {
        if self.executor.env.recovery_timeout.is_none() {
            return;
        }
        let Ok(mut u) = self.executor.shared.lock() else {
            return;
        };
        match &msg.event {
            Some(executor_event::Event::Launch(l)) => {
                if let Some(id) = l
                    .task
                    .as_ref()
                    .and_then(|t| t.task_id.as_ref())
                    .and_then(|t| TaskId::try_from(t).ok())
                {
                    u.tasks.insert(id);
                }
            }
            Some(executor_event::Event::Acknowledged(a)) => {
                if let Some(id) = a.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()) {
                    u.acknowledged(&id, &a.uuid);
                }
            }
            _ => {}
        }
    }
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

impl ExecutorEvents {
    /// The next event; `None` when the agent closed the stream.
    ///
    /// # Errors
    /// [`Error::Connection`] when the stream broke, [`Error::Protocol`] for an event this
    /// SDK cannot read.
    pub async fn next(&mut self) -> Option<Result<ExecutorEvent, Error>> {
        loop {
            let broken = match self.stream.message().await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(None),
                Err(e) => Err(Some(e)),
            };
            let msg = match (broken, self.executor.env.recovery_timeout) {
                (Ok(m), _) => m,
                (Err(e), Some(timeout)) => {
                    tracing::warn!(error = ?e, ?timeout, "the agent's stream ended; waiting for the agent to come back");
                    match self.executor.resubscribe(timeout).await {
                        Ok(s) => {
                            self.stream = s;
                            continue;
                        }
                        Err(e) => return Some(Err(e)),
                    }
                }
                (Err(None), None) => return None,
                (Err(Some(e)), None) => return Some(Err(e.into())),
            };
            self.track(&msg);
            let Some(event) = msg.event else { continue };
            let task_id = |t: Option<v1::TaskId>| {
                t.as_ref()
                    .ok_or_else(|| Error::Protocol("an event without a task id".into()))
                    .and_then(|t| TaskId::try_from(t).map_err(|e| Error::Protocol(e.to_string())))
            };
            return Some(match event {
                executor_event::Event::Subscribed(s) => Ok(ExecutorEvent::Subscribed {
                    agent_id: s
                        .agent_id
                        .as_ref()
                        .and_then(|a| agora_core::AgentId::try_from(a).ok()),
                    info: Box::new(s.executor_info.unwrap_or_default()),
                    framework: Box::new(s.framework_info.unwrap_or_default()),
                }),
                executor_event::Event::Launch(l) => match l.task {
                    Some(task) => Ok(ExecutorEvent::Launch {
                        task: Box::new(task),
                        sandbox: l.sandbox.into(),
                    }),
                    None => Err(Error::Protocol("a launch without a task".into())),
                },
                executor_event::Event::Kill(k) => {
                    task_id(k.task_id).map(|task_id| ExecutorEvent::Kill {
                        task_id,
                        grace: seconds(k.kill_policy.map_or(0.0, |p| p.grace_period_seconds)),
                    })
                }
                executor_event::Event::Acknowledged(a) => {
                    task_id(a.task_id).map(|task_id| ExecutorEvent::Acknowledged {
                        task_id,
                        uuid: a.uuid,
                    })
                }
                executor_event::Event::Shutdown(s) => Ok(ExecutorEvent::Shutdown {
                    grace: seconds(s.grace_period_seconds),
                }),
                executor_event::Event::Error(e) => Ok(ExecutorEvent::Error(e.message)),
            });
        }
    }
}
