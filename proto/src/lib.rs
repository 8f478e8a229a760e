//! The wire model of Academy (package `academy.v1`): the generated messages,
//! clients and servers ([`pb`]), and what every side shares around them —
//! entity ids, the typed mailbox status, the error model and its mapping to
//! gRPC statuses, content types and JSON helpers. Servers and clients depend
//! on this crate, never on each other.
//!
//! ```
//! use academy_proto::{EntityId, ExchangeError, pb};
//! let id = EntityId::new_agent();
//! let status = tonic::Status::from(ExchangeError::Terminated(id));
//! assert_eq!(status.code(), tonic::Code::FailedPrecondition);
//! assert_eq!(ExchangeError::from_status(&status), Some(ExchangeError::Terminated(id)));
//! assert_eq!(pb::MailboxState::Active.as_str_name(), "MAILBOX_STATE_ACTIVE");
//! ```

#![warn(missing_docs)]

pub mod codec;
pub mod duration;
mod error;
mod id;
pub mod json;
mod mailbox;
pub mod trace;

pub use error::{ERROR_DOMAIN, ExchangeError, MAX_STATUS_MESSAGE_BYTES, bounded, excerpt};
pub use id::{EntityId, EntityKind};
pub use mailbox::{ClockStatus, MailboxStatus, Matching, RegisteredAgent};

/// Generated messages, clients and servers of `academy.v1` (checked in under
/// `src/generated/`; `make proto` writes them, and `academy-proto-codegen`'s
/// test keeps them in step with the `.proto` files).
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod pb {
    include!("generated/academy.v1.rs");
}

/// Content types of payloads (`pb::Payload::content_type`).
pub mod content_type {
    /// JSON, which every peer reads: other languages, grpcurl, Invoke.
    pub const JSON: &str = "application/json";
    /// MessagePack, what Rust peers send each other by default.
    pub const MSGPACK: &str = "application/msgpack";
}

/// Transport settings every Academy server and client uses.
pub mod transport {
    /// HTTP/2 flow-control window per stream: large enough that a 1 MiB
    /// message need not wait for a window update.
    pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
    /// HTTP/2 flow-control window per connection.
    pub const CONNECTION_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
    /// Metadata of a `Session` stream's response: the largest request (in
    /// bytes, encoded) the exchange decodes; a larger one ends the stream.
    pub const MAX_REQUEST_BYTES_HEADER: &str = "academy-max-request-bytes";
    /// The chunks blobs are kept and read in, and the largest chunk a
    /// `PutBlob` request may carry: well within every gRPC client's
    /// default 4 MiB.
    pub const BLOB_CHUNK_BYTES: usize = 1024 * 1024;
    /// The store a `BlobRef` names for the blobs of the exchange the
    /// message went through.
    pub const EXCHANGE_BLOB_STORE: &str = "exchange";
    /// The store a `BlobRef` names for a file in a directory its sender
    /// and receiver share (processes on one node).
    pub const FILE_BLOB_STORE: &str = "file";
    /// The store a `BlobRef` names for a blob its sender's peer endpoint
    /// serves (`BlobRef.endpoint`), for a message delivered directly.
    pub const PEER_BLOB_STORE: &str = "peer";
}

impl pb::Header {
    /// The header of the response to this request, sent by `src`: back to the
    /// requester, with the same tag, label and trace context.
    pub fn reply_from(&self, src: String) -> Self {
        Self {
            src,
            dest: self.src.clone(),
            tag: self.tag.clone(),
            label: self.label.clone(),
            traceparent: self.traceparent.clone(),
            tracestate: self.tracestate.clone(),
            on_clock: self.on_clock,
        }
    }

    /// The key of this request's answer on the simulated clock (the
    /// request's own key is its tag).
    pub fn answer_key(&self) -> String {
        format!("{}/answer", self.tag)
    }
}

/// Encoded `FileDescriptorSet` of the contracts and their imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/academy_descriptor.bin");

pub use prost_types;

/// Locks that shrug off poisoning: a panic elsewhere while holding one
/// leaves data that every user here keeps consistent at each step.
pub mod sync {
    use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

    /// `m`, locked.
    pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `m`, locked for reading.
    pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
        m.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// `m`, locked for writing.
    pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
        m.write().unwrap_or_else(PoisonError::into_inner)
    }
}
