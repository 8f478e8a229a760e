//! Blobs kept in memory (docs/design.md, "Blobs"): chunks as received,
//! freed when deleted, when their owner's mailbox is terminated, or when
//! their TTL passes (looked at on every put).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use academy_proto::{EntityId, ExchangeError};
use bytes::Bytes;

use crate::backend::{BlobMeta, BlobUsage};

#[derive(Debug)]
struct Blob {
    owner: EntityId,
    size: u64,
    chunks: Vec<Bytes>,
    /// Set once every chunk is kept: then it is readable.
    sha256: Option<[u8; 32]>,
    expires: Instant,
}

#[derive(Debug, Default)]
pub(super) struct Blobs {
    blobs: HashMap<String, Blob>,
    by_owner: HashMap<EntityId, HashSet<String>>,
    /// When each blob expires, soonest first (a blob freed before stays
    /// here until then, and is skipped).
    expiry: BinaryHeap<Reverse<(Instant, String)>>,
    /// Bytes promised to the blobs kept: each counts its whole size from
    /// its first chunk on.
    kept: u64,
}

impl Blobs {
    pub(super) fn begin(
        &mut self,
        key: &str,
        owner: &EntityId,
        size: u64,
        ttl: Duration,
        capacity: u64,
    ) -> Result<(), ExchangeError> {
        let now = Instant::now();
        self.expire(now);
        if self.kept.saturating_add(size) > capacity {
            return Err(ExchangeError::BlobStoreFull { limit: capacity });
        }
        let expires = now + ttl;
        let blob = Blob { owner: *owner, size, chunks: Vec::new(), sha256: None, expires };
        if let Some(old) = self.blobs.insert(key.to_owned(), blob) {
            self.kept -= old.size;
        }
        self.kept += size;
        self.by_owner.entry(*owner).or_default().insert(key.to_owned());
        self.expiry.push(Reverse((expires, key.to_owned())));
        Ok(())
    }

    pub(super) fn chunk(
        &mut self,
        key: &str,
        index: u64,
        data: Bytes,
    ) -> Result<(), ExchangeError> {
        let blob = self.blobs.get_mut(key).ok_or_else(|| gone(key))?;
        if index != blob.chunks.len() as u64 || blob.sha256.is_some() {
            return Err(ExchangeError::InvalidArgument(format!(
                "blob {key}: chunk {index} out of order"
            )));
        }
        blob.chunks.push(data);
        Ok(())
    }

    pub(super) fn finish(&mut self, key: &str, sha256: [u8; 32]) -> Result<(), ExchangeError> {
        let blob = self.blobs.get_mut(key).ok_or_else(|| gone(key))?;
        blob.sha256 = Some(sha256);
        Ok(())
    }

    fn readable(&self, key: &str) -> Option<&Blob> {
        self.blobs.get(key).filter(|b| b.sha256.is_some() && b.expires > Instant::now())
    }

    pub(super) fn meta(&self, key: &str) -> Option<BlobMeta> {
        let blob = self.readable(key)?;
        Some(BlobMeta { size: blob.size, sha256: blob.sha256?.to_vec() })
    }

    pub(super) fn read(&self, key: &str, index: u64) -> Option<Bytes> {
        let blob = self.readable(key)?;
        blob.chunks.get(usize::try_from(index).ok()?).cloned()
    }

    pub(super) fn delete(&mut self, key: &str) -> bool {
        let Some(blob) = self.blobs.remove(key) else { return false };
        self.kept -= blob.size;
        if let Some(keys) = self.by_owner.get_mut(&blob.owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_owner.remove(&blob.owner);
            }
        }
        true
    }

    pub(super) fn delete_owned(&mut self, owner: &EntityId) {
        for key in self.by_owner.remove(owner).unwrap_or_default() {
            if let Some(blob) = self.blobs.remove(&key) {
                self.kept -= blob.size;
            }
        }
    }

    pub(super) fn usage(&mut self) -> BlobUsage {
        self.expire(Instant::now());
        BlobUsage { blobs: self.blobs.len() as u64, bytes: self.kept }
    }

    /// Frees the blobs whose TTL passed.
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((when, _))) = self.expiry.peek() {
            if *when > now {
                break;
            }
            let Some(Reverse((when, key))) = self.expiry.pop() else { break };
            // Only if it is the blob that expiry was for, not a later one
            // under the same key.
            if self.blobs.get(&key).is_some_and(|b| b.expires == when) {
                self.delete(&key);
            }
        }
    }
}

fn gone(key: &str) -> ExchangeError {
    ExchangeError::BlobNotFound(key.to_owned())
}
