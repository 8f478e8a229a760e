//! What an agent is: a behaviour with actions, loops and hooks. Implemented by
//! `#[behaviour]` on an `impl` block.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use academy_proto::pb;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::RawHandle;

/// Set when the agent shuts down; control loops should return soon after.
pub type Shutdown = CancellationToken;

/// An action's failure, sent to the caller as an `ErrorResponse`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ActionError {
    /// The gRPC code the caller sees (UNKNOWN for the action's own errors).
    pub code: tonic::Code,
    /// The error's kind, e.g. the Rust type name of the action's error.
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl ActionError {
    /// An error returned by the action itself.
    pub fn failed<E: fmt::Display>(err: E) -> Self {
        Self {
            code: tonic::Code::Unknown,
            kind: short_type_name(std::any::type_name::<E>()).to_owned(),
            message: err.to_string(),
        }
    }

    /// Arguments that do not decode (INVALID_ARGUMENT).
    pub fn invalid_args(message: String) -> Self {
        Self { code: tonic::Code::InvalidArgument, kind: "InvalidArguments".into(), message }
    }

    /// An action the behaviour does not have (UNIMPLEMENTED), listing those it has.
    pub fn unknown_action(action: &str, known: &[&str]) -> Self {
        Self {
            code: tonic::Code::Unimplemented,
            kind: "UnknownAction".into(),
            message: format!("no action {action:?}; actions: {known:?}"),
        }
    }

    /// An action cancelled because its agent shut down (CANCELLED).
    pub fn cancelled(action: &str) -> Self {
        Self {
            code: tonic::Code::Cancelled,
            kind: "ActionCancelled".into(),
            message: format!("{action} was cancelled because the agent shut down"),
        }
    }

    /// A failure of the runtime, not of the action (INTERNAL).
    pub fn internal(message: String) -> Self {
        Self { code: tonic::Code::Internal, kind: "Internal".into(), message }
    }

    pub(crate) fn into_response(self) -> pb::ErrorResponse {
        pb::ErrorResponse {
            code: self.code as i32,
            kind: self.kind,
            message: self.message,
            details: Default::default(),
        }
    }
}

/// `my_crate::errors::ParseError` → `ParseError` (generic arguments kept as they are).
fn short_type_name(full: &str) -> &str {
    let generics = full.find('<').unwrap_or(full.len());
    let start = full[..generics].rfind("::").map_or(0, |i| i + 2);
    &full[start..]
}

/// A control loop or timer of a behaviour, as started by the runtime.
pub struct ControlLoop {
    /// The method's name.
    pub name: &'static str,
    /// The loop, ending with its error if it fails.
    pub run: BoxFuture<'static, Result<(), String>>,
}

