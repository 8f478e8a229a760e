//! The launcher's SIGTERM under load, with real processes: a launcher on
//! Redis, two workers, four agents, callers calling them through the
//! exchange. The launcher exits within its grace; a new one on the same
//! address and Redis finds every worker back with its agents, each where it
//! was and not restarted, and no call failed meanwhile.

mod common;

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_proto::pb::launcher_service_client::LauncherServiceClient;
use academy_proto::pb::{self, AgentState};
use academy_sdk::Manager;
use academy_server::testing::{Children, RedisServer, binary, free_port};
use tonic::transport::Channel;

fn launcher(port: u16, exchange: &str, redis: &str) -> Child {
    Command::new(binary("academy-launcher"))
        .env("ACADEMY_LAUNCHER_LISTEN", format!("127.0.0.1:{port}"))
        .env("ACADEMY_EXCHANGE_URL", exchange)
        .env("ACADEMY_LAUNCHER_REDIS_URL", redis)
        .env("ACADEMY_LAUNCHER_HEARTBEAT_TIMEOUT_MS", "1000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("build the workspace's binaries")
}

/// Connects to the launcher on `port` once it listens.
async fn connect(port: u16) -> LauncherServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match LauncherServiceClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(rpc) => return rpc,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("no launcher on {port}: {e}"),
        }
    }
}

async fn until<F, Fut>(what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(Instant::now() < deadline, "{what} not reached within 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn agents(rpc: &mut LauncherServiceClient<Channel>) -> Vec<pb::AgentRecord> {
    rpc.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents
}

/// Each running agent, the name of the worker it runs on, and its epoch
/// (a worker that joins again gets a new id, not a new name).
async fn placements(rpc: &mut LauncherServiceClient<Channel>) -> Vec<(String, String, u64)> {
    let workers = rpc.list_workers(pb::ListWorkersRequest::default()).await.unwrap();
    let names: std::collections::HashMap<String, String> =
        workers.into_inner().workers.into_iter().map(|w| (w.worker_id, w.name)).collect();
    agents(rpc)
        .await
        .into_iter()
        .filter(|a| a.state() == AgentState::Running)
        .map(|a| (a.agent_id, names.get(&a.worker_id).cloned().unwrap_or_default(), a.epoch))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launchers_sigterm_under_load_keeps_every_agent_where_it_was() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let port = free_port();
    let mut processes = Children(vec![launcher(port, &exchange.url(), &redis.url())]);
    let mut rpc = connect(port).await;
    for name in ["w1", "w2"] {
        let worker = Command::new(binary("worker"))
            .args(["--launcher", &format!("http://127.0.0.1:{port}"), "--name", name])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        processes.0.push(worker);
    }
    until("two workers", || {
        let mut rpc = rpc.clone();
        async move {
            let workers = rpc.list_workers(pb::ListWorkersRequest::default()).await.unwrap();
            workers.into_inner().workers.len() == 2
        }
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let request =
            pb::LaunchAgentRequest { behaviour: "example.WordStats".into(), ..Default::default() };
        ids.push(rpc.launch_agent(request).await.unwrap().into_inner().agent.unwrap().agent_id);
    }
    until("four agents running", || {
        let mut rpc = rpc.clone();
        async move {
            agents(&mut rpc).await.iter().filter(|a| a.state() == AgentState::Running).count() == 4
        }
    })
    .await;
    let before = placements(&mut rpc).await;

    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = common::call_until(&manager, &ids, &stop);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sent =
        Command::new("kill").args(["-TERM", &processes.0[0].id().to_string()]).status().unwrap();
    assert!(sent.success());
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = processes.0[0].try_wait().unwrap() {
            break status;
        }
        // Its streams get 2 s; the pod's grace is 10 s.
        assert!(
            signalled.elapsed() < Duration::from_secs(8),
            "the launcher still runs 8 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "{status}");
    let exited = signalled.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    processes.0[0] = launcher(port, &exchange.url(), &redis.url());
    let rpc = connect(port).await;
    until("the workers back, with their agents", || {
        let mut rpc = rpc.clone();
        let before = before.clone();
        async move { placements(&mut rpc).await == before }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut answered, mut failed) = (0, Vec::new());
    for caller in load {
        let (a, f) = caller.await.unwrap();
        assert!(a > 0, "every agent answered");
        answered += a;
        failed.extend(f);
    }
    println!(
        "launcher SIGTERM under load: exited in {exited:?}; {answered} calls answered, {} failed; 4 agents kept where they were",
        failed.len()
    );
    assert!(failed.is_empty(), "{failed:?}");
    drop(processes);
    exchange.shutdown().await;
}
