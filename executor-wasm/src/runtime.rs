//! [`WasmRuntime`]: one wasmtime engine per process, its epoch ticker, the linkers for WASI
//! preview 1, preview 2 and the `agora:task` world, the program caches (memory and disk),
//! and the code that runs one task in one store.
//!
//! ```text
//!  load(bytes) ─> in-memory cache ─miss─> disk cache (sha256 + engine fingerprint) ─miss─>
//!                 compile (blocking pool) ─> write artifact ─> link: InstancePre / CommandPre /
//!                 TaskPre
//!  run(program) ─> permit (pool slot) ─> Store: limiter, fuel, epoch callback (kill, CPU
//!                 budget, CPU cap, yield) ─> instantiate ─> _start | wasi:cli/run | run(input)
//! ```

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, HasSelf, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, Store, Strategy, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::{CacheStats, DiskCache, ProgramCache};
use crate::caps::Capabilities;
use crate::guest::bindings::{Task, TaskPre};
use crate::guest::{GuestEvents, GuestHost, Level};
use crate::limits::{CpuMeter, MemoryLimiter};
use crate::outcome::{Outcome, RunReport, Usage};
use crate::output::CappedOutput;

/// Settings of the Wasm runtime.
#[derive(Debug, Clone)]
pub struct WasmConfig {
    /// How often the epoch advances: the granularity of CPU accounting, time slicing and
    /// killing. Default 10 ms.
    pub epoch_tick: Duration,
    /// How many compiled programs are kept. Default 64.
    pub cache_capacity: usize,
    /// Most bytes kept of each of a task's stdout and stderr. Default 64 MiB.
    pub max_output_bytes: u64,
    /// Most native stack a task's Wasm may use, in bytes. Default 1 MiB.
    pub max_wasm_stack: usize,
    /// Where compiled artifacts are kept, so a restart (or another process of the same
    /// agent) does not compile again. Default: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of artifacts `cache_dir` keeps (least recently used go first, never one
    /// pinned by a task). Default: no bound (the agent sets one).
    pub cache_max_bytes: Option<u64>,
    /// Instantiate from a pool of this many pre-reserved instance slots, with
    /// copy-on-write memory images (falls back to allocating on demand when the host cannot
    /// reserve the pool's address space). At most this many tasks run at once; more wait.
    /// Default: on demand.
    pub pool_instances: Option<u32>,
    /// Hold each task to its `cpus` share of one core (bursts up to [`CPU_CAP_WINDOW`] ×
    /// `cpus`); without it `cpus` only sizes the CPU-time budget. Default on.
    pub cpu_cap: bool,
    /// Meter fuel: needed for fuel caps and fuel reports. Off, tasks run a little faster
    /// and a task asking for a fuel cap is refused. Default on.
    pub fuel: bool,
}

/// How much of its share a task may use in one burst, as time at the share.
pub const CPU_CAP_WINDOW: Duration = Duration::from_millis(100);

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            epoch_tick: Duration::from_millis(10),
            cache_capacity: 64,
            max_output_bytes: 64 << 20,
            max_wasm_stack: 1 << 20,
            cache_dir: None,
            cache_max_bytes: None,
            pool_instances: None,
            cpu_cap: true,
            fuel: true,
        }
    }
}

/// Errors creating the runtime.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    #[error("creating the wasmtime engine: {0}")]
    Engine(String),
    #[error("linking WASI into the runtime: {0}")]
    Link(String),
    #[error("starting the epoch ticker thread: {0}")]
    Ticker(#[source] std::io::Error),
    #[error("preparing the compiled-module cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a program could not be loaded. All of these are the task's fault, not the agent's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("not a WebAssembly binary: {0}")]
    NotWasm(String),
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    #[error("module digest {expected} was expected but the bytes hash to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("module {0} is not in this agent's cache; send the module's bytes")]
    UnknownDigest(String),
    #[error("cannot link the module: {0}")]
    Link(String),
    #[error("not a WASI command: {0}")]
    NotACommand(String),
    #[error("compilation was interrupted: {0}")]
    Interrupted(String),
}

/// Where a program's bytes come from.
#[derive(Debug, Clone)]
pub enum ModuleSource {
    /// The bytes themselves.
    Bytes(Arc<[u8]>),
    /// `sha256:<hex>` of a program this runtime has already loaded.
    Digest(String),
}

/// A core module or a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    /// A WASI preview 1 command module (`_start`).
    Module,
    /// A WASI preview 2 command component (`wasi:cli/run`).
    Component,
    /// A component of the `agora:task` world (`run(input) -> result<output, error>`).
    Task,
}

