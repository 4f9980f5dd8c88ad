//! The scheduler driver: subscribe, receive events, make calls.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use agora_core::{AgentId, FrameworkId, OfferId, TaskId};
use agora_proto::MAX_MESSAGE_BYTES;
use agora_proto::v1::{self, scheduler_client::SchedulerClient};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::Error;

/// Settings of a scheduler subscription.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The master's address, e.g. `http://127.0.0.1:5050`.
    pub master: String,
    pub framework: v1::FrameworkInfo,
    /// Acknowledge each status update when [`Events::next`] hands it over. Default true.
    pub auto_acknowledge: bool,
    /// Re-subscribe (with the framework id) when the stream breaks. Default true.
    pub reconnect: bool,
    /// Events buffered between the stream and the caller. Default 1024.
    pub event_buffer: usize,
}

impl SchedulerConfig {
    /// A framework called `name` in the default role, with the defaults above and a failover
    /// timeout of 60 s (so a reconnect finds its tasks still there).
    pub fn new(master: impl Into<String>, name: impl Into<String>) -> Self {
        SchedulerConfig {
            master: master.into(),
            framework: v1::FrameworkInfo {
                name: name.into(),
                failover_timeout: 60.0,
                ..Default::default()
            },
            auto_acknowledge: true,
            reconnect: true,
            event_buffer: 1024,
        }
    }
}

/// What the master tells a framework.
#[derive(Debug, Clone)]
pub enum Event {
    /// The subscription is (again) in place.
    Subscribed {
        framework_id: FrameworkId,
        heartbeat_interval: Duration,
        master_id: String,
    },
    Offers(Vec<v1::Offer>),
    /// The offer is withdrawn; accepting it will be refused.
    Rescind(OfferId),
    /// A task's status changed.
    Update(v1::TaskStatus),
    /// An agent was lost.
    Failure {
        agent_id: Option<AgentId>,
        message: String,
    },
    /// The master reports an error (e.g. the framework was removed).
    Error(String),
    /// Bytes one of the framework's tasks (or executors) sent it. Not retried: messages
    /// sent while the framework was away are lost.
    Message {
        agent_id: Option<AgentId>,
        executor_id: Option<agora_core::ExecutorId>,
        task_id: Option<TaskId>,
        data: Vec<u8>,
    },
    /// The stream broke; the driver is re-subscribing if configured to.
    Disconnected {
        reason: String,
    },
}

#[derive(Debug, Clone)]
struct Session {
    framework_id: FrameworkId,
    stream_id: String,
}

struct Inner {
    client: SchedulerClient<Channel>,
    session: RwLock<Option<Session>>,
}

/// A handle for making calls. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("session", &self.session())
            .finish()
    }
}

/// The events of a subscription, in order.
pub struct Events {
    rx: mpsc::Receiver<Event>,
    scheduler: Scheduler,
    auto_acknowledge: bool,
}

impl Events {
    /// The next event, or `None` once the subscription is over for good (the framework was
    /// removed, or the stream broke and reconnecting is off).
    ///
    /// With auto-acknowledgement on, a status update that needs acknowledging is acknowledged
    /// as it is returned.
    pub async fn next(&mut self) -> Option<Event> {
        let ev = self.rx.recv().await?;
        if let Event::Update(status) = &ev
            && self.auto_acknowledge
            && !status.uuid.is_empty()
        {
            let (scheduler, status) = (self.scheduler.clone(), status.clone());
            tokio::spawn(async move {
                if let Err(e) = scheduler.acknowledge(&status).await {
                    tracing::debug!(error = %e, "acknowledgement failed; the agent will retry the update");
                }
            });
        }
        Some(ev)
    }
}

fn subscribed(s: v1::event::Subscribed) -> Result<(Session, Event), Error> {
    let framework_id = FrameworkId::try_from(
        s.framework_id
            .ok_or_else(|| Error::Protocol("SUBSCRIBED without a framework id".into()))?,
    )
    .map_err(|e| Error::Protocol(e.to_string()))?;
    let session = Session {
        framework_id: framework_id.clone(),
        stream_id: s.stream_id,
    };
    Ok((
        session,
        Event::Subscribed {
            framework_id,
            // A master's number, checked like any other from outside: one out of range
            // would panic here or overflow the three-heartbeat timeout.
            heartbeat_interval: agora_core::limits::seconds(
                "heartbeat_interval_seconds",
                s.heartbeat_interval_seconds,
                agora_core::limits::MAX_HEARTBEAT_SECS,
            )
            .ok()
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(15)),
            master_id: s.master_id,
        },
    ))
}

