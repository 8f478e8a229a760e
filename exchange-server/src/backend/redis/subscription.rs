//! A subscriber's view of a mailbox: what the reader hands it, batched.

use std::collections::VecDeque;

use academy_proto::{EntityId, ExchangeError, pb};
use async_trait::async_trait;
use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;

use super::RedisBackend;
use super::reader::Event;
use crate::backend::{BackendSubscription, framed, joins};

#[derive(Debug)]
pub(super) struct RedisSubscription {
    pub(super) id: EntityId,
    pub(super) generation: u64,
    pub(super) events: (u64, mpsc::UnboundedReceiver<Event>),
    pub(super) ready: VecDeque<(u64, Bytes)>,
    /// How the subscription ended, reported once what came before is delivered.
    pub(super) end: Option<ExchangeError>,
    pub(super) backend: RedisBackend,
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
                let mut bytes = 0;
                while let Some((_, next)) = self.ready.front() {
                    if batch.len() >= max || !joins(batch.len(), bytes, next.len(), max_bytes) {
                        break;
                    }
                    let (seq, data) = self.ready.pop_front().expect("looked at above");
                    bytes += framed(data.len());
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
