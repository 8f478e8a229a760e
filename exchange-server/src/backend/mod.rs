//! Where mailboxes live. The [`Exchange`](crate::Exchange) façade validates,
//! applies limits and answers requests left in terminated mailboxes; a backend
//! stores mailboxes and delivers their messages.

use academy_proto::pb;
use async_trait::async_trait;

use academy_proto::{EntityId, ExchangeError, MailboxStatus, RegisteredAgent};

use crate::retention::{Retention, Swept};

/// Which part of a discovery to return.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Page {
    pub(crate) after: Option<EntityId>,
    pub(crate) limit: Option<usize>,
}

impl Page {
    /// This page out of `ids`, the matching ids after `after` in ascending
    /// order, and the next page's token (the page's last id) when more follow.
    /// Reads at most one id past the page.
    pub(crate) fn take(
        &self,
        ids: impl IntoIterator<Item = EntityId>,
    ) -> (Vec<EntityId>, Option<EntityId>) {
        let Some(limit) = self.limit else {
            return (ids.into_iter().collect(), None);
        };
        let mut page: Vec<EntityId> = ids.into_iter().take(limit.saturating_add(1)).collect();
        if page.len() > limit {
            page.truncate(limit);
            let next = page.last().copied();
            (page, next)
        } else {
            (page, None)
        }
    }
}

/// `message` if it is a request whose sender waits for an answer (one left in
/// a terminated mailbox gets an error), without its arguments, which the
/// answer does not need.
pub(crate) fn awaiting_answer(mut message: pb::Message) -> Option<pb::Message> {
    use pb::message::Body;
    match &mut message.body {
        Some(Body::ActionRequest(request)) => request.args = None,
        Some(Body::PingRequest(_) | Body::ShutdownRequest(_)) => {}
        _ => return None,
    }
    Some(message)
}

/// The mailbox a message says it comes from (`header.src`), which a sender
/// must own.
pub(crate) fn source(message: &pb::Message) -> Result<EntityId, ExchangeError> {
    let src = message.header.as_ref().map(|h| h.src.as_str()).unwrap_or_default();
    EntityId::parse_field(src, "header.src")
}

/// The error for a message whose `header.src` names no mailbox, when its
/// sender must own the mailbox it sends from.
pub(crate) fn unknown_source(src: &EntityId) -> ExchangeError {
    ExchangeError::InvalidArgument(format!(
        "header.src {src} is not a registered mailbox: send from a mailbox you registered"
    ))
}

/// A page of discovery.
pub(crate) type Found = (Vec<RegisteredAgent>, Option<EntityId>);

/// What an enqueue may add: per destination mailbox, messages and bytes;
/// per sending principal, bytes queued anywhere. 0 bounds nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Bounds {
    pub(crate) max_queued: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) sender_quota: usize,
}

/// Bytes a delivery adds around each message (its field tag and length, the
/// seq): a batch counts them so that it stays within its bound.
const DELIVERY_OVERHEAD: usize = 24;

/// Whether a message of `size` bytes joins a batch of `batched` messages that
/// takes `bytes` so far, within `max_bytes`: the first always does.
pub(crate) fn joins(batched: usize, bytes: usize, size: usize, max_bytes: usize) -> bool {
    batched == 0 || bytes + size + DELIVERY_OVERHEAD <= max_bytes
}

/// The bytes a message takes in a batch.
pub(crate) fn framed(size: usize) -> usize {
    size + DELIVERY_OVERHEAD
}

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;