fn convert(ev: v1::event::Event) -> Option<Event> {
    use v1::event::Event as E;
    Some(match ev {
        E::Subscribed(_) => return None,
        E::Offers(o) => Event::Offers(o.offers),
        E::Rescind(r) => Event::Rescind(OfferId::try_from(r.offer_id?).ok()?),
        E::Update(u) => Event::Update(u.status?),
        E::Failure(f) => Event::Failure {
            agent_id: f.agent_id.and_then(|a| AgentId::try_from(a).ok()),
            message: f.message,
        },
        E::Error(e) => Event::Error(e.message),
        E::Heartbeat(_) => return None,
        E::Message(m) => Event::Message {
            agent_id: m.agent_id.and_then(|a| AgentId::try_from(a).ok()),
            executor_id: m
                .executor_id
                .and_then(|e| agora_core::ExecutorId::try_from(e).ok()),
            task_id: m.task_id.and_then(|t| TaskId::try_from(t).ok()),
            data: m.data,
        },
    })
}

/// Subscribes; `replaces` is the stream id of this process's previous subscription, which
/// lets it take over even before the master has noticed the old stream's end.
async fn open(
    client: &mut SchedulerClient<Channel>,
    info: v1::FrameworkInfo,
    replaces: Option<&str>,
) -> Result<(tonic::Streaming<v1::Event>, Session, Event), Error> {
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            framework_info: Some(info),
            stream_id: replaces.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(Error::from)?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .map_err(|_| Error::Connection("no SUBSCRIBED event within 30s".into()))?
        .map_err(Error::from)?;
    match first.and_then(|e| e.event) {
        Some(v1::event::Event::Subscribed(s)) => {
            let (session, ev) = subscribed(s)?;
            Ok((stream, session, ev))
        }
        Some(v1::event::Event::Error(e)) => Err(Error::Refused {
            code: tonic::Code::FailedPrecondition,
            message: e.message,
        }),
        other => Err(Error::Protocol(format!(
            "expected SUBSCRIBED first, got {other:?}"
        ))),
    }
}

