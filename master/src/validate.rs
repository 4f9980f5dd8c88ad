//! Bounds on every call that reaches the master, checked before the call reaches the owner
//! task.
//!
//! The rules of the engine (is this offer mine, does this task fit) stay in
//! [`crate::engine`]; here only the shape of the data is checked: every number that will
//! become a duration, size or count is in range, every string and list is bounded. An error
//! names the field, with its position in lists (`operations[0].launch.tasks[2].max_duration`),
//! and the whole call is refused with nothing changed.

use agora_core::limits::{
    self, LimitError, MAX_ARG, MAX_FAILOVER_TIMEOUT_SECS, MAX_GRACE_SECS, MAX_LIST, MAX_PIDS,
    MAX_REFUSE_SECS, MAX_TASK_DURATION_SECS, MAX_TEXT, MAX_WEIGHT,
};
use agora_proto::v1;

/// Most tasks an agent may report when it registers (a dense Wasm agent runs tens of
/// thousands).
pub const MAX_AGENT_TASKS: usize = 200_000;
/// Most tasks one RECONCILE may name.
pub const MAX_RECONCILE: usize = 100_000;
/// Longest status message the master forwards; longer ones are cut.
pub const MAX_STATUS_MESSAGE: usize = 64 * 1024;
/// Longest acknowledgement uuid.
const MAX_UUID: usize = 64;
/// Longest resource or attribute name.
const MAX_NAME: usize = 255;

type R = Result<(), LimitError>;

fn text(field: impl FnOnce() -> String, s: &str, max: usize) -> R {
    if s.len() > max {
        return limits::text(&field(), s, max);
    }
    Ok(())
}

fn list<T>(field: &str, items: &[T], max: usize, mut each: impl FnMut(usize, &T) -> R) -> R {
    limits::count(field, items.len(), max)?;
    for (i, item) in items.iter().enumerate() {
        each(i, item)?;
    }
    Ok(())
}

fn strings(field: &str, items: &[String], max_len: usize) -> R {
    list(field, items, MAX_LIST, |i, s| {
        text(|| format!("{field}[{i}]"), s, max_len)
    })
}

fn env(field: &str, vars: &[v1::EnvVar]) -> R {
    list(field, vars, MAX_LIST, |i, v| {
        text(|| format!("{field}[{i}].name"), &v.name, MAX_TEXT)?;
        text(|| format!("{field}[{i}].value"), &v.value, MAX_ARG)
    })
}

fn ranges(field: &str, r: Option<&v1::Ranges>) -> R {
    limits::count(
        &format!("{field}.ranges"),
        r.map_or(0, |r| r.range.len()),
        MAX_LIST,
    )
}

fn set(field: &str, s: Option<&v1::ValueSet>) -> R {
    strings(
        &format!("{field}.set"),
        s.map(|s| s.item.as_slice()).unwrap_or_default(),
        MAX_TEXT,
    )
}

/// Resources: bounded lists and strings (the amounts are checked when they are converted).
pub fn resources(field: &str, resources: &[v1::Resource]) -> R {
    list(field, resources, MAX_LIST, |i, r| {
        let at = || format!("{field}[{i}]");
        text(|| format!("{}.name", at()), &r.name, MAX_NAME)?;
        ranges(&at(), r.ranges.as_ref())?;
        set(&at(), r.set.as_ref())?;
        if let Some(rsv) = &r.reservation {
            text(|| format!("{}.reservation.role", at()), &rsv.role, MAX_TEXT)?;
            text(
                || format!("{}.reservation.principal", at()),
                &rsv.principal,
                MAX_TEXT,
            )?;
        }
        Ok(())
    })
}

fn attributes(field: &str, attributes: &[v1::Attribute]) -> R {
    list(field, attributes, MAX_LIST, |i, a| {
        let at = || format!("{field}[{i}]");
        text(|| format!("{}.name", at()), &a.name, MAX_NAME)?;
        ranges(&at(), a.ranges.as_ref())?;
        set(&at(), a.set.as_ref())?;
        if let Some(t) = &a.text {
            text(|| format!("{}.text", at()), &t.value, MAX_TEXT)?;
        }
        Ok(())
    })
}

fn id(field: impl FnOnce() -> String, id: Option<&str>) -> R {
    match id {
        Some(v) => text(field, v, MAX_TEXT),
        None => Ok(()),
    }
}

