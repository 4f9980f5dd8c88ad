//! Clients given a list of masters find the leader and follow it, against fake masters on
//! loopback that answer as a follower does (`agora_proto::leader::not_leader`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora_proto::leader::not_leader;
use agora_proto::v1::{self, operator_server::OperatorServer, scheduler_server::SchedulerServer};
use agora_sdk::{DialPolicy, Error, Event, Operator, SchedulerConfig, subscribe};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// How a fake master answers.
#[derive(Debug, Clone)]
enum Role {
    Leads,
    /// Follows, naming the leader (`host:port`) or none.
    Follows(Option<String>),
}

#[derive(Default)]
struct State {
    role: Option<Role>,
    subscribes: Vec<v1::SubscribeRequest>,
    /// The master each subscription attempt said it lost (`agora-lost-leader`), served or not.
    lost: Vec<Option<String>>,
    /// The open subscriptions' senders; dropping them ends the streams.
    streams: Vec<mpsc::Sender<Result<v1::Event, Status>>>,
    calls: u32,
}

/// A master that leads or follows as told, and records what it was asked.
#[derive(Clone)]
struct Fake {
    name: String,
    state: Arc<Mutex<State>>,
}

impl Fake {
    fn role(&self) -> Role {
        self.state
            .lock()
            .unwrap()
            .role
            .clone()
            .unwrap_or(Role::Leads)
    }

    fn set_role(&self, role: Role) {
        self.state.lock().unwrap().role = Some(role);
    }

    /// The status a follower answers with, or `None` when this master leads.
    fn refuse(&self) -> Option<Status> {
        self.state.lock().unwrap().calls += 1;
        match self.role() {
            Role::Leads => None,
            Role::Follows(leader) => Some(not_leader(leader.as_deref())),
        }
    }

    /// Steps down: open subscriptions end, calls are answered with a redirect to `leader`.
    fn step_down(&self, leader: &Fake) {
        let mut s = self.state.lock().unwrap();
        s.role = Some(Role::Follows(Some(leader.addr())));
        s.streams.clear();
    }

    fn addr(&self) -> String {
        self.name.trim_start_matches("http://").to_owned()
    }

    fn subscribes(&self) -> Vec<v1::SubscribeRequest> {
        self.state.lock().unwrap().subscribes.clone()
    }

    fn calls(&self) -> u32 {
        self.state.lock().unwrap().calls
    }

