//! Each capability both ways: granted, it works; not granted, the task is denied.

use std::collections::HashMap;

use agora_examples::{Target, task_bytes};
use agora_executor_wasm::{AddrPattern, Outcome, Preopen};

use crate::*;

/// Runs capprobe with `probes`; returns each probe's line after the colon.
async fn probe(
    target: Target,
    sb: &Sandbox,
    probes: &[&str],
    tweak: impl FnOnce(&mut agora_executor_wasm::RunSpec),
) -> HashMap<String, String> {
    let rt = runtime();
    let program = load(&rt, task_bytes("capprobe", target)).await;
    let mut args = vec!["capprobe"];
    args.extend_from_slice(probes);
    let mut spec = sb.spec(&args);
    tweak(&mut spec);
    let report = run(&rt, &program, spec).await;
    assert_eq!(report.outcome, Outcome::Exited(0), "{}", sb.stderr());
    sb.stdout()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(p, r)| (p.to_owned(), r.to_owned()))
        .collect()
}

fn ok(r: &HashMap<String, String>, p: &str) -> bool {
    r.get(p).is_some_and(|v| v.starts_with("ok"))
}

#[tokio::test]
async fn the_sandbox_is_reachable_only_when_granted_and_never_beyond() {
    for target in [Target::P1, Target::P2] {
        let sb = Sandbox::new();
        std::fs::write(sb.dir.path().join("in.txt"), "inside").unwrap();
        // A link planted in the sandbox pointing at the host's /etc.
        std::os::unix::fs::symlink("/etc", sb.dir.path().join("etc-link")).unwrap();
        let probes = [
            "read:in.txt",
            "read:/in.txt",
            "write:out.txt",
            "read:../../../../etc/hostname",
            "read:/../etc/hostname",
            "read:etc-link/hostname",
            "read:/etc/hostname",
        ];
        let granted = probe(target, &sb, &probes, |s| s.caps.sandbox = true).await;
        assert!(ok(&granted, "read:in.txt"), "{target:?} {granted:?}");
        assert!(ok(&granted, "read:/in.txt"), "{granted:?}");
        assert!(ok(&granted, "write:out.txt"), "{granted:?}");
        assert_eq!(
            std::fs::read_to_string(sb.dir.path().join("out.txt")).unwrap(),
            "written by capprobe"
        );
        for escape in &probes[3..] {
            assert!(
                !ok(&granted, escape),
                "{target:?} {escape} escaped: {granted:?}"
            );
        }

        let sb = Sandbox::new();
        std::fs::write(sb.dir.path().join("in.txt"), "inside").unwrap();
        let denied = probe(target, &sb, &probes[..3], |_| {}).await;
        for p in &probes[..3] {
            assert!(
                !ok(&denied, p),
                "{target:?} {p} without the grant: {denied:?}"
            );
        }
        assert!(!sb.dir.path().join("out.txt").exists());
    }
}

#[tokio::test]
async fn volumes_are_read_only_or_read_write_as_granted() {
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("shared.txt"), "shared data").unwrap();
    let sb = Sandbox::new();
    let probes = ["read:/data/shared.txt", "write:/data/new.txt", "list:/data"];
    let ro = probe(Target::P1, &sb, &probes, |s| {
        s.caps.volumes.push(Preopen {
            host: volume.path().to_owned(),
            guest_path: "/data".into(),
            read_only: true,
        });
    })
    .await;
    assert_eq!(ro["read:/data/shared.txt"], "ok shared data");
    assert!(!ok(&ro, "write:/data/new.txt"), "{ro:?}");
    assert!(!volume.path().join("new.txt").exists());

    let rw = probe(Target::P1, &Sandbox::new(), &probes, |s| {
        s.caps.volumes.push(Preopen {
            host: volume.path().to_owned(),
            guest_path: "/data".into(),
            read_only: false,
        });
    })
    .await;
    assert!(ok(&rw, "write:/data/new.txt"), "{rw:?}");
    assert!(volume.path().join("new.txt").exists());

    let none = probe(Target::P1, &Sandbox::new(), &probes, |_| {}).await;
    assert!(!ok(&none, "read:/data/shared.txt"), "{none:?}");
}

#[tokio::test]
async fn sockets_open_only_to_granted_addresses() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let to = format!("connect:127.0.0.1:{port}");
    let to_other = format!("connect:127.0.0.1:{other_port}");
    let probes = [to.as_str(), to_other.as_str()];

    let none = probe(Target::P2, &Sandbox::new(), &probes, |_| {}).await;
    assert!(!ok(&none, &to), "{none:?}");

    let granted = probe(Target::P2, &Sandbox::new(), &probes, |s| {
        s.caps.connect = vec![format!("127.0.0.1:{port}").parse::<AddrPattern>().unwrap()];
    })
    .await;
    assert_eq!(granted[&to], "ok connected", "{granted:?}");
    assert!(
        !ok(&granted, &to_other),
        "only the granted port: {granted:?}"
    );
}

#[tokio::test]
async fn clocks_and_randomness_are_real_only_when_granted() {
    let probes = ["time", "random"];
    let a = probe(Target::P1, &Sandbox::new(), &probes, |_| {}).await;
    let b = probe(Target::P1, &Sandbox::new(), &probes, |_| {}).await;
    assert_eq!(a["time"], "ok 0", "a stopped clock: {a:?}");
    assert_eq!(a["random"], b["random"], "a fixed random stream");

    let grant = |s: &mut agora_executor_wasm::RunSpec| {
        s.caps.wall_clock = true;
        s.caps.random = true;
    };
    let c = probe(Target::P1, &Sandbox::new(), &probes, grant).await;
    let d = probe(Target::P1, &Sandbox::new(), &probes, grant).await;
    let secs: u64 = c["time"].trim_start_matches("ok ").parse().unwrap();
    assert!(secs > 1_700_000_000, "{c:?}");
    assert_ne!(c["random"], d["random"], "OS randomness differs run to run");
}

#[tokio::test]
async fn the_environment_is_only_what_the_task_was_given() {
    let sb = Sandbox::new();
    let r = probe(
        Target::P2,
        &sb,
        &["env:HOME", "env:PATH", "env:GIVEN"],
        |s| {
            s.env.push(("GIVEN".into(), "yes".into()));
        },
    )
    .await;
    assert!(!ok(&r, "env:HOME"), "{r:?}");
    assert!(!ok(&r, "env:PATH"), "{r:?}");
    assert_eq!(r["env:GIVEN"], "ok yes");
}
