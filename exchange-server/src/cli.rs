//! Command-line and environment configuration of `academy-exchange`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use academy_exchange::{ExchangeOptions, Limits, MailboxStore, RedisOptions, Retention};
use academy_server::auth::Tokens;
use academy_server::listen::{ConnectionLimits, raise_fd_limit};
use academy_server::telemetry::LogFormat;
use academy_server::tls::Tls;

/// Where mailboxes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BackendKind {
    /// In this process (gone when it exits).
    Memory,
    /// In Redis (durable; several replicas can share it).
    Redis,
}

/// Academy exchange-server: keeps mailboxes and streams messages to agents.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "academy-exchange", version)]
pub(crate) struct Config {
    /// Address to listen on: HOST:PORT, or a Unix socket (unix:/path).
    #[arg(long, env = "ACADEMY_EXCHANGE_LISTEN", default_value = "127.0.0.1:50051")]
    pub(crate) listen: academy_server::listen::Address,
    /// Where mailboxes are kept.
    #[arg(long, env = "ACADEMY_EXCHANGE_BACKEND", value_enum, default_value_t = BackendKind::Memory)]
    pub(crate) backend: BackendKind,
    /// Redis URL, for --backend redis.
    #[arg(
        long,
        env = "ACADEMY_EXCHANGE_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/0"
    )]
    pub(crate) redis_url: String,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, env = "ACADEMY_EXCHANGE_REDIS_PREFIX", default_value = "academy")]
    pub(crate) redis_prefix: String,
    /// Seconds a terminated agent's id stays refused and answered as
    /// terminated (0: forever); the same on every replica sharing a Redis.
    #[arg(long, env = "ACADEMY_EXCHANGE_GRAVESTONE_TTL_SECS", default_value_t = secs(Retention::default().gravestones))]
    pub(crate) gravestone_ttl_secs: u64,
    /// Seconds a client mailbox may have no subscriber before it is removed
    /// (0: never).
    #[arg(long, env = "ACADEMY_EXCHANGE_ABANDONED_CLIENT_TTL_SECS", default_value_t = secs(Retention::default().abandoned_clients))]
    pub(crate) abandoned_client_ttl_secs: u64,
    /// Milliseconds a call waits for Redis (to reconnect, or to answer)
    /// before failing with UNAVAILABLE; health turns NOT_SERVING while Redis
    /// does not answer.
    #[arg(long, env = "ACADEMY_EXCHANGE_REDIS_TIMEOUT_MS", default_value_t = 2000)]
    pub(crate) redis_timeout_ms: u64,
    /// Largest message accepted, in bytes (at most --max-delivery-bytes less
    /// 1 KiB, so that one delivered fits in a delivery).
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_MESSAGE_BYTES", default_value_t = Limits::default().max_message_bytes)]
    pub(crate) max_message_bytes: usize,
    /// Largest delivery to a subscriber (and Invoke answer), in bytes: what
    /// its gRPC client accepts (4 MiB by default in every gRPC library).
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_DELIVERY_BYTES", default_value_t = Limits::default().max_delivery_bytes)]
    pub(crate) max_delivery_bytes: usize,
    /// Most unacknowledged messages one mailbox may hold.
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_QUEUED", default_value_t = Limits::default().max_queued)]
    pub(crate) max_queued: usize,
    /// Most bytes of unacknowledged messages one mailbox may hold.
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_QUEUED_BYTES", default_value_t = Limits::default().max_queued_bytes)]
    pub(crate) max_queued_bytes: usize,
    /// Most active mailboxes one principal may own (0: no quota; callers
    /// without a principal have none).
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_MAILBOXES_PER_PRINCIPAL", default_value_t = Limits::default().max_mailboxes_per_principal)]
    pub(crate) max_mailboxes_per_principal: usize,
    /// Most bytes of unacknowledged messages one principal may have sent,
    /// across all mailboxes (0: no quota).
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_QUEUED_BYTES_PER_PRINCIPAL", default_value_t = Limits::default().max_queued_bytes_per_principal)]
    pub(crate) max_queued_bytes_per_principal: usize,
    /// Largest state an agent may save, in bytes (the largest message's size
    /// applies if smaller).
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_STATE_BYTES", default_value_t = Limits::default().max_state_bytes)]
    pub(crate) max_state_bytes: usize,
    /// Largest blob, in bytes (docs/design.md, "Blobs").
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_BLOB_BYTES", default_value_t = Limits::default().max_blob_bytes)]
    pub(crate) max_blob_bytes: u64,
    /// Most bytes of blobs kept at once in memory (over Redis, Redis's
    /// `maxmemory` bounds them).
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_BLOB_STORE_BYTES", default_value_t = Limits::default().max_blob_store_bytes)]
    pub(crate) max_blob_store_bytes: u64,
    /// With the memory backend: keep blobs in files under this directory
    /// (unlinked as soon as made) rather than in memory; one is made there
    /// at start, so a directory that cannot hold them is refused then.
    #[arg(long, env = "ACADEMY_EXCHANGE_BLOB_DIR")]
    pub(crate) blob_dir: Option<PathBuf>,
    /// Seconds a blob is kept at most, unless freed before.
    #[arg(long, env = "ACADEMY_EXCHANGE_BLOB_TTL_SECS", default_value_t = Limits::default().blob_ttl.as_secs())]
    pub(crate) blob_ttl_secs: u64,
    /// Seconds open calls get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "ACADEMY_EXCHANGE_SHUTDOWN_GRACE_SECS", default_value_t = 10.0)]
    pub(crate) shutdown_grace_secs: f64,
    /// Threads serving requests (0: one per core the process may use). On
    /// small nodes, 1 saves the cross-core wake-ups of handing work between
    /// threads (see BENCHMARKS.md).
    #[arg(long, env = "ACADEMY_EXCHANGE_WORKER_THREADS", default_value_t = 0)]
    pub(crate) worker_threads: usize,
    /// File of `principal token` lines: every call must then carry
    /// `authorization: Bearer <token>`, and a mailbox belongs to the principal
    /// that registered it. Without it, anyone who can connect is served.
    #[arg(long, env = "ACADEMY_EXCHANGE_TOKENS_FILE")]
    pub(crate) tokens_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM, with its chain), and --tls-key.
    #[arg(long, env = "ACADEMY_EXCHANGE_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "ACADEMY_EXCHANGE_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    #[arg(long, env = "ACADEMY_EXCHANGE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// With mutual TLS: a call without a bearer token is the principal its
    /// client certificate names (its first URI subject alternative name, such
    /// as a SPIFFE id, else its first DNS name).
    #[arg(long, env = "ACADEMY_EXCHANGE_CLIENT_CERT_PRINCIPALS", requires = "tls_client_ca")]
    pub(crate) client_cert_principals: bool,
    /// Most connections open at once (lowered to fit the process's file
    /// descriptor limit); more are closed as they come.
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().max_connections)]
    pub(crate) max_connections: usize,
    /// Most connections open at once from one peer address.
    #[arg(long, env = "ACADEMY_EXCHANGE_MAX_CONNECTIONS_PER_PEER", default_value_t = ConnectionLimits::default().max_per_peer)]
    pub(crate) max_connections_per_peer: usize,
    /// Milliseconds a new connection has to start its handshake.
    #[arg(long, env = "ACADEMY_EXCHANGE_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub(crate) handshake_timeout_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP, no token).
    #[arg(long, env = "ACADEMY_EXCHANGE_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Log format (the level comes from RUST_LOG, default info).
    #[arg(long, env = "ACADEMY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub(crate) log_format: LogFormat,
}

