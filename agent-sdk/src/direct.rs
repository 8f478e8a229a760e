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
use crate::exchange::SharedExchange;

/// How long a destination's endpoint, once looked up (found or not), is
/// trusted before it is looked up again.
const LOOKUP_EVERY: Duration = Duration::from_secs(1);
/// Longest wait to connect to a peer endpoint, and to hear from an idle one.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// `Deliver` streams one connection to a peer endpoint may have open.
#[cfg(feature = "direct")]
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Destinations whose routes are kept before the idle ones are forgotten.
const ROUTES_KEPT: usize = 4096;
/// How long an endpoint that could not be reached is not tried again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// The metadata of a `Deliver` stream that carries its ticket.
const TICKET_HEADER: &str = "academy-ticket";

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
        if let Err(mpsc::error::TrySendError::Full(response)) = out.try_send(Ok(response))
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { drop(out.send(response).await) });
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // Built only if the sender was not told yet (not after an answer).
        self.finish(|| {
            let why = "the agent stopped before running it";
            Outcome::Refused(refusal(tonic::Code::Unavailable, "NOT_RUN", why))
        });
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
    stop: tokio_util::sync::CancellationToken,
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
    pub(crate) fn url(&self) -> &str {
        self.endpoint.url()
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
        /// free one) or "unix:/path" (a Unix-domain socket, for peers on one
        /// node). Serve it on an address only the exchange's other clients
        /// can reach: it takes requests for its agents from anyone who
        /// reaches it (docs/design.md, "Direct delivery").
        pub async fn serve(address: &str) -> std::io::Result<Self> {
            let stop = tokio_util::sync::CancellationToken::new();
            let (url, incoming) = listen(address).await?;
            let inner = Arc::new(Hosting {
                url,
                agents: Mutex::default(),
                exchange: std::sync::OnceLock::new(),
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
                let served = match incoming {
                    Incoming::Tcp(listener) => {
                        let stream = tokio_stream::wrappers::TcpListenerStream::new(listener);
                        let stream = stream.map(|s| {
                            s.inspect(|s| {
                                let _ = s.set_nodelay(true);
                            })
                        });
                        server.serve_with_incoming_shutdown(stream, stop.cancelled()).await
                    }
                    Incoming::Unix(listener, path) => {
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

    enum Incoming {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, std::path::PathBuf),
    }

    async fn listen(address: &str) -> std::io::Result<(String, Incoming)> {
        if let Some(path) = address.strip_prefix("unix:") {
            // A socket file left by a dead process is taken over.
            if std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path)?;
            return Ok((format!("unix:{path}"), Incoming::Unix(listener, path.into())));
        }
        let listener = tokio::net::TcpListener::bind(address).await?;
        let url = format!("http://{}", listener.local_addr()?);
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
            // deliver from it here: the exchange vouches for the ticket.
            let ticket = request.metadata().get(TICKET_HEADER).and_then(|t| t.to_str().ok());
            let Some(ticket) = ticket.map(str::to_owned) else {
                return Err(Status::unauthenticated(format!(
                    "present a ticket from the exchange's IssueTicket (metadata {TICKET_HEADER})"
                )));
            };
            let exchange = self.hosting.upgrade().and_then(|h| h.exchange.get().cloned());
            let exchange =
                exchange.ok_or_else(|| Status::unavailable("no agent is hosted here"))?;
            let (src, left) = exchange.check_ticket(&ticket).await.map_err(|e| match e {
                ClientError::Exchange(e) => Status::from(e),
                e => Status::unavailable(format!("the ticket cannot be checked: {e}")),
            })?;
            let mut inbound = request.into_inner();
            let (out, answers) = mpsc::channel(1024);
            let hosting = self.hosting.clone();
            tokio::spawn(async move {
                // Agents refused on this stream: refused from then on.
                let mut refused = HashSet::new();
                let expired = tokio::time::sleep(left);
                tokio::pin!(expired);
                loop {
                    let request = tokio::select! {
                        () = &mut expired => {
                            let _ = out.send(Err(Status::unauthenticated("the stream's ticket expired"))).await;
                            break;
                        }
                        request = inbound.message() => match request {
                            Ok(Some(request)) => request,
                            _ => break,
                        },
                    };
                    let Some(hosting) = hosting.upgrade() else { break };
                    let seq = request.seq;
                    // Taken: answered once run. Refused: told now.
                    let Err(why) = take(&hosting, &mut refused, src, request, &out) else {
                        continue;
                    };
                    let answer = pb::DeliverResponse { seq, outcome: Some(Outcome::Refused(why)) };
                    if out.send(Ok(answer)).await.is_err() {
                        break;
                    }
                }
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(answers);
            Ok(Response::new(Box::pin(stream)))
        }
    }

    /// Hands a request to the agent it is for, if hosted here.
    fn take(
        hosting: &Hosting,
        refused: &mut HashSet<String>,
        src: EntityId,
        request: pb::DeliverRequest,
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
        let reply = Reply { seq: request.seq, out: Some(out.clone()), waiting: Some(waiting) };
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
    pub(crate) fn new(exchange: SharedExchange, src: EntityId, pending: Pending) -> Arc<Self> {
        Arc::new(Self {
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
    /// or queued by the exchange.
    pub(crate) async fn send(self: &Arc<Self>, message: pb::Message) -> Result<(), ClientError> {
        let header = message.header.as_ref();
        let direct_kind = matches!(message.body, Some(Body::ActionRequest(_)))
            && header.is_some_and(|h| !h.on_clock);
        let dest = header.and_then(|h| h.dest.parse::<EntityId>().ok());
        let (Some(dest), true) = (dest, direct_kind) else {
            return self.exchange.send(message).await;
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
            if peer.is_some_and(|peer| peer.push(dest, &message)) {
                return Ok(());
            }
            route.peer = None;
            drop(route);
            let sent = self.exchange.send(message).await;
            if sent.is_err() {
                self.answered(dest, &tag);
            }
            return sent;
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
        let status = self.exchange.status(&dest).await.ok()?;
        if status.endpoint.is_empty() {
            return None;
        }
        let peer = self.peer(&status.endpoint).await?;
        route.peer = Some(peer.clone());
        route.last = Some(peer.clone());
        Some(peer)
    }

    /// The connection to the peer at `url`, opened if needed.
    async fn peer(self: &Arc<Self>, url: &str) -> Option<Arc<Peer>> {
        if let Some(peer) = lock(&self.peers).get(url).filter(|p| !p.is_broken()) {
            return Some(peer.clone());
        }
        if lock(&self.unreachable).get(url).is_some_and(|until| Instant::now() < *until) {
            return None;
        }
        let ticket = match self.ticket().await {
            Ok(ticket) => ticket,
            Err(e) => {
                tracing::debug!(error = %e, "no ticket for direct delivery; using the exchange");
                return None;
            }
        };
        let opened = Peer::open(url, &ticket, Arc::downgrade(self));
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
        unreachable.retain(|_, until| Instant::now() < *until);
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
            if let Err(e) = self.exchange.send(request.message).await {
                // Its caller waits for an answer: tell it why none comes.
                self.answered(dest, &tag);
                if let Some(waiter) = lock(&self.pending).remove(&tag) {
                    let _ = waiter.send(Err(e));
                }
            }
        }
        drop(route);
        self.progress.notify_waiters();
    }

    /// Hands an answer that came directly to the call waiting for it.
    fn deliver(&self, dest: EntityId, answer: pb::Message) {
        let tag = answer.header.as_ref().map(|h| h.tag.clone()).unwrap_or_default();
        self.answered(dest, &tag);
        if let Some(waiter) = lock(&self.pending).remove(&tag) {
            let _ = waiter.send(Ok(answer));
        }
        self.progress.notify_waiters();
    }
}

/// One `Deliver` stream to a peer endpoint.
#[derive(Debug)]
struct Peer {
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
    message: pb::Message,
    /// Refused, or unanswered on a broken stream: to resend.
    refused: bool,
}

impl Peer {
    async fn open(url: &str, ticket: &str, direct: Weak<Direct>) -> Result<Arc<Self>, ClientError> {
        let endpoint = crate::credentials::Credentials::none().endpoint(url)?;
        let endpoint = crate::exchange::tuned(endpoint, PEER_TIMEOUT, PEER_TIMEOUT)
            .keep_alive_timeout(PEER_TIMEOUT);
        let channel = crate::credentials::open(endpoint, url).await?;
        let mut rpc = pb::peer_service_client::PeerServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let (requests, outgoing) = mpsc::unbounded_channel();
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing);
        let mut request = tonic::Request::new(outgoing);
        let ticket = ticket.parse().map_err(|_| ClientError::Transport("a bad ticket".into()))?;
        request.metadata_mut().insert(TICKET_HEADER, ticket);
        let answers = rpc.deliver(request).await?.into_inner();
        let peer = Arc::new(Self { requests, state: Mutex::default() });
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

    /// Sends a request, held until answered; false if the stream broke.
    fn push(&self, dest: EntityId, message: &pb::Message) -> bool {
        let mut state = lock(&self.state);
        if state.broken {
            return false;
        }
        state.next += 1;
        let seq = state.next;
        let request = pb::DeliverRequest { seq, message: Some(message.clone()) };
        if self.requests.send(request).is_err() {
            return false;
        }
        state.held.insert(seq, Held { dest, message: message.clone(), refused: false });
        true
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
            Outcome::Answer(answer) => {
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
                    // Every later request for it is refused too.
                    state.refuse(|h| h.dest == dest, seq);
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
        let direct = Direct::new(exchange.clone(), src, Pending::default());
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
