//! The Academy exchange: mailboxes for agents and clients, served over gRPC
//! (`academy.v1.Exchange`) or used in-process.
//!
//! Embed a server in a program or a test:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use academy_exchange::{RunningServer, ServerOptions};
//! let server = RunningServer::start(ServerOptions::default()).await?; // 127.0.0.1:0
//! println!("serving on {}", server.url());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod auth;
mod backend;
mod config;
mod error;
mod exchange;
mod id;
mod invoke;
pub mod json;
pub mod metrics;
mod server;
mod service;
pub mod telemetry;
pub mod testing;
pub mod tls;

pub use backend::redis::{RedisOptions, connect_redis, redacted_url};
pub use config::{BackendKind, Config};
pub use error::{ERROR_DOMAIN, ExchangeError};
pub use exchange::{
    AgentInfo, Delivery, Exchange, Limits, MailboxState, MailboxStatus, Subscription,
};
pub use id::{EntityId, EntityKind};
pub use server::{
    Backend, CONNECTION_WINDOW_BYTES, RunningServer, STREAM_WINDOW_BYTES, ServerOptions,
    nodelay_incoming, reflection, server_runtime, shutdown_signal,
};
pub use service::ExchangeService;

/// Content type of JSON payloads, which every peer supports.
pub const CONTENT_TYPE_JSON: &str = "application/json";