/// Storage of mailboxes. Errors use the exchange's own kinds; a backend that
/// can't reach its store answers [`ExchangeError::Unavailable`].
#[async_trait]
pub(crate) trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Whether the store answers (always, in memory); changes are seen on it.
    fn health(&self) -> tokio::sync::watch::Receiver<bool>;

    /// Creates a mailbox (an agent's when `agent` is given), owned by `owner`,
    /// who may own at most `quota` active mailboxes (0: no quota). A `fresh`
    /// id, which the exchange made up just now, cannot be a terminated
    /// agent's: no gravestone is looked for.
    ///
    /// `terminate`, `subscribe` and `acknowledge` answer
    /// [`ExchangeError::PermissionDenied`] unless `caller` may act for the
    /// mailbox's owner ([`permitted`](crate::exchange::permitted)).
    async fn create(
        &self,
        id: EntityId,
        agent: Option<RegisteredAgent>,
        owner: Option<&str>,
        quota: usize,
        fresh: bool,
    ) -> Result<(), ExchangeError>;

    /// Terminates a mailbox: removes it, leaving a gravestone for an agent's
    /// (docs/design.md, "Retention"); returns its state before (`Missing`
    /// when there was none, `Terminated` when only its gravestone was left,
    /// whoever asks) and the unacknowledged requests it held that await an
    /// answer ([`awaiting_answer`]).
    async fn terminate(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<(pb::MailboxState, Vec<pb::Message>), ExchangeError>;

    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError>;

    /// Active agents listing `name` (`exact`: as their own behaviour); all
    /// active agents for the empty name. In id order, from the first id after
    /// `page.after`, at most `page.limit`; with the token of the next page.
    async fn discover(&self, name: &str, exact: bool, page: Page) -> Result<Found, ExchangeError>;

    /// Appends messages to their destinations, in order, within `bounds`;
    /// one result each. With a `sender`, each message's `header.src` must be
    /// a mailbox it may act for ([`source`], [`unknown_source`]), so no one
    /// sends in another's name, and the bytes it queues count against its
    /// quota until acknowledged.
    async fn enqueue(
        &self,
        messages: Vec<(EntityId, pb::Message)>,
        bounds: &Bounds,
        sender: Option<&str>,
    ) -> Vec<Result<(), ExchangeError>>;

    /// Becomes the one subscriber of a mailbox, from its oldest
    /// unacknowledged message. With an `epoch` (not 0), refuses
    /// ([`ExchangeError::StaleEpoch`]) one below the highest epoch that
    /// subscribed, and records it. Status shows its peer `endpoint` while
    /// the subscription lasts.
    async fn subscribe(
        &self,
        id: &EntityId,
        caller: Option<&str>,
        epoch: u64,
        endpoint: &str,
    ) -> Result<Box<dyn BackendSubscription>, ExchangeError>;

    async fn acknowledge(
        &self,
        id: &EntityId,
        seqs: &[u64],
        caller: Option<&str>,
    ) -> Result<(), ExchangeError>;

    /// The principal that owns mailbox `id`; `None` if it has none or does
    /// not exist.
    async fn owner(&self, id: &EntityId) -> Result<Option<String>, ExchangeError>;

    /// Deletes a transient client mailbox without a gravestone (Invoke's).
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    async fn forget(&self, id: &EntityId);

    /// Removes what expired under `retention`: gravestones, and client
    /// mailboxes abandoned for longer than it keeps them.
    async fn sweep(&self, retention: &Retention) -> Result<Swept, ExchangeError>;

    /// Commits what agent `id` did (docs/design.md, "State"), if `caller`
    /// may act for the mailbox's owner, all or nothing: the save is refused
    /// as stale when a later incarnation subscribed or saved, as a conflict
    /// when `expected` (not 0) is not the saved revision; the seqs as in
    /// [`acknowledge`](Self::acknowledge). Then raises the mailbox's epoch,
    /// saves the state (if given), acknowledges the seqs and queues the
    /// answers within `bounds`, counted against the caller's quota. Answers
    /// the revision saved (or kept) and one result per answer.
    async fn commit(
        &self,
        id: &EntityId,
        caller: Option<&str>,
        commit: Commit,
        bounds: &Bounds,
    ) -> Result<Committed, ExchangeError>;

    /// The saved state of agent `id`, if any, for a caller who may act for
    /// the mailbox's owner.
    async fn load_state(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<Option<pb::SavedState>, ExchangeError>;

    /// The descriptions active agents `ids` published, in order (none for
    /// one that published none, or is not an active agent).
    async fn descriptions(
        &self,
        ids: &[EntityId],
    ) -> Result<Vec<Option<std::sync::Arc<pb::AgentDescription>>>, ExchangeError>;

    /// Keeps `ticket` as the one that lets its holder send from mailbox
    /// `id` directly, for `ttl` (docs/design.md, "Direct delivery"), with
    /// the fingerprint of the token it was `granted` to; the mailbox's
    /// earlier ticket is forgotten.
    async fn put_ticket(
        &self,
        id: &EntityId,
        ticket: &str,
        granted: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<(), ExchangeError>;

    /// What `ticket` is, while it is good; `None` for an unknown or
    /// expired one.
    async fn ticket(&self, ticket: &str) -> Result<Option<Ticket>, ExchangeError>;

    /// What is queued unacknowledged in all mailboxes, per behaviour (client
    /// mailboxes: the empty behaviour); behaviours with nothing queued may be
    /// left out.
    async fn depth(&self) -> Result<Vec<Depth>, ExchangeError>;

    /// Starts keeping blob `key` of `size` bytes for mailbox `owner`, for
    /// `ttl` (docs/design.md, "Blobs"); refused when the blobs kept would
    /// pass `capacity` bytes (where the backend bounds them).
    async fn blob_begin(
        &self,
        key: &str,
        owner: &EntityId,
        size: u64,
        ttl: std::time::Duration,
        capacity: u64,
    ) -> Result<(), ExchangeError>;

    /// Keeps chunk `index` of a blob begun ([`BLOB_CHUNK_BYTES`] each but
    /// the last); [`ExchangeError::BlobNotFound`] once it is gone.
    ///
    /// [`BLOB_CHUNK_BYTES`]: crate::limits::BLOB_CHUNK_BYTES
    async fn blob_chunk(
        &self,
        key: &str,
        index: u64,
        data: bytes::Bytes,
    ) -> Result<(), ExchangeError>;

    /// Makes a blob whose every chunk is kept readable, with its digest.
    async fn blob_finish(&self, key: &str, sha256: [u8; 32]) -> Result<(), ExchangeError>;

    /// The size and digest of a readable blob; `None` if there is none.
    async fn blob_meta(&self, key: &str) -> Result<Option<BlobMeta>, ExchangeError>;

    /// Chunk `index` of a readable blob; `None` once it is gone.
    async fn blob_read(&self, key: &str, index: u64)
    -> Result<Option<bytes::Bytes>, ExchangeError>;

    /// Frees a blob (readable or not); whether it was there.
    async fn blob_delete(&self, key: &str) -> Result<bool, ExchangeError>;

    /// Frees every blob of mailbox `owner`.
    async fn blob_delete_owned(&self, owner: &EntityId) -> Result<(), ExchangeError>;

    /// The blobs kept (begun or readable) and their bytes. Over Redis, a
    /// scan of the keys: for tests and inspection, not for every call.
    async fn blob_usage(&self) -> Result<BlobUsage, ExchangeError>;
}

/// A live direct-delivery ticket (docs/design.md, "Direct delivery").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The mailbox it lets its holder send from.
    pub mailbox: EntityId,
    /// How long it is still good for.
    pub left: std::time::Duration,
    /// The fingerprint of the token it was issued to, when it was issued to
    /// one: it is good only while that token is (the server checks).
    pub granted: Option<String>,
}

/// What the blob store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobUsage {
    /// Blobs kept.
    pub blobs: u64,
    /// Their bytes (in memory: their whole size from their first chunk on;
    /// over Redis: the chunks kept, including any a blob left behind).
    pub bytes: u64,
}

