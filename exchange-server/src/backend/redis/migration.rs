//! The layout of the keys is versioned (`P:schema`, see [`SCHEMA`]): an
//! exchange refuses a store written by a newer one, and brings an older one
//! up to date before it serves.

use academy_proto::{EntityId, ExchangeError, RegisteredAgent};
use redis::Value;

use super::RedisBackend;
use super::keys::SCHEMA;
use super::reply::{array, string, unavailable};
use super::scripts::run;

/// Agents moved per round of [`migrate_index`].
const MIGRATE_BATCH: usize = 50;

/// Checks the store's schema and brings it to [`SCHEMA`].
pub(super) async fn upgrade(backend: &RedisBackend) -> Result<(), ExchangeError> {
    let keys = &backend.keys;
    let mut conn = backend.conn.clone();
    let stored: Option<u64> =
        redis::cmd("GET").arg(keys.schema()).query_async(&mut conn).await.map_err(unavailable)?;
    if let Some(newer) = stored.filter(|s| *s > SCHEMA) {
        return Err(ExchangeError::InvalidArgument(format!(
            "Redis prefix {:?} holds schema {newer}, written by a newer exchange; this one knows schema {SCHEMA}: upgrade it or use another --redis-prefix",
            keys.prefix()
        )));
    }
    migrate_index(backend).await?;
    if stored.unwrap_or(1) < 3 {
        lay_schema2_gravestones(backend).await?;
    }
    if stored.unwrap_or(1) < 4 {
        count_depth(backend).await?;
    }
    if stored != Some(SCHEMA) {
        let _: () = redis::cmd("SET")
            .arg(keys.schema())
            .arg(SCHEMA)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        tracing::info!(
            prefix = keys.prefix(),
            from = stored.unwrap_or(1),
            to = SCHEMA,
            "Redis schema upgraded"
        );
    }
    Ok(())
}

/// Moves every agent listed in the schema-1 discovery index (sets) to the
/// schema-2 one (sorted sets): at start, and again later, as replicas of an
/// earlier version may still write it during a rolling upgrade. Each agent
/// moves in one short script call (`migrate_agent.lua`) that takes it out of
/// the old sets, so replicas of the earlier version keep listing the agents
/// not yet moved. Answers how many moved.
pub(super) async fn migrate_index(backend: &RedisBackend) -> Result<usize, ExchangeError> {
    let keys = &backend.keys;
    let mut conn = backend.conn.clone();
    let started = std::time::Instant::now();
    let mut moved = 0;
    loop {
        let ids: Vec<String> = redis::cmd("SRANDMEMBER")
            .arg(keys.schema1_all())
            .arg(MIGRATE_BATCH)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if ids.is_empty() {
            break;
        }
        // An id that does not parse names no mailbox: it only leaves the set.
        let (ids, junk): (Vec<_>, Vec<_>) =
            ids.iter().partition(|id| id.parse::<EntityId>().is_ok());
        if !junk.is_empty() {
            let _: () = redis::cmd("SREM")
                .arg(keys.schema1_all())
                .arg(&junk)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        let ids: Vec<EntityId> = ids.iter().filter_map(|id| id.parse().ok()).collect();
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(keys.mailbox(id)).arg(&["b", "i"]);
        }
        let rows: Vec<Value> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let calls = ids.iter().zip(rows).map(|(id, row)| {
            let row = array(row);
            let implements: Vec<String> = row
                .get(1)
                .and_then(string)
                .and_then(|i| serde_json::from_str(&i).ok())
                .unwrap_or_default();
            // A mailbox gone (expired) leaves only the set of all agents.
            let (old, new) = match row.first().and_then(string) {
                Some(behaviour) => {
                    let old = keys.schema1_indexes(&behaviour, &implements);
                    let agent = RegisteredAgent {
                        id: *id,
                        behaviour,
                        implements,
                        name: String::new(),
                        owner: String::new(),
                        description: None,
                        endpoint: String::new(),
                    };
                    (old, keys.indexes(&agent))
                }
                None => (vec![keys.schema1_all()], Vec::new()),
            };
            let mut call_keys = vec![keys.mailbox(id)];
            let old_count = old.len();
            call_keys.extend(old);
            call_keys.extend(new);
            let mut call = backend.scripts.migrate_agent.call(&call_keys);
            call.arg(id.to_string()).arg(old_count);
            call
        });
        let calls: Vec<_> = calls.collect();
        for answer in run(&backend.conn, &backend.scripts.migrate_agent, calls).await? {
            if let Value::ServerError(e) = answer {
                return Err(ExchangeError::Unavailable(format!("moving the index failed: {e}")));
            }
        }
        moved += ids.len() + junk.len();
    }
    if moved > 0 {
        let elapsed = started.elapsed();
        tracing::info!(agents = moved, ?elapsed, "moved a schema-1 discovery index");
    }
    Ok(moved)
}

