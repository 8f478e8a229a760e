//! Direct delivery (docs/design.md, "Direct delivery"): a process that hosts
//! agents serves a peer endpoint ([`Endpoint`]), advertised with their
//! subscriptions; a sender that reaches it delivers action requests there
//! and gets the answers back on the same stream, and falls back to the
//! exchange's mailboxes whenever it cannot prove a request was taken.
//!
//! The sender keeps, per destination, the order of its requests across a
//! switch between the two paths: it moves from the exchange to a peer only
//! while none of its requests to that destination is unanswered, and from a
//! peer back to the exchange by resending, in order, every request the peer
//! refused or left unanswered (a broken stream), before any later one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use academy_proto::EntityId;
use academy_proto::pb::{self, deliver_response::Outcome, message::Body};
use academy_proto::sync::lock;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::ClientError;
use crate::blob::{Freed, Stores, args_of};
use crate::exchange::SharedExchange;

/// How long a destination's endpoint, once looked up (found or not), is
/// trusted before it is looked up again.
const LOOKUP_EVERY: Duration = Duration::from_secs(1);
/// Longest wait to connect to a peer endpoint, and to hear from an idle one.
pub(crate) const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// `Deliver` streams one connection to a peer endpoint may have open.
#[cfg(feature = "direct")]
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Destinations whose routes are kept before the idle ones are forgotten.
const ROUTES_KEPT: usize = 4096;
/// How long an endpoint that could not be reached is not tried again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// How long an endpoint trusts the exchange's word on a ticket: an open
/// `Deliver` stream asks again this often, and ends once the ticket is
/// refused (its token revoked).
#[cfg_attr(not(feature = "direct"), allow(dead_code))]
const TICKET_RECHECK: Duration = Duration::from_secs(30);

/// The metadata of a `Deliver` stream that carries its ticket.
pub(crate) const TICKET_HEADER: &str = "academy-ticket";
/// The metadata by which a `Deliver` stream's sender says it reads large
/// results kept at the endpoint (the peer store): a sender from before it
/// gets them through the exchange's store.
const PEER_BLOBS_HEADER: &str = "academy-peer-blobs";

/// Calls waiting for answers, by tag (shared with the mailbox): the answer,
/// or why the request could not be sent after all.
pub(crate) type Pending =
    Arc<Mutex<HashMap<String, oneshot::Sender<Result<pb::Message, ClientError>>>>>;

// ---------------------------------------------------------------- receiving

/// Where a hosted agent's runtime answers a request that came directly.
/// Dropped without an answer, it tells the sender the request did not run
/// (so the sender sends it through the exchange).
#[derive(Debug)]
pub(crate) struct Reply {
    seq: u64,
    out: Option<mpsc::Sender<Result<pb::DeliverResponse, tonic::Status>>>,
    /// What it counts against its agent's bound, given back when done.
    waiting: Option<(Arc<Waiting>, usize)>,
    /// The endpoint: it frees the blob kept with the arguments if never
    /// read, and that of an answer that cannot be sent.
    hosting: Weak<Hosting>,
    unread: Option<String>,
    /// Its sender reads large results kept at the endpoint.
    reads_peer_blobs: bool,
}

/// Requests an agent took directly and has not answered yet: bounded like
/// a mailbox ([`MAX_WAITING`], [`MAX_WAITING_BYTES`]), beyond which an
/// endpoint refuses them (they go through the exchange, and its bounds).
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    requests: std::sync::atomic::AtomicUsize,
    bytes: std::sync::atomic::AtomicUsize,
}

/// Most requests one agent holds that came directly and are not answered.
#[cfg_attr(not(feature = "direct"), allow(dead_code))]
pub(crate) const MAX_WAITING: usize = 10_000;
/// Most bytes of them.
#[cfg_attr(not(feature = "direct"), allow(dead_code))]
pub(crate) const MAX_WAITING_BYTES: usize = 64 * 1024 * 1024;
/// Largest request a peer endpoint decodes.
#[cfg_attr(not(feature = "direct"), allow(dead_code))]
pub(crate) const MAX_DIRECT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

impl Waiting {
    /// Counts a request of `bytes` in, if it fits.
    #[cfg_attr(not(feature = "direct"), allow(dead_code))]
    fn admit(self: &Arc<Self>, bytes: usize) -> Option<(Arc<Self>, usize)> {
        use std::sync::atomic::Ordering::Relaxed;
        let requests = self.requests.fetch_add(1, Relaxed);
        let held = self.bytes.fetch_add(bytes, Relaxed);
        if requests >= MAX_WAITING || held + bytes > MAX_WAITING_BYTES {
            self.release(bytes);
            return None;
        }
        Some((self.clone(), bytes))
    }

    fn release(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.requests.fetch_sub(1, Relaxed);
        self.bytes.fetch_sub(bytes, Relaxed);
    }
}

impl Reply {
    /// Whether a large result may be kept at the endpoint for its caller.
    pub(crate) fn reads_peer_blobs(&self) -> bool {
        self.reads_peer_blobs
    }

    pub(crate) fn answer(mut self, answer: pb::Message) {
        self.finish(|| Outcome::Answer(answer));
    }

    /// Gives back what it counted and tells the sender `outcome` (if not
    /// told yet): at once if there is room, else from a task, so that a
    /// sender slow to read its stream holds up nothing but its own answers
    /// (a process with no runtime left is ending the stream anyway).
    fn finish(&mut self, outcome: impl FnOnce() -> Outcome) {
        if let Some((waiting, bytes)) = self.waiting.take() {
            waiting.release(bytes);
        }
        let Some(out) = self.out.take() else { return };
        let response = pb::DeliverResponse { seq: self.seq, outcome: Some(outcome()) };
        let hosting = self.hosting.clone();
        match out.try_send(Ok(response)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(response)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if let Err(mpsc::error::SendError(response)) = out.send(response).await {
                            unsent(&hosting, response);
                        }
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(response)) => unsent(&hosting, response),
        }
    }
}

/// Frees what an answer that could not be sent kept here: its sender,
/// gone with the stream, resends the request through the exchange.
fn unsent(hosting: &Weak<Hosting>, response: Result<pb::DeliverResponse, tonic::Status>) {
    let Ok(pb::DeliverResponse { outcome: Some(Outcome::Answer(mut answer)), .. }) = response
    else {
        return;
    };
    if let Some(blob) = crate::blob::result_blob(&mut answer)
        && let Some(hosting) = hosting.upgrade()
        && hosting.keeps(blob)
    {
        hosting.kept.remove(&blob.key);
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // Built only if the sender was not told yet (not after an answer).
        self.finish(|| {
            let why = "the agent stopped before running it";
            Outcome::Refused(refusal(tonic::Code::Unavailable, "NOT_RUN", why))
        });
        if let Some(key) = self.unread.take()
            && let Some(hosting) = self.hosting.upgrade()
        {
            hosting.kept.remove(&key);
        }
    }
}

