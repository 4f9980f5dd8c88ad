//! The Mesos v1 Scheduler API (`POST /api/v1/scheduler`) driven as a Mesos framework
//! drives it: raw HTTP, JSON or protobuf, RecordIO event streams.

use agora_mesos::recordio;
use serde_json::{Value, json};

use crate::*;

/// A Mesos framework's HTTP side: calls posted to the master, each on a connection of its
/// own (as Mesos's clients do once subscribed).
struct Mesos {
    url: String,
    http: reqwest::Client,
}

/// A subscription's event stream, read record by record.
struct Stream {
    response: reqwest::Response,
    reader: recordio::Reader,
}

impl Stream {
    /// The next event, decoded from JSON; fails after 30 s.
    async fn next(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self.reader.next_record().expect("the stream is RecordIO") {
                return serde_json::from_slice(&r).expect("each record is JSON");
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("an event within 30 s")
                .expect("the stream reads")
                .expect("the stream goes on");
            self.reader.push(&chunk);
        }
    }

    /// Reads on until the master ends the stream; fails after 30 s.
    async fn ends(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("the stream ends within 30 s")
                .expect("the stream reads");
            if chunk.is_none() {
                return;
            }
        }
    }

    /// The next event of `kind` (others are skipped); fails after 30 s.
    async fn next_of(&mut self, kind: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let e = self.next().await;
            if e["type"] == kind {
                return e;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {kind} event within 30 s"
            );
        }
    }
}

