//! Compiled programs: in memory by the sha256 of their bytes ([`ProgramCache`]), and on
//! disk as wasmtime artifacts keyed by that sha256 and the engine's compatibility
//! fingerprint ([`DiskCache`]).
//!
//! A second launch of the same module skips compilation (tens of milliseconds for a typical
//! Rust module) and even linking; concurrent launches of a module not yet compiled wait for
//! one compilation instead of each doing it. Failures are not cached: the next launch tries
//! again. The least recently used program is dropped when the cache is full.
//!
//! On disk, an artifact is trusted only if it is whole: each file starts with a magic tag
//! and the sha256 of the rest, checked before wasmtime sees a byte (an artifact is native
//! code; a flipped bit would not be caught by wasmtime's own header checks). An artifact
//! from another engine configuration is refused by wasmtime's compatibility check. Either
//! way the entry is removed and the program compiled again.

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
    /// Loads that were not in memory (each successful or failed attempt counts): each was
    /// either read from the disk cache or compiled.
    pub compiles: u64,
    /// Programs held now.
    pub entries: usize,
    /// Programs read from the disk cache instead of compiled.
    pub disk_hits: u64,
    /// Disk cache entries found corrupt or incompatible, removed and rebuilt.
    pub disk_discarded: u64,
    /// Artifacts written to the disk cache.
    pub disk_writes: u64,
}

/// Compiled artifacts on disk under `<root>/<engine fingerprint>/`.
#[derive(Debug)]
pub struct DiskCache {
    dir: std::path::PathBuf,
    pub(crate) hits: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) writes: AtomicU64,
    seq: AtomicU64,
}

const MAGIC: &[u8; 8] = b"AGORACW1";

impl DiskCache {
    /// The cache of an engine with this `fingerprint` under `root`.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(root: &std::path::Path, fingerprint: &str) -> std::io::Result<DiskCache> {
        let dir = root.join(fingerprint);
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        // Artifacts are native code: only the agent's user may write them.
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700));
        Ok(DiskCache {
            dir,
            hits: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        })
    }

    /// Where the artifact of `digest` (`sha256:<hex>`) of this `kind` lives.
    pub fn path(&self, digest: &str, kind: &str) -> std::path::PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join(format!("{hex}.{kind}.cwasm"))
    }

    /// The artifact's bytes if a whole one is stored; a damaged one is removed and `None`
    /// returned.
    pub fn read(&self, digest: &str, kind: &str) -> Option<Vec<u8>> {
        use sha2::Digest;
        let path = self.path(digest, kind);
        let bytes = std::fs::read(&path).ok()?;
        let whole = bytes.len() >= MAGIC.len() + 32
            && &bytes[..MAGIC.len()] == MAGIC
            && sha2::Sha256::digest(&bytes[MAGIC.len() + 32..])[..]
                == bytes[MAGIC.len()..MAGIC.len() + 32];
        if !whole {
            tracing::warn!(path = %path.display(), "compiled-module cache entry is damaged; rebuilding it");
            self.discard(digest, kind);
            return None;
        }
        Some(bytes[MAGIC.len() + 32..].to_vec())
    }

    /// Removes an entry (damaged, or refused by wasmtime).
    pub fn discard(&self, digest: &str, kind: &str) {
        self.discarded.fetch_add(1, Ordering::Relaxed);
        let _ = std::fs::remove_file(self.path(digest, kind));
    }

    /// Stores an artifact atomically (temporary file, then rename); not fsynced.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self, digest: &str, kind: &str, artifact: &[u8]) -> std::io::Result<()> {
        use sha2::Digest;
        use std::io::Write;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&sha2::Sha256::digest(artifact))?;
            f.write_all(artifact)?;
            // No fsync: other processes see the file once renamed, and a file torn by a
            // crash fails the integrity check and is rebuilt — durability buys nothing here
            // and would sit in the cold-launch path.
            std::fs::rename(&tmp, self.path(digest, kind))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
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
            ..CacheStats::default()
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
