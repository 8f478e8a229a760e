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
//!
//! A process whose agents are on the clock joins it ([`SimClock::join`])
//! and names itself in its marks and sleeps: the clock keeps how many of
//! its tasks run and which answers it awaits. When it leaves (its `Participate`
//! call ends: it died, or closed its connection), those are given up, so a
//! participant that dies mid-task does not stop time for everyone else.

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
    /// A message, by key, leaves on the clock: pending until taken. With
    /// an answer key, the participant sending it awaits that answer.
    Send(String, Option<String>),
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
    /// The mark a `Mark` call asks for (`key` for the kinds that take one;
    /// `answer_key`, for a request's SEND only, may be empty).
    pub fn of(kind: pb::MarkKind, key: String, answer_key: String) -> Result<Self, ExchangeError> {
        use pb::MarkKind;
        crate::limits::name("key", &key)?;
        crate::limits::name("answer_key", &answer_key)?;
        if !answer_key.is_empty() && kind != MarkKind::Send {
            return Err(ExchangeError::InvalidArgument("answer_key is for SEND marks only".into()));
        }
        Ok(match kind {
            MarkKind::Begin => Self::Begin,
            MarkKind::End => Self::End,
            MarkKind::Idle => Self::Idle,
            MarkKind::Send => Self::Send(key, Some(answer_key).filter(|k| !k.is_empty())),
            MarkKind::Take => Self::Take(key),
            MarkKind::Abandon => Self::Abandon(key),
            MarkKind::Wake => Self::Wake(key),
            MarkKind::Unspecified => {
                return Err(ExchangeError::InvalidArgument("kind is unspecified".into()));
            }
        })
    }
}

/// Most sleepers, messages in flight, and answers awaited, a clock keeps.
pub const MAX_CLOCK_ENTRIES: usize = 1_000_000;

/// Most participants on a clock at once.
pub const MAX_PARTICIPANTS: usize = 10_000;

/// How long a participant whose every `Participate` call ended stays on
/// the clock, keeping what it has pending, for its process to call again
/// (its connection broke, say) before the clock gives that up.
pub const REJOIN_GRACE: Duration = Duration::from_secs(5);

/// Who makes a mark or sleeps: a participant from [`SimClock::join`], or
/// nobody in particular (0: the exchange itself, a caller that did not join).
pub type ParticipantId = u64;

/// What a participant has pending.
#[derive(Debug, Default)]
struct Participant {
    /// Its tasks that run.
    running: u64,
    /// The answers it awaits.
    awaiting: HashSet<String>,
    /// Its open `Participate` calls ([`Joined`] guards).
    calls: u32,
    /// How many times all its calls ended: the grace that began last is
    /// the one whose end may give it up.
    detached: u64,
}

#[derive(Debug, Default)]
struct State {
    now: Duration,
    pending: u64,
    /// Messages in flight, each with who awaits its answer and under what key.
    in_flight: HashMap<String, Option<(ParticipantId, String)>>,
    abandoned: HashSet<String>,
    /// By (time, key, registration number): whom to wake, and whose task it is.
    sleepers: BTreeMap<(Duration, String, u64), (oneshot::Sender<Duration>, ParticipantId)>,
    /// The entry of each key's sleeper.
    asleep: HashMap<String, (Duration, String, u64)>,
    /// Keys woken before they slept.
    early: HashSet<String>,
    next: u64,
    participants: HashMap<ParticipantId, Participant>,
    /// The last participant id given (0: none yet).
    joined: ParticipantId,
}

impl State {
    fn settle(&mut self, delta: i64) {
        self.pending = self.pending.saturating_add_signed(delta);
    }

    /// A task of `by` starts or resumes (+1), or stops running (-1). A
    /// participant's count never goes below 0 (a task it began before it
    /// joined again is not its own), and one that left counts nothing.
    fn run(&mut self, by: ParticipantId, delta: i64) {
        if by != 0 {
            let Some(p) = self.participants.get_mut(&by) else { return };
            if delta < 0 && p.running == 0 {
                return;
            }
            p.running = p.running.saturating_add_signed(delta);
        }
        self.settle(delta);
    }

    /// `by` no longer awaits answer `key` (it took it, or gave it up).
    fn unawait(&mut self, by: ParticipantId, key: &str) {
        if let Some(p) = self.participants.get_mut(&by) {
            p.awaiting.remove(key);
        }
    }

    /// Refuses a participant that is not on the clock.
    fn check(&self, by: ParticipantId) -> Result<(), ExchangeError> {
        if by == 0 || self.participants.contains_key(&by) {
            Ok(())
        } else {
            Err(ExchangeError::NotOnClock(by))
        }
    }

