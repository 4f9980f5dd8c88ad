//! Hierarchical dominant resource fairness with weights, quotas, reservations, filters and
//! suppression — the allocation policy of Mesos, kept incremental.
//!
//! Roles form a tree (`eng`, `eng/backend`; `*` is an ordinary top-level role). Each role
//! node keeps its child roles and its own frameworks in ordered sets keyed by share, so the
//! next recipient of an agent is found by walking down the tree from the root, taking at
//! each level the least-served candidate that can use the agent:
//!
//! * child roles are ordered by weighted dominant share of their subtree's allocation;
//! * the frameworks of a role, which compete with its child roles as one more candidate, by
//!   their own dominant share in that role.
//!
//! A cycle has two stages, as in Mesos. First, roles whose quota guarantee is not yet met
//! get resources up to what they are owed. Then everyone shares what is left by DRF, except
//! that unreserved resources still owed to other roles' guarantees (the *headroom*) are held
//! back. Limits cap every stage: a role's consumption — what its subtree is allocated plus its
//! unallocated reservations — never exceeds the limit of any role on its path.
//!
//! Reservations for a role are offered to frameworks of that role and its descendants.
//!
//! Books kept incrementally: per-role allocations and free reservations, the cluster's free
//! unreserved resources, and which agents changed since the last cycle, so that a cycle after
//! one task ends looks at one agent.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::time::Instant;

use agora_core::resources::validate_role;
use agora_core::{AgentId, FrameworkId, Reservation, Resources, Scalar, Value};

use super::scalars::{SHARE_SCALARS, Scalars};
use super::{Allocation, Allocator, Cycle, Quota, RoleError, RoleStatus, is_allocatable};

type Ix = usize;

/// The tree's root: not a role, the parent of the top-level roles.
const ROOT: Ix = 0;

struct Role {
    name: String,
    parent: Option<Ix>,
    depth: usize,
    weight: f64,
    quota: Quota,
    guarantee: Scalars,
    limit: [Option<u64>; 4],
    /// Allocated to frameworks in this role and its descendants.
    alloc_subtree: Scalars,
    /// Allocated to frameworks in exactly this role.
    alloc_own: Scalars,
    /// Unallocated reservations for this role and its descendants, on active agents.
    reserved_free_subtree: Scalars,
    /// Reservations for exactly this role on active agents.
    reserved_own: Scalars,
    /// Child roles by (weighted share, index).
    kids: BTreeSet<(u64, Ix)>,
    /// This role's key in its parent's `kids`.
    key: u64,
    /// Frameworks in exactly this role by (share in this role, index).
    frameworks: BTreeSet<(u64, Ix)>,
    /// Frameworks of this subtree that want offers: active and not suppressed for the role.
    wanting: usize,
    /// The same, for exactly this role.
    wanting_own: usize,
}

impl Role {
    fn new(name: String, parent: Option<Ix>, depth: usize) -> Role {
        Role {
            name,
            parent,
            depth,
            weight: 1.0,
            quota: Quota::default(),
            guarantee: Scalars::ZERO,
            limit: [None; 4],
            alloc_subtree: Scalars::ZERO,
            alloc_own: Scalars::ZERO,
            reserved_free_subtree: Scalars::ZERO,
            reserved_own: Scalars::ZERO,
            kids: BTreeSet::new(),
            key: 0,
            frameworks: BTreeSet::new(),
            wanting: 0,
            wanting_own: 0,
        }
    }

    /// What counts against the role's quota: its subtree's allocation and its free
    /// reservations.
    fn consumed(&self) -> Scalars {
        self.alloc_subtree + self.reserved_free_subtree
    }
}

struct Framework {
    id: FrameworkId,
    active: bool,
    roles: Vec<Ix>,
    suppressed: Vec<Ix>,
    /// Allocation per role, and the key it is filed under in that role's `frameworks`.
    alloc: HashMap<Ix, (Scalars, u64)>,
    /// Per agent: resources refused until.
    filters: HashMap<Ix, Vec<(Resources, Instant)>>,
    /// Agents where it holds an allocation.
    agents: HashSet<Ix>,
}

impl Framework {
    fn wants(&self, role: Ix) -> bool {
        self.active && self.roles.contains(&role) && !self.suppressed.contains(&role)
    }
}

struct Agent {
    id: AgentId,
    active: bool,
    total: Resources,
    allocated: Resources,
    /// Allocations by (framework, role).
    by: HashMap<(Ix, Ix), Resources>,
}

#[derive(Clone, Copy)]
enum Stage {
    /// Serving the guarantee of this role.
    Quota(Ix),
    Fair,
}

