//! Deciding who is offered what: a pure allocator behind the [`Allocator`] trait.
//!
//! [`Drf`] is single-level dominant resource fairness (Ghodsi et al., NSDI 2011): each agent's
//! free resources go, whole, to the framework with the lowest dominant share — the largest
//! fraction it holds of any one resource of the cluster — that wants them (not suppressed, not
//! refusing them by a filter). The allocator has no clock and no I/O: the master passes it a
//! snapshot of the cluster and a seed, and gets back a list of allocations to turn into offers.

use agora_core::{AgentId, FrameworkId, Resources};

/// One agent as the allocator sees it.
#[derive(Debug, Clone)]
pub struct AgentSlot {
    pub id: AgentId,
    /// Resources neither used by tasks nor in outstanding offers.
    pub available: Resources,
}

/// One framework as the allocator sees it.
#[derive(Debug, Clone)]
pub struct FrameworkSlot {
    pub id: FrameworkId,
    /// The role its offers are allocated to.
    pub role: String,
    /// What it holds now: its tasks' resources plus its outstanding offers.
    pub allocated: Resources,
    /// Resources it refused (declined, or left over from an accept) on an agent, until the
    /// filter expires; it is not offered a subset of them on that agent.
    pub refused: Vec<(AgentId, Resources)>,
}

/// The cluster at the start of an allocation cycle.
#[derive(Debug, Clone, Default)]
pub struct AllocationInput {
    /// Everything the active agents have, for computing shares.
    pub total: Resources,
    pub agents: Vec<AgentSlot>,
    pub frameworks: Vec<FrameworkSlot>,
    /// The smallest amounts worth offering: an agent's free resources are offered only if
    /// they hold at least one of these scalars.
    pub min_allocatable: Resources,
    /// Randomises the order agents are visited in, so no agent is always first.
    pub seed: u64,
}

/// An allocation decision: offer `resources` of `agent` to `framework`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub framework: FrameworkId,
    pub agent: AgentId,
    pub role: String,
    pub resources: Resources,
}

/// An allocation policy.
pub trait Allocator: Send {
    fn allocate(&mut self, input: &AllocationInput) -> Vec<Allocation>;
}

/// The scalar resources that count towards a dominant share.
const SHARED_SCALARS: [&str; 4] = ["cpus", "mem", "disk", "gpus"];

/// The largest fraction of the cluster's `total` of any one resource that `held` has.
pub fn dominant_share(held: &Resources, total: &Resources) -> f64 {
    SHARED_SCALARS
        .iter()
        .filter_map(|name| {
            let t = total.scalar(name).milli();
            (t > 0).then(|| held.scalar(name).milli() as f64 / t as f64)
        })
        .fold(0.0, f64::max)
}

/// True when `r` has at least one of `min`'s scalars in the amount given (or `min` is empty).
pub fn is_allocatable(r: &Resources, min: &Resources) -> bool {
    if r.is_empty() {
        return false;
    }
    let names = min.scalar_names();
    names.is_empty()
        || names
            .iter()
            .any(|n| !r.scalar(n).is_zero() && r.scalar(n) >= min.scalar(n))
}

/// Single-level dominant resource fairness.
#[derive(Debug, Default)]
pub struct Drf;

