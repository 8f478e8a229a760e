//! Delivers the notices of this replica's channel to its subscriptions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use academy_proto::{EntityId, ExchangeError};
use bytes::Bytes;
use futures::StreamExt as _;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::keys::Keys;
use super::reply::{array, integer, string};
use super::stream::{range_after, range_entries, seq_of};

/// Most entries read from one stream at a time.
const READ_COUNT: usize = 512;
/// Subscriptions looked at again per round trip after notices were lost.
const RECHECK_BATCH: usize = 256;

/// What the reader hands a subscription.
#[derive(Debug)]
pub(super) enum Event {
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
pub(super) struct Reader {
    subscriptions: Mutex<HashMap<EntityId, Watched>>,
    /// This replica's name in the mailbox hashes (`r`).
    pub(super) replica: String,
    conn: ConnectionManager,
    /// Subscriptions whose stream must be read (new ones).
    reads: mpsc::UnboundedSender<EntityId>,
}

impl Reader {
    /// Listens on this replica's channel before returning, so no notice sent
    /// to a subscription made afterwards can be missed.
    pub(super) async fn start(
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

    /// Watches a mailbox for a new subscription of `generation`, replacing
    /// this replica's previous one (whose channel then closes), and reads what
    /// is queued. Concurrent subscribes may get here out of order: one older
    /// than the watched one is taken over at once, so the newest stays.
    pub(super) fn add(
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
        let mut watching = self.lock();
        if let Some(newer) = watching.get(&id).filter(|w| w.generation > generation) {
            tracing::debug!(mailbox = %id, generation, newer = newer.generation, "a newer subscription came first");
            let _ = watched.events.send(Event::TakenOver);
            return (token, receiver);
        }
        watching.insert(id, watched);
        drop(watching);
        let _ = self.reads.send(id);
        (token, receiver)
    }

    /// Stops watching for subscription `token`; whether it was still watched.
    pub(super) fn remove(&self, id: &EntityId, token: u64) -> bool {
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

    /// Hands over message `added` of mailbox `id`, which follows `previous`
    /// (its enqueue answered here instead of noticing); the mailbox whose
    /// stream must be read, if any.
    pub(super) fn local(
        &self,
        id: EntityId,
        previous: u64,
        added: u64,
        data: Bytes,
    ) -> Option<EntityId> {
        self.take(Notice::Added { id, previous, added, data: Some(data) })
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
    pub(super) async fn read(&self, id: EntityId) {
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

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
mod ordering {
    use super::*;

    /// Concurrent subscribes may reach the reader out of order, and the
    /// notices of the later ones after that: the newest subscription must
    /// stay watched whatever the order (before, an older one arriving late
    /// replaced it, and the later notices then ended the older one too, so
    /// no subscription was left while Redis named this replica).
    #[tokio::test]
    async fn the_newest_subscription_stays_whatever_the_order() {
        let redis = academy_server::testing::RedisServer::start().expect("redis-server runs");
        let (client, conn) =
            academy_server::redis::connect(&redis.url(), Duration::from_secs(2)).await.unwrap();
        let keys = Keys::new("t");
        let reader =
            Reader::start(client, conn, keys.bell(), CancellationToken::new()).await.unwrap();
        let id = EntityId::new_agent();
        let (_, mut newest) = reader.add(id, &keys, 16);
        let (_, mut late) = reader.add(id, &keys, 10);
        let ended = tokio::time::timeout(Duration::from_secs(5), late.recv()).await;
        assert!(matches!(ended, Ok(Some(Event::TakenOver))), "the late older one ends");
        // The notices of subscriptions 11 to 16 arrive afterwards.
        for generation in 11..=16 {
            assert_eq!(reader.take(Notice::TakenOver { id, generation }), None);
        }
        assert!(newest.try_recv().is_err(), "the newest is still watched: {:?}", newest.try_recv());
        assert_eq!(reader.lock().get(&id).map(|w| w.generation), Some(16));
        // A later subscription (on another replica) still takes over.
        reader.take(Notice::TakenOver { id, generation: 17 });
        let ended = tokio::time::timeout(Duration::from_secs(5), newest.recv()).await;
        assert!(matches!(ended, Ok(Some(Event::TakenOver))));
    }
}
