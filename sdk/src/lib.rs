//! Write Agora frameworks in Rust.
//!
//! - [`subscribe`] connects a framework to the master and returns a [`Scheduler`] for calls
//!   (accept, decline, kill, reconcile, ...) and [`Events`] to read offers and updates from.
//!   The driver re-subscribes after a broken stream and acknowledges status updates for you.
//! - [`TaskBuilder`] builds launchable tasks; [`OfferPool`] carves tasks out of an offer.
//! - [`Operator`] reads the cluster's state; [`read_sandbox_file`] reads a task's stdout or
//!   stderr from its agent.
//! - [`executor`] writes custom executors: processes the agent starts to run a framework's
//!   tasks.
//!
//! Wherever a master's address is taken, a comma-separated list of the masters of a group
//! is too (`a:5050,b:5050,c:5050`): the clients find the leader and follow it ([`masters`]).
//!
//! Errors separate "your request was refused" ([`Error::Refused`], [`Error::Invalid`]) from
//! "the connection or the master failed" ([`Error::Connection`]), so callers can match.
//!
//! # Layout
//!
//! - [`scheduler`]: the driver.
//! - [`task`]: task builders and offer matching.
//! - [`operator`]: operator and sandbox clients.
//! - [`executor`]: the executor side of the agent's Executor API.
//! - [`blob`]: uploads to the master's blob store.
//! - [`masters`]: lists of masters, and how the leader is found.
//! - [`bundle`]: task bundles (`agora.toml` and what it names).

pub mod blob;
pub mod bundle;
pub mod executor;
pub mod masters;
pub mod operator;
pub mod scheduler;
pub mod task;

pub use agora_core as core;
pub use agora_proto::v1 as proto;
pub use masters::DialPolicy;
pub use operator::{Operator, agent_containers, agent_metrics, read_sandbox_file};
pub use scheduler::{Event, Events, Scheduler, SchedulerConfig, subscribe};
pub use task::{OfferPool, TaskBuilder, offer_resources};

/// Errors of the SDK.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The master (or agent) understood the request and refused it.
    #[error("refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    /// The connection or the remote side failed; retrying later may work.
    #[error("connection failed: {0}")]
    Connection(String),
    /// Not subscribed right now (the driver is re-subscribing, or the framework was removed).
    #[error("not subscribed to the master")]
    NotSubscribed,
    /// The request was invalid before it was sent.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The remote side sent something this SDK does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// True when retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Connection(_) | Error::NotSubscribed)
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code::*;
        match s.code() {
            Unavailable | Unknown | Internal | Cancelled | DeadlineExceeded | Aborted
            | DataLoss => Error::Connection(s.message().to_owned()),
            code => Error::Refused {
                code,
                message: s.message().to_owned(),
            },
        }
    }
}
