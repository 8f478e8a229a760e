//! The Redis backend: durable mailboxes, shared by every exchange replica that
//! uses the same Redis and prefix. Keys: [`keys`]; scripts: `scripts/*.lua`.
//!
//! State changes run as Lua scripts (atomic). Each replica listens on its own
//! pub/sub channel; a script that adds a message to a mailbox with a
//! subscriber publishes it there (small messages whole, large ones as a
//! notice to read), as does one that terminates the mailbox or hands it to
//! another subscriber; a small message for a subscriber on the calling
//! replica comes back in the script's answer instead, and is handed over
//! from there ([`RedisBackend::hand_over`]). So delivery is pushed, and its
//! cost does not grow with the number of subscriptions. Each notice names the
//! message before it, so a replica that missed one (a dropped connection)
//! sees the gap and reads the stream; after reconnecting it reads every
//! subscribed stream again ([`reader`]).

mod blobs;
mod conn;
mod expiry;
mod keys;
mod migration;
mod presence;
mod reader;
mod reply;
mod scripts;
mod stream;
mod subscription;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use academy_proto::{EntityId, ExchangeError, MailboxStatus, RegisteredAgent, pb};
use academy_server::redis::{connect as connect_redis, redacted_url};
use async_trait::async_trait;
use prost::Message as _;
use redis::Value;
use tokio_util::sync::CancellationToken;

use super::{
    Backend, BackendSubscription, BlobMeta, BlobUsage, Bounds, Commit, Committed, Depth, Found,
    Page, Ticket, awaiting_answer, source, unknown_source,
};
use crate::retention::{Retention, Swept};
use conn::Conn;
use expiry::Stones;
use keys::Keys;
use presence::{InUse, PRESENCE_EVERY};
use reader::Reader;
use reply::{array, integer, string, unavailable};
use scripts::{Scripts, caller_arg, run, run_one, state_error};
use stream::{range_after, range_entries, seq_of, stream_id_of};
use subscription::RedisSubscription;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://HOST:PORT/DB`.
    pub url: String,
    /// Prefix of every key, so several deployments can share one Redis.
    pub prefix: String,
    /// How long a call waits for Redis (to reconnect, or to answer) before
    /// failing with UNAVAILABLE.
    pub timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            prefix: "academy".into(),
            timeout: academy_server::redis::DEFAULT_TIMEOUT,
        }
    }
}

/// How often an exchange looks for agents in a schema-1 index (written by
/// replicas of an earlier version during a rolling upgrade).
const MIGRATE_EVERY: Duration = Duration::from_secs(60);
/// Entries read at a time from a terminated mailbox's queue (messages may be
/// large; only the requests' headers are kept).
const DRAIN_PAGE: usize = 64;
/// How long a drain stream lives if the exchange that should read it dies.
const DRAIN_TTL_SECS: u64 = 24 * 3600;
/// Messages up to this size travel in the notice itself; larger ones are read
/// from the stream, so no large payload is copied twice.
const MAX_NOTICE_BYTES: usize = 64 * 1024;

/// Messages for one enqueue script call: each names its mailbox by its place
/// in `mailboxes` (and, when its sender is checked, its source by its place
/// in `sources`), so a mailbox's keys and id are sent once.
#[derive(Debug, Default)]
struct Chunk {
    mailboxes: Vec<EntityId>,
    sources: Vec<EntityId>,
    messages: Vec<(usize, Option<usize>, Vec<u8>)>,
    bytes: usize,
}

impl Chunk {
    /// Adds `message` for `dest`; with a `sender`, its source (which the
    /// exchange validated) is checked by the script.
    fn add(&mut self, dest: &EntityId, message: &pb::Message, sender: Option<&str>) {
        let src = sender.and_then(|_| source(message).ok());
        let message = message.encode_to_vec();
        let k = place(&mut self.mailboxes, dest);
        let s = src.map(|src| place(&mut self.sources, &src));
        self.bytes += message.len();
        self.messages.push((k, s, message));
    }
}

/// The position of `id` in `ids`, added at the end if it is not there.
fn place(ids: &mut Vec<EntityId>, id: &EntityId) -> usize {
    ids.iter().position(|x| x == id).unwrap_or_else(|| {
        ids.push(*id);
        ids.len() - 1
    })
}

/// Seqs acknowledged per script call.
const ACK_SLICE: usize = 1_000;

/// Most messages, and bytes, in one enqueue script call.
const ENQUEUE_CHUNK: usize = 128;
const ENQUEUE_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub(crate) struct RedisBackend {
    conn: Conn,
    scripts: Arc<Scripts>,
    keys: Keys,
    options: RedisOptions,
    stones: Stones,
    reader: Arc<Reader>,
    /// Whether Redis answered the last health check.
    health: Arc<tokio::sync::watch::Sender<bool>>,
    /// Held by every handle on the backend but its own background tasks'.
    _in_use: Option<Arc<InUse>>,
}

/// How often a replica checks that Redis answers.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Keys read per round of a scan ([`RedisBackend::scan_page`]).
const SCAN_BATCH: usize = 1_000;

