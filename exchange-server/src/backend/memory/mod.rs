//! The in-memory backend: mailboxes live as long as the process.

mod blobs;
mod gravestones;

#[cfg(feature = "server")]
pub(crate) use blobs::check_dir as check_blob_dir;

use academy_proto::sync::{lock, read, write};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use academy_proto::pb;
use async_trait::async_trait;
use prost::Message as _;
use tokio::sync::Notify;

use super::{
    Backend, BackendSubscription, BlobMeta, BlobUsage, Bounds, Commit, Committed, Depth, Found,
    Page, Ticket, awaiting_answer, framed, joins, source, unknown_source,
};
use crate::exchange::permitted;
use crate::retention::{Retention, Swept};
use academy_proto::{EntityId, ExchangeError, MailboxStatus, RegisteredAgent};
use gravestones::Gravestones;

#[derive(Debug)]
pub(crate) struct MemoryBackend {
    /// Active mailboxes (a terminated one lives on only while a subscriber
    /// still holds it).
    mailboxes: RwLock<HashMap<EntityId, Arc<Mailbox>>>,
    /// Terminated agents' ids, taken or left with `mailboxes` held for
    /// writing.
    gravestones: Mutex<Gravestones>,
    /// What each principal holds, for its quotas.
    usage: Mutex<HashMap<Arc<str>, Usage>>,
    /// Discovery, in id order: `[listing, own]`, behaviour or interface name →
    /// agents listing it / whose own behaviour it is. The empty name lists
    /// every active agent.
    index: RwLock<[HashMap<String, BTreeSet<EntityId>>; 2]>,
    /// Direct-delivery tickets: the mailbox each lets one send from, until
    /// when; and each mailbox's one ticket.
    tickets: Mutex<Tickets>,
    blobs: Mutex<blobs::Blobs>,
}

#[derive(Debug, Default)]
struct Tickets {
    by_ticket: HashMap<String, (EntityId, Instant, Option<String>)>,
    by_mailbox: HashMap<EntityId, String>,
}

impl MemoryBackend {
    pub(crate) fn new(retention: &Retention) -> Self {
        Self {
            mailboxes: RwLock::default(),
            gravestones: Mutex::new(Gravestones::new(retention.gravestones)),
            usage: Mutex::default(),
            index: RwLock::default(),
            tickets: Mutex::default(),
            blobs: Mutex::default(),
        }
    }

    /// Keeps blobs in files under `dir` instead of memory.
    pub(crate) fn with_blob_dir(self, dir: Option<std::path::PathBuf>) -> Self {
        lock(&self.blobs).dir = dir;
        self
    }
}

/// What a principal holds: active mailboxes it owns, bytes of messages it
/// sent that are not acknowledged yet.
#[derive(Debug, Default)]
struct Usage {
    mailboxes: usize,
    queued_bytes: usize,
}

#[derive(Debug)]
struct Mailbox {
    id: EntityId,
    agent: Option<RegisteredAgent>,
    owner: Option<Arc<str>>,
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
    /// Encoded bytes of the unacknowledged messages.
    bytes: usize,
    /// The highest incarnation that subscribed (0: none fenced).
    epoch: u64,
    /// Bumped by every subscribe; an older subscription sees it and ends.
    generation: u64,
    /// The subscription of the current generation is open.
    subscribed: bool,
    /// The peer endpoint its subscriber advertised (empty: none).
    endpoint: Arc<str>,
    /// Since when a client mailbox has had no subscriber.
    idle_since: Option<Instant>,
    /// An agent's saved state (boxed: most mailboxes have none, and it
    /// would take 200 bytes in each).
    saved: Option<Box<pb::SavedState>>,
}

impl QueueState {
    /// Refuses to acknowledge from a terminated mailbox, or a seq never
    /// delivered.
    fn check_acknowledge(&self, id: &EntityId, seqs: &[u64]) -> Result<(), ExchangeError> {
        if self.terminated {
            return Err(ExchangeError::Terminated(*id));
        }
        match seqs.iter().find(|s| **s >= self.next_seq) {
            Some(bad) => Err(ExchangeError::InvalidArgument(format!(
                "seq {bad} was never delivered from mailbox {id}"
            ))),
            None => Ok(()),
        }
    }

