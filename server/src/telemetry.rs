//! Logs and traces, set up alike by every binary.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or
//! JSON; colours only when stderr is a terminal, never into files or log
//! collectors. Traces go by OTLP over gRPC when an endpoint is set
//! (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`),
//! unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`; then
//! the exporter reads the other standard variables (headers, timeout), the
//! sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (by default:
//! follow the caller's decision, sample what starts here), and the resource
//! `OTEL_SERVICE_NAME` (by default, the binary's name) and
//! `OTEL_RESOURCE_ATTRIBUTES`. An `https://` endpoint is reached over TLS,
//! trusting the CA in `OTEL_EXPORTER_OTLP_CERTIFICATE` (a PEM file; else the
//! public web roots) and, for mutual TLS, showing the certificate and key in
//! `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY`
//! (each also as `OTEL_EXPORTER_OTLP_TRACES_*`, which wins). Without an
//! endpoint, tracing costs nothing: no span is made (a caller's trace
//! context is still passed on).

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// What [`init`] set up; dropping it sends the spans not yet exported
/// (for up to 5 s) and stops the exporter.
#[must_use = "dropping it stops exporting traces"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            academy_proto::trace::set_recording(false);
            if let Err(e) = provider.shutdown() {
                eprintln!("traces not all exported at exit: {e}");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Logs to stderr in `format`; exports traces if the environment says where,
/// as `service` unless `OTEL_SERVICE_NAME` names it otherwise. An exporter
/// that cannot be built is reported and left out: the process runs on.
pub fn init(format: LogFormat, service: &'static str) -> Telemetry {
    init_logs(format);
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    let Some(endpoint) = endpoint.filter(|_| !disabled) else {
        return Telemetry { provider: None, runtime: None };
    };
    match exporter(endpoint.starts_with("https://")) {
        Ok((exporter, runtime)) => {
            let resource = if env("OTEL_SERVICE_NAME").is_some() {
                Resource::builder().build()
            } else {
                Resource::builder().with_service_name(service).build()
            };
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            academy_proto::trace::set_recording(true);
            tracing::info!(%endpoint, "exporting traces by OTLP");
            Telemetry { provider: Some(provider), runtime: Some(runtime) }
        }
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "cannot export traces; running without");
            Telemetry { provider: None, runtime: None }
        }
    }
}

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The OTLP exporter (over TLS if `tls`) on a Tokio runtime of its own:
/// the batch processor exports from a thread of its own, where tonic would
/// find no reactor.
fn exporter(tls: bool) -> anyhow::Result<(OnRuntime, tokio::runtime::Runtime)> {
    use opentelemetry_otlp::WithTonicConfig as _;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    let exporter = {
        let _inside = runtime.enter();
        let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        let builder = if tls { builder.with_tls_config(collector_tls()?) } else { builder };
        builder.build()?
    };
    let handle = runtime.handle().clone();
    Ok((OnRuntime { inner: Arc::new(exporter), handle }, runtime))
}

/// Environment variable `key`, unless unset or blank.
fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// TLS to the collector, as the OTLP variables say (see the module's
/// documentation).
fn collector_tls() -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let file = |what: &str| -> anyhow::Result<Option<Vec<u8>>> {
        let named =
            [format!("OTEL_EXPORTER_OTLP_TRACES_{what}"), format!("OTEL_EXPORTER_OTLP_{what}")];
        let Some((var, path)) = named.into_iter().find_map(|var| env(&var).map(|path| (var, path)))
        else {
            return Ok(None);
        };
        let read =
            std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {var} ({path}): {e}"))?;
        Ok(Some(read))
    };
    let tls = match file("CERTIFICATE")? {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
        None => ClientTlsConfig::new().with_webpki_roots(),
    };
    Ok(match (file("CLIENT_CERTIFICATE")?, file("CLIENT_KEY")?) {
        (Some(cert), Some(key)) => tls.identity(Identity::from_pem(cert, key)),
        (None, None) => tls,
        _ => anyhow::bail!("an OTLP client certificate and its key go together"),
    })
}

/// A span exporter whose exports run on `handle`'s runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    handle: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let export = self.handle.spawn(async move { inner.export(batch).await });
        async move {
            export.await.unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))
            })
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}
