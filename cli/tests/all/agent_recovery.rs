//! An `agora agent` process killed with SIGKILL while it runs native, Wasm and custom
//! executor tasks, then started again on the same work directory: its tasks were never interrupted, those that
//! ended meanwhile are reported with their exit status, and it can still kill the others.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agora_core::{FrameworkId, TaskState};
use agora_proto::v1;

use crate::executors::{agora_executor, in_executor, subscriptions};
use crate::native::command;
use crate::ports::free_port;
use crate::processes::Proc;
use crate::seen::Seen;
use crate::*;

pub(crate) struct AgentProcess {
    pub master: String,
    pub port: u16,
    pub work_dir: PathBuf,
    pub cgroup_parent: String,
}

impl AgentProcess {
    /// An agent of `master` on a free port, its work directory `dir/agent`, its cgroups
    /// under `agora-test-PID-NAME`.
    pub fn new(master: String, dir: &Path, name: &str) -> AgentProcess {
        AgentProcess {
            master,
            port: free_port(),
            work_dir: dir.join("agent"),
            cgroup_parent: format!("agora-test-{}-{name}", std::process::id()),
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_agora"));
        c.args(["agent", "--master", &self.master])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--resources", "cpus:4;mem:2048;disk:2048"])
            .args(["--hostname", "recovering"])
            .args(["--cgroup-parent", &self.cgroup_parent])
            // Kill what runs when the test stops the last agent; the one killed with SIGKILL
            // has no say.
            .args(["--on-exit", "kill"])
            .arg("--work-dir")
            .arg(&self.work_dir)
            .env("AGORA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        c
    }

    /// The sandbox of the latest run of `task`.
    pub fn sandbox(&self, fw: &FrameworkId, task: &str) -> Option<PathBuf> {
        agora_agent::sandbox::latest_run_dir(&self.work_dir, fw, &tid(task))
    }
}

fn count(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("count"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The master waits long enough for an agent to come back (as Mesos's 75 s) that a restart
/// is not a partition.
fn patient_master() -> agora_master::MasterConfig {
    agora_master::MasterConfig {
        agent_heartbeat_interval: Duration::from_millis(500),
        max_missed_heartbeats: 60,
        ..fast_master()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_and_restarted_keeps_its_tasks_running() {
    let cluster = Cluster::start_with(patient_master(), &[]).await;
    let agent = AgentProcess::new(cluster.master.clone(), cluster.dir.path(), "recovery");
    let mut first = Killed(Some(agent.command().spawn().unwrap()));
    cluster.wait_for_agents(1).await;
    let agent_id = cluster.state().await.agents[0].id.clone();

    let (s, mut events) = cluster.framework("recovering").await;
    let fw = s.framework_id().unwrap();
    let offers = next_offers(&mut events).await;
    let offer = &offers[0];
    let custom = agora_executor("runner");
    let tasks = vec![
        command(
            "long-native",
            "i=0; while :; do i=$((i+1)); echo $i > count; sleep 0.05; done",
            "cpus:0.2;mem:64",
        )
        .build_for(offer),
        command("short-native", "sleep 3; exit 7", "cpus:0.2;mem:64").build_for(offer),
        // Its time limit runs out after the restart: the new agent still enforces it.
        command("limited-native", "exec sleep 600", "cpus:0.2;mem:64")
            .max_duration(6.0)
            .build_for(offer),
        wasm_task("long-wasm", "sleeper", "cpus:0.2;mem:64")
            .args(["600"])
            .build_for(offer),
        wasm_task("short-wasm", "sleeper", "cpus:0.2;mem:64")
            .args(["2"])
            .build_for(offer),
        in_executor("long-custom", &custom, "exec sleep 600").build_for(offer),
    ];
    s.accept(&[offer.id.clone().unwrap()], tasks, Some(0.0))
        .await
        .unwrap();
    let mut seen = Seen::default();
    let names = [
        "long-native",
        "short-native",
        "limited-native",
        "long-wasm",
        "short-wasm",
        "long-custom",
    ];
    // Each has run (the short ones may have ended already on a machine busy with the rest
    // of the suite: all six at once can take longer than the shortest lives).
    seen.pump(&s, &mut events, "every task to run", |v| {
        names.iter().all(|t| {
            v.state(t)
                .is_some_and(|s| s == TaskState::Running || s.is_terminal())
        }) && v.state("long-native") == Some(TaskState::Running)
            && v.state("long-wasm") == Some(TaskState::Running)
            && v.state("long-custom") == Some(TaskState::Running)
    })
    .await;

    // The agent dies while they run; the short ones end while it is away.
    first.kill();
    let native = agent.sandbox(&fw, "short-native").unwrap();
    wait_until("the short native task to end with no agent", || async {
        native.join(agora_agent::native::EXIT_FILE).exists()
    })
    .await;
    let long = agent.sandbox(&fw, "long-native").unwrap();
    let while_away = count(&long);
    // On a machine busy with the rest of the suite, executors may take longer than the
    // default 5 s to find the new agent; being killed for it is another test's subject.
    let _second = Proc(
        agent
            .command()
            .args(["--executor-reregistration-timeout", "30s"])
            .spawn()
            .unwrap(),
    );

    // The same agent, its tasks as they are: the ended ones with their exit status.
    seen.pump(&s, &mut events, "the short tasks' ends", |v| {
        v.state("short-native") == Some(TaskState::Failed)
            && v.state("short-wasm") == Some(TaskState::Finished)
    })
    .await;
    let failed = &seen.latest["short-native"];
    assert_eq!(failed.exit_code, Some(7), "{failed:?}");
    assert_eq!(failed.reason(), v1::Reason::CommandExited, "{failed:?}");
    // (The operator's view is a snapshot a moment behind.)
    wait_until("the agent to be active again, under its id", || async {
        let st = cluster.state().await;
        st.agents.len() == 1 && st.agents[0].id == agent_id && st.agents[0].active
    })
    .await;
    // The long ones never stopped: no update ended them, and the native one kept counting
    // through the restart.
    assert_eq!(seen.state("long-native"), Some(TaskState::Running));
    assert_eq!(seen.state("long-wasm"), Some(TaskState::Running));
    assert_eq!(seen.state("long-custom"), Some(TaskState::Running));
    // The custom executor subscribed again, and the new agent, which the master never told,
    // described its framework from the checkpoint.
    wait_until("the custom executor to subscribe again", || async {
        subscriptions(&agent.work_dir, &fw, "runner").len() == 2
    })
    .await;
    let told = subscriptions(&agent.work_dir, &fw, "runner");
    assert!(
        told.iter()
            .all(|l| l.ends_with(r#"framework "recovering""#)),
        "{told:?}"
    );
    wait_until("the long native task to count on", || async {
        count(&long) > while_away + 5
    })
    .await;

    seen.pump(
        &s,
        &mut events,
        "the limited task to run out of time",
        |v| v.state("limited-native") == Some(TaskState::Failed),
    )
    .await;
    assert_eq!(
        seen.latest["limited-native"].reason(),
        v1::Reason::MaxCompletionTimeReached
    );

    // The new agent holds them: it can kill them.
    let agent_id = agora_core::AgentId::new(agent_id.unwrap().value).unwrap();
    for t in ["long-native", "long-wasm", "long-custom"] {
        s.kill(&tid(t), Some(&agent_id)).await.unwrap();
    }
    seen.pump(&s, &mut events, "the long tasks to be killed", |v| {
        v.state("long-native") == Some(TaskState::Killed)
            && v.state("long-wasm") == Some(TaskState::Killed)
            && v.state("long-custom") == Some(TaskState::Killed)
    })
    .await;
    for t in names {
        assert_eq!(seen.ends[t].len(), 1, "{t} ended once: {:?}", seen.ends[t]);
    }
}

/// The leader of three masters and the agent die at the same moment: a new leader serves, the
/// restarted agent re-registers with it, the running tasks carry on, the one that ended
/// meanwhile is reported once with its exit status, and the registry's reservation stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_and_an_agent_killed_together_lose_nothing() {
    init_logs();
    let mut group = crate::failover::Group::start();
    let first = group.leader(None).await;
    let masters = group.list();
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentProcess::new(masters.clone(), dir.path(), "recovery-leader");
    let mut first_agent = Killed(Some(agent.command().spawn().unwrap()));
    let op = agora_sdk::Operator::connect(&masters).await.unwrap();
    wait_until("the agent to register", || async {
        op.state()
            .await
            .is_ok_and(|s| s.agents.iter().any(|a| a.active))
    })
    .await;
    let mut config = SchedulerConfig::new(masters.clone(), "together");
    config.framework.roles = vec!["eng".into()];
    config.framework.principal = "alice".into();
    config.framework.failover_timeout = 600.0;
    let (s, mut events) = subscribe(config).await.unwrap();
    let Some(Event::Subscribed { .. }) = events.next().await else {
        panic!("not subscribed");
    };
    let fw = s.framework_id().unwrap();
    let offers = next_offers(&mut events).await;
    let offer = &offers[0];
    let reserve = v1::Operation {
        operation: Some(v1::operation::Operation::Reserve(v1::operation::Reserve {
            resources: agora_proto::resources_to_proto(
                &agora_core::parse_resources("cpus(eng,alice):1;mem(eng,alice):128").unwrap(),
            ),
        })),
    };
    let launch = v1::Operation {
        operation: Some(v1::operation::Operation::Launch(v1::operation::Launch {
            tasks: vec![
                command("long-native", "exec sleep 600", "cpus:0.2;mem:64").build_for(offer),
                command("short-native", "sleep 3; exit 3", "cpus:0.2;mem:64").build_for(offer),
                wasm_task("long-wasm", "sleeper", "cpus:0.2;mem:64")
                    .args(["600"])
                    .build_for(offer),
            ],
        })),
    };
    s.accept_operations(
        &[offer.id.clone().unwrap()],
        vec![reserve, launch],
        Some(0.0),
    )
    .await
    .unwrap();
    let mut seen = Seen::default();
    let names = ["long-native", "short-native", "long-wasm"];
    seen.pump(&s, &mut events, "every task to run", |v| {
        names.iter().all(|t| v.state(t) == Some(TaskState::Running))
    })
    .await;
    let reserved = |st: &v1::GetStateResponse| {
        st.agents
            .iter()
            .map(|a| {
                agora_proto::resources_from_proto(&a.total)
                    .unwrap()
                    .reserved_for("eng")
            })
            .fold(agora_core::Resources::new(), |a, b| a + b)
    };
    wait_until("the reservation to show", || async {
        op.state().await.is_ok_and(|st| !reserved(&st).is_empty())
    })
    .await;
    let before = reserved(&op.state().await.unwrap());

    group.procs[first].kill();
    first_agent.kill();
    let native = agent.sandbox(&fw, "short-native").unwrap();
    wait_until("the short task to end with no agent", || async {
        native.join(agora_agent::native::EXIT_FILE).exists()
    })
    .await;
    let _second_agent = Proc(agent.command().spawn().unwrap());
    let next = group.leader(Some(first)).await;
    assert_ne!(next, first);

    seen.pump(&s, &mut events, "the short task's end", |v| {
        v.state("short-native") == Some(TaskState::Failed)
    })
    .await;
    assert_eq!(seen.latest["short-native"].exit_code, Some(3));
    // Reconciliation through the new leader: the long ones are running on the same agent.
    let ids = [tid("long-native"), tid("long-wasm")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = s.reconcile(&ids).await;
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match events.next().await {
                    Some(Event::Update(st)) => {
                        let running = state_of(&st) == TaskState::Running;
                        seen.note(st);
                        if running
                            && seen.state("long-native") == Some(TaskState::Running)
                            && seen.state("long-wasm") == Some(TaskState::Running)
                        {
                            return true;
                        }
                    }
                    Some(Event::Offers(o)) => {
                        let ids: Vec<v1::OfferId> = o.iter().filter_map(|o| o.id.clone()).collect();
                        let _ = s.decline(&ids, Some(0.0)).await;
                    }
                    Some(_) => {}
                    None => return false,
                }
            }
        })
        .await;
        if got == Ok(true) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the long tasks were not reported running: {:?}",
            seen.latest.keys()
        );
    }
    wait_until("the agent to be back with the new leader", || async {
        op.state()
            .await
            .is_ok_and(|st| st.agents.len() == 1 && st.agents[0].active && reserved(&st) == before)
    })
    .await;
    for t in names {
        let ends = seen.ends.get(t).map_or(0, Vec::len);
        assert_eq!(ends, usize::from(t == "short-native"), "{t}: {ends} ends");
    }
}

/// The pids of the `agora __wasm-executor` processes in cgroups under `parent` (not the
/// `agora __init -- agora __wasm-executor` that supervises each).
fn wasm_executors(parent: &str) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| in_cgroup(*pid, parent))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"__wasm-executor"))
        })
        .collect()
}

