//! The scheduler driver: subscribe, receive events, make calls.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use agora_core::{AgentId, FrameworkId, OfferId, TaskId};
use agora_proto::MAX_MESSAGE_BYTES;
use agora_proto::dial::{self, Failure};
use agora_proto::v1::{self, scheduler_client::SchedulerClient};
use tokio::sync::{Notify, mpsc};

use crate::Error;
use crate::masters::{self, DialPolicy};

/// Settings of a scheduler subscription.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The master's address, e.g. `http://127.0.0.1:5050` (the scheme may be left out), or
    /// the masters of a group, comma-separated: `a:5050,b:5050,c:5050`. The driver finds
    /// the leader among them, and finds it again after a break.
    pub master: String,
    pub framework: v1::FrameworkInfo,
    /// Acknowledge each status update when [`Events::next`] hands it over. Default true.
    pub auto_acknowledge: bool,
    /// Re-subscribe (with the framework id) when the stream breaks. Default true.
    pub reconnect: bool,
    /// Events buffered between the stream and the caller. Default 1024.
    pub event_buffer: usize,
    /// Bounds of each search for the leader (at subscription, and at each re-subscription;
    /// a failed re-subscription search is retried with backoff). Default
    /// [`DialPolicy::default`].
    pub discovery: DialPolicy,
    /// How the framework authenticates: TLS (the cluster CA, and its client certificate if
    /// it has one) and a bearer token. Default: what the environment names
    /// ([`crate::masters::Auth::from_env`]).
    pub auth: Option<crate::masters::Auth>,
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
            discovery: DialPolicy::default(),
            auth: None,
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

/// The master the driver is subscribed to.
#[derive(Clone)]
struct Link {
    master: String,
    client: SchedulerClient<masters::Chan>,
}

struct Inner {
    link: RwLock<Link>,
    session: RwLock<Option<Session>>,
    /// Woken when a call finds that the master no longer leads: the driver re-subscribes.
    lost_leader: Notify,
}

/// A handle for making calls. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("master", &self.master())
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

/// A subscription as it starts.
struct Opened {
    link: Link,
    stream: tonic::Streaming<v1::Event>,
    session: Session,
    first: Event,
}

