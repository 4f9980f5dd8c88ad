//! The Mesos v1 Scheduler API on the master: `POST /api/v1/scheduler`, so that a Mesos
//! framework runs unmodified against Agora.
//!
//! Each call is read (JSON or protobuf, by `Content-Type`), turned into the agora.v1 call
//! it means ([`agora_mesos::convert`]) and served by the same [`SchedulerService`] as the
//! gRPC API: one set of frameworks, offers and tasks, one allocator. SUBSCRIBE answers
//! `200` with the framework's events as a RecordIO stream (in the encoding `Accept` asks
//! for) and its stream id in `Mesos-Stream-Id`; every other call goes on a connection of
//! its own with that id and is answered `202`, or with Mesos's status for what is wrong:
//! 400 for a malformed or invalid call, 401 / 403 for credentials, 403 for a framework not
//! subscribed here, 307 to the leader from a follower, 503 while no leader is known, 501
//! for calls Agora does not serve.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use agora_mesos::codec::{self, Format};
use agora_mesos::convert::{self, Refused};
use agora_mesos::http::{self, answer, header_of};
use agora_mesos::v1 as mesos;
use agora_mesos::v1::scheduler::{self, call::Type};
use agora_proto::v1;
use agora_proto::v1::scheduler_server::Scheduler as _;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::service::Interceptor as _;

use crate::service::SchedulerService;

/// The header that carries a subscription's stream id.
pub const STREAM_ID: &str = "mesos-stream-id";

/// Events the endpoint adds to a subscription's stream (the TASK_ERRORs of tasks it could
/// not turn into Agora's) wait here; past it the oldest are not dropped, the call waits.
const INJECTED: usize = 1024;

/// What the endpoint needs: the scheduler service it calls, how callers are authenticated,
/// and the subscriptions it serves.
pub struct Front {
    pub service: SchedulerService,
    pub authn: Arc<crate::auth::Authn>,
    /// This master, as SUBSCRIBED describes it (its id is filled in from the leader's).
    pub master: mesos::MasterInfo,
    /// The published state: where each agent serves, for the URLs of offers.
    pub snapshot: tokio::sync::watch::Receiver<Arc<crate::runtime::Snapshot>>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
}

/// A framework subscribed through this endpoint.
struct Subscription {
    stream_id: String,
    partition_aware: bool,
    /// Events for its stream that do not come from the engine.
    inject: mpsc::Sender<v1::Event>,
}

impl Front {
    pub fn new(
        service: SchedulerService,
        authn: Arc<crate::auth::Authn>,
        master: mesos::MasterInfo,
        snapshot: tokio::sync::watch::Receiver<Arc<crate::runtime::Snapshot>>,
    ) -> Arc<Front> {
        Arc::new(Front {
            service,
            authn,
            master,
            snapshot,
            subscriptions: Mutex::default(),
        })
    }

    /// The URLs of the agents of `event`'s offers, as far as the published state knows them
    /// (an agent it does not know yet is given its hostname and Mesos's agent port).
    fn agent_urls(&self, event: &v1::Event) -> HashMap<String, mesos::Url> {
        let Some(v1::event::Event::Offers(offers)) = &event.event else {
            return HashMap::new();
        };
        let snapshot = Arc::clone(&self.snapshot.borrow());
        let endpoints: HashMap<&str, &v1::AgentInfo> = snapshot
            .state
            .agents
            .iter()
            .filter_map(|a| Some((a.id.as_ref()?.value.as_str(), a.info.as_ref()?)))
            .collect();
        offers
            .offers
            .iter()
            .filter_map(|o| {
                let id = o.agent_id.as_ref()?.value.as_str();
                let url = match endpoints.get(id) {
                    Some(info) => convert::agent_url(&info.endpoint, &info.hostname),
                    None => convert::agent_url("", &o.hostname),
                };
                Some((id.to_owned(), url))
            })
            .collect()
    }

