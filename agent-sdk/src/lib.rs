#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod behaviour;
pub mod blob;
pub mod clock;
pub mod codec;
mod context;
pub mod credentials;
pub mod describe;
mod direct;
pub mod error;
pub mod exchange;
mod handle;
pub mod launcher;
mod mailbox;
mod manager;
pub mod metrics;
pub mod runtime;
mod session;
pub mod state;
pub mod worker;

pub use academy_macros::behaviour;
pub use academy_proto as proto;
pub use academy_proto::{EntityId, EntityKind, Matching, RegisteredAgent};
pub use behaviour::{ActionError, Behaviour, ControlLoop, Durable, Shutdown};
pub use context::{AgentContext, current_agent, current_caller};
pub use credentials::Credentials;
pub use direct::Endpoint;
#[cfg(all(feature = "direct", feature = "tls"))]
pub use direct::EndpointTls;
pub use error::{AgentError, ClientError, HandleError, ManagerError};
pub use handle::{Handle, MailboxPolicy, RawHandle};
pub use manager::{LaunchOptions, Manager};
pub use runtime::AgentConfig;
/// JSON Schemas of action parameters and results: derive `schemars::JsonSchema`
/// on your types to describe them precisely ([`describe`]).
pub use schemars;

/// Used by the code `#[behaviour]` generates; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::behaviour::{HookOutcome, every, fallible};
    pub use crate::codec::{Args, decode_args, encode_result, reply_codec};
    pub use crate::describe::{ActionDoc, Probe, Typed, Untyped, describe};
    pub use academy_proto::pb::AgentDescription;
    pub use academy_proto::pb::Payload;
    pub use futures::future::BoxFuture;
    pub use schemars::SchemaGenerator;
    pub use serde_json::Value as JsonValue;
}

/// The repository README's agent, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
