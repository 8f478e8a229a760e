//! The launcher's state: agents, workers, and the rules that move agents
//! between states (docs/design.md, "The launcher"). No I/O here: the service feeds
//! it events and sends what it asks to the workers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant, SystemTime};

use academy_proto::pb::{self, AgentState, join_response::Body};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::store::Write;

/// Messages to one worker's stream.
pub(crate) type WorkerTx = mpsc::UnboundedSender<pb::JoinResponse>;

#[derive(Debug)]
struct Worker {
    record: pb::WorkerRecord,
    /// The behaviours it offers, by name.
    offers: HashMap<String, pb::BehaviourSpec>,
    /// Agents placed on it.
    agents: BTreeSet<String>,
    tx: WorkerTx,
}

impl Worker {
    fn free(&self) -> usize {
        (self.record.capacity as usize).saturating_sub(self.agents.len())
    }

    fn record(&self) -> pb::WorkerRecord {
        let agent_count = u32::try_from(self.agents.len()).unwrap_or(u32::MAX);
        pb::WorkerRecord { agent_count, ..self.record.clone() }
    }

    fn can_run(&self, agent: &pb::AgentRecord) -> bool {
        !self.record.draining
            && self.offers.contains_key(&agent.behaviour)
            && agent.selector.iter().all(|(k, v)| self.record.labels.get(k) == Some(v))
    }

    fn send(&self, body: Body) {
        // A closed stream means the worker is going away; its removal follows.
        let _ = self.tx.send(pb::JoinResponse { body: Some(body) });
    }
}

/// Agents and workers, and what happens between them.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// By agent id; ordered by id, i.e. by launch time (UUID v7).
    agents: BTreeMap<String, pb::AgentRecord>,
    workers: BTreeMap<String, Worker>,
    /// Agents being stopped so they can run elsewhere (drain), not for good.
    moving: HashSet<String>,
    /// Agents waiting to be placed (PENDING), so placing costs what is
    /// pending, not what the launcher ever knew.
    pending: BTreeSet<String>,
    /// Restored agents that were running when the launcher went away: not
    /// placed anew until the rejoin grace is over, so that their workers,
    /// which keep them running meanwhile, can bring them back.
    held: HashSet<String>,
    /// Agents that stopped or failed for good, oldest first: forgotten once
    /// the retention period is over.
    finished: VecDeque<(Instant, String)>,
    /// Agents that failed for good whose mailboxes are yet to be terminated
    /// (no incarnation will ever take them).
    given_up: Vec<String>,
    changes: broadcast::Sender<pb::AgentRecord>,
    /// Where records are persisted, if anywhere.
    store: Option<mpsc::UnboundedSender<Write>>,
    /// Since start: agents placed on a worker, and placed again, by why.
    pub(crate) counts: Counts,
}

/// What the launcher did since it started, for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counts {
    /// Agents placed on a worker (each start of an agent).
    pub(crate) placements: u64,
    /// Agents to place again because their worker was lost.
    pub(crate) worker_lost: u64,
    /// Agents moved off a draining (or leaving) worker.
    pub(crate) drained: u64,
    /// Agents restarted after they failed.
    pub(crate) restarted: u64,
}

impl Cluster {
    pub(crate) fn new() -> Self {
        Self {
            agents: BTreeMap::new(),
            workers: BTreeMap::new(),
            moving: HashSet::new(),
            pending: BTreeSet::new(),
            held: HashSet::new(),
            finished: VecDeque::new(),
            given_up: Vec::new(),
            changes: broadcast::channel(4096).0,
            store: None,
            counts: Counts::default(),
        }
    }

    /// The agents that failed for good since the last call: their mailboxes
    /// are to be terminated.
    pub(crate) fn take_given_up(&mut self) -> Vec<String> {
        std::mem::take(&mut self.given_up)
    }

