//! Disks do not fill: finished sandboxes are collected, native logs are capped by default,
//! and a native task past its `disk` fails with REASON_CONTAINER_LIMITATION_DISK. Real
//! processes and files through a real cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agora_core::TaskState;
use agora_proto::v1;

use crate::native::{command, start_with};
use crate::*;

/// The run directories of task `id` under the agent's work directory, whatever its
/// framework.
fn runs_of(work_dir: &Path, id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for fw in std::fs::read_dir(work_dir.join("frameworks"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let runs = fw.path().join("tasks").join(id).join("runs");
        for run in std::fs::read_dir(runs).into_iter().flatten().flatten() {
            out.push(run.path());
        }
    }
    out
}

/// Launches `tasks` together on the next offer (a running task's updates would otherwise
/// be waited past the offer of what it left).
async fn launch_all(
    scheduler: &agora_sdk::Scheduler,
    events: &mut agora_sdk::Events,
    tasks: Vec<agora_sdk::TaskBuilder>,
) {
    loop {
        let offer = next_offers(events).await.remove(0);
        let infos = tasks.iter().map(|t| t.clone().build_for(&offer)).collect();
        match scheduler
            .accept(&[offer.id.clone().unwrap()], infos, Some(0.0))
            .await
        {
            Ok(()) => return,
            // Taken back meanwhile (the agent re-registered): the next one.
            Err(e) if e.to_string().contains("no longer valid") => continue,
            Err(e) => panic!("accepting an offer: {e}"),
        }
    }
}

fn work_dir(cluster: &Cluster) -> PathBuf {
    // The first agent's, as `Cluster::agent_config` names it.
    std::fs::canonicalize(cluster.dir.path().join("agent-1")).unwrap()
}

#[tokio::test]
async fn finished_sandboxes_are_collected_after_the_delay_and_running_ones_stay() {
    let cluster = start_with("disk-gc", None, |c| {
        c.gc.delay = Duration::from_secs(1);
        c.gc.disk_headroom = 0.0;
        c.gc.disk_watch_interval = Duration::from_millis(200);
    })
    .await;
    let work = work_dir(&cluster);
    let (s, mut events) = cluster.framework("gc").await;

    let (live, done) = (tid("live"), tid("done"));
    launch_all(
        &s,
        &mut events,
        vec![
            command("live", "echo alive; sleep 60", "cpus:0.1;mem:32"),
            command("done", "sleep 0.5; echo finished", "cpus:0.1;mem:32"),
        ],
    )
    .await;
    let end = wait_terminal(&mut events, &done).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    let done_runs = runs_of(&work, "done");
    assert_eq!(done_runs.len(), 1, "{done_runs:?}");
    let live_runs = runs_of(&work, "live");
    assert_eq!(live_runs.len(), 1, "{live_runs:?}");

    wait_until("the live task to run", || async {
        cluster.state().await.tasks.iter().any(|t| {
            t.task_id.as_ref().is_some_and(|i| i.value == "live")
                && t.state() == v1::TaskState::TaskRunning
        })
    })
    .await;
    // The live task started before the other ended, so had it been scheduled at its start
    // it would go first.
    wait_until("the finished task's sandbox to be removed", || async {
        !done_runs[0].exists()
    })
    .await;
    // Then its task directory, left empty.
    wait_until("the finished task's directory to be removed", || async {
        !done_runs[0].parent().unwrap().parent().unwrap().exists()
    })
    .await;
    assert!(
        live_runs[0].join("stdout").is_file(),
        "a running task's sandbox was removed"
    );
    let running = cluster.state().await.tasks.iter().any(|t| {
        t.task_id.as_ref().is_some_and(|i| i.value == "live")
            && t.state() == v1::TaskState::TaskRunning
    });
    assert!(running, "the live task should still run");

    s.kill(&live, None).await.unwrap();
    wait_terminal(&mut events, &live).await;
    wait_until("the killed task's sandbox to be removed", || async {
        !live_runs[0].exists()
    })
    .await;
    let ep = crate::native::endpoint(&cluster).await;
    wait_until("the removals to be counted", || async {
        agora_sdk::agent_metrics(&ep).await.unwrap()["agora_agent_gc_sandboxes_removed_total"]
            >= 2.0
    })
    .await;
}

#[tokio::test]
async fn a_native_task_past_its_disk_fails_and_the_agent_keeps_serving() {
    let cluster = start_with("disk-quota", None, |c| {
        c.native.disk_watch_interval = Some(Duration::from_millis(100));
    })
    .await;
    let (s, mut events) = cluster.framework("quota").await;
    let hog = tid("hog");
    launch(
        &s,
        &mut events,
        command(
            "hog",
            "head -c 20000000 /dev/zero > fill && sleep 60",
            "cpus:0.1;mem:64;disk:8",
        ),
    )
    .await;
    let end = wait_terminal(&mut events, &hog).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ContainerLimitationDisk,
        "disk limit of 8.0 MiB",
    );
    assert!(end.message.contains("disk usage"), "{}", end.message);

    // Within its disk, a task runs to its end on the same agent.
    let fine = tid("fine");
    launch(
        &s,
        &mut events,
        command(
            "fine",
            "head -c 1000000 /dev/zero > small && echo ok",
            "cpus:0.1;mem:64;disk:8",
        ),
    )
    .await;
    let end = wait_terminal(&mut events, &fine).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
}

