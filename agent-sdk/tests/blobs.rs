//! Payloads by reference (docs/design.md, "Blobs"), over gRPC against a
//! real exchange-server on both backends: actions and handles see plain
//! values, whatever size; blobs are freed once their call is over.

use std::time::Duration;

use academy_exchange::{BlobUsage, ExchangeOptions, MailboxStore, RedisOptions, RunningExchange};
use academy_proto::pb::{self, message::Body};
use academy_sdk::blob::Blob;
use academy_sdk::{ActionError, AgentConfig, HandleError, LaunchOptions, Manager, behaviour};
use academy_server::testing::RedisServer;
use futures::StreamExt as _;
use tonic::Code;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

struct Bytes;

#[behaviour(name = "test.Bytes")]
impl Bytes {
    #[action]
    async fn echo(&self, text: String) -> String {
        text
    }

    #[action]
    async fn reversed(&self, text: String) -> String {
        text.chars().rev().collect()
    }

    #[action]
    async fn slow(&self, text: String) -> usize {
        tokio::time::sleep(Duration::from_secs(1)).await;
        text.len()
    }

    #[action]
    async fn make(&self, bytes: usize) -> String {
        "y".repeat(bytes)
    }

    /// The SHA-256 of a blob, read a chunk at a time.
    #[action]
    async fn digest(&self, data: Blob) -> Result<String, ActionError> {
        use sha2::{Digest as _, Sha256};
        let mut chunks = data.chunks().await.map_err(|e| ActionError::internal(e.to_string()))?;
        let mut hasher = Sha256::new();
        while let Some(chunk) = chunks.next().await {
            hasher.update(&chunk.map_err(|e| ActionError::internal(e.to_string()))?);
        }
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A new blob, of the agent's, with the last `n` bytes of `data`.
    #[action]
    async fn tail(&self, data: Blob, n: usize) -> Result<Blob, ActionError> {
        let bytes = data.bytes().await.map_err(|e| ActionError::internal(e.to_string()))?;
        let tail = bytes.slice(bytes.len().saturating_sub(n)..);
        let size = tail.len() as u64;
        let reader = std::io::Cursor::new(tail);
        academy_sdk::blob::put(reader, size).await.map_err(|e| ActionError::internal(e.to_string()))
    }

    #[action]
    async fn make_slowly(&self, bytes: usize) -> String {
        tokio::time::sleep(Duration::from_millis(500)).await;
        "y".repeat(bytes)
    }
}

/// A server over the memory backend, or Redis when `redis` is given.
async fn server(redis: Option<&RedisServer>) -> RunningExchange {
    let store = redis.map_or(MailboxStore::Memory, |r| {
        MailboxStore::Redis(RedisOptions { url: r.url(), ..Default::default() })
    });
    RunningExchange::start(ExchangeOptions { store, ..Default::default() }).await.unwrap()
}

/// Waits (up to 10 s) for the blob store to be empty: callers free their
/// blobs in the background.
async fn until_empty(server: &RunningExchange) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let usage = server.exchange().blob_usage().await.unwrap();
        if usage == BlobUsage::default() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "blobs left behind: {usage:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent that answers by reference anything of 1 KiB or more.
async fn sending_by_reference(manager: &Manager) -> academy_sdk::Handle<Bytes> {
    let config = AgentConfig { blob_threshold: KIB, ..Default::default() };
    manager.launch_with(Bytes, LaunchOptions { config, ..Default::default() }).await.unwrap()
}

/// The error `agent` answers to a raw request whose arguments refer to
/// blob `key` in `store`, which is not there.
async fn answer_to_reference(
    manager: &Manager,
    agent: &academy_sdk::Handle<Bytes>,
    store: &str,
    key: &str,
) -> pb::ErrorResponse {
    let exchange = manager.exchange().clone();
    let me = exchange.register_client().await.unwrap();
    let mut deliveries = exchange.subscribe(&me, 0, "").await.unwrap();
    let blob = pb::BlobRef {
        store: store.into(),
        key: key.into(),
        size: 5,
        sha256: vec![0; 32],
        ..Default::default()
    };
    let content_type = "application/json".into();
    let args = pb::Payload { content_type, blob: Some(blob), ..Default::default() };
    let header = pb::Header {
        src: me.to_string(),
        dest: agent.id().to_string(),
        tag: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let body = Body::ActionRequest(pb::ActionRequest { action: "echo".into(), args: Some(args) });
    exchange.send(pb::Message { header: Some(header), body: Some(body) }).await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), deliveries.next()).await.unwrap();
    let message = answer.unwrap().unwrap().remove(0).message.unwrap();
    let Some(Body::ErrorResponse(error)) = message.body else { panic!("an error answers it") };
    error
}