/// A framework's info, as given to SUBSCRIBE.
pub fn framework_info(info: &v1::FrameworkInfo) -> R {
    let f = "framework_info";
    id(
        || format!("{f}.id"),
        info.id.as_ref().map(|i| i.value.as_str()),
    )?;
    text(|| format!("{f}.name"), &info.name, MAX_TEXT)?;
    text(|| format!("{f}.principal"), &info.principal, MAX_TEXT)?;
    text(|| format!("{f}.hostname"), &info.hostname, MAX_TEXT)?;
    text(|| format!("{f}.user"), &info.user, MAX_TEXT)?;
    roles(&format!("{f}.roles"), &info.roles)?;
    limits::count(&format!("{f}.capabilities"), info.capabilities.len(), 64)?;
    limits::seconds(
        &format!("{f}.failover_timeout"),
        info.failover_timeout,
        MAX_FAILOVER_TIMEOUT_SECS,
    )?;
    Ok(())
}

/// A list of role names (SUBSCRIBE, REVIVE, SUPPRESS).
pub fn roles(field: &str, roles: &[String]) -> R {
    list(field, roles, 1024, |i, r| {
        agora_core::resources::validate_role(r)
            .map_err(|e| LimitError::new(format!("{field}[{i}]"), e.to_string()))
    })
}

/// Decline filters.
pub fn filters(field: &str, filters: Option<&v1::Filters>) -> R {
    if let Some(s) = filters.and_then(|f| f.refuse_seconds) {
        limits::seconds(&format!("{field}.refuse_seconds"), s, MAX_REFUSE_SECS)?;
    }
    Ok(())
}

/// Longest host name a task may ask for in its UTS namespace (Linux's HOST_NAME_MAX).
pub const MAX_HOSTNAME: usize = 64;

fn command(field: &str, c: &v1::CommandTask) -> R {
    text(|| format!("{field}.value"), &c.value, MAX_ARG)?;
    strings(&format!("{field}.arguments"), &c.arguments, MAX_ARG)?;
    env(&format!("{field}.env"), &c.env)?;
    text(|| format!("{field}.user"), &c.user, MAX_TEXT)?;
    // The kernel's limit on a host name (HOST_NAME_MAX): a longer one cannot be set.
    text(|| format!("{field}.hostname"), &c.hostname, MAX_HOSTNAME)?;
    if let Some(p) = c.pids_max
        && !(1..=MAX_PIDS).contains(&p)
    {
        return Err(LimitError::new(
            format!("{field}.pids_max"),
            format!("{p} is not a number of processes from 1 to {MAX_PIDS}"),
        ));
    }
    Ok(())
}

fn uris(field: &str, uris: &[v1::Uri]) -> R {
    list(field, uris, 1024, |i, u| {
        text(|| format!("{field}[{i}].value"), &u.value, MAX_ARG)?;
        text(|| format!("{field}[{i}].sha256"), &u.sha256, 128)?;
        text(
            || format!("{field}[{i}].output_file"),
            &u.output_file,
            MAX_TEXT,
        )
    })
}