impl RedisBackend {
    /// One round of a `SCAN` of the keys matching `pattern`: the cursor to
    /// go on from (0 when done) and the keys found, about [`SCAN_BATCH`].
    async fn scan_page(
        &self,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<String>), ExchangeError> {
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_BATCH)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    pub(crate) async fn connect(
        options: RedisOptions,
        retention: &Retention,
    ) -> Result<Self, ExchangeError> {
        let (client, manager) = connect_redis(&options.url, options.timeout).await?;
        let conn = Conn::new(&client, manager.clone(), options.timeout);
        let keys = Keys::new(&options.prefix);
        let stop = CancellationToken::new();
        let reader = Reader::start(client, manager, keys.bell(), stop.clone()).await?;
        let url = redacted_url(&options.url);
        tracing::info!(%url, prefix = %options.prefix, "using Redis for mailboxes");
        let presence = keys.replica(&reader.replica);
        let in_use = InUse { stop: stop.clone(), conn: conn.clone(), presence };
        let scripts = Arc::new(Scripts::new());
        let health = Arc::new(tokio::sync::watch::Sender::new(true));
        let in_use = Some(Arc::new(in_use));
        let stones = Stones::new(retention);
        let backend =
            Self { conn, scripts, keys, options, stones, reader, health, _in_use: in_use };
        backend.renew_presence().await?;
        migration::upgrade(&backend).await?;
        let tasks = Self { _in_use: None, ..backend.clone() };
        let checks = tasks.clone();
        let stop_checks = stop.clone();
        tokio::spawn(async move { stop.run_until_cancelled(tasks.keep()).await });
        tokio::spawn(async move { stop_checks.run_until_cancelled(checks.check_health()).await });
        Ok(backend)
    }

    /// Pings Redis every [`HEALTH_EVERY`], and says whether it answered
    /// (within the call timeout), for the exchange's health service.
    async fn check_health(self) {
        let mut every = tokio::time::interval(HEALTH_EVERY);
        loop {
            every.tick().await;
            let (mut conn, ping) = (self.conn.clone(), redis::cmd("PING"));
            let answer =
                tokio::time::timeout(self.options.timeout, ping.query_async::<String>(&mut conn));
            let up = matches!(answer.await, Ok(Ok(_)));
            if self.health.send_replace(up) != up {
                let url = redacted_url(&self.options.url);
                if up {
                    tracing::info!(%url, "Redis answers again");
                } else {
                    tracing::error!(%url, "Redis does not answer: calls fail with UNAVAILABLE");
                }
            }
        }
    }

    /// Renews this replica's presence; and, as during a rolling upgrade
    /// replicas of earlier versions still write the schema-1 discovery index,
    /// takes what they add.
    async fn keep(self) {
        let mut presence = tokio::time::interval(PRESENCE_EVERY);
        let mut migrate = tokio::time::interval(MIGRATE_EVERY);
        // Both were just done.
        presence.tick().await;
        migrate.tick().await;
        loop {
            tokio::select! {
                _ = presence.tick() => if let Err(e) = self.renew_presence().await {
                    tracing::warn!(error = %e, "cannot renew this replica's presence");
                },
                _ = migrate.tick() => if let Err(e) = migration::migrate_index(&self).await {
                    tracing::warn!(error = %e, "cannot look for a schema-1 discovery index");
                },
            }
        }
    }

    async fn renew_presence(&self) -> Result<(), ExchangeError> {
        presence::renew(&self.conn, &self.keys.replica(&self.reader.replica)).await
    }

    /// Forgets this replica as mailbox `id`'s subscriber's, as its
    /// subscription of `generation` ended (unless a newer one took over).
    async fn unsubscribed(&self, id: &EntityId, generation: u64) {
        let keys = [self.keys.mailbox(id), self.keys.idle_clients()];
        let mut cmd = self.scripts.unsubscribe.call(&keys);
        cmd.arg(generation).arg(&self.reader.replica).arg(id.to_string());
        if let Err(e) = run_one(&self.conn, &self.scripts.unsubscribe, cmd).await {
            tracing::warn!(mailbox = %id, error = %e, "cannot record that a subscription ended");
        }
    }

    /// The agent whose mailbox `id` is, if it is an agent's.
    async fn agent(&self, id: &EntityId) -> Result<Option<RegisteredAgent>, ExchangeError> {
        let fields: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.mailbox(id))
            .arg(&["k", "b", "i", "n", "o"])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(match fields.first().cloned().flatten().as_deref() {
            Some("a") => agent_info(*id, &fields[1..]),
            _ => None,
        })
    }

    /// Reads the drain stream of terminated mailbox `id` a page at a time,
    /// keeping the requests that wait for an answer (without their arguments),
    /// then deletes it. A failure leaves the rest unanswered (their callers
    /// time out) and the stream to expire.
    async fn drain(&self, id: &EntityId) -> Vec<pb::Message> {
        let key = self.keys.drain(id);
        let mut conn = self.conn.clone();
        let (mut waiting, mut cursor) = (Vec::new(), 0);
        loop {
            let page: Result<Value, _> =
                range_after(&key, cursor, DRAIN_PAGE).query_async(&mut conn).await;
            let entries = match page {
                Ok(page) => range_entries(page),
                Err(e) => {
                    tracing::warn!(mailbox = %id, error = %e, "cannot read a terminated mailbox's queue; its requests stay unanswered");
                    return waiting;
                }
            };
            let Some((last, _)) = entries.last() else { break };
            cursor = *last;
            let full = entries.len() >= DRAIN_PAGE;
            for (_, data) in entries {
                if let Some(request) = pb::Message::decode(data).ok().and_then(awaiting_answer) {
                    waiting.push(request);
                }
            }
            if !full {
                break;
            }
        }
        let deleted: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
        if let Err(e) = deleted {
            tracing::warn!(mailbox = %id, error = %e, "cannot delete a drained queue; it expires");
        }
        waiting
    }
}

