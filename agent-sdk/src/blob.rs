//! Payloads by reference (docs/design.md, "Blobs"). Arguments and results
//! at least as large as a mailbox's threshold are put in the exchange's
//! blob store and travel as a [`pb::BlobRef`]; their receiver reads them
//! back before decoding, so actions and handles see plain values.
//!
//! Who frees what: a caller frees its arguments' blob once the call is
//! over (answered, timed out or dropped) and a result's blob once it has
//! read it; an agent frees nothing. Blobs also go when their owner's
//! mailbox is terminated, and at the exchange's blob TTL.
//!
//! A manager or agent given a directory that the processes on its node
//! share (`with_blob_dir`, `AgentConfig::blob_dir`) keeps its blobs there
//! instead, as files: the bytes never leave the node. With direct
//! delivery, the blobs of a call that goes directly are kept at the peer
//! endpoints instead (the peer store): they travel once, sender to
//! receiver.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use academy_proto::pb;
use academy_proto::sync::lock;
use academy_proto::transport::{BLOB_CHUNK_BYTES, EXCHANGE_BLOB_STORE};
use academy_proto::{EntityId, ExchangeError, excerpt};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use crate::exchange::{BlobChunks, SharedExchange};
use crate::{ClientError, Endpoint};

mod file;
mod peer;
pub use file::FILE_TTL;
pub(crate) use peer::{Kept, put as put_at_peer};
pub use peer::{MAX_KEPT_BLOBS, MAX_KEPT_BYTES, PEER_TTL};

/// The store a reference names for a file in a directory that its sender
/// and receiver share (processes on one node): the name is the key, the
/// directory the receiver's own.
pub use academy_proto::transport::FILE_BLOB_STORE as FILE_STORE;

/// The store a reference names for a blob kept at a peer endpoint (its
/// `endpoint`), for a message delivered directly.
pub use academy_proto::transport::PEER_BLOB_STORE as PEER_STORE;

/// Payloads of this many bytes or more go by reference unless a manager
/// or agent says otherwise: what would not fit in a message of an exchange
/// with the default limit (4 MiB), with room for the message around it.
/// Smaller ones go inline, which is faster: a 1 MiB call by reference
/// moves its bytes as often and adds a round trip and a digest per blob
/// (BENCHMARKS.md, (d)).
pub const DEFAULT_BLOB_THRESHOLD: usize = 4 * 1024 * 1024 - 64 * 1024;

/// `data` in chunks a blob store takes, without copying it.
pub(crate) fn chunk_slices(data: Bytes) -> impl Iterator<Item = Bytes> {
    let n = data.len().div_ceil(BLOB_CHUNK_BYTES);
    (0..n).map(move |i| {
        data.slice(i * BLOB_CHUNK_BYTES..((i + 1) * BLOB_CHUNK_BYTES).min(data.len()))
    })
}

/// `data` in chunks the exchange takes, without copying it.
pub(crate) fn chunks_of(data: Bytes) -> BlobChunks {
    futures::stream::iter(chunk_slices(data).map(Ok)).boxed()
}

/// Where a mailbox keeps the blobs it sends and finds the ones it
/// receives: its exchange's store; a directory the processes on its node
/// share (the file store), if it has one; and with direct delivery, the
/// peer endpoints of senders and receivers (the peer store).
#[derive(Debug)]
pub(crate) struct Stores {
    pub(crate) exchange: SharedExchange,
    /// The mailbox its blobs in the exchange belong to.
    owner: EntityId,
    /// Payloads of this many bytes or more go by reference.
    threshold: AtomicUsize,
    dir: OnceLock<Arc<Path>>,
    /// The peer endpoint hosting its agent, if any: it keeps the results
    /// of requests that came directly, and the arguments put there.
    keeper: Option<Endpoint>,
}

impl Stores {
    pub(crate) fn new(
        exchange: SharedExchange,
        owner: EntityId,
        keeper: Option<Endpoint>,
    ) -> Arc<Self> {
        Arc::new(Self {
            exchange,
            owner,
            threshold: AtomicUsize::new(DEFAULT_BLOB_THRESHOLD),
            dir: OnceLock::new(),
            keeper,
        })
    }

