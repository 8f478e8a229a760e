//! Agents on a simulated clock (docs/design.md, "Clocks"): timers, sleeps
//! and call timeouts follow the time a simulator moves.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use academy_sdk::clock::{self, ClockKind};
use academy_sdk::{AgentConfig, Handle, HandleError, LaunchOptions, Manager, behaviour};

const HOUR: Duration = Duration::from_secs(3600);

fn simulated() -> LaunchOptions {
    LaunchOptions {
        config: AgentConfig { clock: ClockKind::Simulated, ..AgentConfig::default() },
        ..LaunchOptions::default()
    }
}

#[derive(Default)]
struct Hourly {
    ticks: AtomicU64,
}

#[behaviour(name = "test.Hourly")]
impl Hourly {
    #[timer(every = HOUR)]
    async fn tick(&self) {
        self.ticks.fetch_add(1, Ordering::SeqCst);
    }

    #[action(read_only)]
    async fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::SeqCst)
    }
}

/// One simulated day of an hourly timer: 24 ticks, as fast as the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hourly_timer_ticks_24_times_in_a_simulated_day() {
    let manager = Manager::in_process().await.unwrap();
    let hourly = manager.launch_with(Hourly::default(), simulated()).await.unwrap();
    let simulator = manager.simulator();
    simulator.ready(1, Duration::from_secs(10)).await.unwrap();
    let started = Instant::now();
    let status = simulator.advance_by(HOUR * 24).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status.now, HOUR * 24);
    assert_eq!(hourly.ticks().await.unwrap(), 24);
    println!(
        "a simulated day of an hourly timer in {took:?}: {:.0}x faster than real time",
        (HOUR * 24).as_secs_f64() / took.as_secs_f64()
    );
    // Half a day more, half as many again; nothing ran while time stood.
    simulator.advance_by(HOUR * 12).await.unwrap();
    assert_eq!(hourly.ticks().await.unwrap(), 36);
    manager.close().await.unwrap();
}

#[derive(Default)]
struct Slow {}

#[behaviour(name = "test.Slow")]
impl Slow {
    /// Answers after `hours` of simulated time.
    #[action]
    async fn wait(&self, hours: u64) -> u64 {
        clock::sleep(HOUR * hours as u32).await;
        clock::now().await.as_secs() / 3600
    }
}

#[derive(serde::Deserialize)]
struct Caller {
    slow: Handle<Slow>,
}

#[behaviour(name = "test.Caller")]
impl Caller {
    /// Calls `Slow::wait(hours)` with a timeout of `timeout` hours: the
    /// hour it ended at, and whether it timed out.
    #[action]
    async fn call(&self, hours: u64, timeout: u64) -> (u64, bool) {
        let slow = self.slow.with_timeout(HOUR * timeout as u32);
        let outcome = slow.wait(hours).await;
        let at = clock::now().await.as_secs() / 3600;
        (at, matches!(outcome, Err(HandleError::Timeout(_))))
    }
}

/// Sleeps in actions and call timeouts are simulated time: a call that
/// takes 2 h times out after 1 h, and succeeds with 3 h to spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeps_and_call_timeouts_follow_the_simulated_clock() {
    let manager = Manager::in_process().await.unwrap();
    let slow = manager.launch_with(Slow::default(), simulated()).await.unwrap();
    let caller = Caller { slow: slow.clone() };
    let caller = manager.launch_with(caller, simulated()).await.unwrap();
    let simulator = manager.simulator();
    let timed_out = tokio::spawn({
        let caller = caller.clone();
        async move { caller.call(2, 1).await }
    });
    simulator.ready(2, Duration::from_secs(10)).await.unwrap();
    simulator.advance_by(HOUR * 5).await.unwrap();
    assert_eq!(timed_out.await.unwrap().unwrap(), (1, true));
    let started = simulator.status().await.unwrap().now.as_secs() / 3600;
    let answered = tokio::spawn(async move { caller.call(2, 3).await });
    simulator.ready(1, Duration::from_secs(10)).await.unwrap();
    simulator.advance_by(HOUR * 5).await.unwrap();
    assert_eq!(answered.await.unwrap().unwrap(), (started + 2, false));
    manager.close().await.unwrap();
}

/// An action that runs until its gate opens.
struct Gated {
    gate: std::sync::Arc<tokio::sync::Semaphore>,
}

#[behaviour(name = "test.Gated")]
impl Gated {
    #[action]
    async fn pass(&self) {
        drop(self.gate.acquire().await);
    }
}

/// A process whose connection to the exchange breaks while its agent's
/// action runs on the clock joins the clock again as the same participant,
/// at once: the running action holds time back past the clock's grace (5
/// s), until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_connection_keeps_a_running_action_on_the_clock() {
    use academy_exchange::{ExchangeOptions, RunningExchange};
    let server = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let proxy = common::Proxy::to(server.addr().tcp().unwrap()).await;
    let manager = Manager::connect(&format!("http://{}", proxy.addr)).await.unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let gated = manager.launch_with(Gated { gate: gate.clone() }, simulated()).await.unwrap();
    let simulator = Manager::connect(&server.url()).await.unwrap().simulator();
    let passing = tokio::spawn({
        let gated = gated.clone();
        async move { gated.pass().await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while simulator.status().await.unwrap().pending == 0 {
        assert!(Instant::now() < deadline, "the action never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let advance = tokio::spawn(async move { simulator.advance_by(HOUR).await });
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(!advance.is_finished(), "time moved while the action ran");
    gate.add_permits(1);
    passing.await.unwrap().unwrap();
    assert_eq!(advance.await.unwrap().unwrap().now, HOUR);
    manager.close().await.unwrap();
}
