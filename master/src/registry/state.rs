//! What the masters agree on, and the one rule for changing it: [`Registry::apply`].
//!
//! The registry is the cluster state that must outlive any one master, as in Mesos: the
//! agents admitted (and those marked unreachable, and when), the frameworks (their info,
//! principal, roles, failover timeout, and when they were last connected), each agent's
//! resources with its dynamic reservations, and each role's weight and quota. Tasks are not
//! here: after a failover they come back from the agents.
//!
//! Records hold protobuf-encoded messages of the wire API (`AgentInfo`, `FrameworkInfo`,
//! `UpdateQuotaRequest`), so a field added to the API is kept without a change here.
//! Applying is pure and total: an operation that names something absent changes nothing, so
//! every replica that applies the same log reaches the same state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// Torn-down frameworks remembered, so that their ids are refused; the oldest are forgotten
/// first. Matches the engine's own bound.
pub const MAX_REMOVED_FRAMEWORKS: usize = crate::engine::MAX_REMOVED_FRAMEWORKS;

/// An agent the masters have admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// `v1::AgentInfo`, protobuf-encoded, with the agent's total resources including its
    /// dynamic reservations.
    pub info: Vec<u8>,
    /// Seconds since the Unix epoch when the agent was first admitted.
    pub admitted_at: f64,
    /// When the agent stopped heartbeating and was marked unreachable; `None` while it is
    /// admitted and reachable.
    pub unreachable_since: Option<f64>,
}

/// A framework the masters know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameworkRecord {
    /// `v1::FrameworkInfo`, protobuf-encoded, as of its latest subscription (its id, name,
    /// principal, roles, capabilities and failover timeout).
    pub info: Vec<u8>,
    /// When it first subscribed.
    pub registered_at: f64,
    /// When its latest subscription began.
    pub connected_at: f64,
    /// When its subscription ended; `None` while it is (or was, when the leader died)
    /// connected.
    pub disconnected_at: Option<f64>,
}

/// A role's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleRecord {
    pub weight: Option<f64>,
    /// `v1::UpdateQuotaRequest`, protobuf-encoded (role, guarantee and limit).
    pub quota: Option<Vec<u8>>,
}

impl RoleRecord {
    fn is_empty(&self) -> bool {
        self.weight.is_none() && self.quota.is_none()
    }
}

/// One change to the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A new leader begins; its epoch numbers the ids it makes, so they never repeat.
    BeginEpoch,
    /// An agent registered, or registered again with other info; it is reachable.
    AdmitAgent { id: String, info: Vec<u8>, at: f64 },
    /// An agent's resources changed (a reservation was made or removed): `resources` is
    /// `v1::AgentInfo` with only its resources set.
    SetAgentResources { id: String, resources: Vec<u8> },
    /// An agent missed its heartbeats.
    MarkAgentUnreachable { id: String, at: f64 },
    /// An agent is forgotten (an operator said it is gone for good).
    RemoveAgent { id: String },
    /// A framework subscribed (new, failing over, or returning after a master failover).
    PutFramework { id: String, info: Vec<u8>, at: f64 },
    /// A framework's subscription ended; its failover timeout runs from `at`.
    FrameworkDisconnected { id: String, at: f64 },
    /// A framework was torn down; its id is never used again.
    RemoveFramework { id: String },
    /// A role's weight; `None` returns it to the default.
    SetWeight { role: String, weight: Option<f64> },
    /// A role's quota; `None` removes it.
    SetQuota {
        role: String,
        quota: Option<Vec<u8>>,
    },
}

/// What the registry holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    /// Leaderships so far.
    pub epoch: u64,
    pub agents: BTreeMap<String, AgentRecord>,
    pub frameworks: BTreeMap<String, FrameworkRecord>,
    /// Torn-down framework ids, oldest first, at most [`MAX_REMOVED_FRAMEWORKS`].
    pub removed: VecDeque<String>,
    /// The sequence number of the next id added to `removed`; stores keep the order by it.
    pub removed_next: u64,
    #[serde(skip)]
    removed_set: BTreeSet<String>,
    pub roles: BTreeMap<String, RoleRecord>,
}

/// Which stored rows an operation changed, so that a store rewrites only those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    Epoch,
    Agent(String),
    Framework(String),
    /// The removed list gained this id, numbered by the sequence number given.
    RemovedAdded(String, u64),
    /// The removed list, full, forgot this id.
    RemovedEvicted(String),
    Role(String),
}

