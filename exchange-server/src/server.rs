//! Serving an exchange over gRPC, with health, reflection and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use academy_proto::pb::blob_service_server::BlobServiceServer;
use academy_proto::pb::clock_service_server::ClockServiceServer;
use academy_proto::pb::exchange_service_server::ExchangeServiceServer;
use academy_proto::transport::{CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES};
use academy_server::auth::{Authenticator, Tokens};
use academy_server::grpc::{MAX_STREAMS_PER_CONNECTION, StatusRules, reflection};
use academy_server::listen::{self, Address, ConnectionLimits, Listener};
use academy_server::metrics::{self, RpcMetrics};
use academy_server::tls::Tls;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

#[cfg(feature = "redis")]
use crate::RedisOptions;
use crate::metrics::{ExchangeMetrics, QueueDepth};
use crate::{BlobGrpc, ClockGrpc, Exchange, ExchangeGrpc, Limits, limits};

/// Where an exchange keeps its mailboxes.
#[derive(Debug, Clone, Default)]
pub enum MailboxStore {
    /// In this process: fast, gone with the process.
    #[default]
    Memory,
    /// In Redis: durable, shared by every replica on the same Redis and prefix.
    #[cfg(feature = "redis")]
    Redis(RedisOptions),
}

/// How to serve an exchange.
#[derive(Debug, Clone)]
pub struct ExchangeOptions {
    /// Address to listen on: `HOST:PORT`, or a Unix socket (`unix:/path`).
    pub listen: Address,
    /// Where mailboxes are kept.
    pub store: MailboxStore,
    /// With the memory store: keep blobs in files under this directory
    /// rather than in memory (docs/design.md, "Blobs").
    pub blob_dir: Option<std::path::PathBuf>,
    /// Limits of messages and mailboxes.
    pub limits: Limits,
    /// How long open calls may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Bearer tokens every call must carry (health and reflection excepted);
    /// `None` serves anyone who can connect.
    pub tokens: Option<Tokens>,
    /// Serve TLS (mutual TLS when it names a client CA); plaintext when `None`.
    pub tls: Option<Tls>,
    /// Serve Prometheus metrics at `GET /metrics` on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// Bounds on the connections accepted.
    pub connections: ConnectionLimits,
}

impl Default for ExchangeOptions {
    fn default() -> Self {
        Self {
            listen: Address::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            store: MailboxStore::Memory,
            blob_dir: None,
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(10),
            tokens: None,
            tls: None,
            metrics_listen: None,
            connections: ConnectionLimits::default(),
        }
    }
}

/// Sets the exchange service's health, and readiness, from its store's,
/// until `shutdown`.
async fn follow_store(
    mut store: tokio::sync::watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    ready: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = store.changed() => if changed.is_err() { return },
        }
        let up = *store.borrow_and_update();
        ready.send_replace(up && !shutdown.is_cancelled());
        if up {
            health.set_serving::<ExchangeServiceServer<ExchangeGrpc>>().await;
        } else {
            health.set_not_serving::<ExchangeServiceServer<ExchangeGrpc>>().await;
        }
    }
}

