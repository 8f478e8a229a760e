//! The exchange's blobs over gRPC (`academy.v1.BlobService`,
//! docs/design.md, "Blobs").

use std::pin::Pin;

use academy_proto::pb::{self, blob_service_server};
use academy_proto::{EntityId, ExchangeError, duration};
use academy_server::auth::{Grant, until_revoked};
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::ExchangeMetrics;
use crate::{BlobPut, Exchange, limits};

type RpcResult<T> = Result<Response<T>, Status>;

/// Serves one exchange's blobs.
#[derive(Debug, Clone)]
pub struct BlobGrpc {
    exchange: Exchange,
    metrics: ExchangeMetrics,
}

impl BlobGrpc {
    /// Serves the blobs of `exchange`.
    pub fn new(exchange: Exchange) -> Self {
        Self { exchange, metrics: ExchangeMetrics::default() }
    }

    /// Counts the bytes put and read in `metrics` (registered by the server).
    pub(crate) fn with_metrics(self, metrics: ExchangeMetrics) -> Self {
        Self { metrics, ..self }
    }
}

#[tonic::async_trait]
impl blob_service_server::BlobService for BlobGrpc {
    async fn put_blob(
        &self,
        request: Request<Streaming<pb::PutBlobRequest>>,
    ) -> RpcResult<pb::PutBlobResponse> {
        let exchange = self.exchange.for_request(&request).into_owned();
        let grant = Grant::of(&request);
        let mut frames = request.into_inner();
        let first = frames
            .message()
            .await
            .map_err(broke_off)?
            .ok_or_else(|| ExchangeError::InvalidArgument("PutBlob sent no request".into()))?;
        let owner = EntityId::parse_field(&first.owner, "owner")?;
        let ttl = first.ttl.map(|t| duration::from_proto(t, "ttl")).transpose()?;
        let put = BlobPut { owner, size: first.size, ttl };
        let shutdown = exchange.shutdown_signal();
        // The first request's chunk, then the others', until the caller is
        // done; an exchange that stops, or a token revoked, ends the put
        // (nothing is kept).
        let frames = Box::pin(until_revoked(frames, grant));
        let start = (Some(first.data), frames, shutdown, false);
        let chunks =
            futures::stream::unfold(start, |(first, mut frames, shutdown, failed)| async move {
                if failed {
                    return None;
                }
                if let Some(data) = first {
                    return Some((Ok(data), (None, frames, shutdown, false)));
                }
                let next = tokio::select! {
                    () = shutdown.cancelled() => Err(ExchangeError::ShuttingDown),
                    frame = frames.next() => frame?.map(|f| f.data).map_err(broke_off),
                };
                let failed = next.is_err();
                Some((next, (None, frames, shutdown, failed)))
            });
        let (blob, expires_in) = exchange.put_blob(put, chunks).await?;
        self.metrics.blob_bytes_put.inc_by(blob.size);
        Ok(Response::new(pb::PutBlobResponse {
            blob: Some(blob),
            expires_in: Some(duration::to_proto(expires_in)),
        }))
    }

    type GetBlobStream = Pin<Box<dyn Stream<Item = Result<pb::GetBlobResponse, Status>> + Send>>;

    async fn get_blob(
        &self,
        request: Request<pb::GetBlobRequest>,
    ) -> RpcResult<Self::GetBlobStream> {
        let grant = Grant::of(&request);
        let req = request.into_inner();
        let (meta, chunks) = self.exchange.get_blob(&req.key, req.offset).await?;
        // What the blob is, then its bytes.
        let head =
            pb::GetBlobResponse { size: meta.size, sha256: meta.sha256, ..Default::default() };
        let read = self.metrics.blob_bytes_read.clone();
        let frames = futures::stream::iter([Ok(head)]).chain(chunks.map(move |chunk| {
            let data = chunk?;
            read.inc_by(data.len() as u64);
            Ok(pb::GetBlobResponse { data, ..Default::default() })
        }));
        let shutdown = self.exchange.shutdown_signal();
        let frames = frames.take_until(shutdown.cancelled_owned());
        Ok(Response::new(Box::pin(until_revoked(frames, grant))))
    }

    async fn delete_blob(
        &self,
        request: Request<pb::DeleteBlobRequest>,
    ) -> RpcResult<pb::DeleteBlobResponse> {
        let deleted = self.exchange.delete_blob(&request.into_inner().key).await?;
        Ok(Response::new(pb::DeleteBlobResponse { deleted }))
    }
}

/// Why a put's requests stopped coming: a revoked token, a request larger
/// than a chunk may be (naming that limit), or the caller's stream broke.
fn broke_off(status: Status) -> ExchangeError {
    if let Some(found) = academy_server::grpc::too_large(&status) {
        let limit = "bytes per blob chunk".to_owned();
        return ExchangeError::LimitExceeded { limit, max: limits::BLOB_CHUNK_BYTES, found };
    }
    let message = status.message();
    match status.code() {
        tonic::Code::Unauthenticated => ExchangeError::Unauthenticated(message.to_owned()),
        _ => ExchangeError::InvalidArgument(format!(
            "the put broke off: {}",
            academy_proto::excerpt(message)
        )),
    }
}
