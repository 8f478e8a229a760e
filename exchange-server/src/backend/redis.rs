//! The Redis backend: durable mailboxes, shared by every exchange replica that
//! uses the same Redis and prefix.
//!
//! Keys, under the prefix `P`:
//! - `P:mb:<id>`: hash of the mailbox (`s` state a/t, `k` kind a/c, `b`
//!   behaviour, `i` implements as JSON, `n` name, `g` subscriber generation);
//! - `P:q:<id>`: stream of its unacknowledged messages (field `m`, protobuf);
//!   an acknowledged message is deleted, so its length is the queue length;
//! - `P:c:<id>`: control stream: `x=s g=<gen>` when a subscriber takes over,
//!   `x=t` when the mailbox is terminated; it wakes subscribers on any replica;
//! - `P:ix:<name>` / `P:ox:<name>`: discovery index, agents listing a name / whose
//!   own behaviour it is (`P:ix:` lists every active agent).
//!
//! State changes run as Lua scripts (atomic). Each replica has one reader task
//! that blocks in `XREAD` on the queue and control streams of all its
//! subscriptions, so delivery is pushed, never polled.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use academy_proto::pb;
use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use tokio::sync::mpsc;

use super::{Backend, BackendSubscription, Found, Page};
use crate::{AgentInfo, Delivery, EntityId, ExchangeError, MailboxState, MailboxStatus};

/// How to reach Redis and how long keys live there.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://HOST:PORT/DB`.
    pub url: String,
    /// Prefix of every key, so several deployments can share one Redis.
    pub prefix: String,
    /// Mailboxes with no activity for this long expire (`None`: never).
    pub mailbox_ttl: Option<Duration>,
    /// How long a terminated mailbox's gravestone is kept (`None`: forever).
    pub gravestone_ttl: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/0".into(),
            prefix: "academy".into(),
            mailbox_ttl: None,
            gravestone_ttl: None,
        }
    }
}

/// How long the reader blocks in one `XREAD` before looking at its
/// subscriptions again (new ones wake it at once through its wake stream).
const BLOCK_MS: u64 = 10_000;
/// Most entries read from one stream at a time.
const READ_COUNT: usize = 512;

const CREATE: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if s then return s end
redis.call('HSET', KEYS[1], 's', 'a', 'k', ARGV[2], 'b', ARGV[3], 'i', ARGV[4], 'n', ARGV[5], 'g', 0)
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
if ARGV[2] == 'a' then
  local p = ARGV[7]
  redis.call('SADD', p .. ':ix:', ARGV[1])
  redis.call('SADD', p .. ':ix:' .. ARGV[3], ARGV[1])
  redis.call('SADD', p .. ':ox:' .. ARGV[3], ARGV[1])
  for _, name in ipairs(cjson.decode(ARGV[4])) do redis.call('SADD', p .. ':ix:' .. name, ARGV[1]) end
end
return 'ok'
";

/// Appends messages, in order: KEYS are (mailbox, queue) pairs, ARGV the
/// queue bound, the TTL, then one message per pair. One answer per message.
const ENQUEUE: &str = r"
local max, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS / 2 do
  local mb, q = KEYS[2 * i - 1], KEYS[2 * i]
  local s = redis.call('HGET', mb, 's')
  if not s then out[i] = 'missing'
  elseif s == 't' then out[i] = 'terminated'
  elseif max > 0 and redis.call('XLEN', q) >= max then out[i] = 'full'
  else
    redis.call('HSET', mb, 'l', redis.call('XADD', q, '*', 'm', ARGV[i + 2]))
    if ttl > 0 then redis.call('EXPIRE', mb, ttl); redis.call('EXPIRE', q, ttl) end
    out[i] = 'ok'
  end
end
return out
";

const TERMINATE: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
if s == 't' then return {'terminated'} end
redis.call('HSET', KEYS[1], 's', 't')
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
local out = {'active'}
for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
  local f = e[2]
  for i = 1, #f, 2 do if f[i] == 'm' then table.insert(out, f[i + 1]) end end