/// A task, as launched in ACCEPT.
pub fn task_info(field: &str, t: &v1::TaskInfo) -> R {
    text(|| format!("{field}.name"), &t.name, MAX_TEXT)?;
    id(
        || format!("{field}.task_id"),
        t.task_id.as_ref().map(|i| i.value.as_str()),
    )?;
    id(
        || format!("{field}.agent_id"),
        t.agent_id.as_ref().map(|i| i.value.as_str()),
    )?;
    resources(&format!("{field}.resources"), &t.resources)?;
    match &t.payload {
        Some(v1::task_info::Payload::Wasm(w)) => {
            let f = format!("{field}.wasm");
            match &w.module {
                Some(v1::wasm_task::Module::Digest(d)) => {
                    text(|| format!("{f}.digest"), d, MAX_TEXT)?;
                }
                Some(v1::wasm_task::Module::Uri(u)) => text(|| format!("{f}.uri"), u, MAX_ARG)?,
                // Bounded by the message size.
                Some(v1::wasm_task::Module::ModuleBytes(_)) | None => {}
            }
            text(|| format!("{f}.sha256"), &w.sha256, 128)?;
            strings(&format!("{f}.args"), &w.args, MAX_ARG)?;
            env(&format!("{f}.env"), &w.env)?;
            if let Some(c) = &w.capabilities {
                list(
                    &format!("{f}.capabilities.volumes"),
                    &c.volumes,
                    256,
                    |i, v| {
                        text(
                            || format!("{f}.capabilities.volumes[{i}].name"),
                            &v.name,
                            MAX_TEXT,
                        )?;
                        text(
                            || format!("{f}.capabilities.volumes[{i}].guest_path"),
                            &v.guest_path,
                            MAX_TEXT,
                        )
                    },
                )?;
                strings(&format!("{f}.capabilities.host_env"), &c.host_env, MAX_TEXT)?;
                strings(&format!("{f}.capabilities.connect"), &c.connect, MAX_TEXT)?;
            }
        }
        Some(v1::task_info::Payload::Command(c)) => command(&format!("{field}.command"), c)?,
        None => {}
    }
    limits::seconds(
        &format!("{field}.max_duration"),
        t.max_duration,
        MAX_TASK_DURATION_SECS,
    )?;
    text(
        || format!("{field}.allocation_role"),
        &t.allocation_role,
        MAX_TEXT,
    )?;
    if let Some(k) = &t.kill_policy {
        limits::seconds(
            &format!("{field}.kill_policy.grace_period_seconds"),
            k.grace_period_seconds,
            MAX_GRACE_SECS,
        )?;
    }
    uris(&format!("{field}.uris"), &t.uris)?;
    if let Some(e) = &t.executor {
        let f = format!("{field}.executor");
        id(
            || format!("{f}.executor_id"),
            e.executor_id.as_ref().map(|i| i.value.as_str()),
        )?;
        text(|| format!("{f}.name"), &e.name, MAX_TEXT)?;
        if let Some(c) = &e.command {
            command(&format!("{f}.command"), c)?;
        }
        uris(&format!("{f}.uris"), &e.uris)?;
    }
    strings(
        &format!("{field}.required_isolation"),
        &t.required_isolation,
        MAX_TEXT,
    )
}

/// The operations of an ACCEPT.
pub fn operations(operations: &[v1::Operation]) -> R {
    list("operations", operations, MAX_LIST, |i, op| {
        match &op.operation {
            Some(v1::operation::Operation::Launch(l)) => list(
                &format!("operations[{i}].launch.tasks"),
                &l.tasks,
                MAX_LIST,
                |j, t| task_info(&format!("operations[{i}].launch.tasks[{j}]"), t),
            ),
            Some(v1::operation::Operation::Reserve(r)) => {
                resources(&format!("operations[{i}].reserve.resources"), &r.resources)
            }
            Some(v1::operation::Operation::Unreserve(r)) => resources(
                &format!("operations[{i}].unreserve.resources"),
                &r.resources,
            ),
            None => Ok(()),
        }
    })
}

/// Offer ids of an ACCEPT or DECLINE.
pub fn offer_ids(ids: &[v1::OfferId]) -> R {
    limits::count("offer_ids", ids.len(), MAX_LIST)
}

/// An acknowledgement's uuid.
pub fn uuid(uuid: &[u8]) -> R {
    if uuid.len() > MAX_UUID {
        return Err(LimitError::new(
            "uuid",
            format!("{} bytes long; at most {MAX_UUID} are allowed", uuid.len()),
        ));
    }
    Ok(())
}

/// A role weight.
pub fn weight(weight: f64) -> R {
    // Zero is refused by the allocator with its own message; this bounds the top.
    limits::number("weight", weight, 0.0, MAX_WEIGHT).map(|_| ())
}

/// An agent's registration.
pub fn registration(reg: &v1::agent_message::Register) -> R {
    id(
        || "register.agent_id".into(),
        reg.agent_id.as_ref().map(|i| i.value.as_str()),
    )?;
    if let Some(info) = &reg.info {
        text(|| "register.info.hostname".into(), &info.hostname, MAX_TEXT)?;
        text(|| "register.info.endpoint".into(), &info.endpoint, MAX_TEXT)?;
        text(
            || "register.info.isolation".into(),
            &info.isolation,
            MAX_TEXT,
        )?;
        resources("register.info.resources", &info.resources)?;
        attributes("register.info.attributes", &info.attributes)?;
    }
    list("register.tasks", &reg.tasks, MAX_AGENT_TASKS, |i, t| {
        id(
            || format!("register.tasks[{i}].framework_id"),
            t.framework_id.as_ref().map(|f| f.value.as_str()),
        )?;
        match &t.task {
            Some(task) => task_info(&format!("register.tasks[{i}].task"), task),
            None => Ok(()),
        }
    })
}

