#![doc = include_str!("../README.md")]

mod behaviour;
mod client;
mod codec;
mod context;
mod credentials;
mod error;
mod handle;
mod launcher;
mod mailbox;
mod manager;
mod runtime;
mod worker;

pub use academy_exchange::{AgentInfo, EntityId, EntityKind, MailboxState, MailboxStatus};
pub use academy_macros::behaviour;
pub use behaviour::{ActionError, Behaviour, ControlLoop, Shutdown};
pub use client::{DeliveryStream, ExchangeClient, GrpcExchange, LocalExchange, SharedExchange};
pub use codec::{CONTENT_TYPE_MSGPACK, Codec};
pub use context::{AgentContext, current_agent, current_caller};
pub use credentials::{Authorized, Credentials, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, TOKEN_ENV};
pub use error::{AgentError, ClientError, HandleError, ManagerError, status_text};
pub use handle::{Handle, RawHandle};
pub use launcher::{Launcher, RemoteLaunch};
pub use manager::{LaunchOptions, Manager};
pub use runtime::{AgentConfig, run_agent};
pub use worker::Worker;

/// Used by the code `#[behaviour]` generates; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::behaviour::{HookOutcome, every, fallible};
    pub use crate::codec::{Args, decode_args, encode_result, reply_codec};
    pub use academy_proto::pb::Payload;
    pub use futures::future::BoxFuture;
}
