//! A new leader's engine, recovered from the registry the old one wrote: frameworks,
//! agents, reservations, quotas and weights come back; tasks come back with their agents.

use super::*;
use crate::registry::Op;

fn principal_framework(w: &mut World, name: &str, principal: &str, roles: &[&str]) -> FrameworkId {
    let (id, stream) =
        w.e.subscribe(
            v1::FrameworkInfo {
                name: name.into(),
                principal: principal.into(),
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
                failover_timeout: 60.0,
                capabilities: vec![v1::framework_info::Capability::PartitionAware as i32],
                ..Default::default()
            },
            None,
            fresh_stream(),
            w.now(),
        )
        .unwrap();
    w.streams.insert(id.clone(), stream);
    w.drain();
    id
}

fn reserve(w: &mut World, fw: &FrameworkId, offers: &[v1::Offer], what: &str) {
    let ids: Vec<OfferId> = offers
        .iter()
        .map(|o| OfferId::try_from(o.id.as_ref().unwrap()).unwrap())
        .collect();
    let stream = w.streams[fw].clone();
    let now = w.now();
    w.e.accept(
        fw,
        &stream,
        &ids,
        vec![v1::Operation {
            operation: Some(v1::operation::Operation::Reserve(v1::operation::Reserve {
                resources: resources_to_proto(&parse_resources(what).unwrap()),
            })),
        }],
        None,
        now,
    )
    .unwrap();
    w.drain();
}

/// A new leader: a fresh engine recovered from `old`'s registry, its clock where `old`'s is.
pub(super) fn failover(old: &World) -> World {
    let mut w = World::new();
    w.t0 = old.t0;
    w.elapsed = old.elapsed;
    w.next_task = old.next_task;
    w.registry = old.registry.clone();
    let now = w.now();
    w.e.recover(&old.registry, now).unwrap();
    w.drain();
    w
}

fn agent_total(w: &World, agent: &AgentId) -> Resources {
    let s = w.e.snapshot(w.now());
    let a = s
        .agents
        .iter()
        .find(|a| a.id.as_ref().is_some_and(|i| i.value == agent.as_str()))
        .expect("agent in the snapshot");
    resources_from_proto(&a.total).unwrap()
}

