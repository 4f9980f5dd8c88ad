//! Out-of-range values in every numeric field of every call, over the wire: each is refused
//! with an error naming the field, and afterwards the master and its agent still launch a
//! task and report themselves healthy.

use agora_core::TaskState;
use agora_proto::v1::{
    self, agent_link_client::AgentLinkClient, operator_client::OperatorClient,
    scheduler_client::SchedulerClient,
};
use tonic::Code;

use crate::*;

const ABSURD: [f64; 5] = [1e20, f64::INFINITY, f64::NAN, -1.0, f64::MAX];

fn refused_naming<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) {
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::InvalidArgument, "{field}: {s:?}");
            assert!(
                s.message().contains(field),
                "{field} not named in {:?}",
                s.message()
            );
        }
        Ok(v) => panic!("{field}: accepted ({v:?})"),
    }
}

fn scalar(name: &str, value: f64) -> v1::Resource {
    v1::Resource {
        name: name.into(),
        r#type: v1::ValueType::Scalar as i32,
        scalar: Some(v1::Scalar { value }),
        ..Default::default()
    }
}

fn command_task(id: &str) -> v1::TaskInfo {
    v1::TaskInfo {
        name: id.into(),
        task_id: Some(v1::TaskId { value: id.into() }),
        resources: vec![scalar("cpus", 0.1), scalar("mem", 32.0)],
        payload: Some(v1::task_info::Payload::Command(v1::CommandTask {
            value: "true".into(),
            shell: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn health(cluster: &Cluster) -> (bool, String) {
    let grpc = agora_sdk::Operator::connect(&cluster.master)
        .await
        .unwrap()
        .health()
        .await
        .unwrap()
        .healthy;
    let http = crate::cluster::http_get(cluster.master_addr, "/health").await;
    (grpc, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_numbers_in_every_call_are_refused_and_the_cluster_goes_on() {
    let cluster = Cluster::start(&["cpus:2;mem:1024"]).await;
    let mut sched = SchedulerClient::connect(cluster.master.clone())
        .await
        .unwrap();
    let info = |failover: f64| v1::FrameworkInfo {
        name: "hostile".into(),
        failover_timeout: failover,
        ..Default::default()
    };

    // SUBSCRIBE.
    for bad in ABSURD {
        refused_naming(
            sched
                .subscribe(v1::SubscribeRequest {
                    framework_info: Some(info(bad)),
                    ..Default::default()
                })
                .await,
            "framework_info.failover_timeout",
        );
    }
    let mut roles = info(1.0);
    roles.roles = vec!["a/".repeat(50) + "a"];
    refused_naming(
        sched
            .subscribe(v1::SubscribeRequest {
                framework_info: Some(roles),
                ..Default::default()
            })
            .await,
        "framework_info.roles[0]",
    );

    // A real subscription, to make calls on.
    let mut stream = sched
        .subscribe(v1::SubscribeRequest {
            framework_info: Some(info(5.0)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (framework_id, stream_id) = match stream.message().await.unwrap().unwrap().event {
        Some(v1::event::Event::Subscribed(s)) => (s.framework_id, s.stream_id),
        other => panic!("expected SUBSCRIBED, got {other:?}"),
    };
    assert!(
        stream_id.len() > 30,
        "stream ids are unguessable: {stream_id}"
    );
    let offer = loop {
        if let Some(v1::event::Event::Offers(o)) = stream.message().await.unwrap().unwrap().event {
            break o.offers[0].clone();
        }
    };
    let header = || {
        Some(v1::CallHeader {
            framework_id: framework_id.clone(),
            stream_id: stream_id.clone(),
        })
    };
    let accept = |task: v1::TaskInfo, refuse: Option<f64>| v1::AcceptRequest {
        header: header(),
        offer_ids: vec![offer.id.clone().unwrap()],
        operations: vec![v1::Operation {
            operation: Some(v1::operation::Operation::Launch(v1::operation::Launch {
                tasks: vec![task],
            })),
        }],
        filters: Some(v1::Filters {
            refuse_seconds: refuse,
        }),
    };

    // ACCEPT: every number of a task, and the filter.
    for bad in ABSURD {
        let mut t = command_task("t");
        t.max_duration = bad;
        refused_naming(
            sched.accept(accept(t, None)).await,
            "operations[0].launch.tasks[0].max_duration",
        );
        let mut t = command_task("t");
        t.kill_policy = Some(v1::KillPolicy {
            grace_period_seconds: bad,
        });
        refused_naming(
            sched.accept(accept(t, None)).await,
            "operations[0].launch.tasks[0].kill_policy.grace_period_seconds",
        );
        refused_naming(
            sched.accept(accept(command_task("t"), Some(bad))).await,
            "filters.refuse_seconds",
        );
        refused_naming(
            sched
                .decline(v1::DeclineRequest {
                    header: header(),
                    offer_ids: vec![offer.id.clone().unwrap()],
                    filters: Some(v1::Filters {
                        refuse_seconds: Some(bad),
                    }),
                })
                .await,
            "filters.refuse_seconds",
        );
    }
    for pids in [0, u64::MAX] {
        let mut t = command_task("t");
        if let Some(v1::task_info::Payload::Command(c)) = &mut t.payload {
            c.pids_max = Some(pids);
        }
        refused_naming(
            sched.accept(accept(t, None)).await,
            "operations[0].launch.tasks[0].command.pids_max",
        );
    }
    let mut huge = command_task("t");
    huge.resources = (0..20_000).map(|_| scalar("cpus", 0.001)).collect();
    refused_naming(
        sched.accept(accept(huge, None)).await,
        "operations[0].launch.tasks[0].resources",
    );
    // ACKNOWLEDGE, RECONCILE, REVIVE, SUPPRESS.
    refused_naming(
        sched
            .acknowledge(v1::AcknowledgeRequest {
                header: header(),
                task_id: Some(v1::TaskId { value: "t".into() }),
                uuid: vec![7; 4096],
                ..Default::default()
            })
            .await,
        "uuid",
    );
    refused_naming(
        sched
            .reconcile(v1::ReconcileRequest {
                header: header(),
                tasks: (0..100_001)
                    .map(|i| v1::reconcile_request::ReconcileTask {
                        task_id: Some(v1::TaskId {
                            value: format!("t{i}"),
                        }),
                        agent_id: None,
                    })
                    .collect(),
            })
            .await,
        "tasks",
    );
    refused_naming(
        sched
            .revive(v1::ReviveRequest {
                header: header(),
                roles: vec!["r".repeat(300)],
            })
            .await,
        "roles[0]",
    );
    refused_naming(
        sched
            .suppress(v1::SuppressRequest {
                header: header(),
                roles: (0..2000).map(|i| format!("r{i}")).collect(),
            })
            .await,
        "roles",
    );

    // The operator: weights and quotas.
    let mut op = OperatorClient::connect(cluster.master.clone())
        .await
        .unwrap();
    for bad in ABSURD {
        let r = op
            .update_weight(v1::UpdateWeightRequest {
                role: "batch".into(),
                weight: bad,
            })
            .await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "weight {bad}");
        let r = op
            .update_quota(v1::UpdateQuotaRequest {
                role: "batch".into(),
                guarantee: vec![scalar("cpus", bad)],
                ..Default::default()
            })
            .await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "quota {bad}: {e:?}");
        assert!(e.message().contains("cpus"), "{e:?}");
    }

    // An agent registering with absurd numbers.
    let mut link = AgentLinkClient::connect(cluster.master.clone())
        .await
        .unwrap();
    for bad in ABSURD {
        let register = v1::AgentMessage {
            message: Some(v1::agent_message::Message::Register(
                v1::agent_message::Register {
                    info: Some(v1::AgentInfo {
                        hostname: "rogue".into(),
                        resources: vec![scalar("cpus", bad), scalar("mem", 64.0)],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
        };
        let r = link.session(tokio_stream::iter(vec![register])).await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "agent cpus {bad}: {e:?}");
    }

    // Nothing was launched, the master and the agent are alive, healthy, and run a task.
    let (healthy, http) = health(&cluster).await;
    assert!(healthy);
    assert!(
        http.starts_with("HTTP/1.1 200") && http.contains("\"healthy\":true"),
        "{http}"
    );
    assert!(cluster.state().await.tasks.is_empty());
    drop(stream);
    let (s, mut events) = cluster.framework("after").await;
    let task = tid("after-1");
    launch(
        &s,
        &mut events,
        wasm_task("after-1", "hello", "cpus:0.5;mem:64").max_duration(
            // The largest allowed is accepted.
            agora_core::limits::MAX_TASK_DURATION_SECS,
        ),
    )
    .await;
    let end = wait_terminal(&mut events, &task).await;
    assert_eq!(state_of(&end), TaskState::Finished, "{}", end.message);

    // The agent's Sandbox API, on a real task's stdout: offsets and lengths that would
    // overflow are answered, not panicked on.
    let mut sandbox =
        v1::sandbox_client::SandboxClient::connect(cluster.agents[0].endpoint.clone())
            .await
            .unwrap();
    let fw: v1::FrameworkId = (&s.framework_id().unwrap()).into();
    for (offset, length) in [(u64::MAX, u64::MAX), (3, u64::MAX), (u64::MAX - 1, 2)] {
        let r = sandbox
            .read_file(v1::ReadFileRequest {
                framework_id: Some(fw.clone()),
                task_id: Some(v1::TaskId {
                    value: "after-1".into(),
                }),
                path: "stdout".into(),
                offset,
                length,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.eof && r.size > 0, "{offset} {length}: {r:?}");
        if offset == 3 {
            assert_eq!(r.data.len() as u64, r.size - 3);
        } else {
            assert!(r.data.is_empty());
        }
    }
    assert!(health(&cluster).await.0);
}
