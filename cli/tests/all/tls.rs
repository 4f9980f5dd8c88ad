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
    let Err(e) = plain else {
        panic!("an operator in the clear was served")
    };
    assert!(
        e.to_string().contains("AGORA_CA"),
        "no hint at the CA in {e}"
    );

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

/// One method of a gRPC service, from the protocol's descriptors.
struct Method {
    service: String,
    name: String,
    client_streaming: bool,
    server_streaming: bool,
}

/// Every method of every `agora.v1` service, read from the descriptor set the build wrote.
fn methods() -> Vec<Method> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(agora_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in set.file {
        for s in &file.service {
            for m in &s.method {
                out.push(Method {
                    service: format!("{}.{}", file.package(), s.name()),
                    name: m.name().to_owned(),
                    client_streaming: m.client_streaming(),
                    server_streaming: m.server_streaming(),
                });
            }
        }
    }
    out
}

/// Calls `m` at `url` with an empty message (valid for any proto3 request) as `tls` says;
/// `Ok` if served, the status code if refused, `Err(None)` if no connection was made.
async fn call(url: &str, tls: &Credentials, m: &Method) -> Result<(), Option<tonic::Code>> {
    let channel = agora_proto::tls::endpoint(url, Some(tls))
        .unwrap()
        .connect()
        .await
        .map_err(|_| None)?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|_| None)?;
    let path: tonic::codegen::http::uri::PathAndQuery =
        format!("/{}/{}", m.service, m.name).parse().unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let code = |s: tonic::Status| Some(s.code());
    let served = match (m.client_streaming, m.server_streaming) {
        (false, false) => grpc
            .unary(tonic::Request::new(()), path, codec)
            .await
            .map(drop),
        (false, true) => grpc
            .server_streaming(tonic::Request::new(()), path, codec)
            .await
            .map(drop),
        _ => grpc
            .streaming(tonic::Request::new(tokio_stream::iter([()])), path, codec)
            .await
            .map(drop),
    };
    served.map_err(code)
}

/// Every gRPC method of the master and the agent, enumerated from the protocol's
/// descriptors, called without credentials, with another CA's certificate, with an expired
/// certificate, and as a principal the ACLs allow nothing: each is refused, and nothing
/// changed. (Raft's methods are on the raft port of a group, refused the same way in
/// `masters_replicate_over_mutual_tls_and_only_with_each_other`; the agent has no ACLs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_refuses_callers_without_the_right_credentials() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let (certs, rogue) = (dir.path().join("certs"), dir.path().join("rogue"));
    cert(&certs, &["init"]);
    cert(&certs, &["issue", "master", "m1"]);
    cert(&certs, &["issue", "agent", "a1"]);
    cert(&certs, &["issue", "client", "nobody"]);
    cert(&certs, &["issue", "client", "admin"]);
    cert(&certs, &["issue", "client", "stale", "--days", "0"]);
    cert(&rogue, &["init"]);
    cert(&rogue, &["issue", "client", "admin"]);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master = format!("http://{}", listener.local_addr().unwrap());
    let mut config = fast_master();
    config.work_dir = Some(dir.path().join("master"));
    config.tls = Some(server(&certs, "master-m1"));
    // Only admin may look; nobody may do anything.
    config.acls = Some(std::sync::Arc::new(
        agora_master::acl::Acls::parse(
            "[[rule]]\naction = \"view_state\"\nprincipals = [\"admin\"]\nobjects = [\"*\"]\n",
        )
        .unwrap(),
    ));
    let mut master_handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
    let mut agent_config =
        agent_config_for(&master, &dir.path().join("agent"), 1, "cpus:2;mem:1024");
    agent_config.tls = Some(server(&certs, "agent-a1"));
    let agent_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("http://{}", agent_listener.local_addr().unwrap());
    let mut agent =
        Stoppable::spawn(move |stop| agora_agent::run(agent_listener, agent_config, stop));
    let admin = Operator::connect_as(
        &master,
        DialPolicy::default(),
        with_cert(&client(&certs, Some("client-admin"))),
    )
    .await
    .unwrap();
    wait_until("the agent", || async {
        admin.state().await.is_ok_and(|s| s.agents.len() == 1)
    })
    .await;
    let before = admin.state().await.unwrap();

    let all = methods();
    let on = |m: &Method| match m.service.as_str() {
        "agora.v1.Scheduler" | "agora.v1.AgentLink" | "agora.v1.Operator" => Some(&master),
        "agora.v1.Sandbox" | "agora.v1.Executor" => Some(&agent_url),
        "agora.v1.RaftPeer" => None,
        other => panic!("a service this test does not place: {other}"),
    };
    assert!(all.len() >= 20, "{} methods", all.len());
    let anonymous = client(&certs, None);
    let (foreign, stale) = (
        client(&rogue, Some("client-admin")),
        client(&certs, Some("client-stale")),
    );
    let nobody = client(&certs, Some("client-nobody"));
    let mut checked = 0;
    for m in &all {
        let Some(url) = on(m) else { continue };
        let what = format!("{}/{}", m.service, m.name);
        checked += 1;
        // The health stays open for probes and load balancers, as Mesos's.
        let open = what == "agora.v1.Operator/GetHealth";
        let r = call(url, &anonymous, m).await;
        if open {
            assert_eq!(r, Ok(()), "{what}");
        } else {
            assert_eq!(
                r,
                Err(Some(tonic::Code::Unauthenticated)),
                "{what} with no certificate"
            );
        }
        for (who, tls) in [("another CA's", &foreign), ("an expired", &stale)] {
            let r = call(url, tls, m).await;
            assert!(
                matches!(
                    r,
                    // The handshake's refusal reaches the client as a broken connection (TLS 1.3
                    // checks the client's certificate after the client thinks it is done).
                    Err(None)
                        | Err(Some(
                            tonic::Code::Unavailable
                                | tonic::Code::Unknown
                                | tonic::Code::Cancelled
                        ))
                ),
                "{what} with {who} certificate: {r:?}"
            );
        }
        if url == &master && !open {
            // An authenticated principal the ACLs allow nothing: refused by the ACLs, or
            // (calls that act on the caller's own framework, with no header here) as
            // malformed — never served.
            let r = call(url, &nobody, m).await;
            // Refused outright: what needs no message to judge (the agent link takes agents'
            // certificates only). A well-formed subscription is refused by the ACLs in the
            // ACL matrix test; this empty one lacks its framework info.
            let refused_outright = [
                "agora.v1.Operator/GetState",
                "agora.v1.Operator/GetRoles",
                "agora.v1.AgentLink/Session",
            ];
            let expected: &[tonic::Code] = if refused_outright.contains(&what.as_str()) {
                &[tonic::Code::PermissionDenied]
            } else {
                &[tonic::Code::PermissionDenied, tonic::Code::InvalidArgument]
            };
            assert!(
                matches!(r, Err(Some(c)) if expected.contains(&c)),
                "{what} as a principal without ACLs: {r:?}"
            );
        }
    }
    assert!(checked >= 18, "{checked} methods checked");

    // Nothing changed.
    let after = admin.state().await.unwrap();
    assert_eq!(after.frameworks, before.frameworks);
    assert_eq!(after.roles, before.roles);
    assert_eq!(after.agents.len(), 1);

    agent.stop().await.unwrap();
    master_handle.stop().await.unwrap();
}

