//! The in-memory backend: mailboxes live as long as the process.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, RwLock};

use academy_proto::pb;
use async_trait::async_trait;
use prost::Message as _;
use tokio::sync::Notify;

use super::{Backend, BackendSubscription, Found, Page, awaiting_answer, source, unknown_source};
use crate::exchange::permitted;
use academy_proto::{EntityId, ExchangeError, MailboxStatus, RegisteredAgent};

#[derive(Debug, Default)]
pub(crate) struct MemoryBackend {
    mailboxes: RwLock<HashMap<EntityId, Arc<Mailbox>>>,
    /// Discovery, in id order: `[listing, own]`, behaviour or interface name →
    /// agents listing it / whose own behaviour it is. The empty name lists
    /// every active agent.
    index: RwLock<[HashMap<String, BTreeSet<EntityId>>; 2]>,
}

#[derive(Debug)]
struct Mailbox {
    id: EntityId,
    agent: Option<RegisteredAgent>,
    owner: Option<Box<str>>,
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
    /// The subscription of the current generation is open.
    subscribed: bool,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    message: pb::Message,
    acked: bool,
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
        read(&self.mailboxes).get(id).cloned().ok_or(ExchangeError::NotFound(*id))
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
            Err(ExchangeError::NotFound(_)) => Err(unknown_source(&src)),
            owned => owned.map(drop),
        }
    }

    fn push(
        &self,
        dest: &EntityId,
        message: pb::Message,
        max: Option<usize>,
    ) -> Result<(), ExchangeError> {
        let mailbox = self.mailbox(dest)?;
        {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Err(ExchangeError::Terminated(*dest));
            }
            if let Some(limit) = max.filter(|limit| state.unacked >= *limit) {
                return Err(ExchangeError::MailboxFull { id: *dest, limit });
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.unacked += 1;
            state.queue.push_back(Entry { seq, message, acked: false });
        }
        mailbox.changed.notify_waiters();
        Ok(())
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn create(
        &self,
        id: EntityId,
        agent: Option<RegisteredAgent>,
        owner: Option<&str>,
    ) -> Result<(), ExchangeError> {
        {
            let mut mailboxes = write(&self.mailboxes);
            if let Some(existing) = mailboxes.get(&id) {
                return Err(if lock(&existing.state).terminated {
                    ExchangeError::Terminated(id)
                } else {
                    ExchangeError::AlreadyExists(id)
                });
            }
            let mailbox = Mailbox {
                id,
                agent: agent.clone(),
                owner: owner.map(Into::into),
                state: Mutex::default(),
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
        let mailbox = self.owned(id, caller)?;
        let queued = {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Ok((pb::MailboxState::Terminated, Vec::new()));
            }
            state.terminated = true;
            state.unacked = 0;
            std::mem::take(&mut state.queue)
        };
        mailbox.changed.notify_waiters();
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
        let waiting = queued.into_iter().filter(|e| !e.acked);
        Ok((pb::MailboxState::Active, waiting.filter_map(|e| awaiting_answer(e.message)).collect()))
    }

    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError> {
        let Ok(mailbox) = self.mailbox(id) else {
            return Ok(MailboxStatus::missing());
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
        Ok((ids.iter().filter_map(|id| mailboxes.get(id)?.agent.clone()).collect(), next))
    }

    async fn enqueue(
        &self,
        messages: Vec<(EntityId, pb::Message)>,
        max_queued: Option<usize>,
        sender: Option<&str>,
    ) -> Vec<Result<(), ExchangeError>> {
        messages
            .into_iter()
            .map(|(dest, m)| {
                self.check_source(&m, sender)?;
                self.push(&dest, m, max_queued)
            })
            .collect()
    }

    async fn subscribe(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<Box<dyn BackendSubscription>, ExchangeError> {
        let mailbox = self.owned(id, caller)?;
        let generation = {
            let mut state = lock(&mailbox.state);
            if state.terminated {
                return Err(ExchangeError::Terminated(*id));
            }
            state.generation += 1;
            state.subscribed = true;
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
            if let Some(entry) = state.queue.get_mut(pos).filter(|e| e.seq == *seq && !e.acked) {
                entry.acked = true;
                state.unacked -= 1;
            }
        }
        while state.queue.front().is_some_and(|e| e.acked) {
            state.queue.pop_front();
        }
        Ok(())
    }

    async fn owner(&self, id: &EntityId) -> Result<Option<String>, ExchangeError> {
        Ok(self.mailbox(id).ok().and_then(|m| m.owner.as_deref().map(str::to_owned)))
    }

    async fn forget(&self, id: &EntityId) {
        if let Some(mailbox) = write(&self.mailboxes).remove(id) {
            lock(&mailbox.state).terminated = true;
            mailbox.changed.notify_waiters();
        }
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
                    if batch.len() >= max || (!batch.is_empty() && bytes >= max_bytes) {
                        break;
                    }
                    bytes += entry.message.encoded_len();
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
