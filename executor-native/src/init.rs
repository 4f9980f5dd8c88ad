//! The tiny init that gives a task a PID namespace of its own.
//!
//! The agent starts `INIT [--user UID:GID] [--env-stdin] -- PROGRAM ARGS…` after
//! `unshare(CLONE_NEWPID)`
//! (see [`crate::launch::Namespaces::pid`]). Unsharing moves only the caller's future children
//! into the new namespace, so the init forks: its child is PID 1 there, mounts a `/proc` of
//! the namespace, forks the task as PID 2 and reaps every orphan until the task exits. PID 1
//! ignores signals it has no handler for, so it forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT
//! to the task; the outer process forwards them to PID 1 and exits as the task did. With
//! `--user`, the init stays root (it must mount `/proc`) and only the task drops to the
//! user, just before exec.
//!
//! The init runs as root, so it must not run with the task's environment: `LD_PRELOAD` or
//! `LD_LIBRARY_PATH` set by the task would load the task's code into it. With
//! `--env-stdin` the agent starts it with an empty environment and writes the task's on its
//! stdin (`NAME=VALUE` entries, each ended by a NUL, then one more NUL); the init reads it,
//! puts `/dev/null` on its stdin, and passes the environment to the task's exec alone.
//!
//! The init is also the task's supervisor, so that the task outlives the agent that started
//! it. With `--exit-file PATH` the outer process writes the task's exit code there (written
//! to a new file, synced, then renamed into place) before it exits, for an agent that is no
//! longer its parent to read. With `--logs DIR MAX KEEP` the outer process, not the agent,
//! holds the read ends of the task's stdout and stderr: it appends them to `DIR/stdout` and
//! `DIR/stderr`, rotating each at `MAX` bytes into `NAME.1` … `NAME.KEEP`, so no pipe breaks
//! when the agent goes away.
//!
//! With `--seccomp` the task starts under [`crate::seccomp`]'s filters and `no_new_privs`,
//! installed after the user switch, just before exec (the init itself keeps the calls it
//! needs, `mount` among them).

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

const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) the forwarded signals. They are blocked
/// from before each fork until the forwarding is installed, so that one arriving in between
/// waits and is then forwarded, instead of being ignored by PID 1 (or killing the outer init)
/// while the task never hears of it.
fn mask_forwarded(how: libc::c_int) {
    // SAFETY: sigset operations on a local set, and sigprocmask, in a single-threaded
    // process (or the child of one); all async-signal-safe.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in FORWARDED {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(how, &set, std::ptr::null_mut());
    }
}

fn install_forwarding(to: libc::pid_t) {
    FORWARD_TO.store(to, Ordering::Relaxed);
    for sig in FORWARDED {
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

/// How the init supervises the task (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Supervise {
    /// Where the task's exit code is written when it ends.
    pub exit_file: Option<std::path::PathBuf>,
    /// The task's stdout and stderr pumped into rotating files.
    pub logs: Option<Logs>,
    /// The task starts under the default seccomp filters ([`crate::seccomp`]).
    pub seccomp: bool,
}

/// Rotating logs: `dir/stdout` and `dir/stderr`, each rotated at `max` bytes, `keep` kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logs {
    pub dir: std::path::PathBuf,
    pub max: u64,
    pub keep: usize,
}

/// The arguments the init takes before the task's argv:
/// `[--user UID:GID] [--env-stdin] [--exit-file PATH] [--logs DIR MAX KEEP] --`.
pub fn args(
    user: Option<(u32, u32)>,
    env_stdin: bool,
    supervise: &Supervise,
) -> Vec<std::ffi::OsString> {
    let mut v = Vec::new();
    if let Some((uid, gid)) = user {
        v.push("--user".into());
        v.push(format!("{uid}:{gid}").into());
    }
    if env_stdin {
        v.push("--env-stdin".into());
    }
    if let Some(f) = &supervise.exit_file {
        v.push("--exit-file".into());
        v.push(f.clone().into_os_string());
    }
    if let Some(l) = &supervise.logs {
        v.push("--logs".into());
        v.push(l.dir.clone().into_os_string());
        v.push(l.max.to_string().into());
        v.push(l.keep.to_string().into());
    }
    if supervise.seccomp {
        v.push("--seccomp".into());
    }
    v.push("--".into());
    v
}

