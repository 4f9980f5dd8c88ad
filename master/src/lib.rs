//! The Agora master: pools the resources of agents and offers them to frameworks.
//!
//! [`run`] serves, on one listener, the Scheduler API (frameworks subscribe and make calls),
//! the AgentLink API (agents register and stream status updates), the Operator API (state and
//! health), HTTP `GET /health`, and, with a work directory, the blob store (`/blobs/…`). A
//! member of a group of masters also serves raft, on a listener of its own (see [`Peer`]).
//! Tests bind port 0 and pass a shutdown future; the binary passes Ctrl-C.
//!
//! Inside, one owner task holds all state in an [`engine::Engine`] — a pure state machine
//! driven by typed commands with the time passed in — and a pure [`allocator`] decides the
//! offers. Reads are served from a published snapshot.
//!
//! # Layout
//!
//! - [`engine`]: frameworks, agents, offers and tasks, and the rules between them.
//! - [`allocator`]: the [`allocator::Allocator`] trait and dominant resource fairness.
//! - [`runtime`]: the owner task: commands in, effects out, timers, snapshots.
//! - [`service`]: gRPC and HTTP handlers.
//! - [`blobs`]: the content-addressed blob store.
//! - [`validate`]: bounds on every call, checked before it reaches the owner task.

pub mod acl;
pub mod allocator;
pub mod auth;
pub mod blobs;
pub mod engine;
pub mod limits;
pub mod mesos;
pub mod registry;
pub mod runtime;
pub mod service;
pub mod validate;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agora_core::Resources;
use agora_proto::{MAX_MESSAGE_BYTES, v1};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::engine::{Engine, EngineConfig};
use crate::registry::{Leadership, Registrar, RegistryConfig};
use crate::runtime::{Actor, RuntimeConfig, Snapshot};
use crate::service::{AgentLinkService, Gate, OperatorService, SchedulerService, health_router};

