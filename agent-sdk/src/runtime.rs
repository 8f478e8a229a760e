//! The agent runtime (docs/design.md, "Agents"): startup gating, concurrent
//! actions, loops, and the shutdown sequence. [`run_agent`] runs one agent on
//! an existing mailbox; the [`Manager`](crate::Manager) and the
//! [`Worker`](crate::worker::Worker) use it.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use academy_proto::EntityId;
use academy_proto::pb::{self, MarkKind, message::Body};
use academy_proto::trace::{self, Traced};
use futures::FutureExt as _;
use futures::future::Either;
use opentelemetry::KeyValue;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::SpanKind;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::clock::{Clock, ClockKind};
use crate::context::{self, AgentContext, Context};
use crate::direct::Reply;
use crate::exchange::SharedExchange;
use crate::mailbox::{DirectOptions, Mailbox};
use crate::state::{Keeper, Outcome};
use crate::{ActionError, AgentError, Behaviour, ClientError, HandleError};

/// How an agent behaves at shutdown.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Cancel in-flight actions at shutdown (their callers get a CANCELLED
    /// error) rather than letting them finish.
    pub cancel_actions_on_shutdown: bool,
    /// Terminate the mailbox after a requested shutdown.
    pub terminate_on_success: bool,
    /// Terminate the mailbox after a failure (startup, loop or hook error).
    pub terminate_on_error: bool,
    /// Shut the agent down when a control loop fails.
    pub shutdown_on_loop_error: bool,
    /// How long loops get to return after shutdown is signalled before they are aborted.
    pub loop_shutdown_grace: Duration,
    /// How often the agent's state (a `#[state]`) is saved while it runs,
    /// when it changed; it is also saved after each action and at shutdown.
    pub state_save_every: Duration,
    /// Where its state is kept: in the exchange when `None` (the default),
    /// or, say, in a [`FileStore`](crate::state::FileStore).
    pub state_store: Option<Arc<dyn crate::state::StateStore>>,
    /// The clock its timers, sleeps and call timeouts follow: the wall
    /// clock, or its exchange's simulated clock (docs/design.md, "Clocks").
    pub clock: crate::clock::ClockKind,
    /// Direct delivery (docs/design.md, "Direct delivery"): the agent takes
    /// action requests at this peer endpoint too (advertised with its
    /// subscription), and its own calls go directly to agents that
    /// advertise one. An agent with a `#[state]` or on a simulated clock
    /// takes its requests through the exchange only, but calls directly.
    pub direct: Option<crate::direct::Endpoint>,
    /// Results, and the arguments of its own calls, of this many bytes or
    /// more go by reference, kept in the exchange's blob store, or at the
    /// peer endpoints for those that go directly (docs/design.md, "Blobs");
    /// `usize::MAX`: never.
    pub blob_threshold: usize,
    /// A directory the processes on this node share: its blobs are kept
    /// there as files rather than in the exchange, and the blobs others
    /// keep there are read from it (docs/design.md, "Blobs").
    pub blob_dir: Option<std::path::PathBuf>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            cancel_actions_on_shutdown: true,
            terminate_on_success: true,
            terminate_on_error: true,
            shutdown_on_loop_error: true,
            loop_shutdown_grace: Duration::from_secs(5),
            state_save_every: Duration::from_secs(1),
            state_store: None,
            clock: crate::clock::ClockKind::Wall,
            direct: None,
            blob_threshold: crate::blob::DEFAULT_BLOB_THRESHOLD,
            blob_dir: None,
        }
    }
}

/// Stops a running agent from outside, optionally overriding whether it terminates.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopSignal {
    pub(crate) token: CancellationToken,
    pub(crate) terminate: Arc<Mutex<Option<bool>>>,
    /// The agent stops to move elsewhere: its actions in flight finish.
    moving: Arc<AtomicBool>,
    /// A plain stop came (after a move began, perhaps): cancel what runs.
    hurry: CancellationToken,
}

impl StopSignal {
    pub(crate) fn stop(&self, terminate: Option<bool>) {
        if terminate.is_some() {
            *self.terminate.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = terminate;
        }
        self.moving.store(false, Ordering::SeqCst);
        self.hurry.cancel();
        self.token.cancel();
    }

