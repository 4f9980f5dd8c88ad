//! Three `agora master` processes on loopback, two agents and a framework in this process:
//! the leader is killed with SIGKILL, twice; a new leader serves, the agents and the framework
//! find it, no task is lost or ends twice, and the registry is as it was.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use agora_core::{AgentId, Resources, TaskState};
use agora_proto::{resources_from_proto, resources_to_proto, state_from_proto, v1};
use agora_sdk::Operator;

use crate::native::command;
use crate::seen::{Seen, decline_all};
use crate::*;

pub(crate) struct Group {
    /// The address the masters listen on (loopback, or a test's veth address).
    host: String,
    pub ports: Vec<u16>,
    /// Where each master takes raft, apart from its clients.
    raft_ports: Vec<u16>,
    dirs: Vec<std::path::PathBuf>,
    pub procs: Vec<Killed>,
    _dir: tempfile::TempDir,
}

impl Group {
    fn peers(&self) -> String {
        self.ports
            .iter()
            .zip(&self.raft_ports)
            .enumerate()
            .map(|(i, (p, r))| format!("{}={}:{p}/{r}", i + 1, self.host))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn list(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("{}:{p}", self.host))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&self, i: usize) -> Killed {
        Killed::master(
            &format!("{}:{}", self.host, self.ports[i]),
            &self.dirs[i],
            &[
                "--id",
                &(i + 1).to_string(),
                "--peers",
                &self.peers(),
                "--agent-reregister-timeout",
                "60s",
                // The partition tests' masters listen on a veth address.
                "--insecure",
            ],
        )
    }

    pub fn start() -> Group {
        Group::start_on("127.0.0.1")
    }

    /// Three masters listening on `host`.
    pub fn start_on(host: &str) -> Group {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = crate::ports::free_ports(host, 6);
        let raft_ports = ports.split_off(3);
        let dirs = (1..=3).map(|i| dir.path().join(format!("m{i}"))).collect();
        let mut g = Group {
            host: host.to_owned(),
            ports,
            raft_ports,
            dirs,
            procs: Vec::new(),
            _dir: dir,
        };
        g.procs = (0..3).map(|i| g.spawn(i)).collect();
        g
    }

