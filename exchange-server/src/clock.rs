//! A simulated clock for the agents of an exchange (docs/design.md,
//! "Clocks"): a program (the simulator) moves time; agents on the clock
//! sleep until a time, and wake in order of (time, key), one at a time.
//! Time moves on only when nothing is pending: no task of an agent on the
//! clock runs, and no message sent on the clock waits to be taken. So a
//! simulation whose agents await their calls runs the same way every time.
//!
//! Participants tell the clock what they do ([`Mark`]): a task begins or
//! ends, goes idle (awaiting an answer), sends a message (by key) or takes
//! one, or gives one up. Each mark is made before what it stands for, so
//! the clock never sees less pending than there is.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use academy_proto::ClockStatus;
use academy_proto::sync::lock;
use academy_proto::{ExchangeError, pb};
use tokio::sync::{Notify, oneshot};

/// What a participant does, as the clock counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// A task on the clock starts (not on a message: a loop, a hook).
    Begin,
    /// A running task ends.
    End,
    /// A running task waits for something other than the clock (an answer).
    Idle,
    /// A message, by key, leaves on the clock: pending until taken.
    Send(String),
    /// A task takes a message (starts on it, or resumes with it); a key not
    /// sent on the clock starts a task all the same.
    Take(String),
    /// A message is no longer pending: received by a task already running,
    /// or given up (its call timed out), even if it is sent later.
    Abandon(String),
    /// Wakes the sleeper of this key now, as if its time had come (it runs
    /// again); one not asleep yet will not sleep.
    Wake(String),
}

impl Mark {
    /// The mark a `Mark` call asks for (`key` for the kinds that take one).
    pub fn of(kind: pb::MarkKind, key: String) -> Result<Self, ExchangeError> {
        use pb::MarkKind;
        crate::limits::name("key", &key)?;
        Ok(match kind {
            MarkKind::Begin => Self::Begin,
            MarkKind::End => Self::End,
            MarkKind::Idle => Self::Idle,
            MarkKind::Send => Self::Send(key),
            MarkKind::Take => Self::Take(key),
            MarkKind::Abandon => Self::Abandon(key),
            MarkKind::Wake => Self::Wake(key),
            MarkKind::Unspecified => {
                return Err(ExchangeError::InvalidArgument("kind is unspecified".into()));
            }
        })
    }
}

/// Most sleepers, and messages in flight, a clock keeps.
pub const MAX_CLOCK_ENTRIES: usize = 1_000_000;

#[derive(Debug, Default)]
struct State {
    now: Duration,
    pending: u64,
    in_flight: HashSet<String>,
    abandoned: HashSet<String>,
    /// By (time, key, registration number).
    sleepers: BTreeMap<(Duration, String, u64), oneshot::Sender<Duration>>,
    /// The entry of each key's sleeper.
    asleep: HashMap<String, (Duration, String, u64)>,
    /// Keys woken before they slept.
    early: HashSet<String>,
    next: u64,
}

impl State {
    fn settle(&mut self, delta: i64) {
        self.pending = self.pending.saturating_add_signed(delta);
    }
}

/// The clock of one exchange.
#[derive(Debug, Default)]
pub struct SimClock {
    state: Mutex<State>,
    /// Signalled whenever `pending` falls.
    quiet: Notify,
    /// One advance at a time.
    advancing: tokio::sync::Mutex<()>,
}

impl SimClock {
    /// The clock now.
    pub fn status(&self) -> ClockStatus {
        let state = lock(&self.state);
        ClockStatus {
            now: state.now,
            pending: state.pending,
            sleepers: state.sleepers.len() as u64,
        }
    }

    /// Counts what a participant does.
    pub fn mark(&self, mark: Mark) -> Result<(), ExchangeError> {
        let mut state = lock(&self.state);
        let full = |set: &HashSet<String>| set.len() >= MAX_CLOCK_ENTRIES;
        match mark {
            Mark::Begin => state.settle(1),
            Mark::End | Mark::Idle => state.settle(-1),
            Mark::Send(key) => {
                if state.abandoned.remove(&key) {
                    return Ok(());
                }
                if full(&state.in_flight) {
                    return Err(too_many("messages in flight"));
                }
                if state.in_flight.insert(key) {
                    state.settle(1);
                }
            }
            // From the message to the task: as many pending as before.
            Mark::Take(key) => {
                if !state.in_flight.remove(&key) {
                    state.settle(1);
                }
            }
            Mark::Abandon(key) => {
                if state.in_flight.remove(&key) {
                    state.settle(-1);
                } else if !full(&state.abandoned) {
                    state.abandoned.insert(key);
                }
            }
            Mark::Wake(key) => match state.asleep.remove(&key) {
                Some(entry) => {
                    if let Some(wake) = state.sleepers.remove(&entry) {
                        let now = state.now;
                        if wake.send(now).is_ok() {
                            state.settle(1);
                        }
                    }
                }
                None if !full(&state.early) => {
                    state.early.insert(key);
                }
                None => return Err(too_many("early wake-ups")),
            },
        }
        let quiet = state.pending == 0;
        drop(state);
        if quiet {
            self.quiet.notify_waiters();
        }
        Ok(())
    }

