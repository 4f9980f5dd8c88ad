//! Pure domain logic shared by every part of Agora: no I/O, no clock, no threads.
//!
//! The master, the agent and the SDK turn wire messages into these types once, at the edge,
//! and work with them from then on; everything here can be tested and benchmarked alone.
//!
//! Main types: [`Resources`] (Mesos-style named scalars, ranges and sets, each optionally
//! reserved for a role), [`TaskState`] with its legal transitions, and the id newtypes
//! ([`FrameworkId`], [`AgentId`], [`OfferId`], [`TaskId`], [`ExecutorId`]).
//!
//! # Layout
//!
//! - [`ids`]: id newtypes and their validation.
//! - [`limits`]: bounds on every number, string and list from outside.
//! - [`resources`]: values, resources and their arithmetic.
//! - [`syntax`]: the Mesos text syntax for resources and attributes (`cpus:2;ports:[1-9]`).
//! - [`task`]: the task state machine.

pub mod ids;
pub mod limits;
pub mod resources;
pub mod syntax;
pub mod task;

pub use ids::{AgentId, ExecutorId, FrameworkId, IdError, OfferId, TaskId};
pub use limits::LimitError;
pub use resources::{
    Range, Ranges, Reservation, Resource, ResourceError, Resources, Scalar, Value,
};
pub use syntax::{Attribute, AttributeValue, ParseError, parse_attributes, parse_resources};
pub use task::{TaskState, TransitionError};
