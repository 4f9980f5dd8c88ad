//! Bounds per caller, so that one principal (or one anonymous address) cannot exhaust the
//! master for everyone else: a call rate, concurrent subscriptions, tasks held and blob-store
//! bytes, each a flag with a default sized well above what a busy framework needs.
//!
//! A caller is its authenticated principal, else (authentication off) its peer address.
//! The call rate is a token bucket per caller (governor's keyed GCRA limiter): a burst of
//! `call_burst` calls, refilled at `call_rate` a second. Calls past it are refused with
//! `RESOURCE_EXHAUSTED` (HTTP 429) naming the limit and its flag; nothing is queued.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::Status;

/// The bounds; `0` turns one off.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Calls a second per caller, sustained (`--max-call-rate`).
    pub call_rate: u32,
    /// Calls per caller at once, before the rate applies (`--max-call-burst`).
    pub call_burst: u32,
    /// Concurrent framework subscriptions per caller (`--max-subscriptions-per-principal`).
    pub subscriptions: usize,
    /// Tasks the master holds for one principal's frameworks, across all of them
    /// (`--max-tasks-per-principal`).
    pub tasks: usize,
    /// Outstanding offers one principal's frameworks may hold together; past it the rest
    /// go to other frameworks (`--max-offers-per-principal`).
    pub offers: usize,
    /// Blob-store bytes one principal's uploads may hold (`--max-blob-mib-per-principal`).
    pub blob_bytes: u64,
    /// How long a new connection has for its TLS handshake and first bytes (`--header-timeout`).
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // Far above a busy framework's calls (an ACCEPT per offer, an ACKNOWLEDGE per
            // update: a few thousand a second at the launch benchmark's rates, by estimate,
            // not measured).
            call_rate: 20_000,
            call_burst: 40_000,
            subscriptions: 64,
            tasks: 200_000,
            offers: 100_000,
            blob_bytes: 16 << 30,
            header_timeout: agora_proto::listen::FIRST_BYTES_WITHIN,
        }
    }
}

type Keyed = governor::DefaultKeyedRateLimiter<String>;

/// Callers seen before the limiter forgets those whose buckets are full again.
const PRUNE_AT: usize = 10_000;

/// The live side of [`Limits`]: the rate buckets and the subscriptions held.
pub struct Guard {
    pub limits: Limits,
    rate: Option<Keyed>,
    subscriptions: Mutex<HashMap<String, usize>>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Guard {
    #[must_use]
    pub fn new(limits: Limits) -> Arc<Guard> {
        let rate = NonZeroU32::new(limits.call_rate).map(|r| {
            let burst = NonZeroU32::new(limits.call_burst).unwrap_or(r);
            governor::RateLimiter::keyed(governor::Quota::per_second(r).allow_burst(burst))
        });
        Arc::new(Guard {
            limits,
            rate,
            subscriptions: Mutex::new(HashMap::new()),
        })
    }

    /// Counts one call of `caller` against its rate.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` past the rate.
    pub fn call(&self, caller: &str) -> Result<(), Status> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        if rate.len() > PRUNE_AT {
            rate.retain_recent();
        }
        // Keys are owned Strings; the lookup allocates only for a caller's first call of
        // a burst window, which is cheap next to the call itself.
        rate.check_key(&caller.to_owned()).map_err(|_| {
            Status::resource_exhausted(format!(
                "{caller} is calling faster than the {} calls a second (bursts of {}) a caller may make (--max-call-rate, --max-call-burst); slow down and retry",
                self.limits.call_rate, self.limits.call_burst
            ))
        })
    }

    /// Holds one of `caller`'s subscriptions until the returned slot is dropped.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the caller already holds as many as it may.
    pub fn subscribe(self: &Arc<Self>, caller: &str) -> Result<Slot, Status> {
        let max = self.limits.subscriptions;
        let mut held = self.held();
        let n = held.entry(caller.to_owned()).or_default();
        if max > 0 && *n >= max {
            return Err(Status::resource_exhausted(format!(
                "{caller} already holds {n} subscriptions, as many as a caller may (--max-subscriptions-per-principal {max}); end one first"
            )));
        }
        *n += 1;
        Ok(Slot {
            guard: Arc::clone(self),
            caller: caller.to_owned(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.subscriptions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The subscriptions `caller` holds now.
    pub fn subscriptions_of(&self, caller: &str) -> usize {
        self.held().get(caller).copied().unwrap_or(0)
    }
}

/// One subscription held; dropping it (the stream ended) frees it.
pub struct Slot {
    guard: Arc<Guard>,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.guard.held();
        if let Some(n) = held.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

/// Who a call counts against: its principal, else its peer's address.
pub fn caller(principal: Option<&str>, peer: Option<std::net::SocketAddr>) -> String {
    match (principal, peer) {
        (Some(p), _) => p.to_owned(),
        (None, Some(a)) => format!("address {}", a.ip()),
        (None, None) => "an unknown address".to_owned(),
    }
}

/// [`caller`] of a gRPC call, its principal from the [`crate::auth::Caller`] that
/// authentication left in its extensions.
pub fn caller_of<T>(request: &tonic::Request<T>) -> String {
    let principal = request.extensions().get::<crate::auth::Caller>();
    caller(
        principal.map(|c| c.0.as_str()),
        agora_proto::listen::remote_addr(request.extensions()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_refuses_past_the_burst_per_caller() {
        let g = Guard::new(Limits {
            call_rate: 1,
            call_burst: 3,
            ..Limits::default()
        });
        for _ in 0..3 {
            g.call("a").unwrap();
        }
        let e = g.call("a").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("--max-call-rate"), "{}", e.message());
        // Another caller has a bucket of its own.
        g.call("b").unwrap();
    }

    #[test]
    fn subscriptions_are_counted_until_their_slots_drop() {
        let g = Guard::new(Limits {
            subscriptions: 2,
            ..Limits::default()
        });
        let a = g.subscribe("p").unwrap();
        let _b = g.subscribe("p").unwrap();
        let e = g.subscribe("p").err().unwrap();
        assert!(e.message().contains("--max-subscriptions-per-principal 2"));
        g.subscribe("q").unwrap();
        drop(a);
        assert_eq!(g.subscriptions_of("p"), 1);
        let _c = g.subscribe("p").unwrap();
    }

    #[test]
    fn zero_turns_a_bound_off() {
        // A burst of 1 would refuse the second call, were the rate on.
        let g = Guard::new(Limits {
            call_rate: 0,
            call_burst: 1,
            subscriptions: 0,
            ..Limits::default()
        });
        for _ in 0..100 {
            g.call("a").unwrap();
        }
        let _slots: Vec<Slot> = (0..100).map(|_| g.subscribe("a").unwrap()).collect();
    }
}
