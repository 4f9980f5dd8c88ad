//! How the agent runs a task: the [`Containerizer`] trait, and its Wasm implementation.
//!
//! A containerizer turns a task into a [`Container`] in two steps, so the agent can report
//! TASK_STARTING while the task is prepared (a module compiled, a file fetched) and
//! TASK_RUNNING once it is under way. Each task picks its containerizer by its payload; the
//! native one (processes in cgroups) plugs in beside Wasm.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agora_core::{AgentId, FrameworkId, Resources, TaskId, TaskState};
use agora_executor_wasm::{
    CancellationToken, LoadError, ModuleSource, Outcome, Program, RunReport, RunSpec, WasmRuntime,
};
use agora_proto::v1;

/// Everything a containerizer needs to start one task.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The agent's id, once it has registered.
    pub agent_id: Option<AgentId>,
    pub framework_id: FrameworkId,
    pub task_id: TaskId,
    pub task: v1::TaskInfo,
    pub resources: Resources,
    /// The task's sandbox directory (it exists).
    pub sandbox: PathBuf,
}

/// How a task ended, in the terms of a status update.
#[derive(Debug, Clone, PartialEq)]
pub struct Termination {
    pub state: TaskState,
    pub reason: v1::Reason,
    pub message: String,
    pub exit_code: Option<i32>,
    pub usage: Option<v1::TaskUsage>,
}

impl Termination {
    pub fn new(state: TaskState, reason: v1::Reason, message: impl Into<String>) -> Self {
        Termination {
            state,
            reason,
            message: message.into(),
            exit_code: None,
            usage: None,
        }
    }
}

/// Runs tasks of some kind.
#[async_trait::async_trait]
pub trait Containerizer: Send + Sync {
    /// A short name for logs, e.g. `wasm`.
    fn name(&self) -> &'static str;
    /// The isolation this containerizer gives, as reported to the master.
    fn isolation(&self) -> String;
    /// Whether it runs this task's payload.
    fn supports(&self, task: &v1::TaskInfo) -> bool;
    /// Gets the task ready to run; a refusal ends the task with the returned status.
    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination>;
}

/// Reads a running task's resource usage.
pub type UsageProbe = Arc<dyn Fn() -> v1::TaskUsage + Send + Sync>;