    fn subscriptions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subscription>> {
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The route, for the master's router.
pub fn router(front: Arc<Front>) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/scheduler", axum::routing::post(scheduler))
        .layer(axum::extract::DefaultBodyLimit::max(http::MAX_CALL_BYTES))
        .with_state(front)
}

/// A MasterInfo for the master serving at `addr` (`host:port`).
pub fn master_info(addr: &str) -> mesos::MasterInfo {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "5050"));
    let port: u16 = port.parse().unwrap_or(5050);
    let ip = host
        .trim_matches(['[', ']'])
        .parse::<std::net::Ipv4Addr>()
        .ok();
    mesos::MasterInfo {
        id: String::new(),
        // Mesos packs the IPv4 address in network byte order into the number.
        ip: ip.map_or(0, |ip| u32::from_ne_bytes(ip.octets())),
        port: u32::from(port),
        hostname: Some(host.to_owned()),
        version: Some(crate::MESOS_VERSION.to_owned()),
        address: Some(mesos::Address {
            hostname: Some(host.to_owned()),
            ip: ip.map(|ip| ip.to_string()),
            port: i32::from(port),
        }),
        ..Default::default()
    }
}

/// The HTTP answer to a refused agora.v1 call.
fn from_status(s: &tonic::Status) -> Response {
    use tonic::Code;
    if let Some(leader) = agora_proto::leader::redirect(s) {
        return match leader {
            Some(l) => {
                let hp = agora_proto::leader::host_port(&l).to_owned();
                let mut r = answer(
                    StatusCode::TEMPORARY_REDIRECT,
                    format!("this master is not the leader; the leader is {hp}"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("//{hp}/api/v1/scheduler")) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r
            }
            None => answer(StatusCode::SERVICE_UNAVAILABLE, s.message()),
        };
    }
    let code = match s.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => {
            let mut r = answer(StatusCode::UNAUTHORIZED, s.message());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"agora\""),
            );
            return r;
        }
        Code::PermissionDenied | Code::NotFound | Code::FailedPrecondition => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    answer(code, s.message())
}

/// A caller authenticated (its [`crate::auth::Caller`] in the extensions) and counted
/// against its rate, as the gRPC API's interceptor does, once per HTTP request.
struct Authed {
    metadata: tonic::metadata::MetadataMap,
    extensions: axum::http::Extensions,
}

impl Authed {
    /// A tonic request carrying `message` as this caller.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::from_parts(self.metadata.clone(), self.extensions.clone(), message)
    }
}

fn authenticate(front: &Front, parts: &axum::http::request::Parts) -> Result<Authed, Refusal> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Some(v) = header_of(&parts.headers, header::AUTHORIZATION)
        && let Ok(v) = v.parse()
    {
        metadata.insert("authorization", v);
    }
    let request = tonic::Request::from_parts(metadata, parts.extensions.clone(), ());
    let request =
        crate::auth::Authenticate(Arc::clone(&front.authn), Arc::clone(&front.service.guard))
            .call(request)
            .map_err(|s| Box::new(from_status(&s)))?;
    let (metadata, extensions, ()) = request.into_parts();
    Ok(Authed {
        metadata,
        extensions,
    })
}

