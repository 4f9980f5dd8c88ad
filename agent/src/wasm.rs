//! The Wasm containerizer: WebAssembly tasks under wasmtime, in the framework's Wasm executor
//! process (the default) or in the agent's own process.
//!
//! ```text
//!  task ──> mem needed ──> capabilities checked against the agent's policy (TASK_ERROR
//!           naming any grant it refuses) ──> module: inline bytes (digest checked), file://,
//!           http(s):// (fetched, cached) or sha256: (the agent's module store, else the
//!           master's blob store) ──> <work_dir>/modules/<hex>.wasm
//!     out of process: the task, its module now a digest and its grants resolved, goes to
//!                     the framework's executor `agora-wasm` (`agora __wasm-executor`): one
//!                     process per framework, in a cgroup sized to its tasks
//!     in process:     compiled here and run by this agent's own runtime
//! ```
//!
//! Either way a task's progress reports become TASK_RUNNING updates, its messages reach
//! its framework, and an `agora:task` component's output is in its TASK_FINISHED update
//! (up to [`MAX_OUTPUT_IN_STATUS`]) and its sandbox's `output` file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agora_core::{ExecutorId, TaskState};
use agora_executor_wasm::{
    AddrPattern, CancellationToken, Capabilities, GuestEvent, LiveUsage, LoadError, ModuleSource,
    Outcome, Preopen, Program, RunReport, RunSpec, WasmRuntime,
};
use agora_proto::v1;

use crate::containerizer::{
    Container, Containerizer, LaunchSpec, Termination, Updates, check_required,
};
use crate::executor::{ExecutorContainerizer, LaunchOptions};
use crate::fetcher::Fetcher;

/// Guest events (progress, messages) a run may have in flight to the framework.
pub const GUEST_EVENTS: usize = 128;

/// Largest module the agent fetches, in bytes.
pub const MAX_MODULE_BYTES: u64 = 256 << 20;

/// Largest output carried in a TASK_FINISHED update; a larger one is only in the sandbox.
pub const MAX_OUTPUT_IN_STATUS: usize = 1 << 20;

/// The id of the framework's Wasm executor on each agent.
pub const WASM_EXECUTOR_ID: &str = "agora-wasm";

/// A directory the agent lets tasks have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub path: PathBuf,
    /// Tasks may only read it.
    pub read_only: bool,
}

/// What the agent lets Wasm tasks be granted. A task asking for more is refused.
#[derive(Debug, Clone)]
pub struct WasmPolicy {
    /// Named directories, e.g. `datasets` → `/srv/datasets` (read-only).
    pub volumes: HashMap<String, Volume>,
    /// The agent's environment variables tasks may read: names, or prefixes ending in `*`.
    pub allow_env: Vec<String>,
    /// Addresses tasks may be granted connections to.
    pub allow_connect: Vec<AddrPattern>,
    pub allow_wall_clock: bool,
    pub allow_random: bool,
}

impl Default for WasmPolicy {
    fn default() -> Self {
        WasmPolicy {
            volumes: HashMap::new(),
            allow_env: Vec::new(),
            allow_connect: Vec::new(),
            allow_wall_clock: true,
            allow_random: true,
        }
    }
}

fn refused(what: String) -> Termination {
    Termination::new(TaskState::Error, v1::Reason::TaskInvalid, what)
}

