//! The exchange itself: mailboxes, their states, delivery and discovery, in memory.
//!
//! Every rule of DESIGN.md ("Mailboxes", "Delivery") lives here, so the gRPC
//! service and the SDK's in-process client behave the same.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use academy_proto::pb;
use prost::Message as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{EntityId, ExchangeError};

/// Limits of an exchange, each with a clear error when passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most unacknowledged messages one mailbox holds.
    pub max_queued: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_queued: 10_000,
        }
    }
}

/// State of a mailbox, as `Status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailboxState {
    Missing,
    Active,
    Terminated,
}

impl From<MailboxState> for pb::MailboxState {
    fn from(state: MailboxState) -> Self {
        match state {
            MailboxState::Missing => Self::Missing,
            MailboxState::Active => Self::Active,
            MailboxState::Terminated => Self::Terminated,
        }
    }
}

/// What discovery knows of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: EntityId,
    pub behaviour: String,
    pub implements: Vec<String>,
    pub name: String,
}

impl From<AgentInfo> for pb::AgentInfo {
    fn from(info: AgentInfo) -> Self {
        Self {
            agent_id: info.id.to_string(),
            behaviour: info.behaviour,
            implements: info.implements,
            name: info.name,
        }
    }
}

/// Answer of [`Exchange::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxStatus {
    pub state: MailboxState,
    pub queued: usize,
    pub agent: Option<AgentInfo>,
}

/// One message handed to a subscriber, with its position for acknowledging it.
pub type Delivery = (u64, pb::Message);

/// An in-memory exchange. Cheap to clone; clones share the mailboxes.
#[derive(Debug, Clone)]
pub struct Exchange {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: Limits,
    mailboxes: RwLock<HashMap<EntityId, Arc<Mailbox>>>,
    /// Behaviour or interface name → agents listing it (true when it is their own
    /// behaviour). The empty name lists every active agent.
    index: RwLock<HashMap<String, HashMap<EntityId, bool>>>,
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Mailbox {
    id: EntityId,
    agent: Option<AgentInfo>,
    state: Mutex<QueueState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    terminated: bool,
    /// Unacknowledged (and acknowledged but not yet popped) messages, by seq.
    queue: VecDeque<Entry>,
    next_seq: u64,
    unacked: usize,
    /// Bumped by every subscribe; an older subscription sees it and ends.
    generation: u64,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    message: pb::Message,
    acked: bool,
}

impl Default for Exchange {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exchange {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                mailboxes: RwLock::default(),
                index: RwLock::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Ends every subscription with [`ExchangeError::ShuttingDown`].
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// Creates the mailbox of a new agent, with `id` or a fresh id.
    pub async fn register_agent(
        &self,
        behaviour: &str,
        implements: Vec<String>,
        name: String,
        id: Option<EntityId>,
    ) -> Result<EntityId, ExchangeError> {
        if behaviour.is_empty() {
            return Err(ExchangeError::InvalidArgument("behaviour is empty".into()));
        }
        if implements.iter().any(String::is_empty) {
            return Err(ExchangeError::InvalidArgument(
                "implements contains an empty name".into(),
            ));
        }
        let id = id.unwrap_or_else(EntityId::new_agent);
        if !id.is_agent() {
            return Err(ExchangeError::InvalidArgument(format!(
                "agent_id {id} is not an agent id"
            )));
        }
        let info = AgentInfo {
            id,
            behaviour: behaviour.to_owned(),
            implements,
            name,
        };
        self.insert(id, Some(info.clone()))?;
        let mut index = write(&self.inner.index);
        index.entry(String::new()).or_default().insert(id, false);
        index
            .entry(info.behaviour.clone())
            .or_default()
            .insert(id, true);
        for other in &info.implements {
            index
                .entry(other.clone())
                .or_default()
                .entry(id)
                .or_insert(false);
        }
        tracing::debug!(agent = %id, behaviour, "agent mailbox created");
        Ok(id)
    }

    /// Removes a client mailbox without a gravestone: for transient mailboxes
    /// whose ids nobody can register again (client ids are always fresh).
    pub(crate) fn forget(&self, id: &EntityId) {
        if let Some(mailbox) = write(&self.inner.mailboxes).remove(id) {
            lock(&mailbox.state).terminated = true;
            mailbox.changed.notify_waiters();
        }
    }

    /// Creates the mailbox of a new client.
    pub async fn register_client(&self) -> Result<EntityId, ExchangeError> {
        let id = EntityId::new_client();
        self.insert(id, None)?;
        tracing::debug!(client = %id, "client mailbox created");
        Ok(id)
    }