/// Why a peer endpoint did not take a request (as the exchange would say it).
fn refusal(code: tonic::Code, reason: &str, message: impl Into<String>) -> pb::SendResult {
    pb::SendResult {
        code: code as i32,
        message: message.into(),
        reason: reason.to_owned(),
        metadata: HashMap::new(),
    }
}

/// Requests that came directly for one hosted agent.
pub(crate) type DirectRequests = mpsc::UnboundedSender<(Reply, pb::Message)>;

/// Where a hosted agent takes requests, and what it holds of them.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "direct"), allow(dead_code))]
struct Inbox {
    requests: DirectRequests,
    waiting: Arc<Waiting>,
}

/// What a peer endpoint serves TLS with ([`Endpoint::serve_tls`]): its
/// certificate and key, and for mutual TLS the CA whose certificates its
/// senders must show. All PEM, given or in files; files are read again
/// every 5 s while the endpoint serves, so a renewed certificate reaches
/// new connections without a restart.
#[cfg(all(feature = "direct", feature = "tls"))]
#[derive(Debug, Clone)]
pub struct EndpointTls(academy_tls::ServerTls);

#[cfg(all(feature = "direct", feature = "tls"))]
impl EndpointTls {
    /// Serving this certificate (with the names senders reach it by) and key.
    pub fn new(cert_pem: &[u8], key_pem: &[u8]) -> Self {
        Self(academy_tls::ServerTls::from_pem(cert_pem, key_pem))
    }

    /// Serving the certificate and key in these PEM files: read now, and
    /// again while the endpoint serves (a certificate renewed in place).
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> std::io::Result<Self> {
        let tls = academy_tls::ServerTls::from_files(cert, key);
        Ok(Self(tls.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?))
    }

    /// Requiring senders to show a certificate `ca_pem` signed (mutual TLS).
    pub fn with_client_ca(self, ca_pem: &[u8]) -> Self {
        Self(self.0.with_client_ca_pem(ca_pem))
    }

    /// Requiring senders to show a certificate that the CA in this PEM file
    /// signed (mutual TLS); the file is read again while the endpoint serves.
    pub fn with_client_ca_file(self, ca: &std::path::Path) -> Self {
        Self(self.0.with_client_ca_file(ca))
    }
}

/// A peer endpoint this process serves: the agents it hosts (those whose
/// [`AgentConfig::direct`](crate::AgentConfig::direct) names it) take action
/// requests there directly. Cheap to clone; it stops serving when the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct Endpoint {
    inner: Arc<Hosting>,
}

#[derive(Debug, Default)]
struct Hosting {
    url: String,
    agents: Mutex<HashMap<EntityId, Inbox>>,
    /// Where tickets are checked: the exchange of the first agent hosted.
    exchange: std::sync::OnceLock<SharedExchange>,
    /// Tickets the exchange vouched for.
    #[cfg_attr(not(feature = "direct"), allow(dead_code))]
    vouched: Mutex<HashMap<String, Vouched>>,
    /// The blobs it keeps: results for callers, arguments for its agents.
    kept: crate::blob::Kept,
    stop: tokio_util::sync::CancellationToken,
}

/// What the exchange said of a ticket: the mailbox it is for, when it
/// expires, and until when that is taken without asking again.
#[cfg_attr(not(feature = "direct"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
struct Vouched {
    src: EntityId,
    expires: Instant,
    trusted_until: Instant,
}

impl Hosting {
    /// Whether `blob` is one it keeps (a peer blob naming this endpoint).
    fn keeps(&self, blob: &pb::BlobRef) -> bool {
        blob.store == crate::blob::PEER_STORE && blob.endpoint == self.url
    }
}

impl Drop for Hosting {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An agent hosted at an endpoint, until dropped.
#[derive(Debug)]
pub(crate) struct Hosted {
    endpoint: Endpoint,
    id: EntityId,
}

impl Hosted {
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        lock(&self.endpoint.inner.agents).remove(&self.id);
    }
}

impl Endpoint {
    /// The URL senders reach it at ("http://host:port" or "unix:/path").
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Bytes of blobs it keeps now: large results for callers to read and
    /// large arguments for its agents (docs/design.md, "Blobs"), at most
    /// [`MAX_KEPT_BYTES`](crate::blob::MAX_KEPT_BYTES).
    pub fn blob_bytes(&self) -> u64 {
        self.inner.kept.bytes()
    }

    pub(crate) fn kept(&self) -> &crate::blob::Kept {
        &self.inner.kept
    }

    /// Whether `blob` is one it keeps.
    pub(crate) fn keeps(&self, blob: &pb::BlobRef) -> bool {
        self.inner.keeps(blob)
    }

    /// Takes requests for agent `id` (of `exchange`) into `requests` until
    /// the guard drops.
    pub(crate) fn host(
        &self,
        id: EntityId,
        exchange: &SharedExchange,
        requests: DirectRequests,
    ) -> Hosted {
        let _ = self.inner.exchange.set(exchange.clone());
        let inbox = Inbox { requests, waiting: Arc::default() };
        lock(&self.inner.agents).insert(id, inbox);
        Hosted { endpoint: self.clone(), id }
    }
}

#[cfg(feature = "direct")]
mod serve {
    use std::pin::Pin;

