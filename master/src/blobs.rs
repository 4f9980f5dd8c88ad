//! The master's content-addressed blob store: Wasm modules, bundle files and other artifacts
//! that tasks name by `sha256:<hex>`, kept on disk under `<work_dir>/blobs`.
//!
//! Served over HTTP on the master's port:
//!
//! ```text
//!  PUT  /blobs/sha256:<hex>   body = the bytes; streamed to a temporary file while hashed;
//!                             kept only if they hash to <hex> and fit the size limit
//!                             (201 Created, or 200 if it was already there)
//!  GET  /blobs/sha256:<hex>   the bytes (HEAD: whether it is there, and its size)
//! ```
//!
//! Agents' fetchers download `sha256:` URIs from here into their caches. Writes are atomic
//! (temporary file, fsync, rename), so a reader never sees half a blob. Anyone who reaches
//! the master's port may upload unless authentication is on ([`crate::auth::blobs`]).
//!
//! Each principal's uploads may hold at most `--max-blob-mib-per-principal` bytes: a blob
//! counts against the principal that first stored it (recorded beside it as `<hex>.owner`,
//! so the count survives a restart); an upload past the bound is refused with 413.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

/// Where blobs live and how large one may be.
#[derive(Debug, Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    /// Bytes one principal's blobs may hold together; 0: no bound.
    per_principal: u64,
    /// Bytes each principal's blobs hold.
    used: Mutex<HashMap<String, u64>>,
    seq: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("preparing the blob store {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// `sha256:<hex>` (or bare hex) as lowercase hex.
fn parse_digest(s: &str) -> Option<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut body = msg.into();
    body.push('\n');
    (status, [(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

impl BlobStore {
    /// A store in `dir` (created if missing) that refuses blobs over `max_bytes`, and a
    /// principal's uploads past `per_principal` bytes in all (0: no bound).
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(
        dir: impl Into<PathBuf>,
        max_bytes: u64,
        per_principal: u64,
    ) -> Result<BlobStore, BlobError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Dir {
            path: dir.clone(),
            source,
        })?;
        // Leftovers of uploads cut off by a crash; what each owner's blobs hold.
        let mut used: HashMap<String, u64> = HashMap::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") {
                let _ = std::fs::remove_file(e.path());
            } else if let Some(hex) = name.strip_suffix(".owner")
                && let Ok(owner) = std::fs::read_to_string(e.path())
                && let Ok(meta) = std::fs::metadata(dir.join(hex))
            {
                *used.entry(owner).or_default() += meta.len();
            }
        }
        Ok(BlobStore {
            inner: Arc::new(Inner {
                dir,
                max_bytes,
                per_principal,
                used: Mutex::new(used),
                seq: AtomicU64::new(0),
            }),
        })
    }

    fn path(&self, hex: &str) -> PathBuf {
        self.inner.dir.join(hex)
    }

    /// Whether the blob is stored.
    pub fn contains(&self, digest: &str) -> bool {
        parse_digest(digest).is_some_and(|h| self.path(&h).is_file())
    }

    /// The HTTP routes of the store.
    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route(
                "/blobs/{digest}",
                axum::routing::get(get_blob).put(put_blob),
            )
            .with_state(Some(self))
    }

    /// The routes of a master without a store: every request is told so.
    pub fn disabled_router() -> axum::Router {
        axum::Router::new()
            .route(
                "/blobs/{digest}",
                axum::routing::get(get_blob).put(put_blob),
            )
            .with_state(None)
    }

    /// The bytes `principal`'s blobs hold now.
    pub fn used_by(&self, principal: &str) -> u64 {
        self.used().get(principal).copied().unwrap_or(0)
    }

    fn used(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.inner
            .used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn over_quota(&self, principal: &str) -> Response {
        let bound = self.inner.per_principal;
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "principal {principal:?} would hold more than the {bound} blob bytes it may (it holds {}; --max-blob-mib-per-principal)",
                self.used_by(principal)
            ),
        )
    }

    async fn store(&self, hex: &str, body: Body, owner: Option<&str>) -> Response {
        let target = self.path(hex);
        if target.is_file() {
            return text(StatusCode::OK, format!("sha256:{hex} is already stored"));
        }
        let bound = self.inner.per_principal;
        let owner = owner.filter(|_| bound > 0);
        let mut limit = self.inner.max_bytes;
        if let Some(p) = owner {
            let left = bound.saturating_sub(self.used_by(p));
            if left == 0 {
                return self.over_quota(p);
            }
            limit = limit.min(left);
        }
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .inner
            .dir
            .join(format!(".upload-{}-{n}", std::process::id()));
        // Removed however this ends, a client hanging up mid-upload included.
        let _cleanup = Cleanup(tmp.clone());
        let result = self.receive(&tmp, body, limit, owner).await;
        let response = match result {
            Ok((size, actual)) if actual == hex => {
                if let Some(p) = owner {
                    // Counted before it is kept, so uploads side by side cannot both fit.
                    let mut used = self.used();
                    let held = used.entry(p.to_owned()).or_default();
                    if held.saturating_add(size) > bound {
                        drop(used);
                        return self.over_quota(p);
                    }
                    *held += size;
                }
                self.keep(&tmp, &target, hex, size, owner).await
            }
            Ok((_, actual)) => text(
                StatusCode::BAD_REQUEST,
                format!("the body hashes to sha256:{actual}, not sha256:{hex}"),
            ),
            Err(r) => r,
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        response
    }

    /// Renames the received upload into place, its owner recorded beside it first.
    async fn keep(
        &self,
        tmp: &Path,
        target: &Path,
        hex: &str,
        size: u64,
        owner: Option<&str>,
    ) -> Response {
        let owner_file = self.inner.dir.join(format!("{hex}.owner"));
        let recorded = match owner {
            Some(p) => tokio::fs::write(&owner_file, p).await,
            None => Ok(()),
        };
        let kept = match recorded {
            Ok(()) => tokio::fs::rename(tmp, target).await,
            Err(e) => Err(e),
        };
        match kept {
            Ok(()) => {
                tracing::info!(digest = %format!("sha256:{hex}"), size, "blob stored");
                text(
                    StatusCode::CREATED,
                    format!("sha256:{hex} stored ({size} bytes)"),
                )
            }
            Err(e) => {
                if let Some(p) = owner
                    && let Some(held) = self.used().get_mut(p)
                {
                    *held = held.saturating_sub(size);
                }
                let _ = tokio::fs::remove_file(&owner_file).await;
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("storing the blob: {e}"),
                )
            }
        }
    }

    /// Streams `body` into `tmp`, hashing it; refused past `limit` bytes (the blob bound,
    /// or what is left of `owner`'s).
    async fn receive(
        &self,
        tmp: &Path,
        body: Body,
        limit: u64,
        owner: Option<&str>,
    ) -> Result<(u64, String), Response> {
        let max = self.inner.max_bytes;
        let too_big = || match owner {
            Some(p) if limit < max => self.over_quota(p),
            _ => text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a blob may hold at most {max} bytes"),
            ),
        };
        let mut file = tokio::fs::File::create(tmp).await.map_err(|e| {
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating the upload: {e}"),
            )
        })?;
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| text(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(too_big());
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("writing the upload: {e}"),
                )
            })?;
        }
        file.sync_all().await.map_err(|e| {
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("syncing the upload: {e}"),
            )
        })?;
        Ok((size, hex::encode(hasher.finalize())))
    }
}

