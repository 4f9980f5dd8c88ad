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
//! - **WASI**: only the arguments and environment it was given and the capabilities it was
//!   granted ([`Capabilities`]: its sandbox, volumes, outbound addresses, the wall clock,
//!   randomness); stdout and stderr into files of the sandbox (size-capped).
//!
//! Programs are WASI preview 1 command modules (`_start`), WASI preview 2 command
//! components (`wasi:cli/run`), or components of the `agora:task` world (`run(input)`, with
//! log, progress and messages to the framework); compiled programs are cached by the
//! sha256 of their bytes, in memory and on disk.
//!
//! # Layout
//!
//! - [`runtime`]: [`WasmRuntime`] — the engine, the epoch ticker, loading and running.
//! - [`cache`]: compiled programs by content hash, in memory and on disk (keyed also by the
//!   engine's compatibility fingerprint), with concurrent loads of one module compiled once.
//! - [`caps`]: capabilities — preopens, network allow-lists, clock and randomness.
//! - [`guest`]: the host side of the `agora:task` world (log, progress, messages, `run`).
//! - [`limits`]: the memory limiter and the per-task CPU meter.
//! - [`output`]: size-capped stdout/stderr files.
//! - [`outcome`]: how a run ended, and the usage it reports.

pub mod cache;
pub mod caps;
pub mod guest;
pub mod limits;
pub mod outcome;
pub mod output;
pub mod runtime;

pub use cache::CacheStats;
pub use caps::{AddrPattern, Capabilities, Preopen};
pub use guest::{GuestEvent, GuestEvents, Level};
pub use limits::LiveUsage;
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