/// Text of `n` bytes, different from place to place.
fn text(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

async fn arguments_and_results_beyond_a_message_go_by_reference(redis: Option<&RedisServer>) {
    let server = server(redis).await;
    let manager = Manager::connect(&server.url()).await.unwrap().with_blob_threshold(64 * KIB);
    let agent = manager.launch(Bytes).await.unwrap();
    // 10 MiB each way: more than a message may hold (4 MiB).
    let big = text(10 * MIB);
    let answer = agent.reversed(big.clone()).await.unwrap();
    assert!(answer.chars().eq(big.chars().rev()), "the result is the reversed argument");
    // Small ones stay inline: nothing is ever kept for them.
    assert_eq!(agent.echo("small".into()).await.unwrap(), "small");
    until_empty(&server).await;
    // By default, what would not fit in a message goes by reference.
    let default = Manager::connect(&server.url()).await.unwrap();
    let handle = default.handle::<Bytes>(agent.id());
    let five = text(5 * MIB);
    assert!(handle.echo(five.clone()).await.unwrap() == five);
    default.close().await.unwrap();
    // A manager that never sends by reference is held to the message limit.
    let inline = Manager::connect(&server.url()).await.unwrap().with_blob_threshold(usize::MAX);
    let handle = inline.handle::<Bytes>(agent.id());
    let err = handle.echo(text(5 * MIB)).await.unwrap_err();
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    manager.close().await.unwrap();
    inline.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_arguments_and_results_beyond_a_message_go_by_reference() {
    arguments_and_results_beyond_a_message_go_by_reference(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_arguments_and_results_beyond_a_message_go_by_reference() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    arguments_and_results_beyond_a_message_go_by_reference(Some(&redis)).await;
}

/// 10,000 calls whose arguments and results all go by reference leave
/// nothing in the store.
async fn ten_thousand_calls_by_reference_leave_the_store_empty(redis: Option<&RedisServer>) {
    let server = server(redis).await;
    let manager = Manager::connect(&server.url()).await.unwrap().with_blob_threshold(KIB);
    let agent = sending_by_reference(&manager).await;
    let payload = text(4 * KIB);
    let answered = futures::stream::iter(0..10_000)
        .map(|_| agent.echo(payload.clone()))
        .buffer_unordered(32)
        .filter(|answer| std::future::ready(answer.as_ref().is_ok_and(|a| *a == payload)))
        .count()
        .await;
    assert_eq!(answered, 10_000);
    until_empty(&server).await;
    manager.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ten_thousand_calls_by_reference_leave_the_store_empty() {
    ten_thousand_calls_by_reference_leave_the_store_empty(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ten_thousand_calls_by_reference_leave_the_store_empty() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    ten_thousand_calls_by_reference_leave_the_store_empty(Some(&redis)).await;
}

/// A call that times out frees its arguments; a result nobody waits for any
/// more is freed when it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_free_their_blobs() {
    let server = server(None).await;
    let manager = Manager::connect(&server.url()).await.unwrap().with_blob_threshold(KIB);
    let agent = sending_by_reference(&manager).await;
    let impatient = agent.with_timeout(Duration::from_millis(300));
    fn timed_out<T>(r: &Result<T, HandleError>) -> bool {
        matches!(r, Err(HandleError::Timeout(_)))
    }
    assert!(timed_out(&impatient.slow(text(MIB)).await));
    until_empty(&server).await;
    // The result comes after its caller gave up.
    assert!(timed_out(&impatient.make_slowly(2 * MIB).await));
    // Whatever the agent did meanwhile, nothing stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    until_empty(&server).await;
    manager.close().await.unwrap();
}

/// A reference that cannot be read answers an error naming the key, never
/// a hang; Invoke gives plain JSON for a result kept as a blob, or says why
/// it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_references_and_invoke() {
    let server = server(None).await;
    let manager = Manager::connect(&server.url()).await.unwrap();
    let agent = sending_by_reference(&manager).await;

    // A blob the exchange never kept.
    let key = "0123456789abcdef".repeat(4);
    let error = answer_to_reference(&manager, &agent, "exchange", &key).await;
    assert_eq!(error.code, Code::NotFound as i32);
    assert!(error.message.contains(&key), "{}", error.message);

    let mut rpc =
        pb::exchange_service_client::ExchangeServiceClient::connect(server.url()).await.unwrap();
    use academy_proto::prost_types::{ListValue, Value, value::Kind};
    let invoke = |bytes: usize| pb::InvokeRequest {
        agent_id: agent.id().to_string(),
        action: "make".into(),
        args: Some(Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![Value { kind: Some(Kind::NumberValue(bytes as f64)) }],
            })),
        }),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_secs(10))),
    };
    // Past the agent's threshold: kept as a blob, read back by the exchange.
    let result = rpc.invoke(invoke(64 * KIB)).await.unwrap().into_inner().result.unwrap();
    assert_eq!(result.kind, Some(Kind::StringValue("y".repeat(64 * KIB))));
    // Past what an InvokeResponse holds: refused, saying why.
    let err = rpc.invoke(invoke(5 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("reads blobs"), "{}", err.message());
    until_empty(&server).await;
    manager.close().await.unwrap();
}