async fn scheduler(
    axum::extract::State(front): axum::extract::State<Arc<Front>>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let (input, output) = match http::formats(&parts.headers) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    // Nothing of the body is read for a caller without credentials.
    let authed = match authenticate(&front, &parts) {
        Ok(a) => a,
        Err(r) => return *r,
    };
    // Read only once its caller is authenticated.
    let call: scheduler::Call = match http::call(input, body).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    // A type this master does not know is no type, as Mesos reads it.
    let Some(kind) = call.r#type.and_then(|t| Type::try_from(t).ok()) else {
        return answer(StatusCode::BAD_REQUEST, "Expecting 'type' to be present");
    };
    let stream_id = header_of(&parts.headers, STREAM_ID).map(str::to_owned);
    if kind == Type::Subscribe {
        if stream_id.is_some() {
            return answer(
                StatusCode::BAD_REQUEST,
                "Expecting 'Mesos-Stream-Id' header not to be present for SUBSCRIBE",
            );
        }
        return subscribe(front, &authed, call, output).await;
    }
    if kind == Type::Unknown {
        return answer(StatusCode::NOT_IMPLEMENTED, "Received an UNKNOWN call");
    }
    let Some(framework) = call.framework_id.clone() else {
        return answer(
            StatusCode::BAD_REQUEST,
            "Expecting 'framework_id' to be present",
        );
    };
    let Some(stream_id) = stream_id else {
        return answer(
            StatusCode::BAD_REQUEST,
            "All non-subscribe calls should include the 'Mesos-Stream-Id' header",
        );
    };
    // A follower sends the call to the leader before it looks for the subscription.
    if let Err(s) = front.service.gate.commands() {
        return from_status(&s);
    }
    let (inject, partition_aware) = {
        let subs = front.subscriptions();
        match subs.get(&framework.value) {
            None => return answer(StatusCode::FORBIDDEN, "Framework is not subscribed"),
            Some(s) if s.stream_id != stream_id => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "The stream ID '{stream_id}' included in this request didn't match the stream ID currently associated with framework ID {}",
                        framework.value
                    ),
                );
            }
            Some(s) => (s.inject.clone(), s.partition_aware),
        }
    };
    let header = Some(v1::CallHeader {
        framework_id: Some((&framework).into()),
        stream_id,
    });
    let served = Served {
        front: &front,
        authed: &authed,
        header,
        inject,
        partition_aware,
    };
    match served.call(kind, call).await {
        Ok(code) => code.into_response(),
        Err(r) => *r,
    }
}

/// A non-subscribe call of a framework subscribed here.
struct Served<'a> {
    front: &'a Front,
    authed: &'a Authed,
    header: Option<v1::CallHeader>,
    inject: mpsc::Sender<v1::Event>,
    partition_aware: bool,
}

/// An answer other than success, boxed: responses are large.
type Refusal = Box<Response>;

fn needs<T>(what: Option<T>, name: &str) -> Result<T, Refusal> {
    what.ok_or_else(|| {
        Box::new(answer(
            StatusCode::BAD_REQUEST,
            format!("Expecting '{name}' to be present"),
        ))
    })
}