impl ProgramKind {
    /// The kind of its artifact in the disk cache.
    fn artifact_kind(self) -> &'static str {
        match self {
            ProgramKind::Module => "module",
            ProgramKind::Component | ProgramKind::Task => "component",
        }
    }
}

/// Holds a task to its share of one core as a token bucket: CPU time accrues at `cpus`
/// seconds per second, up to a burst of `cpus` × [`CPU_CAP_WINDOW`]; a task that has spent
/// more sleeps until it is back in credit. Overshoot between two epoch checks is charged,
/// so the long-run share is `cpus` whatever the tick.
struct CpuCap {
    cpus: f64,
    /// Seconds of CPU time in hand (negative: owed).
    tokens: f64,
    last_at: Instant,
    last_used: Duration,
}

/// The state each store holds: the WASI context plus the task's limits and stop flags.
pub(crate) struct TaskData<W> {
    wasi: W,
    limiter: MemoryLimiter,
    cpu: Arc<CpuMeter>,
    cpu_budget: Option<Duration>,
    cap: Option<CpuCap>,
    cancel: CancellationToken,
    stop: Option<Stop>,
    guest: GuestHost,
}

impl crate::guest::bindings::agora::task::host::Host for TaskData<P2Wasi> {
    async fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        self.guest.log(level, message);
        Ok(())
    }

    async fn progress(&mut self, fraction: f32, message: String) -> wasmtime::Result<()> {
        self.guest.progress(fraction, message);
        Ok(())
    }

    async fn message(&mut self, data: Vec<u8>) -> wasmtime::Result<()> {
        self.guest.message(data)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    CpuBudget,
    Killed,
}

pub(crate) struct P2Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for TaskData<P2Wasi> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi.ctx,
            table: &mut self.wasi.table,
        }
    }
}

#[derive(Clone)]
enum Pre {
    Module(InstancePre<TaskData<WasiP1Ctx>>),
    Component(CommandPre<TaskData<P2Wasi>>),
    Task(TaskPre<TaskData<P2Wasi>>),
}

/// A compiled, linked program, ready to be instantiated many times.
#[derive(Clone)]
pub struct Program {
    digest: Arc<str>,
    pre: Pre,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("digest", &self.digest)
            .field("kind", &self.kind())
            .finish()
    }
}

impl Program {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn kind(&self) -> ProgramKind {
        match self.pre {
            Pre::Module(_) => ProgramKind::Module,
            Pre::Component(_) => ProgramKind::Component,
            Pre::Task(_) => ProgramKind::Task,
        }
    }
}

/// What one run is given.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// argv, including argv[0] (conventionally the task's name).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The task's sandbox directory: preopened as `/` when granted, and where an
    /// `agora:task` component's output is written (`output`).
    pub sandbox: PathBuf,
    /// Files for stdout and stderr (usually inside the sandbox).
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Ceiling on the sum of linear memories, in bytes.
    pub memory_limit: u64,
    /// CPU time the task may use.
    pub cpu_budget: Option<Duration>,
    /// Wall-clock time the task may run.
    pub wall_limit: Option<Duration>,
    /// Deterministic instruction budget.
    pub fuel: Option<u64>,
    /// The task's CPU share (see [`WasmConfig::cpu_cap`]).
    pub cpus: Option<f64>,
    /// What the task may reach.
    pub caps: Capabilities,
    /// Input of an `agora:task` component's `run`.
    pub input: Vec<u8>,
    /// Where an `agora:task` component's log lines, progress and messages go.
    pub events: Option<GuestEvents>,
    /// Where the run publishes its usage while it runs.
    pub live: Option<Arc<crate::limits::LiveUsage>>,
}

/// Stops the epoch ticker when the runtime goes away.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Inner {
    engine: Engine,
    p1: Linker<TaskData<WasiP1Ctx>>,
    p2: wasmtime::component::Linker<TaskData<P2Wasi>>,
    cache: ProgramCache<Program>,
    /// Programs compiled into the disk cache for other processes ([`WasmRuntime::precompile`]).
    prepared: ProgramCache<ProgramKind>,
    disk: Option<DiskCache>,
    /// One per pool slot; a run holds one while its store lives.
    permits: Option<Arc<tokio::sync::Semaphore>>,
    fingerprint: String,
    config: WasmConfig,
    _ticker: Ticker,
}

