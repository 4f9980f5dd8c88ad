//! Launch latency and throughput of Wasm tasks through a whole cluster — a master, an agent
//! and an SDK framework talking gRPC over loopback in this process, the task in the
//! framework's Wasm executor process (as `agora agent` runs it) and then in the agent's own
//! process — beside bare wasmtime running the same module in the same process (precompiled,
//! a fresh store per run; and compiled afresh for the cold baseline).
//!
//! ```text
//! cargo bench -p agora-cli --bench launch                      # 1,000 launches, 32 in flight
//! cargo bench -p agora-cli --bench launch -- --launches 200 --throughput-tasks 2000
//! cargo bench -p agora-cli --bench launch -- --native          # /bin/true as a native task
//! cargo bench -p agora-cli --bench launch -- --secure [--rounds 3]   # TLS + auth + ACLs, on and off
//! ```
//!
//! `--secure` runs the Wasm-executor cluster twice, interleaved, in the clear and with TLS
//! everywhere (certificates from `agora cert`), the framework authenticated by its client
//! certificate and an ACL file whose rules allow each action (so every check is evaluated).
//!
//! Latencies are measured at the framework: from just before the ACCEPT call to the arrival
//! of the TASK_RUNNING and TASK_FINISHED updates. The first launch sends the module's bytes
//! and compiles it — and starts the framework's Wasm executor (reported apart as "cold");
//! the others name it by digest, as a framework re-launching a module does. "cold module"
//! is the first sight of another module (`capprobe`) once the executor runs: compile included.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agora_agent::AgentConfig;
use agora_core::{TaskId, parse_resources};
use agora_examples::{Target, task_bytes};
use agora_master::MasterConfig;
use agora_sdk::proto as v1;
use agora_sdk::{Event, Events, Scheduler, SchedulerConfig, TaskBuilder, subscribe};
use tokio::net::TcpListener;

const TASK: &str = "cpus:0.1;mem:32";

struct Args {
    native: bool,
    secure: bool,
    rounds: usize,
    launches: usize,
    throughput_tasks: usize,
    in_flight: usize,
}

fn args() -> Args {
    let mut a = Args {
        native: false,
        secure: false,
        rounds: 3,
        launches: 1000,
        throughput_tasks: 5000,
        in_flight: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--launches" => a.launches = value(),
            "--throughput-tasks" => a.throughput_tasks = value(),
            "--in-flight" => a.in_flight = value(),
            "--native" => a.native = true,
            "--secure" => a.secure = true,
            "--rounds" => a.rounds = value(),
            // cargo bench passes --bench; libtest-style filters are ignored.
            _ => {}
        }
    }
    a
}

