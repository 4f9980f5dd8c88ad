//! [`WasmRuntime`]: one wasmtime engine per agent, its epoch ticker, the linkers for WASI
//! preview 1 and preview 2, the program cache, and the code that runs one task in one store.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    Config, Engine, InstancePre, Linker, Module, OptLevel, Store, Strategy, Trap, UpdateDeadline,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::{CacheStats, ProgramCache};
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
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            epoch_tick: Duration::from_millis(10),
            cache_capacity: 64,
            max_output_bytes: 64 << 20,
            max_wasm_stack: 1 << 20,
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
}

/// The state each store holds: the WASI context plus the task's limits and stop flags.
pub(crate) struct TaskData<W> {
    wasi: W,
    limiter: MemoryLimiter,
    cpu: Arc<CpuMeter>,
    cpu_budget: Option<Duration>,
    cancel: CancellationToken,
    stop: Option<Stop>,
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
        }
    }
}

/// What one run is given.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// argv, including argv[0] (conventionally the task's name).
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The task's sandbox directory, preopened as `/`.
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
    config: WasmConfig,
    _ticker: Ticker,
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
        let mut c = Config::new();
        c.strategy(Strategy::Cranelift)
            .cranelift_opt_level(OptLevel::Speed)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            // Host frames run on the same fiber stack; leave them room above the Wasm stack.
            .async_stack_size(config.max_wasm_stack + (1 << 20))
            .async_stack_zeroing(true)
            .wasm_memory64(false);
        let engine = Engine::new(&c).map_err(|e| WasmError::Engine(format!("{e:#}")))?;

        let mut p1 = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |d: &mut TaskData<WasiP1Ctx>| &mut d.wasi)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        let mut p2 = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2)
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
        Ok(WasmRuntime {
            inner: Arc::new(Inner {
                engine,
                p1,
                p2,
                cache: ProgramCache::new(config.cache_capacity),
                config,
                _ticker: Ticker {
                    stop,
                    thread: Some(thread),
                },
            }),
        })
    }

    pub fn config(&self) -> &WasmConfig {
        &self.inner.config
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
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

    /// Runs one instance of `program` until it ends, is cancelled, or hits a limit.
    pub async fn run(
        &self,
        program: &Program,
        spec: RunSpec,
        cancel: CancellationToken,
    ) -> RunReport {
        let started = Instant::now();
        let cpu = CpuMeter::new();
        let mut builder = match self.wasi_builder(&spec) {
            Ok(b) => b,
            Err(msg) => {
                return RunReport {
                    outcome: Outcome::InstantiationFailed(msg),
                    usage: Usage::default(),
                };
            }
        };
        fn data<W>(
            wasi: W,
            spec: &RunSpec,
            cpu: &Arc<CpuMeter>,
            cancel: &CancellationToken,
        ) -> TaskData<W> {
            TaskData {
                wasi,
                limiter: MemoryLimiter::new(spec.memory_limit),
                cpu: Arc::clone(cpu),
                cpu_budget: spec.cpu_budget,
                cancel: cancel.clone(),
                stop: None,
            }
        }
        let mut report = match &program.pre {
            Pre::Module(pre) => {
                let pre = pre.clone();
                let store = self.new_store(data(builder.build_p1(), &spec, &cpu, &cancel), &spec);
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
                        Ok(0)
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
                let store = self.new_store(data(wasi, &spec, &cpu, &cancel), &spec);
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
                        Ok(if result.is_ok() { 0 } else { 1 })
                    })
                })
                .await
            }
        };
        report.usage.wall = started.elapsed();
        report.usage.cpu = cpu.used();
        report
    }

    fn wasi_builder(&self, spec: &RunSpec) -> Result<WasiCtxBuilder, String> {
        let open = |path: &PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
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
        b.preopened_dir(&spec.sandbox, "/", FsPerms::ReadWrite)
            .map_err(|e| format!("preopening the sandbox {}: {e:#}", spec.sandbox.display()))?;
        Ok(b)
    }

    fn new_store<W: Send + 'static>(
        &self,
        data: TaskData<W>,
        spec: &RunSpec,
    ) -> Store<TaskData<W>> {
        let mut store = Store::new(&self.inner.engine, data);
        store.limiter(|d| &mut d.limiter);
        // Fuel is always on (for metering); a task without a cap gets all there is.
        let _ = store.set_fuel(spec.fuel.unwrap_or(UNLIMITED_FUEL));
        store.epoch_deadline_callback(|mut ctx| {
            let data = ctx.data_mut();
            if data.cancel.is_cancelled() {
                data.stop = Some(Stop::Killed);
                return Ok(UpdateDeadline::Interrupt);
            }
            if let Some(budget) = data.cpu_budget
                && data.cpu.used() >= budget
            {
                data.stop = Some(Stop::CpuBudget);
                return Ok(UpdateDeadline::Interrupt);
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
            Box<dyn std::future::Future<Output = Result<i32, Failure>> + Send + 'a>,
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
        let usage = Usage {
            fuel_used: fuel_given.saturating_sub(store.get_fuel().unwrap_or(0)),
            mem_peak_bytes: store.data().limiter.peak(),
            ..Usage::default()
        };
        let data = store.data();
        RunReport {
            outcome: classify(result, data, spec),
            usage,
        }
    }
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

fn classify<W>(result: Result<i32, Failure>, data: &TaskData<W>, spec: &RunSpec) -> Outcome {
    let memory_limit = |detail: String| Outcome::MemoryLimit {
        limit: data.limiter.limit(),
        requested: data.limiter.denied().unwrap_or_default(),
        detail,
    };
    match result {
        Ok(code) if code != 0 && data.limiter.denied().is_some() => {
            memory_limit(format!("the program then exited with status {code}"))
        }
        Ok(code) => Outcome::Exited(code),
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
                return Outcome::Killed;
            }
            if data.stop == Some(Stop::CpuBudget) {
                return Outcome::CpuBudget {
                    budget: spec.cpu_budget.unwrap_or_default(),
                };
            }
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                return match exit.0 {
                    code if code != 0 && data.limiter.denied().is_some() => {
                        memory_limit(format!("the program then exited with status {code}"))
                    }
                    code => Outcome::Exited(code),
                };
            }
            if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
                return Outcome::OutOfFuel {
                    fuel: spec.fuel.unwrap_or(UNLIMITED_FUEL),
                };
            }
            if data.limiter.denied().is_some() {
                return memory_limit(format!("the program then failed: {}", describe(&e)));
            }
            Outcome::Trap(describe(&e))
        }
    }
}

const WASM_MAGIC: &[u8; 4] = b"\0asm";
const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

fn compile(inner: &Inner, bytes: &[u8], digest: String) -> Result<Program, LoadError> {
    if bytes.len() < 8 || &bytes[..4] != WASM_MAGIC {
        return Err(LoadError::NotWasm(format!(
            "{} bytes without the \\0asm header",
            bytes.len()
        )));
    }
    let version: [u8; 4] = [bytes[4], bytes[5], bytes[6], bytes[7]];
    let pre = if version == CORE_VERSION {
        let module =
            Module::new(&inner.engine, bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
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
    } else if version == COMPONENT_VERSION {
        let component = Component::new(&inner.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        let pre = inner
            .p2
            .instantiate_pre(&component)
            .map_err(|e| LoadError::Link(format!("{e:#}")))?;
        Pre::Component(CommandPre::new(pre).map_err(|e| {
            LoadError::NotACommand(format!("the component does not export wasi:cli/run: {e:#}"))
        })?)
    } else {
        return Err(LoadError::NotWasm(format!(
            "unknown WebAssembly version/layer {version:02x?}"
        )));
    };
    Ok(Program {
        digest: digest.into(),
        pre,
    })
}