impl RedisBackend {
    /// Hands this replica's subscribers the small messages of `chunks` that
    /// enqueue.lua answered with their place in the queue instead of
    /// noticing them. `answers` has one per message, in order; messages
    /// without one (the call failed: it may have queued them anyway) are
    /// read from their queues.
    fn hand_over(&self, chunks: Vec<Chunk>, answers: &[Value]) {
        let mut answers = answers.iter();
        let mut reads = Vec::new();
        for chunk in chunks {
            for (k, _, message) in chunk.messages {
                let id = chunk.mailboxes[k];
                let read = match answers.next() {
                    Some(answer) => match placed(answer) {
                        Some((previous, added)) => {
                            self.reader.local(id, previous, added, message.into())
                        }
                        // Queued, but its place unreadable; or a script that
                        // failed part way, which may have queued it.
                        None if matches!(answer, Value::Array(_) | Value::ServerError(_)) => {
                            Some(id)
                        }
                        None => None,
                    },
                    None => Some(id),
                };
                if let Some(id) = read.filter(|id| !reads.contains(id)) {
                    reads.push(id);
                }
            }
        }
        for id in reads {
            let reader = self.reader.clone();
            tokio::spawn(async move { reader.read(id).await });
        }
    }

    /// The keys acknowledge.lua takes for mailbox `id`.
    fn acknowledge_keys(&self, id: &EntityId) -> [String; 5] {
        [
            self.keys.mailbox(id),
            self.keys.queue(id),
            self.keys.sizes(id),
            self.keys.bytes_sent(),
            self.keys.depth(),
        ]
    }

    /// The keys enqueue.lua takes for `chunk`.
    fn enqueue_keys(&self, chunk: &Chunk, sender: Option<&str>) -> Vec<String> {
        let boxes = chunk
            .mailboxes
            .iter()
            .flat_map(|id| [self.keys.mailbox(id), self.keys.queue(id), self.keys.sizes(id)]);
        let depth = std::iter::once(self.keys.depth());
        let usage = sender.map(|_| self.keys.bytes_sent());
        let sources = chunk.sources.iter().map(|id| self.keys.mailbox(id));
        boxes.chain(depth).chain(usage).chain(sources).collect()
    }

    /// Adds enqueue.lua's arguments for `chunk` to `cmd`.
    fn enqueue_args(
        &self,
        cmd: &mut redis::Cmd,
        chunk: &Chunk,
        bounds: &Bounds,
        sender: Option<&str>,
    ) {
        cmd.arg(bounds.max_queued).arg(bounds.max_queued_bytes).arg(MAX_NOTICE_BYTES);
        cmd.arg(self.keys.bell()).arg(chunk.mailboxes.len());
        cmd.arg(caller_arg(sender)).arg(bounds.sender_quota).arg(&self.reader.replica);
        for id in &chunk.mailboxes {
            cmd.arg(id.to_string());
        }
        for (k, s, message) in &chunk.messages {
            cmd.arg(k + 1);
            if sender.is_some() {
                // 0, a source that did not parse, is refused.
                cmd.arg(s.map_or(0, |s| s + 1));
            }
            cmd.arg(message);
        }
    }
}

/// What enqueue.lua's `answer` about `message` (for `dest`) means.
fn enqueued(
    dest: &EntityId,
    message: &pb::Message,
    answer: &Value,
    bounds: &Bounds,
    sender: Option<&str>,
) -> Result<(), ExchangeError> {
    match string(answer).as_deref() {
        Some("ok") => Ok(()),
        // A small message for a subscriber here: handed over by the caller.
        None if matches!(answer, Value::Array(items) if items.len() == 3) => Ok(()),
        Some("full") => Err(ExchangeError::MailboxFull { id: *dest, limit: bounds.max_queued }),
        Some("fullbytes") => {
            Err(ExchangeError::MailboxBytesFull { id: *dest, limit: bounds.max_queued_bytes })
        }
        Some("quota") => Err(ExchangeError::QuotaExceeded {
            principal: sender.unwrap_or_default().to_owned(),
            quota: "bytes queued unacknowledged".into(),
            max: bounds.sender_quota,
        }),
        // About the message's source, which the exchange validated.
        Some(a) if a == "nosrc" || a.starts_with("denied:") => {
            let src = source(message)?;
            let (head, owner) = a.split_once(':').unwrap_or((a, ""));
            let denied = state_error(&src, head, || Some(owner.to_owned()));
            Err(denied.unwrap_or_else(|| unknown_source(&src)))
        }
        other => Err(other
            .and_then(|a| state_error(dest, a, || None))
            .unwrap_or_else(|| ExchangeError::Unavailable(format!("enqueue failed: {answer:?}")))),
    }
}

/// Where enqueue.lua queued a message it answered instead of noticing
/// (`{'ok', previous, added}`): the seqs of the message before it and its own.
fn placed(answer: &Value) -> Option<(u64, u64)> {
    let Value::Array(items) = answer else { return None };
    let [_, previous, added] = &items[..] else { return None };
    let seq = |v: &Value| string(v).as_deref().and_then(seq_of);
    Some((seq(previous)?, seq(added)?))
}