#[test]
fn reservations_quotas_weights_and_frameworks_survive_a_failover() {
    let mut w = World::new();
    let fw = principal_framework(&mut w, "web", "alice", &["web"]);
    let agent = w.agent("cpus:4;mem:1024");
    w.e.set_weight("web", 3.0).unwrap();
    w.drain();
    w.allocate();
    let offers = w.take_offers(&fw);
    assert!(!offers.is_empty());
    reserve(&mut w, &fw, &offers, "cpus(web,alice):2");
    w.e.set_quota(
        "web",
        Quota {
            guarantee: parse_resources("cpus:1").unwrap(),
            limit: Some(parse_resources("cpus:3").unwrap()),
        },
        true,
    )
    .unwrap();
    w.drain();
    let before = agent_total(&w, &agent);
    assert!(before.to_string().contains("web"), "{before}");
    let roles_before = w.e.snapshot(w.now()).roles;

    let mut n = failover(&w);
    // Everything the registry holds is in force at once.
    assert_eq!(agent_total(&n, &agent), before);
    let weights_and_quotas = |roles: &[v1::RoleState]| {
        roles
            .iter()
            .map(|r| {
                (
                    r.role.clone(),
                    r.weight,
                    r.guarantee.clone(),
                    r.limit.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        weights_and_quotas(&n.e.snapshot(n.now()).roles),
        weights_and_quotas(&roles_before)
    );
    let snap = n.e.snapshot(n.now());
    let f = snap
        .frameworks
        .iter()
        .find(|f| f.id.as_ref().is_some_and(|i| i.value == fw.as_str()))
        .expect("the framework is known to the new leader");
    assert!(!f.active, "it has not re-subscribed yet");
    let a = snap
        .agents
        .iter()
        .find(|a| a.id.as_ref().unwrap().value == agent.as_str())
        .unwrap();
    assert_eq!(a.status, "recovering");

    // Nothing is offered from an agent that has not come back.
    n.allocate();
    assert!(n.offers.is_empty());

    // The framework's failover may not change its principal.
    let info = |principal: &str| v1::FrameworkInfo {
        id: Some((&fw).into()),
        name: "web".into(),
        principal: principal.into(),
        roles: vec!["web".into()],
        failover_timeout: 60.0,
        ..Default::default()
    };
    let e =
        n.e.subscribe(info("mallory"), None, fresh_stream(), n.now())
            .unwrap_err();
    assert!(matches!(e, EngineError::Forbidden(_)), "{e}");
    let (_, stream) =
        n.e.subscribe(info("alice"), None, fresh_stream(), n.now())
            .unwrap();
    n.streams.insert(fw.clone(), stream);
    n.drain();

    // The agent comes back under its id: its reservation is still its own, and an
    // unchanged registration writes nothing.
    let persisted_before = n.registry.clone();
    let reg =
        n.e.register_agent(
            v1::agent_message::Register {
                info: Some(v1::AgentInfo {
                    hostname: "host".into(),
                    resources: resources_to_proto(&parse_resources("cpus:4;mem:1024").unwrap()),
                    ..Default::default()
                }),
                agent_id: Some((&agent).into()),
                tasks: vec![],
            },
            n.now(),
        )
        .unwrap();
    assert_eq!(reg, agent);
    let effects = n.e.take_effects();
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Persist(_))),
        "an unchanged registration is not written again"
    );
    n.registry = persisted_before;
    assert_eq!(agent_total(&n, &agent), before);
    assert_eq!(
        n.e.snapshot(n.now()).roles,
        roles_before,
        "the role's books balance again"
    );
    n.allocate();
    let offered: Resources = n.take_offers(&fw).iter().fold(Resources::new(), |acc, o| {
        acc + resources_from_proto(&o.resources).unwrap()
    });
    assert!(
        offered.to_string().contains("web"),
        "reserved resources are offered: {offered}"
    );
}

#[test]
fn a_failover_timeout_keeps_running_across_a_failover() {
    let mut w = World::new();
    let fw = principal_framework(&mut w, "batch", "bob", &["*"]);
    let stream = w.streams[&fw].clone();
    w.advance(Duration::from_secs(5));
    let now = w.now();
    w.e.framework_disconnected(&fw, &stream, now);
    w.drain();
    // 50 of its 60 seconds pass, then the leader dies.
    w.advance(Duration::from_secs(50));
    let mut n = failover(&w);
    let known = |n: &World| {
        n.e.snapshot(n.now())
            .frameworks
            .iter()
            .any(|f| f.id.as_ref().is_some_and(|i| i.value == fw.as_str()))
    };
    n.advance(Duration::from_secs(5));
    assert!(known(&n), "still within its timeout");
    n.advance(Duration::from_secs(6));
    assert!(
        !known(&n),
        "torn down when its own timeout ran out, not 60 s after the failover"
    );
    assert!(n.registry.is_removed(fw.as_str()), "the removal is written");
    // And its id is refused from then on, by this leader and the next.
    let again = v1::FrameworkInfo {
        id: Some((&fw).into()),
        name: "batch".into(),
        principal: "bob".into(),
        failover_timeout: 60.0,
        ..Default::default()
    };
    assert!(
        n.e.subscribe(again.clone(), None, fresh_stream(), n.now())
            .is_err()
    );
    let mut m = failover(&n);
    assert!(m.e.subscribe(again, None, fresh_stream(), m.now()).is_err());
    m.drain();
}

