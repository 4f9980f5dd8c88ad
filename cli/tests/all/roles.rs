//! Roles over gRPC: reservations (static and dynamic), quotas and weights through the
//! operator API.

use agora_core::{Resources, TaskState};
use agora_proto::{resources_from_proto, resources_to_proto, v1};
use agora_sdk::{Error, Operator};

use crate::*;

fn offered(offers: &[v1::Offer]) -> Resources {
    offers.iter().fold(Resources::new(), |acc, o| {
        acc + resources_from_proto(&o.resources).unwrap()
    })
}

async fn framework_in(
    cluster: &Cluster,
    name: &str,
    roles: &[&str],
    principal: &str,
) -> (Scheduler, Events) {
    let mut config = SchedulerConfig::new(cluster.master.clone(), name);
    config.framework.roles = roles.iter().map(|r| (*r).to_owned()).collect();
    config.framework.principal = principal.to_owned();
    cluster.framework_with(config).await
}

fn op(kind: v1::operation::Operation) -> v1::Operation {
    v1::Operation {
        operation: Some(kind),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_never_sees_another_roles_reservations() {
    let cluster = Cluster::start(&["cpus(b):1;mem(b):256;cpus:1;mem:256"]).await;
    let (_a, mut a_events) = framework_in(&cluster, "in-a", &["a"], "").await;
    let offers = next_offers(&mut a_events).await;
    assert_eq!(offers[0].allocation_role, "a");
    let got = offered(&offers);
    assert!(
        got.reserved_roles().is_empty(),
        "a sees only unreserved resources: {got}"
    );
    assert_eq!((got.cpus(), got.mem()), (1.0, 256.0));

    let (_b, mut b_events) = framework_in(&cluster, "in-b", &["b/batch"], "").await;
    let offers = next_offers(&mut b_events).await;
    assert_eq!(offers[0].allocation_role, "b/batch");
    assert_eq!(
        offered(&offers).reserved_for("b"),
        res("cpus(b):1;mem(b):256"),
        "b's sub-role gets b's reservation"
    );

    let op = Operator::connect(&cluster.master).await.unwrap();
    wait_until("b's reservation and offer in the roles view", || async {
        op.roles().await.unwrap().iter().any(|b| {
            b.role == "b"
                && resources_from_proto(&b.reserved).unwrap() == res("cpus:1;mem:256")
                && resources_from_proto(&b.offered).unwrap().reserved_for("b")
                    == res("cpus(b):1;mem(b):256")
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_reservations_round_trip() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let (s, mut events) = framework_in(&cluster, "reserver", &["eng"], "alice").await;
    let offers = next_offers(&mut events).await;
    let ids: Vec<v1::OfferId> = offers.iter().filter_map(|o| o.id.clone()).collect();

    // Not in the framework's own principal: refused, and the offer is still good.
    let forged = op(v1::operation::Operation::Reserve(v1::operation::Reserve {
        resources: resources_to_proto(&res("cpus(eng,mallory):1")),
    }));
    let err = s
        .accept_operations(&ids, vec![forged], Some(0.0))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );
    let too_much = op(v1::operation::Operation::Reserve(v1::operation::Reserve {
        resources: resources_to_proto(&res("cpus(eng,alice):5")),
    }));
    let err = s
        .accept_operations(&ids, vec![too_much], Some(0.0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot reserve"), "{err}");

    // Reserve one CPU and 256 MiB, and launch on them in the same call.
    let reserved = res("cpus(eng,alice):1;mem(eng,alice):256");
    let task = wasm_task("on-reserved", "spin", "cpus(eng,alice):1;mem(eng,alice):64")
        .build_for(&offers[0]);
    s.accept_operations(
        &ids,
        vec![
            op(v1::operation::Operation::Reserve(v1::operation::Reserve {
                resources: resources_to_proto(&reserved),
            })),
            op(v1::operation::Operation::Launch(v1::operation::Launch {
                tasks: vec![task],
            })),
        ],
        Some(0.0),
    )
    .await
    .unwrap();
    wait_state(&mut events, &tid("on-reserved"), TaskState::Running).await;
    wait_until("the reservation in the operator state", || async {
        let st = cluster.state().await;
        resources_from_proto(&st.agents[0].total)
            .unwrap()
            .reserved_for("eng")
            == res("cpus(eng,alice):1;mem(eng,alice):256")
    })
    .await;
    let roles = Operator::connect(&cluster.master)
        .await
        .unwrap()
        .roles()
        .await
        .unwrap();
    let eng = roles.iter().find(|r| r.role == "eng").unwrap();
    assert_eq!(
        resources_from_proto(&eng.reserved).unwrap(),
        res("cpus:1;mem:256")
    );

    // The task ends; the reserved remainder comes back in an offer and is unreserved.
    s.kill(&tid("on-reserved"), None).await.unwrap();
    wait_state(&mut events, &tid("on-reserved"), TaskState::Killed).await;
    // An offer made while the task ran holds the rest of the reservation: suppressing
    // rescinds it, reviving brings everything back, in one offer per agent.
    s.suppress().await.unwrap();
    s.revive().await.unwrap();
    let offers = loop {
        let offers = next_offers(&mut events).await;
        if offered(&offers).contains(&reserved) {
            break offers;
        }
        let ids: Vec<v1::OfferId> = offers.iter().filter_map(|o| o.id.clone()).collect();
        // It may have been rescinded already.
        let _ = s.decline(&ids, Some(0.0)).await;
    };
    let ids: Vec<v1::OfferId> = offers.iter().filter_map(|o| o.id.clone()).collect();
    s.accept_operations(
        &ids,
        vec![op(v1::operation::Operation::Unreserve(
            v1::operation::Unreserve {
                resources: resources_to_proto(&reserved),
            },
        ))],
        Some(0.0),
    )
    .await
    .unwrap();
    wait_until("the reservation to be gone", || async {
        let st = cluster.state().await;
        resources_from_proto(&st.agents[0].total)
            .unwrap()
            .reserved_roles()
            .is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_guarantee_holds_while_another_framework_is_greedy() {
    let cluster = Cluster::start(&["cpus:2;mem:1024", "cpus:2;mem:1024"]).await;
    let op = Operator::connect(&cluster.master).await.unwrap();
    // Bad quotas are refused with the reason.
    let err = op
        .set_quota("prod", &res("cpus:9"), None, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exceed the cluster"), "{err}");
    let err = op
        .set_quota("prod", &res("ports:[1-2]"), None, false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ports"), "{err}");
    op.set_quota("prod", &res("cpus:2;mem:512"), None, false)
        .await
        .unwrap();

    // A greedy framework takes everything it is offered, with long-running tasks.
    let (greedy, mut g_events) = framework_in(&cluster, "greedy", &["batch"], "").await;
    let mut taken = Resources::new();
    for i in 0..2 {
        let offers = next_offers(&mut g_events).await;
        for o in &offers {
            let r = resources_from_proto(&o.resources).unwrap();
            if r.cpus() == 0.0 {
                // Memory alone is no use to it; it keeps the offer.
                continue;
            }
            let task = wasm_task(
                &format!("hog-{i}-{}", o.id.as_ref().unwrap().value),
                "spin",
                &format!("cpus:{};mem:64", r.cpus()),
            )
            .build_for(o);
            greedy
                .accept(&[o.id.clone().unwrap()], vec![task], Some(0.0))
                .await
                .unwrap();
            taken += &res(&format!("cpus:{}", r.cpus()));
        }
        if taken.cpus() >= 2.0 {
            break;
        }
    }
    assert_eq!(taken.cpus(), 2.0, "greedy got all but the guarantee");

    // The guaranteed role gets its CPUs.
    let (_prod, mut p_events) = framework_in(&cluster, "service", &["prod"], "").await;
    let offers = next_offers(&mut p_events).await;
    assert!(offered(&offers).cpus() >= 2.0, "{}", offered(&offers));
    wait_until("prod's quota in the roles view", || async {
        op.roles().await.unwrap().iter().any(|r| {
            r.role == "prod"
                && resources_from_proto(&r.guarantee).unwrap() == res("cpus:2;mem:512")
                && resources_from_proto(&r.allocated).unwrap().cpus() >= 2.0
        })
    })
    .await;

    // Weights are validated and shown.
    assert!(op.set_weight("batch", -1.0).await.is_err());
    op.set_weight("batch", 3.0).await.unwrap();
    wait_until("the weight in the roles view", || async {
        op.roles()
            .await
            .unwrap()
            .iter()
            .any(|r| r.role == "batch" && r.weight == 3.0)
    })
    .await;
    greedy.teardown().await.unwrap();
}
