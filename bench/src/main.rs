//! End-to-end benchmark: a client and agents in this process, the exchange-server
//! in another process, all over loopback gRPC.
//!
//! `cargo run --release -p academy-bench` prints a Markdown table for BENCHMARKS.md.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use academy_sdk::{Handle, Manager, RawHandle, behaviour};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

mod long_run;
mod traced;

mod blobs;

#[allow(unreachable_pub, missing_docs, missing_debug_implementations, clippy::all)]
mod floor {
    tonic::include_proto!("academy.bench");
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(serde::Deserialize)]
struct Echo {}

#[behaviour(name = "bench.Echo")]
impl Echo {
    #[action]
    async fn echo(&self, data: String) -> String {
        data
    }
}

/// The echo with a kept state (a count of its calls), committed with each
/// answer: scenario (k).
#[derive(Default)]
struct KeptEcho {
    calls: std::sync::Mutex<u64>,
}

#[behaviour(name = "bench.KeptEcho")]
impl KeptEcho {
    #[state]
    fn calls(&self) -> &std::sync::Mutex<u64> {
        &self.calls
    }

    #[action]
    async fn echo(&self, data: String) -> String {
        *self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        data
    }
}

/// The same echo and state, without checkpoints (read-only to the runtime:
/// the count is saved every second): scenario (k), next to [`KeptEcho`].
#[derive(Default)]
struct LooseEcho {
    calls: std::sync::Mutex<u64>,
}

#[behaviour(name = "bench.LooseEcho")]
impl LooseEcho {
    #[state]
    fn calls(&self) -> &std::sync::Mutex<u64> {
        &self.calls
    }

    #[action(read_only)]
    async fn echo(&self, data: String) -> String {
        *self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner) += 1;
        data
    }
}

/// An hourly timer on the exchange's simulated clock: scenario (m).
#[derive(Default)]
struct Hourly {
    ticks: std::sync::atomic::AtomicU64,
}

#[behaviour(name = "bench.Hourly")]
impl Hourly {
    #[timer(every = std::time::Duration::from_secs(3600))]
    async fn tick(&self) {
        self.ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    #[action(read_only)]
    async fn ticks(&self) -> u64 {
        self.ticks.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Parser)]
#[command(about = "End-to-end benchmark of Academy over loopback gRPC")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Seconds each throughput scenario runs.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Calls in the sequential latency scenario.
    #[arg(long, default_value_t = 10_000)]
    calls: u64,
    /// Run only these scenarios (e.g. `--only b,d`), for profiling; `s` is
    /// the scale run (memory and discovery with `--mailboxes` idle mailboxes),
    /// `l` the launcher run (`--agents` agents on two workers, then failover),
    /// `f` (a) and (b) again with a thousand more agents subscribed, `t` (a)
    /// and (b) with bearer tokens and mutual TLS (in-memory exchange); `h`,
    /// not run by default, the long run (`--history` agents through the
    /// launcher, and mailboxes terminated on each backend); `o` (a) and (b)
    /// with every span exported by OTLP (in-memory exchange; runs last);
    /// `k` (a) and (b) on an action that changes a kept state, without and
    /// with its checkpoint; `m` a simulated day of an hourly timer; `u` (a)
    /// and (b) over a Unix-domain socket (and, with `a` on Redis, (a) with
    /// the exchange reaching Redis over its socket); `x` (a) to (d), and (g)'s 100 MiB
    /// call, with direct delivery to agents in another process, over TCP
    /// and a Unix socket.
    #[arg(long, value_delimiter = ',', default_value = "a,b,k,m,c,d,f,g,x,e,u,s,l,t,o")]
    only: Vec<char>,
    /// Agents launched and stopped, and mailboxes terminated per backend, in
    /// the long run.
    #[arg(long, default_value_t = 1_000_000)]
    history: usize,
    /// Agents launched in the launcher run.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Heartbeat timeout of the launcher run's launcher, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_timeout_ms: u64,
    /// Backends to measure, side by side.
    #[arg(long, value_delimiter = ',', default_value = "memory,redis")]
    backend: Vec<BackendKind>,
    /// Idle mailboxes registered for the scale run.
    #[arg(long, default_value_t = 100_000)]
    mailboxes: usize,
    /// Worker threads of the exchange process, as `academy-exchange
    /// --worker-threads` (0: one per core).
    #[arg(long, default_value_t = 0)]
    exchange_threads: usize,
    /// The argument sent from a file in scenario (g), in MiB.
    #[arg(long, default_value_t = 1024)]
    giant_mib: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    Memory,
    Redis,
}