/// What a reader learns of a blob first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    /// Its length in bytes.
    pub size: u64,
    /// Its SHA-256, computed as it was put.
    pub sha256: Vec<u8>,
}

/// What an agent commits in one step.
#[derive(Debug, Default)]
pub(crate) struct Commit {
    /// The committing incarnation.
    pub(crate) epoch: u64,
    /// The revision the agent last saw (0: any).
    pub(crate) expected: u64,
    /// The state and its version; `None` keeps the saved one.
    pub(crate) state: Option<(pb::Payload, u32)>,
    /// Delivered requests to acknowledge.
    pub(crate) seqs: Vec<u64>,
    /// Answers, each with its destination.
    pub(crate) answers: Vec<(EntityId, pb::Message)>,
}

/// The revision saved (or kept), and one result per answer.
pub(crate) type Committed = (u64, Vec<Result<(), ExchangeError>>);

/// Messages and bytes queued unacknowledged in the mailboxes of a behaviour.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Depth {
    /// The behaviour (empty: client mailboxes).
    pub behaviour: String,
    /// Messages not yet acknowledged.
    pub messages: u64,
    /// Their encoded bytes.
    pub bytes: u64,
}

/// One subscriber's view of a mailbox.
#[async_trait]
pub(crate) trait BackendSubscription: Send + std::fmt::Debug {
    /// Waits for messages; at least one, at most `max`, no more than
    /// [`joins`] `max_bytes`. Ends with `Terminated` or `Superseded`.
    async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<pb::Delivery>, ExchangeError>;
}