    /// Persists every change through `store`, starting from `records`.
    pub(crate) fn restore(
        &mut self,
        records: Vec<pb::AgentRecord>,
        store: mpsc::UnboundedSender<Write>,
    ) {
        let now = (Instant::now(), SystemTime::now());
        let mut finished: Vec<(Instant, String)> = Vec::new();
        for record in records {
            if is_final(record.state()) {
                // Its age, from when it finished (now, for records of
                // versions that did not say).
                let at = record.finished_at.and_then(|t| SystemTime::try_from(t).ok());
                let age = at.and_then(|at| now.1.duration_since(at).ok()).unwrap_or_default();
                let since = now.0.checked_sub(age).unwrap_or(now.0);
                finished.push((since, record.agent_id.clone()));
            }
            if record.state() == AgentState::Failed {
                // Its mailbox may not have been terminated before the
                // launcher went away; terminating is idempotent.
                self.given_up.push(record.agent_id.clone());
            }
            if record.state() == AgentState::Pending {
                self.pending.insert(record.agent_id.clone());
                if record.epoch > 0 {
                    // Placed before: its worker may still run it.
                    self.held.insert(record.agent_id.clone());
                }
            }
            self.agents.insert(record.agent_id.clone(), record);
        }
        finished.sort();
        self.finished = finished.into();
        self.store = Some(store);
    }

    /// Forgets the agents that finished (stopped or failed) more than
    /// `retention` ago; answers how many.
    pub(crate) fn forget_finished(&mut self, retention: Duration) -> usize {
        let mut forgotten = 0;
        while let Some((since, _)) = self.finished.front() {
            if since.elapsed() < retention {
                break;
            }
            let (_, id) = self.finished.pop_front().expect("looked at above");
            if self.agents.get(&id).is_some_and(|a| is_final(a.state())) {
                self.agents.remove(&id);
                if let Some(store) = &self.store {
                    let _ = store.send(Write::Forget(id));
                }
                forgotten += 1;
            }
        }
        // A burst of history leaves no table at its peak size behind.
        if self.finished.capacity() > 4 * self.finished.len().max(1024) {
            self.finished.shrink_to_fit();
        }
        forgotten
    }

    /// The rejoin grace is over: restored agents no worker brought back are
    /// placed anew.
    pub(crate) fn release_held(&mut self) {
        if !self.held.is_empty() {
            tracing::info!(agents = self.held.len(), "placing the agents no worker brought back");
            self.held.clear();
            self.schedule();
        }
    }

    /// A promise that every change so far is persisted (at once without a store).
    pub(crate) fn flushed(&self) -> Option<oneshot::Receiver<()>> {
        let (done, flushed) = oneshot::channel();
        self.store.as_ref()?.send(Write::Flush(done)).ok()?;
        Some(flushed)
    }

    pub(crate) fn watch(&self) -> (Vec<pb::AgentRecord>, broadcast::Receiver<pb::AgentRecord>) {
        (self.agents(), self.changes.subscribe())
    }

    pub(crate) fn agent(&self, id: &str) -> Option<&pb::AgentRecord> {
        self.agents.get(id)
    }

    pub(crate) fn agents(&self) -> Vec<pb::AgentRecord> {
        self.agents.values().cloned().collect()
    }

    /// At most `limit` agents matching `filter` after id `after`, in id
    /// order, and the id to go on after when more may match. A filter on
    /// the worker or on PENDING reads that index; other filters look at a
    /// bounded number of records, so a page may be short.
    pub(crate) fn list(
        &self,
        filter: &pb::AgentFilter,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<pb::AgentRecord>, Option<String>) {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let range = (from, Bound::Unbounded);
        let state = filter.state();
        let mut ids: Box<dyn Iterator<Item = &String>> = if !filter.worker_id.is_empty() {
            match self.workers.get(&filter.worker_id) {
                Some(worker) => Box::new(worker.agents.range::<str, _>(range)),
                None => Box::new(std::iter::empty()),
            }
        } else if state == AgentState::Pending {
            Box::new(self.pending.range::<str, _>(range))
        } else {
            Box::new(self.agents.range::<str, _>(range).map(|(id, _)| id))
        };
        let scans = !filter.behaviour.is_empty()
            || !filter.owner.is_empty()
            || !matches!(state, AgentState::Unspecified | AgentState::Pending);
        let budget = if scans { limit.saturating_mul(8).clamp(1_000, 20_000) } else { usize::MAX };
        let mut found = Vec::new();
        let mut scanned = 0;
        for id in ids.by_ref() {
            let Some(agent) = self.agents.get(id) else { continue };
            if matches(filter, agent) {
                found.push(agent.clone());
                if found.len() == limit {
                    break;
                }
            }
            scanned += 1;
            if scanned == budget {
                return (found, Some(id.clone()));
            }
        }
        let more = ids.next().is_some();
        let next = more.then(|| found.last().map(|a| a.agent_id.clone())).flatten();
        (found, next)
    }

