//! What only the Redis backend does: survive an exchange crash, serve the same
//! mailboxes from several replicas, expire idle mailboxes and gravestones.

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{agent_and_client, number, ping, subscribe};

use academy_exchange::{ExchangeOptions, MailboxStore, RedisOptions, RunningExchange};
use academy_proto::EntityId;
use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient, message::Body};
use academy_server::testing::{RedisServer, get};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

async fn connect(url: &str) -> ExchangeServiceClient<Channel> {
    for _ in 0..200 {
        if let Ok(rpc) = ExchangeServiceClient::connect(url.to_owned()).await {
            return rpc;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no exchange at {url}");
}

/// The real `academy-exchange` binary on `port`, with its mailboxes in Redis.
fn spawn_exchange(port: u16, redis: &RedisServer) -> Child {
    Command::new(env!("CARGO_BIN_EXE_academy-exchange"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--backend", "redis"])
        .args(["--redis-url", &redis.url()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("binary starts")
}

#[tokio::test]
async fn a_killed_exchange_loses_no_accepted_message_and_redelivers_no_acknowledged_one() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let mut exchange = spawn_exchange(port, &redis);
    let mut rpc = connect(&url).await;
    let (agent, client) = agent_and_client(&mut rpc, "t.A").await;

    const TOTAL: usize = 600;
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let sender = tokio::spawn({
        let (url, accepted) = (url.clone(), accepted.clone());
        let (client, agent) = (client.clone(), agent.clone());
        async move {
            let mut rpc = connect(&url).await;
            for n in 0..TOTAL {
                // Retry until accepted: a send that failed may or may not have
                // landed, which at-least-once allows.
                loop {
                    let sent =
                        rpc.send(pb::SendRequest { message: Some(ping(&client, &agent, n)) });
                    if sent.await.is_ok() {
                        accepted.lock().unwrap().insert(n);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if n % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    });

    // A subscriber that acknowledges what it gets and reconnects by itself.
    let deliveries: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();
    let acked_before_kill = Arc::new(Mutex::new(BTreeSet::new()));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let subscriber = tokio::spawn({
        let (url, agent) = (url.clone(), agent.clone());
        let (deliveries, acked_before_kill, killed) =
            (deliveries.clone(), acked_before_kill.clone(), killed.clone());
        async move {
            loop {
                let mut rpc = connect(&url).await;
                let subscribed = rpc.subscribe(pb::SubscribeRequest {
                    mailbox_id: agent.clone(),
                    ..Default::default()
                });
                let Ok(stream) = subscribed.await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let mut stream = stream.into_inner();
                while let Some(Ok(frame)) = stream.next().await {
                    let mut seqs = Vec::new();
                    let mut numbers = Vec::new();
                    for d in frame.deliveries {
                        let n = number(d.message.as_ref().unwrap());
                        *deliveries.lock().unwrap().entry(n).or_default() += 1;
                        seqs.push(d.seq);
                        numbers.push(n);
                    }
                    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs };
                    if rpc.acknowledge(ack).await.is_ok()
                        && !killed.load(std::sync::atomic::Ordering::SeqCst)
                    {
                        acked_before_kill.lock().unwrap().extend(numbers);
                    }
                    if deliveries.lock().unwrap().len() == TOTAL {
                        return;
                    }
                }
            }
        }
    });

    // Kill -9 while messages flow, then restart on the same address.
    while accepted.lock().unwrap().len() < TOTAL / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    exchange.kill().unwrap();
    exchange.wait().unwrap();
    let acked_then: BTreeSet<usize> = acked_before_kill.lock().unwrap().clone();
    let deliveries_then: HashMap<usize, usize> = deliveries.lock().unwrap().clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut exchange = spawn_exchange(port, &redis);

    tokio::time::timeout(Duration::from_secs(30), sender).await.expect("sender done").unwrap();
    tokio::time::timeout(Duration::from_secs(30), subscriber)
        .await
        .expect("all delivered")
        .unwrap();
    exchange.kill().unwrap();
    exchange.wait().unwrap();

    let accepted = accepted.lock().unwrap().clone();
    let deliveries = deliveries.lock().unwrap().clone();
    assert_eq!(accepted.len(), TOTAL);
    let lost: Vec<_> = accepted.iter().filter(|n| !deliveries.contains_key(n)).collect();
    assert!(lost.is_empty(), "accepted but never delivered: {lost:?}");
    assert!(!acked_then.is_empty(), "the kill came after some acknowledgements");
    let again: Vec<_> =
        acked_then.iter().filter(|n| deliveries[*n] > deliveries_then[*n]).collect();
    assert!(again.is_empty(), "acknowledged before the kill, delivered again: {again:?}");
}

async fn replica(redis: &RedisServer) -> (RunningExchange, ExchangeServiceClient<Channel>) {
    replica_at(redis.url()).await
}

/// A replica reaching Redis at `url`.
async fn replica_at(url: String) -> (RunningExchange, ExchangeServiceClient<Channel>) {
    let backend = MailboxStore::Redis(RedisOptions { url, ..Default::default() });
    let server = RunningExchange::start(ExchangeOptions { store: backend, ..Default::default() })
        .await
        .unwrap();
    let rpc = connect(&server.url()).await;
    (server, rpc)
}

/// B reaches Redis over its Unix-domain socket (a Redis beside the
/// exchange), A over TCP: the same mailboxes either way.
#[tokio::test]
async fn replicas_on_one_redis_serve_the_same_mailboxes() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let (_a, mut on_a) = replica(&redis).await;
    let (_b, mut on_b) = replica_at(redis.unix_url()).await;

    let (agent, client) = agent_and_client(&mut on_a, "t.Sensor").await;

    let found = on_b
        .discover(pb::DiscoverRequest {
            behaviour: "t.Sensor".into(),
            exact: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(found.len(), 1, "B sees what A registered");

    // Subscribed on B, sent through A: pushed across replicas.
    let mut stream = subscribe(&mut on_b, &agent).await;
    let status = on_a.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert!(status.into_inner().subscribed, "A sees B's subscriber");
    for n in 0..20 {
        on_a.send(pb::SendRequest { message: Some(ping(&client, &agent, n)) }).await.unwrap();
    }
    let mut received = Vec::new();
    while received.len() < 20 {
        let frame = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        let frame = frame.expect("pushed within 5 s").unwrap().unwrap();
        received.extend(frame.deliveries.iter().map(|d| number(d.message.as_ref().unwrap())));
    }
    assert_eq!(received, (0..20).collect::<Vec<_>>(), "in order");
    let clients = redis.command(&["CLIENT", "LIST"]).unwrap();
    let on_socket = format!(" addr={}:0 ", redis.socket().display());
    let unix = clients.lines().filter(|l| l.contains(&on_socket)).count();
    assert!(unix >= 2, "B's connections (calls, notices) are on the socket: {clients}");

    // A subscriber on A takes the mailbox over from the one on B.
    let _taken = subscribe(&mut on_a, &agent).await;
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap();
    assert_eq!(end.unwrap().unwrap_err().code(), tonic::Code::Aborted);

    // Terminating through B answers a request queued through A.
    let mut replies = subscribe(&mut on_a, &client).await;
    on_b.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 20 {
        let frame = tokio::time::timeout(Duration::from_secs(5), replies.next()).await;
        answers.extend(frame.expect("answers within 5 s").unwrap().unwrap().deliveries);
    }
    assert_eq!(answers.len(), 20, "every queued request answered, once");
    assert!(
        answers
            .iter()
            .all(|d| matches!(d.message.as_ref().unwrap().body, Some(Body::ErrorResponse(_))))
    );
}

/// Schema 2 kept terminated mailboxes as hashes and had no `P:idle`: an
/// exchange of schema 3 turns each terminated agent's into a gravestone,
/// drops terminated clients', and marks idle clients, before it serves.
#[tokio::test]
async fn a_schema_2_store_is_upgraded_to_gravestones_and_idle_clients() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let (agent, client, idle) =
        (EntityId::new_agent(), EntityId::new_client(), EntityId::new_client());
    let hash = |id: &EntityId| format!("academy:mb:{id}");
    let set = |args: &[&str]| redis.command(args).unwrap();
    set(&["SET", "academy:schema", "2"]);
    set(&["HSET", &hash(&agent), "s", "t", "k", "a", "b", "t.Gone", "o", "alice"]);
    set(&["HSET", &hash(&client), "s", "t", "k", "c"]);
    set(&["HSET", &hash(&idle), "s", "a", "k", "c", "g", "0", "qb", "0"]);
    let (_server, mut rpc) = replica(&redis).await;
    assert_eq!(set(&["GET", "academy:schema"]), "4");
    assert_eq!(set(&["EXISTS", &hash(&agent), &hash(&client)]), ":0");
    let state = |id: &EntityId| pb::StatusRequest { mailbox_id: id.to_string() };
    let status = rpc.status(state(&agent)).await.unwrap().into_inner();
    assert_eq!(status.state(), pb::MailboxState::Terminated, "the gravestone was laid anew");
    let again = pb::RegisterAgentRequest {
        behaviour: "t.Gone".into(),
        agent_id: agent.to_string(),
        ..Default::default()
    };
    let err = rpc.register_agent(again).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let status = rpc.status(state(&client)).await.unwrap().into_inner();
    assert_eq!(status.state(), pb::MailboxState::Missing, "a client leaves no gravestone");
    let score = set(&["ZSCORE", "academy:idle", &idle.to_string()]);
    assert!(score.parse::<u64>().is_ok(), "idle client marked: {score}");
    let status = rpc.status(state(&idle)).await.unwrap().into_inner();
    assert_eq!(status.state(), pb::MailboxState::Active);
}

#[tokio::test]
async fn scripts_lost_by_redis_are_loaded_again() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let (_server, mut rpc) = replica(&redis).await;
    let (agent, client) = agent_and_client(&mut rpc, "t.A").await;
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).unwrap(), "+OK");
    // Every scripted operation still works, and does its work once.
    agent_and_client(&mut rpc, "t.A").await;
    let batch =
        pb::SendBatchRequest { messages: (0..3).map(|n| ping(&client, &agent, n)).collect() };
    let results = rpc.send_batch(batch).await.unwrap().into_inner().results;
    assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    let status = rpc.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(status.into_inner().queued, 3);
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).unwrap(), "+OK");
    let mut stream = subscribe(&mut rpc, &agent).await;
    let got = stream.next().await.unwrap().unwrap().deliveries;
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).unwrap(), "+OK");
    let seqs = got.iter().map(|d| d.seq).collect();
    rpc.acknowledge(pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs }).await.unwrap();
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]).unwrap(), "+OK");
    rpc.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    // The queue, and the drain it became to answer what was left, are gone.
    let (queue, drain) = (format!("academy:q:{agent}"), format!("academy:dq:{agent}"));
    assert_eq!(redis.command(&["EXISTS", &queue, &drain]).unwrap(), ":0");
    let status = rpc.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap().into_inner();
    assert_eq!(status.state(), pb::MailboxState::Terminated);
}

