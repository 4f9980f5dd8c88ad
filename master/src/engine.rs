//! The master's state and rules, with no I/O: frameworks, agents, offers and tasks.
//!
//! The runtime ([`crate::runtime`]) turns wire calls into method calls here, passing the time
//! in, and then carries out the [`Effect`]s the engine queued (messages to frameworks and
//! agents, streams to close). Nothing here touches a socket or reads a clock, so every rule can
//! be tested by feeding calls and reading effects.
//!
//! ```text
//!  framework                 master (engine)                        agent
//!  ─────────                 ───────────────                        ─────
//!  Subscribe ───────────────> SUBSCRIBED
//!                             allocate() ── OFFERS ──> framework
//!  Accept(offer, LAUNCH) ───> validate, task STAGING ── RunTask ──> agent
//!                             <──────────────────── StatusUpdate (STARTING, RUNNING, FINISHED)
//!          <──── UPDATE ───── task table updated; terminal ⇒ resources recovered
//!  Acknowledge(uuid) ───────> ─────────────────────── Acknowledge ──> agent
//!                             terminal update acknowledged ⇒ task moves to completed
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use agora_core::{AgentId, FrameworkId, OfferId, Resources, TaskId, TaskState};
use agora_proto::v1;
use agora_proto::{
    ProtoError, attributes_from_proto, resources_from_proto, resources_to_proto, state_from_proto,
    state_to_proto,
};

use crate::allocator::{Allocation, Allocator, Cycle, Quota, RoleError, dominant_share};
use crate::registry::{Op, Registry};

/// The time, passed in by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For durations (heartbeats, filters, timeouts).
    pub mono: Instant,
    /// Seconds since the Unix epoch, for timestamps shown to users.
    pub wall: f64,
}

/// Settings of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub master_id: String,
    /// How often agents are asked to heartbeat.
    pub agent_heartbeat_interval: Duration,
    /// Heartbeats an agent may miss before it is marked lost.
    pub max_missed_heartbeats: u32,
    /// How often frameworks receive HEARTBEAT events.
    pub framework_heartbeat_interval: Duration,
    /// Filter applied to declined or unused resources when the call gives none.
    pub default_refuse: Duration,
    /// Offers not answered within this are rescinded; `None`: offers never time out.
    pub offer_timeout: Option<Duration>,
    /// Who may make and remove dynamic reservations: role → principals. Empty: any
    /// framework with a principal, for the roles its offers are allocated to.
    pub reservers: HashMap<String, Vec<String>>,
    /// How many finished tasks are kept for the operator API and reconciliation.
    pub max_completed_tasks: usize,
    /// After a failover, how long the agents the registry knows have to register again.
    pub agent_reregister_timeout: Duration,
    /// What each principal may do ([`crate::acl`]); none: everything.
    pub acls: Option<std::sync::Arc<crate::acl::Acls>>,
    /// Most tasks held for one principal's frameworks together; 0: no bound.
    pub max_tasks_per_principal: usize,
    /// Most outstanding offers for one principal's frameworks together; 0: no bound.
    pub max_offers_per_principal: usize,
}

/// What the runtime must do after a call.
// Effects live only from a call to the runtime's dispatch of them; boxing the events would
// cost an allocation for each one sent.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Effect {
    /// Send an event on the framework's subscription stream.
    ToFramework(FrameworkId, v1::Event),
    /// Send a message on the agent's link.
    ToAgent(AgentId, v1::master_message::Message),
    /// End the framework's subscription stream (after any events already queued).
    CloseFramework(FrameworkId),
    /// The framework's new subscription stream takes over from here: events queued after
    /// this go to it.
    Attach(FrameworkId, String),
    /// End the agent's link (after any messages already queued): the master wrote the agent
    /// off, and it must register again to be heard.
    CloseAgent(AgentId),
    /// Write this to the registry. Every effect after it waits until it is committed, so
    /// nothing is seen outside the master that the registry might not keep.
    Persist(Op),
}

