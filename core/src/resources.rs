//! Resources as Mesos has them: named scalars (`cpus`, `mem` in MiB, `disk` in MiB), ranges
//! (`ports`) and sets, each either unreserved or reserved for a role.
//!
//! [`Resources`] is kept in a canonical form — one entry per (name, reservation, kind), ranges
//! sorted and merged, no empty entries — so equality is structural and arithmetic is cheap.
//! Scalars are fixed-point with three decimals (as in Mesos), so `(a + b) - b == a` holds
//! exactly instead of drifting as floating point would.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::{Add, AddAssign};

/// Errors building resources from untrusted input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ResourceError {
    #[error("scalar value {0} is not a finite, non-negative number")]
    BadScalar(f64),
    #[error("scalar value {0} is too large")]
    ScalarTooLarge(f64),
    #[error("range [{begin}-{end}] has its beginning after its end")]
    InvertedRange { begin: u64, end: u64 },
    #[error("resource name {0:?} is invalid: use letters, digits, '_', '-' and '.'")]
    BadName(String),
    #[error("resource {name:?} must be of type {expected}, not {found}")]
    WrongKind {
        name: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("role {role:?} is invalid: {why}")]
    BadRole { role: String, why: &'static str },
}

/// A non-negative quantity with three decimal places, stored as thousandths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Scalar(u64);

impl Scalar {
    pub const ZERO: Scalar = Scalar(0);

    /// Rounds `v` to the nearest thousandth.
    ///
    /// # Errors
    /// When `v` is negative, not finite, or beyond the representable range.
    pub fn from_f64(v: f64) -> Result<Self, ResourceError> {
        if !v.is_finite() || v < 0.0 {
            return Err(ResourceError::BadScalar(v));
        }
        let milli = (v * 1000.0).round();
        // 2^53 keeps the conversion back to f64 exact.
        if milli > 9_007_199_254_740_992.0 {
            return Err(ResourceError::ScalarTooLarge(v));
        }
        Ok(Scalar(milli as u64))
    }

    pub const fn from_milli(milli: u64) -> Self {
        Scalar(milli)
    }

    /// A whole number of units.
    pub const fn from_units(units: u64) -> Self {
        Scalar(units.saturating_mul(1000))
    }

    pub const fn milli(self) -> u64 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_sub(self, other: Scalar) -> Option<Scalar> {
        self.0.checked_sub(other.0).map(Scalar)
    }

    pub fn saturating_sub(self, other: Scalar) -> Scalar {
        Scalar(self.0.saturating_sub(other.0))
    }
}

impl Add for Scalar {
    type Output = Scalar;
    fn add(self, other: Scalar) -> Scalar {
        Scalar(self.0.saturating_add(other.0))
    }
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (units, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{units}")
        } else {
            let digits = format!("{frac:03}");
            write!(f, "{units}.{}", digits.trim_end_matches('0'))
        }
    }
}

/// An inclusive range of integers, `[begin, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub begin: u64,
    pub end: u64,
}

impl Range {
    /// # Errors
    /// When `begin > end`.
    pub fn new(begin: u64, end: u64) -> Result<Self, ResourceError> {
        if begin > end {
            return Err(ResourceError::InvertedRange { begin, end });
        }
        Ok(Range { begin, end })
    }

    /// How many integers the range holds (never zero).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> u64 {
        // Saturating: `[0-18446744073709551615]` holds one more than a u64 can count.
        (self.end - self.begin).saturating_add(1)
    }
}

/// A normalised set of ranges: sorted, disjoint and not adjacent (`[1-2],[3-4]` is `[1-4]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ranges(Vec<Range>);

impl Ranges {
    pub fn new() -> Self {
        Ranges(Vec::new())
    }

