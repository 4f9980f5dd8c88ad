//! `agora executor`: a ready-made custom executor (like Mesos's command executor, but
//! long-lived). The agent starts it for a framework; it runs each task it is given as a
//! shell command in the task's sandbox — the task's `command` payload, or its `data` as a
//! shell command — and reports RUNNING, then how the command ended. KILL sends SIGTERM to
//! the task's process group and SIGKILL after the grace period; SHUTDOWN does that to every
//! task and exits.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use agora_core::{TaskId, TaskState};
use agora_proto::v1;
use agora_sdk::executor::{Executor, ExecutorEnv, ExecutorEvent, status};
use anyhow::Context;
use tokio::sync::oneshot;

/// The program of a task: `sh -c` with its command, or its data as a command.
fn program(task: &v1::TaskInfo) -> Result<(tokio::process::Command, Vec<v1::EnvVar>), String> {
    let (argv, env): (Vec<String>, Vec<v1::EnvVar>) = match &task.payload {
        Some(v1::task_info::Payload::Command(c)) if c.shell => (
            vec!["/bin/sh".into(), "-c".into(), c.value.clone()],
            c.env.clone(),
        ),
        Some(v1::task_info::Payload::Command(c)) => (
            std::iter::once(c.value.clone())
                .chain(c.arguments.iter().cloned())
                .collect(),
            c.env.clone(),
        ),
        Some(v1::task_info::Payload::Wasm(_)) => {
            return Err("this executor runs commands, not Wasm modules".into());
        }
        None if !task.data.is_empty() => {
            let script = String::from_utf8(task.data.clone())
                .map_err(|_| "the task's data is not a UTF-8 shell command")?;
            (vec!["/bin/sh".into(), "-c".into(), script], Vec::new())
        }
        None => return Err("the task has neither a command nor data to run".into()),
    };
    if argv[0].is_empty() {
        return Err("the command is empty".into());
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    Ok((cmd, env))
}

/// Runs one task to its end and reports it.
async fn run_task(
    executor: Executor,
    task: v1::TaskInfo,
    sandbox: std::path::PathBuf,
    kill: oneshot::Receiver<Duration>,
) {
    let Some(id) = task.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()) else {
        return;
    };
    let report = |state, msg: String, code: Option<i32>| {
        let mut s = status(&id, state, msg);
        s.exit_code = code;
        s
    };
    let (mut cmd, env) = match program(&task) {
        Ok(p) => p,
        Err(e) => {
            let _ = executor.update(report(TaskState::Error, e, None)).await;
            return;
        }
    };
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(sandbox.join(name))
    };
    let (out, err) = match (open("stdout"), open("stderr")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            let msg = format!("opening the task's output files: {e}");
            let _ = executor.update(report(TaskState::Failed, msg, None)).await;
            return;
        }
    };
    let sandbox_str = sandbox.to_string_lossy().into_owned();
    cmd.current_dir(&sandbox)
        .envs(env.iter().map(|e| (e.name.as_str(), e.value.as_str())))
        .env("AGORA_TASK_ID", id.as_str())
        .env("MESOS_TASK_ID", id.as_str())
        .env("AGORA_SANDBOX", &sandbox_str)
        .env("MESOS_SANDBOX", &sandbox_str)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("starting the command: {e}");
            let _ = executor.update(report(TaskState::Failed, msg, None)).await;
            return;
        }
    };
    let pid = child.id().unwrap_or_default() as i32;
    let _ = executor
        .update(report(TaskState::Running, format!("pid {pid}"), None))
        .await;
    let signal = |sig| {
        // SAFETY: kill(2) on the task's own process group; at worst it is gone already.
        unsafe {
            libc::kill(-pid, sig);
        }
    };
    let end = tokio::select! {
        s = child.wait() => s.map_err(|e| e.to_string()),
        grace = kill => {
            let grace = grace.unwrap_or(Duration::ZERO);
            signal(libc::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                signal(libc::SIGKILL);
            }
            let _ = child.wait().await;
            signal(libc::SIGKILL);
            let _ = executor.update(report(TaskState::Killed, "killed".into(), None)).await;
            return;
        }
    };
    // What the task forked lives and dies with it.
    signal(libc::SIGKILL);
    use std::os::unix::process::ExitStatusExt;
    let update = match end {
        Ok(s) if s.success() => report(TaskState::Finished, "exited with status 0".into(), Some(0)),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => report(
                TaskState::Failed,
                format!("exited with status {c}"),
                Some(c),
            ),
            (None, Some(sig)) => report(TaskState::Failed, format!("killed by signal {sig}"), None),
            (None, None) => report(TaskState::Failed, "ended".into(), None),
        },
        Err(e) => report(
            TaskState::Failed,
            format!("waiting for the command: {e}"),
            None,
        ),
    };
    let _ = executor.update(update).await;
}

pub async fn executor() -> anyhow::Result<()> {
    let env = ExecutorEnv::from_env()?;
    let id = env.executor_id.clone();
    let (executor, mut events) = env.subscribe().await.context("subscribing to the agent")?;
    eprintln!("agora executor {id}: subscribed");
    let mut kills: HashMap<TaskId, oneshot::Sender<Duration>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let grace = loop {
        let Some(event) = events.next().await else {
            eprintln!("agora executor {id}: the agent closed the stream");
            break Duration::ZERO;
        };
        match event.context("reading events from the agent")? {
            ExecutorEvent::Launch { task, sandbox } => {
                let (tx, rx) = oneshot::channel();
                if let Some(t) = task.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()) {
                    eprintln!("agora executor {id}: launching task {t}");
                    kills.insert(t, tx);
                }
                tasks.spawn(run_task(executor.clone(), *task, sandbox, rx));
            }
            ExecutorEvent::Kill { task_id, grace } => {
                if let Some(k) = kills.remove(&task_id) {
                    let _ = k.send(grace);
                }
            }
            ExecutorEvent::Shutdown { grace } => {
                eprintln!("agora executor {id}: shutting down");
                break grace;
            }
            ExecutorEvent::Error(e) => eprintln!("agora executor {id}: the agent says: {e}"),
            ExecutorEvent::Subscribed { framework, .. } => {
                eprintln!(
                    "agora executor {id}: subscribed, framework {:?}",
                    framework.name
                );
            }
            ExecutorEvent::Acknowledged { .. } => {}
        }
        kills.retain(|_, k| !k.is_closed());
    };
    // Leave a little of the grace period for the updates to go out.
    let task_grace = grace.mul_f64(0.8);
    for (_, k) in kills.drain() {
        let _ = k.send(task_grace);
    }
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    Ok(())
}
