//! The example behaviours, shared by the pipeline and the worker binary. Each
//! is built from the JSON config of its launch (`{}` for the defaults).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use academy_sdk::{Handle, HandleError, Shutdown, behaviour};
use serde::{Deserialize, Serialize};

/// Normalises text: lower case, letters and spaces only.
#[derive(Debug, Default, Deserialize)]
pub struct Cleaner {}

#[behaviour(name = "example.Cleaner")]
impl Cleaner {
    #[action]
    async fn clean(&self, text: String) -> String {
        text.chars()
            .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { ' ' })
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub words: usize,
    pub distinct: usize,
    pub top: Option<(String, usize)>,
}

/// What a `WordStats` agent has done, kept across restarts and moves.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Analysed {
    pub texts: u64,
}

/// Counts words; discoverable as any `example.Analyser`. How many texts it
/// analysed is its state, which the runtime keeps.
#[derive(Debug, Default, Deserialize)]
pub struct WordStats {
    #[serde(skip)]
    analysed: std::sync::Mutex<Analysed>,
}

#[behaviour(name = "example.WordStats", implements("example.Analyser"))]
impl WordStats {
    #[state]
    fn analysed_state(&self) -> &std::sync::Mutex<Analysed> {
        &self.analysed
    }

    #[action]
    async fn analyse(&self, text: String) -> Result<Report, String> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for word in text.split_whitespace() {
            *counts.entry(word).or_default() += 1;
        }
        if counts.is_empty() {
            return Err("nothing to analyse".into());
        }
        self.analysed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).texts += 1;
        let top = counts.iter().max_by_key(|(w, n)| (**n, std::cmp::Reverse(**w)));
        Ok(Report {
            words: counts.values().sum(),
            distinct: counts.len(),
            top: top.map(|(w, n)| ((*w).to_owned(), *n)),
        })
    }

    /// How many texts it analysed, ever (its kept state). Read-only: it
    /// runs beside the analyses, outside their commits.
    #[action(read_only)]
    async fn analysed(&self) -> u64 {
        self.analysed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).texts
    }
}

/// Runs documents through a cleaner and an analyser, all concurrently.
#[derive(Debug, Default, Deserialize)]
pub struct Coordinator {
    #[serde(skip)]
    processed: AtomicU64,
}

#[behaviour(name = "example.Coordinator")]
impl Coordinator {
    #[action]
    async fn process(
        &self,
        cleaner: Handle<Cleaner>,
        analyser: Handle<WordStats>,
        documents: Vec<String>,
    ) -> Result<Vec<Report>, HandleError> {
        let jobs = documents.into_iter().map(|doc| async {
            let clean = cleaner.clean(doc).await?;
            let report = analyser.analyse(clean).await?;
            self.processed.fetch_add(1, Ordering::Relaxed);
            Ok(report)
        });
        futures::future::try_join_all(jobs).await
    }

    /// A control loop on a timer: report progress.
    #[timer(every = Duration::from_millis(200))]
    async fn progress(&self) {
        tracing::info!(processed = self.processed.load(Ordering::Relaxed), "coordinator");
    }
}

/// Fails its control loop after `fail_after_ms`: shows restarts under a launcher.
#[derive(Debug, Deserialize)]
pub struct Crashy {
    pub fail_after_ms: u64,
}

#[behaviour(name = "example.Crashy")]
impl Crashy {
    #[action]
    async fn alive(&self) -> bool {
        true
    }

    #[control_loop]
    async fn crash(&self, shutdown: Shutdown) -> Result<(), String> {
        tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            () = tokio::time::sleep(Duration::from_millis(self.fail_after_ms)) => {
                Err(format!("crashed after {} ms, as configured", self.fail_after_ms))
            }
        }
    }
}

/// A simulation (docs/design.md, "Clocks"): a sensor reads a temperature
/// every hour and reports it to a controller, which switches a heater and
/// checks itself every 90 minutes; a recorder keeps what happened, with the
/// simulated time. Run on a simulated clock, two runs record the same.
#[derive(Debug, Deserialize)]
pub struct Sensor {
    /// Where readings go.
    pub controller: Handle<Controller>,
    /// Seeds the readings.
    pub seed: u64,
    #[serde(skip)]
    state: std::sync::Mutex<u64>,
}

