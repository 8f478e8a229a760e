//! Every metric the processes serve, scraped from an exchange, a launcher
//! and a worker process after real calls: the values count what happened,
//! docs/operating.md's table lists exactly the series served, and the
//! Grafana dashboard (deploy/grafana/academy.json) charts only series that
//! exist.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use academy_examples::behaviours::WordStats;
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::exchange_service_client::ExchangeServiceClient;
use academy_proto::pb::{self};
use academy_sdk::Manager;
use academy_sdk::launcher::Launcher;
use academy_server::testing::{binary, sample, scrape};

fn loopback() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

async fn text(addr: SocketAddr) -> String {
    let (status, text) = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap().unwrap();
    assert!(status.ends_with("200 OK"), "{status}");
    text
}

/// The names of the samples in `text` (`x_total`, `x_bucket`, ...).
fn samples(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_served_is_documented_and_counts_what_happened() {
    let exchange = RunningExchange::start(ExchangeOptions {
        metrics_listen: loopback(),
        ..Default::default()
    })
    .await
    .unwrap();
    let launcher = RunningLauncher::start(LauncherOptions {
        exchange_url: exchange.url(),
        metrics_listen: loopback(),
        ..Default::default()
    })
    .await
    .unwrap();
    let worker_metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let bin = binary("worker");
    let mut worker = Command::new(bin)
        .args(["--launcher", &launcher.url(), "--metrics-listen", &worker_metrics.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("build the workspace's binaries");

    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let remote = Launcher::connect(&launcher.url()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = loop {
        match manager
            .launch_remote::<WordStats>(&remote, &serde_json::json!({}), Default::default())
            .await
        {
            Ok(agent) => break agent.with_timeout(Duration::from_secs(20)),
            // The worker may not have joined yet.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(agent.analyse("one two".into()).await.unwrap().words, 2);
    assert!(agent.analyse(String::new()).await.is_err(), "nothing to analyse fails");
    let mut rpc = ExchangeServiceClient::connect(exchange.url()).await.unwrap();
    let unknown = pb::InvokeRequest {
        agent_id: agent.id().to_string(),
        action: "no_such_action".into(),
        ..Default::default()
    };
    assert!(rpc.invoke(unknown).await.is_err());
    // A message to no mailbox is refused.
    let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let client = client.into_inner().client_id;
    let ping = |dest: String| {
        let header = pb::Header {
            src: client.clone(),
            dest,
            tag: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        };
        let ping = pb::message::Body::PingRequest(pb::PingRequest {});
        pb::SendRequest { message: Some(pb::Message { header: Some(header), body: Some(ping) }) }
    };
    let nowhere = academy_proto::EntityId::new_agent().to_string();
    assert!(rpc.send(ping(nowhere)).await.is_err());
    // A blob of 3 bytes, put and read twice.
    let blob = manager.put_blob(std::io::Cursor::new(b"abc".to_vec()), 3).await.unwrap();
    for _ in 0..2 {
        assert_eq!(blob.bytes().await.unwrap().as_ref(), b"abc");
    }
    blob.delete().await.unwrap();
    // A message waiting in a mailbox nobody reads, for the queue depth
    // (read every 5 s).
    rpc.send(ping(client.clone())).await.unwrap();
    let exchange_metrics = exchange.metrics_addr().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let queued = r#"academy_exchange_queued_messages{behaviour="(client)"}"#;
    while sample(&text(exchange_metrics).await, queued) != Some(1.0) {
        assert!(Instant::now() < deadline, "no queue depth after 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let addrs = [exchange_metrics, launcher.metrics_addr().unwrap(), worker_metrics];
    let mut all = String::new();
    for addr in addrs {
        all += &text(addr).await;
    }
    let _ = worker.kill();
    let _ = worker.wait();

    // What happened is counted.
    let actions = |action: &str, outcome: &str| {
        let series = format!(
            r#"academy_actions_total{{behaviour="example.WordStats",action="{action}",outcome="{outcome}"}}"#
        );
        sample(&all, &series)
    };
    assert_eq!(actions("analyse", "ok"), Some(1.0), "{all}");
    assert_eq!(actions("analyse", "Unknown"), Some(1.0), "{all}");
    assert_eq!(
        actions("unknown", "Unimplemented"),
        Some(1.0),
        "a stranger's action name is no series"
    );
    assert!(sample(&all, "academy_launcher_placements_total").is_some_and(|n| n >= 1.0), "{all}");
    assert_eq!(sample(&all, "academy_exchange_blob_bytes_put_total"), Some(3.0), "{all}");
    assert_eq!(sample(&all, "academy_exchange_blob_bytes_read_total"), Some(6.0), "{all}");
    let version = env!("CARGO_PKG_VERSION");
    for service in ["academy-exchange", "academy-launcher", "academy-worker"] {
        let build = format!(r#"academy_build_info{{service="{service}",version="{version}"}}"#);
        assert_eq!(sample(&all, &build), Some(1.0), "{build} in {all}");
    }
    assert!(sample(&all, "process_resident_memory_bytes").is_some_and(|b| b > 1e6), "{all}");

    // The table lists exactly what is served (histograms by their name).
    let served = samples(&all);
    let family = |name: &str| {
        ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name)
            .to_owned()
    };
    let served_families: BTreeSet<String> = served.iter().map(|s| family(s)).collect();
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operating.md"))
            .unwrap();
    let documented: BTreeSet<String> = docs
        .lines()
        .filter(|l| l.starts_with("| `academy_") || l.starts_with("| `process_"))
        .flat_map(|l| {
            // `a{x, y}`, `b` → a, b
            let cell = l.split('|').nth(1).unwrap();
            let mut bare = String::new();
            let mut depth = 0;
            for c in cell.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ if depth == 0 => bare.push(c),
                    _ => {}
                }
            }
            bare.split(',').map(|n| family(n.trim().trim_matches('`'))).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(documented, served_families, "docs/operating.md's table against what is served");

    // The dashboard charts only what is served.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/academy.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut charted = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("academy_") || w.starts_with("process_"));
            for name in names {
                assert!(
                    served.contains(name),
                    "{:?} charts {name}, which nothing serves",
                    panel["title"]
                );
                charted += 1;
            }
        }
    }
    assert!(charted >= 15, "only {charted} series charted");
    launcher.shutdown().await;
    exchange.shutdown().await;
}
