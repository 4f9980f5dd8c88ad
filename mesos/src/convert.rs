//! Mesos v1 messages into agora.v1 messages and back.
//!
//! What a Mesos framework asks for that Agora does not serve is refused by name (a
//! [`Refused`] naming the field), never dropped in silence. Going out, every Agora message
//! has a Mesos form.

use agora_proto::v1 as agora;
use prost::Message as _;

use crate::v1 as mesos;
use crate::v1::scheduler;

/// Why a Mesos message cannot be served as it is: what it asks for, in Mesos's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refused<T>(why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(why.into()))
}

// ---------------------------------------------------------------------------------------
// Identifiers.
// ---------------------------------------------------------------------------------------

macro_rules! ids {
    ($($m:ident <-> $a:ident),* $(,)?) => {$(
        impl From<&mesos::$m> for agora::$a {
            fn from(id: &mesos::$m) -> Self {
                agora::$a { value: id.value.clone() }
            }
        }
        impl From<&agora::$a> for mesos::$m {
            fn from(id: &agora::$a) -> Self {
                mesos::$m { value: id.value.clone() }
            }
        }
    )*};
}

ids!(
    FrameworkId <-> FrameworkId,
    AgentId <-> AgentId,
    OfferId <-> OfferId,
    TaskId <-> TaskId,
    ExecutorId <-> ExecutorId,
);

fn id<M, A>(id: Option<&M>) -> Option<A>
where
    for<'a> A: From<&'a M>,
{
    id.map(A::from)
}

// ---------------------------------------------------------------------------------------
// Frameworks.
// ---------------------------------------------------------------------------------------

/// A Mesos FrameworkInfo as Agora's. Its roles are `roles` (with MULTI_ROLE) or else the
/// deprecated `role` (default `*`), as Mesos reads them.
///
/// # Errors
/// When it names a capability Agora does not serve with its meaning (revocable, shared or
/// GPU resources, reservation refinement, regions) or sets offer filters.
pub fn framework_info(m: &mesos::FrameworkInfo) -> Result<agora::FrameworkInfo, Refused> {
    use mesos::framework_info::capability::Type as C;
    let mut capabilities = Vec::new();
    let mut multi_role = false;
    for c in &m.capabilities {
        match c.r#type() {
            C::MultiRole => {
                multi_role = true;
                capabilities.push(agora::framework_info::Capability::MultiRole as i32);
            }
            C::PartitionAware => {
                capabilities.push(agora::framework_info::Capability::PartitionAware as i32);
            }
            // Agora reports TASK_KILLING to every framework that kills with a grace period.
            C::TaskKillingState | C::Unknown => {}
            other => {
                return refused(format!(
                    "the framework capability {} is not supported by Agora",
                    other.as_str_name()
                ));
            }
        }
    }
    if !m.offer_filters.is_empty() {
        return refused("FrameworkInfo.offer_filters is not supported by Agora");
    }
    let roles = if multi_role {
        m.roles.clone()
    } else {
        if !m.roles.is_empty() {
            return refused(
                "FrameworkInfo.roles needs the MULTI_ROLE capability (else give `role`)",
            );
        }
        // The field is deprecated in Mesos, and still what single-role frameworks send.
        #[allow(deprecated)]
        let role = m.role.clone();
        vec![role.unwrap_or_else(|| "*".into())]
    };
    Ok(agora::FrameworkInfo {
        id: id(m.id.as_ref()),
        name: m.name.clone(),
        principal: m.principal.clone().unwrap_or_default(),
        roles,
        failover_timeout: m.failover_timeout.unwrap_or(0.0),
        hostname: m.hostname.clone().unwrap_or_default(),
        user: m.user.clone(),
        capabilities,
    })
}

// ---------------------------------------------------------------------------------------
// Resources and attributes.
// ---------------------------------------------------------------------------------------

fn value_type_in(t: mesos::value::Type, what: &str) -> Result<agora::ValueType, Refused> {
    match t {
        mesos::value::Type::Scalar => Ok(agora::ValueType::Scalar),
        mesos::value::Type::Ranges => Ok(agora::ValueType::Ranges),
        mesos::value::Type::Set => Ok(agora::ValueType::Set),
        mesos::value::Type::Text => refused(format!("{what} cannot be of type TEXT")),
    }
}

fn value_type_out(t: i32) -> mesos::value::Type {
    match agora::ValueType::try_from(t) {
        Ok(agora::ValueType::Ranges) => mesos::value::Type::Ranges,
        Ok(agora::ValueType::Set) => mesos::value::Type::Set,
        Ok(agora::ValueType::Text) => mesos::value::Type::Text,
        _ => mesos::value::Type::Scalar,
    }
}

fn ranges_in(r: &mesos::value::Ranges) -> agora::Ranges {
    agora::Ranges {
        range: r
            .range
            .iter()
            .map(|r| agora::Range {
                begin: r.begin,
                end: r.end,
            })
            .collect(),
    }
}

fn ranges_out(r: &agora::Ranges) -> mesos::value::Ranges {
    mesos::value::Ranges {
        range: r
            .range
            .iter()
            .map(|r| mesos::value::Range {
                begin: r.begin,
                end: r.end,
            })
            .collect(),
    }
}