#[behaviour(name = "example.Sensor")]
impl Sensor {
    /// Reads the temperature every simulated hour and reports it.
    #[timer(every = Duration::from_secs(3600))]
    async fn read(&self) -> Result<(), HandleError> {
        let reading = {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A linear congruential generator: the same readings every run.
            *state = state
                .wrapping_add(self.seed)
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            15 + (*state >> 33) % 15
        };
        self.controller.observe(reading).await
    }
}

/// Switches a heater on below 20 degrees and off above 24; see [`Sensor`].
#[derive(Debug, Deserialize)]
pub struct Controller {
    /// Where events go.
    pub recorder: Handle<Recorder>,
    #[serde(skip)]
    heating: std::sync::atomic::AtomicBool,
}

#[behaviour(name = "example.Controller")]
impl Controller {
    /// Takes a reading; switches the heater when it must, and records it.
    #[action]
    async fn observe(&self, degrees: u64) -> Result<(), HandleError> {
        let heating = self.heating.load(Ordering::SeqCst);
        let switch = (degrees < 20 && !heating) || (degrees > 24 && heating);
        if switch {
            self.heating.store(!heating, Ordering::SeqCst);
        }
        let what = if switch { if heating { "heater off" } else { "heater on" } } else { "steady" };
        self.recorder.record(format!("{degrees} degrees: {what}")).await
    }

    /// Checks itself every 90 simulated minutes.
    #[timer(every = Duration::from_secs(90 * 60))]
    async fn check(&self) -> Result<(), HandleError> {
        let heating = self.heating.load(Ordering::SeqCst);
        self.recorder.record(format!("check: heating {heating}")).await
    }
}

/// Records events with the simulated time they happened at; see [`Sensor`].
#[derive(Debug, Default, Deserialize)]
pub struct Recorder {
    #[serde(skip)]
    events: std::sync::Mutex<Vec<String>>,
}

#[behaviour(name = "example.Recorder")]
impl Recorder {
    /// Records `event` at the time now.
    #[action]
    async fn record(&self, event: String) {
        let at = academy_sdk::clock::now().await;
        let line = format!("{:02}:{:02} {event}", at.as_secs() / 3600, at.as_secs() / 60 % 60);
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(line);
    }

    /// What it recorded, in order.
    #[action(read_only)]
    async fn events(&self) -> Vec<String> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// Takes its time on the wall clock, counted as running on a simulated one:
/// what a simulation does when a process dies mid-task
/// (`examples/tests/simulation.rs`).
#[derive(Debug, Default, Deserialize)]
pub struct Stall {
    #[serde(skip)]
    started: AtomicU64,
}

#[behaviour(name = "example.Stall")]
impl Stall {
    /// Waits `ms` milliseconds of wall time.
    #[action(read_only)]
    async fn stall(&self, ms: u64) {
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// How many stalls have started.
    #[action(read_only)]
    async fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }
}

/// Asks a [`Stall`] to stall, and waits for it: a caller on the clock.
#[derive(Debug, Deserialize)]
pub struct Relay {
    /// Who stalls.
    pub target: Handle<Stall>,
}

#[behaviour(name = "example.Relay")]
impl Relay {
    /// Has the target stall for `ms` milliseconds of wall time.
    #[action(read_only)]
    async fn relay(&self, ms: u64) -> Result<(), HandleError> {
        self.target.stall(ms).await
    }
}

/// Appends numbers in the order its `append` calls arrive: a check of
/// delivery order (docs/design.md, "Direct delivery").
#[derive(Debug, Default, Deserialize)]
pub struct Ledger {
    #[serde(skip)]
    entries: std::sync::Mutex<Vec<u64>>,
}

#[behaviour(name = "example.Ledger")]
impl Ledger {
    /// Appends `n`; answers how many entries there are now.
    #[action]
    async fn append(&self, n: u64) -> usize {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.push(n);
        entries.len()
    }

    /// Every entry, in order.
    #[action(read_only)]
    async fn entries(&self) -> Vec<u64> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}