    /// Sends payloads of `bytes` or more by reference from now on.
    pub(crate) fn set_threshold(&self, bytes: usize) {
        self.threshold.store(bytes, Ordering::Relaxed);
    }

    /// Keeps its blobs in files under `dir`, and finds there the ones it
    /// receives (set once).
    pub(crate) fn set_dir(&self, dir: std::path::PathBuf) {
        let _ = self.dir.set(dir.into());
    }

    /// Whether `payload` goes by reference (in a store of the sender's
    /// choosing) rather than inline.
    pub(crate) fn is_large(&self, payload: &pb::Payload) -> bool {
        payload.blob.is_none() && payload.data.len() >= self.threshold.load(Ordering::Relaxed)
    }

    /// Whether request `message`'s arguments go by reference.
    pub(crate) fn has_large_args(&self, message: &mut pb::Message) -> bool {
        args_of(message).is_some_and(|a| self.is_large(a))
    }

    /// Whether its blobs go to the file store.
    pub(crate) fn has_dir(&self) -> bool {
        self.dir.get().is_some()
    }

    /// Large `payload`, kept as a blob: in the file store when there is
    /// one, else at the keeper endpoint for an answer that goes `directly`
    /// (if it has room), else in the exchange's store.
    pub(crate) async fn offload(
        &self,
        payload: pb::Payload,
        directly: bool,
    ) -> Result<pb::Payload, ClientError> {
        let kept_here = self.keeper.as_ref().filter(|_| directly && !self.has_dir());
        let blob = match kept_here.and_then(|k| k.kept().keep(k.url(), payload.data.clone())) {
            Some(blob) => blob,
            None => match self.dir.get() {
                Some(dir) => file::put(dir.clone(), payload.data).await?,
                None => {
                    let size = payload.data.len() as u64;
                    self.exchange.put_blob(&self.owner, size, chunks_of(payload.data)).await?
                }
            },
        };
        Ok(pb::Payload { content_type: payload.content_type, data: Bytes::new(), blob: Some(blob) })
    }

    /// `message`, whose arguments are large, with them kept as a blob in the
    /// file store or the exchange's, freed when the guard drops. Its callers
    /// box it, so that calls with small arguments do not carry its state.
    pub(crate) async fn offload_request(
        self: &Arc<Self>,
        mut message: pb::Message,
    ) -> Result<(pb::Message, Option<Freed>), ClientError> {
        let Some(args) = args_of(&mut message) else { return Ok((message, None)) };
        *args = self.offload(std::mem::take(args), false).await?;
        let freed = Freed::of(self.clone(), args);
        Ok((message, freed))
    }

