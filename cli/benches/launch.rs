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
//! cargo bench -p agora-cli --bench launch -- --mesos [--isolated] [--rounds 3]  # Mesos JSON against gRPC
//! ```
//!
//! `--mesos` runs `/bin/true` as a native task (with no isolation unless `--isolated`, so
//! that the control plane is most of what is measured) from two frameworks in turn, each on
//! a cluster of its own, interleaved: the SDK's over gRPC, and one speaking the Mesos v1
//! Scheduler API in JSON over HTTP/1.1 as a Python or Node Mesos framework does (events
//! parsed into JSON values, every update acknowledged by a call of its own before the next
//! event is read, as the SDK does too).
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
    mesos: bool,
    isolated: bool,
    rounds: usize,
    launches: usize,
    throughput_tasks: usize,
    in_flight: usize,
}

fn args() -> Args {
    let mut a = Args {
        native: false,
        secure: false,
        mesos: false,
        isolated: false,
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
            "--mesos" => a.mesos = true,
            "--isolated" => a.isolated = true,
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
    if args.mesos {
        mesos_against_grpc(&args);
        return;
    }
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
        report_round(round, args, [("clear", &plain), ("secured", &tls)]);
        println!(
            "round {round} ratios secured ÷ clear: FINISHED p50 {:.2}×, throughput {:.2}×",
            pct(&tls.finished, 50.0).as_secs_f64() / pct(&plain.finished, 50.0).as_secs_f64(),
            tls.throughput / plain.throughput
        );
    }
}

/// One round's FINISHED latencies and throughput, for each of the clusters compared.
fn report_round(round: usize, args: &Args, sides: [(&str, &Measured); 2]) {
    for (what, r) in sides {
        report(
            &format!("round {round} {what}: warm ACCEPT → TASK_FINISHED"),
            &r.finished,
        );
        println!(
            "round {round} {what}: throughput ({} in flight): {:.0} tasks/s",
            args.in_flight, r.throughput
        );
    }
}

