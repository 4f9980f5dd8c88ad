//! The agent's link to the master: find the leader among the masters, register, forward
//! messages both ways, and on any failure search again with backoff — so an agent outlives
//! master restarts and failovers to another master, and re-registers with its id and its
//! running tasks.
//!
//! The link keeps a connection open to every master it knows, not only the leader: when the
//! leader dies, ten thousand agents re-registering at once each need a TCP and HTTP/2
//! handshake with the new leader, and on a small master those handshakes, not the
//! registrations, are most of the time to fail over. With the connections made in the quiet
//! time before (one per master, made once and kept alive by HTTP/2 pings), re-registering is
//! one call on a warm connection. The warming starts only once the agent is linked, so a
//! cold start connects to the leader first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use agora_proto::MAX_MESSAGE_BYTES;
use agora_proto::dial::{self, DialPolicy, Failure};
use agora_proto::v1::{self, agent_link_client::AgentLinkClient};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::{Channel, Endpoint};

use crate::actor::Event;

/// The masters' addresses cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("invalid master list {list:?}: {reason}")]
    List { list: String, reason: String },
    #[error("invalid master address {master:?}: {source}")]
    Address {
        master: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The masters of `list` (one address, or `a:5050,b:5050,c:5050`), each with a scheme.
///
/// # Errors
/// When the list is empty or names an address tonic cannot dial.
pub fn masters(list: &str) -> Result<Vec<String>, LinkError> {
    let masters = agora_proto::leader::masters(list).map_err(|reason| LinkError::List {
        list: list.to_owned(),
        reason,
    })?;
    for m in &masters {
        endpoint(m)?;
    }
    Ok(masters)
}

/// The endpoint of `master`, with the link's keep-alive settings.
///
/// # Errors
/// When `master` is not a URL tonic can dial.
pub fn endpoint(master: &str) -> Result<Endpoint, LinkError> {
    Endpoint::from_shared(master.to_owned())
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
        })
        .map_err(|source| LinkError::Address {
            master: master.to_owned(),
            source,
        })
}

/// How long the link waits between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// How often the link connects to masters it has no connection to (jittered).
const WARM_EVERY: Duration = Duration::from_secs(30);

/// Most connections kept: a `--master` list has at most 16 masters, and a leader named by
/// one of them may be outside the list.
const MAX_CHANNELS: usize = 32;

/// The connections the link keeps to masters, by `host:port` (however an address is
/// spelled, one connection per master).
#[derive(Clone, Default)]
struct Channels(Arc<Mutex<HashMap<String, Channel>>>);

fn key(master: &str) -> String {
    agora_proto::leader::host_port(master).to_owned()
}

impl Channels {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        // The map holds no invariant a panicking holder could break.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, master: &str) -> Option<Channel> {
        self.lock().get(&key(master)).cloned()
    }

    fn has_room(&self) -> bool {
        self.lock().len() < MAX_CHANNELS
    }

    fn keep(&self, master: &str, channel: Channel) {
        let mut map = self.lock();
        let k = key(master);
        if map.len() < MAX_CHANNELS || map.contains_key(&k) {
            map.insert(k, channel);
        }
    }

    fn forget(&self, master: &str) {
        self.lock().remove(&key(master));
    }

    /// Drops the connections to masters other than `masters` (leaders named once and gone).
    fn retain(&self, masters: &[String]) {
        let keep: std::collections::HashSet<String> = masters.iter().map(|m| key(m)).collect();
        self.lock().retain(|k, _| keep.contains(k));
    }

    /// The kept connection to `master`, or a new one (then kept).
    async fn channel(&self, master: &str) -> Result<Channel, Failure<String>> {
        if let Some(c) = self.get(master) {
            return Ok(c);
        }
        let c = connect(master).await?;
        self.keep(master, c.clone());
        Ok(c)
    }

    /// Keeps a working connection to each of `masters`, now and every [`WARM_EVERY`], until
    /// the handle is dropped (or the link's connections are). A kept connection is asked
    /// for the master's health: a connection only reconnects when it is used, so one to a
    /// master that restarted would otherwise cost a handshake at the failover; one that
    /// fails is replaced.
    fn warm(&self, masters: Vec<String>) -> AbortOnDropHandle<()> {
        let weak: Weak<Mutex<HashMap<String, Channel>>> = Arc::downgrade(&self.0);
        AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                for m in &masters {
                    let Some(channels) = weak.upgrade().map(Channels) else {
                        return;
                    };
                    if let Some(c) = channels.get(m) {
                        let mut client = v1::operator_client::OperatorClient::new(c);
                        let health = client.get_health(v1::GetHealthRequest {});
                        match tokio::time::timeout(Duration::from_secs(5), health).await {
                            // Any answer of the master's own proves the connection.
                            Ok(Ok(_)) => continue,
                            Ok(Err(s)) if s.code() != tonic::Code::Unavailable => continue,
                            _ => channels.forget(m),
                        }
                    }
                    if !channels.has_room() {
                        continue;
                    }
                    match connect(m).await {
                        Ok(c) => channels.keep(m, c),
                        Err(e) => tracing::debug!(master = %m, error = ?e, "no standby connection"),
                    }
                }
                tokio::time::sleep(dial::jittered(WARM_EVERY)).await;
            }
        }))
    }
}

