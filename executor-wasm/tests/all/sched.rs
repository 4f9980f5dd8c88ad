//! Many tasks at once: the instance pool, CPU shares, and a hostile task among healthy ones.

use std::time::{Duration, Instant};

use agora_examples::{Target, task_bytes};
use agora_executor_wasm::{CancellationToken, Outcome, WasmConfig, WasmRuntime};

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_instances_run_and_extra_tasks_wait_for_a_slot() {
    let rt = WasmRuntime::new(WasmConfig {
        pool_instances: Some(3),
        ..WasmConfig::default()
    })
    .unwrap();
    assert!(rt.pooled(), "this host can reserve a small pool");
    for target in [Target::P1, Target::P2] {
        let hello = load(&rt, task_bytes("hello", target)).await;
        let mut joins = Vec::new();
        for i in 0..8 {
            let (rt, hello) = (rt.clone(), hello.clone());
            joins.push(tokio::spawn(async move {
                let sb = Sandbox::new();
                let r = rt
                    .run(
                        &hello,
                        sb.spec(&["hello", &i.to_string()]),
                        CancellationToken::new(),
                    )
                    .await;
                (r.outcome, sb.stdout())
            }));
        }
        for (i, j) in joins.into_iter().enumerate() {
            let (outcome, out) = j.await.unwrap();
            assert_eq!(outcome, Outcome::Exited(0), "{target:?}");
            assert_eq!(out, format!("Hello, {i}!\n"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_gets_its_cpu_share_and_no_more() {
    let rt = runtime();
    let spin = load(&rt, task_bytes("spin", Target::P1)).await;
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["spin"]);
    spec.cpus = Some(0.25);
    spec.wall_limit = Some(Duration::from_secs(2));
    let report = run(&rt, &spin, spec).await;
    assert!(
        matches!(report.outcome, Outcome::WallTimeout { .. }),
        "{}",
        report.outcome
    );
    let capped = report.usage.cpu.as_secs_f64() / report.usage.wall.as_secs_f64();
    // The cap is a ceiling; a busy machine (other tests run beside this one) may give less.
    assert!(
        (0.1..=0.29).contains(&capped),
        "used {capped:.3} of a core with cpus 0.25"
    );

    // A whole core is not throttled.
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["spin"]);
    spec.cpus = Some(1.0);
    spec.wall_limit = Some(Duration::from_millis(500));
    let report = run(&rt, &spin, spec).await;
    let whole = report.usage.cpu.as_secs_f64() / report.usage.wall.as_secs_f64();
    assert!(
        whole > 0.45 && whole > capped + 0.15,
        "used {whole:.3} of a core with cpus 1 (and {capped:.3} with 0.25)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_among_a_hundred_healthy_tasks_does_not_hold_them_up() {
    let rt = runtime();
    let spin = load(&rt, task_bytes("spin", Target::P1)).await;
    let hello = load(&rt, task_bytes("hello", Target::P1)).await;
    let kill = CancellationToken::new();
    let sb = Sandbox::new();
    let spinner = {
        let (rt, kill, spec) = (rt.clone(), kill.clone(), sb.spec(&["spin"]));
        tokio::spawn(async move { rt.run(&spin, spec, kill).await })
    };
    // The hundred start only once the loop spins.
    sb.wait_stdout("spinning\n").await;
    let t = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..100 {
        let (rt, hello) = (rt.clone(), hello.clone());
        joins.push(tokio::spawn(async move {
            let sb = Sandbox::new();
            let started = Instant::now();
            let r = rt
                .run(&hello, sb.spec(&["hello"]), CancellationToken::new())
                .await;
            (r.outcome, started.elapsed())
        }));
    }
    let mut slowest = Duration::ZERO;
    for j in joins {
        let (outcome, took) = j.await.unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        slowest = slowest.max(took);
    }
    let all = t.elapsed();
    assert!(
        all < Duration::from_secs(5),
        "100 tasks took {all:?} beside a spinner"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "the slowest took {slowest:?}"
    );
    assert!(!spinner.is_finished(), "the spinner is still spinning");
    kill.cancel();
    assert_eq!(spinner.await.unwrap().outcome, Outcome::Killed);
}

#[tokio::test]
async fn tables_cannot_grow_past_their_limit() {
    let rt = runtime();
    let text = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (table 1 funcref)
        (func (export "_start")
            (if (i32.eq (table.grow (ref.null func) (i32.const 500000)) (i32.const -1))
                (then (call $exit (i32.const 3))))
            (call $exit (i32.const 0))))"#;
    let program = load(&rt, wat(text)).await;
    let sb = Sandbox::new();
    let report = run(&rt, &program, sb.spec(&["tables"])).await;
    assert_eq!(
        report.outcome,
        Outcome::Exited(3),
        "the growth was refused: {}",
        sb.stderr()
    );
}
