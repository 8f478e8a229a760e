//! The protobuf contracts of Academy (package `academy.v1`), generated at build
//! time from `proto/academy/v1/*.proto` with protox.
//!
//! ```
//! use academy_proto::pb;
//! let state = pb::MailboxState::Active;
//! assert_eq!(state.as_str_name(), "MAILBOX_STATE_ACTIVE");
//! ```

/// Generated messages, clients and servers of `academy.v1`.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("academy.v1");
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
        }
    }
}

/// Encoded `FileDescriptorSet` of the contracts and their imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/academy_descriptor.bin"));

pub use prost_types;
