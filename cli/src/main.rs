//! `agora`: run a local cluster, a master, an agent, a one-shot task or bundle; list agents,
//! tasks and roles; manage quotas, blobs and bundles; and, started by an agent, be a custom
//! executor (`executor`), a Wasm executor (`__wasm-executor`) or a task's init (`__init`).

mod cert;
mod dev;
mod executor;
mod roles;
mod run;
mod tables;
mod wasm_executor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agora",
    version,
    about = "Agora: a cluster manager that runs Wasm and native tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a master and N agents in this process on loopback, until Ctrl-C.
    Dev(dev::DevArgs),
    /// Run a master.
    Master(MasterArgs),
    /// Run an agent.
    Agent(Box<AgentArgs>),
    /// Run one Wasm task and wait for it, printing its state changes and output (like
    /// mesos-execute); exits with the task's exit code.
    Run(run::RunArgs),
    /// List the cluster's agents.
    Agents(QueryArgs),
    /// List the cluster's tasks.
    Tasks(TasksArgs),
    /// List roles: weight, quota guarantee and limit, allocated, offered, reserved.
    Roles(QueryArgs),
    /// Set or remove a role's quota.
    Quota {
        #[command(subcommand)]
        action: roles::QuotaAction,
    },
    /// Set a role's weight.
    Weight {
        #[command(subcommand)]
        action: roles::WeightAction,
    },
    /// Be a custom executor (started by an agent): run each task given as a shell command
    /// in its sandbox and report how it ends.
    Executor,
    /// Be an agent's Wasm executor for a framework (started by the agent).
    #[command(name = "__wasm-executor", hide = true)]
    WasmExecutor,
    /// The master's blob store.
    Blob {
        #[command(subcommand)]
        action: BlobAction,
    },
    /// Task bundles: a directory with an agora.toml manifest and what it names.
    Bundle {
        #[command(subcommand)]
        action: BundleAction,
    },
    /// The cluster's CA and certificates (TLS between masters, agents and clients).
    Cert {
        #[command(subcommand)]
        action: cert::CertAction,
    },
    /// Bearer tokens of frameworks and operators.
    Token {
        #[command(subcommand)]
        action: cert::TokenAction,
    },
    /// Access control lists.
    Acl {
        #[command(subcommand)]
        action: cert::AclAction,
    },
}