    /// At most `limit` workers after id `after`, in id order, and whether
    /// more follow.
    pub(crate) fn workers_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<pb::WorkerRecord>, bool) {
        page(&self.workers, after, limit, Worker::record)
    }

    pub(crate) fn agent_states(&self) -> impl Iterator<Item = AgentState> + '_ {
        self.agents.values().map(pb::AgentRecord::state)
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// `behaviour` as a worker offering it declares it (its interfaces and
    /// description), or `None` when no registered worker offers it.
    pub(crate) fn offered_as(&self, behaviour: &str) -> Option<pb::BehaviourSpec> {
        self.workers.values().find_map(|w| w.offers.get(behaviour).cloned())
    }

    /// Behaviours some registered worker offers.
    pub(crate) fn offered(&self) -> Vec<String> {
        let mut names: Vec<_> =
            self.workers.values().flat_map(|w| w.offers.keys().cloned()).collect();
        names.sort();
        names.dedup();
        names
    }

    fn changed(&self, id: &str) {
        if let Some(record) = self.agents.get(id) {
            if let Some(store) = &self.store {
                let _ = store.send(Write::Record(Box::new(record.clone())));
            }
            let _ = self.changes.send(record.clone());
        }
    }

    fn set(&mut self, id: &str, state: AgentState, reason: String) {
        if state == AgentState::Pending {
            self.pending.insert(id.to_owned());
        } else {
            self.pending.remove(id);
            self.held.remove(id);
        }
        if let Some(agent) = self.agents.get_mut(id) {
            if is_final(state) && !is_final(agent.state()) {
                agent.finished_at = Some(SystemTime::now().into());
                self.finished.push_back((Instant::now(), id.to_owned()));
            }
            agent.state = state.into();
            agent.reason = reason;
            if !matches!(state, AgentState::Starting | AgentState::Running | AgentState::Stopping) {
                if let Some(worker) = self.workers.get_mut(&agent.worker_id) {
                    worker.agents.remove(id);
                }
                agent.worker_id.clear();
            }
        }
        self.changed(id);
    }

    pub(crate) fn add_worker(&mut self, id: String, register: pb::RegisterWorker, tx: WorkerTx) {
        let offers: HashMap<_, _> =
            register.behaviours.into_iter().map(|b| (b.name.clone(), b)).collect();
        let record = pb::WorkerRecord {
            worker_id: id.clone(),
            name: register.name,
            capacity: register.capacity,
            labels: register.labels,
            behaviours: offers.keys().cloned().collect(),
            agent_count: 0,
            draining: false,
        };
        tracing::info!(worker = %id, capacity = record.capacity, behaviours = ?record.behaviours, running = register.running.len(), "worker joined");
        self.workers.insert(id.clone(), Worker { record, offers, agents: BTreeSet::new(), tx });
        for running in register.running {
            self.adopt(&id, running);
        }
        self.schedule();
    }

    /// A worker rejoins running an agent (it kept it through the launcher's
    /// absence): the agent stays there if that placement is still its
    /// current one and nobody else runs it; otherwise the worker stops it.
    fn adopt(&mut self, worker_id: &str, running: pb::AgentReport) {
        let id = running.agent_id;
        let current = self.agents.get(&id).is_some_and(|agent| {
            agent.epoch == running.epoch
                && matches!(
                    agent.state(),
                    AgentState::Pending | AgentState::Starting | AgentState::Running
                )
                && (agent.worker_id.is_empty() || !self.workers.contains_key(&agent.worker_id))
        });
        let worker = self.workers.get_mut(worker_id).expect("just added");
        if !current {
            tracing::info!(agent = %id, epoch = running.epoch, worker = %worker_id, "a rejoining worker runs an outdated placement; stopping it");
            let stop = pb::StopAssignment {
                agent_id: id,
                epoch: running.epoch,
                terminate: false,
                moving: false,
            };
            worker.send(Body::Stop(stop));
            return;
        }
        worker.agents.insert(id.clone());
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.worker_id = worker_id.to_owned();
        }
        tracing::info!(agent = %id, worker = %worker_id, "agent kept running through the launcher's absence");
        self.set(&id, AgentState::Running, String::new());
    }

    /// A worker is gone (its stream closed, or it missed its heartbeats): its
    /// agents are placed again elsewhere.
    pub(crate) fn remove_worker(&mut self, id: &str) {
        let Some(worker) = self.workers.remove(id) else { return };
        tracing::warn!(worker = %id, agents = worker.agents.len(), "worker lost; moving its agents");
        for agent_id in worker.agents {
            let stopping =
                self.agents.get(&agent_id).is_some_and(|a| a.state() == AgentState::Stopping);
            let moving = self.moving.remove(&agent_id);
            if stopping && !moving {
                self.set(
                    &agent_id,
                    AgentState::Stopped,
                    format!("worker {id} was lost while stopping it"),
                );
            } else {
                self.counts.worker_lost += 1;
                self.set(&agent_id, AgentState::Pending, format!("worker {id} was lost"));
            }
        }
        self.schedule();
    }

    /// The ids of the connected workers named `name`.
    pub(crate) fn workers_named(&self, name: &str) -> Vec<String> {
        let named = self.workers.values().filter(|w| w.record.name == name);
        named.map(|w| w.record.worker_id.clone()).collect()
    }

    pub(crate) fn has_worker(&self, id: &str) -> bool {
        self.workers.contains_key(id)
    }

    pub(crate) fn launch(&mut self, record: pb::AgentRecord) -> pb::AgentRecord {
        let id = record.agent_id.clone();
        if record.state() == AgentState::Pending {
            self.pending.insert(id.clone());
        }
        self.agents.insert(id.clone(), record);
        self.changed(&id);
        self.schedule();
        self.agents[&id].clone()
    }

    /// Places every pending agent that some worker can take, on the worker
    /// with the most free slots (so agents spread out).
    pub(crate) fn schedule(&mut self) {
        let pending: Vec<String> =
            self.pending.iter().filter(|id| !self.held.contains(*id)).cloned().collect();
        for id in pending {
            let agent = &self.agents[&id];
            let chosen = self
                .workers
                .values()
                .filter(|w| w.free() > 0 && w.can_run(agent))
                .max_by_key(|w| (w.free(), std::cmp::Reverse(w.record.worker_id.clone())))
                .map(|w| w.record.worker_id.clone());
            let Some(worker_id) = chosen else {
                let reason = format!(
                    "waiting for a worker offering {} with a free slot{}",
                    agent.behaviour,
                    if agent.selector.is_empty() {
                        String::new()
                    } else {
                        format!(" and labels {:?}", agent.selector)
                    }
                );
                if agent.reason != reason {
                    self.agents.get_mut(&id).expect("listed above").reason = reason;
                    self.changed(&id);
                }
                continue;
            };
            let agent = self.agents.get_mut(&id).expect("listed above");
            agent.epoch += 1;
            agent.worker_id.clone_from(&worker_id);
            agent.state = AgentState::Starting.into();
            agent.reason.clear();
            self.pending.remove(&id);
            let start = pb::StartAssignment {
                agent_id: id.clone(),
                behaviour: agent.behaviour.clone(),
                config: agent.config.clone(),
                epoch: agent.epoch,
            };
            let worker = self.workers.get_mut(&worker_id).expect("chosen above");
            worker.agents.insert(id.clone());
            worker.send(Body::Start(start));
            self.counts.placements += 1;
            tracing::info!(agent = %id, worker = %worker_id, "agent placed");
            self.changed(&id);
        }
    }

    /// A worker reports on an agent. Reports about another placement (an
    /// older epoch, another worker) are stale and ignored.
    pub(crate) fn report(&mut self, worker_id: &str, report: pb::AgentReport) {
        let Some(agent) = self.agents.get(&report.agent_id) else { return };
        if agent.epoch != report.epoch || agent.worker_id != worker_id {
            tracing::debug!(agent = %report.agent_id, epoch = report.epoch, "stale report ignored");
            return;
        }
        let state = report.state();
        let id = report.agent_id;
        match state {
            AgentState::Running if agent.state() == AgentState::Starting => {
                self.set(&id, AgentState::Running, String::new());
                return;
            }
            AgentState::Stopped => {
                if self.moving.remove(&id) {
                    self.counts.drained += 1;
                    self.set(&id, AgentState::Pending, "moved off a draining worker".into());
                } else {
                    self.set(&id, AgentState::Stopped, report.error);
                }
            }
            AgentState::Failed => {
                let moving = self.moving.remove(&id);
                let agent = self.agents.get_mut(&id).expect("found above");
                if agent.state() == AgentState::Stopping && !moving {
                    // Asked to stop, it failed on its way out: it stays stopped.
                    let reason = format!("failed while stopping: {}", report.error);
                    self.set(&id, AgentState::Stopped, reason);
                } else if agent.restarts < agent.retry_limit {
                    agent.restarts += 1;
                    self.counts.restarted += 1;
                    let reason = format!("restart {} after: {}", agent.restarts, report.error);
                    tracing::warn!(agent = %id, %reason, "agent failed; restarting");
                    self.set(&id, AgentState::Pending, reason);
                } else {
                    tracing::error!(agent = %id, error = %report.error, "agent failed for good");
                    self.set(&id, AgentState::Failed, report.error);
                    self.given_up.push(id.clone());
                }
            }
            _ => return,
        }
        // A slot was freed, or the agent waits to be placed again.
        self.schedule();
    }

    /// Stops an agent. `Ok(true)` when it was running and a worker was asked
    /// to stop it; `Ok(false)` when it was not running (now STOPPED).
    pub(crate) fn stop(&mut self, id: &str, terminate: bool) -> Option<bool> {
        let agent = self.agents.get(id)?;
        match agent.state() {
            AgentState::Starting | AgentState::Running | AgentState::Stopping => {
                let stop = pb::StopAssignment {
                    agent_id: id.to_owned(),
                    epoch: agent.epoch,
                    terminate,
                    moving: false,
                };
                if let Some(worker) = self.workers.get(&agent.worker_id) {
                    worker.send(Body::Stop(stop));
                }
                self.moving.remove(id);
                self.set(id, AgentState::Stopping, "stop requested".into());
                Some(true)
            }
            AgentState::Pending => {
                self.set(id, AgentState::Stopped, "stopped before it was placed".into());
                Some(false)
            }
            _ => Some(false),
        }
    }

    /// No new agents on this worker; its agents stop (keeping their mailboxes)
    /// and are placed elsewhere.
    pub(crate) fn drain(&mut self, worker_id: &str) -> Option<pb::WorkerRecord> {
        let worker = self.workers.get_mut(worker_id)?;
        worker.record.draining = true;
        let (record, agents) = (worker.record(), worker.agents.clone());
        for id in &agents {
            let Some(agent) = self.agents.get(id) else { continue };
            let stop = pb::StopAssignment {
                agent_id: id.clone(),
                epoch: agent.epoch,
                terminate: false,
                moving: true,
            };
            worker.send(Body::Stop(stop));
            self.moving.insert(id.clone());
        }
        for id in &agents {
            self.set(id, AgentState::Stopping, format!("moving off draining worker {worker_id}"));
        }
        tracing::info!(worker = %worker_id, agents = agents.len(), "draining worker");
        Some(record)
    }
}

