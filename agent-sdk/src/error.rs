//! Errors of the SDK, by concern.

use std::time::Duration;

use academy_proto::{EntityId, ExchangeError};

/// An exchange operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    /// The exchange answered with an error (unknown id, terminated mailbox, ...).
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The exchange (or launcher) could not be reached or the connection
    /// broke; retryable. The message says which and why.
    #[error("unreachable: {0}")]
    Transport(String),
    /// A service refused the call for a reason of its own (the launcher: an
    /// unknown agent, a caller not permitted, ...); retrying will not help.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// The status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        if let Some(err) = ExchangeError::from_status(&status) {
            return Self::Exchange(err);
        }
        match status.code() {
            code @ (Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented) => Self::Refused { code, message: status.message().to_owned() },
            code => Self::Transport(format!("{code}: {}", status_text(&status))),
        }
    }
}

impl From<tonic::transport::Error> for ClientError {
    fn from(err: tonic::transport::Error) -> Self {
        Self::Transport(describe(&err))
    }
}

/// A status's message and the causes under it: for a broken connection,
/// tonic's message is just "transport error" and the cause is what tells.
pub fn status_text(status: &tonic::Status) -> String {
    with_causes(status.message().to_owned(), std::error::Error::source(status))
}

/// An error with its cause: tonic's own text is just "transport error".
pub(crate) fn describe(err: &tonic::transport::Error) -> String {
    with_causes(err.to_string(), std::error::Error::source(err))
}

fn with_causes(mut text: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// A call through a handle failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    /// The agent answered with an error: the action failed (`code` UNKNOWN), its
    /// arguments didn't decode (INVALID_ARGUMENT), it doesn't exist
    /// (UNIMPLEMENTED) or was cancelled at shutdown (CANCELLED).
    #[error("{action} failed: {kind}: {message}")]
    Remote {
        /// The action called.
        action: String,
        /// The error's gRPC code.
        code: tonic::Code,
        /// The error's kind, e.g. the Rust type name of the action's error.
        kind: String,
        /// What went wrong.
        message: String,
    },
    /// The agent's mailbox (or the caller's own) is terminated.
    #[error("mailbox {0} is terminated")]
    Terminated(EntityId),
    /// No mailbox has this id.
    #[error("mailbox {0} not found")]
    NotFound(EntityId),
    /// No response came within the call's timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The exchange refused the request (too large, mailbox full, ...).
    #[error(transparent)]
    Exchange(ExchangeError),
    /// The exchange could not be reached; retryable.
    #[error("exchange unreachable: {0}")]
    Transport(String),
    /// Arguments or result could not be (de)serialised.
    #[error("codec: {0}")]
    Codec(String),
    /// A service refused the call for a reason of its own (see [`ClientError::Refused`]).
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// The status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
    /// The handle has no mailbox to send from: use it inside an agent, or get it
    /// from a manager.
    #[error(
        "handle to {0} is not bound to a mailbox (get it from a Manager or use it inside an agent)"
    )]
    Unbound(EntityId),
}

impl HandleError {
    /// Whether retrying the same call may succeed: no answer in time, the
    /// exchange unreachable, shutting down (another replica, or its
    /// replacement, will serve) or without its store for now, a full mailbox.
    pub fn is_retryable(&self) -> bool {
        use ExchangeError::{
            DeadlineExceeded, MailboxBytesFull, MailboxFull, ShuttingDown, Unavailable,
        };
        matches!(self, Self::Timeout(_) | Self::Transport(_))
            || matches!(
                self,
                Self::Exchange(
                    MailboxFull { .. }
                        | MailboxBytesFull { .. }
                        | ShuttingDown
                        | Unavailable(_)
                        | DeadlineExceeded(_)
                )
            )
    }
}

impl From<ClientError> for HandleError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Exchange(ExchangeError::NotFound(id)) => Self::NotFound(id),
            ClientError::Exchange(ExchangeError::Terminated(id)) => Self::Terminated(id),
            ClientError::Exchange(e) => Self::Exchange(e),
            ClientError::Transport(e) => Self::Transport(e),
            ClientError::Refused { code, message } => Self::Refused { code, message },
        }
    }
}

/// Why an agent stopped other than by a requested shutdown.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AgentError {
    /// Its startup hook failed.
    #[error("agent {id}: startup hook failed: {message}")]
    Startup {
        /// The agent.
        id: EntityId,
        /// What the hook said.
        message: String,
    },
    /// One of its control loops (or timers) failed.
    #[error("agent {id}: control loop {name} failed: {message}")]
    Loop {
        /// The agent.
        id: EntityId,
        /// The loop's method name.
        name: String,
        /// What the loop said.
        message: String,
    },
    /// Its shutdown hook failed.
    #[error("agent {id}: shutdown hook failed: {message}")]
    ShutdownHook {
        /// The agent.
        id: EntityId,
        /// What the hook said.
        message: String,
    },
    /// Its saved state could not be loaded (or saved at shutdown).
    #[error("agent {id}: state: {message}")]
    State {
        /// The agent.
        id: EntityId,
        /// What went wrong.
        message: String,
    },
    /// The exchange refused or could not be reached.
    #[error("agent {id}: {source}")]
    Exchange {
        /// The agent.
        id: EntityId,
        /// Why.
        source: ClientError,
    },
    /// The mailbox stopped delivering for another reason than termination
    /// (another runtime took it over): this runtime leaves the mailbox alone.
    #[error("agent {id}: lost its mailbox: {reason}")]
    MailboxLost {
        /// The agent.
        id: EntityId,
        /// Why.
        reason: String,
    },
    /// Its runtime panicked or was aborted.
    #[error("agent {id}: runtime task panicked or was aborted")]
    Panicked {
        /// The agent.
        id: EntityId,
    },
}

/// An error the manager reports.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ManagerError {
    /// No agent with this id was launched by this manager.
    #[error("agent {0} is not managed here")]
    UnknownAgent(EntityId),
    /// The agent did not stop in time.
    #[error("agent {0} did not stop within {1:?}")]
    Timeout(EntityId, Duration),
    /// The agent stopped with this failure.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The exchange refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Agents failed (when closing the manager).
    #[error("{} agents failed; first: {}", .0.len(), .0[0])]
    Agents(Vec<AgentError>),
}
