//! Clients of an exchange: [`GrpcExchange`] talks gRPC to an exchange-server,
//! [`LocalExchange`] (feature `embedded`) uses one in this process. Agents,
//! handles and the manager reach the exchange through [`ExchangeApi`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use academy_proto::MailboxStatus;
pub use academy_proto::pb::MailboxState;
use academy_proto::pb::{
    self, blob_service_client::BlobServiceClient as BlobClient,
    clock_service_client::ClockServiceClient as ClockClient,
    exchange_service_client::ExchangeServiceClient as RpcClient, session_request::Op,
    session_response::Op as Answer,
};
use academy_proto::transport::{CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES};
use academy_proto::{ClockStatus, EntityId, ExchangeError, RegisteredAgent, duration};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tonic::transport::{Channel, Endpoint};

use crate::credentials::{Authorized, Credentials};
use crate::session::Sessions;
use crate::{ClientError, Matching};

/// Messages delivered to a subscriber, batch by batch.
pub type DeliveryStream = BoxStream<'static, Result<Vec<pb::Delivery>, ClientError>>;

/// A blob's bytes, chunk by chunk (docs/design.md, "Blobs").
pub type BlobChunks = BoxStream<'static, Result<bytes::Bytes, ClientError>>;

/// A blob being read: its length, its SHA-256, and its bytes from the
/// offset asked.
pub struct BlobRead {
    /// Its length in bytes.
    pub size: u64,
    /// Its SHA-256, as its store computed it.
    pub sha256: Vec<u8>,
    /// Its bytes.
    pub chunks: BlobChunks,
}

impl fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobRead").field("size", &self.size).finish_non_exhaustive()
    }
}

