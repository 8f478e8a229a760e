//! Errors of the exchange and their gRPC status codes (docs/design.md, "Errors").

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::EntityId;

/// Domain of the `google.rpc.ErrorInfo` attached to every error status.
pub const ERROR_DOMAIN: &str = "academy.v1";

/// Longest status message sent, in bytes: a longer one is cut, so that an
/// error never echoes a large input back (grpc-core clients refuse response
/// metadata over 16 KiB, and the message travels twice: in `grpc-message` and
/// in `grpc-status-details-bin`).
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// `text`, cut to [`MAX_STATUS_MESSAGE_BYTES`] (on a character boundary) with
/// a note of how much was left out.
pub fn bounded(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_STATUS_MESSAGE_BYTES {
        return text.into();
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES - 64;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end).into()
}

/// `text` as it may appear inside an error message: at most 64 characters,
/// quoted.
pub fn excerpt(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

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
    /// The mailbox holds as many bytes of unacknowledged messages as it may.
    #[error("mailbox {id} is full ({limit} bytes queued)")]
    MailboxBytesFull {
        /// The mailbox.
        id: EntityId,
        /// Its bound, in bytes.
        limit: usize,
    },
    /// A request beyond a fixed limit of the protocol (messages per batch,
    /// seqs per acknowledgement, names per agent, a name's length).
    #[error("{limit} is at most {max}; this request has {found}")]
    LimitExceeded {
        /// What is limited, e.g. "messages per SendBatch".
        limit: String,
        /// The limit.
        max: usize,
        /// What the request had.
        found: usize,
    },
    /// A principal holds as much as its quota allows.
    #[error("principal {principal:?} is at its quota of {max} {quota}")]
    QuotaExceeded {
        /// The principal.
        principal: String,
        /// What is limited, e.g. "mailboxes".
        quota: String,
        /// The quota.
        max: usize,
    },
    /// A subscriber of an older incarnation of the agent (an earlier
    /// placement epoch) than the mailbox's current one: it must stop.
    #[error("mailbox {id} belongs to incarnation {current} now; {epoch} is stale")]
    StaleEpoch {
        /// The mailbox.
        id: EntityId,
        /// The subscriber's epoch.
        epoch: u64,
        /// The mailbox's current epoch.
        current: u64,
    },
    /// A message larger than the exchange accepts.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The saved state is at another revision than the one the saver saw.
    #[error("the state of {id} is at revision {current}, not {expected}")]
    StateConflict {
        /// The agent.
        id: EntityId,
        /// The revision the saver expected.
        expected: u64,
        /// The revision saved.
        current: u64,
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
    /// No blob has this key (docs/design.md, "Blobs"): freed, expired, or
    /// never put.
    #[error("blob {0} not found: freed, expired or never put")]
    BlobNotFound(String),
    /// The exchange keeps as many bytes of blobs as it may.
    #[error("the blob store is full ({limit} bytes kept)")]
    BlobStoreFull {
        /// Its bound, in bytes.
        limit: u64,
    },
    /// A mark or sleep names a participant the simulated clock does not
    /// have: it left (its `Participate` call ended) or never joined.
    #[error(
        "participant {0} is not on the clock: it left (its Participate calls ended and none came back within the grace) or never joined"
    )]
    NotOnClock(u64),
}

