//! The peer store (docs/design.md, "Blobs"): with direct delivery, large
//! arguments and results travel once, between the peer endpoints of their
//! sender and receiver, over real sockets; the exchange keeps none of them
//! unless a request falls back to it.

use std::time::Duration;

use academy_exchange::{BlobUsage, ExchangeOptions, RunningExchange};
use academy_proto::pb::{self, peer_service_client::PeerServiceClient};
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::{AgentConfig, Endpoint, LaunchOptions, MailboxPolicy, Manager, behaviour};
use academy_server::testing::{sample, scrape};
use tonic::Code;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

struct Text;

#[behaviour(name = "test.Text")]
impl Text {
    #[action]
    async fn reversed(&self, text: String) -> String {
        text.chars().rev().collect()
    }

    #[action]
    async fn echo(&self, text: String) -> String {
        text
    }

    /// Text of `n` bytes, after half a second.
    #[action]
    async fn make_slowly(&self, n: usize) -> String {
        tokio::time::sleep(Duration::from_millis(500)).await;
        text(n)
    }

    #[action]
    async fn length(&self, text: String) -> usize {
        text.len()
    }
}

/// Text of `n` bytes, different from place to place.
fn text(n: usize) -> String {
    (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

async fn exchange() -> RunningExchange {
    let options = ExchangeOptions {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    RunningExchange::start(options).await.unwrap()
}

/// Bytes of blobs the exchange took so far.
fn blob_bytes_put(exchange: &RunningExchange) -> f64 {
    let (_, body) = scrape(exchange.metrics_addr().unwrap()).unwrap();
    sample(&body, "academy_exchange_blob_bytes_put_total").unwrap_or(0.0)
}

/// A manager calling directly from its own endpoint, sending by reference
/// anything of 1 KiB or more.
async fn manager(exchange: &RunningExchange) -> (Manager, Endpoint) {
    let grpc = GrpcExchange::connect(&exchange.url()).await.unwrap();
    let endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let manager = Manager::with_direct(std::sync::Arc::new(grpc), endpoint.clone()).await.unwrap();
    (manager.with_blob_threshold(KIB), endpoint)
}

/// Launches a `Text` agent taking requests at `endpoint` (if any),
/// answering by reference anything of 1 KiB or more.
async fn launch(
    manager: &Manager,
    endpoint: Option<&Endpoint>,
    agent_id: Option<academy_proto::EntityId>,
) -> academy_sdk::Handle<Text> {
    let config =
        AgentConfig { blob_threshold: KIB, direct: endpoint.cloned(), ..Default::default() };
    let options = LaunchOptions { config, agent_id, ..Default::default() };
    manager.launch_with(Text, options).await.unwrap()
}

fn accepted(exchange: &RunningExchange) -> f64 {
    let (_, body) = scrape(exchange.metrics_addr().unwrap()).unwrap();
    sample(&body, "academy_exchange_messages_accepted_total").unwrap_or(0.0)
}

/// Calls `agent` until a call goes directly (the exchange queues nothing
/// for it), up to 10 s: its endpoint may be found only on a later look-up.
async fn until_direct(agent: &academy_sdk::Handle<Text>, exchange: &RunningExchange) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = accepted(exchange);
        agent.length(text(10)).await.unwrap();
        if accepted(exchange) == before {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "calls never go directly");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (up to 10 s) until `endpoint` keeps no blob.
async fn until_empty(endpoint: &Endpoint) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while endpoint.blob_bytes() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "{} bytes left", endpoint.blob_bytes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Large arguments and results of direct calls go peer to peer: the
/// exchange takes none of their bytes, and once the calls are over
/// neither endpoint keeps any.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_calls_pass_large_values_between_peer_endpoints() {
    let exchange = exchange().await;
    let (manager, _mine) = manager(&exchange).await;
    let theirs = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let agent = launch(&manager, Some(&theirs), None).await;
    until_direct(&agent, &exchange).await;
    let before = blob_bytes_put(&exchange);

    let big = text(6 * MIB);
    for _ in 0..3 {
        assert!(agent.echo(big.clone()).await.unwrap() == big, "the same text back");
    }
    // Many calls, a little above the threshold each way.
    let small = text(4 * KIB);
    for _ in 0..1000 {
        assert_eq!(agent.reversed(small.clone()).await.unwrap().len(), small.len());
    }
    assert_eq!(blob_bytes_put(&exchange), before, "no blob went through the exchange");
    until_empty(&theirs).await;

    // A large result whose caller gave up is freed all the same.
    let impatient = agent.with_timeout(Duration::from_millis(100));
    let err = impatient.make_slowly(2 * MIB).await.unwrap_err();
    assert!(matches!(err, academy_sdk::HandleError::Timeout(_)), "{err}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    until_empty(&theirs).await;
    assert_eq!(exchange.exchange().blob_usage().await.unwrap(), BlobUsage::default());
    manager.close().await.unwrap();
}

/// A request whose peer endpoint no longer hosts its agent (which moved
/// to a process without one) goes through the exchange, its large
/// arguments with it; the endpoint frees the blob put there for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_arguments_follow_an_agent_that_moved_through_the_exchange() {
    let exchange = exchange().await;
    let (manager, _mine) = manager(&exchange).await;
    let theirs = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let agent = launch(&manager, Some(&theirs), None).await;
    let id = agent.id();
    until_direct(&agent, &exchange).await;
    assert_eq!(agent.length(text(2 * MIB)).await.unwrap(), 2 * MIB);
    let before = blob_bytes_put(&exchange);

    // It stops, keeping its mailbox, and runs again without an endpoint:
    // the sender still has the old endpoint as its route.
    manager.shutdown(id, MailboxPolicy::Keep, None).await.unwrap();
    let agent = launch(&manager, None, Some(id)).await;
    let big = text(3 * MIB);
    let answer = agent.reversed(big.clone()).await.unwrap();
    assert!(answer.chars().eq(big.chars().rev()));
    assert!(blob_bytes_put(&exchange) > before, "this time the exchange kept them");
    until_empty(&theirs).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while exchange.exchange().blob_usage().await.unwrap() != BlobUsage::default() {
        assert!(tokio::time::Instant::now() < deadline, "exchange blobs left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    manager.close().await.unwrap();
}

/// What a peer endpoint's blob service refuses, as a client in any
/// language would meet it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_endpoint_keeps_blobs_only_for_the_exchanges_own() {
    let exchange = exchange().await;
    let (manager, _mine) = manager(&exchange).await;
    let theirs = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let agent = launch(&manager, Some(&theirs), None).await;
    let mut rpc = PeerServiceClient::connect(theirs.url().to_owned()).await.unwrap();
    let put = |size: u64, chunks: Vec<Vec<u8>>, ticket: Option<&str>| {
        let head = pb::PutPeerBlobRequest { size, ..Default::default() };
        let rest = chunks
            .into_iter()
            .map(|c| pb::PutPeerBlobRequest { data: c.into(), ..Default::default() });
        let mut request =
            tonic::Request::new(futures::stream::iter(std::iter::once(head).chain(rest)));
        if let Some(ticket) = ticket {
            request.metadata_mut().insert("academy-ticket", ticket.parse().unwrap());
        }
        request
    };

    // No ticket, or one the exchange did not issue.
    let err = rpc.put_peer_blob(put(3, vec![b"abc".to_vec()], None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = rpc.put_peer_blob(put(3, vec![b"abc".to_vec()], Some("forged"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    let me = manager.client_id();
    let (ticket, _) = manager.exchange().issue_ticket(&me).await.unwrap();
    // Bytes that do not add up to the size, or more than the endpoint keeps.
    let err = rpc.put_peer_blob(put(5, vec![b"abc".to_vec()], Some(&ticket))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let err = rpc.put_peer_blob(put(2, vec![b"abc".to_vec()], Some(&ticket))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let huge = academy_sdk::blob::MAX_KEPT_BYTES + 1;
    let err = rpc.put_peer_blob(put(huge, vec![], Some(&ticket))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains(&academy_sdk::blob::MAX_KEPT_BYTES.to_string()), "{err}");
    assert_eq!(theirs.blob_bytes(), 0, "nothing kept of what was refused");

    // Kept, read once to its end, then gone: NOT_FOUND naming the key.
    let chunks = vec![b"hello ".to_vec(), b"world".to_vec()];
    let blob = rpc.put_peer_blob(put(11, chunks, Some(&ticket))).await.unwrap().into_inner();
    let blob = blob.blob.unwrap();
    assert_eq!(
        (blob.store.as_str(), blob.size, blob.endpoint.as_str()),
        ("peer", 11, theirs.url())
    );
    assert_eq!(theirs.blob_bytes(), 11);
    let read = async |rpc: &mut PeerServiceClient<_>, offset| {
        let request = pb::GetPeerBlobRequest { key: blob.key.clone(), offset };
        let mut stream = rpc.get_peer_blob(request).await?.into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend_from_slice(&chunk.data);
        }
        Ok::<_, tonic::Status>(data)
    };
    let err = read(&mut rpc, 12).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(read(&mut rpc, 6).await.unwrap(), b"world");
    let err = read(&mut rpc, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.message().contains(&blob.key), "{err}");
    assert_eq!(theirs.blob_bytes(), 0);

    // A request whose arguments name a blob at another endpoint: the agent
    // reads peer blobs only where they came from, so no sender makes it
    // connect to an address of its choosing; nor does the exchange carry
    // such a reference.
    let agent_id = agent.id().to_string();
    let blob = pb::BlobRef {
        store: "peer".into(),
        key: "ab".repeat(16),
        size: 5,
        endpoint: "http://127.0.0.1:9".into(),
        ..Default::default()
    };
    let request = |seq: u128| {
        let header = pb::Header {
            src: me.to_string(),
            dest: agent_id.clone(),
            tag: uuid::Uuid::from_u128(seq).to_string(),
            ..Default::default()
        };
        let args = pb::Payload {
            content_type: "application/json".into(),
            blob: Some(blob.clone()),
            ..Default::default()
        };
        let body = pb::message::Body::ActionRequest(pb::ActionRequest {
            action: "length".into(),
            args: Some(args),
        });
        pb::Message { header: Some(header), body: Some(body) }
    };
    let mut deliver = tonic::Request::new(futures::stream::iter([pb::DeliverRequest {
        seq: 1,
        message: Some(request(1)),
        resume: false,
    }]));
    deliver.metadata_mut().insert("academy-ticket", ticket.parse().unwrap());
    let mut answers = rpc.deliver(deliver).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(pb::deliver_response::Outcome::Answer(answer)) = answer.outcome else {
        panic!("answered: {answer:?}")
    };
    let Some(pb::message::Body::ErrorResponse(error)) = answer.body else { panic!("an error") };
    assert_eq!(error.code, Code::InvalidArgument as i32, "{}", error.message);
    assert!(error.message.contains("peer endpoint"), "{}", error.message);
    let err = manager.exchange().send(request(2)).await.unwrap_err();
    assert!(err.to_string().contains("store"), "{err}");

    // A large result is kept at the endpoint only for a sender that says
    // it reads it there; one from before the peer store gets it through
    // the exchange's store.
    let echo = |seq: u128| {
        let mut message = request(seq);
        let Some(pb::message::Body::ActionRequest(call)) = &mut message.body else {
            unreachable!()
        };
        let args = serde_json::to_vec(&(text(2 * KIB),)).unwrap();
        call.action = "echo".into();
        call.args = Some(pb::Payload {
            content_type: "application/json".into(),
            data: args.into(),
            ..Default::default()
        });
        pb::DeliverRequest { seq: 1, message: Some(message), resume: false }
    };
    let mut kept = None;
    for (header, store) in [(false, "exchange"), (true, "peer")] {
        let mut deliver = tonic::Request::new(futures::stream::iter([echo(3 + header as u128)]));
        deliver.metadata_mut().insert("academy-ticket", ticket.parse().unwrap());
        if header {
            deliver.metadata_mut().insert("academy-peer-blobs", "1".parse().unwrap());
        }
        let mut answers = rpc.deliver(deliver).await.unwrap().into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        let Some(pb::deliver_response::Outcome::Answer(answer)) = answer.outcome else {
            panic!("answered: {answer:?}")
        };
        let Some(pb::message::Body::ActionResponse(response)) = answer.body else { panic!() };
        let blob = response.result.unwrap().blob.expect("a result by reference");
        assert_eq!(blob.store, store);
        kept = Some(blob);
    }
    // Read once to its end, the one kept here is gone.
    let blob = kept.unwrap();
    assert_eq!(theirs.blob_bytes(), blob.size);
    let request = pb::GetPeerBlobRequest { key: blob.key.clone(), offset: 0 };
    let mut stream = rpc.get_peer_blob(request).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert_eq!(theirs.blob_bytes(), 0);

    // Deleting: whoever has the key; a gone one is not an error.
    let blob = rpc.put_peer_blob(put(1, vec![b"x".to_vec()], Some(&ticket))).await.unwrap();
    let key = blob.into_inner().blob.unwrap().key;
    let deleted =
        rpc.delete_peer_blob(pb::DeletePeerBlobRequest { key: key.clone() }).await.unwrap();
    assert!(deleted.into_inner().deleted);
    let deleted = rpc.delete_peer_blob(pb::DeletePeerBlobRequest { key }).await.unwrap();
    assert!(!deleted.into_inner().deleted);
    manager.close().await.unwrap();
}
