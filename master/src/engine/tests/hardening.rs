//! The engine's answers to hostile or confused peers: absurd numbers, takeovers of ids,
//! updates from the wrong agent, lost tasks that come back, messages for agents without a
//! link, duplicate and late updates.

use super::*;

fn register(
    w: &mut World,
    id: Option<&AgentId>,
    tasks: Vec<v1::AgentTask>,
) -> Result<AgentId, EngineError> {
    let now = w.now();
    let r = w.e.register_agent(
        v1::agent_message::Register {
            info: Some(v1::AgentInfo {
                hostname: "host".into(),
                resources: resources_to_proto(&parse_resources("cpus:2;mem:1024").unwrap()),
                ..Default::default()
            }),
            agent_id: id.map(Into::into),
            tasks,
        },
        now,
    );
    w.drain();
    r
}

/// A framework with one running task `t1` on a fresh agent.
fn running_task(w: &mut World) -> (FrameworkId, AgentId, v1::TaskInfo) {
    let fw = w.framework("f");
    let agent = w.agent("cpus:2;mem:1024");
    w.allocate();
    let offers = w.take_offers(&fw);
    let t = w.task("cpus:1;mem:64");
    w.accept(&fw, &offers, vec![t.clone()], Some(0.0)).unwrap();
    w.report(&agent, &fw, "t1", v1::TaskState::TaskRunning);
    (fw, agent, t)
}

fn updates_of<'a>(w: &'a World, task: &str) -> Vec<&'a v1::TaskStatus> {
    w.updates
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.task_id.as_ref().is_some_and(|t| t.value == task))
        .collect()
}

fn is_ack(m: &v1::master_message::Message, uuid: &[u8]) -> bool {
    matches!(m, v1::master_message::Message::Acknowledge(a) if a.uuid == uuid)
}

fn is_kill(m: &v1::master_message::Message, task: &str) -> bool {
    matches!(m, v1::master_message::Message::KillTask(k)
        if k.task_id.as_ref().is_some_and(|t| t.value == task))
}

