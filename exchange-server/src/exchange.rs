//! The exchange: the rules of docs/design.md ("Mailboxes", "Delivery") over a
//! storage backend, so the gRPC service and the SDK's in-process client
//! behave the same whatever keeps the mailboxes.

use std::collections::HashMap;
use std::sync::{Arc, Once};

use academy_proto::{EntityId, ExchangeError, MailboxStatus, Matching, RegisteredAgent, pb};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::backend::memory::MemoryBackend;
#[cfg(feature = "redis")]
use crate::backend::redis::{RedisBackend, RedisOptions};
use crate::backend::{Backend, BackendSubscription, Bounds, Commit, Depth, Page, Ticket, source};
use crate::clock::{Mark, SimClock};
use crate::limits::{self, Limits};
use crate::retention;

mod blobs;
pub use blobs::{BlobPut, EXCHANGE_STORE};

/// An exchange over the in-memory or the Redis backend. Cheap to clone; clones
/// share the mailboxes.
#[derive(Debug, Clone)]
pub struct Exchange {
    backend: Arc<dyn Backend>,
    limits: Limits,
    shutdown: CancellationToken,
    /// Who this view of the exchange acts for: the owner of the mailboxes it
    /// registers, and the only one then allowed to subscribe to, acknowledge
    /// or terminate them, or to send from them. `None` is trusted (in-process
    /// use, no authentication).
    principal: Option<Arc<str>>,
    sweeper: Arc<Once>,
    /// The simulated clock of this exchange's process.
    clock: Arc<SimClock>,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl Exchange {
    /// An exchange whose mailboxes live in this process.
    pub fn new(limits: Limits) -> Self {
        Self::in_memory(limits, None)
    }

    /// An exchange whose mailboxes live in this process, and its blobs in
    /// files under `blob_dir` (when given) rather than in memory.
    pub fn in_memory(limits: Limits, blob_dir: Option<std::path::PathBuf>) -> Self {
        let backend = MemoryBackend::new(&limits.retention).with_blob_dir(blob_dir);
        Self::over(Arc::new(backend), limits)
    }

    /// An exchange whose mailboxes live in Redis: durable, and shared by every
    /// exchange connected to the same Redis and prefix.
    #[cfg(feature = "redis")]
    pub async fn redis(options: RedisOptions, limits: Limits) -> Result<Self, ExchangeError> {
        let backend = RedisBackend::connect(options, &limits.retention).await?;
        Ok(Self::over(Arc::new(backend), limits))
    }

    fn over(backend: Arc<dyn Backend>, limits: Limits) -> Self {
        let sweeper = Arc::new(Once::new());
        let clock = Arc::default();
        let shutdown = CancellationToken::new();
        Self { backend, limits, shutdown, principal: None, sweeper, clock }
    }

    /// Starts removing what expires (docs/design.md, "Retention"), once per
    /// exchange, when it first creates a mailbox (so within a runtime).
    fn sweep_expired(&self) {
        self.sweeper.call_once(|| {
            retention::spawn_sweeper(Arc::downgrade(&self.backend), self.limits.retention);
        });
    }

    /// This exchange, acting for `principal` (docs/design.md, "Security").
    pub fn acting_as(&self, principal: Option<Arc<str>>) -> Self {
        Self { principal, ..self.clone() }
    }

    fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// Whether its store answers now (always, in memory), and its changes.
    pub fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.backend.health()
    }

    /// Its simulated clock (docs/design.md, "Clocks"): one per process,
    /// shared by every view of it.
    pub fn clock(&self) -> &Arc<SimClock> {
        &self.clock
    }

    /// Its limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Saves the state of agent `id`, as its incarnation `epoch`
    /// (docs/design.md, "State"): a [`commit`](Self::commit) of the state
    /// alone. Answers the revision saved.
    pub async fn save_state(
        &self,
        id: &EntityId,
        epoch: u64,
        expected: u64,
        data: pb::Payload,
        version: u32,
    ) -> Result<u64, ExchangeError> {
        let request = pb::SaveStateRequest {
            agent_id: id.to_string(),
            epoch,
            expected_revision: expected,
            data: Some(data),
            version,
        };
        let (revision, _) = self.commit(id, request, Vec::new(), Vec::new()).await?;
        Ok(revision)
    }