/// Feeds a `Hash` into sha256, for a fingerprint that is stable across Rust releases
/// (`DefaultHasher` is not).
struct Sha256Hasher(sha2::Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }

    fn finish(&self) -> u64 {
        0
    }
}

fn engine_config(config: &WasmConfig, pool: Option<u32>) -> Config {
    let mut c = Config::new();
    c.strategy(Strategy::Cranelift)
        .cranelift_opt_level(OptLevel::Speed)
        .consume_fuel(config.fuel)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        // Host frames run on the same fiber stack; leave them room above the Wasm stack.
        .async_stack_size(config.max_wasm_stack + (1 << 20))
        .async_stack_zeroing(true)
        .memory_init_cow(true)
        .wasm_memory64(false);
    if let Some(n) = pool {
        let mut p = PoolingAllocationConfig::default();
        // A component holds a few core instances and tables; most tasks have one memory.
        p.total_component_instances(n)
            .total_core_instances(n.saturating_mul(4))
            .total_memories(n.saturating_add(n / 4).saturating_add(8))
            .total_tables(n.saturating_mul(2).saturating_add(8))
            .total_stacks(n)
            .max_unused_warm_slots((n / 4).max(1))
            .table_elements(crate::limits::MAX_TABLE_ELEMENTS);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    c
}

/// Runs Wasm tasks. Cheap to clone; all clones share one engine and one cache.
#[derive(Clone)]
pub struct WasmRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Fuel given to a task without a fuel cap, so that fuel can still be reported.
const UNLIMITED_FUEL: u64 = u64::MAX;

impl WasmRuntime {
    /// Creates the engine and starts its epoch ticker thread.
    ///
    /// # Errors
    /// When wasmtime rejects the configuration or the ticker thread cannot start.
    pub fn new(config: WasmConfig) -> Result<Self, WasmError> {
        let (engine, pooled) = match config.pool_instances {
            Some(n) => match Engine::new(&engine_config(&config, Some(n))) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), instances = n, "cannot reserve the instance pool; allocating on demand");
                    let e = Engine::new(&engine_config(&config, None))
                        .map_err(|e| WasmError::Engine(format!("{e:#}")))?;
                    (e, false)
                }
            },
            None => (
                Engine::new(&engine_config(&config, None))
                    .map_err(|e| WasmError::Engine(format!("{e:#}")))?,
                false,
            ),
        };
        let fingerprint = {
            let mut h = Sha256Hasher(sha2::Digest::new());
            engine.precompile_compatibility_hash().hash(&mut h);
            hex::encode(&sha2::Digest::finalize(h.0)[..8])
        };
        let disk = match &config.cache_dir {
            Some(dir) => Some(
                DiskCache::open_bounded(dir, &fingerprint, config.cache_max_bytes).map_err(
                    |source| WasmError::Cache {
                        path: dir.clone(),
                        source,
                    },
                )?,
            ),
            None => None,
        };

        let mut p1 = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |d: &mut TaskData<WasiP1Ctx>| &mut d.wasi)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        let mut p2 = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        Task::add_to_linker::<_, HasSelf<TaskData<P2Wasi>>>(&mut p2, |d| d)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;

        let stop = Arc::new(AtomicBool::new(false));
        let weak = engine.weak();
        let tick = config.epoch_tick;
        let thread = {
            let stop = Arc::clone(&stop);
            // A plain thread, not a tokio task: busy runtime workers must not delay the ticks
            // that pre-empt the Wasm keeping them busy.
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        match weak.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => break,
                        }
                    }
                })
                .map_err(WasmError::Ticker)?
        };
        let permits = config
            .pool_instances
            .filter(|_| pooled)
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
        tracing::debug!(pooled, %fingerprint, "wasm engine ready");
        Ok(WasmRuntime {
            inner: Arc::new(Inner {
                engine,
                p1,
                p2,
                cache: ProgramCache::new(config.cache_capacity),
                prepared: ProgramCache::new(4096),
                disk,
                permits,
                fingerprint,
                config,
                _ticker: Ticker {
                    stop,
                    thread: Some(thread),
                },
            }),
        })
    }

    /// Whether instances come from a pool (the host allowed reserving it).
    pub fn pooled(&self) -> bool {
        self.inner.permits.is_some()
    }

    /// The engine's compatibility fingerprint: compiled artifacts are shared only between
    /// engines with the same one.
    pub fn fingerprint(&self) -> &str {
        &self.inner.fingerprint
    }

    pub fn config(&self) -> &WasmConfig {
        &self.inner.config
    }

    pub fn cache_stats(&self) -> CacheStats {
        let mut s = self.inner.cache.stats();
        if let Some(d) = &self.inner.disk {
            s.disk_hits = d.hits.load(Ordering::Relaxed);
            s.disk_discarded = d.discarded.load(Ordering::Relaxed);
            s.disk_writes = d.writes.load(Ordering::Relaxed);
            s.disk_evicted = d.evicted();
        }
        s
    }

    /// Keeps the disk cache's artifacts of `digest` from eviction while the pin lives (a
    /// task that an executor will load from the cache); `None` without a disk cache.
    pub fn pin_artifact(&self, digest: &str) -> Option<crate::cache::Pin> {
        self.inner.disk.as_ref().map(|d| d.pin(digest))
    }

    /// Where the disk cache keeps the artifact of a program (for tests and tools).
    pub fn artifact_path(&self, digest: &str, kind: ProgramKind) -> Option<PathBuf> {
        self.inner
            .disk
            .as_ref()
            .map(|d| d.path(digest, kind.artifact_kind()))
    }

    /// Compiles and links a program, or finds it in the cache.
    ///
    /// # Errors
    /// When the bytes are not a valid WASI command module or component, do not match
    /// `expected_digest`, or name a digest this runtime has never loaded.
    pub async fn load(
        &self,
        source: ModuleSource,
        expected_digest: Option<&str>,
    ) -> Result<Program, LoadError> {
        match source {
            ModuleSource::Digest(d) => {
                if expected_digest.is_some_and(|e| e != d) {
                    return Err(LoadError::DigestMismatch {
                        expected: expected_digest.unwrap_or_default().to_owned(),
                        actual: d,
                    });
                }
                self.inner.cache.get(&d).ok_or(LoadError::UnknownDigest(d))
            }
            ModuleSource::Bytes(bytes) => {
                let digest = crate::digest(&bytes);
                if let Some(expected) = expected_digest
                    && expected != digest
                {
                    return Err(LoadError::DigestMismatch {
                        expected: expected.to_owned(),
                        actual: digest,
                    });
                }
                let inner = Arc::clone(&self.inner);
                let d = digest.clone();
                self.inner
                    .cache
                    .get_or_load(&digest, move || async move {
                        // Compilation is CPU-heavy: keep it off the async workers.
                        tokio::task::spawn_blocking(move || compile(&inner, &bytes, d))
                            .await
                            .map_err(|e| LoadError::Interrupted(e.to_string()))?
                    })
                    .await
            }
        }
    }

    /// Makes sure the disk cache holds the compiled module in `path` (whose digest is
    /// `digest`) for other processes to load, compiling it here if need be, and says what
    /// kind of program it is. The agent does this for its Wasm executors, so that compiling
    /// — memory-hungry, and slow for big modules — happens outside their cgroups, and a bad
    /// module is refused before any executor sees it. Done once per digest.
    ///
    /// # Errors
    /// As [`WasmRuntime::load`], and when the file cannot be read.
    pub async fn precompile(
        &self,
        digest: &str,
        path: &std::path::Path,
    ) -> Result<ProgramKind, LoadError> {
        // Prepared before, but evicted from the disk cache since: prepare it again.
        if let (Some(disk), Some(kind)) = (&self.inner.disk, self.inner.prepared.get(digest)) {
            let artifact = disk.path(digest, kind.artifact_kind());
            if artifact.is_file() {
                crate::cache::BoundedDir::touch(&artifact);
            } else {
                self.inner.prepared.remove(digest);
            }
        }
        let inner = Arc::clone(&self.inner);
        let (d, path) = (digest.to_owned(), path.to_owned());
        self.inner
            .prepared
            .get_or_load(digest, move || async move {
                tokio::task::spawn_blocking(move || {
                    let bytes = std::fs::read(&path).map_err(|e| {
                        LoadError::Interrupted(format!("reading {}: {e}", path.display()))
                    })?;
                    let actual = crate::digest(&bytes);
                    if actual != d {
                        return Err(LoadError::DigestMismatch {
                            expected: d,
                            actual,
                        });
                    }
                    compile(&inner, &bytes, d).map(|p| p.kind())
                })
                .await
                .map_err(|e| LoadError::Interrupted(e.to_string()))?
            })
            .await
    }

    /// Runs one instance of `program` until it ends, is cancelled, or hits a limit.
    pub async fn run(
        &self,
        program: &Program,
        spec: RunSpec,
        cancel: CancellationToken,
    ) -> RunReport {
        let started = Instant::now();
        // A pool slot for this run's store; without a pool, no limit but memory's.
        let _permit = match &self.inner.permits {
            Some(p) => tokio::select! {
                p = Arc::clone(p).acquire_owned() => p.ok(),
                () = cancel.cancelled() => return RunReport {
                    outcome: Outcome::Killed,
                    usage: Usage::default(),
                    output: None,
                },
            },
            None => None,
        };
        if spec.fuel.is_some() && !self.inner.config.fuel {
            return RunReport {
                outcome: Outcome::InstantiationFailed(
                    "the task asks for a fuel cap, but this runtime does not meter fuel".into(),
                ),
                usage: Usage::default(),
                output: None,
            };
        }
        let cpu = spec
            .live
            .as_ref()
            .map_or_else(CpuMeter::new, |l| Arc::clone(&l.cpu));
        let mut builder = match self.wasi_builder(&spec) {
            Ok(b) => b,
            Err(msg) => {
                return RunReport {
                    outcome: Outcome::InstantiationFailed(msg),
                    usage: Usage::default(),
                    output: None,
                };
            }
        };
        let cap = spec
            .cpus
            .filter(|c| self.inner.config.cpu_cap && *c > 0.0 && *c < 1.0)
            .map(|cpus| CpuCap {
                cpus,
                tokens: cpus * CPU_CAP_WINDOW.as_secs_f64(),
                last_at: Instant::now(),
                last_used: Duration::ZERO,
            });
        fn data<W>(
            wasi: W,
            guest: GuestHost,
            spec: &RunSpec,
            cpu: &Arc<CpuMeter>,
            cancel: &CancellationToken,
            cap: Option<CpuCap>,
        ) -> TaskData<W> {
            let mut limiter = MemoryLimiter::new(spec.memory_limit);
            if let Some(live) = &spec.live {
                limiter = limiter.with_live(Arc::clone(live));
            }
            TaskData {
                wasi,
                limiter,
                cpu: Arc::clone(cpu),
                cpu_budget: spec.cpu_budget,
                cap,
                cancel: cancel.clone(),
                stop: None,
                guest,
            }
        }
        let mut report = match &program.pre {
            Pre::Module(pre) => {
                let pre = pre.clone();
                let wasi = builder.build_p1();
                let d = data(
                    wasi,
                    GuestHost::new(None, None, 0),
                    &spec,
                    &cpu,
                    &cancel,
                    cap,
                );
                let store = self.new_store(d, &spec);
                self.execute(store, &spec, &cancel, move |store| {
                    Box::pin(async move {
                        let instance = pre
                            .instantiate_async(&mut *store)
                            .await
                            .map_err(Failure::Instantiate)?;
                        let start = instance
                            .get_typed_func::<(), ()>(&mut *store, "_start")
                            .map_err(Failure::Instantiate)?;
                        start
                            .call_async(&mut *store, ())
                            .await
                            .map_err(Failure::Run)?;
                        Ok(Ended::Exit(0))
                    })
                })
                .await
            }
            Pre::Component(pre) => {
                let pre = pre.clone();
                let wasi = P2Wasi {
                    ctx: builder.build(),
                    table: ResourceTable::new(),
                };
                let d = data(
                    wasi,
                    GuestHost::new(None, None, 0),
                    &spec,
                    &cpu,
                    &cancel,
                    cap,
                );
                let store = self.new_store(d, &spec);
                self.execute(store, &spec, &cancel, move |store| {
                    Box::pin(async move {
                        let command = pre
                            .instantiate_async(&mut *store)
                            .await
                            .map_err(Failure::Instantiate)?;
                        let result = command
                            .wasi_cli_run()
                            .call_run(&mut *store)
                            .await
                            .map_err(Failure::Run)?;
                        Ok(Ended::Exit(if result.is_ok() { 0 } else { 1 }))
                    })
                })
                .await
            }
            Pre::Task(pre) => {
                let pre = pre.clone();
                let wasi = P2Wasi {
                    ctx: builder.build(),
                    table: ResourceTable::new(),
                };
                let log = open_log(&spec.stderr).ok();
                let guest =
                    GuestHost::new(log, spec.events.clone(), self.inner.config.max_output_bytes);
                let store = self.new_store(data(wasi, guest, &spec, &cpu, &cancel, cap), &spec);
                let input = spec.input.clone();
                self.execute(store, &spec, &cancel, move |store| {
                    Box::pin(async move {
                        let task = pre
                            .instantiate_async(&mut *store)
                            .await
                            .map_err(Failure::Instantiate)?;
                        let result = task
                            .call_run(&mut *store, &input)
                            .await
                            .map_err(Failure::Run)?;
                        Ok(Ended::Output(result))
                    })
                })
                .await
            }
        };
        report.usage.wall = started.elapsed();
        report.usage.cpu = cpu.used();
        if let Some(out) = &report.output
            && let Err(e) = write_output(&spec.sandbox.join("output"), out)
        {
            tracing::warn!(error = %e, "writing the task's output into its sandbox");
        }
        report
    }

    fn wasi_builder(&self, spec: &RunSpec) -> Result<WasiCtxBuilder, String> {
        let open = |path: &PathBuf| {
            open_log(path)
                .map(|f| CappedOutput::new(f, self.inner.config.max_output_bytes))
                .map_err(|e| format!("opening {}: {e}", path.display()))
        };
        // A WASI context starts with nothing: no env, no preopens, no network. Grant only
        // what the task was given.
        let mut b = WasiCtxBuilder::new();
        b.args(&spec.args)
            .envs(&spec.env)
            .stdout(open(&spec.stdout)?)
            .stderr(open(&spec.stderr)?);
        let caps = &spec.caps;
        if caps.sandbox {
            b.preopened_dir(&spec.sandbox, "/", FsPerms::ReadWrite)
                .map_err(|e| format!("preopening the sandbox {}: {e:#}", spec.sandbox.display()))?;
        }
        for v in &caps.volumes {
            let perms = if v.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&v.host, &v.guest_path, perms)
                .map_err(|e| {
                    format!("preopening {} as {}: {e:#}", v.host.display(), v.guest_path)
                })?;
        }
        if !caps.connect.is_empty() {
            let allowed = Arc::new(caps.connect.clone());
            b.allow_tcp(true)
                .allow_udp(true)
                .socket_addr_check(move |addr, use_| {
                    use wasmtime_wasi::sockets::SocketAddrUse as U;
                    let ok = match use_ {
                        U::TcpConnect | U::UdpSend | U::UdpReceive => {
                            allowed.iter().any(|p| p.matches(&addr))
                        }
                        // The implicit bind before a connect or send: any local address,
                        // an ephemeral port. Binding to a chosen port is serving.
                        U::TcpBind | U::UdpBind => addr.ip().is_unspecified() && addr.port() == 0,
                        // Outbound only: no listening, no accepting.
                        _ => false,
                    };
                    Box::pin(async move { ok })
                });
        }
        if !caps.wall_clock {
            b.wall_clock(StoppedClock);
        }
        if !caps.random {
            use rand::SeedableRng;
            b.secure_random(rand::rngs::StdRng::seed_from_u64(0x5eed))
                .insecure_random(rand::rngs::StdRng::seed_from_u64(0x1e55))
                .insecure_random_seed(0);
        }
        Ok(b)
    }

    fn new_store<W: Send + 'static>(
        &self,
        data: TaskData<W>,
        spec: &RunSpec,
    ) -> Store<TaskData<W>> {
        let mut store = Store::new(&self.inner.engine, data);
        store.limiter(|d| &mut d.limiter);
        // Fuel is on for metering; a task without a cap gets all there is.
        if self.inner.config.fuel {
            let _ = store.set_fuel(spec.fuel.unwrap_or(UNLIMITED_FUEL));
        }
        store.epoch_deadline_callback(|mut ctx| {
            let data = ctx.data_mut();
            if data.cancel.is_cancelled() {
                data.stop = Some(Stop::Killed);
                return Ok(UpdateDeadline::Interrupt);
            }
            let used = data.cpu.used();
            if let Some(budget) = data.cpu_budget
                && used >= budget
            {
                data.stop = Some(Stop::CpuBudget);
                return Ok(UpdateDeadline::Interrupt);
            }
            if let Some(cap) = &mut data.cap {
                let now = Instant::now();
                let accrued = now.duration_since(cap.last_at).as_secs_f64() * cap.cpus;
                let spent = used.saturating_sub(cap.last_used).as_secs_f64();
                let burst = cap.cpus * CPU_CAP_WINDOW.as_secs_f64();
                cap.tokens = (cap.tokens + accrued).min(burst) - spent;
                cap.last_at = now;
                cap.last_used = used;
                if cap.tokens < 0.0 {
                    // Over its share: sleep until the debt is paid.
                    let wait = Duration::from_secs_f64(-cap.tokens / cap.cpus);
                    return Ok(UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(tokio::time::sleep(wait)),
                    ));
                }
            }
            // Give other tasks on this worker their turn (tokio's yield_now goes to the back of
            // the queue, unlike wasmtime's own yield).
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        store.set_epoch_deadline(1);
        store
    }

    async fn execute<W: Send + 'static>(
        &self,
        mut store: Store<TaskData<W>>,
        spec: &RunSpec,
        cancel: &CancellationToken,
        body: impl for<'a> FnOnce(
            &'a mut Store<TaskData<W>>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Ended, Failure>> + Send + 'a>,
        >,
    ) -> RunReport {
        let fuel_given = spec.fuel.unwrap_or(UNLIMITED_FUEL);
        let cpu = Arc::clone(&store.data().cpu);
        let result = {
            let fut = cpu.meter(body(&mut store));
            let timed = async {
                match spec.wall_limit {
                    Some(limit) => tokio::time::timeout(limit, fut)
                        .await
                        .unwrap_or(Err(Failure::WallTimeout(limit))),
                    None => fut.await,
                }
            };
            tokio::select! {
                r = timed => r,
                () = cancel.cancelled() => Err(Failure::Cancelled),
            }
        };
        store.data_mut().guest.flush();
        let usage = Usage {
            fuel_used: if self.inner.config.fuel {
                fuel_given.saturating_sub(store.get_fuel().unwrap_or(0))
            } else {
                0
            },
            mem_peak_bytes: store.data().limiter.peak(),
            ..Usage::default()
        };
        let data = store.data();
        let (outcome, output) = classify(result, data, spec);
        RunReport {
            outcome,
            usage,
            output,
        }
    }
}