/// A seq (stream id `bad`) past the last message of mailbox `id`.
fn never_delivered(id: &EntityId, bad: &str) -> ExchangeError {
    ExchangeError::InvalidArgument(format!(
        "seq {} was never delivered from mailbox {id}",
        seq_of(bad).unwrap_or_default()
    ))
}

#[async_trait]
impl Backend for RedisBackend {
    fn health(&self) -> tokio::sync::watch::Receiver<bool> {
        self.health.subscribe()
    }

    async fn create(
        &self,
        id: EntityId,
        agent: Option<RegisteredAgent>,
        owner: Option<&str>,
        quota: usize,
        fresh: bool,
    ) -> Result<(), ExchangeError> {
        let (kind, behaviour, implements, name) = match &agent {
            Some(a) => ("a", a.behaviour.as_str(), a.implements.clone(), a.name.as_str()),
            None => ("c", "", Vec::new(), ""),
        };
        let description = agent
            .as_ref()
            .and_then(|a| a.description.as_ref())
            .map(|d| d.encode_to_vec())
            .unwrap_or_default();
        let implements = serde_json::to_string(&implements).expect("strings serialise");
        let mut keys =
            vec![self.keys.mailbox(&id), self.keys.mailboxes_owned(), self.keys.idle_clients()];
        // Only an id the caller chose may be a terminated agent's.
        let stones = match agent {
            Some(_) if !fresh => self.stones.lookup(&self.keys, &id),
            _ => Vec::new(),
        };
        let graves = stones.len();
        keys.extend(stones);
        keys.extend(agent.as_ref().map(|a| self.keys.indexes(a)).unwrap_or_default());
        let mut cmd = self.scripts.create.call(&keys);
        cmd.arg(id.to_string()).arg(kind).arg(behaviour).arg(implements).arg(name);
        cmd.arg(caller_arg(owner)).arg(quota).arg(graves).arg(id.uuid().as_bytes().as_slice());
        cmd.arg(description);
        let answer = run_one(&self.conn, &self.scripts.create, cmd).await?;
        let answer = string(&answer).unwrap_or_default();
        match answer.as_str() {
            "ok" => Ok(()),
            "t" => Err(ExchangeError::Terminated(id)),
            "quota" => Err(ExchangeError::QuotaExceeded {
                principal: owner.unwrap_or_default().to_owned(),
                quota: "active mailboxes".into(),
                max: quota,
            }),
            _ => Err(ExchangeError::AlreadyExists(id)),
        }
    }

    async fn terminate(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<(pb::MailboxState, Vec<pb::Message>), ExchangeError> {
        let mut keys = self.keys.releasing(id);
        keys.push(self.keys.drain(id));
        keys.push(self.keys.idle_clients());
        let (grave, grave_ttl) = self.stones.grave(&self.keys, id);
        keys.push(grave);
        // The index sets listing an agent (its behaviour and interfaces never change).
        if let Some(agent) = self.agent(id).await? {
            keys.extend(self.keys.indexes(&agent));
        }
        let mut cmd = self.scripts.terminate.call(&keys);
        cmd.arg(id.to_string()).arg(grave_ttl).arg(self.keys.bell());
        cmd.arg(caller_arg(caller)).arg(DRAIN_TTL_SECS).arg(id.uuid().as_bytes().as_slice());
        let answer = run_one(&self.conn, &self.scripts.terminate, cmd).await?;
        let mut answer = array(answer).into_iter();
        let head = answer.next().and_then(|v| string(&v)).unwrap_or_default();
        match head.as_str() {
            "terminated" => Ok((pb::MailboxState::Terminated, Vec::new())),
            // A gravestone answers whoever asks: it has no owner.
            "missing" if self.buried(id).await? => Ok((pb::MailboxState::Terminated, Vec::new())),
            "missing" => Ok((pb::MailboxState::Missing, Vec::new())),
            "denied" => Err(state_error(id, &head, || answer.next().and_then(|v| string(&v)))
                .unwrap_or_else(|| {
                    ExchangeError::Unavailable(format!("terminate failed: {head}"))
                })),
            "active" => {
                let drain = answer.next().and_then(|v| string(&v)).is_some();
                let waiting = if drain { self.drain(id).await } else { Vec::new() };
                Ok((pb::MailboxState::Active, waiting))
            }
            _ => Err(ExchangeError::Unavailable(format!("terminate failed: {head}"))),
        }
    }

    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError> {
        let (fields, queued): (Vec<Option<String>>, usize) = redis::pipe()
            .cmd("HMGET")
            .arg(self.keys.mailbox(id))
            .arg(&["s", "k", "b", "i", "n", "o", "r", "p"])
            .cmd("XLEN")
            .arg(self.keys.queue(id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let state = match fields.first().cloned().flatten().as_deref() {
            None if self.buried(id).await? => return Ok(MailboxStatus::terminated()),
            None => return Ok(MailboxStatus::missing()),
            Some("t") => pb::MailboxState::Terminated,
            Some(_) => pb::MailboxState::Active,
        };
        let agent = (fields.get(1).cloned().flatten().as_deref() == Some("a"))
            .then(|| agent_info(*id, &fields[2..]))
            .flatten();
        // Its subscriber's replica, if it still runs.
        let subscribed = match fields.get(6).cloned().flatten() {
            Some(replica) if state == pb::MailboxState::Active => redis::cmd("EXISTS")
                .arg(self.keys.replica(&replica))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?,
            _ => false,
        };
        let endpoint = match fields.get(7).cloned().flatten() {
            Some(endpoint) if subscribed => endpoint,
            _ => String::new(),
        };
        Ok(MailboxStatus { state, queued, agent, subscribed, endpoint })
    }

    async fn discover(&self, name: &str, exact: bool, page: Page) -> Result<Found, ExchangeError> {
        let mut conn = self.conn.clone();
        let mut range = redis::cmd("ZRANGEBYLEX");
        range.arg(self.keys.index(name, exact));
        range.arg(page.after.map_or_else(|| "-".to_owned(), |id| format!("({id}"))).arg("+");
        if let Some(limit) = page.limit {
            // One more than the page, to know whether another follows.
            range.arg("LIMIT").arg(0).arg(limit.saturating_add(1));
        }
        let members: Vec<String> = range.query_async(&mut conn).await.map_err(unavailable)?;
        let (ids, next) = page.take(members.iter().filter_map(|m| m.parse().ok()));
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.keys.mailbox(id)).arg(&["s", "b", "i", "n", "o", "p", "r"]);
        }
        let rows: Vec<Vec<Option<String>>> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(unavailable)?
        };
        // An endpoint is shown only while its subscriber's replica runs, as
        // Status does: one that stopped or died leaves it in the hash.
        let field = |row: &Vec<Option<String>>, i: usize| row.get(i).cloned().flatten();
        let mut running: std::collections::BTreeMap<String, bool> = rows
            .iter()
            .filter(|row| field(row, 5).is_some())
            .filter_map(|row| Some((field(row, 6)?, false)))
            .collect();
        if !running.is_empty() {
            let mut pipe = redis::pipe();
            for replica in running.keys() {
                pipe.cmd("EXISTS").arg(self.keys.replica(replica));
            }
            let answers: Vec<bool> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
            running.values_mut().zip(answers).for_each(|(runs, answer)| *runs = answer);
        }
        let mut found = Vec::with_capacity(ids.len());
        let mut stale = Vec::new();
        for (id, row) in ids.into_iter().zip(rows) {
            match row.first().cloned().flatten().as_deref() {
                Some("a") => found.extend(agent_info(id, &row[1..]).map(|agent| {
                    let live = field(&row, 6).is_some_and(|r| running.get(&r) == Some(&true));
                    let endpoint = field(&row, 5).filter(|_| live).unwrap_or_default();
                    RegisteredAgent { endpoint, ..agent }
                })),
                // Expired (idle TTL) or a leftover of a crash: drop it from the index.
                _ => stale.push(id.to_string()),
            }
        }
        if !stale.is_empty() {
            let _: Result<(), _> = redis::cmd("ZREM")
                .arg(self.keys.index(name, exact))
                .arg(&stale)
                .query_async(&mut conn)
                .await;
        }
        Ok((found, next))
    }

