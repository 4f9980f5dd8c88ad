//! The Mesos v1 Executor API (`POST /api/v1/executor` on an agent) driven as a Mesos
//! executor drives it, raw: the token, the content-type and accept checks, malformed calls,
//! protobuf both ways, SUBSCRIBE → SUBSCRIBED and LAUNCH, UPDATE → ACKNOWLEDGED, KILL,
//! HEARTBEAT both ways. The executor process is a shell that only tells the test its token.

use agora_core::{ExecutorId, FrameworkId};
use agora_mesos::recordio;
use agora_mesos::v1 as mesos;
use agora_mesos::v1::executor::{self as mx, call::Type};
use prost::Message as _;

use crate::native::{start_with, wait_no_cgroups};
use crate::*;

const TEST: &str = "mesos-executor-wire";

async fn post(
    url: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    accept: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut r = reqwest::Client::new().post(url).body(body);
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    if let Some(c) = content_type {
        r = r.header("content-type", c);
    }
    if let Some(a) = accept {
        r = r.header("accept", a);
    }
    r.send().await.unwrap()
}

/// Posts `call` in protobuf with `token`: its status and body.
async fn call(url: &str, token: &str, call: &mx::Call) -> (u16, String) {
    let r = post(
        url,
        Some(token),
        Some("application/x-protobuf"),
        None,
        call.encode_to_vec(),
    )
    .await;
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An executor subscription's events in protobuf, HEARTBEATs counted apart.
struct Events {
    response: reqwest::Response,
    reader: recordio::Reader,
    heartbeats: usize,
}

impl Events {
    /// The next event other than HEARTBEAT; fails after 30 s.
    async fn next(&mut self) -> mx::Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let e = self.any_until(deadline).await;
            if e.r#type() == mx::event::Type::Heartbeat {
                self.heartbeats += 1;
                continue;
            }
            return e;
        }
    }

    /// The next event, HEARTBEAT included; fails after 30 s.
    async fn any(&mut self) -> mx::Event {
        self.any_until(tokio::time::Instant::now() + Duration::from_secs(30))
            .await
    }

    async fn any_until(&mut self, deadline: tokio::time::Instant) -> mx::Event {
        loop {
            if let Some(r) = self.reader.next_record().expect("the stream is RecordIO") {
                return mx::Event::decode(r).expect("each record is an Event");
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("the event awaited within 30 s")
                .expect("the stream reads")
                .expect("the stream goes on");
            self.reader.push(&chunk);
        }
    }
}

/// Waits for the executor of framework `fw` to write its token into its sandbox.
async fn token_of(cluster: &Cluster, fw: &FrameworkId) -> String {
    let runs = cluster
        .dir
        .path()
        .join("agent-1/frameworks")
        .join(fw.as_str())
        .join("executors/raw/runs");
    let read = || {
        std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .find_map(|run| std::fs::read_to_string(run.path().join("token")).ok())
    };
    wait_until("the executor to write its token", || {
        let done = read().is_some_and(|t| t.ends_with('\n'));
        async move { done }
    })
    .await;
    read().unwrap().trim().to_owned()
}

fn ids(fw: &FrameworkId) -> (mesos::FrameworkId, mesos::ExecutorId) {
    (
        mesos::FrameworkId {
            value: fw.to_string(),
        },
        mesos::ExecutorId {
            value: "raw".into(),
        },
    )
}