    use academy_proto::pb::peer_service_server::{PeerService, PeerServiceServer};
    use futures::{Stream, StreamExt as _};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    impl Endpoint {
        /// Serves a peer endpoint on `address`: "host:port" (port 0: any
        /// free one; not `0.0.0.0` or `[::]`, which peers cannot be sent to) or
        /// "unix:/path" (a Unix-domain socket, for peers on one node), in
        /// plain HTTP/2. It takes requests only on streams whose ticket its
        /// exchange vouches for (docs/design.md, "Direct delivery"); where
        /// the network is not trusted, serve it with `Endpoint::serve_tls`.
        pub async fn serve(address: &str) -> std::io::Result<Self> {
            Self::serve_with(address, None, "http").await
        }

        /// Serves a peer endpoint over TLS on `address` ("host:port"), at
        /// `https://host:port`: senders must trust its certificate (the CA
        /// their exchange's [`Credentials`](crate::Credentials) trust) and,
        /// when `tls` names a client CA, show a certificate it signed (the
        /// one they show their exchange). Fails on a Unix socket (its
        /// peers are on this node) and on a certificate or key that is not
        /// valid PEM or does not match.
        #[cfg(feature = "tls")]
        pub async fn serve_tls(address: &str, tls: &EndpointTls) -> std::io::Result<Self> {
            let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
            if address.starts_with("unix:") {
                return Err(invalid(format!(
                    "peer endpoint {}: TLS is for TCP endpoints; a Unix socket's peers are on its node",
                    academy_proto::excerpt(address)
                )));
            }
            let acceptor =
                tls.0.acceptor().map_err(|e| invalid(format!("peer endpoint TLS: {e}")))?;
            Self::serve_with(address, Some(acceptor), "https").await
        }

        /// Serves on `address`, over TLS made by `tls` if any, at a URL of
        /// `scheme`.
        async fn serve_with(
            address: &str,
            tls: Option<Acceptor>,
            scheme: &str,
        ) -> std::io::Result<Self> {
            let stop = tokio_util::sync::CancellationToken::new();
            let (url, incoming) = listen(address, scheme).await?;
            let inner = Arc::new(Hosting {
                url,
                agents: Mutex::default(),
                exchange: std::sync::OnceLock::new(),
                vouched: Mutex::default(),
                kept: crate::blob::Kept::default(),
                stop: stop.clone(),
            });
            let service = PeerGrpc { hosting: Arc::downgrade(&inner) };
            let server = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .initial_stream_window_size(academy_proto::transport::STREAM_WINDOW_BYTES)
                .initial_connection_window_size(academy_proto::transport::CONNECTION_WINDOW_BYTES)
                .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
                .add_service(
                    PeerServiceServer::new(service)
                        .max_decoding_message_size(MAX_DIRECT_MESSAGE_BYTES)
                        .max_encoding_message_size(usize::MAX),
                );
            tokio::spawn(async move {
                let served = match (incoming, tls) {
                    #[cfg(feature = "tls")]
                    (Incoming::Tcp(listener), Some(tls)) => {
                        let stream = secured(listener, tls, stop.clone());
                        server.serve_with_incoming_shutdown(stream, stop.cancelled()).await
                    }
                    (Incoming::Tcp(listener), _) => {
                        let stream = tokio_stream::wrappers::TcpListenerStream::new(listener);
                        let stream = stream.map(|s| {
                            s.inspect(|s| {
                                let _ = s.set_nodelay(true);
                            })
                        });
                        server.serve_with_incoming_shutdown(stream, stop.cancelled()).await
                    }
                    (Incoming::Unix(listener, path), _) => {
                        let stream = tokio_stream::wrappers::UnixListenerStream::new(listener);
                        let served =
                            server.serve_with_incoming_shutdown(stream, stop.cancelled()).await;
                        let _ = std::fs::remove_file(path);
                        served
                    }
                };
                if let Err(e) = served {
                    tracing::warn!(error = %e, "peer endpoint stopped");
                }
            });
            Ok(Self { inner })
        }
    }

    /// What makes a peer endpoint's TLS connections.
    #[cfg(feature = "tls")]
    type Acceptor = academy_tls::Acceptor;
    /// Nothing: TLS needs the `tls` feature.
    #[cfg(not(feature = "tls"))]
    type Acceptor = std::convert::Infallible;

    /// Most TLS handshakes a peer endpoint runs at once; more connections
    /// wait in the listen backlog.
    #[cfg(feature = "tls")]
    const MAX_HANDSHAKES: usize = 256;
    /// How long a connection may take to finish its TLS handshake.
    #[cfg(feature = "tls")]
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

    /// The connections `listener` accepts whose TLS handshake (with `tls`'s
    /// certificate at that time) completes, until `stop`. Handshakes run
    /// beside each other, each within [`HANDSHAKE_TIMEOUT`].
    #[cfg(feature = "tls")]
    fn secured(
        listener: tokio::net::TcpListener,
        tls: Acceptor,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl Stream<
        Item = std::io::Result<academy_tls::tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    > {
        let (sender, connections) = mpsc::channel(MAX_HANDSHAKES);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors, say: try again shortly.
                        tracing::warn!(error = %e, "peer endpoint cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (sender, handshake) = (sender.clone(), tls.current());
                tokio::spawn(async move {
                    if let Some(stream) =
                        academy_tls::handshake(handshake, tcp, HANDSHAKE_TIMEOUT).await
                    {
                        drop(permit);
                        let _ = sender.send(Ok(stream)).await;
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(connections)
    }

    enum Incoming {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, std::path::PathBuf),
    }

    async fn listen(address: &str, scheme: &str) -> std::io::Result<(String, Incoming)> {
        if let Some(path) = address.strip_prefix("unix:") {
            // A socket file left by a dead process (nobody accepts on it)
            // is taken over; one a live process listens on is not, nor is
            // any other file.
            if let Ok(found) = std::fs::symlink_metadata(path) {
                use std::io::{Error, ErrorKind};
                use std::os::unix::fs::FileTypeExt as _;
                if !found.file_type().is_socket() {
                    let why = format!("peer endpoint: {path} exists and is not a socket");
                    return Err(Error::new(ErrorKind::AlreadyExists, why));
                }
                match tokio::net::UnixStream::connect(path).await {
                    // Only a refusal says nobody listens: a full backlog
                    // (EAGAIN) is a live process too.
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path)?;
                    }
                    Ok(_) => {
                        let why = format!("peer endpoint: a process listens on {path} already");
                        return Err(Error::new(ErrorKind::AddrInUse, why));
                    }
                    Err(e) => {
                        let why = format!(
                            "peer endpoint: cannot tell whether a process listens on {path}: {e}"
                        );
                        return Err(Error::new(e.kind(), why));
                    }
                }
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            return Ok((format!("unix:{path}"), Incoming::Unix(listener, path.into())));
        }
        let listener = tokio::net::TcpListener::bind(address).await?;
        let local = listener.local_addr()?;
        if local.ip().is_unspecified() {
            // Advertised as is, it would send peers on other nodes to
            // their own node.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "peer endpoint {}: an unspecified address cannot be advertised to peers; give the one they reach this process at (in Kubernetes, the pod's IP)",
                    academy_proto::excerpt(address)
                ),
            ));
        }
        let url = format!("{scheme}://{local}");
        Ok((url, Incoming::Tcp(listener)))
    }

    fn not_hosted(dest: &str) -> pb::SendResult {
        let why = format!("{} is not hosted at this endpoint", academy_proto::excerpt(dest));
        refusal(tonic::Code::Unavailable, "NOT_HOSTED", why)
    }