/// A running exchange-server. Dropping it shuts the server down.
#[derive(Debug)]
pub struct RunningExchange {
    addr: Address,
    metrics_addr: Option<SocketAddr>,
    tls: bool,
    exchange: Exchange,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RunningExchange {
    /// Binds `options.listen` and serves an in-memory exchange on it.
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let server = academy_exchange::RunningExchange::start(Default::default()).await?;
    /// println!("exchange on http://{}", server.addr());
    /// server.shutdown().await;
    /// # Ok(()) }
    /// ```
    pub async fn start(options: ExchangeOptions) -> std::io::Result<Self> {
        let exchange = match &options.store {
            MailboxStore::Memory => {
                // Found now rather than at the first blob.
                if let Some(dir) = &options.blob_dir {
                    crate::backend::memory::check_blob_dir(dir)?;
                }
                Exchange::in_memory(options.limits, options.blob_dir.clone())
            }
            #[cfg(feature = "redis")]
            MailboxStore::Redis(redis) => Exchange::redis(redis.clone(), options.limits)
                .await
                .map_err(std::io::Error::other)?,
        };
        Self::serve(exchange, options).await
    }

    /// Serves the given exchange (for example one also used in-process).
    pub async fn serve(exchange: Exchange, options: ExchangeOptions) -> std::io::Result<Self> {
        options.limits.check().map_err(std::io::Error::other)?;
        if options.tls.is_some() && matches!(options.listen, Address::Unix(_)) {
            return Err(std::io::Error::other(
                "TLS on a Unix socket is not supported: the socket file's permissions guard it",
            ));
        }
        let tls =
            options.tls.as_ref().map(Tls::acceptor).transpose().map_err(std::io::Error::other)?;
        let listener = Listener::bind(&options.listen).await?;
        let addr = listener.address()?;
        let shutdown = CancellationToken::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<ExchangeServiceServer<ExchangeGrpc>>().await;
        // Ready while the store answers: NOT_SERVING (the service's status,
        // which readiness probes ask) while Redis is down, so traffic goes
        // elsewhere; the server itself ("") stays SERVING for liveness.
        let ready = Arc::new(tokio::sync::watch::Sender::new(true));
        tokio::spawn(follow_store(
            exchange.health(),
            health.clone(),
            ready.clone(),
            shutdown.clone(),
        ));
        let reflection = || {
            reflection(&[
                "academy.v1.ExchangeService",
                "academy.v1.ClockService",
                "academy.v1.BlobService",
            ])
        };
        let reflection_v1 = reflection().build_v1().map_err(std::io::Error::other)?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(std::io::Error::other)?;
        let mut registry = Registry::default();
        metrics::register_process(&mut registry, "academy-exchange");
        let calls = RpcMetrics::register(&mut registry);
        let counted = ExchangeMetrics::register(&mut registry);
        let auth = Authenticator::new(options.tokens.clone())
            .with_client_certificates(options.tls.as_ref().is_some_and(Tls::client_principals));
        let service = ExchangeGrpc::new(exchange.clone())
            .with_metrics(counted.clone())
            .with_authenticator(auth.clone());
        if options.metrics_listen.is_some() {
            let depth = QueueDepth::follow(exchange.clone(), shutdown.clone());
            registry.register_collector(Box::new(depth));
        }
        let (metrics_addr, count_calls) = metrics::serve_if(
            options.metrics_listen,
            registry,
            &calls,
            ready.subscribe(),
            shutdown.clone(),
        )
        .await?;
        let service = ExchangeServiceServer::new(service)
            .max_decoding_message_size(options.limits.max_request_bytes())
            .max_encoding_message_size(usize::MAX);
        let authenticated = auth.is_enabled();
        let clock = InterceptedService::new(
            ClockServiceServer::new(ClockGrpc::new(exchange.clock().clone())),
            auth.clone(),
        );
        let blobs = BlobServiceServer::new(BlobGrpc::new(exchange.clone()).with_metrics(counted))
            .max_decoding_message_size(limits::BLOB_CHUNK_BYTES + limits::REQUEST_FRAMING_BYTES)
            .max_encoding_message_size(usize::MAX);
        let blobs = InterceptedService::new(blobs, auth.clone());
        let service = InterceptedService::new(service, auth);
        let incoming = listen::incoming(listener, options.connections, tls);
        let signal = {
            let shutdown = shutdown.clone();
            let exchange = exchange.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!("shutting down: no new calls, ending subscriptions");
                health.set_not_serving::<ExchangeServiceServer<ExchangeGrpc>>().await;
                ready.send_replace(false);
                exchange.shutdown();
            }
        };
        let grace = options.shutdown_grace;
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .layer(tower::util::option_layer(count_calls))
            .layer(StatusRules::new(options.limits.max_message_bytes))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .add_service(clock)
            .add_service(blobs);
        let deadline = shutdown.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                result = router.serve_with_incoming_shutdown(incoming, signal) => result,
                () = async { deadline.cancelled().await; tokio::time::sleep(grace).await } => {
                    tracing::warn!(?grace, "calls still open after the grace period; closing them");
                    Ok(())
                }
            }
        });
        let (tls, mutual_tls) =
            options.tls.as_ref().map_or((false, false), |t| (true, t.is_mutual()));
        tracing::info!(%addr, authenticated, tls, mutual_tls, "exchange listening");
        Ok(Self { addr, metrics_addr, tls, exchange, shutdown, task: Some(task) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> &Address {
        &self.addr
    }

    /// Where metrics are served, with `metrics_listen`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://ADDR` (`https://` with TLS), or `unix:/path`, for clients.
    pub fn url(&self) -> String {
        self.addr.url(self.tls)
    }

    /// The exchange behind the server, for in-process use beside it.
    pub fn exchange(&self) -> &Exchange {
        &self.exchange
    }

    /// Stops accepting calls, ends subscriptions and waits for the server to stop.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => tracing::info!("exchange stopped"),
                Ok(Err(e)) => tracing::error!(error = %e, "exchange stopped with an error"),
                Err(e) => tracing::error!(error = %e, "exchange task failed"),
            }
        }
        self.addr.release();
    }
}

impl Drop for RunningExchange {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