    /// Message `key` is no longer pending, nor is its answer awaited; a key
    /// not in flight will not count when it is sent.
    fn abandon(&mut self, key: String) {
        match self.in_flight.remove(&key) {
            Some(awaited) => {
                self.settle(-1);
                if let Some((by, answer)) = awaited {
                    self.unawait(by, &answer);
                }
            }
            None if self.abandoned.len() < MAX_CLOCK_ENTRIES => {
                self.abandoned.insert(key);
            }
            None => {}
        }
    }
}

/// The clock of one exchange.
#[derive(Debug)]
pub struct SimClock {
    state: Mutex<State>,
    /// Signalled whenever `pending` falls.
    quiet: Notify,
    /// One advance at a time.
    advancing: tokio::sync::Mutex<()>,
    /// How long a participant without a call stays ([`REJOIN_GRACE`]).
    grace: Duration,
}

impl Default for SimClock {
    fn default() -> Self {
        Self::with_grace(REJOIN_GRACE)
    }
}

impl SimClock {
    /// A clock on which a participant without a `Participate` call stays
    /// for `grace` (none: it leaves at once).
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            state: Mutex::default(),
            quiet: Notify::new(),
            advancing: tokio::sync::Mutex::new(()),
            grace,
        }
    }

    /// The clock now.
    pub fn status(&self) -> ClockStatus {
        let state = lock(&self.state);
        ClockStatus {
            now: state.now,
            pending: state.pending,
            sleepers: state.sleepers.len() as u64,
        }
    }

    /// Joins the clock as a participant; it leaves when the guard drops
    /// (after the clock's grace, unless it joins again meanwhile).
    pub fn join(self: &Arc<Self>) -> Result<Joined, ExchangeError> {
        self.rejoin(0)
    }

    /// Joins the clock as participant `resume`, with what it has pending,
    /// if the clock still has it (its calls ended less than the grace
    /// ago, or one is still open); else as a new participant (so with 0).
    pub fn rejoin(self: &Arc<Self>, resume: ParticipantId) -> Result<Joined, ExchangeError> {
        let mut state = lock(&self.state);
        if let Some(p) = state.participants.get_mut(&resume).filter(|_| resume != 0) {
            p.calls += 1;
            return Ok(Joined { clock: self.clone(), id: resume });
        }
        if state.participants.len() >= MAX_PARTICIPANTS {
            return Err(ExchangeError::LimitExceeded {
                limit: "participants on the clock".into(),
                max: MAX_PARTICIPANTS,
                found: MAX_PARTICIPANTS + 1,
            });
        }
        // Ids start at random: a participant of a clock that is gone (its
        // exchange restarted) is not taken for one of this clock's.
        if state.joined == 0 {
            state.joined = uuid::Uuid::new_v4().as_u64_pair().0 >> 1;
        }
        state.joined = state.joined.wrapping_add(1).max(1);
        let id = state.joined;
        state.participants.insert(id, Participant { calls: 1, ..Participant::default() });
        Ok(Joined { clock: self.clone(), id })
    }

    /// One of participant `id`'s calls ended: when it was the last, the
    /// participant leaves after the grace, unless it joins again.
    fn detach(self: &Arc<Self>, id: ParticipantId) {
        let mut state = lock(&self.state);
        let Some(p) = state.participants.get_mut(&id) else { return };
        p.calls = p.calls.saturating_sub(1);
        if p.calls > 0 {
            return;
        }
        p.detached += 1;
        let detached = p.detached;
        drop(state);
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if !self.grace.is_zero() => {
                let (clock, grace) = (Arc::downgrade(self), self.grace);
                runtime.spawn(async move {
                    tokio::time::sleep(grace).await;
                    if let Some(clock) = clock.upgrade() {
                        clock.leave_unless_back(id, detached);
                    }
                });
            }
            _ => self.leave(id),
        }
    }

    /// Participant `id` leaves if it has no call, and none came and went
    /// since its grace `detached` began.
    fn leave_unless_back(&self, id: ParticipantId, detached: u64) {
        let state = lock(&self.state);
        let back =
            state.participants.get(&id).is_none_or(|p| p.calls > 0 || p.detached != detached);
        drop(state);
        if !back {
            self.leave(id);
        }
    }

    /// Gives up what participant `id` left pending.
    fn leave(&self, id: ParticipantId) {
        let mut state = lock(&self.state);
        let Some(gone) = state.participants.remove(&id) else { return };
        state.settle(-(gone.running as i64));
        for answer in gone.awaiting {
            state.abandon(answer);
        }
        let quiet = state.pending == 0;
        drop(state);
        if quiet {
            self.quiet.notify_waiters();
        }
    }

    /// Counts what participant `by` (0: nobody in particular) does.
    pub fn mark(&self, by: ParticipantId, mark: Mark) -> Result<(), ExchangeError> {
        let mut state = lock(&self.state);
        state.check(by)?;
        let full = |set: &HashSet<String>| set.len() >= MAX_CLOCK_ENTRIES;
        match mark {
            Mark::Begin => state.run(by, 1),
            Mark::End | Mark::Idle => state.run(by, -1),
            Mark::Send(key, answer) => {
                if state.abandoned.remove(&key) {
                    return Ok(());
                }
                if state.in_flight.len() >= MAX_CLOCK_ENTRIES {
                    return Err(too_many("messages in flight"));
                }
                if !state.in_flight.contains_key(&key) {
                    let awaited = match (by, answer) {
                        (0, _) | (_, None) => None,
                        (by, Some(answer)) => {
                            let p = state.participants.get_mut(&by).expect("checked above");
                            if full(&p.awaiting) {
                                return Err(too_many("answers awaited"));
                            }
                            p.awaiting.insert(answer.clone());
                            Some((by, answer))
                        }
                    };
                    state.in_flight.insert(key, awaited);
                    state.settle(1);
                }
            }
            // From the message to the task: as many pending as before.
            Mark::Take(key) => {
                state.unawait(by, &key);
                if state.in_flight.remove(&key).is_some() {
                    state.settle(-1);
                }
                state.run(by, 1);
            }
            Mark::Abandon(key) => {
                state.unawait(by, &key);
                state.abandon(key);
            }
            Mark::Wake(key) => match state.asleep.remove(&key) {
                Some(entry) => {
                    if let Some((wake, whose)) = state.sleepers.remove(&entry) {
                        let now = state.now;
                        if wake.send(now).is_ok() {
                            state.run(whose, 1);
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

    /// Puts a running task of participant `by` to sleep until `until` (no
    /// longer running), and answers the time it wakes at (running again).
    /// One sleeper per `key` ([`Mark::Wake`] wakes it early). Dropped before
    /// then, the sleeper is forgotten and the task counts as idle.
    pub fn sleep(
        self: &Arc<Self>,
        by: ParticipantId,
        key: &str,
        until: Duration,
    ) -> Result<impl Future<Output = Duration> + Send + 'static, ExchangeError> {
        let (wake, woken) = oneshot::channel();
        let entry = {
            let mut state = lock(&self.state);
            state.check(by)?;
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
                state.sleepers.insert(entry.clone(), (wake, by));
                state.asleep.insert(key.to_owned(), entry.clone());
                state.run(by, -1);
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
                    && let Some((entry, (wake, whose))) = state.sleepers.pop_first()
                {
                    state.asleep.remove(&entry.1);
                    state.now = state.now.max(at);
                    // Running again; a sleeper gone (its task dropped) wakes no one.
                    if wake.send(state.now).is_ok() {
                        state.run(whose, 1);
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

/// A participant on the clock, from [`SimClock::join`]: it leaves, and what
/// it left pending is given up, when this drops.
#[derive(Debug)]
pub struct Joined {
    clock: Arc<SimClock>,
    id: ParticipantId,
}

impl Joined {
    /// The participant's id, for its marks and sleeps.
    pub fn id(&self) -> ParticipantId {
        self.id
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        self.clock.detach(self.id);
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
            clock.mark(0, Mark::Begin).unwrap();
            tokio::spawn(async move {
                let mut at = Duration::ZERO;
                loop {
                    at += period;
                    let now = clock.sleep(0, key, at).unwrap().await;
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
        clock.mark(0, Mark::Send("m".into(), None)).unwrap();
        let advance = tokio::spawn({
            let clock = clock.clone();
            async move { clock.advance(HOUR, None).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(clock.status().now, Duration::ZERO);
        assert!(!advance.is_finished());
        clock.mark(0, Mark::Take("m".into())).unwrap();
        clock.mark(0, Mark::End).unwrap();
        assert_eq!(advance.await.unwrap().now, HOUR);
        // Given up before it was sent: not counted when it is.
        clock.mark(0, Mark::Abandon("late".into())).unwrap();
        clock.mark(0, Mark::Send("late".into(), None)).unwrap();
        assert_eq!(clock.status().pending, 0);
    }

    /// A participant whose calls all ended keeps what it has pending for the
    /// grace: joined again within it (its connection broke, say), it goes on
    /// as before; else it leaves, and joining then makes a new one.
    #[tokio::test(start_paused = true)]
    async fn a_participant_keeps_its_place_for_the_grace() {
        let clock = Arc::new(SimClock::with_grace(Duration::from_secs(5)));
        let first = clock.join().unwrap();
        let id = first.id();
        clock.mark(id, Mark::Begin).unwrap();
        clock.mark(id, Mark::Send("r".into(), Some("r/answer".into()))).unwrap();
        drop(first);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(clock.status().pending, 2, "kept through the grace");
        clock.mark(id, Mark::Begin).unwrap();
        let again = clock.rejoin(id).unwrap();
        assert_eq!(again.id(), id);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(clock.status().pending, 3, "the grace that ended gives nothing up");
        // Its answer still counts: it was awaited all along.
        clock.mark(0, Mark::Take("r".into())).unwrap();
        clock.mark(0, Mark::Send("r/answer".into(), None)).unwrap();
        clock.mark(0, Mark::End).unwrap();
        assert_eq!(clock.status().pending, 3);
        drop(again);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(clock.status().pending, 0, "given up after the grace");
        assert_eq!(clock.mark(id, Mark::End), Err(ExchangeError::NotOnClock(id)));
        assert_ne!(clock.rejoin(id).unwrap().id(), id, "too late: a new participant");
    }

    /// A participant that leaves gives up its running tasks and the answers
    /// it awaits, and nothing of anyone else's; its marks are then refused.
    #[tokio::test]
    async fn a_participant_that_leaves_gives_up_what_it_left_pending() {
        let clock = Arc::new(SimClock::with_grace(Duration::ZERO));
        let (caller, callee) = (clock.join().unwrap(), clock.join().unwrap());
        // Another clock (the exchange restarted) names its participants apart.
        let elsewhere = Arc::new(SimClock::default()).join().unwrap();
        assert!(![caller.id(), callee.id()].contains(&elsewhere.id()));
        assert_eq!(
            clock.mark(elsewhere.id(), Mark::Begin),
            Err(ExchangeError::NotOnClock(elsewhere.id()))
        );
        // The caller runs two tasks; one sends a request and awaits its answer.
        clock.mark(caller.id(), Mark::Begin).unwrap();
        clock.mark(caller.id(), Mark::Begin).unwrap();
        clock.mark(caller.id(), Mark::Send("r".into(), Some("r/answer".into()))).unwrap();
        clock.mark(caller.id(), Mark::Idle).unwrap();
        // The callee takes it, and runs a loop of its own; nobody in
        // particular sends a message nobody has taken yet.
        clock.mark(callee.id(), Mark::Take("r".into())).unwrap();
        clock.mark(callee.id(), Mark::Begin).unwrap();
        clock.mark(0, Mark::Send("other".into(), None)).unwrap();
        assert_eq!(clock.status().pending, 4);
        let gone = caller.id();
        drop(caller);
        assert_eq!(clock.status().pending, 3, "the caller's running task is given up");
        assert_eq!(
            clock.mark(gone, Mark::End),
            Err(ExchangeError::NotOnClock(gone)),
            "a participant that left is refused"
        );
        assert!(matches!(clock.sleep(gone, "k", HOUR), Err(ExchangeError::NotOnClock(_))));
        assert_eq!(clock.mark(99, Mark::Begin), Err(ExchangeError::NotOnClock(99)));
        // The answer the caller awaited does not count when it comes.
        clock.mark(callee.id(), Mark::Send("r/answer".into(), None)).unwrap();
        clock.mark(callee.id(), Mark::End).unwrap();
        assert_eq!(clock.status().pending, 2);
        // The callee's count never goes below its own tasks.
        clock.mark(callee.id(), Mark::End).unwrap();
        clock.mark(callee.id(), Mark::End).unwrap();
        assert_eq!(clock.status().pending, 1, "only the message nobody took");
        // A callee that leaves while asleep: the sleeper is not counted when
        // it wakes.
        clock.mark(0, Mark::Take("other".into())).unwrap();
        clock.mark(0, Mark::End).unwrap();
        let sleeper = clock.join().unwrap();
        clock.mark(sleeper.id(), Mark::Begin).unwrap();
        let sleep = clock.sleep(sleeper.id(), "s", HOUR).unwrap();
        drop(sleeper);
        let advance = clock.advance(HOUR, None).await;
        assert_eq!((advance.now, advance.pending), (HOUR, 0));
        assert_eq!(sleep.await, HOUR);
        assert_eq!(clock.status().pending, 0);
    }

    /// A request whose sending failed (abandoned in flight) is no longer
    /// awaited: the participant leaving later abandons nothing of it.
    #[tokio::test]
    async fn a_request_given_up_in_flight_is_not_awaited() {
        let clock = Arc::new(SimClock::with_grace(Duration::ZERO));
        let caller = clock.join().unwrap();
        clock.mark(caller.id(), Mark::Send("r".into(), Some("r/answer".into()))).unwrap();
        clock.mark(caller.id(), Mark::Abandon("r".into())).unwrap();
        assert_eq!(clock.status().pending, 0);
        drop(caller);
        // Had the answer stayed awaited, leaving would have abandoned it,
        // and this send would not count.
        clock.mark(0, Mark::Send("r/answer".into(), None)).unwrap();
        assert_eq!(clock.status().pending, 1);
        assert!(matches!(
            Mark::of(pb::MarkKind::Begin, String::new(), "x".into()),
            Err(ExchangeError::InvalidArgument(_))
        ));
    }
}
