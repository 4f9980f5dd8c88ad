//! The agent's side of issue 10 ("Hardening"), through a real master and agent over gRPC:
//! out-of-range numbers, one status update in flight per task, task users and root, the
//! init's environment, memory and pids bounds, private sandboxes, and an agent whose own
//! parts fail.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

use agora_core::TaskState;
use agora_proto::{resources_from_proto, v1};
use agora_sdk::{Event, Scheduler, SchedulerConfig, TaskBuilder, read_sandbox_file};

use crate::native::{command, endpoint, start, start_with, wait_no_cgroups};
use crate::*;

/// Launches `task` and expects it refused for `field`: by the master when it accepts, or
/// by the agent with TASK_ERROR / REASON_TASK_INVALID (whichever checks first). Returns
/// what it said.
async fn expect_refused(
    s: &Scheduler,
    events: &mut Events,
    task: TaskBuilder,
    field: &str,
) -> String {
    let id = task.clone().build().task_id.unwrap().value;
    let offer = next_offers(events).await.remove(0);
    let accepted = s
        .accept(
            &[offer.id.clone().unwrap()],
            vec![task.build_for(&offer)],
            Some(0.0),
        )
        .await;
    if let Err(e) = accepted {
        assert!(e.to_string().contains(field), "{field:?} not in {e}");
        // A refused accept may leave the offer standing: give it back.
        let _ = s.decline(&[offer.id.clone().unwrap()], Some(0.0)).await;
        return e.to_string();
    }
    let end = wait_terminal(events, &tid(&id)).await;
    assert_eq!(state_of(&end), TaskState::Error, "{}", end.message);
    assert!(
        end.message.contains(field),
        "{field:?} not in {:?}",
        end.message
    );
    if end.source() == v1::StatusSource::SourceAgent {
        assert_eq!(end.reason(), v1::Reason::TaskInvalid, "{}", end.message);
    }
    end.message
}

fn with_grace(task: TaskBuilder, grace: f64) -> TaskBuilder {
    let mut t = task.build();
    t.kill_policy = Some(v1::KillPolicy {
        grace_period_seconds: grace,
    });
    TaskBuilder::from_info(t)
}