    async fn enqueue(
        &self,
        messages: Vec<(EntityId, pb::Message)>,
        bounds: &Bounds,
        sender: Option<&str>,
    ) -> Vec<Result<(), ExchangeError>> {
        if messages.is_empty() {
            return Vec::new();
        }
        // One script call per chunk: few enough messages or bytes that Redis,
        // single-threaded, is not held up long by any one call.
        let (mut calls, mut chunks) = (Vec::new(), Vec::new());
        let mut chunk = Chunk::default();
        for (i, (dest, message)) in messages.iter().enumerate() {
            chunk.add(dest, message, sender);
            let last = i + 1 == messages.len();
            if last || chunk.messages.len() >= ENQUEUE_CHUNK || chunk.bytes >= ENQUEUE_CHUNK_BYTES {
                let chunk = std::mem::take(&mut chunk);
                let mut cmd = self.scripts.enqueue.call(&self.enqueue_keys(&chunk, sender));
                self.enqueue_args(&mut cmd, &chunk, bounds, sender);
                calls.push(cmd);
                chunks.push(chunk);
            }
        }
        let answers: Vec<Value> = match run(&self.conn, &self.scripts.enqueue, calls).await {
            // A chunk answers one value per message, or one error for them all.
            Ok(answers) => answers
                .into_iter()
                .zip(&chunks)
                .flat_map(|(answer, chunk)| match answer {
                    Value::Array(items) if items.len() == chunk.messages.len() => items,
                    other => vec![other; chunk.messages.len()],
                })
                .collect(),
            Err(e) => {
                self.hand_over(chunks, &[]);
                return messages.iter().map(|_| Err(e.clone())).collect();
            }
        };
        self.hand_over(chunks, &answers);
        let results = messages
            .iter()
            .zip(answers)
            .map(|((dest, message), answer)| enqueued(dest, message, &answer, bounds, sender))
            .collect();
        self.settle_all(results).await
    }

    async fn subscribe(
        &self,
        id: &EntityId,
        caller: Option<&str>,
        epoch: u64,
        endpoint: &str,
    ) -> Result<Box<dyn BackendSubscription>, ExchangeError> {
        let keys = [self.keys.mailbox(id), self.keys.queue(id), self.keys.sizes(id)];
        let mut cmd = self.scripts.subscribe.call(&keys);
        cmd.arg(self.keys.bell()).arg(&self.reader.replica);
        cmd.arg(id.to_string()).arg(caller_arg(caller)).arg(epoch).arg(endpoint);
        let answer = array(run_one(&self.conn, &self.scripts.subscribe, cmd).await?);
        let head = answer.first().and_then(string).unwrap_or_default();
        if let Some(err) = state_error(id, &head, || answer.get(1).and_then(string)) {
            return self.settle(Err(err)).await;
        }
        if head == "stale" {
            let current = answer.get(1).and_then(integer).unwrap_or_default();
            return Err(ExchangeError::StaleEpoch { id: *id, epoch, current });
        }
        let generation = answer.get(1).and_then(integer).unwrap_or(0);
        let events = self.reader.add(*id, &self.keys, generation);
        Ok(Box::new(RedisSubscription {
            id: *id,
            generation,
            events,
            ready: VecDeque::new(),
            end: None,
            backend: self.clone(),
        }))
    }