impl Registry {
    /// Rebuilds what is derived from the stored fields (after deserializing).
    #[must_use]
    pub fn restored(mut self) -> Self {
        self.removed_set = self.removed.iter().cloned().collect();
        self
    }

    /// Whether a framework id was torn down.
    pub fn is_removed(&self, id: &str) -> bool {
        self.removed_set.contains(id)
    }

    /// Applies one operation. Operations naming something absent change nothing.
    pub fn apply(&mut self, op: &Op) -> Vec<Touched> {
        match op {
            Op::BeginEpoch => {
                self.epoch += 1;
                vec![Touched::Epoch]
            }
            Op::AdmitAgent { id, info, at } => {
                let admitted_at = self.agents.get(id).map_or(*at, |a| a.admitted_at);
                self.agents.insert(
                    id.clone(),
                    AgentRecord {
                        info: info.clone(),
                        admitted_at,
                        unreachable_since: None,
                    },
                );
                vec![Touched::Agent(id.clone())]
            }
            Op::SetAgentResources { id, resources } => {
                let Some(a) = self.agents.get_mut(id) else {
                    return vec![];
                };
                a.info = with_resources(&a.info, resources);
                vec![Touched::Agent(id.clone())]
            }
            Op::MarkAgentUnreachable { id, at } => {
                let Some(a) = self.agents.get_mut(id) else {
                    return vec![];
                };
                if a.unreachable_since.is_none() {
                    a.unreachable_since = Some(*at);
                }
                vec![Touched::Agent(id.clone())]
            }
            Op::RemoveAgent { id } => match self.agents.remove(id) {
                Some(_) => vec![Touched::Agent(id.clone())],
                None => vec![],
            },
            Op::PutFramework { id, info, at } => {
                if self.is_removed(id) {
                    return vec![];
                }
                let registered_at = self.frameworks.get(id).map_or(*at, |f| f.registered_at);
                self.frameworks.insert(
                    id.clone(),
                    FrameworkRecord {
                        info: info.clone(),
                        registered_at,
                        connected_at: *at,
                        disconnected_at: None,
                    },
                );
                vec![Touched::Framework(id.clone())]
            }
            Op::FrameworkDisconnected { id, at } => {
                let Some(f) = self.frameworks.get_mut(id) else {
                    return vec![];
                };
                f.disconnected_at = Some(*at);
                vec![Touched::Framework(id.clone())]
            }
            Op::RemoveFramework { id } => {
                let mut touched = Vec::new();
                if self.frameworks.remove(id).is_some() {
                    touched.push(Touched::Framework(id.clone()));
                }
                if self.removed_set.insert(id.clone()) {
                    self.removed.push_back(id.clone());
                    touched.push(Touched::RemovedAdded(id.clone(), self.removed_next));
                    self.removed_next += 1;
                    while self.removed.len() > MAX_REMOVED_FRAMEWORKS {
                        if let Some(old) = self.removed.pop_front() {
                            self.removed_set.remove(&old);
                            touched.push(Touched::RemovedEvicted(old));
                        }
                    }
                }
                touched
            }
            Op::SetWeight { role, weight } => {
                let r = self.roles.entry(role.clone()).or_default();
                r.weight = *weight;
                if r.is_empty() {
                    self.roles.remove(role);
                }
                vec![Touched::Role(role.clone())]
            }
            Op::SetQuota { role, quota } => {
                let r = self.roles.entry(role.clone()).or_default();
                r.quota.clone_from(quota);
                if r.is_empty() {
                    self.roles.remove(role);
                }
                vec![Touched::Role(role.clone())]
            }
        }
    }
}

