//! The master's owner task: the one place the [`Engine`] lives.
//!
//! gRPC handlers send it typed [`Command`]s over a channel and await replies; it calls the
//! engine with the current time and carries out the effects — events onto framework streams,
//! messages onto agent links — then runs the allocator when something freed or added
//! resources. Timers drive heartbeats and the periodic allocation cycle. After changes it
//! publishes a snapshot of the state, from which operator reads are served without ever
//! queueing here.
//!
//! Every outgoing stream has a bounded buffer. A framework or agent that does not read fast
//! enough is disconnected (and may re-subscribe and reconcile), never buffered without end.
//!
//! Changes the registry must keep reach it as [`Effect::Persist`]. They are group-committed:
//! the ops of one turn go out as one entry, at most one entry is in flight, and every effect
//! and reply queued after an op waits until its entry is committed — so no framework, agent
//! or operator is told of a change a failover could undo. The owner ends when this master
//! stops leading.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use agora_core::{AgentId, FrameworkId, OfferId, TaskId};
use agora_proto::{now_timestamp, v1};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::Status;

use crate::allocator::{Cycle, Quota};
use crate::engine::{Effect, Engine, Now};
use crate::registry::{Leadership, Op, Registrar, RegistryError};

/// A validated scheduler call.
#[derive(Debug)]
pub enum CallKind {
    Accept {
        offers: Vec<OfferId>,
        operations: Vec<v1::Operation>,
        filters: Option<v1::Filters>,
    },
    Decline {
        offers: Vec<OfferId>,
        filters: Option<v1::Filters>,
    },
    Revive {
        roles: Vec<String>,
    },
    Suppress {
        roles: Vec<String>,
    },
    Kill {
        task: TaskId,
    },
    Acknowledge {
        task: TaskId,
        uuid: Vec<u8>,
    },
    /// Each task with the agent the framework believes runs it, when it says.
    Reconcile {
        tasks: Vec<(TaskId, Option<AgentId>)>,
    },
    Teardown,
}

pub type Reply<T> = oneshot::Sender<Result<T, Status>>;
pub type LinkSender = mpsc::Sender<Result<v1::MasterMessage, Status>>;

/// What the gRPC handlers ask of the owner task.
pub enum Command {
    Subscribe {
        info: v1::FrameworkInfo,
        /// The stream id of the live subscription this one replaces.
        replaces: Option<String>,
        reply: Reply<EventStream>,
    },
    StreamClosed {
        framework: FrameworkId,
        stream: String,
    },
    Call {
        framework: FrameworkId,
        stream: String,
        kind: CallKind,
        reply: Reply<()>,
    },
    AgentRegister {
        register: v1::agent_message::Register,
        link: LinkSender,
        reply: Reply<(AgentId, u64)>,
    },
    AgentMessage {
        agent: AgentId,
        conn: u64,
        message: v1::agent_message::Message,
    },
    AgentClosed {
        agent: AgentId,
        conn: u64,
    },
    SetWeight {
        role: String,
        weight: f64,
        reply: Reply<()>,
    },
    SetQuota {
        role: String,
        quota: Quota,
        force: bool,
        reply: Reply<()>,
    },
    /// A fault injected by tests: the owner task panics.
    #[cfg(test)]
    Crash,
}

/// A framework's subscription stream, as handed to tonic.
pub struct EventStream {
    rx: mpsc::Receiver<v1::Event>,
    kicked: Arc<AtomicBool>,
    done: bool,
    on_drop: Option<(mpsc::Sender<Command>, FrameworkId, String)>,
    /// The caller's subscription, counted until the stream is dropped.
    slot: Option<crate::limits::Slot>,
}

impl EventStream {
    /// Counts the stream as `slot` for as long as it lives.
    #[must_use]
    pub fn holding(mut self, slot: crate::limits::Slot) -> Self {
        self.slot = Some(slot);
        self
    }
}

