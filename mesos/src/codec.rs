//! A Mesos message on the wire: `application/x-protobuf`, or Mesos's JSON.
//!
//! Mesos's JSON is not protobuf's canonical JSON mapping. Field names are the proto names
//! (`framework_id`, not `frameworkId`), enums their value names, `bytes` base64, and 64-bit
//! integers JSON numbers (not strings). Written out, a message has its set fields and,
//! besides them, each unset optional field that declares a default of its own (and is not
//! deprecated) with that default (`"failover_timeout": 0.0`, `"shell": true`); empty
//! repeated fields are left out. Read in, unknown fields are skipped, as Mesos does.

use std::sync::OnceLock;

use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, MessageDescriptor,
    ReflectMessage as _, SerializeOptions, Value,
};

/// How a body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

/// Why a `Content-Type` or `Accept` is not served, or a body not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("Expecting 'Content-Type' to be present")]
    NoContentType,
    #[error("Expecting 'Content-Type' of application/json or application/x-protobuf, not '{0}'")]
    UnsupportedContentType(String),
    #[error("Expecting 'Accept' to allow application/json or application/x-protobuf, not '{0}'")]
    NotAcceptable(String),
    #[error("Failed to parse body into {message}: {why}")]
    Malformed { message: String, why: String },
}

pub const JSON: &str = "application/json";
pub const PROTOBUF: &str = "application/x-protobuf";

impl Format {
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Json => JSON,
            Format::Protobuf => PROTOBUF,
        }
    }

    /// The format of a request's body, from its `Content-Type` (parameters such as
    /// `charset` are ignored).
    ///
    /// # Errors
    /// When there is none, or it is neither JSON nor protobuf.
    pub fn of_content_type(header: Option<&str>) -> Result<Format, CodecError> {
        let header = header.ok_or(CodecError::NoContentType)?;
        match media(header).as_str() {
            JSON => Ok(Format::Json),
            PROTOBUF => Ok(Format::Protobuf),
            _ => Err(CodecError::UnsupportedContentType(header.to_owned())),
        }
    }

    /// The format a response is written in, from the request's `Accept`: JSON when absent or
    /// when anything is accepted; otherwise the first of its media types (by quality, then
    /// order) that is JSON or protobuf.
    ///
    /// # Errors
    /// When `Accept` allows neither.
    pub fn of_accept(header: Option<&str>) -> Result<Format, CodecError> {
        let Some(header) = header.filter(|h| !h.trim().is_empty()) else {
            return Ok(Format::Json);
        };
        let mut offered: Vec<(f32, usize, Format)> = Vec::new();
        for (order, item) in header.split(',').enumerate() {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if quality <= 0.0 {
                continue;
            }
            let format = match media.as_str() {
                JSON | "application/*" | "*/*" => Format::Json,
                PROTOBUF => Format::Protobuf,
                _ => continue,
            };
            offered.push((quality, order, format));
        }
        offered.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        offered
            .first()
            .map(|&(_, _, f)| f)
            .ok_or_else(|| CodecError::NotAcceptable(header.to_owned()))
    }
}

/// The media type of a `Content-Type`, lower case, without parameters.
fn media(header: &str) -> String {
    header
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The descriptors were written by the build from the same definitions as the types.
        #[allow(clippy::expect_used)]
        DescriptorPool::decode(crate::DESCRIPTORS).expect("the build's descriptors decode")
    })
}

fn descriptor<M: prost::Name>() -> MessageDescriptor {
    // Every generated type is in the pool (the build made both from the same files).
    #[allow(clippy::expect_used)]
    pool()
        .get_message_by_name(&M::full_name())
        .expect("every generated message has a descriptor")
}