fn refused(e: &Refused) -> Response {
    answer(StatusCode::BAD_REQUEST, e.0.clone())
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Served<'_> {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.authed.request(message)
    }

    /// Tells the framework of a task that never reached the engine.
    fn tell(&self, status: &mesos::TaskStatus) {
        let status = v1::TaskStatus {
            task_id: Some((&status.task_id).into()),
            state: match mesos::TaskState::try_from(status.state) {
                Ok(mesos::TaskState::TaskError) => v1::TaskState::TaskError,
                Ok(mesos::TaskState::TaskDropped) => v1::TaskState::TaskDropped,
                _ => v1::TaskState::TaskLost,
            } as i32,
            reason: if status.reason == Some(mesos::task_status::Reason::InvalidOffers as i32) {
                v1::Reason::InvalidOffers
            } else {
                v1::Reason::TaskInvalid
            } as i32,
            message: status.message.clone().unwrap_or_default(),
            source: v1::StatusSource::SourceMaster as i32,
            timestamp: status.timestamp.unwrap_or_else(now),
            agent_id: status.agent_id.as_ref().map(Into::into),
            ..Default::default()
        };
        let event = v1::Event {
            event: Some(v1::event::Event::Update(v1::event::Update {
                status: Some(status),
            })),
        };
        // The stream may have ended meanwhile (then nobody is told, as of any update), or
        // its framework may not be reading it: a call never waits for that, and past the
        // buffer the framework learns of the task by reconciling.
        if self.inject.try_send(event).is_err() {
            tracing::warn!(
                "a framework's Mesos stream is closed or full; a task's TASK_ERROR was not sent"
            );
        }
    }

    async fn call(&self, kind: Type, call: scheduler::Call) -> Result<StatusCode, Refusal> {
        let svc = &self.front.service;
        let header = self.header.clone();
        let done = |r: Result<tonic::Response<v1::CallResponse>, tonic::Status>| {
            r.map(|_| StatusCode::ACCEPTED)
                .map_err(|s| Box::new(from_status(&s)))
        };
        match kind {
            Type::Teardown => done(
                svc.teardown(self.request(v1::TeardownRequest { header }))
                    .await,
            ),
            Type::Accept => self.accept(needs(call.accept, "accept")?).await,
            Type::Decline => {
                let d = needs(call.decline, "decline")?;
                let r = svc
                    .decline(self.request(v1::DeclineRequest {
                        header,
                        offer_ids: d.offer_ids.iter().map(Into::into).collect(),
                        filters: convert::filters(d.filters.as_ref()),
                    }))
                    .await;
                // Offers gone already (rescinded, timed out): nothing to decline, as Mesos
                // answers.
                match r {
                    Err(s)
                        if s.code() == tonic::Code::NotFound
                            && s.message().starts_with("offer ") =>
                    {
                        Ok(StatusCode::ACCEPTED)
                    }
                    r => done(r),
                }
            }
            Type::Revive => {
                let roles = call.revive.map(|r| r.roles).unwrap_or_default();
                done(
                    svc.revive(self.request(v1::ReviveRequest { header, roles }))
                        .await,
                )
            }
            Type::Suppress => {
                let roles = call.suppress.map(|r| r.roles).unwrap_or_default();
                done(
                    svc.suppress(self.request(v1::SuppressRequest { header, roles }))
                        .await,
                )
            }
            Type::Kill => {
                let k = needs(call.kill, "kill")?;
                let r = svc
                    .kill(self.request(v1::KillRequest {
                        header,
                        task_id: Some((&k.task_id).into()),
                        agent_id: k.agent_id.as_ref().map(Into::into),
                    }))
                    .await;
                // A task that ended or is not known: accepted, as Mesos does (the framework
                // learns the task's state by reconciling).
                match r {
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::NotFound | tonic::Code::FailedPrecondition
                        ) && s.message().starts_with("task ") =>
                    {
                        Ok(StatusCode::ACCEPTED)
                    }
                    r => done(r),
                }
            }
            Type::Acknowledge => {
                let a = needs(call.acknowledge, "acknowledge")?;
                let r = svc
                    .acknowledge(self.request(v1::AcknowledgeRequest {
                        header,
                        agent_id: Some((&a.agent_id).into()),
                        task_id: Some((&a.task_id).into()),
                        uuid: a.uuid,
                    }))
                    .await;
                match r {
                    Err(s)
                        if s.code() == tonic::Code::NotFound
                            && s.message().starts_with("task ") =>
                    {
                        Ok(StatusCode::ACCEPTED)
                    }
                    r => done(r),
                }
            }
            Type::Reconcile => {
                let tasks = call
                    .reconcile
                    .map(|r| r.tasks)
                    .unwrap_or_default()
                    .iter()
                    .map(|t| v1::reconcile_request::ReconcileTask {
                        task_id: Some((&t.task_id).into()),
                        agent_id: t.agent_id.as_ref().map(Into::into),
                    })
                    .collect();
                done(
                    svc.reconcile(self.request(v1::ReconcileRequest { header, tasks }))
                        .await,
                )
            }
            // Agora's allocator, like Mesos's own, makes no use of requests; and it sends no
            // inverse offers, so there are none to answer.
            Type::Request | Type::AcceptInverseOffers | Type::DeclineInverseOffers => {
                Ok(StatusCode::ACCEPTED)
            }
            // Answered before a subscription is looked up.
            Type::Subscribe | Type::Unknown => Err(Box::new(answer(
                StatusCode::BAD_REQUEST,
                "SUBSCRIBE and UNKNOWN are not calls of a subscription",
            ))),
            Type::Shutdown
            | Type::Message
            | Type::AcknowledgeOperationStatus
            | Type::ReconcileOperations
            | Type::UpdateFramework => Err(Box::new(answer(
                StatusCode::NOT_IMPLEMENTED,
                format!("{} is not supported by Agora yet", kind.as_str_name()),
            ))),
        }
    }

    async fn accept(&self, a: scheduler::call::Accept) -> Result<StatusCode, Refusal> {
        let (operations, set_aside) =
            convert::operations(&a.operations).map_err(|e| Box::new(refused(&e)))?;
        let launched: Vec<(mesos::TaskId, Option<mesos::AgentId>)> = a
            .operations
            .iter()
            .flat_map(|o| o.launch.iter().flat_map(|l| &l.task_infos))
            .map(|t| (t.task_id.clone(), Some(t.agent_id.clone())))
            .collect();
        for (task, why) in &set_aside {
            let agent = launched
                .iter()
                .find(|(t, _)| t == task)
                .and_then(|(_, a)| a.as_ref());
            self.tell(&convert::task_error(task, why, agent, now()));
        }
        let r = self
            .front
            .service
            .accept(self.request(v1::AcceptRequest {
                header: self.header.clone(),
                offer_ids: a.offer_ids.iter().map(Into::into).collect(),
                operations,
                filters: convert::filters(a.filters.as_ref()),
            }))
            .await;
        match r {
            Ok(_) => Ok(StatusCode::ACCEPTED),
            // An offer gone (rescinded, or used already): the call is accepted and its tasks
            // are dropped, as Mesos drops them (lost, to a framework not partition-aware).
            Err(s) if s.code() == tonic::Code::NotFound && s.message().starts_with("offer ") => {
                let state = if self.partition_aware {
                    mesos::TaskState::TaskDropped
                } else {
                    mesos::TaskState::TaskLost
                };
                for (task, agent) in &launched {
                    if set_aside.iter().any(|(t, _)| t == task) {
                        continue;
                    }
                    let mut status = convert::task_error(
                        task,
                        &Refused(s.message().to_owned()),
                        agent.as_ref(),
                        now(),
                    );
                    status.state = state as i32;
                    status.reason = Some(mesos::task_status::Reason::InvalidOffers as i32);
                    self.tell(&status);
                }
                Ok(StatusCode::ACCEPTED)
            }
            Err(s) => Err(Box::new(from_status(&s))),
        }
    }
}

