//! Programs that misbehave: each must end with the right reason and leave the host unharmed.

use std::time::{Duration, Instant};

use agora_examples::{Target, task_bytes};
use agora_executor_wasm::{CancellationToken, LoadError, Outcome};

use crate::{Sandbox, load, run, runtime, wat};

#[tokio::test]
async fn infinite_loop_exhausts_its_cpu_budget() {
    let rt = runtime();
    for target in [Target::P1, Target::P2] {
        let program = load(&rt, task_bytes("spin", target)).await;
        let sb = Sandbox::new();
        let mut spec = sb.spec(&["spin"]);
        spec.cpu_budget = Some(Duration::from_millis(200));
        let t = Instant::now();
        let report = run(&rt, &program, spec).await;
        assert_eq!(
            report.outcome,
            Outcome::CpuBudget {
                budget: Duration::from_millis(200)
            }
        );
        assert!(
            report.usage.cpu >= Duration::from_millis(200),
            "{:?}",
            report.usage
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(sb.stdout(), "spinning\n");
    }
}

#[tokio::test]
async fn infinite_loop_exhausts_its_fuel() {
    let rt = runtime();
    let program = load(&rt, task_bytes("spin", Target::P1)).await;
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["spin"]);
    spec.fuel = Some(50_000_000);
    let report = run(&rt, &program, spec).await;
    assert_eq!(report.outcome, Outcome::OutOfFuel { fuel: 50_000_000 });
    assert_eq!(report.usage.fuel_used, 50_000_000);
}

#[tokio::test]
async fn infinite_loop_hits_the_wall_clock_limit() {
    let rt = runtime();
    let program = load(&rt, task_bytes("spin", Target::P1)).await;
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["spin"]);
    spec.wall_limit = Some(Duration::from_millis(150));
    let report = run(&rt, &program, spec).await;
    assert_eq!(
        report.outcome,
        Outcome::WallTimeout {
            limit: Duration::from_millis(150)
        }
    );
}

