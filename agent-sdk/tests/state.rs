//! The state the runtime keeps for an agent (docs/design.md, "State"), over
//! gRPC against a real exchange-server: restored after a restart, versioned
//! and migrated, fenced from an earlier incarnation, saved by loops too.

use std::sync::Mutex;
use std::time::Duration;

use academy_exchange::{ExchangeOptions, MailboxStore, RedisOptions, RunningExchange};
use academy_proto::pb;
use academy_sdk::{AgentConfig, AgentError, LaunchOptions, MailboxPolicy, Manager, behaviour};
use academy_server::testing::RedisServer;
use serde::{Deserialize, Serialize};

const WAIT: Option<Duration> = Some(Duration::from_secs(10));

#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct Tally {
    count: u64,
}

#[derive(Debug, Default)]
struct Counter {
    tally: Mutex<Tally>,
}

#[behaviour(name = "test.Counter")]
impl Counter {
    #[state]
    fn tally(&self) -> &Mutex<Tally> {
        &self.tally
    }

    #[action]
    async fn add(&self, n: u64) -> u64 {
        let mut tally = self.tally.lock().unwrap();
        tally.count += n;
        tally.count
    }
}

/// Version 2 of the same state: counts in `total`, with a note.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TallyV2 {
    total: u64,
    note: String,
}

#[derive(Debug, Default)]
struct CounterV2 {
    tally: Mutex<TallyV2>,
}

#[behaviour(name = "test.Counter", state_version = 2)]
impl CounterV2 {
    #[state]
    fn tally(&self) -> &Mutex<TallyV2> {
        &self.tally
    }

    #[migrate_state]
    fn from_v1(from: u32, value: serde_json::Value) -> Result<serde_json::Value, String> {
        match from {
            1 => Ok(serde_json::json!({ "total": value["count"], "note": "migrated from 1" })),
            other => Err(format!("no way from version {other}")),
        }
    }

    #[action]
    async fn total(&self) -> (u64, String) {
        let tally = self.tally.lock().unwrap();
        (tally.total, tally.note.clone())
    }
}

/// Version 3, which cannot read version 1.
#[derive(Debug, Default)]
struct CounterV3 {
    tally: Mutex<Tally>,
}

#[behaviour(name = "test.Counter", state_version = 3)]
impl CounterV3 {
    #[state]
    fn tally(&self) -> &Mutex<Tally> {
        &self.tally
    }
}

fn keep_mailbox() -> AgentConfig {
    AgentConfig { terminate_on_success: false, terminate_on_error: false, ..AgentConfig::default() }
}

