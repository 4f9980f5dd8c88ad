//! Deciding who is offered what: a pure, deterministic allocator behind the [`Allocator`] trait.
//!
//! The master tells the allocator what happens — agents and frameworks come and go, resources
//! are offered, used and given back, weights and quotas change — and asks it for allocations
//! now and then. The allocator keeps its own model of the cluster so that a cycle after one
//! change costs little; it has no clock (time is passed in) and does no I/O, so it can be
//! property-tested and benchmarked alone.
//!
//! Like Mesos's allocator, it knows only *allocated* resources: offered and in use by tasks
//! are the same to it. Resources come back through [`Allocator::recover`] when an offer is
//! declined, rescinded or partly used, and when a task ends.
//!
//! [`HierarchicalDrf`] is the policy Mesos users know: hierarchical dominant resource fairness
//! over a tree of roles with weights, quota guarantees and limits, reservations, filters and
//! suppression.

mod hierarchical;
mod scalars;

pub use hierarchical::HierarchicalDrf;
pub use scalars::{SHARE_SCALARS, Scalars, dominant_share};

use std::time::Instant;

use agora_core::{AgentId, FrameworkId, Resources};

/// An allocation decision: offer `resources` of `agent` to `framework`, for `role`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub framework: FrameworkId,
    pub agent: AgentId,
    pub role: String,
    pub resources: Resources,
}

/// A role's quota: what it is owed, and what it may never exceed. Only the scalars in
/// [`SHARE_SCALARS`] may appear; a scalar missing from `limit` is unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quota {
    pub guarantee: Resources,
    pub limit: Option<Resources>,
}

/// A role as the operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoleStatus {
    pub role: String,
    pub weight: f64,
    pub quota: Quota,
    /// Allocated (offered or used) to frameworks in this role and its descendants.
    pub allocated: Resources,
    /// Reserved for exactly this role on active agents.
    pub reserved: Resources,
    /// Frameworks subscribed to exactly this role.
    pub frameworks: usize,
}

/// Which agents a cycle looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cycle {
    /// Only agents whose resources or filters changed since the last cycle (plus all agents
    /// when something changed for everyone: a framework arrived or revived, a weight or
    /// quota changed).
    Incremental,
    /// Every active agent.
    Full,
}

/// Why a weight or quota change was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoleError {
    #[error(transparent)]
    Role(#[from] agora_core::ResourceError),
    #[error("weight {0} of role {1} must be a finite number greater than 0")]
    Weight(f64, String),
    #[error("quota of role {role}: {why}")]
    Quota { role: String, why: String },
    #[error(
        "quota guarantees of {guaranteed} would exceed the cluster's {total}; \
         pass force to set it anyway"
    )]
    ExceedsCapacity {
        guaranteed: Resources,
        total: Resources,
    },
}

/// An allocation policy and its model of the cluster.
///
/// Every resource the allocator allocates stays allocated until it is recovered, or its
/// framework or agent is removed. Callers must recover exactly what was allocated and not
/// since recovered.
pub trait Allocator: Send {
    /// An agent with `total` resources, some of them already in use (`(framework, role,
    /// resources)`, e.g. tasks found when an agent re-registers with a restarted master).
    /// Frameworks named there must have been added.
    fn add_agent(
        &mut self,
        agent: &AgentId,
        total: &Resources,
        allocated: &[(FrameworkId, String, Resources)],
    );
    /// Forgets an agent and everything allocated on it.
    fn remove_agent(&mut self, agent: &AgentId);
    /// An inactive agent (its link is down) is not offered, and not counted in the cluster.
    fn set_agent_active(&mut self, agent: &AgentId, active: bool);

    /// A framework subscribed to `roles` (validated by the caller). Adding a known framework
    /// updates its roles.
    fn add_framework(&mut self, framework: &FrameworkId, roles: &[String]);
    /// Forgets a framework, recovering everything allocated to it.
    fn remove_framework(&mut self, framework: &FrameworkId);
    /// An inactive framework (disconnected, failing over) is not offered.
    fn set_framework_active(&mut self, framework: &FrameworkId, active: bool);
    /// Stops offers to the framework for `roles` (all its roles when empty) until revived.
    fn suppress(&mut self, framework: &FrameworkId, roles: &[String]);
    /// Resumes offers for `roles` (all when empty) and drops the framework's filters.
    fn revive(&mut self, framework: &FrameworkId, roles: &[String]);

    /// Resources allocated to `framework` for `role` on `agent` come back. With
    /// `refuse_until`, the framework is not offered them (or less) on that agent before then.
    fn recover(
        &mut self,
        agent: &AgentId,
        framework: &FrameworkId,
        role: &str,
        resources: &Resources,
        refuse_until: Option<Instant>,
    );
    /// Allocated resources change form (RESERVE, UNRESERVE): `from`, allocated to the
    /// framework, becomes `to` in the allocation and in the agent's total.
    fn convert(
        &mut self,
        agent: &AgentId,
        framework: &FrameworkId,
        role: &str,
        from: &Resources,
        to: &Resources,
    );

    /// Sets a role's weight (default 1).
    ///
    /// # Errors
    /// When the role name or the weight is invalid.
    fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), RoleError>;
    /// Sets a role's quota; an empty quota removes it.
    ///
    /// # Errors
    /// When the quota is malformed, breaks the role tree's rules (a child's guarantees sum to
    /// more than its parent's; a child's limit above its parent's), or — unless `force` —
    /// guarantees more than the active agents hold.
    fn set_quota(&mut self, role: &str, quota: Quota, force: bool) -> Result<(), RoleError>;

    /// Runs an allocation cycle at `now`.
    fn allocate(&mut self, now: Instant, cycle: Cycle) -> Vec<Allocation>;

    /// Roles that have frameworks, a weight, a quota, allocations or reservations.
    fn roles(&self) -> Vec<RoleStatus>;
}

/// True when `r` holds at least one of `min`'s scalars in the amount given (or `min` is
/// empty and `r` is not).
pub fn is_allocatable(r: &Resources, min: &Resources) -> bool {
    if r.is_empty() {
        return false;
    }
    let names = min.scalar_names();
    names.is_empty()
        || names
            .iter()
            .any(|n| !r.scalar(n).is_zero() && r.scalar(n) >= min.scalar(n))
}

#[cfg(test)]
mod tests;