    async fn acknowledge(
        &self,
        id: &EntityId,
        seqs: &[u64],
        caller: Option<&str>,
    ) -> Result<(), ExchangeError> {
        let keys = self.acknowledge_keys(id);
        // A script call per slice, so that no one call holds Redis up long
        // (a slice takes well under a millisecond); all in one round trip.
        let calls: Vec<_> = seqs
            .chunks(ACK_SLICE)
            .map(|slice| {
                let ids: Vec<String> = slice.iter().map(|s| stream_id_of(*s)).collect();
                let mut cmd = self.scripts.acknowledge.call(&keys);
                let highest = slice.iter().max().map(|s| stream_id_of(*s));
                cmd.arg(caller_arg(caller)).arg(highest).arg(&ids);
                cmd
            })
            .collect();
        if calls.is_empty() {
            return Ok(());
        }
        for answer in run(&self.conn, &self.scripts.acknowledge, calls).await? {
            if let Value::ServerError(e) = answer {
                return Err(ExchangeError::Unavailable(e.to_string()));
            }
            let answer = string(&answer).unwrap_or_default();
            let (head, owner) = answer.split_once(':').unwrap_or((&answer, ""));
            if let Some(err) = state_error(id, head, || Some(owner.to_owned())) {
                return self.settle(Err(err)).await;
            }
            if let Some(bad) = answer.strip_prefix("never:") {
                return Err(never_delivered(id, bad));
            }
        }
        Ok(())
    }

    async fn put_ticket(
        &self,
        id: &EntityId,
        ticket: &str,
        granted: Option<&str>,
        ttl: Duration,
    ) -> Result<(), ExchangeError> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn.clone();
        let old: Option<String> = redis::cmd("SET")
            .arg(self.keys.ticket_of(id))
            .arg(ticket)
            .arg("PX")
            .arg(ms)
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut pipe = redis::pipe();
        // `<mailbox id>`, or `<mailbox id> <fingerprint>` when granted.
        let value = granted.map_or_else(|| id.to_string(), |g| format!("{id} {g}"));
        pipe.cmd("SET").arg(self.keys.ticket(ticket)).arg(value).arg("PX").arg(ms);
        if let Some(old) = old {
            pipe.cmd("DEL").arg(self.keys.ticket(&old));
        }
        let () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    async fn ticket(&self, ticket: &str) -> Result<Option<Ticket>, ExchangeError> {
        let (value, left): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(self.keys.ticket(ticket))
            .cmd("PTTL")
            .arg(self.keys.ticket(ticket))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let left = Duration::from_millis(u64::try_from(left).unwrap_or(0));
        let Some(value) = value.filter(|_| !left.is_zero()) else { return Ok(None) };
        let (id, granted) = value.split_once(' ').map_or((&*value, None), |(i, g)| (i, Some(g)));
        let granted = granted.map(str::to_owned);
        Ok(id.parse().ok().map(|mailbox| Ticket { mailbox, left, granted }))
    }

