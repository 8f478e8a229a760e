//! The peer store (docs/design.md, "Blobs"): with direct delivery, a large
//! argument is put at the receiving agent's peer endpoint, over a
//! connection to where the sender delivers anyway, and a large result is
//! kept at the agent's endpoint for its caller, who delivered there, to
//! read. Each travels once, sender to receiver, and only ever over a
//! connection its sender showed it can open.
//!
//! A peer blob has one reader: it goes once read to its end, or when the
//! request it came with is refused, and at the latest after [`PEER_TTL`].
//! An endpoint keeps at most [`MAX_KEPT_BYTES`] of them; beyond that,
//! senders use the exchange's store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use academy_proto::pb::{self, peer_service_client::PeerServiceClient};
use academy_proto::sync::lock;
use academy_proto::transport::{BLOB_CHUNK_BYTES, PEER_BLOB_STORE};
use academy_proto::{ExchangeError, excerpt};
use bytes::{Bytes, BytesMut};
use tonic::transport::Channel;

use crate::credentials::TlsParts;
use crate::{ClientError, Credentials};

/// How long a peer blob is kept at most.
pub const PEER_TTL: Duration = Duration::from_secs(3600);
/// Most bytes of blobs one peer endpoint keeps.
pub const MAX_KEPT_BYTES: u64 = 1 << 30;
/// Most blobs one peer endpoint keeps.
pub const MAX_KEPT_BLOBS: usize = 4096;

/// The blobs a peer endpoint keeps, by key.
#[derive(Debug, Default)]
pub(crate) struct Kept(Mutex<Table>);

#[derive(Debug, Default)]
struct Table {
    blobs: HashMap<String, (Bytes, Instant)>,
    /// Bytes kept or promised to puts under way.
    bytes: u64,
}

/// Room for a blob being put, given back unless filled.
pub(crate) struct Room<'a> {
    kept: &'a Kept,
    size: u64,
}

impl Drop for Room<'_> {
    fn drop(&mut self) {
        lock(&self.kept.0).bytes -= self.size;
    }
}

impl Room<'_> {
    /// Keeps `data` (of the size promised); its reference at endpoint `url`.
    pub(crate) fn fill(self, url: &str, data: Bytes) -> pb::BlobRef {
        let key = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        let size = data.len() as u64;
        let until = Instant::now() + PEER_TTL;
        lock(&self.kept.0).blobs.insert(key.clone(), (data, until));
        std::mem::forget(self);
        pb::BlobRef {
            store: PEER_BLOB_STORE.into(),
            key,
            size,
            sha256: Vec::new(),
            endpoint: url.to_owned(),
        }
    }
}

impl Kept {
    /// Room for `size` bytes, if there is.
    pub(crate) fn room(&self, size: u64) -> Result<Room<'_>, ExchangeError> {
        let mut table = lock(&self.0);
        let now = Instant::now();
        let full = |t: &Table| t.bytes + size > MAX_KEPT_BYTES || t.blobs.len() >= MAX_KEPT_BLOBS;
        if full(&table) {
            let mut freed = 0;
            table.blobs.retain(|_, (data, until)| {
                let keep = *until > now;
                if !keep {
                    freed += data.len() as u64;
                }
                keep
            });
            table.bytes -= freed;
        }
        if full(&table) {
            return Err(ExchangeError::BlobStoreFull { limit: MAX_KEPT_BYTES });
        }
        table.bytes += size;
        Ok(Room { kept: self, size })
    }

    /// Keeps `data`; its reference at endpoint `url`, or `None` when full.
    pub(crate) fn keep(&self, url: &str, data: Bytes) -> Option<pb::BlobRef> {
        Some(self.room(data.len() as u64).ok()?.fill(url, data))
    }

    /// Blob `key`'s bytes, kept.
    #[cfg_attr(not(feature = "direct"), allow(dead_code))]
    pub(crate) fn get(&self, key: &str) -> Option<Bytes> {
        let table = lock(&self.0);
        let (data, until) = table.blobs.get(key)?;
        (*until > Instant::now()).then(|| data.clone())
    }

    /// Frees blob `key`; its bytes if it was there.
    pub(crate) fn remove(&self, key: &str) -> Option<Bytes> {
        let mut table = lock(&self.0);
        let (data, until) = table.blobs.remove(key)?;
        table.bytes -= data.len() as u64;
        (until > Instant::now()).then_some(data)
    }

    /// Bytes kept now (or promised to puts under way).
    pub(crate) fn bytes(&self) -> u64 {
        lock(&self.0).bytes
    }
}