impl Stream for EventStream {
    type Item = Result<v1::Event, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.kicked.load(Ordering::Relaxed) {
            self.done = true;
            return Poll::Ready(Some(Err(Status::resource_exhausted(
                "subscriber fell behind its event buffer and was disconnected; re-subscribe and reconcile",
            ))));
        }
        self.rx.poll_recv(cx).map(|e| e.map(Ok))
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some((tx, framework, stream)) = self.on_drop.take() {
            let cmd = Command::StreamClosed { framework, stream };
            if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd) {
                // The owner is busy; tell it without blocking the dropping thread.
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
            }
        }
    }
}

/// What operators read: refreshed by the owner task after changes.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub state: v1::GetStateResponse,
    pub health: v1::GetHealthResponse,
}

struct FrameworkConn {
    stream: String,
    tx: mpsc::Sender<v1::Event>,
    kicked: Arc<AtomicBool>,
}

struct AgentConn {
    conn: u64,
    tx: LinkSender,
}

/// Settings of the owner task's timers and buffers.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub tick: std::time::Duration,
    pub allocation_interval: std::time::Duration,
    pub snapshot_interval: std::time::Duration,
    pub event_buffer: usize,
}

pub struct Actor {
    engine: Engine,
    config: RuntimeConfig,
    commands: mpsc::Sender<Command>,
    frameworks: HashMap<FrameworkId, FrameworkConn>,
    /// Subscriptions being set up, by stream id, attached when the engine says so.
    pending_streams: HashMap<String, FrameworkConn>,
    agents: HashMap<AgentId, AgentConn>,
    next_conn: u64,
    started: Instant,
    snapshot: watch::Sender<Arc<Snapshot>>,
    registrar: Registrar,
    /// This master's address, shown as the leader's in health.
    address: String,
    commits: Commits,
}

/// Something that must wait for the registry: an effect, or a reply to a caller.
// Held only while an entry is in flight; boxing every effect would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Held {
    Effect(Effect),
    Reply(Box<dyn FnOnce() + Send>),
}

/// The registry writes of the owner task: one entry in flight, the next one gathering.
#[derive(Default)]
struct Commits {
    in_flight: bool,
    /// What waits for the entry in flight.
    in_flight_held: Vec<Held>,
    /// Ops for the next entry, and what waits for it (or, with no ops, only for the entry
    /// in flight).
    next_ops: Vec<Op>,
    next_held: Vec<Held>,
}

impl Commits {
    fn must_hold(&self) -> bool {
        self.in_flight || !self.next_ops.is_empty()
    }
}

/// Why the owner task ended.
#[derive(Debug)]
pub enum Ended {
    /// Told to stop, or every sender went away.
    Shutdown,
    /// Another master leads now (or none does): this one stops serving.
    LostLeadership(String),
    /// The registry stopped for good.
    Fatal(String),
}

/// The time now, as the engine takes it.
pub fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall: now_timestamp(),
    }
}

impl Actor {
    pub fn new(
        engine: Engine,
        config: RuntimeConfig,
        commands: mpsc::Sender<Command>,
        snapshot: watch::Sender<Arc<Snapshot>>,
        registrar: Registrar,
    ) -> Self {
        let address = registrar.address().to_owned();
        Actor {
            engine,
            config,
            commands,
            frameworks: HashMap::new(),
            pending_streams: HashMap::new(),
            agents: HashMap::new(),
            next_conn: 0,
            started: Instant::now(),
            snapshot,
            registrar,
            address,
            commits: Commits::default(),
        }
    }

