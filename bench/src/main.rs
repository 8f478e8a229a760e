//! End-to-end benchmark: a client and agents in this process, the exchange-server
//! in another process, all over loopback gRPC.
//!
//! `cargo run --release -p academy-bench` prints a Markdown table for BENCHMARKS.md.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use academy_sdk::{Handle, Manager, behaviour};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

#[allow(unreachable_pub, missing_docs, missing_debug_implementations, clippy::all)]
mod floor {
    tonic::include_proto!("academy.bench");
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Echo;

#[behaviour(name = "bench.Echo")]
impl Echo {
    #[action]
    async fn echo(&self, data: String) -> String {
        data
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
    /// Run only these scenarios (e.g. `--only b,d`), for profiling.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c,d,e")]
    only: Vec<char>,
}

#[derive(Subcommand)]
enum Role {
    /// Serve an exchange (the benchmark starts this in a child process).
    #[command(hide = true)]
    ServeExchange,
    /// Serve the plain tonic echo (the floor), in a child process.
    #[command(hide = true)]
    ServeFloor,
}

/// A server in a child process; killed on drop.
struct Server {
    _child: Child,
    addr: SocketAddr,
}

async fn spawn_server(role: &str) -> anyhow::Result<Server> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg(role)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the server process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let line = BufReader::new(stdout).lines().next_line().await?.context("server said nothing")?;
    Ok(Server { _child: child, addr: line.trim().parse()? })
}

async fn serve_exchange() -> anyhow::Result<()> {
    let server = academy_exchange::RunningServer::start(Default::default()).await?;
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
}

async fn serve_floor() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            let conn = conn?;
            conn.set_nodelay(true)?;
            Ok::<_, std::io::Error>(conn)
        },
    );
    // The same transport settings as the exchange-server's.
    tonic::transport::Server::builder()
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(8 * 1024 * 1024))
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

/// Sequential echo actions of `bytes` bytes.
async fn echo_latency(echo: &Handle<Echo>, bytes: usize, n: u64) -> anyhow::Result<Latency> {
    let data = payload(bytes);
    sequential(n, || async {
        echo.echo(data.clone()).await?;
        Ok(())
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
async fn throughput(handle: &Handle<Echo>, in_flight: usize, seconds: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let data = payload(100);
    let start = Instant::now();
    let workers = (0..in_flight).map(|_| {
        let handle = handle.clone();
        let data = data.clone();
        tokio::spawn(async move {
            let mut calls = 0u64;
            while Instant::now() < deadline {
                handle.echo(data.clone()).await?;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.role {
        Some(Role::ServeExchange) => return serve_exchange().await,
        Some(Role::ServeFloor) => return serve_floor().await,
        None => {}
    }

    let run = |scenario: char| args.only.contains(&scenario);
    let exchange = spawn_server("serve-exchange").await?;
    let manager = Manager::connect(&format!("http://{}", exchange.addr)).await?;
    let echo = manager.launch(Echo).await?;
    let mut rows = Vec::new();

    if run('a') {
        let a = echo_latency(&echo, 100, args.calls).await?;
        rows.push(format!(
            "| (a) sequential echo, 100 B: p50 / p99 | {:.0} µs / {:.0} µs ({:.0} calls/s) | p50 ≤ 150 µs |",
            a.p50_us, a.p99_us, a.per_sec
        ));
    }
    if run('b') {
        let b = throughput(&echo, 64, args.seconds).await?;
        rows.push(format!(
            "| (b) 64 in flight, one client → one agent | {b:.0} actions/s | ≥ 50,000 |"
        ));
    }
    if run('c') {
        let mut fleet = Vec::new();
        for _ in 0..16 {
            fleet.push(manager.launch(Echo).await?);
        }
        let c = fan_out(&fleet, 200, 20).await?;
        rows.push(format!(
            "| (c) fan-out, 16 agents × 200 calls, all at once | {c:.0} actions/s | ≥ 50,000 |"
        ));
    }
    if run('d') {
        let d = echo_latency(&echo, 1 << 20, 200).await?;
        rows.push(format!(
            "| (d) 1 MiB echo, sequential | {:.0} MB/s (p50 {:.2} ms) | ≥ 500 MB/s |",
            d.per_sec * (1 << 20) as f64 / 1e6,
            d.p50_us / 1000.0
        ));
    }
    manager.close().await?;

    if run('e') {
        let floor_server = spawn_server("serve-floor").await?;
        let url = format!("http://{}", floor_server.addr);
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .connect()
            .await?;
        let floor = floor::floor_client::FloorClient::new(channel);
        let e = floor_latency(&floor, 100, args.calls).await?;
        rows.push(format!(
            "| (e) floor: plain tonic unary echo, 100 B: p50 / p99 | {:.0} µs / {:.0} µs ({:.0} calls/s) | — |",
            e.p50_us, e.p99_us, e.per_sec
        ));
        let e_mib = floor_latency(&floor, 1 << 20, 200).await?;
        rows.push(format!(
            "| (e') floor: plain tonic unary echo, 1 MiB | {:.0} MB/s (p50 {:.2} ms) | — |",
            e_mib.per_sec * (1 << 20) as f64 / 1e6,
            e_mib.p50_us / 1000.0
        ));
    }

    println!("Machine: {}", machine());
    println!();
    println!("| scenario | result | target |");
    println!("|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
