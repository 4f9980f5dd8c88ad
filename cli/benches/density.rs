//! Density: how many idle Wasm tasks — each blocked in a WASI sleep (the `sleeper` example)
//! — one agent holds, and the memory it takes, beside bare wasmtime holding as many sleeping
//! instances in a process of its own.
//!
//! ```text
//! cargo bench -p agora-cli --bench density                       # 1,000 and 10,000 tasks
//! cargo bench -p agora-cli --bench density -- --tasks 2000
//! ```
//!
//! The cluster (master, agent, an SDK framework) runs in this process; the tasks run in the
//! framework's Wasm executor, a process the agent starts. Reported: the executor's resident
//! set (where the tasks live), this process's (the agent with the master and the framework
//! beside it, an upper bound for the agent), and bare wasmtime's for the same number of
//! sleeping instances (async, one store each, pooled as the executor's are) in a child
//! process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_agent::AgentConfig;
use agora_core::{TaskId, parse_resources};
use agora_examples::{Target, task_bytes};
use agora_master::MasterConfig;
use agora_sdk::proto as v1;
use agora_sdk::{Event, SchedulerConfig, TaskBuilder, subscribe};
use tokio::net::TcpListener;

const BATCH: usize = 500;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let mut counts = vec![1000usize, 10_000];
    let mut bare_child = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tasks" => {
                counts = it
                    .next()
                    .expect("--tasks N[,M]")
                    .split(',')
                    .map(|n| n.parse().expect("a number of tasks"))
                    .collect();
            }
            "--bare-child" => bare_child = it.next().map(|n| n.parse().expect("a number")),
            _ => {}
        }
    }
    let sleeper = task_bytes("sleeper", Target::P1);
    if let Some(n) = bare_child {
        bare::hold(&sleeper, n);
        return;
    }
    println!(
        "# density benchmark: idle sleeper tasks ({} bytes, wasm32-wasip1)",
        sleeper.len()
    );
    println!(
        "# machine: {} cores, {} MiB",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.to_owned()))
            .and_then(|l| l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok()))
            .map_or(0, |k| k / 1024)
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for n in counts {
        let bare_kib = bare::measure(n);
        println!(
            "bare wasmtime, {n} sleeping instances: RSS {:.1} MiB ({:.1} KiB each)",
            mib(bare_kib),
            bare_kib as f64 / n as f64
        );
        let r = rt.block_on(cluster(&sleeper, n));
        println!(
            "agora, {n} idle tasks: launched in {:.2}s; Wasm executor RSS {:.1} MiB ({:.1} KiB per task); this process (agent + master + framework) {:.1} MiB; total {:.1} MiB; {:.2}× bare",
            r.launch.as_secs_f64(),
            mib(r.executor_kib),
            r.executor_kib as f64 / n as f64,
            mib(r.process_kib),
            mib(r.executor_kib + r.process_kib),
            r.executor_kib as f64 / bare_kib.max(1) as f64
        );
    }
}

struct Density {
    launch: Duration,
    executor_kib: u64,
    process_kib: u64,
}

