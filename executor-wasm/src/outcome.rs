//! How a Wasm run ended and what it used.

use std::fmt;
use std::time::Duration;

/// Why a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program returned or called `proc_exit`; 0 is success.
    Exited(i32),
    /// The program trapped (unreachable, stack overflow, out-of-bounds access, ...).
    Trap(String),
    /// The fuel cap was used up.
    OutOfFuel { fuel: u64 },
    /// The CPU-time budget was used up.
    CpuBudget { budget: Duration },
    /// The wall-clock limit passed.
    WallTimeout { limit: Duration },
    /// A memory growth was refused by the task's ceiling and the program died of it.
    MemoryLimit {
        limit: u64,
        requested: u64,
        detail: String,
    },
    /// The program needs more initial linear memory than the task may have.
    InitialMemoryTooLarge { limit: u64, required: u64 },
    /// The program could not be instantiated (for a reason other than memory).
    InstantiationFailed(String),
    /// The run was cancelled (the task was killed).
    Killed,
    /// An `agora:task` component's `run` returned an error.
    TaskError(String),
}

const MIB: f64 = 1024.0 * 1024.0;

impl Outcome {
    pub fn is_success(&self) -> bool {
        *self == Outcome::Exited(0)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(0) => f.write_str("exited with status 0"),
            Outcome::Exited(code) => write!(f, "exited with status {code}"),
            Outcome::Trap(msg) => write!(f, "wasm trap: {msg}"),
            Outcome::OutOfFuel { fuel } => write!(f, "fuel exhausted: used all {fuel} units"),
            Outcome::CpuBudget { budget } => write!(
                f,
                "CPU budget exhausted: used {:.3}s of CPU time (cpus × time limit)",
                budget.as_secs_f64()
            ),
            Outcome::WallTimeout { limit } => write!(
                f,
                "time limit reached: still running after {:.3}s",
                limit.as_secs_f64()
            ),
            Outcome::MemoryLimit {
                limit,
                requested,
                detail,
            } => write!(
                f,
                "memory limit exceeded: linear memory growth to {:.1} MiB refused (limit {:.1} MiB); {detail}",
                *requested as f64 / MIB,
                *limit as f64 / MIB
            ),
            Outcome::InitialMemoryTooLarge { limit, required } => write!(
                f,
                "module needs at least {:.1} MiB of initial linear memory, more than the task's mem of {:.1} MiB",
                *required as f64 / MIB,
                *limit as f64 / MIB
            ),
            Outcome::InstantiationFailed(msg) => write!(f, "instantiation failed: {msg}"),
            Outcome::Killed => f.write_str("killed"),
            Outcome::TaskError(msg) => write!(f, "the task failed: {msg}"),
        }
    }
}

/// What a run used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub fuel_used: u64,
    pub cpu: Duration,
    pub wall: Duration,
    pub mem_peak_bytes: u64,
}

/// The result of [`crate::WasmRuntime::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub outcome: Outcome,
    pub usage: Usage,
    /// What an `agora:task` component's `run` returned on success (also written to the
    /// sandbox's `output` file).
    pub output: Option<Vec<u8>>,
}
