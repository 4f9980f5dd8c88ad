//! Allocation cycles of the hierarchical DRF allocator, alone (no master, no I/O).
//!
//! ```text
//! cargo bench -p agora-master --bench allocator
//! ```
//!
//! Shape: every agent has `cpus:16;mem:65536;disk:1000000;ports:[31000-32000]`, and every
//! second agent also `cpus(R):4;mem(R):8192` reserved for one leaf role R. Frameworks are
//! spread over a two-level role tree (10 top-level roles × 10 children), one role each; two
//! top-level roles have a quota guarantee and one a limit.
//!
//! * full: a cycle over the whole cluster with everything free (a master that just started,
//!   or the periodic cycle after a large change);
//! * incremental: after a steady state, one task ends (its resources come back on one agent)
//!   and a cycle runs.
//!
//! The baseline, in the same run, is the cost of the cycle's unavoidable work: reading every
//! agent's free resources once (`total − allocated`, one clone and subtraction of its
//! resource map per agent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use agora_core::{AgentId, FrameworkId, Resources, parse_resources};
use agora_master::allocator::{Allocation, Allocator, Cycle, HierarchicalDrf, Quota};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};

fn leaf(i: usize) -> String {
    format!("r{}/c{}", i % 10, (i / 10) % 10)
}

fn cluster(agents: usize, frameworks: usize) -> HierarchicalDrf {
    let mut a = HierarchicalDrf::new(parse_resources("cpus:0.01;mem:32").unwrap());
    for i in 0..frameworks {
        a.add_framework(&FrameworkId::new(format!("f{i}")).unwrap(), &[leaf(i)]);
    }
    let plain = parse_resources("cpus:16;mem:65536;disk:1000000;ports:[31000-32000]").unwrap();
    for i in 0..agents {
        let total = if i % 2 == 0 {
            let role = leaf(i / 2);
            plain.clone() + parse_resources(&format!("cpus({role}):4;mem({role}):8192")).unwrap()
        } else {
            plain.clone()
        };
        a.add_agent(&AgentId::new(format!("a{i}")).unwrap(), &total, &[]);
    }
    let cpus = (agents as f64 * 16.0 * 0.05).floor();
    for (role, q) in [
        (
            "r0",
            Quota {
                guarantee: parse_resources(&format!("cpus:{cpus}")).unwrap(),
                limit: None,
            },
        ),
        (
            "r1",
            Quota {
                guarantee: parse_resources(&format!("cpus:{cpus}")).unwrap(),
                limit: None,
            },
        ),
        (
            "r2",
            Quota {
                guarantee: Resources::new(),
                limit: Some(parse_resources(&format!("cpus:{}", cpus * 2.0)).unwrap()),
            },
        ),
    ] {
        a.set_quota(role, q, false).unwrap();
    }
    a
}

fn free_resources_baseline(agents: usize) -> Vec<(Resources, Resources)> {
    let plain = parse_resources("cpus:16;mem:65536;disk:1000000;ports:[31000-32000]").unwrap();
    (0..agents)
        .map(|i| {
            let total = if i % 2 == 0 {
                let role = leaf(i / 2);
                plain.clone()
                    + parse_resources(&format!("cpus({role}):4;mem({role}):8192")).unwrap()
            } else {
                plain.clone()
            };
            (total, parse_resources("cpus:1;mem:1024").unwrap())
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocation cycle");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for (agents, frameworks) in [(1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 1_000)] {
        let shape = format!("{agents} agents x {frameworks} frameworks");

        let books = free_resources_baseline(agents);
        g.bench_with_input(
            BenchmarkId::new("baseline: read free resources", &shape),
            &books,
            |b, books| {
                b.iter(|| {
                    for (total, allocated) in books {
                        black_box(total.saturating_sub(allocated));
                    }
                });
            },
        );

        g.bench_function(BenchmarkId::new("full", &shape), |b| {
            b.iter_batched(
                || cluster(agents, frameworks),
                |mut a| {
                    let out = a.allocate(Instant::now(), Cycle::Full);
                    assert!(out.len() >= agents);
                    black_box(out)
                },
                BatchSize::LargeInput,
            );
        });

        // Steady state: everything offered; then, over and over, one allocation comes back
        // (a task ended) and an incremental cycle re-offers it.
        let mut a = cluster(agents, frameworks);
        let out = a.allocate(Instant::now(), Cycle::Full);
        let mut last: Vec<Allocation> = out.into_iter().step_by(97).take(64).collect();
        let mut k = 0usize;
        g.bench_function(
            BenchmarkId::new("incremental after one task ends", &shape),
            |b| {
                b.iter(|| {
                    let back = last[k % last.len()].clone();
                    let ended = parse_resources("cpus:1;mem:1024").unwrap();
                    let part = if back.resources.contains(&ended) {
                        ended
                    } else {
                        back.resources.clone()
                    };
                    a.recover(&back.agent, &back.framework, &back.role, &part, None);
                    let out = a.allocate(Instant::now(), Cycle::Incremental);
                    if let Some(first) = out.into_iter().next() {
                        let n = last.len();
                        last[k % n] = first;
                    }
                    k += 1;
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