/// `info` (an encoded `AgentInfo`) with its resources replaced by those of `resources` (an
/// encoded `AgentInfo` carrying only resources). Undecodable input is kept as it was: the
/// leader encoded both, so this happens only to a damaged entry, which the store's checksums
/// catch first.
fn with_resources(info: &[u8], resources: &[u8]) -> Vec<u8> {
    use prost::Message;
    let (Ok(mut info_msg), Ok(res)) = (
        agora_proto::v1::AgentInfo::decode(info),
        agora_proto::v1::AgentInfo::decode(resources),
    ) else {
        return info.to_vec();
    };
    info_msg.resources = res.resources;
    info_msg.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_owned)
    }

    fn agent_info(n: u8) -> Vec<u8> {
        use prost::Message;
        agora_proto::v1::AgentInfo {
            hostname: format!("h{n}"),
            resources: agora_proto::resources_to_proto(
                &agora_core::parse_resources(&format!("cpus:{n};mem:64")).unwrap(),
            ),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn op() -> impl Strategy<Value = Op> {
        let at = 0.0..1e9f64;
        prop_oneof![
            Just(Op::BeginEpoch),
            (id(), 1u8..5, at.clone()).prop_map(|(id, n, at)| Op::AdmitAgent {
                id,
                info: agent_info(n),
                at
            }),
            (id(), 1u8..5).prop_map(|(id, n)| Op::SetAgentResources {
                id,
                resources: agent_info(n)
            }),
            (id(), at.clone()).prop_map(|(id, at)| Op::MarkAgentUnreachable { id, at }),
            id().prop_map(|id| Op::RemoveAgent { id }),
            (id(), prop::collection::vec(any::<u8>(), 0..8), at.clone())
                .prop_map(|(id, info, at)| Op::PutFramework { id, info, at }),
            (id(), at).prop_map(|(id, at)| Op::FrameworkDisconnected { id, at }),
            id().prop_map(|id| Op::RemoveFramework { id }),
            (id(), prop::option::of(0.1..10.0f64))
                .prop_map(|(role, weight)| Op::SetWeight { role, weight }),
            (
                id(),
                prop::option::of(prop::collection::vec(any::<u8>(), 0..8))
            )
                .prop_map(|(role, quota)| Op::SetQuota { role, quota }),
        ]
    }

    proptest! {
        /// A snapshot taken anywhere in a sequence, restored and then given the rest, ends
        /// where applying everything directly ends.
        #[test]
        fn a_snapshot_round_trip_loses_nothing(
            ops in prop::collection::vec(op(), 0..60),
            cut in 0usize..60,
        ) {
            let cut = cut.min(ops.len());
            let mut direct = Registry::default();
            for op in &ops {
                direct.apply(op);
            }
            let mut first = Registry::default();
            for op in &ops[..cut] {
                first.apply(op);
            }
            let bytes = postcard::to_stdvec(&first).unwrap();
            let mut resumed: Registry = postcard::from_bytes::<Registry>(&bytes).unwrap().restored();
            for op in &ops[cut..] {
                resumed.apply(op);
            }
            prop_assert_eq!(&resumed, &direct);
            // The derived index agrees too, though equality skips it.
            for id in ["a", "b", "c", "d"] {
                prop_assert_eq!(resumed.is_removed(id), direct.is_removed(id));
            }
        }

        /// A torn-down framework is never brought back by a later subscription.
        #[test]
        fn removed_frameworks_stay_removed(ops in prop::collection::vec(op(), 0..60)) {
            let mut r = Registry::default();
            for op in &ops {
                r.apply(op);
                for id in r.frameworks.keys() {
                    prop_assert!(!r.is_removed(id), "{id} both live and removed");
                }
            }
        }
    }

    #[test]
    fn reservations_replace_only_the_resources() {
        let mut r = Registry::default();
        r.apply(&Op::AdmitAgent {
            id: "a".into(),
            info: agent_info(1),
            at: 1.0,
        });
        r.apply(&Op::SetAgentResources {
            id: "a".into(),
            resources: agent_info(3),
        });
        use prost::Message;
        let info = agora_proto::v1::AgentInfo::decode(r.agents["a"].info.as_slice()).unwrap();
        assert_eq!(info.hostname, "h1");
        let total = agora_proto::resources_from_proto(&info.resources).unwrap();
        assert!((total.cpus() - 3.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn the_removed_list_is_bounded() {
        let mut r = Registry::default();
        for i in 0..MAX_REMOVED_FRAMEWORKS + 5 {
            r.apply(&Op::RemoveFramework { id: i.to_string() });
        }
        assert_eq!(r.removed.len(), MAX_REMOVED_FRAMEWORKS);
        assert!(!r.is_removed("0"));
        assert!(r.is_removed(&(MAX_REMOVED_FRAMEWORKS + 4).to_string()));
    }
}