/// What the SDK needs of an exchange (the calls of `academy.v1.ExchangeService`).
/// Implemented by [`GrpcExchange`] and [`LocalExchange`]; shared as
/// [`SharedExchange`].
#[async_trait::async_trait]
pub trait ExchangeApi: Send + Sync + fmt::Debug + 'static {
    /// Creates the mailbox of a new agent (with `id`, or a fresh one) and
    /// publishes what it can do.
    async fn register_agent(
        &self,
        behaviour: &str,
        implements: &[&str],
        name: &str,
        id: Option<EntityId>,
        description: Option<pb::AgentDescription>,
    ) -> Result<EntityId, ClientError>;
    /// Creates the mailbox of a new client.
    async fn register_client(&self) -> Result<EntityId, ClientError>;
    /// Terminates a mailbox (idempotent).
    async fn terminate(&self, id: &EntityId) -> Result<(), ClientError>;
    /// The state of a mailbox.
    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ClientError>;
    /// Every active agent listing behaviour `name` (all of them for the
    /// empty name), in id order.
    async fn discover(
        &self,
        name: &str,
        matching: Matching,
    ) -> Result<Vec<RegisteredAgent>, ClientError>;
    /// Queues a message in its destination's mailbox.
    async fn send(&self, message: pb::Message) -> Result<(), ClientError>;
    /// Becomes the subscriber of a mailbox, as incarnation `epoch` of its
    /// agent (its launcher placement; 0: none): once a later incarnation
    /// subscribed, an earlier one is refused
    /// ([`ExchangeError::StaleEpoch`]). A non-empty `endpoint` advertises
    /// where the subscriber also takes requests directly (docs/design.md,
    /// "Direct delivery").
    async fn subscribe(
        &self,
        id: &EntityId,
        epoch: u64,
        endpoint: &str,
    ) -> Result<DeliveryStream, ClientError>;
    /// Removes delivered messages.
    async fn acknowledge(&self, id: &EntityId, seqs: Vec<u64>) -> Result<(), ClientError>;
    /// Commits what agent `id` did, in one atomic step (docs/design.md,
    /// "State"): saves its state (`save.data` unset keeps it), acknowledges
    /// `seqs` and queues `answers`; the revision saved (or kept) and one
    /// result per answer. Refused whole when the save or a seq is.
    async fn commit(
        &self,
        save: pb::SaveStateRequest,
        seqs: Vec<u64>,
        answers: Vec<pb::Message>,
    ) -> Result<Committed, ClientError>;
    /// Saves agent `id`'s state as its incarnation `epoch` (a commit of the
    /// state alone); the revision saved.
    async fn save_state(
        &self,
        id: &EntityId,
        epoch: u64,
        data: pb::Payload,
        version: u32,
    ) -> Result<u64, ClientError> {
        let save = pb::SaveStateRequest {
            agent_id: id.to_string(),
            epoch,
            expected_revision: 0,
            data: Some(data),
            version,
        };
        Ok(self.commit(save, Vec::new(), Vec::new()).await?.0)
    }
    /// Agent `id`'s saved state, if any.
    async fn load_state(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError>;
    /// A ticket to deliver requests from mailbox `id` directly to peer
    /// endpoints, and how long it is good for (docs/design.md, "Direct
    /// delivery").
    async fn issue_ticket(&self, id: &EntityId) -> Result<(String, Duration), ClientError>;
    /// The mailbox `ticket` lets its holder send from, and for how long still.
    async fn check_ticket(&self, ticket: &str) -> Result<(EntityId, Duration), ClientError>;
    /// Keeps the `size` bytes `chunks` yield (each at most
    /// [`BLOB_CHUNK_BYTES`](academy_proto::transport::BLOB_CHUNK_BYTES)) as a
    /// blob of mailbox `owner` (docs/design.md, "Blobs"); its reference.
    async fn put_blob(
        &self,
        owner: &EntityId,
        size: u64,
        chunks: BlobChunks,
    ) -> Result<pb::BlobRef, ClientError>;
    /// Reads blob `key` from `offset` on.
    async fn get_blob(&self, key: &str, offset: u64) -> Result<BlobRead, ClientError>;
    /// Frees blob `key`; whether it was still kept.
    async fn delete_blob(&self, key: &str) -> Result<bool, ClientError>;
    /// Counts on the exchange's simulated clock what a task on it does
    /// (docs/design.md, "Clocks"); `answer_key`, for a request's `Send`
    /// only (else empty), is the key of the answer the task awaits.
    async fn clock_mark(
        &self,
        kind: pb::MarkKind,
        key: &str,
        answer_key: &str,
    ) -> Result<(), ClientError>;
    /// Puts a running task to sleep on the exchange's clock until `until`
    /// (`key` orders sleepers due at once); the time it woke at.
    async fn clock_sleep(&self, key: &str, until: Duration) -> Result<Duration, ClientError>;
    /// The exchange's clock now.
    async fn clock_now(&self) -> Result<ClockStatus, ClientError>;
    /// Moves the exchange's clock to `until`, at most `factor` times as
    /// fast as wall time when given; answers once nothing is pending there.
    async fn clock_advance(
        &self,
        until: Duration,
        factor: Option<f64>,
    ) -> Result<ClockStatus, ClientError>;
    /// What to show peer endpoints served over TLS (`https://`): the CA
    /// this exchange is trusted by and the client certificate shown to it,
    /// never its token (docs/design.md, "Direct delivery"). None by default.
    fn peer_credentials(&self) -> Credentials {
        Credentials::none()
    }
}

/// Uses an exchange in this process: no server, no sockets.
#[cfg(feature = "embedded")]
#[derive(Debug, Clone, Default)]
pub struct LocalExchange {
    exchange: academy_exchange::Exchange,
}

#[cfg(feature = "embedded")]
impl LocalExchange {
    /// Uses `exchange` (for example one a server in this process also serves).
    pub fn new(exchange: academy_exchange::Exchange) -> Self {
        Self { exchange }
    }
}

