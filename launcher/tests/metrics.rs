//! The launcher's metrics: its calls, its workers and its agents by state.

use std::time::{Duration, Instant};

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::{self, launcher_service_client::LauncherServiceClient};
use academy_sdk::behaviour;
use academy_sdk::worker::Worker;
use academy_server::testing::{get, sample, scrape};

#[derive(Default, serde::Deserialize)]
struct Idle {}

#[behaviour(name = "test.Idle")]
impl Idle {
    #[action]
    async fn get(&self) -> u64 {
        1
    }
}

/// Scrapes `addr` until `series` reads `value` (within 5 s); the text.
async fn until(addr: std::net::SocketAddr, series: &'static str, value: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, text) =
            tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap().unwrap();
        assert!(status.ends_with("200 OK"), "{status}");
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(Instant::now() < deadline, "{series} never read {value}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_calls_workers_and_agents_by_state() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions {
        exchange_url: exchange.url(),
        metrics_listen: Some(([127, 0, 0, 1], 0).into()),
        ..Default::default()
    };
    let launcher = RunningLauncher::start(options).await.unwrap();
    let addr = launcher.metrics_addr().expect("metrics served");
    let running = r#"academy_launcher_agents{state="running"}"#;
    let text = until(addr, "academy_launcher_workers", 0.0).await;
    assert_eq!(sample(&text, running), Some(0.0), "every state shows, at 0 too:\n{text}");

    // The probes on the metrics port: live, and ready while serving.
    for path in ["/livez", "/readyz"] {
        let (status, _) =
            tokio::task::spawn_blocking(move || get(addr, path)).await.unwrap().unwrap();
        assert!(status.ends_with("200 OK"), "{path}: {status}");
    }

    let stop = tokio_util::sync::CancellationToken::new();
    let worker = Worker::new(launcher.url()).name("w1").capacity(2).register::<Idle>();
    // A worker's status (what its readiness probe answers from): joined.
    let mut status = worker.status();
    assert!(!status.borrow().joined);
    let worker = tokio::spawn(worker.run_until(stop.clone().cancelled_owned()));
    until(addr, "academy_launcher_workers", 1.0).await;
    status.wait_for(|s| s.joined).await.unwrap();

    let mut rpc = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let launch = |behaviour: &str| pb::LaunchAgentRequest {
        behaviour: behaviour.into(),
        ..Default::default()
    };
    rpc.launch_agent(launch("test.Idle")).await.unwrap();
    let refused = rpc.launch_agent(launch("test.Nobody")).await.unwrap_err().code();
    let text = until(addr, running, 1.0).await;
    let calls = r#"academy_grpc_calls_total{service="academy.v1.LauncherService",method="LaunchAgent",code="#;
    assert_eq!(sample(&text, &format!(r#"{calls}"OK"}}"#)), Some(1.0), "{text}");
    assert_eq!(refused, tonic::Code::FailedPrecondition, "no worker offers test.Nobody");
    let failed = format!(r#"{calls}"FAILED_PRECONDITION"}}"#);
    assert_eq!(sample(&text, &failed), Some(1.0), "{text}");

    status.wait_for(|s| s.joined && s.agents == 1).await.unwrap();
    stop.cancel();
    worker.await.unwrap().unwrap();
    assert!(!status.borrow().joined, "a worker that left is not ready");
    until(addr, "academy_launcher_workers", 0.0).await;
    launcher.shutdown().await;
}