    async fn owner(&self, id: &EntityId) -> Result<Option<String>, ExchangeError> {
        redis::cmd("HGET")
            .arg(self.keys.mailbox(id))
            .arg("o")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn forget(&self, id: &EntityId) {
        let mut keys = self.keys.releasing(id);
        keys.push(self.keys.idle_clients());
        let mut call = self.scripts.forget.call(&keys);
        call.arg(id.to_string());
        if let Err(e) = run_one(&self.conn, &self.scripts.forget, call).await {
            tracing::warn!(mailbox = %id, error = %e, "cannot delete transient mailbox");
        }
    }

    async fn commit(
        &self,
        id: &EntityId,
        caller: Option<&str>,
        commit: Commit,
        bounds: &Bounds,
    ) -> Result<Committed, ExchangeError> {
        let mut keys = vec![self.keys.mailbox(id), self.keys.state(id)];
        keys.extend(self.acknowledge_keys(id));
        let mut chunk = Chunk::default();
        for (dest, message) in &commit.answers {
            chunk.add(dest, message, caller);
        }
        if !chunk.messages.is_empty() {
            keys.extend(self.enqueue_keys(&chunk, caller));
        }
        let mut cmd = self.scripts.commit.call(&keys);
        let ids: Vec<String> = commit.seqs.iter().map(|s| stream_id_of(*s)).collect();
        let highest = commit.seqs.iter().max().map(|s| stream_id_of(*s));
        let (save_args, ack_args) = (
            if commit.state.is_some() { 6 } else { 3 },
            1 + ids.len() + usize::from(highest.is_some()),
        );
        cmd.arg(save_args).arg(ack_args);
        cmd.arg(caller_arg(caller)).arg(commit.epoch).arg(commit.expected);
        if let Some((data, version)) = &commit.state {
            cmd.arg(data.data.as_ref()).arg(&data.content_type).arg(version);
        }
        cmd.arg(caller_arg(caller)).arg(highest).arg(&ids);
        if !chunk.messages.is_empty() {
            self.enqueue_args(&mut cmd, &chunk, bounds, caller);
        }
        let answer = match run_one(&self.conn, &self.scripts.commit, cmd).await {
            Ok(answer) => array(answer),
            Err(e) => {
                self.hand_over(vec![chunk], &[]);
                return Err(e);
            }
        };
        let head = answer.first().and_then(string).unwrap_or_default();
        let number =
            || answer.get(1).and_then(string).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        if let Some(err) = state_error(id, &head, || answer.get(1).and_then(string)) {
            return self.settle(Err(err)).await;
        }
        let (epoch, expected) = (commit.epoch, commit.expected);
        match head.as_str() {
            "ok" => {
                let answers = match answer.get(2) {
                    Some(Value::Array(items)) => items.clone(),
                    _ => Vec::new(),
                };
                self.hand_over(vec![chunk], &answers);
                let results = commit
                    .answers
                    .iter()
                    .zip(answers.into_iter().chain(std::iter::repeat(Value::Nil)))
                    .map(|((dest, message), a)| enqueued(dest, message, &a, bounds, caller))
                    .collect();
                Ok((number(), self.settle_all(results).await))
            }
            "stale" => Err(ExchangeError::StaleEpoch { id: *id, epoch, current: number() }),
            "conflict" => {
                Err(ExchangeError::StateConflict { id: *id, expected, current: number() })
            }
            "never" => {
                Err(never_delivered(id, &answer.get(1).and_then(string).unwrap_or_default()))
            }
            other => Err(ExchangeError::Unavailable(format!(
                "unexpected answer {other:?} from commit.lua"
            ))),
        }
    }

    async fn load_state(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<Option<pb::SavedState>, ExchangeError> {
        let keys = [self.keys.mailbox(id), self.keys.state(id)];
        let mut cmd = self.scripts.load_state.call(&keys);
        cmd.arg(caller_arg(caller));
        let answer = array(run_one(&self.conn, &self.scripts.load_state, cmd).await?);
        let head = answer.first().and_then(string).unwrap_or_default();
        if let Some(err) = state_error(id, &head, || answer.get(1).and_then(string)) {
            return self.settle(Err(err)).await;
        }
        if head != "ok" {
            return Ok(None);
        }
        let data = match answer.get(1) {
            Some(Value::BulkString(bytes)) => bytes.clone(),
            _ => Vec::new(),
        };
        let text = |i: usize| answer.get(i).and_then(string).unwrap_or_default();
        let number = |i: usize| text(i).parse::<u64>().unwrap_or(0);
        let at_ms = number(6);
        Ok(Some(pb::SavedState {
            data: Some(pb::Payload {
                content_type: text(2),
                data: data.into(),
                ..Default::default()
            }),
            version: u32::try_from(number(3)).unwrap_or(u32::MAX),
            revision: number(4),
            epoch: number(5),
            saved_at: Some(
                (std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms)).into(),
            ),
        }))
    }

    async fn descriptions(
        &self,
        ids: &[EntityId],
    ) -> Result<Vec<Option<Arc<pb::AgentDescription>>>, ExchangeError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET").arg(self.keys.mailbox(id)).arg("s").arg("x");
        }
        let rows: Vec<(Option<String>, Option<Vec<u8>>)> =
            pipe.query_async(&mut self.conn.clone()).await.map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|(state, bytes)| {
                let bytes = bytes.filter(|_| state.as_deref() == Some("a"))?;
                pb::AgentDescription::decode(bytes.as_slice()).ok().map(Arc::new)
            })
            .collect())
    }

    async fn depth(&self) -> Result<Vec<Depth>, ExchangeError> {
        let fields: HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(self.keys.depth())
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut by: HashMap<&str, Depth> = HashMap::new();
        for (field, n) in &fields {
            let Some((kind, behaviour)) = field.split_once(':') else { continue };
            let depth = by
                .entry(behaviour)
                .or_insert_with(|| Depth { behaviour: behaviour.to_owned(), ..Depth::default() });
            // Never below zero, should replicas of an older schema have left
            // it off (see migration.rs).
            let n = u64::try_from(*n).unwrap_or(0);
            match kind {
                "m" => depth.messages = n,
                "b" => depth.bytes = n,
                _ => {}
            }
        }
        Ok(by.into_values().filter(|d| d.messages > 0).collect())
    }

    async fn blob_begin(
        &self,
        key: &str,
        owner: &EntityId,
        size: u64,
        ttl: Duration,
        _capacity: u64,
    ) -> Result<(), ExchangeError> {
        self.begin_blob(key, owner, size, ttl).await
    }

    async fn blob_chunk(
        &self,
        key: &str,
        index: u64,
        data: bytes::Bytes,
    ) -> Result<(), ExchangeError> {
        self.put_blob_chunk(key, index, data).await
    }

    async fn blob_finish(&self, key: &str, sha256: [u8; 32]) -> Result<(), ExchangeError> {
        self.finish_blob(key, sha256).await
    }

    async fn blob_meta(&self, key: &str) -> Result<Option<BlobMeta>, ExchangeError> {
        self.meta_of_blob(key).await
    }

    async fn blob_read(
        &self,
        key: &str,
        index: u64,
    ) -> Result<Option<bytes::Bytes>, ExchangeError> {
        self.read_blob(key, index).await
    }

    async fn blob_delete(&self, key: &str) -> Result<bool, ExchangeError> {
        self.delete_blob(key).await
    }

    async fn blob_delete_owned(&self, owner: &EntityId) -> Result<(), ExchangeError> {
        self.delete_blobs_of(owner).await
    }

    async fn blob_usage(&self) -> Result<BlobUsage, ExchangeError> {
        self.usage_of_blobs().await
    }

    async fn sweep(&self, retention: &Retention) -> Result<Swept, ExchangeError> {
        self.sweep_idle(retention).await
    }
}

