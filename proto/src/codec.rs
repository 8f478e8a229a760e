//! The codec of every Academy service and client: protobuf, refusing a
//! message with more than [`MAX_FIELDS`] top-level fields before decoding
//! it. A `SendBatch` of 200,000 empty messages is 400 kB on the wire but
//! 200,000 structures in memory: counting its fields (no allocation) is how
//! such a request costs its sender more than the server.

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::ExchangeError;

/// Most top-level fields in one message (a repeated field counts each
/// element): above every answer's page (10,000 agents) and request's cap
/// (1,000 messages per batch, 10,000 seqs per acknowledgement).
pub const MAX_FIELDS: usize = 20_000;

/// [`ProstCodec`], with the field count checked before decoding.
#[derive(Debug, Clone, Default)]
pub struct BoundedCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = BoundedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        BoundedDecoder(self.0.decoder())
    }
}

/// Decodes a message once its top-level field count is within bounds.
#[derive(Debug)]
pub struct BoundedDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for BoundedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf as _;
        let found = top_level_fields(buf.chunk());
        if found > MAX_FIELDS {
            let limit = "top-level fields in one message".to_owned();
            return Err(ExchangeError::LimitExceeded { limit, max: MAX_FIELDS, found }.into());
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// How many top-level fields `data` holds, reading only tags and lengths
/// (stopping, with what it counted, where the encoding is broken: prost's
/// decoding then says why).
fn top_level_fields(mut data: &[u8]) -> usize {
    fn varint(data: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = data.split_first()?;
            *data = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut count = 0;
    while !data.is_empty() {
        let Some(tag) = varint(&mut data) else { break };
        let skip = match tag & 7 {
            0 => match varint(&mut data) {
                Some(_) => 0,
                None => break,
            },
            1 => 8,
            2 => match varint(&mut data).and_then(|n| usize::try_from(n).ok()) {
                Some(n) => n,
                None => break,
            },
            5 => 4,
            _ => break,
        };
        if skip > data.len() {
            break;
        }
        data = &data[skip..];
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn counts_top_level_fields_without_decoding() {
        let batch = pb::SendBatchRequest { messages: vec![pb::Message::default(); 300] };
        assert_eq!(top_level_fields(&batch.encode_to_vec()), 300);
        let ack = pb::AcknowledgeRequest { mailbox_id: "x".into(), seqs: (0..5000).collect() };
        assert_eq!(top_level_fields(&ack.encode_to_vec()), 2, "packed seqs are one field");
        assert_eq!(top_level_fields(&[0x0a, 0xff]), 0, "broken: left to prost");
    }
}
