//! The mailbox and agent a piece of code runs for (a task-local set by the runtime).

use std::future::Future;
use std::sync::Arc;

use academy_proto::EntityId;
use tokio_util::sync::CancellationToken;

use crate::mailbox::Mailbox;

#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) agent: Option<AgentContext>,
    /// Sender of the request being served, inside an action.
    pub(crate) caller: Option<EntityId>,
    /// The clock the task follows.
    pub(crate) clock: crate::clock::Clock,
}

tokio::task_local! {
    static CONTEXT: Context;
}

/// The agent whose action, loop or hook is running.
#[derive(Debug, Clone)]
pub struct AgentContext {
    pub(crate) id: EntityId,
    pub(crate) stop: CancellationToken,
}

impl AgentContext {
    /// The agent's id.
    pub fn id(&self) -> EntityId {
        self.id
    }

    /// Asks the agent to shut down (its own policy decides whether it terminates).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

/// The running agent, inside one of its actions, loops or hooks.
pub fn current_agent() -> Option<AgentContext> {
    CONTEXT.try_with(|c| c.agent.clone()).ok().flatten()
}

/// Who sent the request that the running action serves (an agent or a client):
/// its `header.src`. An exchange that authenticates callers only accepts a
/// message from a mailbox of its sender's principal, so there it can be trusted.
pub fn current_caller() -> Option<EntityId> {
    CONTEXT.try_with(|c| c.caller).ok().flatten()
}

pub(crate) fn current_clock() -> Option<crate::clock::Clock> {
    CONTEXT.try_with(|c| c.clock.clone()).ok()
}

pub(crate) fn current_mailbox() -> Option<Arc<Mailbox>> {
    CONTEXT.try_with(|c| c.mailbox.clone()).ok()
}

pub(crate) fn scope<F: Future>(context: Context, future: F) -> impl Future<Output = F::Output> {
    CONTEXT.scope(context, future)
}