    /// Normalises any collection of ranges (they may overlap or be out of order).
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range>) -> Self {
        let mut v: Vec<Range> = ranges.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<Range> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.begin <= last.end.saturating_add(1) => {
                    last.end = last.end.max(r.end);
                }
                _ => out.push(r),
            }
        }
        Ranges(out)
    }

    pub fn single(begin: u64, end: u64) -> Result<Self, ResourceError> {
        Ok(Ranges(vec![Range::new(begin, end)?]))
    }

    pub fn as_slice(&self) -> &[Range] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many integers the ranges hold in all.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|r| r.len()).sum()
    }

    pub fn contains_value(&self, v: u64) -> bool {
        let i = self.0.partition_point(|r| r.end < v);
        self.0.get(i).is_some_and(|r| r.begin <= v)
    }

    /// True when every integer of `other` is in `self`.
    pub fn contains(&self, other: &Ranges) -> bool {
        other.0.iter().all(|o| {
            let i = self.0.partition_point(|r| r.end < o.begin);
            self.0
                .get(i)
                .is_some_and(|r| r.begin <= o.begin && o.end <= r.end)
        })
    }

    pub fn union(&self, other: &Ranges) -> Ranges {
        Ranges::from_ranges(self.0.iter().chain(other.0.iter()).copied())
    }

    /// The integers of `self` that are not in `other`.
    pub fn difference(&self, other: &Ranges) -> Ranges {
        let mut out = Vec::with_capacity(self.0.len());
        let mut j = 0;
        for &r in &self.0 {
            let mut cur = Some(r);
            while j < other.0.len() && other.0[j].end < r.begin {
                j += 1;
            }
            let mut k = j;
            while let (Some(c), Some(o)) = (cur, other.0.get(k)) {
                if o.begin > c.end {
                    break;
                }
                if o.begin > c.begin {
                    out.push(Range {
                        begin: c.begin,
                        end: o.begin - 1,
                    });
                }
                cur = if o.end >= c.end {
                    None
                } else {
                    Some(Range {
                        begin: o.end + 1,
                        end: c.end,
                    })
                };
                k += 1;
            }
            out.extend(cur);
        }
        Ranges(out)
    }

    /// The first `n` integers of the ranges, lowest first, or `None` if there are fewer.
    pub fn take(&self, mut n: u64) -> Option<Ranges> {
        let mut out = Vec::new();
        for r in &self.0 {
            if n == 0 {
                break;
            }
            let take = n.min(r.len());
            out.push(Range {
                begin: r.begin,
                end: r.begin + take - 1,
            });
            n -= take;
        }
        (n == 0).then_some(Ranges(out))
    }
}

impl fmt::Display for Ranges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}-{}", r.begin, r.end)?;
        }
        f.write_str("]")
    }
}

/// The value of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Scalar(Scalar),
    Ranges(Ranges),
    Set(BTreeSet<String>),
}

/// The kind of a [`Value`], part of a resource's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Scalar,
    Ranges,
    Set,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Scalar => "scalar",
            Kind::Ranges => "ranges",
            Kind::Set => "set",
        }
    }
}

impl Value {
    pub fn kind(&self) -> Kind {
        match self {
            Value::Scalar(_) => Kind::Scalar,
            Value::Ranges(_) => Kind::Ranges,
            Value::Set(_) => Kind::Set,
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Value::Scalar(s) => s.is_zero(),
            Value::Ranges(r) => r.is_empty(),
            Value::Set(s) => s.is_empty(),
        }
    }

    /// Both values must be of the same kind; callers key entries by kind so they always are.
    fn add_same_kind(&mut self, other: &Value) {
        match (self, other) {
            (Value::Scalar(a), Value::Scalar(b)) => *a = *a + *b,
            (Value::Ranges(a), Value::Ranges(b)) => *a = a.union(b),
            (Value::Set(a), Value::Set(b)) => a.extend(b.iter().cloned()),
            _ => debug_assert!(false, "values of different kinds are never combined"),
        }
    }

    fn contains_same_kind(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Scalar(a), Value::Scalar(b)) => a >= b,
            (Value::Ranges(a), Value::Ranges(b)) => a.contains(b),
            (Value::Set(a), Value::Set(b)) => b.is_subset(a),
            _ => false,
        }
    }

    fn sub_same_kind(&mut self, other: &Value) {
        match (self, other) {
            (Value::Scalar(a), Value::Scalar(b)) => *a = a.saturating_sub(*b),
            (Value::Ranges(a), Value::Ranges(b)) => *a = a.difference(b),
            (Value::Set(a), Value::Set(b)) => a.retain(|x| !b.contains(x)),
            _ => debug_assert!(false, "values of different kinds are never combined"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Scalar(s) => write!(f, "{s}"),
            Value::Ranges(r) => write!(f, "{r}"),
            Value::Set(s) => {
                f.write_str("{")?;
                for (i, item) in s.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(item)?;
                }
                f.write_str("}")
            }
        }
    }
}

/// Who a resource is set aside for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Reservation {
    /// Offered to any role (Mesos's `*`).
    #[default]
    Unreserved,
    /// Reserved by the agent's configuration.
    Static { role: String },
    /// Reserved by a framework's RESERVE operation.
    Dynamic { role: String, principal: String },
}