    /// Commits what agent `id` did with some requests, in one atomic step
    /// (docs/design.md, "State"): saves its state (`save.data` unset keeps
    /// it), acknowledges `seqs` and queues `answers`. Refused whole when
    /// the save is stale (a later incarnation subscribed or saved), a
    /// conflict (`save.expected_revision`, not 0, is not the saved
    /// revision), larger than [`Limits::max_state_bytes`], or a seq was
    /// never delivered; each answer then gets its own result (one not an
    /// answer from `id` is refused). Answers the revision saved (or kept).
    pub async fn commit(
        &self,
        id: &EntityId,
        save: pb::SaveStateRequest,
        seqs: Vec<u64>,
        answers: Vec<pb::Message>,
    ) -> Result<(u64, Vec<Result<(), ExchangeError>>), ExchangeError> {
        Self::keeps_state(id)?;
        limits::at_most("seqs per Commit", seqs.len(), limits::MAX_BATCH_MESSAGES)?;
        limits::at_most("answers per Commit", answers.len(), limits::MAX_BATCH_MESSAGES)?;
        let state = match save.data {
            Some(data) => {
                let max = self.limits.max_state_bytes.min(self.limits.max_message_bytes);
                limits::at_most("the bytes of a saved state", data.data.len(), max)?;
                limits::name("data.content_type", &data.content_type)?;
                if data.blob.is_some() {
                    return Err(ExchangeError::InvalidArgument(
                        "data.blob: a saved state is kept inline, not by reference".into(),
                    ));
                }
                Some((data, save.version))
            }
            None => None,
        };
        let mut results: Vec<Result<(), ExchangeError>> = Vec::with_capacity(answers.len());
        let mut valid = Vec::with_capacity(answers.len());
        for answer in answers {
            match self.validate_answer(id, &answer) {
                Ok(dest) => {
                    valid.push((dest, answer));
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let commit = Commit {
            epoch: save.epoch,
            expected: save.expected_revision,
            state,
            seqs,
            answers: valid,
        };
        let (revision, queued) =
            self.backend.commit(id, self.principal(), commit, &self.bounds()).await?;
        fill(&mut results, queued);
        Ok((revision, results))
    }

    /// The destination of `message`, an answer from agent `id`.
    fn validate_answer(
        &self,
        id: &EntityId,
        message: &pb::Message,
    ) -> Result<EntityId, ExchangeError> {
        use pb::message::Body;
        let dest = self.validate(message)?;
        if !matches!(
            message.body,
            Some(Body::ActionResponse(_) | Body::ErrorResponse(_) | Body::SuccessResponse(_))
        ) {
            return Err(ExchangeError::InvalidArgument(
                "a commit carries answers only: action, error and success responses".into(),
            ));
        }
        if source(message)? != *id {
            return Err(ExchangeError::InvalidArgument(format!(
                "an answer in a commit of {id} must come from it (header.src)"
            )));
        }
        Ok(dest)
    }

    /// The saved state of agent `id`, if it saved any.
    pub async fn load_state(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ExchangeError> {
        Self::keeps_state(id)?;
        self.backend.load_state(id, self.principal()).await
    }

    fn keeps_state(id: &EntityId) -> Result<(), ExchangeError> {
        if id.is_agent() {
            return Ok(());
        }
        Err(ExchangeError::InvalidArgument(format!("{id} is a client: only agents keep state")))
    }

    /// What is queued unacknowledged in all mailboxes, per behaviour
    /// (clients: the empty behaviour); only behaviours with something
    /// queued. In memory it walks every mailbox; on Redis it reads one hash.
    pub async fn queued(&self) -> Result<Vec<Depth>, ExchangeError> {
        self.backend.depth().await
    }

    /// Ends every subscription with [`ExchangeError::ShuttingDown`].
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelled once [`shutdown`](Self::shutdown) was called.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    pub(crate) fn shutdown_signal(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The quota of mailboxes of the principal this view acts for, if any.
    fn mailbox_quota(&self) -> usize {
        if self.principal.is_some() { self.limits.max_mailboxes_per_principal } else { 0 }
    }

    /// Creates the mailbox of a new agent, with `id` or a fresh id, and
    /// what it can do (at most [`MAX_DESCRIPTION_BYTES`](limits::MAX_DESCRIPTION_BYTES)).
    pub async fn register_agent(
        &self,
        behaviour: &str,
        implements: Vec<String>,
        name: String,
        id: Option<EntityId>,
        description: Option<pb::AgentDescription>,
    ) -> Result<EntityId, ExchangeError> {
        if behaviour.is_empty() {
            return Err(ExchangeError::InvalidArgument("behaviour is empty".into()));
        }
        if implements.iter().any(String::is_empty) {
            return Err(ExchangeError::InvalidArgument("implements contains an empty name".into()));
        }
        limits::name("behaviour", behaviour)?;
        limits::name("name", &name)?;
        limits::at_most("names an agent implements", implements.len(), limits::MAX_IMPLEMENTS)?;
        for interface in &implements {
            limits::name("an implemented name", interface)?;
        }
        if let Some(description) = &description {
            let size = description.encoded_len();
            limits::at_most("the bytes of a description", size, limits::MAX_DESCRIPTION_BYTES)?;
        }
        let fresh = id.is_none();
        let id = id.unwrap_or_else(EntityId::new_agent);
        if !id.is_agent() {
            return Err(ExchangeError::InvalidArgument(format!(
                "agent_id {id} is not an agent id"
            )));
        }
        let owner = self.principal().unwrap_or_default().to_owned();
        let description = description.map(Arc::new);
        let info = RegisteredAgent {
            id,
            behaviour: behaviour.to_owned(),
            implements,
            name,
            owner,
            description,
            endpoint: String::new(),
        };
        self.sweep_expired();
        let quota = self.mailbox_quota();
        self.backend.create(id, Some(info), self.principal(), quota, fresh).await?;
        tracing::debug!(agent = %id, behaviour, "agent mailbox created");
        Ok(id)
    }

    /// Creates the mailbox of a new client.
    pub async fn register_client(&self) -> Result<EntityId, ExchangeError> {
        let id = EntityId::new_client();
        self.sweep_expired();
        self.backend.create(id, None, self.principal(), self.mailbox_quota(), true).await?;
        tracing::debug!(client = %id, "client mailbox created");
        Ok(id)
    }

    /// Removes a client mailbox without a gravestone: for transient mailboxes
    /// whose ids nobody can register again (client ids are always fresh).
    #[cfg(feature = "server")]
    pub(crate) async fn forget(&self, id: &EntityId) {
        self.backend.forget(id).await;
    }

    /// Terminates a mailbox and answers every request still queued in it with an
    /// error. Idempotent: returns the state before the call.
    pub async fn terminate(&self, id: &EntityId) -> Result<pb::MailboxState, ExchangeError> {
        let (previous, queued) = self.backend.terminate(id, self.principal()).await?;
        if previous == pb::MailboxState::Active
            && let Err(err) = self.backend.blob_delete_owned(id).await
        {
            tracing::warn!(mailbox = %id, error = %err, "its blobs are left to expire");
        }
        // Requests sent on the clock are taken here, and answered on it.
        for header in queued.iter().filter_map(|m| m.header.as_ref()).filter(|h| h.on_clock) {
            let _ = self.clock.mark(0, Mark::Take(header.tag.clone()));
            let _ = self.clock.mark(0, Mark::Send(header.answer_key(), None));
            let _ = self.clock.mark(0, Mark::End);
        }
        let replies: Vec<_> = queued
            .iter()
            .filter_map(|m| terminated_reply(id, m))
            .filter_map(|reply| Some((reply.header.as_ref()?.dest.parse().ok()?, reply)))
            .collect();
        let answered = replies.len();
        // Requesters may be gone too; nobody is left to tell then. The
        // exchange answers for the terminated mailbox, whoever terminated it,
        // within each requester's bounds: a requester whose mailbox is full
        // is not told (its call times out).
        let bounds = Bounds { sender_quota: 0, ..self.bounds() };
        let _ = self.backend.enqueue(replies, &bounds, None).await;
        tracing::debug!(mailbox = %id, answered, "mailbox terminated");
        Ok(previous)
    }

    /// What active agent `id` can do: its registration, with the
    /// description it published (none if it published none).
    pub async fn describe(&self, id: &EntityId) -> Result<RegisteredAgent, ExchangeError> {
        let status = self.backend.status(id).await?;
        let mut agent = match (status.state, status.agent) {
            (pb::MailboxState::Active, Some(agent)) => agent,
            (pb::MailboxState::Terminated, _) => return Err(ExchangeError::Terminated(*id)),
            (pb::MailboxState::Active, None) => {
                return Err(ExchangeError::InvalidArgument(format!(
                    "{id} is a client: only agents describe themselves"
                )));
            }
            _ => return Err(ExchangeError::NotFound(*id)),
        };
        agent.description = self.backend.descriptions(&[*id]).await?.pop().flatten();
        Ok(agent)
    }

    /// The descriptions of agents `ids` (none for one that published none
    /// or is gone), in order.
    pub async fn descriptions(
        &self,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Arc<pb::AgentDescription>>>, ExchangeError> {
        self.backend.descriptions(ids).await
    }

    /// The state of mailbox `id` (`Missing` when none has it).
    pub async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError> {
        self.backend.status(id).await
    }

    /// Active agents whose behaviour is `name` ([`Matching::Exact`]) or lists
    /// it; every active agent when `name` is empty. Ordered by id (creation
    /// time).
    pub async fn discover(
        &self,
        name: &str,
        matching: Matching,
    ) -> Result<Vec<RegisteredAgent>, ExchangeError> {
        Ok(self.discover_page(name, matching, None, None, None).await?.0)
    }

    /// One page of [`discover`](Self::discover): at most `limit` agents after
    /// `after` (registered by `owner`, if given), and the id to continue
    /// after when more may match. Filtered by owner, a page looks at a
    /// bounded number of agents, so it may hold fewer than `limit`.
    pub async fn discover_page(
        &self,
        name: &str,
        matching: Matching,
        after: Option<EntityId>,
        limit: Option<usize>,
        owner: Option<&str>,
    ) -> Result<(Vec<RegisteredAgent>, Option<EntityId>), ExchangeError> {
        let exact = matching == Matching::Exact;
        if exact && name.is_empty() {
            return Err(ExchangeError::InvalidArgument(
                "exact discovery needs a behaviour name".into(),
            ));
        }
        let Some(owner) = owner else {
            return self.backend.discover(name, exact, Page { after, limit }).await;
        };
        let limit = limit.unwrap_or(usize::MAX).max(1);
        let scan = Page { after, limit: Some(limit.saturating_mul(8).clamp(1_000, 20_000)) };
        let (scanned, more) = self.backend.discover(name, exact, scan).await?;
        let mut found = Vec::new();
        for agent in scanned {
            if found.len() == limit {
                let last: &RegisteredAgent = found.last().expect("a full page");
                return Ok((found.clone(), Some(last.id)));
            }
            if agent.owner == owner {
                found.push(agent);
            }
        }
        Ok((found, more))
    }

    /// Checks a message and returns its destination.
    pub fn validate(&self, message: &pb::Message) -> Result<EntityId, ExchangeError> {
        let size = message.encoded_len();
        let limit = self.limits.max_message_bytes;
        if size > limit {
            return Err(ExchangeError::TooLarge { size, limit });
        }
        let header = message
            .header
            .as_ref()
            .ok_or_else(|| ExchangeError::InvalidArgument("message has no header".into()))?;
        EntityId::parse_field(&header.src, "header.src")?;
        let dest = EntityId::parse_field(&header.dest, "header.dest")?;
        if uuid::Uuid::try_parse(&header.tag).is_err() {
            return Err(ExchangeError::InvalidArgument(format!(
                "header.tag {} is not a UUID",
                academy_proto::excerpt(&header.tag)
            )));
        }
        limits::name("header.label", &header.label)?;
        for (field, text) in [
            ("the length of header.traceparent in bytes", &header.traceparent),
            ("the length of header.tracestate in bytes", &header.tracestate),
        ] {
            limits::at_most(field, text.len(), limits::MAX_TRACE_CONTEXT_BYTES)?;
        }
        match &message.body {
            None => Err(ExchangeError::InvalidArgument("message has no body".into())),
            Some(pb::message::Body::ActionRequest(req)) if req.action.is_empty() => {
                Err(ExchangeError::InvalidArgument("action_request.action is empty".into()))
            }
            Some(pb::message::Body::ActionRequest(req)) => {
                limits::name("action_request.action", &req.action)?;
                blobs::check_reference(req.args.as_ref(), "action_request.args")?;
                Ok(dest)
            }
            Some(pb::message::Body::ActionResponse(resp)) => {
                blobs::check_reference(resp.result.as_ref(), "action_response.result")?;
                Ok(dest)
            }
            Some(_) => Ok(dest),
        }
    }

    /// What an enqueue of this view may add.
    fn bounds(&self) -> Bounds {
        let sender_quota =
            if self.principal.is_some() { self.limits.max_queued_bytes_per_principal } else { 0 };
        Bounds {
            max_queued: self.limits.max_queued,
            max_queued_bytes: self.limits.max_queued_bytes,
            sender_quota,
        }
    }

    /// Queues a message in its destination's mailbox.
    pub async fn send(&self, message: pb::Message) -> Result<(), ExchangeError> {
        self.send_batch(vec![message]).await?.pop().expect("one result per message")
    }

    /// Queues several messages in order (at most
    /// [`MAX_BATCH_MESSAGES`](limits::MAX_BATCH_MESSAGES)); one result each.
    pub async fn send_batch(
        &self,
        messages: Vec<pb::Message>,
    ) -> Result<Vec<Result<(), ExchangeError>>, ExchangeError> {
        limits::at_most("messages per SendBatch", messages.len(), limits::MAX_BATCH_MESSAGES)?;
        let mut results: Vec<Result<(), ExchangeError>> = Vec::with_capacity(messages.len());
        let mut valid = Vec::with_capacity(messages.len());
        for message in messages {
            match self.validate(&message) {
                Ok(dest) => {
                    // Only shutdown requests from a principal need a lookup.
                    let denied = if self.principal.is_some() && is_shutdown(&message) {
                        self.shutdown_denied(&dest).await
                    } else {
                        None
                    };
                    match denied {
                        Some(denied) => results.push(Err(denied)),
                        None => {
                            valid.push((dest, message));
                            results.push(Ok(()));
                        }
                    }
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let stored = self.backend.enqueue(valid, &self.bounds(), self.principal()).await;
        fill(&mut results, stored);
        Ok(results)
    }

    /// A shutdown request ends an agent (and may terminate its mailbox), so,
    /// like terminating, only its mailbox's owner may send one. The lookup is
    /// made for shutdown requests only, which are rare.
    async fn shutdown_denied(&self, dest: &EntityId) -> Option<ExchangeError> {
        // A failed lookup is left to the enqueue to report (unavailable).
        let owner = self.backend.owner(dest).await.ok().flatten()?;
        (!permitted(Some(&owner), self.principal()))
            .then_some(ExchangeError::PermissionDenied { id: *dest, owner })
    }

    /// Becomes the one subscriber of a mailbox. A previous subscription ends with
    /// [`ExchangeError::Superseded`]; every unacknowledged message is delivered again.
    pub async fn subscribe(&self, id: &EntityId) -> Result<Subscription, ExchangeError> {
        self.subscribe_as(id, 0).await
    }

    /// [`subscribe`](Self::subscribe) for incarnation `epoch` of an agent
    /// (its launcher placement): refused with [`ExchangeError::StaleEpoch`]
    /// once a later incarnation subscribed, so an agent's earlier copy
    /// cannot take its mailbox back. Epoch 0 is not fenced.
    pub async fn subscribe_as(
        &self,
        id: &EntityId,
        epoch: u64,
    ) -> Result<Subscription, ExchangeError> {
        self.subscribe_at(id, epoch, "").await
    }

    /// [`subscribe_as`](Self::subscribe_as), advertising a peer `endpoint`
    /// where the subscriber takes requests directly (docs/design.md,
    /// "Direct delivery"): Status shows it while the subscription lasts.
    pub async fn subscribe_at(
        &self,
        id: &EntityId,
        epoch: u64,
        endpoint: &str,
    ) -> Result<Subscription, ExchangeError> {
        limits::endpoint(endpoint)?;
        let inner = self.backend.subscribe(id, self.principal(), epoch, endpoint).await?;
        let max_bytes = self.limits.max_delivery_bytes;
        Ok(Subscription { id: *id, inner, max_bytes, shutdown: self.shutdown.clone() })
    }

    /// A ticket that lets its holder deliver requests from mailbox `id`
    /// directly to peer endpoints (docs/design.md, "Direct delivery"), and
    /// how long it is good for; only for who may send from `id`. The
    /// mailbox's earlier ticket stops being good. `granted` is the
    /// fingerprint of the token of the call, which [`Ticket`] carries.
    pub async fn issue_ticket(
        &self,
        id: &EntityId,
        granted: Option<&str>,
    ) -> Result<(String, std::time::Duration), ExchangeError> {
        self.may_send_from(id).await?;
        let ticket = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        self.backend.put_ticket(id, &ticket, granted, limits::TICKET_TTL).await?;
        Ok((ticket, limits::TICKET_TTL))
    }

    /// Refuses unless mailbox `id` is active and this view may send from it.
    async fn may_send_from(&self, id: &EntityId) -> Result<(), ExchangeError> {
        let status = self.backend.status(id).await?;
        match status.state {
            pb::MailboxState::Active => {}
            pb::MailboxState::Terminated => return Err(ExchangeError::Terminated(*id)),
            _ => return Err(ExchangeError::NotFound(*id)),
        }
        let owner = self.backend.owner(id).await?;
        if !permitted(owner.as_deref(), self.principal()) {
            let owner = owner.unwrap_or_default();
            return Err(ExchangeError::PermissionDenied { id: *id, owner });
        }
        Ok(())
    }

    /// What `ticket` is: the mailbox it lets its holder send from, and how
    /// long it is still good for.
    pub async fn check_ticket(&self, ticket: &str) -> Result<Ticket, ExchangeError> {
        let unknown = || ExchangeError::Unauthenticated("the ticket is unknown or expired".into());
        if ticket.len() > 128 || !ticket.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unknown());
        }
        self.backend.ticket(ticket).await?.ok_or_else(unknown)
    }

    /// Removes delivered messages (at most
    /// [`MAX_ACK_SEQS`](limits::MAX_ACK_SEQS) per call). Unknown or already
    /// acknowledged seqs are ignored.
    pub async fn acknowledge(&self, id: &EntityId, seqs: &[u64]) -> Result<(), ExchangeError> {
        limits::at_most("seqs per Acknowledge", seqs.len(), limits::MAX_ACK_SEQS)?;
        self.backend.acknowledge(id, seqs, self.principal()).await
    }
}

/// Puts the backend's results for the messages that passed validation
/// (`stored`, in order) in their places among `results` (the `Ok` ones).
fn fill(results: &mut [Result<(), ExchangeError>], stored: Vec<Result<(), ExchangeError>>) {
    let mut stored = stored.into_iter();
    for result in results.iter_mut().filter(|r| r.is_ok()) {
        *result = stored
            .next()
            .unwrap_or(Err(ExchangeError::Unavailable("backend dropped a result".into())));
    }
}

/// May `caller` act as the owner of a mailbox owned by `owner`? A mailbox made
/// without a principal is anyone's; a caller without one (in-process, or a
/// server that does not authenticate) is trusted.
pub(crate) fn permitted(owner: Option<&str>, caller: Option<&str>) -> bool {
    match (owner, caller) {
        (Some(owner), Some(caller)) => owner == caller,
        _ => true,
    }
}

fn is_shutdown(message: &pb::Message) -> bool {
    matches!(message.body, Some(pb::message::Body::ShutdownRequest(_)))
}

/// The error response that answers a request left in a terminated mailbox.
fn terminated_reply(id: &EntityId, request: &pb::Message) -> Option<pb::Message> {
    use pb::message::Body;
    let header = request.header.as_ref()?;
    Some(pb::Message {
        header: Some(header.reply_from(id.to_string())),
        body: Some(Body::ErrorResponse(pb::ErrorResponse {
            code: tonic::Code::FailedPrecondition as i32,
            kind: "MailboxTerminated".into(),
            message: ExchangeError::Terminated(*id).to_string(),
            details: HashMap::new(),
        })),
    })
}

/// The subscriber's side of a mailbox.
#[derive(Debug)]
pub struct Subscription {
    id: EntityId,
    inner: Box<dyn BackendSubscription>,
    /// Most bytes of one batch, framing included (a delivery).
    max_bytes: usize,
    shutdown: CancellationToken,
}

/// Most messages in one batch of [`Subscription::into_stream`].
const MAX_BATCH: usize = 256;

impl Subscription {
    /// The mailbox subscribed to.
    pub fn mailbox_id(&self) -> EntityId {
        self.id
    }

    /// The subscription as a stream of batches, ending after its first error
    /// (terminated, taken over, shutting down).
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<Vec<pb::Delivery>, ExchangeError>> + Send + 'static
    {
        futures::stream::unfold(Some(self), |sub| async move {
            let mut sub = sub?;
            let max_bytes = sub.max_bytes;
            match sub.next_batch(MAX_BATCH, max_bytes).await {
                Ok(batch) => Some((Ok(batch), Some(sub))),
                Err(e) => Some((Err(e), None)),
            }
        })
    }

    /// Waits for messages and returns up to `max` of them (at least one), in
    /// order, no more than fit in `max_bytes` once framed as a delivery (one
    /// message however large).
    pub async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<pb::Delivery>, ExchangeError> {
        tokio::select! {
            batch = self.inner.next_batch(max, max_bytes) => batch,
            () = self.shutdown.cancelled() => Err(ExchangeError::ShuttingDown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_trusted_callers() {
        assert!(permitted(Some("a"), Some("a")));
        assert!(!permitted(Some("a"), Some("b")));
        assert!(permitted(None, Some("b")));
        assert!(permitted(Some("a"), None));
    }
}