/// Notices can be lost (a dropped connection, a full output buffer). Here
/// they go astray: the mailbox is made to point at another replica. Once its
/// notice connection drops and comes back, the replica reads every mailbox it
/// serves and finds what it missed: messages, and a termination. Large
/// messages, read from the stream rather than carried in the notice, keep
/// their place among small ones.
#[tokio::test]
async fn subscribers_find_what_they_missed_when_notices_are_lost() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let (_server, mut rpc) = replica(&redis).await;
    let (agent, client) = agent_and_client(&mut rpc, "t.A").await;
    let mut stream = subscribe(&mut rpc, &agent).await;
    let message = |n: usize| {
        let mut message = ping(&client, &agent, n);
        if n % 4 == 3 {
            let data = vec![b'x'; 200 * 1024].into();
            let args =
                pb::Payload { content_type: "application/json".into(), data, ..Default::default() };
            message.body = Some(Body::ActionRequest(pb::ActionRequest {
                action: "pad".into(),
                args: Some(args),
            }));
        }
        message
    };
    let mailbox_key = format!("academy:mb:{agent}");
    let astray = || redis.command(&["HSET", &mailbox_key, "r", "elsewhere"]).unwrap();
    let reconnect = || {
        assert_eq!(redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap(), ":1");
    };
    let mut received = Vec::new();
    for n in 0..10 {
        rpc.send(pb::SendRequest { message: Some(message(n)) }).await.unwrap();
    }
    while received.len() < 10 {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let frame = frame.expect("delivered within 10 s").unwrap().unwrap();
        received.extend(frame.deliveries.iter().map(|d| number(d.message.as_ref().unwrap())));
    }
    assert_eq!(received, (0..10).collect::<Vec<_>>());

    astray();
    for n in 10..20 {
        rpc.send(pb::SendRequest { message: Some(message(n)) }).await.unwrap();
    }
    let early = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(early.is_err(), "no notice, no delivery: {early:?}");
    reconnect();
    while received.len() < 20 {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let frame = frame.expect("found within 10 s of reconnecting").unwrap().unwrap();
        received.extend(frame.deliveries.iter().map(|d| number(d.message.as_ref().unwrap())));
    }
    assert_eq!(received, (0..20).collect::<Vec<_>>(), "all, in order, once");

    astray();
    rpc.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    reconnect();
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap();
    assert_eq!(end.unwrap().unwrap_err().code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_replica_that_cannot_listen_for_notices_refuses_to_start() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    // Redis answers SUBSCRIBE with an error; a replica that went on would
    // never hear of new messages for its subscribers.
    assert_eq!(redis.command(&["ACL", "SETUSER", "default", "-subscribe"]).unwrap(), "+OK");
    let backend = MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() });
    let err = RunningExchange::start(ExchangeOptions { store: backend, ..Default::default() })
        .await
        .err();
    let err = err.expect("the exchange must not start deaf").to_string();
    assert!(err.contains("cannot listen on Redis channel") && err.contains("NoPerm"), "{err}");
}