/// Hierarchical DRF. See the module documentation.
pub struct HierarchicalDrf {
    min_allocatable: Resources,
    roles: Vec<Role>,
    role_ix: HashMap<String, Ix>,
    frameworks: Vec<Option<Framework>>,
    framework_ix: HashMap<FrameworkId, Ix>,
    agents: Vec<Option<Agent>>,
    agent_ix: HashMap<AgentId, Ix>,
    /// Everything the active agents have.
    total: Scalars,
    /// Unallocated unreserved resources of active agents.
    unreserved_free: Scalars,
    /// Roles with a guarantee, deepest first.
    quota_roles: Vec<Ix>,
    /// Roles with a guarantee and no ancestor with one: their needs sum to the headroom.
    top_quota_roles: Vec<Ix>,
    dirty: Vec<Ix>,
    is_dirty: Vec<bool>,
    all_dirty: bool,
    /// The total changed, so every share key is stale.
    resort: bool,
    expiries: BinaryHeap<Reverse<(Instant, Ix, Ix)>>,
    cycles: u64,
}

fn key(share: f64) -> u64 {
    // Non-negative finite floats order like their bits.
    if share.is_finite() && share > 0.0 {
        share.to_bits()
    } else {
        0
    }
}

fn is_ancestor_or_self(ancestor: &str, role: &str) -> bool {
    role == ancestor
        || (role.len() > ancestor.len()
            && role.starts_with(ancestor)
            && role.as_bytes()[ancestor.len()] == b'/')
}

fn shuffle<T>(items: &mut [T], seed: u64) {
    // xorshift64*: deterministic for a seed, which is all the order needs.
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..items.len()).rev() {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        items.swap(i, (r % (i as u64 + 1)) as usize);
    }
}

/// Calls `each` with the reservation role (`None`: unreserved) and amount of every share
/// scalar in `r`.
fn split_scalars(r: &Resources, mut each: impl FnMut(Option<&str>, Scalars)) {
    for (name, reservation, value) in r.entries() {
        if let (Some(i), Value::Scalar(v)) = (Scalars::index(name), value) {
            let mut s = Scalars::ZERO;
            s.0[i] = v.milli();
            each(reservation.role(), s);
        }
    }
}

fn validate_quota(role: &str, quota: &Quota) -> Result<(Scalars, [Option<u64>; 4]), RoleError> {
    let bad = |why: String| RoleError::Quota {
        role: role.to_owned(),
        why,
    };
    let check = |what: &str, r: &Resources| -> Result<(), RoleError> {
        for res in r.iter() {
            if res.reservation != Reservation::Unreserved {
                return Err(bad(format!("{what} {res} carries a reservation")));
            }
            if Scalars::index(&res.name).is_none() || !matches!(res.value, Value::Scalar(_)) {
                return Err(bad(format!(
                    "{what} names {}; quotas may only name {}",
                    res.name,
                    SHARE_SCALARS.join(", ")
                )));
            }
        }
        Ok(())
    };
    check("guarantee", &quota.guarantee)?;
    let guarantee = Scalars::of(&quota.guarantee);
    let mut limit = [None; 4];
    if let Some(l) = &quota.limit {
        check("limit", l)?;
        for (i, name) in SHARE_SCALARS.iter().enumerate() {
            if l.iter().any(|r| r.name == *name) {
                limit[i] = Some(l.scalar(name).milli());
            }
        }
    }
    for i in 0..4 {
        if let Some(l) = limit[i]
            && guarantee.0[i] > l
        {
            return Err(bad(format!(
                "its guarantee of {} {} is above its limit of {}",
                Scalar::from_milli(guarantee.0[i]),
                SHARE_SCALARS[i],
                Scalar::from_milli(l)
            )));
        }
    }
    Ok((guarantee, limit))
}

impl HierarchicalDrf {
    /// An empty allocator; free resources smaller than all of `min_allocatable`'s scalars are
    /// not offered.
    pub fn new(min_allocatable: Resources) -> Self {
        HierarchicalDrf {
            min_allocatable,
            roles: vec![Role::new(String::new(), None, 0)],
            role_ix: HashMap::new(),
            frameworks: Vec::new(),
            framework_ix: HashMap::new(),
            agents: Vec::new(),
            agent_ix: HashMap::new(),
            total: Scalars::ZERO,
            unreserved_free: Scalars::ZERO,
            quota_roles: Vec::new(),
            top_quota_roles: Vec::new(),
            dirty: Vec::new(),
            is_dirty: Vec::new(),
            all_dirty: false,
            resort: false,
            expiries: BinaryHeap::new(),
            cycles: 0,
        }
    }

    /// The index of `name`, creating it and its ancestors. `name` must be valid.
    fn role(&mut self, name: &str) -> Ix {
        if let Some(&ix) = self.role_ix.get(name) {
            return ix;
        }
        let (parent, depth) = match name.rfind('/') {
            Some(cut) => {
                let p = self.role(&name[..cut]);
                (p, self.roles[p].depth + 1)
            }
            None => (ROOT, 1),
        };
        let ix = self.roles.len();
        self.roles
            .push(Role::new(name.to_owned(), Some(parent), depth));
        self.roles[parent].kids.insert((0, ix));
        self.role_ix.insert(name.to_owned(), ix);
        ix
    }