/// Settings of a master.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// Prefix of every id this master makes; generated when `None`.
    pub master_id: Option<String>,
    /// How often agents heartbeat. Default 5 s.
    pub agent_heartbeat_interval: Duration,
    /// Heartbeats an agent may miss before it is marked lost. Default 5.
    pub max_missed_heartbeats: u32,
    /// How often frameworks get a HEARTBEAT event. Default 15 s.
    pub framework_heartbeat_interval: Duration,
    /// Period of the full allocation cycle; cycles also run promptly whenever resources are
    /// freed or added. Default 1 s.
    pub allocation_interval: Duration,
    /// Filter on declined or unused resources when a call gives none. Default 5 s.
    pub default_refuse: Duration,
    /// Free resources smaller than all of these are not offered. Default `cpus:0.01;mem:32`.
    pub min_allocatable: Resources,
    /// Offers not answered within this are rescinded. Default: none (offers stand until
    /// used, declined or rescinded), as in Mesos.
    pub offer_timeout: Option<Duration>,
    /// Who may make and remove dynamic reservations: role → principals (`*`: any). Empty:
    /// any framework with a principal, for the roles its offers are allocated to.
    pub reservers: std::collections::HashMap<String, Vec<String>>,
    /// Events buffered per framework stream before a slow subscriber is disconnected.
    /// Default 4096.
    pub event_buffer: usize,
    /// Messages buffered per agent link before a slow agent is disconnected. Default 4096.
    pub link_buffer: usize,
    /// Finished tasks kept for the operator API and reconciliation. Default 1000.
    pub max_completed_tasks: usize,
    /// Where the master keeps what it stores (the blob store, under `blobs/`). Without one,
    /// there is no blob store.
    pub work_dir: Option<std::path::PathBuf>,
    /// Largest blob the store takes, in bytes. Default 1 GiB.
    pub max_blob_bytes: u64,
    /// This master's id in its group. Default 1.
    pub group_id: u64,
    /// Every master of the group by id, with its addresses (this one's included). Empty: a
    /// group of one, this master alone.
    pub peers: std::collections::BTreeMap<u64, Peer>,
    /// After a failover, how long agents the registry knows have to register again before
    /// they are marked unreachable. Default 10 minutes, as in Mesos.
    pub agent_reregister_timeout: Duration,
    /// How often the leader heartbeats the other masters. Default 100 ms.
    pub raft_heartbeat: Duration,
    /// The shortest a follower waits, after the leader was last heard, before it stands for
    /// election (about twice this in all; each member after the first in id order waits a
    /// step longer, so that they do not split the vote). Default 500 ms.
    pub raft_election_timeout: Duration,
    /// Registry entries between snapshots (the log is compacted behind each). Default 5000.
    pub registry_snapshot_every: u64,
    /// Keep the registry in memory even with a work directory: for throwaway clusters
    /// (tests of other things), where nothing need survive and a disk busy with other work
    /// must not slow registrations down. Refused for a group. Default false.
    pub registry_in_memory: bool,
    /// TLS on the master's listeners: its certificate and key, and the cluster CA whose
    /// certificates it accepts. With it, agents must present an agent certificate, and raft
    /// is mutual TLS between masters. Default none (plain gRPC).
    pub tls: Option<agora_proto::tls::ServerTls>,
    /// Bearer tokens of frameworks and operators (their hashes). With tokens or TLS, every
    /// framework and operator call needs a principal ([`auth`]). Default none.
    pub tokens: auth::Tokens,
    /// What each principal may do ([`acl`]): once given, what no rule allows is denied.
    /// Default none (everything allowed).
    pub acls: Option<Arc<acl::Acls>>,
    /// Bounds per caller ([`limits`]).
    pub limits: limits::Limits,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            master_id: None,
            agent_heartbeat_interval: Duration::from_secs(5),
            max_missed_heartbeats: 5,
            framework_heartbeat_interval: Duration::from_secs(15),
            allocation_interval: Duration::from_secs(1),
            default_refuse: Duration::from_secs(5),
            offer_timeout: None,
            reservers: std::collections::HashMap::new(),
            min_allocatable: agora_core::parse_resources("cpus:0.01;mem:32")
                .expect("a literal resource string parses"),
            event_buffer: 4096,
            link_buffer: 4096,
            max_completed_tasks: 1000,
            work_dir: None,
            max_blob_bytes: 1 << 30,
            group_id: 1,
            peers: std::collections::BTreeMap::new(),
            agent_reregister_timeout: Duration::from_secs(600),
            raft_heartbeat: Duration::from_millis(100),
            raft_election_timeout: Duration::from_millis(500),
            registry_snapshot_every: 5000,
            registry_in_memory: false,
            tls: None,
            tokens: auth::Tokens::default(),
            acls: None,
            limits: limits::Limits::default(),
        }
    }
}

/// One master of a group, as the others know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `HOST:PORT` where agents, frameworks and operators reach it.
    pub addr: String,
    /// `HOST:PORT` where the other masters replicate the registry to it. Raft has a listener
    /// of its own, so that a storm of agent connections cannot delay heartbeats and votes.
    pub raft_addr: String,
}

impl Peer {
    /// How far above its client port a master listens for raft by default: the port just
    /// above is an agent's (5050 and 5051), so raft takes the next (5052).
    pub const RAFT_PORT_OFFSET: u16 = 2;