/// Subscribes at `master`; `replaces` is the stream id of this process's previous
/// subscription, which lets it take over even before the master has noticed the old
/// stream's end. A master that never saw that stream (a new leader) ignores it: the
/// framework has no live subscription there. `lost` is the master the last subscription
/// was lost with, if it broke ([`agora_proto::leader::LOST_METADATA`]).
async fn open(
    master: String,
    info: v1::FrameworkInfo,
    replaces: Option<String>,
    lost: Option<&str>,
    auth: &masters::Auth,
) -> Result<Opened, Failure<Error>> {
    let mut client = SchedulerClient::new(masters::channel(&master, true, auth).await?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut request = tonic::Request::new(v1::SubscribeRequest {
        framework_info: Some(info),
        stream_id: replaces.unwrap_or_default(),
    });
    agora_proto::leader::tell_lost(&mut request, lost);
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(masters::status_failure)?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .map_err(|_| Failure::Unreachable("no SUBSCRIBED event within 30s".into()))?
        .map_err(masters::status_failure)?;
    match first.and_then(|e| e.event) {
        Some(v1::event::Event::Subscribed(s)) => {
            let (session, first) = subscribed(s).map_err(Failure::Refused)?;
            Ok(Opened {
                link: Link { master, client },
                stream,
                session,
                first,
            })
        }
        Some(v1::event::Event::Error(e)) => Err(Failure::Refused(Error::Refused {
            code: tonic::Code::FailedPrecondition,
            message: e.message,
        })),
        other => Err(Failure::Refused(Error::Protocol(format!(
            "expected SUBSCRIBED first, got {other:?}"
        )))),
    }
}

/// Searches `order` for the leader and subscribes there.
async fn open_at_leader(
    order: &[String],
    policy: &DialPolicy,
    info: &v1::FrameworkInfo,
    replaces: Option<&str>,
    lost: Option<&str>,
    auth: &masters::Auth,
) -> Result<Opened, Error> {
    let (_, opened) = dial::find_leader(order, policy, |master| {
        open(
            master,
            info.clone(),
            replaces.map(str::to_owned),
            lost,
            auth,
        )
    })
    .await?;
    Ok(opened)
}

/// Connects to the master and subscribes a framework.
///
/// With a list of masters, they are tried in turn and redirects followed to the leader;
/// after a break the driver searches again, so a framework follows a failover to a new
/// leader and re-subscribes there with its framework id.
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
/// [`Error::Connection`] when no master leads (it names each master tried and why),
/// [`Error::Refused`] when the leader refuses the subscription (e.g. an invalid framework
/// info), [`Error::Invalid`] for a bad master list.
pub async fn subscribe(mut config: SchedulerConfig) -> Result<(Scheduler, Events), Error> {
    let list = masters::parse(&config.master)?;
    if config.auth.is_none() {
        config.auth = Some(masters::Auth::for_masters(&list)?);
    }
    let auth = config.auth.clone().unwrap_or_default();
    let Opened {
        link,
        stream,
        session,
        first,
    } = open_at_leader(
        &list,
        &config.discovery,
        &config.framework,
        None,
        None,
        &auth,
    )
    .await?;
    let inner = Arc::new(Inner {
        link: RwLock::new(link),
        session: RwLock::new(Some(session.clone())),
        lost_leader: Notify::new(),
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
        list,
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

/// Reads the stream into the channel; on a break, searches for the leader again and
/// re-subscribes there, with backoff.
async fn drive(
    scheduler: Scheduler,
    list: Vec<String>,
    config: SchedulerConfig,
    mut stream: tonic::Streaming<v1::Event>,
    mut session: Session,
    mut heartbeat: Duration,
    tx: mpsc::Sender<Event>,
) {
    loop {
        // Made before reading, so a call that finds a deposed leader wakes it.
        let lost_leader = scheduler.inner.lost_leader.notified();
        tokio::pin!(lost_leader);
        // A leader named by the status that ended the stream.
        let mut named: Option<String> = None;
        let reason = loop {
            tokio::select! {
                // Three missed heartbeats mean the master or the path to it is gone.
                read = tokio::time::timeout(heartbeat * 3, stream.message()) => match read {
                    Ok(Ok(Some(v1::Event { event: Some(ev) }))) => {
                        if let Some(ev) = convert(ev)
                            && tx.send(ev).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) => break "the master ended the subscription".to_string(),
                    Ok(Err(status)) => {
                        named = agora_proto::leader::redirect(&status).flatten();
                        break format!("subscription failed: {}", status.message());
                    }
                    Err(_) => break format!("no event from the master for {:?}", heartbeat * 3),
                },
                () = &mut lost_leader => {
                    break format!("{} no longer leads", scheduler.master());
                }
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
        let lost = scheduler.master();
        let mut delay = Duration::from_millis(100);
        loop {
            let mut info = config.framework.clone();
            info.id = Some((&session.framework_id).into());
            let order = dial::order(&list, named.as_deref(), Some(&lost));
            // A master that named another leader was not lost: it is alive and follows.
            let lost = named.is_none().then_some(lost.as_str());
            match open_at_leader(
                &order,
                &config.discovery,
                &info,
                Some(&session.stream_id),
                lost,
                config.auth.as_ref().unwrap_or(&masters::Auth::default()),
            )
            .await
            {
                Ok(opened) => {
                    if let Event::Subscribed {
                        heartbeat_interval, ..
                    } = &opened.first
                    {
                        heartbeat = *heartbeat_interval;
                    }
                    tracing::info!(framework_id = %session.framework_id, master = %opened.link.master, "re-subscribed");
                    stream = opened.stream;
                    session = opened.session;
                    scheduler.set_link(opened.link);
                    scheduler.set_session(Some(session.clone()));
                    if tx.send(opened.first).await.is_err() {
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
                    named = None;
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

    fn set_link(&self, link: Link) {
        *self.inner.link.write().unwrap_or_else(|p| p.into_inner()) = link;
    }

    fn link(&self) -> Link {
        self.inner
            .link
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The master the driver subscribed at: the leader, when it last looked.
    pub fn master(&self) -> String {
        self.link().master
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

    /// The answer of a call made at `link`. A master that says it no longer leads fails
    /// the call with [`Error::Connection`] (retry once re-subscribed) and sends the driver
    /// looking for the leader.
    fn answer<T>(
        &self,
        link: &Link,
        answer: Result<tonic::Response<T>, tonic::Status>,
    ) -> Result<T, Error> {
        let status = match answer {
            Ok(r) => return Ok(r.into_inner()),
            Err(status) => status,
        };
        let Some(named) = agora_proto::leader::redirect(&status) else {
            return Err(status.into());
        };
        // A call made before the driver moved on says nothing about the master it is on now.
        if self.master() == link.master {
            self.inner.lost_leader.notify_waiters();
        }
        Err(Error::Connection(format!(
            "{} no longer leads ({}); re-subscribing",
            link.master,
            named.map_or("no leader known yet".into(), |l| format!(
                "the leader is {l}"
            ))
        )))
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
        let link = self.link();
        let answer = link.client.clone().accept(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().decline(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().revive(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().suppress(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().accept(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().kill(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().acknowledge(req).await;
        self.answer(&link, answer)?;
        Ok(())
    }

    /// Asks for the latest state of `tasks`, or of all this framework's tasks when empty;
    /// the answers arrive as updates.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn reconcile(&self, tasks: &[TaskId]) -> Result<(), Error> {
        let tasks: Vec<(TaskId, Option<AgentId>)> =
            tasks.iter().map(|t| (t.clone(), None)).collect();
        self.reconcile_on(&tasks).await
    }

    /// As [`Scheduler::reconcile`], naming the agent each task was launched on: a task the
    /// master does not know is then answered as Mesos does — TASK_GONE when its agent is
    /// registered without it, TASK_UNREACHABLE when the agent is unreachable (TASK_LOST for
    /// frameworks that are not partition-aware), nothing yet while the agent is still
    /// expected back after a failover.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn reconcile_on(&self, tasks: &[(TaskId, Option<AgentId>)]) -> Result<(), Error> {
        let req = v1::ReconcileRequest {
            header: Some(self.header()?),
            tasks: tasks
                .iter()
                .map(|(t, a)| v1::reconcile_request::ReconcileTask {
                    task_id: Some(t.into()),
                    agent_id: a.as_ref().map(Into::into),
                })
                .collect(),
        };
        let link = self.link();
        let answer = link.client.clone().reconcile(req).await;
        self.answer(&link, answer)?;
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
        let link = self.link();
        let answer = link.client.clone().teardown(req).await;
        self.answer(&link, answer)?;
        Ok(())
    }
}
