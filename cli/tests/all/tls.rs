//! A cluster over TLS: certificates made with `agora cert`, a master and an agent that
//! serve TLS and link over mutual TLS, a framework and an operator with client
//! certificates; agents without an agent certificate of the cluster CA cannot register.

use std::path::{Path, PathBuf};

use agora_core::TaskState;
use agora_proto::tls::{Credentials, ServerTls};
use agora_proto::v1::{self, agent_link_client::AgentLinkClient};
use agora_sdk::masters::Auth;
use agora_sdk::{DialPolicy, Operator, SchedulerConfig};
use tokio::net::TcpListener;

use crate::native::command;
use crate::*;

/// Runs `agora cert ARGS` in `dir`, which must succeed.
fn cert(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .arg("cert")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agora cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files of one issued certificate.
fn issued(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

fn server(dir: &Path, stem: &str) -> ServerTls {
    let (c, k) = issued(dir, stem);
    ServerTls::load(&c, &k, &dir.join("ca.pem")).unwrap()
}

fn client(dir: &Path, stem: Option<&str>) -> Credentials {
    let files = stem.map(|s| issued(dir, s));
    Credentials::load(
        &dir.join("ca.pem"),
        files.as_ref().map(|f| f.0.as_path()),
        files.as_ref().map(|f| f.1.as_path()),
    )
    .unwrap()
}

fn with_cert(tls: &Credentials) -> Auth {
    Auth {
        tls: Some(tls.clone()),
        token: None,
    }
}

/// Opens an agent link session with `tls`, as an agent would (its registration first).
async fn session(master: &str, tls: &Credentials) -> Result<(), String> {
    let channel = agora_proto::tls::endpoint(master, Some(tls))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let register = v1::AgentMessage {
        message: Some(v1::agent_message::Message::Register(
            v1::agent_message::Register::default(),
        )),
    };
    AgentLinkClient::new(channel)
        .session(tokio_stream::iter([register]))
        .await
        .map(drop)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_admits_only_agents_of_its_ca_and_runs_tasks() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (certs, rogue) = (dir.path().join("certs"), dir.path().join("rogue"));
    cert(&certs, &["init"]);
    cert(&certs, &["issue", "master", "m1"]);
    cert(&certs, &["issue", "agent", "a1"]);
    cert(&certs, &["issue", "client", "ops"]);
    // Valid TLS, but signed by another CA.
    cert(&rogue, &["init"]);
    cert(&rogue, &["issue", "agent", "intruder"]);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master = format!("http://{}", listener.local_addr().unwrap());
    let mut config = fast_master();
    config.work_dir = Some(dir.path().join("master"));
    config.tls = Some(server(&certs, "master-m1"));
    let mut master_handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
    let ops = client(&certs, Some("client-ops"));
    let quick = DialPolicy {
        deadline: Duration::from_secs(2),
        ..DialPolicy::default()
    };

    // A caller in the clear gets nowhere.
    let plain = Operator::connect_as(&master, quick.clone(), Auth::default()).await;
    assert!(plain.is_err(), "an operator in the clear was served");

    let mut agent_config = agent_config_for(
        &master,
        &dir.path().join("agent"),
        1,
        "cpus:2;mem:1024;disk:1024",
    );
    agent_config.tls = Some(server(&certs, "agent-a1"));
    let agent_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent =
        Stoppable::spawn(move |stop| agora_agent::run(agent_listener, agent_config, stop));
    let operator = Operator::connect_as(&master, DialPolicy::default(), with_cert(&ops))
        .await
        .unwrap();
    wait_until("the agent to register over TLS", || async {
        let st = operator.state().await.unwrap();
        st.agents.len() == 1
            && st.agents[0].active
            && st.agents[0]
                .info
                .as_ref()
                .is_some_and(|i| i.endpoint.starts_with("https://"))
    })
    .await;

    // Only an agent certificate of this CA registers.
    let intruder = client(&rogue, Some("agent-intruder"));
    let err = session(&master, &intruder).await.unwrap_err();
    assert!(
        err.starts_with("connect") || err.contains("Unavailable"),
        "{err}"
    );
    let err = session(&master, &ops).await.unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    let err = session(&master, &client(&certs, None)).await.unwrap_err();
    assert!(err.starts_with("Unauthenticated"), "{err}");
    let st = operator.state().await.unwrap();
    assert_eq!(st.agents.len(), 1, "{:?}", st.agents);

    // A framework over TLS runs a native task, and a Wasm task through the Wasm executor,
    // which reaches its agent over TLS with the CA the agent gave it.
    let mut fc = SchedulerConfig::new(master.clone(), "secure");
    fc.auth = Some(with_cert(&ops));
    let (s, mut events) = subscribed(fc).await;
    launch(
        &s,
        &mut events,
        command("native", "exit 0", "cpus:0.1;mem:32"),
    )
    .await;
    wait_state(&mut events, &tid("native"), TaskState::Finished).await;
    launch(
        &s,
        &mut events,
        wasm_task("wasm", "hello", "cpus:0.1;mem:32"),
    )
    .await;
    wait_state(&mut events, &tid("wasm"), TaskState::Finished).await;
    // Its principal is its certificate's.
    wait_until("the framework in the state, as ops", || async {
        let st = operator.state().await.unwrap();
        st.frameworks
            .first()
            .and_then(|f| f.info.as_ref())
            .is_some_and(|i| i.principal == "ops")
    })
    .await;

    drop(s);
    agent.stop().await.unwrap();
    master_handle.stop().await.unwrap();
}

/// Three master processes over TLS: raft is mutual TLS between master certificates, a new
/// leader is elected when the first dies, and raft refuses any other certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masters_replicate_over_mutual_tls_and_only_with_each_other() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    cert(&certs, &["init"]);
    for m in ["m1", "m2", "m3"] {
        cert(&certs, &["issue", "master", m]);
    }
    cert(&certs, &["issue", "client", "ops"]);
    let mut ports = crate::ports::free_ports("127.0.0.1", 6);
    let raft_ports = ports.split_off(3);
    let peers = (0..3)
        .map(|i| format!("{}=127.0.0.1:{}/{}", i + 1, ports[i], raft_ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    let ca = certs.join("ca.pem");
    let mut procs: Vec<Killed> = (0..3)
        .map(|i| {
            let (c, k) = issued(&certs, &format!("master-m{}", i + 1));
            let flag = |p: &Path| p.display().to_string();
            Killed::master(
                &format!("127.0.0.1:{}", ports[i]),
                &dir.path().join(format!("m{}", i + 1)),
                &[
                    "--id",
                    &(i + 1).to_string(),
                    "--peers",
                    &peers,
                    "--tls-cert",
                    &flag(&c),
                    "--tls-key",
                    &flag(&k),
                    "--tls-ca",
                    &flag(&ca),
                ],
            )
        })
        .collect();
    let list = ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let ops = client(&certs, Some("client-ops"));
    let leader_of = |op: &Operator| {
        let master = op.master();
        ports
            .iter()
            .position(|p| master.ends_with(&format!(":{p}")))
            .unwrap()
    };
    // Any master answers health; only the leader serves the state, so the client is left
    // at the leader.
    let leading = || async {
        let op = Operator::connect_as(&list, DialPolicy::default(), with_cert(&ops))
            .await
            .ok()?;
        op.state().await.ok()?;
        Some(leader_of(&op))
    };
    wait_until("a leader over TLS", || async { leading().await.is_some() }).await;
    let first = leading().await.unwrap();

    // Raft takes only masters' certificates.
    let raft = |i: usize, tls: Credentials| {
        let url = format!("http://127.0.0.1:{}", raft_ports[i]);
        async move {
            let channel = agora_proto::tls::endpoint(&url, Some(&tls))
                .unwrap()
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            v1::raft_peer_client::RaftPeerClient::new(channel)
                .vote(v1::RaftPayload { data: Vec::new() })
                .await
                .map(drop)
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    };
    let err = raft(first, ops.clone()).await.unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    let err = raft(first, client(&certs, None)).await.unwrap_err();
    assert!(
        !err.starts_with("InvalidArgument"),
        "reached raft without a certificate: {err}"
    );

    // The leader dies; the others elect one of themselves over mutual TLS.
    procs[first].kill();
    wait_until("a new leader over TLS", || async {
        leading().await.is_some_and(|l| l != first)
    })
    .await;
}