/// Connections to peer endpoints for blobs, by URL and by the credentials
/// they were made with (apart from those that deliver, so that no request
/// waits behind a blob's bytes).
static CLIENTS: Mutex<Option<Clients>> = Mutex::new(None);
type Clients = HashMap<(String, TlsParts), PeerServiceClient<Channel>>;
/// Endpoints whose connections are kept before all are dropped.
const CLIENTS_KEPT: usize = 256;

fn client(url: &str, credentials: &Credentials) -> Result<PeerServiceClient<Channel>, ClientError> {
    let mut clients = lock(&CLIENTS);
    let clients = clients.get_or_insert_with(HashMap::new);
    let key = (url.to_owned(), credentials.tls_parts());
    if let Some(client) = clients.get(&key) {
        return Ok(client.clone());
    }
    if clients.len() >= CLIENTS_KEPT {
        clients.clear();
    }
    let endpoint = credentials.endpoint(url)?;
    let timeout = super::super::direct::PEER_TIMEOUT;
    let endpoint = crate::exchange::tuned(endpoint, timeout, timeout).keep_alive_timeout(timeout);
    let channel = credentials.open_lazy(endpoint, url)?;
    let client = PeerServiceClient::new(channel)
        .max_decoding_message_size(BLOB_CHUNK_BYTES + 1024)
        .max_encoding_message_size(BLOB_CHUNK_BYTES + 1024);
    clients.insert(key, client.clone());
    Ok(client)
}

/// Puts `data` at the peer endpoint `url` (presenting `ticket`); its
/// reference there.
pub(crate) async fn put(
    url: &str,
    credentials: &Credentials,
    ticket: &str,
    data: Bytes,
) -> Result<pb::BlobRef, ClientError> {
    let size = data.len() as u64;
    let head = pb::PutPeerBlobRequest { size, ..Default::default() };
    let chunks =
        super::chunk_slices(data).map(|data| pb::PutPeerBlobRequest { data, ..Default::default() });
    let mut request =
        tonic::Request::new(futures::stream::iter(std::iter::once(head).chain(chunks)));
    let ticket = ticket.parse().map_err(|_| ClientError::Transport("a bad ticket".into()))?;
    request.metadata_mut().insert(crate::direct::TICKET_HEADER, ticket);
    let put = client(url, credentials)?.put_peer_blob(request).await?.into_inner();
    match put.blob {
        Some(blob) if blob.store == PEER_BLOB_STORE && blob.size == size => Ok(blob),
        _ => Err(ClientError::Transport(format!("{url} answered a put with no reference to it"))),
    }
}

/// The bytes of peer blob `blob`, read from the endpoint that keeps it
/// (which frees it once read to its end).
pub(crate) async fn read(
    blob: &pb::BlobRef,
    credentials: &Credentials,
) -> Result<Bytes, ClientError> {
    let unreachable = |e: ClientError| match e {
        ClientError::Transport(why) => ClientError::Transport(format!(
            "blob {} is kept at {}, which cannot be reached: {why}",
            blob.key,
            excerpt(&blob.endpoint)
        )),
        other => other,
    };
    let request = pb::GetPeerBlobRequest { key: blob.key.clone(), offset: 0 };
    let mut chunks = client(&blob.endpoint, credentials)?
        .get_peer_blob(request)
        .await
        .map_err(|s| unreachable(s.into()))?
        .into_inner();
    let head = chunks.message().await.map_err(|s| unreachable(s.into()))?;
    if head.is_none_or(|h| h.size != blob.size) {
        return Err(super::corrupt(blob, "is not the blob its reference describes"));
    }
    // One chunk is kept as it came; more are put together as they come,
    // while the next ones are on their way.
    let (mut first, mut data) = (None::<Bytes>, BytesMut::new());
    while let Some(chunk) = chunks.message().await.map_err(|s| unreachable(s.into()))? {
        let seen = first.as_ref().map_or(0, Bytes::len) + data.len() + chunk.data.len();
        if seen as u64 > blob.size {
            return Err(super::corrupt(blob, "has more bytes than its size"));
        }
        if first.is_none() && data.is_empty() {
            first = Some(chunk.data);
            continue;
        }
        if let Some(first) = first.take() {
            data.reserve(usize::try_from(blob.size).unwrap_or(0));
            data.extend_from_slice(&first);
        }
        data.extend_from_slice(&chunk.data);
    }
    let data = first.unwrap_or_else(|| data.freeze());
    if data.len() as u64 != blob.size {
        return Err(super::corrupt(blob, "has fewer bytes than its size"));
    }
    Ok(data)
}

