//! `agora __wasm-executor`: the Wasm executor an agent starts for each framework that runs
//! Wasm tasks on it. One process holds all of the framework's Wasm tasks there, each a
//! wasmtime instance in a store of its own, under one engine with an instance pool and the
//! agent's compiled-module cache; the agent keeps the process in a cgroup sized to the sum
//! of its tasks. A crash takes only this framework's Wasm tasks with it (the agent reports
//! them as REASON_EXECUTOR_TERMINATED).
//!
//! Tasks arrive with their module as a digest, its bytes in the agent's module store
//! (`AGORA_WASM_MODULES`), and their grants already checked by the agent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_agent::wasm::{capabilities_from_executor, run_spec_for, termination, usage_now};
use agora_core::{TaskId, TaskState};
use agora_executor_wasm::{
    CancellationToken, LiveUsage, LoadError, ModuleSource, WasmConfig, WasmRuntime,
};
use agora_proto::{resources_from_proto, state_to_proto, v1};
use agora_sdk::executor::{Executor, ExecutorEnv, ExecutorEvent, status};
use anyhow::Context;

type Running = Arc<Mutex<HashMap<TaskId, (CancellationToken, Arc<LiveUsage>)>>>;

/// How often running tasks' usage goes to the agent.
const USAGE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn wasm_executor() -> anyhow::Result<()> {
    let env = ExecutorEnv::from_env()?;
    let modules = PathBuf::from(
        std::env::var("AGORA_WASM_MODULES").context("AGORA_WASM_MODULES is not set")?,
    );
    let config = WasmConfig {
        cache_dir: std::env::var("AGORA_WASM_CACHE").ok().map(PathBuf::from),
        pool_instances: std::env::var("AGORA_WASM_POOL")
            .ok()
            .and_then(|v| v.parse().ok()),
        ..WasmConfig::default()
    };
    let runtime = WasmRuntime::new(config).context("starting wasmtime")?;
    let framework = env.framework_id.to_string();
    let (executor, mut events) = env.subscribe().await.context("subscribing to the agent")?;
    tracing::info!(pooled = runtime.pooled(), "wasm executor subscribed");
    let running: Running = Arc::default();
    let reporter = {
        let (executor, running) = (executor.clone(), running.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(USAGE_INTERVAL);
            loop {
                tick.tick().await;
                let now: Vec<(TaskId, v1::TaskUsage)> = running
                    .lock()
                    .map(|r| {
                        r.iter()
                            .map(|(t, (_, l))| (t.clone(), usage_now(l)))
                            .collect()
                    })
                    .unwrap_or_default();
                if !now.is_empty() && executor.usage(now).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    let grace = loop {
        let Some(event) = events.next().await else {
            tracing::warn!("the agent closed the stream");
            break Duration::ZERO;
        };
        match event.context("reading events from the agent")? {
            ExecutorEvent::Launch { task, sandbox } => {
                let Some(id) = task.task_id.as_ref().and_then(|t| TaskId::try_from(t).ok()) else {
                    continue;
                };
                let kill = CancellationToken::new();
                let live = LiveUsage::new();
                if let Ok(mut r) = running.lock() {
                    r.insert(id.clone(), (kill.clone(), live.clone()));
                }
                let job = Job {
                    runtime: runtime.clone(),
                    executor: executor.clone(),
                    modules: modules.clone(),
                    framework: framework.clone(),
                    running: running.clone(),
                };
                tasks.spawn(job.run(id, *task, sandbox, kill, live));
            }
            ExecutorEvent::Kill { task_id, .. } => {
                if let Some((k, _)) = running.lock().ok().and_then(|r| r.get(&task_id).cloned()) {
                    k.cancel();
                }
            }
            ExecutorEvent::Shutdown { grace } => break grace,
            ExecutorEvent::Error(e) => tracing::warn!(error = %e, "the agent reports an error"),
            ExecutorEvent::Subscribed { framework, .. } => {
                tracing::info!(framework = %framework.name, "subscribed");
            }
            ExecutorEvent::Acknowledged { .. } => {}
        }
        while tasks.try_join_next().is_some() {}
    };
    if let Ok(r) = running.lock() {
        for (k, _) in r.values() {
            k.cancel();
        }
    }
    let _ = tokio::time::timeout(grace.max(Duration::from_millis(500)), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    reporter.abort();
    Ok(())
}

struct Job {
    runtime: WasmRuntime,
    executor: Executor,
    modules: PathBuf,
    framework: String,
    running: Running,
}

impl Job {
    async fn run(
        self,
        id: TaskId,
        task: v1::TaskInfo,
        sandbox: PathBuf,
        kill: CancellationToken,
        live: Arc<LiveUsage>,
    ) {
        let end = self.execute(&id, &task, sandbox, kill, live).await;
        if let Ok(mut r) = self.running.lock() {
            r.remove(&id);
        }
        if let Err(e) = self.executor.update(end).await {
            tracing::warn!(task_id = %id, error = %e, "reporting the task's end");
        }
    }

    async fn execute(
        &self,
        id: &TaskId,
        task: &v1::TaskInfo,
        sandbox: PathBuf,
        kill: CancellationToken,
        live: Arc<LiveUsage>,
    ) -> v1::TaskStatus {
        let error = |reason: v1::Reason, msg: String| {
            let mut s = status(id, TaskState::Error, msg);
            s.reason = reason as i32;
            s
        };
        let Some(v1::task_info::Payload::Wasm(wasm)) = &task.payload else {
            return error(v1::Reason::TaskInvalid, "not a wasm task".into());
        };
        let Some(v1::wasm_task::Module::Digest(digest)) = &wasm.module else {
            return error(
                v1::Reason::ModuleInvalid,
                "the agent sent no module digest".into(),
            );
        };
        let program = match self
            .runtime
            .load(ModuleSource::Digest(digest.clone()), None)
            .await
        {
            Ok(p) => Ok(p),
            Err(LoadError::UnknownDigest(_)) => {
                let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
                match tokio::fs::read(self.modules.join(format!("{hex}.wasm"))).await {
                    Ok(bytes) => {
                        self.runtime
                            .load(ModuleSource::Bytes(Arc::from(bytes)), Some(digest))
                            .await
                    }
                    Err(e) => {
                        return error(
                            v1::Reason::FetcherFailed,
                            format!("module {digest} is not in the agent's module store: {e}"),
                        );
                    }
                }
            }
            Err(e) => Err(e),
        };
        let program = match program {
            Ok(p) => p,
            Err(e) => return error(v1::Reason::ModuleInvalid, e.to_string()),
        };
        let caps = match capabilities_from_executor(&wasm.capabilities.clone().unwrap_or_default())
        {
            Ok(c) => c,
            Err(e) => return error(v1::Reason::TaskInvalid, e),
        };
        let resources = match resources_from_proto(&task.resources) {
            Ok(r) => r,
            Err(e) => return error(v1::Reason::TaskInvalid, e.to_string()),
        };
        let mut spec = match run_spec_for(
            task,
            id.as_str(),
            &self.framework,
            &resources,
            &sandbox,
            wasm,
            caps,
        ) {
            Ok(s) => s,
            Err(t) => return error(t.reason, t.message),
        };
        spec.live = Some(live);
        let (tx, mut rx) = tokio::sync::mpsc::channel(agora_agent::wasm::GUEST_EVENTS);
        spec.events = Some(tx);
        let forward = {
            let (executor, id) = (self.executor.clone(), id.clone());
            tokio::spawn(async move {
                while let Some(e) = rx.recv().await {
                    match e {
                        agora_executor_wasm::GuestEvent::Progress { fraction, message } => {
                            let mut s = status(&id, TaskState::Running, message);
                            s.progress = Some(fraction);
                            let _ = executor.update(s).await;
                        }
                        agora_executor_wasm::GuestEvent::Message(data) => {
                            let _ = executor.message(Some(&id), data).await;
                        }
                        agora_executor_wasm::GuestEvent::Log { .. } => {}
                    }
                }
            })
        };
        let _ = self
            .executor
            .update(status(id, TaskState::Running, ""))
            .await;
        let report = self.runtime.run(&program, spec, kill).await;
        let _ = forward.await;
        let t = termination(report);
        let mut s = status(id, t.state, t.message);
        s.state = state_to_proto(t.state) as i32;
        s.reason = t.reason as i32;
        s.exit_code = t.exit_code;
        s.data = t.data;
        s.usage = t.usage.map(|u| *u);
        s
    }
}