/// A new connection to `master`.
async fn connect(master: &str) -> Result<Channel, Failure<String>> {
    endpoint(master)
        .map_err(|e| Failure::Unreachable(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(format!("connecting: {e}")))
}

/// A session the master accepted.
struct Opened {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::MasterMessage>,
}

/// Opens a session at `master`, registering first; `lost` is the master the last session
/// was lost with, if it broke (see [`agora_proto::leader::LOST_METADATA`]).
async fn open(
    master: String,
    lost: Option<&str>,
    channels: &Channels,
    events: &mpsc::Sender<Event>,
) -> Result<Opened, Failure<String>> {
    let channel = channels.channel(&master).await?;
    let mut client = AgentLinkClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let stopped = || Failure::Refused("the agent stopped".to_string());
    let (reply, registration) = oneshot::channel();
    events
        .send(Event::Connecting { reply })
        .await
        .map_err(|_| stopped())?;
    let registration = registration.await.map_err(|_| stopped())?;
    let (tx, rx) = mpsc::channel(4096);
    tx.send(registration)
        .await
        .map_err(|_| Failure::Unreachable("link closed".into()))?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(l) = lost {
        agora_proto::leader::tell_lost(&mut request, l);
    }
    // A broken connection is made again on the next attempt: one that failed, and one
    // whose call outlived the attempt (dropped unanswered, as on a half-open connection).
    let mut unanswered = Forget(Some((channels, &master)));
    let inbound = match client.session(request).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let failure = Failure::from(s).map(|s| format!("registering: {}", s.message()));
            if !matches!(failure, Failure::Unreachable(_)) {
                unanswered.0 = None;
            }
            return Err(failure);
        }
    };
    unanswered.0 = None;
    Ok(Opened { tx, inbound })
}

/// Forgets the kept connection to a master when dropped, unless disarmed (`None`).
struct Forget<'a>(Option<(&'a Channels, &'a str)>);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some((channels, master)) = self.0 {
            channels.forget(master);
        }
    }
}

/// How one session went.
struct Outcome {
    /// The master the session was at.
    master: Option<String>,
    /// A leader named when the link ended.
    named: Option<String>,
    /// When the link was up.
    up_since: Option<Instant>,
    result: Result<(), String>,
}

