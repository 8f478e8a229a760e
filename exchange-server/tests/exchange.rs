//! The exchange's mailbox rules, over gRPC against a real server on loopback:
//! one conformance suite, run unchanged against the in-memory and the Redis
//! backend (a real `redis-server` per test, which must be installed).

use std::time::Duration;

mod common;
use common::message;

use academy_exchange::{ExchangeOptions, Limits, MailboxStore, RedisOptions, RunningExchange};
use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient, message::Body};
use academy_proto::{EntityId, ExchangeError};
use academy_server::auth::Tokens;
use academy_server::testing::{RedisServer, sample, scrape};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

#[derive(Debug, Clone, Copy)]
enum Store {
    Memory,
    Redis,
}

struct Harness {
    server: RunningExchange,
    rpc: ExchangeServiceClient<Channel>,
    _redis: Option<RedisServer>,
}

async fn start_with(store: Store, limits: Limits) -> Harness {
    start_as(store, ExchangeOptions { limits, ..Default::default() }).await
}

/// A server of `options`, over `store`.
async fn start_as(store: Store, options: ExchangeOptions) -> Harness {
    let (backend, redis) = match store {
        Store::Memory => (MailboxStore::Memory, None),
        Store::Redis => {
            let redis = RedisServer::start().expect("redis-server must run for these tests");
            let options = RedisOptions { url: redis.url(), ..Default::default() };
            (MailboxStore::Redis(options), Some(redis))
        }
    };
    let server = RunningExchange::start(ExchangeOptions { store: backend, ..options })
        .await
        .expect("starts");
    let rpc = ExchangeServiceClient::connect(server.url()).await.expect("client connects");
    Harness { server, rpc, _redis: redis }
}

async fn start(store: Store) -> Harness {
    start_with(store, Limits::default()).await
}

