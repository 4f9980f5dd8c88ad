//! What a task may reach beyond its own memory: its capabilities.
//!
//! A WASI context starts closed — no files, no network, no host environment, a stopped
//! clock, a fixed random stream — and [`Capabilities`] opens exactly what was granted: the
//! sandbox directory, named volumes (read-only or read-write), outbound connections to
//! addresses matching [`AddrPattern`]s, the real wall clock, OS randomness. Host environment
//! variables are resolved by the agent and arrive as ordinary environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// A directory the task sees at `guest_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest_path: String,
    pub read_only: bool,
}

/// The grants of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The sandbox directory, read-write, as `/`.
    pub sandbox: bool,
    pub volumes: Vec<Preopen>,
    /// Outbound TCP connections and UDP traffic to these addresses only.
    pub connect: Vec<AddrPattern>,
    pub wall_clock: bool,
    pub random: bool,
}

/// `HOST:PORT` where HOST is an IP address, a CIDR block, `localhost` or `*`, and PORT a
/// number, a range `A-B` or `*`. IPv6 hosts go in brackets: `[::1]:80`, `[fd00::/8]:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrPattern {
    hosts: Vec<(IpAddr, u8)>,
    ports: (u16, u16),
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pattern:?} is not HOST:PORT ({why})")]
pub struct PatternError {
    pub pattern: String,
    pub why: String,
}

impl std::fmt::Display for AddrPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for AddrPattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, PatternError> {
        let err = |why: &str| PatternError {
            pattern: s.to_owned(),
            why: why.to_owned(),
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest
                .split_once("]:")
                .ok_or_else(|| err("an IPv6 host is written [ADDR]:PORT"))?;
            (h, p)
        } else {
            s.rsplit_once(':').ok_or_else(|| err("no :PORT"))?
        };
        let hosts = match host {
            "*" => vec![
                (IpAddr::from([0u8, 0, 0, 0]), 0),
                (IpAddr::from([0u16; 8]), 0),
            ],
            "localhost" => vec![
                (IpAddr::from([127u8, 0, 0, 0]), 8),
                (IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]), 128),
            ],
            h => {
                let (addr, bits) = match h.split_once('/') {
                    Some((a, b)) => (a, Some(b)),
                    None => (h, None),
                };
                let ip: IpAddr = addr.parse().map_err(|_| {
                    err("the host is not an IP address, a CIDR block, localhost or *")
                })?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits = match bits {
                    Some(b) => b
                        .parse::<u8>()
                        .ok()
                        .filter(|b| *b <= max)
                        .ok_or_else(|| err("bad prefix length"))?,
                    None => max,
                };
                vec![(ip, bits)]
            }
        };
        let ports = match port {
            "*" => (0, u16::MAX),
            p => match p.split_once('-') {
                Some((a, b)) => {
                    let a: u16 = a.parse().map_err(|_| err("bad port"))?;
                    let b: u16 = b.parse().map_err(|_| err("bad port"))?;
                    if a > b {
                        return Err(err("the port range is backwards"));
                    }
                    (a, b)
                }
                None => {
                    let p: u16 = p.parse().map_err(|_| err("bad port"))?;
                    (p, p)
                }
            },
        };
        Ok(AddrPattern {
            hosts,
            ports,
            text: s.to_owned(),
        })
    }
}

fn prefix_match(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

impl AddrPattern {
    /// Whether `addr` is one this pattern allows.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        (self.ports.0..=self.ports.1).contains(&addr.port())
            && self.hosts.iter().any(|(n, b)| prefix_match(*n, *b, ip))
    }

    /// Whether everything this pattern allows, `wider` allows too: how a task's grant is
    /// checked against the agent's policy.
    pub fn within(&self, wider: &AddrPattern) -> bool {
        let ports = wider.ports.0 <= self.ports.0 && self.ports.1 <= wider.ports.1;
        ports
            && self.hosts.iter().all(|(n, b)| {
                wider
                    .hosts
                    .iter()
                    .any(|(wn, wb)| wb <= b && prefix_match(*wn, *wb, *n))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> AddrPattern {
        s.parse().unwrap()
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn patterns_match_addresses() {
        assert!(p("127.0.0.1:8080").matches(&a("127.0.0.1:8080")));
        assert!(!p("127.0.0.1:8080").matches(&a("127.0.0.1:8081")));
        assert!(p("10.0.0.0/8:*").matches(&a("10.9.8.7:1")));
        assert!(!p("10.0.0.0/8:*").matches(&a("11.0.0.1:1")));
        assert!(p("localhost:1000-2000").matches(&a("127.0.0.5:1500")));
        assert!(p("localhost:80").matches(&a("[::1]:80")));
        assert!(p("*:443").matches(&a("93.184.216.34:443")));
        assert!(p("[fd00::/8]:*").matches(&a("[fd12::1]:9")));
        // An IPv4-mapped IPv6 address is its IPv4 address.
        assert!(p("127.0.0.1:80").matches(&a("[::ffff:127.0.0.1]:80")));
        for bad in [
            "nohost",
            "example.com:80",
            "1.2.3.4:x",
            "1.2.3.4/33:1",
            "1.2.3.4:9-1",
        ] {
            assert!(bad.parse::<AddrPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_grant_fits_within_a_policy_or_not() {
        assert!(p("10.1.2.3:80").within(&p("10.0.0.0/8:*")));
        assert!(p("10.1.0.0/16:80-90").within(&p("10.0.0.0/8:1-1000")));
        assert!(!p("10.0.0.0/8:80").within(&p("10.1.0.0/16:80")));
        assert!(!p("10.1.2.3:22").within(&p("10.0.0.0/8:80")));
        assert!(p("127.0.0.1:5000").within(&p("localhost:*")));
        assert!(!p("*:80").within(&p("localhost:*")));
        assert!(p("*:80").within(&p("*:*")));
    }
}
