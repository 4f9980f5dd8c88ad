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
