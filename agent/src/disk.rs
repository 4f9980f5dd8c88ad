//! Disk use: how much a sandbox holds, how full the work directory's filesystem is, and the
//! `disk` resource of tasks enforced (Mesos's `disk/du` isolator with
//! `--enforce_container_disk_quota`): native tasks, tasks in executors (custom ones and the
//! Wasm executor) and Wasm tasks in the agent's process.
//!
//! ```text
//!  task with disk: D MiB ──> every interval: walk its sandbox (links not followed, at most
//!                            MAX_WALK entries, off the async workers)
//!      usage > D ──> the task is killed: TASK_FAILED, REASON_CONTAINER_LIMITATION_DISK,
//!                    "... disk usage X MiB ... limit of D MiB"
//!  task without disk ──> not measured (as in Mesos: it has no quota; sandbox GC and the log
//!                        caps still bound what it leaves)
//! ```
//!
//! Usage is what the files occupy (allocated blocks, as `du` counts), each inode once, so
//! sparse files count what they hold and hard links count once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_core::TaskState;
use agora_proto::v1;
use cap_std::ambient_authority;
use cap_std::fs::{Dir, MetadataExt};
use tokio_util::sync::CancellationToken;

use crate::containerizer::{Container, Termination, Updates, UsageProbe};

/// Most entries one walk of a sandbox visits: the cost of a measurement is bounded, and a
/// sandbox with more is measured by its first `MAX_WALK` entries.
pub const MAX_WALK: usize = 1_000_000;

/// Default time between two measurements of a task's sandbox (Mesos's
/// `--container_disk_watch_interval`).
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(15);

/// Errors measuring disk use.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("measuring sandbox {path}: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the filesystem usage of {path}: {source}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What a walk of a directory found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes allocated to its files and directories.
    pub bytes: u64,
    /// Entries visited.
    pub entries: usize,
    /// False when the walk stopped at its entry bound: `bytes` is then a lower bound.
    pub complete: bool,
}

/// The bytes `dir` occupies, without following links (inside it or swapped in during the
/// walk: every directory is opened relative to its parent, never by path) and visiting at
/// most `max_entries` entries.
///
/// # Errors
/// When `dir` itself cannot be opened; entries that vanish during the walk are skipped.
pub fn du(dir: &Path, max_entries: usize) -> Result<Usage, DiskError> {
    let root =
        Dir::open_ambient_dir(dir, ambient_authority()).map_err(|source| DiskError::Walk {
            path: dir.to_owned(),
            source,
        })?;
    let mut usage = Usage {
        complete: true,
        ..Usage::default()
    };
    let mut seen = HashSet::new();
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        let Ok(entries) = d.entries() else { continue };
        for e in entries.flatten() {
            if usage.entries >= max_entries {
                usage.complete = false;
                return Ok(usage);
            }
            usage.entries += 1;
            // Neither follows a link.
            let (Ok(kind), Ok(meta)) = (e.file_type(), e.metadata()) else {
                continue;
            };
            if meta.nlink() > 1 && !kind.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.bytes = usage
                .bytes
                .saturating_add(meta.blocks().saturating_mul(512));
            if kind.is_dir()
                && let Ok(sub) = e.open_dir()
            {
                stack.push(sub);
            }
        }
    }
    Ok(usage)
}

/// How full the filesystem holding `path` is, from 0 to 1, as `df` shows it: used blocks
/// over used plus available ones (blocks reserved for root count as neither, so a disk
/// that unprivileged writers have filled reads 1).
///
/// # Errors
/// When `statvfs` fails.
pub fn fs_usage(path: &Path) -> Result<f64, DiskError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|source| DiskError::Statvfs {
        path: path.to_owned(),
        source,
    })?;
    let used = s.blocks().saturating_sub(s.blocks_free()) as f64;
    let avail = s.blocks_available() as f64;
    if used + avail <= 0.0 {
        return Ok(0.0);
    }
    Ok((used / (used + avail)).clamp(0.0, 1.0))
}

const MIB: f64 = (1u64 << 20) as f64;

/// A sandbox went past its task's `disk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    pub usage: u64,
    pub limit: u64,
}

impl Exceeded {
    /// The message of the task's TASK_FAILED update, naming the limit and the usage.
    pub fn message(&self) -> String {
        format!(
            "disk usage {:.1} MiB of the sandbox exceeds the task's disk limit of {:.1} MiB",
            self.usage as f64 / MIB,
            self.limit as f64 / MIB
        )
    }
}

/// Watches one sandbox against a byte limit.
#[derive(Debug, Clone)]
pub struct Quota {
    pub dir: PathBuf,
    pub limit: u64,
    pub interval: Duration,
}