end
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', 16, '*', 'x', 't')
redis.call('EXPIRE', KEYS[3], 3600)
if redis.call('HGET', KEYS[1], 'k') == 'a' then
  local p, b = ARGV[3], redis.call('HGET', KEYS[1], 'b')
  redis.call('SREM', p .. ':ix:', ARGV[1])
  redis.call('SREM', p .. ':ix:' .. b, ARGV[1])
  redis.call('SREM', p .. ':ox:' .. b, ARGV[1])
  for _, name in ipairs(cjson.decode(redis.call('HGET', KEYS[1], 'i'))) do
    redis.call('SREM', p .. ':ix:' .. name, ARGV[1])
  end
end
return out
";

const SUBSCRIBE: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
if s == 't' then return {'terminated'} end
local g = redis.call('HINCRBY', KEYS[1], 'g', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 16, '*', 'x', 's', 'g', g)
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl); redis.call('EXPIRE', KEYS[3], ttl)
end
return {'ok', g}
";

const ACKNOWLEDGE: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then return 'missing' end
if s == 't' then return 'terminated' end
if #ARGV == 0 then return 'ok' end
local last = redis.call('HGET', KEYS[1], 'l') or '0-0'
local lms, lseq = string.match(last, '(%d+)-(%d+)')
lms, lseq = tonumber(lms), tonumber(lseq)
for _, id in ipairs(ARGV) do
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  ms, seq = tonumber(ms), tonumber(seq)
  if ms > lms or (ms == lms and seq > lseq) then return 'never:' .. id end
end
redis.call('XDEL', KEYS[2], unpack(ARGV))
return 'ok'
";

/// Most messages, and bytes, in one enqueue script call.
const ENQUEUE_CHUNK: usize = 128;
const ENQUEUE_CHUNK_BYTES: usize = 1 << 20;

/// Stream ids (`<ms>-<n>`) as the u64 seqs of the protocol: ms in the high 44
/// bits, n in the low 20 (a million entries in one millisecond of one stream).
const SEQ_BITS: u32 = 20;

fn seq_of(stream_id: &str) -> Option<u64> {
    let (ms, n) = stream_id.split_once('-')?;
    let (ms, n): (u64, u64) = (ms.parse().ok()?, n.parse().ok()?);
    (n < 1 << SEQ_BITS && ms < 1 << (64 - SEQ_BITS)).then_some(ms << SEQ_BITS | n)
}

fn stream_id_of(seq: u64) -> String {
    format!("{}-{}", seq >> SEQ_BITS, seq & ((1 << SEQ_BITS) - 1))
}

fn unavailable(err: RedisError) -> ExchangeError {
    ExchangeError::Unavailable(err.to_string())
}

fn secs(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| t.as_secs().max(1))
}

/// A Lua script, run by its hash (EVALSHA) and loaded again whenever Redis
/// lost it (a restart, SCRIPT FLUSH).
#[derive(Debug)]
struct Lua {
    body: &'static str,
    sha: String,
}

impl Lua {
    fn new(body: &'static str) -> Self {
        Self { body, sha: redis::Script::new(body).get_hash().to_owned() }
    }

    /// `EVALSHA` of this script on `keys`; add its arguments to it.
    fn call(&self, keys: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len()).arg(keys);
        cmd
    }
}

#[derive(Debug)]
struct Scripts {
    create: Lua,
    enqueue: Lua,
    terminate: Lua,
    subscribe: Lua,
    acknowledge: Lua,
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

fn pipeline(calls: impl IntoIterator<Item = redis::Cmd>) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        pipe.add_command(call);
    }
    pipe
}

#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn mailbox(&self, id: &EntityId) -> String {
        format!("{}:mb:{id}", self.prefix)
    }
    fn queue(&self, id: &EntityId) -> String {
        format!("{}:q:{id}", self.prefix)
    }
    fn control(&self, id: &EntityId) -> String {
        format!("{}:c:{id}", self.prefix)
    }
    fn index(&self, name: &str, exact: bool) -> String {
        format!("{}:{}:{name}", self.prefix, if exact { "ox" } else { "ix" })
    }
}

