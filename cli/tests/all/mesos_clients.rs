//! Real Mesos client libraries against an Agora cluster, unmodified: mesoshttp (Python, from
//! PyPI) and mesos-framework (Node.js, from npm). `scripts/setup.sh` installs them into
//! `target/mesos-clients`; each test runs a small framework written with one of them
//! (`cli/tests/mesos-clients/`) and checks what it saw and what the cluster did.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::*;

/// Where `scripts/setup.sh` installed the client libraries.
fn clients() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/mesos-clients")
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mesos-clients")
        .join(name)
}

fn installed(path: &Path) -> &Path {
    assert!(
        path.exists(),
        "{} is missing: scripts/setup.sh installs the Mesos client libraries",
        path.display()
    );
    path
}

/// Runs a client framework to its end (at most 90 s); the JSON of its RESULT line, and all
/// it printed.
async fn run(mut command: tokio::process::Command) -> (Value, String) {
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("the client starts");
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("the client ends within 90 s")
        .unwrap();
    let printed = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result = printed
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT from the client:\n{printed}"));
    let result: Value = serde_json::from_str(result).unwrap();
    assert!(out.status.success(), "the client failed:\n{printed}");
    (result, printed)
}

/// Waits until the master no longer has framework `id` (it was torn down).
pub(crate) async fn torn_down(cluster: &Cluster, id: &str) {
    wait_until("the framework to be torn down", || async {
        cluster
            .state()
            .await
            .frameworks
            .iter()
            .all(|f| f.id.as_ref().map(|i| i.value.as_str()) != Some(id))
    })
    .await;
}

/// mesoshttp: command tasks to TASK_FINISHED and TASK_FAILED with acknowledgements, a kill,
/// an explicit reconciliation, declines with a filter, and a teardown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesoshttp_framework_runs_kills_reconciles_and_tears_down() {
    let python = clients().join("venv/bin/python");
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let mut command = tokio::process::Command::new(installed(&python));
    command
        .arg(script("mesoshttp_scheduler.py"))
        .arg(&cluster.master);
    let (result, printed) = run(command).await;
    let ends = &result["ends"];
    assert_eq!(ends["hello"], "TASK_FINISHED", "{printed}");
    assert_eq!(ends["fails"], "TASK_FAILED", "{printed}");
    assert_eq!(ends["sleeps"], "TASK_KILLED", "{printed}");
    assert_eq!(result["killed"], true);
    let reconciled = result["reconciled"].as_array().unwrap();
    assert!(
        reconciled.iter().any(|r| r[0] == "sleeps"),
        "no reconciliation answer for the sleeper: {printed}"
    );
    // Every update with a uuid was acknowledged: none is still retried, the tasks are gone.
    let id = result["framework_id"].as_str().unwrap().to_owned();
    torn_down(&cluster, &id).await;
}

/// mesos-framework: its own task placement (with a port from the offer), acknowledgements
/// and teardown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesos_framework_node_framework_runs_its_tasks() {
    let modules = clients().join("node/node_modules");
    installed(&modules.join("mesos-framework"));
    let cluster = Cluster::start(&["cpus:2;mem:1024;ports:[31000-31010]"]).await;
    let mut command = tokio::process::Command::new("node");
    command
        .env("NODE_PATH", &modules)
        .arg(script("mesos_framework_scheduler.js"))
        .arg(cluster.master_addr.to_string());
    let (result, printed) = run(command).await;
    let ends = result["ends"].as_object().unwrap();
    assert_eq!(ends.len(), 2, "{printed}");
    assert!(ends.values().all(|s| s == "TASK_FINISHED"), "{printed}");
    assert_eq!(result["errors"], serde_json::json!([]), "{printed}");
    let id = result["framework_id"].as_str().unwrap().to_owned();
    torn_down(&cluster, &id).await;
}

