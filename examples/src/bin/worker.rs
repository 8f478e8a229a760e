//! A worker node with the example behaviours compiled in: the launcher places
//! agents on it.
//!
//! `cargo run -p academy-examples --bin worker -- --launcher http://127.0.0.1:50052`

use academy_examples::behaviours::{
    Cleaner, Controller, Coordinator, Crashy, Ledger, Recorder, Relay, Sensor, Stall, WordStats,
};
use academy_sdk::clock::ClockKind;
use academy_sdk::worker::{Worker, WorkerStatus};
use academy_server::telemetry::{self, LogFormat};
use clap::Parser;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// URL of the launcher.
    #[arg(long, env = "ACADEMY_LAUNCHER_URL", default_value = "http://127.0.0.1:50052")]
    launcher: String,
    /// Name shown by `workers list`, by which `workers drain` finds it (in
    /// Kubernetes, the pod's name from the downward API).
    #[arg(long, env = "ACADEMY_WORKER_NAME", default_value = "worker")]
    name: String,
    /// How many agents it runs at once.
    #[arg(long, default_value_t = 16)]
    capacity: u32,
    /// Labels launch selectors can match, as key=value.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where to serve plain HTTP for probes and scrapers: `/livez`,
    /// `/readyz` (ready while joined to the launcher) and `/metrics`.
    #[arg(long, env = "ACADEMY_WORKER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Run agents on the exchange's simulated clock (docs/design.md,
    /// "Clocks") rather than the wall clock.
    #[arg(long)]
    simulated_clock: bool,
    /// Serve a peer endpoint at this address ("host:port", port 0 for any,
    /// or "unix:/path"): its agents take requests there directly, and call
    /// others directly when they can (docs/design.md, "Direct delivery").
    #[arg(long, env = "ACADEMY_WORKER_DIRECT")]
    direct: Option<String>,
    /// Serve the peer endpoint over TLS with this certificate (PEM), for
    /// the names its senders reach it by; senders trust it by the CA they
    /// trust their exchange by. Read again every 5 s: a renewed
    /// certificate reaches new connections without a restart.
    #[arg(long, env = "ACADEMY_WORKER_DIRECT_TLS_CERT", requires_all = ["direct", "direct_tls_key"])]
    direct_tls_cert: Option<std::path::PathBuf>,
    /// The key of `--direct-tls-cert` (PEM).
    #[arg(long, env = "ACADEMY_WORKER_DIRECT_TLS_KEY", requires = "direct_tls_cert")]
    direct_tls_key: Option<std::path::PathBuf>,
    /// Require senders to show a client certificate this CA (PEM) signed.
    #[arg(long, env = "ACADEMY_WORKER_DIRECT_TLS_CLIENT_CA", requires = "direct_tls_cert")]
    direct_tls_client_ca: Option<std::path::PathBuf>,
    /// Log lines as text or JSON (for log collectors).
    #[arg(long, env = "ACADEMY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

/// The peer endpoint's TLS, from the files its flags name (read again
/// while it serves, so renewed certificates are taken).
fn endpoint_tls(args: &Args) -> anyhow::Result<Option<academy_sdk::EndpointTls>> {
    let (Some(cert), Some(key)) = (&args.direct_tls_cert, &args.direct_tls_key) else {
        return Ok(None);
    };
    let tls = academy_sdk::EndpointTls::from_files(cert, key)?;
    Ok(Some(match &args.direct_tls_client_ca {
        Some(ca) => tls.with_client_ca_file(ca),
        None => tls,
    }))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or("a label is key=value")?;
    Ok((k.to_owned(), v.to_owned()))
}

// As the exchange and the launcher: agents move payloads around, and the
// benchmark's figures for agents are measured with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tls = endpoint_tls(&args)?;
    let _telemetry = telemetry::init(args.log_format, "academy-worker");
    let clock = if args.simulated_clock { ClockKind::Simulated } else { ClockKind::Wall };
    let mut worker =
        Worker::new(args.launcher).name(args.name).capacity(args.capacity).clock(clock);
    for (key, value) in args.labels {
        worker = worker.label(key, value);
    }
    if let Some(address) = &args.direct {
        let endpoint = match &tls {
            Some(tls) => academy_sdk::Endpoint::serve_tls(address, tls).await?,
            None => academy_sdk::Endpoint::serve(address).await?,
        };
        tracing::info!(endpoint = endpoint.url(), "serving a peer endpoint");
        worker = worker.direct(endpoint);
    }
    let stop_serving = CancellationToken::new();
    let _stop_serving = stop_serving.clone().drop_guard();
    if let Some(addr) = args.metrics_listen {
        let (registry, ready) = follow(worker.status());
        academy_server::metrics::serve(addr, registry, ready, stop_serving).await?;
    }
    worker
        .register::<Cleaner>()
        .register::<WordStats>()
        .register::<Coordinator>()
        .register::<Crashy>()
        .register::<Sensor>()
        .register::<Controller>()
        .register::<Recorder>()
        .register::<Ledger>()
        .register::<Stall>()
        .register::<Relay>()
        .run()
        .await?;
    Ok(())
}

/// Gauges of the worker's status, and its readiness: joined to the launcher.
fn follow(mut status: watch::Receiver<WorkerStatus>) -> (Registry, watch::Receiver<bool>) {
    let mut registry = Registry::default();
    academy_server::metrics::register_process(&mut registry, "academy-worker");
    academy_sdk::metrics::register(&mut registry);
    let (agents, joined) = (Gauge::<i64>::default(), Gauge::<i64>::default());
    registry.register("academy_worker_agents", "Agents running on this worker", agents.clone());
    registry.register("academy_worker_joined", "1 while joined to the launcher", joined.clone());
    let (ready_tx, ready) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let now = *status.borrow_and_update();
            agents.set(i64::try_from(now.agents).unwrap_or(i64::MAX));
            joined.set(i64::from(now.joined));
            ready_tx.send_replace(now.joined);
            if status.changed().await.is_err() {
                return;
            }
        }
    });
    (registry, ready)
}