fn main() {
    if let Ok(filter) = std::env::var("AGORA_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init();
    }
    let args = args();
    if args.native {
        native(&args);
        return;
    }
    let hello = task_bytes("hello", Target::P1);
    if args.secure {
        secure(&args, &hello);
        return;
    }
    println!(
        "# launch benchmark: hello ({} bytes, wasm32-wasip1)",
        hello.len()
    );
    println!(
        "# machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );

    let bare = bare::Bare::new(&hello);
    let base = bare.latencies(args.launches);
    report("bare wasmtime: instantiate + _start", &base);
    let cold_base = sorted((0..5).map(|_| bare::cold(&hello)).collect());
    println!(
        "bare wasmtime cold (compile + instantiate + _start) hello: p50={:.3}ms",
        ms(pct(&cold_base, 50.0))
    );
    let capprobe = task_bytes("capprobe", Target::P1);
    let cold_other = sorted((0..5).map(|_| bare::cold(&capprobe)).collect());
    println!(
        "bare wasmtime cold (compile + instantiate + _start) capprobe ({} bytes): p50={:.3}ms",
        capprobe.len(),
        ms(pct(&cold_other, 50.0))
    );
    let base_tput = bare.throughput(args.throughput_tasks, 2);
    println!("bare wasmtime throughput (2 threads): {base_tput:.0} runs/s");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (what, in_process) in [
        ("in a Wasm executor", false),
        ("in the agent's process", true),
    ] {
        let r = rt.block_on(cluster(
            Kind::Wasm {
                hello: &hello,
                in_process,
            },
            &args,
        ));
        println!(
            "agora {what}: cold launch (bytes sent, compiled{}): ACCEPT → FINISHED {:.3}ms; ratio to bare cold hello p50 {:.1}×",
            if in_process { "" } else { ", executor started" },
            ms(r.cold),
            r.cold.as_secs_f64() / pct(&cold_base, 50.0).as_secs_f64()
        );
        if let Some(c) = r.cold_module {
            println!(
                "agora {what}: cold module (first sight of capprobe, compiled): ACCEPT → FINISHED {:.3}ms; ratio to bare cold capprobe p50 {:.1}×",
                ms(c),
                c.as_secs_f64() / pct(&cold_other, 50.0).as_secs_f64()
            );
        }
        report(
            &format!("agora {what}: warm ACCEPT → TASK_RUNNING"),
            &r.running,
        );
        report(
            &format!("agora {what}: warm ACCEPT → TASK_FINISHED"),
            &r.finished,
        );
        println!(
            "agora {what}: throughput ({} in flight): {:.0} tasks/s",
            args.in_flight, r.throughput
        );
        println!(
            "agora {what}: ratios: warm FINISHED p50 / bare p50 = {:.1}×; bare throughput / agora throughput = {:.1}×",
            pct(&r.finished, 50.0).as_secs_f64() / pct(&base, 50.0).as_secs_f64(),
            base_tput / r.throughput
        );
    }
}

/// The same cluster in the clear and secured, `--rounds` times each, interleaved (clear first
/// in odd rounds, secured first in even ones): warm latency and throughput, and the
/// secured ÷ clear ratios of each pair.
fn secure(args: &Args, hello: &[u8]) {
    println!("# launch benchmark, secured against in the clear: hello in a Wasm executor");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kind = || Kind::Wasm {
        hello,
        in_process: false,
    };
    for round in 1..=args.rounds {
        // Which goes first alternates: whatever slows the machine over a run (it did, by
        // 2× from the first round to the last) must not count against one side only.
        let (plain, tls) = if round % 2 == 1 {
            let plain = rt.block_on(cluster_with(kind(), args, false));
            (plain, rt.block_on(cluster_with(kind(), args, true)))
        } else {
            let tls = rt.block_on(cluster_with(kind(), args, true));
            (rt.block_on(cluster_with(kind(), args, false)), tls)
        };
        for (what, r) in [("clear", &plain), ("secured", &tls)] {
            report(
                &format!("round {round} {what}: warm ACCEPT → TASK_FINISHED"),
                &r.finished,
            );
            println!(
                "round {round} {what}: throughput ({} in flight): {:.0} tasks/s",
                args.in_flight, r.throughput
            );
        }
        println!(
            "round {round} ratios secured ÷ clear: FINISHED p50 {:.2}×, throughput {:.2}×",
            pct(&tls.finished, 50.0).as_secs_f64() / pct(&plain.finished, 50.0).as_secs_f64(),
            tls.throughput / plain.throughput
        );
    }
}

/// Certificates for a master, an agent and a client in `dir`, made by `agora cert`.
fn certs(dir: &std::path::Path) {
    for args in [
        vec!["init"],
        vec!["issue", "master", "m"],
        vec!["issue", "agent", "a"],
        vec!["issue", "client", "bench"],
    ] {
        let ok = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
            .arg("cert")
            .args(&args)
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "agora cert {args:?}");
    }
}

/// ACLs whose rules allow every action to anyone: each check is made, none refuses.
fn allow_all() -> agora_master::acl::Acls {
    let rules: String = agora_master::acl::Action::ALL
        .iter()
        .map(|a| {
            format!(
                "[[rule]]\naction = \"{}\"\nprincipals = [\"*\"]\nobjects = [\"*\"]\n",
                a.name()
            )
        })
        .collect();
    agora_master::acl::Acls::parse(&rules).unwrap()
}