/// A Mesos Resource as Agora's: one reservation at most (the innermost of `reservations`,
/// else the deprecated `role` and `reservation`).
///
/// # Errors
/// For resource providers, refined reservations, disk infos (persistent volumes), revocable
/// and shared resources, TEXT values.
pub fn resource(m: &mesos::Resource) -> Result<agora::Resource, Refused> {
    let what = format!("resource {:?}", m.name);
    if m.provider_id.is_some() {
        return refused(format!(
            "{what}: resource providers are not supported by Agora"
        ));
    }
    if m.disk.is_some() {
        return refused(format!(
            "{what}: disk infos (persistent volumes, disk sources) are not supported by Agora"
        ));
    }
    if m.revocable.is_some() || m.shared.is_some() {
        return refused(format!(
            "{what}: revocable and shared resources are not supported by Agora"
        ));
    }
    // Deprecated in Mesos, and still what pre-refinement frameworks send.
    #[allow(deprecated)]
    let legacy_role = m.role.as_deref();
    let reservation = match m.reservations.as_slice() {
        [] => match legacy_role {
            None | Some("*") => None,
            Some(role) => Some(agora::Reservation {
                kind: if m.reservation.is_some() {
                    agora::reservation::Kind::Dynamic
                } else {
                    agora::reservation::Kind::Static
                } as i32,
                role: role.to_owned(),
                principal: m
                    .reservation
                    .as_ref()
                    .and_then(|r| r.principal.clone())
                    .unwrap_or_default(),
            }),
        },
        [r] => Some(agora::Reservation {
            kind: match r.r#type() {
                mesos::resource::reservation_info::Type::Static => agora::reservation::Kind::Static,
                mesos::resource::reservation_info::Type::Dynamic => {
                    agora::reservation::Kind::Dynamic
                }
                mesos::resource::reservation_info::Type::Unknown => {
                    return refused(format!("{what}: a reservation needs its type"));
                }
            } as i32,
            role: r.role.clone().unwrap_or_default(),
            principal: r.principal.clone().unwrap_or_default(),
        }),
        _ => {
            return refused(format!(
                "{what}: refined reservations (more than one) are not supported by Agora"
            ));
        }
    };
    Ok(agora::Resource {
        name: m.name.clone(),
        r#type: value_type_in(m.r#type(), &what)? as i32,
        scalar: m.scalar.map(|s| agora::Scalar { value: s.value }),
        ranges: m.ranges.as_ref().map(ranges_in),
        set: m.set.as_ref().map(|s| agora::ValueSet {
            item: s.item.clone(),
        }),
        reservation,
    })
}

/// Mesos Resources as Agora's.
///
/// # Errors
/// As [`resource`], for the first that cannot be.
pub fn resources(m: &[mesos::Resource]) -> Result<Vec<agora::Resource>, Refused> {
    m.iter().map(resource).collect()
}

/// An Agora Resource as Mesos's, allocated to `allocation_role` when given (as in offers).
///
/// It is written in Mesos's format for frameworks without RESERVATION_REFINEMENT (which
/// Agora does not serve): the role in `role` (`*` when unreserved) and a dynamic
/// reservation's principal in `reservation`, as Mesos writes resources for such frameworks.
pub fn resource_out(a: &agora::Resource, allocation_role: Option<&str>) -> mesos::Resource {
    let (role, reservation) = match &a.reservation {
        None => ("*".to_owned(), None),
        Some(r) => {
            let dynamic =
                agora::reservation::Kind::try_from(r.kind) == Ok(agora::reservation::Kind::Dynamic);
            (
                r.role.clone(),
                dynamic.then(|| mesos::resource::ReservationInfo {
                    principal: (!r.principal.is_empty()).then(|| r.principal.clone()),
                    ..Default::default()
                }),
            )
        }
    };
    // Mesos still fills the deprecated field in for these frameworks.
    #[allow(deprecated)]
    mesos::Resource {
        name: a.name.clone(),
        r#type: value_type_out(a.r#type) as i32,
        scalar: a.scalar.map(|s| mesos::value::Scalar { value: s.value }),
        ranges: a.ranges.as_ref().map(ranges_out),
        set: a.set.as_ref().map(|s| mesos::value::Set {
            item: s.item.clone(),
        }),
        role: Some(role),
        allocation_info: allocation_role.map(|r| mesos::resource::AllocationInfo {
            role: Some(r.to_owned()),
        }),
        reservation,
        ..Default::default()
    }
}

/// The URL Mesos gives an agent in offers: its address, and the path of Mesos's agent.
pub fn agent_url(endpoint: &str, hostname: &str) -> mesos::Url {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or_default();
    let (host, port) = host_port
        .rsplit_once(':')
        .map_or((host_port, 5051_u16), |(h, p)| {
            (h, p.parse().unwrap_or(5051))
        });
    let host = host.trim_matches(['[', ']']);
    let ip = host
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string());
    mesos::Url {
        scheme: "http".into(),
        address: mesos::Address {
            hostname: Some(if hostname.is_empty() {
                host.to_owned()
            } else {
                hostname.to_owned()
            }),
            ip,
            port: i32::from(port),
        },
        path: Some("/slave(1)".into()),
        ..Default::default()
    }
}

fn attribute_out(a: &agora::Attribute) -> mesos::Attribute {
    mesos::Attribute {
        name: a.name.clone(),
        r#type: value_type_out(a.r#type) as i32,
        scalar: a.scalar.map(|s| mesos::value::Scalar { value: s.value }),
        ranges: a.ranges.as_ref().map(ranges_out),
        set: a.set.as_ref().map(|s| mesos::value::Set {
            item: s.item.clone(),
        }),
        text: a.text.as_ref().map(|t| mesos::value::Text {
            value: t.value.clone(),
        }),
    }
}