#[derive(Debug)]
pub(crate) struct RedisBackend {
    conn: ConnectionManager,
    scripts: Scripts,
    keys: Keys,
    options: RedisOptions,
    reader: Arc<Reader>,
}

impl RedisBackend {
    pub(crate) async fn connect(options: RedisOptions) -> Result<Self, ExchangeError> {
        let client = redis::Client::open(options.url.as_str()).map_err(|e| {
            ExchangeError::InvalidArgument(format!("bad Redis URL {:?}: {e}", options.url))
        })?;
        let config = |response: Duration| {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(response))
                .set_max_delay(Duration::from_secs(2))
        };
        let conn =
            ConnectionManager::new_with_config(client.clone(), config(Duration::from_secs(10)))
                .await
                .map_err(|e| {
                    ExchangeError::Unavailable(format!(
                        "cannot reach Redis at {}: {e}",
                        options.url
                    ))
                })?;
        let blocking = ConnectionManager::new_with_config(
            client,
            config(Duration::from_millis(BLOCK_MS) + Duration::from_secs(10)),
        )
        .await
        .map_err(unavailable)?;
        let keys = Keys { prefix: options.prefix.clone() };
        let reader = Arc::new(Reader {
            subscriptions: Mutex::default(),
            wake_key: format!("{}:wake:{}", options.prefix, uuid::Uuid::new_v4()),
            conn: conn.clone(),
        });
        tokio::spawn(reader.clone().run(blocking));
        tracing::info!(url = %options.url, prefix = %options.prefix, "using Redis for mailboxes");
        let scripts = Scripts {
            create: Lua::new(CREATE),
            enqueue: Lua::new(ENQUEUE),
            terminate: Lua::new(TERMINATE),
            subscribe: Lua::new(SUBSCRIBE),
            acknowledge: Lua::new(ACKNOWLEDGE),
        };
        Ok(Self { conn, scripts, keys, options, reader })
    }

    /// Runs script calls in one pipeline, in order; one answer each (a failed
    /// call answers `Value::ServerError`). Calls that found the script missing
    /// had no effect: they are sent again once it is loaded.
    async fn run(&self, lua: &Lua, calls: Vec<redis::Cmd>) -> Result<Vec<Value>, ExchangeError> {
        let mut conn = self.conn.clone();
        let pipe = pipeline(calls);
        let mut answers: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let missing: Vec<usize> =
            (0..answers.len()).filter(|i| is_noscript(&answers[*i])).collect();
        if !missing.is_empty() {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(lua.body)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            // Rare: only the calls to send again are copied.
            let retry = pipe.cmd_iter().enumerate().filter(|(i, _)| missing.contains(i));
            let again: Vec<Value> = pipeline(retry.map(|(_, call)| call.clone()))
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            for (i, answer) in missing.into_iter().zip(again) {
                answers[i] = answer;
            }
        }
        Ok(answers)
    }

    /// Runs one script call.
    async fn run_one(&self, lua: &Lua, call: redis::Cmd) -> Result<Value, ExchangeError> {
        match self.run(lua, vec![call]).await?.pop() {
            Some(Value::ServerError(e)) => Err(ExchangeError::Unavailable(e.to_string())),
            Some(answer) => Ok(answer),
            None => Err(ExchangeError::Unavailable("Redis gave no answer".into())),
        }
    }
}