    struct PeerGrpc {
        hosting: Weak<Hosting>,
    }

    #[tonic::async_trait]
    impl PeerService for PeerGrpc {
        type DeliverStream =
            Pin<Box<dyn Stream<Item = Result<pb::DeliverResponse, Status>> + Send>>;

        async fn deliver(
            &self,
            request: Request<Streaming<pb::DeliverRequest>>,
        ) -> Result<Response<Self::DeliverStream>, Status> {
            // Only who may send from a mailbox through the exchange may
            // deliver from it here.
            let hosting = self.hosting()?;
            let (src, left) = vouch(&hosting, request.metadata()).await?;
            let ticket = presented(request.metadata()).unwrap_or_default().to_owned();
            let revoked = revoked(hosting, ticket);
            let reads_peer_blobs = request.metadata().contains_key(PEER_BLOBS_HEADER);
            let mut inbound = request.into_inner();
            let (out, answers) = mpsc::channel(1024);
            let hosting = self.hosting.clone();
            tokio::spawn(async move {
                // Agents refused on this stream: refused from then on.
                let mut refused = HashSet::new();
                let expired = tokio::time::sleep(left);
                tokio::pin!(expired, revoked);
                loop {
                    let request = tokio::select! {
                        () = &mut expired => {
                            let _ = out.send(Err(Status::unauthenticated("the stream's ticket expired"))).await;
                            break;
                        }
                        () = &mut revoked => {
                            let _ = out.send(Err(Status::unauthenticated("the stream's ticket was revoked"))).await;
                            break;
                        }
                        request = inbound.message() => match request {
                            Ok(Some(request)) => request,
                            _ => break,
                        },
                    };
                    let Some(hosting) = hosting.upgrade() else { break };
                    let seq = request.seq;
                    let unread = kept_args(&hosting, request.message.as_ref());
                    // Taken: answered once run. Refused: told now (and
                    // its arguments put here are not read).
                    let reply = (unread.clone(), reads_peer_blobs);
                    let Err(why) = take(&hosting, &mut refused, src, request, reply, &out) else {
                        continue;
                    };
                    if let Some(key) = unread {
                        hosting.kept.remove(&key);
                    }
                    let answer = pb::DeliverResponse { seq, outcome: Some(Outcome::Refused(why)) };
                    if out.send(Ok(answer)).await.is_err() {
                        break;
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(answers);
            Ok(Response::new(Box::pin(stream)))
        }

        async fn put_peer_blob(
            &self,
            request: Request<Streaming<pb::PutPeerBlobRequest>>,
        ) -> Result<Response<pb::PutPeerBlobResponse>, Status> {
            // It takes this process's memory: only for the exchange's own.
            let hosting = self.hosting()?;
            vouch(&hosting, request.metadata()).await?;
            let mut chunks = request.into_inner();
            let head = chunks.message().await?.unwrap_or_default();
            let size = head.size;
            let room = hosting.kept.room(size).map_err(Status::from)?;
            let mut data = bytes::BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
            let mut next = Some(head);
            while let Some(chunk) = next {
                if chunk.data.len() > academy_proto::transport::BLOB_CHUNK_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "a chunk has {} bytes, more than {}",
                        chunk.data.len(),
                        academy_proto::transport::BLOB_CHUNK_BYTES
                    )));
                }
                if (data.len() + chunk.data.len()) as u64 > size {
                    return Err(Status::invalid_argument(format!(
                        "the chunks have more bytes than the size given ({size})"
                    )));
                }
                data.extend_from_slice(&chunk.data);
                next = chunks.message().await?;
            }
            if data.len() as u64 != size {
                return Err(Status::invalid_argument(format!(
                    "the chunks have {} bytes, not the size given ({size})",
                    data.len()
                )));
            }
            let blob = room.fill(&hosting.url, data.freeze());
            let expires_in = crate::blob::PEER_TTL.try_into().ok();
            Ok(Response::new(pb::PutPeerBlobResponse { blob: Some(blob), expires_in }))
        }

        type GetPeerBlobStream =
            Pin<Box<dyn Stream<Item = Result<pb::GetPeerBlobResponse, Status>> + Send>>;

        async fn get_peer_blob(
            &self,
            request: Request<pb::GetPeerBlobRequest>,
        ) -> Result<Response<Self::GetPeerBlobStream>, Status> {
            // The key is the credential: only a message's receiver has it.
            let pb::GetPeerBlobRequest { key, offset } = request.into_inner();
            let hosting = self.hosting()?;
            let not_found =
                || Status::from(academy_proto::ExchangeError::BlobNotFound(key.clone()));
            let data = hosting.kept.get(&key).ok_or_else(not_found)?;
            let size = data.len() as u64;
            let Some(rest) = usize::try_from(offset).ok().and_then(|o| data.get(o..)) else {
                return Err(Status::invalid_argument(format!(
                    "offset {offset} is past the end of blob {key} ({size} bytes)"
                )));
            };
            let rest = data.slice_ref(rest);
            let head = pb::GetPeerBlobResponse { size, ..Default::default() };
            let chunks = crate::blob::chunk_slices(rest)
                .map(|data| Ok(pb::GetPeerBlobResponse { data, ..Default::default() }));
            // Read to its end: its one reader is done with it.
            let weak = self.hosting.clone();
            let done = futures::stream::once(async move {
                if let Some(hosting) = weak.upgrade() {
                    hosting.kept.remove(&key);
                }
                None
            })
            .filter_map(std::future::ready);
            let stream = futures::stream::iter(std::iter::once(Ok(head)).chain(chunks)).chain(done);
            Ok(Response::new(Box::pin(stream)))
        }

        async fn delete_peer_blob(
            &self,
            request: Request<pb::DeletePeerBlobRequest>,
        ) -> Result<Response<pb::DeletePeerBlobResponse>, Status> {
            let deleted = self.hosting()?.kept.remove(&request.into_inner().key).is_some();
            Ok(Response::new(pb::DeletePeerBlobResponse { deleted }))
        }
    }

    impl PeerGrpc {
        fn hosting(&self) -> Result<Arc<Hosting>, Status> {
            self.hosting.upgrade().ok_or_else(|| Status::unavailable("the endpoint is stopping"))
        }
    }

    /// Tickets kept as vouched for before the expired ones are forgotten.
    const VOUCHED_KEPT: usize = 4096;