fn in_cgroup(pid: i32, parent: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(parent))
}

/// Whether `pid` has exited (a zombie has: only its parent's wait is left).
fn ended(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    })
}

/// Kills what is left in the cgroups under `parent` and removes them, so a test that fails
/// half-way (its agent killed with SIGKILL, an executor stopped) leaves nothing behind.
struct Reap(String);

impl Drop for Reap {
    fn drop(&mut self) {
        fn dirs(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs(&e.path(), out);
                }
            }
            out.push(d.to_owned());
        }
        // A name that is empty, absolute or climbs would reach cgroups not the test's.
        let name = Path::new(&self.0);
        assert!(
            !self.0.is_empty()
                && name
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))),
            "not a test's cgroup name: {:?}",
            self.0
        );
        let mut all = Vec::new();
        // cgroup v2 (`/sys/fs/cgroup/NAME`) and each v1 hierarchy (`/sys/fs/cgroup/H/NAME`).
        let hierarchies = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten();
        let roots =
            std::iter::once(PathBuf::from("/sys/fs/cgroup")).chain(hierarchies.map(|h| h.path()));
        for root in roots {
            let top = root.join(name);
            if top.is_dir() {
                dirs(&top, &mut all);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for d in &all {
            loop {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                let pids: Vec<i32> = procs.lines().filter_map(|l| l.parse().ok()).collect();
                if pids.is_empty() || std::time::Instant::now() > deadline {
                    break;
                }
                for pid in pids {
                    // SAFETY: kill(2) on a member of this test's own cgroup.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// An executor that is alive but never subscribes again after its agent restarted (here:
/// stopped with SIGSTOP) is killed after `--executor-reregistration-timeout`, and its task
/// ends with REASON_EXECUTOR_REGISTRATION_TIMEOUT instead of being reported running forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_that_does_not_return_after_an_agent_restart_is_killed() {
    let cluster = Cluster::start_with(patient_master(), &[]).await;
    let agent = AgentProcess::new(cluster.master.clone(), cluster.dir.path(), "recovery-stuck");
    let _reap = Reap(agent.cgroup_parent.clone());
    let mut first = Killed(Some(agent.command().spawn().unwrap()));
    cluster.wait_for_agents(1).await;
    let (s, mut events) = cluster.framework("stuck").await;
    let offers = next_offers(&mut events).await;
    let offer = &offers[0];
    let task = wasm_task("stuck-wasm", "sleeper", "cpus:0.2;mem:64")
        .args(["600"])
        .build_for(offer);
    s.accept(&[offer.id.clone().unwrap()], vec![task], Some(0.0))
        .await
        .unwrap();
    let mut seen = Seen::default();
    seen.pump(&s, &mut events, "the task to run", |v| {
        v.state("stuck-wasm") == Some(TaskState::Running)
    })
    .await;
    let executors = wasm_executors(&agent.cgroup_parent);
    let [pid] = executors[..] else {
        let cmds: Vec<_> = executors
            .iter()
            .map(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            })
            .collect();
        panic!("expected one Wasm executor, found {cmds:?}");
    };

    first.kill();
    // SAFETY: kill(2) on the executor this test's agent started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let mut again = agent.command();
    again.args(["--executor-reregistration-timeout", "1s"]);
    let _second = Proc(again.spawn().unwrap());

    // The point is that it ends rather than runs for ever: a restart of the (debug) agent,
    // its re-registration, the 1 s timeout and the update's way back can take well over
    // 10 s on two cores busy with the rest of the suite.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let pumped = tokio::time::timeout_at(
        deadline,
        seen.pump(&s, &mut events, "the task to end", |v| {
            v.state("stuck-wasm").is_some_and(TaskState::is_terminal)
        }),
    )
    .await;
    assert!(
        pumped.is_ok(),
        "the task did not end within 30 s: {:?}",
        seen.latest.get("stuck-wasm")
    );
    let end = &seen.latest["stuck-wasm"];
    assert_eq!(
        end.reason(),
        v1::Reason::ExecutorRegistrationTimeout,
        "{end:?}"
    );
    // The flag's timeout, not the default's (5 s).
    assert!(end.message.contains("within 1s"), "{end:?}");
    wait_until("the stopped executor to be killed", || async { ended(pid) }).await;
}