    /// Sends request `message` through the exchange, its large arguments
    /// kept in the file store or the exchange's; what to free once the call
    /// is over.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut message: pb::Message,
    ) -> Result<Option<Freed>, ClientError> {
        let mut freed = None;
        if self.has_large_args(&mut message) {
            (message, freed) = Box::pin(self.offload_request(message)).await?;
        }
        self.exchange.send(message).await?;
        Ok(freed)
    }

    /// `payload` with its blob's bytes read into `data`, checked against
    /// the reference's size (and digest); a payload without one as it is.
    /// A peer blob is read at its endpoint if `remote`, else only one kept
    /// at this mailbox's own.
    pub(crate) async fn resolve(
        &self,
        payload: Option<pb::Payload>,
        remote: bool,
    ) -> Result<Option<pb::Payload>, ClientError> {
        let Some(mut payload) = payload else { return Ok(None) };
        let Some(blob) = payload.blob.take() else { return Ok(Some(payload)) };
        payload.data = match blob.store.as_str() {
            EXCHANGE_BLOB_STORE => read(&self.exchange, &blob).await?,
            FILE_STORE => file::read(self.dir.get().cloned(), &blob).await?,
            PEER_STORE => match &self.keeper {
                Some(k) if k.keeps(&blob) => k
                    .kept()
                    .remove(&blob.key)
                    .ok_or(ClientError::Exchange(ExchangeError::BlobNotFound(blob.key)))?,
                _ if remote && !blob.endpoint.is_empty() => {
                    peer::read(&blob, &self.exchange.peer_credentials()).await?
                }
                _ => {
                    return Err(ClientError::Exchange(ExchangeError::InvalidArgument(format!(
                        "blob {} is kept at a peer endpoint that did not send it here",
                        excerpt(&blob.key)
                    ))));
                }
            },
            other => {
                return Err(ClientError::Exchange(ExchangeError::InvalidArgument(format!(
                    "blob store {} is not one this SDK reads",
                    excerpt(other)
                ))));
            }
        };
        Ok(Some(payload))
    }

    /// Frees `blob`, if any, in the background.
    pub(crate) fn free(&self, blob: Option<&pb::BlobRef>) {
        let Some(blob) = blob else { return };
        let key = blob.key.clone();
        match blob.store.as_str() {
            FILE_STORE => {
                if let Some(dir) = self.dir.get().cloned() {
                    file::remove(dir, key);
                }
            }
            PEER_STORE => match &self.keeper {
                Some(k) if k.keeps(blob) => drop(k.kept().remove(&key)),
                _ => peer::delete(blob.clone(), &self.exchange.peer_credentials()),
            },
            _ => {
                let exchange = self.exchange.clone();
                tokio::spawn(async move {
                    if let Err(e) = exchange.delete_blob(&key).await {
                        tracing::debug!(key, error = %e, "cannot free a blob; it expires");
                    }
                });
            }
        }
    }
}

/// The blob of `message`'s result, if it is an action response with one.
pub(crate) fn result_blob(message: &mut pb::Message) -> Option<&mut pb::BlobRef> {
    match &mut message.body {
        Some(pb::message::Body::ActionResponse(response)) => {
            response.result.as_mut()?.blob.as_mut()
        }
        _ => None,
    }
}

/// The arguments of `message`, if it is an action request with some.
pub(crate) fn args_of(message: &mut pb::Message) -> Option<&mut pb::Payload> {
    match &mut message.body {
        Some(pb::message::Body::ActionRequest(request)) => request.args.as_mut(),
        _ => None,
    }
}

/// The bytes of `blob`, kept by the exchange, checked.
async fn read(exchange: &SharedExchange, blob: &pb::BlobRef) -> Result<Bytes, ClientError> {
    let mut chunks = checked(exchange, blob).await?;
    let mut data = BytesMut::with_capacity(usize::try_from(blob.size).unwrap_or(0));
    while let Some(chunk) = chunks.next().await {
        data.extend_from_slice(&chunk?);
    }
    Ok(data.freeze())
}

/// The bytes of `blob`, kept by the exchange, chunk by chunk; the last
/// item is an error if they do not match its size and SHA-256.
async fn checked(exchange: &SharedExchange, blob: &pb::BlobRef) -> Result<BlobChunks, ClientError> {
    let read = exchange.get_blob(&blob.key, 0).await?;
    if read.size != blob.size || read.sha256 != blob.sha256 {
        return Err(corrupt(blob, "is not the blob its reference describes"));
    }
    let start = (read.chunks, Sha256::new(), 0u64, blob.clone(), false);
    let checked =
        futures::stream::unfold(start, |(mut chunks, mut hasher, seen, blob, done)| async move {
            if done {
                return None;
            }
            let (item, seen) = match chunks.next().await {
                Some(Ok(chunk)) if seen + chunk.len() as u64 > blob.size => {
                    (Err(corrupt(&blob, "has more bytes than its size")), seen)
                }
                Some(Ok(chunk)) => {
                    hasher.update(&chunk);
                    let seen = seen + chunk.len() as u64;
                    return Some((Ok(chunk), (chunks, hasher, seen, blob, false)));
                }
                Some(Err(err)) => (Err(err), seen),
                None if seen == blob.size
                    && hasher.clone().finalize().as_slice() == blob.sha256 =>
                {
                    return None;
                }
                None => (Err(corrupt(&blob, "does not match its size and SHA-256")), seen),
            };
            Some((item, (chunks, hasher, seen, blob, true)))
        });
    Ok(checked.boxed())
}

