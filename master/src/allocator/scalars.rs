//! Fixed-size vectors of the scalars that shares and quotas are computed over, so the
//! allocator's hot paths add and compare four integers instead of resource maps.

use std::ops::{Add, AddAssign, Sub, SubAssign};

use agora_core::resources::{Reservation, Resource, Value};
use agora_core::{Resources, Scalar};

/// The scalar resources that count towards dominant shares and may carry a quota.
pub const SHARE_SCALARS: [&str; 4] = ["cpus", "mem", "disk", "gpus"];

/// Amounts of [`SHARE_SCALARS`], in thousandths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Scalars(pub [u64; 4]);

impl Scalars {
    pub const ZERO: Scalars = Scalars([0; 4]);

    pub fn index(name: &str) -> Option<usize> {
        SHARE_SCALARS.iter().position(|n| *n == name)
    }

    /// The share scalars of `r`, whatever their reservation.
    pub fn of(r: &Resources) -> Scalars {
        let mut s = Scalars::ZERO;
        for (name, _, value) in r.entries() {
            if let (Some(i), Value::Scalar(v)) = (Scalars::index(name), value) {
                // Saturating: thousands of huge amounts from one agent must not wrap.
                s.0[i] = s.0[i].saturating_add(v.milli());
            }
        }
        s
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|v| *v == 0)
    }

    /// True when every amount is at most `other`'s.
    pub fn le(&self, other: &Scalars) -> bool {
        self.0.iter().zip(other.0).all(|(a, b)| *a <= b)
    }

    /// Unreserved resources holding these amounts.
    pub fn to_resources(self) -> Resources {
        let mut out = Resources::new();
        for (i, v) in self.0.iter().enumerate() {
            if *v > 0 {
                out.push(Resource {
                    name: SHARE_SCALARS[i].to_owned(),
                    reservation: Reservation::Unreserved,
                    value: Value::Scalar(Scalar::from_milli(*v)),
                });
            }
        }
        out
    }
}

impl Add for Scalars {
    type Output = Scalars;
    fn add(mut self, o: Scalars) -> Scalars {
        self += o;
        self
    }
}

impl AddAssign for Scalars {
    fn add_assign(&mut self, o: Scalars) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a = a.saturating_add(b);
        }
    }
}

/// Saturating: the allocator's books never go below zero.
impl Sub for Scalars {
    type Output = Scalars;
    fn sub(mut self, o: Scalars) -> Scalars {
        self -= o;
        self
    }
}

impl SubAssign for Scalars {
    fn sub_assign(&mut self, o: Scalars) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a = a.saturating_sub(b);
        }
    }
}

/// The largest fraction of `total` of any one share scalar that `held` has.
pub fn dominant_share(held: &Resources, total: &Resources) -> f64 {
    Scalars::of(held).share(&Scalars::of(total))
}

impl Scalars {
    /// The dominant share of these amounts in `total`.
    pub fn share(&self, total: &Scalars) -> f64 {
        self.0
            .iter()
            .zip(total.0)
            .filter(|(_, t)| *t > 0)
            .map(|(h, t)| *h as f64 / t as f64)
            .fold(0.0, f64::max)
    }
}
