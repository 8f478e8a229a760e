//! Retention on Redis (docs/design.md, "Retention"): gravestones in strings
//! of 16-byte ids that Redis expires by itself, one per slice of time and
//! shard of ids; abandoned client mailboxes removed by a sweep of `P:idle`.
//!
//! A slice is 1/16 of the retention wide; its strings live for the retention
//! plus two slices from their first gravestone, so each gravestone is kept
//! between the retention and 1/8 more. A lookup reads the strings of the
//! id's shard in the slices that may still be alive (one slice ahead too,
//! for replicas whose clocks differ by less than a slice). Every replica
//! must use the same retention: it is part of the keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use academy_proto::{EntityId, ExchangeError};
use redis::Value;

use super::RedisBackend;
use super::keys::Keys;
use super::reply::{integer, string, unavailable};
use super::scripts::{run, run_one};
use crate::retention::{Retention, SLICES, Swept};

/// Shards of ids per slice: at 10⁶ gravestones, a lookup reads about 16 KB.
const SHARDS: u16 = 1024;
/// Idle clients looked at per round of a sweep, and most rounds per sweep.
const SWEEP_BATCH: usize = 100;
const SWEEP_ROUNDS: usize = 100;

/// Where gravestones go and are looked for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stones {
    /// Retention and slice width in seconds; `None` when kept forever.
    slices: Option<(u64, u64)>,
}

impl Stones {
    pub(super) fn new(retention: &Retention) -> Self {
        let slices = retention.gravestones.map(|ttl| {
            let ttl = ttl.as_secs().max(1);
            (ttl, ttl.div_ceil(u64::from(SLICES)))
        });
        Self { slices }
    }

    fn shard(id: &EntityId) -> u16 {
        let bytes = id.uuid().into_bytes();
        u16::from_be_bytes([bytes[14], bytes[15]]) % SHARDS
    }

    fn slice_now(width: u64) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        now.as_secs() / width
    }

    /// The string a gravestone for `id` is appended to now, and the TTL in
    /// seconds to give it when the append creates it (0: none).
    pub(super) fn grave(&self, keys: &Keys, id: &EntityId) -> (String, u64) {
        let shard = Self::shard(id);
        match self.slices {
            None => (keys.gravestones("all", shard), 0),
            Some((ttl, width)) => {
                let slice = format!("{width}:{}", Self::slice_now(width));
                (keys.gravestones(&slice, shard), ttl + 2 * width)
            }
        }
    }

    /// The strings a gravestone for `id` may be in.
    pub(super) fn lookup(&self, keys: &Keys, id: &EntityId) -> Vec<String> {
        let shard = Self::shard(id);
        let Some((_, width)) = self.slices else {
            return vec![keys.gravestones("all", shard)];
        };
        let now = Self::slice_now(width);
        let back = u64::from(SLICES) + 2;
        (now.saturating_sub(back)..=now + 1)
            .map(|slice| keys.gravestones(&format!("{width}:{slice}"), shard))
            .collect()
    }
}

impl RedisBackend {
    /// Whether agent `id` has a gravestone.
    pub(super) async fn buried(&self, id: &EntityId) -> Result<bool, ExchangeError> {
        if !id.is_agent() {
            return Ok(false);
        }
        let mut call = self.scripts.buried.call(&self.stones.lookup(&self.keys, id));
        call.arg(id.uuid().as_bytes().as_slice());
        Ok(integer(&run_one(&self.conn, &self.scripts.buried, call).await?) == Some(1))
    }

    /// `result`, with a mailbox not found told apart: terminated, when its
    /// gravestone is there.
    pub(super) async fn settle<T>(
        &self,
        result: Result<T, ExchangeError>,
    ) -> Result<T, ExchangeError> {
        match result {
            Err(ExchangeError::NotFound(id)) if self.buried(&id).await? => {
                Err(ExchangeError::Terminated(id))
            }
            other => other,
        }
    }

    /// [`settle`](Self::settle) for each of `results`, looking up each
    /// agent mailbox not found once.
    pub(super) async fn settle_all(
        &self,
        mut results: Vec<Result<(), ExchangeError>>,
    ) -> Vec<Result<(), ExchangeError>> {
        let mut known: Vec<(EntityId, bool)> = Vec::new();
        for result in &mut results {
            let Err(ExchangeError::NotFound(id)) = result else { continue };
            let id = *id;
            let buried = match known.iter().find(|(k, _)| *k == id) {
                Some((_, buried)) => *buried,
                None => match self.buried(&id).await {
                    Ok(buried) => {
                        known.push((id, buried));
                        buried
                    }
                    Err(e) => {
                        *result = Err(e);
                        continue;
                    }
                },
            };
            if buried {
                *result = Err(ExchangeError::Terminated(id));
            }
        }
        results
    }

    /// Removes client mailboxes without a subscriber for longer than
    /// `retention` keeps them, a batch at a time, a bounded number of
    /// batches per call. Gravestones expire by themselves.
    pub(super) async fn sweep_idle(&self, retention: &Retention) -> Result<Swept, ExchangeError> {
        let Some(ttl) = retention.abandoned_clients else { return Ok(Swept::default()) };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.conn.clone();
        let idle = self.keys.idle_clients();
        let mut swept = Swept::default();
        for _ in 0..SWEEP_ROUNDS {
            let (secs, micros): (u64, u64) =
                redis::cmd("TIME").query_async(&mut conn).await.map_err(unavailable)?;
            let cutoff = (secs * 1000 + micros / 1000).saturating_sub(ttl_ms);
            let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
                .arg(&idle)
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let ids: Vec<EntityId> = ids.iter().filter_map(|id| id.parse().ok()).collect();
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HGET").arg(self.keys.mailbox(id)).arg("r");
            }
            let replicas: Vec<Option<String>> =
                pipe.query_async(&mut conn).await.map_err(unavailable)?;
            let calls = ids.iter().zip(&replicas).map(|(id, replica)| {
                let mut keys = self.keys.releasing(id);
                keys.push(idle.clone());
                let replica = replica.as_deref().unwrap_or_default();
                keys.push(self.keys.replica(replica));
                let mut call = self.scripts.abandon.call(&keys);
                call.arg(id.to_string()).arg(ttl_ms).arg(replica);
                call
            });
            let answers = run(&self.conn, &self.scripts.abandon, calls.collect()).await?;
            let expired = |a: &Value| string(a).as_deref() == Some("expired");
            swept.abandoned_clients += answers.iter().filter(|a| expired(a)).count();
            if ids.len() < SWEEP_BATCH {
                break;
            }
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gravestone_is_looked_for_where_it_was_laid() {
        let keys = Keys::new("p");
        let id = EntityId::new_agent();
        for retention in [Some(Duration::from_secs(86_400)), Some(Duration::from_secs(1)), None] {
            let stones = Stones::new(&Retention { gravestones: retention, ..Retention::default() });
            let (grave, ttl) = stones.grave(&keys, &id);
            assert!(stones.lookup(&keys, &id).contains(&grave), "{grave}");
            assert_eq!(ttl == 0, retention.is_none());
        }
        let day = Stones::new(&Retention::default());
        // A day in slices of 5,400 s, kept 2 slices more; 20 strings read.
        assert_eq!(day.grave(&keys, &id).1, 86_400 + 2 * 5_400);
        assert_eq!(day.lookup(&keys, &id).len(), 20);
        let (other, _) = day.grave(&keys, &EntityId::new_agent());
        assert!(other.starts_with("p:gs:5400:"));
    }
}
