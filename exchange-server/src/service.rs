//! The `academy.v1.ExchangeService` gRPC service over an [`Exchange`].

use std::borrow::Cow;
use std::pin::Pin;
use std::time::Duration;

use academy_proto::pb::{self, exchange_service_server};
use academy_proto::trace::{self, Traced};
use academy_proto::{EntityId, ExchangeError, Matching, duration, json};
use academy_server::auth::{Authenticator, Grant, Principal, until_revoked};
use academy_server::page;
use futures::{Stream, StreamExt as _};
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use prost::Message as _;
use tonic::{Code, Request, Response, Status};

use crate::metrics::ExchangeMetrics;
use crate::{Exchange, limits, session};

/// Invoke's wait when neither `timeout` nor a call deadline is given.
const DEFAULT_INVOKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The gRPC face of an exchange (`academy.v1.ExchangeService`).
#[derive(Debug, Clone)]
pub struct ExchangeGrpc {
    exchange: Exchange,
    metrics: ExchangeMetrics,
    /// What authenticates its calls: CheckTicket asks it whether a ticket's
    /// token still stands.
    auth: Authenticator,
}

impl ExchangeGrpc {
    /// Serves `exchange`. Behind an [`Authenticator`] with tokens, give it
    /// that authenticator ([`with_authenticator`](Self::with_authenticator)),
    /// or the tickets it issues are refused when checked.
    pub fn new(exchange: Exchange) -> Self {
        let auth = Authenticator::default();
        Self { exchange, metrics: ExchangeMetrics::default(), auth }
    }

    /// Counts messages and subscriptions in `metrics` (registered by the server).
    pub(crate) fn with_metrics(self, metrics: ExchangeMetrics) -> Self {
        Self { metrics, ..self }
    }

    /// Checks tickets against the tokens `auth` uses (the authenticator its
    /// calls pass through).
    pub fn with_authenticator(self, auth: Authenticator) -> Self {
        Self { auth, ..self }
    }

    fn exchange_for<T>(&self, request: &Request<T>) -> Cow<'_, Exchange> {
        self.exchange.for_request(request)
    }
}

impl Exchange {
    /// This exchange, acting for the principal that made `request` (no
    /// copy when calls are not authenticated: sends are the hot path).
    pub(crate) fn for_request<T>(&self, request: &Request<T>) -> Cow<'_, Exchange> {
        match Principal::of(request) {
            None => Cow::Borrowed(self),
            principal => Cow::Owned(self.acting_as(principal)),
        }
    }
}

/// Counts the results of messages accepted together (spans from
/// [`accepting_all`]), each as SendBatch answers it.
pub(crate) fn send_results(
    metrics: &ExchangeMetrics,
    results: Vec<Result<(), ExchangeError>>,
    traced: &[Option<Traced>],
) -> Vec<pb::SendResult> {
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            if let (Some(Some(traced)), Err(e)) = (traced.get(i), &r) {
                traced.fail(&e.to_string());
            }
            metrics.sent(&r);
            r.map_or_else(|e| failure(&e), |()| pb::SendResult::default())
        })
        .collect()
}

/// An error as a result: the code, message and reason its call would answer.
pub(crate) fn failure(e: &ExchangeError) -> pb::SendResult {
    pb::SendResult {
        code: e.code() as i32,
        message: academy_proto::bounded(&e.to_string()).into_owned(),
        reason: e.reason().to_owned(),
        metadata: e.metadata(),
    }
}

/// Counts and traces deliveries on their way to a subscriber.
pub(crate) fn delivered(open: &Open, deliveries: Vec<pb::Delivery>) -> pb::SubscribeResponse {
    open.0.delivered.inc_by(deliveries.len() as u64);
    if trace::recording() {
        deliveries.iter().for_each(delivering);
    }
    pb::SubscribeResponse { deliveries }
}

fn parse_optional_id(value: &str, field: &str) -> Result<Option<EntityId>, ExchangeError> {
    (!value.is_empty()).then(|| EntityId::parse_field(value, field)).transpose()
}

