//! Free ports for processes a test or bench starts and must know the address of beforehand.
//! Shared by the integration tests and the failover bench (included by path).

use std::collections::HashSet;
use std::sync::Mutex;

/// Every port handed out in this process: tests run side by side, and a port one test
/// picked and let go of must not be picked again by another before its master binds it.
static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// `n` distinct free ports on `host`, none handed out before in this process. Another
/// process may still take one before it is used; on loopback that is rare.
pub fn free_ports(host: &str, n: usize) -> Vec<u16> {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    // Held until all are picked, so that the system does not hand out one twice.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = std::net::TcpListener::bind((host, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        if given.insert(port) {
            ports.push(port);
        }
        held.push(l);
    }
    ports
}

/// One free loopback port.
pub fn free_port() -> u16 {
    free_ports("127.0.0.1", 1)[0]
}
