//! Real cgroups on this host (run as root, as CI is): limits hold, OOM kills are seen, every
//! process of a task can be killed, and nothing is left behind. One suite, run against every
//! cgroup backend (test names start with the backend's):
//!
//! * `v1_hybrid`: v1 controllers, with the cgroup2 tree at `/sys/fs/cgroup/unified` tracking
//!   the task's processes and killing them (`cgroup.kill`). Needs a v1 host with that tree.
//! * `v1_freezer`: v1 controllers alone; kills go through the freezer.
//! * `v2`: one cgroup2 directory per task. On a pure-v2 host, the host's tree and its
//!   controllers. On a hybrid host, the cgroup2 tree at `/sys/fs/cgroup/unified`: its memory,
//!   cpu and pids controllers are bound to v1, so it cannot limit anything, but the v2 code
//!   still creates, joins, lists, counts CPU time (`cpu.stat`), kills (`cgroup.kill`), adopts
//!   and removes there. The limit tests (`memory.max`, `cpu.max`/`cpu.weight`, `pids.max`)
//!   need a host where the controllers are in the cgroup2 tree.
//!
//! This file has its own harness (libtest-mimic): a test that the host cannot run, for want of
//! a backend or a controller, is reported as *ignored* with the reason, never as passed. With
//! `AGORA_CGROUP_TESTS=all` such a test fails instead, for a host that must run every one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agora_executor_native::{Cgroups, Limits, Rlimits, TaskCgroup, spawn};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The host's cgroup root; `AGORA_CGROUP_ROOT` points the suite elsewhere (a cgroup2 mount
/// given there is taken for a pure-v2 host).
fn root() -> PathBuf {
    std::env::var_os("AGORA_CGROUP_ROOT")
        .map_or_else(|| PathBuf::from("/sys/fs/cgroup"), PathBuf::from)
}
/// How long any single expected condition may take on a busy machine.
const WAIT: Duration = Duration::from_secs(10);

/// The backends under test.
#[derive(Debug, Clone, Copy)]
enum Backend {
    V1Hybrid,
    V1Freezer,
    V2,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::V1Hybrid, Backend::V1Freezer, Backend::V2];

    fn name(self) -> &'static str {
        match self {
            Backend::V1Hybrid => "v1_hybrid",
            Backend::V1Freezer => "v1_freezer",
            Backend::V2 => "v2",
        }
    }

    /// The layout this backend has on this host, or why the host has none.
    fn layout(self) -> Result<Cgroups, String> {
        let root = root();
        let host = Cgroups::detect(&root);
        match (self, host) {
            (_, Cgroups::None) => Err(format!("no cgroups found under {}", root.display())),
            (Backend::V2, v2 @ Cgroups::V2 { .. }) => Ok(v2),
            (
                Backend::V2,
                Cgroups::V1 {
                    unified: Some(u), ..
                },
            ) => match Cgroups::detect(&u) {
                v2 @ Cgroups::V2 { .. } => Ok(v2),
                other => Err(format!("{} is not a cgroup2 tree: {other:?}", u.display())),
            },
            (Backend::V2 | Backend::V1Hybrid, Cgroups::V1 { unified: None, .. }) => Err(format!(
                "this v1 host has no cgroup2 tree at {}/unified",
                root.display()
            )),
            (_, Cgroups::V2 { .. }) => Err("a pure cgroup v2 host has no v1 controllers".into()),
            (Backend::V1Hybrid, v1 @ Cgroups::V1 { .. }) => Ok(v1),
            (Backend::V1Freezer, Cgroups::V1 { controllers, .. }) => {
                if !controllers.iter().any(|(c, _)| c == "freezer") {
                    return Err("no v1 freezer hierarchy is mounted".into());
                }
                Ok(Cgroups::V1 {
                    controllers,
                    unified: None,
                })
            }
        }
    }
}

/// What a test needs from a backend beyond making cgroups.
#[derive(Debug, Clone, Copy)]
enum Need {
    Memory,
    Cpu,
    Pids,
    /// CPU time accounting: v1's cpuacct, v2's `cpu.stat` (always there).
    CpuTime,
    /// A v2 tree without the memory controller (a hybrid host's). Not something a host lacks:
    /// a full v2 host has nothing for this test to check, and it is ignored even when strict.
    V2WithoutMemory,
}