impl Reservation {
    pub fn role(&self) -> Option<&str> {
        match self {
            Reservation::Unreserved => None,
            Reservation::Static { role } | Reservation::Dynamic { role, .. } => Some(role),
        }
    }
}

/// Longest role name, in bytes.
pub const MAX_ROLE_LEN: usize = 255;
/// Deepest role hierarchy (`a/b/c` is three levels).
pub const MAX_ROLE_DEPTH: usize = 8;

/// Validates a role name: `*`, or at most [`MAX_ROLE_DEPTH`] `/`-separated segments, at most
/// [`MAX_ROLE_LEN`] bytes in all, that are non-empty, not `.` or `..`, do not start with `-`,
/// and hold no whitespace, control characters, `*` or backslashes (Mesos's rules).
///
/// # Errors
/// Names the role and what is wrong with it.
pub fn validate_role(role: &str) -> Result<(), ResourceError> {
    let bad = |why| {
        Err(ResourceError::BadRole {
            role: role.to_owned(),
            why,
        })
    };
    if role == "*" {
        return Ok(());
    }
    if role.is_empty() {
        return bad("it is empty");
    }
    if role.len() > MAX_ROLE_LEN {
        return bad("it is longer than 255 bytes");
    }
    if role.split('/').count() > MAX_ROLE_DEPTH {
        return bad("it is nested more than 8 levels deep");
    }
    for seg in role.split('/') {
        if seg.is_empty() {
            return bad("it has an empty segment");
        }
        if seg == "." || seg == ".." {
            return bad("'.' and '..' are not allowed");
        }
        if seg.starts_with('-') {
            return bad("a segment may not start with '-'");
        }
        if seg
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '\\')
        {
            return bad("it contains whitespace, a control character, '*' or a backslash");
        }
    }
    Ok(())
}

/// Validates a resource or attribute name.
///
/// # Errors
/// When the name is empty or has characters outside letters, digits, `_`, `-` and `.`.
pub fn validate_name(name: &str) -> Result<(), ResourceError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(ResourceError::BadName(name.to_owned()));
    }
    Ok(())
}

/// The kind a well-known resource must have.
fn expected_kind(name: &str) -> Option<Kind> {
    match name {
        "cpus" | "mem" | "disk" | "gpus" => Some(Kind::Scalar),
        "ports" => Some(Kind::Ranges),
        _ => None,
    }
}

/// One resource: a name, a reservation and a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    pub name: String,
    pub reservation: Reservation,
    pub value: Value,
}

impl Resource {
    /// Builds a resource, checking the name, the role and the kind of well-known names.
    ///
    /// # Errors
    /// See [`ResourceError`].
    pub fn new(
        name: impl Into<String>,
        reservation: Reservation,
        value: Value,
    ) -> Result<Self, ResourceError> {
        let name = name.into();
        validate_name(&name)?;
        if let Some(role) = reservation.role() {
            if role == "*" {
                return Err(ResourceError::BadRole {
                    role: role.to_owned(),
                    why: "'*' means unreserved and cannot hold a reservation",
                });
            }
            validate_role(role)?;
        }
        if let Some(expected) = expected_kind(&name)
            && expected != value.kind()
        {
            return Err(ResourceError::WrongKind {
                name,
                expected: expected.name(),
                found: value.kind().name(),
            });
        }
        Ok(Resource {
            name,
            reservation,
            value,
        })
    }

    /// An unreserved scalar, e.g. `Resource::scalar("cpus", 0.5)`.
    ///
    /// # Errors
    /// When the value is negative or not finite, or the name is invalid.
    pub fn scalar(name: &str, value: f64) -> Result<Self, ResourceError> {
        Resource::new(
            name,
            Reservation::Unreserved,
            Value::Scalar(Scalar::from_f64(value)?),
        )
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        match &self.reservation {
            Reservation::Unreserved => {}
            Reservation::Static { role } => write!(f, "({role})")?,
            Reservation::Dynamic { role, principal } => write!(f, "({role},{principal})")?,
        }
        write!(f, ":{}", self.value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    name: String,
    reservation: Reservation,
    kind: Kind,
}

/// A bag of resources in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Resources {
    entries: BTreeMap<Key, Value>,
}

impl Resources {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds one resource (entries of the same name, reservation and kind are combined).
    pub fn push(&mut self, r: Resource) {
        if r.value.is_empty() {
            return;
        }
        let key = Key {
            name: r.name,
            reservation: r.reservation,
            kind: r.value.kind(),
        };
        match self.entries.get_mut(&key) {
            Some(v) => v.add_same_kind(&r.value),
            None => {
                self.entries.insert(key, r.value);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Resource> + '_ {
        self.entries.iter().map(|(k, v)| Resource {
            name: k.name.clone(),
            reservation: k.reservation.clone(),
            value: v.clone(),
        })
    }

    /// The resources by reference: (name, reservation, value), in canonical order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Reservation, &Value)> + '_ {
        self.entries
            .iter()
            .map(|(k, v)| (k.name.as_str(), &k.reservation, v))
    }

    /// True when every resource of `other` is in `self` (same name, reservation and kind).
    pub fn contains(&self, other: &Resources) -> bool {
        other.entries.iter().all(|(k, v)| {
            self.entries
                .get(k)
                .is_some_and(|mine| mine.contains_same_kind(v))
        })
    }

    /// `self - other` when `self` contains `other`, else `None`.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        self.contains(other).then(|| self.saturating_sub(other))
    }