    /// Stops the agent, keeping its mailbox, so that it runs elsewhere: its
    /// actions in flight finish and are answered rather than cancelled
    /// (until a plain [`stop`](Self::stop) comes).
    pub(crate) fn stop_moving(&self) {
        *self.terminate.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(false);
        self.moving.store(true, Ordering::SeqCst);
        self.token.cancel();
    }
}

/// Runs `behaviour` as agent `id` (whose mailbox must be ACTIVE) until it shuts
/// down. `Ok` after a requested shutdown; the first failure otherwise.
pub async fn run_agent<B: Behaviour>(
    behaviour: B,
    id: EntityId,
    exchange: SharedExchange,
    config: AgentConfig,
) -> Result<(), AgentError> {
    run(Arc::new(behaviour), id, 0, exchange, config, StopSignal::default()).await
}

/// What orders agent `id`'s tasks among those due at once on a simulated
/// clock: its name (the same in every run of a simulation), else its
/// behaviour and id.
async fn clock_key(exchange: &SharedExchange, id: EntityId, behaviour: &str) -> String {
    let name = exchange.status(&id).await.ok().and_then(|s| s.agent).map(|a| a.name);
    match name.filter(|n| !n.is_empty()) {
        Some(name) => name,
        None => format!("{behaviour}/{id}"),
    }
}

/// Catches a panic in `future` and reports it as an error message.
async fn guarded<T>(future: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(future).catch_unwind().await.map_err(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("panicked: {text}")
    })
}