#[tokio::test]
async fn a_task_spewing_stdout_keeps_its_logs_under_the_default_cap() {
    // The agent's defaults, as `agora agent` has them.
    let defaults = agora_agent::NativeConfig::default();
    // Without a default (`None`), the cap a user expects: 10 MiB.
    let max = defaults.log_max_bytes.unwrap_or(10 << 20);
    let cap = max * (defaults.log_keep as u64 + 1);
    let cluster = start_with("disk-logs", None, |_| {}).await;
    let work = work_dir(&cluster);
    let (s, mut events) = cluster.framework("logs").await;
    let spew = tid("spew");
    // Three times the cap, then a last line.
    let script = format!("head -c {} /dev/zero; echo; echo the-end", 3 * cap);
    launch(&s, &mut events, command("spew", &script, "cpus:0.5;mem:64")).await;
    let end = wait_terminal(&mut events, &spew).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);

    let run = runs_of(&work, "spew").pop().unwrap();
    let mut total = 0;
    let mut files = Vec::new();
    for e in std::fs::read_dir(&run).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("stdout") {
            let len = e.metadata().unwrap().len();
            assert!(len <= max, "{name} holds {len} bytes, more than {max}");
            total += len;
            files.push(name);
        }
    }
    files.sort();
    assert!(
        total <= cap,
        "stdout files hold {total} bytes, more than {cap}: {files:?}"
    );
    assert_eq!(files.len(), defaults.log_keep + 1, "{files:?}");
    // The newest output is kept.
    let last = std::fs::read_to_string(run.join("stdout")).unwrap();
    assert!(
        last.ends_with("the-end\n"),
        "{:?}",
        &last[last.len().saturating_sub(40)..]
    );
}