#[derive(Subcommand)]
enum BundleAction {
    /// Check a bundle and pack it into one archive (default NAME.agora.tgz here).
    Build {
        dir: PathBuf,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Check a bundle's manifest (a directory or an archive) and say what it would run.
    Check { bundle: PathBuf },
}

#[derive(Subcommand)]
enum BlobAction {
    /// Upload a file (a Wasm module, an archive); prints its sha256:<hex> digest, by which
    /// tasks can name it.
    Put {
        file: PathBuf,
        #[command(flatten)]
        query: QueryArgs,
    },
}

#[derive(Args)]
pub struct MasterArgs {
    /// Address to serve gRPC and HTTP /health on.
    #[arg(long, env = "AGORA_MASTER_LISTEN", default_value = "127.0.0.1:5050")]
    listen: SocketAddr,
    /// How often agents heartbeat (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    agent_heartbeat_interval: Duration,
    /// Heartbeats an agent may miss before it is marked lost.
    #[arg(long, default_value_t = 5)]
    max_missed_heartbeats: u32,
    /// Period of the full allocation cycle (cycles also run when resources free up).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    allocation_interval: Duration,
    /// How often frameworks get a HEARTBEAT event.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    framework_heartbeat_interval: Duration,
    /// Rescind offers not answered within this (e.g. 30s). Default: offers stand.
    #[arg(long, value_parser = parse_duration)]
    offer_timeout: Option<Duration>,
    /// Free resources smaller than all of these are not offered.
    #[arg(long, default_value = "cpus:0.01;mem:32", value_parser = parse_resources)]
    min_allocatable_resources: agora_core::Resources,
    /// Who may reserve for which role: 'ROLE=PRINCIPAL,PRINCIPAL;ROLE=*'. Default: any
    /// framework with a principal, for the roles of its offers.
    #[arg(long, value_parser = parse_acl)]
    reserve_acl: Option<std::collections::HashMap<String, Vec<String>>>,
    /// Where the master keeps its blob store (Wasm modules, bundle files). Without it, the
    /// master stores no blobs.
    #[arg(long, env = "AGORA_MASTER_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Largest blob the store takes, in MiB.
    #[arg(long, default_value_t = 1024)]
    max_blob_size: u64,
    /// Bearer tokens of frameworks and operators: a file of `PRINCIPAL sha256:HEX` lines
    /// (`agora token create` writes them). With tokens or TLS, every framework and operator
    /// call needs a principal.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// What each principal may do: an ACL file (TOML; see `agora acl check`). Once given,
    /// what no rule allows is denied.
    #[arg(long)]
    acls: Option<PathBuf>,
    /// This master's id in its group (see --peers).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Every master of the group, this one included: '1=HOST:PORT,2=HOST:PORT,3=HOST:PORT'
    /// (a group of 1, 3 or 5), each at the address clients reach it on. The masters
    /// replicate the registry on a port of its own, two above that one (5052 for 5050), or
    /// as given: '1=HOST:PORT/RAFT_PORT'. Without --peers, this master is a group of one;
    /// with or without, the registry is kept under --work-dir.
    #[arg(long, value_parser = parse_peers)]
    peers: Option<std::collections::BTreeMap<u64, agora_master::Peer>>,
    /// After a failover, how long known agents have to register again before they are
    /// marked unreachable.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    agent_reregister_timeout: Duration,
    /// How often the leader heartbeats the other masters.
    #[arg(long, default_value = "100ms", value_parser = parse_duration, hide = true)]
    raft_heartbeat: Duration,
    /// The shortest a follower waits after the leader was last heard before it stands for
    /// election (about twice this in all; later members by id wait a step longer).
    #[arg(long, default_value = "500ms", value_parser = parse_duration, hide = true)]
    raft_election_timeout: Duration,
    /// Registry entries between snapshots (the log is compacted behind each).
    #[arg(long, default_value_t = 5000, hide = true)]
    registry_snapshot_every: u64,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Bounds per caller (its principal, or its address without authentication); 0 turns one
/// off. Calls past one are refused with RESOURCE_EXHAUSTED (HTTP 429 or 413) naming it.
#[derive(Args)]
struct LimitArgs {
    /// Calls a second a caller may make, sustained.
    #[arg(long, default_value_t = agora_master::limits::Limits::default().call_rate)]
    max_call_rate: u32,
    /// Calls a caller may make at once before --max-call-rate applies.
    #[arg(long, default_value_t = agora_master::limits::Limits::default().call_burst)]
    max_call_burst: u32,
    /// Framework subscriptions a caller may hold at once.
    #[arg(long, default_value_t = agora_master::limits::Limits::default().subscriptions)]
    max_subscriptions_per_principal: usize,
    /// Tasks the master holds for one principal's frameworks together.
    #[arg(long, default_value_t = agora_master::limits::Limits::default().tasks)]
    max_tasks_per_principal: usize,
    /// Outstanding offers one principal's frameworks may hold together; the rest go to
    /// other frameworks.
    #[arg(long, default_value_t = agora_master::limits::Limits::default().offers)]
    max_offers_per_principal: usize,
    /// Blob-store bytes one principal's uploads may hold, in MiB.
    #[arg(long, default_value_t = agora_master::limits::Limits::default().blob_bytes >> 20)]
    max_blob_mib_per_principal: u64,
    /// How long a new connection has to finish its TLS handshake (with TLS) and send its
    /// first bytes before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    header_timeout: Duration,
}

impl LimitArgs {
    fn limits(&self) -> agora_master::limits::Limits {
        agora_master::limits::Limits {
            call_rate: self.max_call_rate,
            call_burst: self.max_call_burst,
            subscriptions: self.max_subscriptions_per_principal,
            tasks: self.max_tasks_per_principal,
            offers: self.max_offers_per_principal,
            blob_bytes: self.max_blob_mib_per_principal << 20,
            header_timeout: self.header_timeout,
        }
    }
}

/// A server's TLS (`agora cert` makes the files).
#[derive(Args)]
struct TlsArgs {
    /// Serve (and call other masters or agents) over TLS with this certificate (PEM).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The certificate's key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The cluster CA: callers' certificates are verified against it.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Listen beyond loopback without TLS: anyone who reaches the port is served in the
    /// clear, unauthenticated (a warning at every start).
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    /// Refuses to serve `listen` beyond loopback in the clear unless told `--insecure`.
    fn check_exposure(&self, what: &str, listen: SocketAddr) -> anyhow::Result<()> {
        if listen.ip().is_loopback() || self.tls_cert.is_some() {
            return Ok(());
        }
        if self.insecure {
            tracing::warn!(%listen, "the {what} serves a non-loopback address without TLS or authentication (--insecure): anyone who reaches it can use it");
            return Ok(());
        }
        anyhow::bail!(
            "refusing to serve {listen} without TLS: beyond loopback the {what} needs --tls-cert, --tls-key and --tls-ca (see `agora cert`), or --insecure to serve it in the clear anyway"
        )
    }

