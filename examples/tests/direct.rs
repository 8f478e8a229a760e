//! Direct delivery (docs/design.md, "Direct delivery"), over real
//! processes: workers (the `worker` example) serving peer endpoints, a
//! manager calling their agents directly, the exchange only as fallback.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use academy_examples::behaviours::Ledger;
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_proto::pb::{self, launcher_service_client::LauncherServiceClient};
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::{Endpoint, HandleError, MailboxPolicy, Manager};
use common::{Killed, accepted, counted, launch_running, until, until_advertised, until_workers};

/// A `Deliver` request (number `seq`) from mailbox `src` for the entries
/// of agent `dest`, a `Ledger`.
fn entries(src: &str, dest: &str, seq: u64) -> pb::DeliverRequest {
    use academy_proto::pb::message::Body;
    pb::DeliverRequest {
        seq,
        resume: false,
        message: Some(pb::Message {
            header: Some(pb::Header {
                src: src.to_owned(),
                dest: dest.to_owned(),
                tag: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            }),
            body: Some(Body::ActionRequest(pb::ActionRequest {
                action: "entries".into(),
                args: None,
            })),
        }),
    }
}

/// A client of `exchange` with bearer token `token`.
async fn connect_as(
    exchange: &RunningExchange,
    token: &str,
) -> academy_sdk::exchange::SharedExchange {
    let credentials = academy_sdk::Credentials::bearer(token).unwrap();
    let grpc = GrpcExchange::connect_with(exchange.url(), &credentials).await.unwrap();
    std::sync::Arc::new(grpc)
}

fn worker(launcher: &str, name: &str) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--launcher", launcher, "--name", name, "--direct", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("worker starts");
    Killed(child)
}