fn corrupt(blob: &pb::BlobRef, what: &str) -> ClientError {
    ClientError::Transport(format!("blob {} {what}", blob.key))
}

/// Frees a call's arguments' blob when dropped: however the call ends.
#[derive(Debug)]
pub(crate) struct Freed {
    stores: Arc<Stores>,
    blob: pb::BlobRef,
}

impl Freed {
    /// Frees `payload`'s blob, if it has one, from `stores` when dropped.
    fn of(stores: Arc<Stores>, payload: &pb::Payload) -> Option<Self> {
        let blob = payload.blob.clone()?;
        Some(Self { stores, blob })
    }
}

impl Drop for Freed {
    fn drop(&mut self) {
        self.stores.free(Some(&self.blob));
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

thread_local! {
    /// The exchange a handle decodes a result for: where the [`Blob`]s in
    /// it are read.
    static DECODING: std::cell::RefCell<Option<SharedExchange>> = const { std::cell::RefCell::new(None) };
}

/// Runs `decode` with [`Blob`]s decoded in it read from `exchange`.
pub(crate) fn decoding<T>(exchange: &SharedExchange, decode: impl FnOnce() -> T) -> T {
    let before = DECODING.with(|d| d.replace(Some(exchange.clone())));
    let decoded = decode();
    DECODING.with(|d| *d.borrow_mut() = before);
    decoded
}

/// A payload kept in the exchange's blob store and passed by reference
/// (docs/design.md, "Blobs"), for data too large to hold in memory at once:
/// an action may take or return one, and whoever holds it reads it in
/// chunks of at most 1 MiB ([`Blob::chunks`], [`Blob::write_to`]). It
/// serialises as its reference (store, key, size, SHA-256 in hex).
///
/// Make one with [`Manager::put_blob`](crate::Manager::put_blob) (or
/// [`put_file`](crate::Manager::put_file)), or inside an agent with
/// [`put`]. Its maker frees it ([`Blob::delete`]) when done; otherwise it
/// goes with its owner mailbox, or at the exchange's blob TTL.
#[derive(Clone)]
pub struct Blob {
    reference: pb::BlobRef,
    /// Where it is read: the exchange of whoever made or decoded it.
    exchange: Option<SharedExchange>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("key", &self.reference.key)
            .field("size", &self.reference.size)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Self) -> bool {
        self.reference == other.reference
    }
}

impl Blob {
    /// Its length in bytes.
    pub fn size(&self) -> u64 {
        self.reference.size
    }

    /// Its key in the store.
    pub fn key(&self) -> &str {
        &self.reference.key
    }

    /// Its SHA-256.
    pub fn sha256(&self) -> &[u8] {
        &self.reference.sha256
    }

    /// The same blob, read through `exchange` (for one decoded where no
    /// agent or handle was running).
    pub fn on(mut self, exchange: SharedExchange) -> Self {
        self.exchange = Some(exchange);
        self
    }

    fn exchange(&self) -> Result<&SharedExchange, ClientError> {
        self.exchange.as_ref().ok_or_else(|| {
            ClientError::Transport(format!(
                "blob {} was decoded outside an agent or a handle: give it an exchange with Blob::on",
                self.reference.key
            ))
        })
    }

    /// Its bytes, chunk by chunk; the last item is an error if they do not
    /// match its size and SHA-256.
    pub async fn chunks(&self) -> Result<BlobChunks, ClientError> {
        checked(self.exchange()?, &self.reference).await
    }

    /// Its bytes, whole, checked.
    pub async fn bytes(&self) -> Result<Bytes, ClientError> {
        read(self.exchange()?, &self.reference).await
    }