    /// Removes what `other` has from `self`; what `self` lacks is ignored.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        let mut out = self.clone();
        out.subtract(other);
        out
    }

    /// In-place [`Resources::saturating_sub`].
    pub fn subtract(&mut self, other: &Resources) {
        for (k, v) in &other.entries {
            if let Some(mine) = self.entries.get_mut(k) {
                mine.sub_same_kind(v);
                if mine.is_empty() {
                    self.entries.remove(k);
                }
            }
        }
    }

    /// The total of scalar `name` across reservations.
    pub fn scalar(&self, name: &str) -> Scalar {
        self.entries
            .iter()
            .filter(|(k, _)| k.name == name)
            .filter_map(|(_, v)| match v {
                Value::Scalar(s) => Some(*s),
                _ => None,
            })
            .fold(Scalar::ZERO, |a, b| a + b)
    }

    pub fn cpus(&self) -> f64 {
        self.scalar("cpus").as_f64()
    }

    /// Memory in MiB.
    pub fn mem(&self) -> f64 {
        self.scalar("mem").as_f64()
    }

    /// Disk in MiB.
    pub fn disk(&self) -> f64 {
        self.scalar("disk").as_f64()
    }

    /// The union of ranges named `name` across reservations.
    pub fn ranges(&self, name: &str) -> Ranges {
        self.entries
            .iter()
            .filter(|(k, _)| k.name == name)
            .fold(Ranges::new(), |acc, (_, v)| match v {
                Value::Ranges(r) => acc.union(r),
                _ => acc,
            })
    }

    /// Names of the scalar resources present.
    pub fn scalar_names(&self) -> BTreeSet<&str> {
        self.entries
            .keys()
            .filter(|k| k.kind == Kind::Scalar)
            .map(|k| k.name.as_str())
            .collect()
    }

