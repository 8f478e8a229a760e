//! Agents, handles and the manager, over gRPC against a real exchange-server.

mod common;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use academy_exchange::{ExchangeOptions, MailboxStore, RedisOptions, RunningExchange};
use academy_proto::pb::message::Body;
use academy_proto::{ExchangeError, pb};
use academy_sdk::codec::Codec;
use academy_sdk::exchange::MailboxState;
use academy_sdk::{
    AgentError, ClientError, Handle, HandleError, LaunchOptions, MailboxPolicy, Manager,
    ManagerError, Matching, Shutdown, behaviour,
};
use academy_server::testing::RedisServer;
use futures::StreamExt as _;
use tonic::Code;

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

async fn start() -> (RunningExchange, Manager) {
    let server = RunningExchange::start(ExchangeOptions::default()).await.expect("server starts");
    let manager = Manager::connect(&server.url()).await.expect("manager connects");
    (server, manager)
}

/// The mailbox of an agent that is not running (yet).
async fn idle_agent(manager: &Manager) -> academy_sdk::EntityId {
    let exchange = manager.exchange();
    exchange.register_agent("test.Echo", &[], "", None, None).await.unwrap()
}

#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused: {}", self.0)
    }
}

struct Echo {
    started: AtomicBool,
    meeting: tokio::sync::Barrier,
}

impl Echo {
    fn new() -> Self {
        Self { started: AtomicBool::new(false), meeting: tokio::sync::Barrier::new(2) }
    }
}

#[behaviour(name = "test.Echo", implements("test.Talker"))]
impl Echo {
    #[on_startup]
    async fn start(&self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.started.store(true, Ordering::SeqCst);
    }

    #[action]
    async fn echo(&self, text: String) -> String {
        text
    }

    #[action]
    async fn repeat(&self, text: String, times: usize) -> String {
        text.repeat(times)
    }

    /// The id of whoever called this action.
    #[action]
    async fn caller(&self) -> Option<String> {
        academy_sdk::current_caller().map(|id| id.to_string())
    }

    #[action]
    async fn started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    #[action]
    async fn refuse(&self, why: String) -> Result<u32, Refused> {
        Err(Refused(why))
    }

    #[action]
    async fn sleep(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }

    /// Returns only once two calls are inside it at the same time.
    #[action]
    async fn meet(&self) {
        self.meeting.wait().await;
    }

    #[action]
    async fn explode(&self) -> u32 {
        panic!("boom")
    }
}

struct Relay;

#[behaviour(name = "test.Relay")]
impl Relay {
    #[action]
    async fn relay(&self, to: Handle<Echo>, text: String) -> Result<String, HandleError> {
        to.echo(format!("via relay: {text}")).await
    }

    #[action]
    async fn ask_caller(&self, to: Handle<Echo>) -> Result<Option<String>, HandleError> {
        to.caller().await
    }
}

struct Flaky;

#[behaviour(name = "test.Flaky")]
impl Flaky {
    #[control_loop]
    async fn watch(&self, shutdown: Shutdown) -> Result<(), String> {
        tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            () = tokio::time::sleep(Duration::from_millis(50)) => Err("sensor unplugged".into()),
        }
    }
}

struct Ticker {
    ticks: Arc<AtomicU64>,
}

#[behaviour(name = "test.Ticker")]
impl Ticker {
    #[timer(every = Duration::from_millis(10))]
    async fn tick(&self) {
        self.ticks.fetch_add(1, Ordering::SeqCst);
    }
}

struct NoConfig;

#[behaviour(name = "test.NoConfig")]
impl NoConfig {
    #[on_startup]
    async fn start(&self) -> Result<(), String> {
        Err("config file missing".into())
    }
}

