//! Native tasks: Linux processes in cgroup containers.
//!
//! [`cgroups`] detects what the host offers (v2, v1, the v1/v2 hybrid, or nothing) and makes
//! one cgroup per task with memory, CPU and pids limits, reads its usage and OOM kills, and
//! kills every process in it. [`launch`] starts a task's process inside its cgroup (joined
//! before exec) as a session leader with rlimits.

pub mod cgroups;
pub mod init;
pub mod launch;

pub use cgroups::{CgroupError, Cgroups, Limiter, Limits, TaskCgroup, Usage, UsageReader};
pub use launch::{Namespaces, Rlimits, confine, spawn};