impl WasmPolicy {
    /// Checks a task's grants and resolves them: volume names to directories, host
    /// environment names to their values here.
    ///
    /// # Errors
    /// A TASK_ERROR naming the first grant the policy does not allow, or that is malformed.
    pub fn resolve(
        &self,
        grants: &v1::WasmCapabilities,
    ) -> Result<(Capabilities, Vec<(String, String)>), Termination> {
        let mut caps = Capabilities {
            sandbox: grants.sandbox,
            ..Capabilities::default()
        };
        for v in &grants.volumes {
            let Some(vol) = self.volumes.get(&v.name) else {
                let mut known: Vec<&str> = self.volumes.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err(refused(format!(
                    "the task asks for volume {:?}, which this agent does not have (it has: {})",
                    v.name,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )));
            };
            if vol.read_only && !v.read_only {
                return Err(refused(format!(
                    "the task asks to write volume {:?}, which this agent lends read-only",
                    v.name
                )));
            }
            let guest = Path::new(&v.guest_path);
            if !guest.is_absolute() || guest == Path::new("/") {
                return Err(refused(format!(
                    "volume {:?} needs an absolute guest_path other than / (got {:?})",
                    v.name, v.guest_path
                )));
            }
            caps.volumes.push(Preopen {
                host: vol.path.clone(),
                guest_path: v.guest_path.clone(),
                read_only: v.read_only,
            });
        }
        let mut env = Vec::new();
        for name in &grants.host_env {
            let allowed = self.allow_env.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            });
            if !allowed {
                return Err(refused(format!(
                    "the task asks to read the agent's environment variable {name:?}, which this agent's policy does not allow"
                )));
            }
            if let Ok(value) = std::env::var(name) {
                env.push((name.clone(), value));
            }
        }
        for c in &grants.connect {
            let pattern: AddrPattern = c
                .parse()
                .map_err(|e| refused(format!("capability connect: {e}")))?;
            if !self.allow_connect.iter().any(|w| pattern.within(w)) {
                return Err(refused(format!(
                    "the task asks to connect to {c}, which this agent's policy does not allow{}",
                    if self.allow_connect.is_empty() {
                        " (it allows no connections)".to_owned()
                    } else {
                        format!(
                            " (it allows {})",
                            self.allow_connect
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                )));
            }
            caps.connect.push(pattern);
        }
        if grants.wall_clock && !self.allow_wall_clock {
            return Err(refused(
                "the task asks for the wall clock, which this agent's policy does not allow".into(),
            ));
        }
        if grants.random && !self.allow_random {
            return Err(refused(
                "the task asks for OS randomness, which this agent's policy does not allow".into(),
            ));
        }
        caps.wall_clock = grants.wall_clock;
        caps.random = grants.random;
        Ok((caps, env))
    }
}

/// Grants as the Wasm executor receives them: already checked, volumes as host paths.
pub fn grants_for_executor(caps: &Capabilities) -> v1::WasmCapabilities {
    v1::WasmCapabilities {
        sandbox: caps.sandbox,
        volumes: caps
            .volumes
            .iter()
            .map(|v| v1::VolumeGrant {
                name: v.host.to_string_lossy().into_owned(),
                guest_path: v.guest_path.clone(),
                read_only: v.read_only,
            })
            .collect(),
        host_env: Vec::new(),
        connect: caps.connect.iter().map(ToString::to_string).collect(),
        wall_clock: caps.wall_clock,
        random: caps.random,
    }
}

/// The reverse of [`grants_for_executor`], in the Wasm executor.
///
/// # Errors
/// When a connect pattern does not parse.
pub fn capabilities_from_executor(g: &v1::WasmCapabilities) -> Result<Capabilities, String> {
    Ok(Capabilities {
        sandbox: g.sandbox,
        volumes: g
            .volumes
            .iter()
            .map(|v| Preopen {
                host: PathBuf::from(&v.name),
                guest_path: v.guest_path.clone(),
                read_only: v.read_only,
            })
            .collect(),
        connect: g
            .connect
            .iter()
            .map(|c| {
                c.parse()
                    .map_err(|e: agora_executor_wasm::caps::PatternError| e.to_string())
            })
            .collect::<Result<_, _>>()?,
        wall_clock: g.wall_clock,
        random: g.random,
    })
}

/// How the Wasm containerizer runs tasks.
pub enum WasmMode {
    /// In this process, with this runtime.
    InProcess(WasmRuntime),
    /// In the framework's Wasm executor: `command` runs it (e.g. `agora __wasm-executor`).
    Executor {
        executors: ExecutorContainerizer,
        command: Vec<std::ffi::OsString>,
        /// Instance slots each executor's pool has.
        pool_instances: Option<u32>,
        /// Compiles modules into the shared disk cache (same engine settings as the
        /// executors', on demand).
        compiler: WasmRuntime,
    },
}

/// Runs Wasm tasks. See the module documentation.
pub struct WasmContainerizer {
    mode: WasmMode,
    fetcher: Option<Fetcher>,
    policy: WasmPolicy,
    /// Modules by digest: `<hex>.wasm`.
    modules: PathBuf,
    /// Compiled artifacts, shared by every process of this agent.
    cache_dir: PathBuf,
    /// The module store's bound and pins (see [`WasmContainerizer::with_module_store_bound`]).
    store: Arc<agora_executor_wasm::cache::BoundedDir>,
    /// How often an in-process task's sandbox is measured against its `disk` (in the
    /// executor, the executor containerizer does it); `None`: not enforced.
    disk_watch: Option<Duration>,
}

