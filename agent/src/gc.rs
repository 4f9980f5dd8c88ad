//! Garbage collection of finished sandboxes, as Mesos's agent does it (`--gc_delay`,
//! `--disk_watch_interval`, `--gc_disk_headroom`).
//!
//! ```text
//!  a task's runner ends ──> its run directory is scheduled (now)
//!  an executor's process ends ──> its run directory is scheduled (now)
//!  the agent starts ──> every run directory a previous agent left is scheduled (at its
//!                       last change), but those of the tasks and executors it re-attaches
//!                       to: those are scheduled when they end, as this agent's own
//!  the agent stops, leaving its tasks running ──> nothing more is scheduled
//!  every disk watch ──> max age = gc_delay × max(0, 1 − headroom − usage of the work
//!                       directory's filesystem)
//!  a scheduled directory older than the max age ──> removed (links inside are removed,
//!                       never followed), then its empty parents up to `frameworks/`
//! ```
//!
//! Only directories the agent scheduled are removed — paths from its own bookkeeping,
//! never read from a sandbox — and a run directory is scheduled only once its task or
//! executor has ended, so a running task's sandbox is never removed.
//!
//! The rule that decides ([`max_age`]) and the schedule ([`Schedule`]) are pure: time and
//! disk usage are passed in.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

/// Settings of sandbox garbage collection.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// How long a finished sandbox is kept when the disk has room. Default 1 day (Mesos
    /// keeps a week; an agent here has no checkpoint of its finished tasks to serve their
    /// sandboxes for, and a day leaves time to read a failed task's logs).
    pub delay: Duration,
    /// Share of the disk to keep free, from 0 to 1: the delay shrinks to nothing as usage
    /// reaches `1 - disk_headroom`. Default 0.1 (Mesos's).
    pub disk_headroom: f64,
    /// How often the work directory's disk usage is checked. Default 60 s (Mesos's); held
    /// between 10 ms and a day.
    pub disk_watch_interval: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            delay: Duration::from_secs(24 * 3600),
            disk_headroom: 0.1,
            disk_watch_interval: Duration::from_secs(60),
        }
    }
}

/// How old a finished sandbox may get: `delay × max(0, 1 − headroom − usage)`, with
/// `usage` the filesystem's used share (0 to 1). Out-of-range inputs are clamped to [0, 1]
/// (a usage that cannot be read counts as 0, keeping the full delay).
pub fn max_age(delay: Duration, headroom: f64, usage: f64) -> Duration {
    let unit = |x: f64| {
        if x.is_finite() {
            x.clamp(0.0, 1.0)
        } else {
            0.0
        }
    };
    let factor = (1.0 - unit(headroom) - unit(usage)).max(0.0);
    // Through f64, which cannot hold every Duration: never past the delay itself.
    Duration::try_from_secs_f64(delay.as_secs_f64() * factor).map_or(delay, |d| d.min(delay))
}

/// Directories waiting for removal, each with the time it was scheduled.
#[derive(Debug, Default)]
pub struct Schedule {
    entries: HashMap<PathBuf, SystemTime>,
}

