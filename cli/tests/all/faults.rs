//! Failures: agents that go quiet or away, a master that restarts.

use std::time::{Duration, Instant};

use agora_core::TaskState;
use agora_proto::{resources_to_proto, v1};
use agora_sdk::Event;
use tokio_stream::StreamExt;

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_goes_away_is_marked_lost_with_its_tasks() {
    let mut cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("plain").await;
    let mut config = SchedulerConfig::new(cluster.master.clone(), "partition-aware");
    config
        .framework
        .capabilities
        .push(v1::framework_info::Capability::PartitionAware as i32);
    let (pa, mut pa_events) = cluster.framework_with(config).await;

    launch(
        &s,
        &mut events,
        wasm_task("plain-task", "spin", "cpus:0.5;mem:64"),
    )
    .await;
    launch(
        &pa,
        &mut pa_events,
        wasm_task("pa-task", "spin", "cpus:0.5;mem:64"),
    )
    .await;
    wait_state(&mut events, &tid("plain-task"), TaskState::Running).await;
    wait_state(&mut pa_events, &tid("pa-task"), TaskState::Running).await;

    let stopped = Instant::now();
    cluster.agents[0].handle.stop().await.unwrap();
    // 10 missed heartbeats of 100 ms, counted from the last heartbeat, which came up to one
    // interval before the agent stopped.
    let lost = wait_state(&mut events, &tid("plain-task"), TaskState::Lost).await;
    assert_eq!(lost.reason(), v1::Reason::AgentRemoved);
    assert!(
        stopped.elapsed() >= Duration::from_millis(900),
        "{:?}",
        stopped.elapsed()
    );
    let unreachable = wait_state(&mut pa_events, &tid("pa-task"), TaskState::Unreachable).await;
    assert_eq!(unreachable.reason(), v1::Reason::AgentUnreachable);
    let failure = next_matching(&mut events, "the agent failure", |e| match e {
        Event::Failure { agent_id, .. } => agent_id,
        _ => None,
    })
    .await;
    assert_eq!(failure.as_str(), lost.agent_id.unwrap().value);
    let st = cluster.state().await;
    assert!(!st.agents[0].active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_heartbeating_is_marked_lost_though_connected() {
    let cluster = Cluster::start(&[]).await;
    // A hand-made agent: registers over a real link, then never says another word (its link
    // stays open, as in a hung process).
    let mut client = v1::agent_link_client::AgentLinkClient::connect(cluster.master.clone())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage {
        message: Some(v1::agent_message::Message::Register(
            v1::agent_message::Register {
                info: Some(v1::AgentInfo {
                    hostname: "hung".into(),
                    resources: resources_to_proto(
                        &agora_core::parse_resources("cpus:1;mem:256").unwrap(),
                    ),
                    ..Default::default()
                }),
                agent_id: None,
                tasks: vec![],
            },
        )),
    })
    .await
    .unwrap();
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let registered = inbound.next().await.unwrap().unwrap();
    assert!(matches!(
        registered.message,
        Some(v1::master_message::Message::Registered(_))
    ));
    cluster.wait_for_agents(1).await;
    let t = Instant::now();
    wait_until("the silent agent to be marked lost", || async {
        cluster.state().await.agents.iter().all(|a| !a.active)
    })
    .await;
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_frameworks_come_back_after_a_master_restart() {
    let mut cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = cluster.framework("survivor").await;
    launch(
        &s,
        &mut events,
        wasm_task("through-restart", "spin", "cpus:0.5;mem:64"),
    )
    .await;
    wait_state(&mut events, &tid("through-restart"), TaskState::Running).await;
    let agent_id = cluster.state().await.agents[0].id.clone();

    cluster.master_handle.stop().await.unwrap();
    let ev = next_matching(&mut events, "the disconnection", |e| match e {
        Event::Disconnected { reason } => Some(reason),
        _ => None,
    })
    .await;
    assert!(!ev.is_empty());

    // A new master on the same address: the agent re-registers with its id and its task, and
    // the framework re-subscribes with its id.
    let listener = tokio::net::TcpListener::bind(cluster.master_addr)
        .await
        .unwrap();
    let config = fast_master();
    cluster.master_handle = Stoppable::spawn(move |stop| agora_master::run(listener, config, stop));
    next_matching(&mut events, "re-subscription", |e| match e {
        Event::Subscribed { framework_id, .. } => Some(framework_id),
        _ => None,
    })
    .await;
    cluster.wait_for_agents(1).await;
    let st = cluster.state().await;
    assert_eq!(st.agents[0].id, agent_id, "the agent kept its id");
    assert!(
        st.tasks
            .iter()
            .any(|t| t.task_id.as_ref().unwrap().value == "through-restart"),
        "the master learnt of the running task"
    );

    s.reconcile(&[tid("through-restart")]).await.unwrap();
    wait_state(&mut events, &tid("through-restart"), TaskState::Running).await;
    s.kill(&tid("through-restart"), None).await.unwrap();
    wait_state(&mut events, &tid("through-restart"), TaskState::Killed).await;
}
