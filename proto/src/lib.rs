//! The `agora.v1` protocol: messages and gRPC services generated from
//! `proto/agora/v1/agora.proto`, and the conversions between wire messages and `agora-core`
//! types.
//!
//! Wire data is untrusted. It is converted into core types once, at the edge, with the
//! `TryFrom` impls and helpers here, which reject what is invalid with an error naming the
//! field; past that point ids are newtypes and resources are canonical.
//!
//! # Layout
//!
//! - [`v1`]: the generated messages, clients (`*_client`) and servers (`*_server`).
//! - [`convert`]: wire ⇄ core conversions and [`ProtoError`].
//! - [`leader`]: how followers name the leader, and how callers follow it.
//! - [`dial`]: the search for the leader every client runs over a list of masters.
//! - [`listen`]: the listeners Agora's servers take calls on.
//! - [`tls`]: TLS between Agora's processes, and the principals certificates name.

pub mod convert;
pub mod dial;
pub mod leader;
pub mod listen;
pub mod tls;

/// Generated code of the `agora.v1` package.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("agora.v1");
}

pub use convert::{
    ProtoError, attributes_from_proto, attributes_to_proto, now_timestamp, reason_name, required,
    resources_from_proto, resources_to_proto, state_from_proto, state_to_proto,
};

/// The encoded `FileDescriptorSet` of `agora.v1`: every service and method, for tools and
/// tests that must cover them all.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agora_descriptor.bin"));

/// Largest message the services accept: inline Wasm modules travel in launch calls.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