/// Reads an exit file the init wrote: the task's exit code (128 + signal for a signal).
/// `None` when there is none, or it does not hold a code.
///
/// The file is in the task's sandbox, where the task could plant anything: only a regular
/// file with one link, owned by this process's user (the init's, who wrote it), is read, and
/// opening never blocks (a FIFO planted there would hang the reader).
pub fn read_exit_file(path: &std::path::Path) -> Option<i32> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let m = f.metadata().ok()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.file_type().is_file() || m.nlink() != 1 || m.uid() != me {
        return None;
    }
    let mut s = String::new();
    f.by_ref().take(32).read_to_string(&mut s).ok()?;
    s.trim().parse().ok().filter(|c| (0..=255).contains(c))
}

/// Writes `code` to `path`: a new file next to it, synced, renamed into place. The file's
/// directory may be the task's (its sandbox): never follow a link planted there.
fn write_exit_file(path: &std::path::Path, code: i32) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A name the task cannot guess ahead and block with a directory of its own.
    let mut tmp = path.as_os_str().to_owned();
    let mut noise = [0u8; 8];
    // SAFETY: getrandom writes at most the buffer's length into it.
    unsafe {
        libc::getrandom(noise.as_mut_ptr().cast(), noise.len(), 0);
    }
    tmp.push(format!(".{:016x}", u64::from_ne_bytes(noise)));
    let tmp = std::path::PathBuf::from(tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{code}")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if let Err(e) = written {
        eprintln!(
            "agora init: recording the exit status in {}: {e}",
            path.display()
        );
    }
}

/// One rotating log the outer init writes.
struct Log {
    logs: Logs,
    name: &'static str,
    user: Option<(u32, u32)>,
    file: Option<std::fs::File>,
    size: u64,
}

impl Log {
    fn path(&self, i: usize) -> std::path::PathBuf {
        if i == 0 {
            self.logs.dir.join(self.name)
        } else {
            self.logs.dir.join(format!("{}.{i}", self.name))
        }
    }

    /// Opens `NAME` for appending (`fresh`: a new file), never through a link, owned by the
    /// task's user. The directory is the task's: what it planted there (a symbolic or a hard
    /// link, anything but a plain file of its own) is not written to.
    fn open(&mut self, fresh: bool) {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut o = std::fs::OpenOptions::new();
        o.mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
        if fresh {
            let _ = std::fs::remove_file(self.path(0));
            o.write(true).create_new(true);
        } else {
            o.append(true).create(true);
        }
        self.file = o.open(self.path(0)).ok().filter(|f| {
            f.metadata()
                .is_ok_and(|m| m.file_type().is_file() && m.nlink() == 1)
        });
        if let (Some(f), Some((uid, gid))) = (&self.file, self.user) {
            let _ = std::os::unix::fs::fchown(f, Some(uid), Some(gid));
        }
        self.size = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
    }

    fn rotate(&mut self) {
        self.file = None;
        if self.logs.keep > 0 {
            let _ = std::fs::remove_file(self.path(self.logs.keep));
            for i in (0..self.logs.keep).rev() {
                if self.path(i).exists() {
                    let _ = std::fs::rename(self.path(i), self.path(i + 1));
                }
            }
        }
        self.open(true);
    }

    fn write(&mut self, mut data: &[u8]) {
        use std::io::Write;
        while !data.is_empty() {
            // Rotate only when more comes, so a full file is not followed by an empty one.
            if self.size >= self.logs.max {
                self.rotate();
            }
            let take = ((self.logs.max - self.size) as usize).min(data.len());
            // A log that cannot be written loses the output, never the task.
            if let Some(f) = self.file.as_mut() {
                let _ = f.write_all(&data[..take]);
            }
            self.size += take as u64;
            data = &data[take..];
        }
    }
}