    /// The mailbox whose ticket the request presents, and how long the
    /// ticket holds, as the exchange vouches (asked once per ticket).
    async fn vouch(
        hosting: &Hosting,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(EntityId, Duration), Status> {
        let Some(ticket) = presented(metadata) else {
            return Err(Status::unauthenticated(format!(
                "present a ticket from the exchange's IssueTicket (metadata {TICKET_HEADER})"
            )));
        };
        let now = Instant::now();
        let known = lock(&hosting.vouched).get(ticket).copied();
        if let Some(v) = known.filter(|v| v.expires > now && v.trusted_until > now) {
            return Ok((v.src, v.expires - now));
        }
        let exchange = hosting.exchange.get().cloned();
        let exchange = exchange.ok_or_else(|| Status::unavailable("no agent is hosted here"))?;
        ask(hosting, &exchange, ticket).await.map_err(|e| match e {
            ClientError::Exchange(e) => Status::from(e),
            e => Status::unavailable(format!("the ticket cannot be checked: {e}")),
        })
    }

    /// The ticket a request presents.
    fn presented(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
        metadata.get(TICKET_HEADER).and_then(|t| t.to_str().ok())
    }

    /// Asks `exchange` about `ticket`: the mailbox it is for and how long it
    /// holds, kept as its word for [`TICKET_RECHECK`]; a refused ticket is
    /// forgotten.
    async fn ask(
        hosting: &Hosting,
        exchange: &SharedExchange,
        ticket: &str,
    ) -> Result<(EntityId, Duration), ClientError> {
        let answer = exchange.check_ticket(ticket).await;
        let mut vouched = lock(&hosting.vouched);
        let (src, left) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                if refused(&e) {
                    vouched.remove(ticket);
                }
                return Err(e);
            }
        };
        let now = Instant::now();
        if vouched.len() >= VOUCHED_KEPT {
            vouched.retain(|_, v| v.expires > now);
            if vouched.len() >= VOUCHED_KEPT {
                vouched.clear();
            }
        }
        let trusted_until = now + TICKET_RECHECK;
        vouched.insert(ticket.to_owned(), Vouched { src, expires: now + left, trusted_until });
        Ok((src, left))
    }

    /// The exchange refused the ticket (unknown, expired or revoked).
    fn refused(error: &ClientError) -> bool {
        matches!(error, ClientError::Exchange(academy_proto::ExchangeError::Unauthenticated(_)))
    }

    /// Completes once the exchange refuses `ticket`, of a stream that
    /// `vouch` let in (its token revoked), asked every [`TICKET_RECHECK`].
    /// An exchange that cannot answer ends nothing.
    fn revoked(hosting: Arc<Hosting>, ticket: String) -> impl Future<Output = ()> + Send + 'static {
        let exchange = hosting.exchange.get().cloned();
        let weak = Arc::downgrade(&hosting);
        async move {
            // vouch let the stream in: the exchange that vouched is there.
            let Some(exchange) = exchange else { return std::future::pending().await };
            loop {
                tokio::time::sleep(TICKET_RECHECK).await;
                let Some(hosting) = weak.upgrade() else { return };
                // Another stream with this ticket may have asked just now.
                let trusted = lock(&hosting.vouched).get(&ticket).map(|v| v.trusted_until);
                if trusted.is_some_and(|until| until > Instant::now()) {
                    continue;
                }
                match ask(&hosting, &exchange, &ticket).await {
                    Err(e) if refused(&e) => return,
                    Err(e) => tracing::debug!(error = %e, "cannot check a stream's ticket again"),
                    Ok(_) => {}
                }
            }
        }
    }

    /// The key of the blob kept here that `message`'s arguments are in.
    fn kept_args(hosting: &Hosting, message: Option<&pb::Message>) -> Option<String> {
        let Some(Body::ActionRequest(request)) = message.and_then(|m| m.body.as_ref()) else {
            return None;
        };
        let blob = request.args.as_ref()?.blob.as_ref()?;
        hosting.keeps(blob).then(|| blob.key.clone())
    }

    /// Hands a request to the agent it is for, if hosted here.
    fn take(
        hosting: &Arc<Hosting>,
        refused: &mut HashSet<String>,
        src: EntityId,
        request: pb::DeliverRequest,
        (unread, reads_peer_blobs): (Option<String>, bool),
        out: &mpsc::Sender<Result<pb::DeliverResponse, Status>>,
    ) -> Result<(), pb::SendResult> {
        let invalid = |why: &str| refusal(tonic::Code::InvalidArgument, "INVALID_ARGUMENT", why);
        let Some(message) = request.message else { return Err(invalid("message is missing")) };
        if !matches!(message.body, Some(Body::ActionRequest(_))) {
            return Err(invalid("only action requests are delivered directly"));
        }
        let from = message.header.as_ref().map(|h| h.src.as_str()).unwrap_or_default();
        if from.parse::<EntityId>().ok() != Some(src) {
            let why = format!(
                "header.src {} is not {src}, the mailbox this stream's ticket is for",
                academy_proto::excerpt(from)
            );
            return Err(refusal(tonic::Code::PermissionDenied, "NOT_OWNER", why));
        }
        let dest = message.header.as_ref().map(|h| h.dest.clone()).unwrap_or_default();
        // The sender settled what was refused: its order is safe again.
        if request.resume {
            refused.remove(&dest);
        }
        if refused.contains(&dest) {
            return Err(not_hosted(&dest));
        }
        let Some(inbox) = dest.parse().ok().and_then(|id| lock(&hosting.agents).get(&id).cloned())
        else {
            refused.insert(dest.clone());
            return Err(not_hosted(&dest));
        };
        let Some(waiting) = inbox.waiting.admit(prost::Message::encoded_len(&message)) else {
            // Through the exchange, this one and the next: its bounds apply.
            refused.insert(dest.clone());
            let why = format!(
                "{} holds {MAX_WAITING} requests or {MAX_WAITING_BYTES} bytes that came directly",
                academy_proto::excerpt(&dest)
            );
            return Err(refusal(tonic::Code::ResourceExhausted, "DIRECT_FULL", why));
        };
        let reply = Reply {
            seq: request.seq,
            out: Some(out.clone()),
            waiting: Some(waiting),
            hosting: Arc::downgrade(hosting),
            unread,
            reads_peer_blobs,
        };
        match inbox.requests.send((reply, message)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError((mut reply, _))) => {
                reply.out = None;
                refused.insert(dest.clone());
                Err(not_hosted(&dest))
            }
        }
    }
}

// ------------------------------------------------------------------ sending

