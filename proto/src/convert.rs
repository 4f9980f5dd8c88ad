//! Conversions between wire messages and core types.

use std::collections::BTreeSet;

use agora_core::resources::{Range, Ranges, Reservation, Resource, Resources, Scalar, Value};
use agora_core::{
    AgentId, Attribute, AttributeValue, ExecutorId, FrameworkId, IdError, OfferId, TaskId,
    TaskState,
};

use crate::v1;

/// Invalid wire data, naming the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtoError {
    #[error("missing required field `{0}`")]
    Missing(&'static str),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("resource {name:?}: {why}")]
    Resource { name: String, why: String },
    #[error("attribute {name:?}: {why}")]
    Attribute { name: String, why: String },
    #[error("field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(transparent)]
    Limit(#[from] agora_core::LimitError),
}

impl From<ProtoError> for tonic::Status {
    fn from(e: ProtoError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// The value of a required message field.
///
/// # Errors
/// [`ProtoError::Missing`] naming `field` when it is absent.
pub fn required<T>(value: Option<T>, field: &'static str) -> Result<T, ProtoError> {
    value.ok_or(ProtoError::Missing(field))
}

macro_rules! id_conversions {
    ($core:ident) => {
        impl TryFrom<v1::$core> for $core {
            type Error = ProtoError;
            fn try_from(id: v1::$core) -> Result<Self, ProtoError> {
                Ok($core::new(id.value)?)
            }
        }

        impl TryFrom<&v1::$core> for $core {
            type Error = ProtoError;
            fn try_from(id: &v1::$core) -> Result<Self, ProtoError> {
                Ok($core::new(id.value.clone())?)
            }
        }

        impl From<$core> for v1::$core {
            fn from(id: $core) -> Self {
                v1::$core {
                    value: id.into_string(),
                }
            }
        }

        impl From<&$core> for v1::$core {
            fn from(id: &$core) -> Self {
                v1::$core {
                    value: id.as_str().to_owned(),
                }
            }
        }
    };
}

id_conversions!(FrameworkId);
id_conversions!(AgentId);
id_conversions!(OfferId);
id_conversions!(TaskId);
id_conversions!(ExecutorId);

fn ranges_from_proto(r: Option<&v1::Ranges>) -> Result<Ranges, String> {
    let mut out = Vec::new();
    for range in r.map(|r| r.range.as_slice()).unwrap_or_default() {
        out.push(Range::new(range.begin, range.end).map_err(|e| e.to_string())?);
    }
    Ok(Ranges::from_ranges(out))
}

fn ranges_to_proto(r: &Ranges) -> v1::Ranges {
    v1::Ranges {
        range: r
            .as_slice()
            .iter()
            .map(|r| v1::Range {
                begin: r.begin,
                end: r.end,
            })
            .collect(),
    }
}

fn set_from_proto(s: Option<&v1::ValueSet>) -> BTreeSet<String> {
    s.map(|s| s.item.iter().cloned().collect())
        .unwrap_or_default()
}

fn value_from_proto(
    kind: v1::ValueType,
    scalar: Option<&v1::Scalar>,
    ranges: Option<&v1::Ranges>,
    set: Option<&v1::ValueSet>,
) -> Result<Value, String> {
    match kind {
        v1::ValueType::Scalar => {
            let v = scalar.ok_or("a scalar resource needs `scalar`")?.value;
            Scalar::from_f64(v)
                .map(Value::Scalar)
                .map_err(|e| e.to_string())
        }
        v1::ValueType::Ranges => ranges_from_proto(ranges).map(Value::Ranges),
        v1::ValueType::Set => Ok(Value::Set(set_from_proto(set))),
        v1::ValueType::Text => Err("text is not a resource type".into()),
        v1::ValueType::Unspecified => Err("`type` is not set".into()),
    }
}

/// Converts wire resources into canonical [`Resources`].
///
/// # Errors
/// Names the first resource that is invalid and why.
pub fn resources_from_proto(resources: &[v1::Resource]) -> Result<Resources, ProtoError> {
    let mut out = Resources::new();
    for r in resources {
        let bad = |why: String| ProtoError::Resource {
            name: r.name.clone(),
            why,
        };
        let value = value_from_proto(
            r.r#type(),
            r.scalar.as_ref(),
            r.ranges.as_ref(),
            r.set.as_ref(),
        )
        .map_err(bad)?;
        let reservation = match &r.reservation {
            None => Reservation::Unreserved,
            Some(rsv) => match rsv.kind() {
                v1::reservation::Kind::Static => Reservation::Static {
                    role: rsv.role.clone(),
                },
                v1::reservation::Kind::Dynamic => Reservation::Dynamic {
                    role: rsv.role.clone(),
                    principal: rsv.principal.clone(),
                },
                v1::reservation::Kind::Unspecified => {
                    return Err(bad("reservation kind is not set".into()));
                }
            },
        };
        out.push(Resource::new(&r.name, reservation, value).map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

/// Converts [`Resources`] into wire resources.
pub fn resources_to_proto(resources: &Resources) -> Vec<v1::Resource> {
    resources
        .iter()
        .map(|r| {
            let mut out = v1::Resource {
                name: r.name,
                reservation: match r.reservation {
                    Reservation::Unreserved => None,
                    Reservation::Static { role } => Some(v1::Reservation {
                        kind: v1::reservation::Kind::Static as i32,
                        role,
                        principal: String::new(),
                    }),
                    Reservation::Dynamic { role, principal } => Some(v1::Reservation {
                        kind: v1::reservation::Kind::Dynamic as i32,
                        role,
                        principal,
                    }),
                },
                ..Default::default()
            };
            match r.value {
                Value::Scalar(s) => {
                    out.set_type(v1::ValueType::Scalar);
                    out.scalar = Some(v1::Scalar { value: s.as_f64() });
                }
                Value::Ranges(rs) => {
                    out.set_type(v1::ValueType::Ranges);
                    out.ranges = Some(ranges_to_proto(&rs));
                }
                Value::Set(s) => {
                    out.set_type(v1::ValueType::Set);
                    out.set = Some(v1::ValueSet {
                        item: s.into_iter().collect(),
                    });
                }
            }
            out
        })
        .collect()
}

/// Converts wire attributes.
///
/// # Errors
/// Names the first attribute that is invalid and why.
pub fn attributes_from_proto(attributes: &[v1::Attribute]) -> Result<Vec<Attribute>, ProtoError> {
    attributes
        .iter()
        .map(|a| {
            let bad = |why: String| ProtoError::Attribute {
                name: a.name.clone(),
                why,
            };
            let value = match a.r#type() {
                v1::ValueType::Text => AttributeValue::Text(
                    a.text.as_ref().map(|t| t.value.clone()).unwrap_or_default(),
                ),
                kind => match value_from_proto(
                    kind,
                    a.scalar.as_ref(),
                    a.ranges.as_ref(),
                    a.set.as_ref(),
                )
                .map_err(bad)?
                {
                    Value::Scalar(s) => AttributeValue::Scalar(s),
                    Value::Ranges(r) => AttributeValue::Ranges(r),
                    Value::Set(s) => AttributeValue::Set(s),
                },
            };
            Ok(Attribute {
                name: a.name.clone(),
                value,
            })
        })
        .collect()
}

/// Converts attributes into wire attributes.
pub fn attributes_to_proto(attributes: &[Attribute]) -> Vec<v1::Attribute> {
    attributes
        .iter()
        .map(|a| {
            let mut out = v1::Attribute {
                name: a.name.clone(),
                ..Default::default()
            };
            match &a.value {
                AttributeValue::Scalar(s) => {
                    out.set_type(v1::ValueType::Scalar);
                    out.scalar = Some(v1::Scalar { value: s.as_f64() });
                }
                AttributeValue::Ranges(r) => {
                    out.set_type(v1::ValueType::Ranges);
                    out.ranges = Some(ranges_to_proto(r));
                }
                AttributeValue::Set(s) => {
                    out.set_type(v1::ValueType::Set);
                    out.set = Some(v1::ValueSet {
                        item: s.iter().cloned().collect(),
                    });
                }
                AttributeValue::Text(t) => {
                    out.set_type(v1::ValueType::Text);
                    out.text = Some(v1::Text { value: t.clone() });
                }
            }
            out
        })
        .collect()
}

/// The core state of a wire state; `None` for an unset state.
pub fn state_from_proto(state: v1::TaskState) -> Option<TaskState> {
    Some(match state {
        v1::TaskState::Unspecified => return None,
        v1::TaskState::TaskStaging => TaskState::Staging,
        v1::TaskState::TaskStarting => TaskState::Starting,
        v1::TaskState::TaskRunning => TaskState::Running,
        v1::TaskState::TaskKilling => TaskState::Killing,
        v1::TaskState::TaskFinished => TaskState::Finished,
        v1::TaskState::TaskFailed => TaskState::Failed,
        v1::TaskState::TaskKilled => TaskState::Killed,
        v1::TaskState::TaskError => TaskState::Error,
        v1::TaskState::TaskLost => TaskState::Lost,
        v1::TaskState::TaskDropped => TaskState::Dropped,
        v1::TaskState::TaskUnreachable => TaskState::Unreachable,
        v1::TaskState::TaskGone => TaskState::Gone,
        v1::TaskState::TaskUnknown => TaskState::Unknown,
    })
}

pub fn state_to_proto(state: TaskState) -> v1::TaskState {
    match state {
        TaskState::Staging => v1::TaskState::TaskStaging,
        TaskState::Starting => v1::TaskState::TaskStarting,
        TaskState::Running => v1::TaskState::TaskRunning,
        TaskState::Killing => v1::TaskState::TaskKilling,
        TaskState::Finished => v1::TaskState::TaskFinished,
        TaskState::Failed => v1::TaskState::TaskFailed,
        TaskState::Killed => v1::TaskState::TaskKilled,
        TaskState::Error => v1::TaskState::TaskError,
        TaskState::Lost => v1::TaskState::TaskLost,
        TaskState::Dropped => v1::TaskState::TaskDropped,
        TaskState::Unreachable => v1::TaskState::TaskUnreachable,
        TaskState::Gone => v1::TaskState::TaskGone,
        TaskState::Unknown => v1::TaskState::TaskUnknown,
    }
}

/// The reason's name without the `REASON_` prefix, e.g. `CONTAINER_LIMITATION_MEMORY`.
pub fn reason_name(reason: v1::Reason) -> &'static str {
    let name = reason.as_str_name();
    name.strip_prefix("REASON_").unwrap_or(name)
}

/// Seconds since the Unix epoch, as status timestamps carry them.
pub fn now_timestamp() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agora_core::parse_resources;

    #[test]
    fn resources_round_trip() {
        let r = parse_resources("cpus:2;mem(eng):512;ports:[1-5, 9-9];zones:{a,b};disk(ops,bob):3")
            .unwrap();
        assert_eq!(resources_from_proto(&resources_to_proto(&r)).unwrap(), r);
    }

    #[test]
    fn invalid_resources_name_the_field() {
        let bad = v1::Resource {
            name: "cpus".into(),
            r#type: v1::ValueType::Scalar as i32,
            scalar: Some(v1::Scalar { value: -1.0 }),
            ..Default::default()
        };
        let e = resources_from_proto(&[bad]).unwrap_err();
        assert!(e.to_string().starts_with("resource \"cpus\": "), "{e}");
        let untyped = v1::Resource {
            name: "mem".into(),
            ..Default::default()
        };
        assert_eq!(
            resources_from_proto(&[untyped]).unwrap_err().to_string(),
            "resource \"mem\": `type` is not set"
        );
        let e = TaskId::try_from(v1::TaskId {
            value: "../x".into(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("task id"), "{e}");
        assert_eq!(
            tonic::Status::from(ProtoError::Missing("task_id")).code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn states_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(state_from_proto(state_to_proto(s)), Some(s));
        }
        assert_eq!(
            reason_name(v1::Reason::ContainerLimitationMemory),
            "CONTAINER_LIMITATION_MEMORY"
        );
    }

    #[test]
    fn attributes_round_trip() {
        let a = agora_core::parse_attributes("rack:r1;level:3;slots:[1-4];tags:{x,y}").unwrap();
        assert_eq!(attributes_from_proto(&attributes_to_proto(&a)).unwrap(), a);
    }
}