/// An Agora offer as Mesos's, with its agent's URL when it is known.
pub fn offer_out(o: &agora::Offer, url: Option<mesos::Url>) -> mesos::Offer {
    let role = (!o.allocation_role.is_empty()).then_some(o.allocation_role.as_str());
    mesos::Offer {
        id: o.id.as_ref().map(Into::into).unwrap_or_default(),
        framework_id: o.framework_id.as_ref().map(Into::into).unwrap_or_default(),
        agent_id: o.agent_id.as_ref().map(Into::into).unwrap_or_default(),
        hostname: o.hostname.clone(),
        url,
        resources: o.resources.iter().map(|r| resource_out(r, role)).collect(),
        attributes: o.attributes.iter().map(attribute_out).collect(),
        allocation_info: role.map(|r| mesos::resource::AllocationInfo {
            role: Some(r.to_owned()),
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Tasks.
// ---------------------------------------------------------------------------------------

fn seconds(d: &mesos::DurationInfo) -> f64 {
    // Nanoseconds to seconds: a double holds any duration a client means exactly enough.
    #[allow(clippy::cast_precision_loss)]
    let s = d.nanoseconds as f64 / 1e9;
    s
}

fn uri(u: &mesos::command_info::Uri) -> agora::Uri {
    // Mesos extracts by default, but only what its name says is an archive.
    let name = u.output_file.clone().unwrap_or_else(|| {
        let path = u.value.split(['?', '#']).next().unwrap_or_default();
        path.rsplit('/').next().unwrap_or_default().to_owned()
    });
    let extract = u.extract.unwrap_or(true) && agora_archive::Kind::of(&name).is_some();
    agora::Uri {
        value: u.value.clone(),
        executable: u.executable.unwrap_or(false),
        extract,
        cache: u.cache.unwrap_or(false),
        sha256: String::new(),
        output_file: u.output_file.clone().unwrap_or_default(),
    }
}

/// A Mesos CommandInfo as an Agora native command and the URIs to fetch for it.
fn command(
    c: &mesos::CommandInfo,
    what: &str,
) -> Result<(agora::CommandTask, Vec<agora::Uri>), Refused> {
    let mut env = Vec::new();
    for v in c.environment.iter().flat_map(|e| &e.variables) {
        if v.secret.is_some() || v.r#type() == mesos::environment::variable::Type::Secret {
            return refused(format!(
                "{what}: environment variable {:?} is a secret; secrets are not supported by Agora",
                v.name
            ));
        }
        env.push(agora::EnvVar {
            name: v.name.clone(),
            value: v.value.clone().unwrap_or_default(),
        });
    }
    let shell = c.shell.unwrap_or(true);
    let value = c.value.clone().unwrap_or_default();
    if value.is_empty() {
        return refused(format!("{what}: the command has no value"));
    }
    Ok((
        agora::CommandTask {
            value,
            shell,
            // Without a shell, Mesos's arguments include argv[0]; Agora's follow the program.
            arguments: if shell {
                Vec::new()
            } else {
                c.arguments.iter().skip(1).cloned().collect()
            },
            env,
            user: c.user.clone().unwrap_or_default(),
            ..Default::default()
        },
        c.uris.iter().map(uri).collect(),
    ))
}

fn container(c: Option<&mesos::ContainerInfo>, what: &str) -> Result<(), Refused> {
    let Some(c) = c else { return Ok(()) };
    match c.r#type() {
        mesos::container_info::Type::Docker => refused(format!(
            "{what}: Docker containers are not supported by Agora (run the command natively, or as a Wasm task)"
        )),
        mesos::container_info::Type::Mesos => {
            if c.mesos.as_ref().is_some_and(|m| m.image.is_some()) {
                return refused(format!(
                    "{what}: container images are not supported by Agora"
                ));
            }
            Ok(())
        }
    }
}

/// A Mesos TaskInfo as Agora's: a `command` runs as a native task; an `executor` runs the
/// task in that custom executor.
///
/// # Errors
/// When it asks for what Agora does not serve (Docker, images, health checks, checks,
/// resource limits, secrets), or has neither or both of `command` and `executor`.
pub fn task_info(m: &mesos::TaskInfo) -> Result<agora::TaskInfo, Refused> {
    let what = format!("task {:?}", m.task_id.value);
    container(m.container.as_ref(), &what)?;
    if m.health_check.is_some() || m.check.is_some() {
        return refused(format!(
            "{what}: health checks and checks are not supported by Agora yet"
        ));
    }
    if !m.limits.is_empty() {
        return refused(format!(
            "{what}: resource limits are not supported by Agora"
        ));
    }
    let mut task = agora::TaskInfo {
        name: m.name.clone(),
        task_id: Some((&m.task_id).into()),
        agent_id: Some((&m.agent_id).into()),
        resources: resources(&m.resources).map_err(|e| Refused(format!("{what}: {e}")))?,
        max_duration: m.max_completion_time.as_ref().map_or(0.0, seconds),
        kill_policy: m
            .kill_policy
            .as_ref()
            .and_then(|k| k.grace_period.as_ref())
            .map(|g| agora::KillPolicy {
                grace_period_seconds: seconds(g),
            }),
        data: m.data.clone().unwrap_or_default(),
        mesos_task: m.encode_to_vec(),
        ..Default::default()
    };
    match (&m.command, &m.executor) {
        (Some(c), None) => {
            let (cmd, uris) = command(c, &what)?;
            task.payload = Some(agora::task_info::Payload::Command(cmd));
            task.uris = uris;
        }
        (None, Some(e)) => task.executor = Some(executor_info(e)?),
        (Some(_), Some(_)) => {
            return refused(format!(
                "{what}: a task has either a command or an executor, not both"
            ));
        }
        (None, None) => return refused(format!("{what}: a task needs a command or an executor")),
    }
    Ok(task)
}

/// A Mesos ExecutorInfo (a custom executor) as Agora's.
///
/// # Errors
/// For the default executor's type, containers Agora does not serve, or a missing command.
pub fn executor_info(e: &mesos::ExecutorInfo) -> Result<agora::ExecutorInfo, Refused> {
    let what = format!("executor {:?}", e.executor_id.value);
    if e.r#type() == mesos::executor_info::Type::Default {
        return refused(format!(
            "{what}: the DEFAULT executor (task groups) is not supported by Agora yet"
        ));
    }
    container(e.container.as_ref(), &what)?;
    let Some(c) = &e.command else {
        return refused(format!("{what}: a custom executor needs its command"));
    };
    let (cmd, uris) = command(c, &what)?;
    Ok(agora::ExecutorInfo {
        executor_id: Some((&e.executor_id).into()),
        name: e.name.clone().unwrap_or_default(),
        command: Some(cmd),
        uris,
        mesos_executor: e.encode_to_vec(),
    })
}

// ---------------------------------------------------------------------------------------
// What a Mesos executor is told: the messages its framework sent, or their Mesos form.
// ---------------------------------------------------------------------------------------

/// Seconds as a Mesos duration.
pub fn duration_out(seconds: f64) -> mesos::DurationInfo {
    // Seconds to nanoseconds: far inside i64 for any duration Agora accepts.
    #[allow(clippy::cast_possible_truncation)]
    let nanoseconds = (seconds * 1e9) as i64;
    mesos::DurationInfo { nanoseconds }
}

/// The Mesos form of an Agora command.
fn command_out(c: &agora::CommandTask, uris: &[agora::Uri]) -> mesos::CommandInfo {
    let arguments = if c.shell {
        Vec::new()
    } else {
        // Mesos's arguments begin with argv[0].
        std::iter::once(c.value.clone())
            .chain(c.arguments.iter().cloned())
            .collect()
    };
    mesos::CommandInfo {
        uris: uris
            .iter()
            .map(|u| mesos::command_info::Uri {
                value: u.value.clone(),
                executable: Some(u.executable),
                extract: Some(u.extract),
                cache: Some(u.cache),
                output_file: (!u.output_file.is_empty()).then(|| u.output_file.clone()),
            })
            .collect(),
        environment: (!c.env.is_empty()).then(|| mesos::Environment {
            variables: c
                .env
                .iter()
                .map(|v| mesos::environment::Variable {
                    name: v.name.clone(),
                    value: Some(v.value.clone()),
                    ..Default::default()
                })
                .collect(),
        }),
        shell: Some(c.shell),
        value: Some(c.value.clone()),
        arguments,
        user: (!c.user.is_empty()).then(|| c.user.clone()),
    }
}

/// The ExecutorInfo a Mesos executor is given: the one its framework sent, else the Mesos
/// form of Agora's.
pub fn executor_info_out(
    e: &agora::ExecutorInfo,
    framework: Option<&agora::FrameworkId>,
) -> mesos::ExecutorInfo {
    if let Ok(mut m) = mesos::ExecutorInfo::decode(e.mesos_executor.as_slice())
        && !e.mesos_executor.is_empty()
    {
        if m.framework_id.is_none() {
            m.framework_id = id(framework);
        }
        return m;
    }
    mesos::ExecutorInfo {
        r#type: Some(mesos::executor_info::Type::Custom as i32),
        executor_id: e.executor_id.as_ref().map(Into::into).unwrap_or_default(),
        framework_id: id(framework),
        command: e.command.as_ref().map(|c| command_out(c, &e.uris)),
        name: (!e.name.is_empty()).then(|| e.name.clone()),
        ..Default::default()
    }
}

/// The TaskInfo a Mesos executor is given: the one its framework sent, else the Mesos form
/// of Agora's.
pub fn task_info_out(t: &agora::TaskInfo) -> mesos::TaskInfo {
    if let Ok(m) = mesos::TaskInfo::decode(t.mesos_task.as_slice())
        && !t.mesos_task.is_empty()
    {
        return m;
    }
    let role = (!t.allocation_role.is_empty()).then_some(t.allocation_role.as_str());
    let command = match &t.payload {
        Some(agora::task_info::Payload::Command(c)) => Some(command_out(c, &t.uris)),
        _ => None,
    };
    mesos::TaskInfo {
        name: t.name.clone(),
        task_id: t.task_id.as_ref().map(Into::into).unwrap_or_default(),
        agent_id: t.agent_id.as_ref().map(Into::into).unwrap_or_default(),
        resources: t.resources.iter().map(|r| resource_out(r, role)).collect(),
        executor: t.executor.as_ref().map(|e| executor_info_out(e, None)),
        command,
        kill_policy: t.kill_policy.as_ref().map(|k| mesos::KillPolicy {
            grace_period: (k.grace_period_seconds > 0.0)
                .then(|| duration_out(k.grace_period_seconds)),
        }),
        data: (!t.data.is_empty()).then(|| t.data.clone()),
        max_completion_time: (t.max_duration > 0.0).then(|| duration_out(t.max_duration)),
        ..Default::default()
    }
}

/// An Agora FrameworkInfo as Mesos's, as an executor's SUBSCRIBED describes its framework.
pub fn framework_info_out(f: &agora::FrameworkInfo) -> mesos::FrameworkInfo {
    use mesos::framework_info::capability::Type as C;
    let capabilities = f
        .capabilities
        .iter()
        .filter_map(
            |c| match agora::framework_info::Capability::try_from(*c).ok()? {
                agora::framework_info::Capability::MultiRole => Some(C::MultiRole),
                agora::framework_info::Capability::PartitionAware => Some(C::PartitionAware),
                agora::framework_info::Capability::Unspecified => None,
            },
        )
        .map(|t| mesos::framework_info::Capability {
            r#type: Some(t as i32),
        })
        .collect::<Vec<_>>();
    let multi_role = f
        .capabilities
        .contains(&(agora::framework_info::Capability::MultiRole as i32));
    #[allow(deprecated)]
    mesos::FrameworkInfo {
        user: f.user.clone(),
        name: f.name.clone(),
        id: id(f.id.as_ref()),
        failover_timeout: Some(f.failover_timeout),
        hostname: (!f.hostname.is_empty()).then(|| f.hostname.clone()),
        principal: (!f.principal.is_empty()).then(|| f.principal.clone()),
        role: if multi_role {
            None
        } else {
            f.roles.first().cloned()
        },
        roles: if multi_role {
            f.roles.clone()
        } else {
            Vec::new()
        },
        capabilities,
        ..Default::default()
    }
}

/// What an ACCEPT's operations become: Agora's operations, and the tasks set aside with why.
pub type Accepted = (Vec<agora::Operation>, Vec<(mesos::TaskId, Refused)>);

/// The offer operations of an ACCEPT as Agora's, each task that cannot be served set aside
/// with why (Mesos answers those with TASK_ERROR, and launches the rest).
///
/// # Errors
/// For an operation Agora does not serve at all (volumes, disks, task groups), or a
/// reservation it cannot read.
pub fn operations(ops: &[mesos::offer::Operation]) -> Result<Accepted, Refused> {
    use agora::operation::Operation as A;
    use mesos::offer::operation::Type as T;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for op in ops {
        let operation = match op.r#type() {
            T::Launch => {
                let mut tasks = Vec::new();
                for t in op.launch.iter().flat_map(|l| &l.task_infos) {
                    match task_info(t) {
                        Ok(t) => tasks.push(t),
                        Err(e) => errors.push((t.task_id.clone(), e)),
                    }
                }
                A::Launch(agora::operation::Launch { tasks })
            }
            T::Reserve => {
                let r = op
                    .reserve
                    .as_ref()
                    .ok_or_else(|| Refused("a RESERVE operation needs `reserve`".into()))?;
                A::Reserve(agora::operation::Reserve {
                    resources: resources(&r.resources)?,
                })
            }
            T::Unreserve => {
                let r = op
                    .unreserve
                    .as_ref()
                    .ok_or_else(|| Refused("an UNRESERVE operation needs `unreserve`".into()))?;
                A::Unreserve(agora::operation::Unreserve {
                    resources: resources(&r.resources)?,
                })
            }
            T::LaunchGroup => {
                // Every task of the group fails together, as Mesos fails an invalid group.
                let why = Refused(
                    "LAUNCH_GROUP (task groups, the default executor) is not supported by Agora yet"
                        .into(),
                );
                for t in op.launch_group.iter().flat_map(|g| &g.task_group.tasks) {
                    errors.push((t.task_id.clone(), why.clone()));
                }
                continue;
            }
            T::Unknown => return refused("an operation needs its type"),
            other => {
                return refused(format!(
                    "the {} operation is not supported by Agora",
                    other.as_str_name()
                ));
            }
        };
        out.push(agora::Operation {
            operation: Some(operation),
        });
    }
    Ok((out, errors))
}