    /// The index of the master that says it leads (skipping `dead`), waiting for one.
    pub async fn leader(&self, dead: Option<usize>) -> usize {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for (i, port) in self.ports.iter().enumerate() {
                if Some(i) == dead {
                    continue;
                }
                if let Ok(mut c) = v1::operator_client::OperatorClient::connect(format!(
                    "http://{}:{port}",
                    self.host
                ))
                .await
                    && let Ok(h) = c.get_health(v1::GetHealthRequest {}).await
                    && h.get_ref().role == "leader"
                {
                    return i;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no master leads");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_survive_their_leader_killed_twice() {
    init_logs();
    let mut group = Group::start();
    let first = group.leader(None).await;
    let masters = group.list();

    // A follower names the leader, for gRPC and for HTTP uploads.
    let follower = (first + 1) % 3;
    let mut c = v1::operator_client::OperatorClient::connect(format!(
        "http://127.0.0.1:{}",
        group.ports[follower]
    ))
    .await
    .unwrap();
    // It names the leader once it has heard from it (the leader needed only one follower
    // to be elected and to commit its first entry).
    let named = Some(Some(format!("http://127.0.0.1:{}", group.ports[first])));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = c.get_state(v1::GetStateRequest {}).await.unwrap_err();
        let to = agora_proto::leader::redirect(&status);
        if to == named {
            break;
        }
        assert_eq!(
            to,
            Some(None),
            "a follower names no other leader: {status:?}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the follower never named the leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let agents_dir = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for n in 1..=2 {
        let mut config = agent_config_for(
            &masters,
            &agents_dir.path().join(format!("agent-{n}")),
            n,
            "cpus:4;mem:2048",
        );
        config.reconnect_min = Duration::from_millis(100);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        agents.push(Stoppable::spawn(move |stop| {
            agora_agent::run(listener, config, stop)
        }));
    }
    let op = Operator::connect(&masters).await.unwrap();
    wait_until("both agents to register", || async {
        op.state()
            .await
            .is_ok_and(|s| s.agents.iter().filter(|a| a.active).count() == 2)
    })
    .await;

    let mut fc = SchedulerConfig::new(masters.clone(), "survivor");
    fc.framework.roles = vec!["eng".into()];
    fc.framework.principal = "alice".into();
    fc.framework.failover_timeout = 600.0;
    fc.framework.capabilities = vec![v1::framework_info::Capability::PartitionAware as i32];
    let (s, mut events) = subscribe(fc).await.unwrap();
    let Some(Event::Subscribed { .. }) = events.next().await else {
        panic!("not subscribed");
    };

    // A reservation, a weight and a quota, and two long tasks: one native, one Wasm.
    let offers = next_offers(&mut events).await;
    let offer = offers[0].clone();
    let long_native = command("long-native", "sleep 600", "cpus:0.2;mem:64").build_for(&offer);
    let long_wasm = wasm_task("long-wasm", "sleeper", "cpus:0.2;mem:64")
        .args(["600"])
        .build_for(&offer);
    s.accept_operations(
        &[offer.id.clone().unwrap()],
        vec![
            v1::Operation {
                operation: Some(v1::operation::Operation::Reserve(v1::operation::Reserve {
                    resources: resources_to_proto(&res("cpus(eng,alice):1;mem(eng,alice):256")),
                })),
            },
            v1::Operation {
                operation: Some(v1::operation::Operation::Launch(v1::operation::Launch {
                    tasks: vec![long_native, long_wasm],
                })),
            },
        ],
        Some(0.0),
    )
    .await
    .unwrap();
    op.set_weight("eng", 2.5).await.unwrap();
    op.set_quota("eng", &res("cpus:0.5"), None, false)
        .await
        .unwrap();
    let mut seen = Seen::default();
    seen.pump(&s, &mut events, "the long tasks to run", |v| {
        v.state("long-native") == Some(TaskState::Running)
            && v.state("long-wasm") == Some(TaskState::Running)
    })
    .await;
    let registry_view = |st: &v1::GetStateResponse, roles: &[v1::RoleState]| {
        let reserved: Resources = st.agents.iter().fold(Resources::new(), |acc, a| {
            acc + resources_from_proto(&a.total).unwrap().reserved_for("eng")
        });
        let eng = roles.iter().find(|r| r.role == "eng").cloned();
        (
            reserved,
            eng.as_ref().map(|r| r.weight),
            eng.map(|r| resources_from_proto(&r.guarantee).unwrap()),
        )
    };
    wait_until("the reservation to show", || async {
        let st = op.state().await.unwrap();
        !registry_view(&st, &[]).0.is_empty()
    })
    .await;
    let before = registry_view(&op.state().await.unwrap(), &op.roles().await.unwrap());
    assert_eq!(before.1, Some(2.5));

    let mut launched: Vec<String> = Vec::new();
    let mut placed: HashMap<String, AgentId> = HashMap::new();
    let long_agent = AgentId::try_from(offer.agent_id.clone().unwrap()).unwrap();
    placed.insert("long-native".into(), long_agent.clone());
    placed.insert("long-wasm".into(), long_agent);
    let mut leader = first;
    for round in 0..2 {
        // Short Wasm tasks in flight as the leader dies.
        let offers = loop {
            match tokio::time::timeout(WAIT, events.next())
                .await
                .expect("offers in time")
            {
                Some(Event::Offers(o)) => break o,
                Some(Event::Update(st)) => seen.note(st),
                Some(_) => {}
                None => panic!("events ended"),
            }
        };
        let offer = &offers[0];
        decline_all(&s, &offers[1..]).await;
        let agent = AgentId::try_from(offer.agent_id.clone().unwrap()).unwrap();
        let batch: Vec<v1::TaskInfo> = (0..4)
            .map(|i| {
                let id = format!("short-{round}-{i}");
                launched.push(id.clone());
                placed.insert(id.clone(), agent.clone());
                wasm_task(&id, "hello", "cpus:0.1;mem:32").build_for(offer)
            })
            .collect();
        s.accept(&[offer.id.clone().unwrap()], batch, Some(0.0))
            .await
            .unwrap();
        group.procs[leader].kill();
        let t = std::time::Instant::now();
        let next = group.leader(Some(leader)).await;
        eprintln!(
            "round {round}: master {} leads {:?} after the kill",
            next + 1,
            t.elapsed()
        );

        // Every short task ends — those the old leader never got to an agent are answered
        // TASK_GONE once their agent is back — and the long ones are still running, as
        // reconciliation through the new leader says (asked again each second: no answer
        // is given for an agent not back yet).
        let short = launched.clone();
        let done = |v: &Seen| {
            short
                .iter()
                .all(|t| v.state(t).is_some_and(|s| s.is_terminal()))
                && v.state("long-native") == Some(TaskState::Running)
                && v.state("long-wasm") == Some(TaskState::Running)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done(&seen) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not every task accounted for after the failover: {:?}",
                seen.latest
            );
            // Only tasks not yet seen to end: as in Mesos, a master does not remember tasks
            // that ended and were acknowledged before a failover, and answers TASK_GONE.
            let ids: Vec<(TaskId, Option<AgentId>)> = launched
                .iter()
                .chain(["long-native".to_owned(), "long-wasm".to_owned()].iter())
                .filter(|t| !seen.state(t).is_some_and(|s| s.is_terminal()))
                .map(|t| (tid(t), placed.get(t).cloned()))
                .collect();
            let _ = s.reconcile_on(&ids).await;
            let until = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(Some(ev)) = tokio::time::timeout_at(until, events.next()).await {
                seen.take(&s, ev).await;
            }
        }
        let op = Operator::connect(&masters).await.unwrap();
        wait_until("the agents to register with the new leader", || async {
            op.state()
                .await
                .is_ok_and(|s| s.agents.iter().filter(|a| a.active).count() == 2)
        })
        .await;
        let after = registry_view(&op.state().await.unwrap(), &op.roles().await.unwrap());
        assert_eq!(
            after, before,
            "reservations, weights and quotas survive the failover"
        );

        // The killed master comes back as a follower before the next round.
        group.procs[leader] = group.spawn(leader);
        leader = next;
    }

    // No task ended twice with different outcomes, none is missing an end.
    for t in &launched {
        let e = seen
            .ends
            .get(t)
            .unwrap_or_else(|| panic!("{t} never ended"));
        let updates: Vec<_> = e.iter().filter(|(_, u)| !u.is_empty()).collect();
        assert!(
            updates.iter().all(|x| *x == updates[0]),
            "{t} ended more than one way: {e:?}"
        );
        // A reconciliation asked while the task was live may be answered after its end was
        // acknowledged, when the master no longer knows it: TASK_GONE, as in Mesos. Any
        // other answer must agree with the end.
        let end = e
            .iter()
            .find(|(state, _)| *state != TaskState::Gone)
            .unwrap_or(&e[0]);
        assert!(
            e.iter()
                .all(|(state, u)| *state == end.0 || (u.is_empty() && *state == TaskState::Gone)),
            "reconciliation disagrees with {t}'s end: {e:?}"
        );
    }
    for t in ["long-native", "long-wasm"] {
        assert!(!seen.ends.contains_key(t), "{t} ended: {:?}", seen.ends[t]);
    }
    let st = Operator::connect(&masters)
        .await
        .unwrap()
        .state()
        .await
        .unwrap();
    let running = st
        .tasks
        .iter()
        .filter(|t| {
            state_from_proto(t.state.try_into().unwrap_or_default())
                .is_some_and(|s| s == TaskState::Running)
        })
        .count();
    assert!(running >= 2, "the long tasks are running: {st:?}");
    s.teardown().await.unwrap();
    for mut a in agents {
        a.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agora_run_outlives_a_failover() {
    init_logs();
    let mut group = Group::start();
    let first = group.leader(None).await;
    let masters = group.list();
    let dir = tempfile::tempdir().unwrap();
    let mut config = agent_config_for(&masters, &dir.path().join("agent"), 1, "cpus:2;mem:1024");
    config.reconnect_min = Duration::from_millis(100);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = Stoppable::spawn(move |stop| agora_agent::run(listener, config, stop));
    let op = Operator::connect(&masters).await.unwrap();
    wait_until("the agent to register", || async {
        op.state()
            .await
            .is_ok_and(|s| s.agents.iter().any(|a| a.active))
    })
    .await;

    let module = agora_examples::task("sleeper", agora_examples::Target::P1);
    let mut run = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["run", "--master", &masters, "--mem", "32"])
        .arg(&module)
        .args(["--", "3"])
        .env("AGORA_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the leader once the task runs.
    let rx = lines_of(run.stderr.take().unwrap());
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while !seen.iter().any(|l: &String| l.contains("TASK_RUNNING")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("agora run reports TASK_RUNNING");
        seen.push(line);
    }
    group.procs[first].kill();
    let status = tokio::task::spawn_blocking(move || run.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    seen.extend(rx.try_iter());
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "agora run failed across the failover: {seen:#?}\n{stdout}"
    );
    assert!(stdout.contains("slept"), "{stdout}");
    assert!(
        seen.iter().any(|l| l.contains("subscribed again")),
        "it re-subscribed to the new leader: {seen:#?}"
    );
    agent.stop().await.unwrap();
}

/// A leader whose followers are gone (here: killed) can no longer commit, and a follower on
/// the far side of a partition may be elected: it stops serving within about one and a half
/// election timeouts, and calls at it are refused, never answered from a stale registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_majority_stops_serving() {
    let mut group = Group::start();
    let leader = group.leader(None).await;
    let url = format!("http://127.0.0.1:{}", group.ports[leader]);
    let mut op = v1::operator_client::OperatorClient::connect(url.clone())
        .await
        .unwrap();
    let role = |h: &v1::GetHealthResponse| h.role.clone();
    assert_eq!(
        role(
            &op.get_health(v1::GetHealthRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        "leader"
    );

    let cut = std::time::Instant::now();
    for i in (0..3).filter(|i| *i != leader) {
        group.procs[i].kill();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let last = loop {
        let h = op
            .get_health(v1::GetHealthRequest {})
            .await
            .unwrap()
            .into_inner();
        if role(&h) != "leader" {
            break role(&h);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still leading 10 s after losing its majority"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // 1.5 election timeouts (500 ms) and the 50 ms the leadership watch looks again; no
    // follower could be elected sooner than about twice the timeout. 3 s leaves room for a
    // loaded machine while still failing a leader that only steps down much later.
    let took = cut.elapsed();
    eprintln!("stopped leading after {took:?} ({last})");
    assert!(
        took < Duration::from_secs(3),
        "stopped leading only after {took:?}"
    );
    // A framework is not served there: after the leader wait, it is told no leader is known.
    let mut sched = v1::scheduler_client::SchedulerClient::connect(url)
        .await
        .unwrap();
    let refused = sched
        .subscribe(v1::SubscribeRequest {
            framework_info: Some(v1::FrameworkInfo {
                name: "late".into(),
                user: "nobody".into(),
                ..Default::default()
            }),
            stream_id: String::new(),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
}

/// The lost-leader hint end to end: right after the leader dies, a follower still names it
/// (it was heard less than three heartbeats ago). A caller that says it just lost that
/// leader is not sent back to it: it waits for the election, and is then served or sent to
/// the new leader. A caller that says nothing is sent to the dead leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_lost_the_leader_is_not_sent_back_to_it() {
    let mut group = Group::start();
    let first = group.leader(None).await;
    let dead = format!("127.0.0.1:{}", group.ports[first]);
    let follower = (first + 1) % 3;
    // Connected before the kill, so that the calls below reach the follower at once.
    let sched = v1::scheduler_client::SchedulerClient::connect(format!(
        "http://127.0.0.1:{}",
        group.ports[follower]
    ))
    .await
    .unwrap();
    let subscribe = |lost: Option<String>| {
        let mut sched = sched.clone();
        async move {
            let mut request = tonic::Request::new(v1::SubscribeRequest {
                framework_info: Some(v1::FrameworkInfo {
                    name: "hint".into(),
                    user: "nobody".into(),
                    ..Default::default()
                }),
                stream_id: String::new(),
            });
            agora_proto::leader::tell_lost(&mut request, lost.as_deref());
            sched.subscribe(request).await.err()
        }
    };

    group.procs[first].kill();
    let (hinted, plain) = tokio::join!(subscribe(Some(dead.clone())), subscribe(None));
    let dead_url = Some(Some(format!("http://{dead}")));
    // Without the hint: the follower answers at once with the leader it last heard from.
    let plain = plain.expect("a follower does not serve a framework");
    assert_eq!(
        agora_proto::leader::redirect(&plain),
        dead_url,
        "a follower asked within three heartbeats of the kill names the dead leader: {plain:?}"
    );
    // With it: served by the follower if it was elected, or sent to whoever was.
    if let Some(status) = hinted {
        let to = agora_proto::leader::redirect(&status);
        assert_ne!(to, dead_url, "sent back to the lost leader: {status:?}");
        let others: Vec<_> = (0..3)
            .filter(|i| *i != first && *i != follower)
            .map(|i| Some(Some(format!("http://127.0.0.1:{}", group.ports[i]))))
            .collect();
        assert!(
            others.contains(&to),
            "told to go to {to:?}, not the new leader: {status:?}"
        );
    }
}
