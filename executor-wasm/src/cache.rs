//! Compiled programs, kept in memory by the sha256 of their bytes.
//!
//! A second launch of the same module skips compilation (tens of milliseconds for a typical
//! Rust module) and even linking; concurrent launches of a module not yet compiled wait for
//! one compilation instead of each doing it. Failures are not cached: the next launch tries
//! again. The least recently used program is dropped when the cache is full.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// Counters of the cache's work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Launches that found their program ready (or being compiled by another launch).
    pub hits: u64,
    /// Compilations performed (each successful or failed attempt counts).
    pub compiles: u64,
    /// Programs held now.
    pub entries: usize,
}

struct Slot<P> {
    cell: Arc<OnceCell<P>>,
    last_used: u64,
}

struct Inner<P> {
    slots: HashMap<String, Slot<P>>,
    clock: u64,
}

/// A bounded map from digest to a value produced once.
pub struct ProgramCache<P> {
    capacity: usize,
    inner: Mutex<Inner<P>>,
    hits: AtomicU64,
    compiles: AtomicU64,
}

impl<P: Clone> ProgramCache<P> {
    pub fn new(capacity: usize) -> Self {
        ProgramCache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                clock: 0,
            }),
            hits: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<P>> {
        // The map stays consistent even if a holder panicked: every update is a single insert
        // or remove.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ready value for `digest`, if any.
    pub fn get(&self, digest: &str) -> Option<P> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        let slot = inner.slots.get_mut(digest)?;
        let value = slot.cell.get()?.clone();
        slot.last_used = now;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(value)
    }

    /// The value for `digest`, produced by `load` if no other caller has produced it.
    ///
    /// # Errors
    /// What `load` returned; the slot is then left empty for the next caller.
    pub async fn get_or_load<E, F, Fut>(&self, digest: &str, load: F) -> Result<P, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<P, E>>,
    {
        let cell = {
            let mut inner = self.lock();
            inner.clock += 1;
            let now = inner.clock;
            let slot = inner
                .slots
                .entry(digest.to_owned())
                .or_insert_with(|| Slot {
                    cell: Arc::new(OnceCell::new()),
                    last_used: now,
                });
            slot.last_used = now;
            Arc::clone(&slot.cell)
        };
        let mut loaded_here = false;
        let result = cell
            .get_or_try_init(|| {
                loaded_here = true;
                load()
            })
            .await
            .cloned();
        if loaded_here {
            self.compiles.fetch_add(1, Ordering::Relaxed);
        } else {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = self.lock();
        if result.is_err()
            && let Some(slot) = inner.slots.get(digest)
            && Arc::ptr_eq(&slot.cell, &cell)
            && slot.cell.get().is_none()
        {
            inner.slots.remove(digest);
        }
        self.evict(&mut inner);
        result
    }

    fn evict(&self, inner: &mut Inner<P>) {
        while inner.slots.len() > self.capacity {
            let victim = inner
                .slots
                .iter()
                .filter(|(_, s)| s.cell.initialized())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    inner.slots.remove(&k);
                }
                // Everything left is being loaded right now; it is trimmed on a later call.
                None => break,
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            compiles: self.compiles.load(Ordering::Relaxed),
            entries: self.lock().slots.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loads_once_and_counts() {
        let cache = ProgramCache::<u32>::new(4);
        let v: Result<u32, ()> = cache.get_or_load("a", || async { Ok(1) }).await;
        assert_eq!(v, Ok(1));
        let v: Result<u32, ()> = cache
            .get_or_load("a", || async { panic!("must not load again") })
            .await;
        assert_eq!(v, Ok(1));
        assert_eq!(cache.get("a"), Some(1));
        let s = cache.stats();
        assert_eq!((s.compiles, s.hits, s.entries), (1, 2, 1));
    }

    #[tokio::test]
    async fn concurrent_loads_share_one_compilation() {
        let cache = Arc::new(ProgramCache::<u32>::new(4));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut joins = Vec::new();
        for _ in 0..8 {
            let (cache, gate) = (Arc::clone(&cache), Arc::clone(&gate));
            joins.push(tokio::spawn(async move {
                cache
                    .get_or_load("m", || async move {
                        gate.notified().await;
                        Ok::<_, ()>(7)
                    })
                    .await
            }));
        }
        tokio::task::yield_now().await;
        gate.notify_one();
        for j in joins {
            assert_eq!(j.await.unwrap(), Ok(7));
        }
        assert_eq!(cache.stats().compiles, 1);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_lru_is_evicted() {
        let cache = ProgramCache::<u32>::new(2);
        let e: Result<u32, &str> = cache.get_or_load("bad", || async { Err("nope") }).await;
        assert_eq!(e, Err("nope"));
        assert_eq!(cache.stats().entries, 0);
        for (k, v) in [("a", 1), ("b", 2)] {
            let _ = cache.get_or_load(k, || async move { Ok::<_, ()>(v) }).await;
        }
        assert_eq!(cache.get("a"), Some(1)); // "b" is now the least recently used
        let _ = cache.get_or_load("c", || async { Ok::<_, ()>(3) }).await;
        assert_eq!(cache.get("b"), None);
        assert_eq!(cache.get("a"), Some(1));
        assert_eq!(cache.get("c"), Some(3));
    }
}