/// A sender's direct paths: per destination, the peer it delivers to (or
/// none: the exchange), and the peers it is connected to.
#[derive(Debug)]
pub(crate) struct Direct {
    exchange: SharedExchange,
    /// The mailbox it sends from, and its ticket for peers, until when.
    src: EntityId,
    ticket: tokio::sync::Mutex<Option<(String, Instant)>>,
    pending: Pending,
    routes: Mutex<HashMap<EntityId, Arc<tokio::sync::Mutex<Route>>>>,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    /// Endpoints that could not be reached, until when they are not tried.
    unreachable: Mutex<HashMap<String, Instant>>,
    /// Requests sent and not answered yet, by destination (either path).
    unanswered: Mutex<HashMap<EntityId, HashSet<String>>>,
    /// Told whenever a peer's requests for a destination were resent or answered.
    progress: Notify,
    /// Where large arguments go when not to a peer.
    stores: Arc<Stores>,
    /// The blobs of requests resent through the exchange, by tag: freed
    /// when their call is over.
    resent: Mutex<HashMap<String, Freed>>,
}

#[derive(Debug, Default)]
struct Route {
    /// The peer requests go to now; none: the exchange.
    peer: Option<Arc<Peer>>,
    /// The peer they went to last, which may still hold some to resend.
    last: Option<Arc<Peer>>,
    /// When the endpoint was last looked up.
    looked_up: Option<Instant>,
}

impl Direct {
    pub(crate) fn new(
        exchange: SharedExchange,
        src: EntityId,
        pending: Pending,
        stores: Arc<Stores>,
    ) -> Arc<Self> {
        Arc::new(Self {
            stores,
            resent: Mutex::default(),
            exchange,
            src,
            ticket: tokio::sync::Mutex::default(),
            pending,
            routes: Mutex::default(),
            peers: Mutex::default(),
            unreachable: Mutex::default(),
            unanswered: Mutex::default(),
            progress: Notify::new(),
        })
    }

    fn route(&self, dest: EntityId) -> Arc<tokio::sync::Mutex<Route>> {
        let mut routes = lock(&self.routes);
        if routes.len() >= ROUTES_KEPT && !routes.contains_key(&dest) {
            // Forget the routes nobody uses now (no call holds one, none has
            // a peer or a request unanswered): a sender that called many
            // agents once does not keep them all.
            let unanswered = lock(&self.unanswered);
            routes.retain(|dest, route| {
                Arc::strong_count(route) > 1
                    || unanswered.contains_key(dest)
                    || route.try_lock().map_or(true, |r| {
                        r.peer.is_some() || r.last.as_ref().is_some_and(|p| p.has_refused(*dest))
                    })
            });
            lock(&self.peers).retain(|_, peer| !peer.is_broken());
        }
        routes.entry(dest).or_default().clone()
    }

