use std::collections::HashMap;

use proptest::prelude::*;

use super::*;
use crate::checkpoint::{Checkpoint, TaskWrite};

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_secs(10),
        max: Duration::from_secs(60),
    }
}

fn registered_message(heartbeat: f64) -> master_message::Message {
    master_message::Message::Registered(master_message::Registered {
        agent_id: Some(v1::AgentId {
            value: "m-A000001".into(),
        }),
        master_id: "m".into(),
        heartbeat_interval_seconds: heartbeat,
    })
}

fn key(t: &str) -> TaskKey {
    (FrameworkId::new("fw").unwrap(), TaskId::new(t).unwrap())
}

/// The framework the tasks of [`run_task`] belong to, as the master describes it.
fn framework_info(name: &str) -> v1::FrameworkInfo {
    v1::FrameworkInfo {
        id: Some(v1::FrameworkId { value: "fw".into() }),
        name: name.into(),
        user: "nobody".into(),
        ..Default::default()
    }
}

fn run_task(t: &str) -> Input {
    run_task_of(t, framework_info("batch"))
}

fn run_task_of(t: &str, framework: v1::FrameworkInfo) -> Input {
    Input::Master(Box::new(master_message::Message::RunTask(
        master_message::RunTask {
            framework_id: Some(v1::FrameworkId { value: "fw".into() }),
            framework_info: Some(framework),
            task: Some(v1::TaskInfo {
                task_id: Some(v1::TaskId { value: t.into() }),
                name: t.into(),
                resources: agora_proto::resources_to_proto(
                    &agora_core::parse_resources("cpus:1;mem:32").unwrap(),
                ),
                payload: Some(v1::task_info::Payload::Command(v1::CommandTask {
                    value: "true".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
        },
    )))
}

fn ack(k: &TaskKey, uuid: &[u8]) -> Input {
    Input::Master(Box::new(master_message::Message::Acknowledge(
        master_message::AcknowledgeUpdate {
            framework_id: Some((&k.0).into()),
            task_id: Some((&k.1).into()),
            uuid: uuid.to_vec(),
        },
    )))
}

fn change(k: &TaskKey, state: TaskState) -> Input {
    Input::Changed {
        key: k.clone(),
        change: Termination::new(state, v1::Reason::Unspecified, ""),
    }
}

fn updates(cmds: &[Command]) -> Vec<v1::TaskStatus> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Send(agent_message::Message::StatusUpdate(u)) => u.status.clone(),
            _ => None,
        })
        .collect()
}

fn registered(now: Instant) -> AgentState {
    let mut s = AgentState::new(v1::AgentInfo::default(), policy(), now);
    s.step(now, Input::LinkUp);
    s.step(now, Input::Master(Box::new(registered_message(5.0))));
    s
}

#[test]
fn a_task_is_saved_before_it_launches_and_has_one_update_in_flight() {
    let now = Instant::now();
    let mut s = registered(now);
    let k = key("t");
    let cmds = s.step(now, run_task("t"));
    let save = cmds.iter().position(|c| *c == Command::Save(k.clone()));
    let launch = cmds
        .iter()
        .position(|c| matches!(c, Command::Launch { .. }));
    assert!(save.is_some() && save < launch, "{cmds:?}");
    let mut sent = Vec::new();
    for st in [TaskState::Starting, TaskState::Running, TaskState::Finished] {
        let cmds = s.step(now, change(&k, st));
        assert!(
            cmds.contains(&Command::Save(k.clone())),
            "every update is saved"
        );
        sent.extend(updates(&cmds));
    }
    assert_eq!(sent.len(), 1, "only STARTING goes out: {sent:?}");
    // Re-registration resends the head only.
    let again = updates(&s.step(now, Input::Master(Box::new(registered_message(5.0)))));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].uuid, sent[0].uuid);
    let mut order = vec![sent[0].state()];
    let mut head = sent[0].uuid.clone();
    loop {
        let next = updates(&s.step(now, ack(&k, &head)));
        if next.is_empty() {
            break;
        }
        assert_eq!(next.len(), 1, "{next:?}");
        order.push(next[0].state());
        head = next[0].uuid.clone();
    }
    assert_eq!(
        order,
        [
            v1::TaskState::TaskStarting,
            v1::TaskState::TaskRunning,
            v1::TaskState::TaskFinished
        ]
    );
    assert!(
        s.tasks.is_empty(),
        "forgotten once its terminal update is acknowledged"
    );
}

#[test]
fn a_heartbeat_interval_out_of_range_is_refused_not_a_panic() {
    let now = Instant::now();
    let mut s = registered(now);
    assert_eq!(s.heartbeat_interval(), Duration::from_secs(5));
    for bad in [1e20, f64::NAN, f64::INFINITY, -1.0] {
        s.step(now, Input::Master(Box::new(registered_message(bad))));
        assert_eq!(s.heartbeat_interval(), Duration::from_secs(5), "{bad}");
    }
    s.step(now, Input::Master(Box::new(registered_message(0.5))));
    assert_eq!(s.heartbeat_interval(), Duration::from_millis(500));
}

