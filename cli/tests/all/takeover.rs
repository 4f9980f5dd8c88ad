//! Hostile and confused peers over the wire: a second subscriber or agent under someone
//! else's id, an agent speaking for tasks it does not run, a written-off task coming back
//! after the master forgot its record, duplicate and late updates, kills for an agent
//! without a link. A fake agent speaks the real AgentLink protocol over gRPC.

use agora_core::{AgentId, TaskState};
use agora_proto::v1::{
    self, agent_link_client::AgentLinkClient, scheduler_client::SchedulerClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::*;

/// An agent written for the test: registers, heartbeats while `beating`, reports what it is
/// told to, and shows what the master sends it.
struct FakeAgent {
    id: AgentId,
    tx: mpsc::Sender<v1::AgentMessage>,
    rx: tonic::Streaming<v1::MasterMessage>,
    beating: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn msg(m: v1::agent_message::Message) -> v1::AgentMessage {
    v1::AgentMessage { message: Some(m) }
}

async fn open_link(
    master: &str,
    id: Option<&AgentId>,
    tasks: Vec<v1::AgentTask>,
) -> Result<
    (
        mpsc::Sender<v1::AgentMessage>,
        tonic::Streaming<v1::MasterMessage>,
    ),
    tonic::Status,
> {
    let mut client = AgentLinkClient::connect(master.to_owned()).await.unwrap();
    let (tx, rx) = mpsc::channel(64);
    tx.send(msg(v1::agent_message::Message::Register(
        v1::agent_message::Register {
            info: Some(v1::AgentInfo {
                hostname: "fake".into(),
                resources: agora_proto::resources_to_proto(
                    &parse_resources("cpus:1;mem:256").unwrap(),
                ),
                ..Default::default()
            }),
            agent_id: id.map(Into::into),
            tasks,
        },
    )))
    .await
    .unwrap();
    let stream = client.session(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, stream))
}

impl FakeAgent {
    async fn register(master: &str, id: Option<&AgentId>, tasks: Vec<v1::AgentTask>) -> Self {
        let (tx, mut rx) = open_link(master, id, tasks).await.unwrap();
        let id = match rx.message().await.unwrap().unwrap().message {
            Some(v1::master_message::Message::Registered(r)) => {
                AgentId::try_from(r.agent_id.unwrap()).unwrap()
            }
            other => panic!("expected Registered, got {other:?}"),
        };
        let beating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (b, t) = (beating.clone(), tx.clone());
        tokio::spawn(async move {
            while b.load(std::sync::atomic::Ordering::Relaxed) {
                let hb = msg(v1::agent_message::Message::Heartbeat(
                    v1::agent_message::Heartbeat {},
                ));
                if t.send(hb).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        FakeAgent {
            id,
            tx,
            rx,
            beating,
        }
    }

    async fn report(&self, fw: &v1::FrameworkId, task: &str, state: v1::TaskState, uuid: &[u8]) {
        self.tx
            .send(msg(v1::agent_message::Message::StatusUpdate(
                v1::agent_message::StatusUpdate {
                    framework_id: Some(fw.clone()),
                    status: Some(v1::TaskStatus {
                        task_id: Some(v1::TaskId { value: task.into() }),
                        state: state as i32,
                        uuid: uuid.to_vec(),
                        ..Default::default()
                    }),
                    latest_state: state as i32,
                },
            )))
            .await
            .unwrap();
    }

    /// The next message from the master that `pick` accepts.
    async fn next<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(v1::master_message::Message) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = tokio::time::timeout(left, self.rx.message())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap_or_else(|e| panic!("link failed waiting for {what}: {e}"))
                .unwrap_or_else(|| panic!("link ended waiting for {what}"));
            if let Some(t) = m.message.and_then(&mut pick) {
                return t;
            }
        }
    }

    async fn next_ack(&mut self, uuid: &[u8]) {
        self.next("an acknowledgement", |m| match m {
            v1::master_message::Message::Acknowledge(a) if a.uuid == uuid => Some(()),
            _ => None,
        })
        .await;
    }
}

/// Launches `command` as a task on the given agent's offer, declining every other offer.
async fn launch_on(
    s: &Scheduler,
    events: &mut Events,
    agent: &AgentId,
    id: &str,
    command: &str,
) -> v1::TaskInfo {
    loop {
        let mut launched = None;
        for offer in next_offers(events).await {
            let oid = offer.id.clone().unwrap();
            let on_it = offer
                .agent_id
                .as_ref()
                .is_some_and(|a| a.value == agent.as_str());
            if launched.is_none() && on_it {
                let task = TaskBuilder::command(tid(id), command)
                    .resources(parse_resources("cpus:0.1;mem:32").unwrap())
                    .build_for(&offer);
                match s.accept(&[oid], vec![task.clone()], Some(0.0)).await {
                    Ok(()) => launched = Some(task),
                    // Rescinded by the offer timeout meanwhile: the next one will do.
                    Err(e) if e.to_string().contains("no longer valid") => {}
                    Err(e) => panic!("accepting an offer: {e}"),
                }
            } else {
                let _ = s.decline(&[oid], Some(0.0)).await;
            }
        }
        if let Some(task) = launched {
            return task;
        }
    }
}

/// The updates about `task` that arrive within half a second: that none do is the point
/// of the callers, so this waits out the time on purpose (offers go on arriving meanwhile).
async fn updates_seen(events: &mut Events, task: &str) -> Vec<v1::TaskStatus> {
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, events.next()).await {
        if let Event::Update(u) = ev
            && u.task_id.as_ref().is_some_and(|t| t.value == task)
        {
            out.push(u);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_cannot_be_taken_over_and_agents_speak_only_for_their_tasks() {
    let cluster = Cluster::start(&[]).await;
    let mut fake = FakeAgent::register(&cluster.master, None, vec![]).await;
    let rogue = FakeAgent::register(&cluster.master, None, vec![]).await;
    let (s, mut events) = cluster.framework("owner").await;
    let fw: v1::FrameworkId = (&s.framework_id().unwrap()).into();
    launch_on(&s, &mut events, &rogue.id, "t2", "sleep 100").await;
    launch_on(&s, &mut events, &fake.id, "t1", "sleep 100").await;
    fake.next("the task", |m| {
        matches!(m, v1::master_message::Message::RunTask(_)).then_some(())
    })
    .await;
    fake.report(&fw, "t1", v1::TaskState::TaskRunning, b"u-running")
        .await;
    wait_state(&mut events, &tid("t1"), TaskState::Running).await;
    fake.next_ack(b"u-running").await;

    // Another subscriber with the framework's id is refused; the owner carries on.
    let mut raw = SchedulerClient::connect(cluster.master.clone())
        .await
        .unwrap();
    let err = raw
        .subscribe(v1::SubscribeRequest {
            framework_info: Some(v1::FrameworkInfo {
                id: Some(fw.clone()),
                name: "thief".into(),
                failover_timeout: 5.0,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    s.reconcile(&[]).await.unwrap();
    wait_state(&mut events, &tid("t1"), TaskState::Running).await;

    // Another agent under the fake agent's id, claiming no tasks, is refused; t1 lives on.
    let Err(err) = open_link(&cluster.master, Some(&fake.id), vec![]).await else {
        panic!("a second registration under a connected agent's id is refused");
    };
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // The master's answer to a reconciliation is its own view, never a snapshot's lag.
    s.reconcile(&[]).await.unwrap();
    let seen = wait_state(&mut events, &tid("t1"), TaskState::Running).await;
    assert_eq!(seen.reason(), v1::Reason::Reconciliation);

    // A second, legitimate agent may not speak for t1.
    rogue
        .report(&fw, "t1", v1::TaskState::TaskFinished, b"u-forged")
        .await;
    rogue
        .tx
        .send(msg(v1::agent_message::Message::FrameworkMessage(
            v1::agent_message::FrameworkMessage {
                framework_id: Some(fw.clone()),
                task_id: Some(v1::TaskId { value: "t1".into() }),
                data: b"forged".to_vec(),
                ..Default::default()
            },
        )))
        .await
        .unwrap();
    // Its own update for t2 comes after them on the same link, so once it arrives they were
    // handled: neither reached the framework.
    rogue
        .report(&fw, "t2", v1::TaskState::TaskRunning, b"u-t2")
        .await;
    let next = next_matching(&mut events, "the next update or message", |e| match e {
        // From agents (the reconciliation's answers carry no uuid).
        Event::Update(u) if !u.uuid.is_empty() => Some(Ok(u)),
        Event::Message { data, .. } => Some(Err(data)),
        _ => None,
    })
    .await;
    let next = next.expect("no forged framework message arrives");
    assert_eq!(
        next.uuid, b"u-t2",
        "the forged update was not forwarded: {next:?}"
    );
    s.reconcile(&[]).await.unwrap();
    let seen = wait_state(&mut events, &tid("t1"), TaskState::Running).await;
    assert_eq!(seen.reason(), v1::Reason::Reconciliation, "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_deduplicated_and_nothing_follows_a_terminal_one() {
    let cluster = Cluster::start(&[]).await;
    let mut fake = FakeAgent::register(&cluster.master, None, vec![]).await;
    let (s, mut events) = cluster.framework("owner").await;
    let fw: v1::FrameworkId = (&s.framework_id().unwrap()).into();
    launch_on(&s, &mut events, &fake.id, "t1", "sleep 100").await;
    fake.report(&fw, "t1", v1::TaskState::TaskRunning, b"u1")
        .await;
    wait_state(&mut events, &tid("t1"), TaskState::Running).await;
    fake.next_ack(b"u1").await;
    // Acknowledged, then repeated: acknowledged again, not forwarded.
    fake.report(&fw, "t1", v1::TaskState::TaskRunning, b"u1")
        .await;
    fake.next_ack(b"u1").await;
    fake.report(&fw, "t1", v1::TaskState::TaskFinished, b"u2")
        .await;
    wait_state(&mut events, &tid("t1"), TaskState::Finished).await;
    // A late RUNNING: acknowledged and dropped.
    fake.report(&fw, "t1", v1::TaskState::TaskRunning, b"u3")
        .await;
    // The framework's acknowledgement of u2 and the master's own of u3, in either order.
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < 2 {
        let uuid = fake
            .next("acknowledgements of u2 and u3", |m| match m {
                v1::master_message::Message::Acknowledge(a) => Some(a.uuid),
                _ => None,
            })
            .await;
        acked.insert(uuid);
    }
    assert_eq!(acked, [b"u2".to_vec(), b"u3".to_vec()].into());
    let later = updates_seen(&mut events, "t1").await;
    assert!(later.is_empty(), "nothing after FINISHED: {later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_written_off_task_is_killed_when_its_agent_returns_however_much_finished_meanwhile() {
    let kept = 5;
    let cluster = Cluster::start_with(
        MasterConfig {
            max_completed_tasks: kept,
            // Offers passed over while waiting for other events come back.
            offer_timeout: Some(Duration::from_millis(500)),
            ..fast_master()
        },
        &["cpus:2;mem:1024"],
    )
    .await;
    let mut fake = FakeAgent::register(&cluster.master, None, vec![]).await;
    let (s, mut events) = cluster.framework("owner").await;
    let fw: v1::FrameworkId = (&s.framework_id().unwrap()).into();
    let t1 = launch_on(&s, &mut events, &fake.id, "t1", "sleep 100").await;
    fake.report(&fw, "t1", v1::TaskState::TaskRunning, b"u1")
        .await;
    wait_state(&mut events, &tid("t1"), TaskState::Running).await;

    // The fake agent falls silent, its link open: written off, and its link is closed.
    fake.beating
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let lost = wait_state(&mut events, &tid("t1"), TaskState::Lost).await;
    assert_eq!(lost.reason(), v1::Reason::AgentRemoved);
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match fake.rx.message().await {
                Ok(Some(_)) => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the master closed the lost agent's link");

    // More tasks finish on the real agent than the master keeps records of.
    let real = AgentId::try_from(
        cluster
            .state()
            .await
            .agents
            .iter()
            .find(|a| a.info.as_ref().unwrap().hostname != "fake")
            .unwrap()
            .id
            .clone()
            .unwrap(),
    )
    .unwrap();
    for i in 0..kept + 3 {
        let id = format!("short-{i}");
        launch_on(&s, &mut events, &real, &id, "true").await;
        let end = wait_terminal(&mut events, &tid(&id)).await;
        assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    }
    wait_until("t1's record to be dropped", || async {
        !cluster
            .state()
            .await
            .completed_tasks
            .iter()
            .any(|r| r.task_id.as_ref().is_some_and(|t| t.value == "t1"))
    })
    .await;

    // It returns with t1 still running: told to kill it, and t1 is not adopted.
    let mut back = FakeAgent::register(
        &cluster.master,
        Some(&fake.id),
        vec![v1::AgentTask {
            framework_id: Some(fw.clone()),
            task: Some(t1),
            state: v1::TaskState::TaskRunning as i32,
        }],
    )
    .await;
    back.next("a kill for t1", |m| match m {
        v1::master_message::Message::KillTask(k)
            if k.task_id.as_ref().is_some_and(|t| t.value == "t1") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
    assert!(
        !cluster
            .state()
            .await
            .tasks
            .iter()
            .any(|t| t.task_id.as_ref().is_some_and(|t| t.value == "t1")),
        "t1 was not adopted"
    );
    let later = updates_seen(&mut events, "t1").await;
    assert!(
        later.is_empty(),
        "the framework hears nothing more of t1: {later:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_for_an_agent_without_a_link_waits_for_it() {
    // An agent may be away for 10 s before it is written off.
    let cluster = Cluster::start_with(
        MasterConfig {
            max_missed_heartbeats: 100,
            ..fast_master()
        },
        &[],
    )
    .await;
    let fake = FakeAgent::register(&cluster.master, None, vec![]).await;
    let (s, mut events) = cluster.framework("owner").await;
    let fw: v1::FrameworkId = (&s.framework_id().unwrap()).into();
    let t1 = launch_on(&s, &mut events, &fake.id, "t1", "sleep 100").await;
    fake.report(&fw, "t1", v1::TaskState::TaskRunning, b"u1")
        .await;
    wait_state(&mut events, &tid("t1"), TaskState::Running).await;
    let id = fake.id.clone();
    fake.beating
        .store(false, std::sync::atomic::Ordering::Relaxed);
    drop(fake);
    // The snapshot lags the master by up to 50 ms: wait for the agent to be listed inactive.
    wait_until("the link to drop", || async {
        cluster
            .state()
            .await
            .agents
            .iter()
            .any(|a| a.id.as_ref().is_some_and(|i| i.value == id.as_str()) && !a.active)
    })
    .await;
    // The agent is away but not yet lost: the kill is kept for it.
    s.kill(&tid("t1"), Some(&id)).await.unwrap();
    let mut back = FakeAgent::register(
        &cluster.master,
        Some(&id),
        vec![v1::AgentTask {
            framework_id: Some(fw.clone()),
            task: Some(t1),
            state: v1::TaskState::TaskRunning as i32,
        }],
    )
    .await;
    back.next("the kill kept for it", |m| match m {
        v1::master_message::Message::KillTask(k)
            if k.task_id.as_ref().is_some_and(|t| t.value == "t1") =>
        {
            Some(())
        }
        _ => None,
    })
    .await;
}
