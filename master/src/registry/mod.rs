//! The replicated registry: what the masters of a group agree on, kept on disk.
//!
//! [`state`] is the registry itself, a pure state machine. Everything of openraft — its
//! types, the log and state machine over redb ([`store`]), replication over gRPC
//! ([`network`]) — stays inside this module, so moving to another openraft version touches
//! only here. The rest of the master sees a [`Registrar`]: write operations (each call
//! returns once they are committed by a majority and on disk), read the state, and watch who
//! leads.
//!
//! A lone master is a group of one over the same store: restarting it keeps the registry.

pub mod network;
pub mod state;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agora_proto::v1;
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use state::{Op, Registry};
pub use store::StoreError;

/// The ops of one raft entry: everything the master changed in one turn of its loop.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Op>);

impl std::fmt::Display for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} registry ops", self.0.len())
    }
}

/// What applying an entry answers: the registry's epoch after it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub epoch: u64,
}

pub type NodeId = u64;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Batch,
        R = Applied,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// This master's id in the group.
    pub id: NodeId,
    /// Every member's id and address (host:port of its listener), this one's included.
    pub members: BTreeMap<NodeId, String>,
    /// Where each member takes raft, when not at its address in `members` (a master serves
    /// raft on a listener of its own). A member missing here is reached at its address.
    pub raft_addrs: BTreeMap<NodeId, String>,
    /// The store file; `None` keeps it in memory (tests).
    pub path: Option<PathBuf>,
    pub heartbeat: Duration,
    /// Followers that hear no leader for a random time between these start an election.
    pub election_timeout: (Duration, Duration),
    /// Entries applied since the last snapshot before another is taken and the log compacted.
    pub snapshot_every: u64,
    /// Raft over mutual TLS, masters only: this master's certificate and the cluster CA.
    pub tls: Option<agora_proto::tls::ServerTls>,
}

impl RegistryConfig {
    /// A group of one, for a lone master.
    pub fn single(addr: String, path: Option<PathBuf>) -> Self {
        RegistryConfig {
            id: 1,
            members: BTreeMap::from([(1, addr)]),
            raft_addrs: BTreeMap::new(),
            path,
            heartbeat: Duration::from_millis(150),
            election_timeout: (Duration::from_millis(750), Duration::from_millis(1500)),
            snapshot_every: 5000,
            tls: None,
        }
    }
}

/// Why the registry cannot start or write.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("registry settings: {0}")]
    Config(String),
    #[error(
        "this master is not the leader{}",
        leader.as_ref().map_or_else(|| "; no leader is known yet".to_owned(), |l| format!("; the leader is {l}"))
    )]
    NotLeader { leader: Option<String> },
    #[error("the registry stopped: {0}")]
    Fatal(String),
}

/// Who leads, as this master sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// This master leads and a majority answered it recently.
    Leader,
    /// Another master leads (its address when known), or an election is under way.
    Follower { leader: Option<String> },
    /// The registry stopped for good (a storage error); the master must stop.
    Stopped(String),
}

/// The master's handle on the registry.
#[derive(Clone)]
pub struct Registrar {
    raft: Raft,
    store: store::Store,
    config: Arc<RegistryConfig>,
    leadership: watch::Receiver<Leadership>,
    heard: Arc<network::Heard>,
    /// Dropped with the last clone of the registrar, which stops the runtime of
    /// [`Registrar::start_apart`].
    _apart: Option<Arc<tokio::sync::oneshot::Sender<()>>>,
}

