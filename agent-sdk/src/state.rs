//! The state the runtime keeps for an agent (docs/design.md, "State"):
//! loaded before its startup hook, saved after each action, every
//! [`AgentConfig::state_save_every`](crate::AgentConfig) while it runs, and
//! at shutdown, each time only if it changed; saved as the agent's
//! incarnation, so a stale copy elsewhere cannot overwrite it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use academy_proto::content_type::JSON;
use academy_proto::{EntityId, ExchangeError, pb};

use crate::exchange::SharedExchange;
use crate::{Behaviour, ClientError};

/// Saves and restores one agent's state.
#[derive(Debug)]
pub(crate) struct Keeper {
    exchange: SharedExchange,
    id: EntityId,
    epoch: u64,
    /// What was saved (or loaded) last, to save only changes; held while
    /// saving, so saves go one at a time, each of the latest state.
    last: tokio::sync::Mutex<Option<Vec<u8>>>,
    /// A later incarnation saved or subscribed: this one must stop, and
    /// leave the mailbox to it.
    fenced: AtomicBool,
}

impl Keeper {
    /// A keeper for `behaviour`, if it declares a state.
    pub(crate) fn of<B: Behaviour>(
        behaviour: &B,
        exchange: &SharedExchange,
        id: EntityId,
        epoch: u64,
    ) -> Option<Self> {
        behaviour.state()?;
        Some(Self {
            exchange: exchange.clone(),
            id,
            epoch,
            last: tokio::sync::Mutex::new(None),
            fenced: AtomicBool::new(false),
        })
    }

    /// Whether a later incarnation took over.
    pub(crate) fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Loads the saved state into `behaviour`, migrating it from an earlier
    /// version; nothing saved leaves the state as the behaviour built it.
    pub(crate) async fn restore<B: Behaviour>(&self, behaviour: &B) -> Result<(), String> {
        let Some(durable) = behaviour.state() else { return Ok(()) };
        let saved = self
            .exchange
            .load_state(&self.id)
            .await
            .map_err(|e| format!("cannot load the saved state: {e}"))?;
        let mut last = self.last.lock().await;
        let Some(saved) = saved else {
            return Ok(());
        };
        let data = saved.data.unwrap_or_default();
        if data.content_type != JSON {
            return Err(format!("the saved state is {}, not JSON", data.content_type));
        }
        let value: serde_json::Value = serde_json::from_slice(&data.data)
            .map_err(|e| format!("the saved state is not JSON: {e}"))?;
        let current = saved.version == B::STATE_VERSION;
        let value = if current { value } else { B::migrate_state(saved.version, value)? };
        durable.import(value)?;
        // A migrated state is saved at the new version at the first chance.
        *last = if current { Some(durable.export()?) } else { None };
        tracing::info!(agent = %self.id, revision = saved.revision, version = saved.version, "state restored");
        Ok(())
    }

    /// Saves `behaviour`'s state if it changed since the last save,
    /// retrying (about half a minute) while the exchange is unreachable.
    /// False when this incarnation is fenced off (it must stop).
    pub(crate) async fn save<B: Behaviour>(&self, behaviour: &B) -> Result<bool, String> {
        let Some(durable) = behaviour.state() else { return Ok(true) };
        if self.fenced() {
            return Ok(false);
        }
        let mut last = self.last.lock().await;
        let now = durable.export()?;
        if last.as_ref() == Some(&now) {
            return Ok(true);
        }
        let mut backoff = Duration::from_millis(10);
        let started = crate::metrics::enabled().then(std::time::Instant::now);
        let observe = |outcome| crate::metrics::observe_save(B::NAME, outcome, now.len(), started);
        loop {
            let data = pb::Payload { content_type: JSON.into(), data: now.clone().into() };
            match self.exchange.save_state(&self.id, self.epoch, data, B::STATE_VERSION).await {
                Ok(_) => {
                    observe("saved");
                    *last = Some(now);
                    return Ok(true);
                }
                Err(ClientError::Exchange(
                    ExchangeError::StaleEpoch { .. }
                    | ExchangeError::Terminated(_)
                    | ExchangeError::NotFound(_),
                )) => {
                    tracing::warn!(agent = %self.id, epoch = self.epoch, "state not saved: a later incarnation has the agent, or its mailbox is gone");
                    self.fenced.store(true, Ordering::SeqCst);
                    observe("fenced");
                    return Ok(false);
                }
                Err(
                    e @ (ClientError::Transport(_)
                    | ClientError::Exchange(
                        ExchangeError::Unavailable(_) | ExchangeError::ShuttingDown,
                    )),
                ) if backoff < Duration::from_secs(16) => {
                    tracing::debug!(agent = %self.id, error = %e, ?backoff, "state not saved yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    observe("failed");
                    return Err(format!("cannot save the state: {e}"));
                }
            }
        }
    }
}
