//! The Redis backend: durable mailboxes, shared by every exchange replica that
//! uses the same Redis and prefix.
//!
//! Keys, under the prefix `P`:
//! - `P:mb:<id>`: hash of the mailbox (`s` state a/t, `k` kind a/c, `b`
//!   behaviour, `i` implements as JSON, `n` name, `g` subscriber generation,
//!   `l` id of the last message added, `r` the replica its subscriber is on);
//! - `P:q:<id>`: stream of its unacknowledged messages (field `m`, protobuf);
//!   an acknowledged message is deleted, so its length is the queue length;
//! - `P:dq:<id>`: the queue of a mailbox just terminated, while the exchange
//!   answers the requests left in it;
//! - `P:replica:<replica>`: present while the replica runs (renewed every
//!   `PRESENCE_EVERY`, expiring after `PRESENCE_TTL`), so a subscriber whose
//!   replica died stops counting as one;
//! - `P:idx:<name>` / `P:own:<name>`: discovery index, agents listing a name /
//!   whose own behaviour it is (`P:idx:` lists every active agent); sorted sets
//!   whose members all score 0, so they are ordered by id and a page is read
//!   by range. (Versions before 2026-12 kept sets at `P:ix:` / `P:ox:`: see
//!   [`MIGRATE_INDEX`].)
//!
//! State changes run as Lua scripts (atomic). Each replica listens on its own
//! pub/sub channel `P:bell:<replica>`; a script that adds a message to a
//! mailbox with a subscriber publishes it there (small messages whole, large
//! ones as a notice to read), as does one that terminates the mailbox or hands
//! it to another subscriber. So delivery is pushed, and its cost does not grow
//! with the number of subscriptions. Each notice names the message before it,
//! so a replica that missed one (a dropped connection) sees the gap and reads
//! the stream; after reconnecting it reads every subscribed stream again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use academy_proto::pb;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt as _;
use prost::Message as _;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backend, BackendSubscription, Found, Page, awaiting_answer, source, unknown_source};
use academy_proto::{EntityId, ExchangeError, MailboxStatus, RegisteredAgent};
use academy_server::redis::{connect as connect_redis, redacted_url};

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

/// How often a replica renews its presence, and how long it lasts.
const PRESENCE_EVERY: Duration = Duration::from_secs(5);
const PRESENCE_TTL: Duration = Duration::from_secs(15);
/// Agents moved per call of [`MIGRATE_INDEX`].
const MIGRATE_BATCH: usize = 50;
/// How often an exchange looks for agents in an earlier version's index.
const MIGRATE_EVERY: Duration = Duration::from_secs(60);
/// Most entries read from one stream at a time.
const READ_COUNT: usize = 512;
/// Subscriptions looked at again per round trip after notices were lost.
const RECHECK_BATCH: usize = 256;
/// Entries read at a time from a terminated mailbox's queue (messages may be
/// large; only the requests' headers are kept).
const DRAIN_PAGE: usize = 64;
/// How long a drain stream lives if the exchange that should read it dies.
const DRAIN_TTL_SECS: u64 = 24 * 3600;
/// Messages up to this size travel in the notice itself; larger ones are read
/// from the stream, so no large payload is copied twice.
const MAX_NOTICE_BYTES: usize = 64 * 1024;

/// Lua: `index(add, p, id, b, i)` adds agent `id`, of behaviour `b` and
/// implementing the JSON list `i`, to the discovery index under prefix `p`,
/// or removes it. `index_keys(p, listing, own, b, i)` names the keys that
/// list such an agent, in this index (`:idx:`, `:own:`) or an earlier
/// version's (`:ix:`, `:ox:`).
macro_rules! lua_index {
    () => {
        r"
local function index_keys(p, listing, own, b, i)
  local keys = {p .. listing, p .. listing .. b, p .. own .. b}
  for _, name in ipairs(cjson.decode(i)) do keys[#keys + 1] = p .. listing .. name end
  return keys
end
local function index(add, p, id, b, i)
  for _, key in ipairs(index_keys(p, ':idx:', ':own:', b, i)) do
    if add then redis.call('ZADD', key, 0, id) else redis.call('ZREM', key, id) end
  end
end
"
    };
}

/// Creates mailbox ARGV[1]: kind, behaviour, implements (JSON), name, TTL,
/// key prefix, owner (empty: none). Answers its state if it already exists.
const CREATE: &str = concat!(
    lua_index!(),
    r"
local s = redis.call('HGET', KEYS[1], 's')
if s then return s end
redis.call('HSET', KEYS[1], 's', 'a', 'k', ARGV[2], 'b', ARGV[3], 'i', ARGV[4], 'n', ARGV[5], 'g', 0)
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'o', ARGV[8]) end
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
if ARGV[2] == 'a' then index(true, ARGV[7], ARGV[1], ARGV[3], ARGV[4]) end
return 'ok'
"
);

