//! Scenario (o): (a) and (b) with every span recorded and exported, to an
//! OTLP receiver in this process that counts and drops what it gets. It
//! installs the global tracer provider, so it runs last.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use academy_sdk::Manager;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

use crate::{Args, BackendKind, Echo, echo_latency, start_exchange, throughput};

/// Counts the spans it receives.
#[derive(Default, Clone)]
struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

pub(crate) async fn measure(args: &Args) -> anyhow::Result<Vec<String>> {
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server =
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(sink.clone()));
    tokio::spawn(server.serve_with_incoming(incoming));
    // SAFETY: set before any other thread reads the environment for these
    // (the exchange's child process inherits them; this process reads them
    // once, in `init` below).
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        std::env::set_var("OTEL_TRACES_SAMPLER", "always_on");
        std::env::set_var("RUST_LOG", "warn");
    }
    let telemetry = academy_server::telemetry::init(
        academy_server::telemetry::LogFormat::Pretty,
        "academy-bench",
    );
    anyhow::ensure!(telemetry.exporting(), "traces are not exported");
    let (exchange, _redis) = start_exchange(BackendKind::Memory, args).await?;
    let manager = Manager::connect(&format!("http://{}", exchange.addr)).await?;
    let echo = manager.launch(Echo {}).await?;
    let a = echo_latency(echo.raw(), 100, args.calls).await?;
    let b = throughput(echo.raw(), 64, args.seconds).await?;
    drop(echo);
    manager.close().await?;
    drop(exchange);
    drop(telemetry);
    Ok(vec![
        format!(
            "| (o-a) sequential echo, 100 B, traced: p50 / p99 | {:.0} µs / {:.0} µs ({:.0} calls/s) |",
            a.p50_us, a.p99_us, a.per_sec
        ),
        format!("| (o-b) 64 in flight, traced | {b:.0} actions/s |"),
        format!("| (o) spans received by the OTLP receiver | {} |", sink.0.load(Ordering::Relaxed)),
    ])
}