impl Schedule {
    /// Schedules `dir` as finished at `at` (again: the later time wins).
    pub fn add(&mut self, dir: PathBuf, at: SystemTime) {
        let e = self.entries.entry(dir).or_insert(at);
        *e = (*e).max(at);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes out the directories older than `max_age` at `now`, oldest first.
    pub fn due(&mut self, now: SystemTime, max_age: Duration) -> Vec<PathBuf> {
        let mut due: Vec<(SystemTime, PathBuf)> = self
            .entries
            .iter()
            .filter(|(_, at)| now.duration_since(**at).is_ok_and(|age| age >= max_age))
            .map(|(p, at)| (*at, p.clone()))
            .collect();
        due.sort();
        for (_, p) in &due {
            self.entries.remove(p);
        }
        due.into_iter().map(|(_, p)| p).collect()
    }

    /// How long after `now` the next directory is due (zero when one is due already).
    pub fn next_due(&self, now: SystemTime, max_age: Duration) -> Option<Duration> {
        self.entries
            .values()
            .min()
            .map(|at| match at.checked_add(max_age) {
                Some(due) => due.duration_since(now).unwrap_or_default(),
                // Past what the clock can say: never, as far as anyone will see.
                None => Duration::MAX,
            })
    }
}

/// Schedules directories for removal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gc {
    tx: mpsc::UnboundedSender<PathBuf>,
    removed: Arc<AtomicU64>,
    /// Set when the agent stops and leaves its tasks running: their runners' guards drop
    /// then, and must not schedule sandboxes still in use.
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Gc {
    /// Nothing is scheduled from now on (see `frozen`).
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// `dir` (a run directory of a task or an executor that has ended) is finished now.
    pub fn schedule(&self, dir: &Path) {
        if self.frozen.load(Ordering::SeqCst) {
            return;
        }
        tracing::debug!(dir = %dir.display(), "sandbox scheduled for removal");
        // Only fails once the collector has stopped with the agent.
        let _ = self.tx.send(dir.to_owned());
    }

    /// Sandboxes removed so far.
    pub fn removed(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }

    /// Schedules `dir` when the returned guard is dropped: however its owner ends
    /// (returns early, or unwinds from a panic).
    pub fn on_drop(&self, dir: PathBuf) -> Collect {
        Collect {
            gc: self.clone(),
            dir,
        }
    }
}

/// Schedules its directory when dropped. See [`Gc::on_drop`].
#[derive(Debug)]
pub struct Collect {
    gc: Gc,
    dir: PathBuf,
}

impl Drop for Collect {
    fn drop(&mut self) {
        self.gc.schedule(&self.dir);
    }
}

/// Every run directory under `work_dir`'s layout (tasks' and executors'), with the time it
/// last changed. Real directories only: a link in the layout is not followed.
pub fn existing_runs(work_dir: &Path) -> Vec<(PathBuf, SystemTime)> {
    fn dirs(p: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(p) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }
    let mut out = Vec::new();
    for fw in dirs(&work_dir.join("frameworks")) {
        for kind in ["tasks", "executors"] {
            for owner in dirs(&fw.join(kind)) {
                for run in dirs(&owner.join("runs")) {
                    let at = std::fs::symlink_metadata(&run)
                        .and_then(|m| m.modified())
                        .unwrap_or_else(|_| SystemTime::now());
                    out.push((run, at));
                }
            }
        }
    }
    out
}

/// Removes `dir` (inside `work_dir/frameworks`) and then its parents that are left empty,
/// up to `frameworks/`. Links inside are removed, not followed.
///
/// # Errors
/// When `dir` is outside the layout or cannot be removed.
pub fn remove_run(work_dir: &Path, dir: &Path) -> std::io::Result<()> {
    let top = work_dir.join("frameworks");
    if !dir.starts_with(&top) || dir == top {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a sandbox of this agent", dir.display()),
        ));
    }
    // remove_dir_all removes a link without following it, and opens every directory
    // relative to its parent, so a link swapped in meanwhile cannot redirect it.
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // An agent that is not root meets directories its task made unwritable.
            open_up(dir);
            std::fs::remove_dir_all(dir)?;
        }
        Err(e) => return Err(e),
    }
    let mut at = dir.parent();
    while let Some(p) = at {
        if p == top || !p.starts_with(&top) || std::fs::remove_dir(p).is_err() {
            break;
        }
        at = p.parent();
    }
    Ok(())
}

/// Makes every directory under `dir` writable by its owner, not following links.
fn open_up(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_owned()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        seen += 1;
        if seen > crate::disk::MAX_WALK {
            return;
        }
        let is_dir = std::fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir());
        if !is_dir {
            continue;
        }
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

