//! How Agora's servers listen: a TCP listener whose accept queue holds a whole cluster's
//! reconnection.
//!
//! When a leader dies, every agent and framework reconnects at once. The standard library
//! (and tokio) listen with a backlog of 128; past that the kernel drops the SYNs and each
//! dropped client waits a whole retransmission timeout (1 s, then 3 s) before its next try.
//! Servers here listen with a backlog of [`BACKLOG`] instead, which the kernel caps at
//! `net.core.somaxconn` (as Go's servers do, etcd and Nomad among them).
//!
//! [`Incoming`] is what the servers accept from, and where they do TLS: each connection must
//! finish its handshake and send its first bytes (the HTTP/2 preface, an HTTP/1 request
//! line) within one deadline or be closed, so connections that never speak cannot pile up
//! (hyper waits for those bytes for ever, and tonic's own TLS bounds only the handshake). A
//! full file table (EMFILE) pauses accepting instead of ending the server. Each connection
//! carries its [`Peer`] (address and verified certificates) into its requests.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::transport::server::Connected;

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
/// length (any HTTP/1 request line is longer). Over TLS these are bytes of the decrypted
/// stream: a finished handshake does not count as speaking.
const FIRST_BYTES: usize = 24;
/// TLS handshakes in progress at once; past it, new connections wait in the accept queue.
const MAX_HANDSHAKES: usize = 1024;
// The errno values (Linux, every architecture) of a full per-process and system file table.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;

/// Who is at the other end of a served connection: what its requests' extensions carry (see
/// [`peer`]).
#[derive(Debug, Clone)]
pub struct Peer {
    pub address: Option<SocketAddr>,
    /// The certificates the caller presented in a TLS handshake, which the server's
    /// configuration verified; `None` in the clear or when it presented none.
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// The peer of the connection a request came on; `None` for requests that did not come
/// through [`Incoming`].
pub fn peer(extensions: &tonic::codegen::http::Extensions) -> Option<&Peer> {
    extensions.get::<Peer>()
}

/// The address of the caller of a request that came through [`Incoming`].
pub fn remote_addr(extensions: &tonic::codegen::http::Extensions) -> Option<SocketAddr> {
    peer(extensions)?.address
}

/// The connections of a listener, over TLS when given a configuration, each [`Guarded`] by
/// one deadline for its handshake and its first bytes.
pub struct Incoming {
    listener: TcpListener,
    first_bytes_within: Duration,
    tls: Option<Tls>,
    handshakes: tokio::task::JoinSet<Option<Guarded>>,
    /// Set while accepting is paused after running out of file descriptors.
    paused: Option<Pin<Box<Sleep>>>,
}

/// The TLS configuration connections are accepted with, read again for each (so that a
/// reload applies to the next connection).
struct Tls {
    server: crate::tls::ServerTls,
    require_client: bool,
}

impl Incoming {
    /// Accepts from `listener` in the clear; a connection that has not sent its first bytes
    /// within `first_bytes_within` is closed.
    #[must_use]
    pub fn new(listener: TcpListener, first_bytes_within: Duration) -> Self {
        Incoming {
            listener,
            first_bytes_within,
            tls: None,
            handshakes: tokio::task::JoinSet::new(),
            paused: None,
        }
    }

    /// Accepts over TLS (with `server`'s configuration at the time of each connection,
    /// which needs a client certificate with `require_client`), or in the clear without.
    /// Within `first_bytes_within` a connection must finish its handshake and send its
    /// first bytes.
    #[must_use]
    pub fn maybe_tls(
        listener: TcpListener,
        first_bytes_within: Duration,
        server: Option<&crate::tls::ServerTls>,
        require_client: bool,
    ) -> Self {
        let mut incoming = Incoming::new(listener, first_bytes_within);
        incoming.tls = server.map(|s| Tls {
            server: s.clone(),
            require_client,
        });
        incoming
    }

