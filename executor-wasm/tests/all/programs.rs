//! Well-behaved programs: output, arguments, environment, exit codes, the sandbox, the cache.

use std::sync::Arc;

use agora_examples::{Target, task_bytes};
use agora_executor_wasm::{LoadError, ModuleSource, Outcome, ProgramKind};

use crate::{Sandbox, load, run, runtime};

#[tokio::test]
async fn hello_runs_as_module_and_component() {
    let rt = runtime();
    for (target, kind) in [
        (Target::P1, ProgramKind::Module),
        (Target::P2, ProgramKind::Component),
    ] {
        let program = load(&rt, task_bytes("hello", target)).await;
        assert_eq!(program.kind(), kind);
        let sb = Sandbox::new();
        let mut spec = sb.spec(&["hello", "Agora", "users"]);
        spec.env.push(("GREETING".into(), "Welcome".into()));
        let report = run(&rt, &program, spec).await;
        assert_eq!(
            report.outcome,
            Outcome::Exited(0),
            "{target:?}: {}",
            sb.stderr()
        );
        assert_eq!(sb.stdout(), "Welcome, Agora users!\n");
        assert_eq!(sb.stderr(), "hello: greeted 2 argument(s)\n");
        assert!(report.usage.fuel_used > 0);
        assert!(report.usage.mem_peak_bytes > 0);
    }
}

#[tokio::test]
async fn exit_codes_are_reported() {
    let rt = runtime();
    // WASI preview 2's wasi:cli/exit carries only success or failure, so a component's
    // std::process::exit(3) reaches the host as status 1; a preview 1 module keeps its code.
    for (target, code) in [(Target::P1, 3), (Target::P2, 1)] {
        let program = load(&rt, task_bytes("hello", target)).await;
        let sb = Sandbox::new();
        let mut spec = sb.spec(&["hello"]);
        spec.env.push(("EXIT_CODE".into(), "3".into()));
        let report = run(&rt, &program, spec).await;
        assert_eq!(report.outcome, Outcome::Exited(code), "{target:?}");
        assert_eq!(sb.stdout(), "Hello, world!\n");
    }
}

#[tokio::test]
async fn primes_computes() {
    let rt = runtime();
    let program = load(&rt, task_bytes("primes", Target::P1)).await;
    let sb = Sandbox::new();
    let report = run(&rt, &program, sb.spec(&["primes", "10000"])).await;
    assert_eq!(report.outcome, Outcome::Exited(0));
    assert_eq!(sb.stdout(), "1229 primes below 10000\n");
    assert!(report.usage.cpu > std::time::Duration::ZERO);
}

#[tokio::test]
async fn the_sandbox_is_the_only_file_system_and_the_host_env_is_hidden() {
    let rt = runtime();
    for target in [Target::P1, Target::P2] {
        let program = load(&rt, task_bytes("fsprobe", target)).await;
        let sb = Sandbox::new();
        let mut spec = sb.spec(&["fsprobe"]);
        spec.caps.sandbox = true;
        let report = run(&rt, &program, spec).await;
        assert_eq!(report.outcome, Outcome::Exited(0), "{}", sb.stderr());
        let out = sb.stdout();
        let line = |probe: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{probe}:")))
                .unwrap_or_else(|| panic!("no {probe} line in {out}"))
                .trim_end()
                .to_string()
        };
        assert_eq!(line("write-relative"), "write-relative: ok");
        assert_eq!(
            line("read-relative"),
            "read-relative: ok written by fsprobe"
        );
        assert_eq!(
            line("read-absolute"),
            "read-absolute: ok written by fsprobe"
        );
        assert!(
            line("escape-dotdot").contains("denied"),
            "{target:?}: {out}"
        );
        assert!(
            line("escape-absolute").contains("denied"),
            "{target:?}: {out}"
        );
        assert!(line("env-home").contains("denied"), "{target:?}: {out}");
        // The file really is in the sandbox on the host.
        assert_eq!(
            std::fs::read_to_string(sb.dir.path().join("note.txt")).unwrap(),
            "written by fsprobe"
        );
    }
}

#[tokio::test]
async fn second_load_hits_the_cache_and_digests_work() {
    let rt = runtime();
    let bytes = task_bytes("hello", Target::P1);
    let digest = agora_executor_wasm::digest(&bytes);
    let first = load(&rt, bytes.clone()).await;
    assert_eq!(first.digest(), digest);
    assert_eq!(rt.cache_stats().compiles, 1);
    let _second = load(&rt, bytes.clone()).await;
    let by_digest = rt
        .load(ModuleSource::Digest(digest.clone()), None)
        .await
        .unwrap();
    assert_eq!(by_digest.digest(), digest);
    let stats = rt.cache_stats();
    assert_eq!(stats.compiles, 1, "{stats:?}");
    assert_eq!(stats.hits, 2, "{stats:?}");

    let unknown = "sha256:00".to_string();
    assert_eq!(
        rt.load(ModuleSource::Digest(unknown.clone()), None)
            .await
            .unwrap_err(),
        LoadError::UnknownDigest(unknown)
    );
    let err = rt
        .load(ModuleSource::Bytes(Arc::from(bytes)), Some("sha256:abc"))
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn concurrent_launches_compile_once() {
    let rt = runtime();
    let bytes: Arc<[u8]> = Arc::from(task_bytes("primes", Target::P2));
    let mut joins = Vec::new();
    for _ in 0..4 {
        let (rt, bytes) = (rt.clone(), Arc::clone(&bytes));
        joins.push(tokio::spawn(async move {
            rt.load(ModuleSource::Bytes(bytes), None).await.map(|_| ())
        }));
    }
    for j in joins {
        j.await.unwrap().unwrap();
    }
    assert_eq!(rt.cache_stats().compiles, 1);
}
