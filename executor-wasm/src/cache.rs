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
//!
//! The disk cache can be held to a byte bound ([`BoundedDir`]): after each write the least
//! recently used artifacts (by modification time, refreshed on every read) go first —
//! those of other engine configurations, never read again, are the oldest — but never one
//! that is pinned ([`DiskCache::pin`]: a task of this process uses it) nor the one just
//! written. The agent's module store uses the same [`BoundedDir`].

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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
    /// Artifacts removed to keep the disk cache under its bound.
    pub disk_evicted: u64,
}

/// A temporary file older than this was left by a writer that died: trimming removes it.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// Files of a directory (and of its subdirectories, one level down) held to a byte bound,
/// least recently used first, each named `<key>.<anything>` and pinned by key while in use.
///
/// "Used" is the file's modification time: [`BoundedDir::touch`] it on every use. Only
/// regular files count and only they are removed; links and deeper directories are left
/// alone. Files named `.tmp-…` are writes in progress, skipped until they are an hour old.
#[derive(Debug)]
pub struct BoundedDir {
    root: PathBuf,
    max_bytes: Option<u64>,
    pins: Mutex<HashMap<String, usize>>,
    /// One trim at a time.
    trimming: Mutex<()>,
    evicted: AtomicU64,
}

/// Keeps one key of a [`BoundedDir`] from being evicted while it lives.
#[derive(Debug)]
pub struct Pin {
    dir: Arc<BoundedDir>,
    key: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.dir.lock_pins();
        if let Some(n) = pins.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.key);
            }
        }
    }
}

/// The key of a file name: what comes before its first `.` (none for a hidden file).
fn key_of(name: &str) -> Option<&str> {
    let key = name.split('.').next()?;
    (!key.is_empty()).then_some(key)
}

/// What [`BoundedDir::trim`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Files removed.
    pub removed: u64,
    /// Bytes the directory holds afterwards.
    pub bytes: u64,
}

impl BoundedDir {
    /// `root`'s files, held to `max_bytes` (`None`: no bound).
    pub fn new(root: impl Into<PathBuf>, max_bytes: Option<u64>) -> Arc<BoundedDir> {
        Arc::new(BoundedDir {
            root: root.into(),
            max_bytes,
            pins: Mutex::new(HashMap::new()),
            trimming: Mutex::new(()),
            evicted: AtomicU64::new(0),
        })
    }

    fn lock_pins(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Counts only; a panic elsewhere cannot leave them half-updated.
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.max_bytes
    }

    /// Files removed by trimming so far.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Keeps the files of `key` while the returned pin lives.
    pub fn pin(self: &Arc<Self>, key: &str) -> Pin {
        *self.lock_pins().entry(key.to_owned()).or_default() += 1;
        Pin {
            dir: Arc::clone(self),
            key: key.to_owned(),
        }
    }

    /// Whether a pin of `key` lives.
    pub fn pinned(&self, key: &str) -> bool {
        self.lock_pins().contains_key(key)
    }

    /// Marks `path` as used now (best effort: a file removed meanwhile is no error).
    pub fn touch(path: &Path) {
        if let Ok(f) = std::fs::File::open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// The regular files under the root: (path, key, bytes, last use).
    fn files(&self, now: SystemTime) -> Vec<(PathBuf, String, u64, SystemTime)> {
        let mut out = Vec::new();
        let mut dirs = vec![(self.root.clone(), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                // `DirEntry::metadata` does not follow links.
                let Ok(m) = e.metadata() else { continue };
                let path = e.path();
                if m.is_dir() {
                    if depth == 0 {
                        dirs.push((path, 1));
                    }
                    continue;
                }
                if !m.is_file() {
                    continue;
                }
                let name = e.file_name();
                let name = name.to_string_lossy();
                let used = m.modified().unwrap_or(now);
                if name.starts_with(".tmp-") {
                    if now.duration_since(used).is_ok_and(|age| age >= STALE_TMP) {
                        let _ = std::fs::remove_file(&path);
                    }
                    continue;
                }
                if let Some(key) = key_of(&name) {
                    out.push((path, key.to_owned(), m.len(), used));
                }
            }
        }
        out
    }

    /// Removes least recently used files until the directory holds at most its bound,
    /// skipping pinned keys and `keep` (the file just written, which its writer is about
    /// to use). Without a bound, only stale temporary files go.
    pub fn trim(&self, keep: Option<&str>) -> Trimmed {
        let _turn = self.trimming.lock().unwrap_or_else(|p| p.into_inner());
        let mut files = self.files(SystemTime::now());
        let mut bytes: u64 = files.iter().map(|f| f.2).sum();
        let mut removed = 0;
        let Some(max) = self.max_bytes else {
            return Trimmed { removed, bytes };
        };
        files.sort_by_key(|f| f.3);
        for (path, key, len, _) in files {
            if bytes <= max {
                break;
            }
            if keep == Some(key.as_str()) || self.pinned(&key) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), bytes = len, "evicted to stay under the bound");
                    bytes -= len;
                    removed += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bytes -= len,
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "evicting a file"),
            }
        }
        self.evicted.fetch_add(removed, Ordering::Relaxed);
        if bytes > max {
            tracing::warn!(dir = %self.root.display(), bytes, max, "over its bound: what is left is in use");
        }
        Trimmed { removed, bytes }
    }
}