impl Quota {
    /// The quota of a task with `disk_mib` of disk in `dir`; `None` when the task asks for
    /// no disk, enforcement is off (`interval` `None`) or the amount is out of range.
    pub fn of(dir: &Path, disk_mib: f64, interval: Option<Duration>) -> Option<Quota> {
        // At most a day: within what timers can add to a clock reading.
        let interval = interval
            .filter(|i| !i.is_zero())?
            .min(Duration::from_secs(24 * 3600));
        if disk_mib <= 0.0 {
            return None;
        }
        let mib =
            agora_core::limits::number("resources.disk", disk_mib, 0.0, (u64::MAX >> 21) as f64)
                .ok()?;
        let limit = (mib * MIB) as u64;
        Some(Quota {
            dir: dir.to_owned(),
            limit,
            interval,
        })
    }

    /// Resolves once a measurement finds the sandbox over its limit; never otherwise. A
    /// measurement that fails (the sandbox is being removed) is logged and retried.
    pub async fn exceeded(&self) -> Exceeded {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let dir = self.dir.clone();
            let measured = tokio::task::spawn_blocking(move || du(&dir, MAX_WALK)).await;
            match measured {
                Ok(Ok(u)) => {
                    if !u.complete {
                        tracing::warn!(sandbox = %self.dir.display(), entries = u.entries, "sandbox has more entries than one measurement visits; measured the first");
                    }
                    if u.bytes > self.limit {
                        return Exceeded {
                            usage: u.bytes,
                            limit: self.limit,
                        };
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "measuring a sandbox"),
                Err(e) => tracing::warn!(error = %e, "the sandbox measurement failed"),
            }
        }
    }
}

/// Runs a task (`run`, given the token that kills it) under `quota`: when a measurement
/// finds the sandbox over it, the task is killed as a KILL would (SIGTERM, grace, SIGKILL;
/// or the executor's kill) and ends in TASK_FAILED with REASON_CONTAINER_LIMITATION_DISK
/// and a message naming the limit and the usage. Without a quota, `run` runs as it is.
pub async fn enforce<F>(
    quota: Option<Quota>,
    kill: CancellationToken,
    run: impl FnOnce(CancellationToken) -> F,
) -> Termination
where
    F: std::future::Future<Output = Termination>,
{
    let Some(quota) = quota else {
        return run(kill).await;
    };
    let inner = kill.child_token();
    let task = run(inner.clone());
    tokio::pin!(task);
    let over = tokio::select! {
        end = &mut task => return end,
        over = quota.exceeded() => over,
    };
    tracing::warn!(sandbox = %quota.dir.display(), usage = over.usage, limit = over.limit, "the task exceeded its disk; killing it");
    inner.cancel();
    let end = task.await;
    let mut t = Termination::new(
        TaskState::Failed,
        v1::Reason::ContainerLimitationDisk,
        over.message(),
    );
    t.usage = end.usage;
    t.isolation = end.isolation;
    t
}

/// Waits for `quota` to be exceeded; for no quota, waits for ever.
pub async fn watch(quota: Option<&Quota>) -> Exceeded {
    match quota {
        Some(q) => q.exceeded().await,
        None => std::future::pending().await,
    }
}

/// The agent's disk counters, for GetMetrics.
pub(crate) fn metrics(gc: &crate::gc::Gc, wasm: &crate::WasmContainerizer) -> Vec<(String, f64)> {
    let (modules, compiled) = wasm.evictions();
    vec![
        (
            "agora_agent_gc_sandboxes_removed_total".into(),
            gc.removed() as f64,
        ),
        (
            "agora_agent_module_store_evictions_total".into(),
            modules as f64,
        ),
        (
            "agora_agent_wasm_cache_evictions_total".into(),
            compiled as f64,
        ),
    ]
}

/// A container whose task is held to `quota` by [`enforce`] (for containers that do not
/// enforce it themselves: Wasm tasks in the agent's process).
struct Enforced {
    inner: Box<dyn Container>,
    quota: Option<Quota>,
}

/// `container`, run under `quota`.
pub(crate) fn enforced(container: Box<dyn Container>, quota: Option<Quota>) -> Box<dyn Container> {
    Box::new(Enforced {
        inner: container,
        quota,
    })
}

#[async_trait::async_trait]
impl Container for Enforced {
    async fn run(self: Box<Self>, kill: CancellationToken, updates: Updates) -> Termination {
        let Enforced { inner, quota } = *self;
        enforce(quota, kill, |kill| inner.run(kill, updates)).await
    }

    fn usage_probe(&self) -> Option<UsageProbe> {
        self.inner.usage_probe()
    }