/// Runs agent `id` as incarnation `epoch` (its launcher placement; 0: none).
pub(crate) async fn run<B: Behaviour>(
    behaviour: Arc<B>,
    id: EntityId,
    epoch: u64,
    exchange: SharedExchange,
    config: AgentConfig,
    stop: StopSignal,
) -> Result<(), AgentError> {
    let (requests_tx, mut requests) = mpsc::unbounded_channel();
    // Hosted at its endpoint, if it takes requests directly: before it
    // subscribes, so that whoever sees the endpoint advertised finds it.
    let (direct_tx, mut direct_requests) = mpsc::unbounded_channel();
    let takes_direct = behaviour.state().is_none() && config.clock == ClockKind::Wall;
    let hosted =
        config.direct.as_ref().filter(|_| takes_direct).map(|e| e.host(id, &exchange, direct_tx));
    let options = DirectOptions {
        hosted: hosted.as_ref().map(|h| h.endpoint().clone()),
        sends: config.direct.is_some(),
    };
    let mailbox = Mailbox::open(exchange.clone(), id, epoch, Some(requests_tx), options)
        .await
        .map_err(|source| AgentError::Exchange { id, source })?;
    mailbox.set_blob_threshold(config.blob_threshold);
    if let Some(dir) = config.blob_dir.clone() {
        mailbox.set_blob_dir(dir);
    }
    let shutdown = stop.token.clone();
    let clock = match config.clock {
        ClockKind::Wall => Clock::Wall,
        ClockKind::Simulated => Clock::Simulated {
            key: clock_key(&exchange, id, B::NAME).await.into(),
            exchange: exchange.clone(),
        },
    };
    let context = Context {
        mailbox: mailbox.clone(),
        agent: Some(AgentContext { id, stop: shutdown.clone() }),
        caller: None,
        clock,
    };
    let mut failure = None;

    // The saved state first, then the startup hook; requests wait in the
    // channel until both are done.
    let keeper =
        Keeper::of(&*behaviour, config.state_store.as_ref(), &exchange, id, epoch).map(Arc::new);
    let restored = match &keeper {
        Some(keeper) => keeper.restore(&*behaviour).await,
        None => Ok(()),
    };
    let startup = async {
        restored.map_err(|message| (true, message))?;
        let hook = guarded(context::scope(context.clone(), behaviour.clone().on_startup()));
        hook.await.and_then(|r| r).map_err(|message| (false, message))
    };
    let started = match startup.await {
        Err((true, message)) => {
            tracing::error!(agent = %id, %message, "cannot restore the agent's state");
            failure = Some(AgentError::State { id, message });
            false
        }
        Ok(()) => true,
        Err((false, message)) => {
            tracing::error!(agent = %id, %message, "startup hook failed");
            failure = Some(AgentError::Startup { id, message });
            false
        }
    };

    // Commits state-changing actions' answers, and the state now and then,
    // until every action is settled and the shutdown hook ran.
    let stop_committing = CancellationToken::new();
    let committer = match (&keeper, started) {
        (Some(keeper), true) => {
            let every = config.state_save_every.max(Duration::from_millis(10));
            let run = keeper.clone().run(
                behaviour.clone(),
                every,
                shutdown.clone(),
                stop_committing.clone(),
            );
            Some(tokio::spawn(run))
        }
        _ => None,
    };
    let cancel_actions = CancellationToken::new();
    let mut mailbox_gone = false;
    let mut actions = JoinSet::new();
    let mut loops = JoinSet::new();
    if started {
        for control in behaviour.loops(&shutdown) {
            let name = control.name;
            // On a simulated clock, a loop counts as running but while it sleeps.
            let clock = context.clock.for_task(name);
            clock.mark(MarkKind::Begin, "").await;
            let context = Context { clock: clock.clone(), ..context.clone() };
            loops.spawn(context::scope(context, async move {
                let done = guarded(control.run).await.and_then(|r| r);
                clock.mark(MarkKind::End, "").await;
                (name, done)
            }));
        }
        tracing::info!(agent = %id, behaviour = B::NAME, "agent running");
        let mut in_flight = HashSet::new();
        let action = |origin: Origin, header: pb::Header, request: pb::ActionRequest| {
            let caller = header.src.parse().ok();
            let clock = context.clock.for_task(&request.action);
            let job = serve_action(
                behaviour.clone(),
                mailbox.clone(),
                cancel_actions.clone(),
                keeper.clone(),
                shutdown.clone(),
                origin,
                header,
                request,
            );
            let context = Context { caller, clock, ..context.clone() };
            // Boxed: the task then holds a pointer, not the whole (large)
            // future, which spawning and finishing would copy.
            Box::pin(context::scope(context, job))
        };
        // Only action requests come directly (the endpoint takes no other).
        let direct = |(reply, message): (Reply, pb::Message)| match (message.header, message.body) {
            (Some(header), Some(Body::ActionRequest(request))) => {
                Some(action(Origin::Direct(reply), header, request))
            }
            _ => None,
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(done) = loops.join_next(), if !loops.is_empty() => {
                    if let Some(err) = loop_failure(id, done) {
                        tracing::error!(agent = %id, error = %err, "control loop failed");
                        failure.get_or_insert(err);
                        if config.shutdown_on_loop_error {
                            break;
                        }
                    }
                }
                Some(done) = actions.join_next(), if !actions.is_empty() => {
                    if let Ok(Some(seq)) = done {
                        in_flight.remove(&seq);
                    }
                }
                Some(request) = direct_requests.recv() => actions.extend(direct(request)),
                request = requests.recv() => {
                    // What came directly before it goes first.
                    while let Ok(request) = direct_requests.try_recv() {
                        actions.extend(direct(request));
                    }
                    let Some((seq, message)) = request else {
                        // Terminated by someone else, or taken over by another
                        // runtime: either way the mailbox is not ours to terminate.
                        mailbox_gone = true;
                        match mailbox.closed_because() {
                            Some(HandleError::Terminated(_)) => {
                                tracing::info!(agent = %id, "mailbox terminated; shutting down");
                            }
                            reason => {
                                let reason = reason.map_or("subscription ended".into(), |r| r.to_string());
                                tracing::error!(agent = %id, %reason, "mailbox lost; shutting down");
                                failure.get_or_insert(AgentError::MailboxLost { id, reason });
                            }
                        }
                        break;
                    };
                    let Some(header) = message.header else {
                        mailbox.ack(seq);
                        continue;
                    };
                    match message.body {
                        Some(Body::ActionRequest(request)) => {
                            // A redelivery of a request still running is a duplicate.
                            if !in_flight.insert(seq) {
                                continue;
                            }
                            actions.spawn(action(Origin::Queued(seq), header, request));
                        }
                        Some(Body::PingRequest(_)) => {
                            let mailbox = mailbox.clone();
                            tokio::spawn(async move {
                                let pong = Body::SuccessResponse(pb::SuccessResponse {});
                                if let Err(e) = mailbox.reply(&header, pong).await {
                                    tracing::debug!(error = %e, "cannot answer ping");
                                }
                                mailbox.ack(seq);
                            });
                        }
                        Some(Body::ShutdownRequest(request)) => {
                            mailbox.ack(seq);
                            tracing::info!(agent = %id, from = %header.src, "shutdown requested");
                            stop.stop(request.terminate);
                            break;
                        }
                        _ => mailbox.ack(seq),
                    }
                }
            }
        }
    }

    // Shutdown: signal loops, settle actions, run the hook, terminate or keep
    // the mailbox. Requests that came directly and were not started go back
    // to their senders, who send them through the exchange.
    drop(hosted);
    drop(direct_requests);
    shutdown.cancel();
    let cancel = config.cancel_actions_on_shutdown;
    if cancel && !stop.moving.load(Ordering::SeqCst) {
        cancel_actions.cancel();
    }
    loop {
        tokio::select! {
            done = actions.join_next() => if done.is_none() { break },
            () = stop.hurry.cancelled(), if cancel && !cancel_actions.is_cancelled() => {
                cancel_actions.cancel();
            }
        }
    }
    let settle = async {
        while let Some(done) = loops.join_next().await {
            if let Some(err) = loop_failure(id, done) {
                failure.get_or_insert(err);
            }
        }
    };
    if tokio::time::timeout(config.loop_shutdown_grace, settle).await.is_err() {
        tracing::warn!(agent = %id, "control loops ignored shutdown; aborting them");
        loops.abort_all();
    }
    if started {
        let hook = guarded(context::scope(context.clone(), behaviour.clone().on_shutdown()));
        if let Err(message) = hook.await.and_then(|r| r) {
            tracing::error!(agent = %id, %message, "shutdown hook failed");
            failure.get_or_insert(AgentError::ShutdownHook { id, message });
        }
    }
    stop_committing.cancel();
    if let Some(committer) = committer {
        let saved = committer.await.unwrap_or_else(|e| Err(e.to_string()));
        if let Err(message) = saved {
            tracing::error!(agent = %id, %message, "cannot save the agent's state at shutdown");
            failure.get_or_insert(AgentError::State { id, message });
        }
    }
    if keeper.as_ref().is_some_and(|k| k.fenced()) {
        // A later incarnation has the mailbox: leave it to it.
        mailbox_gone = true;
        let reason = "a later incarnation saved the agent's state".to_owned();
        failure.get_or_insert(AgentError::MailboxLost { id, reason });
    }
    mailbox.close().await;
    let requested = *stop.terminate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let terminate = requested.unwrap_or(if failure.is_some() {
        config.terminate_on_error
    } else {
        config.terminate_on_success
    });
    if terminate
        && !mailbox_gone
        && let Err(e) = exchange.terminate(&id).await
    {
        tracing::warn!(agent = %id, error = %e, "cannot terminate mailbox");
    }
    tracing::info!(agent = %id, terminated = terminate, failed = failure.is_some(), "agent stopped");
    failure.map_or(Ok(()), Err)
}