// ---------------------------------------------------------------------------------------
// Task statuses.
// ---------------------------------------------------------------------------------------

/// An Agora task state as Mesos's.
pub fn state_out(s: i32) -> mesos::TaskState {
    use agora::TaskState as A;
    use mesos::TaskState as M;
    match A::try_from(s).unwrap_or(A::Unspecified) {
        A::TaskStaging => M::TaskStaging,
        A::TaskStarting => M::TaskStarting,
        A::TaskRunning => M::TaskRunning,
        A::TaskKilling => M::TaskKilling,
        A::TaskFinished => M::TaskFinished,
        A::TaskFailed => M::TaskFailed,
        A::TaskKilled => M::TaskKilled,
        A::TaskError => M::TaskError,
        A::TaskLost => M::TaskLost,
        A::TaskDropped => M::TaskDropped,
        A::TaskUnreachable => M::TaskUnreachable,
        A::TaskGone => M::TaskGone,
        A::TaskUnknown | A::Unspecified => M::TaskUnknown,
    }
}

/// An Agora reason as Mesos's nearest (`None` where Mesos gives none, as for a kill).
pub fn reason_out(r: i32) -> Option<mesos::task_status::Reason> {
    use agora::Reason as A;
    use mesos::task_status::Reason as M;
    Some(match A::try_from(r).ok()? {
        A::Unspecified | A::TaskKilled => return None,
        A::CommandExited | A::WasmTrap => M::CommandExecutorFailed,
        A::ContainerLimitationMemory => M::ContainerLimitationMemory,
        A::ContainerLimitationCpu | A::ContainerLimitationFuel => M::ContainerLimitation,
        A::ContainerLimitationDisk => M::ContainerLimitationDisk,
        A::MaxCompletionTimeReached => M::MaxCompletionTimeReached,
        A::ModuleInvalid | A::TaskInvalid => M::TaskInvalid,
        A::InvalidOffers => M::InvalidOffers,
        A::AgentRemoved => M::AgentRemoved,
        A::AgentUnreachable => M::AgentDisconnected,
        A::AgentRestarted => M::AgentRestarted,
        A::FrameworkRemoved => M::FrameworkRemoved,
        A::Reconciliation => M::Reconciliation,
        A::ExecutorTerminated => M::ExecutorTerminated,
        A::ContainerLaunchFailed
        | A::FetcherFailed
        | A::ContainerizerUnavailable
        | A::IsolationUnavailable => M::ContainerLaunchFailed,
        A::TaskUnknown => M::TaskUnknown,
        A::ExecutorRegistrationTimeout => M::ExecutorRegistrationTimeout,
        A::TaskUnauthorized => M::TaskUnauthorized,
    })
}

