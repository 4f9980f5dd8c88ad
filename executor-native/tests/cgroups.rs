//! Real cgroups on this host (run as root, as CI is): limits hold, OOM kills are seen, every
//! process of a task can be killed, and nothing is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agora_executor_native::{Cgroups, Limits, Rlimits, TaskCgroup, spawn};

fn host() -> Cgroups {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests manage real cgroups and must run as root"
    );
    let c = Cgroups::detect(Path::new("/sys/fs/cgroup"));
    assert_ne!(c, Cgroups::None, "no cgroups found under /sys/fs/cgroup");
    c
}

fn cgroup(name: &str, limits: &Limits) -> TaskCgroup {
    host()
        .create(
            "agora-test",
            &format!("{name}-{}", std::process::id()),
            limits,
        )
        .unwrap()
}

/// Destroys the task's cgroup, then the test parent where no other test still uses it.
fn finish(cg: TaskCgroup) {
    let parents: Vec<_> = cg
        .dirs()
        .iter()
        .filter_map(|d| d.parent().map(Path::to_owned))
        .collect();
    let dirs: Vec<_> = cg.dirs().to_vec();
    cg.destroy().unwrap();
    assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    for p in parents {
        let _ = std::fs::remove_dir(p);
    }
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

#[test]
fn a_process_joins_its_cgroup_before_exec() {
    let cg = cgroup("join", &Limits::default());
    let mut c = Command::new("/bin/cat");
    c.arg("/proc/self/cgroup").stdout(Stdio::piped());
    let out = spawn(&mut c, Some(&cg), &Rlimits::default())
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let name = format!("join-{}", std::process::id());
    let lines = text.lines().filter(|l| l.contains(&name)).count();
    assert!(lines >= 2, "{text}");
    finish(cg);
}

#[test]
fn a_memory_bomb_is_oom_killed_inside_its_cgroup() {
    let limit = 64 << 20;
    let cg = cgroup(
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
    finish(cg);
}

#[test]
fn a_fork_bomb_stops_at_pids_max_and_is_killable() {
    let cg = cgroup(
        "forkbomb",
        &Limits {
            pids_max: Some(24),
            ..Limits::default()
        },
    );
    // Forks until fork fails; what it forked stays.
    let mut c = sh("while :; do sleep 1000 & done");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let n = cg.pids().len();
    assert!(n > 20 && n <= 24, "{n} processes");
    assert!(cg.usage().pids <= 24);
    let pids = cg.pids();
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    assert!(cg.pids().is_empty());
    assert!(pids.iter().all(|p| !alive(*p)), "survivors among {pids:?}");
    finish(cg);
}

#[test]
fn a_double_forked_daemon_does_not_outlive_its_task() {
    let cg = cgroup("daemon", &Limits::default());
    let mut c = sh("(setsid sleep 1000 &) ; sleep 1000");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cg.pids().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", cg.pids());
        std::thread::sleep(Duration::from_millis(10));
    }
    let pids = cg.pids();
    cg.kill_all(Duration::from_secs(5)).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    std::thread::sleep(Duration::from_millis(50));
    assert!(pids.iter().all(|p| !alive(*p)), "survivors among {pids:?}");
    finish(cg);
}

#[test]
fn a_cpu_hog_with_a_hard_cap_gets_its_share() {
    let cg = cgroup(
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
    std::thread::sleep(Duration::from_secs(2));
    let used = (cg.usage().cpu_seconds - before) / t.elapsed().as_secs_f64();
    assert!(
        (0.425..=0.575).contains(&used),
        "used {used:.3} of a core, cap 0.5"
    );
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    finish(cg);
}

#[test]
fn without_a_cgroup2_tree_the_freezer_kills_everything() {
    let Cgroups::V1 { controllers, .. } = host() else {
        // A pure v2 host kills through cgroup.kill, covered above.
        return;
    };
    let v1 = Cgroups::V1 {
        controllers,
        unified: None,
    };
    let cg = v1
        .create(
            "agora-test",
            &format!("freezer-{}", std::process::id()),
            &Limits {
                pids_max: Some(40),
                ..Limits::default()
            },
        )
        .unwrap();
    let mut c = sh("while :; do sleep 1000 & done");
    let mut child = spawn(&mut c, Some(&cg), &Rlimits::default()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pids = cg.pids();
    assert!(pids.len() > 10, "{pids:?}");
    cg.kill_all(Duration::from_secs(5)).unwrap();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(50));
    assert!(pids.iter().all(|p| !alive(*p)), "survivors among {pids:?}");
    finish(cg);
}

#[test]
fn cgroups_left_by_a_dead_agent_are_found_adopted_and_removed() {
    let layout = host();
    let parent = format!("agora-test-orphans-{}", std::process::id());
    let cg = layout
        .create(&parent, "left-behind", &Limits::default())
        .unwrap();
    let dirs = cg.dirs().to_vec();
    let mut child = spawn(&mut sh("sleep 600"), Some(&cg), &Rlimits::default()).unwrap();
    let pid = child.id() as i32;
    // The owner goes away without cleaning up, as a killed agent does.
    std::mem::forget(cg);
    assert_eq!(layout.children(&parent), ["left-behind"]);
    layout.adopt(&parent, "left-behind").destroy().unwrap();
    let _ = child.wait();
    assert!(!alive(pid), "the orphan's process was killed");
    assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    assert!(layout.children(&parent).is_empty());
    layout.remove_parent(&parent);
}