async fn cluster(sleeper: &[u8], n: usize) -> Density {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let m = tokio::spawn(agora_master::run(
        listener,
        MasterConfig {
            event_buffer: 1 << 16,
            link_buffer: 1 << 16,
            max_completed_tasks: n + 100,
            work_dir: Some(dir.path().join("master")),
            ..MasterConfig::default()
        },
        stopped(stop_rx.clone()),
    ));
    let mut config = AgentConfig::new(master.clone(), dir.path().join("agent"));
    let mem = n * 2 + 512;
    config.resources = Some(parse_resources(&format!("cpus:{};mem:{mem}", n / 100 + 2)).unwrap());
    config.native.cgroup_parent = format!("agora-bench-density-{}", std::process::id());
    config.native.init = Some(vec![
        env!("CARGO_BIN_EXE_agora").into(),
        "__init".into(),
        "--".into(),
    ]);
    config.wasm_executor = Some(vec![
        env!("CARGO_BIN_EXE_agora").into(),
        "__wasm-executor".into(),
    ]);
    config.wasm.pool_instances = Some(n as u32 + 64);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_endpoint = format!("http://{}", listener.local_addr().unwrap());
    let a = tokio::spawn(agora_agent::run(listener, config, stopped(stop_rx.clone())));

    let master_url = master.clone();
    let mut fw = SchedulerConfig::new(master, "density-bench");
    fw.event_buffer = 1 << 16;
    let (s, mut events) = subscribe(fw).await.unwrap();
    // The module goes to the master's blob store once; every task names it by digest and
    // the agent fetches it once.
    let module = dir.path().join("sleeper.wasm");
    std::fs::write(&module, sleeper).unwrap();
    let digest = agora_sdk::blob::upload_file(&master_url, &module, |_, _| {})
        .await
        .unwrap();
    let mut offers: HashMap<String, v1::Offer> = HashMap::new();
    let mut running = 0usize;
    let mut launched = 0usize;
    let t = Instant::now();
    while running < n {
        if launched < n && launched - running < BATCH && !offers.is_empty() {
            let take = BATCH.min(n - launched);
            let offer = offers.values().next().unwrap().clone();
            let ids: Vec<v1::OfferId> = offers.values().filter_map(|o| o.id.clone()).collect();
            offers.clear();
            let tasks = (launched..launched + take)
                .map(|i| {
                    TaskBuilder::wasm_digest(TaskId::new(format!("s{i}")).unwrap(), digest.clone())
                        .resources(parse_resources("cpus:0.01;mem:2").unwrap())
                        .args(["3600"])
                        .build_for(&offer)
                })
                .collect();
            s.accept(&ids, tasks, Some(0.0)).await.unwrap();
            launched += take;
            continue;
        }
        let ev = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .expect("no event for 2 minutes")
            .expect("subscription ended");
        match ev {
            Event::Offers(os) => {
                for o in os {
                    offers.insert(o.id.as_ref().unwrap().value.clone(), o);
                }
            }
            Event::Rescind(id) => {
                offers.remove(id.as_str());
            }
            Event::Update(st) => match st.state() {
                v1::TaskState::TaskRunning => running += 1,
                v1::TaskState::TaskStarting => {}
                other => panic!("a task ended {other:?}: {}", st.message),
            },
            _ => {}
        }
    }
    let launch = t.elapsed();
    // Let every instance reach its sleep and the allocators settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let executor = agora_sdk::agent_containers(&agent_endpoint)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.task_id.is_none())
        .expect("the Wasm executor's container");
    // The executor runs under its PID namespace's init: count the whole tree.
    let executor_kib = rss_kib(executor.pid) + children_rss(executor.pid);
    let process_kib = rss_kib(std::process::id());
    let _ = s.teardown().await;
    let _ = stop_tx.send(true);
    let _ = a.await;
    let _ = m.await;
    Density {
        launch,
        executor_kib,
        process_kib,
    }
}

/// The RSS of `pid`'s descendants (the executor under its namespace's init), summed.
fn children_rss(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let kids =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for k in kids
            .split_whitespace()
            .filter_map(|k| k.parse::<u32>().ok())
        {
            total += rss_kib(k);
            stack.push(k);
        }
    }
    total
}

/// Bare wasmtime holding sleeping instances: the baseline, in a child process so that its
/// memory is its own.
mod bare {
    use std::time::Duration;

    use wasmtime::{Config, Engine, Linker, Module, Store};
    use wasmtime_wasi::WasiCtxBuilder;
    use wasmtime_wasi::p1::WasiP1Ctx;

    /// Runs `--bare-child n` and reads the RSS it reports.
    pub fn measure(n: usize) -> u64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--bare-child", &n.to_string()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("rss-kib "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the bare child said: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }

    /// Holds `n` instances of `wasm` sleeping, prints this process's RSS, exits.
    pub fn hold(wasm: &[u8], n: usize) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // A pool, as the agent's executors use: allocating each instance on demand takes
            // several mappings apiece, and 10,000 of them pass Linux's default
            // vm.max_map_count (65,530) — the process then stalls.
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            let slots = n as u32 + 8;
            pool.total_core_instances(slots)
                .total_memories(slots)
                .total_tables(slots)
                .total_stacks(slots);
            let mut c = Config::new();
            c.max_wasm_stack(1 << 20)
                .async_stack_size(2 << 20)
                .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
            let engine = Engine::new(&c).unwrap();
            let module = Module::new(&engine, wasm).unwrap();
            let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
            wasmtime_wasi::p1::add_to_linker_async(&mut linker, |c| c).unwrap();
            let pre = linker.instantiate_pre(&module).unwrap();
            let mut joins = Vec::with_capacity(n);
            for _ in 0..n {
                let pre = pre.clone();
                joins.push(tokio::spawn(async move {
                    let wasi = WasiCtxBuilder::new().args(&["sleeper", "3600"]).build_p1();
                    let mut store = Store::new(pre.module().engine(), wasi);
                    let instance = pre.instantiate_async(&mut store).await.unwrap();
                    let start = instance
                        .get_typed_func::<(), ()>(&mut store, "_start")
                        .unwrap();
                    let _ = start.call_async(&mut store, ()).await;
                }));
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            println!("rss-kib {}", super::rss_kib(std::process::id()));
            std::process::exit(0);
        });
    }
}
