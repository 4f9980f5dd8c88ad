//! The registry across master restarts, with the master a real process killed with SIGKILL:
//! reservations, quotas, weights and frameworks come back; a damaged store is refused.

use std::process::Command;

use agora_core::Resources;
use agora_proto::{resources_from_proto, resources_to_proto, v1};

use crate::ports::free_port;
use crate::*;

fn start_master(port: u16, work: &std::path::Path) -> Killed {
    Killed::master(&format!("127.0.0.1:{port}"), work, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_master_killed_and_restarted_keeps_its_registry() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("master");
    let port = free_port();
    let master = format!("http://127.0.0.1:{port}");
    let mut proc = start_master(port, &work);
    let op = leading_operator(&master).await;

    // An agent in this process, which keeps redialling the master.
    let cluster_dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(master.clone(), cluster_dir.path().join("agent"));
    config.resources = Some(res("cpus:2;mem:1024"));
    config.reconnect_min = Duration::from_millis(100);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut agent = Stoppable::spawn(move |stop| agora_agent::run(listener, config, stop));
    wait_until("the agent to register", || async {
        op.state()
            .await
            .is_ok_and(|s| s.agents.iter().any(|a| a.active))
    })
    .await;

    // A framework with a principal reserves; an operator sets a weight and a quota.
    let mut fc = SchedulerConfig::new(master.clone(), "keeper");
    fc.framework.roles = vec!["eng".into()];
    fc.framework.principal = "alice".into();
    fc.framework.failover_timeout = 3600.0;
    let (s, mut events) = subscribe(fc.clone()).await.unwrap();
    let Some(Event::Subscribed { framework_id, .. }) = events.next().await else {
        panic!("not subscribed");
    };
    let offers = next_offers(&mut events).await;
    let ids: Vec<v1::OfferId> = offers.iter().filter_map(|o| o.id.clone()).collect();
    s.accept_operations(
        &ids,
        vec![v1::Operation {
            operation: Some(v1::operation::Operation::Reserve(v1::operation::Reserve {
                resources: resources_to_proto(&res("cpus(eng,alice):1;mem(eng,alice):256")),
            })),
        }],
        Some(0.0),
    )
    .await
    .unwrap();
    op.set_weight("eng", 2.5).await.unwrap();
    op.set_quota("eng", &res("cpus:0.5"), None, false)
        .await
        .unwrap();
    let reserved = |st: &v1::GetStateResponse| {
        st.agents
            .first()
            .map(|a| resources_from_proto(&a.total).unwrap().reserved_for("eng"))
    };
    wait_until("the reservation in the operator state", || async {
        op.state()
            .await
            .is_ok_and(|s| reserved(&s) == Some(res("cpus(eng,alice):1;mem(eng,alice):256")))
    })
    .await;
    drop(s);
    drop(events);

    // SIGKILL: nothing is flushed on the way out.
    proc.kill();
    proc = start_master(port, &work);
    let op = leading_operator(&master).await;
    let roles = op.roles().await.unwrap();
    let eng = roles
        .iter()
        .find(|r| r.role == "eng")
        .expect("role eng kept");
    assert_eq!(eng.weight, 2.5);
    assert_eq!(
        resources_from_proto(&eng.guarantee).unwrap(),
        res("cpus:0.5")
    );
    let st = op.state().await.unwrap();
    let fw = st
        .frameworks
        .iter()
        .find(|f| {
            f.id.as_ref()
                .is_some_and(|i| i.value == framework_id.as_str())
        })
        .expect("the framework is known after the restart");
    assert!(!fw.active);
    assert_eq!(fw.info.as_ref().unwrap().principal, "alice");
    // The agent comes back by itself, with its reservation.
    wait_until("the agent to return with its reservation", || async {
        op.state().await.is_ok_and(|s| {
            s.agents.iter().any(|a| a.active)
                && reserved(&s) == Some(res("cpus(eng,alice):1;mem(eng,alice):256"))
        })
    })
    .await;
    // The framework fails over under its id; another principal may not take it.
    let mut thief = fc.clone();
    thief.framework.id = Some((&framework_id).into());
    thief.framework.principal = "mallory".into();
    assert!(
        subscribe(thief).await.is_err(),
        "a failover may not change the principal"
    );
    let mut again = fc.clone();
    again.framework.id = Some((&framework_id).into());
    let (_s, mut events) = subscribe(again).await.unwrap();
    let Some(Event::Subscribed {
        framework_id: got, ..
    }) = events.next().await
    else {
        panic!("not subscribed again");
    };
    assert_eq!(got, framework_id);
    let offers = next_offers(&mut events).await;
    let total = offers.iter().fold(Resources::new(), |acc, o| {
        acc + resources_from_proto(&o.resources).unwrap()
    });
    assert!(
        !total.reserved_for("eng").is_empty(),
        "its reservation is offered to it again: {total}"
    );
    // An agent that goes away is marked unreachable, `agora agents` says so, and so does
    // the registry after another restart.
    agent.stop().await.unwrap();
    let agents_table = || {
        let out = Command::new(env!("CARGO_BIN_EXE_agora"))
            .args(["agents", "--master", &master])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("agora agents to show the agent unreachable", || async {
        agents_table().contains("unreachable")
    })
    .await;
    proc.kill();
    proc = start_master(port, &work);
    leading_operator(&master).await;
    let table = agents_table();
    assert!(
        table.contains("unreachable") && !table.contains("recovering"),
        "an agent marked unreachable stays so across a restart:\n{table}"
    );
    drop(proc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_refuses_a_damaged_registry_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("master");
    let port = free_port();
    let master = format!("http://127.0.0.1:{port}");
    let mut proc = start_master(port, &work);
    let op = leading_operator(&master).await;
    op.set_weight("eng", 2.0).await.unwrap();
    proc.kill();
    let file = work.join("registry.redb");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args([
            "master",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--work-dir",
            work.to_str().unwrap(),
        ])
        .env("AGORA_LOG", "error")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a master started on a damaged registry"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registry.redb"), "{err}");
    drop(proc);
}
