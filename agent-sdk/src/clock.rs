//! Time for agents (docs/design.md, "Clocks"). An agent follows the wall
//! clock (the default, at no cost) or its exchange's simulated clock
//! ([`AgentConfig::clock`](crate::AgentConfig)): then its timers, its
//! [`sleep`]s and the timeouts of the calls it makes follow simulated time,
//! which a program moves with a [`Simulator`]. Agents on the clock wake one
//! at a time, in order of time and then of their names (name your agents),
//! and time moves on only once nothing they started is still running or in
//! flight: a simulation whose agents await their calls runs the same way
//! every time, as fast as the machine goes.

use std::sync::Arc;
use std::time::Duration;

use academy_proto::ClockStatus;
use academy_proto::pb::MarkKind;

use crate::ClientError;
use crate::exchange::SharedExchange;

/// Which clock an agent follows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClockKind {
    /// The machine's clock.
    #[default]
    Wall,
    /// The simulated clock of the agent's exchange.
    Simulated,
}

/// The clock a task follows.
#[derive(Clone, Default)]
pub(crate) enum Clock {
    #[default]
    Wall,
    /// The exchange's; `key` orders this task among those due at once.
    Simulated { exchange: SharedExchange, key: Arc<str> },
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Wall => f.write_str("Wall"),
            Self::Simulated { key, .. } => f.debug_struct("Simulated").field("key", key).finish(),
        }
    }
}

impl Clock {
    /// This clock for task `task` of the same agent.
    pub(crate) fn for_task(&self, task: &str) -> Self {
        match self {
            Self::Wall => Self::Wall,
            Self::Simulated { exchange, key } => {
                let base = key.split_once('#').map_or(&**key, |(agent, _)| agent);
                Self::Simulated { exchange: exchange.clone(), key: format!("{base}#{task}").into() }
            }
        }
    }

    pub(crate) fn is_simulated(&self) -> bool {
        matches!(self, Self::Simulated { .. })
    }

    /// Now: since the Unix epoch on the wall clock, since the simulation's
    /// start on a simulated one.
    pub(crate) async fn now(&self) -> Duration {
        match self {
            Self::Wall => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            Self::Simulated { exchange, .. } => {
                exchange.clock_now().await.map(|c| c.now).unwrap_or_default()
            }
        }
    }

    /// This task's sleeper key on a simulated clock (with `also`, another
    /// of the same task, e.g. a call's timeout); empty on the wall clock.
    pub(crate) fn key(&self, also: Option<&str>) -> String {
        match (self, also) {
            (Self::Wall, _) => String::new(),
            (Self::Simulated { key, .. }, None) => key.to_string(),
            (Self::Simulated { key, .. }, Some(also)) => format!("{key}#{also}"),
        }
    }

    /// Sleeps until `until` on this clock (a simulated clock's task is not
    /// running meanwhile); the time woken at.
    pub(crate) async fn sleep_until(&self, until: Duration) -> Duration {
        self.sleep_as(&self.key(None), until).await
    }

