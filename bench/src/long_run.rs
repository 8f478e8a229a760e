//! (h) The long run: what a fleet's history costs. Agents launched and
//! stopped through the launcher in rounds (launch rate per round, memory of
//! every process), then mailboxes registered and terminated on each backend
//! (memory growth of the exchange and of Redis).

use std::time::{Duration, Instant};

use academy_proto::pb::launcher_service_client::LauncherServiceClient;
use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient};
use academy_server::testing::RedisServer;
use anyhow::Context as _;
use futures::StreamExt as _;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::{Args, BackendKind, Server, rss, spawn_server, start_exchange};

/// Calls in flight in the long run.
const IN_FLIGHT: usize = 50;
/// Rounds each part is cut into.
const ROUNDS: usize = 10;
/// Launcher retention in the long run: short, so that forgetting shows.
const RETENTION_SECS: u64 = 10;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident memory of each process, as `name RSS` cells.
fn memory(processes: &[(&str, u32)]) -> anyhow::Result<String> {
    let cells: Vec<String> = processes
        .iter()
        .map(|(name, pid)| Ok(format!("{name} {:.0} MiB", mib(rss(*pid)?))))
        .collect::<anyhow::Result<_>>()?;
    Ok(cells.join(", "))
}

fn worker(launcher: &str, capacity: usize) -> anyhow::Result<Child> {
    Command::new(std::env::current_exe()?)
        .args(["serve-worker", "--launcher", launcher, "--capacity", &capacity.to_string()])
        .env("RUST_LOG", "error")
        .kill_on_drop(true)
        .spawn()
        .context("cannot start a worker")
}

/// Runs `step` `n` times, [`IN_FLIGHT`] at a time; steps per second.
async fn rate<F, Fut>(n: usize, step: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    let steps = futures::stream::iter(0..n).map(|_| step());
    let results: Vec<_> = steps.buffer_unordered(IN_FLIGHT).collect().await;
    results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Launches and stops `n` agents (terminating their mailboxes); launches
/// per second.
async fn launch_and_stop(rpc: &LauncherServiceClient<Channel>, n: usize) -> anyhow::Result<f64> {
    rate(n, || {
        let mut rpc = rpc.clone();
        async move {
            let launch =
                pb::LaunchAgentRequest { behaviour: "bench.Echo".into(), ..Default::default() };
            let agent = rpc.launch_agent(launch).await?.into_inner().agent.context("no record")?;
            let stop = pb::StopAgentRequest { agent_id: agent.agent_id, terminate: true };
            rpc.stop_agent(stop).await?;
            Ok(())
        }
    })
    .await
}

/// Part 1: `total` agents through a launcher (in-memory exchange, two
/// workers), in [`ROUNDS`] rounds.
async fn launcher_history(args: &Args, total: usize) -> anyhow::Result<Vec<String>> {
    let (exchange, _redis) = start_exchange(BackendKind::Memory, args).await?;
    let exchange_url = format!("http://{}", exchange.addr);
    let retention = RETENTION_SECS.to_string();
    let launcher: Server = spawn_server(&[
        "serve-launcher",
        "--exchange",
        &exchange_url,
        "--heartbeat-timeout-ms",
        "5000",
        "--retention-secs",
        &retention,
    ])
    .await?;
    let launcher_url = format!("http://{}", launcher.addr);
    let workers = [worker(&launcher_url, 100)?, worker(&launcher_url, 100)?];
    let mut rpc = LauncherServiceClient::connect(launcher_url).await?;
    while rpc.list_workers(pb::ListWorkersRequest::default()).await?.into_inner().workers.len() < 2
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pids = [
        ("exchange", exchange.child.id().context("exchange exited")?),
        ("launcher", launcher.child.id().context("launcher exited")?),
        ("worker 1", workers[0].id().context("worker exited")?),
        ("worker 2", workers[1].id().context("worker exited")?),
    ];
    let per_round = total / ROUNDS;
    // A first round, forgotten, so that the baseline holds what any round
    // leaves behind it (connections, tables at their working size).
    launch_and_stop(&rpc, per_round).await?;
    tokio::time::sleep(Duration::from_secs(RETENTION_SECS * 2)).await;
    let launcher_start = rss(pids[1].1)?;
    let mut rows = vec![format!("| (h) start, after a first round | | {} |", memory(&pids)?)];
    let mut rates = Vec::new();
    for round in 1..=ROUNDS {
        let rate = launch_and_stop(&rpc, per_round).await?;
        rates.push(rate);
        rows.push(format!(
            "| (h) round {round}: {} agents ever launched | {rate:.0} launches/s | {} |",
            round * per_round,
            memory(&pids)?
        ));
    }
    // Every record finished: they go once the retention is over.
    tokio::time::sleep(Duration::from_secs(RETENTION_SECS * 2)).await;
    let launcher_end = rss(pids[1].1)?;
    let kept = rpc.list_agents(pb::ListAgentsRequest::default()).await?.into_inner().agents.len();
    rows.push(format!(
        "| (h) {RETENTION_SECS} s retention later: {kept} records kept | | {} |",
        memory(&pids)?
    ));
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    rows.push(format!(
        "| (h) last round / first round; launcher RSS after retention / at start | {:.2} | {:.2} |",
        last / first,
        launcher_end as f64 / launcher_start as f64
    ));
    Ok(rows)
}

/// Redis's own memory (`used_memory`) and resident size.
fn redis_memory(redis: &RedisServer) -> anyhow::Result<(u64, u64)> {
    let info = redis.command(&["INFO", "memory"])?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok())
            .with_context(|| format!("no {name} in INFO memory"))
    };
    Ok((field("used_memory")?, field("used_memory_rss")?))
}

