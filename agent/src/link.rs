//! The agent's link to the master: find the leader among the masters, register, forward
//! messages both ways, and on any failure search again with backoff — so an agent outlives
//! master restarts and failovers to another master, and re-registers with its id and its
//! running tasks.

use std::time::{Duration, Instant};

use agora_proto::MAX_MESSAGE_BYTES;
use agora_proto::dial::{self, DialPolicy, Failure};
use agora_proto::tls::Credentials;
use agora_proto::v1::{self, agent_link_client::AgentLinkClient};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::actor::Event;

/// The masters' addresses cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("invalid master list {list:?}: {reason}")]
    List { list: String, reason: String },
    #[error("invalid master address {master:?}: {reason}")]
    Address { master: String, reason: String },
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
    // Only the address is checked here: whether TLS is given is the link's business.
    for m in &masters {
        Endpoint::from_shared(m.clone()).map_err(|e| LinkError::Address {
            master: m.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(masters)
}

/// The endpoint of `master`, with the link's keep-alive settings; over TLS with `tls`.
///
/// # Errors
/// When `master` is not a URL tonic can dial.
pub fn endpoint(master: &str, tls: Option<&Credentials>) -> Result<Endpoint, LinkError> {
    agora_proto::tls::endpoint(master, tls)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
        })
        .map_err(|reason| LinkError::Address {
            master: master.to_owned(),
            reason,
        })
}

/// How long the link waits between attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
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
    tls: Option<&Credentials>,
    events: &mpsc::Sender<Event>,
) -> Result<Opened, Failure<String>> {
    let channel = endpoint(&master, tls)
        .map_err(|e| Failure::Unreachable(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Failure::Unreachable(format!("connecting: {e}")))?;
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
    agora_proto::leader::tell_lost(&mut request, lost);
    let inbound = client
        .session(request)
        .await
        .map_err(|s| Failure::from(s).map(|s| format!("registering: {}", s.message())))?
        .into_inner();
    Ok(Opened { tx, inbound })
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
    tls: Option<&Credentials>,
    events: &mpsc::Sender<Event>,
) -> Outcome {
    let mut outcome = Outcome {
        master: None,
        named: None,
        up_since: None,
        result: Ok(()),
    };
    let (master, Opened { tx, mut inbound }) =
        match dial::find_leader(order, policy, |m| open(m, lost, tls, events)).await {
            Ok(found) => found,
            Err(e) => {
                outcome.result = Err(e.to_string());
                return outcome;
            }
        };
    tracing::info!(%master, "linked to the leading master");
    outcome.master = Some(master);
    if events.send(Event::LinkUp { tx }).await.is_err() {
        return outcome;
    }
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

/// Keeps a link to the leader among `masters` (see [`masters`]) until `events` closes;
/// over TLS, presenting the agent's certificate, with `tls` (as its files are at each
/// dial, so that a reloaded certificate is presented from the next link on).
pub async fn maintain(
    masters: Vec<String>,
    backoff: Backoff,
    tls: Option<agora_proto::tls::ServerTls>,
    events: mpsc::Sender<Event>,
) {
    let policy = DialPolicy::default();
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
        let credentials = tls.as_ref().map(agora_proto::tls::ServerTls::as_client);
        let outcome = session(&order, lost, &policy, credentials.as_ref(), &events).await;
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
    use tokio_stream::Stream;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    #[derive(Default)]
    struct State {
        /// The leader it names (`host:port`) while it follows; `None`: it leads.
        follows: Option<Option<String>>,
        sessions: u32,
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
            let follows = {
                let mut s = self.state.lock().unwrap();
                s.sessions += 1;
                s.follows.clone()
            };
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
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentLinkServer::new(fake.clone()))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
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
        let link = tokio::spawn(maintain(vec![dead, b.url()], backoff, None, tx));
        until_link_up(&mut events).await;
        assert_eq!((a.registrations(), b.sessions()), (1, 1));

        // `a` dies as leader; `b` is elected and `a`'s address answers as a follower.
        b.state.lock().unwrap().follows = None;
        {
            let mut s = a.state.lock().unwrap();
            s.follows = Some(Some(b.addr.clone()));
            s.links.clear();
        }
        until_link_up(&mut events).await;
        assert_eq!(b.registrations(), 1);
        let reg = b.state.lock().unwrap().registrations[0].clone();
        let Some(v1::agent_message::Message::Register(r)) = reg.message else {
            panic!("a registration first: {reg:?}")
        };
        assert_eq!(r.agent_id.unwrap().value, "A1", "re-registered with its id");
        link.abort();
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
