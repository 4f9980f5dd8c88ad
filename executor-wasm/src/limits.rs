//! Per-task limits: a ceiling on the sum of a task's linear memories, and a meter of the CPU
//! time the task has used.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// Most table elements a task may have in one table.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Most core instances per store (a component is made of several).
pub const MAX_INSTANCES: usize = 64;
/// Most tables per store.
pub const MAX_TABLES: usize = 64;
/// Most linear memories per store.
pub const MAX_MEMORIES: usize = 16;

/// Caps the total bytes of all linear memories of one store.
///
/// `StoreLimits` caps each memory separately, so a module with several memories could use
/// several times its allowance; this limiter keeps one running total. A denied growth makes
/// `memory.grow` return -1 as the spec says; what the guest does next is up to it (a Rust
/// guest aborts), so the denial is remembered here and reported as the reason.
#[derive(Debug, Clone)]
pub struct MemoryLimiter {
    limit: usize,
    used: usize,
    peak: usize,
    /// Where readers outside the store see `used` and `peak`.
    live: Option<Arc<LiveUsage>>,
    /// The growth in flight, undone if wasmtime then fails to grow.
    pending: Option<(usize, usize)>,
    /// The total the guest asked for when it was first refused.
    denied: Option<usize>,
}

impl MemoryLimiter {
    pub fn new(limit_bytes: u64) -> Self {
        MemoryLimiter {
            limit: usize::try_from(limit_bytes).unwrap_or(usize::MAX),
            used: 0,
            peak: 0,
            live: None,
            pending: None,
            denied: None,
        }
    }

    /// Also publishes the memory in use to `live`.
    pub fn with_live(mut self, live: Arc<LiveUsage>) -> Self {
        self.live = Some(live);
        self
    }

    fn publish(&self) {
        if let Some(l) = &self.live {
            l.mem.store(self.used as u64, Ordering::Relaxed);
            l.mem_peak.store(self.peak as u64, Ordering::Relaxed);
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit as u64
    }

    /// Bytes of linear memory in use now.
    pub fn used(&self) -> u64 {
        self.used as u64
    }

    /// The most linear memory the task held at once.
    pub fn peak(&self) -> u64 {
        self.peak as u64
    }

    /// The total the task asked for when a growth was first refused.
    pub fn denied(&self) -> Option<u64> {
        self.denied.map(|d| d as u64)
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.denied.get_or_insert(total);
            return Ok(false);
        }
        self.pending = Some((current, desired));
        self.used = total;
        self.peak = self.peak.max(total);
        self.publish();
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        if let Some((current, desired)) = self.pending.take() {
            self.used = self.used.saturating_sub(desired).saturating_add(current);
        }
        self.publish();
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A running task's usage, readable from outside its store while it runs (for live
/// statistics): CPU time, wall time, linear memory now and at peak.
#[derive(Debug)]
pub struct LiveUsage {
    pub(crate) cpu: Arc<CpuMeter>,
    mem: AtomicU64,
    mem_peak: AtomicU64,
    started: std::time::Instant,
}

impl Default for LiveUsage {
    fn default() -> Self {
        LiveUsage {
            cpu: CpuMeter::new(),
            mem: AtomicU64::new(0),
            mem_peak: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

impl LiveUsage {
    pub fn new() -> Arc<Self> {
        Arc::new(LiveUsage::default())
    }

    /// The usage so far (fuel is known only when the run ends).
    pub fn snapshot(&self) -> crate::Usage {
        crate::Usage {
            fuel_used: 0,
            cpu: self.cpu.used(),
            wall: self.started.elapsed(),
            mem_peak_bytes: self.mem_peak.load(Ordering::Relaxed),
        }
    }

    /// Linear memory in use now, in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem.load(Ordering::Relaxed)
    }
}

/// CPU time consumed by the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_THREAD_CPUTIME_ID is supported on
    // every Linux kernel we run on; the call writes only into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Counts the CPU time a task's future spends being polled — the time its Wasm runs — so a
/// budget is charged for work done, not for time spent waiting on a busy machine.
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// CPU time of completed polls.
    done_ns: AtomicU64,
    /// The thread's CPU clock when the current poll began (0 when not polling).
    poll_start_ns: AtomicU64,
}

impl CpuMeter {
    pub fn new() -> Arc<Self> {
        Arc::new(CpuMeter::default())
    }

    /// CPU time used so far, including the poll in progress when called from inside it (as the
    /// epoch callback is).
    pub fn used(&self) -> Duration {
        let mut ns = self.done_ns.load(Ordering::Relaxed);
        let start = self.poll_start_ns.load(Ordering::Relaxed);
        if start != 0 {
            ns += thread_cpu_ns().saturating_sub(start);
        }
        Duration::from_nanos(ns)
    }

    /// Wraps `fut` so that every poll of it is charged to this meter.
    pub fn meter<F: Future>(self: &Arc<Self>, fut: F) -> Metered<F> {
        Metered {
            meter: Arc::clone(self),
            fut: Box::pin(fut),
        }
    }
}

/// A future whose polls are charged to a [`CpuMeter`].
pub struct Metered<F> {
    meter: Arc<CpuMeter>,
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for Metered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let start = thread_cpu_ns().max(1);
        self.meter.poll_start_ns.store(start, Ordering::Relaxed);
        let out = self.fut.as_mut().poll(cx);
        let spent = thread_cpu_ns().saturating_sub(start);
        self.meter.poll_start_ns.store(0, Ordering::Relaxed);
        self.meter.done_ns.fetch_add(spent, Ordering::Relaxed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn limits_the_sum_of_memories() {
        let mib = 1 << 20;
        let mut l = MemoryLimiter::new(4 * mib as u64);
        assert!(l.memory_growing(0, mib, None).unwrap()); // memory a
        assert!(l.memory_growing(0, mib, None).unwrap()); // memory b
        assert!(l.memory_growing(mib, 2 * mib, None).unwrap()); // a grows to 2 MiB
        assert!(!l.memory_growing(mib, 3 * mib, None).unwrap()); // b to 3 MiB: 5 > 4
        assert_eq!(l.denied(), Some(5 * mib as u64));
        assert!(l.memory_growing(mib, 2 * mib, None).unwrap()); // b to 2 MiB: exactly 4
        assert_eq!(l.used(), 4 * mib as u64);
        assert_eq!(l.peak(), 4 * mib as u64);
    }

    #[test]
    fn failed_growth_is_rolled_back() {
        let mut l = MemoryLimiter::new(10 << 20);
        assert!(l.memory_growing(0, 1 << 20, None).unwrap());
        assert!(l.memory_growing(1 << 20, 8 << 20, None).unwrap());
        l.memory_grow_failed(wasmtime::format_err!("mmap failed"))
            .unwrap();
        assert_eq!(l.used(), 1 << 20);
    }

    #[test]
    fn meter_counts_cpu_time_of_polls() {
        let meter = CpuMeter::new();
        let fut = meter.meter(async {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < Duration::from_millis(30) {
                x = std::hint::black_box(x + 1);
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(fut);
        let used = meter.used();
        assert!(used >= Duration::from_millis(20), "{used:?}");
        assert!(used < Duration::from_secs(2), "{used:?}");
    }
}
