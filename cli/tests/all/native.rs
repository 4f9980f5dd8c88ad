//! Native `command` tasks through the whole cluster: processes in cgroups on this host (the
//! tests run as root, as CI does), and without cgroups.

use std::time::{Duration, Instant};

use agora_core::{TaskState, parse_resources};
use agora_proto::v1;
use agora_sdk::{TaskBuilder, read_sandbox_file};

use crate::*;

fn command(id: &str, script: &str, resources: &str) -> TaskBuilder {
    TaskBuilder::command(tid(id), script).resources(parse_resources(resources).unwrap())
}

async fn start(cgroup_root: Option<&std::path::Path>) -> Cluster {
    let mut cluster = Cluster::start(&[]).await;
    let mut config = cluster.agent_config("cpus:2;mem:1024");
    config.native.kill_grace = Duration::from_millis(500);
    config.native.cgroup_parent = format!("agora-test-{}", std::process::id());
    if let Some(root) = cgroup_root {
        config.native.cgroup_root = root.to_owned();
    }
    cluster.add_agent_with(config).await;
    cluster.wait_for_agents(1).await;
    cluster
}

fn isolation(state: &v1::GetStateResponse) -> String {
    state.agents[0].info.as_ref().unwrap().isolation.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_in_its_sandbox_with_its_environment() {
    let cluster = start(None).await;
    let iso = isolation(&cluster.state().await);
    assert!(iso.contains("cgroups-v"), "{iso}");
    let (s, mut events) = cluster.framework("native").await;
    let task = command(
        "env",
        "echo \"$AGORA_TASK_ID $MESOS_TASK_ID $(pwd) $MESOS_SANDBOX\"; echo oops >&2; cat /proc/self/cgroup",
        "cpus:0.5;mem:64",
    );
    launch(&s, &mut events, task).await;
    wait_state(&mut events, &tid("env"), TaskState::Running).await;
    let end = wait_terminal(&mut events, &tid("env")).await;
    assert_eq!(
        (state_of(&end), end.exit_code),
        (TaskState::Finished, Some(0)),
        "{}",
        end.message
    );
    let st = cluster.state().await;
    let fw = s.framework_id().unwrap();
    let agent = &st.agents[0];
    let endpoint = agent.info.as_ref().unwrap().endpoint.clone();
    let out = read_sandbox_file(&endpoint, &fw, &tid("env"), "stdout")
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let first: Vec<&str> = out.lines().next().unwrap().split(' ').collect();
    assert_eq!(&first[..2], ["env", "env"]);
    assert_eq!(first[2], first[3], "the working directory is the sandbox");
    assert!(
        out.contains(&format!("agora-test-{}", std::process::id())),
        "not in its cgroup: {out}"
    );
    let err = read_sandbox_file(&endpoint, &fw, &tid("env"), "stderr")
        .await
        .unwrap();
    assert_eq!(err, b"oops\n");
    let usage = end.usage.unwrap();
    assert!(usage.wall_seconds > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_fails_for_memory_and_the_agent_keeps_serving() {
    let cluster = start(None).await;
    let (s, mut events) = cluster.framework("native").await;
    launch(
        &s,
        &mut events,
        command(
            "bomb",
            "head -c 2000000000 /dev/zero | tail",
            "cpus:0.5;mem:48",
        ),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("bomb")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Failed, v1::Reason::ContainerLimitationMemory),
        "{}",
        end.message
    );
    assert!(
        end.message.contains("limit of 48 MiB") && end.message.contains("peak"),
        "{}",
        end.message
    );
    assert!(end.usage.unwrap().mem_peak_bytes > 24 << 20);

    launch(
        &s,
        &mut events,
        command("after", "exit 3", "cpus:0.1;mem:32"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("after")).await;
    assert_eq!(
        (state_of(&end), end.exit_code),
        (TaskState::Failed, Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let cluster = start(None).await;
    let (s, mut events) = cluster.framework("native").await;
    let task = command(
        "stubborn",
        "trap '' TERM; (setsid sleep 1000 &); while :; do sleep 1; done",
        "cpus:0.1;mem:32",
    );
    launch(&s, &mut events, task).await;
    wait_state(&mut events, &tid("stubborn"), TaskState::Running).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    s.kill(&tid("stubborn"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("stubborn")).await;
    assert_eq!(state_of(&end), TaskState::Killed, "{}", end.message);
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t.elapsed()
    );
    // The daemon it double-forked went with it: no cgroup of this test is left.
    let leftover = std::fs::read_dir("/sys/fs/cgroup/memory")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name().to_string_lossy() == format!("agora-test-{}", std::process::id())
                })
                .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
                .filter(|e| e.path().is_dir())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(leftover, 0, "a task cgroup was left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_tasks_run_and_the_agent_says_so() {
    let empty = tempfile::tempdir().unwrap();
    let cluster = start(Some(empty.path())).await;
    assert_eq!(
        isolation(&cluster.state().await).split('+').next_back(),
        Some("none")
    );
    let (s, mut events) = cluster.framework("native").await;
    launch(
        &s,
        &mut events,
        command("plain", "echo hi", "cpus:0.1;mem:32"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("plain")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
}