#[derive(Subcommand)]
enum Role {
    /// Serve an exchange (the benchmark starts this in a child process).
    #[command(hide = true, name = "serve-exchange")]
    Exchange {
        /// Keep mailboxes in the Redis at this URL instead of in memory.
        #[arg(long)]
        redis: Option<String>,
        #[arg(long, default_value_t = 0)]
        worker_threads: usize,
        /// Require tokens and mutual TLS, from `tokens`, `server.pem`,
        /// `server.key` and `ca.pem` in this directory.
        #[arg(long)]
        secure_dir: Option<std::path::PathBuf>,
        /// Where to listen: HOST:PORT, or unix:/path.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: academy_exchange::Address,
        /// Keep blobs in files under this directory.
        #[arg(long)]
        blob_dir: Option<std::path::PathBuf>,
    },
    /// Serve the plain tonic echo (the floor), in a child process.
    #[command(hide = true, name = "serve-floor")]
    Floor,
    /// Serve a launcher, in a child process.
    #[command(hide = true, name = "serve-launcher")]
    Launcher {
        #[arg(long)]
        exchange: String,
        #[arg(long)]
        heartbeat_timeout_ms: u64,
        /// Seconds a stopped agent's record is kept.
        #[arg(long, default_value_t = 86_400)]
        retention_secs: u64,
    },
    /// Run echo agents taking requests at a peer endpoint (direct
    /// delivery), in a child process; prints their ids.
    #[command(hide = true, name = "serve-agents")]
    Agents {
        #[arg(long)]
        exchange: String,
        /// The peer endpoint's address: HOST:PORT or unix:/path.
        #[arg(long)]
        direct: String,
        #[arg(long)]
        count: usize,
    },
    /// Run a worker offering bench.Echo, in a child process.
    #[command(hide = true, name = "serve-worker")]
    Worker {
        #[arg(long)]
        launcher: String,
        #[arg(long)]
        capacity: u32,
    },
}

/// Other agents subscribed during scenario (f).
const FLEET: usize = 1000;

/// A server in a child process; killed on drop.
struct Server {
    child: Child,
    addr: academy_exchange::Address,
}

async fn spawn_server(role: &[&str]) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(role)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the server process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let line = BufReader::new(stdout).lines().next_line().await?.context("server said nothing")?;
    let addr = line.trim().parse().map_err(|e: String| anyhow::anyhow!(e))?;
    Ok(Server { child, addr })
}

async fn serve_exchange(
    redis: Option<String>,
    secure_dir: Option<std::path::PathBuf>,
    listen: academy_exchange::Address,
    blob_dir: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let backend = match redis {
        Some(url) => academy_exchange::MailboxStore::Redis(academy_exchange::RedisOptions {
            url,
            ..Default::default()
        }),
        None => academy_exchange::MailboxStore::Memory,
    };
    let limits = academy_exchange::Limits { max_queued: 100_000, ..Default::default() };
    let mut options = academy_exchange::ExchangeOptions {
        store: backend,
        limits,
        listen,
        blob_dir,
        ..Default::default()
    };
    if let Some(dir) = secure_dir {
        options.tokens = Some(academy_server::auth::Tokens::load(&dir.join("tokens"))?);
        let (cert, key, ca) = (dir.join("server.pem"), dir.join("server.key"), dir.join("ca.pem"));
        options.tls = Some(academy_server::tls::Tls::load(&cert, &key, Some(&ca))?);
    }
    let server = academy_exchange::RunningExchange::start(options).await?;
    println!("{}", server.addr());
    std::future::pending::<()>().await;
    Ok(())
}

#[derive(Debug)]
struct FloorService;

#[tonic::async_trait]
impl floor::floor_server::Floor for FloorService {
    async fn echo(
        &self,
        request: tonic::Request<floor::EchoMessage>,
    ) -> Result<tonic::Response<floor::EchoMessage>, tonic::Status> {
        Ok(tonic::Response::new(request.into_inner()))
    }

    type StreamStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<floor::EchoMessage, tonic::Status>> + Send>,
    >;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<floor::EchoMessage>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        Ok(tonic::Response::new(Box::pin(request.into_inner())))
    }
}

async fn serve_floor() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    // The same transport settings as the exchange-server's.
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(academy_proto::transport::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(academy_proto::transport::CONNECTION_WINDOW_BYTES))
        .add_service(floor::floor_server::FloorServer::new(FloorService))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// Sequential plain unary echoes of `bytes` bytes.
async fn floor_latency(
    floor: &floor::floor_client::FloorClient<tonic::transport::Channel>,
    bytes: usize,
    n: u64,
) -> anyhow::Result<Latency> {
    let data = bytes::Bytes::from(vec![b'x'; bytes]);
    sequential(n, || {
        let mut floor = floor.clone();
        let data = data.clone();
        async move {
            floor.echo(floor::EchoMessage { data }).await?;
            Ok(())
        }
    })
    .await
}

/// Sequential echo actions of `bytes` bytes (of any agent with an `echo`).
async fn echo_latency(echo: &RawHandle, bytes: usize, n: u64) -> anyhow::Result<Latency> {
    let data = payload(bytes);
    sequential(n, || async {
        // By reference, as the floor's echo sends its `Bytes` (a copy of
        // the argument would be the benchmark's work, not the SDK's).
        echo.call::<_, String>("echo", (data.as_str(),)).await?;
        Ok(())
    })
    .await
}

/// `PING` and its answer on a TCP connection to the Redis at `port`, `n`
/// times in a row: the floor of anything the exchange asks Redis.
async fn redis_floor<S>(socket: S, n: u64) -> anyhow::Result<Latency>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let socket = std::sync::Arc::new(tokio::sync::Mutex::new(socket));
    sequential(n, || {
        let socket = socket.clone();
        async move {
            let mut socket = socket.lock().await;
            socket.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
            let mut pong = [0; 7];
            socket.read_exact(&mut pong).await?;
            anyhow::ensure!(&pong == b"+PONG\r\n", "Redis answered PING with {pong:?}");
            Ok(())
        }
    })
    .await
}

fn payload(bytes: usize) -> String {
    "x".repeat(bytes)
}

struct Latency {
    p50_us: f64,
    p99_us: f64,
    per_sec: f64,
}

