//! The Agora agent: offers its machine's resources to a master and runs the tasks launched on
//! them.
//!
//! [`run`] registers with the master (and re-registers after any break, with its id and
//! tasks), heartbeats, runs each task through a [`Containerizer`] in a sandbox directory of
//! its own, reports TASK_STARTING → TASK_RUNNING → a terminal state with exit codes and
//! reasons, retries each status update until it is acknowledged, and serves the Sandbox API
//! so clients can read a task's stdout and stderr.
//!
//! # Layout
//!
//! - [`containerizer`]: the [`Containerizer`] trait and what containerizers share.
//! - [`wasm`]: the Wasm containerizer (in the framework's Wasm executor, or in process) and
//!   the capability policy.
//! - [`native`]: the native containerizer (`command` tasks as processes in cgroups).
//! - [`executor`]: custom executors and the Executor API they use.
//! - [`fetcher`]: tasks' URIs into their sandboxes, through a bounded cache.
//! - [`state`]: the agent's rules as a pure state machine (tasks, status updates).
//! - [`actor`]: the owner task: carries out the state machine's commands.
//! - [`checkpoint`]: what a restarted agent recovers from.
//! - [`updates`]: a task's status updates, one in flight at a time (pure).
//! - [`link`]: the connection to the master, with reconnect.
//! - [`sandbox`]: sandbox directories and the Sandbox API.
//! - [`gc`]: finished sandboxes removed after a delay, sooner as the disk fills.
//! - [`disk`]: sandbox usage, the `disk` resource enforced, the module store's pins.
//! - [`resources`]: detecting and overriding the resources offered.

pub mod actor;
pub mod checkpoint;
pub mod containerizer;
pub mod disk;
pub mod executor;
pub mod fetcher;
pub mod gc;
pub mod link;
pub mod mesos;
pub mod native;
pub mod resources;
pub mod sandbox;
pub mod state;
pub mod updates;
pub mod wasm;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agora_core::{Attribute, Resources};
use agora_executor_wasm::{WasmConfig, WasmRuntime};
use agora_proto::{attributes_to_proto, resources_to_proto, v1};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub use containerizer::{Container, Containerizer, LaunchSpec, Termination};
pub use executor::{ExecutorConfig, ExecutorContainerizer};
pub use fetcher::{FetchStats, Fetcher, FetcherConfig};
pub use native::{NativeConfig, NativeContainerizer};
pub use wasm::{Volume, WasmContainerizer, WasmPolicy};

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The master's address, e.g. `http://127.0.0.1:5050` (the scheme may be left out), or
    /// the masters of a group, comma-separated: `a:5050,b:5050,c:5050`. The agent links to
    /// the leader among them, and fetches blobs from whichever has them.
    pub master: String,
    /// Where sandboxes live.
    pub work_dir: PathBuf,
    /// The name the agent gives itself. Default: the machine's host name.
    pub hostname: Option<String>,
    /// Resources to offer; each replaces the detected resource of its name.
    pub resources: Option<Resources>,
    pub attributes: Vec<Attribute>,
    /// The address clients use for the Sandbox API. Default: `http://<listener address>`.
    pub advertise: Option<String>,
    /// The engine of Wasm tasks run in the agent's process (and the cache directory and
    /// pool size every Wasm executor of the agent uses).
    pub wasm: WasmConfig,
    /// What Wasm tasks may be granted.
    pub wasm_policy: WasmPolicy,
    /// The command that runs a framework's Wasm executor, e.g. `["/usr/bin/agora",
    /// "__wasm-executor"]`. Default: this program when it is `agora`. Without one, Wasm
    /// tasks run in the agent's own process.
    pub wasm_executor: Option<Vec<std::ffi::OsString>>,
    /// How `command` tasks are contained.
    pub native: native::NativeConfig,
    /// The fetcher and its cache (under `<work_dir>/fetch-cache`).
    pub fetcher: fetcher::FetcherConfig,
    /// Timing of custom executors.
    pub executors: executor::ExecutorConfig,
    /// TLS: the agent's certificate (an agent certificate of the cluster CA), its key and
    /// the CA. It links to the masters over mutual TLS with it, and serves its own API over
    /// TLS. Default none.
    pub tls: Option<agora_proto::tls::ServerTls>,
    /// First retry of an unacknowledged status update. Default 10 s (doubling to 10 min).
    pub status_retry: Duration,
    /// First wait after a failed connection to the master. Default 100 ms (doubling to 10 s).
    pub reconnect_min: Duration,
    /// When finished sandboxes are removed.
    pub gc: gc::GcConfig,
    /// Most bytes of Wasm modules kept in `<work_dir>/modules` (least recently used go
    /// first, never one in use). Default 1 GiB; `None`: no bound. The compiled-module
    /// cache's bound is `wasm.cache_max_bytes` (default here 2 GiB).
    pub module_store_max_bytes: Option<u64>,
    /// What to do with what a previous agent on this work directory left running.
    pub recover: Recover,
    /// What to do with the tasks when this agent stops. Default: kill them.
    pub on_exit: actor::OnExit,
}

