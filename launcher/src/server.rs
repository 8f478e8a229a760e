//! Serving the launcher over gRPC, with health and reflection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use academy_proto::pb::launcher_service_server::LauncherServiceServer;
use academy_sdk::Credentials;
use academy_sdk::exchange::GrpcExchange;
use academy_server::auth::{Authenticator, Tokens};
use academy_server::grpc::{MAX_STREAMS_PER_CONNECTION, StatusRules, reflection};
use academy_server::listen::{self, Address, ConnectionLimits, Listener};
use academy_server::metrics::{self, RpcMetrics};
use academy_server::tls::Tls;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;

use crate::cluster::Cluster;
use crate::{LauncherGrpc, store};

/// Largest request the launcher accepts (a launch's config, mostly).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How to run a launcher.
#[derive(Debug, Clone)]
pub struct LauncherOptions {
    /// Address to listen on: `HOST:PORT`, or a Unix socket (`unix:/path`).
    pub listen: Address,
    /// The exchange the launched agents use (`http://HOST:PORT`).
    pub exchange_url: String,
    /// A worker silent for this long is declared dead and its agents move.
    pub heartbeat_timeout: Duration,
    /// Keep agent records in this Redis (`redis://HOST:PORT/DB`), so a
    /// restarted launcher forgets nothing; in memory when `None`.
    pub redis_url: Option<String>,
    /// Prefix of the launcher's Redis keys.
    pub redis_prefix: String,
    /// Bearer tokens every call must carry (health and reflection excepted);
    /// `None` serves anyone who can connect.
    pub tokens: Option<Tokens>,
    /// With `tokens`: the one principal that may serve as a worker (and drain
    /// workers). Workers subscribe to the mailboxes this launcher registers,
    /// so it must also be the principal of `exchange_credentials`.
    pub worker_principal: Option<String>,
    /// What the launcher presents to the exchange.
    pub exchange_credentials: Credentials,
    /// Serve TLS (mutual TLS when it names a client CA); plaintext when `None`.
    pub tls: Option<Tls>,
    /// Serve Prometheus metrics at `GET /metrics` on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// Bounds on the connections accepted.
    pub connections: ConnectionLimits,
    /// After a restart (with `redis_url`), how long agents that were placed
    /// wait for their workers to rejoin with them before being placed anew.
    pub rejoin_grace: Duration,
    /// How long the record of an agent that stopped or failed is kept.
    pub retention: Duration,
}

impl Default for LauncherOptions {
    fn default() -> Self {
        Self {
            listen: Address::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            exchange_url: "http://127.0.0.1:50051".into(),
            heartbeat_timeout: Duration::from_secs(3),
            redis_url: None,
            redis_prefix: "academy".into(),
            tokens: None,
            worker_principal: None,
            exchange_credentials: Credentials::none(),
            tls: None,
            metrics_listen: None,
            connections: ConnectionLimits::default(),
            rejoin_grace: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// A running launcher; dropping it shuts it down.
#[derive(Debug)]
pub struct RunningLauncher {
    addr: Address,
    metrics_addr: Option<SocketAddr>,
    tls: bool,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RunningLauncher {
    pub async fn start(options: LauncherOptions) -> anyhow::Result<Self> {
        let auth = Authenticator::new(options.tokens.clone())
            .with_client_certificates(options.tls.as_ref().is_some_and(Tls::client_principals));
        anyhow::ensure!(
            !auth.is_enabled() || options.worker_principal.is_some(),
            "a launcher that authenticates calls needs the workers' principal (--worker-principal)"
        );
        // Lazily: the exchange may start after the launcher.
        let exchange = GrpcExchange::lazy(&options.exchange_url, &options.exchange_credentials)?;
        let mut cluster = Cluster::new();
        if let Some(url) = &options.redis_url {
            let (records, store) = store::open(url, &options.redis_prefix).await?;
            cluster.restore(records, store);
        }
        let shutdown = CancellationToken::new();
        let service = LauncherGrpc::new(
            cluster,
            shutdown.clone(),
            Arc::new(exchange),
            options.exchange_url.clone(),
            options.heartbeat_timeout,
            options.worker_principal.as_deref().map(Into::into),
        );
        service.terminate_given_up();
        service.release_held_after(options.rejoin_grace);
        service.forget_finished_after(options.retention);
        let mut registry = Registry::default();
        metrics::register_process(&mut registry, "academy-launcher");
        let calls = RpcMetrics::register(&mut registry);
        registry.register_collector(Box::new(service.gauges()));
        // Ready until it shuts down.
        let (ready, readiness) = tokio::sync::watch::channel(true);
        let (metrics_addr, count_calls) = metrics::serve_if(
            options.metrics_listen,
            registry,
            &calls,
            readiness,
            shutdown.clone(),
        )
        .await?;
        anyhow::ensure!(
            options.tls.is_none() || options.listen.tcp().is_some(),
            "TLS on a Unix socket is not supported: the socket file's permissions guard it"
        );
        let tls = options.tls.as_ref().map(Tls::acceptor).transpose()?;
        let listener = Listener::bind(&options.listen).await?;
        let addr = listener.address()?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<LauncherServiceServer<LauncherGrpc>>().await;
        let incoming = listen::incoming(listener, options.connections, tls);
        let signal = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                ready.send_replace(false);
            }
        };
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .layer(tower::util::option_layer(count_calls))
            .layer(StatusRules::new(MAX_REQUEST_BYTES))
            .add_service(health_service)
            .add_service(reflection(&["academy.v1.LauncherService"]).build_v1()?)
            .add_service(reflection(&["academy.v1.LauncherService"]).build_v1alpha()?)
            .add_service(InterceptedService::new(
                LauncherServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth,
            ));
        let deadline = shutdown.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                result = router.serve_with_incoming_shutdown(incoming, signal) => result,
                // Worker streams stay open: give them a moment, then go.
                () = async { deadline.cancelled().await; tokio::time::sleep(Duration::from_secs(2)).await } => Ok(()),
            }
        });
        let (authenticated, tls) = (options.tokens.is_some(), options.tls.is_some());
        tracing::info!(%addr, exchange = %options.exchange_url, authenticated, tls, "launcher listening");
        Ok(Self { addr, metrics_addr, tls, shutdown, task: Some(task) })
    }

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

    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.addr.release();
    }
}

impl Drop for RunningLauncher {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