#[test]
fn a_duplicate_launch_of_a_task_still_here_is_ignored() {
    let now = Instant::now();
    let mut s = registered(now);
    s.step(now, run_task("t"));
    let k = key("t");
    s.step(now, change(&k, TaskState::Failed));
    // Ended, its update not yet acknowledged: the id is still taken.
    assert_eq!(s.step(now, run_task("t")), Vec::new());
}

/// One step of the property test below.
#[derive(Debug, Clone)]
enum Op {
    /// The next state of task `i` (STARTING, RUNNING, then FINISHED).
    Advance(usize),
    /// The master acknowledges the update it last received for task `i`.
    AckLast(usize),
    /// An acknowledgement of some other update of task `i` (a duplicate or a stale one).
    AckStale(usize),
    /// The link breaks (nothing in flight arrives) and comes back.
    Reconnect,
    /// The agent is killed: a new one starts from the checkpoint.
    Restart,
    /// Time passes: retries go.
    Wait,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize).prop_map(Op::Advance),
        4 => (0..3usize).prop_map(Op::AckLast),
        1 => (0..3usize).prop_map(Op::AckStale),
        1 => Just(Op::Reconnect),
        2 => Just(Op::Restart),
        1 => Just(Op::Wait),
    ]
}

/// The master's side: what it has received, and acknowledged, per task.
#[derive(Default)]
struct Master {
    last: HashMap<TaskKey, v1::TaskStatus>,
    acked: HashMap<TaskKey, Vec<v1::TaskState>>,
    acked_uuids: HashMap<TaskKey, Vec<Vec<u8>>>,
}

