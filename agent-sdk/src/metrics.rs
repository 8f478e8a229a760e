//! Metrics of the actions this process's agents serve, for a program that
//! serves Prometheus metrics (the example worker does, on
//! `--metrics-listen`): [`register`] them in its registry once, and every
//! agent of the process counts its actions there.
//!
//! - `academy_actions_total{behaviour, action, outcome}`: actions answered;
//!   `outcome` is `ok` or the error's gRPC code (`Unknown` for an action that
//!   failed, `InvalidArgument`, `Cancelled`, ...);
//! - `academy_action_seconds{behaviour, action}`: histogram of their
//!   durations, 50 µs to 105 s;
//! - `academy_state_saves_total{behaviour, outcome}`: saves of kept state
//!   (`saved`, `fenced`: a later incarnation has the agent, `failed`);
//! - `academy_state_save_seconds{behaviour}` and
//!   `academy_state_bytes{behaviour}`: histograms of how long a save took
//!   and how large the state saved was.
//!
//! Actions a behaviour does not have count as `action="unknown"`, so a
//! caller cannot make new series at will. Until registered, nothing is
//! counted.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Outcome {
    behaviour: &'static str,
    action: String,
    outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Action {
    behaviour: &'static str,
    action: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Saved {
    behaviour: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Kind {
    behaviour: &'static str,
}

#[derive(Debug)]
struct ActionMetrics {
    answered: Family<Outcome, Counter>,
    seconds: Family<Action, Histogram>,
    saves: Family<Saved, Counter>,
    save_seconds: Family<Kind, Histogram>,
    state_bytes: Family<Kind, Histogram>,
}

static METRICS: OnceLock<ActionMetrics> = OnceLock::new();

/// Registers the action metrics in `registry`; from then on, every agent
/// of this process counts its actions. A second call registers nothing.
pub fn register(registry: &mut Registry) {
    let metrics = ActionMetrics {
        answered: Family::default(),
        seconds: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(50e-6, 2.0, 22))
        }),
        saves: Family::default(),
        save_seconds: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(50e-6, 2.0, 22))
        }),
        state_bytes: Family::new_with_constructor(|| {
            Histogram::new(exponential_buckets(64.0, 4.0, 10))
        }),
    };
    if METRICS.set(metrics).is_err() {
        return;
    }
    let metrics = METRICS.get().expect("set above");
    registry.register(
        "academy_actions",
        "Actions answered by this process's agents, by behaviour, action and outcome",
        metrics.answered.clone(),
    );
    registry.register(
        "academy_action_seconds",
        "Time from a request's delivery to its answer, by behaviour and action",
        metrics.seconds.clone(),
    );
    registry.register(
        "academy_state_saves",
        "Commits and saves of agents' kept state, by behaviour and outcome (saved, fenced, failed)",
        metrics.saves.clone(),
    );
    registry.register(
        "academy_state_save_seconds",
        "Time to commit or save an agent's state (retries included), by behaviour",
        metrics.save_seconds.clone(),
    );
    registry.register(
        "academy_state_bytes",
        "Size of the states saved, by behaviour",
        metrics.state_bytes.clone(),
    );
}

/// Counts one save of an agent's state (`outcome`: saved, fenced, failed)
/// of `bytes`, started at `started` (`None` when not counting).
pub(crate) fn observe_save(
    behaviour: &'static str,
    outcome: &'static str,
    bytes: usize,
    started: Option<Instant>,
) {
    let (Some(metrics), Some(started)) = (METRICS.get(), started) else { return };
    let kind = Kind { behaviour };
    metrics.save_seconds.get_or_create(&kind).observe(started.elapsed().as_secs_f64());
    metrics.state_bytes.get_or_create(&kind).observe(bytes as f64);
    metrics.saves.get_or_create(&Saved { behaviour, outcome }).inc();
}

/// Whether actions are counted (the metrics are registered).
pub(crate) fn enabled() -> bool {
    METRICS.get().is_some()
}

/// Counts one action answered, started at `started` (`None` when not
/// counting); `code` is `None` when it succeeded.
pub(crate) fn observe(
    behaviour: &'static str,
    action: &str,
    code: Option<tonic::Code>,
    started: Option<Instant>,
) {
    let (Some(metrics), Some(started)) = (METRICS.get(), started) else { return };
    let took = started.elapsed();
    let action = if code == Some(tonic::Code::Unimplemented) { "unknown" } else { action };
    let outcome = code.map_or_else(|| "ok".to_owned(), |code| format!("{code:?}"));
    let key = Action { behaviour, action: action.to_owned() };
    metrics.seconds.get_or_create(&key).observe(took.as_secs_f64());
    let key = Outcome { behaviour, action: key.action, outcome };
    metrics.answered.get_or_create(&key).inc();
}