#[tokio::test]
async fn a_running_task_can_be_killed() {
    let rt = runtime();
    let program = load(&rt, task_bytes("spin", Target::P2)).await;
    let sb = Sandbox::new();
    let cancel = CancellationToken::new();
    let run = {
        let (rt, program, spec, cancel) = (
            rt.clone(),
            program.clone(),
            sb.spec(&["spin"]),
            cancel.clone(),
        );
        tokio::spawn(async move { rt.run(&program, spec, cancel).await })
    };
    // Kill it while it runs, not before it starts.
    sb.wait_stdout("spinning\n").await;
    let t = Instant::now();
    cancel.cancel();
    let report = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.outcome, Outcome::Killed);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_task_does_not_starve_others() {
    // One thread only: the spinner and the greeter must take turns.
    let rt = runtime();
    let spin = load(&rt, task_bytes("spin", Target::P1)).await;
    let hello = load(&rt, task_bytes("hello", Target::P1)).await;
    let sb_spin = Sandbox::new();
    let cancel = CancellationToken::new();
    let spinner = {
        let (rt, spec, cancel) = (rt.clone(), sb_spin.spec(&["spin"]), cancel.clone());
        tokio::spawn(async move { rt.run(&spin, spec, cancel).await })
    };
    tokio::task::yield_now().await;
    let sb = Sandbox::new();
    let t = Instant::now();
    let report = run(&rt, &hello, sb.spec(&["hello"])).await;
    let took = t.elapsed();
    cancel.cancel();
    assert_eq!(report.outcome, Outcome::Exited(0));
    assert!(
        took < Duration::from_millis(500),
        "hello took {took:?} beside a spinner"
    );
    assert_eq!(spinner.await.unwrap().outcome, Outcome::Killed);
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_ceiling() {
    let rt = runtime();
    for target in [Target::P1, Target::P2] {
        let program = load(&rt, task_bytes("membomb", target)).await;
        let sb = Sandbox::new();
        let mut spec = sb.spec(&["membomb"]);
        spec.memory_limit = 32 << 20;
        let report = run(&rt, &program, spec).await;
        match &report.outcome {
            Outcome::MemoryLimit {
                limit, requested, ..
            } => {
                assert_eq!(*limit, 32 << 20);
                assert!(*requested > 32 << 20);
            }
            other => panic!("{target:?}: expected a memory limit, got {other}"),
        }
        assert!(report.usage.mem_peak_bytes <= 32 << 20);
        assert!(
            report
                .outcome
                .to_string()
                .starts_with("memory limit exceeded")
        );
        assert!(sb.stdout().contains("holding 16 MiB"), "{}", sb.stdout());
    }
}

#[tokio::test]
async fn the_ceiling_is_on_the_sum_of_memories() {
    // Two memories of 1 page; each may grow by 24 pages (1.5 MiB) alone, not both (limit 2 MiB).
    let module = wat(r#"
        (module
          (memory $a 1) (memory $b 1)
          (func (export "_start")
            (if (i32.eq (memory.grow $a (i32.const 24)) (i32.const -1)) (then unreachable))
            (if (i32.eq (memory.grow $b (i32.const 24)) (i32.const -1)) (then unreachable))))
    "#);
    let rt = runtime();
    let program = load(&rt, module).await;
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["two-memories"]);
    spec.memory_limit = 2 << 20;
    let report = run(&rt, &program, spec).await;
    assert!(
        matches!(report.outcome, Outcome::MemoryLimit { requested, .. } if requested == (2 + 2 * 24) * 65536),
        "{}",
        report.outcome
    );
}

#[tokio::test]
async fn too_much_initial_memory_is_refused() {
    let rt = runtime();
    let program = load(
        &rt,
        wat(r#"(module (memory 2048) (func (export "_start")))"#),
    )
    .await;
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["big"]);
    spec.memory_limit = 64 << 20;
    let report = run(&rt, &program, spec).await;
    assert_eq!(
        report.outcome,
        Outcome::InitialMemoryTooLarge {
            limit: 64 << 20,
            required: 128 << 20
        }
    );
    assert_eq!(
        report.outcome.to_string(),
        "module needs at least 128.0 MiB of initial linear memory, more than the task's mem of 64.0 MiB"
    );
}

#[tokio::test]
async fn traps_end_the_task_with_the_trap_message() {
    let rt = runtime();
    let cases = [
        (
            r#"(module (func (export "_start") unreachable))"#,
            "unreachable",
        ),
        (
            r#"(module (func $f (export "_start") (call $f)))"#,
            "call stack exhausted",
        ),
        (
            r#"(module (memory 1) (func (export "_start") (drop (i32.load (i32.const 70000)))))"#,
            "out of bounds memory access",
        ),
    ];
    for (text, expected) in cases {
        let program = load(&rt, wat(text)).await;
        let sb = Sandbox::new();
        let report = run(&rt, &program, sb.spec(&["trap"])).await;
        match &report.outcome {
            Outcome::Trap(msg) => assert!(msg.contains(expected), "{msg}"),
            other => panic!("expected a trap with {expected:?}, got {other}"),
        }
    }
    // The runtime is unharmed: a good program still runs.
    let hello = load(&rt, task_bytes("hello", Target::P1)).await;
    let sb = Sandbox::new();
    assert_eq!(
        run(&rt, &hello, sb.spec(&["hello"])).await.outcome,
        Outcome::Exited(0)
    );
}

#[tokio::test]
async fn bad_programs_are_refused_at_load() {
    let rt = runtime();
    let load_err = |bytes: Vec<u8>| {
        let rt = rt.clone();
        async move {
            rt.load(agora_executor_wasm::ModuleSource::Bytes(bytes.into()), None)
                .await
                .unwrap_err()
        }
    };
    let e = load_err(b"#!/bin/sh\necho not wasm\n".to_vec()).await;
    assert!(matches!(e, LoadError::NotWasm(_)), "{e}");

    let mut truncated = task_bytes("hello", Target::P1);
    truncated.truncate(truncated.len() / 2);
    let e = load_err(truncated).await;
    assert!(matches!(e, LoadError::Invalid(_)), "{e}");

    let e = load_err(wat(
        r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
    ))
    .await;
    assert!(
        matches!(&e, LoadError::Link(m) if m.contains("launch_missiles")),
        "{e}"
    );

    let e = load_err(wat(r#"(module (func (export "main")))"#)).await;
    assert!(matches!(e, LoadError::NotACommand(_)), "{e}");
    assert_eq!(rt.cache_stats().entries, 0, "failures are not cached");
}