impl ExchangeError {
    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) | Self::BlobNotFound(_) => Code::NotFound,
            Self::Terminated(_) => Code::FailedPrecondition,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::PermissionDenied { .. } => Code::PermissionDenied,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::MailboxFull { .. }
            | Self::MailboxBytesFull { .. }
            | Self::TooLarge { .. }
            | Self::QuotaExceeded { .. }
            | Self::BlobStoreFull { .. } => Code::ResourceExhausted,
            Self::LimitExceeded { .. } => Code::InvalidArgument,
            Self::StaleEpoch { .. } | Self::NotOnClock(_) => Code::FailedPrecondition,
            Self::Superseded(_) | Self::StateConflict { .. } => Code::Aborted,
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
            Self::MailboxFull { .. } | Self::MailboxBytesFull { .. } => "MAILBOX_FULL",
            Self::LimitExceeded { .. } => "LIMIT_EXCEEDED",
            Self::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Self::StaleEpoch { .. } => "STALE_EPOCH",
            Self::TooLarge { .. } => "MESSAGE_TOO_LARGE",
            Self::Superseded(_) => "SUBSCRIPTION_SUPERSEDED",
            Self::StateConflict { .. } => "STATE_CONFLICT",
            Self::ShuttingDown => "SHUTTING_DOWN",
            Self::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Self::Unavailable(_) => "STORE_UNAVAILABLE",
            Self::BlobNotFound(_) => "BLOB_NOT_FOUND",
            Self::BlobStoreFull { .. } => "BLOB_STORE_FULL",
            Self::NotOnClock(_) => "NOT_ON_CLOCK",
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
            "MAILBOX_FULL" => match number("limit_bytes") {
                Some(limit) => Self::MailboxBytesFull { id: id()?, limit },
                None => Self::MailboxFull { id: id()?, limit: number("limit")? },
            },
            "LIMIT_EXCEEDED" => Self::LimitExceeded {
                limit: metadata.get("limit")?.clone(),
                max: number("max")?,
                found: number("found")?,
            },
            "QUOTA_EXCEEDED" => Self::QuotaExceeded {
                principal: metadata.get("principal")?.clone(),
                quota: metadata.get("quota")?.clone(),
                max: number("max")?,
            },
            "STALE_EPOCH" => Self::StaleEpoch {
                id: id()?,
                epoch: metadata.get("epoch")?.parse().ok()?,
                current: metadata.get("current")?.parse().ok()?,
            },
            "MESSAGE_TOO_LARGE" => {
                Self::TooLarge { size: number("size")?, limit: number("limit")? }
            }
            "SUBSCRIPTION_SUPERSEDED" => Self::Superseded(id()?),
            "STATE_CONFLICT" => Self::StateConflict {
                id: id()?,
                expected: metadata.get("expected")?.parse().ok()?,
                current: metadata.get("current")?.parse().ok()?,
            },
            "SHUTTING_DOWN" => Self::ShuttingDown,
            "DEADLINE_EXCEEDED" => Self::DeadlineExceeded(message),
            "STORE_UNAVAILABLE" => Self::Unavailable(
                message.strip_prefix("mailbox store unavailable: ").unwrap_or(&message).to_owned(),
            ),
            "BLOB_NOT_FOUND" => Self::BlobNotFound(metadata.get("key")?.clone()),
            "BLOB_STORE_FULL" => {
                Self::BlobStoreFull { limit: metadata.get("limit")?.parse().ok()? }
            }
            "NOT_ON_CLOCK" => Self::NotOnClock(metadata.get("participant")?.parse().ok()?),
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
            Self::MailboxBytesFull { id, limit } => {
                metadata.insert("id".into(), id.to_string());
                metadata.insert("limit_bytes".into(), limit.to_string());
            }
            Self::LimitExceeded { limit, max, found } => {
                metadata.insert("limit".into(), limit.clone());
                metadata.insert("max".into(), max.to_string());
                metadata.insert("found".into(), found.to_string());
            }
            Self::QuotaExceeded { principal, quota, max } => {
                metadata.insert("principal".into(), principal.clone());
                metadata.insert("quota".into(), quota.clone());
                metadata.insert("max".into(), max.to_string());
            }
            Self::StaleEpoch { id, epoch, current } => {
                metadata.insert("id".into(), id.to_string());
                metadata.insert("epoch".into(), epoch.to_string());
                metadata.insert("current".into(), current.to_string());
            }
            Self::StateConflict { id, expected, current } => {
                metadata.insert("id".into(), id.to_string());
                metadata.insert("expected".into(), expected.to_string());
                metadata.insert("current".into(), current.to_string());
            }
            Self::TooLarge { size, limit } => {
                metadata.insert("size".into(), size.to_string());
                metadata.insert("limit".into(), limit.to_string());
            }
            Self::BlobNotFound(key) => {
                metadata.insert("key".into(), key.clone());
            }
            Self::BlobStoreFull { limit } => {
                metadata.insert("limit".into(), limit.to_string());
            }
            Self::NotOnClock(participant) => {
                metadata.insert("participant".into(), participant.to_string());
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
        Status::with_error_details(err.code(), bounded(&err.to_string()), details)
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
            ExchangeError::MailboxBytesFull { id, limit: 1 << 20 },
            ExchangeError::LimitExceeded {
                limit: "messages per SendBatch".into(),
                max: 2,
                found: 3,
            },
            ExchangeError::QuotaExceeded {
                principal: "bob".into(),
                quota: "mailboxes".into(),
                max: 9,
            },
            ExchangeError::StaleEpoch { id, epoch: 3, current: 4 },
            ExchangeError::StateConflict { id, expected: 2, current: 5 },
            ExchangeError::BlobNotFound("0f".repeat(16)),
            ExchangeError::BlobStoreFull { limit: 1 << 32 },
            ExchangeError::NotOnClock(7),
        ] {
            let status = Status::from(err.clone());
            assert_eq!(status.code(), err.code());
            assert_eq!(ExchangeError::from_status(&status), Some(err));
        }
        assert_eq!(ExchangeError::from_status(&Status::internal("x")), None);
    }

    #[test]
    fn long_messages_are_cut_and_inputs_excerpted() {
        let long = "é".repeat(5000);
        let status = Status::from(ExchangeError::InvalidArgument(long));
        assert!(status.message().len() <= MAX_STATUS_MESSAGE_BYTES, "{}", status.message().len());
        assert!(status.message().ends_with("more bytes)"), "{}", status.message());
        assert_eq!(bounded("short"), "short");
        assert_eq!(excerpt("abc"), "\"abc\"");
        let cut = excerpt(&"x".repeat(10_000));
        assert!(cut.len() < 100 && cut.ends_with("(10000 bytes)"), "{cut}");
    }
}