/// The isolation of a Wasm task itself.
const WASM_ISOLATION: &str = "wasm(epoch-cpu,fuel,memory-ceiling,wasi-sandbox)";

impl WasmContainerizer {
    /// # Errors
    /// When the module store cannot be created.
    /// Modules are stored under `<work_dir>/modules`; compiled artifacts are shared through
    /// `cache_dir`.
    pub fn new(
        mode: WasmMode,
        fetcher: Option<Fetcher>,
        policy: WasmPolicy,
        work_dir: &Path,
        cache_dir: PathBuf,
    ) -> std::io::Result<Self> {
        let modules = work_dir.join("modules");
        std::fs::create_dir_all(&modules)?;
        std::fs::create_dir_all(&cache_dir)?;
        Ok(WasmContainerizer {
            mode,
            fetcher,
            policy,
            store: agora_executor_wasm::cache::BoundedDir::new(&modules, None),
            disk_watch: None,
            modules,
            cache_dir,
        })
    }

    /// Modules evicted from the store, and compiled artifacts from the disk cache, so far.
    pub fn evictions(&self) -> (u64, u64) {
        let compiled = match &self.mode {
            WasmMode::Executor { compiler, .. } => compiler.cache_stats().disk_evicted,
            WasmMode::InProcess(runtime) => runtime.cache_stats().disk_evicted,
        };
        (self.store.evicted(), compiled)
    }

    /// Measures in-process tasks' sandboxes against their `disk` this often (`None`: off).
    #[must_use]
    pub fn with_disk_watch(mut self, interval: Option<Duration>) -> Self {
        self.disk_watch = interval;
        self
    }

    /// Holds the module store to `max_bytes` (least recently used modules go first, never
    /// one a task being prepared or running uses). `None`: no bound.
    #[must_use]
    pub fn with_module_store_bound(mut self, max_bytes: Option<u64>) -> Self {
        self.store = agora_executor_wasm::cache::BoundedDir::new(&self.modules, max_bytes);
        self
    }

