//! The `academy` command line against a real exchange, launcher and worker.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_sdk::behaviour;
use academy_sdk::worker::Worker;
use serde_json::Value;

#[derive(Default, serde::Deserialize)]
struct Counter {
    #[serde(default)]
    start: u64,
    #[serde(skip)]
    count: AtomicU64,
}

/// Counts.
#[behaviour(name = "test.Counter", implements("test.Metric"))]
impl Counter {
    /// Adds `by` and answers the count.
    #[action]
    async fn increment(&self, by: u64) -> u64 {
        self.start + self.count.fetch_add(by, Ordering::SeqCst) + by
    }
}

struct Cli {
    exchange: String,
    launcher: String,
}

impl Cli {
    /// Runs `academy ARGS` and returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_academy"))
            .args(["--exchange", &self.exchange, "--launcher", &self.launcher])
            .args(args)
            .output()
            .expect("academy runs");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    }

    /// Runs `academy --json ARGS`, which must succeed, and parses each line.
    fn json(&self, args: &[&str]) -> Vec<Value> {
        let (ok, stdout, stderr) = self.run(&[&["--json"], args].concat());
        assert!(ok, "academy {args:?} failed: {stderr}");
        stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect()
    }
}

/// An in-memory exchange and a launcher using it, both on loopback.
async fn exchange_and_launcher() -> (RunningExchange, RunningLauncher) {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    (exchange, launcher)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_drives_a_live_system() {
    let (exchange, launcher) = exchange_and_launcher().await;
    let stop_worker = tokio_util::sync::CancellationToken::new();
    let worker = Worker::new(launcher.url()).name("w1").capacity(2).register::<Counter>();
    let worker = tokio::spawn(worker.run_until(stop_worker.clone().cancelled_owned()));
    let cli = Cli { exchange: exchange.url(), launcher: launcher.url() };
    let cli = std::sync::Arc::new(cli);
    let run = |args: &'static [&'static str]| {
        let cli = cli.clone();
        tokio::task::spawn_blocking(move || cli.json(args))
    };

    let deadline = Instant::now() + Duration::from_secs(10);
    while run(&["workers", "list"]).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the worker never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let workers = run(&["workers", "list"]).await.unwrap();
    assert_eq!(workers[0]["name"], "w1");

    let cli2 = cli.clone();
    let launched = tokio::task::spawn_blocking(move || {
        cli2.json(&[
            "agents",
            "launch",
            "test.Counter",
            "--config",
            r#"{"start": 100}"#,
            "--retries",
            "1",
        ])
    })
    .await
    .unwrap();
    let id = launched[0]["agent_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let agents = run(&["agents", "list"]).await.unwrap();
        if agents[0]["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "never running: {agents:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // What it can do, as its worker described it.
    let cli2 = cli.clone();
    let id2 = id.clone();
    let (ok, table, err) =
        tokio::task::spawn_blocking(move || cli2.run(&["describe", &id2])).await.unwrap();
    assert!(ok, "{err}");
    assert!(
        table.contains("Counts.") && table.contains("Adds `by` and answers the count."),
        "{table}"
    );
    let cli2 = cli.clone();
    let id2 = id.clone();
    let described =
        tokio::task::spawn_blocking(move || cli2.json(&["describe", &id2])).await.unwrap();
    let increment = &described[0]["actions"][0];
    assert_eq!(increment["params"], serde_json::json!(["by"]));
    assert_eq!(increment["input_schema"]["properties"]["by"]["type"], "integer");
    let cli2 = cli.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        cli2.run(&["describe", "agent:00000000-0000-4000-8000-000000000000"])
    })
    .await
    .unwrap();
    assert!(!ok && err.contains("NotFound"), "{err}");

    // Kept state: none yet for this counter; once saved, shown with its
    // revision, version and size, and whole with --json.
    let cli2 = cli.clone();
    let id2 = id.clone();
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || cli2.run(&["agents", "state", &id2])).await.unwrap();
    assert!(!ok && err.contains("no saved state"), "{err}");
    let mut rpc =
        academy_proto::pb::exchange_service_client::ExchangeServiceClient::connect(exchange.url())
            .await
            .unwrap();
    let data = academy_proto::pb::Payload {
        content_type: "application/json".into(),
        data: br#"{"n":7}"#.to_vec().into(),
        ..Default::default()
    };
    let save = academy_proto::pb::SaveStateRequest {
        agent_id: id.clone(),
        epoch: 1,
        data: Some(data),
        version: 3,
        ..Default::default()
    };
    rpc.save_state(save).await.unwrap();
    let cli2 = cli.clone();
    let id2 = id.clone();
    let shown =
        tokio::task::spawn_blocking(move || cli2.json(&["agents", "state", &id2])).await.unwrap();
    assert_eq!(
        (&shown[0]["revision"], &shown[0]["version"], &shown[0]["bytes"], &shown[0]["state"]["n"]),
        (&Value::from(1), &Value::from(3), &Value::from(7), &Value::from(7)),
        "{shown:?}"
    );

    let cli2 = cli.clone();
    let id2 = id.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let (ok, out, err) = cli2.run(&["invoke", &id2, "increment", "[5]"]);
        assert!(ok, "{err}");
        assert_eq!(out.trim(), "105", "config and call reached the agent");
        let found = cli2.json(&["discover", "test.Metric"]);
        assert_eq!(found[0]["agent_id"], id2.as_str());
        let status = cli2.json(&["status", &id2]);
        assert_eq!(status[0]["state"], "active");
        assert_eq!(status[0]["subscribed"], true, "its worker runs it");
        let (ok, table, _) = cli2.run(&["agents", "list"]);
        assert!(ok && table.starts_with("AGENT_ID"), "a table for people: {table}");

        let (ok, _, err) = cli2.run(&["agents", "launch", "test.Nope"]);
        assert!(!ok && err.contains("no registered worker offers"), "{err}");
        let (ok, _, err) = cli2.run(&["invoke", &id2, "increment", "not json"]);
        assert!(!ok && err.contains("args must be JSON"), "{err}");
        let (ok, _, err) = cli2.run(&["workers", "drain", "worker:nope"]);
        assert!(!ok && err.contains("NotFound"), "{err}");

        // The answer is the record after the stop was asked for: the worker
        // may already have reported the agent stopped by then.
        let stopped = cli2.json(&["agents", "stop", &id2, "--terminate"]);
        let state = stopped[0]["state"].as_str();
        assert!(matches!(state, Some("stopping" | "stopped")), "{stopped:?}");
    })
    .await;
    checks.unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cli2 = cli.clone();
        let id2 = id.clone();
        let status =
            tokio::task::spawn_blocking(move || cli2.json(&["status", &id2])).await.unwrap();
        if status[0]["state"] == "terminated" {
            break;
        }
        assert!(Instant::now() < deadline, "never terminated: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_worker.cancel();
    worker.await.unwrap().unwrap();
}