/// What a script said about a mailbox it looked at.
fn state_error(id: &EntityId, answer: &str) -> Option<ExchangeError> {
    match answer {
        "missing" => Some(ExchangeError::NotFound(*id)),
        "terminated" => Some(ExchangeError::Terminated(*id)),
        _ => None,
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn create(&self, id: EntityId, agent: Option<AgentInfo>) -> Result<(), ExchangeError> {
        let (kind, behaviour, implements, name) = match &agent {
            Some(a) => ("a", a.behaviour.as_str(), a.implements.clone(), a.name.as_str()),
            None => ("c", "", Vec::new(), ""),
        };
        let implements = serde_json::to_string(&implements).expect("strings serialise");
        let mut cmd = self.scripts.create.call(&[self.keys.mailbox(&id)]);
        cmd.arg(id.to_string()).arg(kind).arg(behaviour).arg(implements).arg(name);
        cmd.arg(secs(self.options.mailbox_ttl)).arg(&self.keys.prefix);
        let answer = string(&self.run_one(&self.scripts.create, cmd).await?).unwrap_or_default();
        match answer.as_str() {
            "ok" => Ok(()),
            "t" => Err(ExchangeError::Terminated(id)),
            _ => Err(ExchangeError::AlreadyExists(id)),
        }
    }

    async fn terminate(
        &self,
        id: &EntityId,
    ) -> Result<(MailboxState, Vec<pb::Message>), ExchangeError> {
        let keys = [self.keys.mailbox(id), self.keys.queue(id), self.keys.control(id)];
        let mut cmd = self.scripts.terminate.call(&keys);
        cmd.arg(id.to_string()).arg(secs(self.options.gravestone_ttl)).arg(&self.keys.prefix);
        let mut answer = array(self.run_one(&self.scripts.terminate, cmd).await?).into_iter();
        let head = answer.next().and_then(|v| string(&v)).unwrap_or_default();
        match head.as_str() {
            "missing" => Err(ExchangeError::NotFound(*id)),
            "terminated" => Ok((MailboxState::Terminated, Vec::new())),
            _ => Ok((
                MailboxState::Active,
                answer.filter_map(|v| pb::Message::decode(bytes(v)?).ok()).collect(),
            )),
        }
    }

    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError> {
        let (fields, queued): (Vec<Option<String>>, usize) = redis::pipe()
            .cmd("HMGET")
            .arg(self.keys.mailbox(id))
            .arg(&["s", "k", "b", "i", "n"])
            .cmd("XLEN")
            .arg(self.keys.queue(id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let state = match fields.first().cloned().flatten().as_deref() {
            None => {
                return Ok(MailboxStatus { state: MailboxState::Missing, queued: 0, agent: None });
            }
            Some("t") => MailboxState::Terminated,
            Some(_) => MailboxState::Active,
        };
        let agent = (fields.get(1).cloned().flatten().as_deref() == Some("a"))
            .then(|| agent_info(*id, &fields[2..]))
            .flatten();
        Ok(MailboxStatus { state, queued, agent })
    }

    async fn discover(&self, name: &str, exact: bool, page: Page) -> Result<Found, ExchangeError> {
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.index(name, exact))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let (ids, next) = page.cut(members.iter().filter_map(|m| m.parse().ok()).collect());
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.keys.mailbox(id)).arg(&["s", "b", "i", "n"]);
        }
        let rows: Vec<Vec<Option<String>>> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(unavailable)?
        };
        let mut found = Vec::with_capacity(ids.len());
        let mut stale = Vec::new();
        for (id, row) in ids.into_iter().zip(rows) {
            match row.first().cloned().flatten().as_deref() {
                Some("a") => found.extend(agent_info(id, &row[1..])),
                // Expired (idle TTL) or a leftover of a crash: drop it from the index.
                _ => stale.push(id.to_string()),
            }
        }
        if !stale.is_empty() {
            let _: Result<(), _> = redis::cmd("SREM")
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
        max_queued: Option<usize>,
    ) -> Vec<Result<(), ExchangeError>> {
        if messages.is_empty() {
            return Vec::new();
        }
        let ttl = secs(self.options.mailbox_ttl);
        let max = max_queued.unwrap_or(0);
        // One script call per chunk: few enough messages or bytes that Redis,
        // single-threaded, is not held up long by any one call.
        let (mut calls, mut sizes) = (Vec::new(), Vec::new());
        let (mut keys, mut data, mut bytes) = (Vec::new(), Vec::new(), 0);
        for (i, (dest, message)) in messages.iter().enumerate() {
            let encoded = message.encode_to_vec();
            bytes += encoded.len();
            keys.push(self.keys.mailbox(dest));
            keys.push(self.keys.queue(dest));
            data.push(encoded);
            let last = i + 1 == messages.len();
            if last || data.len() >= ENQUEUE_CHUNK || bytes >= ENQUEUE_CHUNK_BYTES {
                let mut cmd = self.scripts.enqueue.call(&keys);
                cmd.arg(max).arg(ttl).arg(&data);
                calls.push(cmd);
                sizes.push(data.len());
                (keys, data, bytes) = (Vec::new(), Vec::new(), 0);
            }
        }
        let answers: Vec<Value> = match self.run(&self.scripts.enqueue, calls).await {
            // A chunk answers one value per message, or one error for them all.
            Ok(answers) => answers
                .into_iter()
                .zip(sizes)
                .flat_map(|(answer, n)| match answer {
                    Value::Array(items) if items.len() == n => items,
                    other => vec![other; n],
                })
                .collect(),
            Err(e) => return messages.iter().map(|_| Err(e.clone())).collect(),
        };
        messages
            .iter()
            .zip(answers)
            .map(|((dest, _), answer)| match string(&answer).as_deref() {
                Some("ok") => Ok(()),
                Some("full") => Err(ExchangeError::MailboxFull { id: *dest, limit: max }),
                other => Err(other.and_then(|a| state_error(dest, a)).unwrap_or_else(|| {
                    ExchangeError::Unavailable(format!("enqueue failed: {answer:?}"))
                })),
            })
            .collect()
    }

    async fn subscribe(
        &self,
        id: &EntityId,
    ) -> Result<Box<dyn BackendSubscription>, ExchangeError> {
        let keys = [self.keys.mailbox(id), self.keys.control(id), self.keys.queue(id)];
        let mut cmd = self.scripts.subscribe.call(&keys);
        cmd.arg(secs(self.options.mailbox_ttl));
        let answer = array(self.run_one(&self.scripts.subscribe, cmd).await?);
        let head = answer.first().and_then(string).unwrap_or_default();
        if let Some(err) = state_error(id, &head) {
            return Err(err);
        }
        let generation = answer.get(1).and_then(integer).unwrap_or(0);
        let events = self.reader.add(*id, self.keys.queue(id), self.keys.control(id)).await;
        Ok(Box::new(RedisSubscription {
            id: *id,
            generation,
            events,
            ready: VecDeque::new(),
            reader: self.reader.clone(),
        }))
    }

    async fn acknowledge(&self, id: &EntityId, seqs: &[u64]) -> Result<(), ExchangeError> {
        let ids: Vec<String> = seqs.iter().map(|s| stream_id_of(*s)).collect();
        let mut cmd = self.scripts.acknowledge.call(&[self.keys.mailbox(id), self.keys.queue(id)]);
        cmd.arg(&ids);
        let answer =
            string(&self.run_one(&self.scripts.acknowledge, cmd).await?).unwrap_or_default();
        if let Some(err) = state_error(id, &answer) {
            return Err(err);
        }
        match answer.strip_prefix("never:") {
            Some(bad) => Err(ExchangeError::InvalidArgument(format!(
                "seq {} was never delivered from mailbox {id}",
                seq_of(bad).unwrap_or_default()
            ))),
            None => Ok(()),
        }
    }

    async fn forget(&self, id: &EntityId) {
        let keys = [self.keys.mailbox(id), self.keys.queue(id), self.keys.control(id)];
        let done: Result<(), _> =
            redis::cmd("DEL").arg(&keys).query_async(&mut self.conn.clone()).await;
        if let Err(e) = done {
            tracing::warn!(mailbox = %id, error = %e, "cannot delete transient mailbox");
        }
    }
}

