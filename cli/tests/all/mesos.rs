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
        if let Some(uuid) = status.get("uuid") {
            let (code, body) = m
                .call(
                    fw,
                    stream_id,
                    json!({"type": "ACKNOWLEDGE", "acknowledge": {
                        "agent_id": status["agent_id"],
                        "task_id": status["task_id"],
                        "uuid": uuid,
                    }}),
                )
                .await;
            assert_eq!(code, 202, "ACKNOWLEDGE: {body}");
        }
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
        if let Some(uuid) = s.get("uuid") {
            let ack = json!({"type": "ACKNOWLEDGE", "acknowledge": {
                "agent_id": s["agent_id"], "task_id": s["task_id"], "uuid": uuid}});
            assert_eq!(m.call(&fw, &stream_id, ack).await.0, 202);
        }
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
    wait_until("the framework to be torn down", || async {
        cluster
            .state()
            .await
            .frameworks
            .iter()
            .all(|f| f.id.as_ref().map(|i| i.value.as_str()) != Some(fw.as_str()))
    })
    .await;
}