/// Opens a task's stdout or stderr for appending, never through a symlink: the guest may
/// have shaped its sandbox, and the host writes as its own user.
fn open_log(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Writes a task's output file afresh: whatever the guest left under that name (a symlink
/// to a host file, say) is replaced, not written through.
fn write_output(path: &std::path::Path, out: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(out)
}

/// The clock of a task without the wall-clock grant: always the Unix epoch.
struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// How the body of a run ended without failing.
enum Ended {
    /// A command's exit status.
    Exit(i32),
    /// What an `agora:task` component's `run` returned.
    Output(Result<Vec<u8>, String>),
}

/// How the body of a run failed.
enum Failure {
    Instantiate(wasmtime::Error),
    Run(wasmtime::Error),
    WallTimeout(Duration),
    Cancelled,
}

/// The message of a wasmtime error: the trap or cause, then the Wasm backtrace if any.
fn describe(e: &wasmtime::Error) -> String {
    let mut msg = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{e:#}"),
    };
    let full = format!("{e:?}");
    if let Some(bt) = full.find("wasm backtrace:") {
        let lines: Vec<&str> = full[bt..].lines().take(12).collect();
        msg.push('\n');
        msg.push_str(&lines.join("\n"));
    }
    msg
}

fn classify<W>(
    result: Result<Ended, Failure>,
    data: &TaskData<W>,
    spec: &RunSpec,
) -> (Outcome, Option<Vec<u8>>) {
    let memory_limit = |detail: String| Outcome::MemoryLimit {
        limit: data.limiter.limit(),
        requested: data.limiter.denied().unwrap_or_default(),
        detail,
    };
    let outcome = match result {
        Ok(Ended::Output(Ok(output))) => return (Outcome::Exited(0), Some(output)),
        Ok(Ended::Output(Err(msg))) if data.limiter.denied().is_some() => {
            memory_limit(format!("the task then returned the error {msg:?}"))
        }
        Ok(Ended::Output(Err(msg))) => Outcome::TaskError(msg),
        Ok(Ended::Exit(code)) if code != 0 && data.limiter.denied().is_some() => {
            memory_limit(format!("the program then exited with status {code}"))
        }
        Ok(Ended::Exit(code)) => Outcome::Exited(code),
        Err(Failure::Cancelled) => Outcome::Killed,
        Err(Failure::WallTimeout(limit)) => Outcome::WallTimeout { limit },
        Err(Failure::Instantiate(e)) => match data.limiter.denied() {
            Some(required) => Outcome::InitialMemoryTooLarge {
                limit: data.limiter.limit(),
                required,
            },
            None => Outcome::InstantiationFailed(describe(&e)),
        },
        Err(Failure::Run(e)) => {
            if data.stop == Some(Stop::Killed) {
                return (Outcome::Killed, None);
            }
            if data.stop == Some(Stop::CpuBudget) {
                return (
                    Outcome::CpuBudget {
                        budget: spec.cpu_budget.unwrap_or_default(),
                    },
                    None,
                );
            }
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                let outcome = match exit.0 {
                    code if code != 0 && data.limiter.denied().is_some() => {
                        memory_limit(format!("the program then exited with status {code}"))
                    }
                    code => Outcome::Exited(code),
                };
                return (outcome, None);
            }
            if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
                return (
                    Outcome::OutOfFuel {
                        fuel: spec.fuel.unwrap_or(UNLIMITED_FUEL),
                    },
                    None,
                );
            }
            if data.limiter.denied().is_some() {
                return (
                    memory_limit(format!("the program then failed: {}", describe(&e))),
                    None,
                );
            }
            Outcome::Trap(describe(&e))
        }
    };
    (outcome, None)
}