    fn module_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.modules.join(format!("{hex}.wasm"))
    }

    /// The module's digest, with its bytes in the module store.
    async fn store_module(&self, wasm: &v1::WasmTask) -> Result<String, Termination> {
        let fetch_failed =
            |msg: String| Termination::new(TaskState::Failed, v1::Reason::FetcherFailed, msg);
        let expected = (!wasm.sha256.is_empty()).then(|| wasm.sha256.to_ascii_lowercase());
        let mismatch = |actual: &str| {
            Termination::new(
                TaskState::Error,
                v1::Reason::FetcherFailed,
                format!(
                    "module digest {} was expected but the bytes hash to {actual}",
                    expected.as_deref().unwrap_or_default()
                ),
            )
        };
        let bytes = match &wasm.module {
            Some(v1::wasm_task::Module::ModuleBytes(b)) => b.clone(),
            Some(v1::wasm_task::Module::Digest(d)) => {
                let d = d.to_ascii_lowercase();
                if expected.as_ref().is_some_and(|e| *e != d) {
                    return Err(mismatch(&d));
                }
                if self.module_path(&d).is_file() {
                    agora_executor_wasm::cache::BoundedDir::touch(&self.module_path(&d));
                    return Ok(d);
                }
                let Some(fetcher) = &self.fetcher else {
                    return Err(Termination::new(
                        TaskState::Error,
                        v1::Reason::FetcherFailed,
                        format!("module {d} is not on this agent, and it has no fetcher"),
                    ));
                };
                let uri = v1::Uri {
                    value: d.clone(),
                    cache: true,
                    ..Default::default()
                };
                fetcher
                    .read(&uri, MAX_MODULE_BYTES)
                    .await
                    .map_err(|e| fetch_failed(e.to_string()))?
            }
            Some(v1::wasm_task::Module::Uri(uri)) => {
                let Some(fetcher) = &self.fetcher else {
                    return Err(Termination::new(
                        TaskState::Error,
                        v1::Reason::FetcherFailed,
                        format!("cannot fetch module {uri:?}: this agent has no fetcher"),
                    ));
                };
                // file:// too: the fetcher holds it to the agent's file roots.
                let u = v1::Uri {
                    value: uri.clone(),
                    cache: true,
                    sha256: wasm.sha256.clone(),
                    ..Default::default()
                };
                fetcher
                    .read(&u, MAX_MODULE_BYTES)
                    .await
                    .map_err(|e| fetch_failed(e.to_string()))?
            }
            None => {
                return Err(Termination::new(
                    TaskState::Error,
                    v1::Reason::ModuleInvalid,
                    "the wasm task has no module",
                ));
            }
        };
        let digest = agora_executor_wasm::digest(&bytes);
        if expected.as_ref().is_some_and(|e| *e != digest) {
            return Err(mismatch(&digest));
        }
        let path = self.module_path(&digest);
        if !path.is_file() {
            let tmp = self
                .modules
                .join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
            let written = tokio::fs::write(&tmp, &bytes).await;
            let renamed = match written {
                Ok(()) => tokio::fs::rename(&tmp, &path).await,
                Err(e) => Err(e),
            };
            if let Err(e) = renamed {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(Termination::new(
                    TaskState::Failed,
                    v1::Reason::ContainerLaunchFailed,
                    format!("storing the module: {e}"),
                ));
            }
            let store = self.store.clone();
            let hex = digest.trim_start_matches("sha256:").to_owned();
            let _ = tokio::task::spawn_blocking(move || store.trim(Some(&hex))).await;
        } else {
            agora_executor_wasm::cache::BoundedDir::touch(&path);
        }
        Ok(digest)
    }

    fn executor_info(&self, command: &[std::ffi::OsString], pool: Option<u32>) -> v1::ExecutorInfo {
        let mut argv = command.iter().map(|a| a.to_string_lossy().into_owned());
        let value = argv.next().unwrap_or_default();
        let env = |name: &str, value: String| v1::EnvVar {
            name: name.into(),
            value,
        };
        let mut vars = vec![
            env(
                "AGORA_WASM_MODULES",
                self.modules.to_string_lossy().into_owned(),
            ),
            env(
                "AGORA_WASM_CACHE",
                self.cache_dir.to_string_lossy().into_owned(),
            ),
        ];
        if let Some(n) = pool {
            vars.push(env("AGORA_WASM_POOL", n.to_string()));
        }
        v1::ExecutorInfo {
            executor_id: Some(v1::ExecutorId {
                value: WASM_EXECUTOR_ID.into(),
            }),
            name: "Agora Wasm executor".into(),
            command: Some(v1::CommandTask {
                value,
                shell: false,
                arguments: argv.collect(),
                env: vars,
                ..Default::default()
            }),
            uris: Vec::new(),
            mesos_executor: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Containerizer for WasmContainerizer {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn isolation(&self) -> String {
        WASM_ISOLATION.into()
    }

    fn supports(&self, task: &v1::TaskInfo) -> bool {
        matches!(task.payload, Some(v1::task_info::Payload::Wasm(_)))
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination> {
        let Some(v1::task_info::Payload::Wasm(wasm)) = &spec.task.payload else {
            return Err(refused("not a wasm task".into()));
        };
        if spec.task.executor.is_some() {
            return Err(refused(format!(
                "a Wasm task runs in the agent's Wasm executor ({WASM_EXECUTOR_ID}); it cannot name an executor of its own"
            )));
        }
        if spec.resources.mem() <= 0.0 {
            return Err(refused(
                "a Wasm task needs a mem resource: it is the ceiling on the task's linear memory"
                    .into(),
            ));
        }
        // Checked before anything is fetched or started.
        crate::containerizer::task_times(&spec.task)?;
        let grants = wasm.capabilities.clone().unwrap_or_default();
        let (caps, host_env) = self.policy.resolve(&grants)?;
        let mut digest = self.store_module(wasm).await?;
        // The module stays in the store while the task needs it (its executor reads it at
        // launch); stored again should it have been evicted before the pin.
        let mut pins = vec![self.store.pin(digest.trim_start_matches("sha256:"))];
        if !self.module_path(&digest).is_file() {
            digest = self.store_module(wasm).await?;
        }
        if let WasmMode::Executor { compiler, .. } = &self.mode {
            pins.extend(compiler.pin_artifact(&digest));
        }
        let container = match &self.mode {
            WasmMode::Executor {
                executors,
                command,
                pool_instances,
                compiler,
            } => {
                compiler
                    .precompile(&digest, &self.module_path(&digest))
                    .await
                    .map_err(load_error)?;
                let mut task = spec.task.clone();
                if let Some(v1::task_info::Payload::Wasm(w)) = &mut task.payload {
                    w.module = Some(v1::wasm_task::Module::Digest(digest.clone()));
                    w.sha256 = digest;
                    w.env.extend(
                        host_env
                            .into_iter()
                            .map(|(name, value)| v1::EnvVar { name, value }),
                    );
                    w.capabilities = Some(grants_for_executor(&caps));
                }
                let info = self.executor_info(command, *pool_instances);
                let opts = LaunchOptions {
                    overhead_mem_mib: 128.0,
                    visible: vec![self.modules.clone(), self.cache_dir.clone()]
                        .into_iter()
                        .chain(caps.volumes.iter().map(|v| v.host.clone()))
                        .collect(),
                    isolation_prefix: Some(WASM_ISOLATION.into()),
                    // The agent's own program, not a framework's: it runs as the agent's
                    // user, like the agent's in-process runtime. It reads the compiled-module
                    // cache, which is native code and so the agent's user's alone (0700), and
                    // the volumes the operator lends; its guests are confined by wasmtime and
                    // get no process environment of their own.
                    as_agent: true,
                };
                executors.prepare_in(spec, &info, task, &opts).await
            }
            WasmMode::InProcess(runtime) => {
                check_required(&spec.task.required_isolation, WASM_ISOLATION)?;
                let bytes = tokio::fs::read(self.module_path(&digest))
                    .await
                    .map_err(|e| {
                        Termination::new(
                            TaskState::Failed,
                            v1::Reason::ContainerLaunchFailed,
                            format!("reading the stored module: {e}"),
                        )
                    })?;
                let program = runtime
                    .load(ModuleSource::Bytes(Arc::from(bytes)), Some(&digest))
                    .await
                    .map_err(load_error)?;
                let mut run = run_spec(spec, wasm, caps)?;
                run.env.extend(host_env);
                let live = LiveUsage::new();
                run.live = Some(Arc::clone(&live));
                let quota =
                    crate::disk::Quota::of(&spec.sandbox, spec.resources.disk(), self.disk_watch);
                Ok(crate::disk::enforced(
                    Box::new(WasmContainer {
                        runtime: runtime.clone(),
                        program,
                        run,
                        live,
                    }),
                    quota,
                ))
            }
        };
        container.map(|c| crate::disk::pinned(c, pins))
    }
}

fn load_error(e: LoadError) -> Termination {
    let reason = match e {
        LoadError::UnknownDigest(_) | LoadError::DigestMismatch { .. } => v1::Reason::FetcherFailed,
        _ => v1::Reason::ModuleInvalid,
    };
    Termination::new(TaskState::Error, reason, e.to_string())
}

/// What a Wasm task's run is given, from its task info. Also used by the Wasm executor.
///
/// # Errors
/// A TASK_ERROR naming a field out of range (see [`crate::containerizer::task_times`]).
pub fn run_spec(
    spec: &LaunchSpec,
    wasm: &v1::WasmTask,
    caps: Capabilities,
) -> Result<RunSpec, Termination> {
    run_spec_for(
        &spec.task,
        spec.task_id.as_str(),
        spec.framework_id.as_str(),
        &spec.resources,
        &spec.sandbox,
        wasm,
        caps,
    )
}

/// As [`run_spec`], from the parts.
///
/// # Errors
/// As [`run_spec`].
pub fn run_spec_for(
    task: &v1::TaskInfo,
    task_id: &str,
    framework_id: &str,
    resources: &agora_core::Resources,
    sandbox: &Path,
    wasm: &v1::WasmTask,
    caps: Capabilities,
) -> Result<RunSpec, Termination> {
    let times = crate::containerizer::task_times(task)?;
    let memory_limit = crate::containerizer::mib_to_bytes("resources.mem", resources.mem())
        .map_err(|e| crate::containerizer::invalid_field(&e))?;
    let mut args = vec![if task.name.is_empty() {
        task_id.to_owned()
    } else {
        task.name.clone()
    }];
    args.extend(wasm.args.iter().cloned());
    let mut env: Vec<(String, String)> = wasm
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    env.push(("AGORA_TASK_ID".into(), task_id.to_owned()));
    env.push(("AGORA_FRAMEWORK_ID".into(), framework_id.to_owned()));
    let limit = times.max_duration;
    let cpus = resources.cpus();
    // `mul_f64` would panic past Duration's range; a budget that large is no budget.
    let cpu_budget = limit
        .filter(|_| cpus > 0.0)
        .and_then(|l| Duration::try_from_secs_f64(l.as_secs_f64() * cpus).ok());
    Ok(RunSpec {
        args,
        env,
        sandbox: sandbox.to_owned(),
        stdout: sandbox.join("stdout"),
        stderr: sandbox.join("stderr"),
        memory_limit,
        cpu_budget,
        wall_limit: limit,
        fuel: wasm.fuel,
        cpus: (cpus > 0.0).then_some(cpus),
        caps,
        input: wasm.input.clone(),
        events: None,
        live: None,
    })
}

struct WasmContainer {
    runtime: WasmRuntime,
    program: Program,
    run: RunSpec,
    live: Arc<LiveUsage>,
}

/// Turns a guest's events into status updates and framework messages while it runs.
pub fn forward_guest_events(
    mut rx: tokio::sync::mpsc::Receiver<GuestEvent>,
    mut progress: impl FnMut(
        f32,
        String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    + Send
    + 'static,
    mut message: impl FnMut(Vec<u8>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    + Send
    + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            match e {
                GuestEvent::Progress {
                    fraction,
                    message: m,
                } => progress(fraction, m).await,
                GuestEvent::Message(data) => message(data).await,
                // Already in the task's log (stderr).
                GuestEvent::Log { .. } => {}
            }
        }
    })
}

#[async_trait::async_trait]
impl Container for WasmContainer {
    async fn run(self: Box<Self>, kill: CancellationToken, updates: Updates) -> Termination {
        let (tx, rx) = tokio::sync::mpsc::channel(GUEST_EVENTS);
        let mut run = self.run;
        run.events = Some(tx);
        let (u1, u2) = (updates.clone(), updates.clone());
        let forward = forward_guest_events(
            rx,
            move |fraction, message| {
                let u = u1.clone();
                Box::pin(async move {
                    let mut t =
                        Termination::new(TaskState::Running, v1::Reason::Unspecified, message);
                    t.progress = Some(fraction);
                    u.send(t).await;
                })
            },
            move |data| {
                let u = u2.clone();
                Box::pin(async move { u.message(None::<ExecutorId>, data).await })
            },
        );
        let report = self.runtime.run(&self.program, run, kill).await;
        // The run's sender is gone: the forwarder ends once it has passed everything on.
        let _ = forward.await;
        termination(report)
    }

    fn isolation(&self) -> Option<String> {
        Some(WASM_ISOLATION.into())
    }

    fn usage_probe(&self) -> Option<crate::containerizer::UsageProbe> {
        let live = Arc::clone(&self.live);
        Some(Arc::new(move || usage_now(&live)))
    }
}

/// A running Wasm task's usage, as the agent reports it.
pub fn usage_now(live: &LiveUsage) -> v1::TaskUsage {
    let u = live.snapshot();
    v1::TaskUsage {
        cpu_seconds: u.cpu.as_secs_f64(),
        wall_seconds: u.wall.as_secs_f64(),
        mem_peak_bytes: u.mem_peak_bytes,
        mem_bytes: live.mem_bytes(),
        ..Default::default()
    }
}

/// Maps how a Wasm run ended onto a task state, reason, exit code and output.
pub fn termination(report: RunReport) -> Termination {
    let mut message = report.outcome.to_string();
    let (state, reason, exit_code) = match report.outcome {
        Outcome::Exited(0) => (TaskState::Finished, v1::Reason::Unspecified, Some(0)),
        Outcome::Exited(code) => (TaskState::Failed, v1::Reason::CommandExited, Some(code)),
        Outcome::Trap(_) => (TaskState::Failed, v1::Reason::WasmTrap, None),
        Outcome::OutOfFuel { .. } => (TaskState::Failed, v1::Reason::ContainerLimitationFuel, None),
        Outcome::CpuBudget { .. } => (TaskState::Failed, v1::Reason::ContainerLimitationCpu, None),
        Outcome::WallTimeout { .. } => (
            TaskState::Failed,
            v1::Reason::MaxCompletionTimeReached,
            None,
        ),
        Outcome::MemoryLimit { .. } => (
            TaskState::Failed,
            v1::Reason::ContainerLimitationMemory,
            None,
        ),
        Outcome::InitialMemoryTooLarge { .. } => (
            TaskState::Error,
            v1::Reason::ContainerLimitationMemory,
            None,
        ),
        Outcome::InstantiationFailed(_) => {
            (TaskState::Failed, v1::Reason::ContainerLaunchFailed, None)
        }
        Outcome::Killed => (TaskState::Killed, v1::Reason::TaskKilled, None),
        Outcome::TaskError(_) => (TaskState::Failed, v1::Reason::CommandExited, None),
    };
    let mut data = Vec::new();
    if let Some(out) = report.output {
        if out.len() <= MAX_OUTPUT_IN_STATUS {
            message = format!("finished with {} bytes of output", out.len());
            data = out;
        } else {
            message = format!(
                "finished with {} bytes of output, too many for a status update: read the sandbox's output file",
                out.len()
            );
        }
    }
    let u = report.usage;
    let mut t = Termination::new(state, reason, message);
    t.exit_code = exit_code;
    t.data = data;
    t.usage = Some(Box::new(v1::TaskUsage {
        fuel_used: u.fuel_used,
        cpu_seconds: u.cpu.as_secs_f64(),
        wall_seconds: u.wall.as_secs_f64(),
        mem_peak_bytes: u.mem_peak_bytes,
        ..Default::default()
    }));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> WasmPolicy {
        WasmPolicy {
            volumes: HashMap::from([
                (
                    "data".to_owned(),
                    Volume {
                        path: "/srv/data".into(),
                        read_only: true,
                    },
                ),
                (
                    "scratch".to_owned(),
                    Volume {
                        path: "/srv/scratch".into(),
                        read_only: false,
                    },
                ),
            ]),
            allow_env: vec!["LANG".into(), "AGORA_PUBLIC_*".into()],
            allow_connect: vec!["10.0.0.0/8:443".parse().unwrap()],
            allow_wall_clock: true,
            allow_random: false,
        }
    }

    fn vol(name: &str, path: &str, ro: bool) -> v1::VolumeGrant {
        v1::VolumeGrant {
            name: name.into(),
            guest_path: path.into(),
            read_only: ro,
        }
    }

    #[test]
    fn grants_within_the_policy_resolve() {
        let g = v1::WasmCapabilities {
            sandbox: true,
            volumes: vec![vol("data", "/data", true), vol("scratch", "/tmp", false)],
            host_env: vec!["AGORA_PUBLIC_REGION".into()],
            connect: vec!["10.1.2.3:443".into()],
            wall_clock: true,
            random: false,
        };
        let (caps, _env) = policy().resolve(&g).unwrap();
        assert!(caps.sandbox && caps.wall_clock && !caps.random);
        assert_eq!(caps.volumes[0].host, PathBuf::from("/srv/data"));
        assert_eq!(caps.connect.len(), 1);
        let back = capabilities_from_executor(&grants_for_executor(&caps)).unwrap();
        assert_eq!(back, caps);
    }

    #[test]
    fn grants_beyond_the_policy_are_refused_by_name() {
        let cases: Vec<(v1::WasmCapabilities, &str)> = vec![
            (
                v1::WasmCapabilities {
                    volumes: vec![vol("secrets", "/s", true)],
                    ..Default::default()
                },
                "volume \"secrets\", which this agent does not have (it has: data, scratch)",
            ),
            (
                v1::WasmCapabilities {
                    volumes: vec![vol("data", "/data", false)],
                    ..Default::default()
                },
                "write volume \"data\", which this agent lends read-only",
            ),
            (
                v1::WasmCapabilities {
                    volumes: vec![vol("scratch", "relative", false)],
                    ..Default::default()
                },
                "absolute guest_path",
            ),
            (
                v1::WasmCapabilities {
                    host_env: vec!["HOME".into()],
                    ..Default::default()
                },
                "environment variable \"HOME\"",
            ),
            (
                v1::WasmCapabilities {
                    connect: vec!["10.1.2.3:22".into()],
                    ..Default::default()
                },
                "connect to 10.1.2.3:22, which this agent's policy does not allow (it allows 10.0.0.0/8:443)",
            ),
            (
                v1::WasmCapabilities {
                    connect: vec!["example.com:80".into()],
                    ..Default::default()
                },
                "is not HOST:PORT",
            ),
            (
                v1::WasmCapabilities {
                    random: true,
                    ..Default::default()
                },
                "OS randomness",
            ),
        ];
        for (g, says) in cases {
            let err = policy().resolve(&g).unwrap_err();
            assert_eq!(err.state, TaskState::Error);
            assert!(
                err.message.contains(says),
                "{says:?} not in {:?}",
                err.message
            );
        }
    }
}
