//! `Session`: one stream per connection for sends, subscriptions,
//! acknowledgements and commits (docs/design.md, "One stream per
//! connection"), each meaning what its unary call means.
//!
//! One task reads the stream. Sends run in that task, one batch after
//! another, so their order is the stream's (sends that arrived together go as
//! one batch); a subscription forwards its deliveries from a task of its own,
//! within its window; acknowledgements and commits run beside the reader,
//! at most [`MAX_CALLS_IN_FLIGHT`] at once (the reader waits beyond, and the
//! caller's stream with it).

use std::collections::HashMap;
use std::sync::Arc;

use academy_proto::pb::{self, session_request::Op, session_response::Op as Answer};
use academy_proto::{EntityId, ExchangeError};
use academy_server::grpc::StatusRules;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::metrics::ExchangeMetrics;
use crate::service::{Open, accepting_all, delivered, failure, send_results};
use crate::{Exchange, limits};

/// Bytes of deliveries a subscription may have sent and not had credited
/// back; it sends one more batch while it has less.
pub const SUBSCRIPTION_WINDOW_BYTES: u64 = 4 * 1024 * 1024;

/// Most subscriptions open at once on one stream.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// Most acknowledgements and commits of one stream running at once.
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Answers waiting to be written to the caller, per stream.
const ANSWERS_BUFFERED: usize = 256;

/// What the response stream carries.
pub(crate) type Outgoing = Result<pb::SessionResponse, Status>;

/// Serves one `Session` stream for `exchange` (acting for its caller) until
/// either side ends it; its answers go to `out`.
pub(crate) fn spawn(
    exchange: Exchange,
    metrics: ExchangeMetrics,
    inbound: Streaming<pb::SessionRequest>,
) -> mpsc::Receiver<Outgoing> {
    let (out, answers) = mpsc::channel(ANSWERS_BUFFERED);
    let stream = Stream {
        exchange,
        metrics,
        out,
        subscriptions: HashMap::new(),
        calls: Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT)),
    };
    tokio::spawn(stream.serve(inbound));
    answers
}

struct Stream {
    exchange: Exchange,
    metrics: ExchangeMetrics,
    out: mpsc::Sender<Outgoing>,
    /// Open subscriptions, by their call.
    subscriptions: HashMap<u64, Forwarding>,
    calls: Arc<Semaphore>,
}

/// The reader's handle on a subscription's task.
struct Forwarding {
    stop: CancellationToken,
    /// Bytes credited back so far.
    credited: watch::Sender<u64>,
}

type Frame = Result<Option<pb::SessionRequest>, Status>;

impl Stream {
    async fn serve(mut self, mut inbound: Streaming<pb::SessionRequest>) {
        let shutdown = self.exchange.shutdown_signal();
        let mut held: Option<Frame> = None;
        loop {
            let frame = match held.take() {
                Some(frame) => frame,
                None => tokio::select! {
                    () = shutdown.cancelled() => {
                        let end = Status::unavailable("the exchange is shutting down");
                        let _ = self.out.send(Err(end)).await;
                        break;
                    }
                    () = self.out.closed() => break,
                    frame = inbound.message() => frame,
                },
            };
            let request = match frame {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(status) => {
                    // A request that does not decode, or is too large: the
                    // stream cannot go on (where would the next one start?).
                    let rules = StatusRules::new(self.exchange.limits().max_message_bytes);
                    let _ = self.out.send(Err(rules.rewrite(&status).unwrap_or(status))).await;
                    break;
                }
            };
            let call = request.call;
            match request.op {
                Some(Op::Send(batch)) => {
                    held = self.send(call, batch.messages, &mut inbound).await;
                }
                Some(Op::Subscribe(request)) => self.subscribe(call, request).await,
                Some(Op::Acknowledge(request)) => self.acknowledge(call, request).await,
                Some(Op::Commit(request)) => self.commit(call, request).await,
                Some(Op::Unsubscribe(_)) => {
                    if let Some(forwarding) = self.subscriptions.remove(&call) {
                        forwarding.stop.cancel();
                    }
                }
                Some(Op::Credit(credit)) => {
                    if let Some(forwarding) = self.subscriptions.get(&call) {
                        forwarding.credited.send_modify(|c| *c = c.saturating_add(credit.bytes));
                    }
                }
                None => {
                    let missing = ExchangeError::InvalidArgument("op is missing".into());
                    self.answer(call, Answer::Failed(failure(&missing))).await;
                }
            }
        }
        for forwarding in self.subscriptions.values() {
            forwarding.stop.cancel();
        }
    }

