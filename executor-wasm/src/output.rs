//! Task stdout and stderr as files in the sandbox, capped in size.
//!
//! Writes go straight to the file (no background task), so when a run returns its output is
//! complete on disk. Past the cap, one notice is written and the rest is discarded: a chatty
//! task cannot fill the agent's disk, and it is not killed for talking.

use std::fs::File;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

struct Inner {
    file: File,
    written: u64,
    limit: u64,
    truncated: bool,
}

impl Inner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if self.truncated {
            return Ok(());
        }
        let room = self.limit.saturating_sub(self.written);
        let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        self.file.write_all(&buf[..take])?;
        self.written += take as u64;
        if take < buf.len() {
            self.truncated = true;
            writeln!(
                self.file,
                "\n[agora: output truncated at {} bytes]",
                self.limit
            )?;
        }
        Ok(())
    }
}

/// A file that accepts at most `limit` bytes of task output.
#[derive(Clone)]
pub struct CappedOutput {
    inner: Arc<Mutex<Inner>>,
}

impl CappedOutput {
    pub fn new(file: File, limit: u64) -> Self {
        CappedOutput {
            inner: Arc::new(Mutex::new(Inner {
                file,
                written: 0,
                limit,
                truncated: false,
            })),
        }
    }

    fn write(&self, buf: &[u8]) -> std::io::Result<()> {
        // A poisoned lock only means another writer panicked mid-write; the file is still fine.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.write(buf)
    }

    /// Bytes kept so far.
    pub fn written(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).written
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        CappedOutput::write(self, &bytes)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::format_err!(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(CappedOutput::write(&self, buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_once_with_a_notice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let out = CappedOutput::new(File::create(&path).unwrap(), 10);
        out.write(b"0123456").unwrap();
        out.write(b"789abc").unwrap();
        out.write(b"more").unwrap();
        assert_eq!(out.written(), 10);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "0123456789\n[agora: output truncated at 10 bytes]\n");
    }
}
