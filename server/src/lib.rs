//! What Academy's servers (the exchange and the launcher) are built from:
//! authentication, TLS, metrics, logging, reflection and health, the runtime
//! and the shutdown signal, and (feature `redis`) the Redis connection. Clients
//! never depend on this crate.
//!
//! Feature `test-util` adds [`testing`]: a real `redis-server` for tests,
//! certificates, and a metrics scraper.

pub mod auth;
pub mod grpc;
pub mod listen;
pub mod metrics;
pub mod page;
#[cfg(feature = "redis")]
pub mod redis;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;