/// Calls to an agent on another process go to its worker's peer endpoint,
/// not through the exchange; when that worker is killed (SIGKILL) with calls
/// on their way, every call is still answered — through the exchange, by
/// the agent's next incarnation — and none out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_directly_and_survive_a_sigkill_of_the_receiver() {
    let exchange = RunningExchange::start(counted()).await.unwrap();
    let launcher = common::launcher_on(exchange.url()).await;
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let w1 = worker(&launcher.url(), "w1");
    until_workers(&mut rpc, 1).await;
    let id = launch_running(&mut rpc, "example.Ledger").await;
    let mut get = async || {
        let request = pb::GetAgentRequest { agent_id: id.clone() };
        rpc.get_agent(request).await.unwrap().into_inner().agent.unwrap()
    };
    let _w2 = worker(&launcher.url(), "w2");

    let grpc = GrpcExchange::connect(exchange.url()).await.unwrap();
    let endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let manager = Manager::with_direct(std::sync::Arc::new(grpc), endpoint).await.unwrap();
    let agent_id = id.parse().unwrap();
    let advertised = until_advertised(manager.exchange(), agent_id).await;
    assert!(advertised.starts_with("http://127.0.0.1:"), "advertised: {advertised}");
    let ledger = manager.handle::<Ledger>(agent_id).with_timeout(Duration::from_secs(30));

    // Direct: 100 calls, and the exchange queues next to nothing (the
    // first call may go through it while the endpoint is looked up).
    let before = accepted(&exchange);
    for n in 0..100 {
        assert_eq!(ledger.append(n).await.unwrap(), n as usize + 1);
    }
    let routed = accepted(&exchange) - before;
    assert!(routed <= 2.0, "{routed} messages went through the exchange");

    // Calls on their way when the receiving worker dies.
    let calls = tokio::spawn({
        let ledger = ledger.clone();
        async move {
            let mut last = 0;
            for n in 100..400 {
                let entries = ledger.append(n).await.expect("every call is answered");
                // A new incarnation starts an empty ledger; otherwise it grows.
                assert!(entries > last || entries <= 2, "{entries} after {last}");
                last = entries;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(w1);
    calls.await.unwrap();
    let moved = get().await;
    assert!(moved.epoch >= 2, "the agent moved: {moved:?}");
    // The new incarnation took the rest in order (redelivered ones may
    // repeat, never go back).
    let entries = ledger.entries().await.unwrap();
    assert_eq!(entries.last(), Some(&399));
    assert!(entries.windows(2).all(|w| w[0] <= w[1]), "out of order: {entries:?}");
    manager.close().await.unwrap();
}

/// A terminated agent refuses direct calls with the error the exchange
/// gives; an endpoint on a Unix-domain socket works as one on TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_agent_refuses_direct_calls_as_the_exchange_does() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-direct-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = format!("unix:{}", dir.join("peer.sock").display());
    let endpoint = Endpoint::serve(&socket).await.unwrap();
    assert_eq!(endpoint.url(), socket);
    let grpc = std::sync::Arc::new(GrpcExchange::connect(exchange.url()).await.unwrap());
    let direct = Manager::with_direct(grpc.clone(), endpoint).await.unwrap();
    let routed = Manager::new(grpc).await.unwrap();
    let ledger = direct.launch(Ledger::default()).await.unwrap();
    assert_eq!(until_advertised(direct.exchange(), ledger.id()).await, socket);
    assert_eq!(ledger.append(7).await.unwrap(), 1);
    // The same agent through the exchange, from a manager without direct delivery.
    let other = routed.handle::<Ledger>(ledger.id());
    assert_eq!(other.append(8).await.unwrap(), 2);

    ledger.shutdown(MailboxPolicy::Terminate).await.unwrap();
    until("the endpoint is no longer advertised", async || {
        direct.exchange().status(&ledger.id()).await.unwrap().endpoint.is_empty()
    })
    .await;
    let directly = ledger.append(9).await.unwrap_err();
    let through = other.append(9).await.unwrap_err();
    assert!(matches!(directly, HandleError::Terminated(_)), "{directly:?}");
    assert_eq!(directly.to_string(), through.to_string());
    direct.close().await.unwrap();
    routed.close().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Nobody delivers directly who could not send through the exchange: a
/// stream must present a ticket the exchange vouches for, and its requests
/// must come from the mailbox the ticket names; an endpoint takes requests
/// only for agents it hosts. With tickets, a second principal's calls go
/// directly like the owner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_endpoint_takes_only_what_the_exchange_vouches_for() {
    use academy_proto::pb::{deliver_response::Outcome, peer_service_client};
    use tokio_stream::StreamExt as _;
    const ALICE: &str = "alice-token-0123456789";
    const BOB: &str = "bob-token-0123456789";
    let tokens =
        academy_server::auth::Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let options = ExchangeOptions { tokens: Some(tokens), ..counted() };
    let exchange = RunningExchange::start(options).await.unwrap();
    let (alices, bobs) = (connect_as(&exchange, ALICE).await, connect_as(&exchange, BOB).await);
    let endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let alice = Manager::with_direct(alices.clone(), endpoint.clone()).await.unwrap();
    let ledger = alice.launch(Ledger::default()).await.unwrap();
    until_advertised(alice.exchange(), ledger.id()).await;

    let mut peer =
        peer_service_client::PeerServiceClient::connect(endpoint.url().to_owned()).await.unwrap();
    let request = |src: &str, dest: &str| entries(src, dest, 1);
    let open = async |peer: &mut peer_service_client::PeerServiceClient<_>,
                      ticket: Option<&str>,
                      first: pb::DeliverRequest| {
        let mut call = tonic::Request::new(tokio_stream::once(first));
        if let Some(ticket) = ticket {
            call.metadata_mut().insert("academy-ticket", ticket.parse().unwrap());
        }
        peer.deliver(call).await
    };
    let bob_client = bobs.register_client().await.unwrap().to_string();
    let alice_client = alice.client_id().to_string();
    let agent = ledger.id().to_string();
    let refused = open(&mut peer, None, request(&bob_client, &agent)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let forged = "0".repeat(64);
    let refused = open(&mut peer, Some(&forged), request(&bob_client, &agent)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // Bob's ticket is for Bob's mailbox: not for sending as Alice's.
    let (ticket, _) = bobs.issue_ticket(&bob_client.parse().unwrap()).await.unwrap();
    let outcome = async |first: pb::DeliverRequest| {
        let mut peer = peer.clone();
        let mut answers = open(&mut peer, Some(&ticket), first).await.unwrap().into_inner();
        answers.next().await.unwrap().unwrap().outcome.unwrap()
    };
    match outcome(request(&alice_client, &agent)).await {
        Outcome::Refused(why) => assert_eq!(why.reason, "NOT_OWNER", "{why:?}"),
        other => panic!("taken: {other:?}"),
    }
    let elsewhere = format!("agent:{}", uuid::Uuid::new_v4());
    match outcome(request(&bob_client, &elsewhere)).await {
        Outcome::Refused(why) => assert_eq!(why.reason, "NOT_HOSTED", "{why:?}"),
        other => panic!("taken: {other:?}"),
    }
    assert!(matches!(outcome(request(&bob_client, &agent)).await, Outcome::Answer(_)));

    // Bob's own manager calls Alice's agent directly, as it may through
    // the exchange.
    let bob_endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let bob = Manager::with_direct(bobs, bob_endpoint).await.unwrap();
    let his = bob.handle::<Ledger>(ledger.id());
    his.append(1).await.unwrap();
    let before = accepted(&exchange);
    for n in 2..50 {
        assert_eq!(his.append(n).await.unwrap(), n as usize);
    }
    assert!(accepted(&exchange) - before <= 1.0, "Bob's calls went through the exchange");
    bob.close().await.unwrap();
    alice.close().await.unwrap();
}

/// An agent that takes its time.
#[derive(Debug, Default)]
struct Sleeper {}

#[academy_sdk::behaviour(name = "test.Sleeper")]
impl Sleeper {
    #[action]
    async fn sleep(&self) {
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// What an agent holds of requests that came directly is bounded like a
/// mailbox (10,000 requests): beyond, its endpoint refuses them, and they
/// go through the exchange, where its mailbox's bounds apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_endpoint_bounds_what_an_agent_holds() {
    use academy_proto::pb::{deliver_response::Outcome, message::Body, peer_service_client};
    use tokio_stream::StreamExt as _;
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let grpc: academy_sdk::exchange::SharedExchange =
        std::sync::Arc::new(GrpcExchange::connect(exchange.url()).await.unwrap());
    let endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let manager = Manager::with_direct(grpc.clone(), endpoint.clone()).await.unwrap();
    let sleeper = manager.launch(Sleeper::default()).await.unwrap();
    until_advertised(&grpc, sleeper.id()).await;
    let client = grpc.register_client().await.unwrap();
    let (ticket, _) = grpc.issue_ticket(&client).await.unwrap();
    let requests = (1..=10_001u64).map(move |seq| pb::DeliverRequest {
        seq,
        resume: false,
        message: Some(pb::Message {
            header: Some(pb::Header {
                src: client.to_string(),
                dest: sleeper.id().to_string(),
                tag: seq.to_string(),
                ..Default::default()
            }),
            body: Some(Body::ActionRequest(pb::ActionRequest {
                action: "sleep".into(),
                args: None,
            })),
        }),
    });
    let mut call = tonic::Request::new(tokio_stream::iter(requests));
    call.metadata_mut().insert("academy-ticket", ticket.parse().unwrap());
    let mut peer =
        peer_service_client::PeerServiceClient::connect(endpoint.url().to_owned()).await.unwrap();
    let mut outcomes = peer.deliver(call).await.unwrap().into_inner();
    // The first 10,000 are taken (and sleep): nothing is said of them yet.
    let first = outcomes.next().await.unwrap().unwrap();
    match first.outcome.unwrap() {
        Outcome::Refused(why) => {
            assert_eq!((first.seq, why.reason.as_str()), (10_001, "DIRECT_FULL"), "{why:?}");
        }
        Outcome::Answer(answer) => panic!("answered: {answer:?}"),
    }
    manager.close().await.unwrap();
}

/// An agent whose calls wait until its gate opens (closes: every wait ends).
#[derive(Debug)]
struct Gate {
    open: std::sync::Arc<tokio::sync::Semaphore>,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[academy_sdk::behaviour(name = "test.Gate")]
impl Gate {
    #[action]
    async fn pass(&self) {
        self.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self.open.acquire().await;
    }
}

/// A burst past what an agent may hold of direct requests is refused at its
/// endpoint and goes through the exchange (after the requests before it are
/// answered: per-sender order); once all of it is answered, the sender's
/// calls go directly again on the same stream (they say `resume`), rather
/// than through the exchange from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_refused_at_the_endpoint_calls_go_directly_again() {
    let exchange = RunningExchange::start(counted()).await.unwrap();
    let grpc =
        || async { std::sync::Arc::new(GrpcExchange::connect(exchange.url()).await.unwrap()) };
    let host = Manager::with_direct(grpc().await, Endpoint::serve("127.0.0.1:0").await.unwrap())
        .await
        .unwrap();
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let waiting = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = host.launch(Gate { open: open.clone(), waiting: waiting.clone() }).await.unwrap();
    let sender = Manager::with_direct(grpc().await, Endpoint::serve("127.0.0.1:0").await.unwrap())
        .await
        .unwrap();
    until_advertised(sender.exchange(), gate.id()).await;
    let handle = sender.handle::<Gate>(gate.id()).with_timeout(Duration::from_secs(60));

    // The agent takes 10,000 directly (and they wait); the 100 past them
    // are refused, and go through the exchange once those are answered.
    let before = accepted(&exchange);
    let burst = {
        let handle = handle.clone();
        tokio::spawn(
            async move { futures::future::join_all((0..10_100).map(|_| handle.pass())).await },
        )
    };
    until("the agent holds 10,000", async || {
        waiting.load(std::sync::atomic::Ordering::Relaxed) >= 10_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    open.close();
    for answer in burst.await.unwrap() {
        answer.unwrap();
    }
    let refused = accepted(&exchange) - before;
    assert!(refused >= 100.0, "only {refused} calls went through the exchange");

    // Once its endpoint is looked up again, the next calls go directly.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = accepted(&exchange);
    for _ in 0..100 {
        handle.pass().await.unwrap();
    }
    let through_exchange = accepted(&exchange) - before;
    assert!(
        through_exchange <= 2.0,
        "{through_exchange} messages of 100 calls went through the exchange"
    );
    sender.close().await.unwrap();
    host.close().await.unwrap();
}

/// A peer endpoint served over TLS: senders that trust its CA (the one they
/// trust their exchange by) call its agents directly, large arguments and
/// results included; a sender that does not trust it, or that shows no
/// client certificate to one requiring mutual TLS, cannot reach it and
/// calls through the exchange instead, and every call is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_endpoint_over_tls_is_reached_only_by_senders_it_trusts() {
    use academy_examples::behaviours::Cleaner;
    use academy_sdk::{Credentials, EndpointTls};
    use academy_server::testing::TestPki;
    let pki = TestPki::new("peer CA");
    let exchange = RunningExchange::start(counted()).await.unwrap();
    let trusting = Credentials::none().with_tls_ca(pki.ca().as_bytes());
    let stranger = Credentials::none();
    let certified = trusting
        .clone()
        .with_client_certificate(pki.client.cert.as_bytes(), pki.client.key.as_bytes());
    let manager = async |credentials: &Credentials| {
        let grpc = GrpcExchange::connect_with(exchange.url(), credentials).await.unwrap();
        let endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
        Manager::with_direct(std::sync::Arc::new(grpc), endpoint).await.unwrap()
    };
    let tls = EndpointTls::new(pki.server.cert.as_bytes(), pki.server.key.as_bytes());
    // Messages through the exchange while `sender` makes 20 calls to `agent`.
    let routed = async |sender: &Manager, agent| {
        let ledger = sender.handle::<Ledger>(agent).with_timeout(Duration::from_secs(30));
        let before = accepted(&exchange);
        for n in 0..20 {
            ledger.append(n).await.unwrap();
        }
        accepted(&exchange) - before
    };

    for mutual in [false, true] {
        let tls =
            if mutual { tls.clone().with_client_ca(pki.ca().as_bytes()) } else { tls.clone() };
        let endpoint = Endpoint::serve_tls("127.0.0.1:0", &tls).await.unwrap();
        assert!(endpoint.url().starts_with("https://127.0.0.1:"), "{}", endpoint.url());
        let grpc = GrpcExchange::connect(exchange.url()).await.unwrap();
        let host = Manager::with_direct(std::sync::Arc::new(grpc), endpoint.clone()).await.unwrap();
        let agent = host.launch(Ledger::default()).await.unwrap().id();
        assert_eq!(until_advertised(host.exchange(), agent).await, endpoint.url());

        // Trusted (and, for mutual TLS, certified): directly (the first call
        // may go through the exchange while the endpoint is looked up).
        let good = manager(if mutual { &certified } else { &trusting }).await;
        let through = routed(&good, agent).await;
        assert!(through <= 2.0, "mutual {mutual}: {through} messages through the exchange");
        // A large argument and result go peer to peer too.
        let cleaner = host.launch(Cleaner::default()).await.unwrap().id();
        let text = "A".repeat(5 << 20);
        let before = accepted(&exchange);
        let cleaned = good.handle::<Cleaner>(cleaner).clean(text).await.unwrap();
        assert_eq!(cleaned, "a".repeat(5 << 20));
        let cleaned = good.handle::<Cleaner>(cleaner).clean("B".repeat(5 << 20)).await.unwrap();
        assert_eq!(cleaned.len(), 5 << 20);
        assert!(accepted(&exchange) - before <= 2.0, "mutual {mutual}: large calls routed");

        // Not trusted, or no client certificate: through the exchange.
        let bad = manager(if mutual { &trusting } else { &stranger }).await;
        let through = routed(&bad, agent).await;
        assert!(through >= 40.0, "mutual {mutual}: only {through} messages through the exchange");
        for m in [good, bad, host] {
            m.close().await.unwrap();
        }
    }
}

/// A peer endpoint served from certificate files reads them again: after
/// they are replaced (a renewal by another CA here), new connections get the
/// new certificate and senders trusting the new CA call directly; files that
/// do not load leave the last good certificate served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_endpoint_serves_its_renewed_certificate_without_a_restart() {
    use academy_sdk::{Credentials, EndpointTls};
    use academy_server::testing::{PemFiles, TestPki};
    let files = PemFiles::new("peer-tls");
    let (old, new) = (TestPki::new("old peer CA"), TestPki::new("new peer CA"));
    files.write(&old.server);
    let tls = EndpointTls::from_files(&files.cert, &files.key).unwrap();
    let endpoint = Endpoint::serve_tls("127.0.0.1:0", &tls).await.unwrap();
    let trusts = |pki: &TestPki| Credentials::none().with_tls_ca(pki.ca().as_bytes());
    // Within a bound, while another connection stalls its handshake: an
    // endpoint handshakes its connections beside each other.
    let connects = async |pki: &TestPki| {
        let credentials = trusts(pki);
        let connected = credentials.connect(endpoint.url());
        tokio::time::timeout(Duration::from_secs(5), connected).await.expect("handshake").is_ok()
    };
    let address = endpoint.url().trim_start_matches("https://").to_owned();
    let _stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    assert!(connects(&old).await && !connects(&new).await);

    files.write(&new.server);
    let bound = academy_server::tls::RELOAD_EVERY * 2;
    let deadline = std::time::Instant::now() + bound;
    while !connects(&new).await {
        assert!(std::time::Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!connects(&old).await, "new connections get the new certificate only");

    // Senders trusting the new CA call its agents directly.
    let exchange = RunningExchange::start(counted()).await.unwrap();
    let grpc = GrpcExchange::connect(exchange.url()).await.unwrap();
    let host = Manager::with_direct(std::sync::Arc::new(grpc), endpoint.clone()).await.unwrap();
    let agent = host.launch(Ledger::default()).await.unwrap().id();
    let grpc = GrpcExchange::connect_with(exchange.url(), &trusts(&new)).await.unwrap();
    let sender = Manager::with_direct(
        std::sync::Arc::new(grpc),
        Endpoint::serve("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    let ledger = sender.handle::<Ledger>(agent).with_timeout(Duration::from_secs(30));
    let before = accepted(&exchange);
    for n in 0..20 {
        ledger.append(n).await.unwrap();
    }
    let through = accepted(&exchange) - before;
    assert!(through <= 2.0, "{through} messages through the exchange");

    // A key that is not PEM: the last good pair stays.
    std::fs::write(&files.key, "not a key").unwrap();
    tokio::time::sleep(bound).await;
    assert!(connects(&new).await, "a broken renewal is not taken");
    for m in [sender, host] {
        m.close().await.unwrap();
    }
}

/// An endpoint refuses to serve what it could not advertise or serve:
/// an unspecified address (peers on other nodes would be sent to their
/// own), TLS on a Unix socket, a certificate that is not PEM.
#[tokio::test]
async fn an_endpoint_refuses_what_it_cannot_advertise_or_serve() {
    use academy_sdk::EndpointTls;
    use academy_server::testing::TestPki;
    for address in ["0.0.0.0:0", "[::]:0"] {
        let err = Endpoint::serve(address).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{address}: {err}");
        assert!(err.to_string().contains("unspecified address"), "{err}");
    }
    let pki = TestPki::new("peer CA");
    let tls = EndpointTls::new(pki.server.cert.as_bytes(), pki.server.key.as_bytes());
    let err = Endpoint::serve_tls("0.0.0.0:0", &tls).await.unwrap_err();
    assert!(err.to_string().contains("unspecified address"), "{err}");
    let err = Endpoint::serve_tls("unix:/tmp/academy-peer-tls.sock", &tls).await.unwrap_err();
    assert!(err.to_string().contains("TLS is for TCP endpoints"), "{err}");
    // A Unix socket a live endpoint serves is not taken over.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-direct-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = format!("unix:{}", dir.join("peer.sock").display());
    let live = Endpoint::serve(&socket).await.unwrap();
    let err = Endpoint::serve(&socket).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains("listens on"), "{err}");
    drop(live);
    // Nor one whose process accepts nothing and whose backlog is full.
    let path = dir.join("busy.sock");
    let busy = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut queued = Vec::new();
    while queued.len() < 100_000 {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    let busy_socket = format!("unix:{}", path.display());
    let err = Endpoint::serve(&busy_socket).await.unwrap_err();
    assert!(err.to_string().contains("busy.sock"), "{err}");
    drop((busy, queued));
    // A socket file nobody accepts on is taken over; any other file is kept.
    assert!(Endpoint::serve(&busy_socket).await.is_ok());
    let file = dir.join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    let err = Endpoint::serve(&format!("unix:{}", file.display())).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let garbage = EndpointTls::new(b"not a certificate", b"not a key");
    let err = Endpoint::serve_tls("127.0.0.1:0", &garbage).await.unwrap_err();
    assert!(err.to_string().contains("peer endpoint TLS"), "{err}");
    assert!(Endpoint::serve_tls("127.0.0.1:0", &tls).await.is_ok());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A direct stream lasts no longer than its sender's token: once the
/// exchange's tokens file no longer holds it, the endpoint (asking the
/// exchange about the stream's ticket every 30 s) ends the stream
/// UNAUTHENTICATED, and a new one with that ticket is refused. Another
/// principal's stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_stream_ends_once_its_senders_token_is_revoked() {
    use academy_proto::pb::{deliver_response::Outcome, peer_service_client};
    use tokio_stream::StreamExt as _;
    const ALICE: &str = "alice-token-0123456789";
    const BOB: &str = "bob-token-0123456789";
    let dir = std::env::temp_dir().join(format!("academy-direct-revoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let tokens =
        academy_server::auth::Tokens::load(&file).unwrap().reload_every(Duration::from_millis(50));
    let options = ExchangeOptions { tokens: Some(tokens), ..counted() };
    let exchange = RunningExchange::start(options).await.unwrap();
    let (alices, bobs) = (connect_as(&exchange, ALICE).await, connect_as(&exchange, BOB).await);
    let endpoint = Endpoint::serve("127.0.0.1:0").await.unwrap();
    let bob = Manager::with_direct(bobs.clone(), endpoint.clone()).await.unwrap();
    let ledger = bob.launch(Ledger::default()).await.unwrap();
    until_advertised(bob.exchange(), ledger.id()).await;

    // A stream for each principal, fed as the test goes.
    let peer =
        peer_service_client::PeerServiceClient::connect(endpoint.url().to_owned()).await.unwrap();
    let agent = ledger.id().to_string();
    let open = async |grpc: &academy_sdk::exchange::SharedExchange| {
        let client = grpc.register_client().await.unwrap();
        let (ticket, _) = grpc.issue_ticket(&client).await.unwrap();
        let (feed, requests) = tokio::sync::mpsc::channel(4);
        let mut call = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(requests));
        call.metadata_mut().insert("academy-ticket", ticket.parse().unwrap());
        let answers = peer.clone().deliver(call).await.unwrap().into_inner();
        (client.to_string(), ticket, feed, answers)
    };
    let request = |src: &str, seq: u64| entries(src, &agent, seq);
    let (alice_src, alice_ticket, alice_feed, mut alice_answers) = open(&alices).await;
    let (bob_src, _, bob_feed, mut bob_answers) = open(&bobs).await;
    alice_feed.send(request(&alice_src, 1)).await.unwrap();
    let taken = alice_answers.next().await.unwrap().unwrap();
    assert!(matches!(taken.outcome, Some(Outcome::Answer(_))), "{taken:?}");

    std::fs::write(&file, format!("bob {BOB}\n")).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(45), alice_answers.next()).await;
    let status = ended.expect("the stream ends").expect("with a status").unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    let mut again = tonic::Request::new(tokio_stream::once(request(&alice_src, 2)));
    again.metadata_mut().insert("academy-ticket", alice_ticket.parse().unwrap());
    let refused = peer.clone().deliver(again).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    bob_feed.send(request(&bob_src, 1)).await.unwrap();
    let taken = bob_answers.next().await.unwrap().unwrap();
    assert!(matches!(taken.outcome, Some(Outcome::Answer(_))), "{taken:?}");
    drop((alice_feed, bob_feed));
    bob.close().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
