//! What every Academy gRPC server does the same way: its runtime, its
//! listener, reflection, and the signal that stops it.

/// The runtime a server runs on: `worker_threads` threads, or one per core
/// the process may use when 0.
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        runtime.worker_threads(worker_threads);
    }
    runtime.enable_all().build()
}

/// Most HTTP/2 streams (calls) open at once on one connection: a worker
/// holds a subscription per agent on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;

/// Server reflection for a server of `services` (e.g.
/// `academy.v1.ExchangeService`): it lists them, health and reflection, and
/// describes every Academy contract and google.rpc (ErrorInfo details), so
/// grpcurl can list, describe and decode all of it. Build v1 and v1alpha
/// services from it.
pub fn reflection(services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure();
    for service in services {
        builder = builder.with_service_name(*service);
    }
    builder
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .register_encoded_file_descriptor_set(academy_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Completes on SIGINT or SIGTERM (what Kubernetes sends to stop a pod).
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A tower layer that makes the statuses tonic itself answers follow
/// Academy's rules (docs/design.md, "Errors"): a request that does not
/// decode (invalid UTF-8, nesting too deep) is `INVALID_ARGUMENT`, not
/// `INTERNAL`; a request over the size limit is `RESOURCE_EXHAUSTED` naming
/// the configured limit (`max_request_bytes`), not `OUT_OF_RANGE` naming
/// tonic's frame size; and no status message is longer than
/// [`MAX_STATUS_MESSAGE_BYTES`](academy_proto::MAX_STATUS_MESSAGE_BYTES).
#[derive(Debug, Clone, Copy)]
pub struct StatusRules {
    max_request_bytes: usize,
}

impl StatusRules {
    /// Rules for a server whose largest accepted message is `max_request_bytes`.
    pub fn new(max_request_bytes: usize) -> Self {
        Self { max_request_bytes }
    }

    /// The status to answer instead of `status`, if it breaks a rule.
    pub fn rewrite(&self, status: &tonic::Status) -> Option<tonic::Status> {
        use academy_proto::{ExchangeError, MAX_STATUS_MESSAGE_BYTES, bounded};
        if let Some(size) = too_large(status) {
            return Some(ExchangeError::TooLarge { size, limit: self.max_request_bytes }.into());
        }
        let message = status.message();
        match status.code() {
            tonic::Code::Internal if message.starts_with("failed to decode Protobuf message") => {
                let why = format!("the request does not decode: {}", bounded(message));
                Some(ExchangeError::InvalidArgument(why).into())
            }
            _ if message.len() > MAX_STATUS_MESSAGE_BYTES => {
                Some(tonic::Status::new(status.code(), bounded(message).into_owned()))
            }
            _ => None,
        }
    }
}

impl<S> tower::Layer<S> for StatusRules {
    type Service = Ruled<S>;

    fn layer(&self, inner: S) -> Ruled<S> {
        Ruled { inner, rules: *self }
    }
}

/// A service whose error statuses follow [`StatusRules`].
#[derive(Debug, Clone)]
pub struct Ruled<S> {
    inner: S,
    rules: StatusRules,
}

impl<S, B, R> tower::Service<http::Request<B>> for Ruled<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (answer, rules) = (self.inner.call(request), self.rules);
        Box::pin(async move {
            let mut response = answer.await?;
            // Errors answered at once carry their status in the headers
            // ("trailers-only"); a successful answer has none there.
            if let Some(status) = tonic::Status::from_header_map(response.headers())
                && let Some(fixed) = rules.rewrite(&status)
            {
                let headers = response.headers_mut();
                for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                    headers.remove(name);
                }
                if fixed.add_header(headers).is_err() {
                    tracing::warn!(code = ?fixed.code(), "cannot write a status header");
                }
            }
            Ok(response)
        })
    }
}

/// The size of the message `status` refused, if it is tonic's refusal of
/// a message larger than the decoder takes (0 when it does not say).
pub fn too_large(status: &tonic::Status) -> Option<usize> {
    let message = status.message();
    if status.code() != tonic::Code::OutOfRange
        || !message.contains("decoded message length too large")
    {
        return None;
    }
    let found =
        message.split("found ").nth(1).and_then(|rest| rest.split(' ').next()?.parse().ok());
    Some(found.unwrap_or(0))
}
