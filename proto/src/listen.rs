//! How Agora's servers listen: a TCP listener whose accept queue holds a whole cluster's
//! reconnection.
//!
//! When a leader dies, every agent and framework reconnects at once. The standard library
//! (and tokio) listen with a backlog of 128; past that the kernel drops the SYNs and each
//! dropped client waits a whole retransmission timeout (1 s, then 3 s) before its next try.
//! Servers here listen with a backlog of [`BACKLOG`] instead, which the kernel caps at
//! `net.core.somaxconn` (as Go's servers do, etcd and Nomad among them).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

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
}
