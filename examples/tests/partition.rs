//! Partitions, not only kills (docs/design.md, "The launcher" and
//! "Delivery"): the test makes its own hosts, network namespaces joined to
//! this one by a veth pair (`ip netns`, needs root), and cuts routes between
//! them with blackhole routes, so packets vanish as in a real partition (no
//! reset, no close).
//!
//! - A worker cut off from the launcher but not from the exchange: it stops
//!   its agents after its lease (it cannot tell whether the launcher moved
//!   them); the launcher moves them after the heartbeat timeout, at a new
//!   epoch; calls to the agent are all answered; when the cut heals the
//!   worker rejoins without a copy, and the agent stays where it moved.
//! - A client cut off from one exchange replica (two, on one Redis): its
//!   calls through that replica fail with a retryable error at once, through
//!   the other they work, and nothing sent meanwhile is lost.
//!
//! The services bind addresses of the veth pair: private to this machine,
//! reachable only from these namespaces.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use academy_examples::behaviours::WordStats;
use academy_exchange::{ExchangeOptions, MailboxStore, RedisOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::{self, AgentState, launcher_service_client::LauncherServiceClient};
use academy_sdk::Manager;
use common::{Killed, accepted, until};

/// A network namespace joined to this one by a veth pair: this side holds
/// `10.X.0.1`, `.3` and `.4`; the namespace `10.X.0.2`.
struct Host {
    name: String,
    net: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) runs");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Host {
    fn new() -> Self {
        let n = std::process::id() % 200 + 20;
        let (name, net) = (format!("acad{n}"), format!("10.{n}.0"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &format!("{name}a")]).output();
        ip(&["netns", "add", &name]);
        let (here, there) = (format!("{name}a"), format!("{name}b"));
        ip(&["link", "add", &here, "type", "veth", "peer", "name", &there]);
        ip(&["link", "set", &there, "netns", &name]);
        for last in [1, 3, 4] {
            ip(&["addr", "add", &format!("{net}.{last}/24"), "dev", &here]);
        }
        ip(&["link", "set", &here, "up"]);
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{net}.2/24"), "dev", &there]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &there, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Self { name, net }
    }

    /// An address on this side.
    fn here(&self, last: u8) -> String {
        format!("{}.{last}", self.net)
    }

    /// Runs `program` inside the namespace.
    fn spawn(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]).args(args);
        command
    }

    /// Drops (`cut`) or restores the namespace's packets to `address`.
    fn cut(&self, address: &str, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        let route = format!("{address}/32");
        ip(&["netns", "exec", &self.name, "ip", "route", verb, "blackhole", &route]);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = Command::new("ip").args(["link", "del", &format!("{}a", self.name)]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_agents_once_and_lose_nothing() {
    let host = Host::new();
    let redis = academy_server::testing::RedisServer::start().expect("redis-server runs");
    let replica = |last: u8| {
        let store = MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() });
        let listen = format!("{}:0", host.here(last)).parse().unwrap();
        RunningExchange::start(ExchangeOptions { listen, store, ..Default::default() })
    };
    let (a, b) = (replica(1).await.unwrap(), replica(4).await.unwrap());
    let launcher = RunningLauncher::start(LauncherOptions {
        listen: format!("{}:0", host.here(3)).parse().unwrap(),
        exchange_url: a.url(),
        heartbeat_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let workers = async |rpc: &mut LauncherServiceClient<_>| {
        let request = pb::ListWorkersRequest::default();
        rpc.list_workers(request).await.unwrap().into_inner().workers
    };

    // Worker 1 in the namespace, its logs kept; the agent goes to it.
    let log =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("w1-{}.log", host.name));
    let w1_log = std::fs::File::create(&log).unwrap();
    let url = launcher.url();
    let args = ["--launcher", url.as_str(), "--name", "w1"];
    let w1 = host.spawn(env!("CARGO_BIN_EXE_worker"), &args).stderr(w1_log).spawn().unwrap();
    let _w1 = Killed(w1);
    until("w1 joins", async || workers(&mut rpc).await.len() == 1).await;
    let launch =
        pb::LaunchAgentRequest { behaviour: "example.WordStats".into(), ..Default::default() };
    let id = rpc.launch_agent(launch).await.unwrap().into_inner().agent.unwrap().agent_id;
    let get = async |rpc: &mut LauncherServiceClient<_>| {
        let request = pb::GetAgentRequest { agent_id: id.clone() };
        rpc.get_agent(request).await.unwrap().into_inner().agent.unwrap()
    };
    until("the agent runs on w1", async || get(&mut rpc).await.state() == AgentState::Running)
        .await;
    let w2 = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--launcher", &launcher.url(), "--name", "w2"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _w2 = Killed(w2);
    until("w2 joins", async || workers(&mut rpc).await.len() == 2).await;

    // Calls go on through the cut, from this side, through replica B.
    let manager = Manager::connect(&b.url()).await.unwrap();
    let analyser =
        manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(20));
    let calls = tokio::spawn(async move {
        let mut answered = 0;
        for n in 0..40 {
            let words = analyser.analyse(format!("call {n} of the partition")).await.unwrap().words;
            assert_eq!(words, 5);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        answered
    });

    // Cut worker 1 off from the launcher, not from the exchange.
    host.cut(&host.here(3), true);
    until("the agent moves to w2", async || {
        let agent = get(&mut rpc).await;
        agent.state() == AgentState::Running && agent.epoch == 2
    })
    .await;
    let stopped = std::fs::read_to_string(&log).unwrap();
    until("w1 stops its copy", async || {
        std::fs::read_to_string(&log).unwrap().contains("launcher silent; stopping agents")
    })
    .await;
    assert_eq!(calls.await.unwrap(), 40, "every call answered");
    host.cut(&host.here(3), false);
    until("w1 rejoins", async || workers(&mut rpc).await.len() == 2).await;
    let agent = get(&mut rpc).await;
    assert_eq!((agent.state(), agent.epoch), (AgentState::Running, 2), "moved once: {stopped}");

    // A client in the namespace, cut off from replica A: through A it fails
    // with a retryable error; through B it works; nothing sent meanwhile is
    // lost (the pipeline's messages all arrive).
    host.cut(&host.here(1), true);
    let pipeline = |url: &str| {
        let out =
            host.spawn(env!("CARGO_BIN_EXE_pipeline"), &["--exchange", url]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = pipeline(&a.url());
    assert!(!ok && err.contains("cannot reach the exchange"), "{err}");
    let (ok, out, err) = pipeline(&b.url());
    assert!(ok, "{out}{err}");
    assert!(out.contains("expected error: String: nothing to analyse"), "{out}");
    host.cut(&host.here(1), false);
    manager.close().await.unwrap();
}

/// Direct delivery across a partition (docs/design.md, "Direct delivery"):
/// a worker in the namespace serves a peer endpoint; a manager on this side
/// calls its agent directly, is cut off from the endpoint (packets vanish)
/// but not from the exchange, and goes on through the exchange: the call on
/// its way when the cut came is resent once the peer connection's keepalive
/// gives up (about 2 s), the next ones go through the exchange at once, and
/// once the cut heals calls go directly again. Nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_cut_off_from_a_peer_falls_back_losing_nothing() {
    use academy_examples::behaviours::Ledger;
    let host = Host::new();
    let exchange = RunningExchange::start(ExchangeOptions {
        listen: format!("{}:0", host.here(3)).parse().unwrap(),
        ..common::counted()
    })
    .await
    .unwrap();
    let launcher = RunningLauncher::start(LauncherOptions {
        listen: format!("{}:0", host.here(4)).parse().unwrap(),
        exchange_url: exchange.url(),
        heartbeat_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let url = launcher.url();
    let peer = format!("{}.2:0", host.net);
    let args = ["--launcher", url.as_str(), "--name", "w1", "--direct", peer.as_str()];
    let w1 = host.spawn(env!("CARGO_BIN_EXE_worker"), &args).stderr(Stdio::null()).spawn();
    let _w1 = Killed(w1.unwrap());
    common::until_workers(&mut rpc, 1).await;
    let id = common::launch_running(&mut rpc, "example.Ledger").await;

    // This side reaches the namespace from its first address, here(1).
    let grpc = academy_sdk::exchange::GrpcExchange::connect(exchange.url()).await.unwrap();
    let endpoint = academy_sdk::Endpoint::serve("127.0.0.1:0").await.unwrap();
    let manager = Manager::with_direct(std::sync::Arc::new(grpc), endpoint).await.unwrap();
    let agent = id.parse().unwrap();
    common::until_advertised(manager.exchange(), agent).await;
    let ledger = manager.handle::<Ledger>(agent).with_timeout(Duration::from_secs(15));
    let mut n = 0;
    let mut call = async |ledger: &academy_sdk::Handle<Ledger>| {
        ledger.append(n).await.expect("every call is answered");
        n += 1;
    };
    let before = accepted(&exchange);
    for _ in 0..20 {
        call(&ledger).await;
    }
    let routed = accepted(&exchange) - before;
    assert!(routed <= 2.0, "before the cut, {routed} messages went through the exchange");

    host.cut(&host.here(1), true);
    let cut = Instant::now();
    call(&ledger).await;
    let fell_back = cut.elapsed();
    for _ in 0..20 {
        call(&ledger).await;
    }
    let before = accepted(&exchange);
    for _ in 0..10 {
        call(&ledger).await;
    }
    let routed = accepted(&exchange) - before;
    assert!(routed >= 20.0, "while cut off, {routed} messages went through the exchange");
    // A look-up a second later finds the endpoint again and cannot connect
    // to it (this call waits for that, once): it is unreachable for 5 s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    call(&ledger).await;

    host.cut(&host.here(1), false);
    // It is tried again after those 5 s, in the background: the call that
    // looks it up goes through the exchange without waiting, and the
    // look-up a second later finds it open.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let before = accepted(&exchange);
    call(&ledger).await;
    let routed = accepted(&exchange) - before;
    assert!(routed >= 2.0, "the call that tried again went directly ({routed} routed)");
    tokio::time::sleep(Duration::from_secs(2)).await;
    call(&ledger).await;
    let before = accepted(&exchange);
    for _ in 0..20 {
        call(&ledger).await;
    }
    let routed = accepted(&exchange) - before;
    assert!(routed <= 2.0, "after the cut healed, {routed} messages went through the exchange");

    let entries = ledger.entries().await.unwrap();
    let mut once = entries.clone();
    once.dedup();
    assert_eq!(once, (0..n).collect::<Vec<_>>(), "lost or reordered: {entries:?}");
    eprintln!("fell back {fell_back:?} after the cut; {} entries for {n} calls", entries.len());
    manager.close().await.unwrap();
}
