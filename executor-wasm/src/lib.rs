//! The WebAssembly executor: runs Agora's Wasm tasks under wasmtime with hard limits.
//!
//! It knows nothing of masters or agents: the agent's Wasm containerizer hands it module bytes
//! and a [`RunSpec`] (arguments, environment, sandbox directory, limits) and gets back a
//! [`RunReport`] saying how the task ended and what it used.
//!
//! What a task gets:
//!
//! - **CPU**: a budget of CPU time (the task's `cpus` × its time limit) measured per task as
//!   the thread CPU time spent polling it, checked on every epoch tick; plus an optional fuel
//!   cap for deterministic limits. Each tick the task yields to the tokio scheduler, so a
//!   spinning task cannot starve others.
//! - **Memory**: a ceiling on the *sum* of its linear memories ([`limits::MemoryLimiter`]);
//!   growth past it fails, and a module whose initial memory exceeds it is refused.
//! - **WASI**: only the arguments and environment it was given, its sandbox directory
//!   preopened as `/`, stdout and stderr into files of the sandbox (size-capped), no network,
//!   nothing of the host's environment.
//!
//! Programs are WASI preview 1 command modules (`_start`) or WASI preview 2 command
//! components (`wasi:cli/run`); compiled programs are cached by the sha256 of their bytes.
//!
//! # Layout
//!
//! - [`runtime`]: [`WasmRuntime`] — the engine, the epoch ticker, loading and running.
//! - [`cache`]: compiled programs by content hash, with concurrent loads of one module
//!   compiled once.
//! - [`limits`]: the memory limiter and the per-task CPU meter.
//! - [`output`]: size-capped stdout/stderr files.
//! - [`outcome`]: how a run ended, and the usage it reports.

pub mod cache;
pub mod limits;
pub mod outcome;
pub mod output;
pub mod runtime;

pub use cache::CacheStats;
pub use outcome::{Outcome, RunReport, Usage};
pub use runtime::{
    LoadError, ModuleSource, Program, ProgramKind, RunSpec, WasmConfig, WasmError, WasmRuntime,
};
pub use tokio_util::sync::CancellationToken;

/// `sha256:<hex>` of `bytes`, the form digests take on the wire.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}