    fn load(&self) -> anyhow::Result<Option<agora_proto::tls::ServerTls>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(ca)) => Ok(Some(agora_proto::tls::ServerTls::load(c, k, ca)?)),
            _ => Ok(None),
        }
    }
}

/// Parses `1=HOST:PORT,2=HOST:PORT[/RAFT_PORT]`.
fn parse_peers(s: &str) -> Result<std::collections::BTreeMap<u64, agora_master::Peer>, String> {
    let mut out = std::collections::BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?}: write ID=HOST:PORT or ID=HOST:PORT/RAFT_PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: the id must be a number"))?;
        let peer = agora_master::Peer::parse(addr).map_err(|e| format!("master {id}: {e}"))?;
        if out.insert(id, peer).is_some() {
            return Err(format!("master id {id} is given twice"));
        }
    }
    if ![1, 3, 5].contains(&out.len()) {
        return Err(format!(
            "{} masters given; a group has 1, 3 or 5 (an even number tolerates no more failures than one fewer)",
            out.len()
        ));
    }
    Ok(out)
}

impl MasterArgs {
    pub fn config(&self) -> agora_master::MasterConfig {
        agora_master::MasterConfig {
            agent_heartbeat_interval: self.agent_heartbeat_interval,
            max_missed_heartbeats: self.max_missed_heartbeats,
            allocation_interval: self.allocation_interval,
            framework_heartbeat_interval: self.framework_heartbeat_interval,
            offer_timeout: self.offer_timeout,
            min_allocatable: self.min_allocatable_resources.clone(),
            reservers: self.reserve_acl.clone().unwrap_or_default(),
            work_dir: self.work_dir.clone(),
            max_blob_bytes: self.max_blob_size << 20,
            group_id: self.id,
            peers: self.peers.clone().unwrap_or_default(),
            agent_reregister_timeout: self.agent_reregister_timeout,
            raft_heartbeat: self.raft_heartbeat,
            raft_election_timeout: self.raft_election_timeout,
            registry_snapshot_every: self.registry_snapshot_every,
            limits: self.limits.limits(),
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct AgentArgs {
    /// The master's address, or the masters of a group: 'HOST:PORT,HOST:PORT,HOST:PORT'
    /// (the leader among them is found, and followed when it changes).
    #[arg(long, env = "AGORA_MASTER", default_value = "127.0.0.1:5050")]
    master: String,
    /// TLS: an agent certificate of the cluster CA, presented to the masters (mutual TLS)
    /// and served to the agent's own callers.
    #[command(flatten)]
    tls: TlsArgs,
    /// Address to serve the agent's Sandbox and Executor APIs on. Keep it across restarts:
    /// the executors a restarted agent re-attaches to dial it.
    #[arg(long, default_value = "127.0.0.1:5051")]
    listen: SocketAddr,
    /// Address clients should use for the Sandbox API (default: the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for task sandboxes.
    #[arg(long, env = "AGORA_WORK_DIR", default_value = "/var/lib/agora/agent")]
    work_dir: PathBuf,
    /// Resources to offer, replacing detected ones by name, e.g. 'cpus:2;mem:1024;ports:[31000-32000]'.
    #[arg(long, value_parser = parse_resources)]
    resources: Option<agora_core::Resources>,
    /// Attributes, e.g. 'rack:r1;zone:a'.
    #[arg(long, value_parser = parse_attributes)]
    attributes: Option<Vec<agora_core::Attribute>>,
    /// The agent's host name (default: the machine's).
    #[arg(long)]
    hostname: Option<String>,
    /// Where cgroups are mounted; an empty directory runs native tasks without cgroups.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// The agent's cgroup, under which each container gets one (two agents on one host
    /// need different ones: each removes what it finds there at start).
    #[arg(long, default_value = "agora")]
    cgroup_parent: String,
    /// Cap native tasks' CPU time at their cpus (CFS quota / cpu.max), not only weight it.
    #[arg(long)]
    cgroups_enable_cfs: bool,
    /// pids.max of each native task's cgroup.
    #[arg(long, default_value_t = 4096)]
    pids_max: u64,
    /// Rotate native tasks' stdout/stderr at this many bytes (0: no rotation, the files
    /// grow without bound).
    #[arg(long, default_value_t = 10 << 20)]
    log_max_bytes: u64,
    /// Rotated log files kept per stream (a stream holds at most log-max-bytes × (this + 1)).
    #[arg(long, default_value_t = 2)]
    log_keep: usize,
    /// Remove a finished task's or executor's sandbox this long after it ended (sooner as
    /// the disk fills; see --gc-disk-headroom).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    gc_delay: Duration,
    /// Share of the work directory's disk to keep free, 0 to 1: the GC delay shrinks as
    /// gc-delay × max(0, 1 − headroom − disk usage).
    #[arg(long, default_value_t = 0.1, value_parser = parse_fraction)]
    gc_disk_headroom: f64,
    /// How often the work directory's disk usage is checked for the GC.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    disk_watch_interval: Duration,
    /// How often native tasks' sandboxes are measured against their `disk` resource (a task
    /// over it fails with REASON_CONTAINER_LIMITATION_DISK); 0 turns enforcement off.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    container_disk_watch_interval: Duration,
    /// Most MiB of Wasm modules the agent's module store keeps (least recently used go
    /// first, never one in use).
    #[arg(long, default_value_t = 1024)]
    module_store_size: u64,
    /// Most MiB of compiled Wasm modules the disk cache keeps (least recently used go
    /// first, never one in use).
    #[arg(long, default_value_t = 2048)]
    wasm_cache_size: u64,
    /// Run native tasks as the user they name, or --default-user (false: as the agent's
    /// user, which needs --allow-root-tasks when that is root).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    switch_user: bool,
    /// The user of native tasks and custom executors that name none (when the agent runs
    /// as root and can switch users).
    #[arg(long, env = "AGORA_DEFAULT_USER", default_value = "nobody")]
    default_user: String,
    /// Let native tasks and custom executors run as root (uid 0, by any name). Default:
    /// such tasks end in TASK_ERROR.
    #[arg(long)]
    allow_root_tasks: bool,
    /// Start native tasks and custom executors without the default seccomp filter and
    /// `no_new_privs` (they deny module loading, kexec, keyrings, ptrace, mounts,
    /// namespaces and the like; see the README).
    #[arg(long)]
    no_seccomp: bool,
    /// Most MiB the fetch cache keeps (least recently used artifacts go first).
    #[arg(long, default_value_t = 2048)]
    fetcher_cache_size: u64,
    /// Longest one fetch may take.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    fetcher_timeout: Duration,
    /// A directory whose files tasks may name by file:// URI (the fetcher copies them as
    /// the agent's user). Repeatable. Default: none, and file:// is refused.
    #[arg(long = "fetcher-file-root")]
    fetcher_file_roots: Vec<PathBuf>,
    /// Kill a custom executor that has not subscribed within this.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    executor_registration_timeout: Duration,
    /// After a restart, kill an executor of the previous agent that has not subscribed
    /// again within this.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    executor_reregistration_timeout: Duration,
    /// Shut down a custom executor that has had no tasks for this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    executor_idle_timeout: Duration,
    /// A directory Wasm tasks may be granted, NAME=PATH (add :ro to lend it read-only).
    /// Repeatable.
    #[arg(long = "wasm-volume", value_parser = parse_volume)]
    wasm_volumes: Vec<(String, agora_agent::Volume)>,
    /// An environment variable of the agent's that Wasm tasks may be granted (a trailing *
    /// matches a prefix). Repeatable.
    #[arg(long = "wasm-allow-env")]
    wasm_allow_env: Vec<String>,
    /// Addresses Wasm tasks may be granted connections to, HOST:PORT (an IP, a CIDR block,
    /// localhost or *; a port, a range or *). Repeatable. Default: none.
    #[arg(long = "wasm-allow-connect", value_parser = parse_pattern)]
    wasm_allow_connect: Vec<agora_executor_wasm::AddrPattern>,
    /// Refuse Wasm tasks that ask for the real wall clock.
    #[arg(long)]
    wasm_deny_wall_clock: bool,
    /// Refuse Wasm tasks that ask for OS randomness.
    #[arg(long)]
    wasm_deny_random: bool,
    /// Instance slots of each Wasm executor's pool (default: one per 16 MiB of the agent's
    /// memory, 16 to 1,000).
    #[arg(long)]
    wasm_pool_instances: Option<u32>,
    /// Run Wasm tasks in the agent's own process instead of per-framework executors.
    #[arg(long)]
    wasm_in_process: bool,
    /// What to do with what a previous agent on this work directory left: `reconnect`
    /// takes its id and re-attaches to its tasks and executors; `cleanup` kills them all
    /// and starts as a new agent.
    #[arg(long, value_enum, default_value_t = RecoverArg::Reconnect)]
    recover: RecoverArg,
    /// What happens to the tasks when the agent stops (SIGTERM, SIGINT): `leave` them
    /// running for the next agent on this work directory, or `kill` them.
    #[arg(long, value_enum, default_value_t = OnExitArg::Leave)]
    on_exit: OnExitArg,
    /// How long an executor waits for its restarted agent before it gives up.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    executor_recovery_timeout: Duration,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RecoverArg {
    Reconnect,
    Cleanup,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnExitArg {
    Leave,
    Kill,
}

fn parse_volume(s: &str) -> Result<(String, agora_agent::Volume), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=PATH[:ro]"))?;
    let (path, read_only) = match path.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (path, false),
    };
    let path = PathBuf::from(path);
    if name.is_empty() || !path.is_absolute() {
        return Err(format!("{s:?}: NAME=PATH with an absolute PATH"));
    }
    Ok((name.to_owned(), agora_agent::Volume { path, read_only }))
}

fn parse_pattern(s: &str) -> Result<agora_executor_wasm::AddrPattern, String> {
    s.parse()
        .map_err(|e: agora_executor_wasm::caps::PatternError| e.to_string())
}

#[derive(Args)]
pub struct QueryArgs {
    /// The master's address, or the masters of a group: 'HOST:PORT,HOST:PORT,HOST:PORT'
    /// (the leader among them is found, and followed when it changes).
    #[arg(long, env = "AGORA_MASTER", default_value = "127.0.0.1:5050")]
    master: String,
}

#[derive(Args)]
struct TasksArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// Include finished tasks.
    #[arg(long)]
    all: bool,
    /// Add each running task's usage now (CPU seconds, memory, peak, processes), read from
    /// its agent.
    #[arg(long)]
    usage: bool,
}

/// `5s`, `250ms`, `2m`, or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 5s or 250ms"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A share from 0 to 1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

pub fn parse_resources(s: &str) -> Result<agora_core::Resources, String> {
    agora_core::parse_resources(s).map_err(|e| e.to_string())
}

/// `eng=alice,bob;ops=*`.
fn parse_acl(s: &str) -> Result<std::collections::HashMap<String, Vec<String>>, String> {
    let mut acl = std::collections::HashMap::new();
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (role, principals) = entry
            .split_once('=')
            .ok_or_else(|| format!("{entry:?}: expected ROLE=PRINCIPAL[,PRINCIPAL]"))?;
        agora_core::resources::validate_role(role.trim()).map_err(|e| e.to_string())?;
        let principals: Vec<String> = principals
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        if principals.is_empty() {
            return Err(format!("{entry:?}: no principals"));
        }
        acl.insert(role.trim().to_owned(), principals);
    }
    Ok(acl)
}

