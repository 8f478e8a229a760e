//! The state the runtime keeps for an agent (docs/design.md, "State"):
//! loaded before its startup hook, saved after each action, every
//! [`AgentConfig::state_save_every`](crate::AgentConfig) while it runs, and
//! at shutdown, each time only if it changed; saved as the agent's
//! incarnation, so a stale copy elsewhere cannot overwrite it. Kept in the
//! exchange by default; in files with [`FileStore`], for agents on one node.

use academy_proto::sync::lock;
use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use academy_proto::content_type::JSON;
use academy_proto::{EntityId, ExchangeError, pb};

use crate::behaviour::Durable;
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
                ..Default::default()
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

/// Where a keeper commits: the exchange (state, acknowledgements and
/// answers in one step) or another store (the state alone, before the
/// answers).
#[derive(Debug)]
enum Store {
    Exchange(SharedExchange),
    Other(Arc<dyn StateStore>),
}

/// Most answers in one commit (the exchange takes at most a thousand).
const MAX_COMMIT_ANSWERS: usize = 1_000;
/// Most bytes of answers and state in one commit at first, within what an
/// exchange with the default limits takes in one request (4 MiB); lowered
/// to fit an exchange that refuses a commit as too large.
const MAX_COMMIT_BYTES: usize = 3 * 1024 * 1024;
/// Room left for the rest of a commit request under the exchange's limit.
const COMMIT_FRAMING_BYTES: usize = 64 * 1024;

/// An answer waiting for its commit, with the state as its action left it.
#[derive(Debug)]
struct Pending {
    seq: u64,
    answer: pb::Message,
    snapshot: Result<Vec<u8>, String>,
    done: oneshot::Sender<Outcome>,
}

/// What became of an answer given to [`Keeper::commit`].
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Committed with the state: the request is acknowledged. The answer
    /// is queued, or handed back with why not, to be sent another way.
    Committed(Option<(pb::Message, Option<ClientError>)>),
    /// The state is saved in a store apart from the exchange: answer and
    /// acknowledge the request now.
    Saved(pb::Message),
    /// A later incarnation has the agent: neither answer nor acknowledge.
    Fenced,
    /// The state could not be saved (why); answer with an error.
    Failed(String),
}

impl Outcome {
    /// How a commit ended, in metrics.
    fn label(&self) -> &'static str {
        match self {
            Self::Fenced => "fenced",
            _ => "failed",
        }
    }
}

/// Keeps one agent's state (docs/design.md, "State"): restores it, and
/// commits it with the answers of the actions that changed it.
///
/// State-changing actions take turns ([`turn`](Self::turn)), and the state
/// is exported at the end of each, so each export holds whole actions. A
/// commit carries the export of its last action, the seqs of all its
/// actions and their answers; while one commit is on its way the next
/// actions run, and their answers go together in the next (group commit).
#[derive(Debug)]
pub(crate) struct Keeper {
    store: Store,
    id: EntityId,
    epoch: u64,
    /// Held by a state-changing action while it runs, and to export the
    /// state between actions.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Answers waiting for a commit, in the order their actions ended.
    queue: Mutex<VecDeque<Pending>>,
    queued: Notify,
    /// What was committed (or loaded) last, to send the state only when it
    /// changed.
    last: Mutex<Option<Vec<u8>>>,
    /// A later incarnation saved or subscribed: this one must stop, and
    /// leave the mailbox to it.
    fenced: AtomicBool,
    /// Most bytes of answers and state per commit.
    budget: AtomicUsize,
}