#[test]
fn a_redis_password_never_shows_in_logs_or_errors() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    assert_eq!(redis.command(&["CONFIG", "SET", "requirepass", "hunter2"]).unwrap(), "+OK");
    let with_password = |password: &str| {
        let url = redis.url().replacen("redis://", &format!("redis://:{password}@"), 1);
        Command::new(env!("CARGO_BIN_EXE_academy-exchange"))
            .args(["--listen", "127.0.0.1:0", "--backend", "redis", "--log-format", "json"])
            .env("ACADEMY_EXCHANGE_REDIS_URL", url)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stderr(Stdio::piped())
            .spawn()
            .expect("binary starts")
    };
    // The wrong password: the exchange exits and says why, with the URL masked.
    let out = with_password("not-it").wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot reach Redis at redis://:***@"), "{stderr}");
    assert!(!stderr.contains("not-it"), "{stderr}");
    // The right one: it starts, and its log names Redis without the password.
    let mut child = with_password("hunter2");
    let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut seen = Vec::new();
    for line in lines {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("exchange listening") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = seen.join("\n");
    assert!(log.contains("using Redis for mailboxes") && log.contains(":***@"), "{log}");
    assert!(!log.contains("hunter2"), "{log}");
}

#[tokio::test]
async fn subscribers_ride_out_a_redis_restart() {
    let mut redis = RedisServer::start().expect("redis-server must run for this test");
    let (_server, mut rpc) = replica(&redis).await;
    let (agent, client) = agent_and_client(&mut rpc, "t.Patient").await;
    let mut stream = subscribe(&mut rpc, &agent).await;
    rpc.send(pb::SendRequest { message: Some(ping(&client, &agent, 0)) }).await.unwrap();
    assert_eq!(numbers(&mut stream).await, [0]);

    redis.restart().unwrap();
    // Until the exchange has reconnected, a send fails as retryable, never
    // otherwise; then it is accepted and pushed to the same subscription.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rpc.send(pb::SendRequest { message: Some(ping(&client, &agent, 1)) }).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    std::time::Instant::now() < deadline,
                    "Redis still unreachable: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let after = numbers(&mut stream).await;
    assert_eq!(after, [1], "the new message, and not the one delivered before");
    let status = rpc.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap().into_inner();
    assert_eq!(status.queued, 2, "both kept until acknowledged, across the restart");
}

