//! Probes its capabilities. Each argument is a probe; it prints one line per probe,
//! `<probe>: ok <detail>` or `<probe>: denied (<error>)`:
//!
//! - `read:PATH` reads a file; `write:PATH` writes one; `list:PATH` lists a directory
//! - `connect:HOST:PORT` opens a TCP connection (preview 2 only)
//! - `env:NAME` reads an environment variable
//! - `time` prints the wall clock's seconds since the Unix epoch
//! - `random` prints a hash keyed by the OS's randomness (the same every run without it)

use std::hash::{BuildHasher, Hasher};

fn report(probe: &str, result: Result<String, String>) {
    match result {
        Ok(s) => println!("{probe}: ok {}", s.trim()),
        Err(e) => println!("{probe}: denied ({e})"),
    }
}

fn main() {
    for probe in std::env::args().skip(1) {
        let (kind, arg) = probe.split_once(':').unwrap_or((probe.as_str(), ""));
        let result = match kind {
            "read" => std::fs::read_to_string(arg).map_err(|e| e.to_string()),
            "write" => std::fs::write(arg, "written by capprobe")
                .map(|()| String::new())
                .map_err(|e| e.to_string()),
            "list" => std::fs::read_dir(arg)
                .map(|d| {
                    let mut names: Vec<String> = d
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    names.join(",")
                })
                .map_err(|e| e.to_string()),
            "connect" => std::net::TcpStream::connect(arg)
                .map(|_| "connected".to_owned())
                .map_err(|e| e.to_string()),
            "env" => std::env::var(arg).map_err(|e| e.to_string()),
            "time" => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().to_string())
                .map_err(|e| e.to_string()),
            "random" => {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write(b"probe");
                Ok(format!("{:016x}", h.finish()))
            }
            _ => Err(format!("unknown probe {probe:?}")),
        };
        report(&probe, result);
    }
}