    async fn answer(&self, call: u64, op: Answer) {
        answer(&self.out, call, op).await;
    }

    /// Queues `messages` with those of the sends that arrived right after
    /// them, as one batch; answers each send its results. The frame read
    /// past the batch, if any, is returned to be handled next.
    async fn send(
        &self,
        call: u64,
        mut messages: Vec<pb::Message>,
        inbound: &mut Streaming<pb::SessionRequest>,
    ) -> Option<Frame> {
        let mut sends = vec![(call, messages.len())];
        let mut held = None;
        while messages.len() < limits::MAX_BATCH_MESSAGES {
            let Some(frame) = inbound.message().now_or_never() else { break };
            match frame {
                Ok(Some(pb::SessionRequest { call, op: Some(Op::Send(batch)) }))
                    if messages.len() + batch.messages.len() <= limits::MAX_BATCH_MESSAGES =>
                {
                    sends.push((call, batch.messages.len()));
                    messages.extend(batch.messages);
                }
                frame => {
                    held = Some(frame);
                    break;
                }
            }
        }
        let traced = accepting_all(&messages, "Session");
        match self.exchange.send_batch(messages).await {
            Ok(outcome) => {
                let mut outcome = send_results(&self.metrics, outcome, &traced).into_iter();
                for (call, n) in sends {
                    let results = outcome.by_ref().take(n).collect();
                    self.answer(call, Answer::Sent(pb::SendBatchResponse { results })).await;
                }
            }
            Err(e) => {
                for (call, _) in sends {
                    self.answer(call, Answer::Failed(failure(&e))).await;
                }
            }
        }
        held
    }

    async fn subscribe(&mut self, call: u64, request: pb::SubscribeRequest) {
        // Forget the subscriptions that ended, before counting them.
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS
            || self.subscriptions.get(&call).is_some_and(|f| f.stop.is_cancelled())
        {
            self.subscriptions.retain(|_, f| !f.stop.is_cancelled());
        }
        let refused = if self.subscriptions.contains_key(&call) {
            Some(ExchangeError::InvalidArgument(format!(
                "call {call} is a subscription of this stream that has not ended"
            )))
        } else {
            limits::at_most(
                "subscriptions open on one Session stream",
                self.subscriptions.len() + 1,
                MAX_SUBSCRIPTIONS,
            )
            .err()
        };
        if let Some(e) = refused {
            return self.answer(call, Answer::Failed(failure(&e))).await;
        }
        let subscription = match EntityId::parse_field(&request.mailbox_id, "mailbox_id") {
            Ok(id) => self.exchange.subscribe_at(&id, request.epoch, &request.endpoint).await,
            Err(e) => Err(e),
        };
        let subscription = match subscription {
            Ok(subscription) => subscription,
            Err(e) => return self.answer(call, Answer::Failed(failure(&e))).await,
        };
        self.answer(call, Answer::Subscribed(pb::Subscribed {})).await;
        let stop = CancellationToken::new();
        let (credited, credit) = watch::channel(0);
        let forwarder = Forwarder {
            call,
            credit,
            stop: stop.clone(),
            out: self.out.clone(),
            open: Open::new(self.metrics.clone()),
        };
        tokio::spawn(forwarder.forward(subscription));
        self.subscriptions.insert(call, Forwarding { stop, credited });
    }

