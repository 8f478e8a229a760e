//! The manager: one client mailbox shared by all its handles; launches agents
//! in this process, waits on them and shuts them down.

use academy_proto::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use academy_proto::pb::MailboxState;
use academy_proto::{EntityId, ExchangeError, Matching, RegisteredAgent};
use tokio::sync::watch;

use crate::exchange::{GrpcExchange, SharedExchange};
use crate::mailbox::Mailbox;
use crate::runtime::{self, StopSignal};
use crate::{
    AgentConfig, AgentError, Behaviour, ClientError, Handle, MailboxPolicy, ManagerError, RawHandle,
};

/// Options of [`Manager::launch_with`].
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Human-readable name, shown by discovery.
    pub name: String,
    /// How the agent behaves at shutdown.
    pub config: AgentConfig,
    /// Run on this existing, ACTIVE mailbox (e.g. to restart an agent that shut
    /// down without terminating) instead of registering a new one.
    pub agent_id: Option<EntityId>,
}

type Outcome = Option<Result<(), AgentError>>;

#[derive(Debug)]
struct Managed {
    stop: StopSignal,
    outcome: watch::Receiver<Outcome>,
}

/// Launches and manages agents; hands out handles that share its mailbox.
#[derive(Debug)]
pub struct Manager {
    exchange: SharedExchange,
    mailbox: Arc<Mailbox>,
    agents: Mutex<HashMap<EntityId, Managed>>,
    direct: Option<crate::Endpoint>,
}

impl Manager {
    /// A manager on the given exchange client, with a new client mailbox.
    pub async fn new(exchange: SharedExchange) -> Result<Self, ClientError> {
        Self::open(exchange, None).await
    }

    /// A manager whose calls go directly to agents that advertise a peer
    /// endpoint, and whose agents (launched here, unless their config says
    /// otherwise) take requests at `endpoint` too (docs/design.md, "Direct
    /// delivery").
    pub async fn with_direct(
        exchange: SharedExchange,
        endpoint: crate::Endpoint,
    ) -> Result<Self, ClientError> {
        Self::open(exchange, Some(endpoint)).await
    }

    async fn open(
        exchange: SharedExchange,
        direct: Option<crate::Endpoint>,
    ) -> Result<Self, ClientError> {
        let id = exchange.register_client().await?;
        let options = crate::mailbox::DirectOptions { hosted: None, sends: direct.is_some() };
        let mailbox = Mailbox::open(exchange.clone(), id, 0, None, options).await?;
        Ok(Self { exchange, mailbox, agents: Mutex::default(), direct })
    }

    /// This manager, whose handles send arguments of `bytes` or more by
    /// reference, kept in the exchange's blob store, or at the agent's peer
    /// endpoint for calls that go directly (docs/design.md, "Blobs"); by
    /// default [`DEFAULT_BLOB_THRESHOLD`](crate::blob::DEFAULT_BLOB_THRESHOLD),
    /// `usize::MAX`: never. Agents have their own
    /// ([`AgentConfig::blob_threshold`]).
    pub fn with_blob_threshold(self, bytes: usize) -> Self {
        self.mailbox.set_blob_threshold(bytes);
        self
    }

    /// This manager, whose handles keep the blobs they send as files under
    /// `dir`, a directory the processes on this node share, and read the
    /// ones they receive from it (docs/design.md, "Blobs"): the bytes never
    /// leave the node. The agents it calls must be given the same directory
    /// ([`AgentConfig::blob_dir`]).
    pub fn with_blob_dir(self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.mailbox.set_blob_dir(dir.into());
        self
    }

    /// Keeps the `size` bytes `reader` yields as a blob of this manager's
    /// mailbox, read and sent a chunk at a time, to pass to agents by
    /// reference (docs/design.md, "Blobs"). Free it with
    /// [`Blob::delete`](crate::blob::Blob::delete) when done.
    pub async fn put_blob<R>(&self, reader: R, size: u64) -> Result<crate::blob::Blob, ClientError>
    where
        R: tokio::io::AsyncRead + Send + Unpin + 'static,
    {
        crate::blob::put_from(&self.exchange, &self.mailbox.id(), reader, size).await
    }

    /// [`put_blob`](Self::put_blob) of the file at `path`.
    pub async fn put_file(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<crate::blob::Blob, ClientError> {
        let path = path.as_ref();
        let named = |e: std::io::Error| ClientError::Transport(format!("{}: {e}", path.display()));
        let file = tokio::fs::File::open(path).await.map_err(named)?;
        let size = file.metadata().await.map_err(named)?.len();
        self.put_blob(file, size).await
    }

    /// A manager talking gRPC to the exchange-server at `url`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::new(Arc::new(GrpcExchange::connect(url).await?)).await
    }

    /// A manager on a fresh in-process exchange: no server, for tests and
    /// single-process programs.
    #[cfg(feature = "embedded")]
    pub async fn in_process() -> Result<Self, ClientError> {
        Self::new(Arc::new(crate::exchange::LocalExchange::default())).await
    }

    /// The exchange client it uses.
    pub fn exchange(&self) -> &SharedExchange {
        &self.exchange
    }

    /// Drives the simulated clock of its exchange (docs/design.md, "Clocks").
    pub fn simulator(&self) -> crate::clock::Simulator {
        crate::clock::Simulator::new(self.exchange.clone())
    }

    /// This manager's client mailbox id.
    pub fn client_id(&self) -> EntityId {
        self.mailbox.id()
    }

