//! One stream per connection: `Session` carries sends, subscriptions,
//! acknowledgements and commits, each meaning what its unary call means.
//!
//! docs/design.md, "One stream per connection".

use std::collections::VecDeque;

use academy_proto::pb::{session_request::Op, session_response::Op as Answer};
use tokio::sync::mpsc;

use super::harness::*;
use super::ownership::{ALICE, BOB, Bearer};

/// A raw `Session` stream, as any language's generated client opens it.
pub(crate) struct RawSession {
    requests: mpsc::UnboundedSender<pb::SessionRequest>,
    answers: Streaming<pb::SessionResponse>,
    /// Answers read while looking for another call's.
    early: VecDeque<pb::SessionResponse>,
    pub(crate) max_request_bytes: usize,
}

impl RawSession {
    pub(crate) async fn open<T>(rpc: &mut ExchangeServiceClient<T>) -> Result<Self, tonic::Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let (requests, outgoing) = mpsc::unbounded_channel();
        let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing);
        let response = rpc.session(outgoing).await?;
        let header = academy_proto::transport::MAX_REQUEST_BYTES_HEADER;
        let max_request_bytes =
            response.metadata().get(header).expect("the limit is told").to_str().unwrap();
        let max_request_bytes = max_request_bytes.parse().unwrap();
        let answers = response.into_inner();
        Ok(Self { requests, answers, early: VecDeque::new(), max_request_bytes })
    }

    pub(crate) fn request(&self, call: u64, op: Op) {
        self.requests.send(pb::SessionRequest { call, op: Some(op) }).expect("stream open");
    }

    /// The next answer, whatever its call.
    pub(crate) async fn next(&mut self) -> Result<pb::SessionResponse, tonic::Status> {
        if let Some(answer) = self.early.pop_front() {
            return Ok(answer);
        }
        let next = tokio::time::timeout(Duration::from_secs(5), self.answers.next()).await;
        next.expect("an answer within 5 s").expect("the stream goes on")
    }

    /// The next answer to `call` (others are kept for later).
    pub(crate) async fn answer(&mut self, call: u64) -> Answer {
        if let Some(i) = self.early.iter().position(|a| a.call == call) {
            return self.early.remove(i).unwrap().op.unwrap();
        }
        loop {
            let next = tokio::time::timeout(Duration::from_secs(5), self.answers.next()).await;
            let answer = next.expect("an answer within 5 s").expect("stream open").unwrap();
            if answer.call == call {
                return answer.op.expect("an answer says what it is");
            }
            self.early.push_back(answer);
        }
    }

    /// Subscribes as `call` and waits until the exchange confirms.
    pub(crate) async fn subscribe(&mut self, call: u64, mailbox: &str) {
        let request =
            pb::SubscribeRequest { mailbox_id: mailbox.into(), epoch: 0, ..Default::default() };
        self.request(call, Op::Subscribe(request));
        match self.answer(call).await {
            Answer::Subscribed(_) => {}
            other => panic!("subscription refused: {other:?}"),
        }
    }

    /// Deliveries to subscription `call`, with their costs, until `n` messages came.
    pub(crate) async fn deliveries(&mut self, call: u64, n: usize) -> (Vec<pb::Delivery>, u64) {
        let (mut got, mut cost) = (Vec::new(), 0);
        while got.len() < n {
            let frame = self.next().await.expect("no error");
            match frame.op {
                Some(Answer::Deliveries(batch)) if frame.call == call => {
                    cost += frame.cost;
                    got.extend(batch.deliveries);
                }
                _ => self.early.push_back(frame),
            }
        }
        (got, cost)
    }
}