    async fn acknowledge(&self, call: u64, request: pb::AcknowledgeRequest) {
        let exchange = self.exchange.clone();
        self.beside(call, async move {
            let id = EntityId::parse_field(&request.mailbox_id, "mailbox_id")?;
            exchange.acknowledge(&id, &request.seqs).await?;
            Ok(Answer::Acknowledged(pb::AcknowledgeResponse {}))
        })
        .await;
    }

    async fn commit(&self, call: u64, request: pb::CommitRequest) {
        let (exchange, metrics) = (self.exchange.clone(), self.metrics.clone());
        self.beside(call, async move {
            let save = request.state.unwrap_or_default();
            let id = EntityId::parse_field(&save.agent_id, "state.agent_id")?;
            let traced = accepting_all(&request.answers, "Session");
            let (revision, outcome) =
                exchange.commit(&id, save, request.seqs, request.answers).await?;
            let results = send_results(&metrics, outcome, &traced);
            Ok(Answer::Committed(pb::CommitResponse { revision, results }))
        })
        .await;
    }

    /// Runs `work` beside the reader, once one of the stream's
    /// [`MAX_CALLS_IN_FLIGHT`] is free, and answers `call` with its outcome.
    async fn beside(
        &self,
        call: u64,
        work: impl Future<Output = Result<Answer, ExchangeError>> + Send + 'static,
    ) {
        let Ok(permit) = self.calls.clone().acquire_owned().await else { return };
        let out = self.out.clone();
        tokio::spawn(async move {
            let op = work.await.unwrap_or_else(|e| Answer::Failed(failure(&e)));
            answer(&out, call, op).await;
            drop(permit);
        });
    }
}

/// Answers `call` with `op` (unless the stream is gone).
async fn answer(out: &mpsc::Sender<Outgoing>, call: u64, op: Answer) {
    let _ = out.send(Ok(pb::SessionResponse { call, op: Some(op), cost: 0 })).await;
}

/// A subscription's task.
struct Forwarder {
    call: u64,
    credit: watch::Receiver<u64>,
    /// Cancelled to stop it, and by it when it ends.
    stop: CancellationToken,
    out: mpsc::Sender<Outgoing>,
    open: Open,
}

impl Forwarder {
    /// Sends the subscription's deliveries as answers to its call while its
    /// window has room, until it ends (answering why) or is stopped
    /// (answering `unsubscribed`).
    async fn forward(mut self, subscription: crate::Subscription) {
        let _ended = self.stop.clone().drop_guard();
        if let Some(op) = self.deliver(subscription).await {
            answer(&self.out, self.call, op).await;
        }
    }

    /// Delivers until the end; what to answer then (nothing when the stream
    /// is gone).
    async fn deliver(&mut self, subscription: crate::Subscription) -> Option<Answer> {
        let (call, stop) = (self.call, self.stop.clone());
        let mut batches = std::pin::pin!(subscription.into_stream());
        let mut sent: u64 = 0;
        loop {
            let credit = &mut self.credit;
            let room = async move {
                let open =
                    |credited: &u64| sent.saturating_sub(*credited) < SUBSCRIPTION_WINDOW_BYTES;
                credit.wait_for(open).await.is_ok()
            };
            let next = tokio::select! {
                () = stop.cancelled() => return Some(Answer::Unsubscribed(pb::Unsubscribed {})),
                room = room => match room {
                    true => tokio::select! {
                        () = stop.cancelled() => {
                            return Some(Answer::Unsubscribed(pb::Unsubscribed {}));
                        }
                        next = batches.next() => next,
                    },
                    // The reader is gone: so is the stream.
                    false => return None,
                },
            };
            let deliveries = match next? {
                Ok(deliveries) => deliveries,
                Err(e) => return Some(Answer::Failed(failure(&e))),
            };
            let deliveries = delivered(&self.open, deliveries);
            let cost = prost::Message::encoded_len(&deliveries) as u64;
            sent = sent.saturating_add(cost);
            let op = Some(Answer::Deliveries(deliveries));
            if self.out.send(Ok(pb::SessionResponse { call, op, cost })).await.is_err() {
                return None;
            }
        }
    }
}
