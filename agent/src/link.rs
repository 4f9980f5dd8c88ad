//! The agent's link to the master: dial, register, forward messages both ways, and on any
//! failure dial again with backoff — so an agent outlives master restarts and re-registers
//! with its id and its running tasks.

use std::time::Duration;

use agora_proto::MAX_MESSAGE_BYTES;
use agora_proto::v1::{self, agent_link_client::AgentLinkClient};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::actor::Event;

/// The master's address cannot be dialled.
#[derive(Debug, thiserror::Error)]
#[error("invalid master address {master:?}: {source}")]
pub struct LinkError {
    pub master: String,
    #[source]
    pub source: tonic::transport::Error,
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
        .map_err(|source| LinkError {
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

async fn session(endpoint: &Endpoint, events: &mpsc::Sender<Event>) -> Result<(), String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut client = AgentLinkClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (reply, registration) = oneshot::channel();
    events
        .send(Event::Connecting { reply })
        .await
        .map_err(|_| "agent stopped".to_string())?;
    let registration = registration
        .await
        .map_err(|_| "agent stopped".to_string())?;
    let (tx, rx) = mpsc::channel(4096);
    tx.send(registration)
        .await
        .map_err(|_| "link closed".to_string())?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("registering: {}", s.message()))?
        .into_inner();
    events
        .send(Event::LinkUp { tx })
        .await
        .map_err(|_| "agent stopped".to_string())?;
    loop {
        match inbound.message().await {
            Ok(Some(v1::MasterMessage { message: Some(m) })) => {
                if events.send(Event::FromMaster(Box::new(m))).await.is_err() {
                    return Ok(());
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err("the master closed the link".into()),
            Err(s) => return Err(format!("link failed: {}", s.message())),
        }
    }
}

/// Keeps a link to `master` (at `endpoint`, see [`endpoint`]) until `events` closes.
pub async fn maintain(
    endpoint: Endpoint,
    master: String,
    backoff: Backoff,
    events: mpsc::Sender<Event>,
) {
    let mut delay = backoff.min;
    loop {
        let started = std::time::Instant::now();
        let result = session(&endpoint, &events).await;
        let _ = events.send(Event::LinkDown).await;
        if events.is_closed() {
            return;
        }
        if let Err(e) = result {
            tracing::warn!(%master, error = %e, retry_in = ?delay, "no link to the master");
        }
        // A link that lasted a while was healthy: start the backoff over.
        if started.elapsed() > backoff.max {
            delay = backoff.min;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff.max);
    }
}
