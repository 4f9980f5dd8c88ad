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
    /// Directories under `/tmp` (a sandbox, say) that stay visible at the same path inside
    /// the private `/tmp`: bind-mounted back over it.
    pub keep: Vec<PathBuf>,
}

/// A directory to bind back into the private `/tmp`, prepared before the fork: its path and
/// every ancestor below `/tmp`, to create in the new tmpfs first.
struct Keep {
    path: CString,
    ancestors: Vec<CString>,
}

/// Most directories [`Namespaces::keep`] may hold.
pub const MAX_KEEP: usize = 16;

fn keeps(paths: &[PathBuf]) -> io::Result<Vec<Keep>> {
    if paths.len() > MAX_KEEP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_KEEP} directories can be kept visible in a private /tmp"),
        ));
    }
    let c = |p: &std::path::Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let mut out = Vec::new();
    for p in paths {
        // Nothing to keep where there is nothing (a directory made later is not seen).
        let Ok(rel) = p.strip_prefix("/tmp") else {
            continue;
        };
        if !p.is_dir() {
            continue;
        }
        let mut ancestors = Vec::new();
        let mut at = PathBuf::from("/tmp");
        for part in rel.components() {
            at.push(part);
            ancestors.push(c(&at)?);
        }
        if !ancestors.is_empty() {
            out.push(Keep {
                path: c(p)?,
                ancestors,
            });
        }
    }
    Ok(out)
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
    confine(cmd, cgroup, rlimits, &Namespaces::default(), None, None)?;
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
/// With `filters`, the process execs under them (and `no_new_privs`), installed last. Not
/// with a PID namespace: the init needs `mount`; it installs them for the task itself
/// ([`crate::init::Supervise::seccomp`]).
///
/// # Errors
/// When a cgroup path cannot be passed to the child.
pub fn confine(
    cmd: &mut Command,
    cgroup: Option<&TaskCgroup>,
    rlimits: &Rlimits,
    ns: &Namespaces,
    user: Option<(u32, u32)>,
    filters: Option<&crate::seccomp::Filters>,
) -> io::Result<()> {
    let filters = filters.cloned();
    let hostname = ns.hostname.clone().unwrap_or_default().into_bytes();
    let keep = keeps(&ns.keep)?;
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
                enter_namespaces(&ns, &hostname, &keep)?;
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
            if let Some(f) = &filters {
                f.apply()?;
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

/// Writes `/proc/self/fd/<fd>` into `buf` as a C string, without allocating.
fn fd_path(fd: libc::c_int, buf: &mut [u8; 32]) -> *const libc::c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[prefix.len() + i] = digits[len - 1 - i];
    }
    buf[prefix.len() + len] = 0;
    buf.as_ptr().cast()
}

/// Runs in the forked child: only syscalls on data prepared before the fork.
fn enter_namespaces(ns: &Namespaces, hostname: &[u8], keep: &[Keep]) -> io::Result<()> {
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
        // Hold on to the directories to keep before the tmpfs hides them. At most a few.
        let mut fds = [-1 as libc::c_int; MAX_KEEP];
        for (k, fd) in keep.iter().zip(fds.iter_mut()) {
            *fd = libc::open(
                k.path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            check(*fd)?;
        }
        check(libc::mount(
            c"tmpfs".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=1777".as_ptr().cast(),
        ))?;
        for (k, fd) in keep.iter().zip(fds) {
            for a in &k.ancestors {
                if libc::mkdir(a.as_ptr(), 0o755) < 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut buf = [0u8; 32];
            check(libc::mount(
                fd_path(fd, &mut buf),
                k.path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            libc::close(fd);
        }
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
