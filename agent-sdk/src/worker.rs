//! Workers: programs that run the agents a launcher places on them.
//!
//! ```no_run
//! # use academy_sdk::{worker::Worker, behaviour};
//! # #[derive(Default, serde::Deserialize)]
//! # struct Counter;
//! # #[behaviour(name = "example.Counter")]
//! # impl Counter {}
//! # async fn demo() -> Result<(), academy_sdk::ClientError> {
//! Worker::new("http://127.0.0.1:50052").capacity(8).register::<Counter>().run().await
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use academy_proto::EntityId;
use academy_proto::pb::{
    self, AgentState, join_response::Body, launcher_service_client::LauncherServiceClient,
};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::credentials::Credentials;
use crate::exchange::{GrpcExchange, SharedExchange};
use crate::runtime::{self, StopSignal};
use crate::{AgentConfig, AgentError, Behaviour, ClientError};

type Run = BoxFuture<'static, Result<(), AgentError>>;
/// Builds a behaviour from its JSON config and returns its runtime.
type Factory = Arc<
    dyn Fn(
            serde_json::Value,
            EntityId,
            u64,
            SharedExchange,
            AgentConfig,
            StopSignal,
        ) -> Result<Run, String>
        + Send
        + Sync,
>;

struct Offered {
    implements: &'static [&'static str],
    description: pb::AgentDescription,
    factory: Factory,
}

/// A worker node: runs the behaviours registered with it, as the launcher asks.
pub struct Worker {
    launcher_url: String,
    name: String,
    capacity: u32,
    labels: HashMap<String, String>,
    behaviours: HashMap<&'static str, Offered>,
    credentials: Option<Credentials>,
    orphan_grace: Duration,
    shutdown_grace: Duration,
    status: Arc<watch::Sender<WorkerStatus>>,
    clock: crate::clock::ClockKind,
    direct: Option<crate::Endpoint>,
}

/// What a worker is doing now, for probes and metrics: see [`Worker::status`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Joined to the launcher, and not shutting down: it can take agents.
    pub joined: bool,
    /// Agents running on it.
    pub agents: usize,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("launcher_url", &self.launcher_url)
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("labels", &self.labels)
            .field("behaviours", &self.behaviours.keys().collect::<Vec<_>>())
            .field("credentials", &self.credentials)
            .finish()
    }
}

/// Why a worker session ended.
enum SessionEnd {
    Shutdown,
    /// The launcher closed the connection (or it broke): it went away.
    Closed(String),
    /// The launcher fell silent: this worker may be cut off from it.
    Silent(String),
}

/// An agent's run, ending with its placement and outcome.
type Runs = JoinSet<(String, u64, Result<(), AgentError>)>;

/// The agents a worker runs, across its sessions with the launcher.
#[derive(Default)]
struct Fleet {
    /// By id: placement epoch and stop signal.
    agents: HashMap<String, (u64, StopSignal)>,
    runs: Runs,
    /// Agents that ended while the launcher was away, to report on rejoining.
    finished: Vec<pb::AgentReport>,
    /// Since the launcher went away: when the agents must stop if it has not
    /// come back.
    orphaned: Option<tokio::time::Instant>,
    /// Since the worker was told to shut down (and asked the launcher to
    /// move its agents): when it stops what is left and exits.
    leaving: Option<tokio::time::Instant>,
    exchange: Option<SharedExchange>,
}

impl Fleet {
    fn spawn(&mut self, id: String, epoch: u64, stop: StopSignal, run: Run) {
        let agent = id.clone();
        self.runs.spawn(async move { (agent, epoch, run.await) });
        self.agents.insert(id, (epoch, stop));
    }

    /// What to report of a run that ended.
    fn ended(
        &mut self,
        done: Result<(String, u64, Result<(), AgentError>), tokio::task::JoinError>,
    ) -> Option<pb::AgentReport> {
        let (agent_id, epoch, result) = done.ok()?;
        if self.agents.get(&agent_id).is_some_and(|(e, _)| *e == epoch) {
            self.agents.remove(&agent_id);
        }
        let (state, error) = match result {
            Ok(()) => (AgentState::Stopped, String::new()),
            Err(e) => (AgentState::Failed, e.to_string()),
        };
        Some(pb::AgentReport { agent_id, epoch, state: state.into(), error })
    }

    /// Stops the agent of a stop assignment, if it runs that placement.
    fn stop(&self, stop: &pb::StopAssignment) {
        if let Some((epoch, signal)) = self.agents.get(&stop.agent_id)
            && *epoch == stop.epoch
        {
            if stop.moving {
                signal.stop_moving();
            } else {
                signal.stop(Some(stop.terminate));
            }
        }
    }