    fn handshake(&mut self, io: TcpStream, address: Option<SocketAddr>) {
        let Some(tls) = &self.tls else { return };
        let acceptor =
            tokio_rustls::TlsAcceptor::from(tls.server.server_config(tls.require_client));
        let by = Instant::now() + self.first_bytes_within;
        self.handshakes.spawn(async move {
            match tokio::time::timeout_at(by, acceptor.accept(io)).await {
                Ok(Ok(io)) => {
                    let certificates = io
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| Arc::new(c.to_vec()));
                    Some(Guarded::new(
                        Io::Tls(Box::new(io)),
                        by,
                        Peer {
                            address,
                            certificates,
                        },
                    ))
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = ?address, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(peer = ?address, "TLS handshake not finished in time");
                    None
                }
            }
        });
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<Guarded>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            // Finished handshakes first; polling registers the waker for the rest.
            while let Poll::Ready(Some(done)) = self.handshakes.poll_join_next(cx) {
                if let Ok(Some(conn)) = done {
                    return Poll::Ready(Some(Ok(conn)));
                }
            }
            if let Some(p) = self.paused.as_mut() {
                ready!(p.as_mut().poll(cx));
                self.paused = None;
            }
            if self.handshakes.len() >= MAX_HANDSHAKES {
                return Poll::Pending;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((io, address)) => {
                    // Without nodelay a lone message waits ~40 ms for a delayed ACK.
                    let _ = io.set_nodelay(true);
                    if self.tls.is_some() {
                        self.handshake(io, Some(address));
                        continue;
                    }
                    let by = Instant::now() + self.first_bytes_within;
                    let peer = Peer {
                        address: Some(address),
                        certificates: None,
                    };
                    return Poll::Ready(Some(Ok(Guarded::new(Io::Plain(io), by, peer))));
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

/// A connection, in the clear or over TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection that is closed (its reads fail with `TimedOut`) unless its first
/// bytes arrive by a deadline.
pub struct Guarded {
    io: Io,
    deadline: Option<Pin<Box<Sleep>>>,
    owed: usize,
    peer: Peer,
}

impl Guarded {
    fn new(io: Io, by: Instant, peer: Peer) -> Guarded {
        Guarded {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(by))),
            owed: FIRST_BYTES,
            peer,
        }
    }
}

impl Connected for Guarded {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Calls `$f` on the connection's stream, whichever it is.
macro_rules! on_io {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $e
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match on_io!(this, io => io.poll_read(cx, buf)) {
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
        let this = &mut *self;
        on_io!(this, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        on_io!(this, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        on_io!(this, io => io.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        on_io!(this, io => io.poll_shutdown(cx))
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

    /// Reads `c` until 30 bytes came, it ended (`Ok(bytes read)`) or failed
    /// (`Err((bytes read, why))`).
    async fn read_30(mut c: Guarded) -> Result<usize, (usize, std::io::ErrorKind)> {
        use tokio::io::AsyncReadExt;
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
    }

    /// A connection that sends too little is closed at the deadline; one that speaks keeps
    /// its connection past it.
    #[tokio::test]
    async fn connections_that_stay_silent_are_closed() {
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener, Duration::from_millis(300));
        let server = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let c = incoming.next().await.unwrap().unwrap();
                results.push(tokio::spawn(read_30(c)));
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

    /// A CA, and certificates it signs for localhost.
    struct Ca {
        pem: String,
        key: rcgen::KeyPair,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate().unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            Ca { pem, key }
        }

        /// A certificate for `localhost` named `name`, and its key, in PEM.
        fn issue(&self, name: &str) -> (String, String) {
            let issuer = rcgen::Issuer::from_ca_cert_pem(&self.pem, &self.key).unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }

    /// A server's files in `dir`, as `ca` issued them for `name`.
    fn write(dir: &std::path::Path, ca: &Ca, name: &str) {
        let (cert, key) = ca.issue(name);
        std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
    }

    fn load(dir: &std::path::Path) -> crate::tls::ServerTls {
        crate::tls::ServerTls::load(
            &dir.join("server.pem"),
            &dir.join("server.key"),
            &dir.join("ca.pem"),
        )
        .unwrap()
    }

    /// A listener over TLS with a certificate of a new CA (its files in the directory),
    /// whose connections must speak `within`.
    fn tls_server(
        within: Duration,
    ) -> (
        tempfile::TempDir,
        Ca,
        crate::tls::ServerTls,
        SocketAddr,
        Incoming,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        write(dir.path(), &ca, "server");
        let tls = load(dir.path());
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = Incoming::maybe_tls(listener, within, Some(&tls), false);
        (dir, ca, tls, addr, incoming)
    }

    /// Completes a TLS handshake with the server at `addr` (trusting `ca`); returns the
    /// stream and the certificate the server presented.
    async fn handshake(
        addr: SocketAddr,
        ca: &Ca,
    ) -> (
        tokio_rustls::client::TlsStream<TcpStream>,
        CertificateDer<'static>,
    ) {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect("localhost".try_into().unwrap(), tcp),
        )
        .await
        .expect("the handshake finishes")
        .unwrap();
        let served = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        (stream, served)
    }

    /// Over TLS, a finished handshake is not speaking: a connection that sends nothing
    /// after it is closed at the deadline, one that sends its first bytes keeps its
    /// connection past it.
    #[tokio::test]
    async fn tls_connections_must_speak_after_their_handshake() {
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;
        let (_dir, ca, _tls, addr, mut incoming) = tls_server(Duration::from_millis(400));
        let server = tokio::spawn(async move {
            let mut reads = Vec::new();
            for _ in 0..2 {
                let c = incoming.next().await.unwrap().unwrap();
                let from = c.peer.address.unwrap();
                reads.push((from, tokio::spawn(read_30(c))));
            }
            reads
        });
        let (silent, _) = handshake(addr, &ca).await;
        let (mut talker, _) = handshake(addr, &ca).await;
        talker.write_all(&[b'x'; 24]).await.unwrap();
        talker.flush().await.unwrap();
        let reads = server.await.unwrap();
        let mut reads: std::collections::HashMap<_, _> = reads.into_iter().collect();
        let silent_read = reads
            .remove(&silent.get_ref().0.local_addr().unwrap())
            .unwrap();
        let talker_read = reads
            .remove(&talker.get_ref().0.local_addr().unwrap())
            .unwrap();
        let cut = tokio::time::timeout(Duration::from_secs(5), silent_read)
            .await
            .expect("closed by the deadline, not left open")
            .unwrap();
        assert_eq!(cut, Err((0, std::io::ErrorKind::TimedOut)));
        talker.write_all(&[b'y'; 6]).await.unwrap();
        talker.flush().await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), talker_read)
            .await
            .expect("the talker's connection still reads")
            .unwrap();
        assert_eq!(read, Ok(30));
        drop(silent);
    }

    /// A reload serves the files as they are now to the next connection; files that do not
    /// make a configuration are refused with an error naming them, and the server goes on
    /// with what it had.
    #[tokio::test]
    async fn a_reload_serves_new_files_and_a_bad_one_changes_nothing() {
        use tokio_stream::StreamExt;
        let (dir, ca, tls, addr, mut incoming) = tls_server(Duration::from_secs(5));
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(c) = incoming.next().await {
                held.push(c);
            }
        });
        let file = |name: &str| {
            use tokio_rustls::rustls::pki_types::pem::PemObject as _;
            CertificateDer::from_pem_file(dir.path().join(name)).unwrap()
        };
        let first = file("server.pem");
        assert_eq!(handshake(addr, &ca).await.1, first);

        write(dir.path(), &ca, "second");
        let second = file("server.pem");
        assert_ne!(first, second);
        // Until reloaded, the first is still served.
        assert_eq!(handshake(addr, &ca).await.1, first);
        tls.reload().unwrap();
        assert_eq!(handshake(addr, &ca).await.1, second);

        std::fs::write(dir.path().join("server.key"), "not a key").unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(err.contains("key") && err.contains("server.key"), "{err}");
        assert_eq!(handshake(addr, &ca).await.1, second);
        // A key of another certificate is refused too.
        let (_, other_key) = ca.issue("third");
        std::fs::write(dir.path().join("server.key"), other_key).unwrap();
        let err = tls.reload().unwrap_err().to_string();
        assert!(err.contains("server.pem"), "{err}");
        assert_eq!(handshake(addr, &ca).await.1, second);
        server.abort();
    }
}
