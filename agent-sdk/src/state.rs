//! The state the runtime keeps for an agent (docs/design.md, "State"):
//! loaded before its startup hook, saved after each action, every
//! [`AgentConfig::state_save_every`](crate::AgentConfig) while it runs, and
//! at shutdown, each time only if it changed; saved as the agent's
//! incarnation, so a stale copy elsewhere cannot overwrite it. Kept in the
//! exchange by default; in files with [`FileStore`], for agents on one node.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use academy_proto::content_type::JSON;
use academy_proto::{EntityId, ExchangeError, pb};

use crate::exchange::SharedExchange;
use crate::{Behaviour, ClientError};

/// Where agents' state is kept: [`AgentConfig::state_store`](crate::AgentConfig)
/// (the exchange when not set).
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + fmt::Debug + 'static {
    /// Saves agent `id`'s state as its incarnation `epoch`: refused with
    /// [`ExchangeError::StaleEpoch`] when a later incarnation saved.
    /// Answers the revision saved.
    async fn save(
        &self,
        id: &EntityId,
        epoch: u64,
        data: pb::Payload,
        version: u32,
    ) -> Result<u64, ClientError>;
    /// Agent `id`'s saved state, if any.
    async fn load(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError>;
}

/// The exchange as a state store (the default): shared by every process on
/// it, owned like the agent's mailbox, deleted with it.
#[derive(Debug)]
struct InExchange(SharedExchange);

#[async_trait::async_trait]
impl StateStore for InExchange {
    async fn save(
        &self,
        id: &EntityId,
        epoch: u64,
        data: pb::Payload,
        version: u32,
    ) -> Result<u64, ClientError> {
        self.0.save_state(id, epoch, data, version).await
    }

    async fn load(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError> {
        self.0.load_state(id).await
    }
}

/// Keeps each agent's state in a file of a folder (`<id>.json`), for
/// agents on one node whose exchange keeps none for them (an in-process
/// one, say). Each save writes a new file and renames it over the old, so a
/// crash leaves the old state or the new, never half of one; saves are
/// fenced by the incarnation as in the exchange. One process per folder:
/// processes do not lock each other out. Files are not deleted when a
/// mailbox is terminated.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    /// One save or load at a time in this process.
    lock: tokio::sync::Mutex<()>,
}

impl FileStore {
    /// A store in folder `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir, lock: tokio::sync::Mutex::new(()) })
    }

    fn path(&self, id: &EntityId) -> PathBuf {
        // An id is `agent:<uuid>`: no separator, no dots.
        self.dir.join(format!("{}.json", id.to_string().replace(':', "-")))
    }

    fn read(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError> {
        let path = self.path(id);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error(&path, &e)),
        };
        let file: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| file_error(&path, &e))?;
        let number = |key: &str| file[key].as_u64().unwrap_or(0);
        let millis = number("saved_at_ms");
        Ok(Some(pb::SavedState {
            data: Some(pb::Payload {
                content_type: JSON.into(),
                data: serde_json::to_vec(&file["state"]).unwrap_or_default().into(),
            }),
            version: u32::try_from(number("version")).unwrap_or(u32::MAX),
            revision: number("revision"),
            epoch: number("epoch"),
            saved_at: Some((std::time::UNIX_EPOCH + Duration::from_millis(millis)).into()),
        }))
    }
}

fn file_error(path: &std::path::Path, e: &dyn fmt::Display) -> ClientError {
    ClientError::Transport(format!("state file {}: {e}", path.display()))
}

#[async_trait::async_trait]
impl StateStore for FileStore {
    async fn save(
        &self,
        id: &EntityId,
        epoch: u64,
        data: pb::Payload,
        version: u32,
    ) -> Result<u64, ClientError> {
        let _one = self.lock.lock().await;
        let (revision, current) = match self.read(id)? {
            Some(saved) => (saved.revision, saved.epoch),
            None => (0, 0),
        };
        if epoch < current {
            return Err(ExchangeError::StaleEpoch { id: *id, epoch, current }.into());
        }
        let state: serde_json::Value = serde_json::from_slice(&data.data)
            .map_err(|e| ClientError::Transport(format!("the state is not JSON: {e}")))?;
        let saved_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let file = serde_json::json!({
            "revision": revision + 1,
            "version": version,
            "epoch": epoch,
            "saved_at_ms": saved_at_ms,
            "state": state,
        });
        let path = self.path(id);
        let fresh = path.with_extension("json.new");
        let text = serde_json::to_vec_pretty(&file).map_err(|e| file_error(&path, &e))?;
        std::fs::write(&fresh, text)
            .and_then(|()| std::fs::rename(&fresh, &path))
            .map_err(|e| file_error(&path, &e))?;
        Ok(revision + 1)
    }

    async fn load(&self, id: &EntityId) -> Result<Option<pb::SavedState>, ClientError> {
        let _one = self.lock.lock().await;
        self.read(id)
    }
}

/// Saves and restores one agent's state.
#[derive(Debug)]
pub(crate) struct Keeper {
    store: Arc<dyn StateStore>,
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
    /// A keeper for `behaviour`, if it declares a state, saving in `store`
    /// (in the exchange when `None`).
    pub(crate) fn of<B: Behaviour>(
        behaviour: &B,
        store: Option<&Arc<dyn StateStore>>,
        exchange: &SharedExchange,
        id: EntityId,
        epoch: u64,
    ) -> Option<Self> {
        behaviour.state()?;
        let store = store.cloned().unwrap_or_else(|| Arc::new(InExchange(exchange.clone())));
        Some(Self {
            store,
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
            .store
            .load(&self.id)
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
        let mut patience = crate::runtime::Patience::new();
        let started = crate::metrics::enabled().then(std::time::Instant::now);
        let observe = |outcome| crate::metrics::observe_save(B::NAME, outcome, now.len(), started);
        loop {
            let data = pb::Payload { content_type: JSON.into(), data: now.clone().into() };
            match self.store.save(&self.id, self.epoch, data, B::STATE_VERSION).await {
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
                ) if patience.left() => {
                    let backoff = patience.delay();
                    tracing::debug!(agent = %self.id, error = %e, ?backoff, "state not saved yet; retrying");
                    patience.wait().await;
                }
                Err(e) => {
                    observe("failed");
                    return Err(format!("cannot save the state: {e}"));
                }
            }
        }
    }
}