#[test]
fn agents_that_do_not_return_are_marked_unreachable_after_the_reregister_timeout() {
    let mut w = World::new();
    let _fw = principal_framework(&mut w, "web", "alice", &["*"]);
    let agent = w.agent("cpus:2;mem:512");
    let mut n = failover(&w);
    n.advance(Duration::from_secs(30));
    assert_eq!(
        n.registry.agents[agent.as_str()].unreachable_since,
        None,
        "heartbeat timeouts do not apply to an agent still expected back"
    );
    n.advance(Duration::from_secs(31));
    assert!(
        n.registry.agents[agent.as_str()]
            .unreachable_since
            .is_some()
    );
    let snap = n.e.snapshot(n.now());
    let a = snap
        .agents
        .iter()
        .find(|a| a.id.as_ref().unwrap().value == agent.as_str())
        .unwrap();
    assert_eq!(a.status, "unreachable");
    // When it does come back, it is admitted again (and written so).
    n.register(Some(&agent), "cpus:2;mem:512");
    assert_eq!(n.registry.agents[agent.as_str()].unreachable_since, None);
}

#[test]
fn every_registry_change_is_a_persist_effect() {
    let mut w = World::new();
    let fw = principal_framework(&mut w, "web", "alice", &["web"]);
    assert!(w.registry.frameworks.contains_key(fw.as_str()));
    let agent = w.agent("cpus:1;mem:64");
    assert!(w.registry.agents.contains_key(agent.as_str()));
    w.e.set_weight("web", 2.0).unwrap();
    w.drain();
    assert_eq!(w.registry.roles["web"].weight, Some(2.0));
    let stream = w.streams[&fw].clone();
    let now = w.now();
    w.e.teardown(&fw, &stream, now).unwrap();
    let effects = w.e.take_effects();
    assert!(
        effects
            .iter()
            .any(|e| matches!(e, Effect::Persist(Op::RemoveFramework { .. })))
    );
}

#[test]
fn a_partition_aware_framework_hears_gone_not_lost_of_tasks_an_agent_lost() {
    let mut w = World::new();
    let aware = principal_framework(&mut w, "aware", "alice", &["*"]);
    let plain = w.framework("plain");
    let agent = w.agent("cpus:4;mem:1024");
    let mut tasks = HashMap::new();
    for fw in [&aware, &plain] {
        // Two tasks each: one the agent says it lost, one it re-registers without.
        let mut offers = Vec::new();
        for _ in 0..5 {
            w.allocate();
            offers = w.take_offers(fw);
            if !offers.is_empty() {
                break;
            }
            w.advance(Duration::from_secs(1));
        }
        assert!(!offers.is_empty(), "no offer for {fw}");
        let launched = vec![w.task("cpus:0.5;mem:64"), w.task("cpus:0.5;mem:64")];
        let ids: Vec<String> = launched
            .iter()
            .map(|t| t.task_id.clone().unwrap().value)
            .collect();
        w.accept(fw, &offers, launched, Some(0.0)).unwrap();
        for id in &ids {
            w.report(&agent, fw, id, v1::TaskState::TaskRunning);
        }
        tasks.insert(fw.clone(), ids);
    }
    w.updates.clear();
    for fw in [&aware, &plain] {
        w.report(&agent, fw, &tasks[fw][0], v1::TaskState::TaskLost);
    }
    // The agent comes back with neither framework's second task.
    w.e.agent_disconnected(&agent);
    w.register(Some(&agent), "cpus:4;mem:1024");
    let heard = |fw: &FrameworkId, task: &str| {
        w.updates
            .iter()
            .filter(|(f, s)| f == fw && s.task_id.as_ref().unwrap().value == task)
            .map(|(_, s)| s.state())
            .collect::<Vec<_>>()
    };
    for task in &tasks[&aware] {
        assert_eq!(heard(&aware, task), [v1::TaskState::TaskGone], "{task}");
    }
    for task in &tasks[&plain] {
        assert_eq!(heard(&plain, task), [v1::TaskState::TaskLost], "{task}");
    }
}
