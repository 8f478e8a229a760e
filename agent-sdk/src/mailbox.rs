//! One mailbox, multiplexed: responses go to the call waiting for their tag,
//! requests to the agent runtime. Acknowledgements are batched.

use academy_proto::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use academy_proto::pb::{self, message::Body};
use academy_proto::trace::{self, Traced};
use academy_proto::{EntityId, ExchangeError};
use futures::StreamExt as _;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::blob::{Freed, Stores};
use crate::direct::{Direct, Pending};
use crate::exchange::{DeliveryStream, SharedExchange};
use crate::{ClientError, HandleError};

/// Requests delivered to an agent, with their seq for acknowledging them.
pub(crate) type Requests = mpsc::UnboundedSender<(u64, pb::Message)>;

const MAX_ACK_BATCH: usize = 1024;
/// How long acknowledgements wait to be sent together. A message acknowledged
/// but not yet reported is delivered again if the subscriber dies meanwhile,
/// which at-least-once delivery allows.
const ACK_LINGER: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Debug)]
enum Ack {
    Seq(u64),
    Flush(oneshot::Sender<()>),
}

/// How a mailbox takes part in direct delivery (docs/design.md, "Direct
/// delivery").
#[derive(Debug, Default)]
pub(crate) struct DirectOptions {
    /// The peer endpoint its subscriber takes requests at, advertised with
    /// the subscription; it keeps the blobs of its answers to them.
    pub(crate) hosted: Option<crate::Endpoint>,
    /// Its requests go directly to agents that advertise an endpoint.
    pub(crate) sends: bool,
}

#[derive(Debug)]
pub(crate) struct Mailbox {
    id: EntityId,
    exchange: SharedExchange,
    pending: Pending,
    /// Where its requests go directly, when they can.
    direct: Option<Arc<Direct>>,
    /// Why the mailbox stopped receiving, once it has.
    closed_because: Mutex<Option<HandleError>>,
    /// Where its large payloads go, and those it receives are found.
    stores: Arc<Stores>,
    acks: mpsc::UnboundedSender<Ack>,
    closed: CancellationToken,
}

impl Mailbox {
    /// Subscribes to mailbox `id`, as incarnation `epoch` of its agent (0:
    /// none). Requests go to `requests`; without it (a client's mailbox) they
    /// are answered with an error.
    pub(crate) async fn open(
        exchange: SharedExchange,
        id: EntityId,
        epoch: u64,
        requests: Option<Requests>,
        direct: DirectOptions,
    ) -> Result<Arc<Self>, ClientError> {
        let endpoint = direct.hosted.as_ref().map(|e| e.url().to_owned()).unwrap_or_default();
        let stream = exchange.subscribe(&id, epoch, &endpoint).await?;
        let (acks, ack_jobs) = mpsc::unbounded_channel();
        let pending = Pending::default();
        let stores = Stores::new(exchange.clone(), id, direct.hosted);
        let mailbox = Arc::new(Self {
            id,
            exchange: exchange.clone(),
            direct: direct
                .sends
                .then(|| Direct::new(exchange.clone(), id, pending.clone(), stores.clone())),
            pending,
            closed_because: Mutex::default(),
            stores,
            acks,
            closed: CancellationToken::new(),
        });
        tokio::spawn(ack_loop(exchange, id, ack_jobs));
        tokio::spawn(read_loop(Arc::downgrade(&mailbox), stream, epoch, endpoint, requests));
        Ok(mailbox)
    }

    pub(crate) fn id(&self) -> EntityId {
        self.id
    }

    pub(crate) fn exchange(&self) -> &SharedExchange {
        &self.exchange
    }

    /// Sends payloads of `bytes` or more by reference from now on
    /// (docs/design.md, "Blobs").
    pub(crate) fn set_blob_threshold(&self, bytes: usize) {
        self.stores.set_threshold(bytes);
    }

    /// Keeps the blobs it sends in files under `dir`, and finds there the
    /// ones it receives (the file store; set once).
    pub(crate) fn set_blob_dir(&self, dir: std::path::PathBuf) {
        self.stores.set_dir(dir);
    }

    /// Where its blobs are kept and found.
    pub(crate) fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    /// `payload`, a result, kept as a blob of this mailbox if it is large
    /// enough: at its endpoint for an answer that goes back `directly`.
    pub(crate) async fn offload(
        &self,
        payload: pb::Payload,
        directly: bool,
    ) -> Result<pb::Payload, ClientError> {
        if !self.stores.is_large(&payload) {
            return Ok(payload);
        }
        // Boxed: the calls that never get here do not carry its state.
        Box::pin(self.stores.offload(payload, directly)).await
    }

