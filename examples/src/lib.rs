//! Helpers shared by the examples: run against an external exchange-server, or
//! embed one (a real gRPC server on loopback) when none is given.

pub mod behaviours;

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_sdk::Manager;
use anyhow::Context as _;

/// Where the example's exchange is.
#[derive(Debug, clap::Args)]
pub struct ExchangeArgs {
    /// URL of a running exchange-server; without it an exchange-server is
    /// started inside this process.
    #[arg(long, env = "ACADEMY_EXCHANGE_URL")]
    pub exchange: Option<String>,
    /// Address of the embedded exchange-server (when --exchange is not
    /// given): HOST:PORT, or a Unix socket (unix:/path).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: academy_exchange::Address,
}

impl ExchangeArgs {
    /// A manager talking gRPC to the exchange, and the embedded server if one
    /// was started (keep it alive as long as the manager).
    pub async fn connect(&self) -> anyhow::Result<(Manager, Option<RunningExchange>)> {
        let (url, server) = match &self.exchange {
            Some(url) => (url.clone(), None),
            None => {
                let listen = self.listen.clone();
                let options = ExchangeOptions { listen, ..Default::default() };
                let server = RunningExchange::start(options)
                    .await
                    .with_context(|| format!("cannot start an exchange on {}", self.listen))?;
                (server.url(), Some(server))
            }
        };
        let manager = Manager::connect(&url)
            .await
            .with_context(|| format!("cannot reach the exchange at {url}"))?;
        eprintln!("exchange: {url}");
        Ok((manager, server))
    }
}

/// Logs to stderr at RUST_LOG's level (warn by default, to keep output readable).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