#[tokio::test]
async fn action_errors_are_typed_and_the_agent_keeps_serving() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    match echo.refuse("not today".into()).await {
        Err(HandleError::Remote { action, code, kind, message }) => {
            assert_eq!(action, "refuse");
            assert_eq!(code, Code::Unknown);
            assert_eq!(kind, "Refused");
            assert_eq!(message, "refused: not today");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(echo.echo("still here".into()).await.unwrap(), "still here");
    match echo.explode().await {
        Err(HandleError::Remote { code, message, .. }) => {
            assert_eq!(code, Code::Internal);
            assert!(message.contains("boom"), "{message}");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(echo.echo("after a panic".into()).await.unwrap(), "after a panic");
    manager.close().await.unwrap();
}

#[tokio::test]
async fn unknown_actions_and_bad_arguments_are_named() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    match echo.raw().call::<_, ()>("dance", ()).await {
        Err(HandleError::Remote { code, message, .. }) => {
            assert_eq!(code, Code::Unimplemented);
            assert!(message.contains("dance") && message.contains("echo"), "{message}");
        }
        other => panic!("expected an unknown-action error, got {other:?}"),
    }
    match echo.raw().call::<_, String>("echo", (42,)).await {
        Err(HandleError::Remote { code, message, .. }) => {
            assert_eq!(code, Code::InvalidArgument);
            assert!(message.contains("text"), "{message}");
        }
        other => panic!("expected an argument error, got {other:?}"),
    }
    manager.close().await.unwrap();
}

#[tokio::test]
async fn actions_run_concurrently() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    let echo = echo.with_timeout(Duration::from_secs(5));
    let (a, b) = tokio::join!(echo.meet(), echo.meet());
    a.unwrap();
    b.unwrap();
    manager.close().await.unwrap();
}

#[tokio::test]
async fn a_failing_loop_shuts_the_agent_down_and_the_manager_reports_it() {
    let (_server, manager) = start().await;
    let flaky = manager.launch(Flaky).await.unwrap();
    match manager.wait(flaky.id(), WAIT).await {
        Err(ManagerError::Agent(AgentError::Loop { name, message, .. })) => {
            assert_eq!(name, "watch");
            assert_eq!(message, "sensor unplugged");
        }
        other => panic!("expected a loop failure, got {other:?}"),
    }
    let status = manager.exchange().status(&flaky.id()).await.unwrap();
    assert_eq!(status.state, MailboxState::Terminated, "terminate_on_error");
    assert!(
        matches!(manager.close().await, Err(ManagerError::Agents(errors)) if errors.len() == 1)
    );
}

#[tokio::test]
async fn a_failing_startup_hook_is_reported() {
    let (_server, manager) = start().await;
    let agent = manager.launch(NoConfig).await.unwrap();
    let err = manager.wait(agent.id(), WAIT).await.unwrap_err();
    assert!(err.to_string().contains("config file missing"), "{err}");
}

#[tokio::test]
async fn shutdown_without_terminate_keeps_the_mailbox_for_a_restart() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    let id = echo.id();
    manager.shutdown(id, MailboxPolicy::Keep, WAIT).await.unwrap();
    let status = manager.exchange().status(&id).await.unwrap();
    assert_eq!(status.state, MailboxState::Active);

    // Sent while no agent runs: waits in the mailbox.
    let waiting = tokio::spawn({
        let echo = echo.with_timeout(Duration::from_secs(10));
        async move { echo.echo("queued while down".into()).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(manager.exchange().status(&id).await.unwrap().queued, 1);

    let options = LaunchOptions { agent_id: Some(id), ..Default::default() };
    let restarted = manager.launch_with(Echo::new(), options).await.unwrap();
    assert_eq!(restarted.id(), id);
    assert_eq!(waiting.await.unwrap().unwrap(), "queued while down");
    manager.shutdown(id, MailboxPolicy::AgentDefault, WAIT).await.unwrap();
    let status = manager.exchange().status(&id).await.unwrap();
    assert_eq!(status.state, MailboxState::Terminated, "terminate_on_success");
    manager.close().await.unwrap();
}

#[tokio::test]
async fn requests_sent_before_startup_ends_are_served_after_it() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    assert!(echo.started().await.unwrap(), "the action ran before startup finished");
    manager.close().await.unwrap();
}

#[tokio::test]
async fn a_handle_passed_to_another_agent_works_from_its_mailbox() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    let relay = manager.launch(Relay).await.unwrap();
    let answer = relay.relay(echo.clone(), "hello".into()).await.unwrap();
    assert_eq!(answer, "via relay: hello");
    // Inside the relay, the handle sends from the relay's mailbox.
    let seen = relay.ask_caller(echo.clone()).await.unwrap();
    assert_eq!(seen, Some(relay.id().to_string()));
    assert_eq!(echo.caller().await.unwrap(), Some(manager.client_id().to_string()));
    // A handle serialises as the agent id.
    assert_eq!(serde_json::to_value(&echo).unwrap(), serde_json::json!(echo.id().to_string()));
    manager.close().await.unwrap();
}

#[tokio::test]
async fn ping_to_an_agent_that_is_not_running_times_out() {
    let (_server, manager) = start().await;
    let id = idle_agent(&manager).await;
    let idle = manager.handle::<Echo>(id).with_timeout(Duration::from_millis(200));
    assert_eq!(idle.ping().await, Err(HandleError::Timeout(Duration::from_millis(200))));
    let running = manager.launch(Echo::new()).await.unwrap();
    assert!(running.ping().await.unwrap() < Duration::from_secs(5));
    manager.close().await.unwrap();
}

#[tokio::test]
async fn terminating_a_mailbox_answers_callers_still_waiting() {
    let (_server, manager) = start().await;
    let id = idle_agent(&manager).await;
    let handle = manager.handle::<Echo>(id);
    let waiting = tokio::spawn(async move { handle.echo("anyone?".into()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    manager.exchange().terminate(&id).await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap();
    assert_eq!(result, Err(HandleError::Terminated(id)));
    // And later calls fail at once.
    let handle = manager.handle::<Echo>(id);
    assert_eq!(handle.echo("x".into()).await, Err(HandleError::Terminated(id)));
    manager.close().await.unwrap();
}

#[tokio::test]
async fn calls_to_unknown_agents_are_not_found() {
    let (_server, manager) = start().await;
    let id: academy_sdk::EntityId = format!("agent:{}", uuid::Uuid::new_v4()).parse().unwrap();
    assert_eq!(manager.handle::<Echo>(id).echo("x".into()).await, Err(HandleError::NotFound(id)));
    manager.close().await.unwrap();
}

#[tokio::test]
async fn in_flight_actions_are_cancelled_at_shutdown() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    let slow = tokio::spawn({
        let echo = echo.clone();
        async move { echo.sleep(60_000).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    manager.shutdown(echo.id(), MailboxPolicy::AgentDefault, WAIT).await.unwrap();
    match slow.await.unwrap() {
        Err(HandleError::Remote { code, .. }) => assert_eq!(code, Code::Cancelled),
        other => panic!("expected a cancelled error, got {other:?}"),
    }
    manager.close().await.unwrap();
}

#[tokio::test]
async fn oversized_arguments_are_refused_by_the_exchange() {
    let server = RunningExchange::start(ExchangeOptions {
        limits: academy_exchange::Limits {
            max_message_bytes: 64 * 1024,
            max_queued: 100,
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let manager = Manager::connect(&server.url()).await.unwrap();
    let echo = manager.launch(Echo::new()).await.unwrap();
    match echo.echo("x".repeat(100_000)).await {
        Err(HandleError::Exchange(academy_proto::ExchangeError::TooLarge { limit, .. })) => {
            assert_eq!(limit, 64 * 1024)
        }
        other => panic!("expected a too-large error, got {other:?}"),
    }
    assert_eq!(echo.echo("small".into()).await.unwrap(), "small");
    // A result too large for the exchange comes back as an error, not as a
    // wait until the call's timeout.
    match echo.with_timeout(Duration::from_secs(20)).repeat("y".into(), 100_000).await {
        Err(HandleError::Remote { code: Code::ResourceExhausted, kind, message, .. }) => {
            assert_eq!(kind, "ResultTooLarge");
            assert!(message.contains("65536"), "{message}");
        }
        other => panic!("expected a too-large result error, got {other:?}"),
    }
    manager.close().await.unwrap();
}

#[tokio::test]
async fn timers_tick_until_shutdown() {
    let (_server, manager) = start().await;
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = manager.launch(Ticker { ticks: ticks.clone() }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while ticks.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("three ticks");
    manager.shutdown(ticker.id(), MailboxPolicy::AgentDefault, WAIT).await.unwrap();
    let after = ticks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ticks.load(Ordering::SeqCst), after, "no tick after shutdown");
    manager.close().await.unwrap();
}

#[tokio::test]
async fn invoke_calls_an_sdk_agent_with_plain_json() {
    let (server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    let mut rpc =
        pb::exchange_service_client::ExchangeServiceClient::connect(server.url()).await.unwrap();
    use academy_proto::prost_types::{ListValue, Value, value::Kind};
    let args = |text: &str| {
        let item = Value { kind: Some(Kind::StringValue(text.into())) };
        Some(Value { kind: Some(Kind::ListValue(ListValue { values: vec![item] })) })
    };
    let req = pb::InvokeRequest {
        agent_id: echo.id().to_string(),
        action: "echo".into(),
        args: args("over grpc"),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_secs(5))),
    };
    let result = rpc.invoke(req).await.unwrap().into_inner().result.unwrap();
    assert_eq!(result.kind, Some(Kind::StringValue("over grpc".into())));
    let req = pb::InvokeRequest {
        agent_id: echo.id().to_string(),
        action: "refuse".into(),
        args: args("no"),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_secs(5))),
    };
    let err = rpc.invoke(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unknown);
    assert!(err.message().contains("refused: no"), "{}", err.message());
    manager.close().await.unwrap();
}

#[tokio::test]
async fn calls_fail_with_a_retryable_error_when_the_exchange_goes_away() {
    let (server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    assert_eq!(echo.echo("up".into()).await.unwrap(), "up");
    server.shutdown().await;
    let err = echo.with_timeout(Duration::from_secs(5)).echo("down".into()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

/// Sends from many tasks at once share one client: some go straight out,
/// others queue and go in batches. Every one must arrive, each task's in order,
/// and a send to a missing mailbox must fail alone.
#[tokio::test]
async fn concurrent_sends_all_arrive_in_each_senders_order() {
    let (_server, manager) = start().await;
    let exchange = manager.exchange().clone();
    let dest = exchange.register_client().await.unwrap();
    let missing = academy_sdk::EntityId::new_agent();
    let src = manager.client_id().to_string();
    let (tasks, per_task) = (8, 150u64);
    let senders = (0..tasks as u64).map(|task| {
        let (exchange, src) = (exchange.clone(), src.clone());
        tokio::spawn(async move {
            for n in 0..per_task {
                let message = |dest: academy_sdk::EntityId| pb::Message {
                    header: Some(pb::Header {
                        src: src.clone(),
                        dest: dest.to_string(),
                        tag: uuid::Uuid::from_u64_pair(task, n).to_string(),
                        ..Default::default()
                    }),
                    body: Some(Body::PingRequest(pb::PingRequest {})),
                };
                exchange.send(message(dest)).await.unwrap();
                if n % 50 == 0 {
                    let err = exchange.send(message(missing)).await.unwrap_err();
                    assert!(
                        matches!(err, ClientError::Exchange(ExchangeError::NotFound(id)) if id == missing),
                        "{err:?}"
                    );
                }
            }
        })
    });
    for sender in futures::future::join_all(senders).await {
        sender.unwrap();
    }
    let mut stream = exchange.subscribe(&dest, 0, "").await.unwrap();
    let mut next = vec![0; tasks];
    let mut received = 0;
    while received < tasks as u64 * per_task {
        let batch = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("every message arrives")
            .unwrap()
            .unwrap();
        for delivery in batch {
            let tag: uuid::Uuid = delivery.message.unwrap().header.unwrap().tag.parse().unwrap();
            let (task, n) = tag.as_u64_pair();
            let task = usize::try_from(task).unwrap();
            assert_eq!(n, next[task], "task {task} out of order");
            next[task] += 1;
            received += 1;
        }
    }
    assert_eq!(next, vec![per_task; tasks]);
}

#[tokio::test]
async fn the_in_process_exchange_needs_no_server() {
    let manager = Manager::in_process().await.unwrap();
    let echo = manager.launch(Echo::new()).await.unwrap();
    let relay = manager.launch(Relay).await.unwrap();
    assert_eq!(relay.relay(echo.clone(), "local".into()).await.unwrap(), "via relay: local");
    let talkers = manager.discover("test.Talker", Matching::Implements).await.unwrap();
    assert_eq!(talkers.iter().map(|a| a.id).collect::<Vec<_>>(), vec![echo.id()]);
    manager.close().await.unwrap();
}

#[tokio::test]
async fn both_codecs_reach_sdk_agents() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    for codec in [Codec::Json, Codec::MsgPack] {
        let text = "ünïcödé \"quoted\"\n".repeat(3);
        assert_eq!(echo.with_codec(codec).echo(text.clone()).await.unwrap(), text);
    }
    manager.close().await.unwrap();
}

/// A peer that reads JSON only, written against the raw exchange API as one
/// in another language would be: handles must fall back to JSON, once.
#[tokio::test]
async fn handles_fall_back_to_json_for_agents_that_only_read_json() {
    let (_server, manager) = start().await;
    let exchange = manager.exchange().clone();
    let id = idle_agent(&manager).await;
    let mut deliveries = exchange.subscribe(&id, 0, "").await.unwrap();
    let peer = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            for pb::Delivery { seq, message } in deliveries.next().await.unwrap().unwrap() {
                let message = message.unwrap();
                let header = message.header.unwrap();
                let Some(Body::ActionRequest(request)) = message.body else {
                    continue;
                };
                let args = request.args.unwrap();
                seen.push(args.content_type.clone());
                let body = if args.content_type == "application/json" {
                    let (text,): (String,) = serde_json::from_slice(&args.data).unwrap();
                    Body::ActionResponse(pb::ActionResponse {
                        action: request.action,
                        result: Some(pb::Payload {
                            content_type: "application/json".into(),
                            data: serde_json::to_vec(&text).unwrap().into(),
                            ..Default::default()
                        }),
                    })
                } else {
                    Body::ErrorResponse(pb::ErrorResponse {
                        code: Code::InvalidArgument as i32,
                        kind: "UnsupportedContentType".into(),
                        message: "JSON only".into(),
                        details: Default::default(),
                    })
                };
                let reply = pb::Header {
                    src: header.dest,
                    dest: header.src,
                    tag: header.tag,
                    ..Default::default()
                };
                exchange.send(pb::Message { header: Some(reply), body: Some(body) }).await.unwrap();
                exchange.acknowledge(&id, vec![seq]).await.unwrap();
            }
        }
        seen
    });
    let handle = manager.handle::<Echo>(id);
    assert_eq!(handle.echo("one".into()).await.unwrap(), "one");
    assert_eq!(handle.clone().echo("two".into()).await.unwrap(), "two");
    let seen = tokio::time::timeout(Duration::from_secs(5), peer).await.unwrap().unwrap();
    assert_eq!(seen, ["application/msgpack", "application/json", "application/json"]);
    manager.close().await.unwrap();
}

#[tokio::test]
async fn a_runtime_whose_mailbox_is_taken_over_stops_without_terminating_it() {
    let (_server, manager) = start().await;
    let echo = manager.launch(Echo::new()).await.unwrap();
    assert!(echo.started().await.unwrap());
    // Another subscriber (say, a second copy of the agent) takes the mailbox.
    let _other = manager.exchange().subscribe(&echo.id(), 0, "").await.unwrap();
    match manager.wait(echo.id(), WAIT).await {
        Err(ManagerError::Agent(AgentError::MailboxLost { id, .. })) => assert_eq!(id, echo.id()),
        other => panic!("expected a lost mailbox, got {other:?}"),
    }
    let status = manager.exchange().status(&echo.id()).await.unwrap();
    assert_eq!(status.state, MailboxState::Active, "not the old runtime's to terminate");
    let _ = manager.close().await;
}

#[tokio::test]
async fn a_stalled_exchange_cannot_hold_a_call_past_its_timeout() {
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let proxy = common::Proxy::to(server.addr().tcp().unwrap()).await;
    let manager = Manager::connect(&format!("http://{}", proxy.addr)).await.unwrap();
    let echo = manager.launch(Echo::new()).await.unwrap();
    assert_eq!(echo.echo("before".into()).await.unwrap(), "before");

    proxy.freeze(true);
    let limit = Duration::from_millis(300);
    let impatient = echo.with_timeout(limit);
    let result =
        tokio::time::timeout(Duration::from_secs(5), impatient.echo("during".into())).await;
    assert_eq!(result.expect("returned, not hung"), Err(HandleError::Timeout(limit)));

    proxy.freeze(false);
    let after = echo.with_timeout(Duration::from_secs(5)).echo("after".into()).await;
    assert_eq!(after.unwrap(), "after");
    manager.close().await.unwrap();
}

#[tokio::test]
async fn agents_and_calls_ride_out_an_exchange_restart_on_redis() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let options = |listen| ExchangeOptions {
        listen,
        store: MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() }),
        ..Default::default()
    };
    let first = RunningExchange::start(options("127.0.0.1:0".parse().unwrap())).await.unwrap();
    let addr = first.addr().clone();
    let manager = Manager::connect(&first.url()).await.unwrap();
    let echo = manager.launch(Echo::new()).await.unwrap();
    assert_eq!(echo.echo("before".into()).await.unwrap(), "before");

    // In flight across the restart: accepted before, answered after.
    let in_flight = tokio::spawn({
        let echo = echo.with_timeout(Duration::from_secs(20));
        async move { echo.sleep(500).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    first.shutdown().await;

    // While the exchange is away, calls fail fast with a retryable error.
    let err = echo.with_timeout(Duration::from_secs(5)).echo("down".into()).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    // Stay down past the end of the action: its answer has to wait for us.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let _second = RunningExchange::start(options(addr)).await.unwrap();
    assert_eq!(in_flight.await.unwrap(), Ok(500), "the call in flight completes");
    // The agent resubscribed by itself: new calls work.
    let echo = echo.with_timeout(Duration::from_secs(10));
    assert_eq!(echo.echo("after".into()).await.unwrap(), "after");
    manager.close().await.unwrap();
}

/// A client whose `Session` was opened in a runtime that is gone does not
/// hang its next call: it is answered, or fails at once (the channel died
/// with that runtime), and never waits on a stream nobody reads.
#[test]
fn a_client_does_not_hang_on_a_session_whose_runtime_is_gone() {
    use academy_sdk::exchange::{ExchangeApi, GrpcExchange};
    let runtime = || tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let serving = runtime();
    let exchange = serving.block_on(RunningExchange::start(ExchangeOptions::default())).unwrap();
    let url = exchange.url();
    let ping = |id: academy_proto::EntityId| pb::Message {
        header: Some(pb::Header {
            src: id.to_string(),
            dest: id.to_string(),
            tag: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        }),
        body: Some(Body::PingRequest(pb::PingRequest {})),
    };
    let first = runtime();
    let (client, id) = first.block_on(async {
        let client = GrpcExchange::connect(url).await.unwrap();
        let id = client.register_client().await.unwrap();
        client.send(ping(id)).await.unwrap();
        (client, id)
    });
    drop(first);
    let second = runtime();
    let sent = second.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), client.send(ping(id))).await
    });
    assert!(sent.is_ok(), "the call hung on a session nobody reads");
    drop(client);
    drop(second);
    serving.block_on(exchange.shutdown());
}