#[test]
fn an_absurd_failover_timeout_is_refused_naming_the_field() {
    let mut w = World::new();
    let err =
        w.e.subscribe(
            v1::FrameworkInfo {
                name: "f".into(),
                failover_timeout: 1e20,
                ..Default::default()
            },
            None,
            fresh_stream(),
            w.now(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("framework_info.failover_timeout"));
    // The engine goes on.
    let fw = w.framework("g");
    w.agent("cpus:1;mem:128");
    w.allocate();
    assert_eq!(w.take_offers(&fw).len(), 1);
}

#[test]
fn a_connected_framework_is_not_taken_over_without_its_stream_id() {
    let mut w = World::new();
    let (fw, stream) =
        w.e.subscribe(
            v1::FrameworkInfo {
                name: "f".into(),
                principal: "alice".into(),
                failover_timeout: 60.0,
                ..Default::default()
            },
            None,
            fresh_stream(),
            w.now(),
        )
        .unwrap();
    let again = |principal: &str| v1::FrameworkInfo {
        id: Some((&fw).into()),
        name: "f".into(),
        principal: principal.into(),
        failover_timeout: 60.0,
        ..Default::default()
    };
    for replaces in [None, Some("m1-Sguess")] {
        let err =
            w.e.subscribe(again("alice"), replaces, fresh_stream(), w.now())
                .unwrap_err();
        assert!(matches!(err, EngineError::FrameworkConnected(_)), "{err}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::AlreadyExists);
    }
    // The old stream is still the framework's.
    w.e.revive(&fw, &stream, &[]).unwrap();
    // A failover that names its stream takes over, but not under another principal.
    let err =
        w.e.subscribe(again("mallory"), Some(&stream), fresh_stream(), w.now())
            .unwrap_err();
    assert!(matches!(err, EngineError::Forbidden(_)), "{err}");
    let (_, new_stream) =
        w.e.subscribe(again("alice"), Some(&stream), fresh_stream(), w.now())
            .unwrap();
    let err = w.e.revive(&fw, &stream, &[]).unwrap_err();
    assert!(matches!(err, EngineError::StaleStream { .. }), "{err}");
    w.e.revive(&fw, &new_stream, &[]).unwrap();
    // Once disconnected, a new process may subscribe with the id alone.
    w.e.framework_disconnected(&fw, &new_stream, w.now());
    w.e.subscribe(again("alice"), None, fresh_stream(), w.now())
        .unwrap();
}

#[test]
fn a_connected_agent_is_not_replaced_by_a_second_registration() {
    let mut w = World::new();
    let (fw, agent, t) = running_task(&mut w);
    // An impostor claims the id, reporting no tasks.
    let err = register(&mut w, Some(&agent), vec![]).unwrap_err();
    assert!(matches!(err, EngineError::AgentConnected(_)), "{err}");
    assert_eq!(
        updates_of(&w, "t1").last().unwrap().state(),
        v1::TaskState::TaskRunning,
        "the task was not reported lost"
    );
    let snap = w.e.snapshot(w.now());
    assert_eq!(snap.tasks.len(), 1);
    assert_eq!(snap.tasks[0].state(), v1::TaskState::TaskRunning);
    // Once the link is gone, the agent itself comes back with its task.
    w.e.agent_disconnected(&agent);
    let back = register(
        &mut w,
        Some(&agent),
        vec![v1::AgentTask {
            framework_id: Some((&fw).into()),
            task: Some(t),
            state: v1::TaskState::TaskRunning as i32,
        }],
    )
    .unwrap();
    assert_eq!(back, agent);
    assert_eq!(w.e.snapshot(w.now()).tasks.len(), 1);
}

#[test]
fn only_the_agent_running_a_task_speaks_for_it() {
    let mut w = World::new();
    let (fw, _agent, _) = running_task(&mut w);
    let other = w.agent("cpus:1;mem:128");
    let before = w.updates.len();
    let err = w
        .report_uuid(&other, &fw, "t1", v1::TaskState::TaskFinished, b"forged")
        .unwrap_err();
    assert!(matches!(err, EngineError::Forbidden(_)), "{err}");
    assert_eq!(w.updates.len(), before, "nothing was forwarded");
    assert_eq!(
        w.e.snapshot(w.now()).tasks[0].state(),
        v1::TaskState::TaskRunning
    );
    // Framework messages too.
    let message = |task: Option<&str>| v1::agent_message::FrameworkMessage {
        framework_id: Some((&fw).into()),
        task_id: task.map(|t| v1::TaskId { value: t.into() }),
        data: b"hi".to_vec(),
        ..Default::default()
    };
    assert!(w.e.framework_message(&other, message(Some("t1"))).is_err());
    assert!(w.e.framework_message(&other, message(None)).is_err());
    let agent = w.e.tasks.values().next().unwrap().agent.clone();
    w.e.framework_message(&agent, message(Some("t1"))).unwrap();
}

#[test]
fn a_lost_task_stays_lost_however_many_tasks_finish_meanwhile() {
    let mut w = World::new();
    let (fw, a, t1) = running_task(&mut w);
    let b = w.agent("cpus:4;mem:4096");
    // `a` goes silent and is written off; `b` heartbeats.
    for _ in 0..5 {
        let now = w.now();
        w.e.agent_heartbeat(&b, now);
        w.advance(Duration::from_secs(1));
    }
    assert_eq!(
        updates_of(&w, "t1").last().unwrap().state(),
        v1::TaskState::TaskLost
    );
    assert_eq!(w.closed_agents, vec![a.clone()], "its open link is closed");
    // More tasks finish on `b` than the master keeps completed records of.
    let kept = config().max_completed_tasks;
    for _ in 0..kept + 20 {
        w.allocate();
        let offers = w.take_offers(&fw);
        let t = w.task("cpus:0.1;mem:32");
        let id = t.task_id.clone().unwrap().value;
        w.accept(&fw, &offers, vec![t], Some(0.0)).unwrap();
        let uuid = uuid::Uuid::new_v4().as_bytes().to_vec();
        w.report_uuid(&b, &fw, &id, v1::TaskState::TaskFinished, &uuid)
            .unwrap();
        let stream = w.streams[&fw].clone();
        w.e.acknowledge(&fw, &stream, &TaskId::new(id).unwrap(), &uuid)
            .unwrap();
        let now = w.now();
        w.e.agent_heartbeat(&b, now);
    }
    assert_eq!(w.e.completed.len(), kept, "t1's record is long gone");
    // Another agent claiming t1 does not bring it back either.
    w.to_agents.clear();
    let seen = updates_of(&w, "t1").len();
    let c = register(
        &mut w,
        None,
        vec![v1::AgentTask {
            framework_id: Some((&fw).into()),
            task: Some(t1.clone()),
            state: v1::TaskState::TaskRunning as i32,
        }],
    )
    .unwrap();
    assert!(
        w.to_agents
            .iter()
            .any(|(to, m)| *to == c && is_kill(m, "t1"))
    );
    assert!(
        !w.e.tasks
            .contains_key(&(fw.clone(), TaskId::new("t1").unwrap()))
    );
    // `a` returns with t1 still running: it is killed, not adopted.
    w.to_agents.clear();
    register(
        &mut w,
        Some(&a),
        vec![v1::AgentTask {
            framework_id: Some((&fw).into()),
            task: Some(t1),
            state: v1::TaskState::TaskRunning as i32,
        }],
    )
    .unwrap();
    assert!(
        w.to_agents
            .iter()
            .any(|(to, m)| *to == a && is_kill(m, "t1")),
        "{:?}",
        w.to_agents
    );
    assert!(
        !w.e.tasks
            .contains_key(&(fw.clone(), TaskId::new("t1").unwrap())),
        "not adopted"
    );
    assert_eq!(
        updates_of(&w, "t1").len(),
        seen,
        "the framework hears nothing more"
    );
}

#[test]
fn kills_and_acknowledgements_for_an_agent_without_a_link_wait_for_it() {
    let mut w = World::new();
    let (fw, agent, t) = running_task(&mut w);
    let uuid = w.updates.last().unwrap().1.uuid.clone();
    w.e.agent_disconnected(&agent);
    w.to_agents.clear();
    let stream = w.streams[&fw].clone();
    let t1 = TaskId::new("t1").unwrap();
    w.e.acknowledge(&fw, &stream, &t1, &uuid).unwrap();
    w.e.kill(&fw, &stream, &t1).unwrap();
    w.drain();
    assert!(w.to_agents.is_empty(), "nothing can be sent yet");
    register(
        &mut w,
        Some(&agent),
        vec![v1::AgentTask {
            framework_id: Some((&fw).into()),
            task: Some(t),
            state: v1::TaskState::TaskRunning as i32,
        }],
    )
    .unwrap();
    let to_it: Vec<_> = w.to_agents.iter().filter(|(a, _)| *a == agent).collect();
    assert!(matches!(
        to_it[0].1,
        v1::master_message::Message::Registered(_)
    ));
    assert!(is_ack(&to_it[1].1, &uuid), "{to_it:?}");
    assert!(is_kill(&to_it[2].1, "t1"), "{to_it:?}");
}

#[test]
fn duplicate_and_late_updates_are_dropped() {
    let mut w = World::new();
    let (fw, agent, _) = running_task(&mut w);
    let stream = w.streams[&fw].clone();
    let t1 = TaskId::new("t1").unwrap();
    let running = w.updates.last().unwrap().1.uuid.clone();
    // A retry of the newest update, not yet acknowledged, goes to the framework again.
    w.report_uuid(&agent, &fw, "t1", v1::TaskState::TaskRunning, &running)
        .unwrap();
    assert_eq!(updates_of(&w, "t1").len(), 2);
    // Once acknowledged, a repeat is dropped and acknowledged to the agent again.
    w.e.acknowledge(&fw, &stream, &t1, &running).unwrap();
    w.to_agents.clear();
    w.report_uuid(&agent, &fw, "t1", v1::TaskState::TaskRunning, &running)
        .unwrap();
    assert_eq!(updates_of(&w, "t1").len(), 2);
    assert!(w.to_agents.iter().any(|(_, m)| is_ack(m, &running)));
    // FINISHED goes through; a RUNNING after it never does.
    w.report(&agent, &fw, "t1", v1::TaskState::TaskFinished);
    w.to_agents.clear();
    w.report_uuid(&agent, &fw, "t1", v1::TaskState::TaskRunning, b"late")
        .unwrap();
    let states: Vec<_> = updates_of(&w, "t1").iter().map(|s| s.state()).collect();
    assert_eq!(
        states,
        [
            v1::TaskState::TaskRunning,
            v1::TaskState::TaskRunning,
            v1::TaskState::TaskFinished
        ]
    );
    assert!(w.to_agents.iter().any(|(_, m)| is_ack(m, b"late")));
}

#[test]
fn resources_come_back_when_the_agent_says_the_task_ended_before_its_terminal_update() {
    let mut w = World::new();
    let fw = w.framework("f");
    let agent = w.agent("cpus:2;mem:1024");
    w.allocate();
    let offers = w.take_offers(&fw);
    let t = w.task("cpus:2;mem:1024");
    w.accept(&fw, &offers, vec![t], Some(0.0)).unwrap();
    // RUNNING, unacknowledged, while the task has already finished on the agent.
    w.e.status_update(
        &agent,
        v1::agent_message::StatusUpdate {
            framework_id: Some((&fw).into()),
            status: Some(v1::TaskStatus {
                task_id: Some(v1::TaskId { value: "t1".into() }),
                state: v1::TaskState::TaskRunning as i32,
                uuid: b"running".to_vec(),
                ..Default::default()
            }),
            latest_state: v1::TaskState::TaskFinished as i32,
        },
    )
    .unwrap();
    w.drain();
    assert_eq!(
        updates_of(&w, "t1").last().unwrap().state(),
        v1::TaskState::TaskRunning,
        "the framework hears the updates in order"
    );
    w.allocate();
    assert_eq!(
        offered(&w.take_offers(&fw)).to_string(),
        "cpus:2;mem:1024",
        "the whole agent is offered again at once"
    );
    // The terminal update, when it comes, frees nothing twice.
    w.report(&agent, &fw, "t1", v1::TaskState::TaskFinished);
    let snap = w.e.snapshot(w.now());
    assert!(snap.agents[0].used.is_empty(), "{:?}", snap.agents[0].used);
    check(&w.e).unwrap();
}

#[test]
fn torn_down_frameworks_are_remembered_within_a_bound() {
    let mut w = World::new();
    let first = w.framework("f0");
    let stream = w.streams[&first].clone();
    w.e.teardown(&first, &stream, w.now()).unwrap();
    for i in 1..=MAX_REMOVED_FRAMEWORKS {
        let (id, stream) =
            w.e.subscribe(
                v1::FrameworkInfo {
                    name: format!("f{i}"),
                    ..Default::default()
                },
                None,
                format!("s{i}"),
                w.now(),
            )
            .unwrap();
        w.e.teardown(&id, &stream, w.now()).unwrap();
        let _ = w.e.take_effects();
    }
    assert_eq!(w.e.removed_frameworks.len(), MAX_REMOVED_FRAMEWORKS);
    assert!(
        !w.e.removed_frameworks.contains(&first),
        "the oldest went first"
    );
}

#[test]
fn a_failover_gets_the_offers_its_old_stream_held() {
    let mut w = World::new();
    let info = v1::FrameworkInfo {
        name: "f".into(),
        failover_timeout: 60.0,
        ..Default::default()
    };
    let (fw, old) =
        w.e.subscribe(info.clone(), None, fresh_stream(), w.now())
            .unwrap();
    w.agent("cpus:2;mem:1024");
    w.allocate();
    assert_eq!(w.take_offers(&fw).len(), 1, "offered on the old stream");
    let mut again = info;
    again.id = Some((&fw).into());
    w.e.subscribe(again, Some(&old), fresh_stream(), w.now())
        .unwrap();
    w.drain();
    w.allocate();
    assert_eq!(
        offered(&w.take_offers(&fw)).to_string(),
        "cpus:2;mem:1024",
        "offered again on the new stream"
    );
}