/// Carries out a step's commands as the owner task would: saves into the real checkpoint,
/// sends (when `linked`) to the master.
fn carry_out(cp: &Checkpoint, s: &AgentState, cmds: Vec<Command>, m: &mut Master, linked: bool) {
    let saves: Vec<TaskKey> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Save(k) => Some(k.clone()),
            _ => None,
        })
        .collect();
    let framework_saves: Vec<FrameworkId> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::SaveFramework(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    let frameworks: Vec<_> = framework_saves
        .iter()
        .map(|f| (f, s.framework(f)))
        .collect();
    let writes: Vec<TaskWrite<'_>> = saves
        .iter()
        .map(|k| match s.tasks.get(k) {
            Some(t) => TaskWrite::Put(k, t),
            None => TaskWrite::Remove(k),
        })
        .collect();
    let id = s.agent_id.as_ref().map(|id| (id, &s.info));
    cp.write(id, &frameworks, &writes).unwrap();
    if !linked {
        return;
    }
    for u in updates(&cmds) {
        let k = (
            FrameworkId::new("fw").unwrap(),
            TaskId::try_from(u.task_id.as_ref().unwrap()).unwrap(),
        );
        m.last.insert(k, u);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the interleaving of updates, acknowledgements, broken links and agent
    /// restarts, the master ends up acknowledging every update of every task exactly once,
    /// in order.
    #[test]
    fn every_update_is_delivered_in_order_across_restarts(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let (mut cp, _) = Checkpoint::open(dir.path()).unwrap();
        let mut now = Instant::now();
        let mut s = registered(now);
        let mut m = Master::default();
        let mut linked = true;
        let keys: Vec<TaskKey> = (0..3).map(|i| key(&format!("t{i}"))).collect();
        let mut produced: HashMap<TaskKey, Vec<v1::TaskState>> = HashMap::new();
        for i in 0..3 {
            let cmds = s.step(now, run_task(&format!("t{i}")));
            carry_out(&cp, &s, cmds, &mut m, linked);
        }
        let next = |st: Option<TaskState>| match st {
            Some(TaskState::Staging) => Some(TaskState::Starting),
            Some(TaskState::Starting) => Some(TaskState::Running),
            Some(TaskState::Running) => Some(TaskState::Finished),
            _ => None,
        };
        let finish = ops.len();
        let mut all = ops;
        // Then everything settles: the link stays up and the master acknowledges all.
        all.push(Op::Reconnect);
        for _ in 0..12 {
            all.extend((0..3).map(Op::AckLast));
        }
        for (n, op) in all.into_iter().enumerate() {
            let settling = n >= finish;
            match op {
                Op::Advance(i) if !settling => {
                    let k = &keys[i];
                    if let Some(st) = next(s.tasks.get(k).map(|t| t.state)) {
                        produced.entry(k.clone()).or_default().push(crate::state::tests::proto(st));
                        let cmds = s.step(now, change(k, st));
                        carry_out(&cp, &s, cmds, &mut m, linked);
                    }
                }
                Op::Advance(_) => {}
                Op::AckLast(i) => {
                    let k = &keys[i];
                    if let Some(u) = m.last.remove(k) {
                        let seen = m.acked_uuids.entry(k.clone()).or_default();
                        // The master acknowledges a duplicate again but counts it once.
                        if !seen.contains(&u.uuid) {
                            seen.push(u.uuid.clone());
                            m.acked.entry(k.clone()).or_default().push(u.state());
                        }
                        let cmds = s.step(now, ack(k, &u.uuid));
                        carry_out(&cp, &s, cmds, &mut m, linked);
                    }
                }
                Op::AckStale(i) => {
                    let k = &keys[i];
                    let cmds = s.step(now, ack(k, b"stale"));
                    carry_out(&cp, &s, cmds, &mut m, linked);
                }
                Op::Reconnect => {
                    m.last.clear();
                    s.step(now, Input::LinkDown);
                    s.step(now, Input::LinkUp);
                    linked = true;
                    let cmds = s.step(now, Input::Master(Box::new(registered_message(5.0))));
                    carry_out(&cp, &s, cmds, &mut m, linked);
                }
                Op::Restart => {
                    // Whatever was in flight to the master is lost with the connection.
                    m.last.clear();
                    drop(cp);
                    let (reopened, saved) = Checkpoint::open(dir.path()).unwrap();
                    cp = reopened;
                    let mut fresh = AgentState::new(v1::AgentInfo::default(), policy(), now);
                    fresh.agent_id = saved.agent_id;
                    for (f, info) in saved.frameworks {
                        fresh.restore_framework(f, info);
                    }
                    for (k, t) in saved.tasks {
                        fresh.restore(k, t, now);
                    }
                    prop_assert!(fresh.forget_idle().is_empty(), "no framework without tasks is saved");
                    s = fresh;
                    // Not linked until the next reconnect.
                    linked = false;
                }
                Op::Wait => {
                    now += Duration::from_secs(61);
                    let cmds = s.step(now, Input::Tick);
                    carry_out(&cp, &s, cmds, &mut m, linked);
                }
            }
        }
        for k in &keys {
            let want = produced.get(k).cloned().unwrap_or_default();
            let got = m.acked.get(k).cloned().unwrap_or_default();
            prop_assert_eq!(&got, &want, "task {}", k.1);
        }
        // Finished tasks are forgotten, in memory and on disk.
        let finished: Vec<_> = keys
            .iter()
            .filter(|k| produced.get(*k).is_some_and(|p| p.last() == Some(&v1::TaskState::TaskFinished)))
            .collect();
        for k in finished {
            prop_assert!(!s.tasks.contains_key(k));
        }
        drop(cp);
        let (_cp, saved) = Checkpoint::open(dir.path()).unwrap();
        prop_assert_eq!(saved.tasks.len(), s.tasks.len());
        // The framework is kept, in memory and on disk, exactly while it has tasks.
        let kept: Vec<_> = s.frameworks().map(|(f, i)| (f.clone(), i.clone())).collect();
        prop_assert_eq!(&saved.frameworks, &kept);
        prop_assert_eq!(kept.is_empty(), s.tasks.is_empty());
    }
}

fn proto(st: TaskState) -> v1::TaskState {
    agora_proto::state_to_proto(st)
}

#[test]
fn a_framework_is_kept_while_it_has_tasks_here() {
    let now = Instant::now();
    let mut s = registered(now);
    let fw = FrameworkId::new("fw").unwrap();
    let saves = |cmds: &[Command]| {
        cmds.iter()
            .filter(|c| matches!(c, Command::SaveFramework(f) if *f == fw))
            .count()
    };
    let cmds = s.step(now, run_task("a"));
    assert_eq!(
        saves(&cmds),
        1,
        "the first task saves its framework: {cmds:?}"
    );
    assert_eq!(s.framework(&fw).map(|f| f.name.as_str()), Some("batch"));
    let cmds = s.step(now, run_task("b"));
    assert_eq!(saves(&cmds), 0, "an unchanged framework is not saved again");
    let cmds = s.step(now, run_task_of("c", framework_info("batch-2")));
    assert_eq!(saves(&cmds), 1, "a changed one is");
    assert_eq!(s.framework(&fw).map(|f| f.name.as_str()), Some("batch-2"));

    // Each task ends; once the last one's end is acknowledged, the framework goes too.
    for (i, t) in ["a", "b", "c"].into_iter().enumerate() {
        let k = key(t);
        let cmds = s.step(now, change(&k, TaskState::Failed));
        let u = updates(&cmds).pop().expect("the end is sent");
        let cmds = s.step(now, ack(&k, &u.uuid));
        assert!(!s.tasks.contains_key(&k));
        let last = i == 2;
        assert_eq!(saves(&cmds), usize::from(last), "after {t}: {cmds:?}");
        assert_eq!(s.framework(&fw).is_some(), !last);
    }
    assert_eq!(s.frameworks().count(), 0);
}