async fn check_restarts_and_versions(server: &RunningExchange) {
    let manager = Manager::connect(&server.url()).await.unwrap();
    let options = LaunchOptions { config: keep_mailbox(), ..LaunchOptions::default() };
    let counter = manager.launch_with(Counter::default(), options).await.unwrap();
    let id = counter.id();
    for n in 1..=3 {
        counter.add(n).await.unwrap();
    }
    manager.shutdown(id, MailboxPolicy::Keep, WAIT).await.unwrap();

    // A new incarnation on the same mailbox starts from what was saved.
    let again =
        LaunchOptions { config: keep_mailbox(), agent_id: Some(id), ..LaunchOptions::default() };
    let counter = manager.launch_with(Counter::default(), again.clone()).await.unwrap();
    assert_eq!(counter.add(10).await.unwrap(), 16, "1 + 2 + 3 restored, then 10");
    manager.shutdown(id, MailboxPolicy::Keep, WAIT).await.unwrap();
    let saved = manager.exchange().load_state(&id).await.unwrap().unwrap();
    assert_eq!(
        (saved.version, saved.data.unwrap().data.as_ref()),
        (1, br#"{"count":16}"#.as_ref())
    );

    // Version 2 migrates it; version 3 cannot, and says why.
    let v2 = manager.launch_with(CounterV2::default(), again.clone()).await.unwrap();
    assert_eq!(v2.total().await.unwrap(), (16, "migrated from 1".to_owned()));
    manager.shutdown(id, MailboxPolicy::Keep, WAIT).await.unwrap();
    assert_eq!(manager.exchange().load_state(&id).await.unwrap().unwrap().version, 2);
    manager.launch_with(CounterV3::default(), again).await.unwrap();
    let failed = manager.wait(id, WAIT).await.unwrap_err().to_string();
    assert!(failed.contains("version 2") && failed.contains("#[migrate_state]"), "{failed}");
    manager.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_migrates_in_memory() {
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    check_restarts_and_versions(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_migrates_on_redis() {
    let redis = RedisServer::start().expect("redis-server must run for these tests");
    let store = MailboxStore::Redis(RedisOptions { url: redis.url(), ..Default::default() });
    let server =
        RunningExchange::start(ExchangeOptions { store, ..Default::default() }).await.unwrap();
    check_restarts_and_versions(&server).await;
}

/// A later incarnation saved: the earlier one may not save over it, stops,
/// leaves the mailbox alone, and does not answer the request it ran (the
/// later incarnation gets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_incarnation_cannot_save_over_a_later_one() {
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let manager = Manager::connect(&server.url()).await.unwrap();
    let options = LaunchOptions { config: keep_mailbox(), ..LaunchOptions::default() };
    let counter = manager.launch_with(Counter::default(), options).await.unwrap();
    let id = counter.id();
    assert_eq!(counter.add(1).await.unwrap(), 1);
    // Incarnation 5 (say, placed elsewhere by a launcher) saves its state.
    let data = pb::Payload {
        content_type: "application/json".into(),
        data: br#"{"count":100}"#.to_vec().into(),
        ..Default::default()
    };
    manager.exchange().save_state(&id, 5, data, 1).await.unwrap();
    // The running incarnation (0) runs the request but may not save: it stops.
    let call = counter.with_timeout(Duration::from_millis(500)).add(1).await;
    assert!(call.is_err(), "an answer whose state was not saved: {call:?}");
    let stopped = manager.wait(id, WAIT).await.unwrap_err();
    assert!(
        matches!(stopped, academy_sdk::ManagerError::Agent(AgentError::MailboxLost { .. })),
        "{stopped:?}"
    );
    let saved = manager.exchange().load_state(&id).await.unwrap().unwrap();
    assert_eq!((saved.epoch, saved.data.unwrap().data.as_ref()), (5, br#"{"count":100}"#.as_ref()));
    assert_eq!(
        manager.exchange().status(&id).await.unwrap().state,
        academy_sdk::exchange::MailboxState::Active,
        "left to the later incarnation"
    );
}

#[derive(Debug, Default)]
struct Ticker {
    ticks: Mutex<Tally>,
}

#[behaviour(name = "test.Ticker")]
impl Ticker {
    #[state]
    fn ticks(&self) -> &Mutex<Tally> {
        &self.ticks
    }

    #[timer(every = Duration::from_millis(10))]
    async fn tick(&self) {
        self.ticks.lock().unwrap().count += 1;
    }
}

/// What a loop changes is saved while the agent runs, without any action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_loops_change_is_saved_as_the_agent_runs() {
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let manager = Manager::connect(&server.url()).await.unwrap();
    let config = AgentConfig { state_save_every: Duration::from_millis(20), ..keep_mailbox() };
    let ticker = manager
        .launch_with(Ticker::default(), LaunchOptions { config, ..LaunchOptions::default() })
        .await
        .unwrap();
    let id = ticker.id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(saved) = manager.exchange().load_state(&id).await.unwrap() {
            let tally: Tally = serde_json::from_slice(&saved.data.unwrap().data).unwrap();
            if tally.count >= 5 && saved.revision >= 2 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the ticks were not saved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    manager.close().await.unwrap();
}

/// A file store keeps the state on one node, across exchanges (a process
/// with an in-process exchange, restarted), fenced by incarnation too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_keeps_state_across_processes_on_one_node() {
    use academy_sdk::state::{FileStore, StateStore};
    use std::sync::Arc;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("states-{}", std::process::id()));
    let store: Arc<dyn StateStore> = Arc::new(FileStore::new(&dir).unwrap());
    let config = AgentConfig { state_store: Some(store.clone()), ..keep_mailbox() };

    let manager = Manager::in_process().await.unwrap();
    let options = LaunchOptions { config: config.clone(), ..LaunchOptions::default() };
    let counter = manager.launch_with(Counter::default(), options).await.unwrap();
    let id = counter.id();
    counter.add(5).await.unwrap();
    assert_eq!(counter.add(6).await.unwrap(), 11);
    manager.shutdown(id, MailboxPolicy::Keep, WAIT).await.unwrap();
    drop(manager);

    // Another exchange (the process restarted): the same folder.
    let manager = Manager::in_process().await.unwrap();
    manager.exchange().register_agent("test.Counter", &[], "", Some(id), None).await.unwrap();
    let options = LaunchOptions { config, agent_id: Some(id), ..LaunchOptions::default() };
    let counter = manager.launch_with(Counter::default(), options).await.unwrap();
    assert_eq!(counter.add(1).await.unwrap(), 12, "5 + 6 restored from the file, then 1");
    manager.shutdown(id, MailboxPolicy::Keep, WAIT).await.unwrap();
    let saved = store.load(&id).await.unwrap().unwrap();
    assert_eq!(saved.data.unwrap().data.as_ref(), br#"{"count":12}"#);

    // Fenced as in the exchange: after incarnation 9, incarnation 3 may not save.
    let data = || pb::Payload {
        content_type: "application/json".into(),
        data: b"{}".to_vec().into(),
        ..Default::default()
    };
    store.save(&id, 9, data(), 1).await.unwrap();
    let stale = store.save(&id, 3, data(), 1).await.unwrap_err();
    assert!(
        matches!(
            stale,
            academy_sdk::ClientError::Exchange(academy_proto::ExchangeError::StaleEpoch {
                current: 9,
                ..
            })
        ),
        "{stale:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[derive(Debug, Default)]
struct Turns {
    tally: Mutex<Tally>,
    /// State-changing actions running now, and the most ever at once.
    inside: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[behaviour(name = "test.Turns")]
impl Turns {
    #[state]
    fn tally(&self) -> &Mutex<Tally> {
        &self.tally
    }

    #[action]
    async fn slow_add(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.inside.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count = {
            let mut tally = self.tally.lock().unwrap();
            tally.count += 1;
            tally.count
        };
        self.inside.fetch_sub(1, SeqCst);
        count
    }

    #[action(read_only)]
    async fn running(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.inside.load(SeqCst), self.most.load(SeqCst))
    }
}

/// State-changing actions take turns, each seeing the last one's state;
/// read-only ones run beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_actions_take_turns_and_read_only_ones_do_not_wait() {
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let manager = Manager::connect(&server.url()).await.unwrap();
    let turns =
        manager.launch(Turns::default()).await.unwrap().with_timeout(Duration::from_secs(10));
    let adds: Vec<_> = (0..4)
        .map(|_| {
            let turns = turns.clone();
            tokio::spawn(async move { turns.slow_add().await.unwrap() })
        })
        .collect();
    // A read-only action sees one running: it did not wait for its turn.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while turns.running().await.unwrap().0 != 1 {
        assert!(tokio::time::Instant::now() < deadline, "read-only actions waited for turns");
    }
    let mut counts = Vec::new();
    for add in adds {
        counts.push(add.await.unwrap());
    }
    counts.sort_unstable();
    assert_eq!(counts, [1, 2, 3, 4], "each saw the state the one before left");
    assert_eq!(turns.running().await.unwrap(), (0, 1), "never two at once");
    let saved = manager.exchange().load_state(&turns.id()).await.unwrap().unwrap();
    assert_eq!(saved.data.unwrap().data.as_ref(), br#"{"count":4}"#);
    manager.close().await.unwrap();
}

#[derive(Debug, Default)]
struct Filler {
    tally: Mutex<Tally>,
}

#[behaviour(name = "test.Filler")]
impl Filler {
    #[state]
    fn tally(&self) -> &Mutex<Tally> {
        &self.tally
    }

    /// Counts, and answers `bytes` bytes.
    #[action]
    async fn fill(&self, bytes: usize) -> String {
        self.tally.lock().unwrap().count += 1;
        "x".repeat(bytes)
    }
}

/// Answers that together are larger than the exchange takes in one
/// request go in smaller commits; a single answer larger than fits with the
/// state goes right after its commit. None is lost, none counts twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_fit_an_exchange_with_a_small_message_limit() {
    const KIB: usize = 1024;
    let limits = academy_exchange::Limits {
        max_message_bytes: 256 * KIB,
        max_delivery_bytes: 257 * KIB,
        ..academy_exchange::Limits::default()
    };
    let server =
        RunningExchange::start(ExchangeOptions { limits, ..Default::default() }).await.unwrap();
    let manager = Manager::connect(&server.url()).await.unwrap();
    let filler =
        manager.launch(Filler::default()).await.unwrap().with_timeout(Duration::from_secs(20));
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let filler = filler.clone();
            // One of them alone fills most of a message.
            let bytes = if i == 7 { 250 * KIB } else { 60 * KIB };
            tokio::spawn(async move { filler.fill(bytes).await.map(|s| s.len() == bytes) })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap().unwrap(), "an answer of the size asked");
    }
    let saved = manager.exchange().load_state(&filler.id()).await.unwrap().unwrap();
    assert_eq!(saved.data.unwrap().data.as_ref(), br#"{"count":32}"#);
    manager.close().await.unwrap();
}
