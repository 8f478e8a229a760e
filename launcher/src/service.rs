//! The `academy.v1.LauncherService` gRPC service.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use academy_proto::pb::{self, AgentState, join_request::Body, launcher_service_server};
use academy_proto::{EntityId, ExchangeError, duration, json};
use academy_sdk::ClientError;
use academy_sdk::exchange::SharedExchange;
use academy_server::auth::{Grant, Principal, until_revoked};
use academy_server::page;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::{Cluster, matches};

/// The launcher's gRPC face (`academy.v1.LauncherService`).
#[derive(Debug, Clone)]
pub struct LauncherGrpc {
    cluster: Arc<Mutex<Cluster>>,
    /// Ends worker sessions and watches when the launcher shuts down.
    shutdown: tokio_util::sync::CancellationToken,
    exchange: SharedExchange,
    exchange_url: String,
    heartbeat_timeout: Duration,
    /// When calls are authenticated: the principal of the workers.
    worker_principal: Option<Arc<str>>,
}

impl LauncherGrpc {
    pub(crate) fn new(
        cluster: Cluster,
        shutdown: tokio_util::sync::CancellationToken,
        exchange: SharedExchange,
        exchange_url: String,
        heartbeat_timeout: Duration,
        worker_principal: Option<Arc<str>>,
    ) -> Self {
        let cluster = Arc::new(Mutex::new(cluster));
        Self { cluster, shutdown, exchange, exchange_url, heartbeat_timeout, worker_principal }
    }

    /// The launcher's own gauges, for its metrics registry.
    pub(crate) fn gauges(&self) -> crate::metrics::ClusterGauges {
        crate::metrics::ClusterGauges(self.cluster.clone())
    }