    /// Acknowledges `seqs` (unknown or settled ones are ignored); answers
    /// the bytes each sender gets back.
    fn settle(&mut self, seqs: &[u64]) -> Vec<(Arc<str>, usize)> {
        let mut settled = Vec::new();
        for seq in seqs {
            let pos = self.queue.partition_point(|e| e.seq < *seq);
            if let Some(entry) = self.queue.get_mut(pos).filter(|e| e.seq == *seq && !e.acked) {
                entry.acked = true;
                self.unacked -= 1;
                self.bytes -= entry.size;
                if let Some(sender) = &entry.sender {
                    settled.push((sender.clone(), entry.size));
                }
            }
        }
        while self.queue.front().is_some_and(|e| e.acked) {
            self.queue.pop_front();
        }
        settled
    }
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    message: pb::Message,
    acked: bool,
    /// Its encoded size.
    size: usize,
    /// The principal that sent it, whose quota it counts against.
    sender: Option<Arc<str>>,
}

/// The names an agent is listed under in the index, and whether in the
/// index of own behaviours (`exact`).
fn index_names(agent: &RegisteredAgent) -> impl Iterator<Item = (&str, bool)> {
    let own = agent.behaviour.as_str();
    [("", false), (own, false), (own, true)]
        .into_iter()
        .chain(agent.implements.iter().map(|n| (n.as_str(), false)))
}

impl MemoryBackend {
    fn mailbox(&self, id: &EntityId) -> Result<Arc<Mailbox>, ExchangeError> {
        read(&self.mailboxes).get(id).cloned().ok_or_else(|| self.missing(id))
    }

    /// Why there is no mailbox `id`: it was terminated (its gravestone is
    /// there), or there never was one (or its gravestone expired).
    fn missing(&self, id: &EntityId) -> ExchangeError {
        if self.buried(id) { ExchangeError::Terminated(*id) } else { ExchangeError::NotFound(*id) }
    }

    fn buried(&self, id: &EntityId) -> bool {
        id.is_agent() && lock(&self.gravestones).holds(id.uuid().as_u128(), Instant::now())
    }

    /// The mailbox, if `caller` may act for its owner.
    fn owned(&self, id: &EntityId, caller: Option<&str>) -> Result<Arc<Mailbox>, ExchangeError> {
        let mailbox = self.mailbox(id)?;
        match &mailbox.owner {
            Some(owner) if !permitted(Some(owner), caller) => {
                Err(ExchangeError::PermissionDenied { id: *id, owner: owner.to_string() })
            }
            _ => Ok(mailbox),
        }
    }

    /// Checks that `sender` (when given) may act for `message`'s source.
    fn check_source(
        &self,
        message: &pb::Message,
        sender: Option<&str>,
    ) -> Result<(), ExchangeError> {
        if sender.is_none() {
            return Ok(());
        }
        let src = source(message)?;
        match self.owned(&src, sender) {
            // Whose a terminated mailbox was is not kept.
            Err(ExchangeError::NotFound(_) | ExchangeError::Terminated(_)) => {
                Err(unknown_source(&src))
            }
            owned => owned.map(drop),
        }
    }

    fn push(
        &self,
        dest: &EntityId,
        message: pb::Message,
        bounds: &Bounds,
        sender: Option<&Arc<str>>,
    ) -> Result<(), ExchangeError> {
        let mailbox = self.mailbox(dest)?;
        let size = message.encoded_len();
        {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Err(ExchangeError::Terminated(*dest));
            }
            let (max, max_bytes) = (bounds.max_queued, bounds.max_queued_bytes);
            if max > 0 && state.unacked >= max {
                return Err(ExchangeError::MailboxFull { id: *dest, limit: max });
            }
            if max_bytes > 0 && state.bytes + size > max_bytes {
                return Err(ExchangeError::MailboxBytesFull { id: *dest, limit: max_bytes });
            }
            if let Some(sender) = sender {
                self.charge(sender, size, bounds.sender_quota)?;
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.unacked += 1;
            state.bytes += size;
            let sender = sender.cloned();
            state.queue.push_back(Entry { seq, message, acked: false, size, sender });
        }
        mailbox.changed.notify_waiters();
        Ok(())
    }