/// Why a commit was not made.
enum Refused {
    /// What its actions are told.
    Outcome(Box<Outcome>),
    /// Too large for the exchange: to be sent again in smaller commits.
    Smaller,
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
        let store = match store {
            Some(store) => Store::Other(store.clone()),
            None => Store::Exchange(exchange.clone()),
        };
        Some(Self {
            store,
            id,
            epoch,
            turn: Arc::default(),
            queue: Mutex::default(),
            queued: Notify::new(),
            last: Mutex::default(),
            fenced: AtomicBool::new(false),
            budget: AtomicUsize::new(MAX_COMMIT_BYTES),
        })
    }

    /// Whether a later incarnation took over.
    pub(crate) fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Waits for this action's turn to change the state.
    pub(crate) async fn turn(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.turn.clone().lock_owned().await
    }

    /// Loads the saved state into `behaviour`, migrating it from an earlier
    /// version; nothing saved leaves the state as the behaviour built it.
    pub(crate) async fn restore<B: Behaviour>(&self, behaviour: &B) -> Result<(), String> {
        let Some(durable) = behaviour.state() else { return Ok(()) };
        let saved = match &self.store {
            Store::Exchange(exchange) => exchange.load_state(&self.id).await,
            Store::Other(store) => store.load(&self.id).await,
        };
        let saved = saved.map_err(|e| format!("cannot load the saved state: {e}"))?;
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
        *lock(&self.last) = if current { Some(durable.export()?) } else { None };
        tracing::info!(agent = %self.id, revision = saved.revision, version = saved.version, "state restored");
        Ok(())
    }

    /// Commits `answer` to the request `seq` with the state as its action
    /// left it (exported and queued while `turn` is held, which is then
    /// given up), and waits for the commit.
    pub(crate) async fn commit<B: Behaviour>(
        &self,
        behaviour: &B,
        turn: tokio::sync::OwnedMutexGuard<()>,
        seq: u64,
        answer: pb::Message,
    ) -> Outcome {
        let snapshot = behaviour.state().map_or_else(|| Ok(Vec::new()), Durable::export);
        if self.fenced() {
            return Outcome::Fenced;
        }
        let (done, outcome) = oneshot::channel();
        // Queued before the next action may run: the queue's order is the
        // order the snapshots were taken in, so a batch's last holds every
        // change its answers made (queued after the turn, a later action
        // could queue first, and the batch then saved an older state with
        // its answer: a change answered but lost).
        lock(&self.queue).push_back(Pending { seq, answer, snapshot, done });
        drop(turn);
        self.queued.notify_one();
        // A committer gone (the agent stopping) commits nothing: the
        // request is delivered again to the next incarnation.
        outcome.await.unwrap_or(Outcome::Fenced)
    }

    /// Commits answers as they come, and the state every `every` when it
    /// changed, until `stop`; then commits what is left and the state a
    /// last time. A fenced-off incarnation cancels `shutdown` and stops.
    /// Errs when the state could not be saved at the end.
    pub(crate) async fn run<B: Behaviour>(
        self: Arc<Self>,
        behaviour: Arc<B>,
        every: Duration,
        shutdown: CancellationToken,
        stop: CancellationToken,
    ) -> Result<(), String> {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            let last_round = tokio::select! {
                () = self.queued.notified() => false,
                _ = tick.tick() => {
                    // Counted in the metrics too; the next save tries again.
                    if let Err(message) = self.save(&*behaviour).await {
                        tracing::warn!(agent = %self.id, %message, "state not saved");
                    }
                    false
                }
                () = stop.cancelled() => true,
            };
            while let Some(batch) = self.take() {
                self.commit_batch::<B>(batch).await;
            }
            if self.fenced() {
                self.refuse_all();
                shutdown.cancel();
                return Ok(());
            }
            if last_round {
                let saved = self.save(&*behaviour).await;
                if self.fenced() {
                    shutdown.cancel();
                }
                return saved;
            }
        }
    }

    /// The next answers to commit together: in order, at most
    /// [`MAX_COMMIT_ANSWERS`], and [`MAX_COMMIT_BYTES`] with the state of
    /// the last (one, whatever its size).
    fn take(&self) -> Option<Vec<Pending>> {
        let budget = self.budget.load(Ordering::Relaxed);
        let mut queue = lock(&self.queue);
        let mut bytes = 0;
        let mut n = 0;
        for pending in queue.iter() {
            bytes += pending.answer.encoded_len();
            let state = pending.snapshot.as_ref().map_or(0, Vec::len);
            if n > 0 && (n == MAX_COMMIT_ANSWERS || bytes + state > budget) {
                break;
            }
            n += 1;
        }
        (n > 0).then(|| queue.drain(..n).collect())
    }

    /// Answers every answer waiting that this incarnation is fenced off.
    fn refuse_all(&self) {
        for pending in lock(&self.queue).drain(..) {
            let _ = pending.done.send(Outcome::Fenced);
        }
    }

    /// Commits `batch` and tells each of its actions what became of it.
    async fn commit_batch<B: Behaviour>(&self, batch: Vec<Pending>) {
        let snapshot = match batch.last().map(|p| p.snapshot.clone()) {
            Some(Ok(snapshot)) => snapshot,
            Some(Err(message)) => return finish(batch, |_| Outcome::Failed(message.clone())),
            None => return,
        };
        let state = (lock(&self.last).as_ref() != Some(&snapshot)).then_some(snapshot);
        let exchange = match &self.store {
            Store::Exchange(exchange) => exchange,
            Store::Other(_) => {
                return match self.put::<B>(state).await {
                    Ok(()) => finish(batch, |p| Outcome::Saved(p.answer)),
                    Err(outcome) => finish(batch, |_| outcome.clone()),
                };
            }
        };
        // Alone, an answer too large to go with the state goes after it.
        let alone = batch.len() == 1
            && batch[0].answer.encoded_len() + state.as_ref().map_or(0, Vec::len)
                > self.budget.load(Ordering::Relaxed);
        let answers: Vec<pb::Message> =
            if alone { Vec::new() } else { batch.iter().map(|p| p.answer.clone()).collect() };
        let seqs: Vec<u64> = batch.iter().map(|p| p.seq).collect();
        match self.send::<B>(exchange, state, seqs, answers).await {
            Err(Refused::Smaller) => {
                let mut queue = lock(&self.queue);
                for pending in batch.into_iter().rev() {
                    queue.push_front(pending);
                }
            }
            Err(Refused::Outcome(outcome)) => finish(batch, |_| (*outcome).clone()),
            Ok(_) if alone => finish(batch, |p| Outcome::Committed(Some((p.answer, None)))),
            Ok(results) => {
                let mut results = results.into_iter();
                finish(batch, |p| {
                    Outcome::Committed(match results.next() {
                        Some(Ok(())) => None,
                        Some(Err(e)) => Some((p.answer, Some(e))),
                        None => Some((p.answer, None)),
                    })
                });
            }
        }
    }

    /// One commit to the exchange, retried (for about half a minute) while
    /// it is unreachable; one result per answer, or why not.
    async fn send<B: Behaviour>(
        &self,
        exchange: &SharedExchange,
        state: Option<Vec<u8>>,
        seqs: Vec<u64>,
        answers: Vec<pb::Message>,
    ) -> Result<Vec<Result<(), ClientError>>, Refused> {
        let size = state.as_ref().map_or(0, Vec::len);
        let started = crate::metrics::enabled().then(std::time::Instant::now);
        let mut patience = crate::runtime::Patience::new();
        loop {
            let save = self.request(state.clone(), B::STATE_VERSION);
            match exchange.commit(save, seqs.clone(), answers.clone()).await {
                Ok((_, results)) => {
                    crate::metrics::observe_save(B::NAME, "saved", size, started);
                    if let Some(state) = state {
                        *lock(&self.last) = Some(state);
                    }
                    return Ok(results);
                }
                Err(ClientError::Exchange(ExchangeError::TooLarge { limit, .. }))
                    if !answers.is_empty() && self.fit(limit) =>
                {
                    return Err(Refused::Smaller);
                }
                Err(e) => {
                    if let Some(outcome) = self.retry(e, &mut patience).await {
                        crate::metrics::observe_save(B::NAME, outcome.label(), size, started);
                        return Err(Refused::Outcome(Box::new(outcome)));
                    }
                }
            }
        }
    }

    /// Lowers the bytes per commit to fit an exchange that takes requests
    /// of at most `limit` bytes; false when they fit already.
    fn fit(&self, limit: usize) -> bool {
        let fits = limit.saturating_sub(COMMIT_FRAMING_BYTES).max(COMMIT_FRAMING_BYTES);
        self.budget.fetch_min(fits, Ordering::Relaxed) > fits
    }

    /// Saves the state in a store apart from the exchange, retried as
    /// [`send`](Self::send) is.
    async fn put<B: Behaviour>(&self, state: Option<Vec<u8>>) -> Result<(), Outcome> {
        let (Store::Other(store), Some(state)) = (&self.store, state) else { return Ok(()) };
        let size = state.len();
        let started = crate::metrics::enabled().then(std::time::Instant::now);
        let mut patience = crate::runtime::Patience::new();
        loop {
            let data = pb::Payload {
                content_type: JSON.into(),
                data: state.clone().into(),
                ..Default::default()
            };
            match store.save(&self.id, self.epoch, data, B::STATE_VERSION).await {
                Ok(_) => {
                    crate::metrics::observe_save(B::NAME, "saved", size, started);
                    *lock(&self.last) = Some(state);
                    return Ok(());
                }
                Err(e) => {
                    if let Some(outcome) = self.retry(e, &mut patience).await {
                        crate::metrics::observe_save(B::NAME, outcome.label(), size, started);
                        return Err(outcome);
                    }
                }
            }
        }
    }

    /// Saves the state as it is between actions, if it changed (loops
    /// change it too). Errs when it could not.
    async fn save<B: Behaviour>(&self, behaviour: &B) -> Result<(), String> {
        let Some(durable) = behaviour.state() else { return Ok(()) };
        if self.fenced() {
            return Ok(());
        }
        let snapshot = {
            let _turn = self.turn.lock().await;
            // Answers waiting to be committed: their commit saves the state
            // with their acknowledgements. Saved alone, it would hold changes
            // whose requests are delivered again should the agent die first.
            if !lock(&self.queue).is_empty() {
                return Ok(());
            }
            durable.export()?
        };
        if lock(&self.last).as_ref() == Some(&snapshot) {
            return Ok(());
        }
        let saved = match &self.store {
            Store::Other(_) => self.put::<B>(Some(snapshot)).await,
            Store::Exchange(exchange) => {
                let sent = self.send::<B>(exchange, Some(snapshot), Vec::new(), Vec::new()).await;
                sent.map(drop).map_err(|refused| match refused {
                    Refused::Outcome(outcome) => *outcome,
                    Refused::Smaller => Outcome::Failed("the state is too large".into()),
                })
            }
        };
        match saved {
            Err(Outcome::Failed(message)) => Err(message),
            _ => Ok(()),
        }
    }

    /// The save part of a commit: `state` at `version` (none keeps the
    /// saved one), as this incarnation.
    fn request(&self, state: Option<Vec<u8>>, version: u32) -> pb::SaveStateRequest {
        pb::SaveStateRequest {
            agent_id: self.id.to_string(),
            epoch: self.epoch,
            expected_revision: 0,
            data: state.map(|s| pb::Payload {
                content_type: JSON.into(),
                data: s.into(),
                ..Default::default()
            }),
            version,
        }
    }

    /// What to do after `error`: `None` to try again (after a wait), when
    /// the store is unreachable and there is patience left; otherwise the
    /// outcome (fenced off when a later incarnation has the agent or its
    /// mailbox is gone).
    async fn retry(
        &self,
        error: ClientError,
        patience: &mut crate::runtime::Patience,
    ) -> Option<Outcome> {
        match error {
            ClientError::Exchange(
                ExchangeError::StaleEpoch { .. }
                | ExchangeError::Terminated(_)
                | ExchangeError::NotFound(_),
            ) => {
                tracing::warn!(agent = %self.id, epoch = self.epoch, "state not saved: a later incarnation has the agent, or its mailbox is gone");
                self.fenced.store(true, Ordering::SeqCst);
                Some(Outcome::Fenced)
            }
            e @ (ClientError::Transport(_)
            | ClientError::Exchange(
                ExchangeError::Unavailable(_) | ExchangeError::ShuttingDown,
            )) if patience.left() => {
                let backoff = patience.delay();
                tracing::debug!(agent = %self.id, error = %e, ?backoff, "state not saved yet; retrying");
                patience.wait().await;
                None
            }
            e => Some(Outcome::Failed(format!("cannot save the state: {e}"))),
        }
    }
}

/// Tells each action of `batch` its outcome.
fn finish(batch: Vec<Pending>, mut outcome: impl FnMut(Answered) -> Outcome) {
    for Pending { answer, done, .. } in batch {
        let _ = done.send(outcome(Answered { answer }));
    }
}

/// The answer of an action whose outcome is being told.
struct Answered {
    answer: pb::Message,
}