#[cfg(feature = "embedded")]
#[async_trait::async_trait]
impl ExchangeApi for LocalExchange {
    async fn register_agent(
        &self,
        behaviour: &str,
        implements: &[&str],
        name: &str,
        id: Option<EntityId>,
        description: Option<pb::AgentDescription>,
    ) -> Result<EntityId, ClientError> {
        let implements = implements.iter().map(|s| (*s).to_owned()).collect();
        let name = name.to_owned();
        Ok(self.exchange.register_agent(behaviour, implements, name, id, description).await?)
    }
    async fn register_client(&self) -> Result<EntityId, ClientError> {
        Ok(self.exchange.register_client().await?)
    }
    async fn terminate(&self, id: &EntityId) -> Result<(), ClientError> {
        self.exchange.terminate(id).await?;
        Ok(())
    }
    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ClientError> {
        Ok(self.exchange.status(id).await?)
    }
    async fn discover(
        &self,
        name: &str,
        matching: Matching,
    ) -> Result<Vec<RegisteredAgent>, ClientError> {
        Ok(self.exchange.discover(name, matching).await?)
    }
    async fn send(&self, message: pb::Message) -> Result<(), ClientError> {
        Ok(self.exchange.send(message).await?)
    }
    async fn subscribe(
        &self,
        id: &EntityId,
        epoch: u64,
        endpoint: &str,
    ) -> Result<DeliveryStream, ClientError> {
        let subscription = self.exchange.subscribe_at(id, epoch, endpoint).await?;
        Ok(subscription.into_stream().map(|batch| Ok(batch?)).boxed())
    }
    async fn acknowledge(&self, id: &EntityId, seqs: Vec<u64>) -> Result<(), ClientError> {
        Ok(self.exchange.acknowledge(id, &seqs).await?)
    }
    async fn commit(
        &self,
        save: pb::SaveStateRequest,
        seqs: Vec<u64>,
        answers: Vec<pb::Message>,
    ) -> Result<Committed, ClientError> {
        let id = EntityId::parse_field(&save.agent_id, "state.agent_id")?;
        let (revision, results) = self.exchange.commit(&id, save, seqs, answers).await?;
        Ok((revision, results.into_iter().map(|r| r.map_err(ClientError::Exchange)).collect()))
    }
    async fn load_state(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError> {
        Ok(self.exchange.load_state(id).await?)
    }
    async fn issue_ticket(&self, id: &EntityId) -> Result<(String, Duration), ClientError> {
        Ok(self.exchange.issue_ticket(id, None).await?)
    }
    async fn check_ticket(&self, ticket: &str) -> Result<(EntityId, Duration), ClientError> {
        let ticket = self.exchange.check_ticket(ticket).await?;
        Ok((ticket.mailbox, ticket.left))
    }
    async fn put_blob(
        &self,
        owner: &EntityId,
        size: u64,
        chunks: BlobChunks,
    ) -> Result<pb::BlobRef, ClientError> {
        let failed = crate::blob::Failure::default();
        let chunks = failed.watch(chunks).map(|c| {
            c.map_err(|e| ExchangeError::InvalidArgument(format!("the blob's bytes: {e}")))
        });
        let put = academy_exchange::BlobPut { owner: *owner, size, ttl: None };
        let result = self.exchange.put_blob(put, chunks).await;
        failed.first(result.map(|(blob, _)| blob).map_err(ClientError::from))
    }
    async fn get_blob(&self, key: &str, offset: u64) -> Result<BlobRead, ClientError> {
        let (meta, chunks) = self.exchange.get_blob(key, offset).await?;
        let chunks = chunks.map(|c| c.map_err(ClientError::from)).boxed();
        Ok(BlobRead { size: meta.size, sha256: meta.sha256, chunks })
    }
    async fn delete_blob(&self, key: &str) -> Result<bool, ClientError> {
        Ok(self.exchange.delete_blob(key).await?)
    }
    // In process, the clock goes when the participants do: nobody joins.
    async fn clock_mark(
        &self,
        kind: pb::MarkKind,
        key: &str,
        answer_key: &str,
    ) -> Result<(), ClientError> {
        let mark = academy_exchange::clock::Mark::of(kind, key.to_owned(), answer_key.to_owned())?;
        Ok(self.exchange.clock().mark(0, mark)?)
    }
    async fn clock_sleep(&self, key: &str, until: Duration) -> Result<Duration, ClientError> {
        Ok(self.exchange.clock().sleep(0, key, until)?.await)
    }
    async fn clock_now(&self) -> Result<ClockStatus, ClientError> {
        Ok(self.exchange.clock().status())
    }
    async fn clock_advance(
        &self,
        until: Duration,
        factor: Option<f64>,
    ) -> Result<ClockStatus, ClientError> {
        Ok(self.exchange.clock().advance(until, factor).await)
    }
}

/// Agents per page when discovering: the most the exchange answers at once
/// (fewer pages: each costs the Redis backend a read of the whole index).
const DISCOVER_PAGE: u32 = 10_000;

/// Talks to an exchange-server over gRPC. Sends, subscriptions,
/// acknowledgements and commits go over one `Session` stream (opened on
/// first use, and again after it broke), in order, so order per destination
/// is kept; the rest are unary calls.
#[derive(Clone)]
pub struct GrpcExchange {
    rpc: RpcClient<Authorized>,
    clock: ClockClient<Authorized>,
    blobs: BlobClient<Authorized>,
    sessions: Arc<Sessions>,
    peers: Credentials,
    participation: Arc<Participation>,
}

/// This connection's place on the exchange's simulated clock, joined at its
/// first mark or sleep: the participant, and its `Participate` call, kept open for
/// as long as the connection is (docs/design.md, "Clocks").
#[derive(Default)]
struct Participation {
    /// None: not joined; 0: an exchange without `Participate` (counted for nobody).
    joined: tokio::sync::Mutex<Option<u64>>,
    /// Keeps the `Participate` call open, and calls again as the same
    /// participant when it ends (a broken connection): stopped with this.
    keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Participation {
    fn drop(&mut self) {
        if let Some(keeper) = academy_proto::sync::lock(&self.keeper).take() {
            keeper.abort();
        }
    }
}

/// Joins `clock` as participant `resume` if it still has it, else anew:
/// the participant, and the call that keeps it on the clock (none from an
/// exchange without `Participate`: participant 0).
async fn participate(
    clock: &ClockClient<Authorized>,
    resume: u64,
) -> Result<(u64, Option<tonic::Streaming<pb::ParticipateResponse>>), ClientError> {
    match clock.clone().participate(pb::ParticipateRequest { resume }).await {
        Ok(answer) => {
            let mut call = answer.into_inner();
            let first = call.message().await?.ok_or_else(|| {
                ClientError::Transport("Participate ended before naming the participant".into())
            })?;
            Ok((first.participant, Some(call)))
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => Ok((0, None)),
        Err(status) => Err(status.into()),
    }
}

/// Keeps participant `id`'s `call` open; when it ends while this process
/// still uses the clock, calls again naming `id`, so that what its tasks
/// have pending stays counted (the clock keeps it for a grace).
async fn keep_participating(
    clock: ClockClient<Authorized>,
    participation: std::sync::Weak<Participation>,
    mut id: u64,
    mut call: tonic::Streaming<pb::ParticipateResponse>,
) {
    loop {
        while let Ok(Some(_)) = call.message().await {}
        let mut wait = Duration::from_millis(20);
        let (again, next) = loop {
            if participation.strong_count() == 0 {
                return;
            }
            match participate(&clock, id).await {
                Ok((again, Some(next))) => break (again, next),
                Ok((_, None)) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot call Participate again; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
            }
        };
        if again != id {
            tracing::warn!(
                was = id,
                now = again,
                "this process joined the simulated clock again as a new participant (the \
                 clock gave the old one up): what its tasks were doing then is not counted"
            );
            let Some(participation) = participation.upgrade() else { return };
            *participation.joined.lock().await = Some(again);
        }
        (id, call) = (again, next);
    }
}

impl fmt::Debug for GrpcExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcExchange").finish_non_exhaustive()
    }
}

impl GrpcExchange {
    /// Connects to `url` (e.g. `http://127.0.0.1:50051`), with the token in
    /// `ACADEMY_TOKEN` if set; fails if it can't.
    pub async fn connect(url: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(url, &Credentials::from_env()?).await
    }