impl Harness {
    async fn agent(&mut self, behaviour: &str, implements: &[&str]) -> String {
        let req = pb::RegisterAgentRequest {
            behaviour: behaviour.into(),
            implements: implements.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.rpc.register_agent(req).await.unwrap().into_inner().agent_id
    }

    async fn client(&mut self) -> String {
        self.rpc
            .register_client(pb::RegisterClientRequest::default())
            .await
            .unwrap()
            .into_inner()
            .client_id
    }

    async fn state(&mut self, id: &str) -> pb::MailboxState {
        let resp = self
            .rpc
            .status(pb::StatusRequest { mailbox_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        resp.state()
    }

    async fn subscribed(&mut self, id: &str) -> bool {
        let resp = self.rpc.status(pb::StatusRequest { mailbox_id: id.into() }).await.unwrap();
        resp.into_inner().subscribed
    }

    /// Waits up to 5 s for the server to see a subscription end.
    async fn until_unsubscribed(&mut self, id: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.subscribed(id).await {
            assert!(tokio::time::Instant::now() < deadline, "{id} still has a subscriber");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn send(&mut self, message: pb::Message) -> Result<(), tonic::Status> {
        self.rpc.send(pb::SendRequest { message: Some(message) }).await.map(drop)
    }

    async fn subscribe(&mut self, id: &str) -> Streaming<pb::SubscribeResponse> {
        common::subscribe(&mut self.rpc, id).await
    }

    async fn terminate(&mut self, id: &str) -> pb::MailboxState {
        let resp =
            self.rpc.terminate(pb::TerminateRequest { mailbox_id: id.into() }).await.unwrap();
        resp.into_inner().previous_state()
    }
}

fn request(src: &str, dest: &str, action: &str) -> pb::Message {
    message(src, dest, Body::ActionRequest(pb::ActionRequest { action: action.into(), args: None }))
}

/// Next delivered message, failing the test if none comes within a second.
async fn next(stream: &mut Streaming<pb::SubscribeResponse>) -> Vec<pb::Delivery> {
    let frame = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
    frame.expect("a delivery within 1s").expect("stream open").expect("no error").deliveries
}

fn tag(m: &pb::Message) -> &str {
    &m.header.as_ref().unwrap().tag
}

async fn status_lifecycle_and_idempotent_terminate(store: Store) {
    let mut h = start(store).await;
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    assert_eq!(h.state(&unknown).await, pb::MailboxState::Missing);
    let id = h.agent("test.A", &[]).await;
    assert_eq!(h.state(&id).await, pb::MailboxState::Active);
    assert_eq!(h.terminate(&id).await, pb::MailboxState::Active);
    assert_eq!(h.state(&id).await, pb::MailboxState::Terminated);
    assert_eq!(h.terminate(&id).await, pb::MailboxState::Terminated);
    let err = h.rpc.terminate(pb::TerminateRequest { mailbox_id: unknown }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

async fn send_to_unknown_id_is_not_found(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    let err = h.send(request(&client, &unknown, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&unknown), "{}", err.message());
}

async fn terminated_mailbox_refuses_send_subscribe_and_reregistration(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let id = h.agent("test.A", &[]).await;
    h.terminate(&id).await;
    let err = h.send(request(&client, &id, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("terminated"), "{}", err.message());
    let sub = h.rpc.subscribe(pb::SubscribeRequest { mailbox_id: id.clone() }).await;
    assert_eq!(sub.unwrap_err().code(), Code::FailedPrecondition);
    let again = pb::RegisterAgentRequest {
        behaviour: "test.A".into(),
        agent_id: id.clone(),
        ..Default::default()
    };
    let err = h.rpc.register_agent(again).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a gravestone keeps the id dead");
}

async fn terminate_answers_queued_requests_with_errors_of_the_same_tag(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut replies = h.subscribe(&client).await;
    let asked = request(&client, &agent, "work");
    h.send(asked.clone()).await.unwrap();
    h.terminate(&agent).await;
    let delivered = next(&mut replies).await;
    let reply = delivered[0].message.as_ref().unwrap();
    assert_eq!(tag(reply), tag(&asked));
    match &reply.body {
        Some(Body::ErrorResponse(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32);
            assert!(e.message.contains(&agent), "{}", e.message);
        }
        other => panic!("expected an error response, got {other:?}"),
    }
}

/// Hundreds queued, with arguments and with messages that await no answer
/// among them: every request is answered, in order, and nothing else.
async fn terminate_answers_every_request_of_a_long_queue(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut replies = h.subscribe(&client).await;
    let args =
        pb::Payload { content_type: "application/json".into(), data: vec![b'1'; 4096].into() };
    let mut asked = Vec::new();
    let mut messages = Vec::new();
    for n in 0..300 {
        let message = match n % 3 {
            0 => message(&client, &agent, Body::ActionResponse(pb::ActionResponse::default())),
            1 => common::ping(&client, &agent, n),
            _ => message(
                &client,
                &agent,
                Body::ActionRequest(pb::ActionRequest {
                    action: "work".into(),
                    args: Some(args.clone()),
                }),
            ),
        };
        if n % 3 != 0 {
            asked.push(tag(&message).to_owned());
        }
        messages.push(message);
    }
    let results = h.rpc.send_batch(pb::SendBatchRequest { messages }).await.unwrap();
    assert!(results.into_inner().results.iter().all(|r| r.code == 0));
    assert_eq!(h.terminate(&agent).await, pb::MailboxState::Active);
    assert_eq!(tags(&mut replies, asked.len()).await, asked);
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.queued), (pb::MailboxState::Terminated, 0));
}

async fn discovery_by_name_interface_and_without_terminated_agents(store: Store) {
    let mut h = start(store).await;
    let a = h.agent("lab.Thermometer", &["lab.Sensor"]).await;
    let b = h.agent("lab.Hygrometer", &["lab.Sensor"]).await;
    let c = h.agent("lab.Sensor", &[]).await;
    let mut discover = async |name: &str, exact: bool| {
        let req = pb::DiscoverRequest { behaviour: name.into(), exact, ..Default::default() };
        let agents = h.rpc.discover(req).await.unwrap().into_inner().agents;
        agents.into_iter().map(|a| a.agent_id).collect::<Vec<_>>()
    };
    assert_eq!(discover("lab.Sensor", false).await, vec![a.clone(), b.clone(), c.clone()]);
    assert_eq!(discover("lab.Sensor", true).await, vec![c.clone()]);
    assert_eq!(discover("lab.Thermometer", true).await, vec![a.clone()]);
    assert_eq!(discover("", false).await.len(), 3);
    assert!(discover("lab.Nothing", false).await.is_empty());
    h.terminate(&a).await;
    assert_eq!(
        h.rpc
            .discover(pb::DiscoverRequest {
                behaviour: "lab.Sensor".into(),
                exact: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .agents
            .len(),
        2
    );
    let err = h
        .rpc
        .discover(pb::DiscoverRequest {
            behaviour: String::new(),
            exact: true,
            ..Default::default()
        })
        .await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
}

async fn discovery_pages_through_large_answers(store: Store) {
    let mut h = start(store).await;
    let mut all = Vec::new();
    for _ in 0..5 {
        all.push(h.agent("lab.Paged", &[]).await);
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let req = pb::DiscoverRequest {
            behaviour: "lab.Paged".into(),
            page_size: 2,
            page_token,
            ..Default::default()
        };
        let page = h.rpc.discover(req).await.unwrap().into_inner();
        assert!(page.agents.len() <= 2);
        seen.extend(page.agents.into_iter().map(|a| a.agent_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!((seen, pages), (all.clone(), 3), "every agent once, in order, in three pages");

    // A page as long as what is left is the last; a token whose agent has
    // left discovery still says where to go on.
    let page = async |rpc: &mut ExchangeServiceClient<Channel>, exact: bool, page_token: &str| {
        let behaviour = "lab.Paged".into();
        let page_token = page_token.into();
        let req = pb::DiscoverRequest { behaviour, exact, page_size: 2, page_token };
        let page = rpc.discover(req).await.unwrap().into_inner();
        let ids: Vec<String> = page.agents.into_iter().map(|a| a.agent_id).collect();
        (ids, page.next_page_token)
    };
    h.terminate(&all[1]).await;
    assert_eq!(page(&mut h.rpc, false, &all[1]).await, (all[2..4].to_vec(), all[3].clone()));
    assert_eq!(page(&mut h.rpc, true, &all[2]).await, (all[3..5].to_vec(), String::new()));

    // Agents with long names come fewer to an answer (it stays under 1 MiB),
    // whatever the page size; at least one at a time.
    for letter in ["a", "b", "c"] {
        let name = letter.repeat(400_000);
        let long =
            pb::RegisterAgentRequest { behaviour: "lab.Long".into(), name, ..Default::default() };
        h.rpc.register_agent(long).await.unwrap();
    }
    let mut sizes = Vec::new();
    let mut page_token = String::new();
    loop {
        let req =
            pb::DiscoverRequest { behaviour: "lab.Long".into(), page_token, ..Default::default() };
        let page = h.rpc.discover(req).await.unwrap().into_inner();
        sizes.push(page.agents.len());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(sizes, [2, 1]);
    let bad = pb::DiscoverRequest {
        behaviour: "lab.Paged".into(),
        page_token: "page two".into(),
        ..Default::default()
    };
    assert_eq!(h.rpc.discover(bad).await.unwrap_err().code(), Code::InvalidArgument);
}

async fn unacknowledged_messages_are_redelivered_to_the_next_subscriber(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let first = request(&client, &agent, "one");
    let second = request(&client, &agent, "two");
    h.send(first.clone()).await.unwrap();
    h.send(second.clone()).await.unwrap();

    let mut stream = h.subscribe(&agent).await;
    let got = next(&mut stream).await;
    assert_eq!(got.len(), 2);
    // Acknowledge only the first (among thousands of unknown seqs, which are
    // ignored), then drop the connection's stream.
    let mut seqs: Vec<u64> = (1..=9_000).filter(|s| *s < got[0].seq).collect();
    seqs.push(got[0].seq);
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs };
    h.rpc.acknowledge(ack).await.unwrap();
    drop(stream);

    let mut stream = h.subscribe(&agent).await;
    let again = next(&mut stream).await;
    assert_eq!(again.len(), 1, "only the unacknowledged message comes back");
    assert_eq!(tag(again[0].message.as_ref().unwrap()), tag(&second));
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(status.into_inner().queued, 1);
}

async fn status_says_whether_a_subscriber_listens(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("lab.Listener", &[]).await;
    assert!(!h.subscribed(&agent).await, "no subscriber yet");
    let first = h.subscribe(&agent).await;
    assert!(h.subscribed(&agent).await);

    // A subscriber that was taken over leaving does not count.
    let second = h.subscribe(&agent).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.subscribed(&agent).await, "the newer subscriber still listens");
    // A subscriber whose connection closes stops counting.
    drop(second);
    h.until_unsubscribed(&agent).await;

    let _third = h.subscribe(&agent).await;
    assert!(h.subscribed(&agent).await);
    h.terminate(&agent).await;
    assert!(!h.subscribed(&agent).await, "a terminated mailbox has no subscriber");
    let unknown = EntityId::new_agent().to_string();
    assert!(!h.subscribed(&unknown).await);
}

async fn a_new_subscriber_supersedes_the_old_one(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.A", &[]).await;
    let mut old = h.subscribe(&agent).await;
    let _new = h.subscribe(&agent).await;
    let end = tokio::time::timeout(Duration::from_secs(1), old.next()).await.unwrap();
    assert_eq!(end.unwrap().unwrap_err().code(), Code::Aborted);
}

async fn messages_from_one_sender_arrive_in_order(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    // A batch larger than a backend's chunk (Redis: 128), then single sends.
    let sent: Vec<_> = (0..400).map(|i| request(&client, &agent, &format!("a{i}"))).collect();
    let batch = pb::SendBatchRequest { messages: sent[..300].to_vec() };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 300);
    assert!(results.iter().all(|r| r.code == 0));
    for m in &sent[300..] {
        h.send(m.clone()).await.unwrap();
    }
    let mut stream = h.subscribe(&agent).await;
    let expected: Vec<_> = sent.iter().map(|m| tag(m).to_owned()).collect();
    assert_eq!(tags(&mut stream, sent.len()).await, expected);
}

async fn oversized_message_and_full_mailbox_are_resource_exhausted(store: Store) {
    let limits = Limits { max_message_bytes: 1024, max_queued: 3 };
    let mut h = start_with(store, limits).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut big = request(&client, &agent, "big");
    if let Some(Body::ActionRequest(r)) = &mut big.body {
        r.args = Some(pb::Payload {
            content_type: "application/json".into(),
            data: vec![b'1'; 2000].into(),
        });
    }
    let err = h.send(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("1024"), "names the limit: {}", err.message());

    h.send(request(&client, &agent, "x")).await.unwrap();
    // The bound holds within one batch too: two more fit, the rest are refused.
    let batch = pb::SendBatchRequest { messages: vec![request(&client, &agent, "x"); 4] };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    let exhausted = Code::ResourceExhausted as i32;
    assert_eq!(codes, [0, 0, exhausted, exhausted]);
    let err = h.send(request(&client, &agent, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("full"), "{}", err.message());
    // Nothing was dropped: the three queued messages are all there.
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap();
    assert_eq!(status.into_inner().queued, 3);
}

async fn malformed_input_is_invalid_argument_and_the_server_keeps_running(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let nobody = "agent:not-a-uuid";
    let checks: Vec<(&str, tonic::Status)> = vec![
        (
            "status with empty id",
            h.rpc.status(pb::StatusRequest { mailbox_id: String::new() }).await.unwrap_err(),
        ),
        (
            "terminate with malformed id",
            h.rpc.terminate(pb::TerminateRequest { mailbox_id: nobody.into() }).await.unwrap_err(),
        ),
        (
            "register without behaviour",
            h.rpc.register_agent(pb::RegisterAgentRequest::default()).await.unwrap_err(),
        ),
        (
            "register with a client id",
            h.rpc
                .register_agent(pb::RegisterAgentRequest {
                    behaviour: "x".into(),
                    agent_id: client.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        ("send without message", h.rpc.send(pb::SendRequest { message: None }).await.unwrap_err()),
        (
            "send without header",
            h.send(pb::Message { header: None, body: Some(Body::PingRequest(pb::PingRequest {})) })
                .await
                .unwrap_err(),
        ),
        (
            "send without body",
            h.send(pb::Message { body: None, ..request(&client, &agent, "x") }).await.unwrap_err(),
        ),
        ("send with empty action", h.send(request(&client, &agent, "")).await.unwrap_err()),
        ("send with malformed dest", h.send(request(&client, nobody, "x")).await.unwrap_err()),
        (
            "send with bad tag",
            h.send(pb::Message {
                header: Some(pb::Header {
                    src: client.clone(),
                    dest: agent.clone(),
                    tag: "t".into(),
                    ..Default::default()
                }),
                ..request(&client, &agent, "x")
            })
            .await
            .unwrap_err(),
        ),
        (
            "subscribe to malformed id",
            h.rpc.subscribe(pb::SubscribeRequest { mailbox_id: "x".into() }).await.unwrap_err(),
        ),
        (
            "ack of a seq never delivered",
            h.rpc
                .acknowledge(pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![99] })
                .await
                .unwrap_err(),
        ),
        (
            "invoke with empty action",
            h.rpc
                .invoke(pb::InvokeRequest { agent_id: agent.clone(), ..Default::default() })
                .await
                .unwrap_err(),
        ),
        (
            "invoke on a client",
            h.rpc
                .invoke(pb::InvokeRequest {
                    agent_id: client.clone(),
                    action: "x".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
    ];
    for (what, status) in checks {
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what} explains itself");
    }
    assert_eq!(h.state(&agent).await, pb::MailboxState::Active, "server still serves");
}

async fn send_batch_reports_each_message(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let other = h.agent("test.A", &[]).await;
    let gone = h.agent("test.A", &[]).await;
    h.terminate(&gone).await;
    let missing = format!("agent:{}", uuid::Uuid::new_v4());
    // One subscriber is there when the batch arrives, the other comes later.
    let mut stream = h.subscribe(&agent).await;
    // Mailboxes interleaved, so each answer must be matched to its message.
    let to = [&agent, &gone, &other, &missing, &agent, &other, &gone, &agent];
    let messages: Vec<_> =
        to.iter().enumerate().map(|(i, dest)| request(&client, dest, &format!("m{i}"))).collect();
    let batch = pb::SendBatchRequest { messages: messages.clone() };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    let codes: Vec<_> = results.iter().map(|r| Code::from_i32(r.code)).collect();
    let (ok, dead, unknown) = (Code::Ok, Code::FailedPrecondition, Code::NotFound);
    assert_eq!(codes, vec![ok, dead, ok, unknown, ok, ok, dead, ok]);
    assert_eq!(results[1].reason, "MAILBOX_TERMINATED");
    assert_eq!(results[1].metadata.get("id"), Some(&gone));
    assert_eq!(results[3].metadata.get("id"), Some(&missing));

    let expect = |idx: &[usize]| -> Vec<String> {
        idx.iter().map(|i| tag(&messages[*i]).to_owned()).collect()
    };
    assert_eq!(tags(&mut stream, 3).await, expect(&[0, 4, 7]));
    let mut stream = h.subscribe(&other).await;
    assert_eq!(tags(&mut stream, 2).await, expect(&[2, 5]));
}

/// The tags of the next `n` messages delivered.
async fn tags(stream: &mut Streaming<pb::SubscribeResponse>, n: usize) -> Vec<String> {
    let mut tags = Vec::new();
    while tags.len() < n {
        tags.extend(next(stream).await.iter().map(|d| tag(d.message.as_ref().unwrap()).to_owned()));
    }
    tags
}

async fn invoke_reports_unknown_agents_and_times_out_on_idle_ones(store: Store) {
    let mut h = start(store).await;
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    let req = pb::InvokeRequest { agent_id: unknown, action: "get".into(), ..Default::default() };
    assert_eq!(h.rpc.invoke(req).await.unwrap_err().code(), Code::NotFound);
    let idle = h.agent("test.A", &[]).await;
    let req = pb::InvokeRequest {
        agent_id: idle.clone(),
        action: "get".into(),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_millis(100))),
        ..Default::default()
    };
    let err = h.rpc.invoke(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains(&idle), "{}", err.message());
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(&'static str);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0).parse().expect("ascii token");
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

async fn mailboxes_belong_to_the_principal_that_registered_them(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let as_ = |token| ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(token));
    let (mut alice, mut bob, mut nobody) = (as_(ALICE), as_(BOB), h.rpc.clone());

    // Without a token, or with an unknown one: UNAUTHENTICATED, health excepted.
    let err = nobody.register_client(pb::RegisterClientRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization: Bearer"), "{}", err.message());
    let mut stranger = as_("mallory-token-0123456789");
    let err = stranger.status(pb::StatusRequest { mailbox_id: "x".into() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "unknown bearer token"));
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check =
        tonic_health::pb::HealthCheckRequest { service: "academy.v1.ExchangeService".into() };
    assert_eq!(health.check(check).await.unwrap().into_inner().status, 1); // SERVING

    let (agent, client) = common::agent_and_client(&mut alice, "test.A").await;
    let register = pb::RegisterClientRequest::default();
    let bobs = bob.register_client(register).await.unwrap().into_inner().client_id;
    // Anyone may send to it and ask about it...
    bob.send(pb::SendRequest { message: Some(common::ping(&bobs, &agent, 1)) }).await.unwrap();
    let status =
        bob.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.queued), (pb::MailboxState::Active, 1));
    // ...but only alice may receive from it or end it.
    let denied = |status: tonic::Status| {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let id = agent.parse().unwrap();
        let expected = ExchangeError::PermissionDenied { id, owner: "alice".into() };
        assert_eq!(ExchangeError::from_status(&status), Some(expected));
    };
    let subscribe = pb::SubscribeRequest { mailbox_id: agent.clone() };
    denied(bob.subscribe(subscribe).await.unwrap_err());
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![0] };
    denied(bob.acknowledge(ack).await.unwrap_err());
    denied(bob.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap_err());
    let status =
        bob.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.queued), (pb::MailboxState::Active, 1));

    let mut stream = common::subscribe(&mut alice, &agent).await;
    let delivered = next(&mut stream).await;
    assert_eq!(common::number(delivered[0].message.as_ref().unwrap()), 1);
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![delivered[0].seq] };
    alice.acknowledge(ack).await.unwrap();
    // Asking an agent to shut down is like terminating it: the owner's call.
    let shutdown = |from: &str| {
        let body = Body::ShutdownRequest(pb::ShutdownRequest { terminate: Some(true) });
        pb::SendRequest { message: Some(message(from, &agent, body)) }
    };
    denied(bob.send(shutdown(&bobs)).await.unwrap_err());
    // Nor may bob send in alice's name (from her mailbox), or from a mailbox
    // nobody registered: the agent must be able to trust `header.src`.
    let unregistered = EntityId::new_client().to_string();
    let batch = pb::SendBatchRequest {
        messages: vec![
            common::ping(&bobs, &agent, 2),
            shutdown(&bobs).message.unwrap(),
            common::ping(&client, &agent, 3),
            common::ping(&unregistered, &agent, 4),
            common::ping(&bobs, &agent, 5),
        ],
    };
    let results = bob.send_batch(batch).await.unwrap().into_inner().results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    let (ok, no, bad) =
        (Code::Ok as i32, Code::PermissionDenied as i32, Code::InvalidArgument as i32);
    assert_eq!(codes, [ok, no, no, bad, ok]);
    assert_eq!(results[1].metadata.get("owner").map(String::as_str), Some("alice"));
    assert_eq!(results[2].metadata.get("id"), Some(&client), "{results:?}");
    assert_eq!(results[2].metadata.get("owner").map(String::as_str), Some("alice"));
    assert!(results[3].message.contains("is not a registered mailbox"), "{results:?}");
    let spoofed = bob.send(pb::SendRequest { message: Some(common::ping(&client, &agent, 6)) });
    let err = spoofed.await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("send from it"), "{}", err.message());
    alice.send(shutdown(&client)).await.unwrap();
    let mut kinds: Vec<pb::Message> =
        next(&mut stream).await.into_iter().map(|d| d.message.unwrap()).collect();
    while kinds.len() < 3 {
        kinds.extend(next(&mut stream).await.into_iter().map(|d| d.message.unwrap()));
    }
    assert!(matches!(kinds[2].body, Some(Body::ShutdownRequest(_))), "{kinds:?}");
    let labels: Vec<_> = kinds.iter().map(|m| m.header.as_ref().unwrap().label.as_str()).collect();
    assert_eq!(labels, ["2", "5", ""], "only bob's own pings, then alice's shutdown request");
    // Bob's Invoke gets a mailbox of his own to wait in: the agent is idle, so
    // the call times out rather than being refused.
    let invoke = pb::InvokeRequest {
        agent_id: agent.clone(),
        action: "get".into(),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_millis(100))),
        ..Default::default()
    };
    assert_eq!(bob.invoke(invoke).await.unwrap_err().code(), Code::DeadlineExceeded);
    let done = alice.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(done.into_inner().previous_state(), pb::MailboxState::Active);
    // Even terminated, it is still not bob's to terminate.
    denied(bob.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap_err());
}

/// A tokens file that changes is followed: a new token works and a removed
/// one stops working, without a restart; a broken file changes nothing.
#[tokio::test]
async fn a_changed_tokens_file_takes_effect_without_a_restart() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-reload-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, format!("alice {ALICE}\n")).unwrap();
    let tokens = Tokens::load(&file).unwrap().reload_every(Duration::from_millis(20));
    let h = start_as(Store::Memory, ExchangeOptions { tokens: Some(tokens), ..Default::default() })
        .await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let code = |token| {
        let mut rpc = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(token));
        async move {
            let status = rpc.status(pb::StatusRequest { mailbox_id: "client:nope".into() }).await;
            status.err().map_or(Code::Ok, |e| e.code())
        }
    };
    // An unknown id is INVALID_ARGUMENT: the call got past authentication.
    let (passed, refused) = (Code::InvalidArgument, Code::Unauthenticated);
    assert_eq!((code(ALICE).await, code(BOB).await), (passed, refused));

    std::fs::write(&file, format!("bob {BOB}\n")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while code(BOB).await != passed {
        assert!(tokio::time::Instant::now() < deadline, "the new token never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code(ALICE).await, refused);

    std::fs::write(&file, "bob short\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((code(ALICE).await, code(BOB).await), (refused, passed));
    std::fs::remove_dir_all(dir).unwrap();
}

async fn shutdown_ends_open_subscriptions_promptly(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.A", &[]).await;
    let mut stream = h.subscribe(&agent).await;
    let stopped = tokio::time::timeout(Duration::from_secs(5), h.server.shutdown()).await;
    assert!(stopped.is_ok(), "shutdown must not wait on open streams");
    let end = tokio::time::timeout(Duration::from_secs(1), stream.next()).await.unwrap();
    match end {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        None => {}
        Some(Ok(frame)) => panic!("unexpected frame {frame:?}"),
    }
}

/// Calls, messages and subscriptions show in the metrics, with the status
/// codes of the calls that failed.
async fn metrics_count_calls_messages_and_subscriptions(store: Store) {
    let listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut h =
        start_as(store, ExchangeOptions { metrics_listen: listen, ..Default::default() }).await;
    let addr = h.server.metrics_addr().expect("metrics served");
    let scrape = || async move {
        let (status, text) =
            tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap().unwrap();
        assert!(status.ends_with("200 OK"), "{status}");
        text
    };
    let value = |text: &str, series: &str| sample(text, series).unwrap_or(0.0);
    let send = r#"academy_grpc_calls_total{service="academy.v1.ExchangeService",method="Send","#;
    let subscriptions = "academy_exchange_subscriptions";

    let (agent, client) = common::agent_and_client(&mut h.rpc, "test.A").await;
    h.send(common::ping(&client, &agent, 1)).await.unwrap();
    let unknown = EntityId::new_agent().to_string();
    assert_eq!(
        h.send(common::ping(&client, &unknown, 2)).await.unwrap_err().code(),
        Code::NotFound
    );
    let stream = h.subscribe(&agent).await;
    let mut stream = stream;
    next(&mut stream).await;
    let text = scrape().await;
    assert_eq!(value(&text, &format!(r#"{send}code="OK"}}"#)), 1.0, "{text}");
    assert_eq!(value(&text, &format!(r#"{send}code="NOT_FOUND"}}"#)), 1.0, "{text}");
    assert_eq!(value(&text, "academy_exchange_messages_accepted_total"), 1.0, "{text}");
    let refused = r#"academy_exchange_messages_refused_total{reason="MAILBOX_NOT_FOUND"}"#;
    assert_eq!(value(&text, refused), 1.0, "{text}");
    assert_eq!(value(&text, "academy_exchange_messages_delivered_total"), 1.0, "{text}");
    assert_eq!(value(&text, subscriptions), 1.0, "{text}");
    let count =
        r#"academy_grpc_call_seconds_count{service="academy.v1.ExchangeService",method="Send"}"#;
    assert_eq!(value(&text, count), 2.0, "{text}");

    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while value(&scrape().await, subscriptions) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the subscription never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $test() { super::$test(super::Store::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $test() { super::$test(super::Store::Redis).await })*
        }
    };
}

conformance!(
    status_lifecycle_and_idempotent_terminate,
    send_to_unknown_id_is_not_found,
    terminated_mailbox_refuses_send_subscribe_and_reregistration,
    terminate_answers_queued_requests_with_errors_of_the_same_tag,
    terminate_answers_every_request_of_a_long_queue,
    discovery_by_name_interface_and_without_terminated_agents,
    discovery_pages_through_large_answers,
    unacknowledged_messages_are_redelivered_to_the_next_subscriber,
    a_new_subscriber_supersedes_the_old_one,
    status_says_whether_a_subscriber_listens,
    messages_from_one_sender_arrive_in_order,
    oversized_message_and_full_mailbox_are_resource_exhausted,
    malformed_input_is_invalid_argument_and_the_server_keeps_running,
    send_batch_reports_each_message,
    invoke_reports_unknown_agents_and_times_out_on_idle_ones,
    shutdown_ends_open_subscriptions_promptly,
    mailboxes_belong_to_the_principal_that_registered_them,
    metrics_count_calls_messages_and_subscriptions,
);