/// The certificate the server at `addr` presents in a TLS handshake (trusting the CA in
/// `dir`), or why there is none yet.
async fn served(addr: std::net::SocketAddr, dir: &Path) -> Result<Vec<u8>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
}

/// An `agora master` reads its certificate, key and CA again on SIGHUP: a renewed
/// certificate is served to the next connection without a restart; files that do not make
/// a configuration leave it serving what it had.
#[tokio::test]
async fn a_master_serves_a_renewed_certificate_after_sighup() {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    cert(&certs, &["init"]);
    cert(&certs, &["issue", "master", "old"]);
    cert(&certs, &["issue", "master", "new"]);
    let der = |stem: &str| {
        CertificateDer::from_pem_file(certs.join(format!("{stem}.pem")))
            .unwrap()
            .to_vec()
    };
    let install = |stem: &str| {
        let (c, k) = issued(&certs, stem);
        std::fs::copy(c, certs.join("served.pem")).unwrap();
        std::fs::copy(k, certs.join("served.key")).unwrap();
    };
    install("master-old");
    let port = crate::ports::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let served_pem = certs.join("served.pem");
    let served_key = certs.join("served.key");
    let ca = certs.join("ca.pem");
    let master = Killed::master(
        &addr.to_string(),
        &dir.path().join("master"),
        &[
            "--tls-cert",
            served_pem.to_str().unwrap(),
            "--tls-key",
            served_key.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
        ],
    );
    let pid = master.0.as_ref().unwrap().id();
    let hangup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP {pid}");
    };
    // Waits (with a deadline) until the master serves `want`.
    let serves = |want: Vec<u8>, why: &'static str| {
        let certs = certs.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let got = served(addr, &certs).await;
                if got.as_ref().is_ok_and(|g| *g == want) {
                    return;
                }
                let got = got.map(|_| "another certificate");
                assert!(tokio::time::Instant::now() < deadline, "{why}: {got:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    serves(der("master-old"), "the master serves its certificate").await;

    install("master-new");
    hangup();
    serves(der("master-new"), "after SIGHUP the renewed certificate").await;

    // A key that is not the certificate's: refused, the renewed one still served (and the
    // master still up after another SIGHUP).
    std::fs::copy(issued(&certs, "master-old").1, &served_key).unwrap();
    hangup();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(served(addr, &certs).await, Ok(der("master-new")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(master);
}
