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
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::credentials::Credentials;
use crate::exchange::{GrpcExchange, SharedExchange};
use crate::runtime::{self, StopSignal};
use crate::{AgentConfig, AgentError, Behaviour, ClientError};

type Run = BoxFuture<'static, Result<(), AgentError>>;
/// Builds a behaviour from its JSON config and returns its runtime.
type Factory = Arc<
    dyn Fn(serde_json::Value, EntityId, u64, SharedExchange, StopSignal) -> Result<Run, String>
        + Send
        + Sync,
>;

struct Offered {
    implements: &'static [&'static str],
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
    Lost(String),
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
        }
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
        let factory: Factory = Arc::new(|config, id, epoch, exchange, stop| {
            let behaviour: B = serde_json::from_value(config)
                .map_err(|e| format!("config of {} does not fit: {e}", B::NAME))?;
            // The launcher restarts failed agents on the same mailbox: keep it.
            let config = AgentConfig { terminate_on_error: false, ..AgentConfig::default() };
            Ok(Box::pin(runtime::run(Arc::new(behaviour), id, epoch, exchange, config, stop)))
        });
        self.behaviours.insert(B::NAME, Offered { implements: B::IMPLEMENTS, factory });
        self
    }

    /// Serves until SIGINT or SIGTERM, reconnecting to the launcher when the
    /// connection drops; then stops its agents, keeping their mailboxes.
    pub async fn run(self) -> Result<(), ClientError> {
        self.run_until(signalled()).await
    }

    /// Serves until `shutdown` completes.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), ClientError> {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session(&mut shutdown).await {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::Lost(why)) => {
                    tracing::warn!(launcher = %self.launcher_url, %why, "launcher session lost");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(launcher = %self.launcher_url, error = %e, ?backoff, "cannot join the launcher")
                }
            }
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(5)),
            }
        }
    }

    async fn session(
        &self,
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
                })
                .collect(),
        }));
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
        let mut inbound = launcher.join(stream).await?.into_inner();
        let welcome = match inbound.next().await {
            Some(Ok(pb::JoinResponse { body: Some(Body::Registered(welcome)) })) => welcome,
            Some(Err(status)) => return Err(status.into()),
            _ => {
                return Ok(SessionEnd::Lost(
                    "the launcher did not acknowledge the registration".into(),
                ));
            }
        };
        // Lazily: the exchange may not be up yet; the channel connects on use.
        let exchange: SharedExchange =
            Arc::new(GrpcExchange::lazy(&welcome.exchange_url, &credentials)?);
        let duration = |d: Option<academy_proto::prost_types::Duration>, field| {
            academy_proto::duration::from_proto(d.unwrap_or_default(), field)
        };
        let lease = duration(welcome.lease, "lease")?;
        let interval = duration(welcome.heartbeat_interval, "heartbeat_interval")?;
        let mut heartbeat = tokio::time::interval(interval.max(Duration::from_millis(10)));
        let mut lease_ends = tokio::time::Instant::now() + lease;
        tracing::info!(worker = %welcome.worker_id, exchange = %welcome.exchange_url, "joined the launcher");

        let mut agents: HashMap<String, (u64, StopSignal)> = HashMap::new();
        let mut runs: JoinSet<(String, u64, Result<(), AgentError>)> = JoinSet::new();
        let report = |agent_id: String, epoch, state: AgentState, error: String| {
            send(Up::Report(pb::AgentReport { agent_id, epoch, state: state.into(), error }));
        };
        let end = loop {
            tokio::select! {
                () = &mut *shutdown => break SessionEnd::Shutdown,
                () = tokio::time::sleep_until(lease_ends) => {
                    break SessionEnd::Lost(format!("no word from the launcher for {lease:?}"));
                }
                _ = heartbeat.tick() => send(Up::Heartbeat(pb::Heartbeat {})),
                Some(done) = runs.join_next(), if !runs.is_empty() => {
                    let Ok((agent_id, epoch, result)) = done else { continue };
                    if agents.get(&agent_id).is_some_and(|(e, _)| *e == epoch) {
                        agents.remove(&agent_id);
                    }
                    match result {
                        Ok(()) => report(agent_id, epoch, AgentState::Stopped, String::new()),
                        Err(e) => report(agent_id, epoch, AgentState::Failed, e.to_string()),
                    }
                }
                message = inbound.next() => {
                    let body = match message {
                        Some(Ok(message)) => message.body,
                        Some(Err(status)) => break SessionEnd::Lost(status.message().to_owned()),
                        None => break SessionEnd::Lost("the launcher closed the stream".into()),
                    };
                    lease_ends = tokio::time::Instant::now() + lease;
                    match body {
                        Some(Body::Start(start)) => {
                            let id = start.agent_id.clone();
                            match self.start(&start, exchange.clone()) {
                                Ok((stop, run)) => {
                                    let epoch = start.epoch;
                                    runs.spawn(async move { (id, epoch, run.await) });
                                    agents.insert(start.agent_id.clone(), (epoch, stop));
                                    report(start.agent_id, epoch, AgentState::Running, String::new());
                                }
                                Err(error) => report(id, start.epoch, AgentState::Failed, error),
                            }
                        }
                        Some(Body::Stop(stop)) => {
                            if let Some((epoch, signal)) = agents.get(&stop.agent_id)
                                && *epoch == stop.epoch
                            {
                                signal.stop(Some(stop.terminate));
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        // Shut down or cut off: the launcher may place these agents elsewhere,
        // so stop them all now, keeping their mailboxes.
        for (_, signal) in agents.values() {
            signal.stop(Some(false));
        }
        while let Some(done) = runs.join_next().await {
            if let (SessionEnd::Shutdown, Ok((agent_id, epoch, _))) = (&end, done) {
                report(agent_id, epoch, AgentState::Stopped, "worker shut down".into());
            }
        }
        Ok(end)
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
        let run = (offered.factory)(config, id, start.epoch, exchange, stop.clone())?;
        tracing::info!(agent = %id, behaviour = %start.behaviour, epoch = start.epoch, "starting agent");
        Ok((stop, run))
    }
}