impl Mesos {
    fn new(master: &str) -> Mesos {
        Mesos {
            url: format!("{master}/api/v1/scheduler"),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, call: &Value, stream: Option<&str>) -> reqwest::Response {
        let mut r = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(call.to_string());
        if let Some(s) = stream {
            r = r.header("mesos-stream-id", s);
        }
        r.send().await.unwrap()
    }

    /// SUBSCRIBE with `framework_info`: the stream id and the event stream.
    async fn subscribe(&self, framework_info: Value) -> (String, Stream) {
        let response = self
            .post(
                &json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info}}),
                None,
            )
            .await;
        assert_eq!(response.status(), 200, "{:?}", response.headers());
        assert_eq!(response.headers()["content-type"], "application/json");
        let stream_id = response.headers()["mesos-stream-id"]
            .to_str()
            .unwrap()
            .to_owned();
        (
            stream_id,
            Stream {
                response,
                reader: recordio::Reader::new(1 << 20),
            },
        )
    }

    /// Acknowledges `status` when it carries a uuid (which must be answered 202).
    async fn ack(&self, fw: &str, stream: &str, status: &Value) {
        let Some(uuid) = status.get("uuid") else {
            return;
        };
        let (code, body) = self
            .call(
                fw,
                stream,
                json!({"type": "ACKNOWLEDGE", "acknowledge": {
                    "agent_id": status["agent_id"],
                    "task_id": status["task_id"],
                    "uuid": uuid,
                }}),
            )
            .await;
        assert_eq!(code, 202, "ACKNOWLEDGE: {body}");
    }

    /// Posts `call` for framework `fw` on stream `stream`; its status and body.
    async fn call(&self, fw: &str, stream: &str, mut call: Value) -> (u16, String) {
        call["framework_id"] = json!({"value": fw});
        let r = self.post(&call, Some(stream)).await;
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

fn scalar(name: &str, value: f64) -> Value {
    json!({"name": name, "type": "SCALAR", "scalar": {"value": value}})
}

fn command_task(id: &str, agent: &Value, command: Value) -> Value {
    json!({
        "name": id,
        "task_id": {"value": id},
        "agent_id": agent,
        "resources": [scalar("cpus", 0.1), scalar("mem", 32.0)],
        "command": command,
    })
}

/// The final and every other status of each task until each of `tasks` ended,
/// acknowledging every update that carries a uuid.
async fn run_to_end(
    m: &Mesos,
    fw: &str,
    stream_id: &str,
    events: &mut Stream,
    tasks: &[&str],
) -> HashMap<String, Vec<Value>> {
    let mut seen: HashMap<String, Vec<Value>> = HashMap::new();
    let ended = |seen: &HashMap<String, Vec<Value>>, t: &str| {
        seen.get(t).and_then(|s| s.last()).is_some_and(|s| {
            [
                "TASK_FINISHED",
                "TASK_FAILED",
                "TASK_KILLED",
                "TASK_ERROR",
                "TASK_LOST",
                "TASK_DROPPED",
            ]
            .contains(&s["state"].as_str().unwrap_or_default())
        })
    };
    while !tasks.iter().all(|t| ended(&seen, t)) {
        let e = events.next_of("UPDATE").await;
        let status = e["update"]["status"].clone();
        m.ack(fw, stream_id, &status).await;
        let id = status["task_id"]["value"].as_str().unwrap().to_owned();
        seen.entry(id).or_default().push(status);
    }
    seen
}

use std::collections::HashMap;

/// A Mesos framework speaking JSON subscribes, takes an offer, runs command tasks to their
/// ends (acknowledging each update), has a Docker task refused with TASK_ERROR, reconciles,
/// kills and tears down; calls on the wrong stream or of no subscription are refused as
/// Mesos refuses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesos_json_framework_runs_command_tasks() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let m = Mesos::new(&cluster.master);
    let (stream_id, mut events) = m
        .subscribe(json!({
            "user": "",
            "name": "mesos-json",
            "failover_timeout": 5.0,
            "capabilities": [{"type": "PARTITION_AWARE"}],
        }))
        .await;
    let subscribed = events.next().await;
    assert_eq!(subscribed["type"], "SUBSCRIBED", "{subscribed}");
    let fw = subscribed["subscribed"]["framework_id"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(subscribed["subscribed"]["heartbeat_interval_seconds"].is_number());
    let master = &subscribed["subscribed"]["master_info"];
    assert_eq!(
        master["port"].as_u64(),
        Some(u64::from(cluster.master_addr.port())),
        "{master}"
    );
    assert!(!master["id"].as_str().unwrap().is_empty(), "{master}");

    let offers = events.next_of("OFFERS").await;
    let offer = &offers["offers"]["offers"][0];
    assert_eq!(offer["framework_id"]["value"], fw.as_str());
    assert_eq!(offer["allocation_info"]["role"], "*", "{offer}");
    let cpus = offer["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "cpus")
        .unwrap();
    assert_eq!(cpus["type"], "SCALAR");
    assert_eq!(cpus["scalar"]["value"], 2.0);
    let agent = offer["agent_id"].clone();

    // Calls refused as Mesos refuses them, before any of them reaches the engine.
    let launch = |tasks: Vec<Value>| {
        json!({"type": "ACCEPT", "accept": {
            "offer_ids": [offer["id"]],
            "operations": [{"type": "LAUNCH", "launch": {"task_infos": tasks}}],
            "filters": {"refuse_seconds": 0.0},
        }})
    };
    let (code, body) = m
        .call(&fw, "not-the-stream", json!({"type": "REVIVE"}))
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("didn't match the stream ID"), "{body}");
    let r = m
        .post(
            &json!({"type": "REVIVE", "framework_id": {"value": fw}}),
            None,
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("Mesos-Stream-Id"));
    let (code, body) = m
        .call("someone-else", &stream_id, json!({"type": "REVIVE"}))
        .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = m.call(&fw, &stream_id, json!({"type": "SHUTDOWN"})).await;
    assert_eq!(code, 501, "{body}");

    let docker = {
        let mut t = command_task("docker", &agent, json!({"value": "true"}));
        t["container"] = json!({"type": "DOCKER", "docker": {"image": "busybox"}});
        t
    };
    let (code, body) = m
        .call(
            &fw,
            &stream_id,
            launch(vec![
                command_task("ok", &agent, json!({"value": "echo hello from mesos"})),
                command_task(
                    "argv",
                    &agent,
                    json!({"shell": false, "value": "/bin/sh", "arguments": ["sh", "-c", "exit 3"]}),
                ),
                command_task("long", &agent, json!({"value": "exec sleep 600"})),
                docker,
            ]),
        )
        .await;
    assert_eq!(code, 202, "ACCEPT: {body}");
    let seen = run_to_end(&m, &fw, &stream_id, &mut events, &["ok", "argv", "docker"]).await;
    let last = |t: &str| seen[t].last().unwrap().clone();
    assert_eq!(last("ok")["state"], "TASK_FINISHED", "{:?}", seen["ok"]);
    assert!(
        seen["ok"].iter().any(|s| s["state"] == "TASK_RUNNING"),
        "{:?}",
        seen["ok"]
    );
    assert_eq!(last("argv")["state"], "TASK_FAILED", "{:?}", seen["argv"]);
    assert!(
        last("argv")["message"].as_str().unwrap().contains('3'),
        "{}",
        last("argv")
    );
    let docker = last("docker");
    assert_eq!(docker["state"], "TASK_ERROR");
    assert_eq!(docker["source"], "SOURCE_MASTER");
    assert_eq!(docker["reason"], "REASON_TASK_INVALID");
    assert!(
        docker["message"].as_str().unwrap().contains("Docker"),
        "{docker}"
    );

    // The long one: running (until the others ended it was acknowledged along with them),
    // then reconciled (an answer without a uuid), then killed.
    let mut long = seen.get("long").cloned().unwrap_or_default();
    while !long.iter().any(|s| s["state"] == "TASK_RUNNING") {
        let e = events.next_of("UPDATE").await;
        let s = e["update"]["status"].clone();
        m.ack(&fw, &stream_id, &s).await;
        if s["task_id"]["value"] == "long" {
            long.push(s);
        }
    }
    let (code, body) = m
        .call(
            &fw,
            &stream_id,
            json!({"type": "RECONCILE", "reconcile": {"tasks": [{"task_id": {"value": "long"}}]}}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let reconciled = loop {
        let e = events.next_of("UPDATE").await;
        if e["update"]["status"]["task_id"]["value"] == "long" {
            break e["update"]["status"].clone();
        }
    };
    assert_eq!(reconciled["state"], "TASK_RUNNING", "{reconciled}");
    assert_eq!(
        reconciled["reason"], "REASON_RECONCILIATION",
        "{reconciled}"
    );
    assert!(reconciled.get("uuid").is_none(), "{reconciled}");
    let (code, body) = m
        .call(
            &fw,
            &stream_id,
            json!({"type": "KILL", "kill": {"task_id": {"value": "long"}, "agent_id": agent}}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let killed = run_to_end(&m, &fw, &stream_id, &mut events, &["long"]).await;
    assert_eq!(killed["long"].last().unwrap()["state"], "TASK_KILLED");

    let (code, body) = m.call(&fw, &stream_id, json!({"type": "TEARDOWN"})).await;
    assert_eq!(code, 202, "{body}");
    events.ends().await;
    crate::mesos_clients::torn_down(&cluster, &fw).await;
}

/// Posts `body` to the master's scheduler endpoint with the given `Content-Type` and
/// `Accept` (and headers); the status, the headers and the body.
async fn raw(
    master: &str,
    content_type: Option<&str>,
    accept: Option<&str>,
    extra: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, String) {
    // Redirects are the answer under test, not followed.
    let mut r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{master}/api/v1/scheduler"))
        .body(body);
    if let Some(c) = content_type {
        r = r.header("content-type", c);
    }
    if let Some(a) = accept {
        r = r.header("accept", a);
    }
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    (status, headers, r.text().await.unwrap_or_default())
}

/// The wire as Mesos clients meet it: protobuf both ways, the content-type and accept
/// checks, malformed bodies, calls without or with an unknown type, a stream id where none
/// belongs, the wrong method; the master serves on after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_endpoint_speaks_mesos_s_wire() {
    use agora_mesos::v1::scheduler;
    use prost::Message as _;
    let cluster = Cluster::start(&["cpus:1;mem:256"]).await;
    let master = cluster.master.as_str();
    let json = Some("application/json");
    let subscribe =
        br#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"user":"","name":"x"}}}"#;

    let r = reqwest::Client::new()
        .get(format!("{master}/api/v1/scheduler"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    for (content_type, accept, extra, body, code, says) in [
        (None, json, &[][..], subscribe.to_vec(), 400, "Content-Type"),
        (
            Some("text/plain"),
            json,
            &[],
            subscribe.to_vec(),
            415,
            "Content-Type",
        ),
        (
            json,
            Some("text/html"),
            &[],
            subscribe.to_vec(),
            406,
            "Accept",
        ),
        (
            json,
            json,
            &[],
            b"{".to_vec(),
            400,
            "mesos.v1.scheduler.Call",
        ),
        (
            json,
            json,
            &[],
            br#"{"type": 3} trailing"#.to_vec(),
            400,
            "mesos.v1.scheduler.Call",
        ),
        (
            Some("application/x-protobuf"),
            json,
            &[],
            b"\xff\xff\xff".to_vec(),
            400,
            "mesos.v1.scheduler.Call",
        ),
        (json, json, &[], b"{}".to_vec(), 400, "'type'"),
        (
            json,
            json,
            &[],
            br#"{"type":"NO_SUCH_CALL"}"#.to_vec(),
            400,
            "'type'",
        ),
        (
            json,
            json,
            &[],
            br#"{"type":"UNKNOWN"}"#.to_vec(),
            501,
            "UNKNOWN",
        ),
        (
            json,
            json,
            &[("mesos-stream-id", "x")],
            subscribe.to_vec(),
            400,
            "Mesos-Stream-Id",
        ),
        (
            json,
            json,
            &[],
            br#"{"type":"SUBSCRIBE"}"#.to_vec(),
            400,
            "'subscribe'",
        ),
        (
            json,
            json,
            &[],
            br#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"user":"","name":"x"},"suppressed_roles":["other"]}}"#.to_vec(),
            400,
            "suppressed role",
        ),
        // A type number no Mesos defines, in protobuf: no type, as in JSON.
        (
            Some("application/x-protobuf"),
            json,
            &[],
            scheduler::Call {
                r#type: Some(99),
                ..Default::default()
            }
            .encode_to_vec(),
            400,
            "'type'",
        ),
    ] {
        let (status, _, text) = raw(master, content_type, accept, extra, body.clone()).await;
        assert_eq!(
            status,
            code,
            "{content_type:?} {accept:?} {}: {text}",
            String::from_utf8_lossy(&body)
        );
        assert!(text.contains(says), "{status}: {text}");
    }

    // Protobuf in and out: the events are RecordIO records of mesos.v1.scheduler.Event.
    let call = scheduler::Call {
        r#type: Some(scheduler::call::Type::Subscribe as i32),
        subscribe: Some(scheduler::call::Subscribe {
            framework_info: agora_mesos::v1::FrameworkInfo {
                user: String::new(),
                name: "protobuf".into(),
                ..Default::default()
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut response = reqwest::Client::new()
        .post(format!("{master}/api/v1/scheduler"))
        .header("content-type", "application/x-protobuf")
        .header("accept", "application/x-protobuf")
        .body(call.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    let stream_id = response.headers()["mesos-stream-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut reader = recordio::Reader::new(1 << 20);
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !events
        .iter()
        .any(|e: &scheduler::Event| e.r#type() == scheduler::event::Type::Offers)
    {
        match reader.next_record().unwrap() {
            Some(r) => events.push(scheduler::Event::decode(r).unwrap()),
            None => {
                let chunk = tokio::time::timeout_at(deadline, response.chunk())
                    .await
                    .expect("OFFERS within 30 s")
                    .unwrap()
                    .unwrap();
                reader.push(&chunk);
            }
        }
    }
    assert_eq!(events[0].r#type(), scheduler::event::Type::Subscribed);
    let fw = events[0].subscribed.as_ref().unwrap().framework_id.clone();
    let offer = events
        .iter()
        .find_map(|e| e.offers.as_ref())
        .unwrap()
        .offers[0]
        .clone();
    let decline = scheduler::Call {
        framework_id: Some(fw),
        r#type: Some(scheduler::call::Type::Decline as i32),
        decline: Some(scheduler::call::Decline {
            offer_ids: vec![offer.id],
            filters: None,
        }),
        ..Default::default()
    };
    // The second time the offer is gone, and there is nothing to decline (202, as Mesos).
    for _ in 0..2 {
        let (status, _, text) = raw(
            master,
            Some("application/x-protobuf"),
            None,
            &[("mesos-stream-id", &stream_id)],
            decline.encode_to_vec(),
        )
        .await;
        assert_eq!(status, 202, "{text}");
    }

    let health = reqwest::get(format!("{master}/health")).await.unwrap();
    assert_eq!(health.status(), 200, "the master serves on");
}

/// A follower answers a Mesos framework with 307 and the leader in `Location`, as a Mesos
/// master does; the framework subscribes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_sends_mesos_frameworks_to_the_leader() {
    let group = crate::failover::Group::start();
    let leader = group.leader(None).await;
    let follower = (leader + 1) % 3;
    let at = |i: usize| format!("http://127.0.0.1:{}", group.ports[i]);
    let subscribe =
        br#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"user":"","name":"x"}}}"#.to_vec();
    let json = Some("application/json");
    let want = format!("//127.0.0.1:{}/api/v1/scheduler", group.ports[leader]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, headers, text) = raw(&at(follower), json, json, &[], subscribe.clone()).await;
        // Until the follower hears of the leader it answers 503.
        if status == 307 {
            assert_eq!(headers["location"], want.as_str(), "{text}");
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no redirect: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leads = reqwest::Client::new()
        .post(format!("http:{want}"))
        .header("content-type", "application/json")
        .body(subscribe)
        .send()
        .await
        .unwrap();
    assert_eq!(leads.status(), 200);
    // A call of that subscription sent to the follower goes to the leader too.
    let stream_id = leads.headers()["mesos-stream-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (status, headers, text) = raw(
        &at(follower),
        json,
        json,
        &[("mesos-stream-id", &stream_id)],
        br#"{"type":"REVIVE","framework_id":{"value":"any"}}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 307, "{text}");
    assert_eq!(headers["location"], want.as_str());
}

/// A Mesos framework (JSON over HTTP) and an Agora SDK framework (gRPC) in one cluster at
/// once: one allocator offers to both, each runs its task, the master sees both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesos_framework_and_an_sdk_framework_share_the_cluster() {
    let cluster = Cluster::start(&["cpus:1;mem:256", "cpus:1;mem:256"]).await;
    let (sdk, mut sdk_events) = cluster.framework("sdk").await;
    crate::launch(
        &sdk,
        &mut sdk_events,
        crate::native::command("sdk-task", "exec sleep 600", "cpus:0.5;mem:64"),
    )
    .await;
    wait_state(&mut sdk_events, &tid("sdk-task"), TaskState::Running).await;

    let m = Mesos::new(&cluster.master);
    let (stream_id, mut events) = m
        .subscribe(json!({"user": "", "name": "mesos", "failover_timeout": 5.0}))
        .await;
    let fw = events.next_of("SUBSCRIBED").await["subscribed"]["framework_id"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let offer = events.next_of("OFFERS").await["offers"]["offers"][0].clone();
    let (code, body) = m
        .call(
            &fw,
            &stream_id,
            json!({"type": "ACCEPT", "accept": {
                "offer_ids": [offer["id"]],
                "operations": [{"type": "LAUNCH", "launch": {"task_infos": [
                    command_task("mesos-task", &offer["agent_id"], json!({"value": "exec sleep 600"})),
                ]}}],
            }}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    loop {
        let e = events.next_of("UPDATE").await;
        let s = &e["update"]["status"];
        m.ack(&fw, &stream_id, s).await;
        if s["task_id"]["value"] == "mesos-task" && s["state"] == "TASK_RUNNING" {
            break;
        }
    }
    // Both frameworks hold resources of the one allocator at the same time.
    wait_until("both frameworks to hold their tasks' resources", || async {
        let state = cluster.state().await;
        let holding = state
            .frameworks
            .iter()
            .filter(|f| !f.used.is_empty())
            .count();
        let running = state
            .tasks
            .iter()
            .filter(|t| t.state == v1::TaskState::TaskRunning as i32)
            .count();
        holding == 2 && running == 2
    })
    .await;
    sdk.kill(&tid("sdk-task"), None).await.unwrap();
    wait_state(&mut sdk_events, &tid("sdk-task"), TaskState::Killed).await;
    let (code, body) = m.call(&fw, &stream_id, json!({"type": "TEARDOWN"})).await;
    assert_eq!(code, 202, "{body}");
}
