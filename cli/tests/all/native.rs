//! Native `command` tasks through the whole cluster: processes in cgroups on this host (the
//! tests run as root, as CI does), and without cgroups.

use std::time::{Duration, Instant};

use agora_core::{TaskState, parse_resources};
use agora_proto::{state_from_proto, v1};
use agora_sdk::{TaskBuilder, read_sandbox_file};

use crate::*;

pub fn command(id: &str, script: &str, resources: &str) -> TaskBuilder {
    TaskBuilder::command(tid(id), script).resources(parse_resources(resources).unwrap())
}

/// A cluster with one agent whose task cgroups live under `parent(test)`.
pub async fn start(test: &str, cgroup_root: Option<&std::path::Path>) -> Cluster {
    start_with(test, cgroup_root, |_| {}).await
}

/// As [`start`], with the agent's settings changed by `tweak` first.
pub async fn start_with(
    test: &str,
    cgroup_root: Option<&std::path::Path>,
    tweak: impl FnOnce(&mut agora_agent::AgentConfig),
) -> Cluster {
    start_full(test, fast_master(), cgroup_root, tweak).await
}

/// As [`start_with`], with a master of `master`'s settings.
pub async fn start_with_master(
    test: &str,
    master: agora_master::MasterConfig,
    tweak: impl FnOnce(&mut agora_agent::AgentConfig),
) -> Cluster {
    start_full(test, master, None, tweak).await
}

async fn start_full(
    test: &str,
    master: agora_master::MasterConfig,
    cgroup_root: Option<&std::path::Path>,
    tweak: impl FnOnce(&mut agora_agent::AgentConfig),
) -> Cluster {
    let mut cluster = Cluster::start_with(master, &[]).await;
    let mut config = cluster.agent_config("cpus:2;mem:1024;disk:1024");
    config.native.kill_grace = Duration::from_millis(500);
    config.native.cgroup_parent = parent(test);
    config.native.init = Some(vec![
        env!("CARGO_BIN_EXE_agora").into(),
        "__init".into(),
        "--".into(),
    ]);
    if let Some(root) = cgroup_root {
        // As on a machine where the agent is not root: no cgroups, no namespaces.
        config.native.cgroup_root = root.to_owned();
        config.native.namespaces = false;
    }
    // The tests' files are in temporary directories.
    config.fetcher.file_roots = vec![std::fs::canonicalize(std::env::temp_dir()).unwrap()];
    tweak(&mut config);
    cluster.add_agent_with(config).await;
    cluster.wait_for_agents(1).await;
    cluster
}

pub fn parent(test: &str) -> String {
    format!("agora-test-{}-{test}", std::process::id())
}

/// Cgroups under `parent(test)` in any controller: none once every container is gone.
pub fn cgroups_left(test: &str) -> Vec<std::path::PathBuf> {
    let parent = parent(test);
    let mut left = Vec::new();
    for root in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = root.path().join(&parent);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                left.push(e.path());
            }
        }
    }
    left
}

/// Waits until no cgroup of `test` is left.
pub async fn wait_no_cgroups(test: &str) {
    wait_until("the test's cgroups to go", || async {
        cgroups_left(test).is_empty()
    })
    .await;
}

/// Waits until a task of `test` runs under its PID-namespace init and both init processes
/// (outside and PID 1 inside) catch SIGTERM: from then on a SIGTERM reaches the task. One sent
/// before the init set its handlers would be lost (PID 1 ignores signals it does not catch).
pub async fn wait_forwarding(test: &str) {
    wait_until("the task's init to forward SIGTERM", || async {
        let mut pids: Vec<String> = cgroups_left(test)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|p| p.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        pids.sort();
        pids.dedup();
        let comm =
            |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let catches_term = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
        };
        let inits: Vec<&String> = pids.iter().filter(|p| comm(p).trim() == "agora").collect();
        inits.len() == 2
            && inits.iter().all(|p| catches_term(p))
            && pids.iter().any(|p| comm(p).trim() != "agora")
    })
    .await;
}

/// The agent's Sandbox API address.
pub async fn endpoint(cluster: &Cluster) -> String {
    cluster.state().await.agents[0]
        .info
        .as_ref()
        .unwrap()
        .endpoint
        .clone()
}