    /// `role` and its ancestors, up to but not including the root.
    fn path(&self, role: Ix) -> impl Iterator<Item = Ix> + '_ {
        std::iter::successors(Some(role), |&r| self.roles[r].parent).filter(|&r| r != ROOT)
    }

    fn path_vec(&self, role: Ix) -> Vec<Ix> {
        self.path(role).collect()
    }

    fn mark_dirty(&mut self, agent: Ix) {
        if self.is_dirty.len() <= agent {
            self.is_dirty.resize(agent + 1, false);
        }
        if !self.is_dirty[agent] {
            self.is_dirty[agent] = true;
            self.dirty.push(agent);
        }
    }

    fn rekey_role(&mut self, r: Ix) {
        let Some(p) = self.roles[r].parent else {
            return;
        };
        let role = &self.roles[r];
        let new = key(role.alloc_subtree.share(&self.total) / role.weight);
        let old = role.key;
        if new != old {
            self.roles[p].kids.remove(&(old, r));
            self.roles[p].kids.insert((new, r));
            self.roles[r].key = new;
        }
    }

    fn rekey_framework(&mut self, f: Ix, r: Ix) {
        let total = self.total;
        let Some(fw) = self.frameworks[f].as_mut() else {
            return;
        };
        let Some((alloc, k)) = fw.alloc.get_mut(&r) else {
            return;
        };
        let new = key(alloc.share(&total));
        if new != *k {
            let old = std::mem::replace(k, new);
            if self.roles[r].frameworks.remove(&(old, f)) {
                self.roles[r].frameworks.insert((new, f));
            }
        }
    }

    /// Recomputes every key after the cluster's total changed.
    fn resort_all(&mut self) {
        let total = self.total;
        for r in 0..self.roles.len() {
            self.roles[r].kids.clear();
            self.roles[r].frameworks.clear();
        }
        for r in 1..self.roles.len() {
            let role = &self.roles[r];
            let k = key(role.alloc_subtree.share(&total) / role.weight);
            let p = role.parent.unwrap_or(ROOT);
            self.roles[r].key = k;
            self.roles[p].kids.insert((k, r));
        }
        for f in 0..self.frameworks.len() {
            let Some(fw) = self.frameworks[f].as_mut() else {
                continue;
            };
            for &r in &fw.roles {
                let entry = fw.alloc.entry(r).or_insert((Scalars::ZERO, 0));
                entry.1 = key(entry.0.share(&total));
                self.roles[r].frameworks.insert((entry.1, f));
            }
        }
        self.resort = false;
    }

    fn set_wanting(&mut self, role: Ix, delta: isize) {
        let path = self.path_vec(role);
        self.roles[role].wanting_own = self.roles[role].wanting_own.saturating_add_signed(delta);
        for y in path {
            self.roles[y].wanting = self.roles[y].wanting.saturating_add_signed(delta);
        }
    }

    /// Adds or removes the free resources `r` of an active agent from the books.
    fn account_free(&mut self, r: &Resources, add: bool) {
        let mut reserved: Vec<(Ix, Scalars)> = Vec::new();
        let mut unreserved = Scalars::ZERO;
        split_scalars(r, |role, s| match role {
            None => unreserved += s,
            Some(name) => {
                if let Some(&ix) = self.role_ix.get(name) {
                    reserved.push((ix, s));
                }
            }
        });
        if add {
            self.unreserved_free += unreserved;
        } else {
            self.unreserved_free -= unreserved;
        }
        for (ix, s) in reserved {
            for y in self.path_vec(ix) {
                let b = &mut self.roles[y].reserved_free_subtree;
                if add {
                    *b += s;
                } else {
                    *b -= s;
                }
            }
        }
    }

    /// Adds or removes an active agent's reservations from the roles' reports.
    fn account_reserved(&mut self, total: &Resources, add: bool) {
        let mut found: Vec<(String, Scalars)> = Vec::new();
        split_scalars(total, |role, s| {
            if let Some(name) = role {
                found.push((name.to_owned(), s));
            }
        });
        for (name, s) in found {
            let ix = self.role(&name);
            let b = &mut self.roles[ix].reserved_own;
            if add {
                *b += s;
            } else {
                *b -= s;
            }
        }
    }

    fn add_alloc(&mut self, a: Ix, f: Ix, r: Ix, res: &Resources) {
        let Some(agent) = self.agents[a].as_mut() else {
            return;
        };
        agent.allocated += res;
        *agent.by.entry((f, r)).or_default() += res;
        let active = agent.active;
        let sc = Scalars::of(res);
        if let Some(fw) = self.frameworks[f].as_mut() {
            fw.alloc.entry(r).or_insert((Scalars::ZERO, 0)).0 += sc;
            fw.agents.insert(a);
        }
        self.roles[r].alloc_own += sc;
        for y in self.path_vec(r) {
            self.roles[y].alloc_subtree += sc;
            self.rekey_role(y);
        }
        self.rekey_framework(f, r);
        if active {
            self.account_free(res, false);
        }
    }

    /// Takes back what `res` names of the allocation of (f, r) on agent `a`.
    fn sub_alloc(&mut self, a: Ix, f: Ix, r: Ix, res: &Resources) {
        let Some(agent) = self.agents[a].as_mut() else {
            return;
        };
        let Some(held) = agent.by.get_mut(&(f, r)) else {
            return;
        };
        // Only what was allocated can come back.
        let back = if held.contains(res) {
            res.clone()
        } else {
            let mut common = res.clone();
            common.subtract(&res.saturating_sub(held));
            common
        };
        held.subtract(&back);
        if held.is_empty() {
            agent.by.remove(&(f, r));
        }
        let still_there = agent.by.keys().any(|(g, _)| *g == f);
        agent.allocated.subtract(&back);
        let active = agent.active;
        let sc = Scalars::of(&back);
        if let Some(fw) = self.frameworks[f].as_mut() {
            if let Some(e) = fw.alloc.get_mut(&r) {
                e.0 -= sc;
            }
            if !still_there {
                fw.agents.remove(&a);
            }
        }
        self.roles[r].alloc_own -= sc;
        for y in self.path_vec(r) {
            self.roles[y].alloc_subtree -= sc;
            self.rekey_role(y);
        }
        self.rekey_framework(f, r);
        if active {
            self.account_free(&back, true);
        }
        self.mark_dirty(a);
    }

    /// What the unreserved pool must keep for guarantees not yet met.
    fn required_headroom(&self) -> Scalars {
        self.top_quota_roles.iter().fold(Scalars::ZERO, |acc, &g| {
            let role = &self.roles[g];
            acc + (role.guarantee - role.consumed())
        })
    }

    /// What of `avail` may go to a framework in role `r` at this stage, or `None` when that
    /// is not worth offering.
    fn offerable(&self, r: Ix, avail: &Resources, stage: Stage) -> Option<Resources> {
        let name = &self.roles[r].name;
        // (depth of the reservation's role, resource); unreserved at depth 0. Ancestors'
        // reservations come before unreserved resources, so they use the limits first.
        let mut usable: Vec<(usize, &str, &Reservation, &Value)> = Vec::new();
        for (res_name, reservation, value) in avail.entries() {
            match reservation.role() {
                None => usable.push((0, res_name, reservation, value)),
                Some(x) if is_ancestor_or_self(x, name) => {
                    usable.push((x.split('/').count(), res_name, reservation, value));
                }
                Some(_) => {}
            }
        }
        if usable.is_empty() {
            return None;
        }
        usable.sort_by_key(|(d, ..)| Reverse(*d));
        // What each role on the path may still take under its limit. Taking a resource
        // reserved for role x adds to the consumption of the roles below x only: x's own
        // consumption already counts its reservations.
        let mut room: Vec<(usize, [u64; 4])> = self
            .path(r)
            .map(|y| {
                let role = &self.roles[y];
                let consumed = role.consumed();
                let mut left = [u64::MAX; 4];
                for (i, l) in left.iter_mut().enumerate() {
                    if let Some(limit) = role.limit[i] {
                        *l = limit.saturating_sub(consumed.0[i]);
                    }
                }
                (role.depth, left)
            })
            .collect();
        let surplus = self.unreserved_free - self.required_headroom();
        let mut pool = [u64::MAX; 4];
        match stage {
            Stage::Fair => pool = surplus.0,
            Stage::Quota(g) => {
                let role = &self.roles[g];
                let owed = role.guarantee - role.consumed();
                for (i, c) in pool.iter_mut().enumerate() {
                    // Scalars it is owed come out of its own headroom; others may not eat
                    // into anyone's.
                    *c = if role.guarantee.0[i] > 0 {
                        owed.0[i]
                    } else {
                        surplus.0[i]
                    };
                }
            }
        }
        let mut offer = Resources::new();
        let mut gives_owed = false;
        for (depth, res_name, reservation, value) in usable {
            let mut value = value.clone();
            if let (Some(i), Value::Scalar(v)) = (Scalars::index(res_name), &value) {
                let mut take = v.milli();
                for (d, left) in &room {
                    if *d > depth {
                        take = take.min(left[i]);
                    }
                }
                if depth == 0 {
                    take = take.min(pool[i]);
                }
                if take == 0 {
                    continue;
                }
                for (d, left) in &mut room {
                    if *d > depth {
                        left[i] = left[i].saturating_sub(take);
                    }
                }
                if depth == 0 {
                    pool[i] -= take;
                    if let Stage::Quota(g) = stage {
                        gives_owed |= self.roles[g].guarantee.0[i] > 0;
                    }
                }
                value = Value::Scalar(Scalar::from_milli(take));
            }
            offer.push(agora_core::Resource {
                name: res_name.to_owned(),
                reservation: reservation.clone(),
                value,
            });
        }
        if let Stage::Quota(_) = stage
            && !gives_owed
        {
            return None;
        }
        is_allocatable(&offer, &self.min_allocatable).then_some(offer)
    }

    /// The least-served framework under `node` that can use `avail` of agent `a`.
    fn pick(
        &self,
        node: Ix,
        a: Ix,
        avail: &Resources,
        stage: Stage,
        given: &HashSet<(Ix, Ix, Ix)>,
    ) -> Option<(Ix, Ix, Resources)> {
        let n = &self.roles[node];
        let own_key = (n.wanting_own > 0).then(|| key(n.alloc_own.share(&self.total) / n.weight));
        let mut own_pending = own_key.is_some();
        for &(k, c) in &n.kids {
            if own_pending && own_key.is_some_and(|o| o <= k) {
                own_pending = false;
                if let Some(x) = self.pick_own(node, a, avail, stage, given) {
                    return Some(x);
                }
            }
            if self.roles[c].wanting == 0 {
                continue;
            }
            if let Some(x) = self.pick(c, a, avail, stage, given) {
                return Some(x);
            }
        }
        if own_pending {
            return self.pick_own(node, a, avail, stage, given);
        }
        None
    }

    fn pick_own(
        &self,
        r: Ix,
        a: Ix,
        avail: &Resources,
        stage: Stage,
        given: &HashSet<(Ix, Ix, Ix)>,
    ) -> Option<(Ix, Ix, Resources)> {
        let offer = self.offerable(r, avail, stage)?;
        for &(_, f) in &self.roles[r].frameworks {
            let Some(fw) = self.frameworks[f].as_ref() else {
                continue;
            };
            if !fw.wants(r) || given.contains(&(a, f, r)) {
                continue;
            }
            let refused = fw
                .filters
                .get(&a)
                .is_some_and(|fl| fl.iter().any(|(res, _)| res.contains(&offer)));
            if refused {
                continue;
            }
            return Some((f, r, offer));
        }
        None
    }

    fn available(&self, a: Ix) -> Option<Resources> {
        let agent = self.agents[a].as_ref()?;
        if !agent.active {
            return None;
        }
        let avail = agent.total.saturating_sub(&agent.allocated);
        is_allocatable(&avail, &self.min_allocatable).then_some(avail)
    }

    fn allocate_agent(
        &mut self,
        a: Ix,
        stage: Stage,
        given: &mut HashSet<(Ix, Ix, Ix)>,
        out: &mut Vec<Allocation>,
    ) {
        let root = match stage {
            Stage::Quota(g) => g,
            Stage::Fair => ROOT,
        };
        while let Some(avail) = self.available(a) {
            let Some((f, r, offer)) = self.pick(root, a, &avail, stage, given) else {
                return;
            };
            self.add_alloc(a, f, r, &offer);
            given.insert((a, f, r));
            let (Some(fw), Some(agent)) = (self.frameworks[f].as_ref(), self.agents[a].as_ref())
            else {
                return;
            };
            out.push(Allocation {
                framework: fw.id.clone(),
                agent: agent.id.clone(),
                role: self.roles[r].name.clone(),
                resources: offer,
            });
            if let Stage::Quota(_) = stage {
                return;
            }
        }
    }

    fn expire_filters(&mut self, now: Instant) {
        while let Some(Reverse((until, f, a))) = self.expiries.peek().copied() {
            if until > now {
                break;
            }
            self.expiries.pop();
            if let Some(fw) = self.frameworks.get_mut(f).and_then(Option::as_mut)
                && let Some(fl) = fw.filters.get_mut(&a)
            {
                fl.retain(|(_, u)| *u > now);
                if fl.is_empty() {
                    fw.filters.remove(&a);
                }
                self.mark_dirty(a);
            }
        }
    }

    fn indices(
        &self,
        agent: &AgentId,
        framework: &FrameworkId,
        role: &str,
    ) -> Option<(Ix, Ix, Ix)> {
        Some((
            *self.agent_ix.get(agent)?,
            *self.framework_ix.get(framework)?,
            *self.role_ix.get(role)?,
        ))
    }

    fn update_quota_roles(&mut self) {
        let mut q: Vec<Ix> = (1..self.roles.len())
            .filter(|&r| !self.roles[r].guarantee.is_zero())
            .collect();
        q.sort_by_key(|&r| (Reverse(self.roles[r].depth), r));
        self.top_quota_roles = q
            .iter()
            .copied()
            .filter(|&r| {
                self.path(r)
                    .skip(1)
                    .all(|y| self.roles[y].guarantee.is_zero())
            })
            .collect();
        self.quota_roles = q;
    }
}