/// An Agora task status as Mesos's.
pub fn status_out(s: &agora::TaskStatus) -> mesos::TaskStatus {
    use agora::StatusSource as A;
    use mesos::task_status::Source as M;
    let source = match A::try_from(s.source).unwrap_or(A::SourceUnspecified) {
        A::SourceMaster => Some(M::Master),
        A::SourceAgent => Some(M::Agent),
        A::SourceExecutor => Some(M::Executor),
        A::SourceUnspecified => None,
    };
    mesos::TaskStatus {
        task_id: s.task_id.as_ref().map(Into::into).unwrap_or_default(),
        state: state_out(s.state) as i32,
        message: (!s.message.is_empty()).then(|| s.message.clone()),
        source: source.map(|s| s as i32),
        reason: reason_out(s.reason).map(|r| r as i32),
        data: (!s.data.is_empty()).then(|| s.data.clone()),
        agent_id: id(s.agent_id.as_ref()),
        executor_id: None,
        timestamp: (s.timestamp > 0.0).then_some(s.timestamp),
        uuid: (!s.uuid.is_empty()).then(|| s.uuid.clone()),
        ..Default::default()
    }
}

/// A Mesos task state as Agora's.
pub fn state_in(s: mesos::TaskState) -> agora::TaskState {
    use agora::TaskState as A;
    use mesos::TaskState as M;
    match s {
        M::TaskStaging => A::TaskStaging,
        M::TaskStarting => A::TaskStarting,
        M::TaskRunning => A::TaskRunning,
        M::TaskKilling => A::TaskKilling,
        M::TaskFinished => A::TaskFinished,
        M::TaskFailed => A::TaskFailed,
        M::TaskKilled => A::TaskKilled,
        M::TaskError => A::TaskError,
        M::TaskLost => A::TaskLost,
        M::TaskDropped => A::TaskDropped,
        M::TaskUnreachable => A::TaskUnreachable,
        M::TaskGone | M::TaskGoneByOperator => A::TaskGone,
        M::TaskUnknown => A::TaskUnknown,
    }
}