    /// [`sleep_until`](Self::sleep_until) as sleeper `key` (see [`key`](Self::key)),
    /// which [`wake`](Self::wake) wakes early. On a simulated clock, a
    /// sleep once begun must be awaited to its end (wake it to cut it
    /// short): dropped, the clock would not know whether the task runs.
    pub(crate) async fn sleep_as(&self, key: &str, until: Duration) -> Duration {
        match self {
            Self::Wall => {
                let now = self.now().await;
                tokio::time::sleep(until.saturating_sub(now)).await;
                until
            }
            Self::Simulated { exchange, .. } => loop {
                match exchange.clock_sleep(key, until).await {
                    Ok(woke) => return woke,
                    Err(e) => {
                        tracing::warn!(error = %e, "the simulated clock does not answer; asking again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
        }
    }

    /// Wakes sleeper `key` of this task now (it runs again).
    pub(crate) async fn wake(&self, key: &str) {
        self.mark(MarkKind::Wake, key).await;
    }

    /// Counts on a simulated clock what this task does; nothing on the wall
    /// clock.
    pub(crate) async fn mark(&self, kind: MarkKind, key: &str) {
        if let Self::Simulated { exchange, .. } = self {
            mark(exchange, kind, key).await;
        }
    }

    /// Counts on a simulated clock a request this task sends, whose answer
    /// (`answer_key`) it awaits.
    pub(crate) async fn mark_request(&self, tag: &str, answer_key: &str) {
        if let Self::Simulated { exchange, .. } = self {
            mark_awaiting(exchange, MarkKind::Send, tag, answer_key).await;
        }
    }
}

/// Counts `kind` on `exchange`'s simulated clock, retrying while it does
/// not answer (a miscount would stop the simulation).
pub(crate) async fn mark(exchange: &SharedExchange, kind: MarkKind, key: &str) {
    mark_awaiting(exchange, kind, key, "").await;
}

async fn mark_awaiting(exchange: &SharedExchange, kind: MarkKind, key: &str, answer_key: &str) {
    let mut patience = crate::runtime::Patience::new();
    while let Err(e) = exchange.clock_mark(kind, key, answer_key).await {
        if !patience.left() {
            tracing::error!(error = %e, ?kind, "cannot count on the simulated clock");
            return;
        }
        patience.wait().await;
    }
}

/// The clock of the running agent task (the wall clock elsewhere).
pub(crate) fn current() -> Clock {
    crate::context::current_clock().unwrap_or_default()
}

/// Sleeps for `period` on the running agent's clock (the wall clock outside
/// an agent).
pub async fn sleep(period: Duration) {
    let clock = current();
    if clock.is_simulated() {
        let now = clock.now().await;
        clock.sleep_until(now + period).await;
    } else {
        tokio::time::sleep(period).await;
    }
}

/// Now on the running agent's clock: since the simulation's start on a
/// simulated clock, since the Unix epoch on the wall clock (outside an agent
/// too).
pub async fn now() -> Duration {
    current().now().await
}

/// Drives an exchange's simulated clock: the simulator's side.
#[derive(Clone)]
pub struct Simulator {
    exchange: SharedExchange,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator").finish_non_exhaustive()
    }
}

impl Simulator {
    /// The simulator of `exchange`'s clock.
    pub fn new(exchange: SharedExchange) -> Self {
        Self { exchange }
    }

    /// The clock now: its time, what is pending, how many sleep.
    pub async fn status(&self) -> Result<ClockStatus, ClientError> {
        self.exchange.clock_now().await
    }

    /// Moves time to `until`, waking the agents due on the way in order, and
    /// answers once nothing is pending at `until`.
    pub async fn advance_to(&self, until: Duration) -> Result<ClockStatus, ClientError> {
        self.exchange.clock_advance(until, None).await
    }

    /// Moves time forward by `period`.
    pub async fn advance_by(&self, period: Duration) -> Result<ClockStatus, ClientError> {
        let now = self.status().await?.now;
        self.advance_to(now + period).await
    }

    /// Moves time to `until` at most `factor` times as fast as wall time
    /// (1.0: in step with it).
    pub async fn run_at(&self, factor: f64, until: Duration) -> Result<ClockStatus, ClientError> {
        self.exchange.clock_advance(until, Some(factor)).await
    }

    /// Waits until `sleepers` tasks sleep on the clock and nothing is
    /// pending: the agents of a simulation are ready (polls every 10 ms, for
    /// at most `patience`).
    pub async fn ready(
        &self,
        sleepers: u64,
        patience: Duration,
    ) -> Result<ClockStatus, ClientError> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let status = self.status().await?;
            if status.sleepers >= sleepers && status.pending == 0 {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Transport(format!(
                    "the simulation is not ready: {} sleepers of {sleepers}, {} pending",
                    status.sleepers, status.pending
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