/// Reads both pipes into their logs until every writer has closed them.
fn pump(fds: [libc::c_int; 2], logs: &Logs, user: Option<(u32, u32)>) {
    let mut out: Vec<Log> = ["stdout", "stderr"]
        .into_iter()
        .map(|name| {
            let mut l = Log {
                logs: logs.clone(),
                name,
                user,
                file: None,
                size: 0,
            };
            l.open(false);
            l
        })
        .collect();
    let mut polls = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let mut buf = vec![0u8; 64 * 1024];
    while polls.iter().any(|p| p.fd >= 0) {
        // SAFETY: poll on our own array of two pollfds.
        let r = unsafe { libc::poll(polls.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        for (i, p) in polls.iter_mut().enumerate() {
            if p.fd < 0 || p.revents == 0 {
                continue;
            }
            // SAFETY: read into our buffer from a pipe we own.
            let n = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                out[i].write(&buf[..n as usize]);
            } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
            {
                // SAFETY: closing a pipe we own, once.
                unsafe { libc::close(p.fd) };
                p.fd = -1;
            }
        }
    }
}

/// Most bytes of environment the init reads from its stdin.
pub const MAX_ENV_BYTES: u64 = 64 << 20;

/// Parses the NUL-ended `NAME=VALUE` entries the agent writes on the init's stdin.
///
/// # Errors
/// Naming the first entry without a `=` or with an empty name.
pub fn parse_env(bytes: &[u8]) -> Result<Vec<CString>, String> {
    bytes
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| {
            if e.iter().position(|b| *b == b'=').is_none_or(|i| i == 0) {
                return Err(format!(
                    "environment entry {:?} is not NAME=VALUE",
                    String::from_utf8_lossy(e)
                ));
            }
            // Split on NULs, so none is left inside.
            CString::new(e).map_err(|e| e.to_string())
        })
        .collect()
}

/// Reads the task's environment from stdin, then puts `/dev/null` there for the task.
fn read_env() -> Result<Vec<CString>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_ENV_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the task's environment: {e}"))?;
    if bytes.len() as u64 > MAX_ENV_BYTES {
        return Err(format!(
            "the task's environment is larger than {MAX_ENV_BYTES} bytes"
        ));
    }
    // Ended by an empty entry; without it the agent went away (or chose not to start the
    // task) before it was done, and nothing may run.
    if !(bytes == [0] || bytes.ends_with(&[0, 0])) {
        return Err("the agent did not give the task its environment; not starting it".into());
    }
    // SAFETY: open and dup2 on a literal path and fds we own.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null < 0 || libc::dup2(null, 0) < 0 {
            return Err(format!(
                "putting /dev/null on stdin: {}",
                std::io::Error::last_os_error()
            ));
        }
        if null != 0 {
            libc::close(null);
        }
    }
    parse_env(&bytes)
}

/// What [`args`] says, read back.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    user: Option<(u32, u32)>,
    env_stdin: bool,
    supervise: Supervise,
    /// Where the task's argv starts.
    argv: usize,
}

fn parse(args: &[std::ffi::OsString]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    let arg = |i: usize, what: &str| {
        args.get(i)
            .cloned()
            .ok_or_else(|| format!("{what} wants a value"))
    };
    while let Some(a) = args.get(i) {
        match a.to_str() {
            Some("--user") => {
                let v = arg(i + 1, "--user")?;
                let ids = v
                    .to_str()
                    .and_then(|v| v.split_once(':'))
                    .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                    .ok_or("--user wants UID:GID")?;
                p.user = Some(ids);
                i += 2;
            }
            Some("--env-stdin") => {
                p.env_stdin = true;
                i += 1;
            }
            Some("--seccomp") => {
                p.supervise.seccomp = true;
                i += 1;
            }
            Some("--exit-file") => {
                p.supervise.exit_file = Some(arg(i + 1, "--exit-file")?.into());
                i += 2;
            }
            Some("--logs") => {
                let dir = arg(i + 1, "--logs")?;
                let number = |j: usize| -> Result<u64, String> {
                    arg(j, "--logs")?
                        .to_str()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| "--logs wants DIR MAX KEEP".to_owned())
                };
                p.supervise.logs = Some(Logs {
                    dir: dir.into(),
                    max: number(i + 2)?.max(1),
                    keep: number(i + 3)?.min(100) as usize,
                });
                i += 4;
            }
            Some("--") => {
                i += 1;
                break;
            }
            _ => break,
        }
    }
    p.argv = i;
    Ok(p)
}