/// Agent info from the hash fields `b`, `i`, `n`, `o`.
fn agent_info(id: EntityId, fields: &[Option<String>]) -> Option<RegisteredAgent> {
    let behaviour = fields.first()?.clone()?;
    let implements = fields
        .get(1)
        .cloned()
        .flatten()
        .and_then(|i| serde_json::from_str(&i).ok())
        .unwrap_or_default();
    let name = fields.get(2).cloned().flatten().unwrap_or_default();
    let owner = fields.get(3).cloned().flatten().unwrap_or_default();
    let endpoint = String::new();
    Some(RegisteredAgent { id, behaviour, implements, name, owner, description: None, endpoint })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    use super::*;

    const BOUNDS: Bounds = Bounds { max_queued: 100, max_queued_bytes: 0, sender_quota: 0 };

    /// A backend on `redis`, with a mailbox subscribed to on it.
    async fn subscribed(
        redis: &academy_server::testing::RedisServer,
    ) -> (RedisBackend, EntityId, Box<dyn BackendSubscription>) {
        let options = RedisOptions { url: redis.url(), prefix: "t".into(), ..Default::default() };
        let backend =
            RedisBackend::connect(options, &Retention::default()).await.expect("connects");
        let id = EntityId::new_agent();
        backend.create(id, None, None, 0, true).await.unwrap();
        let subscription = backend.subscribe(&id, None, 0, "").await.unwrap();
        (backend, id, subscription)
    }

    fn message(dest: &EntityId, text: &str) -> pb::Message {
        pb::Message {
            header: Some(pb::Header {
                src: EntityId::new_client().to_string(),
                dest: dest.to_string(),
                tag: text.to_owned(),
                ..Default::default()
            }),
            body: Some(pb::message::Body::SuccessResponse(pb::SuccessResponse {})),
        }
    }

    async fn next_tags(subscription: &mut Box<dyn BackendSubscription>) -> Vec<String> {
        let next = subscription.next_batch(16, 1 << 30);
        let batch = tokio::time::timeout(Duration::from_secs(10), next).await.expect("delivered");
        let tags = batch.expect("a batch").into_iter().filter_map(|d| d.message?.header);
        tags.map(|h| h.tag).collect()
    }

    /// A small message for a subscriber on the sending replica is handed
    /// over from the enqueue's answer, without a notice on the replica's
    /// channel; a large one is still noticed (and read from the queue).
    #[tokio::test]
    async fn small_messages_for_subscribers_here_are_handed_over_without_a_notice() {
        let redis = academy_server::testing::RedisServer::start().expect("redis-server runs");
        let (backend, id, mut subscription) = subscribed(&redis).await;
        let client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub
            .subscribe(format!("{}{}", backend.keys.bell(), backend.reader.replica))
            .await
            .unwrap();
        let mut notices = pubsub.into_on_message();
        let large = "x".repeat(MAX_NOTICE_BYTES + 1);
        let sent = vec![(id, message(&id, "small")), (id, message(&id, &large))];
        for result in backend.enqueue(sent, &BOUNDS, None).await {
            result.unwrap();
        }
        let mut tags = Vec::new();
        while tags.len() < 2 {
            tags.extend(next_tags(&mut subscription).await);
        }
        assert_eq!(tags, ["small".to_owned(), large], "in order");
        // The first notice on the channel is the large message's.
        let notice = tokio::time::timeout(Duration::from_secs(10), notices.next()).await;
        let notice = notice.expect("a notice").expect("the channel is open");
        let head = notice.get_payload_bytes().split(|b| *b == b' ').next().unwrap().to_vec();
        assert_eq!(String::from_utf8(head).unwrap(), "n", "a notice to read a large message");
    }

    /// An enqueue whose answer was lost may have queued its messages: those
    /// for subscribers here are read from their queues.
    #[tokio::test]
    async fn messages_whose_answer_was_lost_are_read_from_the_queue() {
        let redis = academy_server::testing::RedisServer::start().expect("redis-server runs");
        let (backend, id, mut subscription) = subscribed(&redis).await;
        // Noticed and read from the queue: the subscription's first read is done.
        let first = "x".repeat(MAX_NOTICE_BYTES + 1);
        for result in backend.enqueue(vec![(id, message(&id, &first))], &BOUNDS, None).await {
            result.unwrap();
        }
        assert_eq!(next_tags(&mut subscription).await, [first]);
        // Queued by the script, its answer dropped.
        let mut chunk = Chunk::default();
        chunk.add(&id, &message(&id, "lost"), None);
        let mut cmd = backend.scripts.enqueue.call(&backend.enqueue_keys(&chunk, None));
        backend.enqueue_args(&mut cmd, &chunk, &BOUNDS, None);
        run(&backend.conn, &backend.scripts.enqueue, vec![cmd]).await.unwrap();
        backend.hand_over(vec![chunk], &[]);
        assert_eq!(next_tags(&mut subscription).await, ["lost"]);
    }
}