fn parse_attributes(s: &str) -> Result<Vec<agora_core::Attribute>, String> {
    agora_core::parse_attributes(s).map_err(|e| e.to_string())
}

fn bundle(action: BundleAction) -> anyhow::Result<()> {
    match action {
        BundleAction::Build { dir, output } => {
            let b = agora_sdk::bundle::Bundle::open(&dir)
                .with_context(|| format!("bundle {}", dir.display()))?;
            let out =
                output.unwrap_or_else(|| PathBuf::from(format!("{}.agora.tgz", b.manifest.name)));
            b.archive(&out)?;
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            println!("{} ({size} bytes)", out.display());
        }
        BundleAction::Check { bundle } => {
            let b = agora_sdk::bundle::Bundle::open(&bundle)
                .with_context(|| format!("bundle {}", bundle.display()))?;
            let m = &b.manifest;
            println!(
                "{}: {} task, {}, {}",
                m.name,
                match m.kind {
                    agora_sdk::bundle::Kind::Wasm => "wasm",
                    agora_sdk::bundle::Kind::Native => "native",
                },
                m.resources()?,
                m.module
                    .as_deref()
                    .or(m.command.as_deref())
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// A progress bar for an upload on stderr, drawn only once it is large (4 MiB) and only on
/// a terminal.
pub fn upload_bar(what: &str) -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("uploading {what}"));
    let b = bar.clone();
    // Small uploads end before a bar would be worth drawing.
    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        if !b.is_finished() && b.length().unwrap_or(0) >= 4 << 20 {
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    });
    bar
}

/// Uploads `file` to the master's blob store with a progress bar on stderr (for files
/// large enough to need one); returns its digest.
pub async fn upload(master: &str, file: &std::path::Path) -> anyhow::Result<String> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let bar = upload_bar(&file.file_name().unwrap_or_default().to_string_lossy());
    bar.set_length(size);
    let b = bar.clone();
    let digest = agora_sdk::blob::upload_file(master, file, move |sent, _| b.set_position(sent))
        .await
        .with_context(|| format!("uploading {} to {master}", file.display()))?;
    bar.finish_and_clear();
    Ok(digest)
}