/// One round of a scan of every mailbox hash: the cursor to go on from (0
/// when done) and the ids found.
async fn mailboxes_page(
    backend: &RedisBackend,
    cursor: u64,
) -> Result<(u64, Vec<EntityId>), ExchangeError> {
    let pattern = format!("{}:mb:*", backend.keys.prefix());
    let (next, found) = backend.scan_page(&pattern, cursor).await?;
    let ids = found.iter().filter_map(|key| key.rsplit_once(":mb:")?.1.parse().ok()).collect();
    Ok((next, ids))
}

/// Schema 2 kept a terminated mailbox as its hash in state `t`: each becomes
/// a gravestone (an agent's) or goes (a client's); and the client mailboxes
/// of schema 2, which were not in `P:idle`, become idle from now unless
/// subscribed, so that abandoned ones expire. A gravestone is laid now, so
/// it is kept a retention from the upgrade. Answers how many hashes went.
async fn lay_schema2_gravestones(backend: &RedisBackend) -> Result<usize, ExchangeError> {
    let keys = &backend.keys;
    let mut conn = backend.conn.clone();
    // Idle from now, on Redis's clock, as the scripts count it.
    let (secs, micros): (u64, u64) =
        redis::cmd("TIME").query_async(&mut conn).await.map_err(unavailable)?;
    let now_ms = secs * 1000 + micros / 1000;
    let (mut cursor, mut gone, mut idle) = (0u64, 0, 0);
    loop {
        let (next, ids) = mailboxes_page(backend, cursor).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(keys.mailbox(id)).arg(&["s", "k", "r"]);
        }
        let rows: Vec<Vec<Option<String>>> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(unavailable)?
        };
        let mut pipe = redis::pipe();
        for (id, row) in ids.iter().zip(rows) {
            let field = |i: usize| row.get(i).cloned().flatten();
            match (field(0).as_deref(), field(1).as_deref()) {
                (Some("t"), kind) => {
                    if kind == Some("a") {
                        let (grave, ttl) = backend.stones.grave(keys, id);
                        pipe.cmd("APPEND").arg(&grave).arg(id.uuid().as_bytes().as_slice());
                        if ttl > 0 {
                            pipe.cmd("EXPIRE").arg(&grave).arg(ttl).arg("NX");
                        }
                    }
                    pipe.cmd("DEL").arg(keys.mailbox(id));
                    gone += 1;
                }
                (Some("a"), Some("c")) if field(2).is_none() => {
                    let idle_clients = keys.idle_clients();
                    pipe.cmd("ZADD").arg(idle_clients).arg("NX").arg(now_ms).arg(id.to_string());
                    idle += 1;
                }
                _ => {}
            }
        }
        if pipe.cmd_iter().next().is_some() {
            let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    tracing::info!(gone, idle, "schema-2 gravestones laid anew, client mailboxes marked idle");
    Ok(gone)
}

/// Schema 4 keeps what is queued per behaviour (`P:depth`): counted once
/// from the mailboxes, then kept by the scripts. Replicas of an earlier
/// version that still run during the roll do not keep it, so it may be off
/// by what they queue and acknowledge meanwhile. Answers the messages
/// counted.
async fn count_depth(backend: &RedisBackend) -> Result<u64, ExchangeError> {
    let keys = &backend.keys;
    let mut conn = backend.conn.clone();
    let _: () =
        redis::cmd("DEL").arg(keys.depth()).query_async(&mut conn).await.map_err(unavailable)?;
    let (mut cursor, mut messages) = (0u64, 0);
    loop {
        let (next, ids) = mailboxes_page(backend, cursor).await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(keys.mailbox(id)).arg(&["s", "b", "qb"]);
            pipe.cmd("HLEN").arg(keys.sizes(id));
        }
        let rows: Vec<Value> = if ids.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(unavailable)?
        };
        let mut pipe = redis::pipe();
        for pair in rows.chunks(2) {
            let row = array(pair[0].clone());
            let field = |i: usize| row.get(i).and_then(string);
            let count = match &pair[1] {
                Value::Int(n) => u64::try_from(*n).unwrap_or(0),
                _ => 0,
            };
            if field(0).as_deref() != Some("a") || count == 0 {
                continue;
            }
            let behaviour = field(1).unwrap_or_default();
            let bytes: u64 = field(2).and_then(|b| b.parse().ok()).unwrap_or(0);
            pipe.cmd("HINCRBY").arg(keys.depth()).arg(format!("m:{behaviour}")).arg(count);
            pipe.cmd("HINCRBY").arg(keys.depth()).arg(format!("b:{behaviour}")).arg(bytes);
            messages += count;
        }
        if pipe.cmd_iter().next().is_some() {
            let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    tracing::info!(messages, "queued messages counted per behaviour");
    Ok(messages)
}