/// The numbers of the next frame's messages, pushed within 10 s.
async fn numbers(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> Vec<usize> {
    let frame = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let frame = frame.expect("pushed within 10 s").unwrap().unwrap();
    frame.deliveries.iter().map(|d| number(d.message.as_ref().unwrap())).collect()
}

#[tokio::test]
async fn an_earlier_versions_discovery_index_is_taken_over_at_start() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let redis_ok = |args: &[&str]| {
        let answer = redis.command(args).unwrap();
        assert!(!answer.starts_with('-'), "{args:?}: {answer}");
        answer
    };
    // Agents as exchanges before 2026-12 left them: a hash each, listed in
    // sets; one of them terminated since (still listed, as after a crash).
    let ids: Vec<String> = (0..6).map(|_| EntityId::new_agent().to_string()).collect();
    for (n, id) in ids.iter().enumerate() {
        let behaviour = if n % 2 == 0 { "old.Even" } else { "old.Odd" };
        let state = if n == 5 { "t" } else { "a" };
        let mailbox = format!("academy:mb:{id}");
        let fields = ["s", state, "k", "a", "b", behaviour, "i", r#"["old.Any"]"#, "n", ""];
        redis_ok(&[&["HSET", mailbox.as_str()][..], &fields[..]].concat());
        for set in ["ix:", &format!("ix:{behaviour}"), &format!("ox:{behaviour}"), "ix:old.Any"] {
            redis_ok(&["SADD", &format!("academy:{set}"), id]);
        }
    }

    let (_server, mut rpc) = replica(&redis).await;
    let mut lookup = rpc.clone();
    let mut discover = async |name: &str, exact: bool, page_size: u32| {
        let (mut found, mut page_token) = (Vec::new(), String::new());
        loop {
            let req = pb::DiscoverRequest {
                behaviour: name.into(),
                exact,
                page_size,
                page_token,
                ..Default::default()
            };
            let page = lookup.discover(req).await.unwrap().into_inner();
            found.extend(page.agents.into_iter().map(|a| a.agent_id));
            if page.next_page_token.is_empty() {
                return found;
            }
            page_token = page.next_page_token;
        }
    };
    let active = &ids[..5];
    assert_eq!(discover("old.Any", false, 0).await, active);
    assert_eq!(discover("old.Any", false, 2).await, active, "paged, in id order");
    assert_eq!(discover("", false, 3).await, active);
    assert_eq!(discover("old.Even", true, 0).await, [ids[0].as_str(), &ids[2], &ids[4]]);
    assert_eq!(discover("old.Odd", false, 1).await, [ids[1].as_str(), &ids[3]]);
    for old in ["academy:ix:", "academy:ix:old.Any", "academy:ox:old.Even", "academy:ix:old.Odd"] {
        assert_eq!(redis_ok(&["EXISTS", old]), ":0", "{old} deleted");
    }

    // The agents moved are indexed as any other: terminating one unlists it.
    rpc.terminate(pb::TerminateRequest { mailbox_id: ids[0].clone() }).await.unwrap();
    assert_eq!(discover("old.Any", false, 0).await, &ids[1..5]);
    assert_eq!(discover("old.Even", true, 0).await, [ids[2].as_str(), &ids[4]]);
}

/// A replica that stops (or dies) no longer counts: its subscribers are not
/// subscribed, and the endpoints they advertised are not shown.
#[tokio::test]
async fn a_replica_that_stops_withdraws_its_presence_and_its_subscribers() {
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let replicas = || redis.command(&["KEYS", "academy:replica:*"]).unwrap();
    let (server, mut rpc) = replica(&redis).await;
    let (agent, _) = agent_and_client(&mut rpc, "t.Present").await;
    let endpoint = "http://127.0.0.1:9".to_owned();
    let request =
        pb::SubscribeRequest { mailbox_id: agent.clone(), endpoint, ..Default::default() };
    let _stream = rpc.subscribe(request).await.unwrap();
    assert_eq!(replicas(), "*1", "a running replica is present");
    let discover = async |rpc: &mut ExchangeServiceClient<Channel>| {
        let request = pb::DiscoverRequest {
            behaviour: "t.Present".into(),
            exact: true,
            ..Default::default()
        };
        let found = rpc.discover(request).await.unwrap().into_inner().agents;
        found.into_iter().map(|a| a.endpoint).collect::<Vec<_>>()
    };
    assert_eq!(discover(&mut rpc).await, ["http://127.0.0.1:9"]);
    // What a replica that died leaves behind: the hash still names it, but
    // its presence has expired. Neither Status nor discovery shows the
    // endpoint then.
    let hash = format!("academy:mb:{agent}");
    let mine = redis.command(&["HGET", &hash, "r"]).unwrap();
    assert_eq!(redis.command(&["HSET", &hash, "r", "a-replica-that-died"]).unwrap(), ":0");
    let status = rpc.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert!(status.get_ref().endpoint.is_empty(), "{status:?}");
    assert_eq!(discover(&mut rpc).await, [""]);
    assert_eq!(redis.command(&["HSET", &hash, "r", &mine]).unwrap(), ":0");
    assert_eq!(discover(&mut rpc).await, ["http://127.0.0.1:9"]);

    // Stopped (its stream still open on this side): no longer present, so
    // another replica reports the mailbox without a subscriber at once.
    drop(server);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while replicas() != "*0" {
        assert!(tokio::time::Instant::now() < deadline, "presence never withdrawn");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_other, mut on_other) = replica(&redis).await;
    let status =
        on_other.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap().into_inner();
    assert!(!status.subscribed && status.endpoint.is_empty(), "{status:?}");
    // Nor does discovery show the endpoint its subscriber advertised.
    assert_eq!(discover(&mut on_other).await, [""]);
}

#[tokio::test]
async fn a_store_written_by_a_newer_exchange_is_refused_and_an_older_one_is_upgraded() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let store = || MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() });
    // A fresh store gets this version's schema.
    let first = RunningExchange::start(ExchangeOptions { store: store(), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(redis.command(&["GET", "academy:schema"]).unwrap(), "4");
    first.shutdown().await;
    redis.command(&["SET", "academy:schema", "99"]).unwrap();
    let err = RunningExchange::start(ExchangeOptions { store: store(), ..Default::default() })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("schema 99, written by a newer exchange"), "{err}");
    assert_eq!(redis.command(&["GET", "academy:schema"]).unwrap(), "99", "left as it was");
}