/// Agent info from the hash fields `b`, `i`, `n`.
fn agent_info(id: EntityId, fields: &[Option<String>]) -> Option<AgentInfo> {
    let behaviour = fields.first()?.clone()?;
    let implements = fields
        .get(1)
        .cloned()
        .flatten()
        .and_then(|i| serde_json::from_str(&i).ok())
        .unwrap_or_default();
    let name = fields.get(2).cloned().flatten().unwrap_or_default();
    Some(AgentInfo { id, behaviour, implements, name })
}

fn string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

fn bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::from(b)),
        _ => None,
    }
}

fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => string(other)?.parse().ok(),
    }
}

/// What the reader hands a subscription.
#[derive(Debug)]
enum Event {
    Messages(Vec<(u64, Bytes)>),
    /// A subscriber (of this generation) took over the mailbox.
    TakenOver(u64),
    Terminated,
}

#[derive(Debug)]
struct Watched {
    token: u64,
    queue_key: String,
    control_key: String,
    queue_cursor: String,
    control_cursor: String,
    events: mpsc::UnboundedSender<Event>,
}

/// The mailboxes a reader watches, by id and by stream key.
#[derive(Debug, Default)]
struct Watching {
    by_id: HashMap<EntityId, Watched>,
    by_key: HashMap<String, EntityId>,
}

