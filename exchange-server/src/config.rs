//! Command-line and environment configuration of `academy-exchange`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{Limits, ServerOptions, telemetry::LogFormat};

/// Academy exchange-server: keeps mailboxes and streams messages to agents.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "academy-exchange", version)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "ACADEMY_EXCHANGE_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,
    /// Largest message accepted, in bytes.
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_MESSAGE_BYTES", default_value_t = Limits::default().max_message_bytes)]
    pub max_message_bytes: usize,
    /// Most unacknowledged messages one mailbox may hold.
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_QUEUED", default_value_t = Limits::default().max_queued)]
    pub max_queued: usize,
    /// Seconds open calls get to finish after SIGTERM/SIGINT.
    #[arg(
        long,
        env = "ACADEMY_EXCHANGE_SHUTDOWN_GRACE_SECS",
        default_value_t = 10.0
    )]
    pub shutdown_grace_secs: f64,
    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(long, env = "ACADEMY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

impl Config {
    pub fn server_options(&self) -> anyhow::Result<ServerOptions> {
        anyhow::ensure!(
            self.max_message_bytes > 0,
            "--max-message-bytes must be positive"
        );
        anyhow::ensure!(self.max_queued > 0, "--max-queued must be positive");
        let grace = Duration::try_from_secs_f64(self.shutdown_grace_secs)
            .map_err(|e| anyhow::anyhow!("--shutdown-grace-secs: {e}"))?;
        Ok(ServerOptions {
            listen: self.listen,
            limits: Limits {
                max_message_bytes: self.max_message_bytes,
                max_queued: self.max_queued,
            },
            shutdown_grace: grace,
        })
    }
}
