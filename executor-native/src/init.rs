//! The tiny init that gives a task a PID namespace of its own.
//!
//! The agent starts `INIT [--user UID:GID] -- PROGRAM ARGS…` after `unshare(CLONE_NEWPID)`
//! (see [`crate::launch::Namespaces::pid`]). Unsharing moves only the caller's future children
//! into the new namespace, so the init forks: its child is PID 1 there, mounts a `/proc` of
//! the namespace, forks the task as PID 2 and reaps every orphan until the task exits. PID 1
//! ignores signals it has no handler for, so it forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT
//! to the task; the outer process forwards them to PID 1 and exits as the task did. With
//! `--user`, the init stays root (it must mount `/proc`) and only the task drops to the
//! user, just before exec.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};

static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

fn install_forwarding(to: libc::pid_t) {
    FORWARD_TO.store(to, Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installs a handler that only calls kill(2).
        unsafe {
            libc::signal(sig, forward as *const () as libc::sighandler_t);
        }
    }
}

/// Waits for `pid`, returning an exit code in the shell's convention (128 + signal).
fn wait_for(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 127;
        }
    }
}

/// The arguments the init takes before the task's argv: `[--user UID:GID] --`.
pub fn args(user: Option<(u32, u32)>) -> Vec<std::ffi::OsString> {
    let mut v = Vec::new();
    if let Some((uid, gid)) = user {
        v.push("--user".into());
        v.push(format!("{uid}:{gid}").into());
    }
    v.push("--".into());
    v
}

/// Parses `[--user UID:GID] [--] PROGRAM ARGS…` and runs the init; see [`run`].
pub fn main(args: &[std::ffi::OsString]) -> ! {
    let mut rest = args;
    let mut user = None;
    if rest.first().is_some_and(|a| a == "--user") {
        let parsed = rest.get(1).and_then(|v| {
            let (u, g) = v.to_str()?.split_once(':')?;
            Some((u.parse().ok()?, g.parse().ok()?))
        });
        let Some(ids) = parsed else {
            eprintln!("agora init: --user wants UID:GID");
            std::process::exit(127);
        };
        user = Some(ids);
        rest = &rest[2..];
    }
    if rest.first().is_some_and(|a| a == "--") {
        rest = &rest[1..];
    }
    run(rest, user)
}

/// Drops to `uid`/`gid` with no supplementary groups.
///
/// # Errors
/// When the kernel refuses (the caller is not root).
pub fn switch_user(uid: u32, gid: u32) -> std::io::Result<()> {
    // SAFETY: plain syscalls on integers; async-signal-safe, so callable between fork and
    // exec.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) < 0
            || libc::setresgid(gid, gid, gid) < 0
            || libc::setresuid(uid, uid, uid) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs the init for `argv` (the program and its arguments), the task as `user` when given,
/// and exits with the task's status. Call it first thing in a process started for the
/// purpose.
pub fn run(argv: &[std::ffi::OsString], user: Option<(u32, u32)>) -> ! {
    let Some(program) = argv.first() else {
        eprintln!("agora init: no program given");
        std::process::exit(127);
    };
    let args: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_default())
        .collect();
    let program = CString::new(program.as_bytes()).unwrap_or_default();
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());

    // SAFETY: fork in a single-threaded process started only to run this.
    let pid1 = unsafe { libc::fork() };
    if pid1 < 0 {
        eprintln!("agora init: fork: {}", std::io::Error::last_os_error());
        std::process::exit(127);
    }
    if pid1 > 0 {
        // Outside the namespace: stand in for the task.
        install_forwarding(pid1);
        std::process::exit(wait_for(pid1));
    }
    // PID 1 of the new namespace. A /proc of its own, where the mount namespace allows.
    // SAFETY: mount on literals; failure only means a /proc showing the host's processes.
    unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        );
    }
    // SAFETY: fork, then execvp in the child with pointers into live CStrings.
    let task = unsafe { libc::fork() };
    if task == 0 {
        if let Some((uid, gid)) = user
            && let Err(e) = switch_user(uid, gid)
        {
            eprintln!("agora init: cannot become {uid}:{gid}: {e}");
            // SAFETY: leave the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(127) };
        }
        // SAFETY: as above; execvp returns only on failure.
        unsafe {
            libc::execvp(program.as_ptr(), ptrs.as_ptr());
        }
        eprintln!(
            "agora init: cannot run {:?}: {}",
            program,
            std::io::Error::last_os_error()
        );
        // SAFETY: leave the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(127) };
    }
    if task < 0 {
        eprintln!("agora init: fork: {}", std::io::Error::last_os_error());
        std::process::exit(127);
    }
    install_forwarding(task);
    // Reap everything; when the task itself ends, so does the namespace.
    let code = loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == task {
            break if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            break 127;
        }
    };
    std::process::exit(code);
}