fn update(fw: &FrameworkId, state: mesos::TaskState, uuid: Option<&[u8]>) -> mx::Call {
    let (framework_id, executor_id) = ids(fw);
    mx::Call {
        framework_id,
        executor_id,
        r#type: Some(Type::Update as i32),
        update: Some(mx::call::Update {
            status: mesos::TaskStatus {
                task_id: mesos::TaskId { value: "t".into() },
                state: state as i32,
                source: Some(mesos::task_status::Source::Executor as i32),
                uuid: uuid.map(<[u8]>::to_vec),
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_endpoint_speaks_mesos_s_wire() {
    let cluster = start_with(TEST, None, |c| {
        c.executors.mesos_heartbeat = Duration::from_millis(300);
    })
    .await;
    let (s, mut events) = cluster.framework("mesos-executor-wire").await;
    // The executor only says its token (in its sandbox) and waits.
    let exec = agora_sdk::task::executor(
        &ExecutorId::new("raw").unwrap(),
        "printf '%s\\n' \"$MESOS_EXECUTOR_AUTHENTICATION_TOKEN\" > token.tmp && mv token.tmp token && exec sleep 600",
    );
    let offer = next_offers(&mut events).await.remove(0);
    let task = TaskBuilder::from_info(v1::TaskInfo {
        name: "t".into(),
        task_id: Some((&tid("t")).into()),
        ..Default::default()
    })
    .resources(agora_core::parse_resources("cpus:0.2;mem:64").unwrap())
    .executor(exec)
    .data("task data")
    .build_for(&offer);
    s.accept(&[offer.id.clone().unwrap()], vec![task], Some(0.0))
        .await
        .unwrap();
    let fw = s.framework_id().unwrap();
    let token = token_of(&cluster, &fw).await;
    let url = format!("{}/api/v1/executor", cluster.agents[0].endpoint);
    let (framework_id, executor_id) = ids(&fw);
    let subscribe = mx::Call {
        framework_id: framework_id.clone(),
        executor_id: executor_id.clone(),
        r#type: Some(Type::Subscribe as i32),
        subscribe: Some(mx::call::Subscribe::default()),
        ..Default::default()
    };
    let json_subscribe = format!(
        r#"{{"type":"SUBSCRIBE","framework_id":{{"value":"{fw}"}},"executor_id":{{"value":"raw"}}}}"#
    );

    // Credentials first: nothing of the body is read without a token.
    let r = post(
        &url,
        None,
        Some("application/json"),
        None,
        json_subscribe.clone().into(),
    )
    .await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("MESOS_EXECUTOR_AUTHENTICATION_TOKEN")
    );
    let (code, body) = call(&url, "not-the-token", &subscribe).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("wrong token"), "{body}");
    // Encodings, as Mesos checks them.
    let r = post(
        &url,
        Some(&token),
        None,
        None,
        json_subscribe.clone().into(),
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = post(
        &url,
        Some(&token),
        Some("text/plain"),
        None,
        json_subscribe.clone().into(),
    )
    .await;
    assert_eq!(r.status(), 415);
    let r = post(
        &url,
        Some(&token),
        Some("application/json"),
        Some("text/html"),
        json_subscribe.clone().into(),
    )
    .await;
    assert_eq!(r.status(), 406);
    // Malformed calls: 400 with a message.
    for (content_type, body) in [
        ("application/json", b"{\"type\": \"SUBSCRIBE\", ".to_vec()),
        ("application/json", br#"{"type": "NO_SUCH_CALL"}"#.to_vec()),
        ("application/x-protobuf", vec![0xff, 0xff, 0xff, 0x07]),
    ] {
        let r = post(&url, Some(&token), Some(content_type), None, body).await;
        assert_eq!(r.status(), 400);
        assert!(!r.text().await.unwrap().trim().is_empty());
    }
    let mut other = subscribe.clone();
    other.executor_id.value = "not-running".into();
    let (code, body) = call(&url, &token, &other).await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not-running"), "{body}");

    // SUBSCRIBE in protobuf: SUBSCRIBED, then the task the executor was started for.
    let r = post(
        &url,
        Some(&token),
        Some("application/x-protobuf"),
        Some("application/x-protobuf"),
        subscribe.encode_to_vec(),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-protobuf");
    let mut stream = Events {
        response: r,
        reader: recordio::Reader::new(1 << 20),
        heartbeats: 0,
    };
    let e = stream.next().await;
    assert_eq!(e.r#type(), mx::event::Type::Subscribed, "{e:?}");
    let sub = e.subscribed.unwrap();
    assert_eq!(sub.executor_info.executor_id.value, "raw");
    assert_eq!(sub.executor_info.framework_id, Some(framework_id.clone()));
    assert_eq!(sub.framework_info.id, Some(framework_id.clone()));
    assert_eq!(sub.framework_info.name, "mesos-executor-wire");
    let agent = cluster.state().await.agents[0].id.clone().unwrap().value;
    assert_eq!(sub.agent_info.id.map(|a| a.value), Some(agent));
    let e = stream.next().await;
    assert_eq!(e.r#type(), mx::event::Type::Launch, "{e:?}");
    let launched = e.launch.unwrap().task;
    assert_eq!(launched.task_id.value, "t");
    assert_eq!(launched.data.as_deref(), Some(&b"task data"[..]));
    assert!(launched.resources.iter().any(|r| r.name == "mem"));

    // UPDATE: refused without a uuid or as TASK_STAGING; else 202 and ACKNOWLEDGED.
    let (code, body) = call(
        &url,
        &token,
        &update(&fw, mesos::TaskState::TaskRunning, None),
    )
    .await;
    assert_eq!((code, body.trim()), (400, "Expecting 'uuid' to be present"));
    let (code, body) = call(
        &url,
        &token,
        &update(
            &fw,
            mesos::TaskState::TaskStaging,
            Some(b"0123456789abcdef"),
        ),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("TASK_STAGING"), "{body}");
    let uuid = *b"fedcba9876543210";
    let (code, body) = call(
        &url,
        &token,
        &update(&fw, mesos::TaskState::TaskRunning, Some(&uuid)),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let e = stream.next().await;
    assert_eq!(e.r#type(), mx::event::Type::Acknowledged, "{e:?}");
    let ack = e.acknowledged.unwrap();
    assert_eq!(
        (ack.task_id.value.as_str(), ack.uuid.as_slice()),
        ("t", &uuid[..])
    );
    let running = next_matching(&mut events, "TASK_RUNNING from the executor", |e| match e {
        agora_sdk::Event::Update(st) if state_of(&st) == TaskState::Running => Some(st),
        _ => None,
    })
    .await;
    assert_eq!(running.source(), v1::StatusSource::SourceExecutor);

    // HEARTBEAT both ways; the agent's come every 300 ms here.
    let heartbeat = mx::Call {
        framework_id: framework_id.clone(),
        executor_id: executor_id.clone(),
        r#type: Some(Type::Heartbeat as i32),
        ..Default::default()
    };
    let (code, body) = call(&url, &token, &heartbeat).await;
    assert_eq!(code, 202, "{body}");
    let (code, _) = call(&url, "not-the-token", &heartbeat).await;
    assert_eq!(code, 403);

    if stream.heartbeats == 0 {
        let e = stream.any().await;
        assert_eq!(e.r#type(), mx::event::Type::Heartbeat, "{e:?}");
    }

    // KILL from the framework reaches the executor; its TASK_KILLED reaches the framework.
    s.kill(&tid("t"), None).await.unwrap();
    let e = stream.next().await;
    assert_eq!(e.r#type(), mx::event::Type::Kill, "{e:?}");
    assert_eq!(e.kill.unwrap().task_id.value, "t");
    let (code, body) = call(
        &url,
        &token,
        &update(&fw, mesos::TaskState::TaskKilled, Some(b"killed-killed-16")),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let killed = next_matching(&mut events, "TASK_KILLED", |e| match e {
        agora_sdk::Event::Update(st) if state_of(&st).is_terminal() => Some(st),
        _ => None,
    })
    .await;
    assert_eq!(state_of(&killed), TaskState::Killed, "{killed:?}");
    s.teardown().await.unwrap();
    wait_no_cgroups(TEST).await;
}