fn shuffle<T>(items: &mut [T], seed: u64) {
    // xorshift64*: deterministic for a seed, which is all the order needs.
    let mut state = seed | 1;
    for i in (1..items.len()).rev() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

impl Allocator for Drf {
    fn allocate(&mut self, input: &AllocationInput) -> Vec<Allocation> {
        let mut agents: Vec<&AgentSlot> = input.agents.iter().collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        shuffle(&mut agents, input.seed);

        let mut held: Vec<Resources> = input
            .frameworks
            .iter()
            .map(|f| f.allocated.clone())
            .collect();
        let mut shares: Vec<f64> = held
            .iter()
            .map(|h| dominant_share(h, &input.total))
            .collect();
        let mut order: Vec<usize> = (0..input.frameworks.len()).collect();

        let mut out = Vec::new();
        for agent in agents {
            if !is_allocatable(&agent.available, &input.min_allocatable) {
                continue;
            }
            order.sort_by(|&a, &b| {
                shares[a]
                    .total_cmp(&shares[b])
                    .then_with(|| input.frameworks[a].id.cmp(&input.frameworks[b].id))
            });
            for &i in &order {
                let fw = &input.frameworks[i];
                let offer = agent.available.allocatable_to(&fw.role);
                if !is_allocatable(&offer, &input.min_allocatable) {
                    continue;
                }
                let refused = fw
                    .refused
                    .iter()
                    .any(|(a, r)| *a == agent.id && r.contains(&offer));
                if refused {
                    continue;
                }
                held[i] += &offer;
                shares[i] = dominant_share(&held[i], &input.total);
                out.push(Allocation {
                    framework: fw.id.clone(),
                    agent: agent.id.clone(),
                    role: fw.role.clone(),
                    resources: offer,
                });
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_core::parse_resources;

    fn res(s: &str) -> Resources {
        parse_resources(s).unwrap()
    }

    fn fw(id: &str, allocated: &str) -> FrameworkSlot {
        FrameworkSlot {
            id: FrameworkId::new(id).unwrap(),
            role: "*".into(),
            allocated: res(allocated),
            refused: Vec::new(),
        }
    }

    fn agent(id: &str, available: &str) -> AgentSlot {
        AgentSlot {
            id: AgentId::new(id).unwrap(),
            available: res(available),
        }
    }

    #[test]
    fn shares_follow_the_dominant_resource() {
        let total = res("cpus:9;mem:18432");
        // The DRF paper's users: A's tasks are memory-heavy, B's CPU-heavy.
        assert!((dominant_share(&res("cpus:3;mem:12288"), &total) - 2.0 / 3.0).abs() < 1e-9);
        assert!((dominant_share(&res("cpus:6;mem:2048"), &total) - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(dominant_share(&Resources::new(), &total), 0.0);
    }

    #[test]
    fn the_poorest_framework_is_offered_first() {
        let input = AllocationInput {
            total: res("cpus:8;mem:8192"),
            agents: vec![agent("a1", "cpus:4;mem:4096")],
            frameworks: vec![fw("rich", "cpus:4;mem:1024"), fw("poor", "cpus:1;mem:512")],
            min_allocatable: res("cpus:0.01;mem:32"),
            seed: 7,
        };
        let out = Drf.allocate(&input);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].framework.as_str(), "poor");
        assert_eq!(out[0].resources, res("cpus:4;mem:4096"));
    }

    #[test]
    fn each_agent_goes_to_the_framework_then_poorest() {
        let input = AllocationInput {
            total: res("cpus:4;mem:4096"),
            agents: vec![
                agent("a1", "cpus:2;mem:2048"),
                agent("a2", "cpus:2;mem:2048"),
            ],
            frameworks: vec![fw("f1", ""), fw("f2", "")],
            min_allocatable: Resources::new(),
            seed: 1,
        };
        let out = Drf.allocate(&input);
        let mut got: Vec<&str> = out.iter().map(|a| a.framework.as_str()).collect();
        got.sort_unstable();
        assert_eq!(got, ["f1", "f2"], "one agent each: {out:?}");
    }

    #[test]
    fn refused_resources_are_skipped_but_new_ones_are_not() {
        let mut f1 = fw("f1", "");
        f1.refused
            .push((AgentId::new("a1").unwrap(), res("cpus:2;mem:2048")));
        let input = AllocationInput {
            total: res("cpus:4;mem:4096"),
            agents: vec![agent("a1", "cpus:2;mem:2048")],
            frameworks: vec![f1.clone(), fw("f2", "cpus:1")],
            min_allocatable: Resources::new(),
            seed: 1,
        };
        let out = Drf.allocate(&input);
        assert_eq!(out[0].framework.as_str(), "f2");
        // More than was refused is offered again.
        let mut bigger = input;
        bigger.agents = vec![agent("a1", "cpus:3;mem:3072")];
        bigger.frameworks = vec![f1];
        assert_eq!(Drf.allocate(&bigger)[0].framework.as_str(), "f1");
    }

    #[test]
    fn crumbs_and_other_roles_reservations_are_not_offered() {
        let input = AllocationInput {
            total: res("cpus:4;mem:4096"),
            agents: vec![
                agent("a1", "cpus:0.001;mem:1"),
                agent("a2", "cpus(eng):2;mem(eng):1024"),
            ],
            frameworks: vec![fw("f1", "")],
            min_allocatable: res("cpus:0.01;mem:32"),
            seed: 3,
        };
        assert!(Drf.allocate(&input).is_empty());
    }

    #[test]
    fn drf_paper_example_converges_to_three_and_two_tasks() {
        // 9 CPUs, 18 GB; A's tasks need <1 CPU, 4 GB>, B's <3 CPU, 1 GB>. Offer one task's
        // worth at a time to whoever DRF picks until nothing fits.
        let total = res("cpus:9;mem:18432");
        let demand = [res("cpus:1;mem:4096"), res("cpus:3;mem:1024")];
        let mut held = [Resources::new(), Resources::new()];
        let mut free = total.clone();
        let mut tasks = [0, 0];
        loop {
            let mut order = [0usize, 1];
            order.sort_by(|&a, &b| {
                dominant_share(&held[a], &total).total_cmp(&dominant_share(&held[b], &total))
            });
            let Some(&i) = order.iter().find(|&&i| free.contains(&demand[i])) else {
                break;
            };
            free = free.checked_sub(&demand[i]).unwrap();
            held[i] += &demand[i];
            tasks[i] += 1;
        }
        assert_eq!(tasks, [3, 2]);
    }
}