    /// The resources whose reservation satisfies `keep`.
    pub fn filter(&self, mut keep: impl FnMut(&Reservation) -> bool) -> Resources {
        Resources {
            entries: self
                .entries
                .iter()
                .filter(|(k, _)| keep(&k.reservation))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn unreserved(&self) -> Resources {
        self.filter(|r| *r == Reservation::Unreserved)
    }

    /// Resources reserved (statically or dynamically) for exactly `role`.
    pub fn reserved_for(&self, role: &str) -> Resources {
        self.filter(|r| r.role() == Some(role))
    }

    /// What a framework in `role` may be offered: unreserved resources and `role`'s own.
    pub fn allocatable_to(&self, role: &str) -> Resources {
        self.filter(|r| r.role().is_none_or(|r| r == role))
    }

    /// Roles that hold reservations here.
    pub fn reserved_roles(&self) -> BTreeSet<&str> {
        self.entries
            .keys()
            .filter_map(|k| k.reservation.role())
            .collect()
    }

    /// The same resources with reservations removed (all unreserved).
    pub fn flatten(&self) -> Resources {
        let mut out = Resources::new();
        for r in self.iter() {
            out.push(Resource {
                reservation: Reservation::Unreserved,
                ..r
            });
        }
        out
    }
}

impl Add<&Resources> for &Resources {
    type Output = Resources;
    fn add(self, other: &Resources) -> Resources {
        let mut out = self.clone();
        out += other;
        out
    }
}

impl Add for Resources {
    type Output = Resources;
    fn add(mut self, other: Resources) -> Resources {
        self += &other;
        self
    }
}

impl AddAssign<&Resources> for Resources {
    fn add_assign(&mut self, other: &Resources) {
        for (k, v) in &other.entries {
            match self.entries.get_mut(k) {
                Some(mine) => mine.add_same_kind(v),
                None => {
                    self.entries.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

impl FromIterator<Resource> for Resources {
    fn from_iter<I: IntoIterator<Item = Resource>>(iter: I) -> Self {
        let mut out = Resources::new();
        for r in iter {
            out.push(r);
        }
        out
    }
}

/// The Mesos text form, e.g. `cpus:2;mem:1024;ports:[31000-32000];disk(eng):100`.
impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syntax::parse_resources;
    use proptest::prelude::*;

    fn res(s: &str) -> Resources {
        parse_resources(s).unwrap()
    }

    #[test]
    fn scalars_are_exact() {
        let a = res("cpus:0.1");
        let mut sum = Resources::new();
        for _ in 0..10 {
            sum += &a;
        }
        assert_eq!(sum, res("cpus:1"));
        assert_eq!(Scalar::from_f64(0.0004).unwrap(), Scalar::ZERO);
        assert_eq!(Scalar::from_f64(1.5).unwrap().to_string(), "1.5");
        assert_eq!(Scalar::from_f64(0.125).unwrap().to_string(), "0.125");
        assert!(Scalar::from_f64(-1.0).is_err());
        assert!(Scalar::from_f64(f64::NAN).is_err());
    }

    #[test]
    fn ranges_merge_and_subtract() {
        let r = Ranges::from_ranges([
            Range { begin: 5, end: 9 },
            Range { begin: 1, end: 3 },
            Range { begin: 4, end: 4 },
            Range { begin: 20, end: 30 },
        ]);
        assert_eq!(r.to_string(), "[1-9, 20-30]");
        let d = r.difference(&Ranges::from_ranges([
            Range { begin: 2, end: 2 },
            Range { begin: 8, end: 21 },
        ]));
        assert_eq!(d.to_string(), "[1-1, 3-7, 22-30]");
        assert!(r.contains(&d));
        assert!(!d.contains(&r));
        assert!(r.contains_value(25) && !r.contains_value(15));
        assert_eq!(r.take(3).unwrap().to_string(), "[1-3]");
        assert_eq!(r.take(12).unwrap().to_string(), "[1-9, 20-22]");
        assert!(r.take(21).is_none());
    }

    #[test]
    fn reservations_are_kept_apart() {
        let total = res("cpus:4;cpus(eng):2;mem:1024");
        assert_eq!(total.cpus(), 6.0);
        assert_eq!(total.unreserved(), res("cpus:4;mem:1024"));
        assert_eq!(total.reserved_for("eng"), res("cpus(eng):2"));
        assert_eq!(total.allocatable_to("ops"), res("cpus:4;mem:1024"));
        assert_eq!(total.allocatable_to("eng"), total);
        // Unreserved cpus cannot pay for reserved ones.
        assert!(!res("cpus:10").contains(&res("cpus(eng):1")));
        assert_eq!(total.flatten(), res("cpus:6;mem:1024"));
    }

    #[test]
    fn well_known_names_have_fixed_kinds() {
        let err = Resource::new(
            "cpus",
            Reservation::Unreserved,
            Value::Ranges(Ranges::new()),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "resource \"cpus\" must be of type scalar, not ranges"
        );
    }

    #[test]
    fn roles_are_validated() {
        for ok in ["*", "eng", "eng/backend", "a.b"] {
            assert!(validate_role(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "eng//x", "/eng", "eng/..", ".", "a b", "-x", "a/*", "a\\b",
        ] {
            assert!(validate_role(bad).is_err(), "{bad}");
        }
        // Bounded, so the allocator never builds thousands of prefixes for one name.
        assert!(validate_role(&"r".repeat(MAX_ROLE_LEN)).is_ok());
        let long = validate_role(&"r".repeat(MAX_ROLE_LEN + 1)).unwrap_err();
        assert!(long.to_string().contains("longer than 255 bytes"), "{long}");
        assert!(validate_role(&["a"; MAX_ROLE_DEPTH].join("/")).is_ok());
        let deep = validate_role(&["a"; MAX_ROLE_DEPTH + 1].join("/")).unwrap_err();
        assert!(deep.to_string().contains("8 levels"), "{deep}");
    }

    #[test]
    fn the_widest_range_has_a_length() {
        let all = Range::new(0, u64::MAX).unwrap();
        assert_eq!(all.len(), u64::MAX);
        let r = Ranges::from_ranges([all]);
        assert!(r.take(3).is_some());
    }

    fn arb_ranges() -> impl Strategy<Value = Ranges> {
        prop::collection::vec((0u64..200, 0u64..20), 0..6).prop_map(|v| {
            Ranges::from_ranges(v.into_iter().map(|(b, l)| Range {
                begin: b,
                end: b + l,
            }))
        })
    }

    fn arb_reservation() -> impl Strategy<Value = Reservation> {
        prop_oneof![
            Just(Reservation::Unreserved),
            Just(Reservation::Static { role: "eng".into() }),
            Just(Reservation::Dynamic {
                role: "ops".into(),
                principal: "alice".into()
            }),
        ]
    }

    fn arb_resources() -> impl Strategy<Value = Resources> {
        let scalar = (
            prop_oneof![Just("cpus"), Just("mem"), Just("disk")],
            arb_reservation(),
            0u64..100_000,
        )
            .prop_map(|(n, rsv, m)| Resource {
                name: n.into(),
                reservation: rsv,
                value: Value::Scalar(Scalar::from_milli(m)),
            });
        let ranges = (arb_reservation(), arb_ranges()).prop_map(|(rsv, r)| Resource {
            name: "ports".into(),
            reservation: rsv,
            value: Value::Ranges(r),
        });
        let set = (
            arb_reservation(),
            prop::collection::btree_set("[a-e]", 0..4),
        )
            .prop_map(|(rsv, s)| Resource {
                name: "zones".into(),
                reservation: rsv,
                value: Value::Set(s),
            });
        prop::collection::vec(prop_oneof![scalar, ranges, set], 0..8)
            .prop_map(|v| v.into_iter().collect())
    }

    /// Removes from `b` every range value and set item that `a` also has, so that `a + b`
    /// adds disjoint pieces (two places never hold the same port).
    fn disjoint_from(a: &Resources, b: &Resources) -> Resources {
        let shared: Resources = b
            .iter()
            .filter(|r| !matches!(r.value, Value::Scalar(_)))
            .collect();
        b.saturating_sub(&shared.saturating_sub(&shared.saturating_sub(a)))
    }

    proptest! {
        #[test]
        fn add_then_sub_is_identity(a in arb_resources(), b in arb_resources()) {
            let b = disjoint_from(&a, &b);
            prop_assert_eq!((&a + &b).checked_sub(&b), Some(a.clone()));
            prop_assert_eq!((&a + &b).saturating_sub(&b), a);
        }

        #[test]
        fn addition_commutes(a in arb_resources(), b in arb_resources()) {
            prop_assert_eq!(&a + &b, &b + &a);
        }

        #[test]
        fn contains_agrees_with_subtraction(a in arb_resources(), b in arb_resources()) {
            // a contains b exactly when b can be taken from a and put back.
            prop_assert_eq!(a.contains(&b), a.checked_sub(&b).is_some());
            if let Some(rest) = a.checked_sub(&b) {
                prop_assert_eq!(&(&rest + &b), &a);
            }
            prop_assert!((&a + &b).contains(&a));
            prop_assert!(a.contains(&a.saturating_sub(&b)));
        }

        #[test]
        fn ranges_normalise_and_never_overlap(
            v in prop::collection::vec((0u64..1000, 0u64..50), 0..20)
        ) {
            let raw: Vec<Range> = v.iter().map(|&(b, l)| Range { begin: b, end: b + l }).collect();
            let r = Ranges::from_ranges(raw.iter().copied());
            for w in r.as_slice().windows(2) {
                // Sorted, disjoint and not even adjacent.
                prop_assert!(w[0].end + 1 < w[1].begin);
            }
            for x in 0..1100u64 {
                let inside = raw.iter().any(|q| q.begin <= x && x <= q.end);
                prop_assert_eq!(r.contains_value(x), inside);
            }
            prop_assert_eq!(Ranges::from_ranges(r.as_slice().iter().copied()), r);
        }

        #[test]
        fn range_difference_is_exact(a in arb_ranges(), b in arb_ranges()) {
            let d = a.difference(&b);
            for x in 0..240u64 {
                prop_assert_eq!(d.contains_value(x), a.contains_value(x) && !b.contains_value(x));
            }
            for w in d.as_slice().windows(2) {
                prop_assert!(w[0].end + 1 < w[1].begin);
            }
        }

        #[test]
        fn text_form_round_trips(a in arb_resources()) {
            prop_assert_eq!(parse_resources(&a.to_string()).unwrap(), a);
        }
    }
}