impl Allocator for HierarchicalDrf {
    fn add_agent(
        &mut self,
        agent: &AgentId,
        total: &Resources,
        allocated: &[(FrameworkId, String, Resources)],
    ) {
        if self.agent_ix.contains_key(agent) {
            self.remove_agent(agent);
        }
        // Roles with reservations here get nodes, so their books can be kept.
        for role in total.reserved_roles() {
            self.role(role);
        }
        let a = self.agents.len();
        self.agents.push(Some(Agent {
            id: agent.clone(),
            active: false,
            total: total.clone(),
            allocated: Resources::new(),
            by: HashMap::new(),
        }));
        self.agent_ix.insert(agent.clone(), a);
        self.set_agent_active(agent, true);
        for (fw, role, res) in allocated {
            if !self.framework_ix.contains_key(fw) {
                self.add_framework(fw, std::slice::from_ref(role));
                self.set_framework_active(fw, false);
            }
            let f = self.framework_ix[fw];
            let r = self.role(role);
            self.add_alloc(a, f, r, res);
        }
        self.mark_dirty(a);
    }

    fn remove_agent(&mut self, agent: &AgentId) {
        let Some(&a) = self.agent_ix.get(agent) else {
            return;
        };
        let held: Vec<((Ix, Ix), Resources)> = self.agents[a]
            .as_ref()
            .map(|ag| ag.by.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default();
        for ((f, r), res) in held {
            self.sub_alloc(a, f, r, &res);
        }
        self.set_agent_active(agent, false);
        for fw in self.frameworks.iter_mut().flatten() {
            fw.filters.remove(&a);
        }
        self.agents[a] = None;
        self.agent_ix.remove(agent);
    }

    fn set_agent_active(&mut self, agent: &AgentId, active: bool) {
        let Some(&a) = self.agent_ix.get(agent) else {
            return;
        };
        let Some(ag) = self.agents[a].as_mut() else {
            return;
        };
        if ag.active == active {
            return;
        }
        ag.active = active;
        let total = ag.total.clone();
        let free = ag.total.saturating_sub(&ag.allocated);
        let sc = Scalars::of(&total);
        if active {
            self.total += sc;
        } else {
            self.total -= sc;
        }
        self.account_free(&free, active);
        self.account_reserved(&total, active);
        self.resort = true;
        self.mark_dirty(a);
    }

    fn add_framework(&mut self, framework: &FrameworkId, roles: &[String]) {
        let roles: Vec<Ix> = roles.iter().map(|r| self.role(r)).collect();
        let f = match self.framework_ix.get(framework) {
            Some(&f) => f,
            None => {
                let f = self.frameworks.len();
                self.frameworks.push(Some(Framework {
                    id: framework.clone(),
                    active: false,
                    roles: Vec::new(),
                    suppressed: Vec::new(),
                    alloc: HashMap::new(),
                    filters: HashMap::new(),
                    agents: HashSet::new(),
                }));
                self.framework_ix.insert(framework.clone(), f);
                f
            }
        };
        let total = self.total;
        let Some(fw) = self.frameworks[f].as_mut() else {
            return;
        };
        // A (re-)subscription states the roles afresh, none of them suppressed.
        let wanted: Vec<Ix> = fw.roles.iter().copied().filter(|&r| fw.wants(r)).collect();
        let old = std::mem::replace(&mut fw.roles, roles.clone());
        fw.suppressed.clear();
        fw.active = true;
        let mut unfile = Vec::new();
        let mut file = Vec::new();
        for r in old.iter().chain(&roles) {
            if let Some((_, k)) = fw.alloc.get(r) {
                unfile.push((*r, *k));
            }
        }
        for &r in &roles {
            let e = fw.alloc.entry(r).or_insert((Scalars::ZERO, 0));
            e.1 = key(e.0.share(&total));
            file.push((r, e.1));
        }
        for (r, k) in unfile {
            self.roles[r].frameworks.remove(&(k, f));
        }
        for (r, k) in file {
            self.roles[r].frameworks.insert((k, f));
        }
        for r in wanted {
            self.set_wanting(r, -1);
        }
        for &r in &roles {
            self.set_wanting(r, 1);
        }
        self.all_dirty = true;
    }

    fn remove_framework(&mut self, framework: &FrameworkId) {
        let Some(&f) = self.framework_ix.get(framework) else {
            return;
        };
        let agents: Vec<Ix> = self.frameworks[f]
            .as_ref()
            .map(|fw| fw.agents.iter().copied().collect())
            .unwrap_or_default();
        for a in agents {
            let held: Vec<((Ix, Ix), Resources)> = self.agents[a]
                .as_ref()
                .map(|ag| {
                    ag.by
                        .iter()
                        .filter(|((g, _), _)| *g == f)
                        .map(|(k, v)| (*k, v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            for ((_, r), res) in held {
                self.sub_alloc(a, f, r, &res);
            }
        }
        self.set_framework_active(framework, false);
        if let Some(fw) = self.frameworks[f].take() {
            for (r, (_, k)) in fw.alloc {
                self.roles[r].frameworks.remove(&(k, f));
            }
        }
        self.framework_ix.remove(framework);
    }

    fn set_framework_active(&mut self, framework: &FrameworkId, active: bool) {
        let Some(&f) = self.framework_ix.get(framework) else {
            return;
        };
        let Some(fw) = self.frameworks[f].as_mut() else {
            return;
        };
        if fw.active == active {
            return;
        }
        fw.active = active;
        let roles: Vec<Ix> = fw
            .roles
            .iter()
            .copied()
            .filter(|r| !fw.suppressed.contains(r))
            .collect();
        for r in roles {
            self.set_wanting(r, if active { 1 } else { -1 });
        }
        if active {
            self.all_dirty = true;
        }
    }

    fn suppress(&mut self, framework: &FrameworkId, roles: &[String]) {
        let Some(&f) = self.framework_ix.get(framework) else {
            return;
        };
        let named: Vec<Ix> = roles
            .iter()
            .filter_map(|r| self.role_ix.get(r).copied())
            .collect();
        let Some(fw) = self.frameworks[f].as_mut() else {
            return;
        };
        let targets: Vec<Ix> = fw
            .roles
            .iter()
            .copied()
            .filter(|r| roles.is_empty() || named.contains(r))
            .filter(|r| !fw.suppressed.contains(r))
            .collect();
        let active = fw.active;
        fw.suppressed.extend(&targets);
        if active {
            for r in targets {
                self.set_wanting(r, -1);
            }
        }
    }

    fn revive(&mut self, framework: &FrameworkId, roles: &[String]) {
        let Some(&f) = self.framework_ix.get(framework) else {
            return;
        };
        let named: Vec<Ix> = roles
            .iter()
            .filter_map(|r| self.role_ix.get(r).copied())
            .collect();
        let Some(fw) = self.frameworks[f].as_mut() else {
            return;
        };
        let targets: Vec<Ix> = fw
            .suppressed
            .iter()
            .copied()
            .filter(|r| roles.is_empty() || named.contains(r))
            .collect();
        fw.suppressed.retain(|r| !targets.contains(r));
        fw.filters.clear();
        let active = fw.active;
        if active {
            for r in targets {
                self.set_wanting(r, 1);
            }
        }
        self.all_dirty = true;
    }

    fn recover(
        &mut self,
        agent: &AgentId,
        framework: &FrameworkId,
        role: &str,
        resources: &Resources,
        refuse_until: Option<Instant>,
    ) {
        let Some((a, f, r)) = self.indices(agent, framework, role) else {
            return;
        };
        self.sub_alloc(a, f, r, resources);
        if let Some(until) = refuse_until
            && !resources.is_empty()
            && let Some(fw) = self.frameworks[f].as_mut()
        {
            fw.filters
                .entry(a)
                .or_default()
                .push((resources.clone(), until));
            self.expiries.push(Reverse((until, f, a)));
        }
    }

    fn convert(
        &mut self,
        agent: &AgentId,
        framework: &FrameworkId,
        role: &str,
        from: &Resources,
        to: &Resources,
    ) {
        let Some((a, f, r)) = self.indices(agent, framework, role) else {
            return;
        };
        for name in to.reserved_roles() {
            self.role(name);
        }
        let Some(ag) = self.agents[a].as_mut() else {
            return;
        };
        let active = ag.active;
        ag.total.subtract(from);
        ag.total += to;
        ag.allocated.subtract(from);
        ag.allocated += to;
        let held = ag.by.entry((f, r)).or_default();
        held.subtract(from);
        *held += to;
        if active {
            self.account_reserved(from, false);
            self.account_reserved(to, true);
        }
    }

    fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), RoleError> {
        validate_role(role)?;
        if !weight.is_finite() || weight <= 0.0 {
            return Err(RoleError::Weight(weight, role.to_owned()));
        }
        let r = self.role(role);
        self.roles[r].weight = weight;
        self.rekey_role(r);
        self.all_dirty = true;
        Ok(())
    }

    fn set_quota(&mut self, role: &str, quota: Quota, force: bool) -> Result<(), RoleError> {
        validate_role(role)?;
        if role == "*" {
            return Err(RoleError::Quota {
                role: role.to_owned(),
                why: "the default role '*' cannot have a quota".into(),
            });
        }
        let (guarantee, limit) = validate_quota(role, &quota)?;
        let r = self.role(role);
        let bad = |why: String| RoleError::Quota {
            role: role.to_owned(),
            why,
        };
        // Limits nest: no role's limit is above an ancestor's, nor a guarantee above either.
        for y in self.path(r).skip(1) {
            let anc = &self.roles[y];
            for i in 0..4 {
                let Some(al) = anc.limit[i] else { continue };
                if limit[i].is_some_and(|l| l > al) || guarantee.0[i] > al {
                    return Err(bad(format!(
                        "it would exceed {}'s limit of {} {}",
                        anc.name,
                        Scalar::from_milli(al),
                        SHARE_SCALARS[i]
                    )));
                }
            }
        }
        for d in (1..self.roles.len()).filter(|&d| d != r && self.path(d).any(|y| y == r)) {
            let desc = &self.roles[d];
            for i in 0..4 {
                if let (Some(l), Some(dl)) = (limit[i], desc.limit[i])
                    && dl > l
                {
                    return Err(bad(format!(
                        "its limit of {} {} is below {}'s limit of {}",
                        Scalar::from_milli(l),
                        SHARE_SCALARS[i],
                        desc.name,
                        Scalar::from_milli(dl)
                    )));
                }
            }
        }
        // Guarantees nest: what roles under a guaranteed role are owed fits in its guarantee.
        let old = (self.roles[r].guarantee, self.roles[r].limit);
        self.roles[r].guarantee = guarantee;
        self.roles[r].limit = limit;
        let nesting = (1..self.roles.len())
            .filter(|&y| !self.roles[y].guarantee.is_zero())
            .find_map(|y| {
                let below = (1..self.roles.len())
                    .filter(|&d| {
                        d != y
                            && !self.roles[d].guarantee.is_zero()
                            && self
                                .path(d)
                                .skip(1)
                                .find(|&p| !self.roles[p].guarantee.is_zero())
                                == Some(y)
                    })
                    .fold(Scalars::ZERO, |acc, d| acc + self.roles[d].guarantee);
                (!below.le(&self.roles[y].guarantee)).then(|| {
                    format!(
                        "the guarantees of roles under {} ({}) exceed its own ({})",
                        self.roles[y].name,
                        below.to_resources(),
                        self.roles[y].guarantee.to_resources()
                    )
                })
            });
        let guaranteed = (1..self.roles.len())
            .filter(|&y| {
                !self.roles[y].guarantee.is_zero()
                    && self
                        .path(y)
                        .skip(1)
                        .all(|p| self.roles[p].guarantee.is_zero())
            })
            .fold(Scalars::ZERO, |acc, y| acc + self.roles[y].guarantee);
        let refusal = match nesting {
            Some(why) => Some(bad(why)),
            None if !force && !guaranteed.le(&self.total) => Some(RoleError::ExceedsCapacity {
                guaranteed: guaranteed.to_resources(),
                total: self.total.to_resources(),
            }),
            None => None,
        };
        if let Some(e) = refusal {
            (self.roles[r].guarantee, self.roles[r].limit) = old;
            return Err(e);
        }
        self.roles[r].quota = quota;
        self.update_quota_roles();
        self.all_dirty = true;
        Ok(())
    }

    fn allocate(&mut self, now: Instant, cycle: Cycle) -> Vec<Allocation> {
        self.expire_filters(now);
        if self.resort {
            self.resort_all();
        }
        let mut order: Vec<Ix> = if cycle == Cycle::Full || self.all_dirty {
            (0..self.agents.len())
                .filter(|&a| self.agents[a].as_ref().is_some_and(|ag| ag.active))
                .collect()
        } else {
            let mut d = std::mem::take(&mut self.dirty);
            d.sort_unstable();
            d.retain(|&a| self.agents[a].as_ref().is_some_and(|ag| ag.active));
            d
        };
        for &a in &self.dirty {
            self.is_dirty[a] = false;
        }
        for a in &order {
            if let Some(d) = self.is_dirty.get_mut(*a) {
                *d = false;
            }
        }
        self.dirty.clear();
        self.all_dirty = false;
        self.cycles += 1;
        shuffle(&mut order, self.cycles);

        let mut out = Vec::new();
        let mut given = HashSet::new();
        if !self.quota_roles.is_empty() {
            for &a in &order {
                for g in self.quota_roles.clone() {
                    let role = &self.roles[g];
                    if role.wanting == 0 || role.guarantee.le(&role.consumed()) {
                        continue;
                    }
                    self.allocate_agent(a, Stage::Quota(g), &mut given, &mut out);
                }
            }
        }
        for &a in &order {
            self.allocate_agent(a, Stage::Fair, &mut given, &mut out);
        }
        out
    }

    fn roles(&self) -> Vec<RoleStatus> {
        let mut out: Vec<RoleStatus> = (1..self.roles.len())
            .filter(|&r| {
                let role = &self.roles[r];
                !role.frameworks.is_empty()
                    || role.weight != 1.0
                    || role.quota != Quota::default()
                    || !role.alloc_subtree.is_zero()
                    || !role.reserved_own.is_zero()
            })
            .map(|r| {
                let role = &self.roles[r];
                RoleStatus {
                    role: role.name.clone(),
                    weight: role.weight,
                    quota: role.quota.clone(),
                    allocated: role.alloc_subtree.to_resources(),
                    reserved: role.reserved_own.to_resources(),
                    frameworks: role.frameworks.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.role.cmp(&b.role));
        out
    }
}

impl std::fmt::Debug for HierarchicalDrf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HierarchicalDrf")
            .field("roles", &(self.roles.len() - 1))
            .field("frameworks", &self.framework_ix.len())
            .field("agents", &self.agent_ix.len())
            .finish()
    }
}
