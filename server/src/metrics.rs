//! Prometheus metrics of Academy's servers, served as text at `GET /metrics`
//! on an address of their own (`--metrics-listen`), apart from gRPC, so it
//! stays plain HTTP and open to the scraper when gRPC needs TLS and tokens;
//! with the probes `/livez` and `/readyz` for the same reason (Kubernetes'
//! gRPC probes cannot speak TLS).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

/// Calls to a gRPC server, by method and status code, and their durations.
#[derive(Debug, Clone)]
pub struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    seconds: Family<MethodLabels, Histogram>,
}

/// Upper bounds of the call-duration buckets, in seconds: 50 µs to 60 s
/// (an `Invoke` may wait 30 s for its agent).
pub const SECONDS_BUCKETS: [f64; 19] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

impl RpcMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            calls: Family::default(),
            seconds: Family::new_with_constructor(|| Histogram::new(SECONDS_BUCKETS)),
        };
        registry.register(
            "academy_grpc_calls",
            "gRPC calls answered, by service, method and status code",
            metrics.calls.clone(),
        );
        registry.register(
            "academy_grpc_call_seconds",
            "Time to a gRPC call's answer (for streams: until the stream opens)",
            metrics.seconds.clone(),
        );
        metrics
    }

    fn observe(&self, path: &str, code: &'static str, started: Instant) {
        // Only Academy's and gRPC's own services: a stranger's paths would
        // make a new series each.
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| {
                (s.starts_with("academy.v1.") || s.starts_with("grpc.")) && !m.contains('/')
            })
            .unwrap_or(("unknown", "unknown"));
        let (service, method) = (service.to_owned(), method.to_owned());
        let seconds = started.elapsed().as_secs_f64();
        self.seconds
            .get_or_create(&MethodLabels { service: service.clone(), method: method.clone() })
            .observe(seconds);
        self.calls.get_or_create(&CallLabels { service, method, code }).inc();
    }

    /// A tower layer that counts every call of the server it wraps.
    fn layer(&self) -> CountCalls {
        CountCalls(self.clone())
    }
}

/// The name of a gRPC status code, as in `grpc-status` (`OK` when absent:
/// a call that succeeds sends its status after the answer).
fn code_name(headers: &http::HeaderMap) -> &'static str {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<i32>().ok());
    match code.map(tonic::Code::from_i32).unwrap_or(tonic::Code::Ok) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Tower layer of [`RpcMetrics::layer`].
#[derive(Debug, Clone)]
pub struct CountCalls(RpcMetrics);

impl<S> tower::Layer<S> for CountCalls {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner, metrics: self.0.clone() }
    }
}

/// A service whose calls are counted.
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: RpcMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            let code = answer.as_ref().map_or("UNAVAILABLE", |r| code_name(r.headers()));
            metrics.observe(&path, code, started);
            answer
        })
    }
}

/// Registers what every process shows: `academy_build_info{service,
/// version}` (always 1), and the process's own series as Prometheus names
/// them (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`), read from `/proc` at each scrape.
pub fn register_process(registry: &mut Registry, service: &'static str) {
    let build = Info::new(vec![("service", service), ("version", env!("CARGO_PKG_VERSION"))]);
    registry.register("academy_build", "The running build", build);
    registry.register_collector(Box::new(Process));
}

/// The process's own metrics, from `/proc/self` (nothing elsewhere).
#[derive(Debug)]
struct Process;

impl Process {
    /// CPU seconds, virtual and resident bytes, start time (seconds since
    /// the epoch), from `/proc/self/stat` and `/proc/stat`.
    fn stat() -> Option<(f64, f64, f64, f64)> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // After the command's name, which may hold spaces: field 3 onwards.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) =
            unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let (ticks, page) = (ticks as f64, page as f64);
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        Some((
            (field(14)? + field(15)?) / ticks,
            field(23)?,
            field(24)? * page,
            boot + field(22)? / ticks,
        ))
    }

    /// Open file descriptors, and how many it may open (-1: unknown).
    fn fds() -> Option<(f64, f64)> {
        let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes only into `limit`.
        let max = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
            0 => limit.rlim_cur as f64,
            _ => -1.0,
        };
        Some((open, max))
    }
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut gauges: Vec<(&str, &str, f64)> = Vec::new();
        if let Some((cpu, virtual_bytes, resident, started)) = Self::stat() {
            let cpu = ConstCounter::new(cpu);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "CPU time used, user and system, in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            gauges.extend([
                ("process_virtual_memory_bytes", "Virtual memory size in bytes", virtual_bytes),
                ("process_resident_memory_bytes", "Resident memory size in bytes", resident),
                ("process_start_time_seconds", "Start time since the epoch, in seconds", started),
            ]);
        }
        if let Some((open, max)) = Self::fds() {
            gauges.extend([
                ("process_open_fds", "Open file descriptors", open),
                ("process_max_fds", "Most file descriptors it may open", max),
            ]);
        }
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// Serves `registry` (with `calls` in it) on `listen`, if given, until
/// `shutdown`, as [`serve`] does: the address bound, and the layer that
/// counts the calls. Without `listen`, neither: calls then cost nothing more.
pub async fn serve_if(
    listen: Option<SocketAddr>,
    registry: Registry,
    calls: &RpcMetrics,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> std::io::Result<(Option<SocketAddr>, Option<CountCalls>)> {
    match listen {
        Some(addr) => {
            Ok((Some(serve(addr, registry, ready, shutdown).await?), Some(calls.layer())))
        }
        None => Ok((None, None)),
    }
}

/// Serves, on `addr` until `shutdown`, plain HTTP for probes and scrapers:
/// `GET /metrics`, `registry` as OpenMetrics text; `GET /livez`, 200 while
/// the process answers; `GET /readyz`, 200 while `ready` says true and 503
/// otherwise. The address bound.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot serve metrics on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => Ok((
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )),
                    Err(_) => Err(http::StatusCode::INTERNAL_SERVER_ERROR),
                }
            }),
        )
        .route("/livez", axum::routing::get(|| async { "live\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || async move {
                if *ready.borrow() {
                    (http::StatusCode::OK, "ready\n")
                } else {
                    (http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        );
    tokio::spawn(async move {
        let stop = shutdown.cancelled_owned();
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    tracing::info!(addr = %bound, "metrics at /metrics, probes at /livez and /readyz");
    Ok(bound)
}