impl Watching {
    fn insert(&mut self, id: EntityId, watched: Watched) {
        self.by_key.insert(watched.queue_key.clone(), id);
        self.by_key.insert(watched.control_key.clone(), id);
        self.by_id.insert(id, watched);
    }

    /// Stops watching `id` if `token` is still its subscription's.
    fn remove(&mut self, id: &EntityId, token: u64) {
        if let Some(watched) = self.by_id.get(id).filter(|w| w.token == token) {
            self.by_key.remove(&watched.queue_key);
            self.by_key.remove(&watched.control_key);
            self.by_id.remove(id);
        }
    }
}

/// One blocking `XREAD` for all the subscriptions of this replica.
#[derive(Debug)]
struct Reader {
    subscriptions: Mutex<Watching>,
    /// A stream of this reader alone: an entry in it interrupts the `XREAD`.
    wake_key: String,
    conn: ConnectionManager,
}

impl Reader {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watching> {
        self.subscriptions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches a mailbox for a new subscription, replacing this replica's
    /// previous one (whose channel then closes).
    async fn add(
        &self,
        id: EntityId,
        queue_key: String,
        control_key: String,
    ) -> (u64, mpsc::UnboundedReceiver<Event>) {
        static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let token = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        let watched = Watched {
            token,
            queue_key,
            control_key,
            queue_cursor: "0-0".into(),
            control_cursor: "0-0".into(),
            events,
        };
        self.lock().insert(id, watched);
        self.wake().await;
        (token, receiver)
    }

    fn remove(&self, id: &EntityId, token: u64) {
        self.lock().remove(id, token);
    }

    async fn wake(&self) {
        let woke: Result<(), _> = redis::cmd("XADD")
            .arg(&self.wake_key)
            .arg(&["MAXLEN", "~", "8", "*", "w", "1"])
            .query_async(&mut self.conn.clone())
            .await;
        if let Err(e) = woke {
            tracing::debug!(error = %e, "cannot wake the Redis reader");
        }
    }

    async fn run(self: Arc<Self>, mut conn: ConnectionManager) {
        let mut wake_cursor = "0-0".to_owned();
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(READ_COUNT).arg("BLOCK").arg(BLOCK_MS).arg("STREAMS");
            let mut cursors = Vec::new();
            {
                let watching = self.lock();
                for watched in watching.by_id.values() {
                    cmd.arg(&watched.queue_key).arg(&watched.control_key);
                    cursors.push(watched.queue_cursor.clone());
                    cursors.push(watched.control_cursor.clone());
                }
            }
            cmd.arg(&self.wake_key).arg(&cursors).arg(&wake_cursor);
            let reply: Value = match cmd.query_async(&mut conn).await {
                Ok(reply) => {
                    backoff = Duration::from_millis(50);
                    reply
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "Redis read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            for (key, entries) in stream_entries(reply) {
                if key == self.wake_key {
                    if let Some((id, _)) = entries.last() {
                        wake_cursor.clone_from(id);
                    }
                    continue;
                }
                self.dispatch(&key, entries);
            }
        }
    }