    /// Registers a new agent and runs `behaviour` as it in this process.
    pub async fn launch<B: Behaviour>(&self, behaviour: B) -> Result<Handle<B>, ClientError> {
        self.launch_with(behaviour, LaunchOptions::default()).await
    }

    /// Runs `behaviour` as an agent in this process, as `options` say.
    pub async fn launch_with<B: Behaviour>(
        &self,
        behaviour: B,
        options: LaunchOptions,
    ) -> Result<Handle<B>, ClientError> {
        let id = match options.agent_id {
            Some(id) => {
                if lock(&self.agents).get(&id).is_some_and(|a| a.outcome.borrow().is_none()) {
                    return Err(ExchangeError::AlreadyExists(id).into());
                }
                match self.exchange.status(&id).await?.state {
                    MailboxState::Active => id,
                    MailboxState::Terminated => return Err(ExchangeError::Terminated(id).into()),
                    MailboxState::Missing | MailboxState::Unspecified => {
                        return Err(ExchangeError::NotFound(id).into());
                    }
                }
            }
            None => {
                let description = Some(B::describe());
                self.exchange
                    .register_agent(B::NAME, B::IMPLEMENTS, &options.name, None, description)
                    .await?
            }
        };
        let stop = StopSignal::default();
        let (report, outcome) = watch::channel(None);
        let mut config = options.config;
        if config.direct.is_none() {
            config.direct = self.direct.clone();
        }
        let task = tokio::spawn(runtime::run(
            Arc::new(behaviour),
            id,
            0,
            self.exchange.clone(),
            config,
            stop.clone(),
        ));
        tokio::spawn(async move {
            let result = task.await.unwrap_or(Err(AgentError::Panicked { id }));
            let _ = report.send(Some(result));
        });
        lock(&self.agents).insert(id, Managed { stop, outcome });
        Ok(self.handle(id))
    }

    /// Launches behaviour `B` on a worker node through `launcher` (built there
    /// from `config`); the handle works as for agents launched here. Stop it
    /// with [`Launcher::stop`](crate::launcher::Launcher::stop).
    pub async fn launch_remote<B: Behaviour>(
        &self,
        launcher: &crate::launcher::Launcher,
        config: &impl serde::Serialize,
        options: crate::launcher::RemoteLaunch,
    ) -> Result<Handle<B>, ClientError> {
        let record = launcher.launch::<B>(config, options).await?;
        let id = EntityId::parse_field(&record.agent_id, "agent_id")?;
        Ok(self.handle(id))
    }

    /// A handle to agent `id` that calls from this manager's mailbox.
    pub fn handle<B: Behaviour>(&self, id: EntityId) -> Handle<B> {
        Handle::from_raw(self.raw_handle(id))
    }

    /// An untyped handle to agent `id`, e.g. one found by discovery.
    pub fn raw_handle(&self, id: EntityId) -> RawHandle {
        RawHandle::new(id, Some(self.mailbox.clone()))
    }

    /// Active agents implementing `name` (or, [`Matching::Exact`], of
    /// behaviour `name`), in id order; every active agent for the empty name.
    pub async fn discover(
        &self,
        name: &str,
        matching: Matching,
    ) -> Result<Vec<RegisteredAgent>, ClientError> {
        self.exchange.discover(name, matching).await
    }

    /// Agents launched here that are still running.
    pub fn running(&self) -> Vec<EntityId> {
        lock(&self.agents)
            .iter()
            .filter(|(_, a)| a.outcome.borrow().is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Waits until agent `id` stops; its error if it failed.
    pub async fn wait(&self, id: EntityId, timeout: Option<Duration>) -> Result<(), ManagerError> {
        let mut outcome = lock(&self.agents)
            .get(&id)
            .map(|a| a.outcome.clone())
            .ok_or(ManagerError::UnknownAgent(id))?;
        let done = async {
            let result = outcome.wait_for(Option::is_some).await;
            result.ok().and_then(|r| r.clone()).unwrap_or(Err(AgentError::Panicked { id }))
        };
        let result = match timeout {
            Some(t) => {
                tokio::time::timeout(t, done).await.map_err(|_| ManagerError::Timeout(id, t))?
            }
            None => done.await,
        };
        Ok(result?)
    }

    /// Signals agent `id` to shut down, doing with its mailbox what `mailbox`
    /// says, and waits for it to stop.
    pub async fn shutdown(
        &self,
        id: EntityId,
        mailbox: MailboxPolicy,
        timeout: Option<Duration>,
    ) -> Result<(), ManagerError> {
        let stop = lock(&self.agents).get(&id).map(|a| a.stop.clone());
        stop.ok_or(ManagerError::UnknownAgent(id))?.stop(mailbox.terminate());
        self.wait(id, timeout).await
    }

    /// Shuts every agent down, waits for them, and terminates the manager's
    /// mailbox. Reports the agents that failed.
    pub async fn close(self) -> Result<(), ManagerError> {
        let ids: Vec<EntityId> = {
            let agents = lock(&self.agents);
            agents.values().for_each(|a| a.stop.stop(None));
            agents.keys().copied().collect()
        };
        let mut failures = Vec::new();
        for id in ids {
            if let Err(ManagerError::Agent(e)) = self.wait(id, None).await {
                failures.push(e);
            }
        }
        self.mailbox.close().await;
        self.exchange.terminate(&self.mailbox.id()).await?;
        if failures.is_empty() { Ok(()) } else { Err(ManagerError::Agents(failures)) }
    }
}
