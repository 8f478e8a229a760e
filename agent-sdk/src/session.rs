//! The client's side of `Session`: one stream per connection to an exchange
//! for sends, subscriptions, acknowledgements and commits (docs/design.md,
//! "One stream per connection"). Opened on first use and again after it
//! breaks; what was waiting on a broken stream fails as a unary call would.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use academy_proto::ExchangeError;
use academy_proto::pb::{
    self, exchange_service_client::ExchangeServiceClient as RpcClient, session_request::Op,
    session_response::Op as Answer,
};
use academy_proto::sync::lock;
use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::ClientError;
use crate::credentials::Authorized;

/// Bytes of deliveries taken before they are credited back (the exchange
/// sends while less than its window, 4 MiB, is uncredited).
const CREDIT_EVERY: u64 = 1024 * 1024;

/// Opens sessions on a channel: one at a time, a new one once it broke.
#[derive(Debug)]
pub(crate) struct Sessions {
    rpc: RpcClient<Authorized>,
    current: Mutex<Option<Arc<Session>>>,
    /// Held while opening one, so that callers wait for it rather than open
    /// their own.
    opening: tokio::sync::Mutex<()>,
}

impl Sessions {
    pub(crate) fn new(rpc: RpcClient<Authorized>) -> Self {
        Self { rpc, current: Mutex::default(), opening: tokio::sync::Mutex::default() }
    }

    /// The open session, opening one if there is none.
    pub(crate) async fn get(&self) -> Result<Arc<Session>, ClientError> {
        if let Some(session) = self.open_one() {
            return Ok(session);
        }
        let _opening = self.opening.lock().await;
        if let Some(session) = self.open_one() {
            return Ok(session);
        }
        let session = Session::open(self.rpc.clone()).await?;
        *lock(&self.current) = Some(session.clone());
        Ok(session)
    }

    fn open_one(&self) -> Option<Arc<Session>> {
        lock(&self.current).as_ref().filter(|s| !s.is_closed()).cloned()
    }
}

/// One `Session` stream.
#[derive(Debug)]
pub(crate) struct Session {
    requests: mpsc::UnboundedSender<pb::SessionRequest>,
    waiting: Arc<Mutex<Waiting>>,
    next_call: AtomicU64,
    /// The largest request the exchange decodes: a larger one would end
    /// the stream, so it is refused here, as the unary call would be.
    max_request_bytes: usize,
}

/// The calls waiting for answers, until the stream breaks (why, then).
#[derive(Debug, Default)]
struct Waiting {
    calls: HashMap<u64, Waiter>,
    broken: Option<ClientError>,
}

#[derive(Debug)]
enum Waiter {
    Call(oneshot::Sender<Result<Answer, ClientError>>),
    /// A subscription's answers, each with the bytes it cost.
    Subscription(mpsc::UnboundedSender<Result<(Answer, u64), ClientError>>),
}

impl Session {
    async fn open(mut rpc: RpcClient<Authorized>) -> Result<Arc<Self>, ClientError> {
        let (requests, outgoing) = mpsc::unbounded_channel();
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing);
        let response = rpc.session(outgoing).await?;
        let max_request_bytes = response
            .metadata()
            .get(academy_proto::transport::MAX_REQUEST_BYTES_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(usize::MAX);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        tokio::spawn(read(response.into_inner(), waiting.clone()));
        let next_call = AtomicU64::new(1);
        Ok(Arc::new(Self { requests, waiting, next_call, max_request_bytes }))
    }

    fn is_closed(&self) -> bool {
        lock(&self.waiting).broken.is_some()
    }

    /// Makes request `op` as a new call, answers going to `waiter`.
    fn request(&self, op: Op, waiter: Waiter) -> Result<u64, ClientError> {
        let call = self.next_call.fetch_add(1, Ordering::Relaxed);
        let request = pb::SessionRequest { call, op: Some(op) };
        let size = prost::Message::encoded_len(&request);
        if size > self.max_request_bytes {
            let limit = self.max_request_bytes;
            return Err(ClientError::Exchange(ExchangeError::TooLarge { size, limit }));
        }
        let mut waiting = lock(&self.waiting);
        if let Some(broken) = &waiting.broken {
            return Err(broken.clone());
        }
        waiting.calls.insert(call, waiter);
        // Sent under the lock: calls go out in the order they were made,
        // which keeps the order of sends.
        self.requests.send(request).map_err(|_| closed())?;
        Ok(call)
    }

