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

    /// The CPUs this process may run on, asked of the kernel directly.
    fn affinity_cpus() -> u32 {
        // SAFETY: cpu_set_t is plain data; zeroed is an empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a writable cpu_set_t of the size passed; pid 0 is this thread.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        assert_eq!(
            rc,
            0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `set` was filled in by the kernel above.
        unsafe { libc::CPU_COUNT(&set) as u32 }
    }

    /// Total memory in MiB from sysinfo(2), not /proc/meminfo.
    fn sysinfo_mib() -> u64 {
        // SAFETY: sysinfo is plain data; zeroed is valid to write into.
        let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a writable sysinfo.
        assert_eq!(unsafe { libc::sysinfo(&mut info) }, 0);
        info.totalram as u64 * u64::from(info.mem_unit) / (1 << 20)
    }

    /// Free space of `/` in MiB, as df(1) reports it.
    fn df_avail_mib() -> u64 {
        let out = std::process::Command::new("df")
            .args(["-B1M", "--output=avail", "/"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn detection_finds_this_machine() {
        let r = detect(Path::new("/"));
        // What the machine has, found another way than detection's, so that a fallback (one
        // CPU, 1 GiB, no disk) fails here. A machine with one CPU cannot tell the CPU fallback
        // apart; this one, and CI's, have two.
        assert_eq!(r.cpus(), f64::from(affinity_cpus()), "{r}");
        let total = sysinfo_mib();
        assert_eq!(r.mem(), (total - memory_reserve_mib(total)) as f64, "{r}");
        let free = df_avail_mib();
        let disk = (free - disk_reserve_mib(free)) as f64;
        // Other processes write meanwhile: within 1% or 256 MiB.
        assert!(
            (r.disk() - disk).abs() <= (disk / 100.0).max(256.0),
            "disk {} vs {disk} from df: {r}",
            r.disk()
        );
        assert!(r.disk() > 0.0, "{r}");
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