/// The running tasks of this agent that can report usage, by (framework, task).
pub type Containers = Arc<
    std::sync::Mutex<std::collections::HashMap<(FrameworkId, TaskId), (&'static str, UsageProbe)>>,
>;

/// A prepared task.
#[async_trait::async_trait]
pub trait Container: Send {
    /// Runs until the task ends or `kill` is cancelled.
    async fn run(self: Box<Self>, kill: CancellationToken) -> Termination;
    /// Reads the task's usage while it runs, where the containerizer can.
    fn usage_probe(&self) -> Option<UsageProbe> {
        None
    }
}

const MIB: u64 = 1 << 20;

/// Runs Wasm tasks in this process with wasmtime, behind the containerizer boundary.
pub struct WasmContainerizer {
    runtime: WasmRuntime,
}

impl WasmContainerizer {
    pub fn new(runtime: WasmRuntime) -> Self {
        WasmContainerizer { runtime }
    }

    pub fn runtime(&self) -> &WasmRuntime {
        &self.runtime
    }

    async fn module_source(wasm: &v1::WasmTask) -> Result<ModuleSource, Termination> {
        let invalid =
            |msg: String| Termination::new(TaskState::Error, v1::Reason::ModuleInvalid, msg);
        match &wasm.module {
            Some(v1::wasm_task::Module::ModuleBytes(b)) => {
                Ok(ModuleSource::Bytes(Arc::from(b.as_slice())))
            }
            Some(v1::wasm_task::Module::Digest(d)) => Ok(ModuleSource::Digest(d.clone())),
            Some(v1::wasm_task::Module::Uri(uri)) => {
                let Some(path) = uri.strip_prefix("file://") else {
                    return Err(Termination::new(
                        TaskState::Error,
                        v1::Reason::FetcherFailed,
                        format!(
                            "cannot fetch module {uri:?}: only file:// URIs are supported by this agent"
                        ),
                    ));
                };
                let bytes = tokio::fs::read(path).await.map_err(|e| {
                    Termination::new(
                        TaskState::Error,
                        v1::Reason::FetcherFailed,
                        format!("reading module {uri}: {e}"),
                    )
                })?;
                Ok(ModuleSource::Bytes(Arc::from(bytes)))
            }
            None => Err(invalid("the wasm task has no module".into())),
        }
    }
}

#[async_trait::async_trait]
impl Containerizer for WasmContainerizer {
    fn name(&self) -> &'static str {
        "wasm"
    }

    fn isolation(&self) -> String {
        "wasm(epoch-cpu,fuel,memory-ceiling,wasi-sandbox)".into()
    }

    fn supports(&self, task: &v1::TaskInfo) -> bool {
        matches!(task.payload, Some(v1::task_info::Payload::Wasm(_)))
    }

    async fn prepare(&self, spec: &LaunchSpec) -> Result<Box<dyn Container>, Termination> {
        let Some(v1::task_info::Payload::Wasm(wasm)) = &spec.task.payload else {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::TaskInvalid,
                "not a wasm task",
            ));
        };
        let mem_mib = spec.resources.mem();
        if mem_mib <= 0.0 {
            return Err(Termination::new(
                TaskState::Error,
                v1::Reason::TaskInvalid,
                "a Wasm task needs a mem resource: it is the ceiling on the task's linear memory",
            ));
        }
        let source = Self::module_source(wasm).await?;
        let expected = (!wasm.sha256.is_empty()).then_some(wasm.sha256.as_str());
        let program = self.runtime.load(source, expected).await.map_err(|e| {
            let reason = match e {
                LoadError::UnknownDigest(_) | LoadError::DigestMismatch { .. } => {
                    v1::Reason::FetcherFailed
                }
                _ => v1::Reason::ModuleInvalid,
            };
            Termination::new(TaskState::Error, reason, e.to_string())
        })?;

        let mut args = vec![if spec.task.name.is_empty() {
            spec.task_id.to_string()
        } else {
            spec.task.name.clone()
        }];
        args.extend(wasm.args.iter().cloned());
        let mut env: Vec<(String, String)> = wasm
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        env.push(("AGORA_TASK_ID".into(), spec.task_id.to_string()));
        env.push(("AGORA_FRAMEWORK_ID".into(), spec.framework_id.to_string()));
        let limit =
            (spec.task.max_duration > 0.0).then(|| Duration::from_secs_f64(spec.task.max_duration));
        let cpus = spec.resources.cpus();
        let run = RunSpec {
            args,
            env,
            sandbox: spec.sandbox.clone(),
            stdout: spec.sandbox.join("stdout"),
            stderr: spec.sandbox.join("stderr"),
            memory_limit: (mem_mib * MIB as f64) as u64,
            cpu_budget: limit.filter(|_| cpus > 0.0).map(|l| l.mul_f64(cpus)),
            wall_limit: limit,
            fuel: wasm.fuel,
        };
        Ok(Box::new(WasmContainer {
            runtime: self.runtime.clone(),
            program,
            run,
        }))
    }
}

struct WasmContainer {
    runtime: WasmRuntime,
    program: Program,
    run: RunSpec,
}

#[async_trait::async_trait]
impl Container for WasmContainer {
    async fn run(self: Box<Self>, kill: CancellationToken) -> Termination {
        let report = self.runtime.run(&self.program, self.run, kill).await;
        termination(report)
    }
}

/// Maps how a Wasm run ended onto a task state, reason and exit code.
pub fn termination(report: RunReport) -> Termination {
    let message = report.outcome.to_string();
    let (state, reason, exit_code) = match report.outcome {
        Outcome::Exited(0) => (TaskState::Finished, v1::Reason::Unspecified, Some(0)),
        Outcome::Exited(code) => (TaskState::Failed, v1::Reason::CommandExited, Some(code)),
        Outcome::Trap(_) => (TaskState::Failed, v1::Reason::WasmTrap, None),
        Outcome::OutOfFuel { .. } => (TaskState::Failed, v1::Reason::ContainerLimitationFuel, None),
        Outcome::CpuBudget { .. } => (TaskState::Failed, v1::Reason::ContainerLimitationCpu, None),
        Outcome::WallTimeout { .. } => (
            TaskState::Failed,
            v1::Reason::MaxCompletionTimeReached,
            None,
        ),
        Outcome::MemoryLimit { .. } => (
            TaskState::Failed,
            v1::Reason::ContainerLimitationMemory,
            None,
        ),
        Outcome::InitialMemoryTooLarge { .. } => (
            TaskState::Error,
            v1::Reason::ContainerLimitationMemory,
            None,
        ),
        Outcome::InstantiationFailed(_) => {
            (TaskState::Failed, v1::Reason::ContainerLaunchFailed, None)
        }
        Outcome::Killed => (TaskState::Killed, v1::Reason::TaskKilled, None),
    };
    let u = report.usage;
    Termination {
        state,
        reason,
        message,
        exit_code,
        usage: Some(v1::TaskUsage {
            fuel_used: u.fuel_used,
            cpu_seconds: u.cpu.as_secs_f64(),
            wall_seconds: u.wall.as_secs_f64(),
            mem_peak_bytes: u.mem_peak_bytes,
            ..Default::default()
        }),
    }
}