/// A custom executor written with mesos-framework (Node.js), launched by a mesoshttp
/// framework: the agent fetches it, starts it with Mesos's executor environment and serves
/// it `/api/v1/executor` (SUBSCRIBE, UPDATE with ACKNOWLEDGED, MESSAGE, KILL, SHUTDOWN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesos_framework_executor_runs_a_mesoshttp_frameworks_tasks() {
    let python = clients().join("venv/bin/python");
    let modules = clients().join("node/node_modules");
    installed(&modules.join("mesos-framework"));
    let scripts = std::fs::canonicalize(script("")).unwrap();
    let cluster = crate::native::start_with("mesos-executor", None, |c| {
        c.fetcher.file_roots.push(scripts.clone());
    })
    .await;
    let mut command = tokio::process::Command::new(installed(&python));
    command
        .arg(script("mesoshttp_executor_scheduler.py"))
        .arg(&cluster.master)
        .arg(scripts.join("mesos_framework_executor.js"))
        .arg(&modules);
    let (result, printed) = run(command).await;
    assert_eq!(result["ends"]["works"], "TASK_FINISHED", "{printed}");
    assert_eq!(result["ends"]["waits"], "TASK_KILLED", "{printed}");
    // After the agent's TASK_STARTING, every update came from the executor, RUNNING first.
    let updates = result["updates"].as_array().unwrap();
    for task in ["works", "waits"] {
        let from_executor: Vec<&str> = updates
            .iter()
            .filter(|u| u[0] == task && u[2] == "SOURCE_EXECUTOR")
            .map(|u| u[1].as_str().unwrap())
            .collect();
        assert_eq!(from_executor.len(), 2, "{task}: {printed}");
        assert_eq!(from_executor[0], "TASK_RUNNING", "{task}: {printed}");
        assert!(
            updates
                .iter()
                .filter(|u| u[0] == task && u[2] != "SOURCE_EXECUTOR")
                .all(|u| u[1] == "TASK_STARTING" && u[2] == "SOURCE_AGENT"),
            "{printed}"
        );
    }
    assert_eq!(
        result["messages"],
        serde_json::json!([["node-executor", "finished works"]]),
        "{printed}"
    );
    let id = result["framework_id"].as_str().unwrap().to_owned();
    // What the executor saw: Mesos's environment, SUBSCRIBED, its tasks, and the
    // acknowledgement of each RUNNING before it went on.
    let seen = &result["seen"]["waits"];
    let env = &seen["env"];
    assert_eq!(env["MESOS_FRAMEWORK_ID"], id.as_str(), "{printed}");
    assert_eq!(env["MESOS_EXECUTOR_ID"], "node-executor", "{printed}");
    // The test agents checkpoint, so the executor is told how to recover.
    assert_eq!(env["MESOS_CHECKPOINT"], "1", "{printed}");
    assert_eq!(env["MESOS_RECOVERY_TIMEOUT"], "900secs", "{printed}");
    assert_eq!(env["MESOS_SUBSCRIPTION_BACKOFF_MAX"], "2secs", "{printed}");
    assert!(
        env["MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD"]
            .as_str()
            .is_some_and(|g| g.ends_with("secs")),
        "{printed}"
    );
    let sandbox = env["MESOS_SANDBOX"].as_str().unwrap();
    assert_eq!(env["MESOS_DIRECTORY"], sandbox, "{printed}");
    assert!(
        sandbox.contains("node-executor") && std::path::Path::new(sandbox).is_absolute(),
        "{printed}"
    );
    let endpoint = &cluster.agents[0].endpoint;
    assert_eq!(
        Some(env["MESOS_AGENT_ENDPOINT"].as_str().unwrap()),
        endpoint.strip_prefix("http://"),
        "{printed}"
    );
    let subscribed = &seen["subscribed"];
    assert_eq!(subscribed["framework_id"], id.as_str(), "{printed}");
    assert_eq!(subscribed["framework_name"], "mesos-executor-test");
    assert_eq!(subscribed["executor_id"], "node-executor");
    let agent = cluster.state().await.agents[0].id.clone().unwrap().value;
    assert_eq!(subscribed["agent_id"], agent.as_str(), "{printed}");
    assert_eq!(seen["killed"], serde_json::json!(["waits"]), "{printed}");
    let works = &result["seen"]["works"];
    for (task, seen) in [("works", works), ("waits", seen)] {
        let launched = seen["launched"].as_array().unwrap();
        assert!(launched.iter().any(|t| t == task), "{printed}");
    }
    // The executor finishes a task only once the agent has acknowledged its RUNNING by
    // that update's uuid.
    assert!(works["acknowledged"].as_u64().unwrap() >= 1, "{printed}");
    torn_down(&cluster, &id).await;
    // The executor was shut down with its framework and nothing of it is left.
    crate::native::wait_no_cgroups("mesos-executor").await;
}
