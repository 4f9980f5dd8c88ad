//! Native tasks: Linux processes in cgroup containers.
//!
//! [`cgroups`] detects what the host offers (v2, v1, the v1/v2 hybrid, or nothing) and makes
//! one cgroup per task with memory, CPU and pids limits (changeable while it runs, as an
//! executor's follow its tasks), reads its usage and OOM kills, kills every process in it,
//! and finds and removes the cgroups a dead agent left. [`launch`] sets a process up between
//! fork and exec, in this order: join the cgroup, lead a session, enter namespaces (mount
//! with a private `/tmp` that keeps chosen directories visible, UTS, IPC, optionally network
//! and PID), set rlimits, drop to the task's user. [`init`] is the tiny PID 1 of a task's
//! PID namespace.
//!
//! # Layout
//!
//! - [`cgroups`]: layouts, per-task cgroups, limits, usage, kill-all.
//! - [`launch`]: [`confine`] and [`spawn`].
//! - [`init`]: the PID-namespace init (`agora __init`).

pub mod cgroups;
pub mod init;
pub mod launch;
pub mod seccomp;

pub use cgroups::{CgroupError, Cgroups, Limiter, Limits, TaskCgroup, Usage, UsageReader};
pub use launch::{Namespaces, Rlimits, confine, spawn};
