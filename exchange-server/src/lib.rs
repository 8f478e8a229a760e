//! The Academy exchange: mailboxes for agents and clients, used in-process
//! ([`Exchange`]) or served over gRPC (`academy.v1.ExchangeService`, feature
//! `server`).
//!
//! Features: `redis` (default) adds the Redis backend ([`RedisOptions`]);
//! `server` (default) the gRPC service and [`RunningExchange`]; `cli`
//! (default) the `academy-exchange` binary; `test-util` the test helpers of
//! `academy-server`. Without default features, only the exchange and its
//! in-memory backend are built: what the SDK embeds.
//!
//! ```
//! # async fn demo() -> Result<(), academy_proto::ExchangeError> {
//! let exchange = academy_exchange::Exchange::default();
//! let client = exchange.register_client().await?;
//! assert_eq!(exchange.status(&client).await?.state, academy_proto::pb::MailboxState::Active);
//! # Ok(()) }
//! ```

mod backend;
#[cfg(feature = "server")]
mod blob_service;
pub mod clock;
#[cfg(feature = "server")]
mod clock_service;
mod exchange;
#[cfg(feature = "server")]
mod invoke;
pub mod limits;
#[cfg(feature = "server")]
mod metrics;
mod retention;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod service;
#[cfg(feature = "server")]
pub mod session;

#[cfg(feature = "server")]
pub use academy_server::listen::Address;
#[cfg(feature = "redis")]
pub use backend::redis::RedisOptions;
pub use backend::{BlobMeta, BlobUsage, Depth, Ticket};
#[cfg(feature = "server")]
pub use blob_service::BlobGrpc;
#[cfg(feature = "server")]
pub use clock_service::ClockGrpc;
pub use exchange::{BlobPut, EXCHANGE_STORE, Exchange, Subscription};
pub use limits::Limits;
pub use retention::Retention;
#[cfg(feature = "server")]
pub use server::{ExchangeOptions, MailboxStore, RunningExchange};
#[cfg(feature = "server")]
pub use service::ExchangeGrpc;
