//! The engine's rules, driven call by call with time passed in, and its bookkeeping
//! invariants over random sequences of calls.

use std::collections::HashMap;

use agora_core::parse_resources;
use proptest::prelude::*;

use super::*;
use crate::allocator::{Cycle, HierarchicalDrf};

/// A stream id for a new subscription (the runtime makes random ones).
fn fresh_stream() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("m1-S{}", N.fetch_add(1, Ordering::Relaxed))
}

fn config() -> EngineConfig {
    EngineConfig {
        max_tasks_per_principal: 0,
        max_offers_per_principal: 0,
        master_id: "m1".into(),
        agent_heartbeat_interval: Duration::from_secs(1),
        max_missed_heartbeats: 3,
        framework_heartbeat_interval: Duration::from_secs(15),
        default_refuse: Duration::from_secs(5),
        offer_timeout: Some(Duration::from_secs(30)),
        reservers: HashMap::new(),
        max_completed_tasks: 100,
        agent_reregister_timeout: Duration::from_secs(60),
        acls: None,
    }
}

/// An engine, a clock and the streams of the frameworks subscribed to it.
struct World {
    e: Engine,
    t0: Instant,
    elapsed: Duration,
    streams: HashMap<FrameworkId, String>,
    /// Offers each framework has been sent and not yet seen rescinded.
    offers: HashMap<FrameworkId, Vec<v1::Offer>>,
    updates: Vec<(FrameworkId, v1::TaskStatus)>,
    to_agents: Vec<(AgentId, v1::master_message::Message)>,
    /// Agents whose links the engine asked to close.
    closed_agents: Vec<AgentId>,
    /// The registry as the engine's writes left it.
    registry: crate::registry::Registry,
    next_task: u64,
}