/// Parses [`args`]' arguments, then the task's argv, and runs the init; see [`run`].
pub fn main(args: &[std::ffi::OsString]) -> ! {
    let p = match parse(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agora init: {e}");
            std::process::exit(127);
        }
    };
    let mut env = None;
    if p.env_stdin {
        match read_env() {
            Ok(e) => env = Some(e),
            Err(e) => {
                eprintln!("agora init: {e}");
                std::process::exit(127);
            }
        }
    }
    run(&args[p.argv..], p.user, env, &p.supervise)
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

/// Runs the init for `argv` (the program and its arguments), the task as `user` when given
/// and with `env` as its whole environment when given (else the init's own), and exits with
/// the task's status. Call it first thing in a process started for the purpose.
pub fn run(
    argv: &[std::ffi::OsString],
    user: Option<(u32, u32)>,
    env: Option<Vec<CString>>,
    supervise: &Supervise,
) -> ! {
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
    // The program is looked up on the task's PATH, not the init's (it has none).
    let path: Option<CString> = env.as_ref().map(|env| {
        env.iter()
            .find_map(|e| e.as_bytes().strip_prefix(b"PATH=").map(<[u8]>::to_vec))
            .and_then(|p| CString::new(p).ok())
            .unwrap_or_else(|| c"/usr/local/bin:/usr/bin:/bin".to_owned())
    });
    let envp: Option<Vec<*const libc::c_char>> = env.as_ref().map(|env| {
        env.iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    });

    // The task's stdout and stderr: pipes whose read ends the outer process keeps.
    let pipes = supervise.logs.as_ref().map(|_| {
        let mut out = [0; 2];
        let mut err = [0; 2];
        // SAFETY: pipe2 writes two fds into each local array.
        let ok = unsafe {
            libc::pipe2(out.as_mut_ptr(), libc::O_CLOEXEC) == 0
                && libc::pipe2(err.as_mut_ptr(), libc::O_CLOEXEC) == 0
        };
        if !ok {
            eprintln!("agora init: pipe: {}", std::io::Error::last_os_error());
            std::process::exit(127);
        }
        (out, err)
    });
    // Built here, before any fork: compiling the filters allocates.
    let filters = supervise.seccomp.then(|| {
        crate::seccomp::Filters::new().unwrap_or_else(|e| {
            eprintln!("agora init: {e}");
            std::process::exit(127);
        })
    });
    mask_forwarded(libc::SIG_BLOCK);
    // SAFETY: fork in a single-threaded process started only to run this.
    let pid1 = unsafe { libc::fork() };
    if pid1 < 0 {
        eprintln!("agora init: fork: {}", std::io::Error::last_os_error());
        std::process::exit(127);
    }
    if pid1 > 0 {
        // Outside the namespace: stand in for the task.
        install_forwarding(pid1);
        mask_forwarded(libc::SIG_UNBLOCK);
        if let (Some((out, err)), Some(logs)) = (pipes, &supervise.logs) {
            // SAFETY: the write ends belong to PID 1 now; closing ours lets the pipes end.
            unsafe {
                libc::close(out[1]);
                libc::close(err[1]);
                // The agent may be gone: nothing of ours writes to what it gave us.
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                if null >= 0 {
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    libc::close(null);
                }
            }
            pump([out[0], err[0]], logs, user);
        }
        let code = wait_for(pid1);
        if let Some(f) = &supervise.exit_file {
            write_exit_file(f, code);
        }
        std::process::exit(code);
    }
    if let Some((out, err)) = pipes {
        // SAFETY: PID 1's stdout and stderr become the pipes' write ends (dup2 clears
        // close-on-exec on the copies); the originals and the read ends close at exec.
        unsafe {
            libc::dup2(out[1], 1);
            libc::dup2(err[1], 2);
        }
    }
    // PID 1 of the new namespace: it dies with the outer process (and so the whole
    // namespace), whoever kills that.
    // SAFETY: prctl with plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // A /proc of its own, where the mount namespace allows.
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
        // The mask survives exec: the task starts with nothing blocked.
        mask_forwarded(libc::SIG_UNBLOCK);
        if let Some((uid, gid)) = user
            && let Err(e) = switch_user(uid, gid)
        {
            eprintln!("agora init: cannot become {uid}:{gid}: {e}");
            // SAFETY: leave the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(127) };
        }
        if let Some(f) = &filters
            && let Err(e) = f.apply()
        {
            eprintln!("agora init: cannot install the seccomp filters: {e}");
            // SAFETY: as above.
            unsafe { libc::_exit(127) };
        }
        match (&path, envp.as_deref()) {
            (Some(path), Some(envp)) => exec_with(&program, &ptrs, path, envp),
            // SAFETY: as above; execvp returns only on failure.
            _ => unsafe {
                libc::execvp(program.as_ptr(), ptrs.as_ptr());
            },
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
    mask_forwarded(libc::SIG_UNBLOCK);
    drop(envp);
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

/// Executes `program` with `argv` and the environment `envp`, looking a name without a `/`
/// up on `path` as a shell would; returns only when every candidate failed. Runs in the
/// forked child of a single-threaded process, so it may allocate.
/// `execve`, and for a file the kernel cannot run (`ENOEXEC`: a script without `#!`) the
/// shell on it, as `execvp` does.
fn execve_or_sh(file: &CString, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) {
    // SAFETY: NUL-terminated arrays of pointers into live CStrings.
    unsafe {
        libc::execve(file.as_ptr(), argv.as_ptr(), envp.as_ptr());
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOEXEC) {
        return;
    }
    let mut sh: Vec<*const libc::c_char> = vec![c"/bin/sh".as_ptr(), file.as_ptr()];
    // argv[0] is replaced by the file; the NUL at the end is kept.
    sh.extend_from_slice(argv.get(1..).unwrap_or_default());
    // SAFETY: as above; `sh` points into `file` and the caller's live strings.
    unsafe {
        libc::execve(c"/bin/sh".as_ptr(), sh.as_ptr(), envp.as_ptr());
    }
    // Report the script's own failure, not the shell's.
    // SAFETY: errno is thread-local.
    unsafe {
        *libc::__errno_location() = libc::ENOEXEC;
    }
}

fn exec_with(
    program: &CString,
    argv: &[*const libc::c_char],
    path: &CString,
    envp: &[*const libc::c_char],
) {
    if program.as_bytes().contains(&b'/') {
        execve_or_sh(program, argv, envp);
        return;
    }
    let mut first_err = None;
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(program.as_bytes());
        let Ok(full) = CString::new(full) else {
            continue;
        };
        execve_or_sh(&full, argv, envp);
        let err = std::io::Error::last_os_error();
        // Keep the most telling error, as execvp does: a file that is there but cannot run.
        if err.raw_os_error() != Some(libc::ENOENT) && first_err.is_none() {
            first_err = err.raw_os_error();
        }
    }
    if let Some(e) = first_err {
        // SAFETY: errno is thread-local; setting it lets the caller report it.
        unsafe {
            *libc::__errno_location() = e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_payload_parses_entry_by_entry() {
        let env = parse_env(b"PATH=/bin\0LD_PRELOAD=/x.so\0EMPTY=\0").unwrap();
        let got: Vec<&[u8]> = env.iter().map(|c| c.as_bytes()).collect();
        assert_eq!(got, [&b"PATH=/bin"[..], b"LD_PRELOAD=/x.so", b"EMPTY="]);
        assert!(parse_env(b"").unwrap().is_empty());
        let err = parse_env(b"OK=1\0=nameless\0").unwrap_err();
        assert!(err.contains("\"=nameless\""), "{err}");
        assert!(parse_env(b"NOVALUE\0").is_err());
    }

    #[test]
    fn supervision_arguments_round_trip() {
        let sup = Supervise {
            exit_file: Some("/w/run/.agora-exit".into()),
            logs: Some(Logs {
                dir: "/w/run".into(),
                max: 1024,
                keep: 2,
            }),
            seccomp: true,
        };
        let mut a = args(Some((65534, 65534)), true, &sup);
        a.extend(["/bin/sh".into(), "-c".into(), "true".into()]);
        let p = parse(&a).unwrap();
        assert_eq!(p.user, Some((65534, 65534)));
        assert!(p.env_stdin);
        assert_eq!(p.supervise, sup);
        assert_eq!(a[p.argv], "/bin/sh");
        assert!(parse(&["--logs".into(), "/d".into(), "x".into(), "1".into()]).is_err());
    }

    #[test]
    fn an_exit_file_holds_a_code_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("exit");
        write_exit_file(&f, 7);
        assert_eq!(read_exit_file(&f), Some(7));
        write_exit_file(&f, 137);
        assert_eq!(read_exit_file(&f), Some(137));
        std::fs::write(&f, "garbage").unwrap();
        assert_eq!(read_exit_file(&f), None);
        assert_eq!(read_exit_file(&dir.path().join("none")), None);
    }

    /// `read_exit_file` on another thread, so a reader that blocks fails the test.
    fn read_within_5s(path: &std::path::Path) -> Option<i32> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(read_exit_file(&path));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("reading the exit file blocked")
    }

    #[test]
    fn what_a_task_plants_as_its_exit_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "3\n").unwrap();
        // A FIFO: opening it for reading would wait for a writer.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo on a path in the test's own directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        assert_eq!(read_within_5s(&fifo), None);
        // A hard link to a file of someone else's choosing.
        let hard = dir.path().join("hard");
        std::fs::hard_link(&secret, &hard).unwrap();
        assert_eq!(read_within_5s(&hard), None);
        // A symbolic link, to a file of its own that is otherwise fine to read.
        let alone = dir.path().join("alone");
        std::fs::write(&alone, "4\n").unwrap();
        assert_eq!(read_within_5s(&alone), Some(4));
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&alone, &sym).unwrap();
        assert_eq!(read_within_5s(&sym), None);
        // A directory.
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(read_within_5s(&d), None);
    }

    /// A task's stdout log in `dir`, rotated at `max` bytes, one old file kept.
    fn stdout_log(dir: &std::path::Path, max: u64) -> Log {
        Log {
            logs: Logs {
                dir: dir.into(),
                max,
                keep: 1,
            },
            name: "stdout",
            user: None,
            file: None,
            size: 0,
        }
    }

    #[test]
    fn a_planted_log_file_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let mut l = stdout_log(dir.path(), 1024);
        for plant in [
            |t: &std::path::Path, p: &std::path::Path| std::fs::hard_link(t, p),
            |t: &std::path::Path, p: &std::path::Path| std::os::unix::fs::symlink(t, p),
        ] {
            let _ = std::fs::remove_file(dir.path().join("stdout"));
            plant(&target, &dir.path().join("stdout")).unwrap();
            l.open(false);
            l.write(b"leaked");
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
        }
    }

    #[test]
    fn logs_rotate_at_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = stdout_log(dir.path(), 10);
        l.open(false);
        l.write(b"0123456789abcdefghij-");
        let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        assert_eq!(read("stdout"), "-");
        assert_eq!(read("stdout.1"), "abcdefghij");
        assert!(!dir.path().join("stdout.2").exists());
    }

    #[test]
    fn args_say_what_the_init_reads() {
        let none = Supervise::default();
        let a = args(Some((65534, 65534)), true, &none);
        assert_eq!(a, ["--user", "65534:65534", "--env-stdin", "--"]);
        assert_eq!(args(None, false, &none), ["--"]);
    }
}
