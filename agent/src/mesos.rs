//! The Mesos v1 Executor API on the agent: `POST /api/v1/executor`, so that a Mesos
//! executor runs unmodified on Agora.
//!
//! Each call is read (JSON or protobuf, by `Content-Type`) and served by the same
//! [`ExecutorService`] as Agora's gRPC Executor API: one set of executors, tasks and
//! status updates. SUBSCRIBE answers `200` with the executor's events as a RecordIO stream
//! (in the encoding `Accept` asks for); UPDATE, MESSAGE and HEARTBEAT answer `202`. An
//! executor proves who it is with the token the agent gave it
//! (`MESOS_EXECUTOR_AUTHENTICATION_TOKEN`) as `Authorization: Bearer <token>`, as Mesos
//! executors do when the agent authenticates them: 401 without it, 403 with a wrong one.

use std::sync::Arc;
use std::time::Duration;

use agora_mesos::codec::{self, Format};
use agora_mesos::convert;
use agora_mesos::http::{self, answer, header_of};
use agora_mesos::v1 as mesos;
use agora_mesos::v1::executor::{self as mx, call::Type};
use agora_proto::v1;
use agora_proto::v1::executor_event::Event as A;
use agora_proto::v1::executor_server::Executor as _;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_stream::StreamExt as _;

use crate::executor::ExecutorService;

/// How often a subscribed executor is sent HEARTBEAT, as Mesos's agent does.
pub const HEARTBEAT: Duration = Duration::from_secs(30 * 60);

/// At most this many unacknowledged tasks and updates in a SUBSCRIBE.
const MAX_UNACKNOWLEDGED: usize = 100_000;

/// What the endpoint needs: the executors it serves and the agent's own description.
pub struct Front {
    pub service: ExecutorService,
    /// This agent's host name and port, for SUBSCRIBED's `agent_info`.
    pub hostname: String,
    pub port: u16,
}

/// The route, for the agent's router.
pub fn router(front: Arc<Front>) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/executor", axum::routing::post(executor))
        .layer(axum::extract::DefaultBodyLimit::max(http::MAX_CALL_BYTES))
        .with_state(front)
}

/// The HTTP answer to a refused Executor API call.
fn from_status(s: &tonic::Status) -> Response {
    use tonic::Code;
    let code = match s.code() {
        Code::Unauthenticated => {
            let mut r = answer(StatusCode::UNAUTHORIZED, s.message());
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"agora-executor\""),
            );
            return r;
        }
        Code::PermissionDenied | Code::FailedPrecondition => StatusCode::FORBIDDEN,
        Code::InvalidArgument | Code::OutOfRange | Code::NotFound | Code::AlreadyExists => {
            StatusCode::BAD_REQUEST
        }
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    answer(code, s.message())
}

fn bad(message: impl Into<String>) -> Response {
    answer(StatusCode::BAD_REQUEST, message)
}

async fn executor(
    axum::extract::State(front): axum::extract::State<Arc<Front>>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let (input, output) = match http::formats(&parts.headers) {
        Ok(f) => f,
        Err(r) => return *r,
    };
    // Nothing of the body is read for a caller without a token.
    let Some(token) = header_of(&parts.headers, header::AUTHORIZATION)
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return from_status(&tonic::Status::unauthenticated(
            "an executor call needs 'Authorization: Bearer <token>', the token being the agent's MESOS_EXECUTOR_AUTHENTICATION_TOKEN",
        ));
    };
    let token = token.to_owned();
    let call: mx::Call = match http::call(input, body).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    // A type this agent does not know is no type, as Mesos reads it.
    let Some(kind) = call.r#type.and_then(|t| Type::try_from(t).ok()) else {
        return bad("Expecting 'type' to be present");
    };
    let header = Some(v1::ExecutorHeader {
        framework_id: Some((&call.framework_id).into()),
        executor_id: Some((&call.executor_id).into()),
        token,
    });
    let served = match kind {
        Type::Unknown => return answer(StatusCode::NOT_IMPLEMENTED, "Received an UNKNOWN call"),
        Type::Subscribe => return subscribe(&front, header, call, output).await,
        Type::Update => update(&front, header, call.update).await,
        Type::Message => {
            let Some(m) = call.message else {
                return bad("Expecting 'message' to be present");
            };
            front
                .service
                .message(tonic::Request::new(v1::ExecutorMessageRequest {
                    header,
                    task_id: None,
                    data: m.data,
                }))
                .await
                .map(drop)
        }
        Type::Heartbeat => front.service.check(header),
    };
    match served {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(s) => from_status(&s),
    }
}

async fn update(
    front: &Front,
    header: Option<v1::ExecutorHeader>,
    update: Option<mx::call::Update>,
) -> Result<(), tonic::Status> {
    let update = update
        .ok_or_else(|| tonic::Status::invalid_argument("Expecting 'update' to be present"))?;
    let status = &update.status;
    let state = mesos::TaskState::try_from(status.state).map_err(|_| {
        tonic::Status::invalid_argument(format!("{} is not a task state", status.state))
    })?;
    if state == mesos::TaskState::TaskStaging {
        return Err(tonic::Status::invalid_argument(
            "'TASK_STAGING' is not a valid status update",
        ));
    }
    if status.uuid.as_ref().is_none_or(Vec::is_empty) {
        return Err(tonic::Status::invalid_argument(
            "Expecting 'uuid' to be present",
        ));
    }
    front
        .service
        .update(tonic::Request::new(v1::ExecutorUpdateRequest {
            header,
            status: Some(convert::status_in(status)),
        }))
        .await
        .map(drop)
}