impl fmt::Debug for ControlLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlLoop").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A type that can run as an agent. Write an `impl` block with
/// `#[academy_sdk::behaviour]` rather than implementing this by hand.
pub trait Behaviour: Send + Sync + Sized + 'static {
    /// Behaviour name, e.g. `example.Counter`.
    const NAME: &'static str;
    /// Other names (interfaces) this behaviour implements, for discovery.
    const IMPLEMENTS: &'static [&'static str];
    /// Names of its actions.
    const ACTIONS: &'static [&'static str];
    /// Names of its actions that leave the state alone (`#[action(read_only)]`):
    /// they run side by side, outside the commits of the state
    /// (docs/design.md, "State").
    const READ_ONLY_ACTIONS: &'static [&'static str] = &[];
    /// The typed action methods of a `Handle<Self>`.
    type Actions: From<RawHandle> + AsRef<RawHandle> + Clone + Send + Sync + fmt::Debug + 'static;

    /// Runs action `action` with its encoded arguments.
    fn dispatch(
        self: Arc<Self>,
        action: String,
        args: Option<pb::Payload>,
    ) -> BoxFuture<'static, Result<pb::Payload, ActionError>>;

    /// What its agents can do (docs, parameters, JSON Schemas), published
    /// with each agent's mailbox; the `#[behaviour]` macro writes it.
    fn describe() -> pb::AgentDescription {
        let actions = Self::ACTIONS.iter().map(|name| pb::ActionDescription {
            name: (*name).to_owned(),
            read_only: Self::READ_ONLY_ACTIONS.contains(name),
            ..Default::default()
        });
        pb::AgentDescription { doc: String::new(), actions: actions.collect() }
    }

    /// Control loops and timers, started after the startup hook.
    fn loops(self: &Arc<Self>, _shutdown: &Shutdown) -> Vec<ControlLoop> {
        Vec::new()
    }

    /// Runs before the agent serves requests (they wait for it).
    fn on_startup(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Runs after loops and actions have stopped.
    fn on_shutdown(self: Arc<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// The version of the layout of its saved state (`#[behaviour(state_version = N)]`).
    const STATE_VERSION: u32 = 1;

    /// The state the runtime keeps for the agent (a `#[state]` method):
    /// loaded before the startup hook, saved as it runs (docs/design.md,
    /// "State"). None keeps nothing.
    fn state(&self) -> Option<&dyn Durable> {
        None
    }

    /// Brings a state saved at version `from` to [`STATE_VERSION`](Self::STATE_VERSION)
    /// (a `#[migrate_state]` function); by default, refuses.
    fn migrate_state(from: u32, value: serde_json::Value) -> Result<serde_json::Value, String> {
        let _ = value;
        Err(format!(
            "the saved state is at version {from} and {} is at version {}, with no #[migrate_state] to bring it there",
            Self::NAME,
            Self::STATE_VERSION
        ))
    }
}

/// State the runtime keeps for an agent: what a `#[state]` method returns,
/// a `std::sync::Mutex` of a serde type (saved as JSON).
pub trait Durable: Send + Sync {
    /// The state now, as JSON.
    fn export(&self) -> Result<Vec<u8>, String>;
    /// Replaces the state with `value`.
    fn import(&self, value: serde_json::Value) -> Result<(), String>;
}

impl<S> Durable for std::sync::Mutex<S>
where
    S: serde::Serialize + serde::de::DeserializeOwned + Send,
{
    fn export(&self) -> Result<Vec<u8>, String> {
        let state = self.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        serde_json::to_vec(&*state).map_err(|e| format!("cannot save the state: {e}"))
    }

    fn import(&self, value: serde_json::Value) -> Result<(), String> {
        let loaded = serde_json::from_value(value)
            .map_err(|e| format!("cannot load the saved state: {e}"))?;
        *self.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(())
    }
}

/// Runs `tick` every `period` until `shutdown` (the first run after one period),
/// on the agent's clock (docs/design.md, "Clocks"). A failing tick ends the
/// timer with its error. Used by `#[timer]`.
#[doc(hidden)]
pub async fn every<F, Fut>(period: Duration, shutdown: Shutdown, mut tick: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let clock = crate::clock::current();
    if clock.is_simulated() {
        // Simulated time: each tick one period after the last was due.
        let mut due = clock.now().await;
        let key = clock.key(None);
        loop {
            due += period.max(Duration::from_nanos(1));
            let sleep = clock.sleep_as(&key, due);
            tokio::pin!(sleep);
            tokio::select! {
                () = shutdown.cancelled() => {
                    // Cut short, not dropped: the loop runs again, to end.
                    clock.wake(&key).await;
                    sleep.await;
                    return Ok(());
                }
                _ = &mut sleep => tick().await?,
            }
        }
    }
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = interval.tick() => tick().await?,
        }
    }
}

/// Outcome of actions declared to return `Result<T, E>`: an `ActionError`
/// as it is (its code and kind), any other error as the action's own
/// (`UNKNOWN`, kind its type's name).
#[doc(hidden)]
pub fn fallible<T, E: fmt::Display + 'static>(result: Result<T, E>) -> Result<T, ActionError> {
    result.map_err(|err| match (&err as &dyn std::any::Any).downcast_ref::<ActionError>() {
        Some(own) => own.clone(),
        None => ActionError::failed(err),
    })
}

/// Outcome of hooks and loops: `()` or `Result<(), E>`.
#[doc(hidden)]
pub trait HookOutcome {
    fn into_hook_outcome(self) -> Result<(), String>;
}

impl HookOutcome for () {
    fn into_hook_outcome(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: fmt::Display> HookOutcome for Result<(), E> {
    fn into_hook_outcome(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kind_is_the_short_type_name() {
        assert_eq!(ActionError::failed(String::from("x")).kind, "String");
        // An action's ActionError keeps its code and kind.
        let invalid = fallible::<(), _>(Err(ActionError::invalid_args("bad".into()))).unwrap_err();
        assert_eq!(
            (invalid.code, invalid.kind.as_str()),
            (tonic::Code::InvalidArgument, "InvalidArguments")
        );
        let other = fallible::<(), _>(Err(String::from("x"))).unwrap_err();
        assert_eq!((other.code, other.kind.as_str()), (tonic::Code::Unknown, "String"));
        assert_eq!(short_type_name("a::b::Wrap<c::D>"), "Wrap<c::D>");
        assert_eq!(short_type_name("Plain"), "Plain");
    }
}