impl World {
    fn new() -> World {
        World {
            e: Engine::new(
                config(),
                Box::new(HierarchicalDrf::new(
                    parse_resources("cpus:0.01;mem:32").unwrap(),
                )),
            ),
            t0: Instant::now(),
            elapsed: Duration::ZERO,
            streams: HashMap::new(),
            offers: HashMap::new(),
            updates: Vec::new(),
            to_agents: Vec::new(),
            closed_agents: Vec::new(),
            registry: crate::registry::Registry::default(),
            next_task: 0,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.t0 + self.elapsed,
            wall: 1.8e9 + self.elapsed.as_secs_f64(),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
        let now = self.now();
        self.e.tick(now);
        self.drain();
    }

    /// Files the engine's effects where tests can look at them.
    fn drain(&mut self) {
        for effect in self.e.take_effects() {
            match effect {
                Effect::ToFramework(fw, ev) => match ev.event {
                    Some(v1::event::Event::Offers(o)) => {
                        self.offers.entry(fw).or_default().extend(o.offers);
                    }
                    Some(v1::event::Event::Rescind(r)) => {
                        if let Some(held) = self.offers.get_mut(&fw) {
                            held.retain(|o| o.id != r.offer_id);
                        }
                    }
                    Some(v1::event::Event::Update(u)) => {
                        self.updates.push((fw, u.status.unwrap()));
                    }
                    _ => {}
                },
                Effect::ToAgent(a, m) => self.to_agents.push((a, m)),
                Effect::CloseAgent(a) => self.closed_agents.push(a),
                Effect::Persist(op) => {
                    self.registry.apply(&op);
                }
                Effect::CloseFramework(_) | Effect::Attach(..) => {}
            }
        }
    }

    fn framework(&mut self, name: &str) -> FrameworkId {
        self.framework_of(name, "")
    }

    fn framework_of(&mut self, name: &str, principal: &str) -> FrameworkId {
        let (id, stream) = self
            .e
            .subscribe(
                v1::FrameworkInfo {
                    name: name.into(),
                    principal: principal.into(),
                    failover_timeout: 60.0,
                    ..Default::default()
                },
                None,
                fresh_stream(),
                self.now(),
            )
            .unwrap();
        self.streams.insert(id.clone(), stream);
        self.drain();
        id
    }

    fn agent(&mut self, resources: &str) -> AgentId {
        let id = self.register(None, resources);
        // Only what follows registration is of interest.
        self.to_agents.clear();
        id
    }

    /// An agent on "host" registers (again, under `id`), reporting no tasks.
    fn register(&mut self, id: Option<&AgentId>, resources: &str) -> AgentId {
        let now = self.now();
        let id = self
            .e
            .register_agent(
                v1::agent_message::Register {
                    info: Some(v1::AgentInfo {
                        hostname: "host".into(),
                        resources: resources_to_proto(&parse_resources(resources).unwrap()),
                        ..Default::default()
                    }),
                    agent_id: id.map(Into::into),
                    tasks: vec![],
                },
                now,
            )
            .unwrap();
        self.drain();
        id
    }

    /// Every connected agent heartbeats now.
    fn heartbeats(&mut self) {
        let now = self.now();
        let ids: Vec<AgentId> = self.e.agents.keys().cloned().collect();
        for a in ids {
            if self.e.agents[&a].status == AgentStatus::Connected {
                self.e.agent_heartbeat(&a, now);
            }
        }
    }

    fn allocate(&mut self) {
        let now = self.now();
        self.e.allocate(now, Cycle::Incremental);
        self.drain();
    }

    fn take_offers(&mut self, fw: &FrameworkId) -> Vec<v1::Offer> {
        self.offers.remove(fw).unwrap_or_default()
    }

    fn task(&mut self, resources: &str) -> v1::TaskInfo {
        self.next_task += 1;
        let id = format!("t{}", self.next_task);
        v1::TaskInfo {
            name: id.clone(),
            task_id: Some(v1::TaskId { value: id }),
            resources: resources_to_proto(&parse_resources(resources).unwrap()),
            payload: Some(v1::task_info::Payload::Wasm(v1::WasmTask {
                module: Some(v1::wasm_task::Module::Digest("sha256:00".into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn accept(
        &mut self,
        fw: &FrameworkId,
        offers: &[v1::Offer],
        tasks: Vec<v1::TaskInfo>,
        refuse: Option<f64>,
    ) -> Result<(), EngineError> {
        let ids: Vec<OfferId> = offers
            .iter()
            .map(|o| OfferId::try_from(o.id.as_ref().unwrap()).unwrap())
            .collect();
        let stream = self.streams[fw].clone();
        let now = self.now();
        let r = self.e.accept(
            fw,
            &stream,
            &ids,
            vec![v1::Operation {
                operation: Some(v1::operation::Operation::Launch(v1::operation::Launch {
                    tasks,
                })),
            }],
            Some(&v1::Filters {
                refuse_seconds: refuse,
            }),
            now,
        );
        self.drain();
        r
    }

    fn decline(&mut self, fw: &FrameworkId, offers: &[v1::Offer], refuse: f64) {
        let ids: Vec<OfferId> = offers
            .iter()
            .map(|o| OfferId::try_from(o.id.as_ref().unwrap()).unwrap())
            .collect();
        let stream = self.streams[fw].clone();
        let now = self.now();
        self.e
            .decline(
                fw,
                &stream,
                &ids,
                Some(&v1::Filters {
                    refuse_seconds: Some(refuse),
                }),
                now,
            )
            .unwrap();
        self.drain();
    }

    /// The agent reports a state for a task, with a fresh uuid.
    fn report(&mut self, agent: &AgentId, fw: &FrameworkId, task: &str, state: v1::TaskState) {
        let uuid = uuid::Uuid::new_v4().as_bytes().to_vec();
        self.report_uuid(agent, fw, task, state, &uuid).unwrap();
    }

    /// The agent reports a state for a task with the given uuid.
    fn report_uuid(
        &mut self,
        agent: &AgentId,
        fw: &FrameworkId,
        task: &str,
        state: v1::TaskState,
        uuid: &[u8],
    ) -> Result<(), EngineError> {
        let r = self.e.status_update(
            agent,
            v1::agent_message::StatusUpdate {
                framework_id: Some(fw.into()),
                status: Some(v1::TaskStatus {
                    task_id: Some(v1::TaskId { value: task.into() }),
                    state: state as i32,
                    uuid: uuid.to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        self.drain();
        r
    }

    fn last_update(&self, task: &str) -> Option<&v1::TaskStatus> {
        self.updates
            .iter()
            .rev()
            .map(|(_, s)| s)
            .find(|s| s.task_id.as_ref().is_some_and(|t| t.value == task))
    }
}

fn offered(offers: &[v1::Offer]) -> Resources {
    offers.iter().fold(Resources::new(), |acc, o| {
        acc + resources_from_proto(&o.resources).unwrap()
    })
}

/// A principal whose frameworks hold as many offers as it may is offered no more: the
/// other agents go to another principal's framework, and once an offer comes back the
/// principal may be offered again.
#[test]
fn a_principal_holds_no_more_offers_than_its_bound() {
    let mut w = World::new();
    w.e = Engine::new(
        EngineConfig {
            max_offers_per_principal: 2,
            ..config()
        },
        Box::new(HierarchicalDrf::new(
            parse_resources("cpus:0.01;mem:32").unwrap(),
        )),
    );
    let (f1, f2, f3) = (
        w.framework_of("a", "flood"),
        w.framework_of("b", "flood"),
        w.framework_of("c", "flood"),
    );
    for _ in 0..4 {
        w.agent("cpus:2;mem:1024");
    }
    w.allocate();
    let good = w.framework_of("g", "good");
    // Each refusal filters that agent for that framework a while; the periodic full
    // cycles offer it to the others.
    for _ in 0..3 {
        let now = w.now();
        w.e.allocate(now, Cycle::Full);
        w.drain();
    }
    let flood = |w: &World| {
        [&f1, &f2, &f3]
            .iter()
            .map(|f| w.offers.get(*f).map_or(0, Vec::len))
            .sum::<usize>()
    };
    assert_eq!(flood(&w), 2, "{:?}", w.offers);
    assert_eq!(
        w.offers.get(&good).map_or(0, Vec::len),
        2,
        "the rest went to good"
    );
    // Declined, the flood's offer goes back, and the bound no longer holds it off.
    let holder = [&f1, &f2, &f3]
        .into_iter()
        .find(|f| w.offers.get(*f).is_some_and(|o| !o.is_empty()))
        .unwrap()
        .clone();
    let held = w.take_offers(&holder);
    w.decline(&holder, &held, 0.0);
    assert_eq!(flood(&w), 1);
    let now = w.now();
    w.e.allocate(now, Cycle::Full);
    w.drain();
    assert_eq!(flood(&w), 2, "{:?}", w.offers);
}

#[test]
fn a_new_agent_is_offered_whole_and_an_accepted_task_reaches_it() {
    let mut w = World::new();
    let fw = w.framework("f");
    let agent = w.agent("cpus:2;mem:1024");
    w.allocate();
    let offers = w.take_offers(&fw);
    assert_eq!(offered(&offers).to_string(), "cpus:2;mem:1024");

    let task = w.task("cpus:1;mem:256");
    w.accept(&fw, &offers, vec![task], Some(0.0)).unwrap();
    assert!(matches!(
        w.to_agents.as_slice(),
        [(a, v1::master_message::Message::RunTask(_))] if *a == agent
    ));
    // The rest comes back at once with refuse_seconds 0.
    w.allocate();
    assert_eq!(offered(&w.take_offers(&fw)).to_string(), "cpus:1;mem:768");
}

#[test]
fn an_accept_beyond_the_offer_launches_what_fits_and_errors_the_rest() {
    let mut w = World::new();
    let fw = w.framework("f");
    w.agent("cpus:2;mem:1024");
    w.allocate();
    let offers = w.take_offers(&fw);
    let (a, b) = (w.task("cpus:1.5;mem:512"), w.task("cpus:1;mem:512"));
    w.accept(&fw, &offers, vec![a, b], None).unwrap();
    assert_eq!(w.to_agents.len(), 1, "only the first task is sent");
    let refused = w.last_update("t2").unwrap();
    assert_eq!(refused.state(), v1::TaskState::TaskError);
    assert_eq!(refused.reason(), v1::Reason::InvalidOffers);
    assert!(
        refused.message.contains("offers hold only"),
        "{}",
        refused.message
    );
}

#[test]
fn unknown_and_foreign_offers_refuse_the_call_and_change_nothing() {
    let mut w = World::new();
    let (f1, f2) = (w.framework("one"), w.framework("two"));
    w.agent("cpus:2;mem:1024");
    w.agent("cpus:2;mem:1024");
    w.allocate();
    let (o1, o2) = (w.take_offers(&f1), w.take_offers(&f2));
    assert_eq!((o1.len(), o2.len()), (1, 1));

    let t = w.task("cpus:1;mem:64");
    let err = w.accept(&f1, &o2, vec![t.clone()], None).unwrap_err();
    assert!(matches!(err, EngineError::NotYourOffer { .. }), "{err}");
    let mut ghost = o1[0].clone();
    ghost.id = Some(v1::OfferId {
        value: "m1-O999999".into(),
    });
    let err = w.accept(&f1, &[ghost], vec![t.clone()], None).unwrap_err();
    assert!(matches!(err, EngineError::UnknownOffer(_)), "{err}");
    let err =
        w.e.accept(&f1, "not-a-stream", &[], vec![], None, w.now())
            .unwrap_err();
    assert!(matches!(err, EngineError::StaleStream { .. }), "{err}");
    assert!(w.to_agents.is_empty());
    // Both offers are still good.
    w.accept(&f1, &o1, vec![t], None).unwrap();
    let t2 = w.task("cpus:1;mem:64");
    w.accept(&f2, &o2, vec![t2], None).unwrap();
    assert_eq!(w.to_agents.len(), 2);
}

#[test]
fn declined_resources_are_filtered_until_refuse_seconds_pass() {
    let mut w = World::new();
    let fw = w.framework("f");
    w.agent("cpus:2;mem:1024");
    w.allocate();
    let offers = w.take_offers(&fw);
    w.decline(&fw, &offers, 3.0);
    w.advance(Duration::from_secs(2));
    w.heartbeats();
    w.allocate();
    assert!(w.take_offers(&fw).is_empty(), "filtered for 3 s");
    w.advance(Duration::from_millis(1001));
    w.allocate();
    assert_eq!(w.take_offers(&fw).len(), 1);
}

#[test]
fn a_terminal_update_frees_resources_and_its_acknowledgement_retires_the_task() {
    let mut w = World::new();
    let fw = w.framework("f");
    let agent = w.agent("cpus:1;mem:512");
    w.allocate();
    let offers = w.take_offers(&fw);
    let t = w.task("cpus:1;mem:512");
    w.accept(&fw, &offers, vec![t], Some(0.0)).unwrap();
    w.allocate();
    assert!(w.take_offers(&fw).is_empty(), "everything is in use");

    w.report(&agent, &fw, "t1", v1::TaskState::TaskRunning);
    w.report(&agent, &fw, "t1", v1::TaskState::TaskFinished);
    w.allocate();
    assert_eq!(offered(&w.take_offers(&fw)).to_string(), "cpus:1;mem:512");
    let finished = w.last_update("t1").unwrap().clone();
    assert_eq!(finished.state(), v1::TaskState::TaskFinished);

    let stream = w.streams[&fw].clone();
    let tid = TaskId::new("t1").unwrap();
    w.e.acknowledge(&fw, &stream, &tid, &finished.uuid).unwrap();
    w.drain();
    assert!(matches!(
        w.to_agents.last(),
        Some((_, v1::master_message::Message::Acknowledge(_)))
    ));
    let state = w.e.snapshot(w.now());
    assert!(state.tasks.is_empty());
    assert_eq!(state.completed_tasks.len(), 1);
}

#[test]
fn a_silent_agent_is_lost_with_its_tasks_and_offers() {
    let mut w = World::new();
    let fw = w.framework("f");
    let agent = w.agent("cpus:2;mem:1024");
    w.allocate();
    let offers = w.take_offers(&fw);
    let t = w.task("cpus:1;mem:64");
    w.accept(&fw, &offers, vec![t], Some(0.0)).unwrap();
    w.report(&agent, &fw, "t1", v1::TaskState::TaskRunning);
    w.allocate();
    assert_eq!(w.offers[&fw].len(), 1);

    // 3 missed heartbeats of 1 s: still there at 3 s, lost after.
    w.advance(Duration::from_secs(3));
    assert!(w.last_update("t1").unwrap().state() == v1::TaskState::TaskRunning);
    w.advance(Duration::from_millis(100));
    let lost = w.last_update("t1").unwrap();
    assert_eq!(lost.state(), v1::TaskState::TaskLost);
    assert_eq!(lost.reason(), v1::Reason::AgentRemoved);
    assert!(w.take_offers(&fw).is_empty(), "its offer was rescinded");
    w.allocate();
    assert!(w.take_offers(&fw).is_empty(), "a lost agent is not offered");
}

#[test]
fn unanswered_offers_are_rescinded_after_the_offer_timeout() {
    let mut w = World::new();
    let fw = w.framework("slow");
    w.agent("cpus:2;mem:1024");
    w.allocate();
    assert_eq!(w.offers[&fw].len(), 1);
    for _ in 0..29 {
        w.heartbeats();
        w.advance(Duration::from_secs(1));
    }
    assert_eq!(w.offers[&fw].len(), 1, "30 s have not passed");
    w.heartbeats();
    w.advance(Duration::from_secs(1));
    assert!(w.offers[&fw].is_empty(), "rescinded at 30 s");
    // Its resources are free again, and no filter holds them back.
    w.allocate();
    assert_eq!(offered(&w.take_offers(&fw)).to_string(), "cpus:2;mem:1024");
}

#[test]
fn a_framework_can_hold_several_roles_and_suppress_one() {
    let mut w = World::new();
    let (fw, stream) =
        w.e.subscribe(
            v1::FrameworkInfo {
                name: "multi".into(),
                roles: vec!["a".into(), "b".into()],
                ..Default::default()
            },
            None,
            fresh_stream(),
            w.now(),
        )
        .unwrap();
    w.streams.insert(fw.clone(), stream.clone());
    w.drain();
    w.agent("cpus:1;mem:512");
    w.agent("cpus:1;mem:512");
    w.allocate();
    let roles: std::collections::BTreeSet<String> = w
        .take_offers(&fw)
        .iter()
        .map(|o| o.allocation_role.clone())
        .collect();
    assert_eq!(
        roles,
        ["a".to_owned(), "b".to_owned()].into(),
        "one agent per role"
    );
    let err = w.e.suppress(&fw, &stream, &["c".into()]).unwrap_err();
    assert!(
        err.to_string().contains("not subscribed to role \"c\""),
        "{err}"
    );
    w.e.suppress(&fw, &stream, &["a".into()]).unwrap();
    w.drain();
    let err =
        w.e.subscribe(
            v1::FrameworkInfo {
                name: "bad".into(),
                roles: vec!["a/../b".into()],
                ..Default::default()
            },
            None,
            fresh_stream(),
            w.now(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("'..'"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Invariants over random call sequences.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Allocate,
    /// Framework i launches tasks of the given size on all its offers of one agent.
    Accept {
        fw: usize,
        cpus: u8,
        mem: u16,
        count: u8,
        refuse: bool,
    },
    Decline {
        fw: usize,
        refuse: bool,
    },
    /// The k-th live task (mod count) reaches a state.
    Report {
        k: usize,
        state: u8,
    },
    Kill {
        k: usize,
    },
    Acknowledge,
    Advance {
        millis: u16,
    },
    Disconnect {
        agent: usize,
    },
    Revive {
        fw: usize,
    },
    Suppress {
        fw: usize,
    },
    /// The agent's link drops and it registers again under its id, reporting the tasks the
    /// master placed on it (those still live) — as after a master failover or a reconnect.
    Reregister {
        agent: usize,
    },
    /// A new leader: a fresh engine recovered from the registry the old one wrote; the
    /// frameworks re-subscribe with their ids and the reachable agents register again with
    /// their tasks.
    Failover,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Allocate),
        4 => (0..3usize, 1..4u8, 1..600u16, 1..4u8, any::<bool>())
            .prop_map(|(fw, cpus, mem, count, refuse)| Op::Accept { fw, cpus, mem, count, refuse }),
        1 => (0..3usize, any::<bool>()).prop_map(|(fw, refuse)| Op::Decline { fw, refuse }),
        4 => (any::<usize>(), 0..4u8).prop_map(|(k, state)| Op::Report { k, state }),
        1 => any::<usize>().prop_map(|k| Op::Kill { k }),
        2 => Just(Op::Acknowledge),
        2 => (1..2500u16).prop_map(|millis| Op::Advance { millis }),
        1 => (0..3usize).prop_map(|agent| Op::Disconnect { agent }),
        1 => (0..3usize).prop_map(|fw| Op::Revive { fw }),
        1 => (0..3usize).prop_map(|fw| Op::Suppress { fw }),
        1 => (0..3usize).prop_map(|agent| Op::Reregister { agent }),
        1 => Just(Op::Failover),
    ]
}

/// The engine's ledgers agree with its tasks and offers, and no agent gives out more than it
/// has.
fn check(e: &Engine) -> Result<(), String> {
    for (id, a) in &e.agents {
        let offered = e
            .offers
            .values()
            .filter(|o| o.agent == *id)
            .fold(Resources::new(), |acc, o| acc + o.resources.clone());
        if offered != a.offered {
            return Err(format!(
                "agent {id}: offers sum to {offered}, ledger says {}",
                a.offered
            ));
        }
        if a.status != AgentStatus::Connected && !offered.is_empty() {
            return Err(format!("agent {id} is {:?} but has offers", a.status));
        }
        let offers_here = e.offers.values().filter(|o| o.agent == *id).count();
        let offers_indexed = e.offers_by_agent.get(id).map_or(0, HashSet::len);
        if offers_here != offers_indexed {
            return Err(format!(
                "agent {id}: {offers_here} offers, {offers_indexed} in the index by agent"
            ));
        }
        let indexed: Vec<&TaskKey> = e.tasks.on_agent(id).map(|(k, _)| k).collect();
        let placed = e.tasks.values().filter(|t| t.agent == *id).count();
        if indexed.len() != placed {
            return Err(format!(
                "agent {id}: {placed} tasks, {} in the index by agent",
                indexed.len()
            ));
        }
        let used = e
            .tasks
            .values()
            // An unreachable task's resources are counted out when it becomes unreachable.
            .filter(|t| t.agent == *id && t.state.is_live() && t.state != TaskState::Unreachable)
            .fold(Resources::new(), |acc, t| acc + t.resources.clone());
        if used != a.used {
            return Err(format!(
                "agent {id}: live tasks use {used}, ledger says {}",
                a.used
            ));
        }
        let out = &a.used + &a.offered;
        if !a.total.contains(&out) {
            return Err(format!("agent {id}: {out} given out of {}", a.total));
        }
    }
    // Nothing stale in the indexes either: an entry per task and per offer, no empty sets.
    let tasks_indexed: usize = e.tasks.by_agent.values().map(HashSet::len).sum();
    let offers_indexed: usize = e.offers_by_agent.values().map(HashSet::len).sum();
    if tasks_indexed != e.tasks.map.len()
        || offers_indexed != e.offers.len()
        || e.tasks.by_agent.values().any(HashSet::is_empty)
        || e.offers_by_agent.values().any(HashSet::is_empty)
    {
        return Err(format!(
            "indexes by agent: {tasks_indexed} tasks of {}, {offers_indexed} offers of {}, or an empty set",
            e.tasks.map.len(),
            e.offers.len()
        ));
    }
    for (id, f) in &e.frameworks {
        let offered = e
            .offers
            .values()
            .filter(|o| o.framework == *id)
            .fold(Resources::new(), |acc, o| acc + o.resources.clone());
        if offered != f.offered {
            return Err(format!(
                "framework {id}: offers sum to {offered}, ledger {}",
                f.offered
            ));
        }
        let used = e
            .tasks
            .iter()
            .filter(|((f, _), t)| f == id && t.state.is_live() && t.holds())
            .fold(Resources::new(), |acc, (_, t)| acc + t.resources.clone());
        if used != f.used {
            return Err(format!(
                "framework {id}: live tasks use {used}, ledger says {}",
                f.used
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn ledgers_balance_and_nothing_is_over_allocated(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        let fws: Vec<FrameworkId> = (0..3).map(|i| w.framework(&format!("f{i}"))).collect();
        let agents: Vec<AgentId> = ["cpus:4;mem:2048", "cpus:2;mem:4096", "cpus:8;mem:1024"]
            .iter()
            .map(|r| w.agent(r))
            .collect();
        let mut suppressed = [false; 3];
        for op in ops {
            let offers_before: Vec<usize> =
                fws.iter().map(|f| w.offers.get(f).map_or(0, Vec::len)).collect();
            match op {
                Op::Allocate => w.allocate(),
                Op::Accept { fw, cpus, mem, count, refuse } => {
                    let f = &fws[fw];
                    let held = w.take_offers(f);
                    if let Some(first) = held.first() {
                        let agent = first.agent_id.clone();
                        let (same, other): (Vec<_>, Vec<_>) =
                            held.into_iter().partition(|o| o.agent_id == agent);
                        w.offers.insert(f.clone(), other);
                        let tasks = (0..count)
                            .map(|_| w.task(&format!("cpus:{};mem:{mem}", f64::from(cpus) / 2.0)))
                            .collect();
                        w.accept(f, &same, tasks, Some(if refuse { 5.0 } else { 0.0 })).unwrap();
                    }
                }
                Op::Decline { fw, refuse } => {
                    let f = fws[fw].clone();
                    let held = w.take_offers(&f);
                    if !held.is_empty() {
                        w.decline(&f, &held, if refuse { 5.0 } else { 0.0 });
                    }
                }
                Op::Report { k, state } => {
                    let live: Vec<(TaskKey, AgentId)> = w
                        .e
                        .tasks
                        .iter()
                        .filter(|(_, t)| !t.state.is_terminal())
                        .map(|(k, t)| (k.clone(), t.agent.clone()))
                        .collect();
                    if !live.is_empty() {
                        let ((fw, task), agent) = live[k % live.len()].clone();
                        let state = [
                            v1::TaskState::TaskRunning,
                            v1::TaskState::TaskFinished,
                            v1::TaskState::TaskFailed,
                            v1::TaskState::TaskKilled,
                        ][usize::from(state)];
                        if w.e.agents[&agent].status == AgentStatus::Connected {
                            w.report(&agent, &fw, task.as_str(), state);
                        }
                    }
                }
                Op::Kill { k } => {
                    let live: Vec<TaskKey> = w.e.tasks.keys().cloned().collect();
                    if !live.is_empty() {
                        let (fw, task) = live[k % live.len()].clone();
                        let stream = w.streams[&fw].clone();
                        let _ = w.e.kill(&fw, &stream, &task);
                        w.drain();
                    }
                }
                Op::Acknowledge => {
                    let pending: Vec<(FrameworkId, TaskId, Vec<u8>)> = w
                        .e
                        .tasks
                        .iter()
                        .filter_map(|((f, t), task)| {
                            task.terminal_uuid.clone().map(|u| (f.clone(), t.clone(), u))
                        })
                        .collect();
                    for (f, t, uuid) in pending {
                        let stream = w.streams[&f].clone();
                        w.e.acknowledge(&f, &stream, &t, &uuid).unwrap();
                    }
                    w.drain();
                }
                Op::Advance { millis } => {
                    // Agents that are connected keep heartbeating.
                    w.heartbeats();
                    w.advance(Duration::from_millis(u64::from(millis)));
                }
                Op::Disconnect { agent } => {
                    w.e.agent_disconnected(&agents[agent]);
                    w.drain();
                }
                Op::Revive { fw } => {
                    let stream = w.streams[&fws[fw]].clone();
                    w.e.revive(&fws[fw], &stream, &[]).unwrap();
                    suppressed[fw] = false;
                    w.drain();
                }
                Op::Suppress { fw } => {
                    let stream = w.streams[&fws[fw]].clone();
                    w.e.suppress(&fws[fw], &stream, &[]).unwrap();
                    suppressed[fw] = true;
                    w.drain();
                }
                Op::Failover => {
                    let mut n = failover::failover(&w);
                    let now = n.now();
                    for f in &fws {
                        let (_, stream) = n
                            .e
                            .subscribe(
                                v1::FrameworkInfo {
                                    id: Some(f.into()),
                                    name: w.e.frameworks[f].info.name.clone(),
                                    failover_timeout: 60.0,
                                    ..Default::default()
                                },
                                None,
                                fresh_stream(),
                                now,
                            )
                            .unwrap();
                        n.streams.insert(f.clone(), stream);
                    }
                    let mut totals = Vec::new();
                    for a in &agents {
                        let old = &w.e.agents[a];
                        if old.status == AgentStatus::Lost {
                            continue;
                        }
                        let tasks: Vec<v1::AgentTask> = w
                            .e
                            .tasks
                            .iter()
                            .filter(|(_, t)| t.agent == *a && !t.state.is_terminal())
                            .map(|((f, _), t)| v1::AgentTask {
                                framework_id: Some(f.into()),
                                task: Some(t.info.clone()),
                                state: state_to_proto(t.state) as i32,
                            })
                            .collect();
                        totals.push((a.clone(), old.total.clone()));
                        n.e.register_agent(
                            v1::agent_message::Register {
                                info: Some(old.info.clone()),
                                agent_id: Some(a.into()),
                                tasks,
                            },
                            now,
                        )
                        .unwrap();
                    }
                    n.drain();
                    let before: usize = w.e.tasks.values().filter(|t| t.state.is_live() && w.e.agents[&t.agent].status != AgentStatus::Lost).count();
                    let after = n.e.tasks.values().filter(|t| t.state.is_live()).count();
                    prop_assert_eq!(before, after, "live tasks on returning agents are all known to the new leader");
                    for (a, total) in totals {
                        prop_assert_eq!(&n.e.agents[&a].total, &total, "agent {}'s total survives", a);
                    }
                    suppressed = [false; 3];
                    w = n;
                }
                Op::Reregister { agent } => {
                    let id = agents[agent].clone();
                    let tasks: Vec<v1::AgentTask> = w
                        .e
                        .tasks
                        .iter()
                        .filter(|(_, t)| t.agent == id && !t.state.is_terminal())
                        .map(|((f, _), t)| v1::AgentTask {
                            framework_id: Some(f.into()),
                            task: Some(t.info.clone()),
                            state: state_to_proto(if t.state == TaskState::Unreachable {
                                TaskState::Running
                            } else {
                                t.state
                            }) as i32,
                        })
                        .collect();
                    let info = w.e.agents[&id].info.clone();
                    w.e.agent_disconnected(&id);
                    let now = w.now();
                    w.e.register_agent(
                        v1::agent_message::Register {
                            info: Some(info),
                            agent_id: Some((&id).into()),
                            tasks,
                        },
                        now,
                    )
                    .unwrap();
                    w.drain();
                }
            }
            if let Err(e) = check(&w.e) {
                return Err(TestCaseError::fail(e));
            }
            for (i, f) in fws.iter().enumerate() {
                let now_held = w.offers.get(f).map_or(0, Vec::len);
                prop_assert!(
                    !suppressed[i] || now_held <= offers_before[i],
                    "suppressed framework {i} received an offer"
                );
            }
        }
    }
}

mod failover;
mod hardening;