fn check(layout: &Cgroups, need: Need) -> Result<(), String> {
    let v1 = |name: &str| match layout {
        Cgroups::V1 { controllers, .. } if !controllers.iter().any(|(c, _)| c == name) => {
            Err(format!("no v1 {name} hierarchy is mounted"))
        }
        _ => Ok(()),
    };
    let v2 = |name: &str| match layout {
        Cgroups::V2 { root, controllers } if !controllers.iter().any(|c| c == name) => {
            Err(format!(
                "the cgroup2 tree at {} has no {name} controller (on a hybrid host it is bound \
                 to v1)",
                root.display()
            ))
        }
        _ => Ok(()),
    };
    match need {
        Need::Memory => v1("memory").and(v2("memory")),
        Need::Cpu => v1("cpu").and(v2("cpu")),
        Need::Pids => v1("pids").and(v2("pids")),
        Need::CpuTime => v1("cpuacct"),
        Need::V2WithoutMemory => match layout {
            Cgroups::V2 { controllers, .. } if !controllers.iter().any(|c| c == "memory") => Ok(()),
            Cgroups::V2 { .. } => Err("this cgroup2 tree has the memory controller".into()),
            _ => Err("only for a cgroup2 tree".into()),
        },
    }
}

/// One test against one backend: its layout, and a parent cgroup of its own.
struct Case {
    layout: Cgroups,
    parent: String,
}

impl Case {
    fn cgroup(&self, name: &str, limits: &Limits) -> TaskCgroup {
        self.layout.create(&self.parent, name, limits).unwrap()
    }

    /// Destroys the task's cgroup and checks that nothing of it is left.
    fn finish(&self, cg: TaskCgroup) {
        let dirs = cg.dirs().to_vec();
        assert!(!dirs.is_empty(), "the cgroup had no directory");
        cg.destroy().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "left: {dirs:?}");
        assert_eq!(self.layout.children(&self.parent), Vec::<String>::new());
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        // Also after a failed assertion: task cgroups are removed when dropped, the parent here.
        self.layout.remove_parent(&self.parent);
    }
}

type Test = fn(&Case);

const TESTS: &[(&str, &[Need], Test)] = &[
    (
        "a_process_joins_its_cgroup_before_exec",
        &[],
        a_process_joins_its_cgroup_before_exec,
    ),
    (
        "a_memory_bomb_is_oom_killed_inside_its_cgroup",
        &[Need::Memory],
        a_memory_bomb_is_oom_killed_inside_its_cgroup,
    ),
    (
        "a_fork_bomb_stops_at_pids_max_and_is_killable",
        &[Need::Pids],
        a_fork_bomb_stops_at_pids_max_and_is_killable,
    ),
    (
        "a_process_that_keeps_forking_is_killed_whole",
        &[],
        a_process_that_keeps_forking_is_killed_whole,
    ),
    (
        "a_double_forked_daemon_does_not_outlive_its_task",
        &[],
        a_double_forked_daemon_does_not_outlive_its_task,
    ),
    (
        "cpu_time_is_counted_for_the_task_alone",
        &[Need::CpuTime],
        cpu_time_is_counted_for_the_task_alone,
    ),
    (
        "a_cpu_hog_with_a_hard_cap_gets_its_share",
        &[Need::Cpu, Need::CpuTime],
        a_cpu_hog_with_a_hard_cap_gets_its_share,
    ),
    (
        "a_limit_without_its_controller_is_refused_naming_its_file",
        &[Need::V2WithoutMemory],
        a_limit_without_its_controller_is_refused_naming_its_file,
    ),
    (
        "cgroups_left_by_a_dead_agent_are_found_adopted_and_removed",
        &[],
        cgroups_left_by_a_dead_agent_are_found_adopted_and_removed,
    ),
];