/// Where a request came from: the mailbox (its seq), or a peer endpoint.
enum Origin {
    Queued(u64),
    Direct(Reply),
}

/// Runs one action and answers the caller; returns the request's seq (none
/// for one that came directly).
/// With a keeper, an action that may change the state waits for its turn,
/// and its answer and acknowledgement are committed with the state it left
/// (docs/design.md, "State"). An incarnation fenced off by a later one
/// neither answers nor acknowledges: the request waits for the later one.
#[allow(clippy::too_many_arguments)]
async fn serve_action<B: Behaviour>(
    behaviour: Arc<B>,
    mailbox: Arc<Mailbox>,
    cancel: CancellationToken,
    keeper: Option<Arc<Keeper>>,
    shutdown: CancellationToken,
    origin: Origin,
    header: pb::Header,
    request: pb::ActionRequest,
) -> Option<u64> {
    let action = request.action;
    // The action runs in a span under the caller's, and its own calls
    // under it; log lines inside carry the trace id.
    let traced = Traced::start(
        || format!("{} {action}", B::NAME),
        SpanKind::Server,
        trace::of_header(&header),
        || {
            vec![
                KeyValue::new("academy.agent", header.dest.clone()),
                KeyValue::new("academy.action", action.clone()),
                KeyValue::new("academy.caller", header.src.clone()),
            ]
        },
    );
    let started = crate::metrics::enabled().then(std::time::Instant::now);
    // On a simulated clock: running from here until the answer leaves.
    let counted = Counted::start(&mailbox, &header).await;
    // Read-only actions run side by side, outside the commits.
    let keeper = keeper.filter(|_| !B::READ_ONLY_ACTIONS.contains(&action.as_str()));
    let turn = match &keeper {
        Some(keeper) => Some(keeper.turn().await),
        None => None,
    };
    // Arguments sent by reference are read first (the caller frees them;
    // those put at this agent's endpoint go once read).
    let directly = matches!(&origin, Origin::Direct(reply) if reply.reads_peer_blobs());
    let outcome = match mailbox.resolve(request.args, false).await {
        Err(err) => Err(unreadable(&action, &err)),
        Ok(args) => {
            let dispatch = behaviour.clone().dispatch(action.clone(), args);
            // Only a traced request pays for carrying its context.
            let run = match trace::trace_id(traced.context()) {
                Some(trace_id) => {
                    let logged = tracing::info_span!("action", %action, %trace_id);
                    Either::Left(
                        guarded(dispatch.with_context(traced.context().clone())).instrument(logged),
                    )
                }
                None => Either::Right(guarded(dispatch)),
            };
            tokio::select! {
                outcome = run => outcome.unwrap_or_else(|panic| {
                    tracing::error!(action, %panic, "action panicked");
                    Err(ActionError::internal(format!("{action} {panic}")))
                }),
                () = cancel.cancelled() => Err(ActionError::cancelled(&action)),
            }
        }
    };
    // A large result goes by reference.
    let outcome = match outcome {
        Ok(result) => mailbox.offload(result, directly).await.map_err(|e| {
            ActionError::internal(format!("{action}: its result could not be kept as a blob: {e}"))
        }),
        Err(err) => Err(err),
    };
    // Named again should the state not be saved.
    let name = keeper.as_ref().map(|_| action.clone()).unwrap_or_default();
    let body = match outcome {
        Ok(result) => {
            crate::metrics::observe(B::NAME, &action, None, started);
            Body::ActionResponse(pb::ActionResponse { action, result: Some(result) })
        }
        Err(err) => {
            let response = err.into_response();
            let code = tonic::Code::from_i32(response.code);
            crate::metrics::observe(B::NAME, &action, Some(code), started);
            traced.fail(&format!("{}: {}", response.kind, response.message));
            Body::ErrorResponse(response)
        }
    };
    counted.answering().await;
    let seq = match origin {
        // An agent with a state is not hosted at an endpoint: nothing to commit.
        Origin::Direct(reply) => {
            let header = header.reply_from(header.dest.clone());
            reply.answer(pb::Message { header: Some(header), body: Some(body) });
            return None;
        }
        Origin::Queued(seq) => seq,
    };
    let (Some(keeper), Some(turn)) = (keeper, turn) else {
        reply_patiently(&mailbox, &header, body).await;
        mailbox.ack(seq);
        return Some(seq);
    };
    let answer =
        pb::Message { header: Some(header.reply_from(header.dest.clone())), body: Some(body) };
    match keeper.commit(&*behaviour, turn, seq, answer).await {
        Outcome::Committed(None) => {}
        // Committed, acknowledged, but not queued with the commit: sent now.
        Outcome::Committed(Some((answer, why))) => {
            if let Some(why) = &why {
                tracing::debug!(to = %header.src, error = %why, "answer not queued with its commit; sending it");
            }
            if let Some(body) = answer.body {
                reply_patiently(&mailbox, &header, body).await;
            }
        }
        Outcome::Saved(answer) => {
            if let Some(body) = answer.body {
                reply_patiently(&mailbox, &header, body).await;
            }
            mailbox.ack(seq);
        }
        Outcome::Fenced => shutdown.cancel(),
        Outcome::Failed(message) => {
            tracing::error!(agent = %header.dest, action = name, %message, "state not saved");
            let error = ActionError::internal(format!(
                "{name} ran, but the agent's state was not saved: {message}"
            ));
            reply_patiently(&mailbox, &header, Body::ErrorResponse(error.into_response())).await;
            mailbox.ack(seq);
        }
    }
    Some(seq)
}