/// A schema-3 store has no queue depth: the upgrade counts it from the
/// mailboxes, and from then the scripts keep it.
#[tokio::test]
async fn a_schema_3_store_gets_its_queue_depth_counted() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let (first, mut rpc) = replica(&redis).await;
    let (agent, client) = agent_and_client(&mut rpc, "test.Deep").await;
    for i in 0..4 {
        rpc.send(pb::SendRequest { message: Some(ping(&client, &agent, i)) }).await.unwrap();
    }
    let depth = |exchange: &RunningExchange| {
        let exchange = exchange.exchange().clone();
        async move {
            let all = exchange.queued().await.unwrap();
            all.into_iter().find(|d| d.behaviour == "test.Deep").map(|d| (d.messages, d.bytes))
        }
    };
    let kept = depth(&first).await.unwrap();
    assert_eq!(kept.0, 4);
    first.shutdown().await;
    // As a schema-3 exchange left it.
    redis.command(&["DEL", "academy:depth"]).unwrap();
    redis.command(&["SET", "academy:schema", "3"]).unwrap();
    let (second, mut rpc) = replica(&redis).await;
    assert_eq!(redis.command(&["GET", "academy:schema"]).unwrap(), "4");
    assert_eq!(depth(&second).await, Some(kept), "counted again from the mailboxes");
    let mut stream = subscribe(&mut rpc, &agent).await;
    let first_seq = stream.next().await.unwrap().unwrap().deliveries[0].seq;
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![first_seq] };
    rpc.acknowledge(ack).await.unwrap();
    assert_eq!(depth(&second).await.map(|d| d.0), Some(3), "and kept from then");
}

