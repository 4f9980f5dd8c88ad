//! The allocator alone: worked examples (the DRF paper, Mesos's roles and quota), and
//! invariants over random clusters and event sequences.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_core::{AgentId, FrameworkId, Resources, parse_resources};
use proptest::prelude::*;

use super::*;

fn res(s: &str) -> Resources {
    parse_resources(s).unwrap()
}

fn fid(s: &str) -> FrameworkId {
    FrameworkId::new(s).unwrap()
}

fn aid(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn drf() -> HierarchicalDrf {
    HierarchicalDrf::new(res("cpus:0.01;mem:32"))
}

/// Sums allocations per framework.
fn by_framework(out: &[Allocation]) -> HashMap<String, Resources> {
    let mut m: HashMap<String, Resources> = HashMap::new();
    for a in out {
        *m.entry(a.framework.to_string()).or_default() += &a.resources;
    }
    m
}

#[test]
fn drf_paper_example_three_and_two_tasks() {
    // DRF paper §4: 9 CPUs and 18 GB; A's tasks need <1 CPU, 4 GB>, B's <3 CPUs, 1 GB>.
    // Each framework launches one task per offer and gives the rest back; one that cannot
    // fit a task declines for good.
    let mut a = drf();
    let t0 = Instant::now();
    a.add_agent(&aid("s1"), &res("cpus:9;mem:18432"), &[]);
    a.add_framework(&fid("A"), &["*".into()]);
    a.add_framework(&fid("B"), &["*".into()]);
    let demand: HashMap<&str, Resources> =
        [("A", res("cpus:1;mem:4096")), ("B", res("cpus:3;mem:1024"))].into();
    let mut tasks: HashMap<String, u32> = HashMap::new();
    for round in 0..20 {
        let out = a.allocate(t0, Cycle::Incremental);
        if out.is_empty() {
            break;
        }
        for alloc in out {
            let need = &demand[alloc.framework.as_str()];
            match alloc.resources.checked_sub(need) {
                Some(rest) => {
                    *tasks.entry(alloc.framework.to_string()).or_default() += 1;
                    a.recover(&alloc.agent, &alloc.framework, "*", &rest, None);
                }
                None => a.recover(
                    &alloc.agent,
                    &alloc.framework,
                    "*",
                    &alloc.resources,
                    Some(t0 + Duration::from_secs(3600)),
                ),
            }
        }
        assert!(round < 19, "allocation did not settle");
    }
    assert_eq!((tasks["A"], tasks["B"]), (3, 2));
}

#[test]
fn weights_divide_the_cluster() {
    let mut a = drf();
    for i in 0..6 {
        a.add_agent(&aid(&format!("s{i}")), &res("cpus:1;mem:1024"), &[]);
    }
    a.set_weight("heavy", 2.0).unwrap();
    a.add_framework(&fid("h"), &["heavy".into()]);
    a.add_framework(&fid("l"), &["light".into()]);
    let got = by_framework(&a.allocate(Instant::now(), Cycle::Full));
    assert_eq!(got["h"].cpus(), 4.0);
    assert_eq!(got["l"].cpus(), 2.0);
    assert!(matches!(a.set_weight("x", 0.0), Err(RoleError::Weight(..))));
    assert!(matches!(a.set_weight("a//b", 1.0), Err(RoleError::Role(_))));
}

#[test]
fn sibling_roles_share_by_subtree_and_frameworks_within_a_role() {
    // eng has two sub-roles with two frameworks between them; ops has one framework. Eng's
    // subtree and ops get half each; eng's half splits between its frameworks.
    let mut a = drf();
    for i in 0..8 {
        a.add_agent(&aid(&format!("s{i}")), &res("cpus:1;mem:1024"), &[]);
    }
    a.add_framework(&fid("fe"), &["eng/frontend".into()]);
    a.add_framework(&fid("be"), &["eng/backend".into()]);
    a.add_framework(&fid("ops"), &["ops".into()]);
    let got = by_framework(&a.allocate(Instant::now(), Cycle::Full));
    assert_eq!(got["ops"].cpus(), 4.0);
    assert_eq!(got["fe"].cpus(), 2.0);
    assert_eq!(got["be"].cpus(), 2.0);
    let roles = a.roles();
    let eng = roles.iter().find(|r| r.role == "eng").unwrap();
    assert_eq!(eng.allocated.cpus(), 4.0);
}

#[test]
fn reservations_reach_only_their_role_subtree() {
    // Mesos roles doc: resources reserved for a role are offered to it and its sub-roles.
    let mut a = drf();
    a.add_agent(
        &aid("s1"),
        &res("cpus(eng):2;mem(eng):1024;cpus:1;mem:512"),
        &[],
    );
    a.add_framework(&fid("ops"), &["ops".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].resources,
        res("cpus:1;mem:512"),
        "ops sees no eng reservation"
    );

    a.add_framework(&fid("be"), &["eng/backend".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].framework.as_str(), "be");
    assert_eq!(out[0].resources, res("cpus(eng):2;mem(eng):1024"));
    let eng = a.roles().into_iter().find(|r| r.role == "eng").unwrap();
    assert_eq!(eng.reserved, res("cpus:2;mem:1024"));
}

#[test]
fn a_quota_guarantee_is_set_aside_even_against_a_greedy_framework() {
    let mut a = drf();
    for i in 0..4 {
        a.add_agent(&aid(&format!("s{i}")), &res("cpus:2;mem:2048"), &[]);
    }
    a.add_framework(&fid("greedy"), &["batch".into()]);
    a.set_quota(
        "prod",
        Quota {
            guarantee: res("cpus:3"),
            limit: None,
        },
        false,
    )
    .unwrap();
    // prod has no framework yet: its 3 CPUs are held back from greedy.
    let got = by_framework(&a.allocate(Instant::now(), Cycle::Full));
    assert_eq!(got["greedy"].cpus(), 5.0);
    a.add_framework(&fid("svc"), &["prod".into()]);
    let got = by_framework(&a.allocate(Instant::now(), Cycle::Full));
    assert_eq!(got["svc"].cpus(), 3.0);
}

#[test]
fn a_limit_is_never_exceeded() {
    let mut a = drf();
    for i in 0..4 {
        a.add_agent(&aid(&format!("s{i}")), &res("cpus:2;mem:2048"), &[]);
    }
    a.set_quota(
        "capped",
        Quota {
            guarantee: Resources::new(),
            limit: Some(res("cpus:3")),
        },
        false,
    )
    .unwrap();
    a.add_framework(&fid("c"), &["capped".into()]);
    let got = by_framework(&a.allocate(Instant::now(), Cycle::Full));
    assert_eq!(got["c"].cpus(), 3.0);
    // It still gets memory from the agent that gave it the last CPU.
    assert!(got["c"].mem() >= 4096.0);
}

#[test]
fn quota_changes_are_validated() {
    let mut a = drf();
    a.add_agent(&aid("s1"), &res("cpus:4;mem:4096"), &[]);
    let q = |g: &str, l: Option<&str>| Quota {
        guarantee: res(g),
        limit: l.map(res),
    };
    let err = a.set_quota("big", q("cpus:8", None), false).unwrap_err();
    assert!(matches!(err, RoleError::ExceedsCapacity { .. }), "{err}");
    assert!(err.to_string().contains("force"), "{err}");
    a.set_quota("big", q("cpus:8", None), true).unwrap();
    a.set_quota("big", Quota::default(), false).unwrap();

    let err = a
        .set_quota("r", q("cpus:2", Some("cpus:1")), false)
        .unwrap_err();
    assert!(err.to_string().contains("above its limit"), "{err}");
    let err = a.set_quota("r", q("ports:[1-2]", None), false).unwrap_err();
    assert!(err.to_string().contains("ports"), "{err}");
    let err = a.set_quota("*", q("cpus:1", None), false).unwrap_err();
    assert!(err.to_string().contains("'*'"), "{err}");

    a.set_quota("eng", q("cpus:2", Some("cpus:3")), false)
        .unwrap();
    let err = a.set_quota("eng/a", q("cpus:3", None), false).unwrap_err();
    assert!(err.to_string().contains("exceed"), "{err}");
    let err = a
        .set_quota("eng/a", q("", Some("cpus:4")), false)
        .unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    a.set_quota("eng/a", q("cpus:1", Some("cpus:2")), false)
        .unwrap();
    let err = a
        .set_quota("eng", q("cpus:1", Some("cpus:1.5")), false)
        .unwrap_err();
    assert!(err.to_string().contains("below eng/a's limit"), "{err}");
    // A refused change leaves the old quota.
    let eng = a.roles().into_iter().find(|r| r.role == "eng").unwrap();
    assert_eq!(eng.quota.guarantee, res("cpus:2"));
}

#[test]
fn filters_hold_until_they_expire_and_revive_clears_them() {
    let mut a = drf();
    let t0 = Instant::now();
    a.add_agent(&aid("s1"), &res("cpus:2;mem:2048"), &[]);
    a.add_framework(&fid("f"), &["*".into()]);
    let out = a.allocate(t0, Cycle::Full);
    a.recover(
        &out[0].agent,
        &out[0].framework,
        "*",
        &out[0].resources,
        Some(t0 + Duration::from_secs(5)),
    );
    assert!(
        a.allocate(t0 + Duration::from_secs(4), Cycle::Full)
            .is_empty()
    );
    assert_eq!(
        a.allocate(t0 + Duration::from_secs(5), Cycle::Incremental)
            .len(),
        1
    );

    let out = a.allocate(t0, Cycle::Full);
    assert!(out.is_empty(), "everything is allocated");
    let held = res("cpus:2;mem:2048");
    a.recover(
        &aid("s1"),
        &fid("f"),
        "*",
        &held,
        Some(t0 + Duration::from_secs(600)),
    );
    assert!(
        a.allocate(t0 + Duration::from_secs(6), Cycle::Full)
            .is_empty()
    );
    a.revive(&fid("f"), &[]);
    assert_eq!(
        a.allocate(t0 + Duration::from_secs(6), Cycle::Incremental)
            .len(),
        1
    );
}

#[test]
fn suppressed_roles_get_nothing_until_revived() {
    let mut a = drf();
    a.add_agent(&aid("s1"), &res("cpus:2;mem:2048"), &[]);
    a.add_framework(&fid("f"), &["x".into(), "y".into()]);
    a.suppress(&fid("f"), &["x".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].role, "y");
    a.recover(
        &out[0].agent,
        &out[0].framework,
        "y",
        &out[0].resources,
        None,
    );
    a.suppress(&fid("f"), &[]);
    assert!(a.allocate(Instant::now(), Cycle::Full).is_empty());
    a.revive(&fid("f"), &["x".into()]);
    let out = a.allocate(Instant::now(), Cycle::Incremental);
    assert_eq!(out[0].role, "x");
}

#[test]
fn an_incremental_cycle_looks_only_at_what_changed() {
    let mut a = drf();
    for i in 0..5 {
        a.add_agent(&aid(&format!("s{i}")), &res("cpus:2;mem:2048"), &[]);
    }
    a.add_framework(&fid("f"), &["*".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    assert_eq!(out.len(), 5);
    a.recover(&aid("s3"), &fid("f"), "*", &res("cpus:1;mem:512"), None);
    let out = a.allocate(Instant::now(), Cycle::Incremental);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].agent.as_str(), "s3");
    assert_eq!(out[0].resources, res("cpus:1;mem:512"));
}

#[test]
fn crumbs_are_not_offered_and_inactive_parties_get_nothing() {
    let mut a = drf();
    a.add_agent(&aid("s1"), &res("cpus:0.001;mem:1"), &[]);
    a.add_agent(&aid("s2"), &res("cpus:1;mem:1024"), &[]);
    a.add_framework(&fid("f"), &["*".into()]);
    a.set_agent_active(&aid("s2"), false);
    assert!(a.allocate(Instant::now(), Cycle::Full).is_empty());
    a.set_agent_active(&aid("s2"), true);
    a.set_framework_active(&fid("f"), false);
    assert!(a.allocate(Instant::now(), Cycle::Full).is_empty());
    a.set_framework_active(&fid("f"), true);
    assert_eq!(a.allocate(Instant::now(), Cycle::Full).len(), 1);
}

#[test]
fn removing_a_framework_or_agent_gives_everything_back() {
    let mut a = drf();
    a.add_agent(&aid("s1"), &res("cpus:2;mem:2048"), &[]);
    a.add_agent(
        &aid("s2"),
        &res("cpus:2;mem:2048"),
        &[(fid("old"), "*".into(), res("cpus:1;mem:1024"))],
    );
    a.add_framework(&fid("f"), &["*".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    assert_eq!(by_framework(&out)["f"], res("cpus:3;mem:3072"));
    a.remove_framework(&fid("old"));
    let out = a.allocate(Instant::now(), Cycle::Incremental);
    assert_eq!(by_framework(&out)["f"], res("cpus:1;mem:1024"));
    a.remove_framework(&fid("f"));
    a.add_framework(&fid("g"), &["*".into()]);
    a.remove_agent(&aid("s1"));
    let out = a.allocate(Instant::now(), Cycle::Full);
    assert_eq!(by_framework(&out)["g"], res("cpus:2;mem:2048"));
}

#[test]
fn reserve_and_unreserve_convert_an_allocation() {
    let mut a = drf();
    a.add_agent(&aid("s1"), &res("cpus:2;mem:2048"), &[]);
    a.add_framework(&fid("f"), &["eng".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    let reserved = res("cpus(eng,alice):1");
    a.convert(&aid("s1"), &fid("f"), "eng", &res("cpus:1"), &reserved);
    a.recover(
        &aid("s1"),
        &fid("f"),
        "eng",
        &out[0].resources.saturating_sub(&res("cpus:1")),
        None,
    );
    a.recover(&aid("s1"), &fid("f"), "eng", &reserved, None);
    a.add_framework(&fid("other"), &["ops".into()]);
    let out = a.allocate(Instant::now(), Cycle::Full);
    let got = by_framework(&out);
    assert!(got["f"].contains(&res("cpus(eng,alice):1")), "{out:?}");
    assert!(!got.contains_key("other") || got["other"].reserved_roles().is_empty());
    let eng = a.roles().into_iter().find(|r| r.role == "eng").unwrap();
    assert_eq!(eng.reserved, res("cpus:1"));
}

// ---------------------------------------------------------------------------------------------
// Invariants.
// ---------------------------------------------------------------------------------------------

const ROLES: [&str; 5] = ["*", "a", "a/x", "a/y", "b"];

#[derive(Debug, Clone)]
struct Cluster {
    agents: Vec<String>,
    frameworks: Vec<Vec<usize>>,
    limits: Vec<(usize, u32)>,
}

fn agent_text() -> impl Strategy<Value = String> {
    (
        1..8u32,
        1..8u32,
        0..3u32,
        prop::option::of((1..4usize, 1..3u32)),
        0..3u32,
    )
        .prop_map(|(cpus, gb, pstart, reserved, ports)| {
            let mut s = format!("cpus:{cpus};mem:{};disk:1000", gb * 1024);
            if ports > 0 {
                s += &format!(
                    ";ports:[{}-{}]",
                    31000 + pstart * 10,
                    31000 + pstart * 10 + ports * 5
                );
            }
            if let Some((role, c)) = reserved {
                s += &format!(";cpus({}):{c};mem({}):512", ROLES[role], ROLES[role]);
            }
            s
        })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (
        prop::collection::vec(agent_text(), 1..6),
        prop::collection::vec(prop::collection::btree_set(0..5usize, 1..3), 1..5),
        prop::collection::vec((1..5usize, 1..6u32), 0..2),
    )
        .prop_map(|(agents, fws, limits)| Cluster {
            agents,
            frameworks: fws.into_iter().map(|s| s.into_iter().collect()).collect(),
            limits,
        })
}

#[derive(Debug, Clone)]
enum Op {
    Allocate(bool),
    /// Give back outstanding allocation k (mod n), with a filter of this many seconds.
    Recover(usize, Option<u8>),
    Advance(u8),
    Suppress(usize, usize),
    Revive(usize),
    Toggle(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<bool>().prop_map(Op::Allocate),
            4 => (any::<usize>(), prop::option::of(1..10u8)).prop_map(|(k, f)| Op::Recover(k, f)),
            2 => (1..8u8).prop_map(Op::Advance),
            1 => (any::<usize>(), any::<usize>()).prop_map(|(f, r)| Op::Suppress(f, r)),
            1 => any::<usize>().prop_map(Op::Revive),
            1 => any::<usize>().prop_map(Op::Toggle),
        ],
        1..40,
    )
}

fn is_under(role: &str, ancestor: &str) -> bool {
    role == ancestor || role.starts_with(&format!("{ancestor}/"))
}

struct Model {
    a: HierarchicalDrf,
    totals: Vec<Resources>,
    active: Vec<bool>,
    outstanding: Vec<Allocation>,
    filters: Vec<(FrameworkId, AgentId, Resources, Instant)>,
    suppressed: Vec<(FrameworkId, String)>,
    limits: Vec<(String, u32)>,
}

impl Model {
    fn check_allocations(&self, new: &[Allocation], now: Instant) -> Result<(), TestCaseError> {
        for al in new {
            let role = al.role.as_str();
            for r in al.resources.reserved_roles() {
                prop_assert!(is_under(role, r), "{r}'s reservation went to role {role}");
            }
            prop_assert!(
                !self
                    .suppressed
                    .contains(&(al.framework.clone(), al.role.clone())),
                "suppressed {} got {}",
                al.framework,
                al.role
            );
            for (f, ag, refused, until) in &self.filters {
                prop_assert!(
                    !(*f == al.framework
                        && *ag == al.agent
                        && *until > now
                        && refused.contains(&al.resources)),
                    "filtered {} was offered {} on {}",
                    f,
                    al.resources,
                    ag
                );
            }
            let i: usize = al.agent.as_str()[1..].parse().unwrap();
            prop_assert!(self.active[i], "inactive agent {} offered", al.agent);
        }
        // Per agent: allocations fit the total and never share a port.
        for (i, total) in self.totals.iter().enumerate() {
            let mine: Vec<&Allocation> = self
                .outstanding
                .iter()
                .filter(|x| x.agent.as_str() == format!("s{i}"))
                .collect();
            let sum = mine
                .iter()
                .fold(Resources::new(), |acc, x| acc + x.resources.clone());
            prop_assert!(total.contains(&sum), "s{i}: {sum} allocated of {total}");
            for (j, x) in mine.iter().enumerate() {
                for y in &mine[j + 1..] {
                    let (px, py) = (x.resources.ranges("ports"), y.resources.ranges("ports"));
                    prop_assert!(
                        px.difference(&py) == px,
                        "ports {px} and {py} overlap on s{i}"
                    );
                }
            }
        }
        Ok(())
    }

    /// What a role's subtree consumes: its allocations plus its free reservations on active
    /// agents.
    fn consumed(&self, role: &str) -> f64 {
        let allocated: f64 = self
            .outstanding
            .iter()
            .filter(|x| is_under(&x.role, role))
            .map(|x| x.resources.cpus())
            .sum();
        let reserved_cpus = |r: &Resources| -> f64 {
            r.reserved_roles()
                .into_iter()
                .filter(|x| is_under(x, role))
                .map(|x| r.reserved_for(x).cpus())
                .sum()
        };
        let mut free_reserved = 0.0;
        for (i, total) in self.totals.iter().enumerate() {
            if !self.active[i] {
                continue;
            }
            let used: f64 = self
                .outstanding
                .iter()
                .filter(|x| x.agent.as_str() == format!("s{i}"))
                .map(|x| reserved_cpus(&x.resources))
                .sum();
            free_reserved += reserved_cpus(total) - used;
        }
        allocated + free_reserved
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn allocations_respect_totals_reservations_limits_filters_and_suppression(
        c in cluster(), ops in ops()
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut m = Model {
            a: drf(),
            totals: c.agents.iter().map(|s| res(s)).collect(),
            active: vec![true; c.agents.len()],
            outstanding: Vec::new(),
            filters: Vec::new(),
            suppressed: Vec::new(),
            limits: Vec::new(),
        };
        for (i, t) in m.totals.iter().enumerate() {
            m.a.add_agent(&aid(&format!("s{i}")), t, &[]);
        }
        let fws: Vec<FrameworkId> = (0..c.frameworks.len()).map(|i| fid(&format!("f{i}"))).collect();
        for (i, roles) in c.frameworks.iter().enumerate() {
            let names: Vec<String> = roles.iter().map(|r| ROLES[*r].to_owned()).collect();
            m.a.add_framework(&fws[i], &names);
        }
        for (role, cpus) in &c.limits {
            let q = Quota { guarantee: Resources::new(), limit: Some(res(&format!("cpus:{cpus}"))) };
            if m.a.set_quota(ROLES[*role], q, false).is_ok() {
                m.limits.push((ROLES[*role].to_owned(), *cpus));
            }
        }
        for op in ops {
            match op {
                Op::Allocate(full) => {
                    let before: Vec<f64> = m.limits.iter().map(|(r, _)| m.consumed(r)).collect();
                    let out = m.a.allocate(now, if full { Cycle::Full } else { Cycle::Incremental });
                    m.outstanding.extend(out.iter().cloned());
                    m.check_allocations(&out, now)?;
                    // An allocation never takes a role past its limit. (An agent coming back
                    // with reservations may; then nothing more is allocated to it.)
                    for ((role, cpus), was) in m.limits.iter().zip(before) {
                        let now_consumed = m.consumed(role);
                        prop_assert!(
                            now_consumed <= f64::from(*cpus).max(was) + 1e-9,
                            "role {role} went from {was} to {now_consumed} cpus, limit {cpus}"
                        );
                    }
                }
                Op::Recover(k, filter) => {
                    if !m.outstanding.is_empty() {
                        let al = m.outstanding.remove(k % m.outstanding.len());
                        let until = filter.map(|s| now + Duration::from_secs(u64::from(s)));
                        m.a.recover(&al.agent, &al.framework, &al.role, &al.resources, until);
                        if let Some(u) = until {
                            m.filters.push((al.framework, al.agent, al.resources, u));
                        }
                    }
                }
                Op::Advance(s) => now += Duration::from_secs(u64::from(s)),
                Op::Suppress(f, r) => {
                    let f = f % fws.len();
                    let role = ROLES[c.frameworks[f][r % c.frameworks[f].len()]].to_owned();
                    m.a.suppress(&fws[f], std::slice::from_ref(&role));
                    m.suppressed.push((fws[f].clone(), role));
                }
                Op::Revive(f) => {
                    let f = f % fws.len();
                    m.a.revive(&fws[f], &[]);
                    m.suppressed.retain(|(g, _)| *g != fws[f]);
                    m.filters.retain(|(g, ..)| *g != fws[f]);
                }
                Op::Toggle(i) => {
                    // Deactivating an agent takes its offers back (the master rescinds them).
                    let i = i % m.totals.len();
                    let id = aid(&format!("s{i}"));
                    m.active[i] = !m.active[i];
                    if !m.active[i] {
                        let (gone, kept): (Vec<_>, Vec<_>) =
                            m.outstanding.drain(..).partition(|x| x.agent == id);
                        m.outstanding = kept;
                        for al in gone {
                            m.a.recover(&al.agent, &al.framework, &al.role, &al.resources, None);
                        }
                    }
                    m.a.set_agent_active(&id, m.active[i]);
                }
            }
        }
    }

    #[test]
    fn satisfiable_guarantees_are_met_after_one_cycle(
        agents in prop::collection::vec((1..8u32, 1..8u32), 1..8),
        wants in prop::collection::vec(0..4u32, 3),
        greedy_first in any::<bool>(),
    ) {
        let mut a = drf();
        let mut total_cpus = 0;
        for (i, (cpus, gb)) in agents.iter().enumerate() {
            a.add_agent(&aid(&format!("s{i}")), &res(&format!("cpus:{cpus};mem:{}", gb * 1024)), &[]);
            total_cpus += cpus;
        }
        if greedy_first {
            a.add_framework(&fid("greedy"), &["*".into()]);
        }
        let roles = ["q0", "q1", "q2"];
        let mut guaranteed = Vec::new();
        let mut left = total_cpus;
        for (role, want) in roles.iter().zip(&wants) {
            if *want == 0 || *want > left {
                continue;
            }
            left -= want;
            a.set_quota(role, Quota { guarantee: res(&format!("cpus:{want}")), limit: None }, false).unwrap();
            a.add_framework(&fid(&format!("fw-{role}")), &[(*role).to_owned()]);
            guaranteed.push((*role, *want));
        }
        if !greedy_first {
            a.add_framework(&fid("greedy"), &["*".into()]);
        }
        a.allocate(Instant::now(), Cycle::Full);
        for status in a.roles() {
            if let Some((_, want)) = guaranteed.iter().find(|(r, _)| *r == status.role) {
                prop_assert!(
                    status.allocated.cpus() >= f64::from(*want),
                    "{} got {} of its guaranteed {want}", status.role, status.allocated
                );
            }
        }
    }

    #[test]
    fn equal_frameworks_end_within_one_agent_of_each_other(
        agents in prop::collection::vec((1..8u32, 1..8u32), 1..30),
        n in 2..6usize,
    ) {
        let mut a = drf();
        let mut total = Resources::new();
        let mut biggest = 0.0f64;
        let texts: Vec<Resources> = agents
            .iter()
            .map(|(c, g)| res(&format!("cpus:{c};mem:{}", g * 1024)))
            .collect();
        for (i, t) in texts.iter().enumerate() {
            a.add_agent(&aid(&format!("s{i}")), t, &[]);
            total += t;
        }
        for t in &texts {
            biggest = biggest.max(dominant_share(t, &total));
        }
        for i in 0..n {
            a.add_framework(&fid(&format!("f{i}")), &["*".into()]);
        }
        let got = by_framework(&a.allocate(Instant::now(), Cycle::Full));
        let shares: Vec<f64> = (0..n)
            .map(|i| got.get(&format!("f{i}")).map_or(0.0, |r| dominant_share(r, &total)))
            .collect();
        let (lo, hi) = shares.iter().fold((f64::MAX, 0.0f64), |(l, h), s| (l.min(*s), h.max(*s)));
        prop_assert!(hi - lo <= biggest + 1e-9, "shares {shares:?}, one agent is at most {biggest}");
    }
}
