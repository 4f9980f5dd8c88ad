//! Custom executors through the whole cluster: `agora executor` started by the agent for a
//! framework, running its tasks over the Executor API, and what happens when it dies.

use std::time::{Duration, Instant};

use agora_core::{ExecutorId, FrameworkId, TaskState};
use agora_proto::v1;
use agora_sdk::{agent_containers, agent_metrics, read_sandbox_file, task::executor};

use crate::native::{endpoint, start_with, wait_no_cgroups};
use crate::*;

pub(crate) fn agora_executor(id: &str) -> v1::ExecutorInfo {
    executor(
        &ExecutorId::new(id).unwrap(),
        format!("exec {} executor", env!("CARGO_BIN_EXE_agora")),
    )
}

/// A task for `executor` whose data is the shell command it runs.
pub(crate) fn in_executor(id: &str, executor: &v1::ExecutorInfo, script: &str) -> TaskBuilder {
    TaskBuilder::from_info(v1::TaskInfo {
        name: id.into(),
        task_id: Some((&tid(id)).into()),
        ..Default::default()
    })
    .resources(agora_core::parse_resources("cpus:0.2;mem:64").unwrap())
    .executor(executor.clone())
    .data(script)
}

/// The lines of `agora executor`'s stderr (in its latest run's sandbox under `work_dir`)
/// that say it subscribed, each naming the framework the agent told it of.
pub(crate) fn subscriptions(work_dir: &std::path::Path, fw: &FrameworkId, id: &str) -> Vec<String> {
    let runs = work_dir
        .join("frameworks")
        .join(fw.as_str())
        .join("executors")
        .join(id)
        .join("runs");
    let latest = std::fs::read_dir(&runs)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .max();
    latest
        .and_then(|run| std::fs::read_to_string(run.join("stderr")).ok())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(": subscribed, framework"))
        .map(str::to_owned)
        .collect()
}

