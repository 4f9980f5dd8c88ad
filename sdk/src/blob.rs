//! The master's blob store from the client side: upload a file, learn its digest.
//!
//! Tasks name what they need by `sha256:<hex>` (a Wasm module, a bundle's files); agents
//! fetch those from the master's store. [`upload_file`] puts a file there, skipping the
//! upload when the master already has it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), agora_sdk::Error> {
//! let digest = agora_sdk::blob::upload_file("http://127.0.0.1:5050", "task.wasm".as_ref(), |_, _| {}).await?;
//! println!("uploaded {digest}");
//! # Ok(())
//! # }
//! ```

use std::path::Path;
use std::sync::Arc;

use agora_proto::dial::{self, Failure};
use sha2::Digest;
use tokio_stream::StreamExt;

use crate::Error;
use crate::masters::{self, DialPolicy};

/// `sha256:<hex>` of a file's contents.
///
/// # Errors
/// [`Error::Invalid`] when the file cannot be read.
pub fn digest_file(path: &Path) -> Result<String, Error> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", path.display())))?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", path.display())))?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Uploads `path` to the master's blob store and returns its digest. `progress(sent,
/// total)` is called as bytes go out. Nothing is sent when the master already holds it.
///
/// `master` is one address or a comma-separated list: the masters are tried in turn, and a
/// follower's redirect (`307` with `Location`) is followed to the leader, the file sent
/// again from its start.
///
/// # Errors
/// [`Error::Invalid`] for an unreadable file or a bad list, [`Error::Refused`] when the
/// master refuses it (too large, no blob store), [`Error::Connection`] when no master
/// leads (naming each master tried and why).
pub async fn upload_file(
    master: &str,
    path: &Path,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<String, Error> {
    let list = masters::parse(master)?;
    let digest = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || digest_file(&path))
            .await
            .map_err(|e| Error::Invalid(e.to_string()))??
    };
    let size = std::fs::metadata(path)
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", path.display())))?
        .len();
    // Redirects are followed here, where the body can be sent again.
    let mut builder = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none());
    let auth = masters::Auth::for_masters(&list)?;
    if let Some(token) = &auth.token {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Invalid("the token is not printable ASCII".into()))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
        builder = builder.default_headers(headers);
    }
    let tls = auth.tls;
    let invalid = |e: reqwest::Error| Error::Invalid(format!("building an HTTP client: {e}"));
    if let Some(tls) = &tls {
        builder =
            builder.tls_certs_only([reqwest::Certificate::from_pem(&tls.ca).map_err(invalid)?]);
        if let Some(id) = &tls.identity {
            let pem = [id.cert.as_slice(), id.key.as_slice()].concat();
            builder = builder.identity(reqwest::Identity::from_pem(&pem).map_err(invalid)?);
        }
    }
    let client = builder.build().map_err(invalid)?;
    // With TLS every master is dialled over it, the followers' hints too.
    let list: Vec<String> = list
        .into_iter()
        .map(|m| match m.strip_prefix("http://") {
            Some(rest) if tls.is_some() => format!("https://{rest}"),
            _ => m,
        })
        .collect();
    let progress = Arc::new(progress);
    let blob = Blob {
        client: &client,
        path,
        digest: &digest,
        size,
    };
    dial::find_leader(&list, &DialPolicy::default(), |base| {
        blob.put(base, progress.clone())
    })
    .await?;
    Ok(digest)
}

/// A file to upload.
#[derive(Clone, Copy)]
struct Blob<'a> {
    client: &'a reqwest::Client,
    path: &'a Path,
    digest: &'a str,
    size: u64,
}

impl Blob<'_> {
    /// Puts the file at the master at `base`, unless it holds it already.
    async fn put<P>(self, base: String, progress: Arc<P>) -> Result<(), Failure<Error>>
    where
        P: Fn(u64, u64) + Send + Sync + 'static,
    {
        let url = format!("{base}/blobs/{}", self.digest);
        let unreachable = |e: reqwest::Error| Failure::Unreachable(masters::error_chain(&e));
        let head = self.client.head(&url).send().await.map_err(unreachable)?;
        if head.status().is_success() {
            progress(self.size, self.size);
            return Ok(());
        }
        if let Some(f) = not_leader(&head) {
            return Err(f);
        }
        let file = tokio::fs::File::open(self.path).await.map_err(|e| {
            Failure::Refused(Error::Invalid(format!(
                "reading {}: {e}",
                self.path.display()
            )))
        })?;
        let (mut sent, size) = (0u64, self.size);
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).map(move |chunk| {
                if let Ok(c) = &chunk {
                    sent += c.len() as u64;
                    progress(sent, size);
                }
                chunk
            });
        let response = self
            .client
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if let Some(f) = not_leader(&response) {
            return Err(f);
        }
        let body = response.text().await.unwrap_or_default();
        Err(Failure::Refused(Error::Refused {
            code: if status == reqwest::StatusCode::NOT_FOUND {
                tonic::Code::NotFound
            } else {
                tonic::Code::InvalidArgument
            },
            message: format!("the master answered {status}: {}", body.trim()),
        }))
    }
}

/// A follower's answer: `307`/`308` to the leader (its origin), or `503` while it knows no
/// leader.
fn not_leader(r: &reqwest::Response) -> Option<Failure<Error>> {
    use reqwest::StatusCode;
    match r.status() {
        StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT => {
            let leader = r
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| r.url().join(l).ok())
                .map(|u| u.origin().ascii_serialization());
            Some(Failure::NotLeader(leader))
        }
        StatusCode::SERVICE_UNAVAILABLE => Some(Failure::NotLeader(None)),
        _ => None,
    }
}