/// Part 2: `total` agent mailboxes registered and terminated on `backend`,
/// in [`ROUNDS`] rounds: gravestones and what else history leaves.
async fn mailbox_history(
    args: &Args,
    backend: BackendKind,
    total: usize,
) -> anyhow::Result<Vec<String>> {
    let (exchange, redis) = start_exchange(backend, args).await?;
    let rpc = ExchangeServiceClient::connect(format!("http://{}", exchange.addr)).await?;
    let pid = exchange.child.id().context("exchange exited")?;
    let sizes = || {
        let exchange = rss(pid)?;
        let redis = match &redis {
            Some(redis) => Some(redis_memory(redis)?),
            None => None,
        };
        anyhow::Ok((exchange, redis))
    };
    let describe = |(exchange, redis): (u64, Option<(u64, u64)>)| {
        let redis = redis.map_or(String::new(), |(used, rss)| {
            format!(", Redis used {:.1} MiB (RSS {:.0} MiB)", mib(used), mib(rss))
        });
        format!("exchange {:.0} MiB{redis}", mib(exchange))
    };
    // Warm up (connections, tables) before the baseline.
    register_and_terminate(&rpc, 10_000).await?;
    let before = sizes()?;
    let mut rows = vec![format!("| (h) {backend:?}: start | | {} |", describe(before))];
    let per_round = total / ROUNDS;
    for round in 1..=ROUNDS {
        let rate = register_and_terminate(&rpc, per_round).await?;
        rows.push(format!(
            "| (h) {backend:?}: {} mailboxes terminated | {rate:.0} /s | {} |",
            round * per_round,
            describe(sizes()?)
        ));
    }
    let after = sizes()?;
    let gravestones = (total + 10_000) as f64;
    let exchange_growth = after.0.saturating_sub(before.0);
    let mut growth = format!(
        "exchange +{:.1} MiB ({:.0} B per terminated agent)",
        mib(exchange_growth),
        exchange_growth as f64 / gravestones
    );
    if let (Some((used0, _)), Some((used1, _))) = (before.1, after.1) {
        let redis_growth = used1.saturating_sub(used0);
        growth.push_str(&format!(
            ", Redis +{:.1} MiB ({:.0} B per terminated agent)",
            mib(redis_growth),
            redis_growth as f64 / gravestones
        ));
    }
    rows.push(format!("| (h) {backend:?}: growth | | {growth} |"));
    Ok(rows)
}

/// Registers and terminates `n` agent mailboxes; mailboxes per second.
async fn register_and_terminate(
    rpc: &ExchangeServiceClient<Channel>,
    n: usize,
) -> anyhow::Result<f64> {
    rate(n, || {
        let mut rpc = rpc.clone();
        async move {
            let register =
                pb::RegisterAgentRequest { behaviour: "bench.Gone".into(), ..Default::default() };
            let id = rpc.register_agent(register).await?.into_inner().agent_id;
            rpc.terminate(pb::TerminateRequest { mailbox_id: id }).await?;
            Ok(())
        }
    })
    .await
}

/// Every part of the long run, as table rows.
pub(crate) async fn measure(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut rows = launcher_history(args, args.history).await?;
    for backend in &args.backend {
        rows.extend(mailbox_history(args, *backend, args.history).await?);
    }
    Ok(rows)
}
