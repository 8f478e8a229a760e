//! Payloads by reference (docs/design.md, "Blobs"). Arguments and results
//! at least as large as a mailbox's threshold are put in the exchange's
//! blob store and travel as a [`pb::BlobRef`]; their receiver reads them
//! back before decoding, so actions and handles see plain values.
//!
//! Who frees what: a caller frees its arguments' blob once the call is
//! over (answered, timed out or dropped) and a result's blob once it has
//! read it; an agent frees nothing. Blobs also go when their owner's
//! mailbox is terminated, and at the exchange's blob TTL.

use std::sync::{Arc, Mutex};

use academy_proto::pb;
use academy_proto::sync::lock;
use academy_proto::transport::BLOB_CHUNK_BYTES;
use academy_proto::{EntityId, ExchangeError};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use crate::ClientError;
use crate::exchange::{BlobChunks, SharedExchange};

/// Payloads of this many bytes or more go by reference unless a manager
/// or agent says otherwise: larger than what most calls carry, and below
/// what an exchange takes in one message by default (4 MiB).
pub const DEFAULT_BLOB_THRESHOLD: usize = 2 * 1024 * 1024;

/// `data` in chunks the exchange takes, without copying it.
pub(crate) fn chunks_of(data: Bytes) -> BlobChunks {
    let n = data.len().div_ceil(BLOB_CHUNK_BYTES);
    futures::stream::iter((0..n).map(move |i| {
        Ok(data.slice(i * BLOB_CHUNK_BYTES..((i + 1) * BLOB_CHUNK_BYTES).min(data.len())))
    }))
    .boxed()
}

/// `payload`, kept as a blob of `owner` if its data has `threshold` bytes
/// or more.
pub(crate) async fn offload(
    exchange: &SharedExchange,
    owner: &EntityId,
    payload: pb::Payload,
    threshold: usize,
) -> Result<pb::Payload, ClientError> {
    if payload.data.len() < threshold || payload.blob.is_some() {
        return Ok(payload);
    }
    let size = payload.data.len() as u64;
    let blob = exchange.put_blob(owner, size, chunks_of(payload.data)).await?;
    Ok(pb::Payload { content_type: payload.content_type, data: Bytes::new(), blob: Some(blob) })
}

/// `payload` with its blob's bytes read into `data`, checked against the
/// reference's size and digest; a payload without one as it is.
pub(crate) async fn resolve(
    exchange: &SharedExchange,
    payload: Option<pb::Payload>,
) -> Result<Option<pb::Payload>, ClientError> {
    let Some(mut payload) = payload else { return Ok(None) };
    let Some(blob) = payload.blob.take() else { return Ok(Some(payload)) };
    payload.data = read(exchange, &blob).await?;
    Ok(Some(payload))
}

/// The bytes of `blob`, checked.
async fn read(exchange: &SharedExchange, blob: &pb::BlobRef) -> Result<Bytes, ClientError> {
    if blob.store != academy_proto::transport::EXCHANGE_BLOB_STORE {
        return Err(ClientError::Exchange(ExchangeError::InvalidArgument(format!(
            "blob store {} is not one this SDK reads",
            academy_proto::excerpt(&blob.store)
        ))));
    }
    let mut read = exchange.get_blob(&blob.key, 0).await?;
    let size = usize::try_from(read.size).unwrap_or(usize::MAX);
    if read.size != blob.size || read.sha256 != blob.sha256 {
        return Err(corrupt(blob, "is not the blob its reference describes"));
    }
    let mut data = BytesMut::with_capacity(size);
    let mut hasher = Sha256::new();
    while let Some(chunk) = read.chunks.next().await {
        let chunk = chunk?;
        if data.len() + chunk.len() > size {
            return Err(corrupt(blob, "has more bytes than its size"));
        }
        hasher.update(&chunk);
        data.extend_from_slice(&chunk);
    }
    if data.len() != size || hasher.finalize().as_slice() != blob.sha256.as_slice() {
        return Err(corrupt(blob, "does not match its size and SHA-256"));
    }
    Ok(data.freeze())
}

fn corrupt(blob: &pb::BlobRef, what: &str) -> ClientError {
    ClientError::Transport(format!("blob {} {what}", blob.key))
}

/// Frees the blob `payload` refers to, if any, in the background.
pub(crate) fn free(exchange: &SharedExchange, payload: Option<&pb::Payload>) {
    if let Some(blob) = payload.and_then(|p| p.blob.as_ref()) {
        let (exchange, key) = (exchange.clone(), blob.key.clone());
        tokio::spawn(async move {
            if let Err(e) = exchange.delete_blob(&key).await {
                tracing::debug!(key, error = %e, "cannot free a blob; it expires");
            }
        });
    }
}

/// Frees a call's arguments' blob when dropped: however the call ends.
pub(crate) struct Freed {
    exchange: SharedExchange,
    payload: Option<pb::Payload>,
}

impl Freed {
    /// Frees `payload`'s blob, if it has one, when dropped.
    pub(crate) fn of(exchange: &SharedExchange, payload: &pb::Payload) -> Option<Self> {
        let blob = payload.blob.clone()?;
        let payload = Some(pb::Payload { blob: Some(blob), ..Default::default() });
        Some(Self { exchange: exchange.clone(), payload })
    }
}

impl Drop for Freed {
    fn drop(&mut self) {
        free(&self.exchange, self.payload.as_ref());
    }
}

/// The first error of a blob's source, kept aside: a put that stopped
/// short because its source failed answers that error, not the exchange's.
#[derive(Debug, Default, Clone)]
pub(crate) struct Failure(Arc<Mutex<Option<ClientError>>>);

impl Failure {
    /// `chunks`, keeping their first error here.
    pub(crate) fn watch(&self, chunks: BlobChunks) -> BlobChunks {
        let slot = self.0.clone();
        chunks
            .inspect(move |c| {
                if let Err(e) = c {
                    lock(&slot).get_or_insert_with(|| e.clone());
                }
            })
            .boxed()
    }

    /// The source's error if it failed, else `result`.
    pub(crate) fn first<T>(&self, result: Result<T, ClientError>) -> Result<T, ClientError> {
        match lock(&self.0).take() {
            Some(err) => Err(err),
            None => result,
        }
    }
}
