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

use std::time::Duration;

use agora_core::{ExecutorId, FrameworkId, TaskId, TaskState};
use agora_proto::v1::{self, executor_client::ExecutorClient, executor_event};
use agora_proto::{MAX_MESSAGE_BYTES, now_timestamp, state_to_proto};
use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// Where and who an executor is, as the agent told it.
#[derive(Debug, Clone)]
pub struct ExecutorEnv {
    /// The agent's address, e.g. `http://127.0.0.1:5051`.
    pub endpoint: String,
    pub framework_id: FrameworkId,
    pub executor_id: ExecutorId,
    pub token: String,
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
        })
    }

    /// Connects to the agent and subscribes.
    ///
    /// # Errors
    /// [`Error::Connection`] when the agent cannot be reached, [`Error::Refused`] when it
    /// does not know this executor or its token.
    pub async fn subscribe(self) -> Result<(Executor, ExecutorEvents), Error> {
        let channel = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| Error::Invalid(format!("agent address {:?}: {e}", self.endpoint)))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Error::Connection(format!("connecting to {}: {e}", self.endpoint)))?;
        let mut client = ExecutorClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let header = v1::ExecutorHeader {
            framework_id: Some((&self.framework_id).into()),
            executor_id: Some((&self.executor_id).into()),
            token: self.token.clone(),
        };
        let stream = client
            .subscribe(v1::ExecutorSubscribeRequest {
                header: Some(header.clone()),
            })
            .await?
            .into_inner();
        Ok((
            Executor {
                client,
                header,
                env: self,
            },
            ExecutorEvents { stream },
        ))
    }
}

/// Calls to the agent. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Executor {
    client: ExecutorClient<Channel>,
    header: v1::ExecutorHeader,
    env: ExecutorEnv,
}

impl Executor {
    pub fn executor_id(&self) -> &ExecutorId {
        &self.env.executor_id
    }

    pub fn framework_id(&self) -> &FrameworkId {
        &self.env.framework_id
    }

    /// Reports a task's status (build one with [`status`]).
    ///
    /// # Errors
    /// [`Error::Refused`] when the agent refuses it (e.g. not a task of this executor).
    pub async fn update(&self, status: v1::TaskStatus) -> Result<(), Error> {
        self.client
            .clone()
            .update(v1::ExecutorUpdateRequest {
                header: Some(self.header.clone()),
                status: Some(status),
            })
            .await?;
        Ok(())
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
}

impl std::fmt::Debug for ExecutorEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorEvents").finish_non_exhaustive()
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
            let msg = match self.stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(e) => return Some(Err(e.into())),
            };
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