    fn insert(&self, id: EntityId, agent: Option<AgentInfo>) -> Result<(), ExchangeError> {
        let mut mailboxes = write(&self.inner.mailboxes);
        if let Some(existing) = mailboxes.get(&id) {
            return Err(if lock(&existing.state).terminated {
                ExchangeError::Terminated(id)
            } else {
                ExchangeError::AlreadyExists(id)
            });
        }
        let mailbox = Mailbox {
            id,
            agent,
            state: Mutex::default(),
            changed: Notify::new(),
        };
        mailboxes.insert(id, Arc::new(mailbox));
        Ok(())
    }

    fn mailbox(&self, id: &EntityId) -> Result<Arc<Mailbox>, ExchangeError> {
        read(&self.inner.mailboxes)
            .get(id)
            .cloned()
            .ok_or(ExchangeError::NotFound(*id))
    }

    /// Terminates a mailbox and answers every request still queued in it with an
    /// error. Idempotent: returns the state before the call.
    pub async fn terminate(&self, id: &EntityId) -> Result<MailboxState, ExchangeError> {
        let mailbox = self.mailbox(id)?;
        let queued = {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Ok(MailboxState::Terminated);
            }
            state.terminated = true;
            state.unacked = 0;
            std::mem::take(&mut state.queue)
        };
        mailbox.changed.notify_waiters();
        if let Some(agent) = &mailbox.agent {
            let mut index = write(&self.inner.index);
            for name in std::iter::once(&String::new())
                .chain(std::iter::once(&agent.behaviour))
                .chain(&agent.implements)
            {
                if let Some(ids) = index.get_mut(name) {
                    ids.remove(id);
                    if ids.is_empty() {
                        index.remove(name);
                    }
                }
            }
        }
        let mut answered = 0;
        for entry in queued.into_iter().filter(|e| !e.acked) {
            if let Some(reply) = terminated_reply(id, &entry.message) {
                answered += 1;
                // The requester may be gone too; nobody is left to tell then.
                let _ = self.enqueue(reply, false);
            }
        }
        tracing::debug!(mailbox = %id, answered, "mailbox terminated");
        Ok(MailboxState::Active)
    }

    pub async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError> {
        let Ok(mailbox) = self.mailbox(id) else {
            return Ok(MailboxStatus {
                state: MailboxState::Missing,
                queued: 0,
                agent: None,
            });
        };
        let state = lock(&mailbox.state);
        Ok(MailboxStatus {
            state: if state.terminated {
                MailboxState::Terminated
            } else {
                MailboxState::Active
            },
            queued: state.unacked,
            agent: mailbox.agent.clone(),
        })
    }

    /// Active agents whose behaviour is `name` (`exact`) or lists it; every
    /// active agent when `name` is empty. Ordered by id (creation time).
    pub async fn discover(&self, name: &str, exact: bool) -> Result<Vec<AgentInfo>, ExchangeError> {
        if exact && name.is_empty() {
            return Err(ExchangeError::InvalidArgument(
                "exact discovery needs a behaviour name".into(),
            ));
        }
        let mut ids: Vec<EntityId> = match read(&self.inner.index).get(name) {
            Some(ids) => ids
                .iter()
                .filter(|(_, own)| **own || !exact)
                .map(|(id, _)| *id)
                .collect(),
            None => return Ok(Vec::new()),
        };
        ids.sort_unstable();
        let mailboxes = read(&self.inner.mailboxes);
        Ok(ids
            .iter()
            .filter_map(|id| mailboxes.get(id)?.agent.clone())
            .collect())
    }

