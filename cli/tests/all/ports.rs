//! Free ports for processes a test or bench starts and must know the address of beforehand.
//! Shared by the integration tests and the failover bench (included by path).

/// `n` distinct free ports on `host`: each is held until all are picked, so that no two are
/// the same. Another process may take one before it is used; on loopback that is rare.
pub fn free_ports(host: &str, n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((host, 0)).unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One free loopback port.
pub fn free_port() -> u16 {
    free_ports("127.0.0.1", 1)[0]
}