impl Config {
    pub(crate) fn options(&self) -> anyhow::Result<ExchangeOptions> {
        let ttl = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
        let limits = Limits {
            max_message_bytes: self.max_message_bytes,
            max_delivery_bytes: self.max_delivery_bytes,
            max_queued: self.max_queued,
            max_queued_bytes: self.max_queued_bytes,
            max_mailboxes_per_principal: self.max_mailboxes_per_principal,
            max_queued_bytes_per_principal: self.max_queued_bytes_per_principal,
            max_state_bytes: self.max_state_bytes,
            retention: Retention {
                gravestones: ttl(self.gravestone_ttl_secs),
                abandoned_clients: ttl(self.abandoned_client_ttl_secs),
            },
            max_blob_bytes: self.max_blob_bytes,
            max_blob_store_bytes: self.max_blob_store_bytes,
            blob_ttl: Duration::from_secs(self.blob_ttl_secs),
        };
        limits.check().map_err(|e| anyhow::anyhow!("limits: {e}"))?;
        let grace = Duration::try_from_secs_f64(self.shutdown_grace_secs)
            .map_err(|e| anyhow::anyhow!("--shutdown-grace-secs: {e}"))?;
        let store = match self.backend {
            BackendKind::Memory => MailboxStore::Memory,
            BackendKind::Redis => {
                anyhow::ensure!(!self.redis_prefix.is_empty(), "--redis-prefix must not be empty");
                MailboxStore::Redis(RedisOptions {
                    url: self.redis_url.clone(),
                    prefix: self.redis_prefix.clone(),
                    timeout: Duration::from_millis(self.redis_timeout_ms.max(10)),
                })
            }
        };
        anyhow::ensure!(
            self.blob_dir.is_none() || matches!(store, MailboxStore::Memory),
            "--blob-dir is for the memory backend: over Redis, blobs are kept in Redis"
        );
        Ok(ExchangeOptions {
            listen: self.listen.clone(),
            store,
            blob_dir: self.blob_dir.clone(),
            limits,
            shutdown_grace: grace,
            tokens: self.tokens_file.as_deref().map(Tokens::load).transpose()?,
            tls: Tls::from_flags(
                self.tls_cert.as_deref(),
                self.tls_key.as_deref(),
                self.tls_client_ca.as_deref(),
                self.client_cert_principals,
            )?,
            metrics_listen: self.metrics_listen,
            connections: ConnectionLimits {
                max_connections: self.max_connections,
                max_per_peer: self.max_connections_per_peer,
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            }
            .within(raise_fd_limit()),
        })
    }
}

/// A retention as a flag's seconds (0: none).
fn secs(retention: Option<Duration>) -> u64 {
    retention.map_or(0, |t| t.as_secs())
}
