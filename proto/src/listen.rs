//! How Agora's servers listen: a TCP listener whose accept queue holds a whole cluster's
//! reconnection.
//!
//! When a leader dies, every agent and framework reconnects at once. The standard library
//! (and tokio) listen with a backlog of 128; past that the kernel drops the SYNs and each
//! dropped client waits a whole retransmission timeout (1 s, then 3 s) before its next try.
//! Servers here listen with a backlog of [`BACKLOG`] instead, which the kernel caps at
//! `net.core.somaxconn` (as Go's servers do, etcd and Nomad among them).
//!
//! [`Incoming`] is what the servers accept from: each connection must send its first bytes
//! (the HTTP/2 preface, an HTTP/1 request line, a TLS ClientHello) within a deadline or be
//! closed, so connections that never speak cannot pile up (hyper and tonic wait for those
//! bytes for ever). A full file table (EMFILE) pauses accepting instead of ending the server.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The accept queue asked for.
pub const BACKLOG: u32 = 4096;

/// Listens on `addr` with a backlog of [`BACKLOG`] (and `SO_REUSEADDR`, as `bind` sets).
///
/// # Errors
/// When the socket cannot be made, bound or listened on.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// How long a new connection may stay silent unless a server is told otherwise.
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(10);

/// How many bytes a new connection must send before its deadline: the HTTP/2 preface's
/// length (any HTTP/1 request line or TLS ClientHello is longer).
const FIRST_BYTES: usize = 24;
// The errno values (Linux, every architecture) of a full per-process and system file table.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// The connections of a listener, each [`Guarded`] by a deadline for its first bytes.
pub struct Incoming {
    listener: TcpListener,
    first_bytes_within: Duration,
    /// Set while accepting is paused after running out of file descriptors.
    paused: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    /// Accepts from `listener`; a connection that has not sent its first bytes within
    /// `first_bytes_within` is closed.
    #[must_use]
    pub fn new(listener: TcpListener, first_bytes_within: Duration) -> Self {
        Incoming {
            listener,
            first_bytes_within,
            paused: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Guarded>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(p) = self.paused.as_mut() {
                ready!(p.as_mut().poll(cx));
                self.paused = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((io, _)) => {
                    // Without nodelay a lone message waits ~40 ms for a delayed ACK.
                    let _ = io.set_nodelay(true);
                    let deadline = Box::pin(tokio::time::sleep(self.first_bytes_within));
                    return Poll::Ready(Some(Ok(Guarded {
                        io,
                        deadline: Some(deadline),
                        owed: FIRST_BYTES,
                    })));
                }
                Err(e) if matches!(e.raw_os_error(), Some(EMFILE | ENFILE)) => {
                    // EMFILE / ENFILE: the connection waits in the queue; try again shortly
                    // rather than spin or give up the listener.
                    tracing::warn!(error = %e, "out of file descriptors; accepting again in 100 ms");
                    self.paused = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                // A connection reset before it was accepted, and the like: the next one.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    tracing::debug!(error = %e, "accept failed");
                }
                // Anything else (ENOBUFS, ENOMEM, …) may well repeat: pause rather than spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting failed; accepting again in 100 ms");
                    self.paused = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
            }
        }
    }
}

/// An accepted connection that is closed (its reads fail with `TimedOut`) unless its first
/// bytes arrive by a deadline.
pub struct Guarded {
    io: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
    owed: usize,
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                if self.deadline.is_some() {
                    self.owed = self.owed.saturating_sub(got);
                    if self.owed == 0 {
                        self.deadline = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Polling the timer registers the waker: the task wakes at the deadline.
                let late = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if late {
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the connection sent nothing in time",
                    )))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener queues more connections nobody has accepted yet than the default
    /// backlog would (the kernel drops the SYNs past it, and the connects then wait 1 s).
    #[tokio::test]
    async fn the_accept_queue_holds_more_than_the_default() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Vec::new();
        // Nothing accepts: every connection waits in the queue. A backlog of 128 holds
        // 129; the rest would be dropped and their connects time out.
        for _ in 0..300 {
            let c = tokio::time::timeout(
                std::time::Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .expect("a connection beyond the default backlog is queued, not dropped")
            .unwrap();
            conns.push(c);
        }
        drop(listener);
    }

    /// A connection that sends too little is closed at the deadline; one that speaks keeps
    /// its connection past it.
    #[tokio::test]
    async fn connections_that_stay_silent_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_stream::StreamExt;
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, Duration::from_millis(300));
        let server = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let mut c = incoming.next().await.unwrap().unwrap();
                results.push(tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let mut n = 0;
                    loop {
                        match c.read(&mut buf[n..]).await {
                            Ok(0) => return Ok(n),
                            Ok(k) => n += k,
                            Err(e) => return Err((n, e.kind())),
                        }
                        if n >= 30 {
                            return Ok(n);
                        }
                    }
                }));
            }
            results
        });
        let mut silent = TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"PRI * HT").await.unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        talker.write_all(&[b'x'; 24]).await.unwrap();
        let mut results = server.await.unwrap().into_iter();
        let (silent_read, talker_read) = (results.next().unwrap(), results.next().unwrap());
        // The silent one: cut off after its 8 bytes, with TimedOut.
        let cut = tokio::time::timeout(Duration::from_secs(5), silent_read)
            .await
            .expect("closed by the deadline, not left open")
            .unwrap();
        assert_eq!(cut, Err((8, std::io::ErrorKind::TimedOut)));
        // The talker, past the deadline, still reads.
        talker.write_all(&[b'y'; 6]).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), talker_read)
            .await
            .expect("the talker's connection still reads")
            .unwrap();
        assert_eq!(read, Ok(30));
        drop(silent);
    }
}
