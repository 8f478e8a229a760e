//! Where mailboxes live. The [`Exchange`](crate::Exchange) façade validates,
//! applies limits and answers requests left in terminated mailboxes; a backend
//! stores mailboxes and delivers their messages.

use academy_proto::pb;
use async_trait::async_trait;

use crate::{AgentInfo, Delivery, EntityId, ExchangeError, MailboxState, MailboxStatus};

pub(crate) mod memory;
pub(crate) mod redis;

/// Storage of mailboxes. Errors use the exchange's own kinds; a backend that
/// can't reach its store answers [`ExchangeError::Unavailable`].
#[async_trait]
pub(crate) trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a mailbox (an agent's when `agent` is given).
    async fn create(&self, id: EntityId, agent: Option<AgentInfo>) -> Result<(), ExchangeError>;

    /// Marks a mailbox terminated and empties it; returns its state before and
    /// the messages that were still unacknowledged.
    async fn terminate(
        &self,
        id: &EntityId,
    ) -> Result<(MailboxState, Vec<pb::Message>), ExchangeError>;

    async fn status(&self, id: &EntityId) -> Result<MailboxStatus, ExchangeError>;

    /// Active agents listing `name` (`exact`: as their own behaviour); all
    /// active agents for the empty name.
    async fn discover(&self, name: &str, exact: bool) -> Result<Vec<AgentInfo>, ExchangeError>;

    /// Appends messages to their destinations, in order; one result each.
    /// `max_queued` bounds each destination's unacknowledged messages.
    async fn enqueue(
        &self,
        messages: Vec<(EntityId, pb::Message)>,
        max_queued: Option<usize>,
    ) -> Vec<Result<(), ExchangeError>>;

    /// Becomes the one subscriber of a mailbox, from its oldest unacknowledged message.
    async fn subscribe(&self, id: &EntityId)
    -> Result<Box<dyn BackendSubscription>, ExchangeError>;

    async fn acknowledge(&self, id: &EntityId, seqs: &[u64]) -> Result<(), ExchangeError>;

    /// Deletes a transient client mailbox without a gravestone.
    async fn forget(&self, id: &EntityId);
}

/// One subscriber's view of a mailbox.
#[async_trait]
pub(crate) trait BackendSubscription: Send + std::fmt::Debug {
    /// Waits for messages; at least one, at most `max`, stopping once
    /// `max_bytes` are gathered. Ends with `Terminated` or `Superseded`.
    async fn next_batch(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Delivery>, ExchangeError>;
}