/// What a starting agent does with a previous run's checkpoint and containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recover {
    /// Take them over: the same agent id, its tasks re-attached (the default).
    #[default]
    Reconnect,
    /// Kill everything the previous agent left and start as a new agent.
    Cleanup,
}

/// Default bound of the module store, in bytes.
pub const DEFAULT_MODULE_STORE_BYTES: u64 = 1 << 30;
/// Default bound of the compiled-module disk cache, in bytes (artifacts are several times
/// their modules' size).
pub const DEFAULT_WASM_CACHE_BYTES: u64 = 2 << 30;

impl AgentConfig {
    pub fn new(master: impl Into<String>, work_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            master: master.into(),
            work_dir: work_dir.into(),
            hostname: None,
            resources: None,
            attributes: Vec::new(),
            advertise: None,
            wasm: WasmConfig {
                cache_max_bytes: Some(DEFAULT_WASM_CACHE_BYTES),
                ..WasmConfig::default()
            },
            wasm_policy: WasmPolicy::default(),
            wasm_executor: std::env::current_exe()
                .ok()
                .filter(|p| p.file_name().is_some_and(|n| n == "agora"))
                .map(|p| vec![p.into_os_string(), "__wasm-executor".into()]),
            native: native::NativeConfig::default(),
            fetcher: fetcher::FetcherConfig::default(),
            executors: executor::ExecutorConfig::default(),
            tls: None,
            status_retry: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            gc: gc::GcConfig::default(),
            module_store_max_bytes: Some(DEFAULT_MODULE_STORE_BYTES),
            recover: Recover::Reconnect,
            on_exit: actor::OnExit::Kill,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("preparing the work directory {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Wasm(#[from] agora_executor_wasm::WasmError),
    #[error("serving the sandbox API: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the listener has no local address: {0}")]
    Listener(std::io::Error),
    #[error("preparing the fetch cache: {0}")]
    Fetcher(std::io::Error),
    #[error("preparing the module store: {0}")]
    Modules(std::io::Error),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The configuration differs from the one the checkpoint was made with.
    #[error(
        "this agent's configuration differs from the one its work directory {work_dir} was checkpointed with: {diff}. Restore the old configuration to recover its tasks, or start with --recover=cleanup to end them and register as a new agent"
    )]
    Mismatch { work_dir: PathBuf, diff: String },
    /// One of the agent's own tasks ended while the agent was meant to be running: the
    /// agent stops (its process exits non-zero) rather than carry on half alive.
    #[error("the agent's {task} ended unexpectedly: {cause}")]
    Died { task: &'static str, cause: String },
}

/// The run directories of the tasks and executors of `saved` that may still run.
fn live_sandboxes(
    saved: &checkpoint::Saved,
    work_dir: &std::path::Path,
) -> std::collections::HashSet<PathBuf> {
    // A task in an executor has no process of its own; its sandbox is its latest run's.
    let in_executors = saved
        .tasks
        .iter()
        .filter(|(_, t)| {
            !t.state.is_terminal() && matches!(t.attachment, Some(state::Attachment::Executor(_)))
        })
        .filter_map(|((fw, task), _)| sandbox::latest_run_dir(work_dir, fw, task));
    left_running(saved)
        .map(|p| p.sandbox.clone())
        .chain(in_executors)
        .collect()
}

/// The supervised processes of `saved` that may still run: its unfinished tasks' and its
/// executors'.
fn left_running(saved: &checkpoint::Saved) -> impl Iterator<Item = &state::ProcessRecord> {
    let tasks = saved.tasks.iter().filter_map(|(_, t)| match &t.attachment {
        Some(state::Attachment::Process(p)) if !t.state.is_terminal() => Some(p),
        _ => None,
    });
    tasks.chain(
        saved
            .executors
            .iter()
            .filter_map(|(_, e)| e.process.as_ref()),
    )
}

/// What of a previous run the agent takes over: all of it (`--recover=reconnect`, when the
/// configuration matches), or nothing once everything it left is ended (`cleanup`).
/// Containers under the agent's cgroup that nothing recovered names are removed either way.
///
/// # Errors
/// When the configuration differs from the checkpoint's, or the checkpoint cannot be wiped.
async fn recovery_plan(
    config: &AgentConfig,
    mut saved: checkpoint::Saved,
    info: &v1::AgentInfo,
    work_dir: &std::path::Path,
    native: &native::NativeContainerizer,
    checkpoint: &checkpoint::Checkpoint,
) -> Result<checkpoint::Saved, AgentError> {
    let processes = |saved: &checkpoint::Saved| -> Vec<state::ProcessRecord> {
        left_running(saved).cloned().collect()
    };
    match config.recover {
        Recover::Cleanup => {
            if !saved.is_empty() {
                let procs = processes(&saved);
                tracing::warn!(
                    tasks = saved.tasks.len(),
                    processes = procs.len(),
                    "--recover=cleanup: ending what the previous agent left and starting as a new agent"
                );
                for p in &procs {
                    native.end(p).await;
                }
                checkpoint.wipe()?;
            }
            saved = checkpoint::Saved::default();
        }
        Recover::Reconnect => {
            let disk_detected = config
                .resources
                .as_ref()
                .is_none_or(|r| !r.iter().any(|r| r.name == "disk"));
            if let Some(diff) = saved.info.as_ref().and_then(|old| {
                checkpoint::mismatch(old, info, disk_detected, !saved.executors.is_empty())
            }) {
                return Err(AgentError::Mismatch {
                    work_dir: work_dir.to_owned(),
                    diff,
                });
            }
        }
    }
    let keep = processes(&saved)
        .into_iter()
        .filter_map(|p| p.cgroup)
        .collect();
    native.remove_leftovers(&keep);
    Ok(saved)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs an agent until `shutdown` resolves: its Sandbox API on `listener`, its link to the
/// master, its tasks. On shutdown the agent's tasks are killed.
///
/// # Errors
/// When the work directory cannot be prepared, wasmtime cannot start, or serving fails.
pub async fn run(
    listener: TcpListener,
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    serve(listener, config, shutdown, None).await
}

/// [`run`], handing the owner task's event sender to `tap` (tests inject faults with it).
async fn serve(
    listener: TcpListener,
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    tap: Option<tokio::sync::oneshot::Sender<mpsc::Sender<actor::Event>>>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.work_dir).map_err(|source| AgentError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    let work_dir =
        std::fs::canonicalize(&config.work_dir).map_err(|source| AgentError::WorkDir {
            path: config.work_dir.clone(),
            source,
        })?;
    let (checkpoint, saved) = match checkpoint::Checkpoint::open(&work_dir) {
        // Told to start afresh: a checkpoint that cannot be read is set aside, and every
        // container under the agent's cgroup is removed as a leftover.
        Err(checkpoint::CheckpointError::Damaged { path, detail })
            if config.recover == Recover::Cleanup =>
        {
            let aside = path.with_extension(format!("damaged-{}", std::process::id()));
            tracing::warn!(path = %path.display(), aside = %aside.display(), %detail, "--recover=cleanup: setting a checkpoint that cannot be read aside");
            std::fs::rename(&path, &aside).map_err(|source| AgentError::WorkDir {
                path: path.clone(),
                source,
            })?;
            checkpoint::Checkpoint::open(&work_dir)?
        }
        r => r?,
    };
    let checkpoint = Arc::new(checkpoint);
    let detected = resources::detect(&work_dir);
    let total = match &config.resources {
        Some(flags) => resources::merge(&detected, flags),
        None => detected,
    };
    let masters = link::masters(&config.master)?;
    let mut fetcher_config = config.fetcher.clone();
    fetcher_config.masters_tls = config
        .tls
        .as_ref()
        .map(agora_proto::tls::ServerTls::as_client);
    let fetcher = Fetcher::with_masters(
        work_dir.join("fetch-cache"),
        masters.clone(),
        fetcher_config,
    )
    .map_err(AgentError::Fetcher)?;
    let addr = listener.local_addr().map_err(AgentError::Listener)?;
    let endpoint = config.advertise.clone().unwrap_or_else(|| {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}")
    });
    let containers = containerizer::Containers::default();
    let (events_tx, events_rx) = mpsc::channel(16 * 1024);
    if let Some(tap) = tap {
        let _ = tap.send(events_tx.clone());
    }
    let native = Arc::new(native::NativeContainerizer::new(config.native.clone()));
    let mut executors_config = config.executors.clone();
    if let Some(tls) = &config.tls {
        executors_config.tls_ca = Some(tls.as_client().ca);
    }
    let executors = ExecutorContainerizer::new(
        native.clone(),
        Some(fetcher.clone()),
        work_dir.clone(),
        endpoint.clone(),
        executors_config,
        containers.clone(),
        events_tx.clone(),
    );
    // Stops when `run` returns.
    // The sandboxes of what this agent will re-attach to are not a previous agent's leftovers.
    let live = match config.recover {
        Recover::Reconnect => live_sandboxes(&saved, &work_dir),
        Recover::Cleanup => Default::default(),
    };
    let (gc, _collector) = gc::start(work_dir.clone(), config.gc.clone(), live).await;
    executors.collect_with(gc.clone());
    executors.checkpoint_with(checkpoint.clone());
    // Pool slots from the agent's memory: a slot per 16 MiB, at least 16, at most 1,000.
    let pool = config
        .wasm
        .pool_instances
        .unwrap_or_else(|| ((total.mem() / 16.0) as u32).clamp(16, 1000));
    let cache_dir = config
        .wasm
        .cache_dir
        .clone()
        .unwrap_or_else(|| work_dir.join("wasm-cache"));
    let mode = match &config.wasm_executor {
        Some(command) => {
            let mut wc = config.wasm.clone();
            wc.cache_dir = Some(cache_dir.clone());
            wc.pool_instances = None;
            wasm::WasmMode::Executor {
                executors: executors.clone(),
                command: command.clone(),
                pool_instances: Some(pool),
                compiler: WasmRuntime::new(wc)?,
            }
        }
        None => {
            let mut wc = config.wasm.clone();
            wc.cache_dir
                .get_or_insert_with(|| work_dir.join("wasm-cache"));
            wc.pool_instances = Some(pool);
            wasm::WasmMode::InProcess(WasmRuntime::new(wc)?)
        }
    };
    let wasm = Arc::new(
        WasmContainerizer::new(
            mode,
            Some(fetcher.clone()),
            config.wasm_policy.clone(),
            &work_dir,
            cache_dir,
        )
        .map_err(AgentError::Modules)?
        .with_module_store_bound(config.module_store_max_bytes)
        .with_disk_watch(config.native.disk_watch_interval),
    );
    // The first that supports a task runs it: a task naming an executor goes to it,
    // whatever its payload.
    let containerizers: Vec<Arc<dyn Containerizer>> =
        vec![Arc::new(executors.clone()), wasm.clone(), native.clone()];
    let own_hostname = config.hostname.clone().unwrap_or_else(hostname);
    let info = v1::AgentInfo {
        hostname: own_hostname.clone(),
        resources: resources_to_proto(&total),
        attributes: attributes_to_proto(&config.attributes),
        endpoint: endpoint.clone(),
        // Executors get the native isolation; saying it twice would say nothing new.
        isolation: containerizers
            .iter()
            .filter(|c| c.name() != "executor")
            .map(|c| c.isolation())
            .collect::<Vec<_>>()
            .join("+"),
    };
    tracing::info!(%endpoint, master = %config.master, resources = %total, work_dir = %work_dir.display(), "agent starting");
    let saved = recovery_plan(&config, saved, &info, &work_dir, &native, &checkpoint).await?;

    let metrics = {
        let (fetcher, executors) = (fetcher.clone(), executors.clone());
        let (gc, wasm) = (gc.clone(), wasm.clone());
        Arc::new(move || {
            let mut m: Vec<(String, f64)> = fetcher
                .stats()
                .metrics()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            m.push((
                "agora_agent_executors_running".into(),
                executors.running() as f64,
            ));
            m.extend(disk::metrics(&gc, &wasm));
            m
        })
    };
    let actor = actor::Actor::new(
        work_dir.clone(),
        info,
        containerizers,
        containers.clone(),
        Some(fetcher),
        actor::RetryPolicy {
            initial: config.status_retry,
            max: Duration::from_secs(600).max(config.status_retry),
        },
        events_tx.clone(),
    )
    .with_gc(gc)
    .with_checkpoint(checkpoint, config.on_exit);
    let mut actor = actor;
    let mut saved = saved;
    let in_executors = {
        let mut m: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
        for ((fw, task), t) in &saved.tasks {
            if let Some(state::Attachment::Executor(e)) = &t.attachment
                && !t.state.is_terminal()
                && let Ok(e) = agora_core::ExecutorId::new(e.clone())
            {
                let resources =
                    agora_proto::resources_from_proto(&t.info.resources).unwrap_or_default();
                m.entry((fw.clone(), e))
                    .or_default()
                    .push((task.clone(), resources));
            }
        }
        m
    };
    let frameworks: std::collections::HashMap<_, _> = saved.frameworks.iter().cloned().collect();
    executors.recover(
        std::mem::take(&mut saved.executors),
        saved.agent_id.as_ref(),
        &in_executors,
        &frameworks,
    );
    actor.recover(saved);
    let mut link = tokio::spawn(link::maintain(
        masters,
        link::Backoff {
            min: config.reconnect_min,
            max: Duration::from_secs(10).max(config.reconnect_min),
        },
        config.tls.clone(),
        events_tx,
    ));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = {
        let mut stop = stop_rx.clone();
        let mut routes = tonic::service::Routes::builder();
        routes
            .add_service(v1::sandbox_server::SandboxServer::new(
                sandbox::SandboxService {
                    work_dir,
                    containers,
                    metrics,
                    authenticate: config.tls.is_some(),
                },
            ))
            .add_service(v1::executor_server::ExecutorServer::new(
                executors.service(),
            ));
        let mut routes = routes.routes();
        *routes.axum_router_mut() =
            std::mem::take(routes.axum_router_mut()).merge(mesos::router(Arc::new(mesos::Front {
                service: executors.service(),
                hostname: own_hostname,
                port: addr.port(),
            })));
        // HTTP/1.1 too: Mesos executors speak it to `/api/v1/executor`.
        tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                agora_proto::listen::Incoming::maybe_tls(
                    listener,
                    agora_proto::listen::FIRST_BYTES_WITHIN,
                    config.tls.as_ref(),
                    false,
                ),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )
    };
    let mut server = tokio::spawn(server);
    // The owner task stops on `shutdown`, or when one of the others dies.
    let (fail_tx, mut fail_rx) = tokio::sync::watch::channel(false);
    let stop_actor = async move {
        tokio::select! {
            () = shutdown => {}
            _ = fail_rx.wait_for(|f| *f) => {}
        }
    };
    let mut actor = tokio::spawn(actor.run(events_rx, stop_actor));
    let died = |task: &'static str, cause: String| AgentError::Died { task, cause };
    let failure = tokio::select! {
        biased;
        r = &mut actor => Err(r),
        r = &mut server => Ok(match r {
            Ok(Ok(())) => died("sandbox server", "it stopped serving".into()),
            Ok(Err(e)) => AgentError::Serve(e),
            Err(e) => died("sandbox server", e.to_string()),
        }),
        r = &mut link => match r {
            // The link ends by itself only once the owner task has let go of its events.
            Ok(()) => Err((&mut actor).await),
            Err(e) => Ok(died("link to the master", e.to_string())),
        },
    };
    let failure = match failure {
        Ok(f) => f,
        // The owner task ended: on `shutdown`, when it could not checkpoint, or by panicking.
        Err(ended) => {
            link.abort();
            let _ = stop_tx.send(true);
            return match ended {
                Ok(Ok(())) => match server.await {
                    Ok(result) => result.map_err(AgentError::from),
                    Err(e) => Err(died("sandbox server", e.to_string())),
                },
                Ok(Err(e)) => Err(AgentError::Checkpoint(e)),
                Err(e) => Err(died("owner task", e.to_string())),
            };
        }
    };
    tracing::error!(error = %failure, "stopping the agent");
    // Its tasks are killed as at any shutdown, then the agent reports what failed.
    let _ = fail_tx.send(true);
    let _ = actor.await;
    link.abort();
    let _ = stop_tx.send(true);
    Err(failure)
}

#[cfg(test)]
mod supervision_tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_owner_stops_the_agent_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // No master: the link keeps retrying, which is fine here.
        let mut config = AgentConfig::new("http://127.0.0.1:9", dir.path().join("agent"));
        config.resources = Some(agora_core::parse_resources("cpus:1;mem:256").unwrap());
        config.native.cgroup_parent = format!("agora-test-{}-supervision", std::process::id());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tap, events) = tokio::sync::oneshot::channel();
        let agent = tokio::spawn(serve(listener, config, std::future::pending(), Some(tap)));
        let events = events.await.unwrap();
        events.send(actor::Event::Crash).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(20), agent)
            .await
            .expect("the agent stops by itself when its owner dies")
            .unwrap();
        let e = result.unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Died {
                    task: "owner task",
                    ..
                }
            ),
            "{e}"
        );
    }
}
