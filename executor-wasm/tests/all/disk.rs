//! The compiled-module cache on disk: reused across runtimes, and never trusted when damaged
//! or written by an engine of another configuration.

use std::sync::Arc;

use agora_examples::{Target, task_bytes};
use agora_executor_wasm::{ModuleSource, Outcome, ProgramKind, WasmConfig, WasmRuntime};

use crate::*;

fn with_cache(dir: &std::path::Path) -> WasmRuntime {
    WasmRuntime::new(WasmConfig {
        cache_dir: Some(dir.to_owned()),
        ..WasmConfig::default()
    })
    .unwrap()
}

async fn hello_runs(rt: &WasmRuntime, bytes: &[u8]) {
    let program = rt
        .load(ModuleSource::Bytes(Arc::from(bytes)), None)
        .await
        .unwrap();
    let sb = Sandbox::new();
    let report = run(rt, &program, sb.spec(&["hello", "cache"])).await;
    assert_eq!(report.outcome, Outcome::Exited(0), "{}", sb.stderr());
    assert_eq!(sb.stdout(), "Hello, cache!\n");
}

#[tokio::test]
async fn a_second_runtime_loads_from_disk_instead_of_compiling() {
    let dir = tempfile::tempdir().unwrap();
    for target in [Target::P1, Target::P2] {
        let bytes = task_bytes("hello", target);
        let first = with_cache(dir.path());
        hello_runs(&first, &bytes).await;
        let s = first.cache_stats();
        assert_eq!((s.disk_hits, s.disk_writes), (0, 1), "{s:?}");

        let second = with_cache(dir.path());
        assert_eq!(second.fingerprint(), first.fingerprint());
        hello_runs(&second, &bytes).await;
        let s = second.cache_stats();
        assert_eq!((s.disk_hits, s.disk_writes), (1, 0), "{target:?}: {s:?}");
    }
}

#[tokio::test]
async fn a_truncated_entry_is_rebuilt_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = task_bytes("hello", Target::P1);
    let digest = agora_executor_wasm::digest(&bytes);
    hello_runs(&with_cache(dir.path()), &bytes).await;
    let rt = with_cache(dir.path());
    let path = rt.artifact_path(&digest, ProgramKind::Module).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    hello_runs(&rt, &bytes).await;
    let s = rt.cache_stats();
    assert_eq!(
        (s.disk_hits, s.disk_discarded, s.disk_writes),
        (0, 1, 1),
        "{s:?}"
    );
    // Rebuilt whole: the next runtime uses it.
    let again = with_cache(dir.path());
    hello_runs(&again, &bytes).await;
    assert_eq!(again.cache_stats().disk_hits, 1);
}

#[tokio::test]
async fn a_flipped_byte_is_caught_before_wasmtime_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = task_bytes("hello", Target::P2);
    let digest = agora_executor_wasm::digest(&bytes);
    hello_runs(&with_cache(dir.path()), &bytes).await;
    let rt = with_cache(dir.path());
    let path = rt.artifact_path(&digest, ProgramKind::Component).unwrap();
    let mut artifact = std::fs::read(&path).unwrap();
    let mid = artifact.len() / 2;
    artifact[mid] ^= 0xff;
    std::fs::write(&path, &artifact).unwrap();
    hello_runs(&rt, &bytes).await;
    assert_eq!(rt.cache_stats().disk_discarded, 1);
}

#[tokio::test]
async fn an_entry_from_another_engine_configuration_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = task_bytes("hello", Target::P1);
    let digest = agora_executor_wasm::digest(&bytes);
    let rt = with_cache(dir.path());
    let path = rt.artifact_path(&digest, ProgramKind::Module).unwrap();
    // A whole, well-formed artifact — from an engine without fuel, which ours refuses.
    let mut other = wasmtime::Config::new();
    other.epoch_interruption(true);
    let other = wasmtime::Engine::new(&other).unwrap();
    let foreign = wasmtime::Module::new(&other, &bytes)
        .unwrap()
        .serialize()
        .unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = b"AGORACW1".to_vec();
    use sha2::Digest;
    file.extend_from_slice(&sha2::Sha256::digest(&foreign));
    file.extend_from_slice(&foreign);
    std::fs::write(&path, file).unwrap();
    hello_runs(&rt, &bytes).await;
    let s = rt.cache_stats();
    assert_eq!(
        (s.disk_hits, s.disk_discarded, s.disk_writes),
        (0, 1, 1),
        "{s:?}"
    );
}

#[test]
fn pooled_and_on_demand_engines_share_artifacts() {
    // The agent compiles with an on-demand engine for executors that run pooled ones.
    let on_demand = WasmRuntime::new(WasmConfig::default()).unwrap();
    let pooled = WasmRuntime::new(WasmConfig {
        pool_instances: Some(4),
        ..WasmConfig::default()
    })
    .unwrap();
    assert!(pooled.pooled());
    assert_eq!(on_demand.fingerprint(), pooled.fingerprint());
}