    /// `payload` with its blob's bytes, if it refers to one; a peer blob
    /// only if kept at this mailbox's endpoint, unless `remote`.
    pub(crate) async fn resolve(
        &self,
        payload: Option<pb::Payload>,
        remote: bool,
    ) -> Result<Option<pb::Payload>, ClientError> {
        match payload {
            Some(p) if p.blob.is_some() => Box::pin(self.stores.resolve(Some(p), remote)).await,
            other => Ok(other),
        }
    }

    /// Sends request `message` (through its direct path, if it has one),
    /// its large arguments by reference; what to free once it is answered.
    async fn send_request(&self, message: pb::Message) -> Result<Option<Freed>, ClientError> {
        match &self.direct {
            Some(direct) => direct.send(message).await,
            None => self.stores.send(message).await,
        }
    }

    /// Sends a request to `dest` and waits for its response.
    pub(crate) async fn request(
        &self,
        dest: EntityId,
        body: Body,
        timeout: Option<Duration>,
    ) -> Result<pb::Message, HandleError> {
        let tag = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        if let Some(reason) = lock(&self.closed_because).clone() {
            return Err(reason);
        }
        lock(&self.pending).insert(tag.clone(), tx);
        let _pending = PendingGuard { mailbox: self, tag: &tag };
        let mut header = pb::Header {
            src: self.id.to_string(),
            dest: dest.to_string(),
            tag: tag.clone(),
            ..Default::default()
        };
        // A client span under the caller's (inside an action: the action's),
        // which the agent's span will be a child of.
        let traced = Traced::start(
            || match &body {
                Body::ActionRequest(request) => format!("call {}", request.action),
                _ => "request".to_owned(),
            },
            SpanKind::Client,
            opentelemetry::Context::current(),
            || vec![KeyValue::new("academy.destination", dest.to_string())],
        );
        trace::stamp(&mut header, traced.context());
        let clock = crate::clock::current();
        let answer = if clock.is_simulated() {
            // Boxed: its clock marks would make every call's future larger.
            Box::pin(self.request_on_clock(&clock, header, body, rx, timeout)).await
        } else {
            let call = async {
                let message = pb::Message { header: Some(header), body: Some(body) };
                let _freed = self.send_request(message).await?;
                rx.await.map_err(|_| self.closed())?.map_err(HandleError::from)
            };
            // The timeout bounds the whole call, sending included.
            match timeout {
                Some(t) => {
                    tokio::time::timeout(t, call).await.map_err(|_| HandleError::Timeout(t))?
                }
                None => call.await,
            }
        };
        match &answer {
            Ok(pb::Message { body: Some(Body::ErrorResponse(error)), .. }) => {
                traced.fail(&error.message)
            }
            Err(error) => traced.fail(&error.to_string()),
            Ok(_) => {}
        }
        answer
    }

    /// Why a call got no answer: the mailbox closed.
    fn closed(&self) -> HandleError {
        lock(&self.closed_because)
            .clone()
            .unwrap_or_else(|| HandleError::Transport("mailbox closed".into()))
    }

    /// A call from a task on a simulated clock (docs/design.md, "Clocks"):
    /// the request goes on the clock, the task is idle while it waits, and
    /// the timeout is simulated time.
    async fn request_on_clock(
        &self,
        clock: &crate::clock::Clock,
        mut header: pb::Header,
        body: Body,
        answer: oneshot::Receiver<Result<pb::Message, ClientError>>,
        timeout: Option<Duration>,
    ) -> Result<pb::Message, HandleError> {
        use academy_proto::pb::MarkKind;
        header.on_clock = true;
        let (tag, answer_key) = (header.tag.clone(), header.answer_key());
        clock.mark_request(&tag, &answer_key).await;
        let message = pb::Message { header: Some(header), body: Some(body) };
        let _freed = match self.stores.send(message).await {
            Ok(freed) => freed,
            Err(e) => {
                clock.mark(MarkKind::Abandon, &tag).await;
                return Err(e.into());
            }
        };
        let deadline = match timeout {
            Some(t) => Some((clock.now().await + t, t)),
            None => None,
        };
        let Some((deadline, t)) = deadline else {
            clock.mark(MarkKind::Idle, "").await;
            let answered = answer.await.map_err(|_| self.closed());
            clock.mark(MarkKind::Take, &answer_key).await;
            return answered?.map_err(HandleError::from);
        };
        let key = clock.key(Some(&tag));
        let sleep = clock.sleep_as(&key, deadline);
        tokio::pin!(sleep);
        tokio::select! {
            answered = answer => {
                // The timeout cut short: running again, the answer received.
                clock.wake(&key).await;
                sleep.await;
                clock.mark(MarkKind::Abandon, &answer_key).await;
                answered.map_err(|_| self.closed())?.map_err(HandleError::from)
            }
            _ = &mut sleep => {
                clock.mark(MarkKind::Abandon, &answer_key).await;
                Err(HandleError::Timeout(t))
            }
        }
    }

