//! The master's network edge: the Scheduler, AgentLink and Operator gRPC services, and the
//! HTTP `/health` endpoint.
//!
//! Handlers validate wire data into core types, hand a [`Command`] to the owner task and wait
//! for its answer; reads come from the published [`Snapshot`]. On a master that does not lead
//! there is no owner task: the [`Gate`] answers every call with the leader's address (see
//! [`agora_proto::leader`]).

use std::sync::Arc;
use std::time::Duration;

use agora_core::{FrameworkId, OfferId, TaskId};
use agora_proto::v1::{
    self, agent_link_server::AgentLink, operator_server::Operator, scheduler_server::Scheduler,
};
use agora_proto::{ProtoError, required};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::allocator::Quota;
use crate::registry::Leadership;
use crate::runtime::{CallKind, Command, EventStream, Snapshot};
use crate::validate;

/// A call refused at the edge for its shape.
fn bad(e: agora_core::LimitError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Longest a call waits at a master that knows no leader yet ([`Gate::serving`]): more than
/// an election takes, less than a client waits for one master's answer.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// Where calls go: the owner task while this master leads, else nowhere but a redirect.
#[derive(Clone)]
pub struct Gate {
    /// The owner task's commands, while this master leads and has recovered.
    pub owner: watch::Receiver<Option<mpsc::Sender<Command>>>,
    pub leadership: watch::Receiver<Leadership>,
    /// How long a follower may go without hearing from a live leader (see
    /// [`crate::registry::Registrar::silence`]).
    pub silence: Duration,
    /// When a leader was last heard from; fresher than `leadership`.
    pub heard: Arc<crate::registry::network::Heard>,
}

impl Gate {
    /// The owner task's commands, or the status that names the leader.
    ///
    /// # Errors
    /// When this master does not lead (or is still taking over).
    pub fn commands(&self) -> Result<mpsc::Sender<Command>, Status> {
        if let Some(tx) = self.owner.borrow().clone() {
            return Ok(tx);
        }
        Err(self.elsewhere())
    }

    /// The owner task's commands once this master serves, waiting up to `hold` while no
    /// leader is known (an election, or a new leader recovering): the caller then goes
    /// straight to the outcome — this master serving, or the leader's address — instead of
    /// asking the masters round and round until one leads, which with thousands of agents
    /// looking at once costs the masters the CPU the election needs.
    ///
    /// `lost` is the master the caller just lost. While this master still names it as the
    /// leader, it waits up to [`Gate::silence`] for that leader to be heard from (it is
    /// alive after all: the caller is sent back to it) or to be given up for silent (the
    /// caller waits for the election).
    ///
    /// # Errors
    /// As [`Gate::commands`], once another master is known to lead or `hold` has passed.
    pub async fn serving(
        &self,
        hold: Duration,
        lost: Option<&str>,
    ) -> Result<mpsc::Sender<Command>, Status> {
        let (mut owner, mut leadership) = (self.owner.clone(), self.leadership.clone());
        let start = tokio::time::Instant::now();
        let deadline = start + hold;
        let doubt = (start + self.silence).min(deadline);
        let lost = lost.map(agora_proto::leader::host_port);
        loop {
            if let Some(tx) = owner.borrow_and_update().clone() {
                return Ok(tx);
            }
            // The answer is made from the value already read: a second read of the same
            // channel, taken while the registry waits to write, would never be granted, and
            // the master would hang with every worker blocked.
            let wake = match &*leadership.borrow_and_update() {
                Leadership::Follower { leader: Some(l) }
                    if lost.is_some_and(|x| x == agora_proto::leader::host_port(l)) =>
                {
                    if tokio::time::Instant::now() < doubt {
                        doubt
                    } else if self.heard.since().is_some_and(|t| t < start.elapsed()) {
                        // Heard since the call came: alive after all. (The watch looks only
                        // every 50 ms, so it may still name a leader that fell silent.)
                        return Err(agora_proto::leader::not_leader(Some(l)));
                    } else {
                        deadline
                    }
                }
                l @ (Leadership::Follower { leader: Some(_) } | Leadership::Stopped(_)) => {
                    return Err(answer(l));
                }
                _ => deadline,
            };
            tokio::select! {
                r = owner.changed() => if r.is_err() { return Err(self.elsewhere()) },
                r = leadership.changed() => if r.is_err() { return Err(self.elsewhere()) },
                () = tokio::time::sleep_until(wake) => if wake == deadline {
                    return Err(self.elsewhere());
                },
            }
        }
    }

    /// The answer of a master that cannot serve: who leads, if anyone is known to.
    pub fn elsewhere(&self) -> Status {
        answer(&self.leadership.borrow())
    }

    /// The leader's address when another master is known to lead.
    pub fn leader(&self) -> Option<String> {
        match &*self.leadership.borrow() {
            Leadership::Follower { leader } => leader.clone(),
            _ => None,
        }
    }
}

/// What a master that cannot serve answers, leadership being `l`.
fn answer(l: &Leadership) -> Status {
    match l {
        Leadership::Follower { leader } => agora_proto::leader::not_leader(leader.as_deref()),
        // Elected, and recovering the registry: nobody else leads either.
        Leadership::Leader => agora_proto::leader::not_leader(None),
        Leadership::Stopped(why) => Status::unavailable(format!("the master is stopping: {why}")),
    }
}

async fn ask<T>(
    gate: &Gate,
    make: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> Command,
) -> Result<T, Status> {
    ask_after(gate, None, make).await
}

/// [`ask`] from a caller that just lost the master `lost` ([`Gate::serving`]).
async fn ask_after<T>(
    gate: &Gate,
    lost: Option<&str>,
    make: impl FnOnce(oneshot::Sender<Result<T, Status>>) -> Command,
) -> Result<T, Status> {
    let tx = gate.serving(LEADER_WAIT, lost).await?;
    let (reply, rx) = oneshot::channel();
    // The owner gone mid-call means this master stopped leading (or is stopping).
    tx.send(make(reply)).await.map_err(|_| gate.elsewhere())?;
    rx.await.map_err(|_| gate.elsewhere())?
}

#[derive(Clone)]
pub struct SchedulerService {
    pub gate: Gate,
    /// Subscriptions held per caller ([`crate::limits`]).
    pub guard: Arc<crate::limits::Guard>,
}

fn header(h: Option<v1::CallHeader>) -> Result<(FrameworkId, String), Status> {
    let h = required(h, "header")?;
    let fw = FrameworkId::try_from(required(h.framework_id, "header.framework_id")?)?;
    if h.stream_id.is_empty() {
        return Err(ProtoError::Missing("header.stream_id").into());
    }
    Ok((fw, h.stream_id))
}

fn offer_ids(ids: Vec<v1::OfferId>) -> Result<Vec<OfferId>, Status> {
    ids.into_iter()
        .map(|o| OfferId::try_from(o).map_err(Status::from))
        .collect()
}

impl SchedulerService {
    async fn call(
        &self,
        h: Option<v1::CallHeader>,
        kind: impl FnOnce() -> Result<CallKind, Status>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let (framework, stream) = header(h)?;
        let kind = kind()?;
        ask(&self.gate, |reply| Command::Call {
            framework,
            stream,
            kind,
            reply,
        })
        .await?;
        Ok(Response::new(v1::CallResponse {}))
    }
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let lost = agora_proto::leader::lost(request.metadata());
        let slot = self.guard.subscribe(&crate::limits::caller_of(&request))?;
        let caller = request.extensions().get::<crate::auth::Caller>().cloned();
        let r = request.into_inner();
        let mut info = required(r.framework_info, "framework_info")?;
        validate::framework_info(&info).map_err(bad)?;
        // An authenticated framework's principal is the one it proved, never one it names.
        if let Some(crate::auth::Caller(principal)) = caller {
            if info.principal.is_empty() {
                info.principal = principal;
            } else if info.principal != principal {
                return Err(Status::permission_denied(format!(
                    "the framework names principal {:?} but authenticated as {principal:?}",
                    info.principal
                )));
            }
        }
        agora_core::limits::text("stream_id", &r.stream_id, agora_core::limits::MAX_TEXT)
            .map_err(bad)?;
        let replaces = (!r.stream_id.is_empty()).then_some(r.stream_id);
        let stream = ask_after(&self.gate, lost.as_deref(), |reply| Command::Subscribe {
            info,
            replaces,
            reply,
        })
        .await?;
        Ok(Response::new(stream.holding(slot)))
    }

    async fn accept(
        &self,
        request: Request<v1::AcceptRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        self.call(r.header, || {
            validate::offer_ids(&r.offer_ids).map_err(bad)?;
            validate::operations(&r.operations).map_err(bad)?;
            validate::filters("filters", r.filters.as_ref()).map_err(bad)?;
            Ok(CallKind::Accept {
                offers: offer_ids(r.offer_ids)?,
                operations: r.operations,
                filters: r.filters,
            })
        })
        .await
    }

    async fn decline(
        &self,
        request: Request<v1::DeclineRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        self.call(r.header, || {
            validate::offer_ids(&r.offer_ids).map_err(bad)?;
            validate::filters("filters", r.filters.as_ref()).map_err(bad)?;
            Ok(CallKind::Decline {
                offers: offer_ids(r.offer_ids)?,
                filters: r.filters,
            })
        })
        .await
    }

    async fn revive(
        &self,
        request: Request<v1::ReviveRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let req = request.into_inner();
        self.call(req.header, || {
            validate::roles("roles", &req.roles).map_err(bad)?;
            Ok(CallKind::Revive { roles: req.roles })
        })
        .await
    }

    async fn suppress(
        &self,
        request: Request<v1::SuppressRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let req = request.into_inner();
        self.call(req.header, || {
            validate::roles("roles", &req.roles).map_err(bad)?;
            Ok(CallKind::Suppress { roles: req.roles })
        })
        .await
    }

    async fn kill(
        &self,
        request: Request<v1::KillRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        self.call(r.header, || {
            Ok(CallKind::Kill {
                task: TaskId::try_from(required(r.task_id, "task_id")?)?,
            })
        })
        .await
    }

    async fn acknowledge(
        &self,
        request: Request<v1::AcknowledgeRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        self.call(r.header, || {
            validate::uuid(&r.uuid).map_err(bad)?;
            Ok(CallKind::Acknowledge {
                task: TaskId::try_from(required(r.task_id, "task_id")?)?,
                uuid: r.uuid,
            })
        })
        .await
    }

    async fn reconcile(
        &self,
        request: Request<v1::ReconcileRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        let r = request.into_inner();
        self.call(r.header, || {
            agora_core::limits::count("tasks", r.tasks.len(), validate::MAX_RECONCILE)
                .map_err(bad)?;
            let tasks = r
                .tasks
                .into_iter()
                .map(|t| {
                    let task = TaskId::try_from(required(t.task_id, "tasks.task_id")?)
                        .map_err(Status::from)?;
                    let agent = t
                        .agent_id
                        .map(agora_core::AgentId::try_from)
                        .transpose()
                        .map_err(Status::from)?;
                    Ok((task, agent))
                })
                .collect::<Result<Vec<_>, Status>>()?;
            Ok(CallKind::Reconcile { tasks })
        })
        .await
    }

    async fn teardown(
        &self,
        request: Request<v1::TeardownRequest>,
    ) -> Result<Response<v1::CallResponse>, Status> {
        self.call(request.into_inner().header, || Ok(CallKind::Teardown))
            .await
    }
}