    /// Counts `size` bytes against `sender`'s quota, if they fit.
    fn charge(&self, sender: &Arc<str>, size: usize, quota: usize) -> Result<(), ExchangeError> {
        let mut usage = lock(&self.usage);
        let held = usage.entry(sender.clone()).or_default();
        if quota > 0 && held.queued_bytes + size > quota {
            return Err(ExchangeError::QuotaExceeded {
                principal: sender.to_string(),
                quota: "bytes queued unacknowledged".into(),
                max: quota,
            });
        }
        held.queued_bytes += size;
        Ok(())
    }

    /// Gives back bytes that settled messages held against their senders'
    /// quotas.
    fn refund<'a>(&self, held: impl IntoIterator<Item = (&'a Arc<str>, usize)>) {
        let mut usage = None;
        for (sender, size) in held {
            let usage = usage.get_or_insert_with(|| lock(&self.usage));
            if let Some(held) = usage.get_mut(sender) {
                held.queued_bytes = held.queued_bytes.saturating_sub(size);
            }
        }
    }

    /// A mailbox of `owner` is gone.
    fn release(&self, owner: Option<&Arc<str>>) {
        if let Some(owner) = owner
            && let Some(held) = lock(&self.usage).get_mut(owner)
        {
            held.mailboxes = held.mailboxes.saturating_sub(1);
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        // Always up: the sender goes, the value stays.
        tokio::sync::watch::channel(true).1
    }

    async fn create(
        &self,
        id: EntityId,
        agent: Option<RegisteredAgent>,
        owner: Option<&str>,
        quota: usize,
        fresh: bool,
    ) -> Result<(), ExchangeError> {
        {
            let mut mailboxes = write(&self.mailboxes);
            if mailboxes.contains_key(&id) {
                return Err(ExchangeError::AlreadyExists(id));
            }
            if !fresh && self.buried(&id) {
                return Err(ExchangeError::Terminated(id));
            }
            let owner: Option<Arc<str>> = owner.map(Into::into);
            if let Some(owner) = &owner {
                let mut usage = lock(&self.usage);
                let held = usage.entry(owner.clone()).or_default();
                if quota > 0 && held.mailboxes >= quota {
                    return Err(ExchangeError::QuotaExceeded {
                        principal: owner.to_string(),
                        quota: "active mailboxes".into(),
                        max: quota,
                    });
                }
                held.mailboxes += 1;
            }
            let idle_since = agent.is_none().then(Instant::now);
            let mailbox = Mailbox {
                id,
                agent: agent.clone(),
                owner,
                state: Mutex::new(QueueState { idle_since, ..QueueState::default() }),
                changed: Notify::new(),
            };
            mailboxes.insert(id, Arc::new(mailbox));
        }
        if let Some(agent) = &agent {
            let mut index = write(&self.index);
            for (name, exact) in index_names(agent) {
                index[usize::from(exact)].entry(name.to_owned()).or_default().insert(id);
            }
        }
        Ok(())
    }

    async fn terminate(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<(pb::MailboxState, Vec<pb::Message>), ExchangeError> {
        match self.owned(id, caller) {
            Err(ExchangeError::Terminated(_)) => return Ok((pb::MailboxState::Terminated, vec![])),
            Err(ExchangeError::NotFound(_)) => return Ok((pb::MailboxState::Missing, vec![])),
            owned => drop(owned?),
        }
        // Gone meanwhile: terminated by a concurrent call.
        let Some(queued) = self.remove_if(id, |_| true) else {
            return Ok((pb::MailboxState::Terminated, Vec::new()));
        };
        let waiting = queued.into_iter().filter(|e| !e.acked);
        Ok((pb::MailboxState::Active, waiting.filter_map(|e| awaiting_answer(e.message)).collect()))
    }

    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError> {
        let mailbox = match self.mailbox(id) {
            Ok(mailbox) => mailbox,
            Err(ExchangeError::Terminated(_)) => return Ok(MailboxStatus::terminated()),
            Err(_) => return Ok(MailboxStatus::missing()),
        };
        let state = lock(&mailbox.state);
        Ok(MailboxStatus {
            state: if state.terminated {
                pb::MailboxState::Terminated
            } else {
                pb::MailboxState::Active
            },
            queued: state.unacked,
            agent: mailbox.agent.clone(),
            subscribed: state.subscribed && !state.terminated,
            endpoint: if state.subscribed { state.endpoint.to_string() } else { String::new() },
        })
    }

    async fn discover(&self, name: &str, exact: bool, page: Page) -> Result<Found, ExchangeError> {
        let (ids, next) = match read(&self.index)[usize::from(exact)].get(name) {
            Some(ids) => {
                let from = page.after.map_or(Bound::Unbounded, Bound::Excluded);
                page.take(ids.range((from, Bound::Unbounded)).copied())
            }
            None => return Ok((Vec::new(), None)),
        };
        let mailboxes = read(&self.mailboxes);
        let found = ids.iter().filter_map(|id| {
            let mailbox = mailboxes.get(id)?;
            let agent = mailbox.agent.clone()?;
            let state = lock(&mailbox.state);
            let endpoint =
                if state.subscribed { state.endpoint.to_string() } else { String::new() };
            Some(RegisteredAgent { endpoint, ..agent })
        });
        Ok((found.collect(), next))
    }

    async fn enqueue(
        &self,
        messages: Vec<(EntityId, pb::Message)>,
        bounds: &Bounds,
        sender: Option<&str>,
    ) -> Vec<Result<(), ExchangeError>> {
        let sender: Option<Arc<str>> = sender.map(Into::into);
        messages
            .into_iter()
            .map(|(dest, m)| {
                self.check_source(&m, sender.as_deref())?;
                self.push(&dest, m, bounds, sender.as_ref())
            })
            .collect()
    }

    async fn subscribe(
        &self,
        id: &EntityId,
        caller: Option<&str>,
        epoch: u64,
        endpoint: &str,
    ) -> Result<Box<dyn BackendSubscription>, ExchangeError> {
        let mailbox = self.owned(id, caller)?;
        let generation = {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Err(ExchangeError::Terminated(*id));
            }
            if epoch > 0 {
                if epoch < state.epoch {
                    return Err(ExchangeError::StaleEpoch { id: *id, epoch, current: state.epoch });
                }
                state.epoch = epoch;
            }
            state.generation += 1;
            state.subscribed = true;
            state.endpoint = endpoint.into();
            state.idle_since = None;
            state.generation
        };
        mailbox.changed.notify_waiters();
        Ok(Box::new(MemorySubscription { mailbox, generation, cursor: 0 }))
    }

    async fn acknowledge(
        &self,
        id: &EntityId,
        seqs: &[u64],
        caller: Option<&str>,
    ) -> Result<(), ExchangeError> {
        let mailbox = self.owned(id, caller)?;
        let settled = {
            let mut state = lock(&mailbox.state);
            state.check_acknowledge(id, seqs)?;
            state.settle(seqs)
        };
        self.refund(settled.iter().map(|(sender, size)| (sender, *size)));
        Ok(())
    }

    async fn owner(&self, id: &EntityId) -> Result<Option<String>, ExchangeError> {
        Ok(self.mailbox(id).ok().and_then(|m| m.owner.as_deref().map(str::to_owned)))
    }

    async fn forget(&self, id: &EntityId) {
        self.remove_if(id, |_| true);
    }

    async fn put_ticket(
        &self,
        id: &EntityId,
        ticket: &str,
        granted: Option<&str>,
        ttl: std::time::Duration,
    ) -> Result<(), ExchangeError> {
        let mut tickets = lock(&self.tickets);
        let now = Instant::now();
        // At most one per mailbox, and the expired ones go now and then.
        if let Some(old) = tickets.by_mailbox.insert(*id, ticket.to_owned()) {
            tickets.by_ticket.remove(&old);
        }
        let granted = granted.map(str::to_owned);
        tickets.by_ticket.insert(ticket.to_owned(), (*id, now + ttl, granted));
        if tickets.by_ticket.len().is_power_of_two() {
            let Tickets { by_ticket, by_mailbox } = &mut *tickets;
            by_ticket.retain(|_, (id, until, _)| {
                let live = *until > now;
                if !live {
                    by_mailbox.remove(id);
                }
                live
            });
        }
        Ok(())
    }

    async fn ticket(&self, ticket: &str) -> Result<Option<Ticket>, ExchangeError> {
        let tickets = lock(&self.tickets);
        let now = Instant::now();
        Ok(tickets.by_ticket.get(ticket).filter(|(_, until, _)| *until > now).map(
            |(id, until, granted)| Ticket {
                mailbox: *id,
                left: *until - now,
                granted: granted.clone(),
            },
        ))
    }

    async fn commit(
        &self,
        id: &EntityId,
        caller: Option<&str>,
        commit: Commit,
        bounds: &Bounds,
    ) -> Result<Committed, ExchangeError> {
        let mailbox = self.owned(id, caller)?;
        // Checked and written under the mailbox's lock; the answers are queued
        // right after, before the call returns (holding one mailbox's lock
        // while taking another's could deadlock two agents answering each
        // other). The process is the one failure domain: nothing sees the
        // state saved without its answers queued.
        let (revision, settled) = {
            let mut state = lock(&mailbox.state);
            state.check_acknowledge(id, &commit.seqs)?;
            let (revision, saved_by) =
                state.saved.as_ref().map_or((0, 0), |s| (s.revision, s.epoch));
            let current = state.epoch.max(saved_by);
            let (epoch, expected) = (commit.epoch, commit.expected);
            if epoch < current {
                return Err(ExchangeError::StaleEpoch { id: *id, epoch, current });
            }
            if expected != 0 && expected != revision {
                return Err(ExchangeError::StateConflict { id: *id, expected, current: revision });
            }
            state.epoch = state.epoch.max(epoch);
            let revision = match commit.state {
                None => revision,
                Some((data, version)) => {
                    state.saved = Some(Box::new(pb::SavedState {
                        data: Some(data),
                        version,
                        revision: revision + 1,
                        epoch,
                        saved_at: Some(std::time::SystemTime::now().into()),
                    }));
                    revision + 1
                }
            };
            (revision, state.settle(&commit.seqs))
        };
        self.refund(settled.iter().map(|(sender, size)| (sender, *size)));
        let sender: Option<Arc<str>> = caller.map(Into::into);
        let results = commit
            .answers
            .into_iter()
            .map(|(dest, m)| self.push(&dest, m, bounds, sender.as_ref()))
            .collect();
        Ok((revision, results))
    }

    async fn load_state(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<Option<pb::SavedState>, ExchangeError> {
        let mailbox = self.owned(id, caller)?;
        let state = lock(&mailbox.state);
        if state.terminated {
            return Err(ExchangeError::Terminated(*id));
        }
        Ok(state.saved.as_deref().cloned())
    }

    async fn descriptions(
        &self,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Arc<pb::AgentDescription>>>, ExchangeError> {
        let mailboxes = read(&self.mailboxes);
        Ok(ids.iter().map(|id| mailboxes.get(id)?.agent.as_ref()?.description.clone()).collect())
    }

    async fn depth(&self) -> Result<Vec<Depth>, ExchangeError> {
        let mailboxes: Vec<Arc<Mailbox>> = read(&self.mailboxes).values().cloned().collect();
        let mut by: HashMap<&str, Depth> = HashMap::new();
        for mailbox in &mailboxes {
            let (messages, bytes) = {
                let state = lock(&mailbox.state);
                (state.unacked as u64, state.bytes as u64)
            };
            if messages == 0 {
                continue;
            }
            let behaviour = mailbox.agent.as_ref().map_or("", |a| a.behaviour.as_str());
            let depth = by
                .entry(behaviour)
                .or_insert_with(|| Depth { behaviour: behaviour.to_owned(), ..Depth::default() });
            depth.messages += messages;
            depth.bytes += bytes;
        }
        Ok(by.into_values().collect())
    }

    async fn blob_begin(
        &self,
        key: &str,
        owner: &EntityId,
        size: u64,
        ttl: std::time::Duration,
        capacity: u64,
    ) -> Result<(), ExchangeError> {
        lock(&self.blobs).begin(key, owner, size, ttl, capacity)
    }

    async fn blob_chunk(
        &self,
        key: &str,
        index: u64,
        data: bytes::Bytes,
    ) -> Result<(), ExchangeError> {
        let Some(at) = lock(&self.blobs).chunk(key, index, data.clone())? else { return Ok(()) };
        blobs::write_at(at, data).await?;
        lock(&self.blobs).written(key)
    }

    async fn blob_finish(&self, key: &str, sha256: [u8; 32]) -> Result<(), ExchangeError> {
        lock(&self.blobs).finish(key, sha256)
    }

    async fn blob_meta(&self, key: &str) -> Result<Option<BlobMeta>, ExchangeError> {
        Ok(lock(&self.blobs).meta(key))
    }

    async fn blob_read(
        &self,
        key: &str,
        index: u64,
    ) -> Result<Option<bytes::Bytes>, ExchangeError> {
        let found = lock(&self.blobs).read(key, index);
        match found {
            None => Ok(None),
            Some(Ok(data)) => Ok(Some(data)),
            Some(Err((at, len))) => blobs::read_at(at, len).await.map(Some),
        }
    }

    async fn blob_delete(&self, key: &str) -> Result<bool, ExchangeError> {
        Ok(lock(&self.blobs).delete(key))
    }

    async fn blob_delete_owned(&self, owner: &EntityId) -> Result<(), ExchangeError> {
        lock(&self.blobs).delete_owned(owner);
        Ok(())
    }

    async fn blob_usage(&self) -> Result<BlobUsage, ExchangeError> {
        Ok(lock(&self.blobs).usage())
    }

    async fn sweep(&self, retention: &Retention) -> Result<Swept, ExchangeError> {
        let now = Instant::now();
        let gravestones = lock(&self.gravestones).expire(now);
        let Some(ttl) = retention.abandoned_clients else {
            return Ok(Swept { gravestones, abandoned_clients: 0 });
        };
        let abandoned = |state: &QueueState| {
            !state.subscribed && state.idle_since.is_some_and(|t| now.duration_since(t) >= ttl)
        };
        let candidates: Vec<EntityId> = read(&self.mailboxes)
            .values()
            .filter(|m| m.agent.is_none() && abandoned(&lock(&m.state)))
            .map(|m| m.id)
            .collect();
        let abandoned_clients =
            candidates.iter().filter(|id| self.remove_if(id, abandoned).is_some()).count();
        Ok(Swept { gravestones, abandoned_clients })
    }
}

impl MemoryBackend {
    /// Removes mailbox `id` if its state passes `test`: its subscriber sees
    /// it terminated, an agent's leaves a gravestone and the index, and what
    /// it held is given back. A client's id was never chosen by anyone, so
    /// nothing can come back under it: it leaves no gravestone. Answers
    /// what was queued in it; `None` when it was not there or failed `test`.
    fn remove_if(
        &self,
        id: &EntityId,
        test: impl Fn(&QueueState) -> bool,
    ) -> Option<VecDeque<Entry>> {
        let (mailbox, queued) = {
            let mut mailboxes = write(&self.mailboxes);
            let mailbox = mailboxes.get(id).cloned()?;
            let mut state = lock(&mailbox.state);
            if state.terminated || !test(&state) {
                return None;
            }
            mailboxes.remove(id);
            if id.is_agent() {
                lock(&self.gravestones).bury(id.uuid().as_u128(), Instant::now());
            }
            state.terminated = true;
            state.unacked = 0;
            state.bytes = 0;
            let queued = std::mem::take(&mut state.queue);
            drop(state);
            (mailbox, queued)
        };
        mailbox.changed.notify_waiters();
        self.refund(
            queued.iter().filter(|e| !e.acked).filter_map(|e| Some((e.sender.as_ref()?, e.size))),
        );
        self.release(mailbox.owner.as_ref());
        if let Some(agent) = &mailbox.agent {
            let mut index = write(&self.index);
            for (name, exact) in index_names(agent) {
                let names = &mut index[usize::from(exact)];
                if let Some(ids) = names.get_mut(name) {
                    ids.remove(id);
                    if ids.is_empty() {
                        names.remove(name);
                    }
                }
            }
        }
        Some(queued)
    }
}

#[derive(Debug)]
struct MemorySubscription {
    mailbox: Arc<Mailbox>,
    generation: u64,
    /// Seq of the next message to deliver.
    cursor: u64,
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        let mut state = lock(&self.mailbox.state);
        if state.generation == self.generation {
            state.subscribed = false;
            state.endpoint = "".into();
            if self.mailbox.agent.is_none() {
                state.idle_since = Some(Instant::now());
            }
        }
    }
}

#[async_trait]
impl BackendSubscription for MemorySubscription {
    async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<pb::Delivery>, ExchangeError> {
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
                    if batch.len() >= max || !joins(batch.len(), bytes, entry.size, max_bytes) {
                        break;
                    }
                    bytes += framed(entry.size);
                    batch.push(pb::Delivery {
                        seq: entry.seq,
                        message: Some(entry.message.clone()),
                    });
                }
                if let Some(last) = batch.last() {
                    self.cursor = last.seq + 1;
                    return Ok(batch);
                }
            }
            changed.await;
        }
    }
}