/// Appends messages, in order: KEYS are the (mailbox, queue) pairs of the
/// mailboxes written to, then the mailboxes the messages come from when the
/// sender is checked; ARGV the queue bound, the TTL, the notice size limit,
/// the channel prefix, the number of mailboxes, the sender (empty: trusted)
/// and the mailboxes' ids, then per message the number of its mailbox's pair
/// (from 1), with a sender the number of its source mailbox (from 1), and the
/// message. One answer per message; a source the sender may not act for
/// answers `nosrc` (no such mailbox) or `denied:<owner>`. Each mailbox with a
/// subscriber gets a notice on its replica's channel, one publish per replica
/// for the whole call:
/// `m <id> <previous> <added> <size>\n<message>` per message, or
/// `n <id> <previous> <added> 0\n` for a large one. A mailbox's hash is read
/// and written once per call, however many messages it gets.
const ENQUEUE: &str = r"
local max, ttl, small, bell, n, sender = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6]
local boxes, notices, refused = {}, {}, {[0] = 'nosrc'}
for k = 1, n do
  local mb, q = KEYS[2 * k - 1], KEYS[2 * k]
  local h = redis.call('HMGET', mb, 's', 'l', 'r')
  local m = {id = ARGV[6 + k], state = h[1], last = h[2] or '0-0', replica = h[3]}
  if h[1] == 'a' and max > 0 then m.len = redis.call('XLEN', q) end
  boxes[k] = m
end
for j = 1, #KEYS - 2 * n do
  local h = redis.call('HMGET', KEYS[2 * n + j], 's', 'o')
  if not h[1] then refused[j] = 'nosrc'
  elseif h[2] and h[2] ~= sender then refused[j] = 'denied:' .. h[2] end