const WASM_MAGIC: &[u8; 4] = b"\0asm";
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

/// A compiled module or component, before linking.
enum Compiled {
    Module(Module),
    Component(Component),
}

fn compile(inner: &Inner, bytes: &[u8], digest: String) -> Result<Program, LoadError> {
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        return Err(LoadError::NotWasm(format!(
            "{} bytes without the \\0asm header",
            bytes.len()
        )));
    }
    let version: [u8; 4] = [bytes[4], bytes[5], bytes[6], bytes[7]];
    let kind = if version == CORE_VERSION {
        "module"
    } else if version == COMPONENT_VERSION {
        "component"
    } else {
        return Err(LoadError::NotWasm(format!(
            "unknown WebAssembly version/layer {version:02x?}"
        )));
    };
    let from_disk = inner.disk.as_ref().and_then(|disk| {
        let artifact = disk.read(&digest, kind)?;
        // SAFETY: the artifact was written by an engine of this agent into its own cache
        // directory (0700), and is whole: its sha256 was checked just now. Wasmtime checks
        // that it was compiled for an engine compatible with this one and refuses it
        // otherwise (handled below).
        let loaded = unsafe {
            if kind == "module" {
                Module::deserialize(&inner.engine, &artifact).map(Compiled::Module)
            } else {
                Component::deserialize(&inner.engine, &artifact).map(Compiled::Component)
            }
        };
        match loaded {
            Ok(c) => {
                disk.hits.fetch_add(1, Ordering::Relaxed);
                Some(c)
            }
            Err(e) => {
                tracing::warn!(%digest, error = %format!("{e:#}"), "compiled-module cache entry refused by wasmtime; rebuilding it");
                disk.discard(&digest, kind);
                None
            }
        }
    });
    let compiled = match from_disk {
        Some(c) => c,
        None => {
            let c = if kind == "module" {
                Compiled::Module(
                    Module::new(&inner.engine, bytes)
                        .map_err(|e| LoadError::Invalid(format!("{e:#}")))?,
                )
            } else {
                Compiled::Component(
                    Component::new(&inner.engine, bytes)
                        .map_err(|e| LoadError::Invalid(format!("{e:#}")))?,
                )
            };
            if let Some(disk) = &inner.disk {
                let artifact = match &c {
                    Compiled::Module(m) => m.serialize(),
                    Compiled::Component(c) => c.serialize(),
                };
                match artifact {
                    Ok(a) => {
                        if let Err(e) = disk.write(&digest, kind, &a) {
                            tracing::warn!(%digest, error = %e, "writing the compiled-module cache");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%digest, error = %format!("{e:#}"), "serializing a compiled module");
                    }
                }
            }
            c
        }
    };
    let pre = match compiled {
        Compiled::Module(module) => {
            let has_start = module
                .get_export("_start")
                .is_some_and(|e| e.func().is_some());
            if !has_start {
                return Err(LoadError::NotACommand(
                    "the module exports no `_start` function".into(),
                ));
            }
            Pre::Module(
                inner
                    .p1
                    .instantiate_pre(&module)
                    .map_err(|e| LoadError::Link(format!("{e:#}")))?,
            )
        }
        Compiled::Component(component) => {
            let pre = inner
                .p2
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Link(format!("{e:#}")))?;
            match TaskPre::new(pre.clone()) {
                Ok(task) => Pre::Task(task),
                Err(task_err) => match CommandPre::new(pre) {
                    Ok(cmd) => Pre::Component(cmd),
                    Err(cmd_err) => {
                        return Err(LoadError::NotACommand(format!(
                            "the component exports neither agora:task's `run: func(input: list<u8>) -> result<list<u8>, string>` ({task_err:#}) nor wasi:cli/run ({cmd_err:#})"
                        )));
                    }
                },
            }
        }
    };
    Ok(Program {
        digest: digest.into(),
        pre,
    })
}
