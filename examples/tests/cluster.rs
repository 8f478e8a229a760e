//! A cluster end to end: an exchange and a launcher, and workers as real
//! processes (the `worker` example), one of which is killed with SIGKILL.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use academy_examples::behaviours::WordStats;
use academy_exchange::{ExchangeOptions, MailboxStore, RedisOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::MailboxState;
use academy_proto::pb::{self, AgentState, launcher_service_client::LauncherServiceClient};
use academy_sdk::Manager;
use academy_server::testing::RedisServer;
use serde_json::json;
use tonic::transport::Channel;

struct Cluster {
    exchange: RunningExchange,
    /// `None` while a test restarts it (on the same address).
    launcher: Option<RunningLauncher>,
    launcher_url: String,
    rpc: LauncherServiceClient<Channel>,
    workers: Vec<(String, Child)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn cluster(workers: &[&str]) -> Cluster {
    cluster_on(ExchangeOptions::default(), workers).await
}

async fn cluster_on(options: ExchangeOptions, workers: &[&str]) -> Cluster {
    let exchange = RunningExchange::start(options).await.unwrap();
    let launcher = common::launcher_on(exchange.url()).await;
    let launcher_url = launcher.url();
    let rpc = LauncherServiceClient::connect(launcher_url.clone()).await.unwrap();
    let mut cluster =
        Cluster { exchange, launcher: Some(launcher), launcher_url, rpc, workers: Vec::new() };
    for name in workers {
        cluster.add_worker(name).await;
    }
    cluster
}

impl Cluster {
    /// Starts a worker process and waits until it has joined.
    async fn add_worker(&mut self, name: &str) {
        let mut rpc = self.rpc.clone();
        let joined = rpc.list_workers(pb::ListWorkersRequest::default()).await.unwrap();
        let expected = joined.into_inner().workers.len() + 1;
        let child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--launcher", &self.launcher_url, "--name", name, "--capacity", "4"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("worker starts");
        self.workers.push((name.to_owned(), child));
        wait(|| async {
            let mut rpc = self.rpc.clone();
            let workers = rpc
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .unwrap()
                .into_inner()
                .workers;
            workers.len() == expected
        })
        .await;
    }

    async fn launch(
        &mut self,
        behaviour: &str,
        config: serde_json::Value,
        retry_limit: u32,
    ) -> Result<String, tonic::Status> {
        let req = pb::LaunchAgentRequest {
            behaviour: behaviour.into(),
            config: Some(academy_proto::json::to_proto(config)),
            retry_limit,
            ..Default::default()
        };
        Ok(self.rpc.launch_agent(req).await?.into_inner().agent.unwrap().agent_id)
    }

    async fn get(&self, id: &str) -> pb::AgentRecord {
        let mut rpc = self.rpc.clone();
        rpc.get_agent(pb::GetAgentRequest { agent_id: id.into() })
            .await
            .unwrap()
            .into_inner()
            .agent
            .unwrap()
    }

    async fn wait_state(&self, id: &str, state: AgentState) -> pb::AgentRecord {
        wait(|| async { self.get(id).await.state() == state }).await;
        self.get(id).await
    }

    /// Name of the worker an agent runs on.
    async fn worker_of(&self, id: &str) -> String {
        let worker_id = self.get(id).await.worker_id;
        let mut rpc = self.rpc.clone();
        let workers =
            rpc.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
        workers.into_iter().find(|w| w.worker_id == worker_id).map(|w| w.name).unwrap_or_default()
    }
}

/// Polls `ready` every 20 ms for up to 15 s.
async fn wait<F, Fut>(ready: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(Duration::from_secs(15), ready).await;
}

/// Polls `ready` every 20 ms for up to `limit`.
async fn wait_for<F, Fut>(limit: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !ready().await {
        assert!(Instant::now() < deadline, "condition not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn agents_spread_over_workers_and_move_when_one_is_killed() {
    let mut cluster = cluster(&["w1", "w2"]).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(cluster.launch("example.WordStats", json!({}), 0).await.unwrap());
    }
    let mut per_worker = std::collections::HashMap::<String, usize>::new();
    for id in &ids {
        cluster.wait_state(id, AgentState::Running).await;
        *per_worker.entry(cluster.worker_of(id).await).or_default() += 1;
    }
    assert_eq!(per_worker.values().copied().collect::<Vec<_>>(), vec![2, 2], "{per_worker:?}");
    // Placed by the launcher, described as the worker offered it.
    let mut exchange =
        pb::exchange_service_client::ExchangeServiceClient::connect(cluster.exchange.url())
            .await
            .unwrap();
    let described = exchange
        .describe(pb::DescribeRequest { agent_id: ids[0].clone() })
        .await
        .unwrap()
        .into_inner()
        .agent
        .unwrap()
        .description
        .unwrap();
    assert_eq!(described, <WordStats as academy_sdk::Behaviour>::describe());
    assert!(described.actions.iter().any(|a| a.name == "analysed" && a.read_only));

    // The manager launches through the launcher too, with the same handles.
    let manager = Manager::connect(&cluster.exchange.url()).await.unwrap();
    let launcher = academy_sdk::launcher::Launcher::connect(&cluster.launcher_url).await.unwrap();
    let remote = manager
        .launch_remote::<WordStats>(&launcher, &serde_json::json!({}), Default::default())
        .await
        .unwrap();
    let remote = remote.with_timeout(Duration::from_secs(10));
    assert_eq!(remote.analyse("launched remotely".into()).await.unwrap().words, 2);
    launcher.stop(remote.id(), academy_sdk::MailboxPolicy::Terminate).await.unwrap();
    cluster.wait_state(&remote.id().to_string(), AgentState::Stopped).await;
    let victim = ids[0].clone();
    let analyser =
        manager.handle::<WordStats>(victim.parse().unwrap()).with_timeout(Duration::from_secs(20));
    assert_eq!(analyser.analyse("a b a".into()).await.unwrap().words, 3);

    // SIGKILL the worker running it, then call it at once: the request waits in
    // its mailbox and is served once the agent runs on the other worker.
    let doomed = cluster.worker_of(&victim).await;
    let (_, child) = cluster.workers.iter_mut().find(|(n, _)| *n == doomed).unwrap();
    let killed_at = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let call = tokio::spawn({
        let analyser = analyser.clone();
        async move { analyser.analyse("served after the move".into()).await }
    });
    let moved = cluster.wait_state(&victim, AgentState::Running).await;
    wait(|| async { cluster.get(&victim).await.epoch == 2 }).await;
    let failover = killed_at.elapsed();
    assert_ne!(cluster.worker_of(&victim).await, doomed);
    assert_eq!(moved.restarts, 0, "a lost worker is not the agent's failure");
    assert_eq!(call.await.unwrap().unwrap().words, 4);
    assert_eq!(analyser.analyse("still here".into()).await.unwrap().words, 2);
    eprintln!("failover took {failover:?}");
    manager.close().await.unwrap();
}

#[tokio::test]
async fn stop_restart_pending_and_bad_launches() {
    let mut cluster = cluster(&["w1"]).await;
    let exchange =
        academy_sdk::exchange::GrpcExchange::connect(cluster.exchange.url()).await.unwrap();
    use academy_sdk::exchange::ExchangeApi as _;

    // Stop keeping the mailbox, and stop terminating it.
    let kept = cluster.launch("example.WordStats", json!({}), 0).await.unwrap();
    let gone = cluster.launch("example.WordStats", json!({}), 0).await.unwrap();
    for id in [&kept, &gone] {
        cluster.wait_state(id, AgentState::Running).await;
    }
    for (id, terminate) in [(&kept, false), (&gone, true)] {
        let stop = pb::StopAgentRequest { agent_id: id.to_string(), terminate };
        cluster.rpc.stop_agent(stop).await.unwrap();
        cluster.wait_state(id, AgentState::Stopped).await;
    }
    let state = |id: &String| {
        let exchange = exchange.clone();
        let id = id.parse().unwrap();
        async move { exchange.status(&id).await.unwrap().state }
    };
    assert_eq!(state(&kept).await, MailboxState::Active);
    assert_eq!(state(&gone).await, MailboxState::Terminated);

    // A failing agent restarts up to its limit, then is failed with the error.
    let crashy = cluster.launch("example.Crashy", json!({"fail_after_ms": 50}), 2).await.unwrap();
    let failed = cluster.wait_state(&crashy, AgentState::Failed).await;
    assert_eq!(failed.restarts, 2);
    assert!(failed.reason.contains("crashed after 50 ms"), "{}", failed.reason);
    // Failed for good, nothing will take its mailbox again: the launcher
    // terminates it (restarts kept it: they are served from it).
    wait(|| async { state(&crashy).await == MailboxState::Terminated }).await;

    // A config that doesn't fit the behaviour fails with a reason, and a
    // request that waited for it is answered with an error, not left queued
    // until its caller's timeout.
    let misfit = cluster.launch("example.Crashy", json!({"wrong": 1}), 0).await.unwrap();
    let manager = Manager::new(std::sync::Arc::new(exchange.clone())).await.unwrap();
    let handle = manager
        .handle::<academy_examples::behaviours::Crashy>(misfit.parse().unwrap())
        .with_timeout(Duration::from_secs(60));
    let started = Instant::now();
    let err = handle.alive().await.unwrap_err();
    assert!(err.to_string().contains("terminated"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "answered, not timed out");
    let failed = cluster.wait_state(&misfit, AgentState::Failed).await;
    assert!(failed.reason.contains("fail_after_ms"), "{}", failed.reason);
    assert_eq!(state(&misfit).await, MailboxState::Terminated);
    manager.close().await.unwrap();

    // No worker with the labels: pending, with the reason.
    let req = pb::LaunchAgentRequest {
        behaviour: "example.WordStats".into(),
        selector: [("gpu".to_owned(), "yes".to_owned())].into(),
        ..Default::default()
    };
    let pending = cluster.rpc.launch_agent(req).await.unwrap().into_inner().agent.unwrap();
    assert_eq!(pending.state(), AgentState::Pending);
    assert!(pending.reason.contains("gpu"), "{}", pending.reason);

    // Bad launches are refused with a clear error.
    let err = cluster.launch("example.Nope", json!({}), 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("example.WordStats"),
        "lists what is offered: {}",
        err.message()
    );
    let err = cluster
        .rpc
        .get_agent(pb::GetAgentRequest { agent_id: "agent:nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    let err =
        cluster.rpc.stop_agent(pb::StopAgentRequest { agent_id: unknown, terminate: false }).await;
    assert_eq!(err.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn draining_a_worker_moves_its_agents_and_keeps_their_mailboxes() {
    let mut cluster = cluster(&["w1"]).await;
    let id = cluster.launch("example.WordStats", json!({}), 0).await.unwrap();
    cluster.wait_state(&id, AgentState::Running).await;
    cluster.add_worker("w2").await;
    let from = cluster.get(&id).await.worker_id;
    // By name, as a pod's preStop hook or an operator would.
    let by_name = pb::DrainWorkerRequest { name: "w1".into(), ..Default::default() };
    cluster.rpc.drain_worker(by_name).await.unwrap();
    wait(|| async {
        let agent = cluster.get(&id).await;
        agent.state() == AgentState::Running && agent.worker_id != from
    })
    .await;
    assert_eq!(cluster.worker_of(&id).await, "w2");
    let manager = Manager::connect(&cluster.exchange.url()).await.unwrap();
    let analyser =
        manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(10));
    assert_eq!(analyser.analyse("moved".into()).await.unwrap().words, 1);
    manager.close().await.unwrap();
}

/// A rolling update under load: each worker in turn gets a replacement,
/// then SIGTERM (as Kubernetes sends). Each hands its agents over before it
/// exits: no agent ends up stopped, and no call fails (a call may wait
/// while its agent moves).
#[tokio::test]
async fn sigterm_moves_a_workers_agents_and_a_rolling_update_loses_no_call() {
    let mut cluster = cluster(&["w1", "w2", "w3"]).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(cluster.launch("example.WordStats", json!({}), 0).await.unwrap());
    }
    for id in &ids {
        cluster.wait_state(id, AgentState::Running).await;
    }
    let manager = Manager::connect(&cluster.exchange.url()).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers = common::call_until(&manager, &ids, &stop);
    let mut moved = 0;
    for round in 0..3 {
        let name = cluster.workers[round].0.clone();
        cluster.add_worker(&format!("{name}-next")).await;
        let held = {
            let mut held = 0;
            for id in &ids {
                held += usize::from(cluster.worker_of(id).await == name);
            }
            held
        };
        moved += held;
        signal(&cluster.workers[round].1, "-TERM");
        // It exits by itself once its agents are handed over.
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.workers[round].1.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{name} did not exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for id in &ids {
            let agent = cluster.wait_state(id, AgentState::Running).await;
            assert_ne!(cluster.worker_of(id).await, name, "{agent:?}");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut ok, mut failed, mut lost_state) = (0, Vec::new(), Vec::new());
    for (caller, id) in callers.into_iter().zip(&ids) {
        let (n, errors) = caller.await.unwrap();
        assert!(n > 0, "every agent answered");
        ok += n;
        failed.extend(errors);
        // Its count of texts analysed (its kept state) moved with it: no
        // fewer than the calls answered (more if a call ran twice).
        let handle =
            manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(20));
        let analysed = handle.analysed().await.unwrap();
        if analysed < u64::from(n) {
            lost_state.push(format!("{id}: {analysed} analysed, {n} answered"));
        }
    }
    let mut stopped = 0;
    for id in &ids {
        stopped += usize::from(cluster.get(id).await.state() != AgentState::Running);
    }
    println!(
        "rolling update of 3 workers ({moved} agent moves): {ok} calls answered, {} failed; {stopped} agents not running; state kept by all but {}",
        failed.len(),
        lost_state.len()
    );
    assert!(lost_state.is_empty(), "state lost in a move: {lost_state:?}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(stopped, 0);
    manager.close().await.unwrap();
}

/// Effectively once (docs/design.md, "State"): 10,000 analyses of one
/// agent, while the worker running it is killed with SIGKILL four times
/// and the launcher moves it each time, count exactly 10,000 texts: no
/// change of state lost, none applied twice, every call answered.
async fn an_agent_killed_and_moved_counts_each_request_once(options: ExchangeOptions) {
    const CALLS: u32 = 10_000;
    const KILL_EVERY: u32 = 2_000;
    let mut cluster = cluster_on(options, &["w1", "w2"]).await;
    let id = cluster.launch("example.WordStats", json!({}), 0).await.unwrap();
    cluster.wait_state(&id, AgentState::Running).await;
    let manager = Manager::connect(&cluster.exchange.url()).await.unwrap();
    let analyser =
        manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(60));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let calls = tokio::spawn({
        let (analyser, answered) = (analyser.clone(), answered.clone());
        async move {
            use futures::StreamExt as _;
            let failed: Vec<String> = futures::stream::iter(0..CALLS)
                .map(|_| {
                    let (analyser, answered) = (analyser.clone(), answered.clone());
                    async move {
                        let report = analyser.analyse("one more".into()).await;
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        report.map_err(|e| e.to_string()).err()
                    }
                })
                .buffer_unordered(16)
                .filter_map(|failed| async { failed })
                .collect()
                .await;
            failed
        }
    });
    let mut kills = 0;
    for round in 1..CALLS / KILL_EVERY {
        wait_long(|| async {
            answered.load(std::sync::atomic::Ordering::SeqCst) >= round * KILL_EVERY
        })
        .await;
        // A fresh worker first, then the one running the agent goes.
        cluster.add_worker(&format!("w{}", round + 2)).await;
        let doomed = cluster.worker_of(&id).await;
        let (_, child) = cluster.workers.iter_mut().find(|(n, _)| *n == doomed).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        wait(|| async { cluster.get(&id).await.epoch == u64::from(round) + 1 }).await;
    }
    let failed = calls.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let analysed = analyser.analysed().await.unwrap();
    println!("{CALLS} calls, {kills} workers killed under the agent: {analysed} texts analysed");
    assert_eq!(kills, 4);
    assert_eq!(analysed, u64::from(CALLS), "each request changes the state exactly once");
    manager.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_moved_in_memory_each_request_counts_once() {
    an_agent_killed_and_moved_counts_each_request_once(ExchangeOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_moved_on_redis_each_request_counts_once() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let store = MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() });
    an_agent_killed_and_moved_counts_each_request_once(ExchangeOptions {
        store,
        ..Default::default()
    })
    .await;
}

/// Polls `ready` every 20 ms for up to 2 minutes.
async fn wait_long<F, Fut>(ready: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(Duration::from_secs(120), ready).await;
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill").args([name, &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
}

#[tokio::test]
async fn a_worker_back_from_the_dead_does_not_serve_moved_agents() {
    let mut cluster = cluster(&["w1"]).await;
    let id = cluster.launch("example.WordStats", json!({}), 0).await.unwrap();
    cluster.wait_state(&id, AgentState::Running).await;
    cluster.add_worker("w2").await;

    // Freeze w1: it stops heartbeating but keeps its connections, as in a
    // partition. After the heartbeat timeout the launcher moves the agent.
    signal(&cluster.workers[0].1, "-STOP");
    wait(|| async {
        let agent = cluster.get(&id).await;
        agent.state() == AgentState::Running && agent.epoch == 2
    })
    .await;
    assert_eq!(cluster.worker_of(&id).await, "w2");

    // w1 wakes up: its lease has run out, so it stops its copy instead of
    // taking the mailbox back.
    signal(&cluster.workers[0].1, "-CONT");
    let manager = Manager::connect(&cluster.exchange.url()).await.unwrap();
    let analyser =
        manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(10));
    for _ in 0..20 {
        assert_eq!(analyser.analyse("one owner".into()).await.unwrap().words, 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = cluster.get(&id).await;
    assert_eq!((agent.state(), agent.epoch), (AgentState::Running, 2), "{agent:?}");
    assert_eq!(cluster.worker_of(&id).await, "w2");
    manager.close().await.unwrap();
}

/// A launcher that restarts (on Redis) forgets nothing, and its agents do
/// not notice: workers keep them running meanwhile (callers are served
/// through the exchange), rejoin with them, and the launcher keeps each
/// where it was, same placement, so they stay spread over the workers.
#[tokio::test]
async fn a_launcher_restarted_on_redis_forgets_nothing_and_its_agents_keep_running() {
    let redis =
        academy_server::testing::RedisServer::start().expect("redis-server must run for this test");
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions {
        exchange_url: exchange.url(),
        heartbeat_timeout: Duration::from_secs(1),
        redis_url: Some(redis.url()),
        ..Default::default()
    };
    let launcher = RunningLauncher::start(options.clone()).await.unwrap();
    let launcher_url = launcher.url();
    let rpc = LauncherServiceClient::connect(launcher_url.clone()).await.unwrap();
    let mut cluster =
        Cluster { exchange, launcher: Some(launcher), launcher_url, rpc, workers: Vec::new() };
    cluster.add_worker("w1").await;
    cluster.add_worker("w2").await;
    let mut running = Vec::new();
    for _ in 0..4 {
        running.push(cluster.launch("example.WordStats", json!({}), 2).await.unwrap());
    }
    let stopped = cluster.launch("example.WordStats", json!({}), 0).await.unwrap();
    let mut placed = Vec::new();
    for id in &running {
        cluster.wait_state(id, AgentState::Running).await;
        placed.push(cluster.worker_of(id).await);
    }
    assert_eq!(placed.iter().filter(|w| *w == "w1").count(), 2, "spread: {placed:?}");
    cluster.wait_state(&stopped, AgentState::Running).await;
    cluster
        .rpc
        .stop_agent(pb::StopAgentRequest { agent_id: stopped.clone(), terminate: false })
        .await
        .unwrap();
    cluster.wait_state(&stopped, AgentState::Stopped).await;

    // Restart the launcher on the same address and Redis; while it is
    // away, the agents still answer.
    let first = cluster.launcher.take().unwrap();
    let addr = first.addr().clone();
    first.shutdown().await;
    let manager = Manager::connect(&cluster.exchange.url()).await.unwrap();
    let analysers: Vec<_> = running
        .iter()
        .map(|id| {
            manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(10))
        })
        .collect();
    for analyser in &analysers {
        assert_eq!(analyser.analyse("no launcher now".into()).await.unwrap().words, 3);
    }
    let second = RunningLauncher::start(LauncherOptions { listen: addr, ..options }).await.unwrap();
    cluster.launcher = Some(second);
    cluster.rpc = LauncherServiceClient::connect(cluster.launcher_url.clone()).await.unwrap();

    let agents = cluster
        .rpc
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 5, "every record survived: {agents:?}");
    assert_eq!(cluster.get(&stopped).await.state(), AgentState::Stopped);
    // The workers rejoin by themselves with their agents, kept where they
    // were, at the same placement (not restarted).
    for (id, worker) in running.iter().zip(&placed) {
        let back = cluster.wait_state(id, AgentState::Running).await;
        assert_eq!((back.epoch, back.retry_limit), (1, 2), "kept, not placed again: {back:?}");
        assert_eq!(&cluster.worker_of(id).await, worker);
    }
    for analyser in &analysers {
        assert_eq!(analyser.analyse("after the restart".into()).await.unwrap().words, 3);
    }
    manager.close().await.unwrap();
}
