//! Errors of the exchange and their gRPC status codes (docs/design.md, "Errors").

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::EntityId;

/// Domain of the `google.rpc.ErrorInfo` attached to every error status.
pub const ERROR_DOMAIN: &str = "academy.v1";

/// Why an exchange operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExchangeError {
    /// A malformed id or request; the message says what to fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// No mailbox has this id.
    #[error("mailbox {0} not found")]
    NotFound(EntityId),
    /// The mailbox is terminated (for good).
    #[error("mailbox {0} is terminated")]
    Terminated(EntityId),
    /// A mailbox with this id exists already.
    #[error("mailbox {0} already exists")]
    AlreadyExists(EntityId),
    /// The caller is not the mailbox's owner.
    #[error(
        "mailbox {id} belongs to principal {owner:?}: only it may receive from it, send from it, shut its agent down or terminate it"
    )]
    PermissionDenied {
        /// The mailbox.
        id: EntityId,
        /// The principal that owns it.
        owner: String,
    },
    /// No credentials, or credentials the server does not know.
    #[error("{0}")]
    Unauthenticated(String),
    /// The mailbox holds as many unacknowledged messages as it may.
    #[error("mailbox {id} is full ({limit} queued messages)")]
    MailboxFull {
        /// The mailbox.
        id: EntityId,
        /// Its bound.
        limit: usize,
    },
    /// A message larger than the exchange accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Another subscriber took the mailbox over.
    #[error("subscription to mailbox {0} was replaced by a newer subscriber")]
    Superseded(EntityId),
    /// The exchange is shutting down; try another replica or again later.
    #[error("the exchange is shutting down")]
    ShuttingDown,
    /// No answer in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The backend's store (Redis) can't be reached; retryable.
    #[error("mailbox store unavailable: {0}")]
    Unavailable(String),
}

impl ExchangeError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Terminated(_) => Code::FailedPrecondition,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::MailboxFull { .. } | Self::TooLarge { .. } => Code::ResourceExhausted,
            Self::Superseded(_) => Code::Aborted,
            Self::ShuttingDown | Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
        }
    }

    /// Machine-readable reason, sent as `google.rpc.ErrorInfo.reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::NotFound(_) => "MAILBOX_NOT_FOUND",
            Self::Terminated(_) => "MAILBOX_TERMINATED",
            Self::AlreadyExists(_) => "MAILBOX_EXISTS",
            Self::PermissionDenied { .. } => "NOT_OWNER",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::MailboxFull { .. } => "MAILBOX_FULL",
            Self::TooLarge { .. } => "MESSAGE_TOO_LARGE",
            Self::Superseded(_) => "SUBSCRIPTION_SUPERSEDED",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Self::Unavailable(_) => "STORE_UNAVAILABLE",
        }
    }
}

impl ExchangeError {
    /// Rebuilds the error from a status made by `From<ExchangeError> for Status`
    /// (on the client side of a gRPC call); `None` for any other status.
    pub fn from_status(status: &Status) -> Option<Self> {
        let info = status.get_details_error_info().filter(|i| i.domain == ERROR_DOMAIN)?;
        Self::from_parts(&info.reason, &info.metadata, status.message())
    }

    /// Rebuilds the error from its reason, metadata and message.
    pub fn from_parts(
        reason: &str,
        metadata: &HashMap<String, String>,
        message: &str,
    ) -> Option<Self> {
        let id = || metadata.get("id")?.parse::<EntityId>().ok();
        let number = |key: &str| metadata.get(key)?.parse::<usize>().ok();
        let message = message.to_owned();
        Some(match reason {
            "INVALID_ARGUMENT" => Self::InvalidArgument(message),
            "MAILBOX_NOT_FOUND" => Self::NotFound(id()?),
            "MAILBOX_TERMINATED" => Self::Terminated(id()?),
            "MAILBOX_EXISTS" => Self::AlreadyExists(id()?),
            "NOT_OWNER" => {
                Self::PermissionDenied { id: id()?, owner: metadata.get("owner")?.clone() }
            }
            "UNAUTHENTICATED" => Self::Unauthenticated(message),
            "MAILBOX_FULL" => Self::MailboxFull { id: id()?, limit: number("limit")? },
            "MESSAGE_TOO_LARGE" => {
                Self::TooLarge { size: number("size")?, limit: number("limit")? }
            }
            "SUBSCRIPTION_SUPERSEDED" => Self::Superseded(id()?),
            "SHUTTING_DOWN" => Self::ShuttingDown,
            "DEADLINE_EXCEEDED" => Self::DeadlineExceeded(message),
            "STORE_UNAVAILABLE" => Self::Unavailable(
                message.strip_prefix("mailbox store unavailable: ").unwrap_or(&message).to_owned(),
            ),
            _ => return None,
        })
    }

    /// Machine-readable details: the mailbox id, sizes and limits.
    pub fn metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::new();
        match self {
            Self::NotFound(id)
            | Self::Terminated(id)
            | Self::AlreadyExists(id)
            | Self::Superseded(id) => {
                metadata.insert("id".into(), id.to_string());
            }
            Self::PermissionDenied { id, owner } => {
                metadata.insert("id".into(), id.to_string());
                metadata.insert("owner".into(), owner.clone());
            }
            Self::MailboxFull { id, limit } => {
                metadata.insert("id".into(), id.to_string());
                metadata.insert("limit".into(), limit.to_string());
            }
            Self::TooLarge { size, limit } => {
                metadata.insert("size".into(), size.to_string());
                metadata.insert("limit".into(), limit.to_string());
            }
            Self::InvalidArgument(_)
            | Self::Unauthenticated(_)
            | Self::ShuttingDown
            | Self::DeadlineExceeded(_)
            | Self::Unavailable(_) => {}
        }
        metadata
    }
}

impl From<ExchangeError> for Status {
    fn from(err: ExchangeError) -> Self {
        let details = ErrorDetails::with_error_info(err.reason(), ERROR_DOMAIN, err.metadata());
        Status::with_error_details(err.code(), err.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips() {
        let id = EntityId::new_agent();
        for err in [
            ExchangeError::NotFound(id),
            ExchangeError::Terminated(id),
            ExchangeError::MailboxFull { id, limit: 3 },
            ExchangeError::PermissionDenied { id, owner: "alice".into() },
            ExchangeError::Unauthenticated("unknown bearer token".into()),
            ExchangeError::TooLarge { size: 10, limit: 5 },
            ExchangeError::InvalidArgument("bad".into()),
            ExchangeError::ShuttingDown,
            ExchangeError::Unavailable("connection refused".into()),
        ] {
            let status = Status::from(err.clone());
            assert_eq!(status.code(), err.code());
            assert_eq!(ExchangeError::from_status(&status), Some(err));
        }
        assert_eq!(ExchangeError::from_status(&Status::internal("x")), None);
    }
}