/// SUBSCRIBE: the framework's events from the engine (and any the endpoint adds), as a
/// RecordIO stream in `output`.
async fn subscribe(
    front: Arc<Front>,
    authed: &Authed,
    call: scheduler::Call,
    output: Format,
) -> Response {
    let Some(sub) = call.subscribe else {
        return answer(
            StatusCode::BAD_REQUEST,
            "Expecting 'subscribe' to be present",
        );
    };
    if sub.offer_constraints.is_some() {
        return answer(
            StatusCode::BAD_REQUEST,
            "offer constraints are not supported by Agora",
        );
    }
    let info = match convert::framework_info(&sub.framework_info) {
        Ok(i) => i,
        Err(e) => return refused(&e),
    };
    if let Some(id) = &call.framework_id
        && sub.framework_info.id.as_ref() != Some(id)
    {
        return answer(
            StatusCode::BAD_REQUEST,
            "'framework_id' differs from 'subscribe.framework_info.id'",
        );
    }
    // Roles to suppress must be the framework's: checked before it subscribes, so that a
    // refusal leaves nothing behind.
    if let Some(r) = sub
        .suppressed_roles
        .iter()
        .find(|r| !info.roles.contains(r))
    {
        return answer(
            StatusCode::BAD_REQUEST,
            format!("suppressed role {r:?} is not one of the framework's roles"),
        );
    }
    let partition_aware = info
        .capabilities
        .contains(&(v1::framework_info::Capability::PartitionAware as i32));
    // A Mesos framework that subscribes again takes its subscription over, as in Mesos
    // (the engine still checks that its principal is the same).
    let replaces = info
        .id
        .as_ref()
        .and_then(|id| {
            front
                .subscriptions()
                .get(&id.value)
                .map(|s| s.stream_id.clone())
        })
        .unwrap_or_default();
    let request = authed.request(v1::SubscribeRequest {
        framework_info: Some(info),
        stream_id: replaces,
    });
    let mut events = match front.service.subscribe(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => return from_status(&s),
    };
    let first = match events.next().await {
        Some(Ok(e)) => e,
        Some(Err(s)) => return from_status(&s),
        None => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the subscription ended at once",
            );
        }
    };
    let Some(v1::event::Event::Subscribed(subscribed)) = &first.event else {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the subscription did not begin with SUBSCRIBED",
        );
    };
    let (framework, stream_id) = (
        subscribed.framework_id.clone().unwrap_or_default().value,
        subscribed.stream_id.clone(),
    );
    let mut master = front.master.clone();
    master.id.clone_from(&subscribed.master_id);
    let Ok(stream_header) = HeaderValue::from_str(&stream_id) else {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stream id is not a header value",
        );
    };
    let (inject, injected) = mpsc::channel(INJECTED);
    front.subscriptions().insert(
        framework.clone(),
        Subscription {
            stream_id: stream_id.clone(),
            partition_aware,
            inject,
        },
    );
    // From here on, however this ends (a refused suppress, the caller gone), the
    // subscription is forgotten with its stream.
    let forgets = Forget {
        front: Arc::clone(&front),
        framework,
        stream_id: stream_id.clone(),
    };
    if !sub.suppressed_roles.is_empty() {
        let header = Some(v1::CallHeader {
            framework_id: subscribed.framework_id.clone(),
            stream_id,
        });
        let suppress = authed.request(v1::SuppressRequest {
            header,
            roles: sub.suppressed_roles.clone(),
        });
        if let Err(s) = front.service.suppress(suppress).await {
            return from_status(&s);
        }
    }
    // The stream ends when the engine's does (a teardown, a newer subscription, a
    // subscriber that fell behind), whatever the endpoint may still have to add.
    let engine = tokio_stream::once(Ok(first))
        .chain(events)
        .map(Item::Event)
        .chain(tokio_stream::once(Item::End));
    let injected =
        tokio_stream::wrappers::ReceiverStream::new(injected).map(|e| Item::Event(Ok(e)));
    let records = engine
        .merge(injected)
        .take_while(|i| !matches!(i, Item::End))
        .filter_map(move |i| {
            let Item::Event(e) = i else { return None };
            let event = match e {
                Ok(e) => {
                    let urls = forgets.front.agent_urls(&e);
                    convert::event_out(&e, &master, &|o| {
                        urls.get(o.agent_id.as_ref()?.value.as_str()).cloned()
                    })?
                }
                // The engine ended the subscription: say why, then end the stream.
                Err(s) => scheduler::Event {
                    r#type: Some(scheduler::event::Type::Error as i32),
                    error: Some(scheduler::event::Error {
                        message: s.message().to_owned(),
                    }),
                    ..Default::default()
                },
            };
            Some(agora_mesos::recordio::frame(&codec::encode(output, &event)))
        });
    let mut response = http::event_stream(output, records);
    response.headers_mut().insert(STREAM_ID, stream_header);
    response
}

/// What a subscription's stream is made of: events, and the end of the engine's.
// The small variant comes once per stream: boxing the large one would cost every event.
#[allow(clippy::large_enum_variant)]
enum Item {
    Event(Result<v1::Event, tonic::Status>),
    End,
}

/// Forgets a subscription when its stream is dropped (the framework went away), unless a
/// newer one replaced it.
struct Forget {
    front: Arc<Front>,
    framework: String,
    stream_id: String,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let mut subs = self.front.subscriptions();
        if subs
            .get(&self.framework)
            .is_some_and(|s| s.stream_id == self.stream_id)
        {
            subs.remove(&self.framework);
        }
    }
}
