//! The fetcher: puts a task's artifacts (its `uris`) into its sandbox before it starts.
//!
//! ```text
//!  uri ──> http(s):// | file:// | sha256:<hex> (the masters' blob stores, each in turn)
//!           │
//!           ├─ cache = false: stream into the sandbox, hashing as it goes
//!           └─ cache = true:  one download per URI at a time (later fetchers wait for it),
//!                             kept in <work_dir>/fetch-cache, evicted least recently used
//!                             first once the cache is over its size bound
//!  then: verify sha256 ──> extract (.tar, .tar.gz, .tgz, .zip) or copy ──> chmod +x
//! ```
//!
//! Archives are unpacked entry by entry: an entry that climbs out of the sandbox (`..`, an
//! absolute path, a symlink planted earlier), a device node, or more bytes than the task's
//! budget fails the fetch. Every failure names the URI and the cause; the agent reports it
//! as TASK_FAILED with REASON_FETCHER_FAILED.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use agora_archive::{Kind, create_nofollow, extract};
use agora_proto::v1;
use sha2::{Digest, Sha256};

/// Settings of the fetcher.
#[derive(Debug, Clone)]
pub struct FetcherConfig {
    /// Most bytes the cache holds. Default 2 GiB.
    pub cache_max_bytes: u64,
    /// A whole fetch (connect, download) may take this long. Default 5 min.
    pub timeout: Duration,
    /// Most bytes one task may fetch and unpack, unless its `disk` resource says less.
    /// Default 16 GiB.
    pub max_task_bytes: u64,
    /// Directories `file://` URIs may name (the fetcher runs as the agent's user, so a
    /// task could otherwise have any file of the host copied into its sandbox). Default:
    /// none, and `file://` is refused.
    pub file_roots: Vec<PathBuf>,
    /// Fetch from the masters over TLS: trust the cluster CA and present the agent's
    /// certificate. The agent sets it from its own TLS. Default none.
    pub masters_tls: Option<agora_proto::tls::Credentials>,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        FetcherConfig {
            cache_max_bytes: 2 << 30,
            timeout: Duration::from_secs(300),
            max_task_bytes: 16 << 30,
            file_roots: Vec::new(),
            masters_tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("fetching {uri}: {cause}")]
    Fetch { uri: String, cause: String },
    #[error("fetching {uri}: sha256 mismatch: expected {expected}, got {actual}")]
    Digest {
        uri: String,
        expected: String,
        actual: String,
    },
}

fn fail(uri: &str, cause: impl std::fmt::Display) -> FetchError {
    FetchError::Fetch {
        uri: uri.to_owned(),
        cause: cause.to_string(),
    }
}

/// Counters since the agent started, and the cache's size now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Cached fetches served without a download.
    pub cache_hits: u64,
    /// Cached fetches that had to download.
    pub cache_misses: u64,
    /// Downloads (or file copies) made, cached or not.
    pub downloads: u64,
    pub downloaded_bytes: u64,
    pub evictions: u64,
    pub failures: u64,
    pub cache_bytes: u64,
    pub cache_entries: u64,
}

impl FetchStats {
    /// As `agora_agent_fetcher_*` metrics.
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![
            (
                "agora_agent_fetcher_cache_hits_total",
                self.cache_hits as f64,
            ),
            (
                "agora_agent_fetcher_cache_misses_total",
                self.cache_misses as f64,
            ),
            ("agora_agent_fetcher_downloads_total", self.downloads as f64),
            (
                "agora_agent_fetcher_downloaded_bytes_total",
                self.downloaded_bytes as f64,
            ),
            (
                "agora_agent_fetcher_cache_evictions_total",
                self.evictions as f64,
            ),
            ("agora_agent_fetcher_failures_total", self.failures as f64),
            ("agora_agent_fetcher_cache_bytes", self.cache_bytes as f64),
            (
                "agora_agent_fetcher_cache_entries",
                self.cache_entries as f64,
            ),
        ]
    }
}

struct Entry {
    path: PathBuf,
    size: u64,
    sha256: String,
    last_used: u64,
    /// Fetches copying out of this entry now; a pinned entry is never evicted.
    pins: u32,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    bytes: u64,
    clock: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    downloads: AtomicU64,
    bytes: AtomicU64,
    evictions: AtomicU64,
    failures: AtomicU64,
}

struct Inner {
    config: FetcherConfig,
    dir: PathBuf,
    /// The masters, tried in turn for a blob: each serves its own store.
    masters: Vec<String>,
    http: reqwest::Client,
    /// For the masters' blob stores: over TLS, trusting only the cluster CA and presenting
    /// the agent's certificate (never to other servers).
    masters_http: reqwest::Client,
    cache: Mutex<Cache>,
    /// One lock per URI being fetched into the cache, so it is downloaded once.
    flights: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    counters: Counters,
    seq: AtomicU64,
}