    /// Makes request `op` and waits for its answer (a `failed` one as an error).
    pub(crate) async fn call(&self, op: Op) -> Result<Answer, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.request(op, Waiter::Call(reply))?;
        answer.await.map_err(|_| closed())?
    }

    /// Subscribes to a mailbox; its deliveries once the exchange confirmed.
    pub(crate) async fn subscribe(
        &self,
        request: pb::SubscribeRequest,
    ) -> Result<DeliveryFeed, ClientError> {
        let (tx, answers) = mpsc::unbounded_channel();
        let call = self.request(Op::Subscribe(request), Waiter::Subscription(tx))?;
        let mut feed = DeliveryFeed {
            call,
            answers,
            requests: self.requests.clone(),
            uncredited: 0,
            ended: false,
        };
        match feed.answers.recv().await {
            Some(Ok((Answer::Subscribed(_), _))) => Ok(feed),
            Some(Err(e)) => {
                feed.ended = true;
                Err(e)
            }
            Some(Ok(_)) | None => Err(closed()),
        }
    }
}

fn closed() -> ClientError {
    ClientError::Transport("the exchange session closed".into())
}

/// Hands each answer to its waiter until the stream ends, then fails them all.
async fn read(mut answers: tonic::Streaming<pb::SessionResponse>, waiting: Arc<Mutex<Waiting>>) {
    // Whatever ends this task (the stream, or its runtime going away), the
    // calls waiting on it are told.
    let mut ending = Ending { waiting: waiting.clone(), why: None };
    ending.why = Some(loop {
        match answers.message().await {
            Ok(Some(answer)) => dispatch(&waiting, answer),
            Ok(None) => break closed(),
            Err(status) => break ClientError::from(status),
        }
    });
}

/// Marks a session broken and fails what waits on it, when dropped.
struct Ending {
    waiting: Arc<Mutex<Waiting>>,
    why: Option<ClientError>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let broken = self.why.take().unwrap_or_else(|| {
            ClientError::Transport("the exchange session's task stopped".into())
        });
        let calls = {
            let mut waiting = lock(&self.waiting);
            waiting.broken = Some(broken.clone());
            std::mem::take(&mut waiting.calls)
        };
        for waiter in calls.into_values() {
            match waiter {
                Waiter::Call(reply) => drop(reply.send(Err(broken.clone()))),
                Waiter::Subscription(feed) => drop(feed.send(Err(broken.clone()))),
            }
        }
    }
}

fn dispatch(waiting: &Mutex<Waiting>, answer: pb::SessionResponse) {
    let pb::SessionResponse { call, op, cost } = answer;
    let Some(op) = op else { return };
    let outcome = match op {
        Answer::Failed(result) => Err(crate::exchange::batch_error(&result)),
        op => Ok(op),
    };
    let mut waiting = lock(waiting);
    // A subscription's answers come until one ends it; a call has one.
    let goes_on = matches!(outcome, Ok(Answer::Deliveries(_) | Answer::Subscribed(_)));
    match waiting.calls.get(&call) {
        Some(Waiter::Subscription(feed)) if goes_on => {
            let _ = feed.send(outcome.map(|op| (op, cost)));
        }
        Some(_) => match waiting.calls.remove(&call) {
            Some(Waiter::Call(reply)) => drop(reply.send(outcome)),
            Some(Waiter::Subscription(feed)) => drop(feed.send(outcome.map(|op| (op, cost)))),
            None => {}
        },
        None => {}
    }
}

/// A subscription's deliveries. Credits them back as they are taken;
/// dropping it ends the subscription.
#[derive(Debug)]
pub(crate) struct DeliveryFeed {
    call: u64,
    answers: mpsc::UnboundedReceiver<Result<(Answer, u64), ClientError>>,
    requests: mpsc::UnboundedSender<pb::SessionRequest>,
    uncredited: u64,
    ended: bool,
}

impl DeliveryFeed {
    fn tell(&self, op: Op) {
        let _ = self.requests.send(pb::SessionRequest { call: self.call, op: Some(op) });
    }
}

impl Stream for DeliveryFeed {
    type Item = Result<Vec<pb::Delivery>, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(this.answers.poll_recv(cx)) {
            Some(Ok((Answer::Deliveries(batch), cost))) => {
                this.uncredited = this.uncredited.saturating_add(cost);
                if this.uncredited >= CREDIT_EVERY {
                    this.tell(Op::Credit(pb::Credit { bytes: this.uncredited }));
                    this.uncredited = 0;
                }
                Poll::Ready(Some(Ok(batch.deliveries)))
            }
            Some(Err(e)) => {
                this.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(_)) | None => {
                this.ended = true;
                Poll::Ready(None)
            }
        }
    }
}

impl Drop for DeliveryFeed {
    fn drop(&mut self) {
        if !self.ended {
            self.tell(Op::Unsubscribe(pb::Unsubscribe {}));
        }
    }
}