fn main() {
    let mut args = Arguments::from_args();
    // These tests share the host's cgroups and two cores: one at a time unless asked otherwise,
    // so that a CPU measurement is not taken beside a fork bomb.
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let strict = std::env::var("AGORA_CGROUP_TESTS").is_ok_and(|v| v == "all");
    let trials = Backend::ALL
        .into_iter()
        .flat_map(|backend| {
            TESTS
                .iter()
                // Only v2 refuses limits it cannot set (v1 leaves out a controller it lacks).
                .filter(move |(_, needs, _)| {
                    matches!(backend, Backend::V2)
                        || !needs.iter().any(|n| matches!(n, Need::V2WithoutMemory))
                })
                .map(move |&(name, needs, test)| {
                    Trial::ignorable_test(format!("{}::{name}", backend.name()), move || {
                        run(backend, name, needs, test, strict)
                    })
                })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn run(
    backend: Backend,
    name: &str,
    needs: &[Need],
    test: Test,
    strict: bool,
) -> Result<Completion, Failed> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("these tests manage real cgroups and must run as root".into());
    }
    let layout = match backend.layout() {
        Ok(l) => l,
        Err(why) if strict => return Err(format!("not run here: {why}").into()),
        Err(why) => return Ok(Completion::ignored_with(why)),
    };
    for &need in needs {
        match check(&layout, need) {
            Ok(()) => {}
            Err(why) if strict && !matches!(need, Need::V2WithoutMemory) => {
                return Err(format!("not run here: {why}").into());
            }
            Err(why) => return Ok(Completion::ignored_with(why)),
        }
    }
    let case = Case {
        layout,
        parent: format!(
            "agora-test-{}-{}-{name}",
            std::process::id(),
            backend.name()
        ),
    };
    test(&case);
    Ok(Completion::Completed)
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c")
        .arg(script)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Polls `cond` until it holds, failing after [`WAIT`] with `what` and the last `state`.
fn wait_until<T: std::fmt::Debug>(
    what: &str,
    mut state: impl FnMut() -> T,
    cond: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = state();
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_all_dead(pids: &[i32]) {
    wait_until(
        "every process to die",
        || {
            pids.iter()
                .copied()
                .filter(|p| alive(*p))
                .collect::<Vec<_>>()
        },
        Vec::is_empty,
    );
}

fn a_process_joins_its_cgroup_before_exec(case: &Case) {
    let cg = case.cgroup("join", &Limits::default());
    let mut c = Command::new("/bin/cat");
    c.arg("/proc/self/cgroup").stdout(Stdio::piped());
    let out = spawn(&mut c, Some(&cg), &Rlimits::default())
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // One line per hierarchy the cgroup has a directory in, each naming it.
    let name = format!("/{}/join", case.parent);
    let lines = text.lines().filter(|l| l.ends_with(&name)).count();
    assert_eq!(lines, cg.dirs().len(), "{:?} vs {text}", cg.dirs());
    case.finish(cg);
}

fn a_memory_bomb_is_oom_killed_inside_its_cgroup(case: &Case) {
    let limit = 64 << 20;
    let cg = case.cgroup(
        "membomb",
        &Limits {
            memory_bytes: Some(limit),
            no_swap: true,
            ..Limits::default()
        },
    );
    // tail keeps everything it reads when no newline comes.
    let mut c = sh("head -c 2000000000 /dev/zero | tail");
    let status = spawn(&mut c, Some(&cg), &Rlimits::default())
        .unwrap()
        .wait()
        .unwrap();
    assert!(!status.success(), "{status:?}");
    assert!(cg.oom_killed(), "the kernel's OOM kill was not seen");
    let peak = cg.usage().memory_peak_bytes;
    assert!(peak > limit / 2 && peak <= limit + (1 << 20), "peak {peak}");
    case.finish(cg);
}

fn a_fork_bomb_stops_at_pids_max_and_is_killable(case: &Case) {
    let cg = case.cgroup(
        "forkbomb",
        &Limits {
            pids_max: Some(24),
            ..Limits::default()
        },
    );
    // Forks until fork fails; what it forked stays.
    let mut c = sh("while :; do sleep 1000 & done");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    wait_until("the bomb to reach its cap", || cg.pids().len(), |n| *n > 20);
    // It stays at the cap: watching for a while is the test, so this sleeps.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(300) {
        let n = cg.pids().len();
        assert!(n <= 24, "{n} processes");
        assert!(cg.usage().pids <= 24, "{:?}", cg.usage());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = cg.pids();
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    assert!(cg.pids().is_empty());
    wait_all_dead(&pids);
    case.finish(cg);
}

fn a_process_that_keeps_forking_is_killed_whole(case: &Case) {
    // A bound where the backend has one (the v2 tree of a hybrid host has not), and a bound in
    // the loop, so that a broken kill leaves no endless fork storm: it only has to keep
    // forking while it is killed.
    let pids_max = check(&case.layout, Need::Pids).ok().map(|()| 400);
    let cg = case.cgroup(
        "forker",
        &Limits {
            pids_max,
            ..Limits::default()
        },
    );
    let mut c = sh("i=0; while [ $i -lt 300 ]; do sleep 300 & sleep 0.01; i=$((i+1)); done");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    let pids = wait_until("the task to fork", || cg.pids(), |p| p.len() > 10);
    cg.kill_all(Duration::from_secs(5)).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(cg.pids().is_empty());
    wait_all_dead(&pids);
    case.finish(cg);
}

fn a_double_forked_daemon_does_not_outlive_its_task(case: &Case) {
    let cg = case.cgroup("daemon", &Limits::default());
    let mut c = sh("(setsid sleep 1000 &) ; sleep 1000");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    let pids = wait_until("the daemon to start", || cg.pids(), |p| p.len() >= 3);
    cg.kill_all(Duration::from_secs(5)).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    wait_all_dead(&pids);
    case.finish(cg);
}

fn cpu_time_is_counted_for_the_task_alone(case: &Case) {
    let cg = case.cgroup("cputime", &Limits::default());
    assert_eq!(cg.usage().cpu_seconds, 0.0, "{:?}", cg.usage());
    let t = Instant::now();
    let mut c = sh("while :; do :; done");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    let used = wait_until(
        "CPU time to be counted",
        || cg.usage().cpu_seconds,
        |s| *s > 0.2,
    );
    // One single-threaded loop: never more than the wall time (the host's would be more).
    assert!(
        used <= t.elapsed().as_secs_f64() + 0.05,
        "{used:.3} s of CPU in {:?}",
        t.elapsed()
    );
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    case.finish(cg);
}

fn a_cpu_hog_with_a_hard_cap_gets_its_share(case: &Case) {
    let cg = case.cgroup(
        "cpuhog",
        &Limits {
            cpus: Some(0.5),
            cpu_hard_cap: true,
            ..Limits::default()
        },
    );
    let mut c = sh("while :; do :; done");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    let before = cg.usage().cpu_seconds;
    let t = Instant::now();
    // The measurement window: the sleep is the test.
    std::thread::sleep(Duration::from_secs(2));
    let used = (cg.usage().cpu_seconds - before) / t.elapsed().as_secs_f64();
    assert!(
        (0.425..=0.575).contains(&used),
        "used {used:.3} of a core, cap 0.5"
    );
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    case.finish(cg);
}

fn a_limit_without_its_controller_is_refused_naming_its_file(case: &Case) {
    let err = case
        .layout
        .create(
            &case.parent,
            "nomem",
            &Limits {
                memory_bytes: Some(64 << 20),
                ..Limits::default()
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("nomem/memory.max"), "{err}");
    // The half-made cgroup went with the error.
    assert_eq!(case.layout.children(&case.parent), Vec::<String>::new());
}

fn cgroups_left_by_a_dead_agent_are_found_adopted_and_removed(case: &Case) {
    let layout = &case.layout;
    let parent = &case.parent;
    let cg = case.cgroup("left-behind", &Limits::default());
    let dirs: Vec<PathBuf> = cg.dirs().to_vec();
    let mut child = spawn(&mut sh("sleep 600"), Some(&cg), &Rlimits::default()).unwrap();
    let pid = child.id() as i32;
    // The owner goes away without cleaning up, as a killed agent does.
    std::mem::forget(cg);
    assert_eq!(layout.children(parent), ["left-behind"]);
    let adopted = layout.adopt(parent, "left-behind");
    assert_eq!(adopted.dirs(), dirs);
    assert!(adopted.pids().contains(&pid), "{:?}", adopted.pids());
    adopted.destroy().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(!alive(pid), "the orphan's process was killed");
    assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    assert!(layout.children(parent).is_empty());
}