/// Makes a status update from an agent safe to keep and forward: an overlong message is cut
/// (on a character boundary) and a progress outside `[0, 1]` is dropped. Updates are not
/// refused, since the agent would retry a refused one for ever.
pub fn sanitize_status(status: &mut v1::TaskStatus) {
    if status.message.len() > MAX_STATUS_MESSAGE {
        let mut cut = MAX_STATUS_MESSAGE;
        while !status.message.is_char_boundary(cut) {
            cut -= 1;
        }
        status.message.truncate(cut);
        status.message.push('…');
    }
    if status
        .progress
        .is_some_and(|p| !(p.is_finite() && (0.0..=1.0).contains(&p)))
    {
        status.progress = None;
    }
    if !status.timestamp.is_finite() || status.timestamp < 0.0 {
        status.timestamp = 0.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> v1::TaskInfo {
        v1::TaskInfo {
            name: "t".into(),
            task_id: Some(v1::TaskId { value: "t".into() }),
            ..Default::default()
        }
    }

    #[test]
    fn absurd_numbers_are_named() {
        let mut info = v1::FrameworkInfo {
            name: "f".into(),
            failover_timeout: 1e20,
            ..Default::default()
        };
        let e = framework_info(&info).unwrap_err();
        assert_eq!(e.field, "framework_info.failover_timeout");
        info.failover_timeout = 3600.0;
        framework_info(&info).unwrap();

        let mut t = task();
        t.max_duration = f64::NAN;
        let ops = [v1::Operation {
            operation: Some(v1::operation::Operation::Launch(v1::operation::Launch {
                tasks: vec![task(), t],
            })),
        }];
        let e = operations(&ops).unwrap_err();
        assert_eq!(e.field, "operations[0].launch.tasks[1].max_duration");

        let mut t = task();
        t.kill_policy = Some(v1::KillPolicy {
            grace_period_seconds: -1.0,
        });
        let e = task_info("task", &t).unwrap_err();
        assert_eq!(e.field, "task.kill_policy.grace_period_seconds");

        let mut t = task();
        t.payload = Some(v1::task_info::Payload::Command(v1::CommandTask {
            value: "true".into(),
            pids_max: Some(u64::MAX),
            ..Default::default()
        }));
        assert_eq!(
            task_info("task", &t).unwrap_err().field,
            "task.command.pids_max"
        );

        let f = v1::Filters {
            refuse_seconds: Some(f64::INFINITY),
        };
        assert_eq!(
            filters("filters", Some(&f)).unwrap_err().field,
            "filters.refuse_seconds"
        );
        assert_eq!(weight(1e300).unwrap_err().field, "weight");
        weight(2.0).unwrap();
    }

    #[test]
    fn long_lists_and_strings_are_refused() {
        let roles_: Vec<String> = (0..2000).map(|i| format!("r{i}")).collect();
        assert!(roles("roles", &roles_).is_err());
        let e = roles("roles", &["a/".repeat(20) + "a"]).unwrap_err();
        assert_eq!(e.field, "roles[0]");
        let mut t = task();
        t.name = "x".repeat(MAX_TEXT + 1);
        assert_eq!(task_info("task", &t).unwrap_err().field, "task.name");
        assert!(uuid(&[0; 65]).is_err());
        uuid(&[0; 16]).unwrap();
    }

    /// A host name the kernel would refuse (past HOST_NAME_MAX) is refused at the edge.
    #[test]
    fn a_host_name_past_the_kernel_s_limit_is_refused() {
        let mut t = task();
        let mut c = v1::CommandTask {
            value: "true".into(),
            hostname: "h".repeat(MAX_HOSTNAME),
            ..Default::default()
        };
        t.payload = Some(v1::task_info::Payload::Command(c.clone()));
        task_info("task", &t).unwrap();
        c.hostname.push('h');
        t.payload = Some(v1::task_info::Payload::Command(c));
        assert_eq!(
            task_info("task", &t).unwrap_err().field,
            "task.command.hostname"
        );
    }

    #[test]
    fn statuses_are_cut_not_refused() {
        let mut s = v1::TaskStatus {
            message: "é".repeat(MAX_STATUS_MESSAGE),
            progress: Some(f32::NAN),
            timestamp: f64::INFINITY,
            ..Default::default()
        };
        sanitize_status(&mut s);
        assert!(s.message.len() <= MAX_STATUS_MESSAGE + '…'.len_utf8());
        assert_eq!(s.progress, None);
        assert_eq!(s.timestamp, 0.0);
    }
}