    /// Parses `HOST:PORT` (raft on `HOST:PORT+2`) or `HOST:PORT/RAFT_PORT`.
    ///
    /// # Errors
    /// When the address is not `HOST:PORT`, or a port is not a number from 1 to 65535.
    pub fn parse(s: &str) -> Result<Peer, String> {
        let s = s.trim();
        if s.contains("://") {
            return Err(format!(
                "{s:?}: the address must be HOST:PORT, without a scheme"
            ));
        }
        let (addr, raft_port) = match s.split_once('/') {
            Some((a, r)) => (a, Some(r)),
            None => (s, None),
        };
        let port_of = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("{s:?}: {p:?} is not a port (1 to 65535)")),
            }
        };
        let Some((host, port)) = addr.rsplit_once(':').filter(|(h, _)| !h.is_empty()) else {
            return Err(format!(
                "{s:?}: the address must be HOST:PORT or HOST:PORT/RAFT_PORT"
            ));
        };
        let port = port_of(port)?;
        let raft_port = match raft_port {
            Some(r) => port_of(r)?,
            None => port.checked_add(Self::RAFT_PORT_OFFSET).ok_or_else(|| {
                format!(
                    "{s:?}: port {port} leaves no room for raft above it; give HOST:PORT/RAFT_PORT"
                )
            })?,
        };
        if raft_port == port {
            return Err(format!(
                "{s:?}: raft needs a port of its own, not the client port"
            ));
        }
        Ok(Peer {
            addr: format!("{host}:{port}"),
            raft_addr: format!("{host}:{raft_port}"),
        })
    }

    fn raft_port(&self) -> Result<u16, MasterError> {
        self.raft_addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| {
                MasterError::Config(format!(
                    "raft address {:?} is not HOST:PORT",
                    self.raft_addr
                ))
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Blobs(#[from] blobs::BlobError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    /// The task that owns the master's state ended while the master was serving: nothing
    /// could be answered any more, so the master stops rather than linger half alive.
    #[error("the master's state owner ended unexpectedly: {0}")]
    OwnerDied(String),
}

/// How long a stopping master waits for its connections to drain.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The Mesos version Agora's Mesos APIs speak, as it reports it to Mesos clients.
pub const MESOS_VERSION: &str = "1.11.0";

/// Serves a master on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the configuration is invalid or the server fails.
pub async fn run(
    listener: TcpListener,
    config: MasterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    serve(listener, None, config, shutdown, None).await
}

/// [`run`] for a member of a group whose raft listener is already bound (instead of at its
/// [`Peer::raft_addr`]): a process that runs several masters binds port 0 for each.
///
/// # Errors
/// As [`run`].
pub async fn run_member(
    listener: TcpListener,
    raft_listener: TcpListener,
    config: MasterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    serve(listener, Some(raft_listener), config, shutdown, None).await
}

/// Checks the settings that become timers, buffers and products of durations.
fn check_config(config: &MasterConfig) -> Result<(), MasterError> {
    use agora_core::limits::{MAX_HEARTBEAT_SECS, MAX_REFUSE_SECS, MAX_TASK_DURATION_SECS};
    let within = |name: &str, d: Duration, max: f64| {
        if d.is_zero() || d.as_secs_f64() > max {
            Err(MasterError::Config(format!(
                "{name} {d:?} must be more than zero and at most {max} s"
            )))
        } else {
            Ok(())
        }
    };
    within(
        "agent heartbeat interval",
        config.agent_heartbeat_interval,
        MAX_HEARTBEAT_SECS,
    )?;
    within(
        "framework heartbeat interval",
        config.framework_heartbeat_interval,
        MAX_HEARTBEAT_SECS,
    )?;
    within(
        "allocation interval",
        config.allocation_interval,
        MAX_HEARTBEAT_SECS,
    )?;
    if config.default_refuse.as_secs_f64() > MAX_REFUSE_SECS {
        return Err(MasterError::Config(format!(
            "default refuse filter {:?} is longer than {MAX_REFUSE_SECS} s",
            config.default_refuse
        )));
    }
    if let Some(t) = config.offer_timeout {
        within("offer timeout", t, MAX_TASK_DURATION_SECS)?;
    }
    if !(1..=1000).contains(&config.max_missed_heartbeats) {
        return Err(MasterError::Config(format!(
            "max missed heartbeats {} must be from 1 to 1000",
            config.max_missed_heartbeats
        )));
    }
    if !config.peers.is_empty() && (config.work_dir.is_none() || config.registry_in_memory) {
        // A member that forgets its vote or log on restart can elect a second leader.
        return Err(MasterError::Config(
            "a group of masters (--peers) needs --work-dir, where each keeps its registry".into(),
        ));
    }
    if !config.peers.is_empty() && !config.peers.contains_key(&config.group_id) {
        return Err(MasterError::Config(format!(
            "--id {} is not among the --peers ({:?})",
            config.group_id,
            config.peers.keys().collect::<Vec<_>>()
        )));
    }
    let mut taken = std::collections::BTreeMap::new();
    for (id, p) in &config.peers {
        for (what, a) in [("address", &p.addr), ("raft address", &p.raft_addr)] {
            if let Some(other) = taken.insert(a.as_str(), format!("master {id}'s {what}")) {
                return Err(MasterError::Config(format!(
                    "--peers: {a} is both {other} and master {id}'s {what}"
                )));
            }
        }
    }
    for (name, n) in [
        ("event buffer", config.event_buffer),
        ("link buffer", config.link_buffer),
    ] {
        if !(1..=1 << 20).contains(&n) {
            return Err(MasterError::Config(format!(
                "{name} {n} must be from 1 to {}",
                1 << 20
            )));
        }
    }
    Ok(())
}

/// [`run`], handing each owner task's command sender to `tap` (tests inject faults with it).
async fn serve(
    listener: TcpListener,
    raft_listener: Option<TcpListener>,
    config: MasterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tap: Option<mpsc::UnboundedSender<mpsc::Sender<runtime::Command>>>,
) -> Result<(), MasterError> {
    check_config(&config)?;
    let base_id = match config.master_id.clone() {
        Some(id) => {
            agora_core::FrameworkId::new(id.clone())
                .map_err(|e| MasterError::Config(format!("master id: {e}")))?;
            id
        }
        None => uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
    };
    let addr = listener
        .local_addr()
        .map_err(|e| MasterError::Config(format!("the listener has no address: {e}")))?;
    let members = if config.peers.is_empty() {
        std::collections::BTreeMap::from([(config.group_id, addr.to_string())])
    } else {
        config
            .peers
            .iter()
            .map(|(id, p)| (*id, p.addr.clone()))
            .collect()
    };
    // Where Mesos frameworks are told this master is (its address in the group).
    let members_addr = members
        .get(&config.group_id)
        .cloned()
        .unwrap_or_else(|| addr.to_string());
    // A member of a group takes raft on a listener of its own: this one's raft port, on the
    // address it serves clients on.
    let raft_listener = match (config.peers.get(&config.group_id), raft_listener) {
        (None, _) => None,
        (Some(_), Some(l)) => Some(l),
        (Some(me), None) => {
            let at = std::net::SocketAddr::new(addr.ip(), me.raft_port()?);
            Some(
                agora_proto::listen::bind(at)
                    .map_err(|e| MasterError::Config(format!("listening for raft on {at}: {e}")))?,
            )
        }
    };
    let raft_listener = raft_listener
        .map(|l| {
            l.into_std()
                .map_err(|e| MasterError::Config(format!("the raft listener: {e}")))
        })
        .transpose()?;
    let registrar = Registrar::start_apart(
        RegistryConfig {
            id: config.group_id,
            members,
            raft_addrs: config
                .peers
                .iter()
                .map(|(id, p)| (*id, p.raft_addr.clone()))
                .collect(),
            path: config
                .work_dir
                .as_deref()
                .filter(|_| !config.registry_in_memory)
                .map(registry::store::path_in),
            heartbeat: config.raft_heartbeat,
            election_timeout: (
                config.raft_election_timeout,
                config.raft_election_timeout * 2,
            ),
            snapshot_every: config.registry_snapshot_every,
            tls: config.tls.clone(),
        },
        raft_listener,
    )
    .await?;
    tracing::info!(master_id = %base_id, %addr, group_id = config.group_id, "master serving");
    if config.work_dir.is_none() || config.registry_in_memory {
        tracing::warn!(
            "no work directory: the registry is kept in memory and lost when this master stops"
        );
    }

    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
    let (owner_tx, owner_rx) = watch::channel(None);
    let gate = Gate {
        owner: owner_rx,
        leadership: registrar.leadership(),
        silence: registrar.silence(),
        heard: registrar.heard(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Leads whenever elected: recover the registry into a new engine, serve until another
    // master leads, drop everything, and wait to be elected again.
    let leading = tokio::spawn(lead(
        registrar.clone(),
        config.clone(),
        base_id,
        snap_tx,
        owner_tx,
        stop_rx.clone(),
        tap,
    ));
    // The leading task ending before it was told to stop is fatal: every call would be
    // refused while the listener stayed open. `died` says why.
    let (died_tx, mut died) = tokio::sync::oneshot::channel::<String>();
    let supervisor = tokio::spawn({
        let stopping = stop_rx.clone();
        async move {
            let why = match leading.await {
                Ok(Ok(())) => "it returned".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Err(e) if e.is_panic() => {
                    let p = e.into_panic();
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    format!("it panicked: {msg}")
                }
                Err(e) => e.to_string(),
            };
            if !*stopping.borrow() {
                tracing::error!(why, "the master's state owner ended; stopping the master");
                let _ = died_tx.send(why);
            }
        }
    });

    let guard = limits::Guard::new(config.limits.clone());
    let authn = Arc::new(auth::Authn {
        certificates: config.tls.is_some(),
        tokens: config.tokens.clone(),
    });
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(tonic::service::interceptor::InterceptedService::new(
            v1::scheduler_server::SchedulerServer::new(SchedulerService {
                gate: gate.clone(),
                guard: Arc::clone(&guard),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth::Authenticate(Arc::clone(&authn), Arc::clone(&guard)),
        ))
        .add_service(
            v1::agent_link_server::AgentLinkServer::new(AgentLinkService {
                gate: gate.clone(),
                link_buffer: config.link_buffer,
                agents_by_certificate: config.tls.is_some(),
            })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(v1::operator_server::OperatorServer::new(OperatorService {
            snapshot: snap_rx.clone(),
            gate: gate.clone(),
            authn: Arc::clone(&authn),
            acls: config.acls.clone(),
            guard: Arc::clone(&guard),
        }));
    let blob_routes = match &config.work_dir {
        Some(dir) => blobs::BlobStore::open(
            dir.join("blobs"),
            config.max_blob_bytes,
            config.limits.blob_bytes,
        )?
        .router(),
        None => blobs::BlobStore::disabled_router(),
    };
    // Blobs are content-addressed: any master serves those it has, and uploads go to the
    // leader.
    let blob_routes = blob_routes
        .layer(axum::middleware::from_fn_with_state(
            gate.clone(),
            uploads_to_the_leader,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (Arc::clone(&authn), config.acls.clone(), Arc::clone(&guard)),
            auth::blobs,
        ));
    let mesos_routes = mesos::router(mesos::Front::new(
        SchedulerService {
            gate: gate.clone(),
            guard: Arc::clone(&guard),
        },
        Arc::clone(&authn),
        mesos::master_info(&members_addr),
        snap_rx.clone(),
    ));
    let mut routes = routes.routes();
    *routes.axum_router_mut() = std::mem::take(routes.axum_router_mut())
        .merge(health_router(snap_rx, gate))
        .merge(blob_routes)
        .merge(mesos_routes);

    // Subscriptions and agent links are endless streams, so a graceful shutdown must first
    // stop the owner: dropping its senders ends every stream and lets connections drain.
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            agora_proto::listen::Incoming::maybe_tls(
                listener,
                config.limits.header_timeout,
                config.tls.as_ref(),
                false,
            ),
            {
                let stop_tx = stop_tx.clone();
                async move {
                    shutdown.await;
                    tracing::info!("master shutting down");
                    let _ = stop_tx.send(true);
                }
            },
        );
    let mut stopped = stop_rx.clone();
    let result = tokio::select! {
        r = server => r.map_err(MasterError::from),
        // A peer that keeps its half of a stream open must not hold the master up.
        () = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
            Ok(())
        }
        Ok(why) = &mut died => Err(MasterError::OwnerDied(why)),
    };
    let _ = stop_tx.send(true);
    let _ = supervisor.await;
    registrar.shutdown().await;
    result
}

/// A blob upload sent to a follower is redirected to the leader (307 keeps the method and
/// body); reads are served here.
async fn uploads_to_the_leader(
    axum::extract::State(gate): axum::extract::State<Gate>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if request.method() == axum::http::Method::GET || gate.commands().is_ok() {
        return next.run(request).await;
    }
    match gate.leader() {
        Some(leader) => {
            let path = request
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            (
                axum::http::StatusCode::TEMPORARY_REDIRECT,
                [(
                    axum::http::header::LOCATION,
                    // Scheme-relative, as Mesos's: the caller keeps TLS or plain HTTP.
                    format!("//{leader}{path}"),
                )],
                format!("this master is not the leader; the leader is {leader}\n"),
            )
                .into_response()
        }
        None => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "this master is not the leader, and no leader is elected yet; retry shortly\n",
        )
            .into_response(),
    }
}

/// Serves as leader whenever this master is elected, until told to stop.
async fn lead(
    registrar: Registrar,
    config: MasterConfig,
    base_id: String,
    snap_tx: watch::Sender<Arc<Snapshot>>,
    owner_tx: watch::Sender<Option<mpsc::Sender<runtime::Command>>>,
    mut stop: watch::Receiver<bool>,
    tap: Option<mpsc::UnboundedSender<mpsc::Sender<runtime::Command>>>,
) -> Result<(), MasterError> {
    let mut leadership = registrar.leadership();
    loop {
        tokio::select! {
            r = leadership.wait_for(|l| !matches!(l, Leadership::Follower { .. })) => {
                if r.is_err() {
                    return Err(MasterError::OwnerDied("the registry shut down".into()));
                }
            }
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        if let Leadership::Stopped(why) = &*leadership.borrow() {
            return Err(MasterError::Registry(registry::RegistryError::Fatal(
                why.clone(),
            )));
        }
        // The first entry of a term proves the leadership and numbers its ids.
        let epoch = match registrar.write(vec![registry::Op::BeginEpoch]).await {
            Ok(a) => a.epoch,
            Err(registry::RegistryError::NotLeader { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let registry = registrar.registry();
        let master_id = format!("{base_id}-{epoch}");
        let mut engine = Engine::new(
            EngineConfig {
                master_id: master_id.clone(),
                agent_heartbeat_interval: config.agent_heartbeat_interval,
                max_missed_heartbeats: config.max_missed_heartbeats,
                framework_heartbeat_interval: config.framework_heartbeat_interval,
                default_refuse: config.default_refuse,
                offer_timeout: config.offer_timeout,
                reservers: config.reservers.clone(),
                max_completed_tasks: config.max_completed_tasks,
                agent_reregister_timeout: config.agent_reregister_timeout,
                acls: config.acls.clone(),
                max_tasks_per_principal: config.limits.tasks,
                max_offers_per_principal: config.limits.offers,
            },
            Box::new(allocator::HierarchicalDrf::new(
                config.min_allocatable.clone(),
            )),
        );
        engine
            .recover(&registry, runtime::now())
            .map_err(|e| MasterError::Config(format!("recovering the registry: {e}")))?;
        let (tx, rx) = mpsc::channel(16 * 1024);
        let tick = (config.agent_heartbeat_interval / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(500));
        let actor = Actor::new(
            engine,
            RuntimeConfig {
                tick,
                allocation_interval: config.allocation_interval,
                snapshot_interval: Duration::from_millis(50),
                event_buffer: config.event_buffer,
            },
            tx.clone(),
            snap_tx.clone(),
            registrar.clone(),
        );
        tracing::info!(%master_id, epoch, "leading");
        if let Some(tap) = &tap {
            let _ = tap.send(tx.clone());
        }
        owner_tx.send_replace(Some(tx));
        let ended = actor
            .run(rx, {
                let mut stop = stop.clone();
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                }
            })
            .await;
        owner_tx.send_replace(None);
        match ended {
            runtime::Ended::Shutdown => return Ok(()),
            runtime::Ended::LostLeadership(_) => {}
            runtime::Ended::Fatal(why) => {
                return Err(MasterError::Registry(registry::RegistryError::Fatal(why)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_takes_raft_two_ports_up_unless_told() {
        let p = Peer::parse("10.0.0.1:5050").unwrap();
        assert_eq!(
            (p.addr.as_str(), p.raft_addr.as_str()),
            ("10.0.0.1:5050", "10.0.0.1:5052")
        );
        let p = Peer::parse(" m1.example:7000/7100 ").unwrap();
        assert_eq!(
            (p.addr.as_str(), p.raft_addr.as_str()),
            ("m1.example:7000", "m1.example:7100")
        );
        let p = Peer::parse("[::1]:5050").unwrap();
        assert_eq!(p.raft_addr, "[::1]:5052");
        for (bad, says) in [
            ("10.0.0.1", "HOST:PORT"),
            (":5050", "HOST:PORT"),
            ("10.0.0.1:0", "not a port"),
            ("10.0.0.1:x", "not a port"),
            ("10.0.0.1:5050/", "not a port"),
            ("10.0.0.1:5050/70000", "not a port"),
            ("10.0.0.1:5050/5050", "a port of its own"),
            ("10.0.0.1:65535", "no room"),
            ("http://10.0.0.1:5050", "scheme"),
        ] {
            let e = Peer::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn peers_that_share_an_address_are_refused() {
        let config = MasterConfig {
            work_dir: Some("/nonexistent".into()),
            peers: [(1, "h:5050/5060"), (2, "h:5060")]
                .into_iter()
                .map(|(id, a)| (id, Peer::parse(a).unwrap()))
                .collect(),
            ..MasterConfig::default()
        };
        let e = check_config(&config).unwrap_err().to_string();
        assert!(
            e.contains("h:5060 is both master 1's raft address and master 2's address"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_dead_owner_stops_the_master_with_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tap, mut commands) = mpsc::unbounded_channel();
        let master = tokio::spawn(serve(
            listener,
            None,
            MasterConfig::default(),
            std::future::pending(),
            Some(tap),
        ));
        let commands = commands.recv().await.unwrap();
        commands.send(runtime::Command::Crash).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), master)
            .await
            .expect("the master stops by itself when its owner dies")
            .unwrap();
        let e = result.unwrap_err();
        assert!(matches!(e, MasterError::OwnerDied(_)), "{e}");
        assert!(e.to_string().contains("injected fault"), "{e}");
    }

    #[test]
    fn health_is_false_once_nobody_publishes() {
        let mut snap = Snapshot::default();
        snap.health.healthy = true;
        let (tx, rx) = watch::channel(Arc::new(snap));
        let (owner_tx, owner) = watch::channel(None);
        let (owner_cmd, _owner_rx) = mpsc::channel(1);
        owner_tx.send_replace(Some(owner_cmd));
        let (_l, leadership) = watch::channel(Leadership::Leader);
        let gate = Gate {
            owner,
            leadership,
            silence: Duration::from_millis(300),
            heard: Arc::default(),
        };
        assert!(service::health(&rx, &gate).healthy);
        drop(tx);
        assert!(!service::health(&rx, &gate).healthy);
    }

    #[test]
    fn settings_that_would_overflow_are_refused() {
        let mut c = MasterConfig {
            max_missed_heartbeats: u32::MAX,
            ..MasterConfig::default()
        };
        assert!(check_config(&c).is_err());
        c.max_missed_heartbeats = 5;
        c.agent_heartbeat_interval = Duration::from_secs(u64::MAX / 2);
        assert!(check_config(&c).is_err());
        c.agent_heartbeat_interval = Duration::from_secs(5);
        c.event_buffer = 0;
        assert!(check_config(&c).is_err());
        c.event_buffer = 16;
        check_config(&c).unwrap();
    }
}