/// An agent's saved state lives in one hash, which goes with the mailbox.
#[tokio::test]
async fn a_saved_state_is_deleted_with_its_mailbox() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let (_server, mut rpc) = replica(&redis).await;
    let (agent, _) = agent_and_client(&mut rpc, "test.Saver").await;
    let data = pb::Payload {
        content_type: "application/json".into(),
        data: b"[1]".to_vec().into(),
        ..Default::default()
    };
    let save =
        pb::SaveStateRequest { agent_id: agent.clone(), data: Some(data), ..Default::default() };
    rpc.save_state(save).await.unwrap();
    let key = format!("academy:st:{agent}");
    assert_eq!(redis.command(&["HGET", &key, "d"]).unwrap(), "[1]");
    rpc.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(redis.command(&["EXISTS", &key]).unwrap(), ":0");
}

/// A Redis that stops answering (frozen) or goes away (killed): calls fail
/// with UNAVAILABLE within the configured wait, well inside a caller's 3 s
/// deadline, and the exchange's health says NOT_SERVING until Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_calls_fast_and_turns_health_not_serving() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut redis = RedisServer::start().expect("redis-server must run for these tests");
    let options = RedisOptions {
        url: redis.url(),
        timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let store = MailboxStore::Redis(options);
    let metrics_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let server =
        RunningExchange::start(ExchangeOptions { store, metrics_listen, ..Default::default() })
            .await
            .unwrap();
    let probes = server.metrics_addr().unwrap();
    let mut rpc = connect(&server.url()).await;
    let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    // gRPC health and the HTTP readiness probe agree; liveness stays up.
    let serving = async |health: &mut HealthClient<Channel>| {
        let check = HealthCheckRequest { service: "academy.v1.ExchangeService".into() };
        let grpc = health.check(check).await.unwrap().into_inner().status == 1;
        let probe = |path| async move {
            let (status, _) =
                tokio::task::spawn_blocking(move || get(probes, path)).await.unwrap().unwrap();
            status
        };
        let (ready, live) = (probe("/readyz").await, probe("/livez").await);
        assert!(live.ends_with("200 OK"), "{live}");
        if ready.ends_with("200 OK") == grpc { Some(grpc) } else { None }
    };
    let until = async |health: &mut HealthClient<Channel>, up: bool| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while serving(health).await != Some(up) {
            assert!(tokio::time::Instant::now() < deadline, "health never turned {up}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let client = client.into_inner().client_id;
    let status = async |rpc: &mut ExchangeServiceClient<Channel>| {
        let mut request = tonic::Request::new(pb::StatusRequest { mailbox_id: client.clone() });
        request.set_timeout(Duration::from_secs(3));
        let started = std::time::Instant::now();
        (rpc.status(request).await, started.elapsed())
    };
    assert_eq!(serving(&mut health).await, Some(true));

    let pid = redis.pid().to_string();
    let signal = |name: &str| {
        let ok = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(ok.success());
    };
    for outage in ["frozen", "killed"] {
        match outage {
            "frozen" => signal("-STOP"),
            _ => {
                redis.stop().unwrap();
            }
        }
        let (answer, took) = status(&mut rpc).await;
        let err = answer.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{outage}: {err:?}");
        assert!(err.message().contains("Redis"), "{outage}: {}", err.message());
        assert!(took < Duration::from_millis(2500), "{outage}: failed after {took:?}");
        until(&mut health, false).await;
        match outage {
            "frozen" => signal("-CONT"),
            _ => redis.start_again().unwrap(),
        }
        until(&mut health, true).await;
        let (answer, _) = status(&mut rpc).await;
        answer.unwrap_or_else(|e| panic!("after the {outage} Redis came back: {e:?}"));
    }
}

/// A ticket lasts no longer than the token it was issued to, even when the
/// replica that issued it is gone by the time the token is revoked: any
/// replica that checks it reads the token's fingerprint from Redis and
/// looks for it in the tokens it uses.
#[tokio::test]
async fn a_ticket_goes_with_its_revoked_token_whichever_replica_issued_it() {
    use academy_server::auth::Tokens;
    const ALICE: &str = "alice-token-0123456789";
    const BOB: &str = "bob-token-0123456789";
    let redis = RedisServer::start().expect("redis-server must run for this test");
    let start = async |tokens: &str| {
        let store = MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() });
        let tokens = Some(Tokens::parse(tokens).unwrap());
        RunningExchange::start(ExchangeOptions { store, tokens, ..Default::default() })
            .await
            .unwrap()
    };
    let as_ = async |server: &RunningExchange, token: &'static str| {
        let channel = Channel::from_shared(server.url()).unwrap().connect().await.unwrap();
        ExchangeServiceClient::with_interceptor(channel, common::Bearer(token))
    };
    let issuer = start(&format!("alice {ALICE}\nbob {BOB}\n")).await;
    let mut tickets = Vec::new();
    for token in [ALICE, BOB] {
        let mut rpc = as_(&issuer, token).await;
        let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
        let mailbox_id = client.into_inner().client_id;
        let issued = rpc.issue_ticket(pb::IssueTicketRequest { mailbox_id }).await.unwrap();
        tickets.push(issued.into_inner().ticket);
    }
    drop(issuer);

    // Alice's token is revoked while no replica that issued a ticket runs.
    let checker = start(&format!("bob {BOB}\n")).await;
    let mut bob = as_(&checker, BOB).await;
    let check = |ticket: &str| pb::CheckTicketRequest { ticket: ticket.to_owned() };
    let refused = bob.check_ticket(check(&tickets[0])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    bob.check_ticket(check(&tickets[1])).await.expect("bob's ticket holds");
}