/// Why a call was refused. Each maps to a gRPC status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("framework {0} is not known to this master")]
    UnknownFramework(FrameworkId),
    #[error("stream {stream} is not framework {framework}'s current subscription")]
    StaleStream {
        framework: FrameworkId,
        stream: String,
    },
    #[error("framework {0} is not subscribed")]
    Inactive(FrameworkId),
    #[error("offer {0} is no longer valid")]
    UnknownOffer(OfferId),
    #[error("offer {offer} belongs to another framework")]
    NotYourOffer { offer: OfferId },
    #[error("offers {0} and {1} are on different agents; an accept uses offers of one agent")]
    MixedAgents(OfferId, OfferId),
    #[error("task {task} of framework {framework} is not known to this master")]
    UnknownTask {
        framework: FrameworkId,
        task: TaskId,
    },
    #[error("task {task} already ended as {state}")]
    TaskEnded { task: TaskId, state: TaskState },
    #[error(
        "framework {0} is subscribed on another stream; a new subscription must name that \
         stream's id to replace it, or wait until it disconnects"
    )]
    FrameworkConnected(FrameworkId),
    #[error(
        "agent {0} is connected on another link; it cannot register again until that link ends"
    )]
    AgentConnected(AgentId),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Role(#[from] RoleError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error(transparent)]
    Limit(#[from] agora_core::LimitError),
}

impl From<EngineError> for tonic::Status {
    fn from(e: EngineError) -> Self {
        use EngineError::*;
        let msg = e.to_string();
        match e {
            UnknownFramework(_) | UnknownOffer(_) | UnknownTask { .. } => {
                tonic::Status::not_found(msg)
            }
            StaleStream { .. } | Inactive(_) | TaskEnded { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            FrameworkConnected(_) | AgentConnected(_) => tonic::Status::already_exists(msg),
            NotYourOffer { .. } | Forbidden(_) => tonic::Status::permission_denied(msg),
            Role(RoleError::ExceedsCapacity { .. }) => tonic::Status::failed_precondition(msg),
            Role(_) => tonic::Status::invalid_argument(msg),
            MixedAgents(..) | Invalid(_) | Proto(_) | Limit(_) => {
                tonic::Status::invalid_argument(msg)
            }
        }
    }
}

struct Framework {
    info: v1::FrameworkInfo,
    roles: Vec<String>,
    partition_aware: bool,
    /// The current subscription's stream id; `None` while disconnected.
    stream: Option<String>,
    disconnected_at: Option<Instant>,
    failover_timeout: Duration,
    used: Resources,
    offered: Resources,
    /// Adopted from an agent after a master restart; the framework has not re-subscribed.
    recovered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentStatus {
    /// Known from the registry after a failover; not heard from yet.
    Recovering,
    Connected,
    /// The link dropped; the agent may yet come back before it is marked lost.
    Disconnected,
    Lost,
}

struct Agent {
    info: v1::AgentInfo,
    total: Resources,
    used: Resources,
    offered: Resources,
    status: AgentStatus,
    last_seen: Instant,
    registered_at: f64,
    /// Messages (kills, acknowledgements, shutdowns) for the agent while it has no link,
    /// delivered when it registers again.
    outbox: VecDeque<v1::master_message::Message>,
    /// Tasks the master declared LOST when it marked the agent lost: if the agent comes back
    /// with them, they are killed, never adopted. Kept until the agent registers again.
    written_off: HashSet<TaskKey>,
    /// The agent's registry record as last written (encoded `AgentInfo` with the total), so
    /// that an unchanged re-registration writes nothing.
    persisted: Option<Vec<u8>>,
}

/// The registry record of an agent: its info with its total resources, reservations included.
fn agent_record(info: &v1::AgentInfo, total: &Resources) -> Vec<u8> {
    use prost::Message;
    v1::AgentInfo {
        resources: resources_to_proto(total),
        ..info.clone()
    }
    .encode_to_vec()
}

/// Most messages kept for an agent without a link; past it the oldest are dropped (each is
/// re-sent by its origin: frameworks retry kills and acknowledge retried updates).
const MAX_OUTBOX: usize = 16 * 1024;
/// Torn-down frameworks remembered (their ids refused, their late updates dropped); a
/// subscriber that makes and ends frameworks in a loop must not grow the set for ever.
pub const MAX_REMOVED_FRAMEWORKS: usize = 100_000;
/// Uuids of recent updates remembered per task, to drop duplicates.
const RECENT_UUIDS: usize = 8;

/// The tasks the master knows, indexed by agent too: a registration, an agent lost or an
/// agent's message looks at that agent's tasks, so it costs what the agent runs, not what
/// the cluster does. A task never moves between agents.
///
/// Tasks are boxed: a new leader takes a hundred thousand tasks in seconds, and each growth
/// of the map then moves pointers, not whole tasks (unboxed, the moves were 7 % of its CPU
/// in the failover bench).
#[derive(Default)]
struct Tasks {
    map: HashMap<TaskKey, Box<Task>>,
    by_agent: HashMap<AgentId, HashSet<TaskKey>>,
    /// How many of the tasks each framework has (the bound per principal sums them).
    per_framework: HashMap<FrameworkId, usize>,
}

impl Tasks {
    fn get(&self, key: &TaskKey) -> Option<&Task> {
        self.map.get(key).map(|t| &**t)
    }

    /// The task to change; its agent must stay what it is.
    fn get_mut(&mut self, key: &TaskKey) -> Option<&mut Task> {
        self.map.get_mut(key).map(|t| &mut **t)
    }

    fn contains_key(&self, key: &TaskKey) -> bool {
        self.map.contains_key(key)
    }

    fn insert(&mut self, key: TaskKey, task: Task) -> Option<Task> {
        let agent = task.agent.clone();
        let old = self.map.insert(key.clone(), Box::new(task)).map(|t| *t);
        if old.is_none() {
            *self.per_framework.entry(key.0.clone()).or_default() += 1;
        }
        if let Some(o) = &old
            && o.agent != agent
        {
            let was = o.agent.clone();
            self.unindex(&was, &key);
        }
        self.by_agent.entry(agent).or_default().insert(key);
        old
    }

    fn unindex(&mut self, agent: &AgentId, key: &TaskKey) {
        if let Some(set) = self.by_agent.get_mut(agent) {
            set.remove(key);
            if set.is_empty() {
                self.by_agent.remove(agent);
            }
        }
    }

    fn remove(&mut self, key: &TaskKey) -> Option<Task> {
        let t = *self.map.remove(key)?;
        self.unindex(&t.agent, key);
        if let Some(n) = self.per_framework.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                self.per_framework.remove(&key.0);
            }
        }
        Some(t)
    }

    /// How many tasks `framework` has.
    fn of_framework(&self, framework: &FrameworkId) -> usize {
        self.per_framework.get(framework).copied().unwrap_or(0)
    }

    fn iter(&self) -> impl Iterator<Item = (&TaskKey, &Task)> {
        self.map.iter().map(|(k, t)| (k, &**t))
    }

    fn keys(&self) -> impl Iterator<Item = &TaskKey> {
        self.map.keys()
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &Task> {
        self.map.values().map(|t| &**t)
    }

    /// The tasks on `agent`.
    fn on_agent<'a>(&'a self, agent: &AgentId) -> impl Iterator<Item = (&'a TaskKey, &'a Task)> {
        self.by_agent
            .get(agent)
            .into_iter()
            .flatten()
            .filter_map(|k| self.map.get(k).map(|t| (k, &**t)))
    }
}

struct Offer {
    framework: FrameworkId,
    agent: AgentId,
    role: String,
    resources: Resources,
    made_at: Instant,
}

struct Task {
    agent: AgentId,
    /// The role its resources are allocated to.
    role: String,
    info: v1::TaskInfo,
    resources: Resources,
    state: TaskState,
    last_status: Option<v1::TaskStatus>,
    /// The uuid of the terminal update; its acknowledgement retires the task.
    terminal_uuid: Option<Vec<u8>>,
    /// The uuids of the latest updates forwarded, newest last, and whether the framework
    /// acknowledged each: a retry of the newest unacknowledged one is forwarded again, any
    /// other repeat is dropped.
    recent: VecDeque<(Vec<u8>, bool)>,
    /// Its resources went back before its terminal update arrived: the agent's latest state
    /// said it had ended while an earlier update was still unacknowledged.
    freed: bool,
}

impl Task {
    /// Whether the task's resources are counted as used.
    fn holds(&self) -> bool {
        !self.freed && !self.state.is_terminal() && self.state != TaskState::Unreachable
    }
}

type TaskKey = (FrameworkId, TaskId);

/// The master's state.
pub struct Engine {
    config: EngineConfig,
    frameworks: HashMap<FrameworkId, Framework>,
    /// Frameworks torn down; their late status updates are acknowledged and dropped.
    removed_frameworks: HashSet<FrameworkId>,
    /// `removed_frameworks` oldest first, so that it stays within [`MAX_REMOVED_FRAMEWORKS`].
    removed_order: VecDeque<FrameworkId>,
    /// Every agent's written-off tasks (see `Agent::written_off`), so that no other agent can
    /// bring one back either.
    written_off: HashSet<TaskKey>,
    agents: HashMap<AgentId, Agent>,
    offers: HashMap<OfferId, Offer>,
    /// How many of the offers each framework holds.
    offers_of: HashMap<FrameworkId, usize>,
    /// The offers on each agent: an agent's registration or loss withdraws its own without
    /// looking at every offer.
    offers_by_agent: HashMap<AgentId, HashSet<OfferId>>,
    tasks: Tasks,
    completed: VecDeque<v1::TaskRecord>,
    allocator: Box<dyn Allocator>,
    effects: Vec<Effect>,
    next_id: u64,
    allocation_pending: bool,
    last_framework_heartbeat: Option<Instant>,
    changed: bool,
}

/// A framework's roles (each once, checked; `*` when it names none) and whether it is
/// partition-aware.
fn roles_and_awareness(info: &v1::FrameworkInfo) -> Result<(Vec<String>, bool), EngineError> {
    let mut roles: Vec<String> = Vec::new();
    for role in &info.roles {
        agora_core::resources::validate_role(role)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if !roles.contains(role) {
            roles.push(role.clone());
        }
    }
    if roles.is_empty() {
        roles.push("*".to_owned());
    }
    let partition_aware = info
        .capabilities
        .contains(&(v1::framework_info::Capability::PartitionAware as i32));
    Ok((roles, partition_aware))
}

/// The role a task's resources are allocated to, as recorded in its info.
fn role_of(task: &v1::TaskInfo) -> String {
    if task.allocation_role.is_empty() {
        "*".to_owned()
    } else {
        task.allocation_role.clone()
    }
}

fn event(e: v1::event::Event) -> v1::Event {
    v1::Event { event: Some(e) }
}

/// Strips module bytes so the task table does not hold a copy of every module.
fn without_module(task: &v1::TaskInfo) -> v1::TaskInfo {
    let mut t = task.clone();
    if let Some(v1::task_info::Payload::Wasm(w)) = &mut t.payload
        && let Some(v1::wasm_task::Module::ModuleBytes(b)) = &w.module
    {
        let digest = if w.sha256.is_empty() {
            format!("{} bytes inline", b.len())
        } else {
            w.sha256.clone()
        };
        w.module = Some(v1::wasm_task::Module::Digest(digest));
    }
    t
}

impl Engine {
    pub fn new(config: EngineConfig, allocator: Box<dyn Allocator>) -> Self {
        Engine {
            config,
            frameworks: HashMap::new(),
            removed_frameworks: HashSet::new(),
            removed_order: VecDeque::new(),
            written_off: HashSet::new(),
            agents: HashMap::new(),
            offers: HashMap::new(),
            offers_of: HashMap::new(),
            offers_by_agent: HashMap::new(),
            tasks: Tasks::default(),
            completed: VecDeque::new(),
            allocator,
            effects: Vec::new(),
            next_id: 0,
            allocation_pending: false,
            last_framework_heartbeat: None,
            changed: true,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The effects queued since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// True when something happened that may let new offers be made.
    pub fn allocation_pending(&self) -> bool {
        self.allocation_pending
    }

    /// True (once) when the state changed since the last call: the snapshot is stale.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// A new id: the master id (validated at start-up), a kind letter and a sequence number,
    /// so ids are unique across master restarts and always valid.
    fn next<T>(&mut self, prefix: &str, make: fn(String) -> Result<T, agora_core::IdError>) -> T {
        self.next_id += 1;
        make(format!(
            "{}-{prefix}{:06}",
            self.config.master_id, self.next_id
        ))
        .expect("ids built from a validated master id are valid")
    }

    fn tell_framework(&mut self, fw: &FrameworkId, e: v1::event::Event) {
        if self.frameworks.get(fw).is_some_and(|f| f.stream.is_some()) {
            self.effects.push(Effect::ToFramework(fw.clone(), event(e)));
        }
    }

    /// Sends to a connected agent, or keeps the message for when it registers again.
    fn tell_agent(&mut self, agent: &AgentId, m: v1::master_message::Message) {
        let Some(a) = self.agents.get_mut(agent) else {
            return;
        };
        if a.status == AgentStatus::Connected {
            self.effects.push(Effect::ToAgent(agent.clone(), m));
            return;
        }
        if a.outbox.len() >= MAX_OUTBOX {
            tracing::warn!(agent_id = %agent, "agent without a link has too many messages waiting; dropping the oldest");
            a.outbox.pop_front();
        }
        a.outbox.push_back(m);
    }

    // ---------------------------------------------------------------------------------------
    // Frameworks.
    // ---------------------------------------------------------------------------------------

    /// Subscribes a framework (new, failing over, or re-subscribing after a master restart)
    /// and returns its id and the new stream's id. SUBSCRIBED is queued as the stream's first
    /// event.
    ///
    /// # Errors
    /// When the framework info is invalid.
    /// `stream` is the new subscription's id, made unguessable by the caller (calls must
    /// quote it). A framework whose subscription is alive is only taken over by a
    /// subscription that `replaces` it by naming its stream id.
    pub fn subscribe(
        &mut self,
        info: v1::FrameworkInfo,
        replaces: Option<&str>,
        stream: String,
        now: Now,
    ) -> Result<(FrameworkId, String), EngineError> {
        if stream.is_empty() {
            return Err(EngineError::Invalid(
                "a subscription needs a stream id".into(),
            ));
        }
        if info.name.trim().is_empty() {
            return Err(EngineError::Invalid("framework name is empty".into()));
        }
        let (roles, partition_aware) = roles_and_awareness(&info)?;
        if let Some(acls) = self.config.acls.as_deref() {
            let principal = Some(info.principal.as_str()).filter(|p| !p.is_empty());
            for role in &roles {
                acls.check(principal, crate::acl::Action::RegisterFramework, role)
                    .map_err(EngineError::Forbidden)?;
            }
        }
        let failover_timeout = agora_core::limits::seconds(
            "framework_info.failover_timeout",
            info.failover_timeout,
            agora_core::limits::MAX_FAILOVER_TIMEOUT_SECS,
        )?;
        let requested: Option<FrameworkId> =
            info.id.as_ref().map(FrameworkId::try_from).transpose()?;
        if let Some(id) = &requested
            && self.removed_frameworks.contains(id)
        {
            return Err(EngineError::Invalid(format!(
                "framework {id} was torn down; subscribe without an id to start anew"
            )));
        }
        if let Some(old) = requested.as_ref().and_then(|id| self.frameworks.get(id)) {
            if old.stream.is_some() && old.stream.as_deref() != replaces {
                return Err(EngineError::FrameworkConnected(
                    requested
                        .clone()
                        .expect("an old framework was found by its id"),
                ));
            }
            // The principal reservations are made in cannot change hands on failover.
            if !old.recovered && old.info.principal != info.principal {
                return Err(EngineError::Forbidden(format!(
                    "framework {} subscribed with principal {:?}; a failover cannot change it to {:?}",
                    old.info.id.as_ref().map_or("", |i| i.value.as_str()),
                    old.info.principal,
                    info.principal
                )));
            }
        }
        let id = match requested {
            Some(id) => id,
            None => self.next("F", FrameworkId::new),
        };
        let mut info = info;
        info.id = Some((&id).into());
        {
            use prost::Message;
            self.effects.push(Effect::Persist(Op::PutFramework {
                id: id.to_string(),
                info: info.encode_to_vec(),
                at: now.wall,
            }));
        }

        if self.frameworks.get(&id).is_some_and(|f| f.stream.is_some()) {
            // Offers sent on the old stream may never have been read: they go back, and the
            // new subscription is offered afresh.
            self.withdraw_offers(|o| o.framework == id, false);
        }
        if let Some(old) = self.frameworks.get_mut(&id) {
            if old.stream.is_some() {
                // Failover: the old subscription is told why and closed.
                self.effects.push(Effect::ToFramework(
                    id.clone(),
                    event(v1::event::Event::Error(v1::event::Error {
                        message: "framework failed over to a new subscription".into(),
                    })),
                ));
                self.effects.push(Effect::CloseFramework(id.clone()));
            }
            old.info = info;
            old.roles = roles.clone();
            old.partition_aware = partition_aware;
            old.failover_timeout = failover_timeout;
            old.stream = Some(stream.clone());
            old.disconnected_at = None;
            old.recovered = false;
        } else {
            self.frameworks.insert(
                id.clone(),
                Framework {
                    info,
                    roles: roles.clone(),
                    partition_aware,
                    stream: Some(stream.clone()),
                    disconnected_at: None,
                    failover_timeout,
                    used: Resources::new(),
                    offered: Resources::new(),
                    recovered: false,
                },
            );
        }
        self.allocator.add_framework(&id, &roles);
        self.recompute_framework_usage(&id);
        self.effects
            .push(Effect::Attach(id.clone(), stream.clone()));
        self.effects.push(Effect::ToFramework(
            id.clone(),
            event(v1::event::Event::Subscribed(v1::event::Subscribed {
                framework_id: Some((&id).into()),
                stream_id: stream.clone(),
                heartbeat_interval_seconds: self.config.framework_heartbeat_interval.as_secs_f64(),
                master_id: self.config.master_id.clone(),
            })),
        ));
        tracing::info!(framework_id = %id, stream_id = %stream, "framework subscribed");
        self.allocation_pending = true;
        self.changed = true;
        Ok((id, stream))
    }

    fn recompute_framework_usage(&mut self, id: &FrameworkId) {
        let used = self
            .tasks
            .iter()
            .filter(|((f, _), t)| f == id && t.state.is_live() && t.holds())
            .fold(Resources::new(), |acc, (_, t)| acc + t.resources.clone());
        if let Some(f) = self.frameworks.get_mut(id) {
            f.used = used;
        }
    }

    /// Checks that a call comes from the framework's current subscription.
    fn caller(&self, id: &FrameworkId, stream: &str) -> Result<(), EngineError> {
        let f = self
            .frameworks
            .get(id)
            .ok_or_else(|| EngineError::UnknownFramework(id.clone()))?;
        match &f.stream {
            None => Err(EngineError::Inactive(id.clone())),
            Some(s) if s != stream => Err(EngineError::StaleStream {
                framework: id.clone(),
                stream: stream.to_owned(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// The framework's subscription stream ended.
    pub fn framework_disconnected(&mut self, id: &FrameworkId, stream: &str, now: Now) {
        let Some(f) = self.frameworks.get_mut(id) else {
            return;
        };
        if f.stream.as_deref() != Some(stream) {
            return;
        }
        f.stream = None;
        f.disconnected_at = Some(now.mono);
        let timeout = f.failover_timeout;
        tracing::info!(framework_id = %id, failover_timeout = ?timeout, "framework disconnected");
        self.withdraw_offers(|o| o.framework == *id, false);
        self.allocator.set_framework_active(id, false);
        if timeout.is_zero() {
            self.remove_framework(
                id,
                "its subscription ended and its failover timeout is 0",
                now,
            );
        } else {
            self.effects
                .push(Effect::Persist(Op::FrameworkDisconnected {
                    id: id.to_string(),
                    at: now.wall,
                }));
        }
        self.changed = true;
    }

    /// Removes every offer matching `which`, returning its resources; tells the frameworks
    /// when `rescind`.
    /// Withdraws the offers on `agent` (see [`Engine::withdraw_offers`]).
    fn withdraw_agent_offers(&mut self, agent: &AgentId, rescind: bool) {
        let ids: Vec<OfferId> = self
            .offers_by_agent
            .get(agent)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for oid in ids {
            if let Some(o) = self.remove_offer(&oid, rescind) {
                self.allocator
                    .recover(&o.agent, &o.framework, &o.role, &o.resources, None);
            }
        }
    }

    fn withdraw_offers(&mut self, which: impl Fn(&Offer) -> bool, rescind: bool) {
        let ids: Vec<OfferId> = self
            .offers
            .iter()
            .filter(|(_, o)| which(o))
            .map(|(k, _)| k.clone())
            .collect();
        for oid in ids {
            if let Some(o) = self.remove_offer(&oid, rescind) {
                self.allocator
                    .recover(&o.agent, &o.framework, &o.role, &o.resources, None);
            }
        }
    }

    /// Removes an offer from the books (the caller tells the allocator what becomes of its
    /// resources); tells the framework when `rescind`.
    fn remove_offer(&mut self, id: &OfferId, rescind: bool) -> Option<Offer> {
        let offer = self.offers.remove(id)?;
        if let Some(n) = self.offers_of.get_mut(&offer.framework) {
            *n -= 1;
            if *n == 0 {
                self.offers_of.remove(&offer.framework);
            }
        }
        if let Some(set) = self.offers_by_agent.get_mut(&offer.agent) {
            set.remove(id);
            if set.is_empty() {
                self.offers_by_agent.remove(&offer.agent);
            }
        }
        if let Some(a) = self.agents.get_mut(&offer.agent) {
            a.offered.subtract(&offer.resources);
        }
        if let Some(f) = self.frameworks.get_mut(&offer.framework) {
            f.offered.subtract(&offer.resources);
        }
        if rescind {
            self.tell_framework(
                &offer.framework.clone(),
                v1::event::Event::Rescind(v1::event::Rescind {
                    offer_id: Some(id.into()),
                }),
            );
        }
        self.allocation_pending = true;
        self.changed = true;
        Some(offer)
    }

    /// Tears a framework down: its tasks are killed, its offers withdrawn, its stream closed.
    pub fn teardown(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        now: Now,
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        self.remove_framework(id, "the framework asked to be torn down", now);
        Ok(())
    }

    fn remove_framework(&mut self, id: &FrameworkId, why: &str, now: Now) {
        tracing::info!(framework_id = %id, why, "removing framework");
        self.withdraw_offers(|o| o.framework == *id, false);
        let keys: Vec<TaskKey> = self
            .tasks
            .keys()
            .filter(|(f, _)| f == id)
            .cloned()
            .collect();
        let mut agents = HashSet::new();
        for key in keys {
            if let Some(mut task) = self.tasks.remove(&key) {
                if !task.state.is_terminal() {
                    agents.insert(task.agent.clone());
                    if task.holds()
                        && let Some(a) = self.agents.get_mut(&task.agent)
                    {
                        a.used.subtract(&task.resources);
                    }
                    task.state = TaskState::Killed;
                    task.last_status = Some(v1::TaskStatus {
                        task_id: Some((&key.1).into()),
                        state: v1::TaskState::TaskKilled as i32,
                        reason: v1::Reason::FrameworkRemoved as i32,
                        message: format!("framework removed: {why}"),
                        source: v1::StatusSource::SourceMaster as i32,
                        timestamp: now.wall,
                        agent_id: Some((&task.agent).into()),
                        ..Default::default()
                    });
                }
                self.complete(&key, task);
            }
        }
        for agent in agents {
            self.tell_agent(
                &agent,
                v1::master_message::Message::ShutdownFramework(
                    v1::master_message::ShutdownFramework {
                        framework_id: Some(id.into()),
                    },
                ),
            );
        }
        if self.frameworks.get(id).is_some_and(|f| f.stream.is_some()) {
            self.effects.push(Effect::ToFramework(
                id.clone(),
                event(v1::event::Event::Error(v1::event::Error {
                    message: format!("framework removed: {why}"),
                })),
            ));
            self.effects.push(Effect::CloseFramework(id.clone()));
        }
        self.frameworks.remove(id);
        self.allocator.remove_framework(id);
        self.effects
            .push(Effect::Persist(Op::RemoveFramework { id: id.to_string() }));
        if self.removed_frameworks.insert(id.clone()) {
            self.removed_order.push_back(id.clone());
        }
        while self.removed_order.len() > MAX_REMOVED_FRAMEWORKS {
            if let Some(old) = self.removed_order.pop_front() {
                self.removed_frameworks.remove(&old);
            }
        }
        self.allocation_pending = true;
        self.changed = true;
    }

    /// Gives a task's resources back: no longer used on its agent or by its framework, and
    /// free for the allocator to offer again.
    fn give_back(
        &mut self,
        framework: &FrameworkId,
        agent: &AgentId,
        role: &str,
        resources: &Resources,
    ) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.used.subtract(resources);
        }
        if let Some(f) = self.frameworks.get_mut(framework) {
            f.used.subtract(resources);
        }
        self.allocator
            .recover(agent, framework, role, resources, None);
    }

    fn complete(&mut self, key: &TaskKey, task: Task) {
        self.completed.push_back(v1::TaskRecord {
            task_id: Some((&key.1).into()),
            framework_id: Some((&key.0).into()),
            agent_id: Some((&task.agent).into()),
            name: task.info.name.clone(),
            state: state_to_proto(task.state) as i32,
            resources: resources_to_proto(&task.resources),
            last_status: task.last_status,
        });
        while self.completed.len() > self.config.max_completed_tasks {
            self.completed.pop_front();
        }
    }

    // ---------------------------------------------------------------------------------------
    // Scheduler calls.
    // ---------------------------------------------------------------------------------------

    /// ACCEPT: launches tasks on the resources of the given offers.
    ///
    /// Unknown, foreign or mixed offers refuse the whole call and change nothing. Otherwise the
    /// offers are used up: each task is checked in turn and launched if it is valid and fits
    /// in what remains, else answered with TASK_ERROR; what is left over returns to the pool
    /// behind a filter.
    ///
    /// # Errors
    /// See [`EngineError`].
    pub fn accept(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        offer_ids: &[OfferId],
        operations: Vec<v1::Operation>,
        filters: Option<&v1::Filters>,
        now: Now,
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        if offer_ids.is_empty() {
            return Err(EngineError::Invalid("accept names no offers".into()));
        }
        let refuse = self.refuse_duration(filters)?;
        let mut first: Option<(&OfferId, &Offer)> = None;
        for oid in offer_ids {
            let offer = self
                .offers
                .get(oid)
                .ok_or_else(|| EngineError::UnknownOffer(oid.clone()))?;
            if offer.framework != *id {
                return Err(EngineError::NotYourOffer { offer: oid.clone() });
            }
            match first {
                Some((f, o)) if o.agent != offer.agent => {
                    return Err(EngineError::MixedAgents(f.clone(), oid.clone()));
                }
                Some((f, o)) if o.role != offer.role => {
                    return Err(EngineError::Invalid(format!(
                        "offers {f} and {oid} are allocated to different roles ({} and {}); \
                         an accept uses offers of one role",
                        o.role, offer.role
                    )));
                }
                _ => first = Some((oid, offer)),
            }
        }
        if let Some((_, o)) = first {
            let mut trial = offer_ids
                .iter()
                .filter_map(|oid| self.offers.get(oid))
                .fold(Resources::new(), |acc, o| acc + o.resources.clone());
            let principal = self
                .frameworks
                .get(id)
                .map(|f| f.info.principal.clone())
                .unwrap_or_default();
            let role = o.role.clone();
            for op in &operations {
                self.apply_reservation(&mut trial, op, &role, &principal)?;
            }
        }
        let principal = self
            .frameworks
            .get(id)
            .map(|f| f.info.principal.clone())
            .unwrap_or_default();
        let mut pool = Resources::new();
        let mut agent_role = None;
        for oid in offer_ids {
            if let Some(o) = self.remove_offer(oid, false) {
                pool += &o.resources;
                agent_role = Some((o.agent, o.role));
            }
        }
        let Some((agent_id, role)) = agent_role else {
            return Err(EngineError::Invalid("accept names no offers".into()));
        };
        for op in operations {
            match op.operation {
                Some(v1::operation::Operation::Launch(launch)) => {
                    for task in launch.tasks {
                        self.launch(id, &agent_id, &role, &mut pool, task, now);
                    }
                }
                Some(ref reservation) => {
                    let before = pool.clone();
                    let op = v1::Operation {
                        operation: Some(reservation.clone()),
                    };
                    // Checked above, though a LAUNCH before it may have used what it names.
                    if let Err(e) = self.apply_reservation(&mut pool, &op, &role, &principal) {
                        tracing::warn!(framework_id = %id, error = %e, "reservation dropped");
                        continue;
                    }
                    let from = before.saturating_sub(&pool);
                    let to = pool.saturating_sub(&before);
                    tracing::info!(framework_id = %id, agent_id = %agent_id, %role, %from, %to, "reservation changed");
                    self.allocator.convert(&agent_id, id, &role, &from, &to);
                    if let Some(a) = self.agents.get_mut(&agent_id) {
                        a.total.subtract(&from);
                        a.total += &to;
                        let record = agent_record(&a.info, &a.total);
                        a.persisted = Some(record);
                        use prost::Message;
                        self.effects.push(Effect::Persist(Op::SetAgentResources {
                            id: agent_id.to_string(),
                            resources: v1::AgentInfo {
                                resources: resources_to_proto(&a.total),
                                ..Default::default()
                            }
                            .encode_to_vec(),
                        }));
                    }
                    self.changed = true;
                }
                None => {
                    tracing::warn!(framework_id = %id, "accept with an empty operation");
                }
            }
        }
        // What was not used goes back, refused by this framework for a while.
        let until = (!refuse.is_zero()).then(|| now.mono + refuse);
        self.allocator.recover(&agent_id, id, &role, &pool, until);
        self.allocation_pending = true;
        Ok(())
    }

    /// Applies a RESERVE or UNRESERVE to `pool`, the resources of offers allocated to `role`,
    /// on behalf of a framework with `principal`. LAUNCH and empty operations pass.
    fn apply_reservation(
        &self,
        pool: &mut Resources,
        op: &v1::Operation,
        role: &str,
        principal: &str,
    ) -> Result<(), EngineError> {
        let (resources, reserve) = match &op.operation {
            Some(v1::operation::Operation::Reserve(r)) => (&r.resources, true),
            Some(v1::operation::Operation::Unreserve(r)) => (&r.resources, false),
            _ => return Ok(()),
        };
        let wanted = resources_from_proto(resources)?;
        if wanted.is_empty() {
            return Err(EngineError::Invalid(
                "a reservation operation names no resources".into(),
            ));
        }
        if principal.is_empty() {
            return Err(EngineError::Forbidden(
                "dynamic reservations need a framework principal; subscribe with one".into(),
            ));
        }
        if let Some(acls) = self.config.acls.as_deref() {
            if reserve {
                acls.check(Some(principal), crate::acl::Action::Reserve, role)
                    .map_err(EngineError::Forbidden)?;
            } else {
                for r in wanted.iter() {
                    if let agora_core::Reservation::Dynamic { principal: rp, .. } = &r.reservation {
                        acls.check(Some(principal), crate::acl::Action::Unreserve, rp)
                            .map_err(EngineError::Forbidden)?;
                    }
                }
            }
        }
        if let Some(allowed) = self.config.reservers.get(role)
            && !allowed.iter().any(|p| p == principal || p == "*")
        {
            return Err(EngineError::Forbidden(format!(
                "principal {principal:?} may not reserve or unreserve for role {role}"
            )));
        }
        if !self.config.reservers.is_empty() && !self.config.reservers.contains_key(role) {
            return Err(EngineError::Forbidden(format!(
                "no principal may reserve for role {role} (see the master's reservation ACL)"
            )));
        }
        for r in wanted.iter() {
            match &r.reservation {
                agora_core::Reservation::Dynamic {
                    role: rr,
                    principal: rp,
                } if rr == role => {
                    if reserve && rp != principal {
                        return Err(EngineError::Forbidden(format!(
                            "{r}: a reservation is made in the framework's own principal ({principal:?})"
                        )));
                    }
                }
                agora_core::Reservation::Dynamic { role: rr, .. } => {
                    return Err(EngineError::Invalid(format!(
                        "{r}: the offers are allocated to role {role}, not {rr}"
                    )));
                }
                _ => {
                    return Err(EngineError::Invalid(format!(
                        "{r}: name a dynamic reservation, e.g. cpus({role},{principal}):1"
                    )));
                }
            }
        }
        let plain = wanted.flatten();
        let (take, give) = if reserve {
            (plain, wanted)
        } else {
            (wanted, plain)
        };
        let Some(rest) = pool.checked_sub(&take) else {
            return Err(EngineError::Invalid(format!(
                "cannot {} {take}: the offers hold {pool}",
                if reserve { "reserve" } else { "unreserve" }
            )));
        };
        *pool = rest + give;
        Ok(())
    }

    /// Sets a role's weight.
    ///
    /// # Errors
    /// When the role or weight is invalid.
    pub fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), EngineError> {
        self.allocator.set_weight(role, weight)?;
        tracing::info!(role, weight, "role weight set");
        self.effects.push(Effect::Persist(Op::SetWeight {
            role: role.to_owned(),
            weight: Some(weight),
        }));
        self.allocation_pending = true;
        self.changed = true;
        Ok(())
    }

    /// Sets or (when empty) removes a role's quota.
    ///
    /// # Errors
    /// See [`Allocator::set_quota`].
    pub fn set_quota(&mut self, role: &str, quota: Quota, force: bool) -> Result<(), EngineError> {
        let text = format!(
            "guarantee {} limit {}",
            quota.guarantee,
            quota
                .limit
                .as_ref()
                .map_or("none".into(), |l| l.to_string())
        );
        let record = (!quota.guarantee.is_empty() || quota.limit.is_some()).then(|| {
            use prost::Message;
            v1::UpdateQuotaRequest {
                role: role.to_owned(),
                guarantee: resources_to_proto(&quota.guarantee),
                limit: quota
                    .limit
                    .as_ref()
                    .map(resources_to_proto)
                    .unwrap_or_default(),
                force: true,
            }
            .encode_to_vec()
        });
        self.allocator.set_quota(role, quota, force)?;
        tracing::info!(role, quota = %text, force, "role quota set");
        self.effects.push(Effect::Persist(Op::SetQuota {
            role: role.to_owned(),
            quota: record,
        }));
        self.allocation_pending = true;
        self.changed = true;
        Ok(())
    }

    fn refuse_duration(&self, filters: Option<&v1::Filters>) -> Result<Duration, EngineError> {
        match filters.and_then(|f| f.refuse_seconds) {
            None => Ok(self.config.default_refuse),
            Some(s) => Ok(agora_core::limits::seconds(
                "filters.refuse_seconds",
                s,
                agora_core::limits::MAX_REFUSE_SECS,
            )?),
        }
    }

    fn task_error(
        &mut self,
        fw: &FrameworkId,
        task_id: Option<v1::TaskId>,
        agent: &AgentId,
        reason: v1::Reason,
        message: String,
        now: Now,
    ) {
        tracing::info!(framework_id = %fw, task_id = ?task_id.as_ref().map(|t| &t.value), %message, "task refused");
        let status = v1::TaskStatus {
            task_id,
            state: v1::TaskState::TaskError as i32,
            reason: reason as i32,
            message,
            source: v1::StatusSource::SourceMaster as i32,
            timestamp: now.wall,
            agent_id: Some(agent.into()),
            ..Default::default()
        };
        self.tell_framework(
            fw,
            v1::event::Event::Update(v1::event::Update {
                status: Some(status),
            }),
        );
    }

    fn validate_task(
        &self,
        fw: &FrameworkId,
        agent: &AgentId,
        task: &v1::TaskInfo,
    ) -> Result<(TaskId, Resources), String> {
        let task_id = TaskId::try_from(task.task_id.as_ref().ok_or("task has no task_id")?)
            .map_err(|e| e.to_string())?;
        if let Some(a) = &task.agent_id
            && a.value != agent.as_str()
        {
            return Err(format!(
                "task names agent {} but the offers are on agent {agent}",
                a.value
            ));
        }
        if self
            .tasks
            .get(&(fw.clone(), task_id.clone()))
            .is_some_and(|t| !t.state.is_terminal())
        {
            return Err(format!("a task with id {task_id} is already running"));
        }
        let resources = resources_from_proto(&task.resources).map_err(|e| e.to_string())?;
        if resources.cpus() <= 0.0 && resources.mem() <= 0.0 {
            return Err("a task needs some cpus or mem".into());
        }
        if let Some(e) = &task.executor {
            let id = e
                .executor_id
                .as_ref()
                .ok_or("the task's executor has no executor_id")?;
            agora_core::ExecutorId::try_from(id).map_err(|e| format!("executor_id: {e}"))?;
            if e.command.as_ref().is_none_or(|c| c.value.trim().is_empty()) {
                return Err(format!("executor {} has no command", id.value));
            }
        }
        if let Some(u) = task
            .uris
            .iter()
            .chain(task.executor.iter().flat_map(|e| &e.uris))
            .find(|u| u.value.trim().is_empty())
        {
            return Err(format!(
                "a uri has no value (output_file {:?})",
                u.output_file
            ));
        }
        match &task.payload {
            // An executor makes of the task what it will (its data, say).
            None if task.executor.is_some() => {}
            None => {
                return Err(
                    "task has neither a wasm nor a command payload, nor an executor".into(),
                );
            }
            Some(v1::task_info::Payload::Wasm(w)) if w.module.is_none() => {
                return Err("wasm task has no module (bytes, digest or uri)".into());
            }
            Some(_) => {}
        }
        crate::validate::task_info("task", task).map_err(|e| e.to_string())?;
        let native = matches!(task.payload, Some(v1::task_info::Payload::Command(_)))
            || task.executor.is_some();
        if native && resources.mem() <= 0.0 {
            return Err(
                "a command task or an executor's task needs a mem resource: without one it \
                 would run with no memory limit"
                    .into(),
            );
        }
        Ok((task_id, resources))
    }

    /// Who a framework's offers and tasks count against: its principal, or the framework
    /// itself when it has none.
    fn principal_key(&self, fw: &FrameworkId) -> String {
        match self.frameworks.get(fw).map(|f| f.info.principal.as_str()) {
            Some(p) if !p.is_empty() => format!("principal {p}"),
            _ => format!("framework {fw}"),
        }
    }

    /// The offers held by the frameworks of `fw`'s principal (by `fw` alone without one).
    fn offers_held(&self, fw: &FrameworkId) -> usize {
        let principal = self
            .frameworks
            .get(fw)
            .map_or("", |f| f.info.principal.as_str());
        if principal.is_empty() {
            return self.offers_of.get(fw).copied().unwrap_or(0);
        }
        self.offers_of
            .iter()
            .filter(|(id, _)| {
                self.frameworks
                    .get(*id)
                    .is_some_and(|f| f.info.principal == principal)
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Whether the framework's principal may hold one more task: the bound sums every
    /// framework of that principal (a principal cannot escape it by registering more).
    fn within_principal_bound(&self, fw: &FrameworkId) -> Result<(), String> {
        let max = self.config.max_tasks_per_principal;
        if max == 0 {
            return Ok(());
        }
        let principal = self
            .frameworks
            .get(fw)
            .map_or("", |f| f.info.principal.as_str());
        let held: usize = if principal.is_empty() {
            self.tasks.of_framework(fw)
        } else {
            self.frameworks
                .iter()
                .filter(|(_, f)| f.info.principal == principal)
                .map(|(id, _)| self.tasks.of_framework(id))
                .sum()
        };
        if held < max {
            return Ok(());
        }
        let whose = if principal.is_empty() {
            "this framework (it has no principal)".to_owned()
        } else {
            format!("principal {principal:?}")
        };
        Err(format!(
            "{whose} already holds {held} tasks, as many as it may (--max-tasks-per-principal {max}); wait for some to finish"
        ))
    }

    /// What the ACLs say of the framework's principal launching `task`: its kind, the user
    /// a native task runs as (the task's, else the framework's), and each capability a Wasm
    /// task is granted.
    fn authorize_task(&self, fw: &FrameworkId, task: &v1::TaskInfo) -> Result<(), String> {
        use crate::acl::Action;
        let Some(acls) = self.config.acls.as_deref() else {
            return Ok(());
        };
        let info = self.frameworks.get(fw).map(|f| &f.info);
        let principal = info.map(|i| i.principal.as_str()).filter(|p| !p.is_empty());
        let check = |action, object: &str| acls.check(principal, action, object);
        match &task.payload {
            Some(v1::task_info::Payload::Wasm(w)) => {
                check(Action::LaunchTask, "wasm")?;
                if let Some(c) = &w.capabilities {
                    let mut granted: Vec<String> = Vec::new();
                    for (on, name) in [
                        (c.sandbox, "sandbox"),
                        (c.wall_clock, "wall_clock"),
                        (c.random, "random"),
                    ] {
                        if on {
                            granted.push(name.to_owned());
                        }
                    }
                    granted.extend(c.volumes.iter().map(|v| format!("volume:{}", v.name)));
                    granted.extend(c.host_env.iter().map(|e| format!("host_env:{e}")));
                    granted.extend(c.connect.iter().map(|p| format!("connect:{p}")));
                    for g in &granted {
                        check(Action::GrantCapability, g)?;
                    }
                }
            }
            payload => {
                check(Action::LaunchTask, "native")?;
                let user = match payload {
                    Some(v1::task_info::Payload::Command(c)) if !c.user.is_empty() => Some(&c.user),
                    _ => task
                        .executor
                        .as_ref()
                        .and_then(|e| e.command.as_ref())
                        .map(|c| &c.user)
                        .filter(|u| !u.is_empty()),
                };
                if let Some(user) = user.or(info.map(|i| &i.user).filter(|u| !u.is_empty())) {
                    check(Action::RunTaskAs, user)?;
                }
            }
        }
        Ok(())
    }

    fn launch(
        &mut self,
        fw: &FrameworkId,
        agent: &AgentId,
        role: &str,
        pool: &mut Resources,
        mut task: v1::TaskInfo,
        now: Now,
    ) {
        let (task_id, resources) = match self.validate_task(fw, agent, &task) {
            Ok(v) => v,
            Err(msg) => {
                self.task_error(
                    fw,
                    task.task_id.clone(),
                    agent,
                    v1::Reason::TaskInvalid,
                    msg,
                    now,
                );
                return;
            }
        };
        if let Err(msg) = self.within_principal_bound(fw) {
            self.task_error(fw, task.task_id, agent, v1::Reason::TaskInvalid, msg, now);
            return;
        }
        if let Err(msg) = self.authorize_task(fw, &task) {
            self.task_error(
                fw,
                task.task_id.clone(),
                agent,
                v1::Reason::TaskUnauthorized,
                msg,
                now,
            );
            return;
        }
        let Some(rest) = pool.checked_sub(&resources) else {
            let msg =
                format!("task {task_id} asks for {resources} but the offers hold only {pool}");
            self.task_error(fw, task.task_id, agent, v1::Reason::InvalidOffers, msg, now);
            return;
        };
        *pool = rest;
        task.agent_id = Some(agent.into());
        task.allocation_role = role.to_owned();
        if let Some(a) = self.agents.get_mut(agent) {
            a.used += &resources;
        }
        if let Some(f) = self.frameworks.get_mut(fw) {
            f.used += &resources;
        }
        let framework_info = self.frameworks.get(fw).map(|f| f.info.clone());
        tracing::info!(framework_id = %fw, agent_id = %agent, task_id = %task_id, "launching task");
        self.tasks.insert(
            (fw.clone(), task_id),
            Task {
                agent: agent.clone(),
                role: role.to_owned(),
                info: without_module(&task),
                resources,
                state: TaskState::Staging,
                last_status: None,
                terminal_uuid: None,
                recent: VecDeque::new(),
                freed: false,
            },
        );
        self.tell_agent(
            agent,
            v1::master_message::Message::RunTask(v1::master_message::RunTask {
                framework_id: Some(fw.into()),
                task: Some(task),
                framework_info,
            }),
        );
        self.changed = true;
    }

    /// DECLINE: returns the offers' resources, refused by this framework on their agents for
    /// `refuse_seconds` (default 5).
    ///
    /// # Errors
    /// When an offer is unknown or not the framework's; nothing changes then.
    pub fn decline(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        offer_ids: &[OfferId],
        filters: Option<&v1::Filters>,
        now: Now,
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        let refuse = self.refuse_duration(filters)?;
        for oid in offer_ids {
            match self.offers.get(oid) {
                None => return Err(EngineError::UnknownOffer(oid.clone())),
                Some(o) if o.framework != *id => {
                    return Err(EngineError::NotYourOffer { offer: oid.clone() });
                }
                Some(_) => {}
            }
        }
        let until = (!refuse.is_zero()).then(|| now.mono + refuse);
        for oid in offer_ids {
            if let Some(o) = self.remove_offer(oid, false) {
                self.allocator
                    .recover(&o.agent, id, &o.role, &o.resources, until);
            }
        }
        Ok(())
    }

    /// REVIVE: clears the framework's filters and resumes offers for `roles` (all of its
    /// roles when empty).
    ///
    /// # Errors
    /// When the caller is not the framework's current subscription, or names a role the
    /// framework is not subscribed to.
    pub fn revive(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        roles: &[String],
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        self.check_roles(id, roles)?;
        self.allocator.revive(id, roles);
        self.allocation_pending = true;
        self.changed = true;
        Ok(())
    }

    /// SUPPRESS: no more offers for `roles` (all of its roles when empty) until REVIVE;
    /// outstanding offers for them are rescinded.
    ///
    /// # Errors
    /// When the caller is not the framework's current subscription, or names a role the
    /// framework is not subscribed to.
    pub fn suppress(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        roles: &[String],
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        self.check_roles(id, roles)?;
        self.allocator.suppress(id, roles);
        self.withdraw_offers(
            |o| o.framework == *id && (roles.is_empty() || roles.contains(&o.role)),
            true,
        );
        self.changed = true;
        Ok(())
    }

    fn check_roles(&self, id: &FrameworkId, roles: &[String]) -> Result<(), EngineError> {
        let Some(f) = self.frameworks.get(id) else {
            return Err(EngineError::UnknownFramework(id.clone()));
        };
        match roles.iter().find(|r| !f.roles.contains(r)) {
            Some(r) => Err(EngineError::Invalid(format!(
                "framework {id} is not subscribed to role {r:?} (its roles: {})",
                f.roles.join(", ")
            ))),
            None => Ok(()),
        }
    }

    fn find_task(&self, fw: &FrameworkId, task: &TaskId) -> Result<&Task, EngineError> {
        if let Some(t) = self.tasks.get(&(fw.clone(), task.clone())) {
            return Ok(t);
        }
        let done = self.completed.iter().rev().find(|r| {
            r.framework_id
                .as_ref()
                .is_some_and(|f| f.value == fw.as_str())
                && r.task_id.as_ref().is_some_and(|t| t.value == task.as_str())
        });
        match done.and_then(|r| state_from_proto(r.state())) {
            Some(state) => Err(EngineError::TaskEnded {
                task: task.clone(),
                state,
            }),
            None => Err(EngineError::UnknownTask {
                framework: fw.clone(),
                task: task.clone(),
            }),
        }
    }

    /// KILL: asks the task's agent to kill it.
    ///
    /// # Errors
    /// When the task is unknown or has already ended.
    pub fn kill(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        task: &TaskId,
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        let t = self.find_task(id, task)?;
        if t.state.is_terminal() {
            return Err(EngineError::TaskEnded {
                task: task.clone(),
                state: t.state,
            });
        }
        let agent = t.agent.clone();
        tracing::info!(framework_id = %id, task_id = %task, agent_id = %agent, "killing task");
        self.tell_agent(
            &agent,
            v1::master_message::Message::KillTask(v1::master_message::KillTask {
                framework_id: Some(id.into()),
                task_id: Some(task.into()),
            }),
        );
        Ok(())
    }

    /// ACKNOWLEDGE: forwards the acknowledgement to the agent; acknowledging a task's terminal
    /// update retires the task.
    ///
    /// # Errors
    /// When the task is unknown to the master.
    pub fn acknowledge(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        task: &TaskId,
        uuid: &[u8],
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        if uuid.is_empty() {
            return Err(EngineError::Invalid("acknowledgement has no uuid".into()));
        }
        let key = (id.clone(), task.clone());
        let agent = match self.find_task(id, task) {
            Ok(t) => t.agent.clone(),
            // A retried update of a task already retired: nothing left to do.
            Err(EngineError::TaskEnded { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.tell_agent(
            &agent,
            v1::master_message::Message::Acknowledge(v1::master_message::AcknowledgeUpdate {
                framework_id: Some(id.into()),
                task_id: Some(task.into()),
                uuid: uuid.to_vec(),
            }),
        );
        if let Some(t) = self.tasks.get_mut(&key)
            && let Some(entry) = t.recent.iter_mut().find(|(u, _)| u == uuid)
        {
            entry.1 = true;
        }
        if self
            .tasks
            .get(&key)
            .is_some_and(|t| t.terminal_uuid.as_deref() == Some(uuid))
            && let Some(t) = self.tasks.remove(&key)
        {
            self.complete(&key, t);
            self.changed = true;
        }
        Ok(())
    }

    /// RECONCILE: sends the latest known state of the named tasks (explicit) or of all the
    /// framework's tasks (implicit, when `tasks` is empty). The answers carry no uuid.
    ///
    /// # Errors
    /// When the caller is not the framework's current subscription.
    pub fn reconcile(
        &mut self,
        id: &FrameworkId,
        stream: &str,
        tasks: &[(TaskId, Option<AgentId>)],
        now: Now,
    ) -> Result<(), EngineError> {
        self.caller(id, stream)?;
        let partition_aware = self.frameworks.get(id).is_some_and(|f| f.partition_aware);
        let recovering = self
            .agents
            .values()
            .any(|a| a.status == AgentStatus::Recovering);
        let mut answers = Vec::new();
        let latest = |key: &TaskKey, t: &Task| {
            let mut s = t.last_status.clone().unwrap_or_else(|| v1::TaskStatus {
                task_id: Some((&key.1).into()),
                state: state_to_proto(t.state) as i32,
                agent_id: Some((&t.agent).into()),
                ..Default::default()
            });
            s.uuid.clear();
            s.reason = v1::Reason::Reconciliation as i32;
            s.source = v1::StatusSource::SourceMaster as i32;
            s.timestamp = now.wall;
            s
        };
        if tasks.is_empty() {
            for (key, t) in self.tasks.iter().filter(|((f, _), _)| f == id) {
                answers.push(latest(key, t));
            }
        } else {
            for (task, agent) in tasks {
                let key = (id.clone(), task.clone());
                if let Some(t) = self.tasks.get(&key) {
                    answers.push(latest(&key, t));
                    continue;
                }
                let done = self.completed.iter().rev().find(|r| {
                    r.framework_id
                        .as_ref()
                        .is_some_and(|f| f.value == id.as_str())
                        && r.task_id.as_ref().is_some_and(|t| t.value == task.as_str())
                });
                let mut s = match done.and_then(|r| r.last_status.clone()) {
                    Some(s) => s,
                    None => {
                        // As Mesos: what an unknown task's agent says of it. An agent the
                        // master still expects back after a failover may yet report it, so
                        // no answer is given until it does (or is written off).
                        let status = agent.as_ref().map(|a| self.agents.get(a).map(|a| a.status));
                        let (pa, message) = match status {
                            Some(Some(AgentStatus::Recovering)) => continue,
                            None if recovering => continue,
                            Some(Some(AgentStatus::Connected | AgentStatus::Disconnected)) => (
                                v1::TaskState::TaskGone,
                                "the task is not on its agent, which is registered",
                            ),
                            Some(Some(AgentStatus::Lost)) => (
                                v1::TaskState::TaskUnreachable,
                                "the task is unknown and its agent unreachable",
                            ),
                            Some(None) | None => {
                                (v1::TaskState::TaskUnknown, "task is unknown to the master")
                            }
                        };
                        v1::TaskStatus {
                            task_id: Some(task.into()),
                            state: if partition_aware {
                                pa
                            } else {
                                v1::TaskState::TaskLost
                            } as i32,
                            agent_id: agent.as_ref().map(Into::into),
                            message: message.into(),
                            ..Default::default()
                        }
                    }
                };
                s.uuid.clear();
                s.reason = v1::Reason::Reconciliation as i32;
                s.source = v1::StatusSource::SourceMaster as i32;
                s.timestamp = now.wall;
                answers.push(s);
            }
        }
        for s in answers {
            self.tell_framework(
                id,
                v1::event::Event::Update(v1::event::Update { status: Some(s) }),
            );
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Agents.
    // ---------------------------------------------------------------------------------------

    /// Registers an agent, or re-registers one that registered before (with this master or a
    /// previous one), reconciling the tasks it reports with the master's.
    ///
    /// # Errors
    /// When the agent's resources, attributes or tasks are invalid.
    pub fn register_agent(
        &mut self,
        reg: v1::agent_message::Register,
        now: Now,
    ) -> Result<AgentId, EngineError> {
        let info = reg.info.ok_or(ProtoError::Missing("register.info"))?;
        let total = resources_from_proto(&info.resources)?;
        attributes_from_proto(&info.attributes)?;
        if total.is_empty() {
            return Err(EngineError::Invalid("agent offers no resources".into()));
        }
        let requested: Option<AgentId> =
            reg.agent_id.as_ref().map(AgentId::try_from).transpose()?;
        let mut reported = Vec::new();
        for t in reg.tasks {
            let fw = FrameworkId::try_from(
                t.framework_id
                    .as_ref()
                    .ok_or(ProtoError::Missing("task.framework_id"))?,
            )?;
            let task = t.task.ok_or(ProtoError::Missing("task.task"))?;
            let task_id = TaskId::try_from(
                task.task_id
                    .as_ref()
                    .ok_or(ProtoError::Missing("task.task_id"))?,
            )?;
            let resources = resources_from_proto(&task.resources)?;
            let state = state_from_proto(t.state.try_into().unwrap_or_default())
                .unwrap_or(TaskState::Running);
            reported.push((fw, task_id, task, resources, state));
        }

        if let Some(id) = &requested
            && self
                .agents
                .get(id)
                .is_some_and(|a| a.status == AgentStatus::Connected)
        {
            // Its live link keeps it; the newcomer (an impostor, or the agent itself before
            // the old link's end is noticed) retries.
            tracing::warn!(agent_id = %id, hostname = %info.hostname, "refusing a registration under the id of a connected agent");
            return Err(EngineError::AgentConnected(id.clone()));
        }
        let id = match requested {
            Some(id) => id,
            None => self.next("A", AgentId::new),
        };
        let returning = self.agents.contains_key(&id);
        // Dynamic reservations live in the master: an agent coming back keeps them.
        let mut total = total;
        if let Some(old) = self.agents.get(&id) {
            for r in old.total.iter() {
                if !matches!(r.reservation, agora_core::Reservation::Dynamic { .. }) {
                    continue;
                }
                let one: Resources = std::iter::once(r).collect();
                if let Some(rest) = total.checked_sub(&one.flatten()) {
                    total = rest + one;
                }
            }
        }
        tracing::info!(agent_id = %id, hostname = %info.hostname, returning, tasks = reported.len(), "agent registered");
        // Offers on this agent were made from what the master knew before; withdraw them.
        self.withdraw_agent_offers(&id, true);
        let registered_at = self.agents.get(&id).map_or(now.wall, |a| a.registered_at);
        let record = agent_record(&info, &total);
        let unchanged = self.agents.get(&id).is_some_and(|a| {
            a.status != AgentStatus::Lost && a.persisted.as_ref() == Some(&record)
        });
        if !unchanged {
            self.effects.push(Effect::Persist(Op::AdmitAgent {
                id: id.to_string(),
                info: record.clone(),
                at: now.wall,
            }));
        }
        let (outbox, written_off) = self
            .agents
            .get_mut(&id)
            .map(|a| {
                (
                    std::mem::take(&mut a.outbox),
                    std::mem::take(&mut a.written_off),
                )
            })
            .unwrap_or_default();
        self.agents.insert(
            id.clone(),
            Agent {
                info,
                total,
                used: Resources::new(),
                offered: Resources::new(),
                status: AgentStatus::Connected,
                last_seen: now.mono,
                registered_at,
                outbox: VecDeque::new(),
                written_off: HashSet::new(),
                persisted: Some(record),
            },
        );
        self.effects.push(Effect::ToAgent(
            id.clone(),
            v1::master_message::Message::Registered(v1::master_message::Registered {
                agent_id: Some((&id).into()),
                heartbeat_interval_seconds: self.config.agent_heartbeat_interval.as_secs_f64(),
                master_id: self.config.master_id.clone(),
            }),
        ));
        for m in outbox {
            self.effects.push(Effect::ToAgent(id.clone(), m));
        }
        self.reconcile_agent_tasks(&id, reported, &written_off, now);
        let held: Vec<(FrameworkId, String, Resources)> = self
            .tasks
            .on_agent(&id)
            .filter(|(_, t)| t.state.is_live() && t.holds())
            .map(|((fw, _), t)| (fw.clone(), t.role.clone(), t.resources.clone()))
            .collect();
        let total = self
            .agents
            .get(&id)
            .map(|a| a.total.clone())
            .unwrap_or_default();
        self.allocator.add_agent(&id, &total, &held);
        self.allocation_pending = true;
        self.changed = true;
        Ok(id)
    }

    fn reconcile_agent_tasks(
        &mut self,
        agent: &AgentId,
        reported: Vec<(FrameworkId, TaskId, v1::TaskInfo, Resources, TaskState)>,
        written_off: &HashSet<TaskKey>,
        now: Now,
    ) {
        let mut seen = HashSet::new();
        for (fw, task_id, info, resources, state) in reported {
            let key = (fw.clone(), task_id.clone());
            seen.insert(key.clone());
            let placed_elsewhere = self.tasks.get(&key).is_some_and(|t| t.agent != *agent);
            let known_live = self
                .tasks
                .get(&key)
                .is_some_and(|t| !t.state.is_terminal() && t.agent == *agent);
            if placed_elsewhere
                || self.removed_frameworks.contains(&fw)
                || (!known_live
                    && (written_off.contains(&key)
                        || self.written_off.contains(&key)
                        || self.was_completed(&key)))
            {
                // The master already told the framework this task ended (e.g. TASK_LOST while
                // the agent was away), or it runs on another agent: it must not come back to
                // life here.
                tracing::info!(framework_id = %fw, task_id = %task_id, agent_id = %agent, "killing task the master had written off");
                self.tell_agent(
                    agent,
                    v1::master_message::Message::KillTask(v1::master_message::KillTask {
                        framework_id: Some((&fw).into()),
                        task_id: Some((&task_id).into()),
                    }),
                );
                continue;
            }
            if state.is_live()
                && state != TaskState::Unreachable
                && let Some(a) = self.agents.get_mut(agent)
            {
                a.used += &resources;
            }
            if !self.frameworks.contains_key(&fw) {
                // Adopted after a master restart: the framework owns it again when it
                // re-subscribes with its id.
                self.frameworks.insert(
                    fw.clone(),
                    Framework {
                        info: v1::FrameworkInfo {
                            id: Some((&fw).into()),
                            name: String::new(),
                            ..Default::default()
                        },
                        roles: vec![role_of(&info)],
                        partition_aware: false,
                        stream: None,
                        disconnected_at: None,
                        failover_timeout: Duration::MAX,
                        used: Resources::new(),
                        offered: Resources::new(),
                        recovered: true,
                    },
                );
            }
            let previous = self.tasks.get(&key).map(|t| t.state);
            let held_before = self
                .tasks
                .get(&key)
                .is_some_and(|t| t.state.is_live() && t.holds());
            if previous == Some(TaskState::Unreachable) && state != TaskState::Unreachable {
                let status = v1::TaskStatus {
                    task_id: Some((&task_id).into()),
                    state: state_to_proto(state) as i32,
                    message: "agent re-registered; the task is still there".into(),
                    source: v1::StatusSource::SourceMaster as i32,
                    timestamp: now.wall,
                    agent_id: Some(agent.into()),
                    ..Default::default()
                };
                self.tell_framework(
                    &fw,
                    v1::event::Event::Update(v1::event::Update {
                        status: Some(status.clone()),
                    }),
                );
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.state = state;
                    t.last_status = Some(status);
                }
            }
            if !self.tasks.contains_key(&key) {
                self.tasks.insert(
                    key.clone(),
                    Task {
                        agent: agent.clone(),
                        role: role_of(&info),
                        info: without_module(&info),
                        resources,
                        state,
                        last_status: None,
                        terminal_uuid: None,
                        recent: VecDeque::new(),
                        freed: false,
                    },
                );
            }
            let Some(task) = self.tasks.get(&key) else {
                continue;
            };
            // The framework's ledger gains what now holds and did not before (a task adopted
            // or back from unreachable): counted per task, so a registration costs what it
            // reports, not what the whole cluster runs.
            if !held_before
                && task.state.is_live()
                && task.holds()
                && let Some(f) = self.frameworks.get_mut(&fw)
            {
                f.used += &task.resources;
            }
        }
        for key in written_off {
            self.written_off.remove(key);
        }
        // Tasks the master placed on this agent that the agent no longer has.
        let missing: Vec<TaskKey> = self
            .tasks
            .on_agent(agent)
            .filter(|(k, t)| t.state.is_live() && !seen.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in missing {
            let state = self.lost_state(&key);
            self.master_update(
                &key,
                state,
                v1::Reason::AgentRestarted,
                "the agent re-registered without this task",
                now,
            );
        }
    }

    /// What a task an agent no longer has becomes for its framework. As Mesos: a
    /// partition-aware framework never sees TASK_LOST for it, but TASK_GONE (the task is not
    /// running), or TASK_DROPPED if it had not started; the others see TASK_LOST.
    fn lost_state(&self, key: &TaskKey) -> TaskState {
        if !self
            .frameworks
            .get(&key.0)
            .is_some_and(|f| f.partition_aware)
        {
            return TaskState::Lost;
        }
        match self.tasks.get(key).map(|t| t.state) {
            Some(TaskState::Staging) => TaskState::Dropped,
            _ => TaskState::Gone,
        }
    }

    fn was_completed(&self, key: &TaskKey) -> bool {
        self.completed.iter().any(|r| {
            r.framework_id
                .as_ref()
                .is_some_and(|f| f.value == key.0.as_str())
                && r.task_id
                    .as_ref()
                    .is_some_and(|t| t.value == key.1.as_str())
        })
    }

    /// A state change decided by the master (agent lost, task missing): updates the table and
    /// tells the framework. Terminal changes retire the task at once (there is no agent to
    /// acknowledge to).
    fn master_update(
        &mut self,
        key: &TaskKey,
        state: TaskState,
        reason: v1::Reason,
        message: &str,
        now: Now,
    ) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        if !task.state.can_transition(state) {
            return;
        }
        let was_live_resources = task.holds();
        task.state = state;
        let status = v1::TaskStatus {
            task_id: Some((&key.1).into()),
            state: state_to_proto(state) as i32,
            reason: reason as i32,
            message: message.to_owned(),
            source: v1::StatusSource::SourceMaster as i32,
            timestamp: now.wall,
            agent_id: Some((&task.agent).into()),
            ..Default::default()
        };
        task.last_status = Some(status.clone());
        let agent = task.agent.clone();
        let resources = task.resources.clone();
        let role = task.role.clone();
        tracing::info!(framework_id = %key.0, task_id = %key.1, agent_id = %agent, state = %state, message, "task state set by master");
        if (state.is_terminal() || state == TaskState::Unreachable) && was_live_resources {
            self.give_back(&key.0, &agent, &role, &resources);
        }
        self.tell_framework(
            &key.0,
            v1::event::Event::Update(v1::event::Update {
                status: Some(status),
            }),
        );
        if state.is_terminal()
            && let Some(t) = self.tasks.remove(key)
        {
            self.complete(key, t);
        }
        self.changed = true;
    }

    pub fn agent_heartbeat(&mut self, agent: &AgentId, now: Now) {
        if let Some(a) = self.agents.get_mut(agent) {
            a.last_seen = now.mono;
        }
    }

    /// The agent's link dropped. Its offers are withdrawn; it is marked lost only if it stays
    /// away past the heartbeat timeout.
    pub fn agent_disconnected(&mut self, agent: &AgentId) {
        let Some(a) = self.agents.get_mut(agent) else {
            return;
        };
        if a.status != AgentStatus::Connected {
            return;
        }
        a.status = AgentStatus::Disconnected;
        tracing::warn!(agent_id = %agent, "agent link dropped");
        self.withdraw_agent_offers(agent, true);
        self.allocator.set_agent_active(agent, false);
        self.changed = true;
    }

    /// A task's message to its framework, passed on if the framework is connected (framework
    /// messages are not retried, as in Mesos).
    ///
    /// # Errors
    /// When the message is malformed.
    pub fn framework_message(
        &mut self,
        agent: &AgentId,
        m: v1::agent_message::FrameworkMessage,
    ) -> Result<(), EngineError> {
        let fw = FrameworkId::try_from(
            m.framework_id
                .as_ref()
                .ok_or(ProtoError::Missing("framework_id"))?,
        )?;
        let task = m.task_id.as_ref().map(TaskId::try_from).transpose()?;
        let executor = m
            .executor_id
            .as_ref()
            .map(agora_core::ExecutorId::try_from)
            .transpose()?;
        // Only the agent running the task (or the executor) speaks for it.
        let runs_it = |t: &Task| {
            t.agent == *agent
                && executor.as_ref().is_none_or(|e| {
                    t.info
                        .executor
                        .as_ref()
                        .and_then(|x| x.executor_id.as_ref())
                        .is_none_or(|x| x.value == e.as_str())
                })
        };
        let allowed = match &task {
            Some(t) => self
                .tasks
                .get(&(fw.clone(), t.clone()))
                .is_some_and(runs_it),
            None => self
                .tasks
                .iter()
                .any(|((f, _), t)| *f == fw && t.info.executor.is_some() && runs_it(t)),
        };
        if !allowed {
            tracing::warn!(framework_id = %fw, agent_id = %agent, task_id = ?task.as_ref().map(TaskId::as_str), "refusing a framework message from an agent that does not run the task or executor");
            return Err(EngineError::Forbidden(format!(
                "agent {agent} runs no task or executor of framework {fw} that could send this message"
            )));
        }
        self.tell_framework(
            &fw,
            v1::event::Event::Message(v1::event::Message {
                agent_id: Some(agent.into()),
                executor_id: m.executor_id,
                task_id: m.task_id,
                data: m.data,
            }),
        );
        Ok(())
    }

    /// A status update from an agent: updates the task table and forwards it to the
    /// framework, which acknowledges it through the master.
    ///
    /// # Errors
    /// When the update is malformed.
    pub fn status_update(
        &mut self,
        agent: &AgentId,
        update: v1::agent_message::StatusUpdate,
    ) -> Result<(), EngineError> {
        let fw = FrameworkId::try_from(
            update
                .framework_id
                .as_ref()
                .ok_or(ProtoError::Missing("framework_id"))?,
        )?;
        let latest = v1::TaskState::try_from(update.latest_state)
            .ok()
            .and_then(state_from_proto);
        let mut status = update.status.ok_or(ProtoError::Missing("status"))?;
        let task_id = TaskId::try_from(
            status
                .task_id
                .as_ref()
                .ok_or(ProtoError::Missing("status.task_id"))?,
        )?;
        let mut state =
            state_from_proto(status.state()).ok_or(ProtoError::Missing("status.state"))?;
        status.agent_id = Some(agent.into());
        crate::validate::sanitize_status(&mut status);
        let key = (fw.clone(), task_id.clone());
        if state == TaskState::Lost {
            // An agent says TASK_LOST of a task it cannot find again (after a restart).
            state = self.lost_state(&key);
            status.state = state_to_proto(state) as i32;
        }
        let on_this_agent = self.tasks.get(&key).map(|t| t.agent == *agent);
        if on_this_agent == Some(false) {
            tracing::warn!(framework_id = %fw, task_id = %task_id, agent_id = %agent, "refusing a status update from an agent that does not run the task");
            return Err(EngineError::Forbidden(format!(
                "agent {agent} does not run task {task_id} of framework {fw}"
            )));
        }
        if on_this_agent.is_none() {
            // A task the master no longer tracks: a retry of an update already acknowledged
            // and retired, or a task written off. Acknowledged so the agent stops retrying,
            // never forwarded: only the agent running a task speaks for it.
            if !status.uuid.is_empty() {
                self.tell_agent(
                    agent,
                    v1::master_message::Message::Acknowledge(
                        v1::master_message::AcknowledgeUpdate {
                            framework_id: Some((&fw).into()),
                            task_id: Some((&task_id).into()),
                            uuid: status.uuid,
                        },
                    ),
                );
            }
            tracing::debug!(framework_id = %fw, task_id = %task_id, agent_id = %agent, state = %state, "update for a task the master does not track; acknowledged and dropped");
            return Ok(());
        }
        if !self.frameworks.contains_key(&fw) {
            // Nobody to tell: acknowledge so the agent stops retrying.
            if !status.uuid.is_empty() {
                self.tell_agent(
                    agent,
                    v1::master_message::Message::Acknowledge(
                        v1::master_message::AcknowledgeUpdate {
                            framework_id: Some((&fw).into()),
                            task_id: Some((&task_id).into()),
                            uuid: status.uuid,
                        },
                    ),
                );
            }
            return Ok(());
        }
        let ack = |uuid: Vec<u8>| {
            v1::master_message::Message::Acknowledge(v1::master_message::AcknowledgeUpdate {
                framework_id: Some((&fw).into()),
                task_id: Some((&task_id).into()),
                uuid,
            })
        };
        let Some(task) = self.tasks.get_mut(&key) else {
            return Ok(());
        };
        if latest.is_some_and(TaskState::is_terminal) && !state.is_terminal() && task.holds() {
            // The task has ended on the agent; its terminal update waits behind this one.
            // Its resources need not wait for the framework's acknowledgements.
            task.freed = true;
            let (agent_id, resources, role) = (
                task.agent.clone(),
                task.resources.clone(),
                task.role.clone(),
            );
            self.give_back(&fw, &agent_id, &role, &resources);
            self.allocation_pending = true;
            self.changed = true;
            tracing::debug!(framework_id = %fw, task_id = %task_id, "task ended on its agent; resources recovered ahead of its terminal update");
        }
        let Some(task) = self.tasks.get_mut(&key) else {
            return Ok(());
        };
        // What becomes of it: forwarded (`None`), or dropped and, when `Some(true)`,
        // acknowledged to the agent again.
        let mut drop: Option<bool> = None;
        if !status.uuid.is_empty() {
            let newest = task.recent.back().map(|(u, _)| u.clone());
            match task.recent.iter().find(|(u, _)| *u == status.uuid) {
                // A duplicate of an update the framework acknowledged, or of one superseded
                // since: it has it.
                Some((_, acked)) if *acked || newest.as_ref() != Some(&status.uuid) => {
                    drop = Some(*acked);
                }
                // A retry of the newest update, not yet acknowledged: forwarded again (the
                // framework may have missed it), the state unchanged.
                Some(_) => {}
                None => {
                    if task.recent.len() >= RECENT_UUIDS {
                        task.recent.pop_front();
                    }
                    task.recent.push_back((status.uuid.clone(), false));
                }
            }
        }
        if drop.is_none() && task.state.is_terminal() && state != task.state {
            // Nothing may follow a terminal update: a late one (or another terminal state)
            // is acknowledged and dropped, so the framework never sees RUNNING after
            // FINISHED.
            tracing::warn!(framework_id = %fw, task_id = %task_id, from = %task.state, to = %state, "status update after a terminal one dropped");
            drop = Some(true);
        }
        if let Some(again) = drop {
            tracing::debug!(framework_id = %fw, task_id = %task_id, state = %state, "duplicate status update dropped");
            if again && !status.uuid.is_empty() {
                self.tell_agent(agent, ack(status.uuid));
            }
            return Ok(());
        }
        if task.state.can_transition(state) {
            let was_holding = task.holds();
            task.state = state;
            task.last_status = Some(status.clone());
            if state.is_terminal() {
                task.terminal_uuid = Some(status.uuid.clone());
                if was_holding {
                    let (agent_id, resources) = (task.agent.clone(), task.resources.clone());
                    let role = task.role.clone();
                    self.give_back(&fw, &agent_id, &role, &resources);
                    self.allocation_pending = true;
                }
                if status.uuid.is_empty()
                    && let Some(t) = self.tasks.remove(&key)
                {
                    self.complete(&key, t);
                }
            }
            self.changed = true;
        } else if task.state.is_terminal() && task.state == state && task.terminal_uuid.is_none() {
            // A terminal update the master learnt of from a re-registration: its
            // acknowledgement retires the task.
            task.terminal_uuid = Some(status.uuid.clone());
        } else if task.state != state {
            tracing::debug!(framework_id = %fw, task_id = %task_id, from = %task.state, to = %state, "out-of-order update forwarded without changing state");
        }
        tracing::debug!(framework_id = %fw, task_id = %task_id, agent_id = %agent, state = %state, "status update");
        self.tell_framework(
            &fw,
            v1::event::Event::Update(v1::event::Update {
                status: Some(status),
            }),
        );
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Time.
    // ---------------------------------------------------------------------------------------

    /// Periodic work: agents that stopped heartbeating are marked lost, frameworks past their
    /// failover timeout are removed, offers past the offer timeout are rescinded, frameworks
    /// get heartbeats.
    pub fn tick(&mut self, now: Now) {
        let limit = self.config.agent_heartbeat_interval * self.config.max_missed_heartbeats.max(1);
        let lost: Vec<AgentId> = self
            .agents
            .iter()
            .filter(|(_, a)| {
                let quiet = now.mono.saturating_duration_since(a.last_seen);
                match a.status {
                    AgentStatus::Lost => false,
                    AgentStatus::Recovering => quiet > self.config.agent_reregister_timeout,
                    AgentStatus::Connected | AgentStatus::Disconnected => quiet > limit,
                }
            })
            .map(|(k, _)| k.clone())
            .collect();
        for agent in lost {
            self.mark_agent_lost(&agent, now);
        }

        let expired: Vec<FrameworkId> = self
            .frameworks
            .iter()
            .filter(|(_, f)| {
                f.stream.is_none()
                    && !f.recovered
                    && f.disconnected_at.is_some_and(|t| {
                        now.mono.saturating_duration_since(t) >= f.failover_timeout
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for fw in expired {
            self.remove_framework(
                &fw,
                "its failover timeout passed without a new subscription",
                now,
            );
        }

        if let Some(timeout) = self.config.offer_timeout {
            let stale: Vec<OfferId> = self
                .offers
                .iter()
                .filter(|(_, o)| now.mono.saturating_duration_since(o.made_at) >= timeout)
                .map(|(k, _)| k.clone())
                .collect();
            if !stale.is_empty() {
                tracing::info!(
                    count = stale.len(),
                    ?timeout,
                    "rescinding offers nobody answered"
                );
            }
            for oid in stale {
                if let Some(o) = self.remove_offer(&oid, true) {
                    self.allocator
                        .recover(&o.agent, &o.framework, &o.role, &o.resources, None);
                }
            }
        }

        let due = self.last_framework_heartbeat.is_none_or(|t| {
            now.mono.saturating_duration_since(t) >= self.config.framework_heartbeat_interval
        });
        if due {
            self.last_framework_heartbeat = Some(now.mono);
            let ids: Vec<FrameworkId> = self
                .frameworks
                .iter()
                .filter(|(_, f)| f.stream.is_some())
                .map(|(k, _)| k.clone())
                .collect();
            for id in ids {
                self.tell_framework(&id, v1::event::Event::Heartbeat(v1::event::Heartbeat {}));
            }
        }
    }

    fn mark_agent_lost(&mut self, agent: &AgentId, now: Now) {
        let Some(a) = self.agents.get_mut(agent) else {
            return;
        };
        let was_connected = a.status == AgentStatus::Connected;
        let recovering = a.status == AgentStatus::Recovering;
        a.status = AgentStatus::Lost;
        if recovering {
            tracing::warn!(agent_id = %agent, "agent did not register again after the failover; marking it unreachable");
        } else {
            tracing::warn!(agent_id = %agent, "agent missed its heartbeats; marking it lost");
        }
        self.effects.push(Effect::Persist(Op::MarkAgentUnreachable {
            id: agent.to_string(),
            at: now.wall,
        }));
        if was_connected {
            // A silent agent whose link is still open would never be heard again: end the
            // link so that it registers anew and its written-off tasks are killed.
            self.effects.push(Effect::CloseAgent(agent.clone()));
        }
        self.withdraw_agent_offers(agent, true);
        let keys: Vec<TaskKey> = self
            .tasks
            .on_agent(agent)
            .filter(|(_, t)| t.state.is_live())
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            let partition_aware = self
                .frameworks
                .get(&key.0)
                .is_some_and(|f| f.partition_aware);
            if partition_aware {
                self.master_update(
                    &key,
                    TaskState::Unreachable,
                    v1::Reason::AgentUnreachable,
                    "the agent stopped heartbeating",
                    now,
                );
            } else {
                self.master_update(
                    &key,
                    TaskState::Lost,
                    v1::Reason::AgentRemoved,
                    "the agent stopped heartbeating and was marked lost",
                    now,
                );
                if let Some(a) = self.agents.get_mut(agent) {
                    a.written_off.insert(key.clone());
                }
                self.written_off.insert(key);
            }
        }
        self.allocator.remove_agent(agent);
        let message = format!("agent {agent} stopped heartbeating and was marked lost");
        let ids: Vec<FrameworkId> = self
            .frameworks
            .iter()
            .filter(|(_, f)| f.stream.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for id in ids {
            self.tell_framework(
                &id,
                v1::event::Event::Failure(v1::event::Failure {
                    agent_id: Some(agent.into()),
                    message: message.clone(),
                }),
            );
        }
        self.changed = true;
    }

    /// Runs an allocation cycle and makes offers of what it allocates.
    pub fn allocate(&mut self, now: Now, cycle: Cycle) {
        self.allocation_pending = false;
        let allocations = self.allocator.allocate(now.mono, cycle);
        let mut by_framework: HashMap<FrameworkId, Vec<v1::Offer>> = HashMap::new();
        // Offers each principal holds, counted once per cycle for those allocated to.
        let mut held: HashMap<String, usize> = HashMap::new();
        let max = self.config.max_offers_per_principal;
        for Allocation {
            framework,
            agent,
            role,
            resources,
        } in allocations
        {
            if max > 0 {
                let principal = self.principal_key(&framework);
                let n = match held.get(&principal) {
                    Some(n) => *n,
                    None => self.offers_held(&framework),
                };
                if n >= max {
                    // Not offered: back to the allocator, refused by this framework for a
                    // while so that the others are offered it.
                    tracing::debug!(framework_id = %framework, agent_id = %agent, held = n, "the framework's principal holds as many offers as it may (--max-offers-per-principal)");
                    let until = now.mono + self.config.default_refuse;
                    self.allocator
                        .recover(&agent, &framework, &role, &resources, Some(until));
                    self.allocation_pending = true;
                    held.insert(principal, n);
                    continue;
                }
                held.insert(principal, n + 1);
            }
            let offer_id = self.next("O", OfferId::new);
            let Some(a) = self.agents.get_mut(&agent) else {
                continue;
            };
            a.offered += &resources;
            let wire = v1::Offer {
                id: Some((&offer_id).into()),
                framework_id: Some((&framework).into()),
                agent_id: Some((&agent).into()),
                hostname: a.info.hostname.clone(),
                resources: resources_to_proto(&resources),
                attributes: a.info.attributes.clone(),
                allocation_role: role,
            };
            if let Some(f) = self.frameworks.get_mut(&framework) {
                f.offered += &resources;
            }
            tracing::debug!(framework_id = %framework, agent_id = %agent, offer_id = %offer_id, %resources, "offer");
            self.offers_by_agent
                .entry(agent.clone())
                .or_default()
                .insert(offer_id.clone());
            *self.offers_of.entry(framework.clone()).or_default() += 1;
            self.offers.insert(
                offer_id,
                Offer {
                    framework: framework.clone(),
                    agent,
                    role: wire.allocation_role.clone(),
                    resources,
                    made_at: now.mono,
                },
            );
            by_framework.entry(framework).or_default().push(wire);
        }
        for (fw, offers) in by_framework {
            self.tell_framework(&fw, v1::event::Event::Offers(v1::event::Offers { offers }));
            self.changed = true;
        }
    }

    // ---------------------------------------------------------------------------------------
    // Failover.
    // ---------------------------------------------------------------------------------------

    /// Loads the registry into a new leader's empty engine: frameworks wait, disconnected,
    /// for their failover timeout; agents wait for `agent_reregister_timeout` to register
    /// again with their tasks; reservations, quotas and weights are in force at once.
    ///
    /// A framework's failover timeout runs from when its subscription ended, if the registry
    /// saw that, else from now (it was connected to the master that died).
    ///
    /// # Errors
    /// When a record does not decode, which only a damaged registry could hold.
    pub fn recover(&mut self, registry: &Registry, now: Now) -> Result<(), EngineError> {
        use prost::Message;
        let bad = |what: String| EngineError::Invalid(format!("registry record {what}"));
        for id in &registry.removed {
            let id = FrameworkId::new(id.clone()).map_err(|e| bad(format!("{id}: {e}")))?;
            if self.removed_frameworks.insert(id.clone()) {
                self.removed_order.push_back(id);
            }
        }
        for (role, r) in &registry.roles {
            if let Some(w) = r.weight {
                self.allocator.set_weight(role, w)?;
            }
            if let Some(q) = &r.quota {
                let q = v1::UpdateQuotaRequest::decode(q.as_slice())
                    .map_err(|e| bad(format!("quota of {role}: {e}")))?;
                let limit = resources_from_proto(&q.limit)?;
                self.allocator.set_quota(
                    role,
                    Quota {
                        guarantee: resources_from_proto(&q.guarantee)?,
                        limit: (!limit.is_empty()).then_some(limit),
                    },
                    true,
                )?;
            }
        }
        for (id, rec) in &registry.agents {
            let agent = AgentId::new(id.clone()).map_err(|e| bad(format!("{id}: {e}")))?;
            let info = v1::AgentInfo::decode(rec.info.as_slice())
                .map_err(|e| bad(format!("agent {id}: {e}")))?;
            let total = resources_from_proto(&info.resources)?;
            let status = if rec.unreachable_since.is_some() {
                AgentStatus::Lost
            } else {
                AgentStatus::Recovering
            };
            self.agents.insert(
                agent,
                Agent {
                    info,
                    total,
                    used: Resources::new(),
                    offered: Resources::new(),
                    status,
                    last_seen: now.mono,
                    registered_at: rec.admitted_at,
                    outbox: VecDeque::new(),
                    written_off: HashSet::new(),
                    persisted: Some(rec.info.clone()),
                },
            );
        }
        for (id, rec) in &registry.frameworks {
            let fid = FrameworkId::new(id.clone()).map_err(|e| bad(format!("{id}: {e}")))?;
            let info = v1::FrameworkInfo::decode(rec.info.as_slice())
                .map_err(|e| bad(format!("framework {id}: {e}")))?;
            let failover_timeout = agora_core::limits::seconds(
                "failover_timeout",
                info.failover_timeout,
                agora_core::limits::MAX_FAILOVER_TIMEOUT_SECS,
            )?;
            let since = rec.disconnected_at.map_or(Duration::ZERO, |at| {
                Duration::try_from_secs_f64((now.wall - at).max(0.0)).unwrap_or(Duration::ZERO)
            });
            let disconnected_at = now.mono.checked_sub(since).unwrap_or(now.mono);
            let (roles, partition_aware) = roles_and_awareness(&info)?;
            self.allocator.add_framework(&fid, &roles);
            self.allocator.set_framework_active(&fid, false);
            self.frameworks.insert(
                fid,
                Framework {
                    info,
                    roles,
                    partition_aware,
                    stream: None,
                    disconnected_at: Some(disconnected_at),
                    failover_timeout,
                    used: Resources::new(),
                    offered: Resources::new(),
                    recovered: false,
                },
            );
        }
        tracing::info!(
            agents = registry.agents.len(),
            frameworks = registry.frameworks.len(),
            roles = registry.roles.len(),
            epoch = registry.epoch,
            "registry recovered; waiting for agents and frameworks to return"
        );
        self.changed = true;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Reads.
    // ---------------------------------------------------------------------------------------

    /// The operator's view of the state, published as a snapshot so reads never wait on the
    /// engine.
    pub fn snapshot(&self, now: Now) -> v1::GetStateResponse {
        let mut agents: Vec<v1::AgentState> = self
            .agents
            .iter()
            .map(|(id, a)| v1::AgentState {
                id: Some(id.into()),
                info: Some(a.info.clone()),
                total: resources_to_proto(&a.total),
                used: resources_to_proto(&a.used),
                offered: resources_to_proto(&a.offered),
                active: a.status == AgentStatus::Connected,
                registered_at: a.registered_at,
                status: match a.status {
                    AgentStatus::Recovering => "recovering",
                    AgentStatus::Connected => "connected",
                    AgentStatus::Disconnected => "disconnected",
                    AgentStatus::Lost => "unreachable",
                }
                .into(),
            })
            .collect();
        agents.sort_by(|a, b| {
            a.id.as_ref()
                .map(|i| &i.value)
                .cmp(&b.id.as_ref().map(|i| &i.value))
        });
        let total = self
            .agents
            .values()
            .filter(|a| a.status == AgentStatus::Connected)
            .fold(Resources::new(), |acc, a| acc + a.total.clone());
        let mut frameworks: Vec<v1::FrameworkState> = self
            .frameworks
            .iter()
            .map(|(id, f)| v1::FrameworkState {
                id: Some(id.into()),
                info: Some(f.info.clone()),
                active: f.stream.is_some(),
                used: resources_to_proto(&f.used),
                offered: resources_to_proto(&f.offered),
                dominant_share: dominant_share(&(&f.used + &f.offered), &total),
            })
            .collect();
        frameworks.sort_by(|a, b| {
            a.id.as_ref()
                .map(|i| &i.value)
                .cmp(&b.id.as_ref().map(|i| &i.value))
        });
        let mut tasks: Vec<v1::TaskRecord> = self
            .tasks
            .iter()
            .map(|((fw, tid), t)| v1::TaskRecord {
                task_id: Some(tid.into()),
                framework_id: Some(fw.into()),
                agent_id: Some((&t.agent).into()),
                name: t.info.name.clone(),
                state: state_to_proto(t.state) as i32,
                resources: resources_to_proto(&t.resources),
                last_status: t.last_status.clone(),
            })
            .collect();
        tasks.sort_by(|a, b| {
            (
                a.framework_id.as_ref().map(|i| &i.value),
                a.task_id.as_ref().map(|i| &i.value),
            )
                .cmp(&(
                    b.framework_id.as_ref().map(|i| &i.value),
                    b.task_id.as_ref().map(|i| &i.value),
                ))
        });
        let mut offered_by_role: HashMap<&str, Resources> = HashMap::new();
        for o in self.offers.values() {
            let mut role = o.role.as_str();
            loop {
                *offered_by_role.entry(role).or_default() += &o.resources;
                match role.rfind('/') {
                    Some(cut) => role = &role[..cut],
                    None => break,
                }
            }
        }
        let roles = self
            .allocator
            .roles()
            .into_iter()
            .map(|r| v1::RoleState {
                offered: offered_by_role
                    .get(r.role.as_str())
                    .map(resources_to_proto)
                    .unwrap_or_default(),
                role: r.role,
                weight: r.weight,
                guarantee: resources_to_proto(&r.quota.guarantee),
                limit: r
                    .quota
                    .limit
                    .as_ref()
                    .map(resources_to_proto)
                    .unwrap_or_default(),
                allocated: resources_to_proto(&r.allocated),
                reserved: resources_to_proto(&r.reserved),
                frameworks: r.frameworks as u32,
            })
            .collect();
        v1::GetStateResponse {
            roles,
            master_id: self.config.master_id.clone(),
            agents,
            frameworks,
            tasks,
            completed_tasks: self.completed.iter().cloned().collect(),
            snapshot_time: now.wall,
        }
    }
}

#[cfg(test)]
mod tests;
