//! A co-simulation on a simulated clock (docs/design.md, "Clocks"): three
//! agents (sensor, controller, recorder; `examples/src/behaviours.rs`) on
//! two worker processes, driven through the exchange's clock service by one
//! simulator. Two runs, each on a fresh cluster, record the same events at
//! the same simulated times.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use academy_examples::behaviours::Recorder;
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::{self, AgentState, launcher_service_client::LauncherServiceClient};
use academy_sdk::Manager;
use academy_server::testing::Children;
use serde_json::json;

const HOUR: Duration = Duration::from_secs(3600);

/// Runs the simulation for a day on a fresh cluster; what the recorder
/// recorded, and how long the day took.
async fn simulate_a_day() -> (Vec<String>, Duration) {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let mut workers = Children::default();
    for name in ["w1", "w2"] {
        let worker = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--launcher", &launcher.url(), "--name", name, "--simulated-clock"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        workers.0.push(worker);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while rpc
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers
        .len()
        < 2
    {
        assert!(Instant::now() < deadline, "the workers never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut launch = async |behaviour: &str, name: &str, config: serde_json::Value| {
        let request = pb::LaunchAgentRequest {
            behaviour: behaviour.into(),
            name: name.into(),
            config: Some(academy_proto::json::to_proto(config)),
            ..Default::default()
        };
        rpc.launch_agent(request).await.unwrap().into_inner().agent.unwrap().agent_id
    };
    let recorder = launch("example.Recorder", "recorder", json!({})).await;
    let controller =
        launch("example.Controller", "controller", json!({"recorder": recorder})).await;
    let sensor =
        launch("example.Sensor", "sensor", json!({"controller": controller, "seed": 7})).await;
    let mut placed = Vec::new();
    for id in [&recorder, &controller, &sensor] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let request = pb::GetAgentRequest { agent_id: id.clone() };
            let agent = rpc.get_agent(request).await.unwrap().into_inner().agent.unwrap();
            if agent.state() == AgentState::Running {
                placed.push(agent.worker_id);
                break;
            }
            assert!(Instant::now() < deadline, "{id} never ran: {agent:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
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