/// Reads a `M` from `body`.
///
/// # Errors
/// When `body` is not a `M` in `format` (`Malformed`, naming the message and what is wrong).
pub fn decode<M>(format: Format, body: &[u8]) -> Result<M, CodecError>
where
    M: prost::Message + prost::Name + Default,
{
    let malformed = |why: String| CodecError::Malformed {
        message: M::full_name(),
        why,
    };
    match format {
        Format::Protobuf => M::decode(body).map_err(|e| malformed(e.to_string())),
        Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let message = DynamicMessage::deserialize_with_options(
                descriptor::<M>(),
                &mut de,
                &DeserializeOptions::new().deny_unknown_fields(false),
            )
            .map_err(|e| malformed(e.to_string()))?;
            de.end().map_err(|e| malformed(e.to_string()))?;
            message
                .transcode_to::<M>()
                .map_err(|e| malformed(e.to_string()))
        }
    }
}

/// Writes `message` in `format`.
pub fn encode<M>(format: Format, message: &M) -> Vec<u8>
where
    M: prost::Message + prost::Name,
{
    match format {
        Format::Protobuf => message.encode_to_vec(),
        Format::Json => {
            let mut dynamic = DynamicMessage::new(descriptor::<M>());
            // The bytes were just encoded from the same definition: they decode.
            #[allow(clippy::expect_used)]
            dynamic
                .transcode_from(message)
                .expect("a message transcodes into its own descriptor");
            with_defaults(&mut dynamic);
            let mut out = Vec::with_capacity(256);
            let mut ser = serde_json::Serializer::new(&mut out);
            // Writing a message of known fields into a Vec does not fail.
            #[allow(clippy::expect_used)]
            dynamic
                .serialize_with_options(
                    &mut ser,
                    &SerializeOptions::new()
                        .stringify_64_bit_integers(false)
                        .use_proto_field_name(true)
                        .skip_default_fields(true),
                )
                .expect("a message serializes to JSON");
            out
        }
    }
}

/// Whether an unset `field` is written out with its default, as Mesos does: it is an
/// optional singular field declaring a default of its own, and not deprecated.
fn written_by_default(field: &FieldDescriptor) -> bool {
    let proto = field.field_descriptor_proto();
    proto.default_value.is_some()
        && !field.is_list()
        && !proto.options.as_ref().is_some_and(|o| o.deprecated())
}

