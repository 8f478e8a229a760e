//! The exchange under attack, as a separate process (the binary, in
//! memory): each attack runs in a bounded loop while a probe keeps calling
//! Status; the exchange must stay within 256 MiB of memory and keep
//! answering. The Status latencies seen meanwhile are printed (run with
//! `--nocapture`), not asserted: timings are the benchmark's business.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod common;
use common::{fds, message, rss, spawn_exchange};

use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient, message::Body};
use tonic::transport::Channel;

/// The most memory the exchange may hold under any attack.
const MAX_RSS: u64 = 256 << 20;

struct Exchange {
    child: std::process::Child,
    url: String,
}

impl Exchange {
    fn start(envs: &[(&str, &str)]) -> Self {
        let envs = [envs, &[("ACADEMY_EXCHANGE_WORKER_THREADS", "0")]].concat();
        let (child, url) = spawn_exchange(&envs, &[]);
        Self { child, url }
    }

    async fn client(&self) -> ExchangeServiceClient<Channel> {
        let channel = Channel::from_shared(self.url.clone()).unwrap().connect().await.unwrap();
        ExchangeServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `attack` while probing: Status latencies (ms), and the largest
    /// memory seen.
    async fn under<F: Future<Output = ()>>(&self, name: &str, attack: F) -> u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let probe = {
            let (stop, mut rpc, pid) = (stop.clone(), self.client().await, self.pid());
            tokio::spawn(async move {
                let (mut latencies, mut peak) = (Vec::new(), 0);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let mut request = tonic::Request::new(pb::StatusRequest {
                        mailbox_id: format!("client:{}", uuid::Uuid::now_v7()),
                    });
                    request.set_timeout(Duration::from_secs(5));
                    let answer = rpc.status(request).await;
                    assert!(answer.is_ok(), "the probe went unanswered: {answer:?}");
                    latencies.push(started.elapsed());
                    peak = peak.max(rss(pid));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (latencies, peak)
            })
        };
        attack.await;
        stop.store(true, Ordering::Relaxed);
        let (mut latencies, peak) = probe.await.unwrap();
        let peak = peak.max(rss(self.pid()));
        latencies.sort();
        let p99 = latencies.get(latencies.len() * 99 / 100).copied().unwrap_or_default();
        println!(
            "{name}: {} probes, Status p99 {:.1} ms, peak RSS {} MiB",
            latencies.len(),
            p99.as_secs_f64() * 1e3,
            peak >> 20
        );
        assert!(peak <= MAX_RSS, "{name}: the exchange grew to {} MiB", peak >> 20);
        peak
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SendBatch` once had no cap on messages per call: 3.8 MiB of empty
/// messages answered 86 MiB, and eight such calls took the exchange past
/// 1.6 GiB. Now a batch is at most 1,000 messages and its answer bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplifying_batches_are_bounded() {
    let exchange = Exchange::start(&[]);
    let rpc = exchange.client().await;
    exchange
        .under("empty-message batches", async {
            let calls = (0..16).map(|i| {
                let mut rpc = rpc.clone();
                tokio::spawn(async move {
                    // Over the cap: refused whole; at it: a small answer each.
                    let n = if i % 2 == 0 { 200_000 } else { 1_000 };
                    let batch = pb::SendBatchRequest { messages: vec![pb::Message::default(); n] };
                    match rpc.send_batch(batch).await {
                        Ok(answer) => {
                            let answer = answer.into_inner();
                            assert_eq!(answer.results.len(), 1_000);
                            assert!(prost::Message::encoded_len(&answer) < 200_000);
                        }
                        Err(e) => assert_eq!(e.code(), tonic::Code::InvalidArgument),
                    }
                })
            });
            for call in calls {
                call.await.unwrap();
            }
        })
        .await;
}

/// One sender filling mailboxes with the largest messages: each mailbox
/// holds at most 64 MiB, so the exchange's memory stays bounded, and its
/// subscriber (with gRPC's default 4 MiB receive limit) still reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_large_messages_stays_within_the_mailbox_bounds() {
    let exchange = Exchange::start(&[]);
    let mut rpc = exchange.client().await;
    let (agent, client) = common::agent_and_client(&mut rpc, "test.Target").await;
    let max = academy_exchange::Limits::default().max_message_bytes;
    let big = |n: usize| {
        let mut m = message(&client, &agent, Body::PingRequest(pb::PingRequest {}));
        m.header.as_mut().unwrap().label = n.to_string();
        m.body = Some(Body::ActionRequest(pb::ActionRequest {
            action: "x".into(),
            args: Some(pb::Payload {
                content_type: "application/octet-stream".into(),
                data: vec![7; max - 200].into(),
                ..Default::default()
            }),
        }));
        m
    };
    let mut full = 0;
    exchange
        .under("4 MiB messages into one mailbox", async {
            for n in 0..40 {
                match rpc.send(pb::SendRequest { message: Some(big(n)) }).await {
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                        full += 1;
                    }
                }
            }
        })
        .await;
    assert!(full > 0, "the 64 MiB bound was reached");
    // A default client reads them all, one delivery at a time.
    let channel = Channel::from_shared(exchange.url.clone()).unwrap().connect().await.unwrap();
    let mut default_client = ExchangeServiceClient::new(channel);
    let mut stream = common::subscribe(&mut default_client, &agent).await;
    let mut got = 0;
    while got < 40 - full {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        got += frame.unwrap().unwrap().unwrap().deliveries.len();
    }
}

/// Connections that never send a byte were never closed nor capped: at the
/// descriptor limit the accept loop spun and new clients timed out. Now
/// they are closed after the handshake timeout, a peer holds a bounded
/// number, and the server's descriptors stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_closed() {
    let exchange = Exchange::start(&[
        ("ACADEMY_EXCHANGE_MAX_CONNECTIONS", "200"),
        ("ACADEMY_EXCHANGE_MAX_CONNECTIONS_PER_PEER", "150"),
        ("ACADEMY_EXCHANGE_HANDSHAKE_TIMEOUT_MS", "1000"),
    ]);
    let addr = exchange.url.trim_start_matches("http://").to_owned();
    let pid = exchange.pid();
    let mut idle = Vec::new();
    let mut most_fds = 0;
    exchange
        .under("600 idle connections", async {
            for _ in 0..600 {
                if let Ok(stream) = tokio::net::TcpStream::connect(&addr).await {
                    idle.push(stream);
                }
                most_fds = most_fds.max(fds(pid));
            }
            // Every idle connection is closed by the server within the
            // handshake timeout (or at once, over the cap).
            let deadline = Instant::now() + Duration::from_secs(10);
            for stream in &mut idle {
                let mut byte = [0u8; 1];
                let left = deadline.saturating_duration_since(Instant::now());
                let read = tokio::time::timeout(left, stream.peek(&mut byte)).await;
                assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed open");
            }
        })
        .await;
    println!("idle connections: the server held at most {most_fds} descriptors");
    assert!(most_fds <= 200 + 64, "{most_fds} descriptors");
}
