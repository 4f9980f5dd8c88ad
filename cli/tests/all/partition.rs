//! A partitioned agent: the agent is an `agora agent` process in a network namespace of its
//! own, joined by a veth pair to the host, where three `agora master` processes serve; the
//! partition is its end of the pair going down.
//! Past the heartbeat timeout, a partition-aware framework's task becomes TASK_UNREACHABLE
//! and another's TASK_LOST; healed, the first is RUNNING again and the second is killed on
//! the agent, so no written-off task is left running.

use std::process::{Command, Stdio};

use crate::processes::Proc;

use agora_core::TaskState;
use agora_proto::v1;

use crate::*;

/// A network namespace with a veth pair to the host, removed (with its processes) on drop.
struct Netns {
    name: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// `None` when this host cannot make one (not root, no `ip`): the test then says so.
    fn create() -> Option<Netns> {
        let n = std::process::id() % 200 + 20;
        let name = format!("agora-pt-{}", std::process::id());
        let (host, peer) = (format!("apt{n}h"), format!("apt{n}n"));
        let host_ip = format!("10.231.{n}.1");
        let ns_ip = format!("10.231.{n}.2");
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns {
            name: name.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
        };
        let ok = ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])
            && ip(&["link", "set", &peer, "netns", &name])
            && ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host])
            && ip(&["link", "set", &host, "up"])
            && ip(&[
                "netns",
                "exec",
                &name,
                "ip",
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &peer,
            ])
            && ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"])
            && ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        ok.then_some(ns)
    }

    fn peer(&self) -> String {
        format!("apt{}n", std::process::id() % 200 + 20)
    }

    fn link(&self, up: bool) {
        assert!(ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.peer(),
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its end of the pair, and so the host's end too.
        let _ = ip(&[
            "link",
            "del",
            &format!("apt{}h", std::process::id() % 200 + 20),
        ]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

async fn framework(master: &str, name: &str, partition_aware: bool) -> (Scheduler, Events) {
    let mut config = SchedulerConfig::new(master.to_owned(), name);
    config.framework.failover_timeout = 60.0;
    if partition_aware {
        config.framework.capabilities = vec![v1::framework_info::Capability::PartitionAware as i32];
    }
    let (s, mut events) = subscribe(config).await.unwrap();
    assert!(matches!(
        events.next().await,
        Some(Event::Subscribed { .. })
    ));
    (s, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agent_is_reported_and_healed_without_duplicates() {
    init_logs();
    let Some(ns) = Netns::create() else {
        panic!("this test needs root and iproute2 to make a network namespace");
    };
    // Three masters on the host's end of the pair; the agent has their list.
    let group = crate::failover::Group::start_on(&ns.host_ip);
    group.leader(None).await;
    let master = group.list();
    let work = tempfile::tempdir().unwrap();
    let _agent = Proc(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_agora"),
                "agent",
            ])
            .args(["--master", &master, "--listen", &format!("{}:0", ns.ns_ip)])
            // A veth address, not loopback: in the clear only when told.
            .arg("--insecure")
            .args(["--resources", "cpus:2;mem:1024"])
            .args([
                "--cgroup-parent",
                &format!("agora-test-{}-partition", std::process::id()),
                "--on-exit",
                "kill",
            ])
            .arg("--work-dir")
            .arg(work.path())
            .env("AGORA_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The SDK's operator follows the leader among them.
    let op = agora_sdk::Operator::connect(&master).await.unwrap();
    wait_until("the agent to register", || async {
        op.state()
            .await
            .is_ok_and(|s| s.agents.iter().any(|a| a.active))
    })
    .await;

    let (aware, mut aware_events) = framework(&master, "aware", true).await;
    let (plain, mut plain_events) = framework(&master, "plain", false).await;
    let sleeper = |id: &str| wasm_task(id, "sleeper", "cpus:0.1;mem:32").args(["600"]);
    launch(&aware, &mut aware_events, sleeper("kept")).await;
    wait_state(&mut aware_events, &tid("kept"), TaskState::Running).await;
    launch(&plain, &mut plain_events, sleeper("written-off")).await;
    wait_state(&mut plain_events, &tid("written-off"), TaskState::Running).await;

    // The partition: past five missed heartbeats the agent is marked unreachable.
    ns.link(false);
    let s = wait_state(&mut aware_events, &tid("kept"), TaskState::Unreachable).await;
    assert_eq!(s.reason(), v1::Reason::AgentUnreachable);
    let s = wait_state(&mut plain_events, &tid("written-off"), TaskState::Lost).await;
    assert_eq!(s.reason(), v1::Reason::AgentRemoved);
    wait_until("the agent to be listed unreachable", || async {
        op.state()
            .await
            .is_ok_and(|s| s.agents.iter().any(|a| a.status == "unreachable"))
    })
    .await;

    // Healed: the agent comes back by itself.
    ns.link(true);
    let s = wait_state(&mut aware_events, &tid("kept"), TaskState::Running).await;
    assert!(s.message.contains("re-registered"), "{s:?}");
    // The written-off task is killed on the agent, not adopted: only `kept` is left.
    wait_until(
        "only the partition-aware task to be left on the agent",
        || async {
            op.state().await.is_ok_and(|s| {
                let live: Vec<&str> = s
                    .tasks
                    .iter()
                    .filter_map(|t| t.task_id.as_ref().map(|i| i.value.as_str()))
                    .collect();
                s.agents.iter().any(|a| a.active) && live == ["kept"]
            })
        },
    )
    .await;
    let endpoint = op.state().await.unwrap().agents[0]
        .info
        .clone()
        .unwrap()
        .endpoint;
    wait_until("the agent to run only the task it kept", || async {
        agora_sdk::agent_containers(&endpoint).await.is_ok_and(|c| {
            let tasks: Vec<String> = c
                .iter()
                .filter_map(|c| c.task_id.as_ref().map(|t| t.value.clone()))
                .collect();
            tasks == ["kept"]
        })
    })
    .await;
    aware.teardown().await.unwrap();
    plain.teardown().await.unwrap();
}
