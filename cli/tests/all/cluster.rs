//! The main paths: launching Wasm tasks and how they end, offers and filters between
//! frameworks, kills, reconciliation, the operator API.

use std::time::{Duration, Instant};

use agora_core::{FrameworkId, TaskState, parse_resources};
use agora_examples::{Target, task_bytes};
use agora_proto::{resources_from_proto, v1};
use agora_sdk::{Error, Event, TaskBuilder, read_sandbox_file};

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_finishes_with_its_output_in_the_sandbox() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("hello").await;
    let task = tid("hello-1");
    launch(
        &s,
        &mut events,
        wasm_task("hello-1", "hello", "cpus:0.5;mem:64").args(["Agora"]),
    )
    .await;
    // The agent reports every step, in order.
    wait_state(&mut events, &task, TaskState::Starting).await;
    wait_state(&mut events, &task, TaskState::Running).await;
    let end = wait_terminal(&mut events, &task).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    assert_eq!(end.exit_code, Some(0));
    assert!(
        end.usage
            .as_ref()
            .is_some_and(|u| u.fuel_used > 0 && u.wall_seconds > 0.0)
    );

    let fw = s.framework_id().unwrap();
    let endpoint = &cluster.agents[0].endpoint;
    let out = read_sandbox_file(endpoint, &fw, &task, "stdout")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "Hello, Agora!\n");
    let err = read_sandbox_file(endpoint, &fw, &task, "stderr")
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&err),
        "hello: greeted 1 argument(s)\n"
    );
    // Nothing outside the sandbox is readable through the agent.
    let escape = read_sandbox_file(endpoint, &fw, &task, "../../../../../etc/hostname").await;
    assert!(matches!(escape, Err(Error::Refused { .. })), "{escape:?}");

    // The terminal update was acknowledged (automatically), so the task is retired with its
    // resources back in the pool.
    wait_until("the task to be retired", || async {
        let st = cluster.state().await;
        st.tasks.is_empty()
            && st
                .completed_tasks
                .iter()
                .any(|t| t.task_id.as_ref().is_some_and(|i| i.value == "hello-1"))
            && resources_from_proto(&st.agents[0].used).unwrap().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_run_too() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("p2").await;
    let task = TaskBuilder::wasm(tid("hello-p2"), task_bytes("hello", Target::P2))
        .resources(parse_resources("cpus:0.5;mem:64").unwrap())
        .args(["component"]);
    launch(&s, &mut events, task).await;
    let end = wait_terminal(&mut events, &tid("hello-p2")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let out = read_sandbox_file(
        &cluster.agents[0].endpoint,
        &s.framework_id().unwrap(),
        &tid("hello-p2"),
        "stdout",
    )
    .await
    .unwrap();
    assert_eq!(out, b"Hello, component!\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_tasks_fail_with_the_reason() {
    let cluster = Cluster::start(&["cpus:2;mem:2048"]).await;
    let (s, mut events) = cluster.framework("misbehaving").await;

    // An infinite loop with cpus 0.5 and a 400 ms limit has 200 ms of CPU time.
    launch(
        &s,
        &mut events,
        wasm_task("spin", "spin", "cpus:0.5;mem:64").max_duration(0.4),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("spin")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Failed, v1::Reason::ContainerLimitationCpu),
        "{}",
        end.message
    );
    assert!(
        end.message.contains("CPU budget exhausted"),
        "{}",
        end.message
    );
    assert!(end.usage.as_ref().unwrap().cpu_seconds >= 0.2);

    // With a fuel cap, the same loop runs out of fuel instead.
    launch(
        &s,
        &mut events,
        wasm_task("spin-fuel", "spin", "cpus:0.5;mem:64").fuel(10_000_000),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("spin-fuel")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Failed, v1::Reason::ContainerLimitationFuel),
        "{}",
        end.message
    );

    // A memory bomb hits the task's mem.
    launch(
        &s,
        &mut events,
        wasm_task("bomb", "membomb", "cpus:0.5;mem:48"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("bomb")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Failed, v1::Reason::ContainerLimitationMemory),
        "{}",
        end.message
    );
    assert!(end.message.contains("limit 48.0 MiB"), "{}", end.message);

    // Bytes that are not Wasm are refused with a clear error.
    let junk = TaskBuilder::wasm(tid("junk"), b"MZ\x90\x00 definitely not wasm".to_vec())
        .resources(parse_resources("cpus:0.1;mem:32").unwrap());
    launch(&s, &mut events, junk).await;
    let end = wait_terminal(&mut events, &tid("junk")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Error, v1::Reason::ModuleInvalid)
    );
    assert!(
        end.message.contains("not a WebAssembly binary"),
        "{}",
        end.message
    );

    // A non-zero exit is a failure carrying the exit code.
    launch(
        &s,
        &mut events,
        wasm_task("exit3", "hello", "cpus:0.1;mem:32").env("EXIT_CODE", "3"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("exit3")).await;
    assert_eq!(
        (state_of(&end), end.exit_code),
        (TaskState::Failed, Some(3))
    );

    // The agent survived all of it.
    launch(
        &s,
        &mut events,
        wasm_task("after", "hello", "cpus:0.1;mem:32"),
    )
    .await;
    assert_eq!(
        state_of(&wait_terminal(&mut events, &tid("after")).await),
        TaskState::Finished
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frameworks_share_one_agent() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (a, mut ea) = cluster.framework("a").await;
    let (b, mut eb) = cluster.framework("b").await;
    // Whoever gets the agent first takes a slice and leaves the rest; the rest must reach the
    // other framework (its share is lower).
    let (first, mut first_events, second, mut second_events) = tokio::select! {
        o = next_offers(&mut ea) => { launch_on(&a, o, "a-1").await; (a.clone(), ea, b.clone(), eb) }
        o = next_offers(&mut eb) => { launch_on(&b, o, "b-1").await; (b.clone(), eb, a.clone(), ea) }
    };
    let offer = next_offers(&mut second_events).await.remove(0);
    let offered = resources_from_proto(&offer.resources).unwrap();
    assert_eq!(
        offered.cpus(),
        1.5,
        "the second framework is offered what the first left: {offered}"
    );
    second
        .accept(
            &[offer.id.clone().unwrap()],
            vec![wasm_task("second-1", "hello", "cpus:0.5;mem:64").build_for(&offer)],
            Some(0.0),
        )
        .await
        .unwrap();
    let first_id = first.framework_id().unwrap();
    let ends = [
        wait_terminal(
            &mut first_events,
            &tid(if first_id == a.framework_id().unwrap() {
                "a-1"
            } else {
                "b-1"
            }),
        )
        .await,
        wait_terminal(&mut second_events, &tid("second-1")).await,
    ];
    for end in ends {
        assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    }
}

async fn launch_on(s: &agora_sdk::Scheduler, offers: Vec<v1::Offer>, id: &str) {
    let offer = &offers[0];
    let task = wasm_task(id, "hello", "cpus:0.5;mem:64").build_for(offer);
    // Leftovers are filtered for this framework, so they go to the other one.
    s.accept(&[offer.id.clone().unwrap()], vec![task], Some(30.0))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_resources_wait_for_refuse_seconds() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("decliner").await;
    let offer = next_offers(&mut events).await.remove(0);
    let declined_at = Instant::now();
    s.decline(&[offer.id.clone().unwrap()], Some(1.5))
        .await
        .unwrap();
    let again = next_offers(&mut events).await;
    let waited = declined_at.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "re-offered after only {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "re-offered only after {waited:?}"
    );
    assert_eq!(again[0].agent_id, offer.agent_id);

    // Another framework is not bound by this one's filter.
    s.decline(&[again[0].id.clone().unwrap()], Some(60.0))
        .await
        .unwrap();
    let (other, mut other_events) = cluster.framework("other").await;
    let t = Instant::now();
    let o = next_offers(&mut other_events).await.remove(0);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    // REVIVE clears the first framework's 60 s filter.
    other
        .decline(&[o.id.clone().unwrap()], Some(60.0))
        .await
        .unwrap();
    let t = Instant::now();
    s.revive().await.unwrap();
    next_offers(&mut events).await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_frameworks_get_no_offers_until_revived() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("quiet").await;
    let offer = next_offers(&mut events).await.remove(0);
    s.suppress().await.unwrap();
    // Suppressing rescinds what is outstanding.
    let rescinded = next_matching(&mut events, "rescind", |e| match e {
        Event::Rescind(id) => Some(id),
        _ => None,
    })
    .await;
    assert_eq!(rescinded.as_str(), offer.id.as_ref().unwrap().value);
    // That nothing comes for a while is the test: this waits out the time on purpose.
    let quiet = tokio::time::timeout(Duration::from_millis(600), next_offers(&mut events)).await;
    assert!(quiet.is_err(), "a suppressed framework got offers");
    s.revive().await.unwrap();
    next_offers(&mut events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_is_killed() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("killer").await;
    let task = tid("forever");
    launch(
        &s,
        &mut events,
        wasm_task("forever", "spin", "cpus:0.5;mem:64"),
    )
    .await;
    wait_state(&mut events, &task, TaskState::Running).await;
    let t = Instant::now();
    s.kill(&task, None).await.unwrap();
    let end = wait_terminal(&mut events, &task).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Killed, v1::Reason::TaskKilled)
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "kill took {:?}",
        t.elapsed()
    );
    // Killing it again is refused: it has ended.
    wait_until("the task to be retired", || async {
        cluster.state().await.tasks.is_empty()
    })
    .await;
    let again = s.kill(&task, None).await;
    assert!(
        matches!(
            again,
            Err(Error::Refused {
                code: tonic::Code::FailedPrecondition,
                ..
            })
        ),
        "{again:?}"
    );
    let unknown = s.kill(&tid("never-launched"), None).await;
    assert!(
        matches!(
            unknown,
            Err(Error::Refused {
                code: tonic::Code::NotFound,
                ..
            })
        ),
        "{unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_more_than_offered_is_refused_per_task() {
    let cluster = Cluster::start(&["cpus:1;mem:512"]).await;
    let (s, mut events) = cluster.framework("greedy").await;
    let offer = next_offers(&mut events).await.remove(0);
    let fits = wasm_task("fits", "hello", "cpus:0.5;mem:64").build_for(&offer);
    let too_big = wasm_task("too-big", "hello", "cpus:4;mem:64").build_for(&offer);
    let no_room_left = wasm_task("no-room", "hello", "cpus:0.6;mem:64").build_for(&offer);
    s.accept(
        &[offer.id.clone().unwrap()],
        vec![fits, too_big, no_room_left],
        Some(0.0),
    )
    .await
    .unwrap();
    for id in ["too-big", "no-room"] {
        let end = wait_terminal(&mut events, &tid(id)).await;
        assert_eq!(
            (state_of(&end), end.reason()),
            (TaskState::Error, v1::Reason::InvalidOffers),
            "{id}"
        );
        assert!(
            end.message.contains("but the offers hold only"),
            "{}",
            end.message
        );
    }
    assert_eq!(
        state_of(&wait_terminal(&mut events, &tid("fits")).await),
        TaskState::Finished
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_calls_are_refused_and_change_nothing() {
    let cluster = Cluster::start(&["cpus:1;mem:512"]).await;
    let (s, mut events) = cluster.framework("careful").await;
    let offer = next_offers(&mut events).await.remove(0);
    let task = wasm_task("t", "hello", "cpus:0.5;mem:64").build_for(&offer);

    let bogus = v1::OfferId {
        value: "no-such-offer".into(),
    };
    let err = s
        .accept(
            &[bogus.clone(), offer.id.clone().unwrap()],
            vec![task.clone()],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Refused { code: tonic::Code::NotFound, message } if message.contains("no-such-offer")),
        "{err:?}"
    );
    let err = s.decline(&[bogus], None).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: tonic::Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );

    // A call on behalf of an unknown framework, or from a stale stream, is refused too.
    let mut raw = v1::scheduler_client::SchedulerClient::connect(cluster.master.clone())
        .await
        .unwrap();
    let header = |fw: &str, stream: &str| {
        Some(v1::CallHeader {
            framework_id: Some(v1::FrameworkId { value: fw.into() }),
            stream_id: stream.into(),
        })
    };
    let err = raw
        .revive(v1::ReviveRequest {
            header: header("nobody", "x"),
            roles: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let fw = s.framework_id().unwrap();
    let err = raw
        .accept(v1::AcceptRequest {
            header: header(fw.as_str(), "stale-stream"),
            offer_ids: vec![offer.id.clone().unwrap()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("stale-stream"), "{}", err.message());
    let err = raw
        .accept(v1::AcceptRequest {
            header: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            tonic::Code::InvalidArgument,
            "missing required field `header`"
        )
    );

    // The offer is still good.
    s.accept(&[offer.id.clone().unwrap()], vec![task], Some(0.0))
        .await
        .unwrap();
    assert_eq!(
        state_of(&wait_terminal(&mut events, &tid("t")).await),
        TaskState::Finished
    );
    // ... and now it is used up.
    let err = s
        .accept(&[offer.id.clone().unwrap()], vec![], None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Refused { message, .. } if message.contains("is no longer valid")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_reports_the_masters_view() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("reconciler").await;
    launch(
        &s,
        &mut events,
        wasm_task("long", "spin", "cpus:0.5;mem:64"),
    )
    .await;
    wait_state(&mut events, &tid("long"), TaskState::Running).await;
    // Implicit: every task of the framework.
    s.reconcile(&[]).await.unwrap();
    let st = wait_state(&mut events, &tid("long"), TaskState::Running).await;
    assert_eq!(st.reason(), v1::Reason::Reconciliation);
    assert!(
        st.uuid.is_empty(),
        "reconciliation answers need no acknowledgement"
    );
    // Explicit, with a task the master never heard of.
    s.reconcile(&[tid("long"), tid("ghost")]).await.unwrap();
    wait_state(&mut events, &tid("long"), TaskState::Running).await;
    let ghost = wait_state(&mut events, &tid("ghost"), TaskState::Lost).await;
    assert_eq!(ghost.reason(), v1::Reason::Reconciliation);
    s.kill(&tid("long"), None).await.unwrap();
    wait_state(&mut events, &tid("long"), TaskState::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_kills_the_frameworks_tasks() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("short-lived").await;
    launch(
        &s,
        &mut events,
        wasm_task("orphan", "spin", "cpus:1;mem:64"),
    )
    .await;
    wait_state(&mut events, &tid("orphan"), TaskState::Running).await;
    let id = s.framework_id().unwrap().to_string();
    s.teardown().await.unwrap();
    let ev = next_matching(&mut events, "the removal notice", |e| match e {
        Event::Error(m) => Some(m),
        _ => None,
    })
    .await;
    assert!(ev.contains("torn down"), "{ev}");
    wait_until("the task to be killed and its resources freed", || async {
        let st = cluster.state().await;
        st.tasks.is_empty() && resources_from_proto(&st.agents[0].used).unwrap().is_empty()
    })
    .await;
    let st = cluster.state().await;
    let done = st
        .completed_tasks
        .iter()
        .find(|t| t.task_id.as_ref().unwrap().value == "orphan")
        .unwrap();
    assert_eq!(done.state(), v1::TaskState::TaskKilled);
    assert!(done.last_status.as_ref().unwrap().timestamp > 0.0);
    // The framework id cannot be reused.
    let mut config = agora_sdk::SchedulerConfig::new(cluster.master.clone(), "short-lived");
    config.framework.id = Some(v1::FrameworkId { value: id });
    assert!(matches!(
        agora_sdk::subscribe(config).await,
        Err(Error::Refused { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_state_and_health() {
    let cluster = Cluster::start(&["cpus:2;mem:1024;ports:[31000-31009]", "cpus:1;mem:512"]).await;
    let (s, mut events) = cluster.framework("observed").await;
    launch(
        &s,
        &mut events,
        wasm_task("busy", "spin", "cpus:0.5;mem:100"),
    )
    .await;
    wait_state(&mut events, &tid("busy"), TaskState::Running).await;
    wait_until("the snapshot to show the task running", || async {
        let st = cluster.state().await;
        st.tasks
            .iter()
            .any(|t| t.state() == v1::TaskState::TaskRunning)
    })
    .await;
    let st = cluster.state().await;
    assert_eq!(st.agents.len(), 2);
    let busy = &st.tasks[0];
    // The task is recorded under the id its framework was given, and on a known agent.
    let id: FrameworkId = s.framework_id().unwrap();
    assert_eq!(
        busy.framework_id.as_ref().map(|f| f.value.as_str()),
        Some(id.as_str())
    );
    let agent = st.agents.iter().find(|a| a.id == busy.agent_id).unwrap();
    assert_eq!(
        resources_from_proto(&agent.used).unwrap(),
        parse_resources("cpus:0.5;mem:100").unwrap()
    );
    let fw = &st.frameworks[0];
    assert_eq!(
        fw.id.as_ref().unwrap().value,
        s.framework_id().unwrap().as_str()
    );
    assert!(fw.active && fw.dominant_share > 0.0);
    assert_eq!(fw.info.as_ref().unwrap().name, "observed");

    // Plain HTTP on the same port.
    let body = http_get(cluster.master_addr, "/health").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("\"healthy\":true") && body.contains("\"active_agents\":2"),
        "{body}"
    );
    let health = agora_sdk::Operator::connect(&cluster.master)
        .await
        .unwrap()
        .health()
        .await
        .unwrap();
    assert_eq!(
        (
            health.healthy,
            health.active_agents,
            health.active_frameworks
        ),
        (true, 2, 1)
    );
}

pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_updates_are_retried_until_acknowledged() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let mut config = agora_sdk::SchedulerConfig::new(cluster.master.clone(), "forgetful");
    config.auto_acknowledge = false;
    let (s, mut events) = cluster.framework_with(config).await;
    launch(
        &s,
        &mut events,
        wasm_task("once", "hello", "cpus:0.5;mem:64"),
    )
    .await;
    // One update of a task is in flight at a time: the terminal one comes once the ones
    // before it are acknowledged.
    let first = next_matching(&mut events, "once to end", |e| match e {
        Event::Update(u) if state_of(&u).is_terminal() => Some(u),
        Event::Update(u) => {
            let s = s.clone();
            tokio::spawn(async move { s.acknowledge(&u).await.unwrap() });
            None
        }
        _ => None,
    })
    .await;
    // The agent's retry interval here is 500 ms: the same update comes again.
    let again = wait_terminal(&mut events, &tid("once")).await;
    assert_eq!(first.uuid, again.uuid);
    assert_eq!(state_of(&again), TaskState::Finished);
    s.acknowledge(&again).await.unwrap();
    wait_until("the task to be retired", || async {
        cluster.state().await.tasks.is_empty()
    })
    .await;
    // Three retry intervals with nothing sent is the test: this waits them out on purpose.
    let more = tokio::time::timeout(
        Duration::from_millis(1500),
        wait_terminal(&mut events, &tid("once")),
    )
    .await;
    assert!(more.is_err(), "an acknowledged update was sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_tasks_resources_come_back_before_its_updates_are_acknowledged() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let mut config = agora_sdk::SchedulerConfig::new(cluster.master.clone(), "slow-to-ack");
    config.auto_acknowledge = false;
    let (s, mut events) = cluster.framework_with(config).await;
    launch(
        &s,
        &mut events,
        wasm_task("quick", "hello", "cpus:1;mem:64"),
    )
    .await;
    // Only STARTING can be in flight, unacknowledged; its retries carry the task's latest
    // state, so the master frees the resources without waiting for the framework.
    wait_state(&mut events, &tid("quick"), TaskState::Starting).await;
    wait_until("the agent's resources to be free again", || async {
        let st = cluster.state().await;
        st.agents[0].used.is_empty() && st.tasks.len() == 1
    })
    .await;
    let st = cluster.state().await;
    assert_ne!(
        st.tasks[0].state(),
        v1::TaskState::TaskFinished,
        "the framework has not yet been told"
    );
}
