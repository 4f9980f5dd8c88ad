//! Components of the agora:task world, built with the guest SDK (examples/guest): input in,
//! output out, log lines, progress and messages on the way.

use agora_examples::guest_bytes;
use agora_executor_wasm::{GuestEvent, LoadError, ModuleSource, Outcome, ProgramKind};

use crate::*;

#[tokio::test]
async fn a_task_logs_reports_progress_sends_a_message_and_returns_output() {
    let rt = runtime();
    let program = load(&rt, guest_bytes("progress")).await;
    assert_eq!(program.kind(), ProgramKind::Task);
    let sb = Sandbox::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let mut spec = sb.spec(&["progress"]);
    spec.input = b"2".to_vec();
    spec.events = Some(tx);
    let report = run(&rt, &program, spec).await;
    assert_eq!(report.outcome, Outcome::Exited(0), "{}", sb.stderr());
    assert_eq!(report.output.as_deref(), Some(&b"done after 2 steps"[..]));
    assert_eq!(
        std::fs::read(sb.dir.path().join("output")).unwrap(),
        b"done after 2 steps"
    );
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    let progress: Vec<f32> = events
        .iter()
        .filter_map(|e| match e {
            GuestEvent::Progress { fraction, .. } => Some(*fraction),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [0.5, 1.0], "{events:?}");
    let logs = events
        .iter()
        .filter(|e| matches!(e, GuestEvent::Log { message, .. } if message.starts_with("step")))
        .count();
    assert_eq!(logs, 2, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, GuestEvent::Message(m) if m.starts_with(b"checksum "))),
        "{events:?}"
    );
    assert!(
        sb.stderr().contains("[info] step 1 of 2"),
        "{}",
        sb.stderr()
    );
    assert!(report.usage.fuel_used > 0);
}

#[tokio::test]
async fn a_task_error_fails_the_task_with_its_message() {
    let rt = runtime();
    let program = load(&rt, guest_bytes("transform")).await;
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["transform"]);
    spec.input = b"abc".to_vec();
    spec.env.push(("MODE".into(), "sideways".into()));
    let report = run(&rt, &program, spec).await;
    match &report.outcome {
        Outcome::TaskError(m) => assert!(m.contains("unknown MODE \"sideways\""), "{m}"),
        other => panic!("{other}"),
    }
    assert_eq!(report.output, None);

    let mut spec = sb.spec(&["transform"]);
    spec.input = b"Hello".to_vec();
    spec.env.push(("MODE".into(), "rot13".into()));
    let report = run(&rt, &program, spec).await;
    assert_eq!(report.output.as_deref(), Some(&b"Uryyb"[..]));
}

#[tokio::test]
async fn word_count_maps_and_reduces() {
    let rt = runtime();
    let map = load(&rt, guest_bytes("wordcount_map")).await;
    let reduce = load(&rt, guest_bytes("wordcount_reduce")).await;
    let mut mapped = Vec::new();
    for text in ["the cat sat on the mat", "The dog sat"] {
        let sb = Sandbox::new();
        let mut spec = sb.spec(&["map"]);
        spec.input = text.as_bytes().to_vec();
        let r = run(&rt, &map, spec).await;
        assert_eq!(r.outcome, Outcome::Exited(0));
        mapped.extend(r.output.unwrap());
    }
    let sb = Sandbox::new();
    let mut spec = sb.spec(&["reduce"]);
    spec.input = mapped;
    let r = run(&rt, &reduce, spec).await;
    assert_eq!(
        String::from_utf8(r.output.unwrap()).unwrap(),
        "the\t3\nsat\t2\ncat\t1\ndog\t1\nmat\t1\non\t1\n"
    );
}

#[tokio::test]
async fn a_component_of_another_world_is_refused_with_what_was_expected() {
    let rt = runtime();
    let err = rt
        .load(ModuleSource::Bytes(guest_bytes("wrongworld").into()), None)
        .await
        .unwrap_err();
    match &err {
        LoadError::NotACommand(m) => {
            assert!(
                m.contains("agora:task") && m.contains("wasi:cli/run"),
                "{m}"
            );
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn the_host_never_writes_through_a_link_planted_in_the_sandbox() {
    let rt = runtime();
    let program = load(&rt, guest_bytes("progress")).await;
    // What a guest with its sandbox could leave behind: names pointing at a host file.
    let host = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(host.path(), "host data").unwrap();

    let sb = Sandbox::new();
    std::os::unix::fs::symlink(host.path(), sb.dir.path().join("output")).unwrap();
    let mut spec = sb.spec(&["progress"]);
    spec.input = b"1".to_vec();
    let report = run(&rt, &program, spec).await;
    assert_eq!(report.outcome, Outcome::Exited(0), "{}", sb.stderr());
    assert_eq!(std::fs::read_to_string(host.path()).unwrap(), "host data");
    let meta = std::fs::symlink_metadata(sb.dir.path().join("output")).unwrap();
    assert!(
        meta.file_type().is_file(),
        "the link was replaced by a file"
    );
    assert_eq!(
        std::fs::read(sb.dir.path().join("output")).unwrap(),
        b"done after 1 steps"
    );

    // A stderr that is a link is not opened at all: the run is refused, saying why.
    let sb = Sandbox::new();
    std::os::unix::fs::symlink(host.path(), sb.dir.path().join("stderr")).unwrap();
    let report = run(&rt, &program, sb.spec(&["progress"])).await;
    assert!(
        matches!(&report.outcome, Outcome::InstantiationFailed(m) if m.contains("stderr")),
        "{}",
        report.outcome
    );
    assert_eq!(std::fs::read_to_string(host.path()).unwrap(), "host data");
}