/// Calls `call` `n` times in a row (after a warm-up) and records each round trip.
async fn sequential<F, Fut>(n: u64, mut call: F) -> anyhow::Result<Latency>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    for _ in 0..n / 10 {
        call().await?;
    }
    let mut histogram = Histogram::<u64>::new(3)?;
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        call().await?;
        histogram.record(t.elapsed().as_nanos() as u64)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Latency {
        p50_us: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        per_sec: n as f64 / elapsed,
    })
}

/// Keeps `in_flight` calls going for `seconds`; calls per second.
async fn throughput(handle: &RawHandle, in_flight: usize, seconds: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let data = payload(100);
    let start = Instant::now();
    let workers = (0..in_flight).map(|_| {
        let handle = handle.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < deadline {
                handle.call::<_, String>("echo", (data.clone(),)).await?;
                calls += 1;
            }
            Ok::<_, anyhow::Error>(calls)
        })
    });
    let mut total = 0;
    for worker in futures::future::join_all(workers).await {
        total += worker??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// One client, `agents` agents, `calls` calls each, all at once; calls per second.
async fn fan_out(handles: &[Handle<Echo>], calls: usize, rounds: usize) -> anyhow::Result<f64> {
    let data = payload(100);
    let mut total = Duration::ZERO;
    for _ in 0..rounds {
        let start = Instant::now();
        let all = handles.iter().flat_map(|h| (0..calls).map(|_| h.echo(data.clone())));
        for result in futures::future::join_all(all).await {
            result?;
        }
        total += start.elapsed();
    }
    Ok((handles.len() * calls * rounds) as f64 / total.as_secs_f64())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split_once(':').map_or(l, |(_, v)| v).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

/// Resident memory of a process, in bytes (Linux).
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

/// Registers `n` idle agent mailboxes (behaviours `bench.Idle0..999`, all
/// implementing `bench.Idle`); returns memory growth and discovery latency.
async fn scale(url: &str, n: usize, pids: &[u32]) -> anyhow::Result<Vec<String>> {
    use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient};
    let rpc =
        ExchangeServiceClient::connect(url.to_owned()).await?.max_decoding_message_size(usize::MAX);
    let before: Vec<u64> = pids.iter().map(|p| rss(*p)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    use futures::StreamExt as _;
    let register = futures::stream::iter(0..n).map(|i| {
        let mut rpc = rpc.clone();
        async move {
            let req = pb::RegisterAgentRequest {
                behaviour: format!("bench.Idle{}", i % 1000),
                implements: vec!["bench.Idle".into()],
                name: format!("idle-{i}"),
                agent_id: String::new(),
                description: None,
            };
            rpc.register_agent(req).await.map(drop)
        }
    });
    let results: Vec<_> = register.buffer_unordered(64).collect().await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let registered = n as f64 / start.elapsed().as_secs_f64();
    let after: Vec<u64> = pids.iter().map(|p| rss(*p)).collect::<Result<_, _>>()?;
    let grown: Vec<String> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| {
            let grown = a.saturating_sub(*b);
            format!(
                "{:.0} MiB ({:.0} B/mailbox)",
                grown as f64 / 1048576.0,
                grown as f64 / n as f64
            )
        })
        .collect();
    // Every match, page after page (the exchange answers at most 10,000 at once).
    let discover = |name: &str, exact: bool| {
        let mut rpc = rpc.clone();
        let behaviour = name.to_owned();
        async move {
            let (mut found, mut page_token) = (0, String::new());
            loop {
                let req = pb::DiscoverRequest {
                    behaviour: behaviour.clone(),
                    exact,
                    page_size: 10_000,
                    page_token,
                    ..Default::default()
                };
                let page = rpc.discover(req).await?.into_inner();
                found += page.agents.len();
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            anyhow::ensure!(found > 0, "discovery found nothing");
            Ok(())
        }
    };
    let few = sequential(200, || discover("bench.Idle7", true)).await?;
    let all = sequential(5, || discover("bench.Idle", false)).await?;
    let mut rows = vec![
        format!("| (s) register {n} idle agent mailboxes | {registered:.0} registrations/s |"),
        format!("| (s) exchange memory growth | {} |", grown[0]),
    ];
    if let Some(redis) = grown.get(1) {
        rows.push(format!("| (s) Redis memory growth | {redis} |"));
    }
    rows.push(format!(
        "| (s) discover 1 behaviour ({} agents) among {n}: p50 / p99 | {:.0} µs / {:.0} µs |",
        n / 1000,
        few.p50_us,
        few.p99_us
    ));
    rows.push(format!(
        "| (s) discover an interface all {n} implement, in pages of 10,000: p50 | {:.0} ms |",
        all.p50_us / 1000.0
    ));
    Ok(rows)
}

/// Echo agents taking requests at a peer endpoint on `direct`; prints their
/// ids on one line, then serves until killed.
async fn serve_agents(exchange: String, direct: String, count: usize) -> anyhow::Result<()> {
    let endpoint = academy_sdk::Endpoint::serve(&direct).await?;
    let grpc = academy_sdk::exchange::GrpcExchange::connect(exchange).await?;
    let manager = Manager::with_direct(std::sync::Arc::new(grpc), endpoint).await?;
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let echo = manager.launch(Echo {}).await?;
        // Advertised once subscribed: wait for it, so calls go direct.
        while manager.exchange().status(&echo.id()).await?.endpoint.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ids.push(echo.id().to_string());
    }
    println!("{}", ids.join(" "));
    std::future::pending::<()>().await;
    Ok(())
}

/// (a), (b), (c), (d) and a 100 MiB call with direct delivery, to agents
/// in another process, over TCP and over a Unix socket with an in-memory
/// exchange, and over TCP with a Redis-backed one: one row per scenario.
async fn measure_direct(args: &Args) -> anyhow::Result<Vec<String>> {
    let socket = std::env::temp_dir().join(format!("academy-bench-{}.sock", std::process::id()));
    let mut columns = Vec::new();
    let runs = [
        (BackendKind::Memory, "127.0.0.1:0".to_owned()),
        (BackendKind::Memory, format!("unix:{}", socket.display())),
        (BackendKind::Redis, "127.0.0.1:0".to_owned()),
    ];
    for (backend, address) in runs {
        // The exchange (for look-ups, tickets and fallback) on `backend`.
        let (exchange, _redis) = start_exchange(backend, args).await?;
        let url = exchange.addr.url(false);
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["serve-agents", "--exchange", &url, "--direct", &address, "--count", "17"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the agents' process")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let line = BufReader::new(stdout).lines().next_line().await?.context("no agent ids")?;
        let ids: Vec<academy_sdk::EntityId> =
            line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let grpc = academy_sdk::exchange::GrpcExchange::connect(url.clone()).await?;
        let endpoint = academy_sdk::Endpoint::serve("127.0.0.1:0").await?;
        let manager = Manager::with_direct(std::sync::Arc::new(grpc), endpoint).await?;
        let echo = manager.handle::<Echo>(ids[0]);
        echo.echo("warm up".into()).await?;
        let fleet: Vec<Handle<Echo>> = ids[1..].iter().map(|id| manager.handle(*id)).collect();
        for echo in &fleet {
            echo.echo("warm up".into()).await?;
        }
        let a = echo_latency(echo.raw(), 100, args.calls).await?;
        let b = throughput(echo.raw(), 64, args.seconds).await?;
        let c = fan_out(&fleet, 200, 20).await?;
        let d = echo_latency(echo.raw(), 1 << 20, 200).await?;
        // 100 MiB each way: past the blob threshold, so by reference, kept
        // at the peer endpoints. The first call that large takes memory
        // fresh from the OS in both processes (page faults: several times
        // a later call on a VM), so it is shown apart; the figure is the
        // median of the three after it.
        let big = "x".repeat(100 << 20);
        let mut took = Vec::new();
        for _ in 0..4 {
            let text = big.clone();
            let started = Instant::now();
            let back = echo.echo(text).await?;
            took.push(started.elapsed());
            anyhow::ensure!(back.len() == big.len(), "the echo has {} bytes", back.len());
        }
        let first = took.remove(0);
        took.sort();
        let g = took[1];
        columns.push([
            format!("{:.0} µs / {:.0} µs", a.p50_us, a.p99_us),
            format!("{b:.0} actions/s"),
            format!("{c:.0} actions/s"),
            format!(
                "{:.0} MB/s (p50 {:.2} ms)",
                d.per_sec * (1 << 20) as f64 / 1e6,
                d.p50_us / 1000.0
            ),
            format!(
                "{:.0} MB/s ({:.2} s; the first call {:.2} s)",
                (200u64 << 20) as f64 / g.as_secs_f64() / 1e6,
                g.as_secs_f64(),
                first.as_secs_f64()
            ),
        ]);
        manager.close().await?;
        drop(child);
    }
    let _ = std::fs::remove_file(&socket);
    let names = [
        "(x-a) sequential echo, 100 B, direct: p50 / p99",
        "(x-b) 64 in flight, direct",
        "(x-c) fan-out, 16 agents × 200 calls, direct",
        "(x-d) 1 MiB echo, sequential, direct",
        "(x-g) 100 MiB argument + 100 MiB result in one call (a `String` each way), direct: by reference, peer to peer",
    ];
    Ok(names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!("| {name} | {} | {} | {} |", columns[0][i], columns[1][i], columns[2][i])
        })
        .collect())
}

