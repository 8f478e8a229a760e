//! Blobs in Redis (docs/design.md, "Blobs"; keys in [`keys`](super::keys)):
//! a hash per blob, its chunks as strings, and a set of blobs per owner,
//! all expiring when the blob does. Redis's `maxmemory` bounds what they
//! take.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use academy_proto::{EntityId, ExchangeError};
use bytes::Bytes;
use redis::Value;

use super::RedisBackend;
use super::reply::{bytes, integer, unavailable};
use super::scripts::run_one;
use crate::backend::{BlobMeta, BlobUsage};
use crate::limits::BLOB_CHUNK_BYTES;

/// Blobs freed per pipeline when a mailbox's are.
const DELETE_SLICE: usize = 100;

impl RedisBackend {
    pub(super) async fn begin_blob(
        &self,
        key: &str,
        owner: &EntityId,
        size: u64,
        ttl: Duration,
    ) -> Result<(), ExchangeError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let expires = u64::try_from((now + ttl).as_millis()).unwrap_or(u64::MAX);
        let (blob, owned) = (self.keys.blob(key), self.keys.blobs_of(owner));
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(&blob)
            .arg("o")
            .arg(owner.to_string())
            .arg("z")
            .arg(size)
            .arg("x")
            .arg(expires)
            .ignore();
        pipe.cmd("PEXPIREAT").arg(&blob).arg(expires).ignore();
        pipe.cmd("SADD").arg(&owned).arg(key).ignore();
        // A new set takes the blob's expiry; a set kept for longer keeps it.
        pipe.cmd("PEXPIREAT").arg(&owned).arg(expires).arg("NX").ignore();
        pipe.cmd("PEXPIREAT").arg(&owned).arg(expires).arg("GT").ignore();
        let () = pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn put_blob_chunk(
        &self,
        key: &str,
        index: u64,
        data: Bytes,
    ) -> Result<(), ExchangeError> {
        let mut call =
            self.scripts.blob_chunk.call(&[self.keys.blob(key), self.keys.blob_chunk(key, index)]);
        call.arg(data.as_ref());
        match integer(&run_one(&self.conn, &self.scripts.blob_chunk, call).await?) {
            Some(1) => Ok(()),
            _ => Err(ExchangeError::BlobNotFound(key.to_owned())),
        }
    }

    pub(super) async fn finish_blob(
        &self,
        key: &str,
        sha256: [u8; 32],
    ) -> Result<(), ExchangeError> {
        let mut call = self.scripts.blob_finish.call(&[self.keys.blob(key)]);
        call.arg(&sha256[..]);
        match integer(&run_one(&self.conn, &self.scripts.blob_finish, call).await?) {
            Some(1) => Ok(()),
            _ => Err(ExchangeError::BlobNotFound(key.to_owned())),
        }
    }

    pub(super) async fn meta_of_blob(&self, key: &str) -> Result<Option<BlobMeta>, ExchangeError> {
        let (size, sha256): (Option<u64>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(self.keys.blob(key))
            .arg("z")
            .arg("h")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(size.zip(sha256).map(|(size, sha256)| BlobMeta { size, sha256 }))
    }

    pub(super) async fn read_blob(
        &self,
        key: &str,
        index: u64,
    ) -> Result<Option<Bytes>, ExchangeError> {
        let value: Value = redis::cmd("GET")
            .arg(self.keys.blob_chunk(key, index))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(bytes(value))
    }

    /// Frees blobs `keys`; how many were there.
    async fn delete_blobs(&self, keys: &[String]) -> Result<usize, ExchangeError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HMGET").arg(self.keys.blob(key)).arg("o").arg("z");
        }
        let found: Vec<(Option<String>, Option<u64>)> =
            pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut pipe = redis::pipe();
        let mut deleted = 0;
        for (key, (owner, size)) in keys.iter().zip(found) {
            let Some(size) = size else { continue };
            deleted += 1;
            let chunks = size.div_ceil(BLOB_CHUNK_BYTES as u64);
            let mut del = redis::cmd("DEL");
            del.arg(self.keys.blob(key));
            for index in 0..chunks {
                del.arg(self.keys.blob_chunk(key, index));
            }
            pipe.add_command(del).ignore();
            if let Some(owner) = owner.and_then(|o| o.parse::<EntityId>().ok()) {
                pipe.cmd("SREM").arg(self.keys.blobs_of(&owner)).arg(key).ignore();
            }
        }
        if deleted > 0 {
            let () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        }
        Ok(deleted)
    }

    /// Counts the blob hashes and sums the chunks' lengths, by `SCAN`.
    pub(super) async fn usage_of_blobs(&self) -> Result<BlobUsage, ExchangeError> {
        let mut usage = BlobUsage::default();
        let (blobs, chunks) = (self.keys.blob("*"), self.keys.blob_chunk("*", "*"));
        let mut cursor = 0;
        loop {
            let (next, keys) = self.scan_page(&blobs, cursor).await?;
            usage.blobs += keys.len() as u64;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        loop {
            let (next, keys) = self.scan_page(&chunks, cursor).await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("STRLEN").arg(key);
                }
                let lengths: Vec<u64> =
                    pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
                usage.bytes += lengths.iter().sum::<u64>();
            }
            cursor = next;
            if cursor == 0 {
                return Ok(usage);
            }
        }
    }

    pub(super) async fn delete_blob(&self, key: &str) -> Result<bool, ExchangeError> {
        Ok(self.delete_blobs(&[key.to_owned()]).await? > 0)
    }

    pub(super) async fn delete_blobs_of(&self, owner: &EntityId) -> Result<(), ExchangeError> {
        let owned = self.keys.blobs_of(owner);
        let keys: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&owned)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        for slice in keys.chunks(DELETE_SLICE) {
            self.delete_blobs(slice).await?;
        }
        let () = redis::cmd("DEL")
            .arg(&owned)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
