//! What the exchange says about a mailbox and the agent behind it.

use crate::{EntityId, ExchangeError, pb};

/// An agent as the exchange registered it: what discovery lists and
/// `Status` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredAgent {
    /// The agent's id, also its mailbox's address.
    pub id: EntityId,
    /// Its behaviour name, e.g. `example.Counter`.
    pub behaviour: String,
    /// The other behaviour names (interfaces) it implements.
    pub implements: Vec<String>,
    /// Its optional human-readable name.
    pub name: String,
    /// The principal that registered it (empty without authentication).
    pub owner: String,
    /// What it can do, as it described itself when registered; kept by the
    /// exchange, and given only when asked for (`Describe`).
    pub description: Option<std::sync::Arc<pb::AgentDescription>>,
    /// In discovery: the peer endpoint its subscriber advertised (empty:
    /// none; docs/design.md, "Direct delivery").
    pub endpoint: String,
}

impl From<RegisteredAgent> for pb::AgentInfo {
    fn from(agent: RegisteredAgent) -> Self {
        Self {
            agent_id: agent.id.to_string(),
            behaviour: agent.behaviour,
            implements: agent.implements,
            name: agent.name,
            owner: agent.owner,
            description: None,
            endpoint: agent.endpoint,
        }
    }
}

impl TryFrom<pb::AgentInfo> for RegisteredAgent {
    type Error = ExchangeError;

    fn try_from(info: pb::AgentInfo) -> Result<Self, ExchangeError> {
        Ok(Self {
            id: EntityId::parse_field(&info.agent_id, "agent_id")?,
            behaviour: info.behaviour,
            implements: info.implements,
            name: info.name,
            owner: info.owner,
            description: info.description.map(std::sync::Arc::new),
            endpoint: info.endpoint,
        })
    }
}

/// Which agents discovery finds for a behaviour name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Matching {
    /// Agents whose behaviour is the name or that implement it (as an
    /// interface).
    #[default]
    Implements,
    /// Agents whose own behaviour is the name (`DiscoverRequest.exact`).
    Exact,
}

impl Matching {
    /// From `DiscoverRequest.exact`.
    pub fn exact(exact: bool) -> Self {
        if exact { Self::Exact } else { Self::Implements }
    }
}

/// The state of a mailbox, as `Status` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxStatus {
    /// `Missing` (never registered, a terminated client's, or one whose
    /// gravestone expired), `Active` or `Terminated` (an agent's, while its
    /// gravestone is kept).
    pub state: pb::MailboxState,
    /// Unacknowledged messages in it.
    pub queued: usize,
    /// The agent, for an active agent's mailbox.
    pub agent: Option<RegisteredAgent>,
    /// Someone is subscribed to the (active) mailbox now.
    pub subscribed: bool,
    /// The peer endpoint its subscriber advertised, while subscribed (empty:
    /// none).
    pub endpoint: String,
}

impl MailboxStatus {
    /// The status of an id no mailbox has.
    pub fn missing() -> Self {
        Self {
            state: pb::MailboxState::Missing,
            queued: 0,
            agent: None,
            subscribed: false,
            endpoint: String::new(),
        }
    }

    /// The status of a terminated agent's id.
    pub fn terminated() -> Self {
        Self { state: pb::MailboxState::Terminated, ..Self::missing() }
    }
}

impl From<MailboxStatus> for pb::StatusResponse {
    fn from(status: MailboxStatus) -> Self {
        Self {
            state: status.state.into(),
            queued: status.queued as u64,
            agent: status.agent.map(Into::into),
            subscribed: status.subscribed,
            endpoint: status.endpoint,
        }
    }
}

impl TryFrom<pb::StatusResponse> for MailboxStatus {
    type Error = ExchangeError;

    fn try_from(status: pb::StatusResponse) -> Result<Self, ExchangeError> {
        let state = match status.state() {
            pb::MailboxState::Unspecified => pb::MailboxState::Missing,
            state => state,
        };
        Ok(Self {
            state,
            queued: usize::try_from(status.queued).unwrap_or(usize::MAX),
            agent: status.agent.map(RegisteredAgent::try_from).transpose()?,
            subscribed: status.subscribed,
            endpoint: status.endpoint,
        })
    }
}

/// A simulated clock now (docs/design.md, "Clocks").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClockStatus {
    /// Simulated time since the simulation's start.
    pub now: std::time::Duration,
    /// Running tasks and messages in flight on it.
    pub pending: u64,
    /// Tasks asleep until a time.
    pub sleepers: u64,
}

impl From<ClockStatus> for pb::NowResponse {
    fn from(status: ClockStatus) -> Self {
        Self {
            now: Some(crate::duration::to_proto(status.now)),
            pending: status.pending,
            sleepers: status.sleepers,
        }
    }
}

impl From<pb::NowResponse> for ClockStatus {
    fn from(now: pb::NowResponse) -> Self {
        let time = now.now.and_then(|d| crate::duration::from_proto(d, "now").ok());
        Self { now: time.unwrap_or_default(), pending: now.pending, sleepers: now.sleepers }
    }
}