    /// Sends a message without waiting for any answer.
    pub(crate) async fn send(&self, dest: EntityId, body: Body) -> Result<(), ClientError> {
        let mut header = pb::Header {
            src: self.id.to_string(),
            dest: dest.to_string(),
            tag: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        };
        trace::stamp(&mut header, &opentelemetry::Context::current());
        self.exchange.send(pb::Message { header: Some(header), body: Some(body) }).await
    }

    /// Answers `request` with `body` (same tag and label, back to its sender).
    pub(crate) async fn reply(&self, request: &pb::Header, body: Body) -> Result<(), ClientError> {
        let header = request.reply_from(self.id.to_string());
        self.exchange.send(pb::Message { header: Some(header), body: Some(body) }).await
    }

    /// Marks a delivered message as done; sent to the exchange in batches.
    pub(crate) fn ack(&self, seq: u64) {
        let _ = self.acks.send(Ack::Seq(seq));
    }

    /// Stops receiving and waits until every acknowledgement is sent.
    pub(crate) async fn close(&self) {
        self.closed.cancel();
        self.fail_pending(HandleError::Transport("mailbox closed".into()));
        let (tx, rx) = oneshot::channel();
        if self.acks.send(Ack::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Why the mailbox stopped receiving, once it has.
    pub(crate) fn closed_because(&self) -> Option<HandleError> {
        lock(&self.closed_because).clone()
    }

    fn fail_pending(&self, reason: HandleError) {
        lock(&self.closed_because).get_or_insert(reason);
        lock(&self.pending).clear();
    }

    fn route(&self, seq: u64, message: pb::Message, requests: Option<&Requests>) {
        match &message.body {
            Some(Body::ActionResponse(_) | Body::ErrorResponse(_) | Body::SuccessResponse(_)) => {
                self.ack(seq);
                let mut message = message;
                // Peer blobs are read where the answer came from: none did
                // through the exchange.
                if let Some(blob) = crate::blob::result_blob(&mut message)
                    && blob.store == crate::blob::PEER_STORE
                {
                    blob.endpoint.clear();
                }
                let tag = message.header.as_ref().map(|h| h.tag.as_str()).unwrap_or_default();
                if let (Some(direct), Some(src)) =
                    (&self.direct, message.header.as_ref().and_then(|h| h.src.parse().ok()))
                {
                    direct.answered(src, tag);
                }
                match lock(&self.pending).remove(tag) {
                    Some(waiter) => {
                        let _ = waiter.send(Ok(message));
                    }
                    None => {
                        tracing::debug!(mailbox = %self.id, tag, "response nobody waits for");
                        if let Some(Body::ActionResponse(response)) = &message.body {
                            let kept = response.result.as_ref().and_then(|p| p.blob.as_ref());
                            if kept.is_some() {
                                self.stores().free(kept);
                            }
                        }
                    }
                }
            }
            Some(_) => match requests {
                // Not acknowledged here: the agent does once it has answered.
                Some(requests) => {
                    let _ = requests.send((seq, message));
                }
                None => {
                    self.ack(seq);
                    if let Some(header) = message.header {
                        let exchange = self.exchange.clone();
                        let id = self.id;
                        tokio::spawn(async move {
                            let body = Body::ErrorResponse(pb::ErrorResponse {
                                code: tonic::Code::Unimplemented as i32,
                                kind: "NotAnAgent".into(),
                                message: format!("{id} is a client and serves no requests"),
                                details: HashMap::new(),
                            });
                            let reply = pb::Message {
                                header: Some(header.reply_from(id.to_string())),
                                body: Some(body),
                            };
                            let _ = exchange.send(reply).await;
                        });
                    }
                }
            },
            None => self.ack(seq),
        }
    }
}

/// Forgets a waiting call however it ends (answer, timeout, or the caller dropping it).
struct PendingGuard<'a> {
    mailbox: &'a Mailbox,
    tag: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.mailbox.pending).remove(self.tag);
        if let Some(direct) = &self.mailbox.direct {
            direct.forget(self.tag);
        }
    }
}

