//! The default seccomp filter of native tasks, and `no_new_privs`.
//!
//! A task's process is allowed every system call but those a workload has no business
//! making and that reach past its container: loading kernel modules, kexec and reboot, the
//! kernel keyrings, tracing or reading other processes (`ptrace`, `process_vm_*`), mounts and
//! namespaces (`mount`, `unshare`, `setns`, `clone` with a namespace flag), swap, the clock,
//! BPF and perf events, `userfaultfd`, and handle-based opens that get around path checks.
//! They fail with `EPERM`. `clone3` fails with `ENOSYS` (its flags are in memory a filter
//! cannot read), so libc falls back to `clone`, whose flags it can. Much as Docker's default
//! profile does.
//!
//! The filters are built before the fork ([`Filters::new`]) and installed in the child just
//! before exec ([`Filters::apply`]), which first sets `no_new_privs`: nothing the task
//! executes (a set-uid binary) can gain privileges the filter would not see.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// System calls refused outright.
const DENIED: &[libc::c_long] = &[
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_lookup_dcookie,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

/// The namespace flags `clone` may not carry.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

/// What [`Filters::apply`] installs, compiled to BPF.
#[derive(Debug, Clone)]
pub struct Filters {
    deny: BpfProgram,
    no_clone3: BpfProgram,
}

/// What the isolation string says of a task under [`Filters`].
pub const ISOLATION: &str = "seccomp+no-new-privs";

fn arch() -> io::Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e| io::Error::other(format!("seccomp on {}: {e}", std::env::consts::ARCH)))
}

fn compile(filter: Result<SeccompFilter, seccompiler::BackendError>) -> io::Result<BpfProgram> {
    filter
        .and_then(TryInto::try_into)
        .map_err(|e| io::Error::other(format!("building the seccomp filter: {e}")))
}

impl Filters {
    /// The default filters for this machine's architecture.
    ///
    /// # Errors
    /// On an architecture seccompiler does not know (it knows x86_64, aarch64 and riscv64).
    pub fn new() -> io::Result<Filters> {
        let arch = arch()?;
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
            DENIED.iter().map(|&n| (n, Vec::new())).collect();
        let clone_rules = NAMESPACE_FLAGS
            .iter()
            .map(|&flag| {
                let flag = u64::from(flag.cast_unsigned());
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(format!("building the seccomp filter: {e}")))?;
        rules.insert(libc::SYS_clone, clone_rules);
        let deny = compile(SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM.cast_unsigned()),
            arch,
        ))?;
        let no_clone3 = compile(SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS.cast_unsigned()),
            arch,
        ))?;
        Ok(Filters { deny, no_clone3 })
    }

    /// Sets `no_new_privs` and installs the filters on the calling thread. Safe between
    /// fork and exec: it allocates nothing.
    ///
    /// # Errors
    /// When the kernel refuses either (it has no seccomp, say).
    pub fn apply(&self) -> io::Result<()> {
        for prog in [&self.no_clone3, &self.deny] {
            seccompiler::apply_filter(prog).map_err(|e| match e {
                seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
                _ => io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child: the filters installed, a denied call fails with EPERM, a clone with
    /// a namespace flag too, clone3 with ENOSYS, and ordinary calls (and a plain fork) work.
    #[test]
    fn the_filters_refuse_what_they_name_and_nothing_else() {
        let filters = Filters::new().unwrap();
        // SAFETY: the child only makes system calls and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain system calls on integers and null pointers, in the forked child.
            let code = unsafe {
                let errno = || *libc::__errno_location();
                if filters.apply().is_err() {
                    libc::_exit(10);
                }
                if libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1 {
                    libc::_exit(11);
                }
                if libc::unshare(libc::CLONE_NEWUSER) == 0 || errno() != libc::EPERM {
                    libc::_exit(12);
                }
                if libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) == 0 || errno() != libc::EPERM {
                    libc::_exit(13);
                }
                let ns_clone = libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_NEWUSER | libc::SIGCHLD,
                    0,
                    0,
                    0,
                    0,
                );
                if ns_clone == 0 {
                    libc::_exit(0);
                }
                if ns_clone > 0 || errno() != libc::EPERM {
                    libc::_exit(14);
                }
                if libc::syscall(libc::SYS_clone3, 0, 0) == 0 || errno() != libc::ENOSYS {
                    libc::_exit(15);
                }
                if libc::getpid() <= 0 {
                    libc::_exit(16);
                }
                let child = libc::fork();
                if child == 0 {
                    libc::_exit(0);
                }
                if child < 0 {
                    libc::_exit(17);
                }
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                0
            };
            // SAFETY: leaves the forked child without running the test harness's code.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waitpid writes into our local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "status {status}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "see the exit codes in the child"
        );
    }
}
