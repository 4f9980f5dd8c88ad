//! Authenticated principals: a master with bearer tokens (made with `agora token create`)
//! serves frameworks and operators only with a valid token, binds a framework to the
//! principal it proved, and guards blob uploads the same way over HTTP.

use agora_master::auth::Tokens;
use agora_sdk::masters::Auth;
use agora_sdk::{DialPolicy, Error, Operator, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::*;

fn token_for(file: &std::path::Path, principal: &str) -> String {
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

fn with_token(token: &str) -> Auth {
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
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
            .args([what, "--listen", "0.0.0.0:0", "--work-dir"])
            .arg(dir.path().join(what))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what} served in the clear");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--tls-cert") && err.contains("--insecure"),
            "{what}: {err}"
        );
    }
}