/// Receives deliveries until the mailbox is closed or terminated, subscribing
/// again (with backoff) when the stream breaks.
async fn read_loop(
    mailbox: Weak<Mailbox>,
    mut stream: DeliveryStream,
    epoch: u64,
    endpoint: String,
    requests: Option<Requests>,
) {
    let Some((id, exchange, closed)) =
        mailbox.upgrade().map(|m| (m.id, m.exchange.clone(), m.closed.clone()))
    else {
        return;
    };
    let fail = |reason: HandleError| {
        if let Some(m) = mailbox.upgrade() {
            m.fail_pending(reason);
        }
    };
    loop {
        let next = tokio::select! {
            () = closed.cancelled() => return,
            next = stream.next() => next,
        };
        let err = match next {
            Some(Ok(batch)) => {
                let Some(m) = mailbox.upgrade() else { return };
                for delivery in batch {
                    match delivery.message {
                        Some(message) => m.route(delivery.seq, message, requests.as_ref()),
                        None => m.ack(delivery.seq),
                    }
                }
                continue;
            }
            Some(Err(err)) => err,
            None => ClientError::Transport("subscription ended".into()),
        };
        match err {
            ClientError::Exchange(ExchangeError::Terminated(_) | ExchangeError::NotFound(_)) => {
                tracing::debug!(mailbox = %id, "mailbox terminated");
                return fail(HandleError::Terminated(id));
            }
            ClientError::Exchange(ExchangeError::Superseded(_)) => {
                tracing::warn!(mailbox = %id, "another subscriber took over this mailbox");
                return fail(HandleError::Transport(format!("{id} has another subscriber")));
            }
            err => tracing::warn!(mailbox = %id, error = %err, "subscription broke; resubscribing"),
        }
        let mut backoff = Duration::from_millis(50);
        stream = loop {
            tokio::select! {
                () = closed.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            match exchange.subscribe(&id, epoch, &endpoint).await {
                Ok(stream) => break stream,
                Err(ClientError::Exchange(
                    ExchangeError::Terminated(_) | ExchangeError::NotFound(_),
                )) => return fail(HandleError::Terminated(id)),
                // Ownership never changes, and a later incarnation keeps
                // the mailbox: asking again will not help.
                Err(ClientError::Exchange(
                    err @ (ExchangeError::PermissionDenied { .. }
                    | ExchangeError::StaleEpoch { .. }),
                )) => {
                    tracing::warn!(mailbox = %id, error = %err, "cannot resubscribe");
                    return fail(HandleError::Exchange(err));
                }
                Err(err) => {
                    tracing::debug!(mailbox = %id, error = %err, ?backoff, "resubscribe failed");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        tracing::info!(mailbox = %id, "resubscribed");
    }
}

async fn ack_loop(exchange: SharedExchange, id: EntityId, mut jobs: mpsc::UnboundedReceiver<Ack>) {
    let mut batch = Vec::new();
    while jobs.recv_many(&mut batch, MAX_ACK_BATCH).await > 0 {
        // Gather what else comes in the next moment (unless someone waits for
        // a flush): one call for many acknowledgements keeps them off the
        // path of the messages themselves.
        let linger = tokio::time::sleep(ACK_LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_ACK_BATCH && !batch.iter().any(|job| matches!(job, Ack::Flush(_))) {
            let room = MAX_ACK_BATCH - batch.len();
            tokio::select! {
                () = &mut linger => break,
                n = jobs.recv_many(&mut batch, room) => if n == 0 { break },
            }
        }
        let mut seqs = Vec::with_capacity(batch.len());
        let mut flushed = Vec::new();
        for job in batch.drain(..) {
            match job {
                Ack::Seq(seq) => seqs.push(seq),
                Ack::Flush(done) => flushed.push(done),
            }
        }
        if !seqs.is_empty() {
            match exchange.acknowledge(&id, seqs).await {
                Ok(())
                | Err(ClientError::Exchange(
                    ExchangeError::Terminated(_) | ExchangeError::NotFound(_),
                )) => {}
                // Unacknowledged messages are delivered again: at least once.
                Err(err) => tracing::warn!(mailbox = %id, error = %err, "acknowledge failed"),
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}
