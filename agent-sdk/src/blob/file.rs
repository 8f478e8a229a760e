//! The file store: blobs as files in a directory that a sender and its
//! receivers share (processes on one node, a pod's volume). A reference
//! names the file by its key only; a receiver reads it in its own
//! directory, so no reference can make it read anything else. The writer
//! computes the digest, the reader checks it.
//!
//! Files are made readable and writable by their owner only. Whoever
//! writes there removes files older than [`FILE_TTL`] now and then, so a
//! process that died leaves nothing behind for long.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use academy_proto::{ExchangeError, pb};
use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::{FILE_STORE, corrupt};
use crate::ClientError;

/// How long a file blob is kept at most.
pub const FILE_TTL: Duration = Duration::from_secs(3600);

/// How often a writer looks for files older than [`FILE_TTL`].
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// When this process last looked (seconds since the epoch).
static SWEPT: AtomicU64 = AtomicU64::new(0);

/// The file of blob `key` in `dir`; a key that is not 64 hex digits names
/// none.
fn path(dir: &Path, key: &str) -> Result<PathBuf, ClientError> {
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ClientError::Exchange(ExchangeError::InvalidArgument(format!(
            "blob key {} is not a file store key",
            academy_proto::excerpt(key)
        ))));
    }
    Ok(dir.join(key))
}

fn failed(what: &str, path: &Path, err: &std::io::Error) -> ClientError {
    ClientError::Transport(format!("cannot {what} blob file {}: {err}", path.display()))
}

/// Runs `work` off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ClientError::Transport(format!("a blob file task failed: {e}")))?
}

/// Writes `data` as a new blob file in `dir`; its reference.
pub(super) async fn put(dir: Arc<Path>, data: Bytes) -> Result<pb::BlobRef, ClientError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    sweep_now_and_then(dir.clone());
    blocking(move || {
        let key = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let path = path(&dir, &key)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                // A directory that is not there, or not ours: asking again
                // will not help.
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    ClientError::Refused {
                        code: tonic::Code::FailedPrecondition,
                        message: format!("cannot create blob file {}: {e}", path.display()),
                    }
                }
                _ => failed("create", &path, &e),
            })?;
        file.write_all(&data).map_err(|e| failed("write", &path, &e))?;
        let sha256 = Sha256::digest(&data).to_vec();
        Ok(pb::BlobRef {
            store: FILE_STORE.into(),
            key,
            size: data.len() as u64,
            sha256,
            endpoint: String::new(),
        })
    })
    .await
}

/// The bytes of file blob `blob`, from `dir`, checked.
pub(super) async fn read(dir: Option<Arc<Path>>, blob: &pb::BlobRef) -> Result<Bytes, ClientError> {
    let Some(dir) = dir else {
        return Err(ClientError::Exchange(ExchangeError::InvalidArgument(format!(
            "blob {} is in a file store, and this process has none: give it the sender's blob directory (with_blob_dir, AgentConfig::blob_dir)",
            blob.key
        ))));
    };
    let path = path(&dir, &blob.key)?;
    let blob = blob.clone();
    blocking(move || {
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::Exchange(ExchangeError::BlobNotFound(blob.key)));
            }
            Err(e) => return Err(failed("read", &path, &e)),
        };
        if data.len() as u64 != blob.size || Sha256::digest(&data).as_slice() != blob.sha256 {
            return Err(corrupt(&blob, "does not match its size and SHA-256"));
        }
        Ok(Bytes::from(data))
    })
    .await
}

/// Removes blob file `key` from `dir`, in the background.
pub(super) fn remove(dir: Arc<Path>, key: String) {
    tokio::task::spawn_blocking(move || {
        if let Ok(path) = path(&dir, &key)
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(path = %path.display(), error = %e, "cannot remove a blob file");
        }
    });
}

/// Removes, at most once a minute per process, the blob files in `dir`
/// older than [`FILE_TTL`].
fn sweep_now_and_then(dir: Arc<Path>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let last = SWEPT.load(Ordering::Relaxed);
    if now < last + SWEEP_EVERY.as_secs()
        || SWEPT.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
    {
        return;
    }
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_blob =
                name.len() == 64 && name.to_string_lossy().bytes().all(|b| b.is_ascii_hexdigit());
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > FILE_TTL));
            if is_blob && old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    });
}