    /// Sends `message` directly when it can, through the exchange otherwise:
    /// `Ok` once on its way to a peer (if the peer does not take it, it is
    /// resent through the exchange, and its caller told if that fails too)
    /// or queued by the exchange. Large arguments go to the peer's blob
    /// store (or, through the exchange, to its); what is to be freed once
    /// the call is over comes back.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut message: pb::Message,
    ) -> Result<Option<Freed>, ClientError> {
        let header = message.header.as_ref();
        let direct_kind = matches!(message.body, Some(Body::ActionRequest(_)))
            && header.is_some_and(|h| !h.on_clock);
        let dest = header.and_then(|h| h.dest.parse::<EntityId>().ok());
        let (Some(dest), true) = (dest, direct_kind) else {
            return self.stores.send(message).await;
        };
        let tag = header.map(|h| h.tag.clone()).unwrap_or_default();
        let route = self.route(dest);
        loop {
            let progress = self.progress.notified();
            let mut route = route.lock().await;
            // Requests a peer refused (or left unanswered) go first,
            // resent through the exchange: nothing may overtake them.
            if route.last.as_ref().is_some_and(|p| p.has_refused(dest)) {
                drop(route);
                progress.await;
                continue;
            }
            let peer = self.choose(&mut route, dest).await;
            lock(&self.unanswered).entry(dest).or_default().insert(tag.clone());
            if let Some(peer) = peer {
                let mut wire = message.clone();
                let large = self.stores.has_large_args(&mut wire);
                // Boxed: the calls that never get here do not carry its state.
                let put =
                    if large { Box::pin(self.put_at(&peer, wire)).await } else { Ok((wire, None)) };
                let (wire, freed) = match put {
                    Ok(put) => put,
                    Err(e) => {
                        self.answered(dest, &tag);
                        return Err(e);
                    }
                };
                match peer.push(dest, wire, message) {
                    Ok(()) => return Ok(freed),
                    Err(original) => message = *original,
                }
            }
            route.peer = None;
            drop(route);
            let sent = self.stores.send(message).await;
            if sent.is_err() {
                self.answered(dest, &tag);
            }
            return sent;
        }
    }

    /// `wire`, whose arguments are large, as it goes to `peer`: they are
    /// put at its endpoint (else kept as the exchange's route would), and
    /// what to free once the call is over.
    async fn put_at(
        &self,
        peer: &Peer,
        mut wire: pb::Message,
    ) -> Result<(pb::Message, Option<Freed>), ClientError> {
        let data = match args_of(&mut wire) {
            Some(args) if !self.stores.has_dir() => args.data.clone(),
            _ => return self.stores.offload_request(wire).await,
        };
        let put = async {
            let credentials = self.exchange.peer_credentials();
            crate::blob::put_at_peer(&peer.url, &credentials, &self.ticket().await?, data).await
        };
        match put.await {
            Ok(blob) => {
                if let Some(args) = args_of(&mut wire) {
                    args.data = bytes::Bytes::new();
                    args.blob = Some(blob);
                }
                // Its receiver frees it, once read or refused.
                Ok((wire, None))
            }
            Err(e) => {
                tracing::debug!(endpoint = peer.url, error = %e, "cannot put a blob at a peer endpoint; keeping it in a store of ours");
                self.stores.offload_request(wire).await
            }
        }
    }

    /// Request `tag`'s call is over: what its resending kept is freed.
    pub(crate) fn forget(&self, tag: &str) {
        let mut resent = lock(&self.resent);
        if !resent.is_empty() {
            resent.remove(tag);
        }
    }

    /// The peer to deliver to `dest` now, if any: the current one while it
    /// works; a new one only while nothing sent to `dest` is unanswered.
    async fn choose(self: &Arc<Self>, route: &mut Route, dest: EntityId) -> Option<Arc<Peer>> {
        if let Some(peer) = &route.peer {
            if !peer.is_broken() {
                return Some(peer.clone());
            }
            route.peer = None;
        }
        if lock(&self.unanswered).get(&dest).is_some_and(|t| !t.is_empty()) {
            return None;
        }
        if route.looked_up.is_some_and(|t| t.elapsed() < LOOKUP_EVERY) {
            return None;
        }
        route.looked_up = Some(Instant::now());
        // Boxed: a look-up and a connection are a large state that every
        // call's future would otherwise carry (and copy), though few look up.
        let peer = Box::pin(self.look_up(dest)).await?;
        route.peer = Some(peer.clone());
        route.last = Some(peer.clone());
        Some(peer)
    }

    /// The peer at `dest`'s endpoint, if it advertises one and it answers.
    async fn look_up(self: &Arc<Self>, dest: EntityId) -> Option<Arc<Peer>> {
        let status = self.exchange.status(&dest).await.ok()?;
        if status.endpoint.is_empty() {
            return None;
        }
        self.peer(&status.endpoint).await
    }

    /// The connection to the peer at `url`, opened if needed. One that
    /// could not be reached is tried again in the background, at most every
    /// [`UNREACHABLE_FOR`]: calls go on through the exchange meanwhile, and
    /// directly once a later look-up finds it open.
    async fn peer(self: &Arc<Self>, url: &str) -> Option<Arc<Peer>> {
        if let Some(peer) = lock(&self.peers).get(url).filter(|p| !p.is_broken()) {
            return Some(peer.clone());
        }
        {
            let mut unreachable = lock(&self.unreachable);
            if let Some(until) = unreachable.get_mut(url) {
                if Instant::now() < *until {
                    return None;
                }
                *until = Instant::now() + UNREACHABLE_FOR;
                let (direct, url) = (self.clone(), url.to_owned());
                tokio::spawn(async move { direct.open_peer(&url).await });
                return None;
            }
        }
        self.open_peer(url).await
    }

    /// Opens a connection to the peer at `url`; the peer, or `None` (and
    /// `url` marked unreachable for a while).
    async fn open_peer(self: &Arc<Self>, url: &str) -> Option<Arc<Peer>> {
        let ticket = match self.ticket().await {
            Ok(ticket) => ticket,
            Err(e) => {
                tracing::debug!(error = %e, "no ticket for direct delivery; using the exchange");
                return None;
            }
        };
        let credentials = self.exchange.peer_credentials();
        let opened = Peer::open(url, &credentials, &ticket, Arc::downgrade(self));
        let opened = tokio::time::timeout(PEER_TIMEOUT * 2, opened);
        let why = match opened.await {
            Ok(Ok(peer)) => {
                lock(&self.peers).insert(url.to_owned(), peer.clone());
                lock(&self.unreachable).remove(url);
                return Some(peer);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in time".to_owned(),
        };
        tracing::debug!(endpoint = url, %why, "peer endpoint not reachable; using the exchange");
        let mut unreachable = lock(&self.unreachable);
        // Kept a while after they expire, so that the next try of each is
        // in the background too.
        unreachable.retain(|_, until| Instant::now() < *until + UNREACHABLE_FOR * 12);
        unreachable.insert(url.to_owned(), Instant::now() + UNREACHABLE_FOR);
        None
    }

    /// Its ticket, a new one when the last is (nearly) expired.
    async fn ticket(&self) -> Result<String, ClientError> {
        let mut ticket = self.ticket.lock().await;
        if let Some((ticket, until)) = &*ticket
            && Instant::now() < *until
        {
            return Ok(ticket.clone());
        }
        let (issued, ttl) = self.exchange.issue_ticket(&self.src).await?;
        // Renewed with a margin, so a stream opened now lives a while.
        *ticket = Some((issued.clone(), Instant::now() + ttl / 2));
        Ok(issued)
    }

    /// An answer to request `tag` to `dest` arrived (by either path).
    pub(crate) fn answered(&self, dest: EntityId, tag: &str) {
        let mut unanswered = lock(&self.unanswered);
        if let Some(tags) = unanswered.get_mut(&dest) {
            tags.remove(tag);
            if tags.is_empty() {
                unanswered.remove(&dest);
            }
        }
    }

    /// Resends through the exchange, in order, what `peer` refused or can
    /// no longer answer for `dest`, up to the first request it still holds
    /// as accepted (which its answer, or refusal, will move past).
    async fn resend(&self, peer: &Peer, dest: EntityId) {
        let route = self.route(dest);
        let mut route = route.lock().await;
        if route.peer.as_ref().is_some_and(|p| std::ptr::eq(&**p, peer)) {
            route.peer = None;
            route.looked_up = Some(Instant::now());
        }
        while let Some(request) = peer.next_refused(dest) {
            let tag = request.message.header.as_ref().map(|h| h.tag.clone()).unwrap_or_default();
            match self.stores.send(request.message).await {
                Ok(None) => {}
                Ok(Some(freed)) => {
                    // Kept until the call is over, unless it is already
                    // (its caller forgets it after it stops waiting).
                    let pending = lock(&self.pending);
                    if pending.contains_key(&tag) {
                        lock(&self.resent).insert(tag, freed);
                    }
                }
                Err(e) => {
                    // Its caller waits for an answer: tell it why none comes.
                    self.answered(dest, &tag);
                    if let Some(waiter) = lock(&self.pending).remove(&tag) {
                        let _ = waiter.send(Err(e));
                    }
                }
            }
        }
        drop(route);
        self.progress.notify_waiters();
    }

    /// Hands an answer that came directly to the call waiting for it.
    fn deliver(&self, dest: EntityId, mut answer: pb::Message) {
        let tag = answer.header.as_ref().map(|h| h.tag.clone()).unwrap_or_default();
        self.answered(dest, &tag);
        let waiter = lock(&self.pending).remove(&tag);
        match waiter {
            Some(waiter) => drop(waiter.send(Ok(answer))),
            // Its caller gave up: nobody reads the result's blob.
            None => self.stores.free(crate::blob::result_blob(&mut answer).map(|b| &*b)),
        }
        self.progress.notify_waiters();
    }
}

/// One `Deliver` stream to a peer endpoint.
#[derive(Debug)]
struct Peer {
    url: String,
    requests: mpsc::UnboundedSender<pb::DeliverRequest>,
    state: Mutex<PeerState>,
}

#[derive(Debug, Default)]
struct PeerState {
    next: u64,
    /// Requests not answered yet, in the order sent.
    held: BTreeMap<u64, Held>,
    /// How many of them are to resend.
    refused: usize,
    /// Destinations it refused a request for, whose next request here
    /// says `resume`: sent only once everything to them is answered.
    refusers: HashSet<EntityId>,
    broken: bool,
}