/// Compiled artifacts on disk under `<root>/<engine fingerprint>/`.
#[derive(Debug)]
pub struct DiskCache {
    dir: std::path::PathBuf,
    /// The whole root (every fingerprint's artifacts), under its bound.
    files: Arc<BoundedDir>,
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
        DiskCache::open_bounded(root, fingerprint, None)
    }

    /// As [`DiskCache::open`], the whole of `root` held to `max_bytes` (`None`: no bound).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open_bounded(
        root: &std::path::Path,
        fingerprint: &str,
        max_bytes: Option<u64>,
    ) -> std::io::Result<DiskCache> {
        let dir = root.join(fingerprint);
        std::fs::create_dir_all(&dir)?;
        use std::os::unix::fs::PermissionsExt;
        // Artifacts are native code: only the agent's user may write them.
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700));
        Ok(DiskCache {
            dir,
            files: BoundedDir::new(root, max_bytes),
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
        BoundedDir::touch(&path);
        Some(bytes[MAGIC.len() + 32..].to_vec())
    }

    /// Keeps the artifacts of `digest` from eviction while the pin lives.
    pub fn pin(&self, digest: &str) -> Pin {
        self.files
            .pin(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    /// Artifacts evicted to stay under the bound.
    pub fn evicted(&self) -> u64 {
        self.files.evicted()
    }

    /// Evicts least recently used artifacts (none pinned) until the cache is under its
    /// bound.
    pub fn trim(&self) -> Trimmed {
        self.files.trim(None)
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
            self.files
                .trim(Some(digest.strip_prefix("sha256:").unwrap_or(digest)));
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

    /// Forgets `digest` (a value whose backing is gone), unless it is being produced.
    pub fn remove(&self, digest: &str) {
        let mut inner = self.lock();
        if inner
            .slots
            .get(digest)
            .is_some_and(|s| s.cell.initialized())
        {
            inner.slots.remove(digest);
        }
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

    fn set_used(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs))
            .unwrap();
    }

    fn held(root: &Path) -> u64 {
        BoundedDir::new(root, None).trim(None).bytes
    }

    #[test]
    fn the_disk_cache_stays_under_its_bound_and_keeps_what_is_in_use() {
        let root = tempfile::tempdir().unwrap();
        // Each entry is 1,000 bytes of artifact plus the 40-byte tag and digest.
        let entry = 1040;
        let cache = DiskCache::open_bounded(root.path(), "fp", Some(3 * entry)).unwrap();
        // An artifact of an engine configuration no longer in use: the oldest of all.
        let foreign = root.path().join("old-fp");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("ffff.module.cwasm"), vec![0u8; 1000]).unwrap();
        set_used(&foreign.join("ffff.module.cwasm"), 0);
        // A link a writer of the directory might plant: neither followed nor counted.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), vec![1u8; 50_000]).unwrap();
        std::os::unix::fs::symlink(outside.path(), cache.dir.join("link.module.cwasm")).unwrap();

        let d = |i: usize| format!("sha256:{i:04}");
        let in_use = cache.pin(&d(0));
        for i in 0..8 {
            cache.write(&d(i), "module", &[i as u8; 1000]).unwrap();
            set_used(&cache.path(&d(i), "module"), 10 + i as u64);
            assert!(
                held(root.path()) <= 3 * entry,
                "over the bound after write {i}"
            );
        }
        // The pinned (and least recently used) entry survived; the newest did too.
        assert_eq!(cache.read(&d(0), "module").unwrap(), vec![0u8; 1000]);
        assert!(cache.path(&d(7), "module").exists());
        assert!(
            !foreign.join("ffff.module.cwasm").exists(),
            "stale engine's artifact kept"
        );
        assert!(!cache.path(&d(1), "module").exists());
        assert!(outside.path().exists());
        assert!(std::fs::symlink_metadata(cache.dir.join("link.module.cwasm")).is_ok());
        assert!(cache.evicted() >= 6);

        // Unpinned and least recently used, it goes at the next write; a read refreshes.
        drop(in_use);
        set_used(&cache.path(&d(0), "module"), 1);
        assert!(cache.read(&d(6), "module").is_some());
        cache.write(&d(8), "module", &[8u8; 1000]).unwrap();
        assert!(!cache.path(&d(0), "module").exists());
        assert!(cache.path(&d(6), "module").exists());
        assert!(held(root.path()) <= 3 * entry);
    }

    #[test]
    fn trimming_removes_only_stale_temporary_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = BoundedDir::new(root.path(), Some(0));
        std::fs::write(root.path().join(".tmp-new"), b"x").unwrap();
        std::fs::write(root.path().join(".tmp-old"), b"x").unwrap();
        set_used(&root.path().join(".tmp-old"), 0);
        dir.trim(None);
        assert!(root.path().join(".tmp-new").exists());
        assert!(!root.path().join(".tmp-old").exists());
    }
}