    fn lost(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().lost.clone()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl v1::scheduler_server::Scheduler for Fake {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let lost = agora_proto::leader::lost(request.metadata());
        self.state.lock().unwrap().lost.push(lost);
        if let Some(s) = self.refuse() {
            return Err(s);
        }
        let req = request.into_inner();
        let id = req
            .framework_info
            .as_ref()
            .and_then(|i| i.id.clone())
            .unwrap_or(v1::FrameworkId {
                value: "fw-1".into(),
            });
        let (tx, rx) = mpsc::channel(16);
        let mut state = self.state.lock().unwrap();
        let stream_id = format!("stream-{}-{}", state.subscribes.len(), self.addr());
        state.subscribes.push(req);
        tx.try_send(Ok(v1::Event {
            event: Some(v1::event::Event::Subscribed(v1::event::Subscribed {
                framework_id: Some(id),
                stream_id,
                heartbeat_interval_seconds: 15.0,
                master_id: self.name.clone(),
            })),
        }))
        .unwrap();
        state.streams.push(tx);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn accept(
        &self,
        _: Request<v1::AcceptRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn decline(
        &self,
        _: Request<v1::DeclineRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn revive(
        &self,
        _: Request<v1::ReviveRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn suppress(
        &self,
        _: Request<v1::SuppressRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn kill(
        &self,
        _: Request<v1::KillRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn acknowledge(
        &self,
        _: Request<v1::AcknowledgeRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn reconcile(
        &self,
        _: Request<v1::ReconcileRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
    async fn teardown(
        &self,
        _: Request<v1::TeardownRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call()
    }
}

impl Fake {
    fn call(&self) -> Result<Response<v1::CallResponse>, Status> {
        match self.refuse() {
            Some(s) => Err(s),
            None => Ok(Response::new(v1::CallResponse::default())),
        }
    }

    /// The operator's answer: one role named after this master.
    fn roles(&self) -> Result<Response<v1::GetRolesResponse>, Status> {
        match self.refuse() {
            Some(s) => Err(s),
            None => Ok(Response::new(v1::GetRolesResponse {
                roles: vec![v1::RoleState {
                    role: self.name.clone(),
                    ..Default::default()
                }],
            })),
        }
    }
}

#[tonic::async_trait]
impl v1::operator_server::Operator for Fake {
    async fn get_state(
        &self,
        _: Request<v1::GetStateRequest>,
    ) -> Result<Response<v1::GetStateResponse>, Status> {
        self.refuse()
            .map_or(Ok(Response::new(Default::default())), Err)
    }
    async fn get_health(
        &self,
        _: Request<v1::GetHealthRequest>,
    ) -> Result<Response<v1::GetHealthResponse>, Status> {
        self.refuse()
            .map_or(Ok(Response::new(Default::default())), Err)
    }
    async fn get_roles(
        &self,
        _: Request<v1::GetRolesRequest>,
    ) -> Result<Response<v1::GetRolesResponse>, Status> {
        self.roles()
    }
    async fn update_weight(
        &self,
        _: Request<v1::UpdateWeightRequest>,
    ) -> Result<Response<v1::UpdateResponse>, Status> {
        self.refuse()
            .map_or(Ok(Response::new(Default::default())), Err)
    }
    async fn update_quota(
        &self,
        _: Request<v1::UpdateQuotaRequest>,
    ) -> Result<Response<v1::UpdateResponse>, Status> {
        self.refuse()
            .map_or(Ok(Response::new(Default::default())), Err)
    }
}

/// A fake master serving on loopback.
async fn master(role: Role) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = Fake {
        name: format!("http://{}", listener.local_addr().unwrap()),
        state: Arc::default(),
    };
    fake.set_role(role);
    let serve = tonic::transport::Server::builder()
        .add_service(SchedulerServer::new(fake.clone()))
        .add_service(OperatorServer::new(fake.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(serve);
    fake
}

/// An address nothing listens on.
async fn dead() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

fn list(masters: &[&str]) -> String {
    masters.join(",")
}

fn quick() -> DialPolicy {
    DialPolicy {
        deadline: Duration::from_secs(1),
        ..DialPolicy::default()
    }
}

async fn next(events: &mut agora_sdk::Events) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10s")
        .expect("the subscription goes on")
}

/// The next event, which must be SUBSCRIBED: the framework id and the master's.
async fn subscribed_again(events: &mut agora_sdk::Events) -> (agora_core::FrameworkId, String) {
    match next(events).await {
        Event::Subscribed {
            framework_id,
            master_id,
            ..
        } => (framework_id, master_id),
        other => panic!("SUBSCRIBED again, not {other:?}"),
    }
}

#[tokio::test]
async fn an_operator_given_a_follower_first_ends_at_the_leader() {
    let leader = master(Role::Leads).await;
    let follower = master(Role::Follows(Some(leader.addr()))).await;
    let op = Operator::connect(&list(&[&follower.name, &leader.name]))
        .await
        .unwrap();
    assert_eq!(op.master(), leader.name);
    let roles = op.roles().await.unwrap();
    assert_eq!(roles[0].role, leader.name);
    assert_eq!(follower.calls(), 1);
}

#[tokio::test]
async fn an_operator_given_a_dead_master_and_a_follower_reaches_the_leader_it_names() {
    // The leader is not in the list: only the follower's redirect leads there.
    let leader = master(Role::Leads).await;
    let follower = master(Role::Follows(Some(leader.addr()))).await;
    let dead = dead().await;
    let op = Operator::connect(&list(&[&dead, &follower.name]))
        .await
        .unwrap();
    assert_eq!(op.master(), leader.name);
    assert_eq!(op.roles().await.unwrap()[0].role, leader.name);
}

#[tokio::test]
async fn an_operator_follows_the_leader_when_it_changes() {
    let a = master(Role::Leads).await;
    let b = master(Role::Follows(Some(a.addr()))).await;
    let op = Operator::connect(&list(&[&a.name, &b.name])).await.unwrap();
    assert_eq!(op.master(), a.name);
    b.set_role(Role::Leads);
    a.step_down(&b);
    assert_eq!(op.roles().await.unwrap()[0].role, b.name);
    assert_eq!(op.master(), b.name);
    op.set_weight("web", 2.0).await.unwrap();
}

#[tokio::test]
async fn with_no_leader_known_the_search_retries_then_fails_naming_each_master() {
    let a = master(Role::Follows(None)).await;
    let b = master(Role::Follows(None)).await;
    let dead = dead().await;
    let started = Instant::now();
    let err = Operator::connect_with(&list(&[&a.name, &b.name, &dead]), quick())
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let Error::Connection(text) = &err else {
        panic!("{err:?}")
    };
    assert!(text.starts_with("no leader found within 1s"), "{text}");
    for m in [&a.name, &b.name] {
        assert!(
            text.contains(&format!("{m}: not the leader; no leader known yet")),
            "{text}"
        );
    }
    assert!(text.contains(&format!("{dead}: connecting")), "{text}");
    // It waited for an election: several rounds, not one.
    assert!(a.calls() >= 3, "{}", a.calls());
}

#[tokio::test]
async fn no_master_answering_fails_at_once() {
    let (x, y) = (dead().await, dead().await);
    let started = Instant::now();
    let err = Operator::connect(&list(&[&x, &y])).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    let text = err.to_string();
    assert!(text.contains("no master answered"), "{text}");
    assert!(text.contains(&x) && text.contains(&y), "{text}");
}

#[tokio::test]
async fn a_framework_subscribes_at_the_leader_and_follows_a_failover() {
    let a = master(Role::Leads).await;
    let f = master(Role::Follows(Some(a.addr()))).await;
    let b = master(Role::Follows(Some(a.addr()))).await;
    let mut config = SchedulerConfig::new(list(&[&f.name, &a.name, &b.name]), "follower");
    config.auto_acknowledge = false;
    let (scheduler, mut events) = subscribe(config).await.unwrap();
    assert_eq!(scheduler.master(), a.name);
    let Event::Subscribed {
        framework_id,
        master_id,
        ..
    } = next(&mut events).await
    else {
        panic!("SUBSCRIBED first")
    };
    assert_eq!(master_id, a.name);
    let first_stream = a.subscribes().len();
    assert_eq!(first_stream, 1);

    // The leader dies (its streams end); `b` is elected and `f` names it.
    b.set_role(Role::Leads);
    f.set_role(Role::Follows(Some(b.addr())));
    a.step_down(&b);
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    assert_eq!(
        subscribed_again(&mut events).await,
        (framework_id.clone(), b.name.clone())
    );
    assert_eq!(scheduler.master(), b.name);
    // Re-subscribed with its id, naming the stream it replaces (which `b` never saw).
    let req = &b.subscribes()[0];
    let info = req.framework_info.as_ref().unwrap();
    assert_eq!(info.id.as_ref().unwrap().value, framework_id.as_str());
    assert_eq!(req.stream_id, format!("stream-0-{}", a.addr()));
    // Calls go to the new leader.
    scheduler.decline(&[], None).await.unwrap();
    assert!(b.calls() >= 2);
}

#[tokio::test]
async fn a_call_answered_by_a_deposed_leader_sends_the_driver_to_the_new_one() {
    let a = master(Role::Leads).await;
    let b = master(Role::Follows(Some(a.addr()))).await;
    let mut config = SchedulerConfig::new(list(&[&a.name, &b.name]), "caller");
    config.auto_acknowledge = false;
    let (scheduler, mut events) = subscribe(config).await.unwrap();
    assert!(matches!(next(&mut events).await, Event::Subscribed { .. }));

    // `a` steps down but its stream stays open: only the call's answer tells.
    b.set_role(Role::Leads);
    a.set_role(Role::Follows(Some(b.addr())));
    let err = scheduler.decline(&[], None).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("no longer leads"), "{err}");
    let Event::Disconnected { reason } = next(&mut events).await else {
        panic!("DISCONNECTED")
    };
    assert!(reason.contains("no longer leads"), "{reason}");
    let Event::Subscribed { master_id, .. } = next(&mut events).await else {
        panic!("SUBSCRIBED again")
    };
    assert_eq!(master_id, b.name);
    scheduler.decline(&[], None).await.unwrap();
}

#[tokio::test]
async fn a_subscription_with_no_leader_fails_with_every_master_named() {
    let a = master(Role::Follows(None)).await;
    let dead = dead().await;
    let mut config = SchedulerConfig::new(list(&[&a.name, &dead]), "nowhere");
    config.discovery = quick();
    let Err(err) = subscribe(config).await else {
        panic!("subscribed with no leader")
    };
    let text = err.to_string();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    assert!(text.contains(&a.name) && text.contains(&dead), "{text}");
}

/// What a blob store was given: paths and bodies.
type Stored = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A blob store on loopback: as leader it keeps what is put; as a follower it redirects
/// uploads to `leader` (HEAD too, as a master does: only GET is served by followers).
async fn blob_master(leader: Option<String>) -> (String, Stored) {
    use axum::http::{Method, StatusCode, Uri, header};
    use axum::response::IntoResponse;
    let stored: Stored = Arc::default();
    let store = stored.clone();
    let handler = move |method: Method, uri: Uri, body: axum::body::Bytes| {
        let (store, leader) = (store.clone(), leader.clone());
        async move {
            if let Some(l) = leader
                && method != Method::GET
            {
                let to = format!("http://{l}{}", uri.path());
                return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response();
            }
            let path = uri.path().to_owned();
            let mut s = store.lock().unwrap();
            match method {
                Method::PUT => {
                    s.push((path, body.to_vec()));
                    StatusCode::CREATED.into_response()
                }
                _ if s.iter().any(|(p, _)| *p == path) => StatusCode::OK.into_response(),
                _ => StatusCode::NOT_FOUND.into_response(),
            }
        }
    };
    let app = axum::Router::new().route("/blobs/{digest}", axum::routing::any(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, stored)
}

#[tokio::test]
async fn a_blob_upload_follows_the_redirect_and_sends_the_file_again() {
    let (leader, stored) = blob_master(None).await;
    let (follower, at_follower) = blob_master(Some(leader.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("task.wasm");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let dead = dead().await;
    // Given a dead master and a follower: the upload ends at the leader the follower names.
    let digest = agora_sdk::blob::upload_file(&list(&[&dead, &follower]), &file, |_, _| {})
        .await
        .unwrap();
    let stored = stored.lock().unwrap().clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0, format!("/blobs/{digest}"));
    assert!(stored[0].1 == bytes, "the whole file reached the leader");
    assert!(at_follower.lock().unwrap().is_empty());
}

/// The leader dies and no master leads for longer than one search for a leader: the driver
/// keeps searching in the background, telling each master which one it lost, and
/// re-subscribes with its id once one leads.
#[tokio::test]
async fn a_framework_keeps_looking_through_a_long_election_and_says_what_it_lost() {
    let a = master(Role::Leads).await;
    let b = master(Role::Follows(Some(a.addr()))).await;
    let mut config = SchedulerConfig::new(list(&[&a.name, &b.name]), "patient");
    config.auto_acknowledge = false;
    config.discovery = quick();
    let (_scheduler, mut events) = subscribe(config).await.unwrap();
    let Event::Subscribed { framework_id, .. } = next(&mut events).await else {
        panic!("SUBSCRIBED first")
    };

    // `a` is gone (its stream ends, it names no leader) and the election takes 2.5 s:
    // more than two searches of 1 s.
    a.set_role(Role::Follows(None));
    b.set_role(Role::Follows(None));
    a.state.lock().unwrap().streams.clear();
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected { .. }
    ));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    b.set_role(Role::Leads);
    a.set_role(Role::Follows(Some(b.addr())));
    assert_eq!(
        subscribed_again(&mut events).await,
        (framework_id, b.name.clone())
    );
    // `b` first heard of the framework after the break: every attempt there, the served
    // one included, names the master it lost.
    let asked = b.lost();
    assert!(
        asked.len() >= 3,
        "several attempts during the election: {asked:?}"
    );
    assert!(
        asked
            .iter()
            .all(|l| l.as_deref() == Some(a.addr().as_str())),
        "{asked:?}"
    );
}