/// Connects to the master and subscribes a framework.
///
/// Returns once the master has answered SUBSCRIBED (the first event of [`Events`]); a
/// background task then reads the stream, re-subscribing after breaks if configured to.
///
/// ```no_run
/// # async fn example() -> Result<(), agora_sdk::Error> {
/// use agora_sdk::{Event, SchedulerConfig, subscribe};
/// let (scheduler, mut events) = subscribe(SchedulerConfig::new("http://127.0.0.1:5050", "demo")).await?;
/// while let Some(event) = events.next().await {
///     if let Event::Offers(offers) = event {
///         let ids: Vec<_> = offers.iter().filter_map(|o| o.id.clone()).collect();
///         scheduler.decline(&ids, None).await?;
///     }
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Connection`] when the master cannot be reached, [`Error::Refused`] when it refuses
/// the subscription (e.g. an invalid framework info).
pub async fn subscribe(config: SchedulerConfig) -> Result<(Scheduler, Events), Error> {
    let channel = Endpoint::from_shared(config.master.clone())
        .map_err(|e| Error::Invalid(format!("master address {:?}: {e}", config.master)))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| Error::Connection(format!("connecting to {}: {e}", config.master)))?;
    let mut client = SchedulerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (stream, session, first) = open(&mut client, config.framework.clone(), None).await?;
    let inner = Arc::new(Inner {
        client: client.clone(),
        session: RwLock::new(Some(session.clone())),
    });
    let scheduler = Scheduler { inner };
    let (tx, rx) = mpsc::channel(config.event_buffer.max(1));
    let heartbeat = match &first {
        Event::Subscribed {
            heartbeat_interval, ..
        } => *heartbeat_interval,
        _ => Duration::from_secs(15),
    };
    let _ = tx.send(first).await;
    tokio::spawn(drive(
        scheduler.clone(),
        client,
        config.clone(),
        stream,
        session,
        heartbeat,
        tx,
    ));
    Ok((
        scheduler.clone(),
        Events {
            rx,
            scheduler,
            auto_acknowledge: config.auto_acknowledge,
        },
    ))
}

/// Reads the stream into the channel; on a break, re-subscribes with backoff.
async fn drive(
    scheduler: Scheduler,
    mut client: SchedulerClient<Channel>,
    config: SchedulerConfig,
    mut stream: tonic::Streaming<v1::Event>,
    mut session: Session,
    mut heartbeat: Duration,
    tx: mpsc::Sender<Event>,
) {
    loop {
        let reason = loop {
            // Three missed heartbeats mean the master or the path to it is gone.
            match tokio::time::timeout(heartbeat * 3, stream.message()).await {
                Ok(Ok(Some(v1::Event { event: Some(ev) }))) => {
                    if let Some(ev) = convert(ev)
                        && tx.send(ev).await.is_err()
                    {
                        return;
                    }
                }
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => break "the master ended the subscription".to_string(),
                Ok(Err(status)) => break format!("subscription failed: {}", status.message()),
                Err(_) => break format!("no event from the master for {:?}", heartbeat * 3),
            }
        };
        scheduler.set_session(None);
        if tx
            .send(Event::Disconnected {
                reason: reason.clone(),
            })
            .await
            .is_err()
            || !config.reconnect
        {
            return;
        }
        tracing::info!(framework_id = %session.framework_id, %reason, "re-subscribing");
        let mut delay = Duration::from_millis(100);
        loop {
            let mut info = config.framework.clone();
            info.id = Some((&session.framework_id).into());
            match open(&mut client, info, Some(&session.stream_id)).await {
                Ok((s, new_session, ev)) => {
                    if let Event::Subscribed {
                        heartbeat_interval, ..
                    } = &ev
                    {
                        heartbeat = *heartbeat_interval;
                    }
                    stream = s;
                    session = new_session;
                    scheduler.set_session(Some(session.clone()));
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                    break;
                }
                Err(Error::Refused { message, .. }) => {
                    let _ = tx
                        .send(Event::Error(format!("re-subscription refused: {message}")))
                        .await;
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, retry_in = ?delay, "re-subscription failed");
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl Scheduler {
    fn set_session(&self, s: Option<Session>) {
        *self
            .inner
            .session
            .write()
            .unwrap_or_else(|p| p.into_inner()) = s;
    }

    fn session(&self) -> Option<Session> {
        self.inner
            .session
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The framework's id.
    pub fn framework_id(&self) -> Option<FrameworkId> {
        self.session().map(|s| s.framework_id)
    }

    fn header(&self) -> Result<v1::CallHeader, Error> {
        let s = self.session().ok_or(Error::NotSubscribed)?;
        Ok(v1::CallHeader {
            framework_id: Some((&s.framework_id).into()),
            stream_id: s.stream_id,
        })
    }

    fn client(&self) -> SchedulerClient<Channel> {
        self.inner.client.clone()
    }

    /// Launches `tasks` on the resources of `offers` (all on one agent). Tasks that do not fit
    /// or are invalid come back as TASK_ERROR updates; unused resources are not offered to
    /// this framework again on that agent for `refuse_seconds` (default 5).
    ///
    /// # Errors
    /// [`Error::Refused`] when an offer is unknown, rescinded or not this framework's.
    pub async fn accept(
        &self,
        offers: &[v1::OfferId],
        tasks: Vec<v1::TaskInfo>,
        refuse_seconds: Option<f64>,
    ) -> Result<(), Error> {
        let req = v1::AcceptRequest {
            header: Some(self.header()?),
            offer_ids: offers.to_vec(),
            operations: vec![v1::Operation {
                operation: Some(v1::operation::Operation::Launch(v1::operation::Launch {
                    tasks,
                })),
            }],
            filters: Some(v1::Filters { refuse_seconds }),
        };
        self.client().accept(req).await?;
        Ok(())
    }

    /// Declines offers; their resources are not offered to this framework again on their
    /// agents for `refuse_seconds` (default 5).
    ///
    /// # Errors
    /// [`Error::Refused`] when an offer is unknown or not this framework's.
    pub async fn decline(
        &self,
        offers: &[v1::OfferId],
        refuse_seconds: Option<f64>,
    ) -> Result<(), Error> {
        let req = v1::DeclineRequest {
            header: Some(self.header()?),
            offer_ids: offers.to_vec(),
            filters: Some(v1::Filters { refuse_seconds }),
        };
        self.client().decline(req).await?;
        Ok(())
    }

    /// Clears this framework's filters and resumes offers after [`Scheduler::suppress`].
    ///
    /// # Errors
    /// When the call fails.
    pub async fn revive(&self) -> Result<(), Error> {
        self.revive_roles(&[]).await
    }

    /// [`Scheduler::revive`] for some of the framework's roles (all when empty).
    ///
    /// # Errors
    /// When the call fails or names a role the framework is not subscribed to.
    pub async fn revive_roles(&self, roles: &[String]) -> Result<(), Error> {
        let req = v1::ReviveRequest {
            header: Some(self.header()?),
            roles: roles.to_vec(),
        };
        self.client().revive(req).await?;
        Ok(())
    }

    /// Stops offers to this framework until [`Scheduler::revive`].
    ///
    /// # Errors
    /// When the call fails.
    pub async fn suppress(&self) -> Result<(), Error> {
        self.suppress_roles(&[]).await
    }

    /// [`Scheduler::suppress`] for some of the framework's roles (all when empty).
    ///
    /// # Errors
    /// When the call fails or names a role the framework is not subscribed to.
    pub async fn suppress_roles(&self, roles: &[String]) -> Result<(), Error> {
        let req = v1::SuppressRequest {
            header: Some(self.header()?),
            roles: roles.to_vec(),
        };
        self.client().suppress(req).await?;
        Ok(())
    }

    /// Carries out `operations` (LAUNCH, RESERVE, UNRESERVE, in order) on the resources of
    /// `offers` (all on one agent, allocated to one role).
    ///
    /// # Errors
    /// [`Error::Refused`] when an offer is unknown, or a reservation is not allowed or does
    /// not fit the offers; nothing is done then.
    pub async fn accept_operations(
        &self,
        offers: &[v1::OfferId],
        operations: Vec<v1::Operation>,
        refuse_seconds: Option<f64>,
    ) -> Result<(), Error> {
        let req = v1::AcceptRequest {
            header: Some(self.header()?),
            offer_ids: offers.to_vec(),
            operations,
            filters: Some(v1::Filters { refuse_seconds }),
        };
        self.client().accept(req).await?;
        Ok(())
    }

    /// Asks for a task to be killed; a TASK_KILLED update follows.
    ///
    /// # Errors
    /// [`Error::Refused`] when the task is unknown or already ended.
    pub async fn kill(&self, task: &TaskId, agent: Option<&AgentId>) -> Result<(), Error> {
        let req = v1::KillRequest {
            header: Some(self.header()?),
            task_id: Some(task.into()),
            agent_id: agent.map(Into::into),
        };
        self.client().kill(req).await?;
        Ok(())
    }

    /// Acknowledges a status update (done for you with auto-acknowledgement).
    ///
    /// # Errors
    /// When the update carries no uuid or the call fails.
    pub async fn acknowledge(&self, status: &v1::TaskStatus) -> Result<(), Error> {
        if status.uuid.is_empty() {
            return Err(Error::Invalid(
                "this update needs no acknowledgement (no uuid)".into(),
            ));
        }
        let req = v1::AcknowledgeRequest {
            header: Some(self.header()?),
            agent_id: status.agent_id.clone(),
            task_id: status.task_id.clone(),
            uuid: status.uuid.clone(),
        };
        self.client().acknowledge(req).await?;
        Ok(())
    }

    /// Asks for the latest state of `tasks`, or of all this framework's tasks when empty;
    /// the answers arrive as updates.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn reconcile(&self, tasks: &[TaskId]) -> Result<(), Error> {
        let req = v1::ReconcileRequest {
            header: Some(self.header()?),
            tasks: tasks
                .iter()
                .map(|t| v1::reconcile_request::ReconcileTask {
                    task_id: Some(t.into()),
                    agent_id: None,
                })
                .collect(),
        };
        self.client().reconcile(req).await?;
        Ok(())
    }

    /// Ends the framework: its tasks are killed and its subscription closed.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn teardown(&self) -> Result<(), Error> {
        let req = v1::TeardownRequest {
            header: Some(self.header()?),
        };
        self.client().teardown(req).await?;
        Ok(())
    }
}