/// A Mesos reason an executor gives as Agora's nearest ([`agora::Reason::Unspecified`]
/// where Agora has none).
fn reason_in(r: mesos::task_status::Reason) -> agora::Reason {
    use agora::Reason as A;
    use mesos::task_status::Reason as M;
    match r {
        M::CommandExecutorFailed => A::CommandExited,
        M::ContainerLimitationMemory => A::ContainerLimitationMemory,
        M::ContainerLimitationDisk => A::ContainerLimitationDisk,
        M::ContainerLaunchFailed => A::ContainerLaunchFailed,
        M::MaxCompletionTimeReached => A::MaxCompletionTimeReached,
        M::ExecutorTerminated => A::ExecutorTerminated,
        M::TaskInvalid => A::TaskInvalid,
        M::TaskUnauthorized => A::TaskUnauthorized,
        M::TaskUnknown => A::TaskUnknown,
        _ => A::Unspecified,
    }
}

/// A status update a Mesos executor sends, as Agora's.
pub fn status_in(s: &mesos::TaskStatus) -> agora::TaskStatus {
    agora::TaskStatus {
        task_id: Some((&s.task_id).into()),
        state: state_in(s.state()) as i32,
        reason: s
            .reason
            .map_or(agora::Reason::Unspecified, |_| reason_in(s.reason())) as i32,
        message: s.message.clone().unwrap_or_default(),
        source: agora::StatusSource::SourceExecutor as i32,
        uuid: s.uuid.clone().unwrap_or_default(),
        timestamp: s.timestamp.unwrap_or(0.0),
        data: s.data.clone().unwrap_or_default(),
        ..Default::default()
    }
}

