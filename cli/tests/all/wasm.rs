//! Wasm tasks through the whole cluster, in the frameworks' Wasm executor processes: the
//! guest SDK round trip, capabilities against the agent's policy, bundles, live usage, and
//! a crashed executor taking only its own framework's tasks with it.

use std::collections::HashMap;
use std::time::Duration;

use agora_core::TaskState;
use agora_examples::{Target, guest_bundle, guest_bytes, task_bytes};
use agora_proto::v1;
use agora_sdk::{Event, TaskBuilder, agent_containers, read_sandbox_file};

use crate::native::{endpoint, start_with, start_with_master, wait_no_cgroups};

/// A master that takes back unanswered offers quickly, for tests where two frameworks (or
/// two launches) must each get one while others sit unanswered.
fn rescinding_master() -> agora_master::MasterConfig {
    agora_master::MasterConfig {
        offer_timeout: Some(Duration::from_secs(1)),
        ..fast_master()
    }
}
use crate::*;

fn guest(id: &str, name: &str) -> TaskBuilder {
    TaskBuilder::wasm(tid(id), guest_bytes(name))
        .resources(agora_core::parse_resources("cpus:0.5;mem:64").unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_sdk_task_logs_reports_progress_messages_and_returns_output() {
    let test = "a_guest_sdk_task_logs_reports_progress_messages_and_returns_output";
    let cluster = start_with(test, None, |_| {}).await;
    let (s, mut events) = cluster.framework("guest").await;
    launch(&s, &mut events, guest("steps", "progress").input("2")).await;
    let mut progress = Vec::new();
    let mut messages = Vec::new();
    let end = loop {
        let e = next_matching(&mut events, "steps to end", |e| match e {
            Event::Update(_) | Event::Message { .. } => Some(e),
            _ => None,
        })
        .await;
        match e {
            Event::Update(st) if state_of(&st).is_terminal() => break st,
            Event::Update(st) => {
                if let Some(p) = st.progress {
                    assert_eq!(state_of(&st), TaskState::Running);
                    progress.push((p, st.message.clone()));
                }
            }
            Event::Message { data, task_id, .. } => {
                assert_eq!(task_id.as_ref().map(|t| t.as_str()), Some("steps"));
                messages.push(data);
            }
            _ => {}
        }
    };
    assert_eq!(
        (state_of(&end), end.data.as_slice()),
        (TaskState::Finished, &b"done after 2 steps"[..]),
        "{}",
        end.message
    );
    assert_eq!(
        progress,
        [
            (0.5, "step 1 of 2".to_owned()),
            (1.0, "step 2 of 2".to_owned())
        ]
    );
    assert_eq!(messages.len(), 1);
    assert!(messages[0].starts_with(b"checksum "), "{messages:?}");
    assert!(end.usage.unwrap().fuel_used > 0);
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    let log = read_sandbox_file(&ep, &fw, &tid("steps"), "stderr")
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("[info] step 2 of 2"), "{log}");
    let out = read_sandbox_file(&ep, &fw, &tid("steps"), "output")
        .await
        .unwrap();
    assert_eq!(out, b"done after 2 steps");

    // A task's error fails it with its message.
    launch(
        &s,
        &mut events,
        guest("bad-mode", "transform")
            .env("MODE", "sideways")
            .input("x"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("bad-mode")).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::CommandExited,
        "unknown MODE",
    );
    // A component of another world is refused, naming what was expected.
    launch(&s, &mut events, guest("wrong", "wrongworld")).await;
    let end = wait_terminal(&mut events, &tid("wrong")).await;
    assert_ended(
        &end,
        TaskState::Error,
        v1::Reason::ModuleInvalid,
        "agora:task",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_are_given_within_the_agents_policy_and_refused_beyond_it() {
    let test = "capabilities_are_given_within_the_agents_policy_and_refused_beyond_it";
    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("shared.txt"), "from the volume").unwrap();
    let vol_path = volume.path().to_owned();
    // SAFETY: set before the agent starts, read by it alone.
    unsafe { std::env::set_var("AGORA_TEST_PUBLIC_VALUE", "visible") };
    let cluster = start_with(test, None, move |c| {
        c.wasm_policy.volumes.insert(
            "shared".into(),
            agora_agent::Volume {
                path: vol_path,
                read_only: true,
            },
        );
        c.wasm_policy.allow_env = vec!["AGORA_TEST_PUBLIC_*".into()];
    })
    .await;
    let (s, mut events) = cluster.framework("caps").await;
    let probe = |id: &str| {
        TaskBuilder::wasm(tid(id), task_bytes("capprobe", Target::P2))
            .resources(agora_core::parse_resources("cpus:0.2;mem:32").unwrap())
    };
    let task = probe("granted")
        .args([
            "read:/data/shared.txt",
            "env:AGORA_TEST_PUBLIC_VALUE",
            "env:HOME",
            "write:note.txt",
        ])
        .grant_volume("shared", "/data", true)
        .grant_host_env("AGORA_TEST_PUBLIC_VALUE")
        .grant_sandbox();
    launch(&s, &mut events, task).await;
    let end = wait_terminal(&mut events, &tid("granted")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let out = read_sandbox_file(&endpoint(&cluster).await, &fw, &tid("granted"), "stdout")
        .await
        .unwrap();
    let out: HashMap<String, String> = String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    assert_eq!(out["read:/data/shared.txt"], "ok from the volume");
    assert_eq!(out["env:AGORA_TEST_PUBLIC_VALUE"], "ok visible");
    assert!(out["env:HOME"].starts_with("denied"), "{out:?}");
    assert_eq!(out["write:note.txt"].trim(), "ok");

    // Each grant beyond the policy is refused, by name.
    let refused = [
        (
            probe("rw-volume").grant_volume("shared", "/data", false),
            "lends read-only",
        ),
        (
            probe("no-volume").grant_volume("secrets", "/s", true),
            "volume \"secrets\"",
        ),
        (
            probe("home").grant_host_env("HOME"),
            "environment variable \"HOME\"",
        ),
        (
            probe("net").grant_connect("127.0.0.1:80"),
            "connect to 127.0.0.1:80",
        ),
    ];
    for (task, says) in refused {
        let id = task.clone().build().task_id.unwrap().value;
        launch(&s, &mut events, task).await;
        let end = wait_terminal(&mut events, &tid(&id)).await;
        assert_ended(&end, TaskState::Error, v1::Reason::TaskInvalid, says);
    }
    wait_no_cgroups(test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_wasm_executor_takes_only_its_own_frameworks_tasks() {
    let test = "a_crashed_wasm_executor_takes_only_its_own_frameworks_tasks";
    let cluster = start_with_master(test, rescinding_master(), |_| {}).await;
    let sleeper = |id: &str| {
        TaskBuilder::wasm(tid(id), task_bytes("sleeper", Target::P1))
            .resources(agora_core::parse_resources("cpus:0.1;mem:32").unwrap())
            .args(["600"])
    };
    let (a, mut a_events) = cluster.framework("doomed").await;
    let (b, mut b_events) = cluster.framework("bystander").await;
    launch(&a, &mut a_events, sleeper("a1")).await;
    launch(&b, &mut b_events, sleeper("b1")).await;
    wait_state(&mut a_events, &tid("a1"), TaskState::Running).await;
    wait_state(&mut b_events, &tid("b1"), TaskState::Running).await;
    let ep = endpoint(&cluster).await;
    let a_id = a.framework_id().unwrap();
    let execs: Vec<v1::ContainerStatus> = agent_containers(&ep)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.task_id.is_none())
        .collect();
    assert_eq!(execs.len(), 2, "one Wasm executor per framework: {execs:?}");
    let doomed = execs
        .iter()
        .find(|c| c.framework_id.as_ref().unwrap().value == a_id.as_str())
        .unwrap();
    assert_eq!(doomed.executor_id.as_ref().unwrap().value, "agora-wasm");
    // SAFETY: kill(2) on the executor process this test's agent started.
    unsafe {
        libc::kill(doomed.pid as i32, libc::SIGKILL);
    }
    let end = wait_terminal(&mut a_events, &tid("a1")).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ExecutorTerminated,
        "executor agora-wasm terminated",
    );
    // The other framework's task runs on, and the agent serves new tasks.
    let live = agent_containers(&ep).await.unwrap();
    assert!(
        live.iter()
            .any(|c| c.task_id.as_ref().is_some_and(|t| t.value == "b1")),
        "{live:?}"
    );
    launch(
        &a,
        &mut a_events,
        TaskBuilder::wasm(tid("again"), task_bytes("hello", Target::P1))
            .resources(agora_core::parse_resources("cpus:0.1;mem:32").unwrap()),
    )
    .await;
    let end = wait_terminal(&mut a_events, &tid("again")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    b.kill(&tid("b1"), None).await.unwrap();
    let end = wait_terminal(&mut b_events, &tid("b1")).await;
    assert_eq!(state_of(&end), TaskState::Killed, "{}", end.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_wasm_tasks_usage_is_live_and_a_loop_does_not_hold_up_a_hundred_tasks() {
    let test = "a_running_wasm_tasks_usage_is_live_and_a_loop_does_not_hold_up_a_hundred_tasks";
    let cluster = start_with_master(test, rescinding_master(), |_| {}).await;
    let (s, mut events) = cluster.framework("many").await;
    let spin = TaskBuilder::wasm(tid("spin"), task_bytes("spin", Target::P1))
        .resources(agora_core::parse_resources("cpus:0.5;mem:32").unwrap());
    launch(&s, &mut events, spin).await;
    wait_state(&mut events, &tid("spin"), TaskState::Running).await;
    let ep = endpoint(&cluster).await;
    wait_until("the spinner's CPU time to show", || async {
        agent_containers(&ep).await.unwrap().iter().any(|c| {
            c.task_id.as_ref().is_some_and(|t| t.value == "spin")
                && c.usage
                    .is_some_and(|u| u.cpu_seconds > 0.1 && u.wall_seconds > 0.2)
        })
    })
    .await;

    // A hundred short tasks beside it, in one offer (a fresh one: an offer that sat in the
    // event queue may have been taken back).
    let hello = task_bytes("hello", Target::P1);
    let t = loop {
        let offer = next_offers(&mut events).await.remove(0);
        let tasks: Vec<v1::TaskInfo> = (0..100)
            .map(|i| {
                TaskBuilder::wasm(tid(&format!("h{i}")), hello.clone())
                    .resources(agora_core::parse_resources("cpus:0.01;mem:2").unwrap())
                    .build_for(&offer)
            })
            .collect();
        let t = std::time::Instant::now();
        match s
            .accept(&[offer.id.clone().unwrap()], tasks, Some(0.0))
            .await
        {
            Ok(()) => break t,
            Err(e) if e.to_string().contains("no longer valid") => continue,
            Err(e) => panic!("{e}"),
        }
    };
    let mut finished = 0;
    while finished < 100 {
        let st = next_matching(&mut events, "the hundred to finish", |e| match e {
            Event::Update(st) if state_of(&st).is_terminal() => Some(st),
            _ => None,
        })
        .await;
        assert_eq!(state_of(&st), TaskState::Finished, "{}", st.message);
        finished += 1;
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    s.kill(&tid("spin"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("spin")).await;
    assert_eq!(state_of(&end), TaskState::Killed);
}

#[test]
fn bundles_run_with_agora_run_and_bad_ones_are_refused_before_upload() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(async {
        let mut c = Cluster::start(&[]).await;
        c.add_agent("cpus:2;mem:1024").await;
        c.wait_for_agents(1).await;
        c
    });
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
            .arg("run")
            .args(["--master", &cluster.master])
            .args(args)
            .output()
            .unwrap()
    };
    let map = guest_bundle("wordcount_map");
    let out = run(&[map.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let counts = String::from_utf8_lossy(&out.stdout);
    assert!(
        counts.contains("was\t8\n") && counts.contains("times\t2\n"),
        "{counts}"
    );

    // Packed into one archive, then run from it.
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("transform.agora.tgz");
    let built = std::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["bundle", "build", "-o"])
        .arg(&archive)
        .arg(guest_bundle("transform"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let out = run(&[archive.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Uryyb sebz n ohaqyr.\nGur frpbaq yvar.\n"
    );

    // A bad manifest: nothing reaches the blob store.
    let blobs = cluster.dir.path().join("master").join("blobs");
    let before = std::fs::read_dir(&blobs).unwrap().count();
    let bad = tempfile::tempdir().unwrap();
    std::fs::copy(map.join("wordcount_map.wasm"), bad.path().join("m.wasm")).unwrap();
    std::fs::write(
        bad.path().join("agora.toml"),
        "name = \"bad\"\nkind = \"wasm\"\nmodule = \"m.wasm\"\n[resources]\ncpus = 1\n",
    )
    .unwrap();
    let out = run(&[bad.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`resources.mem`"), "{stderr}");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), before);
    drop(rt);
}
