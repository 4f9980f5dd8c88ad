//! The real binaries: `agora master`, `agora agent` and `agora run` as separate processes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use agora_examples::{Target, task};

/// A child process stopped when dropped (SIGTERM, so an agent ends its containers; SIGKILL
/// if it lingers), so a test leaves nothing running.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agora() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agora"));
    c.env_remove("AGORA_MASTER").env("AGORA_LOG", "warn");
    c
}

/// Starts a process and waits for a line of its stderr containing `ready`, returning it.
fn start(cmd: &mut Command, ready: &str) -> (Proc, String) {
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let proc = Proc(child);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains(ready) {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (proc, line);
        }
    }
    panic!("process exited before printing {ready:?}");
}

fn run(master: &str, args: &[&str]) -> Output {
    agora()
        .arg("run")
        .arg("--master")
        .arg(master)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn master_agent_and_run_as_processes() {
    let work = tempfile::tempdir().unwrap();
    let (_master, line) = start(
        agora().args([
            "master",
            "--listen",
            "127.0.0.1:0",
            "--agent-heartbeat-interval",
            "200ms",
        ]),
        "listening on",
    );
    let master = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned();
    let (agent, _) = start(
        agora()
            .args([
                "agent",
                "--master",
                &master,
                "--listen",
                "127.0.0.1:0",
                "--resources",
                "cpus:2;mem:1024",
                "--cgroup-parent",
                &format!("agora-test-{}-processes", std::process::id()),
                "--on-exit",
                "kill",
            ])
            .arg("--work-dir")
            .arg(work.path()),
        "serving sandboxes",
    );
    // Wait for the agent to register.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = agora()
            .args(["agents", "--master", &master])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("active") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent never registered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let hello = task("hello", Target::P1);
    let out = run(
        &master,
        &[hello.to_str().unwrap(), "--", "from", "a", "process"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello, from a process!\n"
    );
    for step in [
        "TASK_STARTING",
        "TASK_RUNNING",
        "TASK_FINISHED",
        "hello: greeted 3 argument(s)",
    ] {
        assert!(stderr.contains(step), "missing {step} in:\n{stderr}");
    }

    // A native command, the same way.
    let out = run(
        &master,
        &[
            "--cmd",
            "echo native $((6*7)); exit 4",
            "--cpus",
            "0.5",
            "--mem",
            "128",
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "native 42\n");

    // The task's exit code becomes the command's.
    let out = run(&master, &["--env", "EXIT_CODE=7", hello.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A failing task exits non-zero with the reason on stderr.
    let spin = task("spin", Target::P2);
    let out = run(
        &master,
        &[
            "--cpus",
            "0.5",
            "--timeout",
            "300ms",
            spin.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TASK_FAILED") && stderr.contains("CONTAINER_LIMITATION_CPU"),
        "{stderr}"
    );

    // No fitting offer: a clear error, not a hang.
    let out = run(
        &master,
        &[
            "--mem",
            "999999",
            "--offer-wait",
            "1s",
            hello.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no offer with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tasks = agora()
        .args(["tasks", "--all", "--master", &master])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&tasks.stdout);
    assert!(
        table.contains("TASK_FINISHED") && table.contains("TASK_FAILED"),
        "{table}"
    );

    // Roles from the command line.
    let cmd = |args: &[&str]| {
        agora()
            .args(args)
            .args(["--master", &master])
            .output()
            .unwrap()
    };
    let out = cmd(&["quota", "set", "prod", "--guarantee", "cpus:999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("force"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cmd(&[
        "quota",
        "set",
        "prod",
        "--guarantee",
        "cpus:0.5",
        "--limit",
        "cpus:1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cmd(&["weight", "set", "prod", "2.5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let roles = String::from_utf8_lossy(&cmd(&["roles"]).stdout).into_owned();
        let line = roles
            .lines()
            .find(|l| l.starts_with("prod "))
            .unwrap_or_default()
            .to_owned();
        if line.contains("2.5") && line.contains("cpus:0.5") && line.contains("cpus:1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "roles table: {roles}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = cmd(&["quota", "remove", "prod"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A stopped agent leaves no container (its Wasm executor's included) behind.
    drop(agent);
    assert_eq!(
        crate::native::cgroups_left("processes"),
        Vec::<std::path::PathBuf>::new()
    );
}