/// Waits for an offer holding at least `mem` MiB: the resources of every earlier task are
/// back.
async fn offer_with_mem(events: &mut Events, mem: f64) -> v1::Offer {
    loop {
        for o in next_offers(events).await {
            if resources_from_proto(&o.resources).unwrap().mem() >= mem {
                return o;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_numbers_end_tasks_in_task_error_and_free_their_resources() {
    let test = "out_of_range_numbers_end_tasks_in_task_error_and_free_their_resources";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("numbers").await;
    // Before: 1e20 panicked the task's runner and left the task in STARTING for ever.
    expect_refused(
        &s,
        &mut events,
        command("forever", "sleep 100", "cpus:0.5;mem:64").max_duration(1e20),
        "max_duration",
    )
    .await;
    for (id, grace) in [
        ("nan-grace", f64::NAN),
        ("huge-grace", 1e20),
        ("neg-grace", -1.0),
    ] {
        expect_refused(
            &s,
            &mut events,
            with_grace(command(id, "sleep 100", "cpus:0.5;mem:64"), grace),
            "kill_policy.grace_period_seconds",
        )
        .await;
    }
    let wasm = wasm_task("wasm-forever", "hello", "cpus:0.5;mem:64").max_duration(f64::INFINITY);
    expect_refused(&s, &mut events, wasm, "max_duration").await;
    expect_refused(
        &s,
        &mut events,
        command("many-pids", "true", "cpus:0.5;mem:64").pids_max(u64::MAX),
        "pids_max",
    )
    .await;
    // Everything came back: a task can take the whole agent, and still be killed.
    let offer = offer_with_mem(&mut events, 1024.0).await;
    let all = command("all", "sleep 100", "cpus:2;mem:1024").max_duration(3600.0);
    s.accept(
        &[offer.id.clone().unwrap()],
        vec![all.build_for(&offer)],
        Some(0.0),
    )
    .await
    .unwrap();
    wait_state(&mut events, &tid("all"), TaskState::Running).await;
    s.kill(&tid("all"), None).await.unwrap();
    let end = wait_terminal(&mut events, &tid("all")).await;
    assert_eq!(state_of(&end), TaskState::Killed, "{}", end.message);
    wait_no_cgroups(test).await;
}

/// Collects `task`'s updates in order: acknowledging none until `hold` says so, and
/// recording each.
async fn updates_of(events: &mut Events, task: &str) -> v1::TaskStatus {
    next_matching(events, &format!("an update of {task}"), |e| match e {
        Event::Update(u) if u.task_id.as_ref().is_some_and(|t| t.value == task) => Some(u),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framework_never_sees_an_update_after_a_terminal_one() {
    let test = "a_framework_never_sees_an_update_after_a_terminal_one";
    let cluster = start(test, None).await;
    let mut config = SchedulerConfig::new(cluster.master.clone(), "slow-acks");
    config.auto_acknowledge = false;
    let (s, mut events) = cluster.framework_with(config).await;
    // STARTING, RUNNING and FINISHED follow each other within milliseconds.
    launch(
        &s,
        &mut events,
        command("quick", "echo done", "cpus:0.1;mem:32"),
    )
    .await;
    let mut seen = vec![updates_of(&mut events, "quick").await];
    assert_eq!(state_of(&seen[0]), TaskState::Starting);
    // The task is over at the agent…
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    wait_until("the task to run", || async {
        read_sandbox_file(&ep, &fw, &tid("quick"), "stdout")
            .await
            .is_ok_and(|o| o == b"done\n")
    })
    .await;
    // …yet while STARTING is unacknowledged only STARTING comes, retried (every 500 ms here).
    while seen.len() < 4 {
        let u = updates_of(&mut events, "quick").await;
        assert_eq!(
            (state_of(&u), &u.uuid),
            (TaskState::Starting, &seen[0].uuid),
            "an update behind an unacknowledged one was sent: {u:?}"
        );
        seen.push(u);
    }
    // Each acknowledgement, late as it is, releases the next update, in order.
    let mut order = vec![TaskState::Starting];
    let mut head = seen.pop().unwrap();
    loop {
        s.acknowledge(&head).await.unwrap();
        if state_of(&head).is_terminal() {
            break;
        }
        let next = loop {
            let u = updates_of(&mut events, "quick").await;
            // A retry of the one just acknowledged may have crossed the acknowledgement.
            if u.uuid != head.uuid {
                break u;
            }
        };
        order.push(state_of(&next));
        head = next;
    }
    assert_eq!(
        order,
        [TaskState::Starting, TaskState::Running, TaskState::Finished]
    );
    wait_until("the task to be retired", || async {
        cluster.state().await.tasks.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_without_a_user_run_as_nobody_and_root_needs_the_flag() {
    let test = "tasks_without_a_user_run_as_nobody_and_root_needs_the_flag";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("users").await;
    launch(
        &s,
        &mut events,
        command("anon", "id -u; id -g", "cpus:0.1;mem:32"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("anon")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    let out = read_sandbox_file(&ep, &fw, &tid("anon"), "stdout")
        .await
        .unwrap();
    assert_eq!(out, b"65534\n65534\n", "{}", String::from_utf8_lossy(&out));
    expect_refused(
        &s,
        &mut events,
        command("as-root", "id -u", "cpus:0.1;mem:32").user("root"),
        "--allow-root-tasks",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_user_that_is_root_is_refused_too() {
    let test = "a_default_user_that_is_root_is_refused_too";
    let cluster = start_with(test, None, |c| c.native.default_user = "root".into()).await;
    let (s, mut events) = cluster.framework("users").await;
    let task = command("default-root", "id -u", "cpus:0.1;mem:32");
    let said = expect_refused(&s, &mut events, task, "--default-user").await;
    assert!(said.contains("--allow-root-tasks"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_tasks_run_when_the_agent_allows_them() {
    let test = "root_tasks_run_when_the_agent_allows_them";
    let cluster = start_with(test, None, |c| c.native.allow_root = true).await;
    let (s, mut events) = cluster.framework("root").await;
    launch(
        &s,
        &mut events,
        command("as-root", "id -u", "cpus:0.1;mem:32").user("root"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("as-root")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    launch(&s, &mut events, command("anon", "id -u", "cpus:0.1;mem:32")).await;
    let end = wait_terminal(&mut events, &tid("anon")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    let root = read_sandbox_file(&ep, &fw, &tid("as-root"), "stdout")
        .await
        .unwrap();
    assert_eq!(root, b"0\n");
    let anon = read_sandbox_file(&ep, &fw, &tid("anon"), "stdout")
        .await
        .unwrap();
    assert_eq!(anon, b"65534\n", "the default user still applies");
}

/// A preload library that records, in the sandbox, every process it is loaded into. Kept
/// outside /tmp, which tasks see privately.
fn preload_library() -> std::path::PathBuf {
    let dir =
        std::path::Path::new("/var/tmp").join(format!("agora-preload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = dir.join("mark.c");
    std::fs::write(
        &src,
        r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void mark(void) {
    const char *dir = getenv("MESOS_SANDBOX");
    if (!dir) return;
    char path[4096], exe[4096];
    snprintf(path, sizeof path, "%s/preloaded", dir);
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[n > 0 ? n : 0] = 0;
    FILE *f = fopen(path, "a");
    if (!f) return;
    fprintf(f, "uid=%d exe=%s\n", (int)getuid(), exe);
    fclose(f);
}
"#,
    )
    .unwrap();
    let lib = dir.join("libmark.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) to build the preload library");
    assert!(status.success(), "cc failed");
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o755)).unwrap();
    lib
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_init_runs_without_the_tasks_environment() {
    let test = "the_init_runs_without_the_tasks_environment";
    let lib = preload_library();
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("preload").await;
    let lib = lib.to_string_lossy().into_owned();
    let task = command(
        "hostile",
        "echo \"$LD_PRELOAD|$LD_LIBRARY_PATH|$HOME\"; echo $$",
        "cpus:0.1;mem:32",
    )
    .env("LD_PRELOAD", lib.clone())
    .env("LD_LIBRARY_PATH", "/nonexistent/lib");
    launch(&s, &mut events, task).await;
    let end = wait_terminal(&mut events, &tid("hostile")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    assert!(end.isolation.contains("pid-ns"), "{}", end.isolation);
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    let out = read_sandbox_file(&ep, &fw, &tid("hostile"), "stdout")
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().collect();
    // The task has its whole environment, and runs as PID 2 under the init.
    assert!(
        lines[0].starts_with(&format!("{lib}|/nonexistent/lib|/")),
        "{out}"
    );
    assert_eq!(lines[1], "2", "{out}");
    let marks = read_sandbox_file(&ep, &fw, &tid("hostile"), "preloaded")
        .await
        .unwrap();
    let marks = String::from_utf8_lossy(&marks);
    let _ = std::fs::remove_dir_all(std::path::Path::new(&lib).parent().unwrap());
    assert!(
        !marks.lines().any(|l| l.starts_with("uid=0 ")),
        "the task's LD_PRELOAD loaded into a root process: {marks}"
    );
    assert!(
        marks.lines().any(|l| l.starts_with("uid=65534 ")),
        "the library loads into the task: {marks}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_without_mem_is_refused_and_pids_max_is_capped() {
    let test = "a_task_without_mem_is_refused_and_pids_max_is_capped";
    let cluster = start_with(test, None, |c| c.native.pids_max = Some(64)).await;
    let (s, mut events) = cluster.framework("bounds").await;
    expect_refused(
        &s,
        &mut events,
        command("no-mem", "true", "cpus:0.1"),
        "mem",
    )
    .await;
    let script = "cat /sys/fs/cgroup/pids$(grep ':pids:' /proc/self/cgroup | cut -d: -f3)/pids.max";
    launch(
        &s,
        &mut events,
        command("greedy", script, "cpus:0.1;mem:32").pids_max(100_000),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("greedy")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    launch(
        &s,
        &mut events,
        command("modest", script, "cpus:0.1;mem:32").pids_max(10),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("modest")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let ep = endpoint(&cluster).await;
    let greedy = read_sandbox_file(&ep, &fw, &tid("greedy"), "stdout")
        .await
        .unwrap();
    assert_eq!(greedy, b"64\n", "capped at the agent's --pids-max");
    let modest = read_sandbox_file(&ep, &fw, &tid("modest"), "stdout")
        .await
        .unwrap();
    assert_eq!(modest, b"10\n", "a task may lower it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_are_private_to_the_tasks_user() {
    let test = "sandboxes_are_private_to_the_tasks_user";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("private").await;
    launch(
        &s,
        &mut events,
        command("secret", "echo s3cret; echo err >&2", "cpus:0.1;mem:32"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("secret")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let fw = s.framework_id().unwrap();
    let work_dir = std::fs::canonicalize(cluster.dir.path().join("agent-1")).unwrap();
    let run = agora_agent::sandbox::latest_run_dir(&work_dir, &fw, &tid("secret")).unwrap();
    let meta = std::fs::metadata(&run).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid()),
        (0o700, 65534),
        "{}",
        run.display()
    );
    for log in ["stdout", "stderr"] {
        let m = std::fs::metadata(run.join(log)).unwrap();
        assert_eq!((m.mode() & 0o777, m.uid()), (0o600, 65534), "{log}");
    }
    // Another unprivileged user can reach nothing of it.
    let as_daemon = |program: &str, arg: &std::path::Path| {
        std::process::Command::new(program)
            .arg(arg)
            .uid(1)
            .gid(1)
            .output()
            .unwrap()
    };
    let cat = as_daemon("cat", &run.join("stdout"));
    assert!(
        !cat.status.success() && cat.stdout.is_empty(),
        "daemon read the task's stdout: {:?}",
        String::from_utf8_lossy(&cat.stdout)
    );
    let ls = as_daemon("ls", &work_dir.join("frameworks"));
    assert!(!ls.status.success(), "daemon listed the frameworks");
    let mut dir = run.parent().unwrap().to_owned();
    while dir.starts_with(&work_dir) {
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(m.mode() & 0o777, 0o711, "{}", dir.display());
        if !dir.pop() {
            break;
        }
    }
    // The agent still serves the files, whatever offset and length a client asks for.
    let ep = endpoint(&cluster).await;
    let out = read_sandbox_file(&ep, &fw, &tid("secret"), "stdout")
        .await
        .unwrap();
    assert_eq!(out, b"s3cret\n");
    let mut client = v1::sandbox_client::SandboxClient::connect(ep)
        .await
        .unwrap();
    for (offset, length, data) in [
        (u64::MAX, u64::MAX, &b""[..]),
        (3, u64::MAX, &b"ret\n"[..]),
        (u64::MAX - 1, 1, &b""[..]),
    ] {
        let r = client
            .read_file(v1::ReadFileRequest {
                framework_id: Some((&fw).into()),
                task_id: Some((&tid("secret")).into()),
                path: "stdout".into(),
                offset,
                length,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((&r.data[..], r.eof), (data, true), "offset {offset}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_link_cannot_start_fails_instead_of_idling() {
    let dir = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let mut config = agora_agent::AgentConfig::new("not a master address", dir.path());
    config.native.cgroup_root = empty.path().to_owned();
    config.native.cgroup_parent = format!("agora-test-{}-badlink", std::process::id());
    config.wasm_executor = None;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ran = tokio::time::timeout(
        WAIT,
        agora_agent::run(listener, config, std::future::pending()),
    )
    .await
    .expect("the agent to stop when it cannot reach any master");
    let err = ran.unwrap_err();
    assert!(err.to_string().contains("invalid master address"), "{err}");
}

/// The executor's environment, from the file its command wrote into its sandbox.
fn executor_env(file: &std::path::Path) -> Option<agora_sdk::executor::ExecutorEnv> {
    let text = std::fs::read_to_string(file).ok()?;
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    Some(agora_sdk::executor::ExecutorEnv {
        endpoint: var("AGORA_AGENT_ENDPOINT")?,
        framework_id: agora_core::FrameworkId::new(var("AGORA_FRAMEWORK_ID")?).ok()?,
        executor_id: agora_core::ExecutorId::new(var("AGORA_EXECUTOR_ID")?).ok()?,
        token: var("AGORA_EXECUTOR_TOKEN")?,
        recovery_timeout: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_executor_runs_as_the_default_user_and_its_bad_reports_are_refused() {
    use agora_sdk::executor::{ExecutorEvent, status};
    let test = "a_custom_executor_runs_as_the_default_user_and_its_bad_reports_are_refused";
    let cluster = start(test, None).await;
    let (s, mut events) = cluster.framework("reports").await;
    // An executor that only tells the test who it is; the test speaks for it.
    let info = agora_sdk::task::executor(
        &agora_core::ExecutorId::new("teller").unwrap(),
        "id -u > \"$MESOS_SANDBOX/uid\"; env > \"$MESOS_SANDBOX/env\"; exec sleep 60",
    );
    let task = TaskBuilder::from_info(v1::TaskInfo {
        name: "t".into(),
        task_id: Some((&tid("t")).into()),
        ..Default::default()
    })
    .resources(agora_core::parse_resources("cpus:0.2;mem:64").unwrap())
    .executor(info);
    launch(&s, &mut events, task).await;
    let fw = s.framework_id().unwrap();
    let runs = std::fs::canonicalize(cluster.dir.path().join("agent-1"))
        .unwrap()
        .join("frameworks")
        .join(fw.as_str())
        .join("executors/teller/runs");
    let found = || {
        std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|r| executor_env(&r.path().join("env")))
    };
    wait_until("the executor to write its environment", || async {
        found().is_some()
    })
    .await;
    // Naming no user, the executor runs as the agent's default one.
    let uid = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .find_map(|r| std::fs::read_to_string(r.path().join("uid")).ok());
    assert_eq!(uid.as_deref(), Some("65534\n"));
    let (executor, mut from_agent) = found().unwrap().subscribe().await.unwrap();
    loop {
        let ev = tokio::time::timeout(WAIT, from_agent.next()).await.unwrap();
        if let Some(Ok(ExecutorEvent::Launch { .. })) = ev {
            break;
        }
    }
    let t = tid("t");
    let running = |f: &dyn Fn(&mut v1::TaskStatus)| {
        let mut st = status(&t, TaskState::Running, "");
        f(&mut st);
        st
    };
    let cases: Vec<(v1::TaskStatus, &str)> = vec![
        (running(&|s| s.progress = Some(f32::NAN)), "status.progress"),
        (running(&|s| s.progress = Some(2.0)), "status.progress"),
        (
            running(&|s| s.message = "x".repeat(agora_core::limits::MAX_ARG + 1)),
            "status.message",
        ),
        (running(&|s| s.data = vec![0; 2 << 20]), "status.data"),
        (
            running(&|s| {
                s.usage = Some(v1::TaskUsage {
                    cpu_seconds: f64::NAN,
                    ..Default::default()
                });
            }),
            "status.usage.cpu_seconds",
        ),
    ];
    for (st, field) in cases {
        let err = executor.update(st).await.unwrap_err();
        assert!(
            matches!(&err, agora_sdk::Error::Refused { code: tonic::Code::InvalidArgument, message } if message.contains(field)),
            "{field}: {err}"
        );
    }
    let usage = v1::TaskUsage {
        wall_seconds: f64::INFINITY,
        ..Default::default()
    };
    let err = executor.usage(vec![(t.clone(), usage)]).await.unwrap_err();
    assert!(
        err.to_string().contains("tasks.usage.wall_seconds"),
        "{err}"
    );
    // In range, the same reports are taken and reach the framework.
    executor
        .update(running(&|s| s.progress = Some(0.5)))
        .await
        .unwrap();
    let seen = wait_state(&mut events, &t, TaskState::Running).await;
    assert_eq!(seen.progress, Some(0.5));
    s.acknowledge(&seen).await.unwrap();
    executor
        .update(status(&t, TaskState::Finished, "done"))
        .await
        .unwrap();
    let end = wait_terminal(&mut events, &t).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
}