/// Removes a file when dropped (a no-op once it has been renamed away).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn no_store() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "this master has no blob store: start it with --work-dir",
    )
}

/// The store and the digest's hex, or the response that says why there are none.
fn locate(store: Option<BlobStore>, digest: &str) -> Result<(BlobStore, String), Box<Response>> {
    let store = store.ok_or_else(|| Box::new(no_store()))?;
    let hex = parse_digest(digest).ok_or_else(|| {
        Box::new(text(
            StatusCode::BAD_REQUEST,
            format!("{digest:?} is not sha256:<64 hex digits>"),
        ))
    })?;
    Ok((store, hex))
}

async fn get_blob(
    State(store): State<Option<BlobStore>>,
    UrlPath(digest): UrlPath<String>,
) -> Response {
    let (store, hex) = match locate(store, &digest) {
        Ok(found) => found,
        Err(r) => return *r,
    };
    let file = match tokio::fs::File::open(store.path(&hex)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return text(StatusCode::NOT_FOUND, format!("no blob sha256:{hex}"));
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response()
}

async fn put_blob(
    State(store): State<Option<BlobStore>>,
    UrlPath(digest): UrlPath<String>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    body: Body,
) -> Response {
    let owner = caller.map(|axum::Extension(crate::auth::Caller(p))| p);
    match locate(store, &digest) {
        Ok((store, hex)) => store.store(&hex, body, owner.as_deref()).await,
        Err(r) => *r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse() {
        let hex = "0f".repeat(32);
        assert_eq!(parse_digest(&format!("sha256:{hex}")), Some(hex.clone()));
        assert_eq!(parse_digest(&hex.to_uppercase()), Some(hex));
        assert_eq!(parse_digest("sha256:zz"), None);
    }

    #[tokio::test]
    async fn blobs_are_kept_only_when_they_match_and_fit() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs"), 16, 0).unwrap();
        let data = b"hello blob";
        let hex = hex::encode(sha2::Sha256::digest(data));
        let r = store.store(&hex, Body::from(&data[..]), None).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert!(store.contains(&format!("sha256:{hex}")));
        assert_eq!(std::fs::read(store.path(&hex)).unwrap(), data);
        let r = store.store(&hex, Body::from(&data[..]), None).await;
        assert_eq!(r.status(), StatusCode::OK);

        let other = "ab".repeat(32);
        let r = store
            .store(&other, Body::from(&b"not that"[..]), None)
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(!store.contains(&other));

        let big = vec![1u8; 17];
        let hex = hex::encode(sha2::Sha256::digest(&big));
        let r = store.store(&hex, Body::from(big), None).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Nothing half-written is left.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[tokio::test]
    async fn a_principal_stores_no_more_than_its_bound_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blobs");
        let store = BlobStore::open(&path, 1 << 20, 20).unwrap();
        let put = |store: BlobStore, data: &'static [u8], who: &'static str| async move {
            let hex = hex::encode(sha2::Sha256::digest(data));
            store.store(&hex, Body::from(data), Some(who)).await
        };
        assert_eq!(
            put(store.clone(), b"0123456789", "a").await.status(),
            StatusCode::CREATED
        );
        assert_eq!(
            put(store.clone(), b"abcdefghij", "a").await.status(),
            StatusCode::CREATED
        );
        let r = put(store.clone(), b"one more byte", "a").await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = axum::body::to_bytes(r.into_body(), 1 << 10).await.unwrap();
        let msg = String::from_utf8_lossy(&body);
        assert!(
            msg.contains("--max-blob-mib-per-principal") && msg.contains("\"a\""),
            "{msg}"
        );
        // Another principal has a bound of its own; a blob already there costs nothing.
        assert_eq!(
            put(store.clone(), b"one more byte", "b").await.status(),
            StatusCode::CREATED
        );
        assert_eq!(
            put(store.clone(), b"0123456789", "b").await.status(),
            StatusCode::OK
        );
        assert_eq!(store.used_by("b"), 13);
        // Reopened, the store still knows what each holds.
        let again = BlobStore::open(&path, 1 << 20, 20).unwrap();
        assert_eq!((again.used_by("a"), again.used_by("b")), (20, 13));
        let r = put(again.clone(), b"xyzxyzxyz", "b").await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