/// The error answering a request whose arguments' blob cannot be read:
/// NOT_FOUND when it is gone, UNAVAILABLE when the exchange does not
/// answer, INVALID_ARGUMENT otherwise.
fn unreadable(action: &str, err: &ClientError) -> ActionError {
    let code = match err {
        ClientError::Exchange(e) => e.code(),
        ClientError::Transport(_) => tonic::Code::Unavailable,
        ClientError::Refused { code, .. } => *code,
    };
    ActionError {
        code,
        kind: "BlobUnreadable".into(),
        message: format!("{action}: its arguments cannot be read: {err}"),
    }
}

/// An action as a simulated clock counts it: a request sent on the clock
/// is taken when the action starts and its answer sent on the clock; any
/// action of an agent on a simulated clock runs on it.
struct Counted<'a> {
    exchange: &'a SharedExchange,
    header: &'a pb::Header,
    counted: bool,
}

impl<'a> Counted<'a> {
    async fn start(mailbox: &'a Mailbox, header: &'a pb::Header) -> Self {
        let exchange = mailbox.exchange();
        let counted = if header.on_clock {
            crate::clock::mark(exchange, MarkKind::Take, &header.tag).await;
            true
        } else if crate::clock::current().is_simulated() {
            crate::clock::mark(exchange, MarkKind::Begin, "").await;
            true
        } else {
            false
        };
        Self { exchange, header, counted }
    }