async fn subscribe(
    front: &Front,
    header: Option<v1::ExecutorHeader>,
    call: mx::Call,
    output: Format,
) -> Response {
    let sub = call.subscribe.unwrap_or_default();
    if sub.unacknowledged_tasks.len() + sub.unacknowledged_updates.len() > MAX_UNACKNOWLEDGED {
        return bad(format!(
            "a SUBSCRIBE lists at most {MAX_UNACKNOWLEDGED} unacknowledged tasks and updates"
        ));
    }
    // The tasks it has are those it runs and those with updates the agent has not
    // acknowledged.
    let mut tasks: Vec<v1::TaskId> = sub
        .unacknowledged_tasks
        .iter()
        .map(|t| (&t.task_id).into())
        .collect();
    tasks.extend(
        sub.unacknowledged_updates
            .iter()
            .map(|u| (&u.status.task_id).into()),
    );
    tasks.sort_by(|a, b| a.value.cmp(&b.value));
    tasks.dedup();
    let events = match front
        .service
        .subscribe(tonic::Request::new(v1::ExecutorSubscribeRequest {
            header: header.clone(),
            tasks,
        }))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return from_status(&s),
    };
    // The updates it still holds go again, as an Agora executor sends them after
    // subscribing; each is acknowledged on the new stream once the agent has it.
    for u in sub.unacknowledged_updates {
        if let Err(s) = update(front, header.clone(), Some(u)).await {
            tracing::info!(executor_id = %call.executor_id.value, error = %s.message(), "an unacknowledged update given on SUBSCRIBE was refused");
        }
    }
    let agent = AgentDescription {
        hostname: front.hostname.clone(),
        port: front.port,
        framework: (&call.framework_id).into(),
    };
    let beats = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + front.service.heartbeat(),
        front.service.heartbeat(),
    ))
    .map(|_| Item::Heartbeat);
    let records = events
        .map(Item::Event)
        .chain(tokio_stream::once(Item::End))
        .merge(beats)
        .take_while(|i| !matches!(i, Item::End))
        .filter_map(move |i| {
            let event = match i {
                Item::Event(Ok(e)) => event_out(e, &agent)?,
                // The agent ended the subscription: say why, then end the stream.
                Item::Event(Err(s)) => error(s.message()),
                Item::Heartbeat => mx::Event {
                    r#type: Some(mx::event::Type::Heartbeat as i32),
                    ..Default::default()
                },
                Item::End => return None,
            };
            Some(agora_mesos::recordio::frame(&codec::encode(output, &event)))
        });
    http::event_stream(output, records)
}

/// What a subscription's stream is made of: events, heartbeats, and the end of the agent's.
#[allow(clippy::large_enum_variant)]
enum Item {
    Event(Result<v1::ExecutorEvent, tonic::Status>),
    Heartbeat,
    End,
}

/// What SUBSCRIBED says of the agent and the framework, besides what the agent's event has.
struct AgentDescription {
    hostname: String,
    port: u16,
    framework: v1::FrameworkId,
}

fn error(message: &str) -> mx::Event {
    mx::Event {
        r#type: Some(mx::event::Type::Error as i32),
        error: Some(mx::event::Error {
            message: message.to_owned(),
        }),
        ..Default::default()
    }
}

/// An Agora executor event as Mesos's.
fn event_out(e: v1::ExecutorEvent, agent: &AgentDescription) -> Option<mx::Event> {
    use mx::event::Type as T;
    let mut out = mx::Event::default();
    match e.event? {
        A::Subscribed(s) => {
            out.r#type = Some(T::Subscribed as i32);
            let mut framework = s.framework_info.unwrap_or_default();
            framework.id.get_or_insert_with(|| agent.framework.clone());
            out.subscribed = Some(mx::event::Subscribed {
                executor_info: convert::executor_info_out(
                    &s.executor_info.unwrap_or_default(),
                    Some(&agent.framework),
                ),
                framework_info: convert::framework_info_out(&framework),
                agent_info: mesos::AgentInfo {
                    hostname: agent.hostname.clone(),
                    port: Some(i32::from(agent.port)),
                    id: s.agent_id.as_ref().map(Into::into),
                    ..Default::default()
                },
                container_id: None,
            });
        }
        A::Launch(l) => {
            out.r#type = Some(T::Launch as i32);
            out.launch = Some(mx::event::Launch {
                task: convert::task_info_out(&l.task.unwrap_or_default()),
            });
        }
        A::Kill(k) => {
            out.r#type = Some(T::Kill as i32);
            out.kill = Some(mx::event::Kill {
                task_id: k.task_id.as_ref().map(Into::into).unwrap_or_default(),
                kill_policy: k.kill_policy.map(|p| mesos::KillPolicy {
                    grace_period: (p.grace_period_seconds > 0.0)
                        .then(|| convert::duration_out(p.grace_period_seconds)),
                }),
            });
        }
        A::Acknowledged(a) => {
            out.r#type = Some(T::Acknowledged as i32);
            out.acknowledged = Some(mx::event::Acknowledged {
                task_id: a.task_id.as_ref().map(Into::into).unwrap_or_default(),
                uuid: a.uuid,
            });
        }
        A::Shutdown(_) => out.r#type = Some(T::Shutdown as i32),
        A::Error(e) => return Some(error(&e.message)),
    }
    Some(out)
}
