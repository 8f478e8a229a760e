//! A rolling update of the exchange on Redis, with real exchange processes:
//! two replicas (the caller on one, the agent on the other, so every call
//! crosses them), each in turn sent SIGTERM under load and replaced on its
//! address, as a Service sends new connections to the new pod. The replica
//! exits within its grace, its clients reconnect, and every call is answered
//! once, right (a caller retries what failed as retryable).

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use academy_examples::behaviours::WordStats;
use academy_sdk::Manager;
use academy_server::testing::{RedisServer, binary, free_port};

/// An `academy-exchange` process on `port`, on `redis`.
fn replica(port: u16, redis: &str) -> Child {
    let bin = binary("academy-exchange");
    Command::new(&bin)
        .env("ACADEMY_EXCHANGE_LISTEN", format!("127.0.0.1:{port}"))
        .env("ACADEMY_EXCHANGE_BACKEND", "redis")
        .env("ACADEMY_EXCHANGE_REDIS_URL", redis)
        .env("ACADEMY_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {} ({e}): build the workspace's binaries", bin.display())
        })
}

async fn until_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "no exchange on port {port} after 20 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_of_the_exchange_loses_no_call() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let ports = [free_port(), free_port()];
    let mut replicas: Vec<Child> = ports.iter().map(|p| replica(*p, &redis.url())).collect();
    for port in ports {
        until_listening(port).await;
    }
    let url = |i: usize| format!("http://127.0.0.1:{}", ports[i]);
    let agents = Manager::connect(&url(1)).await.unwrap();
    let callers = Manager::connect(&url(0)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(agents.launch(WordStats::default()).await.unwrap().id());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let handle = callers.handle::<WordStats>(*id).with_timeout(Duration::from_secs(20));
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut answered, mut retried, mut wrong) = (0u32, 0u32, Vec::new());
                let mut call = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    call += 1;
                    // Each call's text is its own: an answer to another
                    // call would count the wrong number of words.
                    let words = 1 + (call + n as u32) % 5;
                    let text = vec!["w"; words as usize].join(" ");
                    loop {
                        match handle.analyse(text.clone()).await {
                            Ok(report) if report.words == words as usize => answered += 1,
                            Ok(report) => {
                                wrong.push(format!("{words} words counted as {}", report.words))
                            }
                            Err(e) if e.is_retryable() => {
                                retried += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                            Err(e) => wrong.push(e.to_string()),
                        }
                        break;
                    }
                }
                (answered, retried, wrong)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for round in 0..4 {
        let i = round % 2;
        let sent =
            Command::new("kill").args(["-TERM", &replicas[i].id().to_string()]).status().unwrap();
        assert!(sent.success());
        let signalled = Instant::now();
        let status = loop {
            if let Some(status) = replicas[i].try_wait().unwrap() {
                break status;
            }
            // Its grace for open calls is 10 s; the pod's, 20 s.
            assert!(
                signalled.elapsed() < Duration::from_secs(12),
                "replica {i} still running 12 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(status.success(), "replica {i} exited with {status}");
        slowest = slowest.max(signalled.elapsed());
        replicas[i] = replica(ports[i], &redis.url());
        until_listening(ports[i]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (mut answered, mut retried, mut wrong) = (0, 0, Vec::new());
    for caller in load {
        let (a, r, w) = caller.await.unwrap();
        assert!(a > 0, "every agent answered");
        answered += a;
        retried += r;
        wrong.extend(w);
    }
    println!(
        "rolling update of 2 exchange replicas, 4 SIGTERMs (slowest exit {slowest:?}): {answered} calls answered, {retried} retried, {} lost or wrong",
        wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    for mut child in replicas {
        let _ = child.kill();
        let _ = child.wait();
    }
}
