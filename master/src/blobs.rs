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
//! the master's port may upload: put the master behind the network boundary that already
//! guards its other APIs (authentication comes with the operability work).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// A store in `dir` (created if missing) that refuses blobs over `max_bytes`.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<BlobStore, BlobError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| BlobError::Dir {
            path: dir.clone(),
            source,
        })?;
        // Leftovers of uploads cut off by a crash.
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(BlobStore {
            inner: Arc::new(Inner {
                dir,
                max_bytes,
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

    async fn store(&self, hex: &str, body: Body) -> Response {
        let target = self.path(hex);
        if target.is_file() {
            return text(StatusCode::OK, format!("sha256:{hex} is already stored"));
        }
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .inner
            .dir
            .join(format!(".upload-{}-{n}", std::process::id()));
        // Removed however this ends, a client hanging up mid-upload included.
        let _cleanup = Cleanup(tmp.clone());
        let result = self.receive(&tmp, body).await;
        let response = match result {
            Ok((size, actual)) if actual == hex => match tokio::fs::rename(&tmp, &target).await {
                Ok(()) => {
                    tracing::info!(digest = %format!("sha256:{hex}"), size, "blob stored");
                    return text(
                        StatusCode::CREATED,
                        format!("sha256:{hex} stored ({size} bytes)"),
                    );
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("storing the blob: {e}"),
                ),
            },
            Ok((_, actual)) => text(
                StatusCode::BAD_REQUEST,
                format!("the body hashes to sha256:{actual}, not sha256:{hex}"),
            ),
            Err(r) => r,
        };
        let _ = tokio::fs::remove_file(&tmp).await;
        response
    }

    async fn receive(&self, tmp: &Path, body: Body) -> Result<(u64, String), Response> {
        let max = self.inner.max_bytes;
        let too_big = || {
            text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a blob may hold at most {max} bytes"),
            )
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
            if size > max {
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
    body: Body,
) -> Response {
    match locate(store, &digest) {
        Ok((store, hex)) => store.store(&hex, body).await,
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
        let store = BlobStore::open(dir.path().join("blobs"), 16).unwrap();
        let data = b"hello blob";
        let hex = hex::encode(sha2::Sha256::digest(data));
        let r = store.store(&hex, Body::from(&data[..])).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert!(store.contains(&format!("sha256:{hex}")));
        assert_eq!(std::fs::read(store.path(&hex)).unwrap(), data);
        let r = store.store(&hex, Body::from(&data[..])).await;
        assert_eq!(r.status(), StatusCode::OK);

        let other = "ab".repeat(32);
        let r = store.store(&other, Body::from(&b"not that"[..])).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(!store.contains(&other));

        let big = vec![1u8; 17];
        let hex = hex::encode(sha2::Sha256::digest(&big));
        let r = store.store(&hex, Body::from(big)).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Nothing half-written is left.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