/// Whether `agent` passes `filter` (its unset fields match everything).
pub(crate) fn matches(filter: &pb::AgentFilter, agent: &pb::AgentRecord) -> bool {
    let state = filter.state();
    (state == AgentState::Unspecified || agent.state() == state)
        && (filter.behaviour.is_empty() || agent.behaviour == filter.behaviour)
        && (filter.worker_id.is_empty() || agent.worker_id == filter.worker_id)
        && (filter.owner.is_empty() || agent.owner == filter.owner)
}

/// Whether an agent in `state` is done for good.
fn is_final(state: AgentState) -> bool {
    matches!(state, AgentState::Stopped | AgentState::Failed)
}

/// At most `limit` values of `map` after key `after`, in key order, and
/// whether more follow.
fn page<V, T>(
    map: &BTreeMap<String, V>,
    after: Option<&str>,
    limit: usize,
    item: impl Fn(&V) -> T,
) -> (Vec<T>, bool) {
    let from = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut values = map.range::<str, _>((from, Bound::Unbounded));
    let items: Vec<T> = values.by_ref().take(limit).map(|(_, v)| item(v)).collect();
    (items, values.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(
        cluster: &mut Cluster,
        id: &str,
        capacity: u32,
        labels: &[(&str, &str)],
    ) -> mpsc::UnboundedReceiver<pb::JoinResponse> {
        let (tx, rx) = mpsc::unbounded_channel();
        let register = pb::RegisterWorker {
            name: id.into(),
            capacity,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            behaviours: vec![pb::BehaviourSpec { name: "t.A".into(), ..Default::default() }],
            running: Vec::new(),
        };
        cluster.add_worker(id.into(), register, tx);
        rx
    }

    /// A worker that rejoins running agents `running` (id number, epoch).
    fn rejoin(
        cluster: &mut Cluster,
        id: &str,
        running: &[(usize, u64)],
    ) -> mpsc::UnboundedReceiver<pb::JoinResponse> {
        let (tx, rx) = mpsc::unbounded_channel();
        let register = pb::RegisterWorker {
            name: id.into(),
            capacity: 4,
            behaviours: vec![pb::BehaviourSpec { name: "t.A".into(), ..Default::default() }],
            running: running
                .iter()
                .map(|(n, epoch)| pb::AgentReport {
                    agent_id: format!("agent-{n:03}"),
                    epoch: *epoch,
                    state: AgentState::Running.into(),
                    error: String::new(),
                })
                .collect(),
            ..Default::default()
        };
        cluster.add_worker(id.into(), register, tx);
        rx
    }

    /// Agents that failed for good are handed out once, for their mailboxes
    /// to be terminated; a restored launcher hands out those it knew of.
    #[test]
    fn agents_that_failed_for_good_are_given_up_once() {
        let mut cluster = Cluster::new();
        let (store, _writes) = mpsc::unbounded_channel();
        let record = |n: usize, state: AgentState| pb::AgentRecord {
            agent_id: format!("agent-{n:03}"),
            behaviour: "t.A".into(),
            state: state.into(),
            ..Default::default()
        };
        let states = [AgentState::Failed, AgentState::Stopped, AgentState::Pending];
        cluster.restore(states.iter().enumerate().map(|(n, s)| record(n, *s)).collect(), store);
        assert_eq!(cluster.take_given_up(), ["agent-000"]);
        assert!(cluster.take_given_up().is_empty());

        // Placed, it fails with no restarts left.
        let _w = rejoin(&mut cluster, "w-a", &[]);
        let placed = cluster.agent("agent-002").unwrap().clone();
        assert_eq!(placed.state(), AgentState::Starting);
        let failed = pb::AgentReport {
            agent_id: placed.agent_id.clone(),
            epoch: placed.epoch,
            state: AgentState::Failed.into(),
            error: "boom".into(),
        };
        cluster.report("w-a", failed);
        assert_eq!(cluster.agent("agent-002").unwrap().state(), AgentState::Failed);
        assert_eq!(cluster.take_given_up(), ["agent-002"]);
    }

    #[test]
    fn after_a_restart_workers_bring_their_agents_back_and_the_rest_waits_for_the_grace() {
        // What a launcher restored from its store: three agents that were
        // running (so PENDING, placed before) and one never placed.
        let mut cluster = Cluster::new();
        let (store, _writes) = mpsc::unbounded_channel();
        let record = |n: usize, epoch: u64| pb::AgentRecord {
            agent_id: format!("agent-{n:03}"),
            behaviour: "t.A".into(),
            state: AgentState::Pending.into(),
            epoch,
            ..Default::default()
        };
        cluster.restore(vec![record(0, 3), record(1, 1), record(2, 2), record(3, 0)], store);
        // The first worker back brings agent 0 (current) and agent 1 at an
        // outdated placement; the never-placed agent 3 is placed at once,
        // the others wait for their workers.
        let mut a = rejoin(&mut cluster, "w-a", &[(0, 3), (1, 0)]);
        let zero = cluster.agent("agent-000").unwrap();
        assert_eq!(
            (zero.state(), zero.worker_id.as_str(), zero.epoch),
            (AgentState::Running, "w-a", 3)
        );
        let sent: Vec<_> = std::iter::from_fn(|| a.try_recv().ok()).collect();
        let (stops, starts): (Vec<_>, Vec<_>) =
            sent.iter().partition(|m| matches!(m.body, Some(Body::Stop(_))));
        let stopped: Vec<_> = stops
            .iter()
            .filter_map(|m| match &m.body {
                Some(Body::Stop(s)) => Some(s.agent_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(stopped, ["agent-001"], "the outdated copy stops");
        assert_eq!(starts.len(), 1, "only the never-placed agent starts");
        assert_eq!(cluster.agent("agent-003").unwrap().state(), AgentState::Starting);
        assert_eq!(cluster.agent("agent-002").unwrap().state(), AgentState::Pending);
        // The second worker brings agent 2; agent 1 is placed once the
        // grace is over, with a new epoch.
        let _b = rejoin(&mut cluster, "w-b", &[(2, 2)]);
        assert_eq!(cluster.agent("agent-002").unwrap().worker_id, "w-b");
        assert_eq!(cluster.agent("agent-001").unwrap().state(), AgentState::Pending);
        cluster.release_held();
        let one = cluster.agent("agent-001").unwrap();
        assert_eq!((one.state(), one.epoch), (AgentState::Starting, 2));
    }

    fn launch(
        cluster: &mut Cluster,
        n: usize,
        selector: &[(&str, &str)],
        retries: u32,
    ) -> pb::AgentRecord {
        cluster.launch(pb::AgentRecord {
            agent_id: format!("agent-{n:03}"),
            behaviour: "t.A".into(),
            selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            retry_limit: retries,
            state: AgentState::Pending.into(),
            ..Default::default()
        })
    }

    /// What a worker says about agent-000 in placement `epoch`.
    fn report(epoch: u64, state: AgentState, error: &str) -> pb::AgentReport {
        pb::AgentReport {
            agent_id: "agent-000".into(),
            epoch,
            state: state.into(),
            error: error.into(),
        }
    }

    fn starts(rx: &mut mpsc::UnboundedReceiver<pb::JoinResponse>) -> Vec<pb::StartAssignment> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m.body {
                Some(Body::Start(s)) => Some(s),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn agents_spread_over_free_slots_and_wait_when_there_are_none() {
        let mut cluster = Cluster::new();
        let mut a = worker(&mut cluster, "w-a", 2, &[]);
        let mut b = worker(&mut cluster, "w-b", 2, &[]);
        for n in 0..5 {
            launch(&mut cluster, n, &[], 0);
        }
        assert_eq!(starts(&mut a).len(), 2);
        assert_eq!(starts(&mut b).len(), 2);
        let last = cluster.agent("agent-004").unwrap();
        assert_eq!(last.state(), AgentState::Pending);
        assert!(last.reason.contains("free slot"), "{}", last.reason);
        // A slot frees up: the pending agent is placed.
        let done = report(1, AgentState::Stopped, "");
        cluster.report(&cluster.agent("agent-000").unwrap().worker_id.clone(), done);
        assert_eq!(cluster.agent("agent-004").unwrap().state(), AgentState::Starting);
    }

    #[test]
    fn selectors_pick_workers_by_label() {
        let mut cluster = Cluster::new();
        let mut cpu = worker(&mut cluster, "w-cpu", 4, &[("kind", "cpu")]);
        let mut gpu = worker(&mut cluster, "w-gpu", 4, &[("kind", "gpu")]);
        launch(&mut cluster, 0, &[("kind", "gpu")], 0);
        launch(&mut cluster, 1, &[("kind", "tpu")], 0);
        assert!(starts(&mut cpu).is_empty());
        assert_eq!(starts(&mut gpu).len(), 1);
        assert_eq!(cluster.agent("agent-001").unwrap().state(), AgentState::Pending);
    }

    #[test]
    fn failures_restart_up_to_the_limit_and_stale_reports_are_ignored() {
        let mut cluster = Cluster::new();
        let mut w = worker(&mut cluster, "w", 4, &[]);
        launch(&mut cluster, 0, &[], 1);
        let fail = |epoch| report(epoch, AgentState::Failed, "boom");
        assert_eq!(starts(&mut w)[0].epoch, 1);
        cluster.report("w", fail(1));
        let restarted = cluster.agent("agent-000").unwrap();
        assert_eq!(
            (restarted.state(), restarted.restarts, restarted.epoch),
            (AgentState::Starting, 1, 2)
        );
        cluster.report("w", fail(1)); // stale: epoch 1 is over
        assert_eq!(cluster.agent("agent-000").unwrap().state(), AgentState::Starting);
        cluster.report("w", fail(2));
        let failed = cluster.agent("agent-000").unwrap();
        assert_eq!((failed.state(), failed.reason.as_str()), (AgentState::Failed, "boom"));
        let counts = cluster.counts;
        assert_eq!((counts.placements, counts.restarted, counts.worker_lost), (2, 1, 0));
    }

    #[test]
    fn an_agent_failing_while_asked_to_stop_stays_stopped() {
        let mut cluster = Cluster::new();
        let _w = worker(&mut cluster, "w", 4, &[]);
        launch(&mut cluster, 0, &[], 3);
        assert_eq!(cluster.stop("agent-000", false), Some(true));
        cluster.report("w", report(1, AgentState::Failed, "shutdown hook failed"));
        let agent = cluster.agent("agent-000").unwrap();
        assert_eq!((agent.state(), agent.restarts), (AgentState::Stopped, 0));
        assert!(agent.reason.contains("shutdown hook failed"), "{}", agent.reason);
    }

    #[test]
    fn a_lost_worker_s_agents_move_with_a_new_epoch() {
        let mut cluster = Cluster::new();
        let _a = worker(&mut cluster, "w-a", 1, &[]);
        launch(&mut cluster, 0, &[], 0);
        assert_eq!(cluster.agent("agent-000").unwrap().worker_id, "w-a");
        let mut b = worker(&mut cluster, "w-b", 1, &[]);
        cluster.remove_worker("w-a");
        let moved = cluster.agent("agent-000").unwrap();
        assert_eq!((moved.worker_id.as_str(), moved.epoch), ("w-b", 2));
        assert_eq!(starts(&mut b)[0].epoch, 2);
        // The old worker's late report changes nothing.
        cluster.report("w-a", report(1, AgentState::Failed, "x"));
        assert_eq!(cluster.agent("agent-000").unwrap().state(), AgentState::Starting);
        let counts = cluster.counts;
        assert_eq!((counts.placements, counts.worker_lost, counts.restarted), (2, 1, 0));
    }

    #[test]
    fn draining_moves_agents_and_takes_no_new_ones() {
        let mut cluster = Cluster::new();
        let _a = worker(&mut cluster, "w-a", 2, &[]);
        launch(&mut cluster, 0, &[], 0);
        let mut b = worker(&mut cluster, "w-b", 2, &[]);
        cluster.drain("w-a");
        assert_eq!(cluster.agent("agent-000").unwrap().state(), AgentState::Stopping);
        cluster.report("w-a", report(1, AgentState::Stopped, ""));
        let moved = cluster.agent("agent-000").unwrap();
        assert_eq!((moved.state(), moved.worker_id.as_str()), (AgentState::Starting, "w-b"));
        assert_eq!(starts(&mut b).len(), 1);
        launch(&mut cluster, 1, &[], 0);
        assert_eq!(cluster.agent("agent-001").unwrap().worker_id, "w-b");
        let counts = cluster.counts;
        assert_eq!((counts.placements, counts.drained, counts.worker_lost), (3, 1, 0));
    }

    #[test]
    fn finished_agents_are_forgotten_after_their_retention_and_lists_filter() {
        let mut cluster = Cluster::new();
        let mut a = worker(&mut cluster, "w-a", 8, &[]);
        for n in 0..6 {
            launch(&mut cluster, n, &[], 0);
        }
        assert_eq!(starts(&mut a).len(), 6);
        for n in 0..6 {
            let mut running = report(1, AgentState::Running, "");
            running.agent_id = format!("agent-{n:03}");
            cluster.report("w-a", running);
        }
        for n in [1, 3] {
            cluster.stop(&format!("agent-{n:03}"), false);
            let mut stopped = report(1, AgentState::Stopped, "");
            stopped.agent_id = format!("agent-{n:03}");
            cluster.report("w-a", stopped);
        }
        assert!(cluster.agent("agent-001").unwrap().finished_at.is_some());
        let filter =
            |state: AgentState| pb::AgentFilter { state: state.into(), ..Default::default() };
        let ids = |page: (Vec<pb::AgentRecord>, Option<String>)| {
            (page.0.into_iter().map(|a| a.agent_id).collect::<Vec<_>>(), page.1)
        };
        assert_eq!(
            ids(cluster.list(&filter(AgentState::Stopped), None, 10)),
            (vec!["agent-001".to_owned(), "agent-003".to_owned()], None)
        );
        let running = filter(AgentState::Running);
        let (first, next) = ids(cluster.list(&running, None, 3));
        assert_eq!((first.len(), next.as_deref()), (3, Some("agent-004")));
        assert_eq!(
            ids(cluster.list(&running, next.as_deref(), 3)),
            (vec!["agent-005".to_owned()], None)
        );
        let on_a = pb::AgentFilter { worker_id: "w-a".into(), ..Default::default() };
        assert_eq!(cluster.list(&on_a, None, 100).0.len(), 4, "the stopped left the worker");
        // Nothing is forgotten before its time; all of it after.
        assert_eq!(cluster.forget_finished(Duration::from_secs(3600)), 0);
        assert_eq!(cluster.forget_finished(Duration::ZERO), 2);
        assert!(cluster.agent("agent-001").is_none());
        assert_eq!(cluster.list(&pb::AgentFilter::default(), None, 100).0.len(), 4);
    }
}
