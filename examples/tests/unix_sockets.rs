//! Everything on one node over Unix-domain sockets (`unix:/path` wherever
//! an address is taken): the exchange and the launcher listen on sockets,
//! a worker process and the CLI reach them there, and a manager calls the
//! agent the worker runs.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use academy_examples::behaviours::WordStats;
use academy_exchange::{Address, ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_sdk::Manager;
use academy_server::testing::{Children, binary};

/// A fresh directory for sockets (paths must stay short: at most 107 bytes).
fn socket_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("academy-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_on_unix_sockets() {
    let dir = socket_dir();
    let (exchange_sock, launcher_sock) = (dir.join("exchange.sock"), dir.join("launcher.sock"));
    // A socket file left by a process that died is taken over.
    drop(std::os::unix::net::UnixListener::bind(&exchange_sock).unwrap());
    assert!(exchange_sock.exists());
    let options =
        ExchangeOptions { listen: Address::Unix(exchange_sock.clone()), ..Default::default() };
    let exchange = RunningExchange::start(options).await.unwrap();
    assert_eq!(exchange.url(), format!("unix:{}", exchange_sock.display()));

    // A second server on a live socket is refused; TLS on a socket too.
    let again =
        ExchangeOptions { listen: Address::Unix(exchange_sock.clone()), ..Default::default() };
    let refused = RunningExchange::start(again).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::AddrInUse, "{refused}");
    let pki = academy_server::testing::TestPki::new("academy test CA");
    let tls = ExchangeOptions {
        listen: Address::Unix(dir.join("tls.sock")),
        tls: Some(pki.server_tls(false)),
        ..Default::default()
    };
    let refused = RunningExchange::start(tls).await.unwrap_err();
    assert!(refused.to_string().contains("Unix socket"), "{refused}");

    let launcher = RunningLauncher::start(LauncherOptions {
        listen: Address::Unix(launcher_sock.clone()),
        exchange_url: exchange.url(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut children = Children::default();
    children.0.push(
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["--launcher", &launcher.url(), "--name", "local"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The CLI, like every client, takes unix: URLs.
    let academy = |args: &[&str]| {
        let out = Command::new(binary("academy"))
            .args(["--exchange", &exchange.url(), "--launcher", &launcher.url(), "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !academy(&["workers", "list"]).contains("\"local\"") {
        assert!(Instant::now() < deadline, "the worker never joined over the socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let launched: serde_json::Value =
        serde_json::from_str(academy(&["agents", "launch", "example.WordStats"]).trim()).unwrap();
    let id = launched["agent_id"].as_str().unwrap().to_owned();

    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let stats =
        manager.handle::<WordStats>(id.parse().unwrap()).with_timeout(Duration::from_secs(20));
    assert_eq!(stats.analyse("over a unix socket".into()).await.unwrap().words, 4);
    assert!(academy(&["status", &id]).contains("active"));
    manager.close().await.unwrap();
    drop(children);
    launcher.shutdown().await;
    exchange.shutdown().await;
    // The servers take their socket files with them.
    assert!(!exchange_sock.exists() && !launcher_sock.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
