use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_sdk::Credentials;
use academy_server::auth::Tokens;
use academy_server::grpc::shutdown_signal;
use academy_server::listen::{ConnectionLimits, raise_fd_limit};
use academy_server::telemetry::{self, LogFormat};
use academy_server::tls::Tls;
use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Academy launcher: places agents on workers and keeps them running.
#[derive(Debug, Parser)]
#[command(name = "academy-launcher", version)]
struct Config {
    /// Address to listen on: HOST:PORT, or a Unix socket (unix:/path).
    #[arg(long, env = "ACADEMY_LAUNCHER_LISTEN", default_value = "127.0.0.1:50052")]
    listen: academy_server::listen::Address,
    /// URL of the exchange the agents use.
    #[arg(long, env = "ACADEMY_EXCHANGE_URL", default_value = "http://127.0.0.1:50051")]
    exchange: String,
    /// Milliseconds without a heartbeat after which a worker is dead.
    #[arg(long, env = "ACADEMY_LAUNCHER_HEARTBEAT_TIMEOUT_MS", default_value_t = 3000)]
    heartbeat_timeout_ms: u64,
    /// After a restart (with --redis-url), milliseconds agents that were
    /// placed wait for their workers to rejoin with them (workers keep them
    /// running meanwhile) before they are placed anew.
    #[arg(long, env = "ACADEMY_LAUNCHER_REJOIN_GRACE_MS", default_value_t = 10_000)]
    rejoin_grace_ms: u64,
    /// Seconds the record of an agent that stopped or failed is kept (for
    /// `agents list` and get) before it is forgotten.
    #[arg(long, env = "ACADEMY_LAUNCHER_RETENTION_SECS", default_value_t = 86_400)]
    retention_secs: u64,
    /// Keep agent records in Redis at this URL, so a restart forgets nothing.
    #[arg(long, env = "ACADEMY_LAUNCHER_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of the launcher's Redis keys.
    #[arg(long, env = "ACADEMY_LAUNCHER_REDIS_PREFIX", default_value = "academy")]
    redis_prefix: String,
    /// File of `principal token` lines: every call must then carry
    /// `authorization: Bearer <token>`. Without it, anyone who can connect is served.
    #[arg(long, env = "ACADEMY_LAUNCHER_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// With --tokens-file or --client-cert-principals: the principal workers use (the only one that may
    /// join as a worker or drain workers). The launcher's own ACADEMY_TOKEN
    /// must belong to it on the exchange, as workers subscribe to the
    /// mailboxes the launcher registers.
    #[arg(long, env = "ACADEMY_LAUNCHER_WORKER_PRINCIPAL")]
    worker_principal: Option<String>,
    /// Serve TLS with this certificate (PEM, with its chain), and --tls-key.
    /// For an `https://` exchange URL, ACADEMY_TLS_CA (and ACADEMY_TLS_CERT /
    /// ACADEMY_TLS_KEY for mutual TLS) say how the launcher connects to it.
    #[arg(long, env = "ACADEMY_LAUNCHER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "ACADEMY_LAUNCHER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    #[arg(long, env = "ACADEMY_LAUNCHER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// With mutual TLS: a call without a bearer token is the principal its
    /// client certificate names (its first URI subject alternative name, such
    /// as a SPIFFE id, else its first DNS name).
    #[arg(long, env = "ACADEMY_LAUNCHER_CLIENT_CERT_PRINCIPALS", requires = "tls_client_ca")]
    client_cert_principals: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no token).
    #[arg(long, env = "ACADEMY_LAUNCHER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Most connections open at once (lowered to fit the process's file
    /// descriptor limit); more are closed as they come.
    #[arg(long, env = "ACADEMY_LAUNCHER_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().max_connections)]
    max_connections: usize,
    /// Most connections open at once from one peer address.
    #[arg(long, env = "ACADEMY_LAUNCHER_MAX_CONNECTIONS_PER_PEER", default_value_t = ConnectionLimits::default().max_per_peer)]
    max_connections_per_peer: usize,
    /// Milliseconds a new connection has to start its handshake.
    #[arg(long, env = "ACADEMY_LAUNCHER_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(long, env = "ACADEMY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let _telemetry = telemetry::init(config.log_format, "academy-launcher");
    anyhow::ensure!(
        config.heartbeat_timeout_ms >= 100,
        "--heartbeat-timeout-ms must be at least 100"
    );
    let launcher = RunningLauncher::start(LauncherOptions {
        listen: config.listen,
        exchange_url: config.exchange,
        heartbeat_timeout: Duration::from_millis(config.heartbeat_timeout_ms),
        rejoin_grace: Duration::from_millis(config.rejoin_grace_ms),
        retention: Duration::from_secs(config.retention_secs),
        redis_url: config.redis_url,
        redis_prefix: config.redis_prefix,
        tokens: config.tokens_file.as_deref().map(Tokens::load).transpose()?,
        worker_principal: config.worker_principal,
        exchange_credentials: Credentials::from_env()?,
        tls: Tls::from_flags(
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
            config.tls_client_ca.as_deref(),
            config.client_cert_principals,
        )?,
        metrics_listen: config.metrics_listen,
        connections: ConnectionLimits {
            max_connections: config.max_connections,
            max_per_peer: config.max_connections_per_peer,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        }
        .within(raise_fd_limit()),
    })
    .await?;
    shutdown_signal().await;
    launcher.shutdown().await;
    Ok(())
}