fn failed(answer: Answer) -> pb::SendResult {
    match answer {
        Answer::Failed(result) => result,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn sent(answer: Answer) -> Vec<Code> {
    match answer {
        Answer::Sent(sent) => sent.results.iter().map(|r| Code::from_i32(r.code)).collect(),
        other => panic!("expected results, got {other:?}"),
    }
}

fn send(messages: Vec<pb::Message>) -> Op {
    Op::Send(pb::SendBatchRequest { messages })
}

/// Everything a connection does often, on one stream: a request goes to an
/// agent, which takes it, commits its answer with its state, and the client
/// takes the answer; what is not acknowledged comes again; refusals answer
/// their call only.
pub(crate) async fn a_session_sends_subscribes_acknowledges_and_commits(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut s = RawSession::open(&mut h.rpc).await.unwrap();
    assert_eq!(s.max_request_bytes, Limits::default().max_request_bytes());
    s.subscribe(1, &agent).await;
    assert!(h.subscribed(&agent).await);

    let asked = request(&client, &agent, "go");
    s.request(2, send(vec![asked.clone()]));
    assert_eq!(sent(s.answer(2).await), [Code::Ok]);
    let (got, cost) = s.deliveries(1, 1).await;
    assert_eq!(tag(got[0].message.as_ref().unwrap()), tag(&asked));
    assert!(cost > 0, "a delivery costs its bytes");

    let mut answer = request(&agent, &client, "x");
    answer.header.as_mut().unwrap().tag = tag(&asked).to_owned();
    answer.body =
        Some(Body::ActionResponse(pb::ActionResponse { action: "go".into(), result: None }));
    let save = pb::SaveStateRequest {
        agent_id: agent.clone(),
        data: Some(pb::Payload {
            content_type: "application/json".into(),
            data: "1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let commit =
        pb::CommitRequest { state: Some(save), seqs: vec![got[0].seq], answers: vec![answer] };
    s.request(3, Op::Commit(commit));
    match s.answer(3).await {
        Answer::Committed(done) => {
            assert_eq!(done.revision, 1);
            assert_eq!(done.results.len(), 1);
            assert_eq!(done.results[0].code, 0);
        }
        other => panic!("not committed: {other:?}"),
    }
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(status.into_inner().queued, 0, "the commit acknowledged the request");

    // The client takes the answer on the same stream, without acknowledging.
    s.subscribe(4, &client).await;
    let (got, _) = s.deliveries(4, 1).await;
    assert_eq!(tag(got[0].message.as_ref().unwrap()), tag(&asked));
    s.request(4, Op::Unsubscribe(pb::Unsubscribe {}));
    assert!(matches!(s.answer(4).await, Answer::Unsubscribed(_)));
    h.until_unsubscribed(&client).await;
    let mut again = h.subscribe(&client).await;
    assert_eq!(next(&mut again).await[0].seq, got[0].seq, "unacknowledged: delivered again");
    s.request(
        5,
        Op::Acknowledge(pb::AcknowledgeRequest {
            mailbox_id: client.clone(),
            seqs: vec![got[0].seq],
        }),
    );
    assert!(matches!(s.answer(5).await, Answer::Acknowledged(_)));

    // Refusals answer their own call; the stream goes on.
    let missing = format!("agent:{}", uuid::Uuid::new_v4());
    let to = [&agent, &missing, &agent];
    s.request(6, send(to.iter().map(|dest| request(&client, dest, "m")).collect()));
    assert_eq!(sent(s.answer(6).await), [Code::Ok, Code::NotFound, Code::Ok]);
    let subscribe =
        pb::SubscribeRequest { mailbox_id: missing.clone(), epoch: 0, ..Default::default() };
    s.request(7, Op::Subscribe(subscribe));
    assert_eq!(failed(s.answer(7).await).reason, "MAILBOX_NOT_FOUND");
    s.request(
        8,
        Op::Acknowledge(pb::AcknowledgeRequest { mailbox_id: "nonsense".into(), seqs: vec![] }),
    );
    let refused = failed(s.answer(8).await);
    assert_eq!(Code::from_i32(refused.code), Code::InvalidArgument);
    assert!(refused.message.contains("mailbox_id"), "{}", refused.message);
    let stale = pb::CommitRequest {
        state: Some(pb::SaveStateRequest {
            agent_id: agent.clone(),
            expected_revision: 7,
            ..Default::default()
        }),
        ..Default::default()
    };
    s.request(9, Op::Commit(stale));
    assert_eq!(failed(s.answer(9).await).reason, "STATE_CONFLICT");
    let (got, _) = s.deliveries(1, 2).await;
    assert_eq!(got.len(), 2);
    s.request(
        1,
        Op::Subscribe(pb::SubscribeRequest {
            mailbox_id: client.clone(),
            epoch: 0,
            ..Default::default()
        }),
    );
    let duplicate = failed(s.answer(1).await);
    assert!(duplicate.message.contains("has not ended"), "{}", duplicate.message);
    s.answers_nothing_to(10).await;

    // Terminating the mailbox ends its subscription as Subscribe's would end.
    h.terminate(&agent).await;
    assert_eq!(failed(s.answer(1).await).reason, "MAILBOX_TERMINATED");
}

impl RawSession {
    /// Sends a request without an op and checks it is refused.
    async fn answers_nothing_to(&mut self, call: u64) {
        self.requests.send(pb::SessionRequest { call, op: None }).unwrap();
        let refused = failed(self.answer(call).await);
        assert_eq!(Code::from_i32(refused.code), Code::InvalidArgument);
        assert!(refused.message.contains("op is missing"), "{}", refused.message);
    }
}

/// Sends made one after another without waiting arrive in order, each with
/// its own results, even where the exchange takes several in one batch; a
/// send over the batch limit is refused alone.
pub(crate) async fn sends_on_a_session_keep_their_order(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut s = RawSession::open(&mut h.rpc).await.unwrap();
    let messages: Vec<_> = (0..600).map(|i| request(&client, &agent, &format!("m{i}"))).collect();
    for (i, chunk) in messages.chunks(3).enumerate() {
        s.request(i as u64, send(chunk.to_vec()));
        if i == 100 {
            let too_many = vec![
                request(&client, &agent, "over");
                academy_exchange::limits::MAX_BATCH_MESSAGES + 1
            ];
            s.request(10_000, send(too_many));
        }
    }
    for i in 0..200 {
        assert_eq!(sent(s.answer(i).await), [Code::Ok; 3], "send {i}");
    }
    let over = failed(s.answer(10_000).await);
    assert_eq!(Code::from_i32(over.code), Code::InvalidArgument);
    assert!(over.message.contains("messages per SendBatch"), "{}", over.message);
    let mut stream = h.subscribe(&agent).await;
    let expected: Vec<_> = messages.iter().map(|m| tag(m).to_owned()).collect();
    assert_eq!(tags(&mut stream, messages.len()).await, expected);
}

/// A subscription stops delivering once its window (4 MiB) is used, until
/// the subscriber gives credit back: a slow subscriber holds a bounded
/// amount, and the other subscriptions of its stream go on.
pub(crate) async fn a_subscription_waits_for_credit(store: Store) {
    const MIB: usize = 1024 * 1024;
    let mut h = start(store).await;
    let client = h.client().await;
    let (slow, other) = (h.agent("test.A", &[]).await, h.agent("test.A", &[]).await);
    for _ in 0..24 {
        h.send(sized(&client, &slow, MIB / 2)).await.unwrap();
    }
    let mut s = RawSession::open(&mut h.rpc).await.unwrap();
    s.subscribe(1, &slow).await;
    s.subscribe(2, &other).await;
    let window = academy_exchange::session::SUBSCRIPTION_WINDOW_BYTES;
    let (mut got, mut cost) = s.deliveries(1, 1).await;
    while cost < window {
        let (more, c) = s.deliveries(1, 1).await;
        got.extend(more);
        cost += c;
    }
    // The window is used: nothing more comes for it, while the other
    // subscription gets its message.
    h.send(request(&client, &other, "meanwhile")).await.unwrap();
    let (theirs, _) = s.deliveries(2, 1).await;
    assert_eq!(theirs.len(), 1);
    let quiet = tokio::time::timeout(Duration::from_millis(300), s.next()).await;
    assert!(quiet.is_err(), "delivered beyond the window: {quiet:?}");
    assert!(got.len() < 24, "{} messages within a 4 MiB window", got.len());
    s.request(1, Op::Credit(pb::Credit { bytes: cost }));
    let (rest, _) = s.deliveries(1, 24 - got.len()).await;
    assert_eq!(got.len() + rest.len(), 24);
}

/// A request larger than the exchange decodes ends the stream with
/// RESOURCE_EXHAUSTED naming the limit (the size is told at the start, so
/// a client can refuse it before sending); another principal's mailboxes are
/// refused on a session as on unary calls; a revoked token ends it.
pub(crate) async fn a_session_is_held_to_the_limits_and_the_owners(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let mut bob = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(BOB));
    let mut nobody = ExchangeServiceClient::new(channel);
    let refused = RawSession::open(&mut nobody).await.err().expect("refused without a token");
    assert_eq!(refused.code(), Code::Unauthenticated);

    let (agent, client) = common::agent_and_client(&mut alice, "test.A").await;
    let mut s = RawSession::open(&mut bob).await.unwrap();
    s.request(
        1,
        Op::Subscribe(pb::SubscribeRequest {
            mailbox_id: agent.clone(),
            epoch: 0,
            ..Default::default()
        }),
    );
    assert_eq!(failed(s.answer(1).await).reason, "NOT_OWNER");
    s.request(2, send(vec![request(&client, &agent, "as alice")]));
    assert_eq!(sent(s.answer(2).await), [Code::PermissionDenied]);
    s.request(
        3,
        Op::Acknowledge(pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![1] }),
    );
    assert_eq!(failed(s.answer(3).await).reason, "NOT_OWNER");
    let save = pb::SaveStateRequest { agent_id: agent.clone(), ..Default::default() };
    s.request(4, Op::Commit(pb::CommitRequest { state: Some(save), ..Default::default() }));
    assert_eq!(failed(s.answer(4).await).reason, "NOT_OWNER");

    let mut s = RawSession::open(&mut alice).await.unwrap();
    s.subscribe(1, &agent).await;
    let big = sized(&client, &agent, s.max_request_bytes + 1);
    s.request(2, send(vec![big]));
    let end = s.next().await.expect_err("the stream ends");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    let limit = Limits::default().max_message_bytes.to_string();
    assert!(end.message().contains(&limit), "{}", end.message());
    assert!(end.message().len() < 1024, "the request is not echoed back");
    h.until_unsubscribed_on(&agent).await;
}

impl Harness {
    /// [`until_unsubscribed`](Self::until_unsubscribed) for a harness whose
    /// own client cannot call (an exchange that authenticates): through
    /// the exchange itself.
    async fn until_unsubscribed_on(&self, id: &str) {
        let id: EntityId = id.parse().unwrap();
        let exchange = self.server.exchange();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while exchange.status(&id).await.unwrap().subscribed {
            assert!(tokio::time::Instant::now() < deadline, "{id} still has a subscriber");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