impl PeerState {
    /// Marks the requests from `from` on that `which` picks as to resend.
    fn refuse(&mut self, which: impl Fn(&Held) -> bool, from: u64) {
        for held in self.held.range_mut(from..).map(|(_, h)| h) {
            if !held.refused && which(held) {
                held.refused = true;
                self.refused += 1;
            }
        }
    }
}

#[derive(Debug)]
struct Held {
    dest: EntityId,
    /// The request, its arguments inline even if they went by reference.
    message: pb::Message,
    /// Refused, or unanswered on a broken stream: to resend.
    refused: bool,
}

impl Peer {
    async fn open(
        url: &str,
        credentials: &crate::Credentials,
        ticket: &str,
        direct: Weak<Direct>,
    ) -> Result<Arc<Self>, ClientError> {
        let endpoint = credentials.endpoint(url)?;
        let endpoint = crate::exchange::tuned(endpoint, PEER_TIMEOUT, PEER_TIMEOUT)
            .keep_alive_timeout(PEER_TIMEOUT);
        let channel = credentials.open(endpoint, url).await?;
        let mut rpc = pb::peer_service_client::PeerServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let (requests, outgoing) = mpsc::unbounded_channel();
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing);
        let mut request = tonic::Request::new(outgoing);
        let ticket = ticket.parse().map_err(|_| ClientError::Transport("a bad ticket".into()))?;
        request.metadata_mut().insert(TICKET_HEADER, ticket);
        request
            .metadata_mut()
            .insert(PEER_BLOBS_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        let answers = rpc.deliver(request).await?.into_inner();
        let peer = Arc::new(Self { url: url.to_owned(), requests, state: Mutex::default() });
        tokio::spawn(read(peer.clone(), answers, direct));
        Ok(peer)
    }

    fn is_broken(&self) -> bool {
        lock(&self.state).broken
    }

    /// Whether it holds requests for `dest` to resend.
    fn has_refused(&self, dest: EntityId) -> bool {
        let state = lock(&self.state);
        state.refused > 0 && state.held.values().any(|h| h.dest == dest && h.refused)
    }

    /// Sends request `wire`, holding its `original` until answered; the
    /// original back if the stream broke.
    fn push(
        &self,
        dest: EntityId,
        wire: pb::Message,
        original: pb::Message,
    ) -> Result<(), Box<pb::Message>> {
        let mut state = lock(&self.state);
        if state.broken {
            return Err(Box::new(original));
        }
        state.next += 1;
        let seq = state.next;
        // Pushed again to a destination that refused here: the route chose
        // this peer only once nothing sent to it was unanswered.
        let resume = !state.refusers.is_empty() && state.refusers.remove(&dest);
        let request = pb::DeliverRequest { seq, message: Some(wire), resume };
        if self.requests.send(request).is_err() {
            state.refusers.extend(resume.then_some(dest));
            return Err(Box::new(original));
        }
        state.held.insert(seq, Held { dest, message: original, refused: false });
        Ok(())
    }

    /// The first request held for `dest`, if it is one to resend.
    fn next_refused(&self, dest: EntityId) -> Option<Held> {
        let mut state = lock(&self.state);
        let (seq, held) = state.held.iter().find(|(_, h)| h.dest == dest)?;
        if !held.refused {
            return None;
        }
        let seq = *seq;
        state.refused -= 1;
        state.held.remove(&seq)
    }
}

/// Reads a peer's outcomes until its stream ends; then everything it held
/// is resent through the exchange.
async fn read(
    peer: Arc<Peer>,
    mut answers: tonic::Streaming<pb::DeliverResponse>,
    direct: Weak<Direct>,
) {
    loop {
        let next = answers.message().await;
        let Some(direct) = direct.upgrade() else { return };
        let (seq, outcome) = match next {
            Ok(Some(pb::DeliverResponse { seq, outcome: Some(outcome) })) => (seq, outcome),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        };
        match outcome {
            Outcome::Answer(mut answer) => {
                // A result kept at a peer endpoint is read at this one.
                if let Some(blob) = crate::blob::result_blob(&mut answer)
                    && blob.store == crate::blob::PEER_STORE
                {
                    blob.endpoint.clone_from(&peer.url);
                }
                let held = lock(&peer.state).held.remove(&seq);
                if let Some(held) = held {
                    direct.deliver(held.dest, answer);
                    // What waited behind it may be resent now.
                    if peer.has_refused(held.dest) {
                        direct.resend(&peer, held.dest).await;
                    }
                }
            }
            Outcome::Refused(why) => {
                let dest = {
                    let mut state = lock(&peer.state);
                    let Some(dest) = state.held.get(&seq).map(|h| h.dest) else { continue };
                    // Every later request for it is refused too, until one
                    // says `resume`.
                    state.refuse(|h| h.dest == dest, seq);
                    state.refusers.insert(dest);
                    dest
                };
                tracing::debug!(%dest, reason = why.reason, "peer refused a request; resending it through the exchange");
                direct.resend(&peer, dest).await;
            }
        }
    }
    // Unanswered on a broken stream: not proven taken, so resent.
    let dests: Vec<EntityId> = {
        let mut state = lock(&peer.state);
        state.broken = true;
        state.refuse(|_| true, 0);
        let dests: HashSet<EntityId> = state.held.values().map(|h| h.dest).collect();
        dests.into_iter().collect()
    };
    if let Some(direct) = direct.upgrade() {
        for dest in dests {
            direct.resend(&peer, dest).await;
        }
        direct.progress.notify_waiters();
    }
}

#[cfg(all(test, feature = "embedded"))]
mod tests {
    use super::*;

    /// A sender that called many agents once keeps a bounded number of routes.
    #[tokio::test]
    async fn routes_to_agents_called_once_are_forgotten() {
        let exchange: SharedExchange = Arc::new(crate::exchange::LocalExchange::default());
        let src = exchange.register_client().await.unwrap();
        let stores = crate::blob::Stores::new(exchange.clone(), src, None);
        let direct = Direct::new(exchange.clone(), src, Pending::default(), stores);
        for _ in 0..ROUTES_KEPT + 10 {
            let header = pb::Header {
                src: src.to_string(),
                dest: EntityId::new_agent().to_string(),
                tag: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            };
            let body = Body::ActionRequest(pb::ActionRequest { action: "x".into(), args: None });
            let sent = direct.send(pb::Message { header: Some(header), body: Some(body) }).await;
            assert!(sent.is_err(), "no such agent");
        }
        let routes = lock(&direct.routes).len();
        assert!(routes < ROUTES_KEPT, "{routes} routes kept");
        assert!(lock(&direct.unanswered).is_empty());
    }
}