fn isolation(state: &v1::GetStateResponse) -> String {
    state.agents[0].info.as_ref().unwrap().isolation.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_runs_in_its_sandbox_with_its_environment() {
    let cluster = start("a_command_runs_in_its_sandbox_with_its_environment", None).await;
    let iso = isolation(&cluster.state().await);
    assert!(iso.contains("cgroups-v"), "{iso}");
    let (s, mut events) = cluster.framework("native").await;
    let task = command(
        "env",
        "echo \"$AGORA_TASK_ID $MESOS_TASK_ID $(pwd) $MESOS_SANDBOX\"; echo oops >&2; cat /proc/self/cgroup; test -f \"$MESOS_SANDBOX/stdout\" && echo sandbox-visible",
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
    // Its sandbox is at its path even though the work directory is under the private /tmp.
    assert!(out.ends_with("sandbox-visible\n"), "{out}");
    let err = read_sandbox_file(&endpoint, &fw, &tid("env"), "stderr")
        .await
        .unwrap();
    assert_eq!(err, b"oops\n");
    let usage = end.usage.unwrap();
    assert!(usage.wall_seconds > 0.0);
    // Every update says what isolation the task got.
    assert!(
        end.isolation.starts_with("cgroups-v") && end.isolation.contains("pid-ns+mnt-ns"),
        "{}",
        end.isolation
    );
    assert!(!end.isolation.contains("net-ns"), "{}", end.isolation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_as_its_user_and_unknown_users_are_refused() {
    let test = "a_task_runs_as_its_user_and_unknown_users_are_refused";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("native").await;
    let script = "id -u; id -g; echo written > own-file && echo wrote; echo $$";
    launch(
        &s,
        &mut events,
        command("as-nobody", script, "cpus:0.1;mem:32").user("nobody"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("as-nobody")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("as-nobody"), "stdout")
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "65534", "{out}");
    assert_eq!(lines[2], "wrote", "the user owns its sandbox: {out}");
    assert_eq!(lines[3], "2", "still in its PID namespace: {out}");

    launch(
        &s,
        &mut events,
        command("as-ghost", "true", "cpus:0.1;mem:32").user("no-such-user-here"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("as-ghost")).await;
    assert_eq!(state_of(&end), TaskState::Error);
    assert!(
        end.message.contains("\"no-such-user-here\" does not exist"),
        "{}",
        end.message
    );
    assert!(cgroups_left(test).is_empty());
}

/// A task that names no user runs as its framework's user; with neither, as the agent's
/// default (nobody).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_without_a_user_runs_as_its_frameworks() {
    let test = "a_task_without_a_user_runs_as_its_frameworks";
    let cluster = start(test, None).await;
    let mut config = SchedulerConfig::new(cluster.master.clone(), "daemons");
    config.framework.user = "daemon".into();
    let (s, mut events) = cluster.framework_with(config).await;
    launch(
        &s,
        &mut events,
        command("theirs", "id -u", "cpus:0.1;mem:32"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("theirs")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    assert_eq!(stdout_of(&s, &cluster, "theirs").await, "1", "daemon's uid");
    // Its offers go back: the next framework is offered the agent.
    s.teardown().await.unwrap();

    let (s, mut events) = cluster.framework("anyone").await;
    launch(
        &s,
        &mut events,
        command("default", "id -u", "cpus:0.1;mem:32"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("default")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    assert_eq!(stdout_of(&s, &cluster, "default").await, "65534", "nobody");
}

/// A native task starts under the default seccomp filter and no_new_privs, and says so in
/// its isolation: creating a user namespace (which `nobody` may do here) is refused. An
/// agent started without them (`--no-seccomp`) lets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_start_under_seccomp_unless_the_agent_opts_out() {
    let probe = "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status | tr -s '\\t ' ' '; \
                 if unshare --user true 2>/dev/null; then echo unshare=ok; else echo unshare=refused; fi";
    for (seccomp, test) in [
        (true, "tasks_start_under_seccomp"),
        (false, "tasks_start_without_seccomp"),
    ] {
        let cluster = start_with(test, None, |c| c.native.seccomp = seccomp).await;
        let (s, mut events) = cluster.framework("native").await;
        launch(&s, &mut events, command("probe", probe, "cpus:0.1;mem:32")).await;
        let end = wait_terminal(&mut events, &tid("probe")).await;
        assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
        let out = stdout_of(&s, &cluster, "probe").await;
        let expected = if seccomp {
            ["NoNewPrivs: 1", "Seccomp: 2", "unshare=refused"]
        } else {
            ["NoNewPrivs: 0", "Seccomp: 0", "unshare=ok"]
        };
        for line in expected {
            assert!(
                out.contains(line),
                "{line:?} not in {out:?} (seccomp {seccomp})"
            );
        }
        assert_eq!(
            end.isolation.contains("seccomp+no-new-privs"),
            seccomp,
            "{}",
            end.isolation
        );
        assert_eq!(
            isolation(&cluster.state().await).contains("seccomp"),
            seccomp
        );
        s.teardown().await.unwrap();
    }
}

/// The trimmed stdout of task `t` of `s`'s framework.
async fn stdout_of(s: &Scheduler, cluster: &Cluster, t: &str) -> String {
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(cluster).await, &fw, &tid(t), "stdout")
        .await
        .unwrap();
    String::from_utf8_lossy(&out).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_user_off_runs_tasks_as_the_agent() {
    let test = "switch_user_off_runs_tasks_as_the_agent";
    // The agent is root here, so running tasks as itself needs root tasks allowed.
    let cluster = start_with(test, None, |c| {
        c.native.switch_user = false;
        c.native.allow_root = true;
    })
    .await;
    let (s, mut events) = cluster.framework("native").await;
    launch(
        &s,
        &mut events,
        command("as-agent", "id -u", "cpus:0.1;mem:32").user("nobody"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("as-agent")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("as-agent"), "stdout")
        .await
        .unwrap();
    assert_eq!(out, b"0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_isolation_is_given_or_the_task_is_refused() {
    let test = "required_isolation_is_given_or_the_task_is_refused";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("native").await;
    let task = offline(command("strict", "true", "cpus:0.1;mem:32"))
        .require_isolation("cgroups")
        .require_isolation("memory")
        .require_isolation("pid-ns")
        .require_isolation("net-ns");
    launch(&s, &mut events, task).await;
    let running = wait_state(&mut events, &tid("strict"), TaskState::Running).await;
    assert!(
        running.isolation.contains("net-ns"),
        "{}",
        running.isolation
    );
    let end = wait_terminal(&mut events, &tid("strict")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);

    // On the host network there is no network namespace to give.
    let task = command("wants-netns", "true", "cpus:0.1;mem:32").require_isolation("net-ns");
    launch(&s, &mut events, task).await;
    let end = wait_terminal(&mut events, &tid("wants-netns")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Error, v1::Reason::IsolationUnavailable),
        "{}",
        end.message
    );
    let task = command("typo", "true", "cpus:0.1;mem:32").require_isolation("cgroup");
    launch(&s, &mut events, task).await;
    let end = wait_terminal(&mut events, &tid("typo")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Error, v1::Reason::TaskInvalid)
    );
    assert!(
        end.message.contains("unknown isolation \"cgroup\""),
        "{}",
        end.message
    );
    assert!(cgroups_left(test).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_fails_for_memory_and_the_agent_keeps_serving() {
    let cluster = start(
        "a_memory_bomb_fails_for_memory_and_the_agent_keeps_serving",
        None,
    )
    .await;
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
async fn a_fork_bomb_stops_at_the_tasks_pids_max_and_is_killed() {
    let test = "a_fork_bomb_stops_at_the_tasks_pids_max_and_is_killed";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("native").await;
    // Forks without end; each fork that fails is retried.
    let bomb = "while :; do (sleep 600 &) 2>/dev/null; done";
    launch(
        &s,
        &mut events,
        command("bomb", bomb, "cpus:0.5;mem:256").pids_max(40),
    )
    .await;
    // The rest of the agent is offered at once: keep it for a task to run beside the bomb.
    let rest = next_offers(&mut events).await.remove(0);
    let endpoint = endpoint(&cluster).await;
    // It reaches its cap and stays there.
    wait_until("the bomb to reach pids.max", || async {
        agora_sdk::agent_containers(&endpoint)
            .await
            .unwrap()
            .iter()
            .any(|c| c.usage.is_some_and(|u| u.pids >= 38))
    })
    .await;
    // It stays at its cap: watching it for a while is the test, so this waits on purpose.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(300) {
        let cs = agora_sdk::agent_containers(&endpoint).await.unwrap();
        assert!(cs[0].usage.unwrap().pids <= 40, "{cs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent still serves while the bomb runs, and the bomb dies on KILL.
    let calm = command("calm", "true", "cpus:0.1;mem:32").build_for(&rest);
    s.accept(&[rest.id.clone().unwrap()], vec![calm], Some(0.0))
        .await
        .unwrap();
    let end = wait_terminal(&mut events, &tid("calm")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    s.kill(&tid("bomb"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("bomb")).await;
    assert_eq!(state_of(&end), TaskState::Killed, "{}", end.message);
    wait_no_cgroups(test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let cluster = start(
        "a_task_that_ignores_sigterm_is_killed_after_the_grace_period",
        None,
    )
    .await;
    let (s, mut events) = cluster.framework("native").await;
    let task = command(
        "stubborn",
        "trap '' TERM; (setsid sleep 1000 &); echo trapped; while :; do sleep 1; done",
        "cpus:0.1;mem:32",
    )
    // The task's own grace period wins over the agent's (500 ms here).
    .kill_grace(Duration::from_millis(1200));
    launch(&s, &mut events, task).await;
    wait_state(&mut events, &tid("stubborn"), TaskState::Running).await;
    // Kill it only once it ignores SIGTERM and its daemon is out.
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    wait_until("the task to set its trap", || async {
        read_sandbox_file(&ep, &fw, &tid("stubborn"), "stdout")
            .await
            .is_ok_and(|o| o.starts_with(b"trapped"))
    })
    .await;
    let t = Instant::now();
    s.kill(&tid("stubborn"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("stubborn")).await;
    assert_eq!(state_of(&end), TaskState::Killed, "{}", end.message);
    assert!(
        t.elapsed() >= Duration::from_millis(1150),
        "{:?}",
        t.elapsed()
    );
    // The daemon it double-forked went with it: no cgroup of this test is left (a task's
    // cgroup cannot be removed while a process is in it).
    wait_no_cgroups("a_task_that_ignores_sigterm_is_killed_after_the_grace_period").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cgroups_tasks_run_and_the_agent_says_so() {
    let empty = tempfile::tempdir().unwrap();
    let cluster = start(
        "without_cgroups_tasks_run_and_the_agent_says_so",
        Some(empty.path()),
    )
    .await;
    assert!(
        isolation(&cluster.state().await).ends_with("seccomp+no-new-privs+process-group+rlimits"),
        "{}",
        isolation(&cluster.state().await)
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
    // Without root, seccomp and no_new_privs are still there (they need no privilege).
    assert_eq!(end.isolation, "seccomp+no-new-privs+process-group+rlimits");
    // Isolation it cannot give is refused.
    launch(
        &s,
        &mut events,
        command("needs-cgroups", "true", "cpus:0.1;mem:32").require_isolation("memory"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("needs-cgroups")).await;
    assert_eq!(
        (state_of(&end), end.reason()),
        (TaskState::Error, v1::Reason::IsolationUnavailable),
        "{}",
        end.message
    );
    assert!(
        end.message.contains("it would get seccomp+no-new-privs"),
        "{}",
        end.message
    );
    launch(
        &s,
        &mut events,
        offline(command("offline", "true", "cpus:0.1;mem:32")),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("offline")).await;
    assert_eq!(state_of(&end), TaskState::Error, "{}", end.message);
    assert!(end.message.contains("network: none"), "{}", end.message);
}

fn offline(b: TaskBuilder) -> TaskBuilder {
    let mut t = b.build();
    if let Some(v1::task_info::Payload::Command(c)) = &mut t.payload {
        c.network = v1::command_task::Network::None as i32;
        c.hostname = "sealed".into();
    }
    TaskBuilder::from_info(t)
}

/// Answers every connection with a tiny HTTP response.
async fn http_listener() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = c
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_none_cannot_reach_the_hosts_loopback() {
    let cluster = start("network_none_cannot_reach_the_hosts_loopback", None).await;
    let port = http_listener().await;
    let (s, mut events) = cluster.framework("native").await;
    // A file in the host's /tmp that no task may see.
    let marker = format!("/tmp/agora-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host").unwrap();
    let script = format!(
        "curl -s -m 2 -o /dev/null http://127.0.0.1:{port}/ && echo reached || echo blocked; hostname; echo x > /tmp/probe-{pid}; ls /tmp",
        pid = std::process::id()
    );
    launch(
        &s,
        &mut events,
        command("online", &script, "cpus:0.1;mem:64"),
    )
    .await;
    launch(
        &s,
        &mut events,
        offline(command("sealed", &script, "cpus:0.1;mem:64")),
    )
    .await;
    let fw = s.framework_id().unwrap();
    let endpoint = cluster.state().await.agents[0]
        .info
        .as_ref()
        .unwrap()
        .endpoint
        .clone();
    // Both end in either order; take each one's terminal update as it comes.
    let mut ended = std::collections::HashMap::new();
    while ended.len() < 2 {
        let st = next_matching(&mut events, "online and sealed to end", |e| match e {
            agora_sdk::Event::Update(st)
                if state_from_proto(st.state()).is_some_and(TaskState::is_terminal) =>
            {
                Some(st)
            }
            _ => None,
        })
        .await;
        ended.insert(st.task_id.clone().unwrap().value, st);
    }
    let mut outs = Vec::new();
    for id in ["online", "sealed"] {
        let end = &ended[id];
        assert_eq!(state_of(end), TaskState::Finished, "{id}: {}", end.message);
        let out = read_sandbox_file(&endpoint, &fw, &tid(id), "stdout")
            .await
            .unwrap();
        outs.push(String::from_utf8_lossy(&out).into_owned());
    }
    let lines = |o: &str| o.lines().map(str::to_owned).collect::<Vec<_>>();
    let (online, sealed) = (lines(&outs[0]), lines(&outs[1]));
    assert_eq!(
        online[..2],
        ["reached".to_owned(), "online".to_owned()],
        "{outs:?}"
    );
    assert_eq!(
        sealed[..2],
        ["blocked".to_owned(), "sealed".to_owned()],
        "{outs:?}"
    );
    // Each had a /tmp of its own: its own file there, none of the host's (what shows
    // besides is the path to its sandbox or program, kept visible when under /tmp).
    let probe = format!("probe-{}", std::process::id());
    let host_marker = format!("agora-host-marker-{}", std::process::id());
    for listing in [&online[2..], &sealed[2..]] {
        assert!(listing.contains(&probe), "{outs:?}");
        assert!(
            !listing.contains(&host_marker),
            "the host's /tmp showed: {outs:?}"
        );
    }
    assert!(!std::path::Path::new("/tmp").join(&probe).exists());
    let _ = std::fs::remove_file(&marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_rotate_at_their_size_bound() {
    let mut cluster = Cluster::start(&[]).await;
    let mut config = cluster.agent_config("cpus:2;mem:1024");
    config.native.cgroup_parent = parent("logs_rotate_at_their_size_bound");
    config.native.log_max_bytes = Some(10_000);
    config.native.log_keep = 2;
    cluster.add_agent_with(config).await;
    cluster.wait_for_agents(1).await;
    let (s, mut events) = cluster.framework("native").await;
    // 1,000 numbered lines of 50 bytes: 50,000 bytes through a 10,000-byte log.
    let script = "i=1; while [ $i -le 1000 ]; do printf '%049d\\n' $i; i=$((i+1)); done";
    launch(
        &s,
        &mut events,
        command("chatty", script, "cpus:0.5;mem:64"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("chatty")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let st = cluster.state().await;
    let fw = s.framework_id().unwrap();
    let endpoint = st.agents[0].info.as_ref().unwrap().endpoint.clone();
    let mut all = Vec::new();
    for name in ["stdout.2", "stdout.1", "stdout"] {
        let f = read_sandbox_file(&endpoint, &fw, &tid("chatty"), name)
            .await
            .unwrap();
        assert!(f.len() <= 10_000, "{name}: {} bytes", f.len());
        all.extend(f);
    }
    assert!(
        read_sandbox_file(&endpoint, &fw, &tid("chatty"), "stdout.3")
            .await
            .is_err()
    );
    // The newest 30,000 bytes or less are kept, in order, ending with the last line.
    let text = String::from_utf8(all).unwrap();
    assert!(
        text.ends_with(&format!("{:049}\n", 1000)),
        "{}",
        &text[text.len() - 100..]
    );
    let numbers: Vec<u32> = text
        .lines()
        .filter(|l| l.len() == 49)
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "lines out of order"
    );
    assert_eq!(numbers.len(), 600, "three full files of 200 lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tasks_usage_is_reported() {
    let cluster = start("a_running_tasks_usage_is_reported", None).await;
    let (s, mut events) = cluster.framework("native").await;
    launch(
        &s,
        &mut events,
        command("busy", "while :; do :; done", "cpus:0.5;mem:64"),
    )
    .await;
    wait_state(&mut events, &tid("busy"), TaskState::Running).await;
    let endpoint = cluster.state().await.agents[0]
        .info
        .as_ref()
        .unwrap()
        .endpoint
        .clone();
    let deadline = Instant::now() + WAIT;
    let usage = loop {
        let cs = agora_sdk::agent_containers(&endpoint).await.unwrap();
        let found = cs
            .iter()
            .find(|c| c.task_id.as_ref().unwrap().value == "busy");
        if let Some(c) = found {
            assert_eq!(c.containerizer, "native");
            let u = c.usage.unwrap();
            if u.cpu_seconds > 0.2 {
                break u;
            }
        }
        assert!(Instant::now() < deadline, "no CPU time shown: {cs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(usage.mem_bytes > 0 && usage.pids >= 1, "{usage:?}");

    // The same through the command line.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["tasks", "--usage", "--master", &cluster.master])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().next().unwrap().contains("PEAK(MIB)"),
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with("busy")).unwrap();
    assert!(!row.contains(" - "), "no usage in {row}");

    s.kill(&tid("busy"), None).await.unwrap();
    wait_state(&mut events, &tid("busy"), TaskState::Killed).await;
    assert!(
        agora_sdk::agent_containers(&endpoint)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_has_its_own_pid_namespace_and_stops_on_sigterm() {
    let cluster = start(
        "a_task_has_its_own_pid_namespace_and_stops_on_sigterm",
        None,
    )
    .await;
    let iso = isolation(&cluster.state().await);
    assert!(iso.contains("pid-ns"), "{iso}");
    let (s, mut events) = cluster.framework("native").await;
    // An orphan is left behind to be reaped; then count what the namespace holds.
    let script = "echo $$; (sleep 0.05 &); sleep 0.2; ls /proc | grep -c '^[0-9]*$'";
    launch(&s, &mut events, command("pidns", script, "cpus:0.1;mem:32")).await;
    let end = wait_terminal(&mut events, &tid("pidns")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let endpoint = cluster.state().await.agents[0]
        .info
        .as_ref()
        .unwrap()
        .endpoint
        .clone();
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint, &fw, &tid("pidns"), "stdout")
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "the task is PID 1's child: {out}");
    let n: u32 = lines[1].parse().unwrap();
    assert!(n <= 6, "{n} processes visible in the task's namespace");

    // SIGTERM reaches the task through its init: it ends long before the grace period.
    let task =
        command("sleeper", "sleep 1000", "cpus:0.1;mem:32").kill_grace(Duration::from_secs(10));
    launch(&s, &mut events, task).await;
    wait_state(&mut events, &tid("sleeper"), TaskState::Running).await;
    wait_forwarding("a_task_has_its_own_pid_namespace_and_stops_on_sigterm").await;
    let t = Instant::now();
    s.kill(&tid("sleeper"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("sleeper")).await;
    assert_eq!(state_of(&end), TaskState::Killed);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_under_tmp_still_runs_inside_its_private_tmp() {
    let test = "a_program_under_tmp_still_runs_inside_its_private_tmp";
    let cluster = start(test, None).await;
    // A program whose file is under /tmp, which the task's private /tmp covers.
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let prog = dir.path().join("echo-copy");
    std::fs::copy("/bin/echo", &prog).unwrap();
    let mut t = command("from-tmp", "", "cpus:0.1;mem:32").build();
    if let Some(v1::task_info::Payload::Command(c)) = &mut t.payload {
        c.value = prog.to_string_lossy().into_owned();
        c.shell = false;
        c.arguments = vec!["ran".into()];
    }
    let (s, mut events) = cluster.framework("native").await;
    launch(&s, &mut events, TaskBuilder::from_info(t)).await;
    let end = wait_terminal(&mut events, &tid("from-tmp")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("from-tmp"), "stdout")
        .await
        .unwrap();
    assert_eq!(out, b"ran\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_without_a_shebang_runs_through_the_shell_as_execvp_would() {
    let test = "a_script_without_a_shebang_runs_through_the_shell_as_execvp_would";
    let cluster = start(test, None).await;
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let script = dir.path().join("no-shebang");
    std::fs::write(&script, "echo \"script says $1\"\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut t = command("script", "", "cpus:0.1;mem:32").build();
    if let Some(v1::task_info::Payload::Command(c)) = &mut t.payload {
        c.value = script.to_string_lossy().into_owned();
        c.shell = false;
        c.arguments = vec!["hi".into()];
    }
    let (s, mut events) = cluster.framework("native").await;
    launch(&s, &mut events, TaskBuilder::from_info(t)).await;
    let end = wait_terminal(&mut events, &tid("script")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("script"), "stdout")
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out), "script says hi\n");
}