/// A fresh exchange-server process (and Redis, for that backend).
async fn start_exchange(
    backend: BackendKind,
    args: &Args,
) -> anyhow::Result<(Server, Option<academy_server::testing::RedisServer>)> {
    let redis = match backend {
        BackendKind::Memory => None,
        BackendKind::Redis => Some(academy_server::testing::RedisServer::start()?),
    };
    let mut role = vec!["serve-exchange".to_owned()];
    role.extend(["--worker-threads".to_owned(), args.exchange_threads.to_string()]);
    if let Some(redis) = &redis {
        role.extend(["--redis".to_owned(), redis.url()]);
    }
    let exchange = spawn_server(&role.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    Ok((exchange, redis))
}

/// Every scenario against one exchange-server (in its own process); the scale
/// run against a fresh one, so its memory growth is its own.
async fn measure(args: &Args, backend: BackendKind) -> anyhow::Result<Vec<String>> {
    let run = |scenario: char| args.only.contains(&scenario);
    let (exchange, redis) = start_exchange(backend, args).await?;
    let url = format!("http://{}", exchange.addr);
    let manager = Manager::connect(&url).await?;
    let echo = manager.launch(Echo {}).await?;
    let mut rows = Vec::new();

    if run('a') {
        let a = echo_latency(echo.raw(), 100, args.calls).await?;
        rows.push(format!(
            "| (a) sequential echo, 100 B: p50 / p99 | {:.0} µs / {:.0} µs ({:.0} calls/s) |",
            a.p50_us, a.p99_us, a.per_sec
        ));
        if let Some(redis) = &redis {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", redis.port())).await?;
            tcp.set_nodelay(true)?;
            let r = redis_floor(tcp, args.calls).await?;
            rows.push(format!(
                "| (e-r) floor: a bare round trip to the same Redis (`PING`, a connection of its own): p50 / p99 | {:.0} µs / {:.0} µs |",
                r.p50_us, r.p99_us
            ));
            if run('u') {
                rows.extend(redis_beside(redis, args).await?);
            }
        }
    }
    if run('b') {
        let b = throughput(echo.raw(), 64, args.seconds).await?;
        rows.push(format!("| (b) 64 in flight, one client → one agent | {b:.0} actions/s |"));
    }
    if run('k') {
        // The same action with its checkpoint and without, one after the other.
        let loose = manager.launch(LooseEcho::default()).await?;
        let kept = manager.launch(KeptEcho::default()).await?;
        let (la, ka) = (
            echo_latency(loose.raw(), 100, args.calls).await?,
            echo_latency(kept.raw(), 100, args.calls).await?,
        );
        let (lb, kb) = (
            throughput(loose.raw(), 64, args.seconds).await?,
            throughput(kept.raw(), 64, args.seconds).await?,
        );
        rows.push(format!(
            "| (k-a) sequential echo changing a kept state, without checkpoint: p50 / p99 | {:.0} µs / {:.0} µs |",
            la.p50_us, la.p99_us
        ));
        rows.push(format!(
            "| (k-a) the same, each committed with its answer: p50 / p99 | {:.0} µs / {:.0} µs ({:.2}× without) |",
            ka.p50_us,
            ka.p99_us,
            ka.p50_us / la.p50_us
        ));
        rows.push(format!("| (k-b) 64 in flight, without checkpoint | {lb:.0} actions/s |"));
        rows.push(format!(
            "| (k-b) 64 in flight, committed | {kb:.0} actions/s ({:.2}× without) |",
            kb / lb
        ));
    }
    if run('m') {
        let options = academy_sdk::LaunchOptions {
            config: academy_sdk::AgentConfig {
                clock: academy_sdk::clock::ClockKind::Simulated,
                ..Default::default()
            },
            ..Default::default()
        };
        let hourly = manager.launch_with(Hourly::default(), options).await?;
        let simulator = manager.simulator();
        simulator.ready(1, Duration::from_secs(10)).await?;
        let day = Duration::from_secs(24 * 3600);
        let started = Instant::now();
        simulator.advance_by(day).await?;
        let took = started.elapsed();
        anyhow::ensure!(hourly.ticks().await? == 24, "24 ticks in a simulated day");
        rows.push(format!(
            "| (m) a simulated day of an hourly timer (24 ticks), clock over gRPC | {:.1} ms ({:.0}× real time) |",
            took.as_secs_f64() * 1000.0,
            day.as_secs_f64() / took.as_secs_f64()
        ));
    }
    if run('c') {
        let mut fleet = Vec::new();
        for _ in 0..16 {
            fleet.push(manager.launch(Echo {}).await?);
        }
        let c = fan_out(&fleet, 200, 20).await?;
        rows.push(format!(
            "| (c) fan-out, 16 agents × 200 calls, all at once | {c:.0} actions/s |"
        ));
    }
    if run('d') {
        let d = echo_latency(echo.raw(), 1 << 20, 200).await?;
        rows.push(format!(
            "| (d) 1 MiB echo, sequential | {:.0} MB/s (p50 {:.2} ms) |",
            d.per_sec * (1 << 20) as f64 / 1e6,
            d.p50_us / 1000.0
        ));
        // The same, argument and result by reference (docs/design.md, "Blobs").
        let threshold = 64 << 10;
        let by_reference = Manager::connect(&url).await?.with_blob_threshold(threshold);
        let config = academy_sdk::AgentConfig { blob_threshold: threshold, ..Default::default() };
        let options = academy_sdk::LaunchOptions { config, ..Default::default() };
        let echo = by_reference.launch_with(Echo {}, options).await?;
        let r = echo_latency(echo.raw(), 1 << 20, 200).await?;
        rows.push(format!(
            "| (d) the same by reference, through the blob store | {:.0} MB/s (p50 {:.2} ms; {:.2}× inline) |",
            r.per_sec * (1 << 20) as f64 / 1e6,
            r.p50_us / 1000.0,
            r.per_sec / d.per_sec
        ));
        by_reference.close().await?;
    }
    if run('f') {
        // A fleet: delivery must not slow down with the number of subscribers.
        let mut fleet = Vec::with_capacity(FLEET);
        for _ in 0..FLEET {
            fleet.push(manager.launch(Echo {}).await?);
        }
        let a = echo_latency(echo.raw(), 100, args.calls).await?;
        let b = throughput(echo.raw(), 64, args.seconds).await?;
        rows.push(format!(
            "| (f) (a) and (b) with {FLEET} more agents subscribed | p50 {:.0} µs; {b:.0} actions/s |",
            a.p50_us
        ));
    }
    manager.close().await?;
    drop(exchange);
    if run('s') {
        let (exchange, redis) = start_exchange(backend, args).await?;
        let mut pids = vec![exchange.child.id().context("exchange exited")?];
        pids.extend(redis.as_ref().map(|r| r.pid()));
        let url = format!("http://{}", exchange.addr);
        rows.extend(scale(&url, args.mailboxes, &pids).await?);
    }
    Ok(rows)
}

/// (a) and (b) against an in-memory exchange on a Unix-domain socket.
async fn measure_unix(args: &Args) -> anyhow::Result<Vec<String>> {
    let socket = std::env::temp_dir().join(format!("academy-bench-{}.sock", std::process::id()));
    let listen = format!("unix:{}", socket.display());
    let threads = args.exchange_threads.to_string();
    let role = ["serve-exchange", "--worker-threads", &threads, "--listen", &listen];
    let exchange = spawn_server(&role).await?;
    let manager = Manager::connect(&exchange.addr.url(false)).await?;
    let echo = manager.launch(Echo {}).await?;
    let a = echo_latency(echo.raw(), 100, args.calls).await?;
    let b = throughput(echo.raw(), 64, args.seconds).await?;
    manager.close().await?;
    drop(exchange);
    let _ = std::fs::remove_file(&socket);
    Ok(vec![
        format!(
            "| (u) (a) sequential echo, 100 B, over a Unix socket: p50 / p99 | {:.0} µs / {:.0} µs |",
            a.p50_us, a.p99_us
        ),
        format!("| (u) (b) 64 in flight, over a Unix socket | {b:.0} actions/s |"),
    ])
}

/// (a) through a second exchange process on the same Redis that reaches it
/// over its Unix-domain socket (a Redis beside the exchange, as in a pod),
/// and the floor of that socket.
async fn redis_beside(
    redis: &academy_server::testing::RedisServer,
    args: &Args,
) -> anyhow::Result<Vec<String>> {
    let threads = args.exchange_threads.to_string();
    let url = redis.unix_url();
    let role = ["serve-exchange", "--worker-threads", &threads, "--redis", &url];
    let exchange = spawn_server(&role).await?;
    let manager = Manager::connect(&format!("http://{}", exchange.addr)).await?;
    let echo = manager.launch(Echo {}).await?;
    let a = echo_latency(echo.raw(), 100, args.calls).await?;
    manager.close().await?;
    drop(exchange);
    let r = redis_floor(tokio::net::UnixStream::connect(redis.socket()).await?, args.calls).await?;
    Ok(vec![
        format!(
            "| (u) (a) with the exchange reaching Redis over its Unix socket: p50 / p99 | {:.0} µs / {:.0} µs |",
            a.p50_us, a.p99_us
        ),
        format!(
            "| (u) (e-r) a bare round trip over that socket: p50 / p99 | {:.0} µs / {:.0} µs |",
            r.p50_us, r.p99_us
        ),
    ])
}

/// (a) and (b) against an in-memory exchange that requires a bearer token and
/// mutual TLS, with certificates made for the run.
async fn measure_secure(args: &Args) -> anyhow::Result<Vec<String>> {
    const TOKEN: &str = "bench-token-0123456789";
    let pki = academy_server::testing::TestPki::new("bench CA");
    let dir = std::env::temp_dir().join(format!("academy-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, pem) in [
        ("tokens", format!("bench {TOKEN}\n")),
        ("server.pem", pki.server.cert.clone()),
        ("server.key", pki.server.key.clone()),
        ("ca.pem", pki.ca()),
    ] {
        std::fs::write(dir.join(name), pem)?;
    }
    let threads = args.exchange_threads.to_string();
    let role = ["serve-exchange", "--worker-threads", &threads, "--secure-dir"];
    let exchange =
        spawn_server(&[&role[..], &[dir.to_str().context("temp dir is UTF-8")?]].concat()).await?;
    let credentials = academy_sdk::Credentials::bearer(TOKEN)?
        .with_tls_ca(pki.ca().as_bytes())
        .with_client_certificate(pki.client.cert.as_bytes(), pki.client.key.as_bytes());
    let url = format!("https://{}", exchange.addr);
    let client = academy_sdk::exchange::GrpcExchange::connect_with(url, &credentials).await?;
    let manager = Manager::new(std::sync::Arc::new(client)).await?;
    let echo = manager.launch(Echo {}).await?;
    let a = echo_latency(echo.raw(), 100, args.calls).await?;
    let b = throughput(echo.raw(), 64, args.seconds).await?;
    manager.close().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(vec![format!(
        "| (t) (a) and (b) with a bearer token and mutual TLS | p50 {:.0} µs / p99 {:.0} µs; {b:.0} actions/s |",
        a.p50_us, a.p99_us
    )])
}

async fn measure_floor(args: &Args) -> anyhow::Result<Vec<String>> {
    let floor_server = spawn_server(&["serve-floor"]).await?;
    let url = format!("http://{}", floor_server.addr);
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(academy_proto::transport::STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(academy_proto::transport::CONNECTION_WINDOW_BYTES))
        .connect()
        .await?;
    let floor = floor::floor_client::FloorClient::new(channel);
    let e = floor_latency(&floor, 100, args.calls).await?;
    let e_mib = floor_latency(&floor, 1 << 20, 200).await?;
    // 100 MiB each way, as a stream of 1 MiB chunks.
    let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let started = Instant::now();
    let outgoing =
        futures::stream::iter((0..100).map(move |_| floor::EchoMessage { data: chunk.clone() }));
    let mut incoming = floor.clone().stream(outgoing).await?.into_inner();
    let mut back = 0;
    while let Some(message) = incoming.message().await? {
        back += message.data.len();
    }
    let took = started.elapsed();
    anyhow::ensure!(back == 100 << 20, "the stream floor echoed {back} bytes");
    Ok(vec![
        format!(
            "| (e'') floor: plain tonic stream, 100 MiB each way in chunks of 1 MiB | {:.0} MB/s ({:.2} s) |",
            (200u64 << 20) as f64 / took.as_secs_f64() / 1e6,
            took.as_secs_f64()
        ),
        format!(
            "| (e) floor: plain tonic unary echo, 100 B: p50 / p99 | {:.0} µs / {:.0} µs ({:.0} calls/s) |",
            e.p50_us, e.p99_us, e.per_sec
        ),
        format!(
            "| (e') floor: plain tonic unary echo, 1 MiB | {:.0} MB/s (p50 {:.2} ms) |",
            e_mib.per_sec * (1 << 20) as f64 / 1e6,
            e_mib.p50_us / 1000.0
        ),
    ])
}

async fn serve_launcher(
    exchange: String,
    heartbeat_timeout_ms: u64,
    retention_secs: u64,
) -> anyhow::Result<()> {
    let launcher = academy_launcher::RunningLauncher::start(academy_launcher::LauncherOptions {
        exchange_url: exchange,
        heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms),
        retention: Duration::from_secs(retention_secs),
        ..Default::default()
    })
    .await?;
    println!("{}", launcher.addr());
    std::future::pending::<()>().await;
    Ok(())
}

/// Waits until `count(records)` is reached, following the launcher's watch.
async fn watch_until(
    launcher: String,
    mut done: impl FnMut(&HashMap<String, academy_proto::pb::AgentRecord>) -> bool,
) -> anyhow::Result<()> {
    use academy_proto::pb;
    let mut rpc = pb::launcher_service_client::LauncherServiceClient::connect(launcher).await?;
    let mut changes = rpc.watch_agents(pb::WatchAgentsRequest::default()).await?.into_inner();
    let mut agents = HashMap::new();
    while let Some(change) = tokio_stream::StreamExt::next(&mut changes).await {
        let agent = change?.agent.context("no record")?;
        agents.insert(agent.agent_id.clone(), agent);
        if done(&agents) {
            return Ok(());
        }
    }
    anyhow::bail!("the watch ended")
}

/// Launches `n` agents on two workers, then kills one (SIGKILL) and freezes
/// the other's replacement (SIGSTOP): time to launch and to fail over.
async fn measure_launcher(args: &Args) -> anyhow::Result<Vec<String>> {
    use academy_proto::pb::{self, AgentState};
    let (exchange, _redis) = start_exchange(BackendKind::Memory, args).await?;
    let exchange_url = format!("http://{}", exchange.addr);
    let timeout = args.heartbeat_timeout_ms.to_string();
    let launcher = spawn_server(&[
        "serve-launcher",
        "--exchange",
        &exchange_url,
        "--heartbeat-timeout-ms",
        &timeout,
    ])
    .await?;
    let launcher_url = format!("http://{}", launcher.addr);
    let capacity = args.agents.to_string();
    let worker = |name: &'static str| {
        let exe = std::env::current_exe();
        let (url, capacity) = (launcher_url.clone(), capacity.clone());
        async move {
            let child = Command::new(exe?)
                .args(["serve-worker", "--launcher", &url, "--capacity", &capacity])
                .env("RUST_LOG", "error")
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {name}"))?;
            anyhow::Ok(child)
        }
    };
    let mut workers = vec![worker("worker 1").await?, worker("worker 2").await?];
    let mut rpc =
        pb::launcher_service_client::LauncherServiceClient::connect(launcher_url.clone()).await?;
    while rpc.list_workers(pb::ListWorkersRequest::default()).await?.into_inner().workers.len() < 2
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let n = args.agents;
    let running = |agents: &HashMap<String, pb::AgentRecord>| {
        agents.values().filter(|a| a.state() == AgentState::Running).count()
    };
    let all_running =
        tokio::spawn(watch_until(launcher_url.clone(), move |agents| running(agents) == n));
    let start = Instant::now();
    let launches = futures::StreamExt::map(futures::stream::iter(0..n), |_| {
        let mut rpc = rpc.clone();
        async move {
            let request =
                pb::LaunchAgentRequest { behaviour: "bench.Echo".into(), ..Default::default() };
            rpc.launch_agent(request).await.map(drop)
        }
    });
    let results: Vec<_> =
        futures::StreamExt::collect(futures::StreamExt::buffer_unordered(launches, 64)).await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let launched = start.elapsed();
    all_running.await??;
    let started = start.elapsed();

    // All running, and none on `gone`.
    let settled = |gone: String| {
        move |agents: &HashMap<String, pb::AgentRecord>| {
            agents.len() == n
                && agents.values().all(|a| a.state() == AgentState::Running && a.worker_id != gone)
        }
    };
    let busy = |rpc: &mut pb::launcher_service_client::LauncherServiceClient<
        tonic::transport::Channel,
    >| {
        let mut rpc = rpc.clone();
        async move {
            let workers =
                rpc.list_workers(pb::ListWorkersRequest::default()).await?.into_inner().workers;
            anyhow::Ok(
                workers
                    .into_iter()
                    .map(|w| (w.worker_id, w.agent_count as usize))
                    .collect::<Vec<_>>(),
            )
        }
    };

    // Failover after SIGKILL: the launcher sees the stream close. Which worker
    // process has which id is unknown, so wait for "all on one worker".
    let before = busy(&mut rpc).await?;
    let killed = Instant::now();
    workers[0].kill().await?;
    watch_until(launcher_url.clone(), move |agents| {
        agents.len() == n
            && agents.values().all(|a| a.state() == AgentState::Running)
            && agents
                .values()
                .map(|a| a.worker_id.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len()
                == 1
    })
    .await?;
    let kill_failover = killed.elapsed();
    let after = busy(&mut rpc).await?;
    let moved =
        before.iter().find(|(id, _)| !after.iter().any(|(a, _)| a == id)).map_or(0, |(_, n)| *n);

    // Failover after a freeze (SIGSTOP): only the heartbeat timeout tells.
    let survivor =
        after.iter().find(|(_, n)| *n > 0).map(|(id, _)| id.clone()).context("no busy worker")?;
    workers.push(worker("worker 3").await?);
    while busy(&mut rpc).await?.len() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = workers[1].id().context("worker exited")?;
    let frozen = Instant::now();
    let stopped = std::process::Command::new("kill").args(["-STOP", &pid.to_string()]).status()?;
    anyhow::ensure!(stopped.success(), "cannot SIGSTOP the worker");
    watch_until(launcher_url.clone(), settled(survivor)).await?;
    let freeze_failover = frozen.elapsed();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid.to_string()]).status();

    Ok(vec![
        format!(
            "| (l) launch {n} agents on 2 workers: all launched / all running | {:.0} agents/s / {:.0} agents/s |",
            n as f64 / launched.as_secs_f64(),
            n as f64 / started.as_secs_f64()
        ),
        format!(
            "| (l) failover after SIGKILL of a worker ({moved} agents) | {:.0} ms |",
            kill_failover.as_secs_f64() * 1000.0
        ),
        format!(
            "| (l) failover after SIGSTOP of a worker ({n} agents; heartbeat timeout {} ms) | {:.0} ms |",
            args.heartbeat_timeout_ms,
            freeze_failover.as_secs_f64() * 1000.0
        ),
    ])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The exchange's process runs as academy-exchange's does.
    let worker_threads = match args.role {
        Some(Role::Exchange { worker_threads, .. }) => worker_threads,
        _ => 0,
    };
    academy_server::grpc::runtime(worker_threads)?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.role {
        Some(Role::Exchange { redis, secure_dir, listen, blob_dir, .. }) => {
            // Scenario (o) asks for traces through the environment.
            let _telemetry = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").map(|_| {
                academy_server::telemetry::init(
                    academy_server::telemetry::LogFormat::Pretty,
                    "academy-exchange",
                )
            });
            return serve_exchange(redis, secure_dir, listen, blob_dir).await;
        }
        Some(Role::Floor) => return serve_floor().await,
        Some(Role::Launcher { exchange, heartbeat_timeout_ms, retention_secs }) => {
            return serve_launcher(exchange, heartbeat_timeout_ms, retention_secs).await;
        }
        Some(Role::Agents { exchange, direct, count }) => {
            return serve_agents(exchange, direct, count).await;
        }
        Some(Role::Worker { launcher, capacity }) => {
            academy_sdk::worker::Worker::new(launcher)
                .capacity(capacity)
                .register::<Echo>()
                .run()
                .await?;
            return Ok(());
        }
        None => {}
    }
    println!("Machine: {}", machine());
    if args.exchange_threads > 0 {
        println!("Exchange worker threads: {}", args.exchange_threads);
    }
    for backend in &args.backend {
        println!();
        println!("Backend: {backend:?}");
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for row in measure(&args, *backend).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'l') {
        println!();
        println!("Launcher (in-memory exchange):");
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for row in measure_launcher(&args).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'g') {
        println!();
        println!("Blobs larger than a message (in-memory exchange):");
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for row in blobs::measure(args.giant_mib << 20).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'x') {
        println!();
        println!(
            "Direct delivery (agents in another process; the exchange for look-ups and fallback):"
        );
        println!();
        println!(
            "| scenario | over TCP | over a Unix socket | over TCP, a Redis-backed exchange |"
        );
        println!("|---|---|---|---|");
        for row in measure_direct(&args).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'t') {
        println!();
        println!("Security (in-memory exchange):");
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for row in measure_secure(&args).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'u') {
        println!();
        println!("Unix socket (in-memory exchange):");
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for row in measure_unix(&args).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'h') {
        println!();
        println!(
            "Long run ({} agents through the launcher; {} mailboxes per backend):",
            args.history, args.history
        );
        println!();
        println!("| step | rate | memory |");
        println!("|---|---|---|");
        for row in long_run::measure(&args).await? {
            println!("{row}");
        }
    }
    if args.only.contains(&'e') {
        println!();
        println!("| floor | result |");
        println!("|---|---|");
        for row in measure_floor(&args).await? {
            println!("{row}");
        }
    }
    // Last: it installs the global tracer provider for the rest of the run.
    if args.only.contains(&'o') {
        println!();
        println!("Traced (in-memory exchange, every span exported by OTLP to a local receiver):");
        println!();
        println!("| scenario | result |");
        println!("|---|---|");
        for row in traced::measure(&args).await? {
            println!("{row}");
        }
    }
    Ok(())
}
