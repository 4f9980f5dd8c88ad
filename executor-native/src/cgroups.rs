//! One cgroup per task, on cgroup v1, v2, or the hybrid of both, detected at start.
//!
//! * **v2** (`ROOT/cgroup.controllers` exists): one directory under the agent's parent with
//!   `memory.max`, `cpu.weight`, `cpu.max`, `pids.max`; killed with `cgroup.kill`.
//! * **v1** (`ROOT/memory`, `ROOT/cpu`, … mounted separately): one directory per controller,
//!   with `memory.limit_in_bytes`, `cpu.shares`, `cpu.cfs_quota_us`, `pids.max`; when a
//!   cgroup2 tree is mounted at `ROOT/unified` (the hybrid layout), a directory there too,
//!   which tracks every process of the task and kills them all with `cgroup.kill`; without
//!   it, the freezer stops the tree while each process is sent SIGKILL.
//!
//! A process joins its cgroups itself, between fork and exec ([`TaskCgroup::join_paths`]),
//! so that nothing it forks can start outside them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Errors setting up or reading cgroups; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("processes still in {path} after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file such as `memory.events` or `cpu.stat`.
fn keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// What the host offers, found under a cgroup root (normally `/sys/fs/cgroup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    V2 {
        root: PathBuf,
        controllers: Vec<String>,
    },
    V1 {
        /// Mount point per controller we use (memory, cpu, cpuacct, pids, freezer).
        controllers: Vec<(String, PathBuf)>,
        /// A cgroup2 tree for tracking and killing (hybrid hosts).
        unified: Option<PathBuf>,
    },
    /// No usable cgroups: tasks run with rlimits and a process group only.
    None,
}

const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