/// Starts the collector of `work_dir`: what a previous agent left is scheduled (before
/// this returns, so before any task of this agent has a sandbox), then directories are
/// removed as they come due. It stops when every [`Gc`] is dropped, or with the returned
/// [`Collector`].
pub async fn start(
    work_dir: PathBuf,
    config: GcConfig,
    live: std::collections::HashSet<PathBuf>,
) -> (Gc, Collector) {
    let mut schedule = Schedule::default();
    let wd = work_dir.clone();
    let left = tokio::task::spawn_blocking(move || {
        let mut left = existing_runs(&wd);
        left.retain(|(dir, _)| !live.contains(dir));
        left
    });
    if let Ok(left) = left.await {
        if !left.is_empty() {
            tracing::info!(
                sandboxes = left.len(),
                "scheduling the sandboxes a previous agent left"
            );
        }
        for (dir, at) in left {
            schedule.add(dir, at);
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let removed = Arc::new(AtomicU64::new(0));
    let task = tokio::spawn(collect(work_dir, config, schedule, rx, removed.clone()));
    (
        Gc {
            tx,
            removed,
            frozen: Arc::default(),
        },
        Collector {
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        },
    )
}

/// The collector's task: it stops when this is dropped.
#[derive(Debug)]
pub struct Collector {
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

async fn collect(
    work_dir: PathBuf,
    config: GcConfig,
    mut schedule: Schedule,
    mut rx: mpsc::UnboundedReceiver<PathBuf>,
    removed: Arc<AtomicU64>,
) {
    // Within what timers can add to a clock reading.
    let watch_every = config
        .disk_watch_interval
        .clamp(Duration::from_millis(10), Duration::from_secs(24 * 3600));
    let mut next_watch = tokio::time::Instant::now();
    let mut age = config.delay;
    loop {
        if tokio::time::Instant::now() >= next_watch {
            next_watch = tokio::time::Instant::now() + watch_every;
            let wd = work_dir.clone();
            let usage = tokio::task::spawn_blocking(move || crate::disk::fs_usage(&wd)).await;
            let usage = match usage {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "disk watch");
                    0.0
                }
                Err(_) => 0.0,
            };
            let new_age = max_age(config.delay, config.disk_headroom, usage);
            if new_age < config.delay {
                tracing::info!(usage, max_age = ?new_age, "disk filling: finished sandboxes are removed sooner");
            }
            age = new_age;
        }
        let due = schedule.due(SystemTime::now(), age);
        if !due.is_empty() {
            let wd = work_dir.clone();
            let removed = removed.clone();
            let removing = tokio::task::spawn_blocking(move || {
                for dir in due {
                    match remove_run(&wd, &dir) {
                        Ok(()) => {
                            removed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(dir = %dir.display(), "removed a finished sandbox");
                        }
                        Err(e) => {
                            tracing::warn!(dir = %dir.display(), error = %e, "removing a finished sandbox");
                        }
                    }
                }
            });
            let _ = removing.await;
        }
        let until_watch = next_watch.saturating_duration_since(tokio::time::Instant::now());
        let wait = schedule
            .next_due(SystemTime::now(), age)
            .map_or(until_watch, |d| d.min(until_watch));
        tokio::select! {
            dir = rx.recv() => match dir {
                Some(dir) => schedule.add(dir, SystemTime::now()),
                None => return,
            },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn the_delay_shrinks_as_the_disk_fills() {
        // An empty disk keeps the delay less the headroom's share.
        assert_eq!(max_age(DAY, 0.0, 0.0), DAY);
        assert_eq!(max_age(DAY, 0.1, 0.0), DAY.mul_f64(0.9));
        assert_eq!(max_age(DAY, 0.1, 0.5), DAY.mul_f64(0.4));
        // At 1 - headroom and beyond, finished sandboxes go at once.
        assert_eq!(max_age(DAY, 0.1, 0.9), Duration::ZERO);
        assert_eq!(max_age(DAY, 0.1, 0.97), Duration::ZERO);
        assert_eq!(max_age(DAY, 0.5, 0.6), Duration::ZERO);
        // Out of range never panics, and an unreadable usage keeps the delay.
        assert_eq!(max_age(DAY, f64::NAN, f64::NAN), DAY);
        assert_eq!(max_age(DAY, -1.0, -3.0), DAY);
        assert_eq!(max_age(DAY, 2.0, 0.0), Duration::ZERO);
        assert_eq!(max_age(Duration::MAX, 0.0, f64::INFINITY), Duration::MAX);
        // Monotone in usage.
        let mut last = DAY;
        for i in 0..=100 {
            let a = max_age(DAY, 0.1, f64::from(i) / 100.0);
            assert!(a <= last);
            last = a;
        }
    }

    #[test]
    fn the_schedule_releases_what_is_old_enough() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut s = Schedule::default();
        s.add("a".into(), t0);
        s.add("b".into(), t0 + Duration::from_secs(10));
        assert_eq!(
            s.next_due(t0, Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        assert!(
            s.due(t0 + Duration::from_secs(4), Duration::from_secs(5))
                .is_empty()
        );
        assert_eq!(
            s.due(t0 + Duration::from_secs(5), Duration::from_secs(5)),
            vec![PathBuf::from("a")]
        );
        // Less room: a shorter age releases the rest at once.
        assert_eq!(
            s.due(t0 + Duration::from_secs(10), Duration::ZERO),
            vec![PathBuf::from("b")]
        );
        assert!(s.is_empty());
        assert_eq!(s.next_due(t0, Duration::ZERO), None);
        // A delay past the clock's range is no panic.
        s.add("c".into(), t0);
        assert_eq!(s.next_due(t0, Duration::MAX), Some(Duration::MAX));
        assert!(s.due(t0, Duration::MAX).is_empty());
    }

    #[test]
    fn removal_stays_in_the_layout_and_does_not_follow_links() {
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"host file").unwrap();
        let fw = agora_core::FrameworkId::new("fw").unwrap();
        let t1 = agora_core::TaskId::new("t1").unwrap();
        let t2 = agora_core::TaskId::new("t2").unwrap();
        let run1 = crate::sandbox::create_run_dir(work.path(), &fw, &t1).unwrap();
        let run2 = crate::sandbox::create_run_dir(work.path(), &fw, &t2).unwrap();
        std::os::unix::fs::symlink(outside.path(), run1.join("planted")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), run1.join("file")).unwrap();
        std::fs::create_dir_all(run1.join("deep/er")).unwrap();
        std::fs::write(run1.join("deep/er/x"), b"x").unwrap();

        let mut runs: Vec<_> = existing_runs(work.path())
            .into_iter()
            .map(|r| r.0)
            .collect();
        runs.sort();
        assert_eq!(runs, vec![run1.clone(), run2.clone()]);

        remove_run(work.path(), &run1).unwrap();
        assert!(!run1.exists());
        assert!(
            !work.path().join("frameworks/fw/tasks/t1").exists(),
            "empty parents stay"
        );
        assert!(run2.exists());
        assert_eq!(
            std::fs::read(outside.path().join("keep")).unwrap(),
            b"host file"
        );
        assert!(remove_run(work.path(), outside.path()).is_err());
        assert!(remove_run(work.path(), &work.path().join("frameworks")).is_err());
        remove_run(work.path(), &run2).unwrap();
        assert!(work.path().join("frameworks").is_dir());
        assert!(!work.path().join("frameworks/fw").exists());
    }

    #[tokio::test]
    async fn the_collector_removes_what_was_scheduled_after_the_delay() {
        let work = tempfile::tempdir().unwrap();
        let fw = agora_core::FrameworkId::new("fw").unwrap();
        let done = crate::sandbox::create_run_dir(
            work.path(),
            &fw,
            &agora_core::TaskId::new("done").unwrap(),
        )
        .unwrap();
        let live = crate::sandbox::create_run_dir(
            work.path(),
            &fw,
            &agora_core::TaskId::new("live").unwrap(),
        )
        .unwrap();
        // What a previous agent left is collected too; start after it exists.
        let (gc, task) = start(
            work.path().to_owned(),
            GcConfig {
                delay: Duration::from_millis(300),
                disk_headroom: 0.0,
                disk_watch_interval: Duration::from_secs(3600),
            },
            Default::default(),
        )
        .await;
        let later = crate::sandbox::create_run_dir(
            work.path(),
            &fw,
            &agora_core::TaskId::new("later").unwrap(),
        )
        .unwrap();
        gc.schedule(&later);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while done.exists() || later.exists() || live.exists() {
            assert!(tokio::time::Instant::now() < deadline, "not collected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while gc.removed() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "not counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop((gc, task));
    }

    #[tokio::test]
    async fn under_disk_pressure_the_collector_does_not_wait_for_the_delay() {
        let work = tempfile::tempdir().unwrap();
        let fw = agora_core::FrameworkId::new("fw").unwrap();
        // A headroom of the whole disk: whatever the usage, the disk counts as full.
        let (gc, task) = start(
            work.path().to_owned(),
            GcConfig {
                delay: Duration::from_secs(3600),
                disk_headroom: 1.0,
                disk_watch_interval: Duration::from_millis(50),
            },
            Default::default(),
        )
        .await;
        let run = crate::sandbox::create_run_dir(
            work.path(),
            &fw,
            &agora_core::TaskId::new("t").unwrap(),
        )
        .unwrap();
        gc.schedule(&run);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while run.exists() {
            assert!(tokio::time::Instant::now() < deadline, "kept for the delay");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop((gc, task));
    }

    #[tokio::test]
    async fn the_sandboxes_of_re_attached_tasks_are_not_a_previous_agents_leftovers() {
        let work = tempfile::tempdir().unwrap();
        let fw = agora_core::FrameworkId::new("fw").unwrap();
        let run = |t: &str| {
            crate::sandbox::create_run_dir(work.path(), &fw, &agora_core::TaskId::new(t).unwrap())
                .unwrap()
        };
        let (left, kept) = (run("left"), run("kept"));
        // The disk counts as full: every leftover is due at once, in one pass.
        let (gc, task) = start(
            work.path().to_owned(),
            GcConfig {
                delay: Duration::from_secs(3600),
                disk_headroom: 1.0,
                disk_watch_interval: Duration::from_millis(50),
            },
            std::iter::once(kept.clone()).collect(),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while left.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the leftover stayed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(kept.exists(), "a live task's sandbox was removed");
        drop((gc, task));
    }
}