end
local out = {}
local step = sender == '' and 2 or 3
for i = 7 + n, #ARGV, step do
  local k, data = tonumber(ARGV[i]), ARGV[i + step - 1]
  local m = boxes[k]
  local no = step == 3 and refused[tonumber(ARGV[i + 1])]
  if no then out[#out + 1] = no
  elseif not m.state then out[#out + 1] = 'missing'
  elseif m.state == 't' then out[#out + 1] = 'terminated'
  elseif m.len and m.len >= max then out[#out + 1] = 'full'
  else
    local added = redis.call('XADD', KEYS[2 * k], '*', 'm', data)
    if m.len then m.len = m.len + 1 end
    if m.replica then
      local parts = notices[m.replica] or {}
      notices[m.replica] = parts
      local head = m.id .. ' ' .. m.last .. ' ' .. added
      if #data <= small then
        parts[#parts + 1] = 'm ' .. head .. ' ' .. #data .. '\n'
        parts[#parts + 1] = data
      else
        parts[#parts + 1] = 'n ' .. head .. ' 0\n'
      end
    end
    m.last, m.added = added, true
    out[#out + 1] = 'ok'
  end
end
for k, m in ipairs(boxes) do
  if m.added then
    redis.call('HSET', KEYS[2 * k - 1], 'l', m.last)
    if ttl > 0 then redis.call('EXPIRE', KEYS[2 * k - 1], ttl); redis.call('EXPIRE', KEYS[2 * k], ttl) end
  end
end
for replica, parts in pairs(notices) do redis.call('PUBLISH', bell .. replica, table.concat(parts)) end
return out
";

/// Terminates mailbox ARGV[1] for caller ARGV[4] (owner check: see SUBSCRIBE).
/// Its queue becomes the drain stream KEYS[3] (answers `active`, `drain`), which
/// the exchange reads a page at a time to answer the requests left in it and
/// then deletes: however long the queue, no one reply or step is large. A
/// drain left by a crash expires after `DRAIN_TTL_SECS` (ARGV[5]).
const TERMINATE: &str = concat!(
    lua_index!(),
    r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
local o = redis.call('HGET', KEYS[1], 'o')
if o and ARGV[4] ~= '' and o ~= ARGV[4] then return {'denied', o} end
if s == 't' then return {'terminated'} end
redis.call('HSET', KEYS[1], 's', 't')
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
local out = {'active'}
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  out[2] = 'drain'
end
local r = redis.call('HGET', KEYS[1], 'r')
if r then redis.call('PUBLISH', ARGV[3] .. ':bell:' .. r, 't ' .. ARGV[1] .. '\n') end
local h = redis.call('HMGET', KEYS[1], 'k', 'b', 'i')
if h[1] == 'a' then index(false, ARGV[3], ARGV[1], h[2], h[3]) end
return out
"
);

/// Moves at most ARGV[2] agents from the index of earlier versions (sets:
/// `P:ix:` of every active agent, `P:ix:<name>`, `P:ox:<name>`; ARGV[1] is
/// `P`) to the sorted one, rebuilding their entries from their mailboxes and
/// taking them out of the old sets (which Redis deletes once empty), so
/// replicas of the earlier version still list the agents not yet moved;
/// answers how many it took (0: none left). Each call is short, and a crash
/// between calls loses nothing.
const MIGRATE_INDEX: &str = concat!(
    lua_index!(),
    r"
local p = ARGV[1]
local ids = redis.call('SPOP', p .. ':ix:', tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', p .. ':mb:' .. id, 's', 'b', 'i')
  if h[2] then
    for _, key in ipairs(index_keys(p, ':ix:', ':ox:', h[2], h[3])) do redis.call('SREM', key, id) end
    if h[1] == 'a' then index(true, p, id, h[2], h[3]) end
  end
end
return #ids
"
);

/// Makes replica ARGV[3] the subscriber's, for caller ARGV[5]; the previous
/// one (on any replica) is told it was taken over.
///
/// Owner check, here and in TERMINATE and ACKNOWLEDGE: a mailbox with an owner
/// (`o`) answers `denied` to a caller with another principal; an empty caller
/// is trusted.
const SUBSCRIBE: &str = r"
local s = redis.call('HGET', KEYS[1], 's')
if not s then return {'missing'} end
local o = redis.call('HGET', KEYS[1], 'o')
if o and ARGV[5] ~= '' and o ~= ARGV[5] then return {'denied', o} end
if s == 't' then return {'terminated'} end
local g = redis.call('HINCRBY', KEYS[1], 'g', 1)
local r = redis.call('HGET', KEYS[1], 'r')
if r then redis.call('PUBLISH', ARGV[2] .. ':bell:' .. r, 's ' .. ARGV[4] .. ' ' .. g .. '\n') end
redis.call('HSET', KEYS[1], 'r', ARGV[3])
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl) end
return {'ok', g}
";

/// Forgets replica ARGV[2] as the one with mailbox KEYS[1]'s subscriber, as
/// its subscription of generation ARGV[1] ended, unless a newer one took over.
const UNSUBSCRIBE: &str = r"
local h = redis.call('HMGET', KEYS[1], 'g', 'r')
if h[1] == ARGV[1] and h[2] == ARGV[2] then redis.call('HDEL', KEYS[1], 'r') end
return 'ok'
";

/// Deletes acknowledged messages: ARGV is the caller, the highest id
/// acknowledged, then every id (deleted a thousand at a time: Lua's `unpack`
/// is bounded). None may be above the last message added.
const ACKNOWLEDGE: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 'o', 'l')
local s, o = h[1], h[2]
if not s then return 'missing' end
if o and ARGV[1] ~= '' and o ~= ARGV[1] then return 'denied:' .. o end
if s == 't' then return 'terminated' end
if #ARGV < 3 then return 'ok' end
local lms, lseq = string.match(h[3] or '0-0', '(%d+)-(%d+)')
local ms, seq = string.match(ARGV[2], '(%d+)-(%d+)')
ms, seq, lms, lseq = tonumber(ms), tonumber(seq), tonumber(lms), tonumber(lseq)
if ms > lms or (ms == lms and seq > lseq) then return 'never:' .. ARGV[2] end
for i = 3, #ARGV, 1000 do redis.call('XDEL', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
return 'ok'
";

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
    fn add(&mut self, dest: &EntityId, src: Option<&EntityId>, message: Vec<u8>) {
        let k = place(&mut self.mailboxes, dest);
        let s = src.map(|src| place(&mut self.sources, src));
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
    unsubscribe: Lua,
    migrate_index: Lua,
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
    /// What was queued in a terminated mailbox, until its requests are answered.
    fn drain(&self, id: &EntityId) -> String {
        format!("{}:dq:{id}", self.prefix)
    }
    /// Present while `replica` runs.
    fn replica(&self, replica: &str) -> String {
        format!("{}:replica:{replica}", self.prefix)
    }
    /// The prefix of the replicas' notice channels.
    fn bell(&self) -> String {
        format!("{}:bell:", self.prefix)
    }
    fn index(&self, name: &str, exact: bool) -> String {
        format!("{}:{}:{name}", self.prefix, if exact { "own" } else { "idx" })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RedisBackend {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    keys: Keys,
    options: RedisOptions,
    reader: Arc<Reader>,
    /// Held by every handle on the backend but its own background tasks'.
    _in_use: Option<Arc<InUse>>,
}

/// When the last handle on a backend goes, its background tasks stop and
/// its replica's presence is withdrawn.
#[derive(Debug)]
struct InUse {
    stop: CancellationToken,
    conn: ConnectionManager,
    presence: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (mut conn, key) = (self.conn.clone(), std::mem::take(&mut self.presence));
            runtime.spawn(async move {
                let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
            });
        }
    }
}

impl RedisBackend {
    pub(crate) async fn connect(options: RedisOptions) -> Result<Self, ExchangeError> {
        let (client, conn) = connect_redis(&options.url).await?;
        let keys = Keys { prefix: options.prefix.clone() };
        let stop = CancellationToken::new();
        let reader = Reader::start(client, conn.clone(), keys.bell(), stop.clone()).await?;
        let url = redacted_url(&options.url);
        tracing::info!(%url, prefix = %options.prefix, "using Redis for mailboxes");
        let scripts = Arc::new(Scripts {
            create: Lua::new(CREATE),
            enqueue: Lua::new(ENQUEUE),
            terminate: Lua::new(TERMINATE),
            subscribe: Lua::new(SUBSCRIBE),
            acknowledge: Lua::new(ACKNOWLEDGE),
            unsubscribe: Lua::new(UNSUBSCRIBE),
            migrate_index: Lua::new(MIGRATE_INDEX),
        });
        let presence = keys.replica(&reader.replica);
        let in_use = InUse { stop: stop.clone(), conn: conn.clone(), presence };
        let backend =
            Self { conn, scripts, keys, options, reader, _in_use: Some(Arc::new(in_use)) };
        backend.renew_presence().await?;
        backend.migrate_index().await?;
        let tasks = Self { _in_use: None, ..backend.clone() };
        tokio::spawn(async move { stop.run_until_cancelled(tasks.keep()).await });
        Ok(backend)
    }

    /// Renews this replica's presence; and, as during a rolling upgrade
    /// replicas of earlier versions still write the old discovery index,
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
                _ = migrate.tick() => if let Err(e) = self.migrate_index().await {
                    tracing::warn!(error = %e, "cannot look for an earlier version's discovery index");
                },
            }
        }
    }

    async fn renew_presence(&self) -> Result<(), ExchangeError> {
        let mut set = redis::cmd("SET");
        set.arg(self.keys.replica(&self.reader.replica)).arg(1);
        set.arg("PX").arg(u64::try_from(PRESENCE_TTL.as_millis()).unwrap_or(u64::MAX));
        set.query_async(&mut self.conn.clone()).await.map_err(unavailable)
    }

    /// Forgets this replica as mailbox `id`'s subscriber's, as its
    /// subscription of `generation` ended (unless a newer one took over).
    async fn unsubscribed(&self, id: &EntityId, generation: u64) {
        let mut cmd = self.scripts.unsubscribe.call(&[self.keys.mailbox(id)]);
        cmd.arg(generation).arg(&self.reader.replica);
        if let Err(e) = self.run_one(&self.scripts.unsubscribe, cmd).await {
            tracing::warn!(mailbox = %id, error = %e, "cannot record that a subscription ended");
        }
    }

    /// Moves every agent listed in an earlier version's discovery index
    /// ([`MIGRATE_INDEX`]) to this one's; nothing when there is none.
    async fn migrate_index(&self) -> Result<(), ExchangeError> {
        let old = format!("{}:ix:", self.keys.prefix);
        let mut conn = self.conn.clone();
        let exists: bool =
            redis::cmd("EXISTS").arg(&old).query_async(&mut conn).await.map_err(unavailable)?;
        if !exists {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut moved = 0;
        loop {
            let mut cmd = self.scripts.migrate_index.call(&[]);
            cmd.arg(&self.keys.prefix).arg(MIGRATE_BATCH);
            let answer = self.run_one(&self.scripts.migrate_index, cmd).await?;
            match integer(&answer) {
                Some(0) | None => break,
                Some(n) => moved += n,
            }
        }
        let elapsed = started.elapsed();
        tracing::info!(agents = moved, ?elapsed, "moved an earlier version's discovery index");
        Ok(())
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

impl RedisBackend {
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

/// What a script said about a mailbox it looked at: `missing`, `terminated`,
/// or `denied` with the owner (`owner` reads it from the reply).
fn state_error(
    id: &EntityId,
    answer: &str,
    owner: impl FnOnce() -> Option<String>,
) -> Option<ExchangeError> {
    match answer {
        "missing" => Some(ExchangeError::NotFound(*id)),
        "terminated" => Some(ExchangeError::Terminated(*id)),
        "denied" => Some(ExchangeError::PermissionDenied { id: *id, owner: owner()? }),
        _ => None,
    }
}

/// The caller as a script argument: empty when trusted.
fn caller_arg(caller: Option<&str>) -> &str {
    caller.unwrap_or_default()
}

#[async_trait]
impl Backend for RedisBackend {
    async fn create(
        &self,
        id: EntityId,
        agent: Option<RegisteredAgent>,
        owner: Option<&str>,
    ) -> Result<(), ExchangeError> {
        let (kind, behaviour, implements, name) = match &agent {
            Some(a) => ("a", a.behaviour.as_str(), a.implements.clone(), a.name.as_str()),
            None => ("c", "", Vec::new(), ""),
        };
        let implements = serde_json::to_string(&implements).expect("strings serialise");
        let mut cmd = self.scripts.create.call(&[self.keys.mailbox(&id)]);
        cmd.arg(id.to_string()).arg(kind).arg(behaviour).arg(implements).arg(name);
        cmd.arg(secs(self.options.mailbox_ttl)).arg(&self.keys.prefix).arg(caller_arg(owner));
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
        caller: Option<&str>,
    ) -> Result<(pb::MailboxState, Vec<pb::Message>), ExchangeError> {
        let keys = [self.keys.mailbox(id), self.keys.queue(id), self.keys.drain(id)];
        let mut cmd = self.scripts.terminate.call(&keys);
        cmd.arg(id.to_string()).arg(secs(self.options.gravestone_ttl)).arg(&self.keys.prefix);
        cmd.arg(caller_arg(caller)).arg(DRAIN_TTL_SECS);
        let mut answer = array(self.run_one(&self.scripts.terminate, cmd).await?).into_iter();
        let head = answer.next().and_then(|v| string(&v)).unwrap_or_default();
        match head.as_str() {
            "terminated" => Ok((pb::MailboxState::Terminated, Vec::new())),
            "missing" | "denied" => {
                Err(state_error(id, &head, || answer.next().and_then(|v| string(&v)))
                    .unwrap_or_else(|| {
                        ExchangeError::Unavailable(format!("terminate failed: {head}"))
                    }))
            }
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
            .arg(&["s", "k", "b", "i", "n", "r"])
            .cmd("XLEN")
            .arg(self.keys.queue(id))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let state = match fields.first().cloned().flatten().as_deref() {
            None => return Ok(MailboxStatus::missing()),
            Some("t") => pb::MailboxState::Terminated,
            Some(_) => pb::MailboxState::Active,
        };
        let agent = (fields.get(1).cloned().flatten().as_deref() == Some("a"))
            .then(|| agent_info(*id, &fields[2..]))
            .flatten();
        // Its subscriber's replica, if it still runs.
        let subscribed = match fields.get(5).cloned().flatten() {
            Some(replica) if state == pb::MailboxState::Active => redis::cmd("EXISTS")
                .arg(self.keys.replica(&replica))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?,
            _ => false,
        };
        Ok(MailboxStatus { state, queued, agent, subscribed })
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
        max_queued: Option<usize>,
        sender: Option<&str>,
    ) -> Vec<Result<(), ExchangeError>> {
        if messages.is_empty() {
            return Vec::new();
        }
        let ttl = secs(self.options.mailbox_ttl);
        let max = max_queued.unwrap_or(0);
        // One script call per chunk: few enough messages or bytes that Redis,
        // single-threaded, is not held up long by any one call.
        let bell = self.keys.bell();
        let (mut calls, mut sizes) = (Vec::new(), Vec::new());
        let mut chunk = Chunk::default();
        for (i, (dest, message)) in messages.iter().enumerate() {
            // With a sender, the message's source (validated by the exchange).
            let src = sender.and_then(|_| source(message).ok());
            chunk.add(dest, src.as_ref(), message.encode_to_vec());
            let last = i + 1 == messages.len();
            if last || chunk.messages.len() >= ENQUEUE_CHUNK || chunk.bytes >= ENQUEUE_CHUNK_BYTES {
                let chunk = std::mem::take(&mut chunk);
                let keys: Vec<String> = chunk
                    .mailboxes
                    .iter()
                    .flat_map(|id| [self.keys.mailbox(id), self.keys.queue(id)])
                    .chain(chunk.sources.iter().map(|id| self.keys.mailbox(id)))
                    .collect();
                let mut cmd = self.scripts.enqueue.call(&keys);
                cmd.arg(max).arg(ttl).arg(MAX_NOTICE_BYTES).arg(&bell);
                cmd.arg(chunk.mailboxes.len()).arg(caller_arg(sender));
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
                calls.push(cmd);
                sizes.push(chunk.messages.len());
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
            .map(|((dest, message), answer)| match string(&answer).as_deref() {
                Some("ok") => Ok(()),
                Some("full") => Err(ExchangeError::MailboxFull { id: *dest, limit: max }),
                // About the message's source, which the exchange validated.
                Some(a) if a == "nosrc" || a.starts_with("denied:") => {
                    let src = source(message)?;
                    let (head, owner) = a.split_once(':').unwrap_or((a, ""));
                    let denied = state_error(&src, head, || Some(owner.to_owned()));
                    Err(denied.unwrap_or_else(|| unknown_source(&src)))
                }
                other => {
                    Err(other.and_then(|a| state_error(dest, a, || None)).unwrap_or_else(|| {
                        ExchangeError::Unavailable(format!("enqueue failed: {answer:?}"))
                    }))
                }
            })
            .collect()
    }

    async fn subscribe(
        &self,
        id: &EntityId,
        caller: Option<&str>,
    ) -> Result<Box<dyn BackendSubscription>, ExchangeError> {
        let keys = [self.keys.mailbox(id), self.keys.queue(id)];
        let mut cmd = self.scripts.subscribe.call(&keys);
        cmd.arg(secs(self.options.mailbox_ttl)).arg(&self.keys.prefix).arg(&self.reader.replica);
        cmd.arg(id.to_string()).arg(caller_arg(caller));
        let answer = array(self.run_one(&self.scripts.subscribe, cmd).await?);
        let head = answer.first().and_then(string).unwrap_or_default();
        if let Some(err) = state_error(id, &head, || answer.get(1).and_then(string)) {
            return Err(err);
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
        let ids: Vec<String> = seqs.iter().map(|s| stream_id_of(*s)).collect();
        let mut cmd = self.scripts.acknowledge.call(&[self.keys.mailbox(id), self.keys.queue(id)]);
        cmd.arg(caller_arg(caller)).arg(seqs.iter().max().map(|s| stream_id_of(*s))).arg(&ids);
        let answer =
            string(&self.run_one(&self.scripts.acknowledge, cmd).await?).unwrap_or_default();
        let (head, owner) = answer.split_once(':').unwrap_or((&answer, ""));
        if let Some(err) = state_error(id, head, || Some(owner.to_owned())) {
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

    async fn owner(&self, id: &EntityId) -> Result<Option<String>, ExchangeError> {
        redis::cmd("HGET")
            .arg(self.keys.mailbox(id))
            .arg("o")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn forget(&self, id: &EntityId) {
        let keys = [self.keys.mailbox(id), self.keys.queue(id)];
        let done: Result<(), _> =
            redis::cmd("DEL").arg(&keys).query_async(&mut self.conn.clone()).await;
        if let Err(e) = done {
            tracing::warn!(mailbox = %id, error = %e, "cannot delete transient mailbox");
        }
    }
}

/// Agent info from the hash fields `b`, `i`, `n`.
fn agent_info(id: EntityId, fields: &[Option<String>]) -> Option<RegisteredAgent> {
    let behaviour = fields.first()?.clone()?;
    let implements = fields
        .get(1)
        .cloned()
        .flatten()
        .and_then(|i| serde_json::from_str(&i).ok())
        .unwrap_or_default();
    let name = fields.get(2).cloned().flatten().unwrap_or_default();
    Some(RegisteredAgent { id, behaviour, implements, name })
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
    /// Another subscriber took over the mailbox.
    TakenOver,
    Terminated,
}

#[derive(Debug)]
struct Watched {
    token: u64,
    mailbox_key: String,
    queue_key: String,
    generation: u64,
    /// The last message handed over (or known gone): the next one must follow it.
    cursor: u64,
    events: mpsc::UnboundedSender<Event>,
}

/// What a notice on a replica's channel says.
#[derive(Debug, PartialEq)]
enum Notice {
    /// Message `added` follows `previous` in mailbox `id`; its bytes when small.
    Added {
        id: EntityId,
        previous: u64,
        added: u64,
        data: Option<Bytes>,
    },
    TakenOver {
        id: EntityId,
        generation: u64,
    },
    Terminated {
        id: EntityId,
    },
}

impl Notice {
    /// The notices of one publish, in order; `None` if any is malformed.
    fn parse_all(mut payload: &[u8]) -> Option<Vec<Self>> {
        let mut notices = Vec::new();
        while !payload.is_empty() {
            let end = payload.iter().position(|b| *b == b'\n')?;
            let head = std::str::from_utf8(&payload[..end]).ok()?;
            payload = &payload[end + 1..];
            let mut words = head.split(' ');
            let kind = words.next()?;
            let id: EntityId = words.next()?.parse().ok()?;
            let mut seq = || words.next().map(seq_of);
            let notice = match kind {
                "m" | "n" => {
                    let (previous, added) = (seq()??, seq()??);
                    let size: usize = words.next()?.parse().ok()?;
                    let data = payload.get(..size)?;
                    payload = &payload[size..];
                    let data = (kind == "m").then(|| Bytes::copy_from_slice(data));
                    Self::Added { id, previous, added, data }
                }
                "s" => Self::TakenOver { id, generation: words.next()?.parse().ok()? },
                "t" => Self::Terminated { id },
                _ => return None,
            };
            notices.push(notice);
        }
        Some(notices)
    }
}

/// Delivers the notices of this replica's channel to its subscriptions.
#[derive(Debug)]
struct Reader {
    subscriptions: Mutex<HashMap<EntityId, Watched>>,
    /// This replica's name in the mailbox hashes (`r`).
    replica: String,
    conn: ConnectionManager,
    /// Subscriptions whose stream must be read (new ones).
    reads: mpsc::UnboundedSender<EntityId>,
}

impl Reader {
    /// Listens on this replica's channel before returning, so no notice sent
    /// to a subscription made afterwards can be missed.
    async fn start(
        client: redis::Client,
        conn: ConnectionManager,
        bell: String,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, ExchangeError> {
        let replica = uuid::Uuid::new_v4().simple().to_string();
        let channel = format!("{bell}{replica}");
        let notices = listen(&client, &channel).await.map_err(|e| {
            ExchangeError::Unavailable(format!("cannot listen on Redis channel {channel}: {e}"))
        })?;
        let (reads, pending) = mpsc::unbounded_channel();
        let reader = Arc::new(Self { subscriptions: Mutex::default(), replica, conn, reads });
        let run = reader.clone().run(client, channel, notices, pending);
        tokio::spawn(async move { stop.run_until_cancelled(run).await });
        Ok(reader)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EntityId, Watched>> {
        self.subscriptions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Watches a mailbox for a new subscription, replacing this replica's
    /// previous one (whose channel then closes), and reads what is queued.
    fn add(
        &self,
        id: EntityId,
        keys: &Keys,
        generation: u64,
    ) -> (u64, mpsc::UnboundedReceiver<Event>) {
        static TOKENS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let token = TOKENS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (events, receiver) = mpsc::unbounded_channel();
        let watched = Watched {
            token,
            mailbox_key: keys.mailbox(&id),
            queue_key: keys.queue(&id),
            generation,
            cursor: 0,
            events,
        };
        self.lock().insert(id, watched);
        let _ = self.reads.send(id);
        (token, receiver)
    }

    /// Stops watching for subscription `token`; whether it was still watched.
    fn remove(&self, id: &EntityId, token: u64) -> bool {
        let mut watching = self.lock();
        let current = watching.get(id).is_some_and(|w| w.token == token);
        if current {
            watching.remove(id);
        }
        current
    }

    async fn run(
        self: Arc<Self>,
        client: redis::Client,
        channel: String,
        mut notices: redis::aio::PubSubStream,
        mut reads: mpsc::UnboundedReceiver<EntityId>,
    ) {
        loop {
            loop {
                tokio::select! {
                    Some(id) = reads.recv() => self.read(id).await,
                    notice = notices.next() => match notice {
                        Some(msg) => self.handle(msg.get_payload_bytes()).await,
                        None => break,
                    },
                }
            }
            tracing::warn!("lost Redis notices; reconnecting");
            let mut backoff = FIRST_RETRY;
            notices = loop {
                match listen(&client, &channel).await {
                    Ok(notices) => break notices,
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "cannot listen for Redis notices");
                        back_off(&mut backoff).await;
                    }
                }
            };
            // Notices sent meanwhile are lost: look at every subscription again.
            self.recheck_all().await;
        }
    }

    async fn handle(&self, payload: &[u8]) {
        let Some(notices) = Notice::parse_all(payload) else {
            tracing::warn!("skipping a malformed notice");
            return;
        };
        let mut reads: Vec<EntityId> = Vec::new();
        for notice in notices {
            // Once a mailbox must be read, so must all it was noticed after.
            if let Some(id) = self.take(notice).filter(|id| !reads.contains(id)) {
                reads.push(id);
            }
        }
        // Large, or something before it was missed: read the stream.
        for id in reads {
            self.read(id).await;
        }
    }

    /// Acts on a notice; the mailbox whose stream must be read, if any.
    fn take(&self, notice: Notice) -> Option<EntityId> {
        let mut watching = self.lock();
        match notice {
            Notice::Added { id, previous, added, data } => {
                let watched = watching.get_mut(&id)?;
                if added <= watched.cursor {
                    return None; // Already read from the stream.
                }
                let Some(data) = data.filter(|_| previous == watched.cursor) else {
                    return Some(id);
                };
                watched.cursor = added;
                if watched.events.send(Event::Messages(vec![(added, data)])).is_err() {
                    watching.remove(&id);
                }
                None
            }
            Notice::TakenOver { id, generation } => {
                if watching.get(&id).is_some_and(|w| generation > w.generation) {
                    let _ = watching.remove(&id).map(|w| w.events.send(Event::TakenOver));
                }
                None
            }
            Notice::Terminated { id } => {
                let _ = watching.remove(&id).map(|w| w.events.send(Event::Terminated));
                None
            }
        }
    }

    /// Hands over every message after the subscription's cursor.
    async fn read(&self, id: EntityId) {
        let mut backoff = FIRST_RETRY;
        loop {
            let Some((key, token, cursor)) =
                self.lock().get(&id).map(|w| (w.queue_key.clone(), w.token, w.cursor))
            else {
                return;
            };
            let reply: Result<Value, _> =
                range_after(&key, cursor, READ_COUNT).query_async(&mut self.conn.clone()).await;
            match reply {
                Ok(reply) => {
                    if !self.hand_over(id, token, range_entries(reply)) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(mailbox = %id, error = %e, ?backoff, "cannot read a queue; retrying");
                    back_off(&mut backoff).await;
                }
            }
        }
    }

    /// Hands the entries after its cursor to subscription `token` of `id`;
    /// whether more may follow (a full page, and the subscription still there).
    fn hand_over(&self, id: EntityId, token: u64, entries: Vec<(u64, Bytes)>) -> bool {
        let full = entries.len() >= READ_COUNT;
        let mut watching = self.lock();
        let Some(watched) = watching.get_mut(&id).filter(|w| w.token == token) else {
            return false;
        };
        let fresh: Vec<_> = entries.into_iter().filter(|(seq, _)| *seq > watched.cursor).collect();
        if let Some((last, _)) = fresh.last() {
            watched.cursor = *last;
            if watched.events.send(Event::Messages(fresh)).is_err() {
                watching.remove(&id);
                return false;
            }
        }
        full
    }

    /// After notices may have been lost: ends the subscriptions whose mailbox
    /// was taken over or terminated meanwhile, and reads the others' streams.
    /// Many mailboxes per round trip, so catching up is not one round trip per
    /// subscription.
    async fn recheck_all(&self) {
        let started = std::time::Instant::now();
        let ids: Vec<EntityId> = self.lock().keys().copied().collect();
        for chunk in ids.chunks(RECHECK_BATCH) {
            let watched: Vec<_> = {
                let watching = self.lock();
                chunk
                    .iter()
                    .filter_map(|id| {
                        let w = watching.get(id)?;
                        let keys = (w.mailbox_key.clone(), w.queue_key.clone());
                        Some((*id, keys, w.generation, w.token, w.cursor))
                    })
                    .collect()
            };
            let mut pipe = redis::pipe();
            for (_, (mailbox, queue), _, _, cursor) in &watched {
                pipe.cmd("HMGET").arg(mailbox).arg(&["s", "g"]);
                pipe.add_command(range_after(queue, *cursor, READ_COUNT));
            }
            let replies: Vec<Value> = match pipe.query_async(&mut self.conn.clone()).await {
                Ok(replies) => replies,
                Err(e) => {
                    // Each read retries by itself until Redis answers.
                    tracing::warn!(error = %e, "cannot recheck subscriptions; reading each");
                    for (id, ..) in watched {
                        self.read(id).await;
                    }
                    continue;
                }
            };
            let mut replies = replies.into_iter();
            for (id, _, generation, token, _) in watched {
                let (Some(fields), Some(range)) = (replies.next(), replies.next()) else { break };
                let fields = array(fields);
                let state = fields.first().and_then(string);
                let now = fields.get(1).and_then(integer).unwrap_or(0);
                let event = match state.as_deref() {
                    None | Some("t") => Some(Event::Terminated),
                    Some(_) if now > generation => Some(Event::TakenOver),
                    Some(_) => None,
                };
                match event {
                    Some(event) => {
                        let mut watching = self.lock();
                        if watching.get(&id).is_some_and(|w| w.token == token) {
                            let _ = watching.remove(&id).map(|w| w.events.send(event));
                        }
                    }
                    None if self.hand_over(id, token, range_entries(range)) => self.read(id).await,
                    None => {}
                }
            }
        }
        let elapsed = started.elapsed();
        tracing::info!(
            subscriptions = ids.len(),
            ?elapsed,
            "rechecked subscriptions after lost notices"
        );
    }
}

/// The first pause before retrying a failed Redis call; it doubles up to 2 s.
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// Waits `backoff`, then doubles it for the next retry.
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// A pub/sub connection listening on `channel`.
async fn listen(
    client: &redis::Client,
    channel: &str,
) -> Result<redis::aio::PubSubStream, RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.into_on_message())
}

/// `XRANGE` of at most `count` entries of stream `key` after seq `after`
/// (0: from the first; every message's seq is above 0).
fn range_after(key: &str, after: u64, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(format!("({}", stream_id_of(after))).arg("+").arg("COUNT").arg(count);
    cmd
}

/// `XRANGE`'s reply as (seq, message) pairs.
fn range_entries(reply: Value) -> Vec<(u64, Bytes)> {
    array(reply)
        .into_iter()
        .filter_map(|entry| {
            let mut entry = array(entry).into_iter();
            let stream_id = entry.next().and_then(|v| string(&v))?;
            let mut fields = array(entry.next()?).into_iter();
            let data = loop {
                let (name, value) = (fields.next()?, fields.next()?);
                if string(&name).as_deref() == Some("m") {
                    break bytes(value);
                }
            };
            match (seq_of(&stream_id), data) {
                (Some(seq), Some(data)) => Some((seq, data)),
                _ => {
                    tracing::warn!(%stream_id, "skipping a malformed queue entry");
                    None
                }
            }
        })
        .collect()
}

#[derive(Debug)]
struct RedisSubscription {
    id: EntityId,
    generation: u64,
    events: (u64, mpsc::UnboundedReceiver<Event>),
    ready: VecDeque<(u64, Bytes)>,
    /// How the subscription ended, reported once what came before is delivered.
    end: Option<ExchangeError>,
    backend: RedisBackend,
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        // Still the mailbox's subscription (not taken over, not ended by
        // its termination): it has no subscriber any more.
        if !self.backend.reader.remove(&self.id, self.events.0) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (backend, id, generation) = (self.backend.clone(), self.id, self.generation);
            runtime.spawn(async move { backend.unsubscribed(&id, generation).await });
        }
    }
}

#[async_trait]
impl BackendSubscription for RedisSubscription {
    async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<pb::Delivery>, ExchangeError> {
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
                        Ok(message) => batch.push(pb::Delivery { seq, message: Some(message) }),
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
            if let Some(end) = self.end.take() {
                return Err(end);
            }
            // Everything already there, so a busy mailbox goes out in batches.
            let mut event = self.events.1.recv().await;
            loop {
                match event {
                    Some(Event::Messages(messages)) => self.ready.extend(messages),
                    Some(Event::TakenOver) => self.end = Some(ExchangeError::Superseded(self.id)),
                    Some(Event::Terminated) => self.end = Some(ExchangeError::Terminated(self.id)),
                    // Replaced by a newer subscription on this replica.
                    None => self.end = Some(ExchangeError::Superseded(self.id)),
                }
                if self.end.is_some() || self.ready.len() >= max {
                    break;
                }
                match self.events.1.try_recv() {
                    Ok(next) => event = Some(next),
                    Err(_) => break,
                }
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

    #[test]
    fn notices_parse_and_malformed_ones_are_refused() {
        let id = EntityId::new_agent();
        let (a, b) = (seq_of("5-1").unwrap(), seq_of("6-0").unwrap());
        let payload = format!("m {id} 0-0 5-1 10\nbytes\nmoren {id} 5-1 6-0 0\ns {id} 7\nt {id}\n");
        let notices = Notice::parse_all(payload.as_bytes()).unwrap();
        assert_eq!(
            notices,
            vec![
                Notice::Added {
                    id,
                    previous: 0,
                    added: a,
                    data: Some(Bytes::from_static(b"bytes\nmore"))
                },
                Notice::Added { id, previous: a, added: b, data: None },
                Notice::TakenOver { id, generation: 7 },
                Notice::Terminated { id },
            ]
        );
        for bad in [
            "m\n",
            "x {id}\n",
            "t {id}",
            "m {id} 1-1\n",
            "m {id} a-b 1-1 0\n",
            "m {id} 0-0 1-1 9\nshort",
            "s {id}\n",
            "t nobody\n",
        ] {
            let bad = bad.replace("{id}", &id.to_string());
            assert_eq!(Notice::parse_all(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
