//! Blobs of the in-memory backend (docs/design.md, "Blobs"): chunks as
//! received, or in a file per blob under a directory (`--blob-dir`), freed
//! when deleted, when their owner's mailbox is terminated, or when their
//! TTL passes (looked at on every put). A blob's file is unlinked as soon
//! as it is made: the open handle keeps it, so nothing is left on disk by
//! a deleted blob, a reader that still holds it, or a process that died.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use academy_proto::{EntityId, ExchangeError};
use bytes::Bytes;

use crate::backend::{BlobMeta, BlobUsage};
use crate::limits::BLOB_CHUNK_BYTES;

/// Where a blob's chunks are.
#[derive(Debug)]
enum Chunks {
    Memory(Vec<Bytes>),
    /// In an unlinked file; `written` chunks so far.
    File {
        file: Arc<std::fs::File>,
        written: u64,
    },
}

/// Where to write or read a chunk kept in a file: outside the lock.
pub(super) type FileChunk = (Arc<std::fs::File>, u64);

#[derive(Debug)]
struct Blob {
    owner: EntityId,
    size: u64,
    chunks: Chunks,
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
    /// Where blob files go (none: in memory).
    pub(super) dir: Option<PathBuf>,
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
        let chunks = match &self.dir {
            None => Chunks::Memory(Vec::new()),
            Some(dir) => {
                let path = dir.join(key);
                let file = unlinked(&path).map_err(|e| {
                    ExchangeError::Unavailable(format!(
                        "cannot keep a blob in {}: {e}",
                        path.display()
                    ))
                })?;
                Chunks::File { file: Arc::new(file), written: 0 }
            }
        };
        let blob = Blob { owner: *owner, size, chunks, sha256: None, expires };
        if let Some(old) = self.blobs.insert(key.to_owned(), blob) {
            self.kept -= old.size;
        }
        self.kept += size;
        self.by_owner.entry(*owner).or_default().insert(key.to_owned());
        self.expiry.push(Reverse((expires, key.to_owned())));
        Ok(())
    }

    /// Keeps chunk `index` of a blob in memory, or answers the file and
    /// offset to write it at (then [`written`](Self::written)).
    pub(super) fn chunk(
        &mut self,
        key: &str,
        index: u64,
        data: Bytes,
    ) -> Result<Option<FileChunk>, ExchangeError> {
        let blob = self.blobs.get_mut(key).ok_or_else(|| gone(key))?;
        let kept = match &blob.chunks {
            Chunks::Memory(chunks) => chunks.len() as u64,
            Chunks::File { written, .. } => *written,
        };
        if index != kept || blob.sha256.is_some() {
            return Err(ExchangeError::InvalidArgument(format!(
                "blob {key}: chunk {index} out of order"
            )));
        }
        match &mut blob.chunks {
            Chunks::Memory(chunks) => {
                chunks.push(data);
                Ok(None)
            }
            Chunks::File { file, .. } => Ok(Some((file.clone(), index * BLOB_CHUNK_BYTES as u64))),
        }
    }

    /// Counts a chunk written to its blob's file.
    pub(super) fn written(&mut self, key: &str) -> Result<(), ExchangeError> {
        match self.blobs.get_mut(key).map(|b| &mut b.chunks) {
            Some(Chunks::File { written, .. }) => {
                *written += 1;
                Ok(())
            }
            _ => Err(gone(key)),
        }
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

    /// Chunk `index` of a readable blob: its bytes, or where to read them
    /// and how many.
    pub(super) fn read(&self, key: &str, index: u64) -> Option<Result<Bytes, (FileChunk, usize)>> {
        let blob = self.readable(key)?;
        match &blob.chunks {
            Chunks::Memory(chunks) => chunks.get(usize::try_from(index).ok()?).cloned().map(Ok),
            Chunks::File { file, .. } => {
                let offset = index.checked_mul(BLOB_CHUNK_BYTES as u64)?;
                let len = blob.size.checked_sub(offset).filter(|n| *n > 0)?;
                let len = len.min(BLOB_CHUNK_BYTES as u64) as usize;
                Some(Err(((file.clone(), offset), len)))
            }
        }
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

/// Whether blobs can be kept under `dir`: a file made there (and unlinked)
/// as a blob's would be. Its name is fresh each time: replicas sharing the
/// directory may all be process 1 of their containers.
#[cfg(feature = "server")]
pub(crate) fn check_dir(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = format!(".academy-probe-{}", uuid::Uuid::new_v4().simple());
    unlinked(&dir.join(probe)).map(drop).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("blob directory {}: cannot keep blobs there ({e})", dir.display()),
        )
    })
}

/// A new file at `path`, unlinked at once.
fn unlinked(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|file| std::fs::remove_file(path).map(|()| file))
}

/// Writes `data` at its place, off the async threads.
pub(super) async fn write_at((file, offset): FileChunk, data: Bytes) -> Result<(), ExchangeError> {
    use std::os::unix::fs::FileExt as _;
    off_thread("write", move || file.write_all_at(&data, offset)).await
}

/// Reads `len` bytes at their place, off the async threads.
pub(super) async fn read_at((file, offset): FileChunk, len: usize) -> Result<Bytes, ExchangeError> {
    use std::os::unix::fs::FileExt as _;
    off_thread("read", move || {
        let mut data = vec![0; len];
        file.read_exact_at(&mut data, offset).map(|()| Bytes::from(data))
    })
    .await
}

/// Runs blob file I/O on the blocking threads; a failure says what it
/// could not do.
async fn off_thread<T: Send + 'static>(
    what: &str,
    io: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ExchangeError> {
    let failed = |e: &dyn std::fmt::Display| {
        ExchangeError::Unavailable(format!("cannot {what} a blob: {e}"))
    };
    match tokio::task::spawn_blocking(io).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err(failed(&e)),
        Err(e) => Err(failed(&e)),
    }
}

fn gone(key: &str) -> ExchangeError {
    ExchangeError::BlobNotFound(key.to_owned())
}