    /// Reports of the agents running, to hand a launcher on rejoining.
    fn running(&self) -> Vec<pb::AgentReport> {
        self.agents
            .iter()
            .map(|(id, (epoch, _))| agent_report(id.clone(), *epoch, Ok(())))
            .collect()
    }

    /// Records the agents that ended meanwhile (while no launcher listens).
    async fn settle(&mut self) {
        match self.runs.join_next().await {
            Some(done) => {
                if let Some(report) = self.ended(done) {
                    self.finished.push(report);
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Stops every agent, keeping their mailboxes, and waits for them.
    async fn stop_all(&mut self) {
        for (_, signal) in self.agents.values() {
            signal.stop(Some(false));
        }
        while self.runs.join_next().await.is_some() {}
        self.agents.clear();
        self.finished.clear();
        self.orphaned = None;
    }
}

/// A report of agent `agent_id` in placement `epoch`: running (`Ok`) or
/// failed with an error.
fn agent_report(agent_id: String, epoch: u64, state: Result<(), String>) -> pb::AgentReport {
    let (state, error) = match state {
        Ok(()) => (AgentState::Running, String::new()),
        Err(error) => (AgentState::Failed, error),
    };
    pb::AgentReport { agent_id, epoch, state: state.into(), error }
}

/// Completes on SIGINT or SIGTERM.
async fn signalled() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        // Without a SIGTERM handler, SIGINT still stops the worker.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

impl Worker {
    /// A worker that joins the launcher at `launcher_url`.
    pub fn new(launcher_url: impl Into<String>) -> Self {
        Self {
            launcher_url: launcher_url.into(),
            name: "worker".into(),
            capacity: 16,
            labels: HashMap::new(),
            behaviours: HashMap::new(),
            credentials: None,
            orphan_grace: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(25),
            status: Arc::new(watch::Sender::new(WorkerStatus::default())),
            clock: crate::clock::ClockKind::Wall,
            direct: None,
        }
    }

    /// Direct delivery (docs/design.md, "Direct delivery"): its agents take
    /// requests at `endpoint` too, and call other agents directly when
    /// they can (see [`AgentConfig::direct`]).
    pub fn direct(mut self, endpoint: crate::Endpoint) -> Self {
        self.direct = Some(endpoint);
        self
    }

    /// The clock its agents follow: the wall clock (the default), or their
    /// exchange's simulated clock (docs/design.md, "Clocks").
    pub fn clock(mut self, clock: crate::clock::ClockKind) -> Self {
        self.clock = clock;
        self
    }

    /// What it presents to the launcher and the exchange (by default, the
    /// token in `ACADEMY_TOKEN` if set). With authentication on, a worker
    /// must be the principal the launcher registers agents as, so it may
    /// subscribe to their mailboxes.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Its name, shown by the launcher.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How many agents it runs at once.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// A label launch selectors can match.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Offers behaviour `B`, built from the launch's JSON config.
    pub fn register<B: Behaviour + DeserializeOwned>(mut self) -> Self {
        let factory: Factory = Arc::new(|config, id, epoch, exchange, agent, stop| {
            let behaviour: B = serde_json::from_value(config)
                .map_err(|e| format!("config of {} does not fit: {e}", B::NAME))?;
            Ok(Box::pin(runtime::run(Arc::new(behaviour), id, epoch, exchange, agent, stop)))
        });
        let description = B::describe();
        self.behaviours
            .insert(B::NAME, Offered { implements: B::IMPLEMENTS, description, factory });
        self
    }

    /// Follows what it is doing once it runs (a readiness probe may answer
    /// from `joined`: a worker not joined cannot take agents).
    pub fn status(&self) -> watch::Receiver<WorkerStatus> {
        self.status.subscribe()
    }

    /// Serves until SIGINT or SIGTERM, reconnecting to the launcher when the
    /// connection drops. Then it hands its agents over: the launcher moves
    /// them to other workers (their actions in flight finish here, their
    /// mailboxes keep what comes meanwhile), and the worker exits once none
    /// is left, or after its [shutdown grace](Self::shutdown_grace), when it
    /// stops the rest (keeping their mailboxes; the launcher places them
    /// elsewhere as for a lost worker). A worker that has no launcher to
    /// hand them to stops them, keeping their mailboxes.
    pub async fn run(self) -> Result<(), ClientError> {
        self.run_until(signalled()).await
    }

    /// How long agents keep running after the launcher closed the
    /// connection (it restarted, or moved), while the worker reconnects: a
    /// launcher that comes back in time finds them running and keeps them
    /// where they are. After that they stop (keeping their mailboxes). A
    /// launcher that falls silent without closing the connection (the worker
    /// may be cut off from it, and it may move the agents) is different: the
    /// agents stop after the lease, as before. 60 s by default.
    pub fn orphan_grace(mut self, grace: Duration) -> Self {
        self.orphan_grace = grace;
        self
    }

    /// How long a worker told to shut down waits for the launcher to move
    /// its agents before it stops what is left and exits: 25 s by default,
    /// within Kubernetes' default grace period of 30 s.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Serves until `shutdown` completes, then hands its agents over as
    /// [`run`](Self::run) does.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), ClientError> {
        let shutdown = futures::FutureExt::fuse(shutdown);
        tokio::pin!(shutdown);
        let mut fleet = Fleet::default();
        let mut backoff = Duration::from_millis(100);
        loop {
            let end = self.session(&mut fleet, &mut shutdown).await;
            self.show(&fleet, false);
            if fleet.leaving.is_some() {
                // Told to shut down: no waiting for a launcher to come back.
                fleet.stop_all().await;
                return Ok(());
            }
            match end {
                Ok(SessionEnd::Shutdown) => {
                    fleet.stop_all().await;
                    return Ok(());
                }
                Ok(SessionEnd::Closed(why)) => {
                    backoff = Duration::from_millis(100);
                    if !fleet.agents.is_empty() {
                        tracing::warn!(launcher = %self.launcher_url, %why, agents = fleet.agents.len(), grace = ?self.orphan_grace, "launcher gone; agents keep running while reconnecting");
                    }
                    fleet.orphaned.get_or_insert(tokio::time::Instant::now() + self.orphan_grace);
                }
                Ok(SessionEnd::Silent(why)) => {
                    tracing::warn!(launcher = %self.launcher_url, %why, "launcher silent; stopping agents, as it may move them");
                    backoff = Duration::from_millis(100);
                    fleet.stop_all().await;
                }
                Err(e) => {
                    tracing::warn!(launcher = %self.launcher_url, error = %e, ?backoff, "cannot join the launcher")
                }
            }
            if fleet.agents.is_empty() {
                fleet.orphaned = None;
            }
            let orphaned = fleet.orphaned;
            let grace_over = async {
                match orphaned {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => {
                    fleet.stop_all().await;
                    return Ok(());
                }
                () = grace_over => {
                    tracing::warn!(agents = fleet.agents.len(), "the launcher did not come back in time; stopping agents");
                    fleet.stop_all().await;
                }
                () = fleet.settle() => {}
                () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(5)),
            }
        }
    }

    async fn session(
        &self,
        fleet: &mut Fleet,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<SessionEnd, ClientError> {
        let url = &self.launcher_url;
        let credentials = match &self.credentials {
            Some(credentials) => credentials.clone(),
            None => Credentials::from_env()?,
        };
        let mut launcher = LauncherServiceClient::new(credentials.connect(url).await?);
        let (out, outbound) = mpsc::unbounded_channel();
        let send = |body| {
            let _ = out.send(pb::JoinRequest { body: Some(body) });
        };
        use pb::join_request::Body as Up;
        send(Up::Register(pb::RegisterWorker {
            name: self.name.clone(),
            capacity: self.capacity,
            labels: self.labels.clone(),
            behaviours: self
                .behaviours
                .iter()
                .map(|(name, offered)| pb::BehaviourSpec {
                    name: (*name).to_owned(),
                    implements: offered.implements.iter().map(|s| (*s).to_owned()).collect(),
                    description: Some(offered.description.clone()),
                })
                .collect(),
            running: fleet.running(),
        }));
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
        let mut inbound = launcher.join(stream).await?.into_inner();
        let welcome = match inbound.next().await {
            Some(Ok(pb::JoinResponse { body: Some(Body::Registered(welcome)) })) => welcome,
            Some(Err(status)) => return Err(status.into()),
            _ => {
                return Ok(SessionEnd::Closed(
                    "the launcher did not acknowledge the registration".into(),
                ));
            }
        };
        // Lazily: the exchange may not be up yet; the channel connects on
        // use. One client for the worker's life: agents outlive sessions.
        let exchange = match &fleet.exchange {
            Some(exchange) => exchange.clone(),
            None => {
                let exchange: SharedExchange =
                    Arc::new(GrpcExchange::lazy(&welcome.exchange_url, &credentials)?);
                fleet.exchange.insert(exchange).clone()
            }
        };
        let duration = |d: Option<academy_proto::prost_types::Duration>, field| {
            academy_proto::duration::from_proto(d.unwrap_or_default(), field)
        };
        let lease = duration(welcome.lease, "lease")?;
        let interval = duration(welcome.heartbeat_interval, "heartbeat_interval")?;
        let mut heartbeat = tokio::time::interval(interval.max(Duration::from_millis(10)));
        let mut lease_ends = tokio::time::Instant::now() + lease;
        tracing::info!(worker = %welcome.worker_id, exchange = %welcome.exchange_url, agents = fleet.agents.len(), "joined the launcher");
        // Its agents have a launcher again (a failed attempt to join keeps
        // the deadline they had).
        fleet.orphaned = None;
        let report = |report: pb::AgentReport| send(Up::Report(report));
        // What happened while the launcher was away.
        for done in fleet.finished.drain(..) {
            report(done);
        }
        loop {
            self.show(fleet, fleet.leaving.is_none());
            let leaving = fleet.leaving;
            let handed_over = async {
                match leaving {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut *shutdown => {
                    if fleet.agents.is_empty() {
                        return Ok(SessionEnd::Shutdown);
                    }
                    tracing::info!(agents = fleet.agents.len(), grace = ?self.shutdown_grace, "shutting down: the launcher moves the agents to other workers");
                    send(Up::Leaving(pb::WorkerLeaving {}));
                    fleet.leaving = Some(tokio::time::Instant::now() + self.shutdown_grace);
                }
                () = handed_over => {
                    tracing::warn!(agents = fleet.agents.len(), "shutdown grace over; stopping the agents not moved yet");
                    return Ok(SessionEnd::Shutdown);
                }
                () = tokio::time::sleep_until(lease_ends) => {
                    return Ok(SessionEnd::Silent(format!("no word from the launcher for {lease:?}")));
                }
                _ = heartbeat.tick() => send(Up::Heartbeat(pb::Heartbeat {})),
                Some(done) = fleet.runs.join_next(), if !fleet.runs.is_empty() => {
                    if let Some(done) = fleet.ended(done) {
                        report(done);
                    }
                    if fleet.leaving.is_some() && fleet.agents.is_empty() {
                        // Every agent handed over: let the reports reach
                        // the launcher (it closes the stream once ours ends).
                        drop(out);
                        let closed = async { while inbound.next().await.is_some() {} };
                        let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
                        tracing::info!("every agent handed over; exiting");
                        return Ok(SessionEnd::Shutdown);
                    }
                }
                message = inbound.next() => {
                    let body = match message {
                        Some(Ok(message)) => message.body,
                        Some(Err(status)) => return Ok(SessionEnd::Closed(status.message().to_owned())),
                        None => return Ok(SessionEnd::Closed("the launcher closed the stream".into())),
                    };
                    lease_ends = tokio::time::Instant::now() + lease;
                    match body {
                        Some(Body::Start(start)) => {
                            let id = start.agent_id.clone();
                            let state = match self.start(&start, exchange.clone()) {
                                Ok((stop, run)) => {
                                    fleet.spawn(id.clone(), start.epoch, stop, run);
                                    Ok(())
                                }
                                Err(error) => Err(error),
                            };
                            report(agent_report(id, start.epoch, state));
                        }
                        Some(Body::Stop(stop)) => fleet.stop(&stop),
                        _ => {}
                    }
                }
            }
        }
    }

    fn show(&self, fleet: &Fleet, joined: bool) {
        let now = WorkerStatus { joined, agents: fleet.agents.len() };
        self.status.send_if_modified(|status| std::mem::replace(status, now) != now);
    }

    fn start(
        &self,
        start: &pb::StartAssignment,
        exchange: SharedExchange,
    ) -> Result<(StopSignal, Run), String> {
        let offered = self.behaviours.get(start.behaviour.as_str()).ok_or_else(|| {
            format!("behaviour {} is not compiled into this worker", start.behaviour)
        })?;
        let id: EntityId = start.agent_id.parse().map_err(|e| format!("bad agent id: {e}"))?;
        let stop = StopSignal::default();
        let config =
            start.config.clone().map_or(serde_json::json!({}), academy_proto::json::from_proto);
        // The launcher restarts failed agents on the same mailbox: keep it.
        let agent = AgentConfig {
            terminate_on_error: false,
            clock: self.clock,
            direct: self.direct.clone(),
            ..AgentConfig::default()
        };
        let run = (offered.factory)(config, id, start.epoch, exchange, agent, stop.clone())?;
        tracing::info!(agent = %id, behaviour = %start.behaviour, epoch = start.epoch, "starting agent");
        Ok((stop, run))
    }
}