    /// Connects to `url`, presenting `credentials`.
    pub async fn connect_with(
        url: impl Into<String>,
        credentials: &Credentials,
    ) -> Result<Self, ClientError> {
        let url = url.into();
        let channel = credentials.open(endpoint(&url, credentials)?, &url).await?;
        Ok(Self::from_channel(channel, credentials))
    }

    /// A client of `url` that connects on first use (and again whenever the
    /// connection drops), for services that may start before the exchange.
    pub fn lazy(url: &str, credentials: &Credentials) -> Result<Self, ClientError> {
        let channel = credentials.open_lazy(endpoint(url, credentials)?, url)?;
        Ok(Self::from_channel(channel, credentials))
    }

    /// Uses an existing channel (must be called inside a tokio runtime).
    pub fn from_channel(channel: Channel, credentials: &Credentials) -> Self {
        let clock = ClockClient::new(credentials.on(channel.clone()));
        let blobs = BlobClient::new(credentials.on(channel.clone()))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let rpc = RpcClient::new(credentials.on(channel))
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let sessions = Arc::new(Sessions::new(rpc.clone()));
        let participation = Arc::default();
        Self { rpc, clock, blobs, sessions, peers: credentials.for_peers(), participation }
    }

    /// The participant this connection is on the clock as, joining first.
    async fn participant(&self) -> Result<u64, ClientError> {
        let mut joined = self.participation.joined.lock().await;
        if let Some(id) = *joined {
            return Ok(id);
        }
        let (id, call) = participate(&self.clock, 0).await?;
        *joined = Some(id);
        if let Some(call) = call {
            let participation = Arc::downgrade(&self.participation);
            let keeper =
                tokio::spawn(keep_participating(self.clock.clone(), participation, id, call));
            if let Some(earlier) =
                academy_proto::sync::lock(&self.participation.keeper).replace(keeper)
            {
                earlier.abort();
            }
        }
        Ok(id)
    }