/// Native `/bin/true` launched by a Mesos JSON framework and by the SDK's gRPC framework,
/// `--rounds` times each, interleaved as in [`secure`]: warm latency and throughput, and the
/// Mesos ÷ gRPC ratios of each pair.
fn mesos_against_grpc(args: &Args) {
    let what = if args.isolated {
        "cgroups + namespaces"
    } else {
        "no isolation"
    };
    println!("# launch benchmark, Mesos v1 JSON against the gRPC SDK: /bin/true, {what}");
    println!(
        "# machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let kind = Kind::Native {
        isolated: args.isolated,
    };
    for round in 1..=args.rounds {
        let (grpc, json) = if round % 2 == 1 {
            let grpc = rt.block_on(cluster(kind, args));
            (grpc, rt.block_on(mesos::cluster(kind, args)))
        } else {
            let json = rt.block_on(mesos::cluster(kind, args));
            (rt.block_on(cluster(kind, args)), json)
        };
        report_round(round, args, [("gRPC SDK", &grpc), ("Mesos JSON", &json)]);
        println!(
            "round {round} ratios Mesos JSON ÷ gRPC: FINISHED p50 {:.2}×, time per task (gRPC tasks/s ÷ Mesos tasks/s) {:.2}×",
            pct(&json.finished, 50.0).as_secs_f64() / pct(&grpc.finished, 50.0).as_secs_f64(),
            grpc.throughput / json.throughput
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

/// A master and an agent in this process, on loopback; stopped by [`Cluster::stop`].
struct Cluster {
    master: String,
    auth: agora_sdk::masters::Auth,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts a master and an agent for `kind`, with TLS, authentication and ACLs on when
    /// `secure`.
    async fn start(kind: Kind<'_>, secure: bool) -> Cluster {
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
        let m = tokio::spawn(async move {
            agora_master::run(listener, master_config, stopped(stop_rx.clone()))
                .await
                .expect("the master runs");
        });
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
        let stop = stop_tx.subscribe();
        let a = tokio::spawn(async move {
            agora_agent::run(listener, config, stopped(stop))
                .await
                .expect("the agent runs");
        });
        Cluster {
            master,
            auth,
            stop: stop_tx,
            tasks: vec![m, a],
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks.into_iter().rev() {
            let _ = t.await;
        }
    }
}

/// [`cluster`], with TLS, authentication and ACLs on when `secure`.
async fn cluster_with(kind: Kind<'_>, args: &Args, secure: bool) -> Measured {
    let cluster = Cluster::start(kind, secure).await;
    let mut fc = SchedulerConfig::new(cluster.master.clone(), "launch-bench");
    fc.auth = Some(cluster.auth.clone());
    let (s, events) = subscribe(fc).await.unwrap();
    let mut f = Framework {
        s,
        events,
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
    f.launch_tasks(vec![first]).await;
    let (_, cold) = wait_done(&mut f, "cold", t).await;

    let (running, finished) = sequential(&mut f, args.launches).await;

    let cold_module = match kind {
        Kind::Wasm { .. } => {
            let other = task_bytes("capprobe", Target::P1);
            let t = Instant::now();
            f.launch_tasks(vec![TaskBuilder::wasm(
                TaskId::new("cold-module").unwrap(),
                other,
            )])
            .await;
            Some(wait_done(&mut f, "cold-module", t).await.1)
        }
        Kind::Native { .. } => None,
    };

    let tput = throughput(&mut f, args.throughput_tasks, args.in_flight).await;
    drop(f);
    cluster.stop().await;
    Measured {
        cold,
        cold_module,
        running,
        finished,
        throughput: tput,
    }
}

/// Where a task got to, as the benchmark tells it.
enum Phase {
    Started,
    Running,
    Finished,
}

/// A framework the benchmark drives: the SDK's gRPC one or a Mesos JSON one.
trait Driver {
    /// Launches tasks named `ids` on every offer held, waiting for one if none is.
    async fn launch(&mut self, ids: &[String]);
    /// The next status update, acknowledged: its task and where the task got to. Offers
    /// are held as they arrive; a task that ended otherwise than finished is a panic.
    async fn update(&mut self) -> (String, Phase);
    /// How many tasks of [`TASK`] the held offers hold.
    fn fits(&self) -> usize;
}

/// How many tasks of [`TASK`] fit in `cpus` and `mem`.
fn fits_in(cpus: f64, mem: f64) -> usize {
    let task = parse_resources(TASK).unwrap();
    let by = |have: f64, need: f64| {
        if need > 0.0 {
            (have / need).floor()
        } else {
            f64::MAX
        }
    };
    by(cpus, task.cpus()).min(by(mem, task.mem())) as usize
}

/// Waits for `id` to finish, returning when it was RUNNING and FINISHED, since `t`.
async fn wait_done(d: &mut impl Driver, id: &str, t: Instant) -> (Duration, Duration) {
    let mut running = None;
    loop {
        let (task, phase) = d.update().await;
        if task != id {
            continue;
        }
        match phase {
            Phase::Running => running = Some(t.elapsed()),
            Phase::Finished => {
                let done = t.elapsed();
                return (running.unwrap_or(done), done);
            }
            Phase::Started => {}
        }
    }
}

/// `n` launches one after another: the sorted RUNNING and FINISHED latencies.
async fn sequential(d: &mut impl Driver, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let mut running = Vec::with_capacity(n);
    let mut finished = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("seq-{i}");
        let t = Instant::now();
        d.launch(std::slice::from_ref(&id)).await;
        let (r, f) = wait_done(d, &id, t).await;
        running.push(r);
        finished.push(f);
    }
    (sorted(running), sorted(finished))
}

/// Keeps `in_flight` launches outstanding until `total` tasks have finished: tasks/s.
async fn throughput(d: &mut impl Driver, total: usize, in_flight: usize) -> f64 {
    let (mut launched, mut done, mut outstanding) = (0usize, 0usize, 0usize);
    let start = Instant::now();
    while done < total {
        // Never more than the held offers hold: an update can arrive before the offer
        // of the resources it freed.
        let fits = d.fits();
        if outstanding < in_flight && launched < total && fits > 0 {
            let n = (in_flight - outstanding).min(total - launched).min(fits);
            let ids: Vec<String> = (0..n).map(|i| format!("tput-{}", launched + i)).collect();
            d.launch(&ids).await;
            launched += n;
            outstanding += n;
            continue;
        }
        if let (_, Phase::Finished) = d.update().await {
            done += 1;
            outstanding -= 1;
        }
    }
    total as f64 / start.elapsed().as_secs_f64()
}

struct Framework {
    s: Scheduler,
    events: Events,
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
    async fn launch_tasks(&mut self, tasks: Vec<TaskBuilder>) {
        while self.offers.is_empty() {
            let ev = self.events.next().await.expect("subscription ended");
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
}

impl Driver for Framework {
    async fn launch(&mut self, ids: &[String]) {
        let tasks = ids.iter().map(|id| self.task(id)).collect();
        self.launch_tasks(tasks).await;
    }

    async fn update(&mut self) -> (String, Phase) {
        loop {
            let ev = self.events.next().await.expect("subscription ended");
            self.hold(&ev);
            let Event::Update(st) = ev else { continue };
            let id = st
                .task_id
                .as_ref()
                .map(|t| t.value.clone())
                .unwrap_or_default();
            let phase = match st.state() {
                v1::TaskState::TaskRunning => Phase::Running,
                v1::TaskState::TaskFinished => Phase::Finished,
                v1::TaskState::TaskStarting => Phase::Started,
                other => panic!("task {id} ended {other:?}: {}", st.message),
            };
            return (id, phase);
        }
    }

    fn fits(&self) -> usize {
        let held = self
            .offers
            .values()
            .filter_map(|o| agora_sdk::offer_resources(o).ok())
            .fold(agora_core::Resources::new(), |acc, r| acc + r);
        fits_in(held.cpus(), held.mem())
    }
}

/// A framework speaking the Mesos v1 Scheduler API in JSON: one long `SUBSCRIBE` response
/// carrying RecordIO events, every other call a `POST` of its own on a kept-alive connection.
mod mesos {
    use std::collections::HashMap;
    use std::time::Instant;

    use agora_mesos::recordio;
    use serde_json::{Value, json};

    use super::{Cluster, Driver, Kind, Measured, Phase, TASK, fits_in, sequential, throughput};

    pub struct Mesos {
        url: String,
        http: reqwest::Client,
        framework: String,
        stream: String,
        events: reqwest::Response,
        reader: recordio::Reader,
        /// Offers held, by id; all are on the one agent.
        offers: HashMap<String, Value>,
    }

    /// The benchmark of [`super::cluster_with`], driven through the Mesos API.
    pub async fn cluster(kind: Kind<'_>, args: &super::Args) -> Measured {
        let cluster = Cluster::start(kind, false).await;
        let mut m = Mesos::subscribe(&cluster.master).await;
        let t = Instant::now();
        m.launch(&["cold".to_owned()]).await;
        let (_, cold) = super::wait_done(&mut m, "cold", t).await;
        let (running, finished) = sequential(&mut m, args.launches).await;
        let tput = throughput(&mut m, args.throughput_tasks, args.in_flight).await;
        drop(m);
        cluster.stop().await;
        Measured {
            cold,
            cold_module: None,
            running,
            finished,
            throughput: tput,
        }
    }

    impl Mesos {
        async fn subscribe(master: &str) -> Mesos {
            let url = format!("{master}/api/v1/scheduler");
            let http = reqwest::Client::new();
            let call = json!({"type": "SUBSCRIBE", "subscribe": {"framework_info": {
                "user": "", "name": "launch-bench-mesos", "roles": ["*"],
                "capabilities": [{"type": "MULTI_ROLE"}],
            }}});
            let events = http
                .post(&url)
                .header("content-type", "application/json")
                .header("accept", "application/json")
                .body(call.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(events.status(), 200, "SUBSCRIBE");
            let stream = events.headers()["mesos-stream-id"]
                .to_str()
                .unwrap()
                .to_owned();
            let mut m = Mesos {
                url,
                http,
                framework: String::new(),
                stream,
                events,
                reader: recordio::Reader::new(64 << 20),
                offers: HashMap::new(),
            };
            let subscribed = m.event().await;
            assert_eq!(subscribed["type"], "SUBSCRIBED", "{subscribed}");
            m.framework = subscribed["subscribed"]["framework_id"]["value"]
                .as_str()
                .unwrap()
                .to_owned();
            m
        }

        async fn event(&mut self) -> Value {
            loop {
                if let Some(r) = self.reader.next_record().unwrap() {
                    return serde_json::from_slice(&r).unwrap();
                }
                let chunk = self
                    .events
                    .chunk()
                    .await
                    .unwrap()
                    .expect("the stream ended");
                self.reader.push(&chunk);
            }
        }

        async fn call(&self, mut call: Value) {
            call["framework_id"] = json!({"value": self.framework});
            let r = self
                .http
                .post(&self.url)
                .header("content-type", "application/json")
                .header("mesos-stream-id", &self.stream)
                .body(call.to_string())
                .send()
                .await
                .unwrap();
            let code = r.status();
            let body = r.bytes().await.unwrap_or_default();
            assert_eq!(code, 202, "{call}: {body:?}");
        }

        fn hold(&mut self, e: &Value) {
            match e["type"].as_str() {
                Some("OFFERS") => {
                    for o in e["offers"]["offers"].as_array().into_iter().flatten() {
                        let id = o["id"]["value"].as_str().unwrap().to_owned();
                        self.offers.insert(id, o.clone());
                    }
                }
                Some("RESCIND") => {
                    self.offers
                        .remove(e["rescind"]["offer_id"]["value"].as_str().unwrap_or(""));
                }
                Some("ERROR") => panic!("the master said {e}"),
                _ => {}
            }
        }
    }

    fn scalar(name: &str, value: f64) -> Value {
        json!({"name": name, "type": "SCALAR", "scalar": {"value": value}})
    }

    impl Driver for Mesos {
        async fn launch(&mut self, ids: &[String]) {
            while self.offers.is_empty() {
                let e = self.event().await;
                self.hold(&e);
            }
            let agent = self.offers.values().next().unwrap()["agent_id"].clone();
            let offer_ids: Vec<Value> = self.offers.values().map(|o| o["id"].clone()).collect();
            self.offers.clear();
            let task = agora_core::parse_resources(TASK).unwrap();
            let tasks: Vec<Value> = ids
                .iter()
                .map(|id| {
                    json!({
                        "name": id,
                        "task_id": {"value": id},
                        "agent_id": agent,
                        "resources": [scalar("cpus", task.cpus()), scalar("mem", task.mem())],
                        "command": {
                            "shell": false,
                            "value": "/bin/true",
                            "arguments": ["/bin/true", "bench"],
                        },
                    })
                })
                .collect();
            self.call(json!({"type": "ACCEPT", "accept": {
                "offer_ids": offer_ids,
                "operations": [{"type": "LAUNCH", "launch": {"task_infos": tasks}}],
                "filters": {"refuse_seconds": 0.0},
            }}))
            .await;
        }

        async fn update(&mut self) -> (String, Phase) {
            loop {
                let e = self.event().await;
                self.hold(&e);
                if e["type"] != "UPDATE" {
                    continue;
                }
                let status = &e["update"]["status"];
                if let Some(uuid) = status.get("uuid") {
                    self.call(json!({"type": "ACKNOWLEDGE", "acknowledge": {
                        "agent_id": status["agent_id"],
                        "task_id": status["task_id"],
                        "uuid": uuid,
                    }}))
                    .await;
                }
                let id = status["task_id"]["value"].as_str().unwrap_or("").to_owned();
                let phase = match status["state"].as_str().unwrap_or("") {
                    "TASK_STARTING" => Phase::Started,
                    "TASK_RUNNING" => Phase::Running,
                    "TASK_FINISHED" => Phase::Finished,
                    other => panic!("task {id} ended {other}: {status}"),
                };
                return (id, phase);
            }
        }

        fn fits(&self) -> usize {
            let (mut cpus, mut mem) = (0.0, 0.0);
            for r in self
                .offers
                .values()
                .flat_map(|o| o["resources"].as_array().into_iter().flatten())
            {
                let v = r["scalar"]["value"].as_f64().unwrap_or(0.0);
                match r["name"].as_str() {
                    Some("cpus") => cpus += v,
                    Some("mem") => mem += v,
                    _ => {}
                }
            }
            fits_in(cpus, mem)
        }
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