    /// Places the restored agents no worker brought back once `grace` is over.
    pub(crate) fn release_held_after(&self, grace: Duration) {
        let (cluster, shutdown) = (self.cluster.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(grace) => {
                    cluster.lock().unwrap_or_else(std::sync::PoisonError::into_inner).release_held();
                }
            }
        });
    }

    /// Forgets agents that finished more than `retention` ago, checking a
    /// few times per retention period (at least every minute).
    pub(crate) fn forget_finished_after(&self, retention: Duration) {
        let (cluster, shutdown) = (self.cluster.clone(), self.shutdown.clone());
        let every = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let forgotten = cluster
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .forget_finished(retention);
                if forgotten > 0 {
                    tracing::debug!(forgotten, "forgot agents past their retention");
                }
            }
        });
    }

    /// Terminates the mailboxes of agents that failed for good (see
    /// [`Cluster::take_given_up`]): no incarnation will take them, so what
    /// is queued there is answered with errors now, and so is what comes,
    /// rather than waiting for ever (and stopping a simulated clock).
    /// Retried while the exchange is unreachable, until shutdown.
    pub(crate) fn terminate_given_up(&self) {
        let ids = self.cluster().take_given_up();
        if ids.is_empty() {
            return;
        }
        let (exchange, shutdown) = (self.exchange.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            for id in ids {
                let Ok(mailbox) = id.parse::<EntityId>() else { continue };
                let mut backoff = Duration::from_millis(100);
                while let Err(e) = exchange.terminate(&mailbox).await {
                    tracing::warn!(agent = %id, error = %e, ?backoff, "cannot terminate a failed agent's mailbox; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                tracing::info!(agent = %id, "terminated the mailbox of an agent that failed for good");
            }
        });
    }

    /// Who makes `request`, to show them records.
    fn viewer<T>(&self, request: &Request<T>) -> Viewer {
        Viewer { caller: Principal::of(request), workers: self.worker_principal.clone() }
    }

    /// Refuses a caller other than the workers' principal (when calls are
    /// authenticated) from doing `what`.
    fn workers_only<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        match (&self.worker_principal, Principal::of(request)) {
            (Some(workers), Some(caller)) if workers != &caller => Err(Status::permission_denied(
                format!("only principal {workers:?} may {what}; you are {caller:?}"),
            )),
            _ => Ok(()),
        }
    }

    /// Waits until every change so far is persisted (no-op without a store).
    async fn persisted(&self) {
        let flushed = self.cluster().flushed();
        if let Some(flushed) = flushed {
            let _ = flushed.await;
        }
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Who looks at records: only an agent's owner and the workers' principal
/// see its config (it may hold secrets); without authentication, everyone.
#[derive(Debug, Clone)]
struct Viewer {
    caller: Option<Arc<str>>,
    workers: Option<Arc<str>>,
}

impl Viewer {
    fn show(&self, mut record: pb::AgentRecord) -> pb::AgentRecord {
        if let Some(caller) = &self.caller
            && **caller != *record.owner
            && self.workers.as_ref() != Some(caller)
        {
            record.config = None;
            record.config_redacted = true;
        }
        record
    }
}

fn exchange_status(err: ClientError) -> Status {
    match err {
        // The launcher's own token, not the caller's: a misconfiguration.
        ClientError::Exchange(ExchangeError::Unauthenticated(why)) => {
            tracing::error!(%why, "the exchange refused the launcher's credentials (its ACADEMY_TOKEN)");
            Status::internal(format!("the exchange refused the launcher's credentials: {why}"))
        }
        ClientError::Exchange(e) => e.into(),
        ClientError::Transport(e) => Status::unavailable(format!("exchange {e}")),
        ClientError::Refused { code, message } => Status::new(code, format!("exchange: {message}")),
    }
}

/// Most records in one ListAgents or ListWorkers answer; 0 asks for this many.
const MAX_LIST_PAGE: u32 = 1_000;

/// The agent id a page token names, if any.
fn page_token(token: &str, field: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    EntityId::parse_field(token, field)?;
    Ok(Some(token.to_owned()))
}

/// Cuts `items` to what fits in one answer; the token of the next page, when
/// more follow (`more`: beyond these items).
fn next_token<T: prost::Message>(
    items: &mut Vec<T>,
    more: bool,
    id: impl Fn(&T) -> &String,
) -> String {
    let keep = page::fit(items);
    if keep < items.len() || more {
        items.truncate(keep);
        items.last().map(|item| id(item).clone()).unwrap_or_default()
    } else {
        String::new()
    }
}

fn agent_id(value: &str) -> Result<String, Status> {
    EntityId::parse_field(value, "agent_id")?;
    Ok(value.to_owned())
}

type RpcResult<T> = Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl launcher_service_server::LauncherService for LauncherGrpc {
    #[tracing::instrument(skip_all, fields(behaviour = %request.get_ref().behaviour))]
    async fn launch_agent(
        &self,
        request: Request<pb::LaunchAgentRequest>,
    ) -> RpcResult<pb::LaunchAgentResponse> {
        let owner = Principal::of(&request).map(|p| p.to_string()).unwrap_or_default();
        let req = request.into_inner();
        if req.behaviour.is_empty() {
            return Err(Status::invalid_argument("behaviour is empty"));
        }
        let config = req.config.unwrap_or_else(|| json::to_proto(serde_json::json!({})));
        let Some(offered) = self.cluster().offered_as(&req.behaviour) else {
            let offered = self.cluster().offered();
            return Err(Status::failed_precondition(format!(
                "no registered worker offers behaviour {:?} (offered: {offered:?})",
                req.behaviour
            )));
        };
        let implements: Vec<&str> = offered.implements.iter().map(String::as_str).collect();
        let id = self
            .exchange
            .register_agent(&req.behaviour, &implements, &req.name, None, offered.description)
            .await
            .map_err(exchange_status)?;
        let record = pb::AgentRecord {
            agent_id: id.to_string(),
            behaviour: req.behaviour,
            name: req.name,
            config: Some(config),
            selector: req.selector,
            retry_limit: req.retry_limit,
            state: AgentState::Pending.into(),
            owner,
            ..Default::default()
        };
        let agent = self.cluster().launch(record);
        self.persisted().await;
        Ok(Response::new(pb::LaunchAgentResponse { agent: Some(agent) }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> RpcResult<pb::GetAgentResponse> {
        let id = agent_id(&request.get_ref().agent_id)?;
        let agent = self.cluster().agent(&id).cloned();
        let agent =
            agent.ok_or_else(|| Status::not_found(format!("no agent {id} was launched here")))?;
        Ok(Response::new(pb::GetAgentResponse { agent: Some(self.viewer(&request).show(agent)) }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> RpcResult<pb::ListAgentsResponse> {
        let viewer = self.viewer(&request);
        let req = request.into_inner();
        let after = page_token(&req.page_token, "page_token")?;
        let limit = page::size(req.page_size, MAX_LIST_PAGE);
        let filter = req.filter.unwrap_or_default();
        let (agents, next) = self.cluster().list(&filter, after.as_deref(), limit);
        let mut agents: Vec<_> = agents.into_iter().map(|a| viewer.show(a)).collect();
        let keep = page::fit(&agents);
        let next_page_token = if keep < agents.len() {
            agents.truncate(keep);
            agents.last().map(|a| a.agent_id.clone()).unwrap_or_default()
        } else {
            next.unwrap_or_default()
        };
        Ok(Response::new(pb::ListAgentsResponse { agents, next_page_token }))
    }

    type WatchAgentsStream = BoxStream<pb::WatchAgentsResponse>;

    async fn watch_agents(
        &self,
        request: Request<pb::WatchAgentsRequest>,
    ) -> RpcResult<Self::WatchAgentsStream> {
        let (viewer, grant) = (self.viewer(&request), Grant::of(&request));
        let filter = request.into_inner().filter.unwrap_or_default();
        let (now, changes) = self.cluster().watch();
        let now = futures::stream::iter(now).map(Ok);
        let changes = tokio_stream::wrappers::BroadcastStream::new(changes).map(|change| {
            change.map_err(|_| Status::aborted("this watcher fell behind; watch again"))
        });
        let stream = now
            .chain(changes)
            .filter(move |agent| {
                let shown = agent.as_ref().map_or(true, |a| matches(&filter, a));
                std::future::ready(shown)
            })
            .map(move |agent| {
                agent.map(|a| pb::WatchAgentsResponse { agent: Some(viewer.show(a)) })
            });
        Ok(Response::new(Box::pin(until_revoked(stream, grant))))
    }

    #[tracing::instrument(skip_all, fields(agent = %request.get_ref().agent_id))]
    async fn stop_agent(
        &self,
        request: Request<pb::StopAgentRequest>,
    ) -> RpcResult<pb::StopAgentResponse> {
        let id = agent_id(&request.get_ref().agent_id)?;
        let owner = self.cluster().agent(&id).map(|a| a.owner.clone()).unwrap_or_default();
        if let Some(caller) = Principal::of(&request)
            && !owner.is_empty()
            && *caller != *owner
            && self.worker_principal.as_ref() != Some(&caller)
        {
            return Err(Status::permission_denied(format!(
                "agent {id} was launched by principal {owner:?}: only it (or the workers' \
                 principal) may stop it; you are {caller:?}"
            )));
        }
        let req = request.into_inner();
        let running = self.cluster().stop(&id, req.terminate);
        let running =
            running.ok_or_else(|| Status::not_found(format!("no agent {id} was launched here")))?;
        // Not running: nobody else will terminate the mailbox.
        if !running && req.terminate {
            let mailbox: EntityId = id.parse().map_err(Status::from)?;
            self.exchange.terminate(&mailbox).await.map_err(exchange_status)?;
        }
        self.persisted().await;
        let agent = self.cluster().agent(&id).cloned();
        Ok(Response::new(pb::StopAgentResponse { agent }))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> RpcResult<pb::ListWorkersResponse> {
        let req = request.into_inner();
        let after = (!req.page_token.is_empty()).then_some(req.page_token);
        let limit = page::size(req.page_size, MAX_LIST_PAGE);
        let (mut workers, more) = self.cluster().workers_after(after.as_deref(), limit);
        let next_page_token = next_token(&mut workers, more, |w| &w.worker_id);
        Ok(Response::new(pb::ListWorkersResponse { workers, next_page_token }))
    }

    async fn drain_worker(
        &self,
        request: Request<pb::DrainWorkerRequest>,
    ) -> RpcResult<pb::DrainWorkerResponse> {
        self.workers_only(&request, "drain workers")?;
        let pb::DrainWorkerRequest { worker_id, name } = request.get_ref();
        if worker_id.is_empty() && name.is_empty() {
            return Err(Status::invalid_argument("name a worker: worker_id or name"));
        }
        let mut cluster = self.cluster();
        let ids = if worker_id.is_empty() {
            cluster.workers_named(name)
        } else {
            vec![worker_id.clone()]
        };
        let drained: Vec<pb::WorkerRecord> =
            ids.iter().filter_map(|id| cluster.drain(id)).collect();
        let Some(worker) = drained.into_iter().next() else {
            let which = if worker_id.is_empty() {
                format!("named {}", academy_proto::excerpt(name))
            } else {
                academy_proto::excerpt(worker_id)
            };
            return Err(Status::not_found(format!("no worker {which} is registered")));
        };
        Ok(Response::new(pb::DrainWorkerResponse { worker: Some(worker) }))
    }

    type JoinStream = BoxStream<pb::JoinResponse>;

    async fn join(
        &self,
        request: Request<Streaming<pb::JoinRequest>>,
    ) -> RpcResult<Self::JoinStream> {
        self.workers_only(&request, "serve as a worker")?;
        let grant = Grant::of(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.heartbeat_timeout, inbound.next()).await;
        let register = match first {
            Ok(Some(Ok(pb::JoinRequest { body: Some(Body::Register(register)) }))) => register,
            Ok(Some(Err(status))) => return Err(status),
            _ => return Err(Status::invalid_argument("a worker's first message must be register")),
        };
        if register.capacity == 0 || register.behaviours.is_empty() {
            return Err(Status::invalid_argument(
                "a worker needs a capacity and at least one behaviour",
            ));
        }
        let worker_id = format!("worker:{}", uuid::Uuid::now_v7());
        let (tx, rx) = mpsc::unbounded_channel();
        let interval = self.heartbeat_timeout / 4;
        let welcome = pb::WorkerRegistered {
            worker_id: worker_id.clone(),
            heartbeat_interval: Some(duration::to_proto(interval)),
            lease: Some(duration::to_proto(self.heartbeat_timeout / 2)),
            exchange_url: self.exchange_url.clone(),
        };
        let _ =
            tx.send(pb::JoinResponse { body: Some(pb::join_response::Body::Registered(welcome)) });
        self.cluster().add_worker(worker_id.clone(), register, tx.clone());
        tokio::spawn(self.clone().serve_worker(worker_id, inbound, tx));
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(Ok)
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(until_revoked(outbound, grant))))
    }
}

impl LauncherGrpc {
    /// Follows one worker's stream until it ends or falls silent for the
    /// heartbeat timeout; then the worker is lost and its agents move.
    async fn serve_worker(
        self,
        worker_id: String,
        mut inbound: Streaming<pb::JoinRequest>,
        tx: mpsc::UnboundedSender<pb::JoinResponse>,
    ) {
        let why = loop {
            let next = tokio::select! {
                next = tokio::time::timeout(self.heartbeat_timeout, inbound.next()) => next,
                () = self.shutdown.cancelled() => return,
            };
            let body = match next {
                Err(_) => break format!("no heartbeat for {:?}", self.heartbeat_timeout),
                Ok(None) => break "its stream closed".to_owned(),
                Ok(Some(Err(status))) => break format!("its stream broke: {}", status.message()),
                Ok(Some(Ok(message))) => message.body,
            };
            if !self.cluster().has_worker(&worker_id) {
                break "it was removed".to_owned();
            }
            match body {
                Some(Body::Heartbeat(_)) => {
                    let pong = pb::join_response::Body::Heartbeat(pb::Heartbeat {});
                    let _ = tx.send(pb::JoinResponse { body: Some(pong) });
                }
                Some(Body::Report(report)) => {
                    self.cluster().report(&worker_id, report);
                    self.terminate_given_up();
                }
                Some(Body::Leaving(_)) => {
                    tracing::info!(worker = %worker_id, "worker shutting down; moving its agents");
                    self.cluster().drain(&worker_id);
                }
                Some(Body::Register(_)) | None => {}
            }
        };
        tracing::warn!(worker = %worker_id, reason = %why, "worker lost");
        self.cluster().remove_worker(&worker_id);
    }
}