async fn executors(cluster: &Cluster) -> Vec<v1::ContainerStatus> {
    agent_containers(&endpoint(cluster).await)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.task_id.is_none())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_executor_runs_a_frameworks_tasks_and_its_death_is_reported() {
    let test = "a_custom_executor_runs_a_frameworks_tasks_and_its_death_is_reported";
    let cluster = start_with(test, None, |c| {
        c.executors.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let (s, mut events) = cluster.framework("executors").await;
    let exec = agora_executor("runner");
    let script =
        "echo \"$AGORA_TASK_ID in $AGORA_EXECUTOR_ID\"; grep memory /proc/self/cgroup; pwd";
    let offer = next_offers(&mut events).await.remove(0);
    let tasks = ["one", "two"]
        .map(|id| in_executor(id, &exec, script).build_for(&offer))
        .to_vec();
    s.accept(&[offer.id.clone().unwrap()], tasks, Some(0.0))
        .await
        .unwrap();
    let fw = s.framework_id().unwrap();
    // Both tasks' updates, in whatever order they interleave.
    let mut updates: std::collections::HashMap<String, Vec<v1::TaskStatus>> = Default::default();
    while updates
        .values()
        .filter(|u| u.last().is_some_and(|s| state_of(s).is_terminal()))
        .count()
        < 2
    {
        let st = next_matching(&mut events, "one and two to end", |e| match e {
            agora_sdk::Event::Update(st) => Some(st),
            _ => None,
        })
        .await;
        updates
            .entry(st.task_id.clone().unwrap().value)
            .or_default()
            .push(st);
    }
    let mut cgroups = Vec::new();
    for id in ["one", "two"] {
        let seen = &updates[id];
        let states: Vec<TaskState> = seen.iter().map(state_of).collect();
        assert_eq!(
            states,
            [TaskState::Starting, TaskState::Running, TaskState::Finished],
            "{id}: {seen:?}"
        );
        let (running, end) = (&seen[1], &seen[2]);
        assert_eq!(running.source(), v1::StatusSource::SourceExecutor);
        assert_eq!(
            (end.exit_code, end.source()),
            (Some(0), v1::StatusSource::SourceExecutor),
            "{id}: {}",
            end.message
        );
        assert!(end.isolation.contains("cgroups-v"), "{}", end.isolation);
        let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid(id), "stdout")
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&out).into_owned();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], format!("{id} in runner"), "{out}");
        assert!(
            lines[2].contains(&format!("/tasks/{id}/runs/")),
            "ran in its own sandbox: {out}"
        );
        cgroups.push(lines[1].to_owned());
    }
    assert_eq!(cgroups[0], cgroups[1], "one executor ran both tasks");
    // The agent told the executor its framework, as the master described it.
    let told = subscriptions(&cluster.dir.path().join("agent-1"), &fw, "runner");
    assert_eq!(
        told,
        [r#"agora executor runner: subscribed, framework "executors""#]
    );
    assert!(cgroups[0].contains("executor-runner"), "{}", cgroups[0]);
    let running = executors(&cluster).await;
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].executor_id.as_ref().unwrap().value, "runner");

    // A long task, then the executor dies under it.
    launch(&s, &mut events, in_executor("long", &exec, "sleep 600")).await;
    wait_state(&mut events, &tid("long"), TaskState::Running).await;
    let pid = executors(&cluster).await[0].pid;
    assert!(pid > 0);
    // SAFETY: kill(2) on the executor's process, which this test's agent started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let end = wait_terminal(&mut events, &tid("long")).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ExecutorTerminated,
        "executor runner terminated",
    );
    // Its task's processes went with it: no cgroup of this test is left.
    wait_no_cgroups(test).await;
    assert!(executors(&cluster).await.is_empty());

    // The next task starts a new executor.
    launch(&s, &mut events, in_executor("after", &exec, "true")).await;
    let end = wait_terminal(&mut events, &tid("after")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_task_in_an_executor_and_idle_executors_stopping() {
    let test = "killing_a_task_in_an_executor_and_idle_executors_stopping";
    let cluster = start_with(test, None, |c| {
        c.executors.idle_timeout = Duration::from_millis(500);
    })
    .await;
    let (s, mut events) = cluster.framework("executors").await;
    let exec = agora_executor("killer");
    launch(
        &s,
        &mut events,
        in_executor(
            "stubborn",
            &exec,
            "trap '' TERM; echo trapped; while :; do sleep 0.05; done",
        )
        .kill_grace(Duration::from_millis(300)),
    )
    .await;
    wait_state(&mut events, &tid("stubborn"), TaskState::Running).await;
    // Only the agent's own executor may speak for it.
    let impostor = agora_sdk::executor::ExecutorEnv {
        endpoint: endpoint(&cluster).await,
        framework_id: s.framework_id().unwrap(),
        executor_id: ExecutorId::new("killer").unwrap(),
        token: "guessed".into(),
        recovery_timeout: None,
    };
    let err = impostor.subscribe().await.unwrap_err();
    assert!(
        matches!(
            &err,
            agora_sdk::Error::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );
    // RUNNING comes as the process starts; kill it only once it ignores SIGTERM.
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    wait_until("the task to set its trap", || async {
        agora_sdk::read_sandbox_file(&ep, &fw, &tid("stubborn"), "stdout")
            .await
            .is_ok_and(|o| o.starts_with(b"trapped"))
    })
    .await;
    let t = Instant::now();
    s.kill(&tid("stubborn"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("stubborn")).await;
    assert_eq!(
        (state_of(&end), end.source()),
        (TaskState::Killed, v1::StatusSource::SourceExecutor),
        "{}",
        end.message
    );
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // Without tasks the executor shuts down after its idle timeout, and nothing is left.
    wait_until("the idle executor to stop", || async {
        executors(&cluster).await.is_empty()
    })
    .await;
    let metrics = agent_metrics(&endpoint(&cluster).await).await.unwrap();
    assert_eq!(metrics["agora_agent_executors_running"], 0.0);
    wait_no_cgroups(test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_that_exit_or_never_subscribe_fail_their_tasks() {
    let test = "executors_that_exit_or_never_subscribe_fail_their_tasks";
    let cluster = start_with(test, None, |c| {
        c.executors.registration_timeout = Duration::from_secs(2);
    })
    .await;
    let (s, mut events) = cluster.framework("executors").await;
    // The same executor id with another command while one runs is refused. First, while
    // the agent's offers are all in hand.
    let sleeper = executor(&ExecutorId::new("same").unwrap(), "sleep 600");
    launch(&s, &mut events, in_executor("a", &sleeper, "true")).await;
    // The rest of the agent comes back in an offer at once; take it before anything else.
    let offer = next_offers(&mut events).await.remove(0);
    wait_until("executor same to start", || async {
        !executors(&cluster).await.is_empty()
    })
    .await;
    let other = executor(&ExecutorId::new("same").unwrap(), "sleep 601");
    s.accept(
        &[offer.id.clone().unwrap()],
        vec![in_executor("b", &other, "true").build_for(&offer)],
        Some(0.0),
    )
    .await
    .unwrap();
    let end = wait_terminal(&mut events, &tid("b")).await;
    assert_eq!(state_of(&end), TaskState::Error, "{}", end.message);
    assert!(end.message.contains("another command"), "{}", end.message);
    // An executor that never subscribes is killed, and fails its tasks for that.
    let end = wait_terminal(&mut events, &tid("a")).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ExecutorRegistrationTimeout,
        "did not subscribe within 2s",
    );
    let quitter = executor(&ExecutorId::new("quitter").unwrap(), "exit 7");
    launch(&s, &mut events, in_executor("orphan", &quitter, "true")).await;
    let end = wait_terminal(&mut events, &tid("orphan")).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ExecutorTerminated,
        "exited with status 7",
    );

    wait_no_cgroups(test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_api_refuses_strangers() {
    let cluster = start_with("the_executor_api_refuses_strangers", None, |_| {}).await;
    let env = agora_sdk::executor::ExecutorEnv {
        endpoint: endpoint(&cluster).await,
        framework_id: agora_core::FrameworkId::new("nobody").unwrap(),
        executor_id: ExecutorId::new("ghost").unwrap(),
        token: "guess".into(),
        recovery_timeout: None,
    };
    let err = env.subscribe().await.unwrap_err();
    assert!(
        matches!(&err, agora_sdk::Error::Refused { code: tonic::Code::NotFound, message } if message.contains("no executor ghost")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_tasks_cannot_bring_their_own_executor_nor_take_the_agents() {
    let test = "wasm_tasks_cannot_bring_their_own_executor_nor_take_the_agents";
    let cluster = start_with(test, None, |_| {}).await;
    let (s, mut events) = cluster.framework("executors").await;
    // A Wasm task naming an executor would run outside the agent's capability policy.
    let sneaky = TaskBuilder::wasm(
        tid("sneaky"),
        agora_examples::task_bytes("hello", agora_examples::Target::P1),
    )
    // As much as the next task needs: the offer it gets back is what this one frees.
    .resources(agora_core::parse_resources("cpus:0.2;mem:64").unwrap())
    .executor(agora_executor("mine"));
    launch(&s, &mut events, sneaky).await;
    let end = wait_terminal(&mut events, &tid("sneaky")).await;
    assert_ended(
        &end,
        TaskState::Error,
        v1::Reason::TaskInvalid,
        "cannot name an executor",
    );
    // Nor may a custom executor take the Wasm executor's id.
    launch(
        &s,
        &mut events,
        in_executor("impostor", &agora_executor("agora-wasm"), "true"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("impostor")).await;
    assert_ended(
        &end,
        TaskState::Error,
        v1::Reason::TaskInvalid,
        "the agent's own Wasm executor",
    );
    wait_no_cgroups(test).await;
}