/// The TASK_ERROR a task set aside by [`operations`] ends with, from the master, without a
/// uuid (there is nothing to acknowledge).
pub fn task_error(
    task: &mesos::TaskId,
    why: &Refused,
    agent: Option<&mesos::AgentId>,
    now: f64,
) -> mesos::TaskStatus {
    mesos::TaskStatus {
        task_id: task.clone(),
        state: mesos::TaskState::TaskError as i32,
        message: Some(why.0.clone()),
        source: Some(mesos::task_status::Source::Master as i32),
        reason: Some(mesos::task_status::Reason::TaskInvalid as i32),
        agent_id: agent.cloned(),
        timestamp: Some(now),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Events.
// ---------------------------------------------------------------------------------------

/// An Agora scheduler event as Mesos's; `master` describes the master for SUBSCRIBED, and
/// `url` gives an offer's agent URL.
pub fn event_out(
    e: &agora::Event,
    master: &mesos::MasterInfo,
    url: &dyn Fn(&agora::Offer) -> Option<mesos::Url>,
) -> Option<scheduler::Event> {
    use agora::event::Event as A;
    use scheduler::event::Type as T;
    let mut out = scheduler::Event::default();
    match e.event.as_ref()? {
        A::Subscribed(s) => {
            out.r#type = Some(T::Subscribed as i32);
            out.subscribed = Some(scheduler::event::Subscribed {
                framework_id: s.framework_id.as_ref().map(Into::into).unwrap_or_default(),
                heartbeat_interval_seconds: Some(s.heartbeat_interval_seconds),
                master_info: Some(master.clone()),
            });
        }
        A::Offers(o) => {
            out.r#type = Some(T::Offers as i32);
            out.offers = Some(scheduler::event::Offers {
                offers: o.offers.iter().map(|o| offer_out(o, url(o))).collect(),
            });
        }
        A::Rescind(r) => {
            out.r#type = Some(T::Rescind as i32);
            out.rescind = Some(scheduler::event::Rescind {
                offer_id: r.offer_id.as_ref().map(Into::into).unwrap_or_default(),
            });
        }
        A::Update(u) => {
            out.r#type = Some(T::Update as i32);
            out.update = Some(scheduler::event::Update {
                status: u.status.as_ref().map(status_out).unwrap_or_default(),
            });
        }
        A::Message(m) => {
            out.r#type = Some(T::Message as i32);
            // Mesos names the executor a message came from; a task's own executor is named
            // by the task when it has no other.
            let executor = m
                .executor_id
                .as_ref()
                .map(Into::into)
                .or_else(|| {
                    m.task_id.as_ref().map(|t| mesos::ExecutorId {
                        value: t.value.clone(),
                    })
                })
                .unwrap_or_default();
            out.message = Some(scheduler::event::Message {
                agent_id: m.agent_id.as_ref().map(Into::into).unwrap_or_default(),
                executor_id: executor,
                data: m.data.clone(),
            });
        }
        A::Failure(f) => {
            out.r#type = Some(T::Failure as i32);
            out.failure = Some(scheduler::event::Failure {
                agent_id: id(f.agent_id.as_ref()),
                executor_id: None,
                status: None,
            });
        }
        A::Error(err) => {
            out.r#type = Some(T::Error as i32);
            out.error = Some(scheduler::event::Error {
                message: err.message.clone(),
            });
        }
        A::Heartbeat(_) => out.r#type = Some(T::Heartbeat as i32),
    }
    Some(out)
}

/// A Mesos filter's refusal, as Mesos reads it: 5 s unless it says otherwise.
pub fn filters(f: Option<&mesos::Filters>) -> Option<agora::Filters> {
    f.map(|f| agora::Filters {
        refuse_seconds: Some(f.refuse_seconds.unwrap_or(5.0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(name: &str, v: f64) -> mesos::Resource {
        mesos::Resource {
            name: name.into(),
            r#type: mesos::value::Type::Scalar as i32,
            scalar: Some(mesos::value::Scalar { value: v }),
            ..Default::default()
        }
    }

    #[test]
    #[allow(deprecated)]
    fn roles_follow_multi_role_as_in_mesos() {
        let mut info = mesos::FrameworkInfo {
            user: "u".into(),
            name: "n".into(),
            ..Default::default()
        };
        assert_eq!(framework_info(&info).unwrap().roles, ["*"]);
        info.role = Some("batch".into());
        assert_eq!(framework_info(&info).unwrap().roles, ["batch"]);
        info.roles = vec!["a".into(), "b".into()];
        assert!(framework_info(&info).unwrap_err().0.contains("MULTI_ROLE"));
        info.capabilities.push(mesos::framework_info::Capability {
            r#type: Some(mesos::framework_info::capability::Type::MultiRole as i32),
        });
        assert_eq!(framework_info(&info).unwrap().roles, ["a", "b"]);
        info.capabilities.push(mesos::framework_info::Capability {
            r#type: Some(mesos::framework_info::capability::Type::GpuResources as i32),
        });
        assert!(
            framework_info(&info)
                .unwrap_err()
                .0
                .contains("GPU_RESOURCES")
        );
    }

    #[test]
    #[allow(deprecated)]
    fn reservations_come_in_and_go_out() {
        let mut r = scalar("cpus", 1.0);
        r.reservations.push(mesos::resource::ReservationInfo {
            r#type: Some(mesos::resource::reservation_info::Type::Dynamic as i32),
            role: Some("batch".into()),
            principal: Some("ops".into()),
            labels: None,
        });
        let a = resource(&r).unwrap();
        let res = a.reservation.as_ref().unwrap();
        assert_eq!(
            (res.kind, res.role.as_str(), res.principal.as_str()),
            (agora::reservation::Kind::Dynamic as i32, "batch", "ops")
        );
        // Out, in the format of frameworks without RESERVATION_REFINEMENT.
        let back = resource_out(&a, Some("batch"));
        assert!(back.reservations.is_empty());
        assert_eq!(back.role.as_deref(), Some("batch"));
        assert_eq!(
            back.reservation.as_ref().unwrap().principal.as_deref(),
            Some("ops")
        );
        assert_eq!(
            back.allocation_info.as_ref().unwrap().role.as_deref(),
            Some("batch")
        );
        // And in again, the same.
        assert_eq!(resource(&back).unwrap(), a);
        let unreserved = resource_out(&resource(&scalar("mem", 1.0)).unwrap(), None);
        assert_eq!(
            (unreserved.role.as_deref(), unreserved.reservation),
            (Some("*"), None)
        );
        r.reservations.push(r.reservations[0].clone());
        assert!(resource(&r).unwrap_err().0.contains("refined"));
        let mut disk = scalar("disk", 10.0);
        disk.disk = Some(mesos::resource::DiskInfo {});
        assert!(
            resource(&disk)
                .unwrap_err()
                .0
                .contains("persistent volumes")
        );
    }

    fn task(command: Option<mesos::CommandInfo>) -> mesos::TaskInfo {
        mesos::TaskInfo {
            name: "t".into(),
            task_id: mesos::TaskId { value: "t1".into() },
            agent_id: mesos::AgentId { value: "a1".into() },
            resources: vec![scalar("cpus", 0.1)],
            command,
            ..Default::default()
        }
    }

    #[test]
    fn a_command_task_is_a_native_task() {
        let mut t = task(Some(mesos::CommandInfo {
            value: Some("echo hi".into()),
            uris: vec![
                mesos::command_info::Uri {
                    value: "http://h/x.tar.gz?y=1".into(),
                    ..Default::default()
                },
                mesos::command_info::Uri {
                    value: "http://h/tool".into(),
                    executable: Some(true),
                    ..Default::default()
                },
            ],
            environment: Some(mesos::Environment {
                variables: vec![mesos::environment::Variable {
                    name: "A".into(),
                    value: Some("1".into()),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }));
        t.kill_policy = Some(mesos::KillPolicy {
            grace_period: Some(mesos::DurationInfo {
                nanoseconds: 2_500_000_000,
            }),
        });
        let a = task_info(&t).unwrap();
        let Some(agora::task_info::Payload::Command(c)) = &a.payload else {
            panic!("{a:?}")
        };
        assert!(c.shell);
        assert_eq!(c.value, "echo hi");
        assert_eq!(c.env[0].name, "A");
        // Extracted by default, when its name says it is an archive.
        assert!(a.uris[0].extract && !a.uris[1].extract && a.uris[1].executable);
        assert_eq!(a.kill_policy.unwrap().grace_period_seconds, 2.5);

        let argv = task(Some(mesos::CommandInfo {
            shell: Some(false),
            value: Some("/bin/echo".into()),
            arguments: vec!["echo".into(), "a".into(), "b".into()],
            ..Default::default()
        }));
        let Some(agora::task_info::Payload::Command(c)) = task_info(&argv).unwrap().payload else {
            panic!()
        };
        assert_eq!(
            (c.shell, c.arguments),
            (false, vec!["a".to_owned(), "b".to_owned()])
        );
    }

    #[test]
    fn what_agora_does_not_serve_is_refused_by_name() {
        let mut docker = task(Some(mesos::CommandInfo {
            value: Some("x".into()),
            ..Default::default()
        }));
        docker.container = Some(mesos::ContainerInfo {
            r#type: mesos::container_info::Type::Docker as i32,
            ..Default::default()
        });
        assert!(task_info(&docker).unwrap_err().0.contains("Docker"));
        let mut checked = task(Some(mesos::CommandInfo {
            value: Some("x".into()),
            ..Default::default()
        }));
        checked.health_check = Some(mesos::HealthCheck {});
        assert!(task_info(&checked).unwrap_err().0.contains("health checks"));
        assert!(
            task_info(&task(None))
                .unwrap_err()
                .0
                .contains("command or an executor")
        );

        let group = mesos::offer::Operation {
            r#type: Some(mesos::offer::operation::Type::LaunchGroup as i32),
            launch_group: Some(mesos::offer::operation::LaunchGroup {
                executor: mesos::ExecutorInfo::default(),
                task_group: mesos::TaskGroupInfo {
                    tasks: vec![task(None)],
                },
            }),
            ..Default::default()
        };
        let launch = mesos::offer::Operation {
            r#type: Some(mesos::offer::operation::Type::Launch as i32),
            launch: Some(mesos::offer::operation::Launch {
                task_infos: vec![
                    docker,
                    task(Some(mesos::CommandInfo {
                        value: Some("ok".into()),
                        ..Default::default()
                    })),
                ],
            }),
            ..Default::default()
        };
        let (ops, errors) = operations(&[group, launch]).unwrap();
        assert_eq!(ops.len(), 1);
        assert_eq!(errors.len(), 2);
        assert!(errors[0].1.0.contains("LAUNCH_GROUP"));
        let create = mesos::offer::Operation {
            r#type: Some(mesos::offer::operation::Type::Create as i32),
            ..Default::default()
        };
        assert!(operations(&[create]).unwrap_err().0.contains("CREATE"));
    }

    /// Every Agora state and reason has a Mesos form, and distinct states stay distinct.
    #[test]
    fn every_state_goes_out() {
        let mut seen = std::collections::HashSet::new();
        for s in 1..=13 {
            assert!(seen.insert(state_out(s)), "state {s}");
        }
        for r in 0..=24 {
            let _ = reason_out(r);
        }
        assert_eq!(
            state_out(agora::TaskState::TaskStaging as i32),
            mesos::TaskState::TaskStaging
        );
    }

    #[test]
    fn every_state_comes_back_in() {
        for s in 1..=13 {
            assert_eq!(state_in(state_out(s)) as i32, s, "state {s}");
        }
        let status = mesos::TaskStatus {
            task_id: mesos::TaskId { value: "t1".into() },
            state: mesos::TaskState::TaskFailed as i32,
            reason: Some(mesos::task_status::Reason::ContainerLimitationMemory as i32),
            uuid: Some(vec![7; 16]),
            ..Default::default()
        };
        let a = status_in(&status);
        assert_eq!(a.state(), agora::TaskState::TaskFailed);
        assert_eq!(a.reason(), agora::Reason::ContainerLimitationMemory);
        assert_eq!(a.source(), agora::StatusSource::SourceExecutor);
        assert_eq!(a.uuid, vec![7; 16]);
    }

    /// A Mesos executor is given the task and executor as its framework sent them, labels
    /// and all; without them, their Mesos form.
    #[test]
    fn an_executor_is_given_what_its_framework_sent() {
        let executor = mesos::ExecutorInfo {
            executor_id: mesos::ExecutorId { value: "e".into() },
            command: Some(mesos::CommandInfo {
                value: Some("./run".into()),
                ..Default::default()
            }),
            labels: Some(mesos::Labels {
                labels: vec![mesos::Label {
                    key: "team".into(),
                    value: Some("search".into()),
                }],
            }),
            ..Default::default()
        };
        let mut m = task(None);
        m.executor = Some(executor.clone());
        m.labels.clone_from(&executor.labels);
        let a = task_info(&m).unwrap();
        assert_eq!(task_info_out(&a), m);
        let fw = agora::FrameworkId { value: "f".into() };
        let out = executor_info_out(a.executor.as_ref().unwrap(), Some(&fw));
        assert_eq!(out.labels, executor.labels);
        assert_eq!(out.framework_id.unwrap().value, "f");
        // An Agora task (from the SDK) has no Mesos original: its Mesos form.
        let mut sdk = a;
        sdk.mesos_task.clear();
        sdk.executor.as_mut().unwrap().mesos_executor.clear();
        let out = task_info_out(&sdk);
        assert_eq!(out.task_id.value, "t1");
        assert_eq!(out.resources.len(), 1);
        let e = out.executor.unwrap();
        assert_eq!(e.executor_id.value, "e");
        assert_eq!(e.command.unwrap().value.as_deref(), Some("./run"));
        assert!(e.labels.is_none());
    }

    #[test]
    fn a_framework_goes_out_with_its_roles() {
        let mut f = agora::FrameworkInfo {
            name: "f".into(),
            roles: vec!["a".into()],
            ..Default::default()
        };
        #[allow(deprecated)]
        {
            assert_eq!(framework_info_out(&f).role.as_deref(), Some("a"));
            f.roles.push("b".into());
            f.capabilities = vec![agora::framework_info::Capability::MultiRole as i32];
            let m = framework_info_out(&f);
            assert_eq!(
                (m.role.clone(), m.roles.clone()),
                (None, vec!["a".into(), "b".into()])
            );
            assert_eq!(framework_info(&m).unwrap().roles, f.roles);
        }
    }
}
