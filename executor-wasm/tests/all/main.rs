//! Runs real modules and components — the example tasks and small hand-written WAT modules —
//! through the Wasm runtime and checks how each one ends.
#![allow(clippy::unwrap_used, clippy::new_without_default)]

mod caps;
mod disk;
mod guest;
mod hostile;
mod programs;
mod sched;

use std::sync::Arc;
use std::time::Duration;

use agora_executor_wasm::{
    CancellationToken, ModuleSource, Program, RunReport, RunSpec, WasmConfig, WasmRuntime,
};

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn spec(&self, args: &[&str]) -> RunSpec {
        RunSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            sandbox: self.dir.path().to_path_buf(),
            stdout: self.dir.path().join("stdout"),
            stderr: self.dir.path().join("stderr"),
            memory_limit: 64 << 20,
            wall_limit: Some(Duration::from_secs(30)),
            ..RunSpec::default()
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Waits until the task has written `text` to its stdout, failing after 20 s.
    pub async fn wait_stdout(&self, text: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.stdout().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {text:?} on stdout: {:?}",
                self.stdout()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }
}

pub fn runtime() -> WasmRuntime {
    WasmRuntime::new(WasmConfig::default()).unwrap()
}

pub async fn load(rt: &WasmRuntime, bytes: Vec<u8>) -> Program {
    rt.load(ModuleSource::Bytes(Arc::from(bytes)), None)
        .await
        .unwrap()
}

pub fn wat(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap()
}

pub async fn run(rt: &WasmRuntime, program: &Program, spec: RunSpec) -> RunReport {
    rt.run(program, spec, CancellationToken::new()).await
}