type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl exchange_service_server::ExchangeService for ExchangeGrpc {
    #[tracing::instrument(skip_all, fields(behaviour = %request.get_ref().behaviour))]
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> RpcResult<pb::RegisterAgentResponse> {
        let exchange = self.exchange_for(&request);
        let req = request.into_inner();
        let id = parse_optional_id(&req.agent_id, "agent_id")?;
        let id = exchange
            .register_agent(&req.behaviour, req.implements, req.name, id, req.description)
            .await?;
        Ok(Response::new(pb::RegisterAgentResponse { agent_id: id.to_string() }))
    }

    #[tracing::instrument(skip_all)]
    async fn register_client(
        &self,
        request: Request<pb::RegisterClientRequest>,
    ) -> RpcResult<pb::RegisterClientResponse> {
        let id = self.exchange_for(&request).register_client().await?;
        Ok(Response::new(pb::RegisterClientResponse { client_id: id.to_string() }))
    }

    #[tracing::instrument(skip_all, fields(mailbox = %request.get_ref().mailbox_id))]
    async fn terminate(
        &self,
        request: Request<pb::TerminateRequest>,
    ) -> RpcResult<pb::TerminateResponse> {
        let id = EntityId::parse_field(&request.get_ref().mailbox_id, "mailbox_id")?;
        let previous = self.exchange_for(&request).terminate(&id).await?;
        Ok(Response::new(pb::TerminateResponse { previous_state: previous.into() }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> RpcResult<pb::StatusResponse> {
        let id = EntityId::parse_field(&request.get_ref().mailbox_id, "mailbox_id")?;
        let status = self.exchange.status(&id).await?;
        Ok(Response::new(status.into()))
    }

    async fn discover(
        &self,
        request: Request<pb::DiscoverRequest>,
    ) -> RpcResult<pb::DiscoverResponse> {
        let req = request.into_inner();
        let after = parse_optional_id(&req.page_token, "page_token")?;
        // Descriptions are up to 64 KiB each: fewer agents at a time then.
        let most = if req.describe { limits::MAX_DESCRIBED_PAGE } else { MAX_DISCOVER_PAGE };
        let limit = Some(page::size(req.page_size, most));
        let owner = (!req.owner.is_empty()).then_some(req.owner.as_str());
        let matching = Matching::exact(req.exact);
        let (agents, next) =
            self.exchange.discover_page(&req.behaviour, matching, after, limit, owner).await?;
        let descriptions = if req.describe {
            let ids: Vec<EntityId> = agents.iter().map(|a| a.id).collect();
            self.exchange.descriptions(&ids).await?
        } else {
            Vec::new()
        };
        let mut agents: Vec<pb::AgentInfo> = agents.into_iter().map(Into::into).collect();
        for (agent, description) in agents.iter_mut().zip(descriptions) {
            agent.description = description.map(|d| (*d).clone());
        }
        let keep = page::fit(&agents);
        let next_page_token = if keep < agents.len() {
            agents.truncate(keep);
            agents[keep - 1].agent_id.clone()
        } else {
            next.map(|id| id.to_string()).unwrap_or_default()
        };
        Ok(Response::new(pb::DiscoverResponse { agents, next_page_token }))
    }

    async fn describe(
        &self,
        request: Request<pb::DescribeRequest>,
    ) -> RpcResult<pb::DescribeResponse> {
        let id = EntityId::parse_field(&request.get_ref().agent_id, "agent_id")?;
        let agent = self.exchange.describe(&id).await?;
        let description = agent.description.as_deref().cloned();
        let info = pb::AgentInfo { description, ..agent.into() };
        Ok(Response::new(pb::DescribeResponse { agent: Some(info) }))
    }

    async fn send(&self, request: Request<pb::SendRequest>) -> RpcResult<pb::SendResponse> {
        let exchange = self.exchange_for(&request);
        let message = request
            .into_inner()
            .message
            .ok_or_else(|| ExchangeError::InvalidArgument("message is missing".into()))?;
        let traced = accepting(&message, "Send");
        let result = exchange.send(message).await;
        if let (Some(traced), Err(e)) = (&traced, &result) {
            traced.fail(&e.to_string());
        }
        self.metrics.sent(&result);
        result?;
        Ok(Response::new(pb::SendResponse {}))
    }

    async fn send_batch(
        &self,
        request: Request<pb::SendBatchRequest>,
    ) -> RpcResult<pb::SendBatchResponse> {
        let exchange = self.exchange_for(&request);
        let messages = request.into_inner().messages;
        let traced = accepting_all(&messages, "SendBatch");
        let results = exchange.send_batch(messages).await?;
        let results = send_results(&self.metrics, results, &traced);
        Ok(Response::new(pb::SendBatchResponse { results }))
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> RpcResult<pb::CommitResponse> {
        let exchange = self.exchange_for(&request);
        let req = request.into_inner();
        let save = req.state.unwrap_or_default();
        let id = EntityId::parse_field(&save.agent_id, "state.agent_id")?;
        let traced = accepting_all(&req.answers, "Commit");
        let (revision, results) = exchange.commit(&id, save, req.seqs, req.answers).await?;
        let results = send_results(&self.metrics, results, &traced);
        Ok(Response::new(pb::CommitResponse { revision, results }))
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

    #[tracing::instrument(skip_all, fields(mailbox = %request.get_ref().mailbox_id))]
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> RpcResult<Self::SubscribeStream> {
        let id = EntityId::parse_field(&request.get_ref().mailbox_id, "mailbox_id")?;
        let (epoch, endpoint) = (request.get_ref().epoch, request.get_ref().endpoint.clone());
        let grant = Grant::of(&request);
        let subscription = self.exchange_for(&request).subscribe_at(&id, epoch, &endpoint).await?;
        tracing::debug!("subscriber attached");
        let open = Open::new(self.metrics.clone());
        let stream = subscription.into_stream().map(move |batch| Ok(delivered(&open, batch?)));
        Ok(Response::new(Box::pin(until_revoked(stream, grant))))
    }

    async fn issue_ticket(
        &self,
        request: Request<pb::IssueTicketRequest>,
    ) -> RpcResult<pb::IssueTicketResponse> {
        let id = EntityId::parse_field(&request.get_ref().mailbox_id, "mailbox_id")?;
        // A ticket lasts no longer than the token it was issued to: it keeps
        // the token's fingerprint, which CheckTicket looks for in the tokens
        // in use, on whichever replica answers it.
        let granted = Grant::of(&request).map(|grant| grant.fingerprint());
        let exchange = self.exchange_for(&request);
        let (ticket, ttl) = exchange.issue_ticket(&id, granted.as_deref()).await?;
        let expires_in = Some(duration::to_proto(ttl));
        Ok(Response::new(pb::IssueTicketResponse { ticket, expires_in }))
    }

    async fn check_ticket(
        &self,
        request: Request<pb::CheckTicketRequest>,
    ) -> RpcResult<pb::CheckTicketResponse> {
        let ticket = self.exchange.check_ticket(&request.get_ref().ticket).await?;
        if ticket.granted.is_some_and(|granted| !self.auth.still_grants(&granted)) {
            let revoked = "the token this ticket was issued to was revoked";
            return Err(ExchangeError::Unauthenticated(revoked.into()).into());
        }
        let expires_in = Some(duration::to_proto(ticket.left));
        let mailbox_id = ticket.mailbox.to_string();
        Ok(Response::new(pb::CheckTicketResponse { mailbox_id, expires_in }))
    }

    type SessionStream = Pin<Box<dyn Stream<Item = session::Outgoing> + Send>>;

    async fn session(
        &self,
        request: Request<tonic::Streaming<pb::SessionRequest>>,
    ) -> RpcResult<Self::SessionStream> {
        let exchange = self.exchange_for(&request).into_owned();
        let grant = Grant::of(&request);
        let max_request = exchange.limits().max_request_bytes();
        let answers = session::spawn(exchange, self.metrics.clone(), request.into_inner());
        let stream = tokio_stream::wrappers::ReceiverStream::new(answers);
        let mut response = Response::new(Box::pin(until_revoked(stream, grant)) as _);
        let header = academy_proto::transport::MAX_REQUEST_BYTES_HEADER;
        response.metadata_mut().insert(header, max_request.into());
        Ok(response)
    }

    async fn acknowledge(
        &self,
        request: Request<pb::AcknowledgeRequest>,
    ) -> RpcResult<pb::AcknowledgeResponse> {
        let req = request.get_ref();
        let id = EntityId::parse_field(&req.mailbox_id, "mailbox_id")?;
        self.exchange_for(&request).acknowledge(&id, &req.seqs).await?;
        Ok(Response::new(pb::AcknowledgeResponse {}))
    }

    async fn save_state(
        &self,
        request: Request<pb::SaveStateRequest>,
    ) -> RpcResult<pb::SaveStateResponse> {
        let exchange = self.exchange_for(&request);
        let req = request.into_inner();
        let id = EntityId::parse_field(&req.agent_id, "agent_id")?;
        let data = req.data.unwrap_or_default();
        let revision =
            exchange.save_state(&id, req.epoch, req.expected_revision, data, req.version).await?;
        Ok(Response::new(pb::SaveStateResponse { revision }))
    }

    async fn load_state(
        &self,
        request: Request<pb::LoadStateRequest>,
    ) -> RpcResult<pb::LoadStateResponse> {
        let exchange = self.exchange_for(&request);
        let id = EntityId::parse_field(&request.get_ref().agent_id, "agent_id")?;
        let state = exchange.load_state(&id).await?;
        Ok(Response::new(pb::LoadStateResponse { state }))
    }

    #[tracing::instrument(skip_all, fields(agent = %request.get_ref().agent_id, action = %request.get_ref().action))]
    async fn invoke(&self, request: Request<pb::InvokeRequest>) -> RpcResult<pb::InvokeResponse> {
        let deadline = grpc_timeout(request.metadata());
        // A caller's trace context in the metadata, as OpenTelemetry's gRPC
        // instrumentation sends it: the agent's span is a child of this call.
        let parent = trace::of_metadata(request.metadata());
        let exchange = self.exchange_for(&request);
        let req = request.into_inner();
        let agent = EntityId::parse_field(&req.agent_id, "agent_id")?;
        if !agent.is_agent() {
            let message = format!("agent_id {agent} is a client, which serves no actions");
            return Err(ExchangeError::InvalidArgument(message).into());
        }
        if req.action.is_empty() {
            return Err(ExchangeError::InvalidArgument("action is empty".into()).into());
        }
        let asked = req.timeout.map(|t| duration::from_proto(t, "timeout")).transpose()?;
        let timeout = match (asked, deadline) {
            (None, None) => DEFAULT_INVOKE_TIMEOUT,
            (None, Some(d)) => d,
            (Some(t), d) => t.min(d.unwrap_or(Duration::MAX)),
        };
        let args = req.args.map_or(serde_json::Value::Array(Vec::new()), json::from_proto);
        let traced = Traced::start(
            || format!("Invoke {}", req.action),
            SpanKind::Server,
            parent,
            || vec![KeyValue::new("academy.destination", agent.to_string())],
        );
        let reply =
            crate::invoke::invoke(&exchange, agent, &req.action, &args, timeout, traced.context())
                .await
                .inspect_err(|e| traced.fail(&e.to_string()))?;
        if let Err(error) = &reply {
            traced.fail(&format!("{}: {}", error.kind, error.message));
        }
        match reply {
            Ok(result) => {
                let response = pb::InvokeResponse { result: Some(json::to_proto(result)) };
                // JSON as protobuf values may be larger than the agent's
                // answer: the caller must be able to receive it.
                let (size, limit) = (response.encoded_len(), exchange.limits().max_delivery_bytes);
                if size > limit {
                    return Err(ExchangeError::TooLarge { size, limit }.into());
                }
                Ok(Response::new(response))
            }
            Err(err) => {
                let message = format!("{}: {}", err.kind, err.message);
                let message = academy_proto::bounded(&message).into_owned();
                Err(Status::new(Code::from_i32(err.code), message))
            }
        }
    }
}

/// The call's deadline from its `grpc-timeout` header ("<digits><unit>").
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Counts a subscription open while it lives (in its stream).
#[derive(Debug)]
pub(crate) struct Open(ExchangeMetrics);

impl Open {
    pub(crate) fn new(metrics: ExchangeMetrics) -> Self {
        metrics.subscriptions.inc();
        Self(metrics)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.subscriptions.dec();
    }
}

/// Most agents in one Discover answer, whatever `page_size` asks; 0 asks for
/// this many. About 80 bytes each (and at most `page::MAX_PAGE_BYTES`).
const MAX_DISCOVER_PAGE: u32 = 10_000;

/// The span of accepting `message` into its mailbox (by `Send` or
/// `SendBatch`), under its sender's, while spans are recorded and the
/// message carries a context.
fn accepting(message: &pb::Message, call: &'static str) -> Option<Traced> {
    let header =
        message.header.as_ref().filter(|h| trace::recording() && !h.traceparent.is_empty())?;
    Some(Traced::start(
        || "accept".to_owned(),
        SpanKind::Server,
        trace::of_header(header),
        || {
            vec![
                KeyValue::new("academy.destination", header.dest.clone()),
                KeyValue::new("rpc.method", call),
            ]
        },
    ))
}

/// [`accepting`] for each of `messages`; nothing while spans are not recorded.
pub(crate) fn accepting_all(messages: &[pb::Message], call: &'static str) -> Vec<Option<Traced>> {
    if !trace::recording() {
        return Vec::new();
    }
    messages.iter().map(|m| accepting(m, call)).collect()
}

/// Marks a message's delivery to its subscriber, under its sender's span.
fn delivering(delivery: &pb::Delivery) {
    let Some(header) = delivery.message.as_ref().and_then(|m| m.header.as_ref()) else { return };
    if header.traceparent.is_empty() {
        return;
    }
    Traced::mark(
        || "deliver".to_owned(),
        SpanKind::Producer,
        || trace::of_header(header),
        || {
            vec![
                KeyValue::new("academy.destination", header.dest.clone()),
                KeyValue::new("academy.seq", delivery.seq as i64),
            ]
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        md.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(Duration::from_millis(250)));
        md.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(Duration::from_secs(3)));
        md.insert("grpc-timeout", "3X".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }
}
