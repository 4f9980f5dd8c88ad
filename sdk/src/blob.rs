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

use sha2::Digest;
use tokio_stream::StreamExt;

use crate::Error;

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
/// # Errors
/// [`Error::Invalid`] for an unreadable file, [`Error::Refused`] when the master refuses it
/// (too large, no blob store), [`Error::Connection`] when it cannot be reached.
pub async fn upload_file(
    master: &str,
    path: &Path,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<String, Error> {
    let digest = {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || digest_file(&path))
            .await
            .map_err(|e| Error::Invalid(e.to_string()))??
    };
    let url = format!("{}/blobs/{digest}", master.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let refused = |status: reqwest::StatusCode, body: String| Error::Refused {
        code: if status == reqwest::StatusCode::NOT_FOUND {
            tonic::Code::NotFound
        } else {
            tonic::Code::InvalidArgument
        },
        message: format!("the master answered {status}: {}", body.trim()),
    };
    let head = client
        .head(&url)
        .send()
        .await
        .map_err(|e| Error::Connection(format!("reaching {master}: {e}")))?;
    let size = std::fs::metadata(path)
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", path.display())))?
        .len();
    if head.status().is_success() {
        progress(size, size);
        return Ok(digest);
    }
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::Invalid(format!("reading {}: {e}", path.display())))?;
    let progress = std::sync::Arc::new(progress);
    let mut sent = 0u64;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).map(move |chunk| {
        if let Ok(c) = &chunk {
            sent += c.len() as u64;
            progress(sent, size);
        }
        chunk
    });
    let response = client
        .put(&url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .map_err(|e| Error::Connection(format!("uploading to {master}: {e}")))?;
    let status = response.status();
    if status.is_success() {
        Ok(digest)
    } else {
        Err(refused(status, response.text().await.unwrap_or_default()))
    }
}