    /// Checks a message and returns its destination.
    pub fn validate(&self, message: &pb::Message) -> Result<EntityId, ExchangeError> {
        let size = message.encoded_len();
        let limit = self.inner.limits.max_message_bytes;
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
                "header.tag {:?} is not a UUID",
                header.tag
            )));
        }
        match &message.body {
            None => Err(ExchangeError::InvalidArgument("message has no body".into())),
            Some(pb::message::Body::ActionRequest(req)) if req.action.is_empty() => Err(
                ExchangeError::InvalidArgument("action_request.action is empty".into()),
            ),
            Some(_) => Ok(dest),
        }
    }

    /// Queues a message in its destination's mailbox.
    pub async fn send(&self, message: pb::Message) -> Result<(), ExchangeError> {
        self.validate(&message)?;
        self.enqueue(message, true)
    }

    /// Queues several messages in order; one result each.
    pub async fn send_batch(&self, messages: Vec<pb::Message>) -> Vec<Result<(), ExchangeError>> {
        messages
            .into_iter()
            .map(|m| self.validate(&m).and_then(|_| self.enqueue(m, true)))
            .collect()
    }

    fn enqueue(&self, message: pb::Message, bounded: bool) -> Result<(), ExchangeError> {
        let dest = message
            .header
            .as_ref()
            .and_then(|h| h.dest.parse::<EntityId>().ok())
            .ok_or_else(|| ExchangeError::InvalidArgument("header.dest is malformed".into()))?;
        let mailbox = self.mailbox(&dest)?;
        {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Err(ExchangeError::Terminated(dest));
            }
            let limit = self.inner.limits.max_queued;
            if bounded && state.unacked >= limit {
                return Err(ExchangeError::MailboxFull { id: dest, limit });
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.unacked += 1;
            state.queue.push_back(Entry {
                seq,
                message,
                acked: false,
            });
        }
        mailbox.changed.notify_waiters();
        Ok(())
    }

    /// Becomes the one subscriber of a mailbox. A previous subscription ends with
    /// [`ExchangeError::Superseded`]; every unacknowledged message is delivered again.
    pub async fn subscribe(&self, id: &EntityId) -> Result<Subscription, ExchangeError> {
        let mailbox = self.mailbox(id)?;
        let generation = {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Err(ExchangeError::Terminated(*id));
            }
            state.generation += 1;
            state.generation
        };
        mailbox.changed.notify_waiters();
        Ok(Subscription {
            mailbox,
            generation,
            cursor: 0,
            shutdown: self.inner.shutdown.clone(),
        })
    }

    /// Removes delivered messages. Unknown or already acknowledged seqs are ignored.
    pub async fn acknowledge(&self, id: &EntityId, seqs: &[u64]) -> Result<(), ExchangeError> {
        let mailbox = self.mailbox(id)?;
        let mut state = lock(&mailbox.state);
        if state.terminated {
            return Err(ExchangeError::Terminated(*id));
        }
        if let Some(bad) = seqs.iter().find(|s| **s >= state.next_seq) {
            return Err(ExchangeError::InvalidArgument(format!(
                "seq {bad} was never delivered from mailbox {id}"
            )));
        }
        let state = &mut *state;
        for seq in seqs {
            let pos = state.queue.partition_point(|e| e.seq < *seq);
            if let Some(entry) = state
                .queue
                .get_mut(pos)
                .filter(|e| e.seq == *seq && !e.acked)
            {
                entry.acked = true;
                state.unacked -= 1;
            }
        }
        while state.queue.front().is_some_and(|e| e.acked) {
            state.queue.pop_front();
        }
        Ok(())
    }
}

/// The error response that answers a request left in a terminated mailbox.
fn terminated_reply(id: &EntityId, request: &pb::Message) -> Option<pb::Message> {
    use pb::message::Body;
    let header = request.header.as_ref()?;
    if !matches!(
        request.body,
        Some(Body::ActionRequest(_) | Body::PingRequest(_) | Body::ShutdownRequest(_))
    ) {
        return None;
    }
    Some(pb::Message {
        header: Some(pb::Header {
            src: id.to_string(),
            dest: header.src.clone(),
            tag: header.tag.clone(),
            label: header.label.clone(),
            traceparent: header.traceparent.clone(),
        }),
        body: Some(Body::ErrorResponse(pb::ErrorResponse {
            code: tonic::Code::FailedPrecondition as i32,
            r#type: "MailboxTerminated".into(),
            message: ExchangeError::Terminated(*id).to_string(),
            details: HashMap::new(),
        })),
    })
}

/// The subscriber's side of a mailbox.
#[derive(Debug)]
pub struct Subscription {
    mailbox: Arc<Mailbox>,
    generation: u64,
    /// Seq of the next message to deliver.
    cursor: u64,
    shutdown: CancellationToken,
}

impl Subscription {
    pub fn mailbox_id(&self) -> EntityId {
        self.mailbox.id
    }

    /// Waits for messages and returns up to `max` of them (at least one), in order,
    /// stopping early once `max_bytes` of encoded messages are gathered.
    pub async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, ExchangeError> {
        loop {
            let changed = self.mailbox.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = lock(&self.mailbox.state);
                if state.terminated {
                    return Err(ExchangeError::Terminated(self.mailbox.id));
                }
                if state.generation != self.generation {
                    return Err(ExchangeError::Superseded(self.mailbox.id));
                }
                let start = state.queue.partition_point(|e| e.seq < self.cursor);
                let mut batch = Vec::new();
                let mut bytes = 0;
                for entry in state.queue.range(start..).filter(|e| !e.acked) {
                    if batch.len() >= max || (!batch.is_empty() && bytes >= max_bytes) {
                        break;
                    }
                    bytes += entry.message.encoded_len();
                    batch.push((entry.seq, entry.message.clone()));
                }
                if let Some((last, _)) = batch.last() {
                    self.cursor = last + 1;
                    return Ok(batch);
                }
            }
            tokio::select! {
                () = &mut changed => {}
                () = self.shutdown.cancelled() => return Err(ExchangeError::ShuttingDown),
            }
        }
    }
}