#[derive(Clone)]
pub struct AgentLinkService {
    pub gate: Gate,
    pub link_buffer: usize,
    /// Over TLS, an agent must present an agent certificate of the cluster CA.
    pub agents_by_certificate: bool,
}

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type SessionStream = ReceiverStream<Result<v1::MasterMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = agora_proto::listen::remote_addr(request.extensions());
        if self.agents_by_certificate {
            match agora_proto::tls::principal(&request) {
                Some(p) if p.kind == agora_proto::tls::Kind::Agent => {}
                Some(p) => {
                    return Err(Status::permission_denied(format!(
                        "only agents may register; this certificate is of {p}"
                    )));
                }
                None => {
                    return Err(Status::unauthenticated(
                        "an agent registers with an agent certificate of the cluster CA (agora cert issue agent NAME)",
                    ));
                }
            }
        }
        let lost = agora_proto::leader::lost(request.metadata());
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the agent closed its link before registering")
        })?;
        let Some(v1::agent_message::Message::Register(register)) = first.message else {
            return Err(Status::invalid_argument(
                "an agent's first message must be a registration",
            ));
        };
        validate::registration(&register).map_err(bad)?;
        let (link, rx) = mpsc::channel(self.link_buffer);
        let (agent, conn) = ask_after(&self.gate, lost.as_deref(), |reply| {
            Command::AgentRegister {
                register,
                link,
                reply,
            }
        })
        .await?;
        // The owner that registered the agent: should it end (leadership lost), the link
        // ends with it and the agent finds the new leader.
        let commands = self.gate.commands()?;
        let span = tracing::info_span!("agent_link", agent_id = %agent, ?peer);
        tokio::spawn(
            async move {
                loop {
                    match inbound.next().await {
                        Some(Ok(msg)) => {
                            let Some(message) = msg.message else { continue };
                            if commands
                                .send(Command::AgentMessage {
                                    agent: agent.clone(),
                                    conn,
                                    message,
                                })
                                .await
                                .is_err()
                            {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::info!(agent_id = %agent, error = %e, "agent link failed");
                            break;
                        }
                        None => break,
                    }
                }
                let _ = commands.send(Command::AgentClosed { agent, conn }).await;
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[derive(Clone)]
pub struct OperatorService {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub gate: Gate,
    /// Every call but the health needs a principal when authentication is on (health
    /// stays open, for load balancers and probes, as Mesos's).
    pub authn: Arc<crate::auth::Authn>,
    pub acls: Option<Arc<crate::acl::Acls>>,
    /// Every call but the health counts against its caller's rate.
    pub guard: Arc<crate::limits::Guard>,
}

impl OperatorService {
    /// Authenticates the call and asks the ACLs about `action` on `object`.
    fn authorize<T>(
        &self,
        request: &Request<T>,
        action: crate::acl::Action,
        object: &str,
    ) -> Result<(), Status> {
        let caller = self.authn.check(request)?;
        self.guard.call(&crate::limits::caller(
            caller.as_ref().map(|c| c.0.as_str()),
            agora_proto::listen::remote_addr(request.extensions()),
        ))?;
        crate::acl::check(
            self.acls.as_deref(),
            caller.as_ref().map(|c| c.0.as_str()),
            action,
            object,
        )
        .map_err(Status::permission_denied)
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn get_state(
        &self,
        request: Request<v1::GetStateRequest>,
    ) -> Result<Response<v1::GetStateResponse>, Status> {
        self.authorize(&request, crate::acl::Action::ViewState, "*")?;
        self.gate.commands()?;
        let snap = Arc::clone(&self.snapshot.borrow());
        Ok(Response::new(snap.state.clone()))
    }

    async fn get_health(
        &self,
        _request: Request<v1::GetHealthRequest>,
    ) -> Result<Response<v1::GetHealthResponse>, Status> {
        Ok(Response::new(health(&self.snapshot, &self.gate)))
    }

    async fn get_roles(
        &self,
        request: Request<v1::GetRolesRequest>,
    ) -> Result<Response<v1::GetRolesResponse>, Status> {
        self.authorize(&request, crate::acl::Action::ViewState, "*")?;
        self.gate.commands()?;
        let snap = Arc::clone(&self.snapshot.borrow());
        Ok(Response::new(v1::GetRolesResponse {
            roles: snap.state.roles.clone(),
        }))
    }

    async fn update_weight(
        &self,
        request: Request<v1::UpdateWeightRequest>,
    ) -> Result<Response<v1::UpdateResponse>, Status> {
        self.authn.check(&request)?;
        agora_core::resources::validate_role(&request.get_ref().role)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.authorize(
            &request,
            crate::acl::Action::UpdateWeight,
            &request.get_ref().role,
        )?;
        let r = request.into_inner();
        validate::weight(r.weight).map_err(bad)?;
        ask(&self.gate, |reply| Command::SetWeight {
            role: r.role,
            weight: r.weight,
            reply,
        })
        .await?;
        Ok(Response::new(v1::UpdateResponse {}))
    }

    async fn update_quota(
        &self,
        request: Request<v1::UpdateQuotaRequest>,
    ) -> Result<Response<v1::UpdateResponse>, Status> {
        self.authn.check(&request)?;
        agora_core::resources::validate_role(&request.get_ref().role)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.authorize(
            &request,
            crate::acl::Action::UpdateQuota,
            &request.get_ref().role,
        )?;
        let r = request.into_inner();
        validate::resources("guarantee", &r.guarantee).map_err(bad)?;
        validate::resources("limit", &r.limit).map_err(bad)?;
        let guarantee = agora_proto::resources_from_proto(&r.guarantee)?;
        let limit = agora_proto::resources_from_proto(&r.limit)?;
        let quota = Quota {
            guarantee,
            limit: (!limit.is_empty()).then_some(limit),
        };
        ask(&self.gate, |reply| Command::SetQuota {
            role: r.role,
            quota,
            force: r.force,
            reply,
        })
        .await?;
        Ok(Response::new(v1::UpdateResponse {}))
    }
}

/// The health in the latest snapshot, and false whatever it says once the owner task that
/// publishes snapshots is gone (its sender dropped): a master that cannot answer calls is not
/// healthy.
///
/// A follower is healthy while its registry runs; it reports whom it follows.
pub fn health(snapshot: &watch::Receiver<Arc<Snapshot>>, gate: &Gate) -> v1::GetHealthResponse {
    let mut h = snapshot.borrow().health.clone();
    if gate.owner.borrow().is_none() {
        let (role, leader, healthy) = match &*gate.leadership.borrow() {
            Leadership::Follower { leader: Some(l) } => ("follower", l.clone(), true),
            Leadership::Follower { leader: None } => ("candidate", String::new(), true),
            // Elected, recovering the registry.
            Leadership::Leader => ("candidate", String::new(), true),
            Leadership::Stopped(_) => ("stopped", String::new(), false),
        };
        h = v1::GetHealthResponse {
            healthy,
            master_id: h.master_id,
            uptime_seconds: h.uptime_seconds,
            role: role.into(),
            leader,
            ..Default::default()
        };
    }
    if snapshot.has_changed().is_err() {
        h.healthy = false;
    }
    h
}

/// `GET /health`: a JSON summary, for load balancers and humans with curl; 503 when
/// unhealthy.
pub fn health_router(snapshot: watch::Receiver<Arc<Snapshot>>, gate: Gate) -> axum::Router {
    axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let h = health(&snapshot, &gate);
            async move {
                let body = format!(
                    "{{\"healthy\":{},\"master_id\":\"{}\",\"uptime_seconds\":{:.3},\"active_agents\":{},\"active_frameworks\":{},\"role\":\"{}\",\"leader\":\"{}\"}}\n",
                    h.healthy, h.master_id, h.uptime_seconds, h.active_agents, h.active_frameworks, h.role, h.leader
                );
                let code = if h.healthy {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    code,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> (
        Gate,
        watch::Sender<Option<mpsc::Sender<Command>>>,
        watch::Sender<Leadership>,
    ) {
        let (owner_tx, owner) = watch::channel(None);
        let (lead_tx, leadership) = watch::channel(Leadership::Follower { leader: None });
        (
            Gate {
                owner,
                leadership,
                silence: Duration::from_millis(300),
                heard: Arc::default(),
            },
            owner_tx,
            lead_tx,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_during_an_election_waits_for_its_outcome() {
        // Elected here: the waiting call is served once the registry is recovered.
        let (g, owner_tx, lead_tx) = gate();
        let call = tokio::spawn(async move { g.serving(LEADER_WAIT, None).await.is_ok() });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!call.is_finished(), "answered before the election ended");
        lead_tx.send_replace(Leadership::Leader);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !call.is_finished(),
            "served before the registry was recovered"
        );
        let (tx, _rx) = mpsc::channel(1);
        owner_tx.send_replace(Some(tx));
        assert!(call.await.unwrap());

        // Another master elected: the waiting call is sent there at once.
        let (g, _owner_tx, lead_tx) = gate();
        let call = tokio::spawn(async move { g.serving(LEADER_WAIT, None).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        lead_tx.send_replace(Leadership::Follower {
            leader: Some("127.0.0.1:5052".into()),
        });
        let before = tokio::time::Instant::now();
        let status = call.await.unwrap().expect_err("a follower does not serve");
        assert!(before.elapsed() < Duration::from_millis(10));
        assert_eq!(
            agora_proto::leader::redirect(&status),
            Some(Some("http://127.0.0.1:5052".into()))
        );

        // No outcome: after the wait, "no leader yet".
        let (g, _owner_tx, _lead_tx) = gate();
        let before = tokio::time::Instant::now();
        let status = g.serving(LEADER_WAIT, None).await.expect_err("no leader");
        assert_eq!(before.elapsed(), LEADER_WAIT);
        assert_eq!(agora_proto::leader::redirect(&status), Some(None));
    }

    /// The registry writes the leadership from a thread of its own while calls read it. A
    /// read nested inside another read of the same channel waits for good once a writer is
    /// queued between them, and the master hangs (seen at 10,000 agents).
    #[test]
    fn answers_never_hang_while_the_leadership_changes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (g, _owner_tx, lead_tx) = gate();
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    for port in (5000u16..5002).cycle() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        lead_tx.send_replace(Leadership::Follower {
                            leader: Some(format!("127.0.0.1:{port}")),
                        });
                    }
                })
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                for _ in 0..300_000 {
                    assert!(g.serving(LEADER_WAIT, None).await.is_err());
                }
            });
            stop.store(true, Ordering::Relaxed);
            writer.join().unwrap();
            let _ = done_tx.send(());
        });
        done.recv_timeout(Duration::from_secs(30))
            .expect("a call hung while the leadership changed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_that_knows_the_leader_answers_at_once() {
        let (g, _owner_tx, _lead_tx) = gate();
        let _ = _lead_tx.send_replace(Leadership::Follower {
            leader: Some("127.0.0.1:5052".into()),
        });
        let before = tokio::time::Instant::now();
        assert!(g.serving(LEADER_WAIT, None).await.is_err());
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    /// Whether a call from a caller that lost `lost` is served here.
    async fn served_after_losing(g: Gate, lost: &'static str) -> bool {
        g.serving(LEADER_WAIT, Some(lost)).await.is_ok()
    }

    /// This master is elected and has recovered the registry.
    fn elect_here(
        lead_tx: &watch::Sender<Leadership>,
        owner_tx: &watch::Sender<Option<mpsc::Sender<Command>>>,
    ) {
        lead_tx.send_replace(Leadership::Leader);
        let (tx, _rx) = mpsc::channel(1);
        owner_tx.send_replace(Some(tx));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_lost_the_named_leader_waits_for_it_to_be_heard_or_given_up() {
        let named = || Leadership::Follower {
            leader: Some("127.0.0.1:5051".into()),
        };
        // It is heard from all along: the caller goes back to it after the doubt.
        let (g, _owner_tx, lead_tx) = gate();
        lead_tx.send_replace(named());
        g.heard.note();
        let before = tokio::time::Instant::now();
        let status = g
            .serving(LEADER_WAIT, Some("http://127.0.0.1:5051"))
            .await
            .expect_err("a follower does not serve");
        assert_eq!(before.elapsed(), g.silence);
        assert_eq!(
            agora_proto::leader::redirect(&status),
            Some(Some("http://127.0.0.1:5051".into()))
        );

        // Not heard since the call came, though the watch (which looks every 50 ms) still
        // names it at the doubt's end: the caller is not sent back there.
        let (g, owner_tx, lead_tx) = gate();
        lead_tx.send_replace(named());
        let call = tokio::spawn(served_after_losing(g, "http://127.0.0.1:5051"));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!call.is_finished(), "sent back to a silent leader");
        elect_here(&lead_tx, &owner_tx);
        assert!(call.await.unwrap(), "served once elected here");

        // It falls silent: the caller waits for the election here.
        let (g, owner_tx, lead_tx) = gate();
        lead_tx.send_replace(named());
        let call = tokio::spawn(served_after_losing(g, "http://127.0.0.1:5051"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        lead_tx.send_replace(Leadership::Follower { leader: None });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!call.is_finished(), "gave up before the election ended");
        elect_here(&lead_tx, &owner_tx);
        assert!(call.await.unwrap(), "served once elected here");
    }
}
