//! Fuel metering's cost: the CPU-bound `primes` example run by the Wasm runtime with fuel
//! metered (as agents run every task) and by the same runtime with fuel off, in this process,
//! beside bare wasmtime (default engine: no fuel, no epochs).
//!
//! ```text
//! cargo bench -p agora-executor-wasm --bench fuel              # primes below 300,000, 9 runs
//! cargo bench -p agora-executor-wasm --bench fuel -- --n 1000000 --runs 5
//! ```
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_examples::{Target, task_bytes};
use agora_executor_wasm::{
    CancellationToken, ModuleSource, Outcome, RunSpec, WasmConfig, WasmRuntime,
};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let (mut n, mut runs) = (300_000u64, 9usize);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--n" => n = it.next().and_then(|v| v.parse().ok()).expect("--n N"),
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            _ => {}
        }
    }
    let primes = task_bytes("primes", Target::P1);
    println!("# fuel overhead: primes below {n}, median of {runs} runs");
    println!(
        "# machine: {} cores",
        std::thread::available_parallelism().map_or(0, |c| c.get())
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for (label, fuel) in [("fuel metered", true), ("fuel off", false)] {
        let runtime = WasmRuntime::new(WasmConfig {
            fuel,
            ..WasmConfig::default()
        })
        .unwrap();
        let samples: Vec<Duration> = rt.block_on(async {
            let program = runtime
                .load(ModuleSource::Bytes(Arc::from(primes.as_slice())), None)
                .await
                .unwrap();
            let mut v = Vec::new();
            for i in 0..=runs {
                let spec = RunSpec {
                    args: vec!["primes".into(), n.to_string()],
                    sandbox: dir.path().to_owned(),
                    stdout: dir.path().join(format!("out-{label}")),
                    stderr: dir.path().join("err"),
                    memory_limit: 64 << 20,
                    ..RunSpec::default()
                };
                let t = Instant::now();
                let r = runtime.run(&program, spec, CancellationToken::new()).await;
                assert_eq!(r.outcome, Outcome::Exited(0));
                // The first run warms caches and is not counted.
                if i > 0 {
                    v.push(t.elapsed());
                }
            }
            v
        });
        let m = median(samples);
        println!(
            "agora runtime, {label}: median {:.2} ms",
            m.as_secs_f64() * 1e3
        );
        results.push(m);
    }
    let bare = {
        use wasmtime::{Engine, Linker, Module, Store};
        let engine = Engine::default();
        let module = Module::new(&engine, &primes).unwrap();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |c| c).unwrap();
        let pre = linker.instantiate_pre(&module).unwrap();
        let mut v = Vec::new();
        for i in 0..=runs {
            let out = std::fs::File::create(dir.path().join("bare-out")).unwrap();
            let wasi = wasmtime_wasi::WasiCtxBuilder::new()
                .args(&["primes", &n.to_string()])
                .stdout(wasmtime_wasi::cli::OutputFile::new(out))
                .build_p1();
            let mut store = Store::new(&engine, wasi);
            let t = Instant::now();
            let instance = pre.instantiate(&mut store).unwrap();
            instance
                .get_typed_func::<(), ()>(&mut store, "_start")
                .unwrap()
                .call(&mut store, ())
                .unwrap();
            if i > 0 {
                v.push(t.elapsed());
            }
        }
        median(v)
    };
    println!(
        "bare wasmtime (no fuel, no epochs): median {:.2} ms",
        bare.as_secs_f64() * 1e3
    );
    println!(
        "ratios: fuel metered / fuel off = {:.3}×; fuel metered / bare = {:.3}×",
        results[0].as_secs_f64() / results[1].as_secs_f64(),
        results[0].as_secs_f64() / bare.as_secs_f64()
    );
}
