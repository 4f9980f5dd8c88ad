//! `agora dev` as a user runs it: a process that says when its cluster is ready.

use std::process::{Command, Stdio};

use crate::*;

/// `agora dev --masters 3` says it is ready once its agent registered with the leader,
/// wherever the leader is among the three, and a framework given the list is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dev_cluster_of_three_masters_gets_ready() {
    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args([
            "dev",
            "--masters",
            "3",
            "--agents",
            "1",
            "--port",
            "0",
            "--work-dir",
        ])
        .arg(work.path())
        .env("AGORA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = lines_of(child.stdout.take().unwrap());
    let mut dev = Killed(Some(child));
    let mut masters = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("agora dev said it is ready within 30 s");
        if let Some(m) = line.strip_prefix("master: ") {
            masters.push(m.split_whitespace().next().unwrap().to_owned());
        }
        if line.starts_with("ready:") {
            break;
        }
    }
    assert_eq!(masters.len(), 3, "{masters:?}");
    // TLS and authentication are on; this client finds the dev cluster's credentials by
    // itself, and one without them is refused.
    assert!(
        masters.iter().all(|m| m.starts_with("https://")),
        "{masters:?}"
    );
    let root = agora_proto::tls::dev_root().unwrap();
    let left = agora_proto::tls::dev_dir(&root, &masters[0]);
    assert!(left.join("client.pem").exists(), "{}", left.display());
    let bare = agora_sdk::Operator::connect_as(
        &masters.join(","),
        agora_sdk::DialPolicy {
            deadline: Duration::from_secs(2),
            ..Default::default()
        },
        agora_sdk::masters::Auth::default(),
    )
    .await;
    assert!(bare.is_err(), "a client in the clear was served");
    let op = agora_sdk::Operator::connect(&masters.join(","))
        .await
        .unwrap();
    let st = op.state().await.unwrap();
    assert_eq!(st.agents.iter().filter(|a| a.active).count(), 1);

    // Ctrl-C stops it, and it leaves no cgroup behind.
    let mut child = dev.0.take().unwrap();
    let pid = child.id();
    // SAFETY: a signal to the child this test started and has not yet waited for.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agora dev did not stop within 20 s of SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|c| c.path().join(format!("agora-dev-{pid}")))
        .filter(|p| p.exists())
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    let creds = agora_proto::tls::dev_dir(&agora_proto::tls::dev_root().unwrap(), &masters[0]);
    assert!(
        !creds.exists(),
        "credentials left behind: {}",
        creds.display()
    );
}
