//! A co-simulation on a simulated clock (docs/design.md, "Clocks"): three
//! agents (sensor, controller, recorder; `examples/src/behaviours.rs`) on
//! two worker processes, driven through the exchange's clock service by one
//! simulator. Two runs, each on a fresh cluster, record the same events at
//! the same simulated times.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use academy_examples::behaviours::{Recorder, Relay, Stall};
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::{self, AgentState, launcher_service_client::LauncherServiceClient};
use academy_sdk::Manager;
use academy_server::testing::Children;
use serde_json::json;

const HOUR: Duration = Duration::from_secs(3600);

type Launcher = LauncherServiceClient<tonic::transport::Channel>;

/// A worker process on the simulated clock, with `labels` (`key=value`).
fn worker(launcher: &RunningLauncher, name: &str, labels: &[&str]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_worker"));
    command.args(["--launcher", &launcher.url(), "--name", name, "--simulated-clock"]);
    for label in labels {
        command.args(["--label", label]);
    }
    command.env("RUST_LOG", "warn").stderr(Stdio::null()).spawn().unwrap()
}

/// Waits until `count` workers joined.
async fn joined(rpc: &mut Launcher, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = async |rpc: &mut Launcher| {
        let request = pb::ListWorkersRequest::default();
        rpc.list_workers(request).await.unwrap().into_inner().workers.len()
    };
    while listed(rpc).await < count {
        assert!(Instant::now() < deadline, "the workers never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Launches `behaviour` as `name` (on a worker `selector` matches) and
/// waits until it runs; its id, and its worker's.
async fn launch(
    rpc: &mut Launcher,
    behaviour: &str,
    name: &str,
    config: serde_json::Value,
    selector: &[(&str, &str)],
) -> (String, String) {
    let request = pb::LaunchAgentRequest {
        behaviour: behaviour.into(),
        name: name.into(),
        config: Some(academy_proto::json::to_proto(config)),
        selector: selector.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    let id = rpc.launch_agent(request).await.unwrap().into_inner().agent.unwrap().agent_id;
    let agent = reached(rpc, &id, AgentState::Running).await;
    (id, agent.worker_id)
}

/// Waits until agent `id` is in `state`; its record.
async fn reached(rpc: &mut Launcher, id: &str, state: AgentState) -> pb::AgentRecord {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let request = pb::GetAgentRequest { agent_id: id.to_owned() };
        let agent = rpc.get_agent(request).await.unwrap().into_inner().agent.unwrap();
        if agent.state() == state {
            return agent;
        }
        assert!(Instant::now() < deadline, "{id} never reached {state:?}: {agent:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the simulation for a day on a fresh cluster; what the recorder
/// recorded, and how long the day took.
async fn simulate_a_day() -> (Vec<String>, Duration) {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let workers = Children(vec![worker(&launcher, "w1", &[]), worker(&launcher, "w2", &[])]);
    joined(&mut rpc, 2).await;
    let (recorder, on_1) = launch(&mut rpc, "example.Recorder", "recorder", json!({}), &[]).await;
    let config = json!({"recorder": recorder});
    let (controller, on_2) =
        launch(&mut rpc, "example.Controller", "controller", config, &[]).await;
    let config = json!({"controller": controller, "seed": 7});
    let (_, on_3) = launch(&mut rpc, "example.Sensor", "sensor", config, &[]).await;
    let mut placed = vec![on_1, on_2, on_3];
    placed.sort();
    placed.dedup();
    assert_eq!(placed.len(), 2, "the agents run on both workers");

    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let simulator = manager.simulator();
    // The sensor's and the controller's timers asleep: ready.
    simulator.ready(2, Duration::from_secs(15)).await.unwrap();
    let started = Instant::now();
    let status = simulator.advance_by(HOUR * 24).await.unwrap();
    let took = started.elapsed();
    assert_eq!((status.now, status.pending), (HOUR * 24, 0));
    let recorder = manager.handle::<Recorder>(recorder.parse().unwrap());
    let events = recorder.events().await.unwrap();
    manager.close().await.unwrap();
    drop(workers);
    launcher.shutdown().await;
    exchange.shutdown().await;
    (events, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_co_simulation_on_two_workers_runs_the_same_twice() {
    let (first, took) = simulate_a_day().await;
    let (second, _) = simulate_a_day().await;
    println!("a simulated day on two workers in {took:?}: {} events", first.len());
    println!("{}", first[..8].join("\n"));
    // 24 readings and 16 checks; at 03:00 (and every 3 h) both are due:
    // the controller's check before the sensor's reading (by name).
    assert_eq!(first.len(), 24 + 16, "{first:#?}");
    assert!(first[0].starts_with("01:00 ") && first[0].contains("degrees"), "{first:#?}");
    assert_eq!(first[1], "01:30 check: heating false", "{first:#?}");
    let at_three: Vec<&String> = first.iter().filter(|e| e.starts_with("03:00")).collect();
    assert!(at_three[0].contains("check") && at_three[1].contains("degrees"), "{at_three:?}");
    assert!(first.iter().any(|e| e.contains("heater")), "the heater switched: {first:#?}");
    assert_eq!(first, second, "two runs record the same");
}

/// A process on the clock dies (SIGKILL) with its work pending: first one
/// whose agent awaits an answer from another process's agent, then one
/// whose agent's action runs. Each time the clock gives up what the dead
/// process left (its running tasks, the answer it awaited), and a simulator
/// waiting to move time gets there (docs/design.md, "Clocks").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_dies_mid_task_does_not_stop_the_clock() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let mut workers = Children(vec![
        worker(&launcher, "caller", &["role=caller"]),
        worker(&launcher, "callee", &["role=callee"]),
    ]);
    joined(&mut rpc, 2).await;
    // Selectors keep each agent on its worker: none is restarted elsewhere.
    let (stall, _) =
        launch(&mut rpc, "example.Stall", "stall", json!({}), &[("role", "callee")]).await;
    let config = json!({"target": stall});
    let (relay, _) =
        launch(&mut rpc, "example.Relay", "relay", config, &[("role", "caller")]).await;
    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let simulator = manager.simulator();
    let stall = manager.handle::<Stall>(stall.parse().unwrap());
    let relay = manager.handle::<Relay>(relay.parse().unwrap());
    let stalls_started = async |count: u64| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while stall.started().await.unwrap() < count {
            assert!(Instant::now() < deadline, "the stall never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let advanced_past_a_kill = async |kill: &mut Child| {
        let advance = tokio::spawn({
            let simulator = simulator.clone();
            async move { simulator.advance_by(HOUR).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!advance.is_finished(), "time waits for the work pending");
        kill.kill().unwrap();
        kill.wait().unwrap();
        tokio::time::timeout(Duration::from_secs(60), advance)
            .await
            .expect("the clock stopped for good when a process died")
            .unwrap()
    };

    // The relay (caller) awaits the stall's answer; its process dies; the
    // stall answers 3 s later, uncounted, and time moves.
    let relayed = tokio::spawn(async move { relay.relay(3_000).await });
    stalls_started(1).await;
    let reached = advanced_past_a_kill(&mut workers.0[0]).await;
    assert_eq!((reached.now, reached.pending), (HOUR, 0));
    relayed.abort();

    // The stall's action runs (for ten minutes of wall time); its process
    // dies; time moves at once.
    let stalled = tokio::spawn({
        let stall = stall.clone();
        async move { stall.stall(600_000).await }
    });
    stalls_started(2).await;
    let reached = advanced_past_a_kill(&mut workers.0[1]).await;
    assert_eq!((reached.now, reached.pending), (HOUR * 2, 0));
    stalled.abort();
    manager.close().await.unwrap();
    launcher.shutdown().await;
    exchange.shutdown().await;
}

/// An agent the launcher gives up on (it failed for good) does not hold
/// its callers or the clock: the launcher terminates its mailbox, so a
/// request an agent sends it on the clock is answered with an error, and
/// time moves with nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_failed_for_good_does_not_stop_the_clock() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let workers = Children(vec![worker(&launcher, "w", &[])]);
    joined(&mut rpc, 1).await;
    // A config the behaviour cannot take, and no restarts: failed for good.
    let request = pb::LaunchAgentRequest {
        behaviour: "example.Crashy".into(),
        config: Some(academy_proto::json::to_proto(json!({"wrong": 1}))),
        ..Default::default()
    };
    let misfit = rpc.launch_agent(request).await.unwrap().into_inner().agent.unwrap().agent_id;
    reached(&mut rpc, &misfit, AgentState::Failed).await;
    let (relay, _) =
        launch(&mut rpc, "example.Relay", "relay", json!({"target": misfit}), &[]).await;
    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let relay = manager.handle::<Relay>(relay.parse().unwrap());
    // Its answer comes (an error), where before the request waited for ever,
    // pending on the clock, and the relay's handle timeout, a clock sleep,
    // could never come.
    let relayed = tokio::time::timeout(Duration::from_secs(60), relay.relay(1_000))
        .await
        .expect("a request to an agent that failed for good was never answered");
    let err = relayed.unwrap_err();
    assert!(err.to_string().contains("terminated"), "{err}");
    let simulator = manager.simulator();
    let reached = tokio::time::timeout(Duration::from_secs(60), simulator.advance_by(HOUR))
        .await
        .expect("the clock stopped")
        .unwrap();
    assert_eq!((reached.now, reached.pending), (HOUR, 0));
    manager.close().await.unwrap();
    // Its stream gone, the launcher need not wait for the worker to leave.
    drop(workers);
    launcher.shutdown().await;
    exchange.shutdown().await;
}