impl Cgroups {
    /// Looks at `root` for a v2 or v1 layout.
    pub fn detect(root: &Path) -> Cgroups {
        if let Ok(c) = fs::read_to_string(root.join("cgroup.controllers")) {
            return Cgroups::V2 {
                root: root.to_owned(),
                controllers: c.split_whitespace().map(str::to_owned).collect(),
            };
        }
        let mut controllers = Vec::new();
        let Ok(entries) = fs::read_dir(root) else {
            return Cgroups::None;
        };
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for name in V1_CONTROLLERS {
            // Combined mounts ("cpu,cpuacct") serve every controller they name.
            let found = dirs.iter().find(|d| {
                d.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.split(',').any(|c| c == name))
                    && d.join("cgroup.procs").exists()
            });
            if let Some(d) = found {
                controllers.push((name.to_owned(), d.clone()));
            }
        }
        if controllers.is_empty() {
            return Cgroups::None;
        }
        let unified = Some(root.join("unified")).filter(|u| u.join("cgroup.procs").exists());
        Cgroups::V1 {
            controllers,
            unified,
        }
    }

    /// A short description of the isolation this gives, e.g. `cgroups-v1(memory,cpu,pids)`.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { controllers, .. } => {
                let used: Vec<&str> = ["memory", "cpu", "pids"]
                    .into_iter()
                    .filter(|c| controllers.iter().any(|x| x == c))
                    .collect();
                format!("cgroups-v2({})", used.join(","))
            }
            Cgroups::V1 { controllers, .. } => {
                let used: Vec<&str> = ["memory", "cpu", "pids"]
                    .into_iter()
                    .filter(|c| controllers.iter().any(|(x, _)| x == c))
                    .collect();
                format!("cgroups-v1({})", used.join(","))
            }
            Cgroups::None => "none".into(),
        }
    }

    fn v1(&self, controller: &str) -> Option<&Path> {
        match self {
            Cgroups::V1 { controllers, .. } => controllers
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, p)| p.as_path()),
            _ => None,
        }
    }

    /// Removes the (empty) parent cgroup `parent` wherever it was made, and the ancestors it
    /// was made with (`a/b` removes `a/b`, then `a` if empty); best effort.
    pub fn remove_parent(&self, parent: &str) {
        let roots: Vec<PathBuf> = match self {
            Cgroups::V2 { root, .. } => vec![root.clone()],
            Cgroups::V1 {
                controllers,
                unified,
            } => controllers
                .iter()
                .map(|(_, m)| m.clone())
                .chain(unified.iter().cloned())
                .collect(),
            Cgroups::None => Vec::new(),
        };
        for root in roots {
            let mut rel = Some(Path::new(parent));
            while let Some(r) = rel.filter(|r| !r.as_os_str().is_empty()) {
                if fs::remove_dir(root.join(r)).is_err() {
                    break;
                }
                rel = r.parent();
            }
        }
    }

    /// The names of the cgroups under `parent` (in any controller): after a crash, those a
    /// previous agent left.
    pub fn children(&self, parent: &str) -> Vec<String> {
        let roots: Vec<PathBuf> = match self {
            Cgroups::None => Vec::new(),
            Cgroups::V2 { root, .. } => vec![root.clone()],
            Cgroups::V1 {
                controllers,
                unified,
            } => controllers
                .iter()
                .map(|(_, p)| p.clone())
                .chain(unified.clone())
                .collect(),
        };
        let mut names: Vec<String> = roots
            .iter()
            .flat_map(|r| fs::read_dir(r.join(parent)).into_iter().flatten().flatten())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Takes charge of an existing cgroup `parent/name` (to kill and remove it); nothing is
    /// created or changed.
    pub fn adopt(&self, parent: &str, name: &str) -> TaskCgroup {
        let mut cg = TaskCgroup {
            layout: self.clone(),
            dirs: Vec::new(),
            kill_file: None,
            freezer: None,
        };
        match self {
            Cgroups::None => {}
            Cgroups::V2 { root, .. } => {
                let d = root.join(parent).join(name);
                if d.is_dir() {
                    cg.kill_file = Some(d.join("cgroup.kill")).filter(|k| k.exists());
                    cg.dirs.push(d);
                }
            }
            Cgroups::V1 { unified, .. } => {
                for controller in V1_CONTROLLERS {
                    let Some(mount) = self.v1(controller) else {
                        continue;
                    };
                    let d = mount.join(parent).join(name);
                    if d.is_dir() && !cg.dirs.contains(&d) {
                        if controller == "freezer" {
                            cg.freezer = Some(d.clone());
                        }
                        cg.dirs.push(d);
                    }
                }
                if let Some(u) = unified {
                    let d = u.join(parent).join(name);
                    if d.is_dir() {
                        cg.kill_file = Some(d.join("cgroup.kill")).filter(|k| k.exists());
                        cg.dirs.push(d);
                    }
                }
            }
        }
        cg
    }

    /// Creates the cgroup `parent/name` for a task with these limits.
    ///
    /// # Errors
    /// When a directory or limit file cannot be written (not root, read-only cgroupfs).
    pub fn create(
        &self,
        parent: &str,
        name: &str,
        limits: &Limits,
    ) -> Result<TaskCgroup, CgroupError> {
        let mut cg = TaskCgroup {
            layout: self.clone(),
            dirs: Vec::new(),
            kill_file: None,
            freezer: None,
        };
        match self {
            Cgroups::None => {}
            Cgroups::V2 { root, controllers } => {
                let parent_dir = root.join(parent);
                fs::create_dir_all(&parent_dir).map_err(io_err(&parent_dir))?;
                // Controllers must be enabled down the path for the task's directory to get
                // their files.
                let wanted: Vec<String> = ["memory", "cpu", "pids"]
                    .into_iter()
                    .filter(|c| controllers.iter().any(|x| x == c))
                    .map(|c| format!("+{c}"))
                    .collect();
                let mut dir = root.clone();
                for seg in Path::new(parent).components() {
                    let _ = fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "));
                    dir = dir.join(seg);
                }
                let _ = fs::write(dir.join("cgroup.subtree_control"), wanted.join(" "));
                let d = parent_dir.join(name);
                fs::create_dir_all(&d).map_err(io_err(&d))?;
                cg.dirs.push(d.clone());
                cg.kill_file = Some(d.join("cgroup.kill")).filter(|k| k.exists());
            }
            Cgroups::V1 { unified, .. } => {
                for controller in V1_CONTROLLERS {
                    let Some(mount) = self.v1(controller) else {
                        continue;
                    };
                    let d = mount.join(parent).join(name);
                    if cg.dirs.contains(&d) {
                        continue;
                    }
                    fs::create_dir_all(&d).map_err(io_err(&d))?;
                    cg.dirs.push(d.clone());
                    if controller == "freezer" {
                        cg.freezer = Some(d.clone());
                    }
                }
                if let Some(u) = unified {
                    let d = u.join(parent).join(name);
                    fs::create_dir_all(&d).map_err(io_err(&d))?;
                    cg.kill_file = Some(d.join("cgroup.kill")).filter(|k| k.exists());
                    cg.dirs.push(d);
                }
            }
        }
        cg.set_limits(limits)?;
        Ok(cg)
    }
}

