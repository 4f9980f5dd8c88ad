//! Authenticated principals: a master with bearer tokens (made with `agora token create`)
//! serves frameworks and operators only with a valid token, binds a framework to the
//! principal it proved, and guards blob uploads the same way over HTTP.

use agora_master::auth::Tokens;
use agora_sdk::masters::Auth;
use agora_sdk::{DialPolicy, Error, Operator, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::*;

pub fn token_for(file: &std::path::Path, principal: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["token", "create", principal, "--file"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn with_token(token: &str) -> Auth {
    Auth {
        tls: None,
        token: Some(token.to_owned()),
    }
}

fn refused(e: &Error) -> tonic::Code {
    match e {
        Error::Refused { code, .. } => *code,
        other => panic!("not a refusal: {other:?}"),
    }
}

/// The status line of a `PUT /blobs/...` with an empty body, with `authorization` if given.
async fn put_blob(addr: std::net::SocketAddr, authorization: Option<&str>) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    // The digest of nothing.
    let req = format!(
        "PUT /blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 HTTP/1.1\r\nHost: m\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_with_tokens_serves_only_principals_and_binds_frameworks_to_them() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let ops = token_for(&file, "ops");
    let _other = token_for(&file, "batch");
    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(
        !stored.contains(&ops),
        "the master's file holds hashes only"
    );

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let master = format!("http://{addr}");
    let mut config = fast_master();
    config.work_dir = Some(dir.path().join("master"));
    config.tokens = Tokens::load(&file).unwrap();
    let mut handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
    wait_until("the master to serve", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;

    // No token, or a wrong one: refused; the health stays open.
    let anonymous = Operator::connect_as(&master, DialPolicy::default(), Auth::default())
        .await
        .unwrap();
    assert_eq!(
        refused(&anonymous.state().await.unwrap_err()),
        tonic::Code::Unauthenticated
    );
    let guess = Operator::connect_as(&master, DialPolicy::default(), with_token("agt_guess"))
        .await
        .unwrap();
    assert_eq!(
        refused(&guess.state().await.unwrap_err()),
        tonic::Code::Unauthenticated
    );
    let operator = Operator::connect_as(&master, DialPolicy::default(), with_token(&ops))
        .await
        .unwrap();
    assert!(operator.state().await.unwrap().frameworks.is_empty());

    let framework = |auth: Auth, principal: &str| {
        let mut c = SchedulerConfig::new(master.clone(), "secure");
        c.auth = Some(auth);
        c.framework.principal = principal.to_owned();
        c.reconnect = false;
        agora_sdk::subscribe(c)
    };
    let e = framework(Auth::default(), "").await.err().unwrap();
    assert_eq!(refused(&e), tonic::Code::Unauthenticated, "{e}");
    // A principal it did not prove.
    let e = framework(with_token(&ops), "batch").await.err().unwrap();
    assert_eq!(refused(&e), tonic::Code::PermissionDenied, "{e}");
    let (_s, mut events) = framework(with_token(&ops), "").await.unwrap();
    assert!(matches!(
        events.next().await,
        Some(agora_sdk::Event::Subscribed { .. })
    ));
    // (The operator's view is a snapshot a moment behind.)
    wait_until("the framework in the state, as ops", || async {
        let st = operator.state().await.unwrap();
        st.frameworks.len() == 1 && st.frameworks[0].info.as_ref().unwrap().principal == "ops"
    })
    .await;

    // Blob uploads: 401 without credentials, through with a token (Bearer, or Mesos-style
    // Basic naming the token's principal).
    assert!(put_blob(addr, None).await.contains(" 401 "));
    assert!(
        put_blob(addr, Some("Bearer agt_guess"))
            .await
            .contains(" 401 ")
    );
    let bearer = put_blob(addr, Some(&format!("Bearer {ops}"))).await;
    assert!(bearer.contains(" 20"), "{bearer}");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("ops:{ops}"));
    let basic = put_blob(addr, Some(&format!("Basic {basic}"))).await;
    assert!(basic.contains(" 20"), "{basic}");

    handle.stop().await.unwrap();
}

/// Beyond loopback, a master or an agent in the clear refuses to start, naming the flags;
/// `--insecure` lets it, with a warning.
#[test]
fn serving_beyond_loopback_in_the_clear_needs_insecure() {
    let dir = tempfile::tempdir().unwrap();
    for what in ["master", "agent"] {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
            .args([what, "--listen", "0.0.0.0:0", "--work-dir"])
            .arg(dir.path().join(what))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Killed(Some(child));
        // It must refuse at once; one that serves instead is killed at the deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.0.as_mut().unwrap().try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} served in the clear"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{what} served in the clear");
        let mut stderr = String::new();
        std::io::Read::read_to_string(
            child.0.as_mut().unwrap().stderr.as_mut().unwrap(),
            &mut stderr,
        )
        .unwrap();
        let out = std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: stderr.into_bytes(),
        };
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--tls-cert") && err.contains("--insecure"),
            "{what}: {err}"
        );
    }
}

/// Each action of the ACLs over the wire, for two principals: alice is allowed what bob is
/// denied (and denied what no rule names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_matrix_over_the_wire() {
    use agora_proto::resources_to_proto;
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let (alice, bob) = (token_for(&file, "alice"), token_for(&file, "bob"));
    let acls = r#"
        [[rule]]
        action = "register_framework"
        principals = ["alice"]
        objects = ["a/*"]
        [[rule]]
        action = "register_framework"
        principals = ["bob"]
        objects = ["b"]
        [[rule]]
        action = "run_task_as"
        principals = ["*"]
        objects = ["root"]
        allow = false
        [[rule]]
        action = "run_task_as"
        principals = ["alice"]
        objects = ["*"]
        [[rule]]
        action = "grant_capability"
        principals = ["alice"]
        objects = ["random"]
        [[rule]]
        action = "launch_task"
        principals = ["alice"]
        objects = ["*"]
        [[rule]]
        action = "reserve"
        principals = ["alice"]
        objects = ["a/*"]
        [[rule]]
        action = "update_quota"
        principals = ["alice"]
        objects = ["*"]
        [[rule]]
        action = "update_weight"
        principals = ["alice"]
        objects = ["*"]
        [[rule]]
        action = "upload_blob"
        principals = ["alice"]
        objects = ["*"]
        [[rule]]
        action = "view_state"
        principals = ["alice"]
        objects = ["*"]
    "#;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let master = format!("http://{addr}");
    let mut config = fast_master();
    config.work_dir = Some(dir.path().join("master"));
    config.tokens = Tokens::load(&file).unwrap();
    config.acls = Some(std::sync::Arc::new(
        agora_master::acl::Acls::parse(acls).unwrap(),
    ));
    let mut handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
    let agent_config = agent_config_for(&master, &dir.path().join("agent"), 1, "cpus:4;mem:2048");
    let agent_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent =
        Stoppable::spawn(move |stop| agora_agent::run(agent_listener, agent_config, stop));

    let op = |token: &str| Operator::connect_as(&master, DialPolicy::default(), with_token(token));
    let (op_alice, op_bob) = (op(&alice).await.unwrap(), op(&bob).await.unwrap());
    wait_until("the agent", || async {
        op_alice.state().await.is_ok_and(|s| s.agents.len() == 1)
    })
    .await;

    // view_state, update_quota, update_weight.
    let denied = |r: Result<(), Error>| refused(&r.unwrap_err()) == tonic::Code::PermissionDenied;
    assert!(denied(op_bob.state().await.map(drop)));
    let cpus = agora_core::parse_resources("cpus:0.5").unwrap();
    op_alice.set_quota("a", &cpus, None, false).await.unwrap();
    assert!(denied(op_bob.set_quota("a", &cpus, None, false).await));
    op_alice.set_weight("a", 2.0).await.unwrap();
    assert!(denied(op_bob.set_weight("a", 2.0).await));

    // upload_blob.
    assert!(
        put_blob(addr, Some(&format!("Bearer {alice}")))
            .await
            .contains(" 20")
    );
    assert!(
        put_blob(addr, Some(&format!("Bearer {bob}")))
            .await
            .contains(" 403 ")
    );

    // register_framework, in the roles each may.
    let framework = |token: &str, role: &str| {
        let mut c = SchedulerConfig::new(master.clone(), "acl");
        c.auth = Some(with_token(token));
        c.framework.roles = vec![role.to_owned()];
        c.reconnect = false;
        agora_sdk::subscribe(c)
    };
    // Alice first, alone (two frameworks would split the agent's offers between them).
    let (sa, mut ea) = framework(&alice, "a").await.unwrap();
    assert!(matches!(
        ea.next().await,
        Some(agora_sdk::Event::Subscribed { .. })
    ));
    let reserve = |role: &str, principal: &str| {
        vec![v1::Operation {
            operation: Some(v1::operation::Operation::Reserve(v1::operation::Reserve {
                resources: resources_to_proto(
                    &agora_core::parse_resources(&format!("cpus({role},{principal}):0.1")).unwrap(),
                ),
            })),
        }]
    };
    // reserve: alice for her role.
    let offer = next_offers(&mut ea).await.remove(0);
    sa.accept_operations(&[offer.id.unwrap()], reserve("a", "alice"), Some(0.0))
        .await
        .unwrap();

    // launch_task, run_task_as and grant_capability: refused tasks end TASK_ERROR with
    // REASON_TASK_UNAUTHORIZED.
    let unauthorized = |s: &v1::TaskStatus| s.reason() == v1::Reason::TaskUnauthorized;
    let cmd = |id: &str| crate::native::command(id, "exit 0", "cpus:0.1;mem:32");
    launch(&sa, &mut ea, cmd("alice-native")).await;
    let s = wait_terminal(&mut ea, &tid("alice-native")).await;
    assert_eq!(s.state(), v1::TaskState::TaskFinished, "{s:?}");
    launch(&sa, &mut ea, cmd("as-root").user("root")).await;
    let s = wait_terminal(&mut ea, &tid("as-root")).await;
    assert!(
        unauthorized(&s) && s.message.contains("ACL rule 3"),
        "{s:?}"
    );
    let wasm = |id: &str, caps: v1::WasmCapabilities| {
        let mut t = wasm_task(id, "hello", "cpus:0.1;mem:32").build_for(&v1::Offer::default());
        if let Some(v1::task_info::Payload::Wasm(w)) = &mut t.payload {
            w.capabilities = Some(caps);
        }
        TaskBuilder::from_info(t)
    };
    let random = v1::WasmCapabilities {
        random: true,
        ..Default::default()
    };
    launch(&sa, &mut ea, wasm("random", random)).await;
    let s = wait_terminal(&mut ea, &tid("random")).await;
    assert_eq!(s.state(), v1::TaskState::TaskFinished, "{s:?}");
    let clock = v1::WasmCapabilities {
        wall_clock: true,
        ..Default::default()
    };
    launch(&sa, &mut ea, wasm("clock", clock)).await;
    let s = wait_terminal(&mut ea, &tid("clock")).await;
    assert!(
        unauthorized(&s) && s.message.contains("no ACL rule"),
        "{s:?}"
    );
    sa.teardown().await.unwrap();

    // Bob: only in his role; no reservation, no task.
    let e = framework(&bob, "a").await.err().unwrap();
    assert_eq!(refused(&e), tonic::Code::PermissionDenied, "{e}");
    let (sb, mut eb) = framework(&bob, "b").await.unwrap();
    assert!(matches!(
        eb.next().await,
        Some(agora_sdk::Event::Subscribed { .. })
    ));
    let offer = next_offers(&mut eb).await.remove(0);
    let e = sb
        .accept_operations(&[offer.id.unwrap()], reserve("b", "bob"), Some(0.0))
        .await
        .unwrap_err();
    assert_eq!(refused(&e), tonic::Code::PermissionDenied, "{e}");
    launch(&sb, &mut eb, cmd("bob-native")).await;
    let s = wait_terminal(&mut eb, &tid("bob-native")).await;
    assert!(unauthorized(&s), "{s:?}");

    drop((sa, sb));
    agent.stop().await.unwrap();
    handle.stop().await.unwrap();
}

/// `agora acl check` explains a decision, and exits 1 on a denial.
#[test]
fn acl_check_explains_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acls.toml");
    std::fs::write(
        &file,
        "[[rule]]\naction = \"update_quota\"\nprincipals = [\"ops\"]\nobjects = [\"eng/*\"]\n",
    )
    .unwrap();
    let check = |principal: &str, object: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
            .args(["acl", "check", principal, "update_quota", object, "--acls"])
            .arg(&file)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, said) = check("ops", "eng/web");
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("ACL rule 1"), "{said}");
    let (code, said) = check("dev", "eng/web");
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("no ACL rule allows it"), "{said}");
}
