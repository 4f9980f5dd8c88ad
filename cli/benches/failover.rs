//! Failover: three `agora master` processes, thousands of simulated agents with their
//! tasks; the leader is killed with SIGKILL, and the time until a new leader serves and
//! every agent has re-registered with it is measured, beside the time the same agents took
//! to register with a leader that was already up, and beside the floor: the same agents
//! registering with a server that does nothing but answer, which is then killed so that
//! they re-register with a second one (all in the same run).
//!
//! ```text
//! cargo bench -p agora-cli --bench failover                       # 10,000 agents, 10 tasks each
//! cargo bench -p agora-cli --bench failover -- --agents 2000 --tasks 5
//! cargo bench -p agora-cli --bench failover -- --election-timeout 300ms
//! ```
//!
//! A simulated agent is the real agent's link ([`agora_agent::link::maintain`]: one gRPC
//! connection per agent, the real registration, leader-finding and reconnect backoff) with a
//! stand-in for the rest of the agent: it registers with its tasks (reported running),
//! heartbeats, and answers nothing else — it runs no containers, keeps no checkpoint and
//! sends no status updates, and all of them share this one process (and its two cores with
//! the masters).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agora_agent::actor::Event;
use agora_agent::link;
use agora_proto::v1::{self, agent_message, master_message};
use agora_sdk::{Event as FrameworkEvent, SchedulerConfig, subscribe};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

// Shared with the tests, whose one-port helper the bench does not use.
#[allow(dead_code)]
#[path = "../tests/all/ports.rs"]
mod ports;

struct Masters {
    ports: Vec<u16>,

    procs: Vec<Option<Child>>,
    _dir: tempfile::TempDir,
}

