//! Starting a task's process: into its cgroup before exec, as the leader of its own session
//! (so a signal to the process group reaches what it forks), with rlimits.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};

use crate::cgroups::TaskCgroup;

/// Resource limits set in the child before exec.
#[derive(Debug, Clone)]
pub struct Rlimits {
    pub nofile: u64,
    /// Core dumps off by default: they fill sandboxes.
    pub core: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            nofile: 65_536,
            core: 0,
        }
    }
}

/// Namespaces a task gets (root only): its own mount namespace with a private `/tmp`, UTS
/// (host name) and IPC namespaces, and optionally a network namespace with loopback only.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    pub enabled: bool,
    pub hostname: Option<String>,
    pub network_none: bool,
    /// A PID namespace too; the command must then be the [`crate::init`] wrapping the task.
    pub pid: bool,
}

/// Spawns `cmd` in `cgroup` (when given) with `rlimits`.
///
/// # Errors
/// When the process cannot be started — including when it cannot join its cgroup, which
/// fails the spawn rather than letting the task run unconfined.
pub fn spawn(
    cmd: &mut Command,
    cgroup: Option<&TaskCgroup>,
    rlimits: &Rlimits,
) -> io::Result<Child> {
    confine(cmd, cgroup, rlimits, &Namespaces::default(), None)?;
    cmd.spawn()
}

/// Sets `cmd` up to join `cgroup`, lead its own session, enter `ns`, take `rlimits` and
/// then drop to `user` (uid, gid) between fork and exec, in that order: the cgroup and
/// namespaces need root. With a PID namespace the init switches user instead (it needs
/// root to mount `/proc`), so pass the user to it ([`crate::init::args`]) and `None` here.
/// Spawn `cmd` with std or tokio.
///
/// Do not set the uid with `CommandExt::uid`: std switches before this runs.
///
/// # Errors
/// When a cgroup path cannot be passed to the child.
pub fn confine(
    cmd: &mut Command,
    cgroup: Option<&TaskCgroup>,
    rlimits: &Rlimits,
    ns: &Namespaces,
    user: Option<(u32, u32)>,
) -> io::Result<()> {
    let hostname = ns.hostname.clone().unwrap_or_default().into_bytes();
    let ns = ns.clone();
    let joins: Vec<CString> = cgroup
        .map(TaskCgroup::join_paths)
        .unwrap_or_default()
        .into_iter()
        .map(|p: PathBuf| CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut limits = rlimits.clone();
    // Raising a hard limit needs CAP_SYS_RESOURCE, which containers often drop: never ask
    // for more than the agent has.
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } == 0 {
        limits.nofile = limits.nofile.min(current.rlim_max);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (open, write, close, setsid, unshare, mount, setrlimit,
    // setgroups, setresgid, setresuid) on data prepared before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            for path in &joins {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if ns.enabled {
                enter_namespaces(&ns, &hostname)?;
            }
            for (resource, value) in [
                (libc::RLIMIT_NOFILE, limits.nofile),
                (libc::RLIMIT_CORE, limits.core),
            ] {
                let lim = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &lim) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid)) = user {
                crate::init::switch_user(uid, gid)?;
            }
            Ok(())
        });
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs in the forked child: only syscalls on data prepared before the fork.
fn enter_namespaces(ns: &Namespaces, hostname: &[u8]) -> io::Result<()> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if ns.network_none {
        flags |= libc::CLONE_NEWNET;
    }
    if ns.pid {
        flags |= libc::CLONE_NEWPID;
    }
    // SAFETY: unshare, mount, sethostname, socket, ioctl and close are plain syscalls on
    // NUL-terminated literals and buffers that live across the call.
    unsafe {
        check(libc::unshare(flags))?;
        // Mounts made here must not leak back to the host.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"tmpfs".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=1777".as_ptr().cast(),
        ))?;
        if !hostname.is_empty() {
            check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
        }
        if ns.network_none {
            // A new network namespace has a loopback interface, down.
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            check(fd)?;
            let mut req: libc::ifreq = std::mem::zeroed();
            req.ifr_name[0] = b'l' as libc::c_char;
            req.ifr_name[1] = b'o' as libc::c_char;
            let rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
            if rc == 0 {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
            }
            libc::close(fd);
        }
    }
    Ok(())
}