/// Frees peer blob `blob` at its endpoint, in the background.
pub(crate) fn delete(blob: pb::BlobRef, credentials: &Credentials) {
    let Ok(mut client) = client(&blob.endpoint, credentials) else { return };
    tokio::spawn(async move {
        let request = pb::DeletePeerBlobRequest { key: blob.key.clone() };
        if let Err(e) = client.delete_peer_blob(request).await {
            tracing::debug!(key = blob.key, error = %e, "cannot free a peer blob; it expires");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sets of credentials in one process (two managers, say) reach
    /// the same endpoint on connections of their own; clones share one.
    #[tokio::test]
    async fn peer_blob_connections_are_kept_per_credentials() {
        let url = "http://127.0.0.1:1";
        let trusting = Credentials::none().with_tls_ca(b"ca");
        let certified = trusting.clone().with_client_certificate(b"cert", b"key");
        for credentials in [&trusting, &certified, &trusting.clone(), &certified.for_peers()] {
            client(url, credentials).unwrap();
        }
        let again = Credentials::none().with_tls_ca(b"ca");
        client(url, &again).unwrap();
        let kept = lock(&CLIENTS).as_ref().unwrap().keys().filter(|(u, _)| u == url).count();
        assert_eq!(kept, 2);
    }

    #[test]
    fn an_endpoint_keeps_blobs_within_its_bounds_and_accounts_for_them() {
        let kept = Kept::default();
        let blob = kept.keep("http://peer", Bytes::from_static(b"hello")).unwrap();
        assert_eq!(
            (blob.store.as_str(), blob.size, blob.endpoint.as_str()),
            ("peer", 5, "http://peer")
        );
        assert_eq!(blob.key.len(), 64);
        assert_eq!(kept.bytes(), 5);
        assert_eq!(kept.get(&blob.key).as_deref(), Some(&b"hello"[..]));

        // Room promised to a put counts until filled or given back.
        let room = kept.room(MAX_KEPT_BYTES - 5).unwrap();
        let err = kept.room(1).err().unwrap();
        assert!(matches!(err, ExchangeError::BlobStoreFull { limit: MAX_KEPT_BYTES }), "{err}");
        drop(room);
        assert_eq!(kept.bytes(), 5);
        let key = kept.room(3).unwrap().fill("http://peer", Bytes::from_static(b"abc")).key;
        assert_eq!(kept.bytes(), 8);

        assert_eq!(kept.remove(&blob.key).as_deref(), Some(&b"hello"[..]));
        assert_eq!(kept.remove(&blob.key), None);
        assert_eq!(kept.remove(&key).as_deref(), Some(&b"abc"[..]));
        assert_eq!(kept.bytes(), 0);

        // As many blobs as it may keep, however small.
        for _ in 0..MAX_KEPT_BLOBS {
            kept.keep("http://peer", Bytes::new()).unwrap();
        }
        assert!(kept.keep("http://peer", Bytes::new()).is_none());
    }

    #[test]
    fn expired_blobs_are_gone_and_make_room() {
        let kept = Kept::default();
        let blob = kept.keep("http://peer", Bytes::from(vec![0; 1024])).unwrap();
        // As if its hour had passed.
        let past = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        lock(&kept.0).blobs.get_mut(&blob.key).unwrap().1 = past;
        assert_eq!(kept.get(&blob.key), None);
        // A put that would not fit sweeps it out first.
        let room = kept.room(MAX_KEPT_BYTES).unwrap();
        assert_eq!(kept.remove(&blob.key), None);
        drop(room);
        assert_eq!(kept.bytes(), 0);
    }
}