/// Sets each field [`written_by_default`] that is unset, here and in every message within.
fn with_defaults(message: &mut DynamicMessage) {
    let fields: Vec<FieldDescriptor> = message.descriptor().fields().collect();
    for field in fields {
        if !message.has_field(&field) {
            if written_by_default(&field) {
                let default = field.default_value();
                message.set_field(&field, default);
            }
            continue;
        }
        match message.get_field_mut(&field) {
            Value::Message(m) => with_defaults(m),
            Value::List(items) => {
                for item in items {
                    if let Value::Message(m) = item {
                        with_defaults(m);
                    }
                }
            }
            Value::Map(entries) => {
                for value in entries.values_mut() {
                    if let Value::Message(m) = value {
                        with_defaults(m);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{self, scheduler};

    #[test]
    fn content_types_and_accept_choose_the_format() {
        assert_eq!(
            Format::of_content_type(Some("application/json")),
            Ok(Format::Json)
        );
        assert_eq!(
            Format::of_content_type(Some("Application/JSON; charset=utf-8")),
            Ok(Format::Json)
        );
        assert_eq!(
            Format::of_content_type(Some(PROTOBUF)),
            Ok(Format::Protobuf)
        );
        assert_eq!(
            Format::of_content_type(None),
            Err(CodecError::NoContentType)
        );
        assert!(matches!(
            Format::of_content_type(Some("text/plain")),
            Err(CodecError::UnsupportedContentType(_))
        ));
        assert_eq!(Format::of_accept(None), Ok(Format::Json));
        assert_eq!(Format::of_accept(Some("*/*")), Ok(Format::Json));
        assert_eq!(Format::of_accept(Some(PROTOBUF)), Ok(Format::Protobuf));
        assert_eq!(
            Format::of_accept(Some(
                "text/html, application/x-protobuf;q=0.5, application/json;q=0.9"
            )),
            Ok(Format::Json)
        );
        assert!(matches!(
            Format::of_accept(Some("text/html")),
            Err(CodecError::NotAcceptable(_))
        ));
        assert!(matches!(
            Format::of_accept(Some("application/json;q=0")),
            Err(CodecError::NotAcceptable(_))
        ));
    }

    /// Mesos's JSON: proto field names, enum names, numbers for 64-bit integers, base64
    /// bytes, explicit defaults filled in, empty lists left out.
    #[test]
    fn json_is_mesos_s_mapping() {
        let status = v1::TaskStatus {
            task_id: v1::TaskId { value: "t1".into() },
            state: v1::TaskState::TaskRunning as i32,
            uuid: Some(vec![0, 1, 2, 255]),
            unreachable_time: Some(v1::TimeInfo {
                nanoseconds: 1_700_000_000_123_456_789,
            }),
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(Format::Json, &status)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "task_id": {"value": "t1"},
                "state": "TASK_RUNNING",
                "uuid": "AAEC/w==",
                "unreachable_time": {"nanoseconds": 1_700_000_000_123_456_789_i64},
            })
        );
        let info = v1::FrameworkInfo {
            user: "root".into(),
            name: "fw".into(),
            ..Default::default()
        };
        let json: serde_json::Value = serde_json::from_slice(&encode(Format::Json, &info)).unwrap();
        // failover_timeout and checkpoint have defaults of their own; role's is deprecated.
        assert_eq!(
            json,
            serde_json::json!({
                "user": "root",
                "name": "fw",
                "failover_timeout": 0.0,
                "checkpoint": false,
            })
        );
        let command = v1::CommandInfo {
            value: Some("echo".into()),
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_slice(&encode(Format::Json, &command)).unwrap();
        assert_eq!(json, serde_json::json!({"value": "echo", "shell": true}));
    }

    #[test]
    fn a_call_reads_from_either_format() {
        let body = br#"{
            "type": "SUBSCRIBE",
            "subscribe": {"framework_info": {"user": "u", "name": "n", "roles": ["a"],
                          "failover_timeout": 3600, "capabilities": [{"type": "MULTI_ROLE"}],
                          "some_field_of_a_newer_mesos": {"x": 1}}},
            "acknowledge": {"agent_id": {"value": "a"}, "task_id": {"value": "t"},
                            "uuid": "AAEC/w=="}
        }"#;
        let call: scheduler::Call = decode(Format::Json, body).unwrap();
        assert_eq!(call.r#type(), scheduler::call::Type::Subscribe);
        let info = &call.subscribe.as_ref().unwrap().framework_info;
        assert_eq!(info.roles, ["a"]);
        assert_eq!(info.failover_timeout, Some(3600.0));
        assert_eq!(call.acknowledge.as_ref().unwrap().uuid, [0, 1, 2, 255]);
        let again: scheduler::Call =
            decode(Format::Protobuf, &encode(Format::Protobuf, &call)).unwrap();
        assert_eq!(again, call);
        // Written as JSON, the defaults are filled in (as Mesos writes them).
        let json_again: scheduler::Call =
            decode(Format::Json, &encode(Format::Json, &call)).unwrap();
        let mut with_defaults = call.clone();
        with_defaults
            .subscribe
            .as_mut()
            .unwrap()
            .framework_info
            .checkpoint = Some(false);
        assert_eq!(json_again, with_defaults);
    }

    #[test]
    fn malformed_bodies_name_the_message() {
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"type": 1} x"#,
            br#"{"framework_id": 7}"#,
        ] {
            let e = decode::<scheduler::Call>(Format::Json, body).unwrap_err();
            assert!(
                e.to_string().contains("mesos.v1.scheduler.Call"),
                "{}: {e}",
                String::from_utf8_lossy(body)
            );
        }
        // An enum value it does not know leaves an optional field unset, as Mesos reads it
        // (the call is then refused for having no type).
        let call: scheduler::Call = decode(Format::Json, br#"{"type": "NO_SUCH_CALL"}"#).unwrap();
        assert_eq!(call.r#type, None);
        let e = decode::<scheduler::Call>(Format::Protobuf, b"\xff\xff\xff").unwrap_err();
        assert!(matches!(e, CodecError::Malformed { .. }), "{e}");
    }
}