impl Registrar {
    /// [`Registrar::start`] on a runtime and thread of its own, where openraft's core, its
    /// replication and the store's commits run: however busy the master's own runtime is
    /// (ten thousand agents registering at once), heartbeats go out and are answered in
    /// time, so a leader does not step down for want of them. The runtime stops when the
    /// registrar is dropped (or shut down).
    ///
    /// With `raft_listener`, the peers' raft calls are served on it, on the same runtime, so
    /// that they never wait behind the master's client connections either.
    ///
    /// # Errors
    /// As [`Registrar::start`], or when the thread cannot be started.
    pub async fn start_apart(
        config: RegistryConfig,
        raft_listener: Option<std::net::TcpListener>,
    ) -> Result<Registrar, RegistryError> {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("agora-registry".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(RegistryError::Fatal(format!(
                            "starting the registry's runtime: {e}"
                        ))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let started = async {
                        let r = Registrar::start(config).await?;
                        if let Some(l) = raft_listener {
                            r.serve_peers(l)?;
                        }
                        Ok(r)
                    }
                    .await;
                    if started_tx.send(started).is_ok() {
                        // Until the registrar is dropped; the peer server goes with the
                        // runtime.
                        let _ = stopped.await;
                    }
                });
            })
            .map_err(|e| RegistryError::Fatal(format!("starting the registry's thread: {e}")))?;
        let mut registrar = started
            .await
            .map_err(|_| RegistryError::Fatal("the registry's thread ended".into()))??;
        registrar._apart = Some(Arc::new(stop));
        Ok(registrar)
    }

    /// Opens the store, checks it against the configured group, and starts this member.
    ///
    /// # Errors
    /// When the store is damaged or names another group, or the settings are invalid.
    pub async fn start(config: RegistryConfig) -> Result<Registrar, RegistryError> {
        if !config.members.contains_key(&config.id) {
            return Err(RegistryError::Config(format!(
                "this master's id {} is not among the members {:?}",
                config.id,
                config.members.keys().collect::<Vec<_>>()
            )));
        }
        if let Some(dir) = config.path.as_ref().and_then(|p| p.parent()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| RegistryError::Config(format!("creating {}: {e}", dir.display())))?;
        }
        let path = config.path.clone();
        let store = tokio::task::spawn_blocking(move || store::Store::open(path.as_deref()))
            .await
            .map_err(|e| RegistryError::Fatal(format!("opening the store: {e}")))??;
        let mut log = store.log_store();
        let mut sm = store.state_machine();
        check_membership(&config, &store, &mut sm).await?;
        let (election_min, election_max) = staggered(&config);
        let raft_config = openraft::Config {
            cluster_name: "agora".into(),
            heartbeat_interval: millis(config.heartbeat),
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            // Snapshots are whole registries; give a large one time to cross.
            install_snapshot_timeout: 10_000,
            snapshot_max_chunk_size: 1 << 20,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every.min(1000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| RegistryError::Config(e.to_string()))?;
        let pristine = {
            use openraft::storage::RaftLogStorage;
            log.read_vote()
                .await
                .map_err(|e| RegistryError::Fatal(e.to_string()))?
                .is_none()
                && log
                    .get_log_state()
                    .await
                    .map_err(|e| RegistryError::Fatal(e.to_string()))?
                    .last_log_id
                    .is_none()
        };
        let network = network::Network::new(config.raft_addrs.clone(), config.tls.clone());
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| RegistryError::Fatal(e.to_string()))?;
        if pristine {
            let members: BTreeMap<NodeId, BasicNode> = config
                .members
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            // Every member of a new group does this with the same members, which openraft
            // allows; the first elected leader's log wins.
            match raft.initialize(members).await {
                Ok(()) => {}
                Err(openraft::error::RaftError::APIError(
                    openraft::error::InitializeError::NotAllowed(_),
                )) => {}
                Err(e) => return Err(RegistryError::Fatal(e.to_string())),
            }
        }
        if config.members.len() == 1 && !pristine {
            // Alone, there is no one to wait for: stand at once rather than after an
            // election timeout.
            let _ = raft.trigger().elect().await;
        }
        let config = Arc::new(config);
        let heard = Arc::new(network::Heard::default());
        let leadership = watch_leadership(raft.clone(), Arc::clone(&config), Arc::clone(&heard));
        Ok(Registrar {
            raft,
            store,
            config,
            leadership,
            heard,
            _apart: None,
        })
    }

    /// Commits `ops` as one entry; returns once a majority has it on disk and this master
    /// has applied it.
    ///
    /// # Errors
    /// [`RegistryError::NotLeader`] when another master leads (or none does); `Fatal` when
    /// the registry stopped.
    pub async fn write(&self, ops: Vec<Op>) -> Result<Applied, RegistryError> {
        use openraft::error::{ClientWriteError, RaftError};
        match self.raft.client_write(Batch(ops)).await {
            Ok(r) => Ok(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(RegistryError::NotLeader {
                    leader: f.leader_node.map(|n| n.addr),
                })
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(RegistryError::Fatal(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(RegistryError::Fatal(e.to_string())),
        }
    }

    /// The registry as this master has applied it.
    pub fn registry(&self) -> Registry {
        self.store.registry()
    }

    /// Who leads, kept up to date.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// How long a follower goes without hearing from the leader before it names none: three
    /// heartbeats.
    pub fn silence(&self) -> Duration {
        silence(&self.config)
    }

    /// This master's address in the group.
    pub fn address(&self) -> &str {
        &self.config.members[&self.config.id]
    }

    /// Serves [`Registrar::peer_service`] on `listener`, on the current runtime, until that
    /// runtime stops.
    fn serve_peers(&self, listener: std::net::TcpListener) -> Result<(), RegistryError> {
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .map_err(|e| RegistryError::Config(format!("the raft listener: {e}")))?;
        // Only masters call here: over TLS the handshake needs a certificate.
        let incoming = agora_proto::listen::Incoming::maybe_tls(
            listener,
            agora_proto::listen::FIRST_BYTES_WITHIN,
            self.config.tls.as_ref(),
            true,
        );
        let routes = tonic::transport::Server::builder().add_service(self.peer_service());
        let raft = self.raft.clone();
        tokio::spawn(async move {
            // It serves until the runtime stops, which cancels this task. Ending otherwise,
            // the master could no longer replicate: raft is shut down, the leadership watch
            // says stopped, and the master stops with an error rather than answer healthy.
            match routes.serve_with_incoming(incoming).await {
                Ok(()) => tracing::error!("the raft listener stopped"),
                Err(e) => tracing::error!(error = %e, "the raft listener stopped"),
            }
            let _ = raft.shutdown().await;
        });
        Ok(())
    }

    /// When this master last heard from a leader: the leadership watch lags it by up to a
    /// look (50 ms).
    pub fn heard(&self) -> Arc<network::Heard> {
        Arc::clone(&self.heard)
    }

    /// The gRPC service peers replicate through.
    pub fn peer_service(&self) -> v1::raft_peer_server::RaftPeerServer<network::PeerService> {
        v1::raft_peer_server::RaftPeerServer::new(network::PeerService {
            raft: self.raft.clone(),
            heard: Arc::clone(&self.heard),
            tls: self.config.tls.is_some(),
        })
        .max_decoding_message_size(agora_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(agora_proto::MAX_MESSAGE_BYTES)
    }

    /// The index of the oldest entry still in the log, and the last.
    pub fn log_span(&self) -> (Option<u64>, Option<u64>) {
        let m = self.raft.metrics().borrow().clone();
        (m.purged.map(|l| l.index + 1), m.last_log_index)
    }

    /// Stops this member and waits (a few seconds at most) until its store is closed, so
    /// that the file may be opened again at once.
    pub async fn shutdown(self) {
        let _ = self.raft.shutdown().await;
        let closed = self.store.closed();
        drop(self);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !closed() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Refuses a store made for another group: its members must be those configured.
async fn check_membership(
    config: &RegistryConfig,
    store: &store::Store,
    sm: &mut store::StateMachine,
) -> Result<(), RegistryError> {
    use openraft::storage::RaftStateMachine;
    let fatal = |e: openraft::StorageError<NodeId>| RegistryError::Fatal(e.to_string());
    // The latest membership in the log, applied or not, is the one in force.
    let stored: BTreeSet<NodeId> = match store.logged_voters() {
        Some(v) => v.clone(),
        None => {
            let (_, applied) = sm.applied_state().await.map_err(fatal)?;
            applied.membership().voter_ids().collect()
        }
    };
    if stored.is_empty() {
        return Ok(());
    }
    let configured: BTreeSet<NodeId> = config.members.keys().copied().collect();
    if stored != configured {
        return Err(RegistryError::Config(format!(
            "the store at {} belongs to a group of masters {stored:?}, but --peers names \
             {configured:?}; start with the same members (changing a group's members is not \
             supported yet)",
            config
                .path
                .as_ref()
                .map_or("(in memory)".into(), |p| p.display().to_string())
        )));
    }
    Ok(())
}

/// This member's election timeouts, in milliseconds: the configured shortest, and one a
/// little longer for each member before it in id order.
///
/// openraft 0.9 draws a member's timeout once, when it starts, and lets it stand for election
/// only once a leader lease (its longest timeout) and that timeout have passed since the
/// leader was last heard. With one wide range for all, every member waits about twice the
/// range's top, and two that drew alike split the vote. Narrow ranges, one after the other,
/// let the first member stand after about twice the shortest timeout, and the next one a
/// clear step later, so they do not collide.
fn staggered(config: &RegistryConfig) -> (u64, u64) {
    let base = millis(config.election_timeout.0).max(1);
    let spread = millis(config.election_timeout.1)
        .saturating_sub(base)
        .max(10);
    let rank = config
        .members
        .keys()
        .position(|id| *id == config.id)
        .unwrap_or(0) as u64;
    let min = base + rank * (base * 2 / 5);
    (min, min + spread / 10)
}

/// How long a follower goes without hearing from the leader before it names none.
fn silence(config: &RegistryConfig) -> Duration {
    config.heartbeat * 3
}

/// Follows openraft's metrics: a leader counts as one only while a majority answered it
/// within one and a half of the shortest election timeout. No other member can be elected
/// sooner than about twice it after last hearing the leader ([`staggered`]), so a
/// partitioned leader stops serving before another is elected.
///
/// A follower names its leader only while it has heard from it within three heartbeats.
/// A leader silent longer is most likely gone and an election is coming: saying "no leader
/// known" then makes callers wait for the election ([`crate::service::Gate::serving`])
/// rather than be sent to a dead address and come back again and again.
fn watch_leadership(
    raft: Raft,
    config: Arc<RegistryConfig>,
    heard: Arc<network::Heard>,
) -> watch::Receiver<Leadership> {
    let (tx, rx) = watch::channel(Leadership::Follower { leader: None });
    let lease = millis(config.election_timeout.0) * 3 / 2;
    let silent = silence(&config);
    let solo = config.members.len() == 1;
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        loop {
            let now = {
                let m = metrics.borrow_and_update();
                if let Err(e) = &m.running_state {
                    Leadership::Stopped(e.to_string())
                } else if m.state == openraft::ServerState::Leader
                    && m.current_leader == Some(config.id)
                    && (solo || m.millis_since_quorum_ack.is_some_and(|t| t < lease))
                {
                    Leadership::Leader
                } else {
                    let leader = m
                        .current_leader
                        .filter(|l| *l != config.id)
                        .filter(|_| heard.since().is_some_and(|t| t < silent))
                        .and_then(|l| config.members.get(&l).cloned());
                    Leadership::Follower { leader }
                }
            };
            let stopped = matches!(now, Leadership::Stopped(_));
            tx.send_if_modified(|old| {
                if *old == now {
                    false
                } else {
                    tracing::info!(leadership = ?now, "registry leadership");
                    *old = now;
                    true
                }
            });
            if stopped || tx.is_closed() {
                return;
            }
            // Metrics change on events; the time since the last quorum answer does not, so
            // look again soon either way.
            tokio::select! {
                r = metrics.changed() => if r.is_err() {
                    let _ = tx.send(Leadership::Stopped("the registry shut down".into()));
                    return;
                },
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests;