    fn pid(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU32>> {
        self.inner.pid()
    }

    fn isolation(&self) -> Option<String> {
        self.inner.isolation()
    }

    fn reports_running(&self) -> bool {
        self.inner.reports_running()
    }

    fn executor(&self) -> Option<agora_core::ExecutorId> {
        self.inner.executor()
    }
}

/// A container that holds pins (of its module in the store, of its compiled artifact) until
/// its task ends.
struct Pinned {
    inner: Box<dyn Container>,
    _pins: Vec<agora_executor_wasm::cache::Pin>,
}

/// `container`, keeping `pins` until it has run.
pub(crate) fn pinned(
    container: Box<dyn Container>,
    pins: Vec<agora_executor_wasm::cache::Pin>,
) -> Box<dyn Container> {
    Box::new(Pinned {
        inner: container,
        _pins: pins,
    })
}

#[async_trait::async_trait]
impl Container for Pinned {
    async fn run(self: Box<Self>, kill: CancellationToken, updates: Updates) -> Termination {
        let Pinned { inner, _pins } = *self;
        inner.run(kill, updates).await
    }

    fn usage_probe(&self) -> Option<UsageProbe> {
        self.inner.usage_probe()
    }

    fn pid(&self) -> Option<std::sync::Arc<std::sync::atomic::AtomicU32>> {
        self.inner.pid()
    }

    fn isolation(&self) -> Option<String> {
        self.inner.isolation()
    }

    fn reports_running(&self) -> bool {
        self.inner.reports_running()
    }

    fn executor(&self) -> Option<agora_core::ExecutorId> {
        self.inner.executor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn du_counts_blocks_once_and_does_not_follow_links() {
        let sandbox = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("big"), vec![7u8; 4 << 20]).unwrap();
        std::fs::create_dir(sandbox.path().join("sub")).unwrap();
        std::fs::write(sandbox.path().join("sub/data"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(
            sandbox.path().join("sub/data"),
            sandbox.path().join("again"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), sandbox.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("big"), sandbox.path().join("big")).unwrap();
        // Sparse: a hole claims no blocks.
        let sparse = std::fs::File::create(sandbox.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();

        let u = du(sandbox.path(), MAX_WALK).unwrap();
        assert!(u.complete);
        assert!(u.bytes >= 1 << 20, "{u:?}");
        // The 1 MiB file once, a few directory blocks; not the 4 MiB behind the links.
        assert!(u.bytes < (1 << 20) + (256 << 10), "{u:?}");

        let u = du(sandbox.path(), 2).unwrap();
        assert!(!u.complete);
        assert_eq!(u.entries, 2);
    }

    #[tokio::test]
    async fn a_quota_fires_once_the_sandbox_is_over_it() {
        let sandbox = tempfile::tempdir().unwrap();
        let q = Quota::of(sandbox.path(), 1.0, Some(Duration::from_millis(10))).unwrap();
        assert!(Quota::of(sandbox.path(), 0.0, Some(Duration::from_secs(1))).is_none());
        assert!(Quota::of(sandbox.path(), 1.0, None).is_none());
        let under = tokio::time::timeout(Duration::from_millis(200), q.exceeded()).await;
        assert!(under.is_err(), "fired while under its limit");
        std::fs::write(sandbox.path().join("fill"), vec![1u8; 2 << 20]).unwrap();
        let over = tokio::time::timeout(Duration::from_secs(10), q.exceeded())
            .await
            .unwrap();
        assert_eq!(over.limit, 1 << 20);
        assert!(over.usage >= 2 << 20);
        let m = over.message();
        assert!(
            m.contains("limit of 1.0 MiB") && m.contains("disk usage 2."),
            "{m}"
        );
    }

    #[tokio::test]
    async fn a_task_over_its_quota_is_killed_and_fails_with_the_disk_reason() {
        let sandbox = tempfile::tempdir().unwrap();
        let q = Quota::of(sandbox.path(), 1.0, Some(Duration::from_millis(10)));
        let dir = sandbox.path().to_owned();
        let end = tokio::time::timeout(
            Duration::from_secs(10),
            enforce(q, CancellationToken::new(), |kill| async move {
                std::fs::write(dir.join("fill"), vec![1u8; 2 << 20]).unwrap();
                kill.cancelled().await;
                Termination::new(TaskState::Killed, v1::Reason::TaskKilled, "killed")
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            (end.state, end.reason),
            (TaskState::Failed, v1::Reason::ContainerLimitationDisk)
        );
        assert!(
            end.message.contains("disk limit of 1.0 MiB"),
            "{}",
            end.message
        );

        // Under its quota, a task ends as it ends.
        let q = Quota::of(sandbox.path(), 100.0, Some(Duration::from_millis(10)));
        let end = enforce(q, CancellationToken::new(), |_| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Termination::new(TaskState::Finished, v1::Reason::Unspecified, "done")
        })
        .await;
        assert_eq!(end.state, TaskState::Finished);
    }

    #[test]
    fn fs_usage_is_a_fraction() {
        let u = fs_usage(Path::new("/")).unwrap();
        assert!((0.0..=1.0).contains(&u));
    }
}
