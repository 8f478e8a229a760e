//! The CLI at fleet sizes that once broke it: `agents list` past 33,500
//! records (its answer outgrew 4 MiB) and `workers list` with a worker
//! holding 1,525 agents (every id in one table cell). Here 100,000 records,
//! 10,000 of them on one worker: a launcher restored from Redis (the test
//! writes the records there), and a worker that rejoins with 10,000 running.

use std::process::Command;
use std::time::Duration;

use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::{self, AgentState, launcher_service_client::LauncherServiceClient};
use academy_server::testing::RedisServer;
use futures::StreamExt as _;
use prost::Message as _;

const AGENTS: usize = 100_000;
const ON_ONE_WORKER: usize = 10_000;

fn cli(launcher: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_academy"))
        .env_remove("ACADEMY_TOKEN")
        .args(["--launcher", launcher])
        .args(args)
        .output()
        .expect("academy runs");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "academy {args:?} failed: {stderr}");
    stdout.into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_a_hundred_thousand_agents_and_a_worker_with_ten_thousand() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let (_, mut conn) =
        academy_server::redis::connect(&redis.url(), Duration::from_secs(5)).await.unwrap();
    let ids: Vec<String> =
        (0..AGENTS).map(|_| academy_proto::EntityId::new_agent().to_string()).collect();
    for chunk in ids.chunks(2_000) {
        let mut hset = redis::cmd("HSET");
        hset.arg("academy:launcher:agents");
        for id in chunk {
            let record = pb::AgentRecord {
                agent_id: id.clone(),
                behaviour: "test.Fake".into(),
                state: AgentState::Running.into(),
                epoch: 1,
                worker_id: "worker:gone".into(),
                reason: "a reason that is long ".repeat(20),
                ..Default::default()
            };
            hset.arg(id).arg(record.encode_to_vec());
        }
        let () = hset.query_async(&mut conn).await.unwrap();
    }
    let launcher = RunningLauncher::start(LauncherOptions {
        redis_url: Some(redis.url()),
        rejoin_grace: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = launcher.url();

    // A worker rejoins with the first 10,000, and keeps heartbeating.
    let (out, outbound) = tokio::sync::mpsc::unbounded_channel();
    let running = ids[..ON_ONE_WORKER]
        .iter()
        .map(|id| pb::AgentReport {
            agent_id: id.clone(),
            epoch: 1,
            state: AgentState::Running.into(),
            error: String::new(),
        })
        .collect();
    let register = pb::RegisterWorker {
        name: "big".into(),
        capacity: AGENTS as u32,
        behaviours: vec![pb::BehaviourSpec { name: "test.Fake".into(), ..Default::default() }],
        running,
        ..Default::default()
    };
    use pb::join_request::Body;
    out.send(pb::JoinRequest { body: Some(Body::Register(register)) }).unwrap();
    let mut rpc = LauncherServiceClient::connect(url.clone()).await.unwrap();
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound);
    let mut inbound = rpc.join(stream).await.unwrap().into_inner();
    inbound.next().await.unwrap().unwrap();
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let beat = pb::JoinRequest { body: Some(Body::Heartbeat(pb::Heartbeat {})) };
            if out.send(beat).is_err() {
                return;
            }
        }
    });
    let drain = tokio::spawn(async move { while inbound.next().await.is_some() {} });

    let run = |args: &'static [&'static str]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || cli(&url, args))
    };
    let table = run(&["agents", "list"]).await.unwrap();
    assert_eq!(table.lines().count(), AGENTS + 1, "a header and every agent");
    assert!(table.lines().all(|l| l.chars().count() < 250), "long reasons are cut");
    let running = run(&["--json", "agents", "list", "--state", "running"]).await.unwrap();
    assert_eq!(running.lines().count(), ON_ONE_WORKER);
    let workers = run(&["--json", "workers", "list"]).await.unwrap();
    let worker: serde_json::Value = serde_json::from_str(workers.trim()).unwrap();
    assert_eq!(worker["agents"], ON_ONE_WORKER);
    let table = run(&["workers", "list"]).await.unwrap();
    assert_eq!(table.lines().count(), 2, "{table}");
    let worker_id = worker["worker_id"].as_str().unwrap().to_owned();
    let on_worker = tokio::task::spawn_blocking({
        let url = launcher.url();
        move || cli(&url, &["--json", "agents", "list", "--worker", &worker_id])
    });
    assert_eq!(on_worker.await.unwrap().lines().count(), ON_ONE_WORKER);
    beats.abort();
    drain.abort();
}