/// Fetches URIs into sandboxes through a bounded cache. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// A cached file pinned against eviction while it is read.
struct Pinned {
    fetcher: Fetcher,
    key: String,
    path: PathBuf,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Ok(mut c) = self.fetcher.inner.cache.lock()
            && let Some(e) = c.entries.get_mut(&self.key)
            && e.path == self.path
        {
            e.pins = e.pins.saturating_sub(1);
        }
    }
}

/// Where a fetched file's bytes are before they go into the sandbox.
enum Source {
    Cached(Pinned),
    /// A download that did not go into the cache; removed once used.
    Temp(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Cached(p) => &p.path,
            Source::Temp(p) => p,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Source::Temp(p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `sha256:<hex>` or `<hex>` as lowercase hex, or `None` when it is not a sha256.
fn parse_sha256(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// The file name a URI gets in the sandbox.
fn output_name(uri: &v1::Uri) -> Result<String, FetchError> {
    let name = if uri.output_file.is_empty() {
        let path = uri.value.split(['?', '#']).next().unwrap_or_default();
        path.rsplit('/').next().unwrap_or_default().to_owned()
    } else {
        uri.output_file.clone()
    };
    let ok = !name.is_empty()
        && Path::new(&name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(name)
    } else {
        Err(fail(
            &uri.value,
            format!(
                "cannot name the fetched file {name:?}: give an output_file that is a relative path inside the sandbox"
            ),
        ))
    }
}

impl Fetcher {
    /// A fetcher whose cache lives in `dir` (emptied now: the cache does not outlive the
    /// agent) and which fetches `sha256:` URIs from the blob stores of `master` (one
    /// address, or a comma-separated list of masters, tried in turn).
    ///
    /// # Errors
    /// When the list names no master, the directory cannot be prepared or the HTTP client
    /// cannot be built.
    pub fn new(
        dir: impl Into<PathBuf>,
        master: impl Into<String>,
        config: FetcherConfig,
    ) -> io::Result<Fetcher> {
        let masters = agora_proto::leader::masters(&master.into())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Self::with_masters(dir, masters, config)
    }

    /// [`Fetcher::new`] with the masters' URLs (with scheme) already parsed.
    ///
    /// # Errors
    /// When the directory cannot be prepared or the HTTP client cannot be built.
    pub fn with_masters(
        dir: impl Into<PathBuf>,
        masters: Vec<String>,
        config: FetcherConfig,
    ) -> io::Result<Fetcher> {
        let dir = dir.into();
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let builder = || {
            reqwest::Client::builder()
                .timeout(config.timeout)
                .connect_timeout(Duration::from_secs(10).min(config.timeout))
        };
        let http = builder().build().map_err(io::Error::other)?;
        let mut masters_http = builder();
        if let Some(tls) = &config.masters_tls {
            let ca = reqwest::Certificate::from_pem(&tls.ca).map_err(io::Error::other)?;
            masters_http = masters_http.tls_certs_only([ca]);
            if let Some(id) = &tls.identity {
                let pem = [id.cert.as_slice(), id.key.as_slice()].concat();
                masters_http = masters_http
                    .identity(reqwest::Identity::from_pem(&pem).map_err(io::Error::other)?);
            }
        }
        let masters_http = masters_http.build().map_err(io::Error::other)?;
        let tls = config.masters_tls.is_some();
        Ok(Fetcher {
            inner: Arc::new(Inner {
                config,
                dir,
                masters: masters
                    .into_iter()
                    .map(|m| {
                        let m = m.trim_end_matches('/');
                        match m.strip_prefix("http://") {
                            Some(rest) if tls => format!("https://{rest}"),
                            _ => m.to_owned(),
                        }
                    })
                    .collect(),
                http,
                masters_http,
                cache: Mutex::new(Cache::default()),
                flights: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                seq: AtomicU64::new(0),
            }),
        })
    }

    pub fn stats(&self) -> FetchStats {
        let c = &self.inner.counters;
        let (cache_bytes, cache_entries) = self
            .inner
            .cache
            .lock()
            .map(|c| (c.bytes, c.entries.len() as u64))
            .unwrap_or_default();
        FetchStats {
            cache_hits: c.hits.load(Ordering::Relaxed),
            cache_misses: c.misses.load(Ordering::Relaxed),
            downloads: c.downloads.load(Ordering::Relaxed),
            downloaded_bytes: c.bytes.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            cache_bytes,
            cache_entries,
        }
    }

    /// Fetches every URI into `dest` in order, within `budget` bytes in all (downloads and
    /// unpacked files).
    ///
    /// # Errors
    /// The first URI that fails, with its cause.
    pub async fn fetch_all(
        &self,
        uris: &[v1::Uri],
        dest: &Path,
        budget: Option<u64>,
    ) -> Result<(), FetchError> {
        let mut left = budget
            .unwrap_or(u64::MAX)
            .min(self.inner.config.max_task_bytes);
        for uri in uris {
            let used = self.fetch(uri, dest, left).await?;
            left = left.saturating_sub(used);
        }
        Ok(())
    }

    /// Fetches one URI into `dest`; returns the bytes it put there.
    ///
    /// # Errors
    /// When the URI is malformed, cannot be read, does not match its sha256, or does not
    /// unpack inside `dest` within `budget`.
    pub async fn fetch(&self, uri: &v1::Uri, dest: &Path, budget: u64) -> Result<u64, FetchError> {
        let result = self.fetch_inner(uri, dest, budget).await;
        if result.is_err() {
            self.inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// The bytes of one URI, through the cache: for Wasm modules named by URL.
    ///
    /// # Errors
    /// As [`Fetcher::fetch`].
    pub async fn read(&self, uri: &v1::Uri, budget: u64) -> Result<Vec<u8>, FetchError> {
        let result = async {
            let expected = self.expected(uri)?;
            let source = if uri.cache || uri.value.starts_with("sha256:") {
                self.cached(uri, expected.as_deref(), budget).await?
            } else {
                self.download_temp(uri, expected.as_deref(), budget).await?
            };
            let path = source.path().to_owned();
            tokio::task::spawn_blocking(move || {
                let _keep = source;
                std::fs::read(path)
            })
            .await
            .map_err(|e| fail(&uri.value, e))?
            .map_err(|e| fail(&uri.value, e))
        }
        .await;
        if result.is_err() {
            self.inner.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn expected(&self, uri: &v1::Uri) -> Result<Option<String>, FetchError> {
        let given = if uri.sha256.is_empty() {
            None
        } else {
            Some(parse_sha256(&uri.sha256).ok_or_else(|| {
                fail(
                    &uri.value,
                    format!("{:?} is not a sha256 (sha256:<64 hex digits>)", uri.sha256),
                )
            })?)
        };
        if let Some(rest) = uri.value.strip_prefix("sha256:") {
            let digest = parse_sha256(rest)
                .ok_or_else(|| fail(&uri.value, "a blob URI is sha256:<64 hex digits>"))?;
            if given.as_ref().is_some_and(|g| *g != digest) {
                return Err(fail(
                    &uri.value,
                    format!("its sha256 field {} names another blob", uri.sha256),
                ));
            }
            return Ok(Some(digest));
        }
        Ok(given)
    }

    async fn fetch_inner(
        &self,
        uri: &v1::Uri,
        dest: &Path,
        budget: u64,
    ) -> Result<u64, FetchError> {
        let expected = self.expected(uri)?;
        let name = output_name(uri)?;
        let kind = if uri.extract { Kind::of(&name) } else { None };
        if uri.extract && kind.is_none() {
            return Err(fail(
                &uri.value,
                format!("cannot extract {name:?}: not a .tar, .tar.gz, .tgz or .zip archive"),
            ));
        }
        let content_addressed = uri.value.starts_with("sha256:");
        if !uri.cache && !content_addressed && kind.is_none() {
            // Straight into the sandbox.
            let target = dest.join(&name);
            let size = self
                .download(uri, &target, expected.as_deref(), budget)
                .await?;
            set_executable(&target, uri.executable).map_err(|e| fail(&uri.value, e))?;
            return Ok(size);
        }
        let source = if uri.cache || content_addressed {
            self.cached(uri, expected.as_deref(), budget).await?
        } else {
            self.download_temp(uri, expected.as_deref(), budget).await?
        };
        let dest = dest.to_owned();
        let value = uri.value.clone();
        let executable = uri.executable;
        tokio::task::spawn_blocking(move || -> Result<u64, FetchError> {
            let from = source.path();
            match kind {
                Some(kind) => extract(kind, from, &dest, budget).map_err(|e| fail(&value, e)),
                None => {
                    let target = dest.join(&name);
                    if let Some(parent) = target.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| fail(&value, e))?;
                    }
                    let len = std::fs::metadata(from).map_err(|e| fail(&value, e))?.len();
                    if len > budget {
                        return Err(fail(
                            &value,
                            format!("larger than the {budget} bytes this task may fetch"),
                        ));
                    }
                    let (size, _) =
                        copy_hashing(from, &target, budget).map_err(|e| fail(&value, e))?;
                    set_executable(&target, executable).map_err(|e| fail(&value, e))?;
                    Ok(size)
                }
            }
        })
        .await
        .map_err(|e| fail(&uri.value, e))?
    }

    fn temp_path(&self) -> PathBuf {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .dir
            .join(format!(".partial-{}-{n}", std::process::id()))
    }

    async fn download_temp(
        &self,
        uri: &v1::Uri,
        expected: Option<&str>,
        budget: u64,
    ) -> Result<Source, FetchError> {
        let tmp = self.temp_path();
        match self.download(uri, &tmp, expected, budget).await {
            Ok(_) => Ok(Source::Temp(tmp)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// The cache entry for `uri`, downloading it first if needed (once, however many ask
    /// at the same time).
    async fn cached(
        &self,
        uri: &v1::Uri,
        expected: Option<&str>,
        budget: u64,
    ) -> Result<Source, FetchError> {
        let key = uri.value.clone();
        let flight = {
            let mut flights = self
                .inner
                .flights
                .lock()
                .map_err(|_| fail(&key, "the fetcher's state is poisoned"))?;
            flights.retain(|_, w| w.strong_count() > 0);
            match flights.get(&key).and_then(Weak::upgrade) {
                Some(f) => f,
                None => {
                    let f = Arc::new(tokio::sync::Mutex::new(()));
                    flights.insert(key.clone(), Arc::downgrade(&f));
                    f
                }
            }
        };
        let _turn = flight.lock().await;
        if let Some(pinned) = self.pin(&key, expected) {
            self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Source::Cached(pinned));
        }
        self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
        let tmp = self.temp_path();
        let size = match self.download(uri, &tmp, expected, budget).await {
            Ok(size) => size,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let sha = match expected {
            Some(s) => s.to_owned(),
            None => {
                let tmp = tmp.clone();
                tokio::task::spawn_blocking(move || hash_file(&tmp))
                    .await
                    .map_err(|e| fail(&key, e))?
                    .map_err(|e| fail(&key, e))?
            }
        };
        Ok(self.insert(key, tmp, size, sha))
    }

    /// Pins a cache entry whose content matches `expected` (when given); an entry that
    /// does not match is dropped so that it is downloaded again.
    fn pin(&self, key: &str, expected: Option<&str>) -> Option<Pinned> {
        let mut c = self.inner.cache.lock().ok()?;
        c.clock += 1;
        let now = c.clock;
        let stale = {
            let e = c.entries.get_mut(key)?;
            if expected.is_none_or(|x| x == e.sha256) && e.path.exists() {
                e.last_used = now;
                e.pins += 1;
                return Some(Pinned {
                    fetcher: self.clone(),
                    key: key.to_owned(),
                    path: e.path.clone(),
                });
            }
            e.pins == 0
        };
        if stale && let Some(e) = c.entries.remove(key) {
            c.bytes -= e.size;
            let _ = std::fs::remove_file(&e.path);
        }
        None
    }

    /// Puts a finished download into the cache, evicting the least recently used unpinned
    /// entries to make room; a file that cannot fit is used once and not kept.
    fn insert(&self, key: String, tmp: PathBuf, size: u64, sha256: String) -> Source {
        let Ok(mut c) = self.inner.cache.lock() else {
            return Source::Temp(tmp);
        };
        let max = self.inner.config.cache_max_bytes;
        match c.entries.get(&key) {
            // Someone is still copying the old content out: leave it, use this one once.
            Some(old) if old.pins > 0 => return Source::Temp(tmp),
            Some(_) => {
                if let Some(old) = c.entries.remove(&key) {
                    c.bytes -= old.size;
                    let _ = std::fs::remove_file(&old.path);
                }
            }
            None => {}
        }
        let evictable: u64 = c
            .entries
            .values()
            .filter(|e| e.pins == 0)
            .map(|e| e.size)
            .sum();
        if size > max || c.bytes - evictable + size > max {
            tracing::info!(uri = %key, size, max, "artifact does not fit in the fetch cache; not kept");
            return Source::Temp(tmp);
        }
        while c.bytes + size > max {
            let Some(victim) = c
                .entries
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = c.entries.remove(&victim) {
                c.bytes -= e.size;
                let _ = std::fs::remove_file(&e.path);
                self.inner
                    .counters
                    .evictions
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(uri = %victim, size = e.size, "evicted from the fetch cache");
            }
        }
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.inner.dir.join(format!("{sha256}-{n}"));
        if let Err(e) = std::fs::rename(&tmp, &path) {
            tracing::warn!(error = %e, "moving a download into the fetch cache");
            return Source::Temp(tmp);
        }
        c.clock += 1;
        let now = c.clock;
        c.bytes += size;
        c.entries.insert(
            key.clone(),
            Entry {
                path: path.clone(),
                size,
                sha256,
                last_used: now,
                pins: 1,
            },
        );
        Source::Cached(Pinned {
            fetcher: self.clone(),
            key,
            path,
        })
    }

    /// Downloads `uri` to `target`, hashing as it goes; fails past `budget` bytes or on a
    /// sha256 mismatch (and then removes what it wrote).
    async fn download(
        &self,
        uri: &v1::Uri,
        target: &Path,
        expected: Option<&str>,
        budget: u64,
    ) -> Result<u64, FetchError> {
        let value = uri.value.as_str();
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(value, e))?;
        }
        let result = if let Some(path) = value.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(fail(
                    value,
                    "a file:// URI needs an absolute path (file:///…)",
                ));
            }
            let real = std::fs::canonicalize(path).map_err(|e| fail(value, e))?;
            if !self
                .inner
                .config
                .file_roots
                .iter()
                .any(|r| real.starts_with(r))
            {
                return Err(fail(
                    value,
                    if self.inner.config.file_roots.is_empty() {
                        "file:// URIs are off on this agent (allow directories with --fetcher-file-root)".to_owned()
                    } else {
                        format!(
                            "{} is outside the directories this agent fetches files from ({})",
                            real.display(),
                            self.inner
                                .config
                                .file_roots
                                .iter()
                                .map(|r| r.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                ));
            }
            let (from, to) = (real, target.to_owned());
            tokio::task::spawn_blocking(move || copy_hashing(&from, &to, budget))
                .await
                .map_err(|e| fail(value, e))
                .and_then(|r| r.map_err(|e| fail(value, e)))
        } else {
            self.http_get(value, target, budget).await
        };
        let result = result.and_then(|(size, actual)| match expected {
            Some(x) if x != actual => Err(FetchError::Digest {
                uri: value.to_owned(),
                expected: format!("sha256:{x}"),
                actual: format!("sha256:{actual}"),
            }),
            _ => Ok(size),
        });
        match result {
            Ok(size) => {
                self.inner
                    .counters
                    .downloads
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.counters.bytes.fetch_add(size, Ordering::Relaxed);
                Ok(size)
            }
            Err(e) => {
                let _ = std::fs::remove_file(target);
                Err(e)
            }
        }
    }

    /// GETs an http(s) URL, or a blob of the masters' stores, into `target`; returns its
    /// size and sha256. A blob is asked of each master in turn until one serves it.
    async fn http_get(
        &self,
        value: &str,
        target: &Path,
        budget: u64,
    ) -> Result<(u64, String), FetchError> {
        if let Some(digest) = value.strip_prefix("sha256:") {
            let mut missed = Vec::new();
            for master in &self.inner.masters {
                let url = format!("{master}/blobs/sha256:{digest}");
                match self
                    .get(&self.inner.masters_http, &url, value, target, budget)
                    .await
                {
                    Ok(got) => return Ok(got),
                    Err(Get::Failed(e)) => return Err(e),
                    Err(Get::Missed { status, why }) => {
                        let why = if status == Some(reqwest::StatusCode::NOT_FOUND) {
                            "the master's blob store has no such blob".to_owned()
                        } else {
                            why
                        };
                        tracing::debug!(%master, uri = %value, %why, "blob not fetched here");
                        missed.push((master, why));
                    }
                }
            }
            return Err(fail(
                value,
                match missed.as_slice() {
                    [(_, why)] => why.clone(),
                    _ => format!(
                        "no master served it: {}",
                        missed
                            .iter()
                            .map(|(m, why)| format!("{m}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                },
            ));
        }
        if !(value.starts_with("http://") || value.starts_with("https://")) {
            return Err(fail(
                value,
                "unsupported URI scheme (use http://, https://, file:// or sha256:)",
            ));
        }
        self.get(&self.inner.http, value, value, target, budget)
            .await
            .map_err(|e| match e {
                Get::Failed(e) => e,
                Get::Missed { why, .. } => fail(value, why),
            })
    }

    /// GETs `url` (for the URI `value`) into `target`.
    async fn get(
        &self,
        client: &reqwest::Client,
        url: &str,
        value: &str,
        target: &Path,
        budget: u64,
    ) -> Result<(u64, String), Get> {
        let missed = |why: String| Get::Missed { status: None, why };
        let mut response = client
            .get(url)
            .send()
            .await
            .map_err(|e| missed(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Get::Missed {
                status: Some(status),
                why: format!("the server answered {status}"),
            });
        }
        let too_big = || {
            Get::Failed(fail(
                value,
                format!("larger than the {budget} bytes this task may fetch"),
            ))
        };
        if response.content_length().is_some_and(|l| l > budget) {
            return Err(too_big());
        }
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(target)
            .await
            .map_err(|e| Get::Failed(fail(value, e)))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| missed(error_chain(&e)))?
        {
            size += chunk.len() as u64;
            if size > budget {
                return Err(too_big());
            }
            hasher.update(&chunk);
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                .await
                .map_err(|e| Get::Failed(fail(value, e)))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut out)
            .await
            .map_err(|e| Get::Failed(fail(value, e)))?;
        Ok((size, hex::encode(hasher.finalize())))
    }
}

/// Why a GET did not fetch.
enum Get {
    /// This server did not serve it (unreachable, an error status, a broken body): another
    /// may.
    Missed {
        status: Option<reqwest::StatusCode>,
        why: String,
    },
    /// The fetch itself fails (too large, the sandbox cannot be written).
    Failed(FetchError),
}

/// Copies `from` to `to` within `budget` bytes; returns the size and sha256.
fn copy_hashing(from: &Path, to: &Path, budget: u64) -> Result<(u64, String), String> {
    let mut file = std::fs::File::open(from).map_err(|e| e.to_string())?;
    let mut out = create_nofollow(to).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > budget {
            return Err(format!(
                "larger than the {budget} bytes this task may fetch"
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// reqwest's top-level messages ("error sending request") hide the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

fn set_executable(path: &Path, executable: bool) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if executable {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(value: &str) -> v1::Uri {
        v1::Uri {
            value: value.into(),
            ..Default::default()
        }
    }

    fn sha(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    fn fetcher(dir: &Path, max: u64) -> Fetcher {
        Fetcher::new(
            dir.join("cache"),
            "http://127.0.0.1:1",
            FetcherConfig {
                cache_max_bytes: max,
                file_roots: vec![std::fs::canonicalize(dir).unwrap()],
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn file_uri(path: &Path) -> String {
        format!("file://{}", path.display())
    }

    #[test]
    fn output_names_come_from_the_uri_or_the_field() {
        assert_eq!(
            output_name(&uri("http://h/a/b/tool.tgz?x=1")).unwrap(),
            "tool.tgz"
        );
        let mut u = uri("http://h/a/");
        assert!(output_name(&u).is_err());
        u.output_file = "bin/tool".into();
        assert_eq!(output_name(&u).unwrap(), "bin/tool");
        u.output_file = "../escape".into();
        assert!(
            output_name(&u)
                .unwrap_err()
                .to_string()
                .contains("inside the sandbox")
        );
        u.output_file = "/etc/passwd".into();
        assert!(output_name(&u).is_err());
    }

    #[test]
    fn digests_parse() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_sha256(&format!("sha256:{hex}")), Some(hex.clone()));
        assert_eq!(parse_sha256(&hex.to_uppercase()), Some(hex));
        assert_eq!(parse_sha256("sha256:abc"), None);
    }

    /// A blob store on loopback that serves `blob` (or answers 404 to everything); closes
    /// each connection after one answer.
    async fn blob_store(blob: Option<&'static [u8]>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = match blob {
                    Some(b) => {
                        let mut a = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            b.len()
                        )
                        .into_bytes();
                        a.extend_from_slice(b);
                        a
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = conn.write_all(&answer).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_blob_is_fetched_from_the_first_master_that_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let without = blob_store(None).await;
        let with = blob_store(Some(b"module bytes")).await;
        let digest = sha(b"module bytes");
        let masters = format!("{dead},{without},{with}");
        let f = Fetcher::new(dir.path().join("c"), masters, FetcherConfig::default()).unwrap();
        let sandbox = dir.path().join("sandbox");
        let mut u = uri(&digest);
        u.output_file = "m.wasm".into();
        f.fetch_all(&[u.clone()], &sandbox, None).await.unwrap();
        assert_eq!(
            std::fs::read(sandbox.join("m.wasm")).unwrap(),
            b"module bytes"
        );

        // No master has it: the error names each and why.
        let f = Fetcher::new(
            dir.path().join("c2"),
            format!("{dead},{without}"),
            FetcherConfig::default(),
        )
        .unwrap();
        let err = f
            .fetch_all(&[u], &sandbox, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no master served it"), "{err}");
        assert!(err.contains(&format!("{dead}: ")), "{err}");
        assert!(
            err.contains(&format!(
                "{without}: the master's blob store has no such blob"
            )),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_file_is_copied_verified_and_made_executable() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("tool.sh");
        std::fs::write(&src, b"#!/bin/sh\necho hi\n").unwrap();
        let f = fetcher(dir.path(), 1 << 20);
        let sandbox = dir.path().join("sandbox");
        let mut u = uri(&file_uri(&src));
        u.executable = true;
        u.sha256 = sha(b"#!/bin/sh\necho hi\n");
        f.fetch_all(&[u.clone()], &sandbox, None).await.unwrap();
        let meta = std::fs::metadata(sandbox.join("tool.sh")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);

        u.sha256 = sha(b"something else");
        let err = f.fetch_all(&[u], &sandbox, None).await.unwrap_err();
        assert!(matches!(err, FetchError::Digest { .. }), "{err}");
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(
            !sandbox.join("tool.sh").exists(),
            "a bad download is removed"
        );
        assert_eq!(f.stats().failures, 1);
    }

    #[tokio::test]
    async fn bad_uris_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 1 << 20);
        let s = dir.path().join("s");
        for (value, needle) in [
            ("ftp://h/x", "unsupported URI scheme"),
            ("file://relative/x", "absolute path"),
            ("file:///no/such/file", "No such file"),
            ("sha256:123", "64 hex digits"),
            ("http://127.0.0.1:1/x", "fetching http://127.0.0.1:1/x"),
        ] {
            let err = f.fetch(&uri(value), &s, u64::MAX).await.unwrap_err();
            assert!(err.to_string().contains(needle), "{value}: {err}");
        }
        let mut u = uri("file:///etc/hostname");
        u.extract = true;
        let err = f.fetch(&u, &s, u64::MAX).await.unwrap_err();
        assert!(err.to_string().contains("not a .tar"), "{err}");
        // Files outside the agent's file roots are not the fetcher's to copy.
        let err = f
            .fetch(&uri("file:///etc/hostname"), &s, u64::MAX)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("outside the directories"), "{err}");
        let closed =
            Fetcher::new(dir.path().join("c2"), "http://x", FetcherConfig::default()).unwrap();
        let err = closed
            .fetch(&uri("file:///etc/hostname"), &s, u64::MAX)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("file:// URIs are off"), "{err}");
    }

    #[tokio::test]
    async fn the_cache_serves_repeats_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 250);
        let files: Vec<PathBuf> = (0..3)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, vec![b'a' + i as u8; 100]).unwrap();
                p
            })
            .collect();
        let cached = |p: &Path| v1::Uri {
            value: file_uri(p),
            cache: true,
            ..Default::default()
        };
        let s = dir.path().join("s");
        f.fetch(&cached(&files[0]), &s, u64::MAX).await.unwrap();
        f.fetch(&cached(&files[1]), &s, u64::MAX).await.unwrap();
        f.fetch(&cached(&files[0]), &s, u64::MAX).await.unwrap();
        let st = f.stats();
        assert_eq!((st.cache_hits, st.cache_misses, st.downloads), (1, 2, 2));
        assert_eq!((st.cache_entries, st.cache_bytes), (2, 200));
        // f1 is the least recently used: it goes to make room for f2.
        f.fetch(&cached(&files[2]), &s, u64::MAX).await.unwrap();
        let st = f.stats();
        assert_eq!(
            (st.evictions, st.cache_entries, st.cache_bytes),
            (1, 2, 200)
        );
        f.fetch(&cached(&files[0]), &s, u64::MAX).await.unwrap();
        assert_eq!(f.stats().cache_hits, 2);
        f.fetch(&cached(&files[1]), &s, u64::MAX).await.unwrap();
        assert_eq!(f.stats().cache_misses, 4);
        // The cache directory holds exactly what the index says.
        let on_disk: u64 = std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, f.stats().cache_bytes);

        // Too big for the cache: fetched, not kept.
        let big = dir.path().join("big");
        std::fs::write(&big, vec![0u8; 300]).unwrap();
        f.fetch(&cached(&big), &s, u64::MAX).await.unwrap();
        assert_eq!(std::fs::metadata(s.join("big")).unwrap().len(), 300);
        assert!(f.stats().cache_bytes <= 250);
    }

    #[tokio::test]
    async fn a_changed_expectation_refetches_instead_of_trusting_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 1 << 20);
        let p = dir.path().join("data");
        std::fs::write(&p, b"one").unwrap();
        let mut u = v1::Uri {
            value: file_uri(&p),
            cache: true,
            ..Default::default()
        };
        let s = dir.path().join("s");
        f.fetch(&u, &s, u64::MAX).await.unwrap();
        std::fs::write(&p, b"two").unwrap();
        u.sha256 = sha(b"two");
        f.fetch(&u, &s, u64::MAX).await.unwrap();
        assert_eq!(std::fs::read(s.join("data")).unwrap(), b"two");
        assert_eq!(f.stats().cache_misses, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_of_one_uri_download_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 64 << 20);
        let p = dir.path().join("blob");
        std::fs::write(&p, vec![7u8; 8 << 20]).unwrap();
        let u = v1::Uri {
            value: file_uri(&p),
            cache: true,
            ..Default::default()
        };
        let mut joins = Vec::new();
        for i in 0..8 {
            let (f, u) = (f.clone(), u.clone());
            let s = dir.path().join(format!("s{i}"));
            joins.push(tokio::spawn(async move { f.fetch(&u, &s, u64::MAX).await }));
        }
        for j in joins {
            j.await.unwrap().unwrap();
        }
        let st = f.stats();
        assert_eq!((st.downloads, st.cache_misses, st.cache_hits), (1, 1, 7));
    }

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[tokio::test]
    async fn archives_unpack_inside_the_sandbox_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 1 << 20);
        let good = dir.path().join("good.tar.gz");
        std::fs::write(
            &good,
            tar_gz(&[("bin/run.sh", b"echo ok"), ("data.txt", b"x")]),
        )
        .unwrap();
        let s = dir.path().join("s");
        let mut u = uri(&file_uri(&good));
        u.extract = true;
        f.fetch(&u, &s, u64::MAX).await.unwrap();
        assert_eq!(std::fs::read(s.join("bin/run.sh")).unwrap(), b"echo ok");
        assert!(
            !s.join("good.tar.gz").exists(),
            "the archive itself is not kept"
        );

        // A header naming ../ (written raw: the tar builder refuses such names).
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escaped.sh");
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 512]);
        raw.extend_from_slice(&[0; 1024]);
        let evil = dir.path().join("evil.tar");
        std::fs::write(&evil, raw).unwrap();
        let mut u = uri(&file_uri(&evil));
        u.extract = true;
        let err = f.fetch(&u, &s, u64::MAX).await.unwrap_err();
        assert!(err.to_string().contains("leaves the sandbox"), "{err}");
        assert!(!dir.path().join("escaped.sh").exists());

        // A symlink to / followed by a file written through it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_cksum();
        b.append_link(&mut h, "root", "/").unwrap();
        let evil = dir.path().join("link.tar");
        std::fs::write(&evil, b.into_inner().unwrap()).unwrap();
        let mut u = uri(&file_uri(&evil));
        u.extract = true;
        let err = f.fetch(&u, &s, u64::MAX).await.unwrap_err();
        assert!(err.to_string().contains("links outside"), "{err}");

        // A link that looks shallow but is not: `a -> .` makes `a/a/a/x` the sandbox's own
        // `x`, so a link there climbing three levels would leave the sandbox.
        let mut b = tar::Builder::new(Vec::new());
        for (name, target) in [("a", "."), ("a/a/a/stdout", "../../../etc/hostname")] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_cksum();
            b.append_link(&mut h, name, target).unwrap();
        }
        let evil = dir.path().join("shallow.tar");
        std::fs::write(&evil, b.into_inner().unwrap()).unwrap();
        let mut u = uri(&file_uri(&evil));
        u.extract = true;
        let s2 = dir.path().join("s2");
        let err = f.fetch(&u, &s2, u64::MAX).await.unwrap_err();
        assert!(err.to_string().contains("links outside"), "{err}");
        assert!(std::fs::symlink_metadata(s2.join("stdout")).is_err());

        // Set-uid bits are not kept.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o4755);
        h.set_cksum();
        b.append_data(&mut h, "suid", &b"#!"[..]).unwrap();
        let suid = dir.path().join("suid.tar");
        std::fs::write(&suid, b.into_inner().unwrap()).unwrap();
        let mut u = uri(&file_uri(&suid));
        u.extract = true;
        f.fetch(&u, &s2, u64::MAX).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s2.join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "{mode:o}");

        // A bomb: more than the budget.
        let bomb = dir.path().join("bomb.tar.gz");
        std::fs::write(&bomb, tar_gz(&[("zeros", &vec![0u8; 1 << 20])])).unwrap();
        let mut u = uri(&file_uri(&bomb));
        u.extract = true;
        let err = f.fetch(&u, &s, 64 << 10).await.unwrap_err();
        assert!(
            err.to_string().contains("more than the 65536 bytes"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn zip_archives_unpack_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(dir.path(), 1 << 20);
        let path = dir.path().join("a.zip");
        {
            let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
            let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
            w.start_file("tool/run", opts).unwrap();
            w.write_all(b"#!/bin/sh\n").unwrap();
            w.start_file("../../outside", opts).unwrap();
            w.write_all(b"x").unwrap();
            w.finish().unwrap();
        }
        let s = dir.path().join("s");
        let mut u = uri(&file_uri(&path));
        u.extract = true;
        let err = f.fetch(&u, &s, u64::MAX).await.unwrap_err();
        assert!(err.to_string().contains("leaves the sandbox"), "{err}");
        assert_eq!(std::fs::read(s.join("tool/run")).unwrap(), b"#!/bin/sh\n");
        assert!(!dir.path().join("outside").exists());
    }
}