impl Masters {
    fn start(election: Option<&str>) -> Masters {
        let dir = tempfile::tempdir().unwrap();
        // Client ports, then raft ports.
        let mut ports = ports::free_ports("127.0.0.1", 6);
        let raft_ports = ports.split_off(3);
        let peers = ports
            .iter()
            .zip(&raft_ports)
            .enumerate()
            .map(|(i, (p, r))| format!("{}=127.0.0.1:{p}/{r}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let procs = (0..3)
            .map(|i| {
                Some(
                    Command::new(env!("CARGO_BIN_EXE_agora"))
                        .args(["master", "--listen", &format!("127.0.0.1:{}", ports[i])])
                        .args(["--id", &(i + 1).to_string(), "--peers", &peers])
                        .args(election.map_or_else(Vec::new, |e| {
                            let heartbeat = format!("{}ms", humantime_ms(e) / 5);
                            vec![
                                "--raft-election-timeout".to_owned(),
                                e.to_owned(),
                                "--raft-heartbeat".to_owned(),
                                heartbeat,
                            ]
                        }))
                        .arg("--work-dir")
                        .arg(dir.path().join(format!("m{}", i + 1)))
                        // AGORA_BENCH_LOG=info shows the masters' side of the failover.
                        .env(
                            "AGORA_LOG",
                            std::env::var("AGORA_BENCH_LOG").unwrap_or_else(|_| "error".into()),
                        )
                        .stdout(Stdio::null())
                        .stderr(Stdio::inherit())
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        Masters {
            ports,
            procs,
            _dir: dir,
        }
    }

    fn list(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn leader(&self, dead: Option<usize>) -> usize {
        loop {
            for (i, port) in self.ports.iter().enumerate() {
                if Some(i) == dead {
                    continue;
                }
                if let Ok(mut c) =
                    v1::operator_client::OperatorClient::connect(format!("http://127.0.0.1:{port}"))
                        .await
                    && let Ok(h) = c.get_health(v1::GetHealthRequest {}).await
                    && h.get_ref().role == "leader"
                    && h.get_ref().healthy
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Masters {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A registration with a master, as a simulated agent saw it.
struct Registered {
    agent: usize,
    master_id: String,
    at: Instant,
}

/// One simulated agent: answers the link's requests, heartbeats, reports registrations.
async fn sim(
    n: usize,
    framework: v1::FrameworkId,
    tasks: usize,
    mut rx: mpsc::Receiver<Event>,
    report: mpsc::UnboundedSender<Registered>,
) {
    let info = v1::AgentInfo {
        hostname: format!("sim-{n}"),
        resources: agora_proto::resources_to_proto(
            &agora_core::parse_resources("cpus:8;mem:16384").unwrap(),
        ),
        endpoint: "http://127.0.0.1:1".into(),
        ..Default::default()
    };
    let task_resources =
        agora_proto::resources_to_proto(&agora_core::parse_resources("cpus:0.1;mem:32").unwrap());
    let reported: Vec<v1::AgentTask> = (0..tasks)
        .map(|j| v1::AgentTask {
            framework_id: Some(framework.clone()),
            task: Some(v1::TaskInfo {
                task_id: Some(v1::TaskId {
                    value: format!("t-{n}-{j}"),
                }),
                name: format!("t-{n}-{j}"),
                resources: task_resources.clone(),
                ..Default::default()
            }),
            state: v1::TaskState::TaskRunning as i32,
        })
        .collect();
    let mut agent_id: Option<v1::AgentId> = None;
    let mut link: Option<mpsc::Sender<v1::AgentMessage>> = None;
    let mut heartbeat = Duration::from_secs(5);
    let mut tick = tokio::time::interval(heartbeat);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                None => return,
                Some(Event::Connecting { reply }) => {
                    let _ = reply.send(v1::AgentMessage {
                        message: Some(agent_message::Message::Register(agent_message::Register {
                            info: Some(info.clone()),
                            agent_id: agent_id.clone(),
                            tasks: reported.clone(),
                        })),
                    });
                }
                Some(Event::LinkUp { tx }) => link = Some(tx),
                Some(Event::LinkDown) => link = None,
                Some(Event::FromMaster(m)) => {
                    if let master_message::Message::Registered(r) = *m {
                        agent_id = r.agent_id;
                        if r.heartbeat_interval_seconds > 0.0 {
                            heartbeat = Duration::from_secs_f64(r.heartbeat_interval_seconds);
                            tick = tokio::time::interval(heartbeat);
                        }
                        let _ = report.send(Registered {
                            agent: n,
                            master_id: r.master_id,
                            at: Instant::now(),
                        });
                    }
                }
                Some(_) => {}
            },
            _ = tick.tick() => {
                if let Some(l) = &link {
                    let _ = l.try_send(v1::AgentMessage {
                        message: Some(agent_message::Message::Heartbeat(agent_message::Heartbeat {})),
                    });
                }
            }
        }
    }
}

/// The floor: a server of the agent link that answers every registration at once and does
/// nothing else (no registry, no engine, no validation), run as a process of its own like a
/// master.
#[derive(Clone)]
struct Floor {
    name: String,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl v1::agent_link_server::AgentLink for Floor {
    type SessionStream = ReceiverStream<Result<v1::MasterMessage, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<v1::AgentMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| tonic::Status::invalid_argument("no registration"))?;
        let Some(agent_message::Message::Register(r)) = first.message else {
            return Err(tonic::Status::invalid_argument("not a registration"));
        };
        let id = r.agent_id.unwrap_or_else(|| v1::AgentId {
            value: format!(
                "F{}",
                self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        });
        let (tx, rx) = mpsc::channel(4);
        let _ = tx
            .send(Ok(v1::MasterMessage {
                message: Some(master_message::Message::Registered(
                    master_message::Registered {
                        agent_id: Some(id),
                        heartbeat_interval_seconds: 5.0,
                        master_id: self.name.clone(),
                    },
                )),
            }))
            .await;
        tokio::spawn(async move {
            while let Some(Ok(_)) = inbound.next().await {}
            drop(tx);
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves the floor on `port` until killed (the bench runs itself with `--floor-server`).
fn floor_server(name: String, port: u16) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let floor = Floor {
            name,
            next: std::sync::Arc::default(),
        };
        // The masters' listener settings: what differs is only the work behind them.
        let listener = agora_proto::listen::bind(([127, 0, 0, 1], port).into()).unwrap();
        tonic::transport::Server::builder()
            .add_service(
                v1::agent_link_server::AgentLinkServer::new(floor)
                    .max_decoding_message_size(agora_proto::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .unwrap();
    });
}

/// Spawns `n` simulated agents linked to `urls`; their registrations arrive on the receiver.
fn spawn_agents(
    n: usize,
    urls: &[String],
    framework: &v1::FrameworkId,
    tasks: usize,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    mpsc::UnboundedReceiver<Registered>,
) {
    let (report, reports) = mpsc::unbounded_channel();
    let mut handles = Vec::with_capacity(2 * n);
    for i in 0..n {
        let (tx, rx) = mpsc::channel(64);
        handles.push(tokio::spawn(link::maintain(
            urls.to_vec(),
            link::Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(2),
            },
            None,
            tx,
        )));
        handles.push(tokio::spawn(sim(
            i,
            framework.clone(),
            tasks,
            rx,
            report.clone(),
        )));
    }
    (handles, reports)
}

/// The floor in the same run: the same simulated agents register with one floor server,
/// which is then killed, and they re-register with another. Returns (register, back).
async fn floor(agents: usize, tasks: usize) -> (Duration, Duration) {
    let ports = ports::free_ports("127.0.0.1", 2);
    let mut servers: Vec<Option<Child>> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Some(
                Command::new(std::env::current_exe().unwrap())
                    .args(["--floor-server", &format!("floor-{i}"), &p.to_string()])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    // Both servers listen before any agent dials (else the list's order is not kept).
    for p in &ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", *p))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the floor server did not listen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let framework = v1::FrameworkId {
        value: "floor".into(),
    };
    let started = Instant::now();
    let (handles, mut reports) = spawn_agents(agents, &urls, &framework, tasks);
    for _ in 0..agents {
        let r = reports.recv().await.unwrap();
        assert_eq!(r.master_id, "floor-0", "the agents dial the list in order");
    }
    let register = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    if let Some(mut c) = servers[0].take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut back = std::collections::HashSet::new();
    let mut last = killed;
    while back.len() < agents {
        let r = reports.recv().await.unwrap();
        if r.master_id == "floor-1" && back.insert(r.agent) {
            last = last.max(r.at);
        }
    }
    for h in handles {
        h.abort();
    }
    for c in servers.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
    (register, last.duration_since(killed))
}

/// Milliseconds of `N ms` or `N s`.
fn humantime_ms(s: &str) -> u64 {
    if let Some(ms) = s.strip_suffix("ms") {
        ms.parse().expect("a number of ms")
    } else if let Some(secs) = s.strip_suffix('s') {
        secs.parse::<u64>().expect("a number of seconds") * 1000
    } else {
        panic!("--election-timeout wants e.g. 300ms")
    }
}

fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn main() {
    let mut agents = 10_000usize;
    let mut tasks = 10usize;
    let mut election = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--agents" => agents = it.next().expect("--agents N").parse().expect("a number"),
            "--tasks" => tasks = it.next().expect("--tasks N").parse().expect("a number"),
            // The masters' election timeout (their heartbeat a fifth of it).
            "--election-timeout" => election = Some(it.next().expect("--election-timeout 300ms")),
            // What cargo bench passes.
            "--bench" => {}
            "--floor-server" => {
                let name = it.next().expect("--floor-server NAME PORT");
                let port = it
                    .next()
                    .expect("--floor-server NAME PORT")
                    .parse()
                    .unwrap();
                return floor_server(name, port);
            }
            other => panic!(
                "unknown argument {other:?} (--agents N, --tasks N per agent, --election-timeout 300ms)"
            ),
        }
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(agents, tasks, election.as_deref()));
}

async fn run(agents: usize, tasks: usize, election: Option<&str>) {
    let (floor_register, floor_back) = floor(agents, tasks).await;
    println!(
        "floor: {agents} simulated agents registered with a bare agent-link server in {floor_register:.2?}; \
         with it killed, every agent was back at a second one after {floor_back:.2?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut masters = Masters::start(election);
    let first = masters.leader(None).await;
    let list = masters.list();
    let urls = link::masters(&list).unwrap();

    let mut fc = SchedulerConfig::new(list.clone(), "failover-bench");
    fc.framework.failover_timeout = 3600.0;
    let (scheduler, mut events) = subscribe(fc).await.unwrap();
    let framework = loop {
        match events.next().await {
            Some(FrameworkEvent::Subscribed { framework_id, .. }) => break framework_id,
            Some(_) => {}
            None => panic!("the framework's events ended"),
        }
    };
    let framework: v1::FrameworkId = (&framework).into();
    // Offers go back for an hour: the agents are full of simulated work.
    tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if let FrameworkEvent::Offers(o) = e {
                let ids: Vec<v1::OfferId> = o.iter().filter_map(|o| o.id.clone()).collect();
                let _ = scheduler.decline(&ids, Some(3600.0)).await;
            }
        }
    });

    let started = Instant::now();
    let (_agents, mut reports) = spawn_agents(agents, &urls, &framework, tasks);
    let mut first_master = None;
    for _ in 0..agents {
        let r = reports.recv().await.unwrap();
        first_master.get_or_insert(r.master_id);
    }
    let register = started.elapsed();
    let first_master = first_master.unwrap();
    println!(
        "{agents} simulated agents with {} tasks registered with the leader in {register:.2?}",
        agents * tasks
    );
    // Settle: allocation and offers of the first registrations are done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while reports.try_recv().is_ok() {}

    let killed = Instant::now();
    eprintln!(
        "killing master {} at {:?}",
        first + 1,
        std::time::SystemTime::now()
    );
    if let Some(mut c) = masters.procs[first].take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let watch = {
        let ports = masters.ports.clone();
        tokio::spawn(async move {
            let m = Masters {
                ports,
                procs: Vec::new(),
                _dir: tempfile::tempdir().unwrap(),
            };
            m.leader(Some(first)).await;
            killed.elapsed()
        })
    };
    let mut back = std::collections::HashSet::new();
    let mut last = killed;
    let mut delays = Vec::with_capacity(agents);
    while back.len() < agents {
        let r = reports.recv().await.unwrap();
        if r.master_id != first_master && back.insert(r.agent) {
            last = last.max(r.at);
            delays.push(r.at.duration_since(killed));
        }
    }
    delays.sort();
    let at = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)];
    let leader = watch.await.unwrap();
    let all = last.duration_since(killed);
    println!("leader killed: a new leader served after {leader:.2?}");
    println!(
        "agents back after: p50 {:.2?}, p90 {:.2?}, p99 {:.2?}, all {:.2?}",
        at(0.5),
        at(0.9),
        at(0.99),
        last.duration_since(killed)
    );
    println!(
        "every agent re-registered with it after {all:.2?} ({:.2}x the cold registration of the same agents, {register:.2?})",
        all.as_secs_f64() / register.as_secs_f64()
    );
    let serving_to_back = all.saturating_sub(leader);
    println!(
        "against the floor: cold registration {:.2}x, serving to all back {serving_to_back:.2?} = {:.2}x the floor's re-registration ({floor_back:.2?}), all back {:.2}x",
        register.as_secs_f64() / floor_register.as_secs_f64(),
        serving_to_back.as_secs_f64() / floor_back.as_secs_f64(),
        all.as_secs_f64() / floor_back.as_secs_f64(),
    );
    println!(
        "machine: {} cpus; target: <= 2 s",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
}