    /// Hands entries of one stream to the subscription watching it.
    fn dispatch(&self, key: &str, entries: Vec<StreamEntry>) {
        let mut watching = self.lock();
        let Some(id) = watching.by_key.get(key).copied() else { return };
        let Some(watched) = watching.by_id.get_mut(&id) else { return };
        let is_queue = watched.queue_key == key;
        let mut messages = Vec::new();
        let mut events = Vec::new();
        for (stream_id, fields) in entries {
            if is_queue {
                let data = fields.into_iter().find(|(f, _)| f == "m").and_then(|(_, v)| bytes(v));
                match (seq_of(&stream_id), data) {
                    (Some(seq), Some(data)) => messages.push((seq, data)),
                    _ => tracing::warn!(%stream_id, "skipping a malformed queue entry"),
                }
                watched.queue_cursor = stream_id;
            } else {
                let field = |name: &str| fields.iter().find(|(f, _)| f == name).map(|(_, v)| v);
                match field("x").and_then(string).as_deref() {
                    Some("t") => events.push(Event::Terminated),
                    Some("s") => {
                        events.push(Event::TakenOver(field("g").and_then(integer).unwrap_or(0)))
                    }
                    _ => {}
                }
                watched.control_cursor = stream_id;
            }
        }
        if !messages.is_empty() {
            events.insert(0, Event::Messages(messages));
        }
        if events.into_iter().any(|event| watched.events.send(event).is_err()) {
            // The subscription is gone: stop watching.
            let token = watched.token;
            watching.remove(&id, token);
        }
    }
}

/// One stream entry: its id and its fields.
type StreamEntry = (String, Vec<(String, Value)>);

/// `XREAD`'s reply as (stream key, entries); RESP2 or RESP3.
fn stream_entries(reply: Value) -> Vec<(String, Vec<StreamEntry>)> {
    let streams: Vec<(Value, Value)> = match reply {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let entries = pair.pop()?;
                    Some((pair.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    streams
        .into_iter()
        .filter_map(|(key, entries)| {
            let Value::Array(entries) = entries else {
                return None;
            };
            let entries = entries
                .into_iter()
                .filter_map(|entry| {
                    let Value::Array(mut entry) = entry else {
                        return None;
                    };
                    if entry.len() != 2 {
                        return None;
                    }
                    let Value::Array(flat) = entry.pop()? else {
                        return None;
                    };
                    let id = string(&entry.pop()?)?;
                    let mut fields = Vec::with_capacity(flat.len() / 2);
                    let mut flat = flat.into_iter();
                    while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                        fields.push((string(&name)?, value));
                    }
                    Some((id, fields))
                })
                .collect();
            Some((string(&key)?, entries))
        })
        .collect()
}

#[derive(Debug)]
struct RedisSubscription {
    id: EntityId,
    generation: u64,
    events: (u64, mpsc::UnboundedReceiver<Event>),
    ready: VecDeque<(u64, Bytes)>,
    reader: Arc<Reader>,
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.reader.remove(&self.id, self.events.0);
    }
}

#[async_trait]
impl BackendSubscription for RedisSubscription {
    async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, ExchangeError> {
        loop {
            if !self.ready.is_empty() {
                let mut batch = Vec::new();
                let mut size = 0;
                while batch.len() < max && (batch.is_empty() || size < max_bytes) {
                    let Some((seq, data)) = self.ready.pop_front() else {
                        break;
                    };
                    size += data.len();
                    match pb::Message::decode(data) {
                        Ok(message) => batch.push((seq, message)),
                        Err(e) => {
                            tracing::warn!(mailbox = %self.id, seq, error = %e, "undecodable message")
                        }
                    }
                }
                if !batch.is_empty() {
                    return Ok(batch);
                }
                continue;
            }
            match self.events.1.recv().await {
                Some(Event::Messages(messages)) => self.ready.extend(messages),
                Some(Event::TakenOver(generation)) if generation > self.generation => {
                    return Err(ExchangeError::Superseded(self.id));
                }
                Some(Event::TakenOver(_)) => {}
                Some(Event::Terminated) => return Err(ExchangeError::Terminated(self.id)),
                // Replaced by a newer subscription on this replica.
                None => return Err(ExchangeError::Superseded(self.id)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_map_to_ordered_seqs_and_back() {
        let a = seq_of("1700000000000-0").unwrap();
        let b = seq_of("1700000000000-7").unwrap();
        let c = seq_of("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(stream_id_of(b), "1700000000000-7");
        assert_eq!(seq_of("x-1"), None);
        assert_eq!(seq_of(&format!("1-{}", 1u64 << SEQ_BITS)), None);
    }
}