    /// The action is done: its answer goes on the clock (before it leaves).
    async fn answering(self) {
        if self.header.on_clock {
            crate::clock::mark(self.exchange, MarkKind::Send, &self.header.answer_key()).await;
        }
        if self.counted {
            crate::clock::mark(self.exchange, MarkKind::End, "").await;
        }
    }
}

/// How long to keep trying what the exchange cannot take yet (an answer, a
/// save): 10 ms, doubling, about half a minute in all.
#[derive(Debug)]
pub(crate) struct Patience(Duration);

impl Patience {
    pub(crate) fn new() -> Self {
        Self(Duration::from_millis(10))
    }

    /// Whether there is patience left for another try.
    pub(crate) fn left(&self) -> bool {
        self.0 < Duration::from_secs(16)
    }

    /// The wait before the next try.
    pub(crate) fn delay(&self) -> Duration {
        self.0
    }

    /// Waits before the next try, and longer the time after.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 *= 2;
    }
}

/// Answers a request, retrying with backoff (for about half a minute) while
/// the exchange is unreachable or the caller's mailbox is full, rather than
/// dropping the answer.
async fn reply_patiently(mailbox: &Mailbox, request: &pb::Header, mut body: Body) {
    use academy_proto::ExchangeError::{MailboxFull, ShuttingDown, TooLarge, Unavailable};
    let mut patience = Patience::new();
    loop {
        match mailbox.reply(request, body.clone()).await {
            Ok(()) => return,
            // A result larger than the exchange takes: the caller gets an
            // error saying so instead of waiting for its timeout.
            Err(ClientError::Exchange(err @ TooLarge { .. }))
                if matches!(body, Body::ActionResponse(_)) =>
            {
                let Body::ActionResponse(response) = &body else { unreachable!() };
                let message = format!("the result of {} is too large: {err}", response.action);
                let error = ActionError {
                    code: tonic::Code::ResourceExhausted,
                    kind: "ResultTooLarge".into(),
                    message,
                };
                body = Body::ErrorResponse(error.into_response());
            }
            Err(
                e @ (ClientError::Transport(_)
                | ClientError::Exchange(MailboxFull { .. } | Unavailable(_) | ShuttingDown)),
            ) if patience.left() => {
                let backoff = patience.delay();
                tracing::debug!(to = %request.src, error = %e, ?backoff, "answer not sent yet; retrying");
                patience.wait().await;
            }
            Err(e) => {
                return tracing::warn!(to = %request.src, error = %e, "cannot answer request");
            }
        }
    }
}

fn loop_failure(
    id: EntityId,
    done: Result<(&'static str, Result<(), String>), tokio::task::JoinError>,
) -> Option<AgentError> {
    match done {
        Ok((_, Ok(()))) => None,
        Ok((name, Err(message))) => Some(AgentError::Loop { id, name: name.into(), message }),
        Err(e) if e.is_cancelled() => None,
        Err(e) => Some(AgentError::Loop { id, name: "?".into(), message: e.to_string() }),
    }
}
