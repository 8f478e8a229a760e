//! Blobs (docs/design.md, "Blobs"): payloads the exchange keeps for a
//! mailbox's owner and gives to whoever holds their key, in chunks, so that
//! no request or answer holds more than one.

use std::time::Duration;

use academy_proto::transport::FILE_BLOB_STORE;
use academy_proto::{EntityId, ExchangeError, pb};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};

use super::Exchange;
use crate::backend::{BlobMeta, BlobUsage};
use crate::limits::{self, BLOB_CHUNK_BYTES, MAX_BLOB_KEY_BYTES};

/// The store a [`pb::BlobRef`] names for the exchange's own blobs.
pub use academy_proto::transport::EXCHANGE_BLOB_STORE as EXCHANGE_STORE;

/// What a blob put is.
#[derive(Debug, Clone, Copy)]
pub struct BlobPut {
    /// The mailbox it belongs to.
    pub owner: EntityId,
    /// Its length in bytes.
    pub size: u64,
    /// How long to keep it at most (`None`, or more than the exchange's
    /// TTL: that TTL).
    pub ttl: Option<Duration>,
}

impl Exchange {
    /// Keeps the bytes `chunks` yield (each at most
    /// [`BLOB_CHUNK_BYTES`]) as a blob of mailbox `put.owner`, which
    /// this view must be allowed to send from; answers its reference and
    /// how long it is kept. A put that fails keeps nothing.
    pub async fn put_blob<S>(
        &self,
        put: BlobPut,
        chunks: S,
    ) -> Result<(pb::BlobRef, Duration), ExchangeError>
    where
        S: Stream<Item = Result<Bytes, ExchangeError>> + Send,
    {
        let BlobPut { owner, size, ttl } = put;
        let max = self.limits.max_blob_bytes;
        if size > max {
            let (max, found) = (max as usize, size as usize);
            return Err(ExchangeError::LimitExceeded {
                limit: "blob size in bytes".into(),
                max,
                found,
            });
        }
        self.may_send_from(&owner).await?;
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .map_or(self.limits.blob_ttl, |t| t.min(self.limits.blob_ttl));
        let key = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        self.backend.blob_begin(&key, &owner, size, ttl, self.limits.max_blob_store_bytes).await?;
        match self.fill_blob(&key, size, chunks).await {
            Ok(sha256) => {
                let blob = pb::BlobRef {
                    store: EXCHANGE_STORE.into(),
                    key,
                    size,
                    sha256: sha256.to_vec(),
                    endpoint: String::new(),
                };
                Ok((blob, ttl))
            }
            Err(err) => {
                let _ = self.backend.blob_delete(&key).await;
                Err(err)
            }
        }
    }

    /// Keeps `chunks` as blob `key`'s, in chunks of [`BLOB_CHUNK_BYTES`];
    /// answers their digest once they add up to `size`.
    async fn fill_blob<S>(&self, key: &str, size: u64, chunks: S) -> Result<[u8; 32], ExchangeError>
    where
        S: Stream<Item = Result<Bytes, ExchangeError>> + Send,
    {
        let mut chunks = std::pin::pin!(chunks);
        let (mut hasher, mut buffer, mut index, mut total) =
            (Sha256::new(), BytesMut::new(), 0, 0u64);
        let mismatch = |total: u64| {
            ExchangeError::InvalidArgument(format!(
                "the blob's chunks add up to {total} bytes or more, not its size {size}"
            ))
        };
        while let Some(data) = chunks.next().await {
            let data = data?;
            limits::at_most("bytes per blob chunk", data.len(), BLOB_CHUNK_BYTES)?;
            total += data.len() as u64;
            if total > size {
                return Err(mismatch(total));
            }
            hasher.update(&data);
            if buffer.is_empty() && data.len() == BLOB_CHUNK_BYTES {
                self.backend.blob_chunk(key, index, data).await?;
                index += 1;
                continue;
            }
            buffer.extend_from_slice(&data);
            if buffer.len() >= BLOB_CHUNK_BYTES {
                let full = buffer.split_to(BLOB_CHUNK_BYTES).freeze();
                self.backend.blob_chunk(key, index, full).await?;
                index += 1;
            }
        }
        if total != size {
            return Err(mismatch(total));
        }
        if !buffer.is_empty() {
            self.backend.blob_chunk(key, index, buffer.freeze()).await?;
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        self.backend.blob_finish(key, sha256).await?;
        Ok(sha256)
    }

    /// Blob `key`'s size and digest, and its bytes from `offset` on, chunk
    /// by chunk; the stream fails with [`ExchangeError::BlobNotFound`] if
    /// the blob is freed meanwhile.
    pub async fn get_blob(
        &self,
        key: &str,
        offset: u64,
    ) -> Result<
        (BlobMeta, impl Stream<Item = Result<Bytes, ExchangeError>> + Send + 'static),
        ExchangeError,
    > {
        let key = blob_key(key)?;
        let meta = self
            .backend
            .blob_meta(&key)
            .await?
            .ok_or_else(|| ExchangeError::BlobNotFound(key.clone()))?;
        if offset > meta.size {
            return Err(ExchangeError::InvalidArgument(format!(
                "offset {offset} is past the end of blob {key} ({} bytes)",
                meta.size
            )));
        }
        let chunk = BLOB_CHUNK_BYTES as u64;
        let (first, skip) = (offset / chunk, (offset % chunk) as usize);
        let last = meta.size.div_ceil(chunk);
        let backend = self.backend.clone();
        let chunks = futures::stream::iter(first..last).then(move |index| {
            let (backend, key) = (backend.clone(), key.clone());
            async move {
                let data = backend
                    .blob_read(&key, index)
                    .await?
                    .ok_or(ExchangeError::BlobNotFound(key))?;
                Ok(if index == first { data.slice(skip.min(data.len())..) } else { data })
            }
        });
        Ok((meta, chunks))
    }

    /// What the blob store holds now (over Redis, a scan of its keys: for
    /// tests and inspection).
    pub async fn blob_usage(&self) -> Result<BlobUsage, ExchangeError> {
        self.backend.blob_usage().await
    }

    /// Frees blob `key` now; whether it was still kept.
    pub async fn delete_blob(&self, key: &str) -> Result<bool, ExchangeError> {
        self.backend.blob_delete(&blob_key(key)?).await
    }
}

/// `key` if it can be a blob key (the exchange makes 64 hex digits).
fn blob_key(key: &str) -> Result<String, ExchangeError> {
    limits::at_most("the length of a blob key in bytes", key.len(), MAX_BLOB_KEY_BYTES)?;
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(ExchangeError::InvalidArgument(format!(
            "blob key {} is not a key this exchange made",
            academy_proto::excerpt(key)
        )));
    }
    Ok(key.to_owned())
}

/// Refuses a payload's blob reference that cannot be one (an unknown store,
/// a key too long); the blob itself is looked for by its reader.
pub(crate) fn check_reference(
    payload: Option<&pb::Payload>,
    field: &str,
) -> Result<(), ExchangeError> {
    let Some(blob) = payload.and_then(|p| p.blob.as_ref()) else { return Ok(()) };
    if blob.store != EXCHANGE_STORE && blob.store != FILE_BLOB_STORE {
        return Err(ExchangeError::InvalidArgument(format!(
            "{field}.blob.store {} is not a store this exchange knows (\"{EXCHANGE_STORE}\", \"{FILE_BLOB_STORE}\")",
            academy_proto::excerpt(&blob.store)
        )));
    }
    blob_key(&blob.key).map(|_| ())
}