    /// Serves commands until `shutdown` resolves, every sender is gone, or this master stops
    /// leading.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Ended {
        let mut tick = tokio::time::interval(self.config.tick);
        let mut allocation = tokio::time::interval(self.config.allocation_interval);
        let mut publish = tokio::time::interval(self.config.snapshot_interval);
        let mut next_publish = tokio::time::Instant::now();
        for t in [&mut tick, &mut allocation, &mut publish] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let (done_tx, mut done) = mpsc::unbounded_channel::<Result<(), RegistryError>>();
        let mut leadership = self.registrar.leadership();
        tokio::pin!(shutdown);
        self.publish();
        let ended = loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break Ended::Shutdown,
                Some(r) = done.recv() => {
                    if let Err(e) = r {
                        break match e {
                            RegistryError::NotLeader { .. } => Ended::LostLeadership(e.to_string()),
                            other => Ended::Fatal(other.to_string()),
                        };
                    }
                    self.committed();
                    self.flush(&done_tx);
                }
                r = leadership.changed() => {
                    let now = r.map_or(Leadership::Stopped("the registry shut down".into()), |()| leadership.borrow_and_update().clone());
                    match now {
                        Leadership::Leader => {}
                        Leadership::Stopped(why) => break Ended::Fatal(why),
                        Leadership::Follower { leader } => break Ended::LostLeadership(format!(
                            "another master leads now ({})",
                            leader.as_deref().unwrap_or("not known yet")
                        )),
                    }
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break Ended::Shutdown };
                    self.handle(cmd);
                    // Take what else is already queued before allocating: one cycle for a
                    // burst of events.
                    for _ in 0..256 {
                        match rx.try_recv() {
                            Ok(cmd) => self.handle(cmd),
                            Err(_) => break,
                        }
                    }
                    if self.engine.allocation_pending() {
                        self.allocate(Cycle::Incremental);
                    }
                    self.flush(&done_tx);
                }
                _ = tick.tick() => {
                    self.engine.tick(now());
                    self.execute();
                    self.flush(&done_tx);
                }
                _ = allocation.tick() => {
                    self.allocate(Cycle::Full);
                    self.flush(&done_tx);
                }
                _ = publish.tick() => {
                    // A snapshot of a large cluster takes a while to build: it is built at
                    // most a tenth of the time, so that it never crowds out the work.
                    if tokio::time::Instant::now() >= next_publish && self.engine.take_changed() {
                        let t = tokio::time::Instant::now();
                        self.publish();
                        next_publish = tokio::time::Instant::now() + t.elapsed() * 9;
                    }
                }
            }
        };
        match &ended {
            Ended::Shutdown => tracing::info!("master shutting down"),
            Ended::LostLeadership(why) => {
                tracing::warn!(
                    why,
                    "this master no longer leads; dropping its state, streams and links"
                );
            }
            Ended::Fatal(why) => tracing::error!(why, "the registry failed"),
        }
        ended
    }

    /// Sends the gathered ops as the next entry, if none is in flight.
    fn flush(&mut self, done: &mpsc::UnboundedSender<Result<(), RegistryError>>) {
        let c = &mut self.commits;
        if c.in_flight || c.next_ops.is_empty() {
            return;
        }
        c.in_flight = true;
        c.in_flight_held = std::mem::take(&mut c.next_held);
        let ops = std::mem::take(&mut c.next_ops);
        let registrar = self.registrar.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _ = done.send(registrar.write(ops).await.map(|_| ()));
        });
    }

    /// The entry in flight is committed: what waited for it goes out.
    fn committed(&mut self) {
        self.commits.in_flight = false;
        let mut ready = std::mem::take(&mut self.commits.in_flight_held);
        if self.commits.next_ops.is_empty() {
            // What was queued since waited only for the order of things.
            ready.append(&mut self.commits.next_held);
        }
        for h in ready {
            match h {
                Held::Effect(e) => self.dispatch(e),
                Held::Reply(f) => f(),
            }
        }
        self.execute();
    }

    /// Answers a caller now, or once the registry has what the answer depends on.
    fn respond(&mut self, f: impl FnOnce() + Send + 'static) {
        if self.commits.must_hold() {
            self.commits.next_held.push(Held::Reply(Box::new(f)));
        } else {
            f();
        }
    }

    fn allocate(&mut self, cycle: Cycle) {
        self.engine.allocate(now(), cycle);
        self.execute();
    }

    fn publish(&mut self) {
        let t = now();
        let state = self.engine.snapshot(t);
        let health = v1::GetHealthResponse {
            healthy: true,
            master_id: state.master_id.clone(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            active_agents: state.agents.iter().filter(|a| a.active).count() as u32,
            active_frameworks: state.frameworks.iter().filter(|f| f.active).count() as u32,
            role: "leader".into(),
            leader: self.address.clone(),
        };
        self.snapshot
            .send_replace(Arc::new(Snapshot { state, health }));
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe {
                info,
                replaces,
                reply,
            } => {
                let (tx, rx) = mpsc::channel(self.config.event_buffer);
                let kicked = Arc::new(AtomicBool::new(false));
                // Calls quote the stream id, so it must not be guessable.
                let stream = format!(
                    "{}-S{}",
                    self.engine.config().master_id,
                    uuid::Uuid::new_v4().simple()
                );
                match self
                    .engine
                    .subscribe(info, replaces.as_deref(), stream, now())
                {
                    Ok((framework, stream)) => {
                        self.pending_streams.insert(
                            stream.clone(),
                            FrameworkConn {
                                stream: stream.clone(),
                                tx,
                                kicked: Arc::clone(&kicked),
                            },
                        );
                        self.execute();
                        let events = EventStream {
                            rx,
                            kicked,
                            done: false,
                            on_drop: Some((self.commands.clone(), framework, stream)),
                            slot: None,
                        };
                        self.respond(move || {
                            let _ = reply.send(Ok(events));
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::StreamClosed { framework, stream } => {
                if self
                    .frameworks
                    .get(&framework)
                    .is_some_and(|c| c.stream == stream)
                {
                    self.frameworks.remove(&framework);
                }
                self.engine
                    .framework_disconnected(&framework, &stream, now());
                self.execute();
            }
            Command::Call {
                framework,
                stream,
                kind,
                reply,
            } => {
                let result = self.call(&framework, &stream, kind);
                self.execute();
                self.respond(move || {
                    let _ = reply.send(result.map_err(Status::from));
                });
            }
            Command::AgentRegister {
                register,
                link,
                reply,
            } => match self.engine.register_agent(register, now()) {
                Ok(agent) => {
                    self.next_conn += 1;
                    let conn = self.next_conn;
                    // A previous link of this agent is dropped: its stream ends.
                    self.agents
                        .insert(agent.clone(), AgentConn { conn, tx: link });
                    self.execute();
                    self.respond(move || {
                        let _ = reply.send(Ok((agent, conn)));
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Command::AgentMessage {
                agent,
                conn,
                message,
            } => {
                if self.agents.get(&agent).is_none_or(|c| c.conn != conn) {
                    return;
                }
                let t = now();
                self.engine.agent_heartbeat(&agent, t);
                match message {
                    v1::agent_message::Message::Heartbeat(_) => {}
                    v1::agent_message::Message::StatusUpdate(update) => {
                        if let Err(e) = self.engine.status_update(&agent, update) {
                            tracing::warn!(agent_id = %agent, error = %e, "bad status update from agent");
                        }
                    }
                    v1::agent_message::Message::Register(_) => {
                        tracing::warn!(agent_id = %agent, "agent sent a second registration on one link; ignored");
                    }
                    v1::agent_message::Message::FrameworkMessage(m) => {
                        if let Err(e) = self.engine.framework_message(&agent, m) {
                            tracing::warn!(agent_id = %agent, error = %e, "bad framework message from agent");
                        }
                    }
                }
                self.execute();
            }
            Command::AgentClosed { agent, conn } => {
                if self.agents.get(&agent).is_some_and(|c| c.conn == conn) {
                    self.agents.remove(&agent);
                    self.engine.agent_disconnected(&agent);
                    self.execute();
                }
            }
            Command::SetWeight {
                role,
                weight,
                reply,
            } => {
                let r = self.engine.set_weight(&role, weight).map_err(Status::from);
                self.execute();
                self.respond(move || {
                    let _ = reply.send(r);
                });
            }
            Command::SetQuota {
                role,
                quota,
                force,
                reply,
            } => {
                let r = self
                    .engine
                    .set_quota(&role, quota, force)
                    .map_err(Status::from);
                self.execute();
                self.respond(move || {
                    let _ = reply.send(r);
                });
            }
            #[cfg(test)]
            Command::Crash => panic!("injected fault"),
        }
    }

    fn call(
        &mut self,
        framework: &FrameworkId,
        stream: &str,
        kind: CallKind,
    ) -> Result<(), crate::engine::EngineError> {
        let t = now();
        let e = &mut self.engine;
        match kind {
            CallKind::Accept {
                offers,
                operations,
                filters,
            } => e.accept(framework, stream, &offers, operations, filters.as_ref(), t),
            CallKind::Decline { offers, filters } => {
                e.decline(framework, stream, &offers, filters.as_ref(), t)
            }
            CallKind::Revive { roles } => e.revive(framework, stream, &roles),
            CallKind::Suppress { roles } => e.suppress(framework, stream, &roles),
            CallKind::Kill { task } => e.kill(framework, stream, &task),
            CallKind::Acknowledge { task, uuid } => e.acknowledge(framework, stream, &task, &uuid),
            CallKind::Reconcile { tasks } => e.reconcile(framework, stream, &tasks, t),
            CallKind::Teardown => e.teardown(framework, stream, t),
        }
    }

    /// Carries out the engine's effects, and those that follow from them (a subscriber found
    /// too slow is disconnected, which the engine must hear of).
    fn execute(&mut self) {
        loop {
            let effects = self.engine.take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                match effect {
                    Effect::Persist(op) => self.commits.next_ops.push(op),
                    e if self.commits.must_hold() => self.commits.next_held.push(Held::Effect(e)),
                    e => self.dispatch(e),
                }
            }
        }
    }

    fn dispatch(&mut self, effect: Effect) {
        match effect {
            Effect::Attach(framework, stream) => {
                if let Some(conn) = self.pending_streams.remove(&stream) {
                    self.frameworks.insert(framework, conn);
                }
            }
            Effect::ToFramework(framework, event) => self.send_event(&framework, event),
            Effect::CloseFramework(framework) => {
                self.frameworks.remove(&framework);
            }
            Effect::ToAgent(agent, message) => self.send_agent(&agent, message),
            Effect::CloseAgent(agent) => {
                // Dropping the sender ends the link's stream once the messages already
                // queued on it are read.
                self.agents.remove(&agent);
            }
            // Only `execute` sees these.
            Effect::Persist(op) => self.commits.next_ops.push(op),
        }
    }

    fn send_event(&mut self, framework: &FrameworkId, event: v1::Event) {
        let Some(conn) = self.frameworks.get(framework) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = conn.tx.try_send(event) {
            tracing::warn!(framework_id = %framework, "framework fell behind its event stream; disconnecting it");
            conn.kicked.store(true, Ordering::Relaxed);
            let stream = conn.stream.clone();
            self.frameworks.remove(framework);
            self.engine
                .framework_disconnected(framework, &stream, now());
        }
    }

    fn send_agent(&mut self, agent: &AgentId, message: v1::master_message::Message) {
        let Some(conn) = self.agents.get(agent) else {
            return;
        };
        let msg = v1::MasterMessage {
            message: Some(message),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = conn.tx.try_send(Ok(msg)) {
            tracing::warn!(agent_id = %agent, "agent fell behind its link; disconnecting it");
            self.agents.remove(agent);
            self.engine.agent_disconnected(agent);
        }
    }
}