/// Actions take and return `Blob`s: made from a file, read a chunk at a
/// time, written to a file; errors say what went wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_take_and_return_blobs_read_in_chunks() {
    use sha2::{Digest as _, Sha256};
    let server = server(None).await;
    let manager = Manager::connect(&server.url()).await.unwrap();
    let agent = manager.launch(Bytes).await.unwrap();
    let dir = std::env::temp_dir().join(format!("academy-blob-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let data: Vec<u8> = (0..9 * MIB + 5).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.join("in"), &data).unwrap();

    let blob = manager.put_file(dir.join("in")).await.unwrap();
    assert_eq!(blob.size(), data.len() as u64);
    let hex: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(agent.digest(blob.clone()).await.unwrap(), hex);

    let tail = agent.tail(blob.clone(), 3 * MIB).await.unwrap();
    let mut out = tokio::fs::File::create(dir.join("out")).await.unwrap();
    assert_eq!(tail.write_to(&mut out).await.unwrap(), 3 * MIB as u64);
    assert!(std::fs::read(dir.join("out")).unwrap() == data[data.len() - 3 * MIB..]);
    assert!(tail.delete().await.unwrap() && blob.delete().await.unwrap());
    assert_eq!(server.exchange().blob_usage().await.unwrap(), BlobUsage::default());

    // A blob freed before its reader reads it: an error naming it.
    let err = agent.digest(blob.clone()).await.unwrap_err();
    let HandleError::Remote { message, .. } = &err else { panic!("{err}") };
    assert!(message.contains(blob.key()) && message.contains("not found"), "{err}");
    // A reader that ends before the size it promised.
    let short = std::io::Cursor::new(vec![1u8; 10]);
    let err = manager.put_blob(short, 20).await.unwrap_err();
    assert!(err.to_string().contains("ended after 10 of 20 bytes"), "{err}");
    assert_eq!(server.exchange().blob_usage().await.unwrap(), BlobUsage::default());
    let missing = manager.put_file(dir.join("nowhere")).await.unwrap_err();
    assert!(missing.to_string().contains("nowhere"), "{missing}");
    std::fs::remove_dir_all(dir).unwrap();
    manager.close().await.unwrap();
}

/// With a directory shared on the node, blobs are files there: the exchange
/// keeps none; a receiver without the directory, or a file gone, gets an
/// error saying so; callers remove the files once the call is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_one_node_pass_blobs_as_files() {
    let server = server(None).await;
    let dir = std::env::temp_dir().join(format!("academy-files-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let manager =
        Manager::connect(&server.url()).await.unwrap().with_blob_threshold(KIB).with_blob_dir(&dir);
    let config =
        AgentConfig { blob_threshold: KIB, blob_dir: Some(dir.clone()), ..Default::default() };
    let agent =
        manager.launch_with(Bytes, LaunchOptions { config, ..Default::default() }).await.unwrap();
    let big = text(6 * MIB);
    let answer = agent.reversed(big.clone()).await.unwrap();
    assert!(answer.chars().eq(big.chars().rev()));
    assert_eq!(
        server.exchange().blob_usage().await.unwrap(),
        BlobUsage::default(),
        "none in the exchange"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&dir).unwrap().count() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "blob files left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An agent without the directory cannot read them, and says why.
    let elsewhere = manager.launch(Bytes).await.unwrap();
    let err = elsewhere.echo(text(2 * KIB)).await.unwrap_err();
    let HandleError::Remote { code, message, .. } = &err else { panic!("{err}") };
    assert_eq!(*code, Code::InvalidArgument, "{err}");
    assert!(message.contains("file store") && message.contains("blob_dir"), "{err}");
    // A file that is gone: NOT_FOUND, naming it.
    let key = "fedcba9876543210".repeat(4);
    let error = answer_to_reference(&manager, &agent, "file", &key).await;
    assert_eq!(error.code, Code::NotFound as i32);
    assert!(error.message.contains(&key), "{}", error.message);
    manager.close().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // A directory that is not there: refused, naming it, not worth a retry.
    let nowhere =
        Manager::connect(&server.url()).await.unwrap().with_blob_threshold(KIB).with_blob_dir(&dir);
    let err = nowhere.handle::<Bytes>(agent.id()).echo(text(2 * KIB)).await.unwrap_err();
    assert!(!err.is_retryable() && err.to_string().contains(&*dir.to_string_lossy()), "{err}");
}
