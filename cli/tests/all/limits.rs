//! Exhaustion, over the wire: one principal floods the master with subscriptions, calls,
//! an oversized message, blob uploads, tasks and silent connections; each is refused with
//! an error naming its limit, while a well-behaved framework of another principal keeps
//! launching tasks in the same cluster.

use agora_master::auth::Tokens;
use agora_master::limits::Limits;
use agora_sdk::{DialPolicy, Error, Operator, SchedulerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::auth::{token_for as token, with_token as auth};
use crate::*;

fn exhausted(e: &Error, flag: &str) {
    match e {
        Error::Refused { code, message } => {
            assert_eq!(*code, tonic::Code::ResourceExhausted, "{message}");
            assert!(message.contains(flag), "{flag} not named in {message:?}");
        }
        other => panic!("not a refusal: {other:?}"),
    }
}

/// The status line and body of a `PUT /blobs/...` of `data` as `token`'s principal.
async fn put_blob(addr: std::net::SocketAddr, token: &str, data: &[u8]) -> String {
    use sha2::Digest;
    let hex = hex::encode(sha2::Sha256::digest(data));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /blobs/sha256:{hex} HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(data).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// One Wasm task of the well-behaved framework, launched and run to TASK_FINISHED.
async fn good_launches(s: &agora_sdk::Scheduler, events: &mut agora_sdk::Events, n: u32) {
    let id = format!("good-{n}");
    launch(s, events, wasm_task(&id, "hello", "cpus:0.1;mem:32")).await;
    let end = wait_terminal(events, &tid(&id)).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_cannot_exhaust_the_master_for_another() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    let good = token(&file, "good");
    let flood = token(&file, "flood");

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let master = format!("http://{addr}");
    let mut config = fast_master();
    config.work_dir = Some(dir.path().join("master"));
    config.tokens = Tokens::load(&file).unwrap();
    config.limits = Limits {
        call_rate: 50,
        call_burst: 100,
        subscriptions: 2,
        tasks: 3,
        offers: 0,
        blob_bytes: 1000,
        header_timeout: Duration::from_secs(1),
    };
    let mut handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
    let agent_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_config = agent_config_for(&master, &dir.path().join("agent"), 1, "cpus:4;mem:2048");
    let mut agent =
        Stoppable::spawn(move |stop| agora_agent::run(agent_listener, agent_config, stop));

    let ops = Operator::connect_as(&master, DialPolicy::default(), auth(&good))
        .await
        .unwrap();
    wait_until("the agent to register", || async {
        ops.state().await.is_ok_and(|s| s.agents.len() == 1)
    })
    .await;
    let framework = |token: &str, name: &str| {
        let mut c = SchedulerConfig::new(master.clone(), name);
        c.auth = Some(auth(token));
        c.reconnect = false;
        agora_sdk::subscribe(c)
    };
    let (s, mut events) = framework(&good, "good").await.unwrap();
    good_launches(&s, &mut events, 0).await;

    // A flood of subscriptions: two held, the third refused; the good framework goes on.
    let (f1, e1) = framework(&flood, "flood-1").await.unwrap();
    let (f2, e2) = framework(&flood, "flood-2").await.unwrap();
    exhausted(
        &framework(&flood, "flood-3").await.err().unwrap(),
        "--max-subscriptions-per-principal",
    );
    good_launches(&s, &mut events, 1).await;
    // (Frameworks that hold their offers unanswered keep them until the offer timeout: the
    // flooder's idle ones are torn down once they have shown what they show.)
    // A subscription that ends frees its place.
    f2.teardown().await.unwrap();
    drop(e2);
    wait_until("the ended subscription's place to be free", || async {
        match framework(&flood, "flood-3").await {
            Ok((s, e)) => {
                s.teardown().await.unwrap();
                drop(e);
                true
            }
            Err(_) => false,
        }
    })
    .await;
    f1.teardown().await.unwrap();
    drop(e1);

    // A flood of calls: refused past the burst, while the good operator's calls go through.
    let flooder = Operator::connect_as(&master, DialPolicy::default(), auth(&flood))
        .await
        .unwrap();
    let mut refused = None;
    for _ in 0..500 {
        if let Err(e) = flooder.state().await {
            refused = Some(e);
            break;
        }
    }
    exhausted(
        &refused.expect("500 calls at once are past a burst of 100"),
        "--max-call-rate",
    );
    ops.state().await.unwrap();
    good_launches(&s, &mut events, 2).await;

    // An oversized message: refused by size, before it is decoded.
    let mut raw = agora_proto::v1::operator_client::OperatorClient::connect(master.clone())
        .await
        .unwrap()
        .max_encoding_message_size(usize::MAX);
    let mut big = tonic::Request::new(agora_proto::v1::UpdateQuotaRequest {
        role: "r".repeat(agora_proto::MAX_MESSAGE_BYTES + 1),
        ..Default::default()
    });
    big.metadata_mut()
        .insert("authorization", format!("Bearer {good}").parse().unwrap());
    let e = raw.update_quota(big).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("too large"), "{e:?}");
    good_launches(&s, &mut events, 3).await;

    // Blob bytes: the flooder's second 600 bytes are past its 1000; the good principal has
    // its own.
    let r = put_blob(addr, &flood, &[1u8; 600]).await;
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");
    let r = put_blob(addr, &flood, &[2u8; 600]).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    assert!(r.contains("--max-blob-mib-per-principal"), "{r}");
    let r = put_blob(addr, &good, &[3u8; 600]).await;
    assert!(r.starts_with("HTTP/1.1 201"), "{r}");

    // Tasks: a principal's fourth task at once is refused, naming the bound.
    let (fs, mut fe) = framework(&flood, "flood-tasks").await.unwrap();
    // An offer that holds all four (a sliver left over from another framework would not).
    let offer = loop {
        let offer = next_offers(&mut fe).await.remove(0);
        let cpus: f64 = offer
            .resources
            .iter()
            .filter(|r| r.name == "cpus")
            .filter_map(|r| r.scalar.as_ref().map(|s| s.value))
            .sum();
        if cpus >= 1.0 {
            break offer;
        }
    };
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            wasm_task(&format!("flood-{i}"), "sleeper", "cpus:0.1;mem:32")
                .args(["30"])
                .build_for(&offer)
        })
        .collect();
    fs.accept(&[offer.id.clone().unwrap()], tasks, Some(0.0))
        .await
        .unwrap();
    let end = wait_terminal(&mut fe, &tid("flood-3")).await;
    assert_ended(
        &end,
        TaskState::Error,
        agora_proto::v1::Reason::TaskInvalid,
        "--max-tasks-per-principal 3",
    );
    fs.teardown().await.unwrap();
    good_launches(&s, &mut events, 4).await;

    // Slow clients: a connection that sends part of a preface, and one that sends nothing,
    // are closed after the header timeout.
    for first in [&b"PRI * HT"[..], b""] {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(first).await.unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "a silent connection was left open: {closed:?}"
        );
    }
    good_launches(&s, &mut events, 5).await;

    drop((s, events, fe));
    agent.stop().await.unwrap();
    handle.stop().await.unwrap();
}