    /// Writes its bytes to `writer`, a chunk at a time; how many.
    pub async fn write_to<W>(&self, writer: &mut W) -> Result<u64, ClientError>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt as _;
        let mut chunks = self.chunks().await?;
        let mut written = 0;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            writer.write_all(&chunk).await.map_err(io_error)?;
            written += chunk.len() as u64;
        }
        writer.flush().await.map_err(io_error)?;
        Ok(written)
    }

    /// Frees it now; whether it was still kept.
    pub async fn delete(&self) -> Result<bool, ClientError> {
        self.exchange()?.delete_blob(&self.reference.key).await
    }
}

fn io_error(err: std::io::Error) -> ClientError {
    ClientError::Transport(format!("reading or writing a blob's bytes: {err}"))
}

/// Keeps the `size` bytes `reader` yields as a blob of mailbox `owner`,
/// reading a chunk at a time.
pub(crate) async fn put_from<R>(
    exchange: &SharedExchange,
    owner: &EntityId,
    reader: R,
    size: u64,
) -> Result<Blob, ClientError>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    use tokio::io::AsyncReadExt as _;
    let chunks = futures::stream::unfold((reader, 0u64), move |(mut reader, done)| async move {
        if done == size {
            return None;
        }
        let want = (size - done).min(BLOB_CHUNK_BYTES as u64) as usize;
        let mut chunk = BytesMut::zeroed(want);
        let mut filled = 0;
        while filled < want {
            match reader.read(&mut chunk[filled..]).await {
                Ok(0) => {
                    let err = ClientError::Transport(format!(
                        "the blob's reader ended after {} of {size} bytes",
                        done + filled as u64
                    ));
                    return Some((Err(err), (reader, size)));
                }
                Ok(n) => filled += n,
                Err(e) => return Some((Err(io_error(e)), (reader, size))),
            }
        }
        Some((Ok(chunk.freeze()), (reader, done + want as u64)))
    });
    let reference = exchange.put_blob(owner, size, chunks.boxed()).await?;
    Ok(Blob { reference, exchange: Some(exchange.clone()) })
}

/// Inside an agent: keeps the `size` bytes `reader` yields as a blob of
/// the agent's mailbox, to pass to others by reference.
pub async fn put<R>(reader: R, size: u64) -> Result<Blob, ClientError>
where
    R: tokio::io::AsyncRead + Send + Unpin + 'static,
{
    let mailbox = crate::context::current_mailbox().ok_or_else(|| {
        ClientError::Transport(
            "blob::put runs inside an agent; use Manager::put_blob outside".into(),
        )
    })?;
    put_from(mailbox.exchange(), &mailbox.id(), reader, size).await
}

impl serde::Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let r = &self.reference;
        let mut s = serializer.serialize_struct("Blob", 4)?;
        s.serialize_field("store", &r.store)?;
        s.serialize_field("key", &r.key)?;
        s.serialize_field("size", &r.size)?;
        s.serialize_field("sha256", &hex(&r.sha256))?;
        s.end()
    }
}

impl<'de> serde::Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        struct Reference {
            store: String,
            key: String,
            size: u64,
            sha256: String,
        }
        let r = Reference::deserialize(deserializer)?;
        let sha256 =
            unhex(&r.sha256).ok_or_else(|| serde::de::Error::custom("sha256 is not hex"))?;
        let reference = pb::BlobRef {
            store: r.store,
            key: r.key,
            size: r.size,
            sha256,
            endpoint: String::new(),
        };
        let exchange = DECODING
            .with(|d| d.borrow().clone())
            .or_else(|| crate::context::current_mailbox().map(|m| m.exchange().clone()));
        Ok(Self { reference, exchange })
    }
}

impl schemars::JsonSchema for Blob {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Blob".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "A payload kept in a blob store, passed by reference (docs/design.md, \"Blobs\")",
            "properties": {
                "store": {"type": "string"},
                "key": {"type": "string"},
                "size": {"type": "integer", "minimum": 0},
                "sha256": {"type": "string", "description": "hex"}
            },
            "required": ["store", "key", "size", "sha256"]
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}