    /// Runs `op` as this connection's participant; once more, joined anew,
    /// if the clock says it left (its `Participate` call stayed away longer
    /// than the clock's grace): what its tasks were doing then is no longer
    /// counted.
    async fn as_participant<T, F>(&self, op: impl Fn(u64) -> F) -> Result<T, ClientError>
    where
        F: Future<Output = Result<T, ClientError>>,
    {
        let participant = self.participant().await?;
        match op(participant).await {
            Err(ClientError::Exchange(ExchangeError::NotOnClock(gone))) => {
                tracing::warn!(
                    participant = gone,
                    "this process left the simulated clock (its Participate call ended); joining again"
                );
                let mut joined = self.participation.joined.lock().await;
                if *joined == Some(gone) {
                    *joined = None;
                }
                drop(joined);
                op(self.participant().await?).await
            }
            done => done,
        }
    }

    fn rpc(&self) -> RpcClient<Authorized> {
        self.rpc.clone()
    }
}

fn endpoint(url: &str, credentials: &Credentials) -> Result<Endpoint, ClientError> {
    Ok(tuned(credentials.endpoint(url)?, Duration::from_secs(5), Duration::from_secs(20)))
}

/// `endpoint` with what every channel of the SDK sets (TCP_NODELAY, the
/// HTTP/2 windows, pings while idle): waiting up to `connect` to connect,
/// pinging every `keepalive`.
pub(crate) fn tuned(endpoint: Endpoint, connect: Duration, keepalive: Duration) -> Endpoint {
    endpoint
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(keepalive)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
}

/// A `PutBlob`'s requests: `head`, then one per chunk, until the chunks
/// end or fail; at most two chunks wait to be sent.
fn put_requests(
    head: pb::PutBlobRequest,
    mut chunks: BlobChunks,
) -> tokio_stream::wrappers::ReceiverStream<pb::PutBlobRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        if tx.send(head).await.is_err() {
            return;
        }
        while let Some(Ok(data)) = chunks.next().await {
            if tx.send(pb::PutBlobRequest { data, ..Default::default() }).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The outcome of each of `n` messages sent together, from their results.
fn results_of(results: &[pb::SendResult], n: usize) -> Vec<Result<(), ClientError>> {
    let mut results = results.iter();
    (0..n)
        .map(|_| match results.next() {
            Some(r) if r.code == tonic::Code::Ok as i32 => Ok(()),
            Some(r) => Err(batch_error(r)),
            None => Err(ClientError::Transport("exchange dropped a result".into())),
        })
        .collect()
}

/// An answer of another kind than its request's.
fn unexpected() -> ClientError {
    ClientError::Transport("the exchange answered a session request with another's answer".into())
}

pub(crate) fn batch_error(result: &pb::SendResult) -> ClientError {
    ExchangeError::from_parts(&result.reason, &result.metadata, &result.message).map_or_else(
        || ClientError::Transport(format!("code {}: {}", result.code, result.message)),
        ClientError::Exchange,
    )
}

#[async_trait::async_trait]
impl ExchangeApi for GrpcExchange {
    async fn register_agent(
        &self,
        behaviour: &str,
        implements: &[&str],
        name: &str,
        id: Option<EntityId>,
        description: Option<pb::AgentDescription>,
    ) -> Result<EntityId, ClientError> {
        let response = self
            .rpc()
            .register_agent(pb::RegisterAgentRequest {
                behaviour: behaviour.to_owned(),
                implements: implements.iter().map(|s| (*s).to_owned()).collect(),
                name: name.to_owned(),
                agent_id: id.map(|id| id.to_string()).unwrap_or_default(),
                description,
            })
            .await?;
        Ok(EntityId::parse_field(&response.into_inner().agent_id, "agent_id")?)
    }
    async fn register_client(&self) -> Result<EntityId, ClientError> {
        let response = self.rpc().register_client(pb::RegisterClientRequest::default()).await?;
        Ok(EntityId::parse_field(&response.into_inner().client_id, "client_id")?)
    }
    async fn terminate(&self, id: &EntityId) -> Result<(), ClientError> {
        self.rpc().terminate(pb::TerminateRequest { mailbox_id: id.to_string() }).await?;
        Ok(())
    }
    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ClientError> {
        let response =
            self.rpc().status(pb::StatusRequest { mailbox_id: id.to_string() }).await?.into_inner();
        Ok(MailboxStatus::try_from(response)?)
    }
    async fn discover(
        &self,
        name: &str,
        matching: Matching,
    ) -> Result<Vec<RegisteredAgent>, ClientError> {
        let mut found = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = pb::DiscoverRequest {
                behaviour: name.to_owned(),
                exact: matching == Matching::Exact,
                page_size: DISCOVER_PAGE,
                page_token,
                ..Default::default()
            };
            let page = self.rpc().discover(request).await?.into_inner();
            for info in page.agents {
                found.push(RegisteredAgent::try_from(info)?);
            }
            if page.next_page_token.is_empty() {
                return Ok(found);
            }
            page_token = page.next_page_token;
        }
    }
    async fn send(&self, message: pb::Message) -> Result<(), ClientError> {
        let op = Op::Send(pb::SendBatchRequest { messages: vec![message] });
        match self.sessions.get().await?.call(op).await? {
            Answer::Sent(sent) => results_of(&sent.results, 1).remove(0),
            _ => Err(unexpected()),
        }
    }
    async fn subscribe(
        &self,
        id: &EntityId,
        epoch: u64,
        endpoint: &str,
    ) -> Result<DeliveryStream, ClientError> {
        let endpoint = endpoint.to_owned();
        let request = pb::SubscribeRequest { mailbox_id: id.to_string(), epoch, endpoint };
        Ok(self.sessions.get().await?.subscribe(request).await?.boxed())
    }
    async fn acknowledge(&self, id: &EntityId, seqs: Vec<u64>) -> Result<(), ClientError> {
        let op = Op::Acknowledge(pb::AcknowledgeRequest { mailbox_id: id.to_string(), seqs });
        match self.sessions.get().await?.call(op).await? {
            Answer::Acknowledged(_) => Ok(()),
            _ => Err(unexpected()),
        }
    }
    async fn commit(
        &self,
        save: pb::SaveStateRequest,
        seqs: Vec<u64>,
        answers: Vec<pb::Message>,
    ) -> Result<Committed, ClientError> {
        let n = answers.len();
        let op = Op::Commit(pb::CommitRequest { state: Some(save), seqs, answers });
        match self.sessions.get().await?.call(op).await? {
            Answer::Committed(done) => Ok((done.revision, results_of(&done.results, n))),
            _ => Err(unexpected()),
        }
    }
    async fn load_state(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError> {
        let request = pb::LoadStateRequest { agent_id: id.to_string() };
        Ok(self.rpc().load_state(request).await?.into_inner().state)
    }
    async fn issue_ticket(&self, id: &EntityId) -> Result<(String, Duration), ClientError> {
        let request = pb::IssueTicketRequest { mailbox_id: id.to_string() };
        let issued = self.rpc().issue_ticket(request).await?.into_inner();
        let left = issued.expires_in.and_then(|d| duration::from_proto(d, "expires_in").ok());
        Ok((issued.ticket, left.unwrap_or_default()))
    }
    async fn check_ticket(&self, ticket: &str) -> Result<(EntityId, Duration), ClientError> {
        let request = pb::CheckTicketRequest { ticket: ticket.to_owned() };
        let checked = self.rpc().check_ticket(request).await?.into_inner();
        let id = EntityId::parse_field(&checked.mailbox_id, "mailbox_id")?;
        let left = checked.expires_in.and_then(|d| duration::from_proto(d, "expires_in").ok());
        Ok((id, left.unwrap_or_default()))
    }
    async fn put_blob(
        &self,
        owner: &EntityId,
        size: u64,
        chunks: BlobChunks,
    ) -> Result<pb::BlobRef, ClientError> {
        // A source that fails ends the put short (the exchange then keeps
        // nothing); its error is the one to answer.
        let failed = crate::blob::Failure::default();
        let head = pb::PutBlobRequest { owner: owner.to_string(), size, ..Default::default() };
        let requests = put_requests(head, failed.watch(chunks));
        let mut client = self.blobs.clone();
        let result = client.put_blob(tonic::Request::new(requests)).await;
        let blob = result.map_err(ClientError::from).and_then(|r| {
            r.into_inner()
                .blob
                .ok_or_else(|| ClientError::Transport("PutBlob answered no blob".into()))
        });
        failed.first(blob)
    }
    async fn get_blob(&self, key: &str, offset: u64) -> Result<BlobRead, ClientError> {
        let request = pb::GetBlobRequest { key: key.to_owned(), offset };
        let mut frames = self.blobs.clone().get_blob(request).await?.into_inner();
        // The first answer says what the blob is; the others carry it.
        let head = frames
            .message()
            .await?
            .ok_or_else(|| ClientError::Transport("GetBlob answered nothing".into()))?;
        let (size, sha256) = (head.size, head.sha256);
        let chunks = frames.map(|f| Ok(f?.data)).boxed();
        Ok(BlobRead { size, sha256, chunks })
    }
    async fn delete_blob(&self, key: &str) -> Result<bool, ClientError> {
        let request = pb::DeleteBlobRequest { key: key.to_owned() };
        Ok(self.blobs.clone().delete_blob(request).await?.into_inner().deleted)
    }
    async fn clock_mark(
        &self,
        kind: pb::MarkKind,
        key: &str,
        answer_key: &str,
    ) -> Result<(), ClientError> {
        self.as_participant(|participant| {
            let request = pb::MarkRequest {
                kind: kind.into(),
                key: key.to_owned(),
                participant,
                answer_key: answer_key.to_owned(),
            };
            let mut clock = self.clock.clone();
            async move { Ok(clock.mark(request).await.map(drop)?) }
        })
        .await
    }
    async fn clock_sleep(&self, key: &str, until: Duration) -> Result<Duration, ClientError> {
        let until = Some(academy_proto::duration::to_proto(until));
        let woke = self
            .as_participant(|participant| {
                let request = pb::SleepRequest { key: key.to_owned(), until, participant };
                let mut clock = self.clock.clone();
                async move { Ok(clock.sleep(request).await?.into_inner().now) }
            })
            .await?;
        Ok(woke
            .and_then(|d| academy_proto::duration::from_proto(d, "now").ok())
            .unwrap_or_default())
    }
    async fn clock_now(&self) -> Result<ClockStatus, ClientError> {
        Ok(self.clock.clone().now(pb::NowRequest {}).await?.into_inner().into())
    }
    async fn clock_advance(
        &self,
        until: Duration,
        factor: Option<f64>,
    ) -> Result<ClockStatus, ClientError> {
        let target =
            Some(pb::advance_request::Target::Until(academy_proto::duration::to_proto(until)));
        let request = pb::AdvanceRequest { target, factor: factor.unwrap_or_default() };
        let done = self.clock.clone().advance(request).await?.into_inner();
        Ok(done.clock.unwrap_or_default().into())
    }
    fn peer_credentials(&self) -> Credentials {
        self.peers.clone()
    }
}

/// What a commit did: the revision saved (or kept), one result per answer.
pub type Committed = (u64, Vec<Result<(), ClientError>>);

/// An exchange client shared by agents and handles.
pub type SharedExchange = Arc<dyn ExchangeApi>;