    /// Puts a running task to sleep until `until` (no longer running), and
    /// answers the time it wakes at (running again). One sleeper per `key`
    /// ([`Mark::Wake`] wakes it early). Dropped before then, the sleeper is
    /// forgotten and the task counts as idle.
    pub fn sleep(
        self: &Arc<Self>,
        key: &str,
        until: Duration,
    ) -> Result<impl Future<Output = Duration> + Send + 'static, ExchangeError> {
        let (wake, woken) = oneshot::channel();
        let entry = {
            let mut state = lock(&self.state);
            if state.early.remove(key) {
                // Woken before it slept: it goes on running.
                let _ = wake.send(state.now);
                None
            } else {
                if state.sleepers.len() >= MAX_CLOCK_ENTRIES {
                    return Err(too_many("sleepers"));
                }
                let entry = (until.max(state.now), key.to_owned(), state.next);
                state.next += 1;
                state.sleepers.insert(entry.clone(), wake);
                state.asleep.insert(key.to_owned(), entry.clone());
                state.settle(-1);
                Some(entry)
            }
        };
        self.quiet.notify_waiters();
        let guard = Forget { clock: self.clone(), entry };
        Ok(async move {
            let mut guard = guard;
            let now = woken.await.unwrap_or_default();
            guard.entry = None;
            now
        })
    }

    /// Moves time to `until`, waking sleepers in order (each once nothing
    /// is pending), and answers once nothing is pending at `until`. With a
    /// `factor` (> 0), simulated time runs at most that many times as fast
    /// as wall time. One advance at a time; time never goes back.
    pub async fn advance(&self, until: Duration, factor: Option<f64>) -> ClockStatus {
        let _one = self.advancing.lock().await;
        let started = (tokio::time::Instant::now(), lock(&self.state).now);
        loop {
            self.until_quiet().await;
            let wait = {
                let mut state = lock(&self.state);
                let next =
                    state.sleepers.first_key_value().map(|(k, _)| k.0).filter(|t| *t <= until);
                let Some(at) = next else {
                    state.now = state.now.max(until);
                    return ClockStatus {
                        now: state.now,
                        pending: state.pending,
                        sleepers: state.sleepers.len() as u64,
                    };
                };
                let due = factor
                    .filter(|f| *f > 0.0 && f.is_finite())
                    .map(|f| started.0 + at.saturating_sub(started.1).div_f64(f))
                    .filter(|due| *due > tokio::time::Instant::now());
                if due.is_none()
                    && let Some((entry, wake)) = state.sleepers.pop_first()
                {
                    state.asleep.remove(&entry.1);
                    state.now = state.now.max(at);
                    // Running again; a sleeper gone (its task dropped) wakes no one.
                    if wake.send(state.now).is_ok() {
                        state.settle(1);
                    }
                }
                due
            };
            if let Some(due) = wait {
                tokio::time::sleep_until(due).await;
            }
        }
    }

    async fn until_quiet(&self) {
        loop {
            let notified = self.quiet.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.state).pending == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Forgets a sleeper whose task stopped waiting.
struct Forget {
    clock: Arc<SimClock>,
    entry: Option<(Duration, String, u64)>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            let mut state = lock(&self.clock.state);
            if state.sleepers.remove(&entry).is_some() {
                state.asleep.remove(&entry.1);
            }
        }
    }
}

fn too_many(what: &str) -> ExchangeError {
    ExchangeError::LimitExceeded {
        limit: format!("{what} on the clock"),
        max: MAX_CLOCK_ENTRIES,
        found: MAX_CLOCK_ENTRIES + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Two loops, one every hour and one every 90 minutes, for a day: they
    /// wake in order of time, then key; nothing is left pending.
    #[tokio::test]
    async fn sleepers_wake_in_order_of_time_then_key() {
        let clock = Arc::new(SimClock::default());
        let woke = Arc::new(Mutex::new(Vec::new()));
        for (key, period) in [("b", HOUR), ("a", HOUR * 3 / 2)] {
            let (clock, woke) = (clock.clone(), woke.clone());
            clock.mark(Mark::Begin).unwrap();
            tokio::spawn(async move {
                let mut at = Duration::ZERO;
                loop {
                    at += period;
                    let now = clock.sleep(key, at).unwrap().await;
                    woke.lock().unwrap().push((now.as_secs() / 60, key));
                }
            });
        }
        let status = clock.advance(HOUR * 24, None).await;
        assert_eq!((status.now, status.pending, status.sleepers), (HOUR * 24, 0, 2));
        let woke = woke.lock().unwrap().clone();
        assert_eq!(woke.len(), 24 + 16);
        assert_eq!(woke[..4], [(60, "b"), (90, "a"), (120, "b"), (180, "a")]);
        // At 3 h both are due: "a" before "b".
        assert_eq!(woke[3..5], [(180, "a"), (180, "b")]);
        assert!(woke.windows(2).all(|w| w[0] <= w[1]), "{woke:?}");
    }

    /// Time stands still while a message sent on the clock is not taken,
    /// and moves once it is (or is given up).
    #[tokio::test]
    async fn messages_in_flight_hold_time_back() {
        let clock = Arc::new(SimClock::default());
        clock.mark(Mark::Send("m".into())).unwrap();
        let advance = tokio::spawn({
            let clock = clock.clone();
            async move { clock.advance(HOUR, None).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(clock.status().now, Duration::ZERO);
        assert!(!advance.is_finished());
        clock.mark(Mark::Take("m".into())).unwrap();
        clock.mark(Mark::End).unwrap();
        assert_eq!(advance.await.unwrap().now, HOUR);
        // Given up before it was sent: not counted when it is.
        clock.mark(Mark::Abandon("late".into())).unwrap();
        clock.mark(Mark::Send("late".into())).unwrap();
        assert_eq!(clock.status().pending, 0);
    }
}
