//! The limits of an exchange (docs/design.md, "Limits"): configurable ones in
//! [`Limits`], fixed ones of the protocol as constants. Each is refused with
//! a status and a message naming it.

use academy_proto::ExchangeError;

use crate::Retention;

/// Most messages in one `SendBatch` call.
pub const MAX_BATCH_MESSAGES: usize = 1_000;
/// Most seqs in one `Acknowledge` call.
pub const MAX_ACK_SEQS: usize = 10_000;
/// Most names an agent implements (besides its own behaviour).
pub const MAX_IMPLEMENTS: usize = 64;
/// Longest behaviour, interface, agent or action name, and message label, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest description an agent publishes, encoded, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;
/// Most agents in a Discover answer that carries their descriptions.
pub const MAX_DESCRIBED_PAGE: u32 = 100;
/// Longest trace context in a message header, in bytes.
pub const MAX_TRACE_CONTEXT_BYTES: usize = 512;
/// What every gRPC client accepts by default in one message (4 MiB): the
/// most a delivery (a `SubscribeResponse`) or an `InvokeResponse` holds.
pub const DEFAULT_MAX_DELIVERY_BYTES: usize = 4 * 1024 * 1024;
/// Room for the framing around a message in a delivery: one message of the
/// largest size accepted, delivered alone, fits in a delivery.
pub const DELIVERY_FRAMING_BYTES: usize = 1024;

/// How long a direct-delivery ticket is good for (docs/design.md, "Direct
/// delivery"): a peer endpoint ends a stream whose ticket expired.
pub const TICKET_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// The chunks blobs are kept and read in (docs/design.md, "Blobs").
pub use academy_proto::transport::BLOB_CHUNK_BYTES;
/// Longest blob key, in bytes (the exchange makes 64 hex digits).
pub const MAX_BLOB_KEY_BYTES: usize = 128;

/// Room above the message-size limit for the request around a message, so an
/// oversized message gets the exchange's own error naming both sizes.
pub const REQUEST_FRAMING_BYTES: usize = 64 * 1024;

/// Limits of an exchange, each with a clear error when passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Largest delivery (one `SubscribeResponse`, one `InvokeResponse`), in
    /// bytes: what subscribers accept. At least `max_message_bytes` plus
    /// [`DELIVERY_FRAMING_BYTES`].
    pub max_delivery_bytes: usize,
    /// Most unacknowledged messages one mailbox holds.
    pub max_queued: usize,
    /// Most bytes of unacknowledged messages one mailbox holds.
    pub max_queued_bytes: usize,
    /// Most active mailboxes one principal owns (0: no quota). Callers without
    /// a principal (no authentication, in-process) have no quota.
    pub max_mailboxes_per_principal: usize,
    /// Most bytes of unacknowledged messages one principal has sent, across
    /// all mailboxes (0: no quota).
    pub max_queued_bytes_per_principal: usize,
    /// Largest state an agent may save, in bytes (its data). The smaller of
    /// this and `max_message_bytes` applies, so that loading it fits what
    /// clients accept.
    pub max_state_bytes: usize,
    /// How long gravestones and abandoned client mailboxes are kept: what
    /// the exchange's history may cost.
    pub retention: Retention,
    /// Largest blob, in bytes.
    pub max_blob_bytes: u64,
    /// Most bytes of blobs kept at once (in memory; over Redis, Redis's own
    /// `maxmemory` bounds them).
    pub max_blob_store_bytes: u64,
    /// Longest a blob is kept: one not freed before is freed then.
    pub blob_ttl: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_DELIVERY_BYTES - DELIVERY_FRAMING_BYTES,
            max_delivery_bytes: DEFAULT_MAX_DELIVERY_BYTES,
            max_queued: 10_000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_mailboxes_per_principal: 100_000,
            max_queued_bytes_per_principal: 256 * 1024 * 1024,
            max_state_bytes: 1024 * 1024,
            retention: Retention::default(),
            max_blob_bytes: 1 << 30,
            max_blob_store_bytes: 4 << 30,
            blob_ttl: std::time::Duration::from_secs(3600),
        }
    }
}

impl Limits {
    /// Checks that the limits fit together.
    /// The largest request decoded, in bytes: a message of the largest size
    /// and [`REQUEST_FRAMING_BYTES`] around it.
    pub fn max_request_bytes(&self) -> usize {
        self.max_message_bytes.saturating_add(REQUEST_FRAMING_BYTES)
    }

    pub fn check(&self) -> Result<(), String> {
        if self.max_message_bytes == 0 || self.max_queued == 0 || self.max_queued_bytes == 0 {
            return Err(
                "the message size, queue length and queue size limits must be positive".into()
            );
        }
        if self.max_message_bytes + DELIVERY_FRAMING_BYTES > self.max_delivery_bytes {
            return Err(format!(
                "max message bytes ({}) must leave {DELIVERY_FRAMING_BYTES} bytes of framing within max delivery bytes ({}): a message of the largest size must fit in a delivery",
                self.max_message_bytes, self.max_delivery_bytes
            ));
        }
        if self.max_queued_bytes < self.max_message_bytes {
            return Err(format!(
                "max queued bytes ({}) must hold at least one message of the largest size ({})",
                self.max_queued_bytes, self.max_message_bytes
            ));
        }
        if self.max_blob_bytes > self.max_blob_store_bytes || self.blob_ttl.is_zero() {
            return Err(format!(
                "max blob bytes ({}) must fit in max blob store bytes ({}), and the blob TTL must be positive",
                self.max_blob_bytes, self.max_blob_store_bytes
            ));
        }
        Ok(())
    }
}

/// Refuses `found` items where `max` are allowed, naming the limit.
pub(crate) fn at_most(limit: &str, found: usize, max: usize) -> Result<(), ExchangeError> {
    if found > max {
        return Err(ExchangeError::LimitExceeded { limit: limit.to_owned(), max, found });
    }
    Ok(())
}

/// Refuses a name longer than [`MAX_NAME_BYTES`].
pub(crate) fn name(field: &str, value: &str) -> Result<(), ExchangeError> {
    at_most(&format!("the length of {field} in bytes"), value.len(), MAX_NAME_BYTES)
}

/// Refuses a peer endpoint that is not empty, "http://…", "https://…" or
/// "unix:/…", or is longer than [`MAX_NAME_BYTES`].
pub(crate) fn endpoint(value: &str) -> Result<(), ExchangeError> {
    name("endpoint", value)?;
    let scheme = ["http://", "https://", "unix:/"].iter().any(|s| value.starts_with(s));
    if !value.is_empty() && (!scheme || value.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return Err(ExchangeError::InvalidArgument(format!(
            "endpoint {} is not http://host:port, https://host:port or unix:/path",
            academy_proto::excerpt(value)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_fit_and_a_message_larger_than_a_delivery_is_refused() {
        Limits::default().check().unwrap();
        let too_big = Limits { max_message_bytes: DEFAULT_MAX_DELIVERY_BYTES, ..Limits::default() };
        assert!(too_big.check().unwrap_err().contains("must fit in a delivery"));
        let err = at_most("messages per SendBatch", 1001, 1000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "messages per SendBatch is at most 1000; this request has 1001"
        );
    }
}