/// What one cluster run measured.
struct Measured {
    cold: Duration,
    cold_module: Option<Duration>,
    running: Vec<Duration>,
    finished: Vec<Duration>,
    throughput: f64,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, samples: &[Duration]) {
    let mut s = samples.to_vec();
    s.sort();
    println!(
        "{what}: n={} p50={:.3}ms p99={:.3}ms min={:.3}ms",
        s.len(),
        ms(pct(&s, 50.0)),
        ms(pct(&s, 99.0)),
        ms(s[0])
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn sorted(mut v: Vec<Duration>) -> Vec<Duration> {
    v.sort();
    v
}

/// Runs the cluster half: returns the cold launch, the sorted RUNNING and FINISHED latencies
/// of sequential launches, and the throughput with `in_flight` launches outstanding.
/// What the benchmark launches.
#[derive(Clone, Copy)]
enum Kind<'a> {
    /// `hello`, in the framework's Wasm executor or in the agent's process.
    Wasm { hello: &'a [u8], in_process: bool },
    /// `/bin/true` as a native task, with cgroups and namespaces or with no isolation.
    Native { isolated: bool },
}

/// `/bin/true` through the cluster, with full isolation (cgroups; PID, mount, UTS and IPC
/// namespaces) and with none, beside bare fork/exec of it in the same run.
fn native(args: &Args) {
    println!("# native launch benchmark: /bin/true");
    println!(
        "# machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let base = sorted(
        (0..args.launches)
            .map(|_| {
                let t = Instant::now();
                let status = std::process::Command::new("/bin/true").status().unwrap();
                assert!(status.success());
                t.elapsed()
            })
            .collect(),
    );
    report("bare fork/exec /bin/true", &base);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (isolated, what) in [(true, "cgroups + namespaces"), (false, "no isolation")] {
        let r = rt.block_on(cluster(Kind::Native { isolated }, args));
        let (running, finished, tput) = (r.running, r.finished, r.throughput);
        report(
            &format!("agora native ({what}) ACCEPT → TASK_RUNNING"),
            &running,
        );
        report(
            &format!("agora native ({what}) ACCEPT → TASK_FINISHED"),
            &finished,
        );
        println!(
            "agora native ({what}) throughput ({} in flight): {tput:.0} tasks/s",
            args.in_flight
        );
        println!(
            "ratio: FINISHED p50 / bare fork/exec p50 = {:.1}×",
            pct(&finished, 50.0).as_secs_f64() / pct(&base, 50.0).as_secs_f64()
        );
    }
}

async fn cluster(kind: Kind<'_>, args: &Args) -> Measured {
    cluster_with(kind, args, false).await
}

/// [`cluster`], with TLS, authentication and ACLs on when `secure`.
async fn cluster_with(kind: Kind<'_>, args: &Args, secure: bool) -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let master = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let certs_dir = dir.path().join("certs");
    let server = |stem: &str| {
        agora_proto::tls::ServerTls::load(
            &certs_dir.join(format!("{stem}.pem")),
            &certs_dir.join(format!("{stem}.key")),
            &certs_dir.join("ca.pem"),
        )
        .unwrap()
    };
    let mut master_config = MasterConfig::default();
    let mut auth = agora_sdk::masters::Auth::default();
    if secure {
        certs(&certs_dir);
        master_config.tls = Some(server("master-m"));
        master_config.acls = Some(std::sync::Arc::new(allow_all()));
        auth.tls = Some(
            agora_proto::tls::Credentials::load(
                &certs_dir.join("ca.pem"),
                Some(&certs_dir.join("client-bench.pem")),
                Some(&certs_dir.join("client-bench.key")),
            )
            .unwrap(),
        );
    }
    let m = tokio::spawn(agora_master::run(
        listener,
        master_config,
        stopped(stop_rx.clone()),
    ));
    let mut config = AgentConfig::new(master.clone(), dir.path().join("agent"));
    if secure {
        config.tls = Some(server("agent-a"));
    }
    config.resources = Some(parse_resources("cpus:8;mem:16384").unwrap());
    config.native.cgroup_parent = format!("agora-bench-{}", std::process::id());
    config.native.init = Some(vec![
        env!("CARGO_BIN_EXE_agora").into(),
        "__init".into(),
        "--".into(),
    ]);
    if let Kind::Native { isolated: false } = kind {
        config.native.cgroup_root = dir.path().join("no-cgroups");
        config.native.namespaces = false;
    }
    config.wasm_executor = match kind {
        Kind::Wasm {
            in_process: false, ..
        } => Some(vec![
            env!("CARGO_BIN_EXE_agora").into(),
            "__wasm-executor".into(),
        ]),
        _ => None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::spawn(agora_agent::run(listener, config, stopped(stop_rx.clone())));

    let mut fc = SchedulerConfig::new(master, "launch-bench");
    fc.auth = Some(auth);
    let (s, mut events) = subscribe(fc).await.unwrap();
    let mut f = Framework {
        s,
        offers: HashMap::new(),
        digest: String::new(),
        native: matches!(kind, Kind::Native { .. }),
    };

    // Cold: the first launch carries the bytes and compiles (for native tasks, a warm-up).
    let t = Instant::now();
    let first = match kind {
        Kind::Wasm { hello, .. } => {
            f.digest = format!(
                "sha256:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(hello))
            );
            TaskBuilder::wasm(TaskId::new("cold").unwrap(), hello.to_vec())
        }
        Kind::Native { .. } => f.task("cold"),
    };
    f.launch(&mut events, vec![first]).await;
    let (_, cold) = f.wait_done(&mut events, "cold", t).await;

    let mut running = Vec::with_capacity(args.launches);
    let mut finished = Vec::with_capacity(args.launches);
    for i in 0..args.launches {
        let id = format!("seq-{i}");
        let t = Instant::now();
        let task = f.task(&id);
        f.launch(&mut events, vec![task]).await;
        let (r, d) = f.wait_done(&mut events, &id, t).await;
        running.push(r);
        finished.push(d);
    }

    let cold_module = match kind {
        Kind::Wasm { .. } => {
            let other = task_bytes("capprobe", Target::P1);
            let t = Instant::now();
            f.launch(
                &mut events,
                vec![TaskBuilder::wasm(
                    TaskId::new("cold-module").unwrap(),
                    other,
                )],
            )
            .await;
            Some(f.wait_done(&mut events, "cold-module", t).await.1)
        }
        Kind::Native { .. } => None,
    };

    let tput = f
        .throughput(&mut events, args.throughput_tasks, args.in_flight)
        .await;
    let _ = stop_tx.send(true);
    let _ = a.await;
    let _ = m.await;
    Measured {
        cold,
        cold_module,
        running: sorted(running),
        finished: sorted(finished),
        throughput: tput,
    }
}

struct Framework {
    s: Scheduler,
    /// Offers held, by id; all are on the one agent.
    offers: HashMap<String, v1::Offer>,
    digest: String,
    native: bool,
}

impl Framework {
    fn task(&self, id: &str) -> TaskBuilder {
        if self.native {
            let mut t = TaskBuilder::command(TaskId::new(id).unwrap(), "/bin/true").build();
            if let Some(v1::task_info::Payload::Command(c)) = &mut t.payload {
                c.shell = false;
            }
            return TaskBuilder::from_info(t);
        }
        TaskBuilder::wasm_digest(TaskId::new(id).unwrap(), self.digest.clone())
    }

    /// How many tasks of [`TASK`] the held offers hold.
    fn fits(&self) -> usize {
        let held = self
            .offers
            .values()
            .filter_map(|o| agora_sdk::offer_resources(o).ok())
            .fold(agora_core::Resources::new(), |acc, r| acc + r);
        let task = parse_resources(TASK).unwrap();
        let by = |have: f64, need: f64| {
            if need > 0.0 {
                (have / need).floor()
            } else {
                f64::MAX
            }
        };
        by(held.cpus(), task.cpus()).min(by(held.mem(), task.mem())) as usize
    }

    fn hold(&mut self, ev: &Event) {
        match ev {
            Event::Offers(offers) => {
                for o in offers {
                    self.offers
                        .insert(o.id.as_ref().unwrap().value.clone(), o.clone());
                }
            }
            Event::Rescind(id) => {
                self.offers.remove(id.as_str());
            }
            _ => {}
        }
    }

    /// Launches `tasks` on every offer held, waiting for one if none is.
    async fn launch(&mut self, events: &mut Events, tasks: Vec<TaskBuilder>) {
        while self.offers.is_empty() {
            let ev = events.next().await.expect("subscription ended");
            self.hold(&ev);
        }
        let offer = self.offers.values().next().unwrap().clone();
        let ids: Vec<v1::OfferId> = self.offers.values().filter_map(|o| o.id.clone()).collect();
        self.offers.clear();
        let tasks = tasks
            .into_iter()
            .map(|t| {
                t.resources(parse_resources(TASK).unwrap())
                    .args(["bench"])
                    .build_for(&offer)
            })
            .collect();
        self.s.accept(&ids, tasks, Some(0.0)).await.unwrap();
    }

    /// Waits for `id` to finish, returning when it was RUNNING and FINISHED, since `t`.
    async fn wait_done(
        &mut self,
        events: &mut Events,
        id: &str,
        t: Instant,
    ) -> (Duration, Duration) {
        let mut running = None;
        loop {
            let ev = events.next().await.expect("subscription ended");
            self.hold(&ev);
            let Event::Update(st) = ev else { continue };
            if st.task_id.as_ref().map(|t| t.value.as_str()) != Some(id) {
                continue;
            }
            match st.state() {
                v1::TaskState::TaskRunning => running = Some(t.elapsed()),
                v1::TaskState::TaskFinished => {
                    let done = t.elapsed();
                    return (running.unwrap_or(done), done);
                }
                v1::TaskState::TaskStarting => {}
                other => panic!("task {id} ended {other:?}: {}", st.message),
            }
        }
    }

    /// Keeps `in_flight` launches outstanding until `total` tasks have finished.
    async fn throughput(&mut self, events: &mut Events, total: usize, in_flight: usize) -> f64 {
        let (mut launched, mut done, mut outstanding) = (0usize, 0usize, 0usize);
        let start = Instant::now();
        while done < total {
            // Never more than the held offers hold: an update can arrive before the offer
            // of the resources it freed.
            let fits = self.fits();
            if outstanding < in_flight && launched < total && fits > 0 {
                let n = (in_flight - outstanding).min(total - launched).min(fits);
                let tasks = (0..n)
                    .map(|i| self.task(&format!("tput-{}", launched + i)))
                    .collect();
                self.launch(events, tasks).await;
                launched += n;
                outstanding += n;
                continue;
            }
            let ev = events.next().await.expect("subscription ended");
            self.hold(&ev);
            if let Event::Update(st) = ev {
                match st.state() {
                    v1::TaskState::TaskFinished => {
                        done += 1;
                        outstanding -= 1;
                    }
                    v1::TaskState::TaskStarting | v1::TaskState::TaskRunning => {}
                    other => panic!("a task ended {other:?}: {}", st.message),
                }
            }
        }
        total as f64 / start.elapsed().as_secs_f64()
    }
}

/// Bare wasmtime: the module compiled once, then a fresh store and WASI context per run,
/// stdout into a file as the agent does.
mod bare {
    use std::time::{Duration, Instant};

    use wasmtime::{Engine, InstancePre, Linker, Module, Store};
    use wasmtime_wasi::WasiCtxBuilder;
    use wasmtime_wasi::p1::WasiP1Ctx;

    pub struct Bare {
        pre: InstancePre<WasiP1Ctx>,
        dir: tempfile::TempDir,
    }

    /// Compiles `wasm` afresh, instantiates it and runs `_start`: the cold baseline.
    pub fn cold(wasm: &[u8]) -> Duration {
        let t = Instant::now();
        let bare = Bare::new(wasm);
        bare.run(0);
        t.elapsed()
    }

    impl Bare {
        pub fn new(wasm: &[u8]) -> Bare {
            let engine = Engine::default();
            let module = Module::new(&engine, wasm).unwrap();
            let mut linker = Linker::new(&engine);
            wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |c| c).unwrap();
            Bare {
                pre: linker.instantiate_pre(&module).unwrap(),
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn run(&self, n: usize) {
            let out = std::fs::File::create(self.dir.path().join(format!("stdout-{n}"))).unwrap();
            let wasi = WasiCtxBuilder::new()
                .args(&["hello", "bench"])
                .stdout(wasmtime_wasi::cli::OutputFile::new(out))
                .build_p1();
            let mut store = Store::new(self.pre.module().engine(), wasi);
            let instance = self.pre.instantiate(&mut store).unwrap();
            let start = instance
                .get_typed_func::<(), ()>(&mut store, "_start")
                .unwrap();
            start.call(&mut store, ()).unwrap();
        }

        pub fn latencies(&self, n: usize) -> Vec<Duration> {
            self.run(usize::MAX);
            let mut v: Vec<Duration> = (0..n)
                .map(|i| {
                    let t = Instant::now();
                    self.run(i % 64);
                    t.elapsed()
                })
                .collect();
            v.sort();
            v
        }

        pub fn throughput(&self, n: usize, threads: usize) -> f64 {
            let t = Instant::now();
            std::thread::scope(|s| {
                for k in 0..threads {
                    s.spawn(move || {
                        for i in (k..n).step_by(threads) {
                            self.run(i % 64);
                        }
                    });
                }
            });
            n as f64 / t.elapsed().as_secs_f64()
        }
    }
}