/// Limits for one task's cgroup; `None` leaves a limit unset.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// Forbid swap where the host accounts for it.
    pub no_swap: bool,
    /// CPU share proportional to this many CPUs.
    pub cpus: Option<f64>,
    /// Also cap CPU time at `cpus` (CFS quota / `cpu.max`).
    pub cpu_hard_cap: bool,
    pub pids_max: Option<u64>,
}

/// Usage read from a task's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub pids: u64,
}

/// A task's cgroup (one directory per v1 controller, or one v2 directory). Removed when
/// dropped, after killing anything left in it.
#[derive(Debug)]
pub struct TaskCgroup {
    layout: Cgroups,
    dirs: Vec<PathBuf>,
    kill_file: Option<PathBuf>,
    freezer: Option<PathBuf>,
}

impl TaskCgroup {
    /// The `cgroup.procs` files a process must write `0` to, to join this cgroup.
    pub fn join_paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        match &self.layout {
            Cgroups::V2 { .. } => self.dirs.first().map(PathBuf::as_path),
            Cgroups::V1 { .. } => {
                let mount = self.layout.v1(controller)?;
                self.dirs
                    .iter()
                    .find(|d| d.starts_with(mount))
                    .map(PathBuf::as_path)
            }
            Cgroups::None => None,
        }
    }

    /// Writes `limits` (again): at creation, and when a container's tasks change, as an
    /// executor's cgroup follows the sum of its tasks.
    ///
    /// # Errors
    /// When a limit file cannot be written, e.g. a memory limit below what is in use.
    pub fn set_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        const PERIOD: u64 = 100_000;
        let quota = |cpus: f64| ((cpus * PERIOD as f64).round() as u64).max(1000);
        match &self.layout {
            Cgroups::None => {}
            Cgroups::V2 { .. } => {
                let Some(d) = self.dirs.first() else {
                    return Ok(());
                };
                if let Some(mem) = limits.memory_bytes {
                    write(&d.join("memory.max"), &mem.to_string())?;
                    if limits.no_swap {
                        let _ = fs::write(d.join("memory.swap.max"), "0");
                    }
                }
                if let Some(cpus) = limits.cpus {
                    // cpu.weight is 1..10000, default 100 for one CPU's worth.
                    let weight = ((cpus * 100.0).round() as u64).clamp(1, 10_000);
                    write(&d.join("cpu.weight"), &weight.to_string())?;
                    if limits.cpu_hard_cap {
                        write(&d.join("cpu.max"), &format!("{} {PERIOD}", quota(cpus)))?;
                    }
                }
                if let Some(p) = limits.pids_max {
                    write(&d.join("pids.max"), &p.to_string())?;
                }
            }
            Cgroups::V1 { .. } => {
                if let (Some(d), Some(mem)) = (self.dir("memory"), limits.memory_bytes) {
                    if limits.no_swap {
                        // memsw must stay >= the memory limit: raise in the order that keeps
                        // it so. Only where swap accounting is on.
                        let _ = fs::write(d.join("memory.memsw.limit_in_bytes"), mem.to_string());
                    }
                    write(&d.join("memory.limit_in_bytes"), &mem.to_string())?;
                    if limits.no_swap {
                        let _ = fs::write(d.join("memory.memsw.limit_in_bytes"), mem.to_string());
                    }
                }
                if let (Some(d), Some(cpus)) = (self.dir("cpu"), limits.cpus) {
                    let shares = ((cpus * 1024.0).round() as u64).max(2);
                    write(&d.join("cpu.shares"), &shares.to_string())?;
                    if limits.cpu_hard_cap {
                        write(&d.join("cpu.cfs_period_us"), &PERIOD.to_string())?;
                        write(&d.join("cpu.cfs_quota_us"), &quota(cpus).to_string())?;
                    }
                }
                if let (Some(d), Some(p)) = (self.dir("pids"), limits.pids_max) {
                    write(&d.join("pids.max"), &p.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// A handle that can change this cgroup's limits, for as long as it exists.
    pub fn limiter(&self) -> Limiter {
        Limiter {
            cgroup: self.borrowed(),
        }
    }

    fn borrowed(&self) -> TaskCgroup {
        TaskCgroup {
            layout: self.layout.clone(),
            dirs: self.dirs.clone(),
            kill_file: None,
            freezer: None,
        }
    }

    /// Every process in the cgroup (from the tracking directory, or the first controller).
    pub fn pids(&self) -> Vec<i32> {
        let dir = self
            .kill_file
            .as_ref()
            .and_then(|k| k.parent())
            .or_else(|| self.dirs.first().map(PathBuf::as_path));
        dir.and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// True when the kernel OOM-killed a process of this cgroup.
    pub fn oom_killed(&self) -> bool {
        let Some(d) = self.dir("memory") else {
            return false;
        };
        match self.layout {
            Cgroups::V2 { .. } => keyed(&d.join("memory.events"), "oom_kill").unwrap_or(0) > 0,
            _ => keyed(&d.join("memory.oom_control"), "oom_kill").unwrap_or(0) > 0,
        }
    }

    /// A handle that reads this cgroup's usage, for as long as it exists.
    pub fn reader(&self) -> UsageReader {
        UsageReader {
            cgroup: self.borrowed(),
        }
    }

    /// Current usage.
    pub fn usage(&self) -> Usage {
        let mut u = Usage::default();
        match self.layout {
            Cgroups::V2 { .. } => {
                if let Some(d) = self.dirs.first() {
                    u.cpu_seconds =
                        keyed(&d.join("cpu.stat"), "usage_usec").unwrap_or(0) as f64 / 1e6;
                    u.memory_bytes = read_u64(&d.join("memory.current")).unwrap_or(0);
                    u.memory_peak_bytes =
                        read_u64(&d.join("memory.peak")).unwrap_or(u.memory_bytes);
                    u.pids = read_u64(&d.join("pids.current")).unwrap_or(0);
                }
            }
            Cgroups::V1 { .. } => {
                if let Some(d) = self.dir("cpuacct") {
                    u.cpu_seconds = read_u64(&d.join("cpuacct.usage")).unwrap_or(0) as f64 / 1e9;
                }
                if let Some(d) = self.dir("memory") {
                    u.memory_bytes = read_u64(&d.join("memory.usage_in_bytes")).unwrap_or(0);
                    u.memory_peak_bytes =
                        read_u64(&d.join("memory.max_usage_in_bytes")).unwrap_or(u.memory_bytes);
                }
                if let Some(d) = self.dir("pids") {
                    u.pids = read_u64(&d.join("pids.current")).unwrap_or(0);
                }
            }
            Cgroups::None => {}
        }
        u
    }

    /// Sends `signal` to every process of the cgroup.
    pub fn signal_all(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from cgroup.procs; at worst the process is gone
            // (ESRCH) and nothing happens.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// Kills every process of the cgroup, including any forked while this runs, and waits
    /// until the cgroup is empty.
    ///
    /// # Errors
    /// [`CgroupError::Busy`] when processes remain after `wait`.
    pub fn kill_all(&self, wait: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        loop {
            if self.pids().is_empty() {
                return Ok(());
            }
            if let Some(k) = &self.kill_file {
                let _ = fs::write(k, "1");
            } else if let Some(f) = &self.freezer {
                // Frozen processes cannot fork; killed ones die when thawed.
                let _ = fs::write(f.join("freezer.state"), "FROZEN");
                self.signal_all(libc::SIGKILL);
                let _ = fs::write(f.join("freezer.state"), "THAWED");
            } else {
                self.signal_all(libc::SIGKILL);
            }
            if start.elapsed() > wait {
                return Err(CgroupError::Busy {
                    path: self.dirs.first().cloned().unwrap_or_default(),
                    waited: wait,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills what is left and removes the directories.
    ///
    /// # Errors
    /// When processes will not die or a directory cannot be removed.
    pub fn destroy(mut self) -> Result<(), CgroupError> {
        self.destroy_inner()
    }

    fn destroy_inner(&mut self) -> Result<(), CgroupError> {
        self.kill_all(Duration::from_secs(5))?;
        for d in std::mem::take(&mut self.dirs) {
            // A cgroup whose last process just died can be busy for a moment.
            let start = Instant::now();
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if start.elapsed() > Duration::from_secs(2) => {
                        return Err(CgroupError::Io { path: d, source: e });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        Ok(())
    }

    /// The directories, for tests and reports.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

/// Reads a task cgroup's usage without owning it (reads after removal give zeros).
#[derive(Debug)]
pub struct UsageReader {
    cgroup: TaskCgroup,
}

impl UsageReader {
    pub fn usage(&self) -> Usage {
        self.cgroup.usage()
    }
}

impl Drop for UsageReader {
    fn drop(&mut self) {
        // Not the owner: leave the directories alone.
        self.cgroup.dirs.clear();
    }
}

/// Changes a task cgroup's limits without owning it.
#[derive(Debug)]
pub struct Limiter {
    cgroup: TaskCgroup,
}

impl Limiter {
    /// See [`TaskCgroup::set_limits`].
    ///
    /// # Errors
    /// As [`TaskCgroup::set_limits`].
    pub fn set(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.cgroup.set_limits(limits)
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        // Not the owner: leave the directories alone.
        self.cgroup.dirs.clear();
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        if !self.dirs.is_empty()
            && let Err(e) = self.destroy_inner()
        {
            tracing::warn!(error = %e, "could not remove a task cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_reads_the_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Cgroups::detect(dir.path()), Cgroups::None);
        assert_eq!(Cgroups::detect(&dir.path().join("missing")), Cgroups::None);

        for c in ["memory", "cpu,cpuacct", "pids"] {
            fs::create_dir(dir.path().join(c)).unwrap();
            fs::write(dir.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let v1 = Cgroups::detect(dir.path());
        assert_eq!(v1.describe(), "cgroups-v1(memory,cpu,pids)");
        assert!(matches!(&v1, Cgroups::V1 { unified: None, .. }));
        assert_eq!(
            v1.v1("cpuacct"),
            Some(dir.path().join("cpu,cpuacct").as_path())
        );

        let v2 = tempfile::tempdir().unwrap();
        fs::write(
            v2.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(
            Cgroups::detect(v2.path()).describe(),
            "cgroups-v2(memory,cpu,pids)"
        );
    }

    #[test]
    fn keyed_files_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.events");
        fs::write(&f, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(keyed(&f, "oom_kill"), Some(2));
        assert_eq!(keyed(&f, "oom"), Some(1));
        assert_eq!(keyed(&f, "nope"), None);
    }
}