/// Finds the leader among `order`, registers and forwards messages until the link breaks.
async fn session(
    order: &[String],
    lost: Option<&str>,
    policy: &DialPolicy,
    channels: &Channels,
    events: &mpsc::Sender<Event>,
) -> Outcome {
    let mut outcome = Outcome {
        master: None,
        named: None,
        up_since: None,
        result: Ok(()),
    };
    let (master, Opened { tx, mut inbound }) =
        match dial::find_leader(order, policy, |m| open(m, lost, channels, events)).await {
            Ok(found) => found,
            Err(e) => {
                outcome.result = Err(e.to_string());
                return outcome;
            }
        };
    tracing::info!(%master, "linked to the leading master");
    if events.send(Event::LinkUp { tx }).await.is_err() {
        outcome.master = Some(master);
        return outcome;
    }
    // Standby connections to the others, for the day this master is lost.
    let mut known = order.to_vec();
    known.push(master.clone());
    channels.retain(&known);
    let others = order.iter().filter(|m| key(m) != key(&master));
    let _warm = channels.warm(others.cloned().collect());
    outcome.master = Some(master);
    outcome.up_since = Some(Instant::now());
    outcome.result = loop {
        match inbound.message().await {
            Ok(Some(v1::MasterMessage { message: Some(m) })) => {
                if events.send(Event::FromMaster(Box::new(m))).await.is_err() {
                    break Ok(());
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break Err("the master closed the link".into()),
            Err(s) => {
                outcome.named = agora_proto::leader::redirect(&s).flatten();
                break Err(format!("link failed: {}", s.message()));
            }
        }
    };
    outcome
}

/// Keeps a link to the leader among `masters` (see [`masters`]) until `events` closes.
pub async fn maintain(masters: Vec<String>, backoff: Backoff, events: mpsc::Sender<Event>) {
    let policy = DialPolicy::default();
    let channels = Channels::default();
    let mut delay = backoff.min;
    let (mut last, mut named) = (None, None);
    loop {
        // After a break the lost master is tried last, a leader it named first.
        let order = dial::order(&masters, named.as_deref(), last.as_deref());
        // The master last linked to, if it was lost rather than left for a leader it named.
        let lost = if named.is_none() {
            last.as_deref()
        } else {
            None
        };
        let outcome = session(&order, lost, &policy, &channels, &events).await;
        let _ = events.send(Event::LinkDown).await;
        if events.is_closed() {
            return;
        }
        if let Err(e) = &outcome.result {
            tracing::warn!(master = ?outcome.master, error = %e, retry_in = ?delay, "no link to the master");
        }
        // A link that lasted a while was healthy: start the backoff over.
        if outcome.up_since.is_some_and(|t| t.elapsed() > backoff.max) {
            delay = backoff.min;
        }
        (last, named) = (outcome.master.or(last), outcome.named);
        tokio::time::sleep(dial::jittered(delay)).await;
        delay = (delay * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    use agora_proto::leader::not_leader;
    use agora_proto::v1::agent_link_server::{AgentLink, AgentLinkServer};
    use tokio_stream::wrappers::TcpListenerStream;
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    #[derive(Default)]
    struct State {
        /// The leader it names (`host:port`) while it follows; `None`: it leads.
        follows: Option<Option<String>>,
        sessions: u32,
        /// TCP connections it accepted.
        connections: usize,
        /// Whether it never answers a session (a hung master, or a half-open connection).
        hang: bool,
        /// The first message of each session it accepted.
        registrations: Vec<v1::AgentMessage>,
        /// Open sessions; dropping them ends the links.
        links: Vec<mpsc::Sender<Result<v1::MasterMessage, Status>>>,
    }

    #[derive(Clone, Default)]
    struct Fake {
        state: Arc<Mutex<State>>,
        addr: String,
    }

    type Out = Pin<Box<dyn Stream<Item = Result<v1::MasterMessage, Status>> + Send>>;

    #[tonic::async_trait]
    impl AgentLink for Fake {
        type SessionStream = Out;

        async fn session(
            &self,
            request: Request<Streaming<v1::AgentMessage>>,
        ) -> Result<Response<Out>, Status> {
            let (follows, hang) = {
                let mut s = self.state.lock().unwrap();
                s.sessions += 1;
                (s.follows.clone(), s.hang)
            };
            if hang {
                std::future::pending::<()>().await;
            }
            if let Some(leader) = follows {
                return Err(not_leader(leader.as_deref()));
            }
            let mut inbound = request.into_inner();
            let first = inbound.message().await?.unwrap_or_default();
            let (tx, rx) = mpsc::channel(4);
            let mut s = self.state.lock().unwrap();
            s.registrations.push(first);
            s.links.push(tx);
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }
    }

    impl Fake {
        async fn serve(follows: Option<Option<String>>) -> Fake {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let fake = Fake {
                state: Arc::default(),
                addr: listener.local_addr().unwrap().to_string(),
            };
            fake.state.lock().unwrap().follows = follows;
            let state = fake.state.clone();
            let incoming = TcpListenerStream::new(listener).map(move |c| {
                state.lock().unwrap().connections += 1;
                c
            });
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentLinkServer::new(fake.clone()))
                    .serve_with_incoming(incoming),
            );
            fake
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn registrations(&self) -> usize {
            self.state.lock().unwrap().registrations.len()
        }

        fn sessions(&self) -> u32 {
            self.state.lock().unwrap().sessions
        }

        fn connections(&self) -> usize {
            self.state.lock().unwrap().connections
        }
    }

    /// `a` dies as leader (its links end); `b` is elected and `a`'s address answers as a
    /// follower naming it.
    fn fail_over(a: &Fake, b: &Fake) {
        b.state.lock().unwrap().follows = None;
        let mut s = a.state.lock().unwrap();
        s.follows = Some(Some(b.addr.clone()));
        s.links.clear();
    }

    /// Plays the agent's owner task: answers `Connecting` with a registration until the link
    /// is up.
    async fn until_link_up(events: &mut mpsc::Receiver<Event>) {
        let registration = v1::AgentMessage {
            message: Some(v1::agent_message::Message::Register(
                v1::agent_message::Register {
                    agent_id: Some(v1::AgentId { value: "A1".into() }),
                    ..Default::default()
                },
            )),
        };
        let wait = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await.expect("the link runs") {
                    Event::Connecting { reply } => {
                        let _ = reply.send(registration.clone());
                    }
                    Event::LinkUp { .. } => return,
                    _ => {}
                }
            }
        });
        wait.await.expect("the link comes up within 10s");
    }

    #[tokio::test]
    async fn the_link_finds_the_leader_and_follows_a_failover() {
        let a = Fake::serve(None).await;
        let b = Fake::serve(Some(Some(a.addr.clone()))).await;
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (tx, mut events) = mpsc::channel(64);
        let backoff = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        // Neither of the first two leads: the follower's redirect leads to `a`.
        let link = tokio::spawn(maintain(vec![dead, b.url()], backoff, tx));
        until_link_up(&mut events).await;
        assert_eq!((a.registrations(), b.sessions()), (1, 1));

        fail_over(&a, &b);
        until_link_up(&mut events).await;
        assert_eq!(b.registrations(), 1);
        let reg = b.state.lock().unwrap().registrations[0].clone();
        let Some(v1::agent_message::Message::Register(r)) = reg.message else {
            panic!("a registration first: {reg:?}")
        };
        assert_eq!(r.agent_id.unwrap().value, "A1", "re-registered with its id");
        link.abort();
    }

    #[tokio::test]
    async fn a_standby_connection_to_the_other_master_serves_the_failover() {
        let a = Fake::serve(None).await;
        let b = Fake::serve(Some(Some(a.addr.clone()))).await;
        let (tx, mut events) = mpsc::channel(64);
        let backoff = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        let link = tokio::spawn(maintain(vec![a.url(), b.url()], backoff, tx));
        until_link_up(&mut events).await;
        assert_eq!(a.registrations(), 1);
        // Linked to `a`, the agent connects to `b` without calling it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.connections() == 0 {
            assert!(Instant::now() < deadline, "no standby connection to b");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(b.sessions(), 0);

        fail_over(&a, &b);
        until_link_up(&mut events).await;
        assert_eq!(b.registrations(), 1);
        assert_eq!(
            b.connections(),
            1,
            "the failover used the standby connection"
        );
        link.abort();
    }

    #[tokio::test]
    async fn a_session_call_dropped_unanswered_forgets_its_connection() {
        let hung = Fake::serve(None).await;
        hung.state.lock().unwrap().hang = true;
        let channels = Channels::default();
        let (tx, mut events) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let Event::Connecting { reply } = ev {
                    let _ = reply.send(v1::AgentMessage::default());
                }
            }
        });
        let attempt = open(hung.url(), None, &channels, &tx);
        let timed_out = tokio::time::timeout(Duration::from_millis(500), attempt).await;
        assert!(timed_out.is_err(), "the hung master answered");
        assert_eq!(hung.sessions(), 1, "the call reached the master");
        assert!(
            channels.get(&hung.url()).is_none(),
            "the connection is kept"
        );
    }

    #[test]
    fn kept_connections_are_bounded() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _in = rt.enter();
        let channels = Channels::default();
        let lazy = |i: usize| {
            endpoint(&format!("http://127.0.0.1:{}", 1000 + i))
                .unwrap()
                .connect_lazy()
        };
        for i in 0..MAX_CHANNELS + 8 {
            channels.keep(&format!("m{i}"), lazy(i));
        }
        assert_eq!(channels.lock().len(), MAX_CHANNELS);
        // A master already kept gets its new connection.
        channels.keep("m0", lazy(0));
        channels.forget("m1");
        channels.keep("new", lazy(99));
        assert!(channels.get("new").is_some() && channels.get("m1").is_none());
        assert_eq!(channels.lock().len(), MAX_CHANNELS);
        // Masters no longer named are dropped; one master however spelled is one entry.
        channels.retain(&["http://m0/".to_owned(), "new".to_owned()]);
        assert_eq!(channels.lock().len(), 2);
        channels.keep("http://new", lazy(98));
        assert_eq!(channels.lock().len(), 2);
    }

    #[test]
    fn master_lists_are_checked() {
        assert_eq!(
            masters("a:1,b:2").unwrap(),
            vec!["http://a:1".to_owned(), "http://b:2".to_owned()]
        );
        assert!(matches!(masters(" "), Err(LinkError::List { .. })));
        assert!(matches!(
            masters("a:1,http://b c:2"),
            Err(LinkError::Address { .. })
        ));
    }
}