#[tokio::test]
async fn module_store_and_compiled_cache_stay_bounded_and_keep_what_runs() {
    let mut cluster = Cluster::start(&[]).await;
    let mut config = cluster.agent_config("cpus:2;mem:1024");
    // Room for less than one module: only what is in use (or just stored) stays.
    config.module_store_max_bytes = Some(1);
    config.wasm.cache_max_bytes = Some(1);
    cluster.add_agent_with(config).await;
    cluster.wait_for_agents(1).await;
    let work = work_dir(&cluster);
    let hex = |name: &str| {
        agora_executor_wasm::digest(&agora_examples::task_bytes(
            name,
            agora_examples::Target::P1,
        ))
        .trim_start_matches("sha256:")
        .to_owned()
    };
    let stored = |name: &str| {
        work.join("modules")
            .join(format!("{}.wasm", hex(name)))
            .is_file()
    };
    let compiled = |name: &str| {
        let prefix = format!("{}.", hex(name));
        std::fs::read_dir(work.join("wasm-cache"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|fp| fp.path().is_dir())
            .flat_map(|fp| std::fs::read_dir(fp.path()).into_iter().flatten().flatten())
            .any(|f| f.file_name().to_string_lossy().starts_with(&prefix))
    };
    let (s, mut events) = cluster.framework("modules").await;

    let forever = tid("forever");
    launch_all(
        &s,
        &mut events,
        vec![
            wasm_task("forever", "spin", "cpus:0.5;mem:64"),
            wasm_task("hello-1", "hello", "cpus:0.5;mem:64"),
        ],
    )
    .await;
    let end = wait_terminal(&mut events, &tid("hello-1")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    launch(
        &s,
        &mut events,
        wasm_task("primes-1", "primes", "cpus:0.5;mem:64"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("primes-1")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    wait_until("the spinning task to run", || async {
        cluster.state().await.tasks.iter().any(|t| {
            t.task_id.as_ref().is_some_and(|i| i.value == "forever")
                && t.state() == v1::TaskState::TaskRunning
        })
    })
    .await;
    // hello's module and artifact went when primes' came; spin's stay while it runs.
    assert!(
        stored("spin") && compiled("spin"),
        "the running task's module was evicted"
    );
    assert!(stored("primes") && compiled("primes"));
    assert!(
        !stored("hello"),
        "the store kept an unused module past its bound"
    );
    assert!(
        !compiled("hello"),
        "the cache kept an unused artifact past its bound"
    );
    let m = agora_sdk::agent_metrics(&crate::native::endpoint(&cluster).await)
        .await
        .unwrap();
    assert!(
        m["agora_agent_module_store_evictions_total"] >= 1.0,
        "{m:?}"
    );
    assert!(m["agora_agent_wasm_cache_evictions_total"] >= 1.0, "{m:?}");

    s.kill(&forever, None).await.unwrap();
    wait_terminal(&mut events, &forever).await;
    // A module evicted earlier is fetched and compiled again when a task needs it.
    launch(
        &s,
        &mut events,
        wasm_task("hello-2", "hello", "cpus:0.5;mem:64"),
    )
    .await;
    let end = wait_terminal(&mut events, &tid("hello-2")).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);
    assert!(
        !stored("spin") && !compiled("spin"),
        "spin's module outlived its task"
    );
}

#[tokio::test]
async fn a_task_in_a_custom_executor_past_its_disk_fails_and_the_executors_sandbox_is_collected() {
    let cluster = start_with("disk-executor", None, |c| {
        c.native.disk_watch_interval = Some(Duration::from_millis(100));
        c.executors.idle_timeout = Duration::from_millis(300);
        c.gc.delay = Duration::from_secs(1);
        c.gc.disk_headroom = 0.0;
    })
    .await;
    let work = work_dir(&cluster);
    let (s, mut events) = cluster.framework("disk-executor").await;
    let exec = agora_sdk::task::executor(
        &agora_core::ExecutorId::new("runner").unwrap(),
        format!("exec {} executor", env!("CARGO_BIN_EXE_agora")),
    );
    let hog = tid("hog");
    let task = agora_sdk::TaskBuilder::from_info(v1::TaskInfo {
        name: "hog".into(),
        task_id: Some((&hog).into()),
        ..Default::default()
    })
    .resources(agora_core::parse_resources("cpus:0.2;mem:64;disk:8").unwrap())
    .executor(exec)
    .data("head -c 20000000 /dev/zero > fill && sleep 60");
    launch(&s, &mut events, task).await;
    let end = wait_terminal(&mut events, &hog).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ContainerLimitationDisk,
        "disk limit of 8.0 MiB",
    );

    // The executor, idle now, stops; its sandbox and its task's go after the delay.
    let executor_runs = || {
        std::fs::read_dir(work.join("frameworks"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|fw| {
                std::fs::read_dir(fw.path().join("executors/runner/runs"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .count()
    };
    assert_eq!(executor_runs(), 1, "the executor had a sandbox");
    wait_until(
        "the executor's and its task's sandboxes to be removed",
        || async { executor_runs() == 0 && runs_of(&work, "hog").is_empty() },
    )
    .await;
}

#[tokio::test]
async fn a_wasm_task_in_the_agents_process_is_held_to_its_disk_too() {
    let mut cluster = Cluster::start(&[]).await;
    let mut config = cluster.agent_config("cpus:2;mem:1024;disk:1024");
    config.wasm_executor = None;
    config.native.disk_watch_interval = Some(Duration::from_millis(100));
    cluster.add_agent_with(config).await;
    cluster.wait_for_agents(1).await;
    let work = work_dir(&cluster);
    let (s, mut events) = cluster.framework("wasm-disk").await;
    let spin = tid("spin");
    launch(
        &s,
        &mut events,
        wasm_task("spin", "spin", "cpus:0.5;mem:64;disk:8"),
    )
    .await;
    wait_state(&mut events, &spin, TaskState::Running).await;
    // What lands in the task's sandbox counts, whoever wrote it.
    let run = runs_of(&work, "spin").pop().unwrap();
    std::fs::write(run.join("fill"), vec![1u8; 20_000_000]).unwrap();
    let end = wait_terminal(&mut events, &spin).await;
    assert_ended(
        &end,
        TaskState::Failed,
        v1::Reason::ContainerLimitationDisk,
        "disk limit of 8.0 MiB",
    );
}
