//! The Apache Mesos v1 HTTP APIs on the wire, for Agora's Mesos front doors (the master's
//! `/api/v1/scheduler`, the agents' `/api/v1/executor`, and the endpoints that follow).
//!
//! - [`v1`]: the Mesos messages Agora reads and writes, generated from our own definitions
//!   (`proto/mesos/v1`) that keep Mesos's names and field numbers.
//! - [`codec`]: a message as `application/x-protobuf` or as Mesos's JSON (which is not
//!   protobuf's canonical JSON mapping), chosen by `Content-Type` and `Accept`.
//! - [`recordio`]: the framing of Mesos's event streams.
//! - [`http`]: what every Mesos endpoint does alike (error answers, encodings, bodies,
//!   event streams).
//! - [`convert`]: Mesos messages into the agora.v1 protocol and back, so that a Mesos
//!   framework is served by the same master code as an Agora one.

pub mod codec;
pub mod convert;
pub mod http;
pub mod recordio;

/// The Mesos v1 messages (`mesos.v1`).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/mesos.v1.rs"));

    /// The Scheduler API's calls and events (`mesos.v1.scheduler`).
    pub mod scheduler {
        include!(concat!(env!("OUT_DIR"), "/mesos.v1.scheduler.rs"));
    }

    /// The Executor API's calls and events (`mesos.v1.executor`).
    pub mod executor {
        include!(concat!(env!("OUT_DIR"), "/mesos.v1.executor.rs"));
    }
}

/// The descriptors of every message in [`v1`], for the JSON mapping.
pub(crate) const DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mesos_descriptor.bin"));