/// `host:port` becomes `http://host:port`; in a list of masters, each does.
pub fn master_url(addr: &str) -> String {
    addr.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(agora_proto::leader::with_scheme)
        .collect::<Vec<_>>()
        .join(",")
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AGORA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// Reads `tls`'s files again on every SIGHUP (a renewed certificate, a rotated CA): new
/// connections are served and dialled with them; a reading that does not make a
/// configuration is reported and changes nothing.
fn reload_on_hangup(tls: &agora_proto::tls::ServerTls, what: &'static str) -> anyhow::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let tls = tls.clone();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("{what}: TLS certificate, key and CA read again"),
                Err(e) => {
                    tracing::error!(error = %e, "{what}: TLS not reloaded; going on with what it had");
                }
            }
        }
    });
    Ok(())
}

async fn master(args: MasterArgs) -> anyhow::Result<()> {
    args.tls.check_exposure("master", args.listen)?;
    let mut config = args.config();
    config.tls = args.tls.load()?;
    if let Some(tls) = &config.tls {
        reload_on_hangup(tls, "master")?;
    }
    if let Some(path) = &args.tokens {
        config.tokens = agora_master::auth::Tokens::load(path).map_err(anyhow::Error::msg)?;
    }
    if let Some(path) = &args.acls {
        config.acls = Some(std::sync::Arc::new(
            agora_master::acl::Acls::load(path).map_err(anyhow::Error::msg)?,
        ));
    }
    let listener = agora_proto::listen::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!(
        "agora master listening on {}://{} (gRPC, GET /health)",
        if config.tls.is_some() {
            "https"
        } else {
            "http"
        },
        listener.local_addr()?
    );
    agora_master::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let listener = agora_proto::listen::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    args.tls.check_exposure("agent", args.listen)?;
    let mut config = agora_agent::AgentConfig::new(master_url(&args.master), &args.work_dir);
    config.tls = args.tls.load()?;
    if let Some(tls) = &config.tls {
        reload_on_hangup(tls, "agent")?;
    }
    config.resources = args.resources;
    config.attributes = args.attributes.unwrap_or_default();
    config.hostname = args.hostname;
    config.advertise = args.advertise;
    config.native.cgroup_root = args.cgroup_root;
    config.native.cgroup_parent = args.cgroup_parent;
    config.native.cgroups_enable_cfs = args.cgroups_enable_cfs;
    config.native.pids_max = Some(args.pids_max);
    config.native.log_max_bytes = (args.log_max_bytes > 0).then_some(args.log_max_bytes);
    config.native.log_keep = args.log_keep;
    config.native.disk_watch_interval = (!args.container_disk_watch_interval.is_zero())
        .then_some(args.container_disk_watch_interval);
    config.gc = agora_agent::gc::GcConfig {
        delay: args.gc_delay,
        disk_headroom: args.gc_disk_headroom,
        disk_watch_interval: args.disk_watch_interval,
    };
    config.module_store_max_bytes = Some(args.module_store_size.saturating_mul(1 << 20));
    config.wasm.cache_max_bytes = Some(args.wasm_cache_size.saturating_mul(1 << 20));
    config.native.switch_user = args.switch_user;
    config.native.default_user = args.default_user;
    config.native.allow_root = args.allow_root_tasks;
    config.native.seccomp = !args.no_seccomp;
    config.fetcher.cache_max_bytes = args.fetcher_cache_size << 20;
    config.fetcher.timeout = args.fetcher_timeout;
    config.fetcher.file_roots = args
        .fetcher_file_roots
        .iter()
        .map(|r| {
            std::fs::canonicalize(r).with_context(|| format!("--fetcher-file-root {}", r.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    config.executors.registration_timeout = args.executor_registration_timeout;
    config.executors.reregistration_timeout = args.executor_reregistration_timeout;
    config.executors.idle_timeout = args.executor_idle_timeout;
    config.executors.recovery_timeout = args.executor_recovery_timeout;
    config.recover = match args.recover {
        RecoverArg::Reconnect => agora_agent::Recover::Reconnect,
        RecoverArg::Cleanup => agora_agent::Recover::Cleanup,
    };
    config.on_exit = match args.on_exit {
        OnExitArg::Leave => agora_agent::actor::OnExit::Leave,
        OnExitArg::Kill => agora_agent::actor::OnExit::Kill,
    };
    config.wasm_policy.volumes = args.wasm_volumes.into_iter().collect();
    config.wasm_policy.allow_env = args.wasm_allow_env;
    config.wasm_policy.allow_connect = args.wasm_allow_connect;
    config.wasm_policy.allow_wall_clock = !args.wasm_deny_wall_clock;
    config.wasm_policy.allow_random = !args.wasm_deny_random;
    config.wasm.pool_instances = args.wasm_pool_instances;
    if args.wasm_in_process {
        config.wasm_executor = None;
    }
    eprintln!(
        "agora agent serving sandboxes on http://{}; master {}",
        listener.local_addr()?,
        config.master
    );
    agora_agent::run(listener, config, shutdown_signal()).await?;
    Ok(())
}

/// The hidden `__init` subcommand: the init of a native task's PID namespace. Handled
/// before any thread starts, because it forks.
const INIT_SUBCOMMAND: &str = "__init";

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == INIT_SUBCOMMAND) {
        agora_executor_native::init::main(&args[2..]);
    }
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(async_main()),
        Err(e) => {
            eprintln!("agora: starting the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn async_main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(
        cli.command,
        Command::Run(_)
            | Command::Agents(_)
            | Command::Tasks(_)
            | Command::Roles(_)
            | Command::Quota { .. }
            | Command::Weight { .. }
            | Command::Executor
            | Command::WasmExecutor
            | Command::Blob { .. }
            | Command::Bundle { .. }
            | Command::Cert { .. }
            | Command::Token { .. }
            | Command::Acl { .. }
    );
    init_tracing(if quiet { "warn" } else { "info" });
    let result = match cli.command {
        Command::Dev(args) => dev::dev(args).await,
        Command::Master(args) => master(args).await,
        Command::Agent(args) => agent(*args).await,
        Command::Run(args) => return run::run(args).await,
        Command::Agents(args) => tables::agents(&args).await,
        Command::Tasks(args) => tables::tasks(&args.query, args.all, args.usage).await,
        Command::Roles(args) => tables::roles(&args).await,
        Command::Quota { action } => roles::quota(action).await,
        Command::Weight { action } => roles::weight(action).await,
        Command::Executor => executor::executor().await,
        Command::WasmExecutor => wasm_executor::wasm_executor().await,
        Command::Blob {
            action: BlobAction::Put { file, query },
        } => upload(&master_url(&query.master), &file)
            .await
            .map(|d| println!("{d}")),
        Command::Bundle { action } => bundle(action),
        Command::Cert { action } => cert::cert(action),
        Command::Token { action } => cert::token(action),
        Command::Acl { action } => cert::acl(action),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agora: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn peers_parse() {
        let p = parse_peers("1=a:1, 2=b:2/7,3=c:3").unwrap();
        assert_eq!(p[&1].raft_addr, "a:3");
        assert_eq!(
            (p[&2].addr.as_str(), p[&2].raft_addr.as_str()),
            ("b:2", "b:7")
        );
        assert!(
            parse_peers("1=a:1,2=b:2")
                .unwrap_err()
                .contains("1, 3 or 5")
        );
        assert!(
            parse_peers("1=a:1,1=b:2,3=c:3")
                .unwrap_err()
                .contains("twice")
        );
        assert!(parse_peers("x=a:1").is_err());
        assert!(parse_peers("1=http://a:1").is_err());
    }

    #[test]
    fn master_addresses_get_a_scheme() {
        assert_eq!(master_url("127.0.0.1:5050"), "http://127.0.0.1:5050");
        assert_eq!(master_url("http://m:1"), "http://m:1");
        assert_eq!(
            master_url("a:1, http://b:2,c:3"),
            "http://a:1,http://b:2,http://c:3"
        );
    }
}
