//! What an agent offers: detected from the machine, overridden by flags (as in Mesos, a
//! resource named on the command line replaces the detected one of that name).

use std::path::Path;

use agora_core::Resources;
use agora_core::resources::{Range, Ranges, Reservation, Resource, Scalar, Value};

/// Memory kept back for the agent and the system: 1 GiB, or a tenth of the machine when that
/// is more, but never more than half.
pub fn memory_reserve_mib(total_mib: u64) -> u64 {
    (total_mib / 10).max(1024).min(total_mib / 2)
}

/// Disk kept back: 5 GiB or a tenth of the free space, whichever is less.
pub fn disk_reserve_mib(free_mib: u64) -> u64 {
    (free_mib / 10).min(5 * 1024)
}

fn total_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

fn free_disk_mib(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, so a zeroed value is valid to write into.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a writable statvfs; the call reads
    // the one and writes only the other.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / (1 << 20))
}

/// Resources detected on this machine: cpus from the cores, mem from total memory minus a
/// reserve, disk from the work directory's file system minus a reserve, ports 31000-32000.
pub fn detect(work_dir: &Path) -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem = total_memory_mib().map_or(1024, |m| m - memory_reserve_mib(m));
    let disk = free_disk_mib(work_dir).map_or(0, |d| d - disk_reserve_mib(d));
    let scalar = |name: &str, v: u64| Resource {
        name: name.to_owned(),
        reservation: Reservation::Unreserved,
        value: Value::Scalar(Scalar::from_units(v)),
    };
    [
        scalar("cpus", cpus),
        scalar("mem", mem),
        scalar("disk", disk),
        Resource {
            name: "ports".into(),
            reservation: Reservation::Unreserved,
            value: Value::Ranges(Ranges::from_ranges([Range {
                begin: 31000,
                end: 32000,
            }])),
        },
    ]
    .into_iter()
    .collect()
}

/// `detected`, with every resource named in `flags` replaced by the flag's.
pub fn merge(detected: &Resources, flags: &Resources) -> Resources {
    let named: std::collections::BTreeSet<String> = flags.iter().map(|r| r.name).collect();
    detected
        .iter()
        .filter(|r| !named.contains(&r.name))
        .chain(flags.iter())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_core::parse_resources;

    #[test]
    fn flags_replace_detected_resources_by_name() {
        let detected = parse_resources("cpus:2;mem:20000;disk:1000;ports:[31000-32000]").unwrap();
        let flags = parse_resources("cpus(eng):1;cpus:3;gpus:1").unwrap();
        let merged = merge(&detected, &flags);
        assert_eq!(
            merged,
            parse_resources("cpus(eng):1;cpus:3;gpus:1;mem:20000;disk:1000;ports:[31000-32000]")
                .unwrap()
        );
    }

    #[test]
    fn detection_finds_this_machine() {
        let r = detect(Path::new("/"));
        assert!(r.cpus() >= 1.0);
        assert!(r.mem() >= 512.0, "{r}");
        assert_eq!(r.ranges("ports").count(), 1001);
    }

    #[test]
    fn reserves_are_sane() {
        assert_eq!(memory_reserve_mib(24 * 1024), 2457);
        assert_eq!(memory_reserve_mib(1024), 512);
        assert_eq!(disk_reserve_mib(80 * 1024), 5 * 1024);
        assert_eq!(disk_reserve_mib(1000), 100);
    }
}
