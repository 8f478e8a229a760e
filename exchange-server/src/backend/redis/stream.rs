//! Queue streams: their entry ids as the protocol's seqs, and reading them.

use bytes::Bytes;
use redis::Value;

use super::reply::{array, bytes, string};

/// Stream ids (`<ms>-<n>`) as the u64 seqs of the protocol: ms in the high 44
/// bits, n in the low 20 (a million entries in one millisecond of one stream).
pub(super) const SEQ_BITS: u32 = 20;

pub(super) fn seq_of(stream_id: &str) -> Option<u64> {
    let (ms, n) = stream_id.split_once('-')?;
    let (ms, n): (u64, u64) = (ms.parse().ok()?, n.parse().ok()?);
    (n < 1 << SEQ_BITS && ms < 1 << (64 - SEQ_BITS)).then_some(ms << SEQ_BITS | n)
}

pub(super) fn stream_id_of(seq: u64) -> String {
    format!("{}-{}", seq >> SEQ_BITS, seq & ((1 << SEQ_BITS) - 1))
}

/// `XRANGE` of at most `count` entries of stream `key` after seq `after`
/// (0: from the first; every message's seq is above 0).
pub(super) fn range_after(key: &str, after: u64, count: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(format!("({}", stream_id_of(after))).arg("+").arg("COUNT").arg(count);
    cmd
}

/// `XRANGE`'s reply as (seq, message) pairs.
pub(super) fn range_entries(reply: Value) -> Vec<(u64, Bytes)> {
    array(reply)
        .into_iter()
        .filter_map(|entry| {
            let mut entry = array(entry).into_iter();
            let stream_id = entry.next().and_then(|v| string(&v))?;
            let mut fields = array(entry.next()?).into_iter();
            let data = loop {
                let (name, value) = (fields.next()?, fields.next()?);
                if string(&name).as_deref() == Some("m") {
                    break bytes(value);
                }
            };
            match (seq_of(&stream_id), data) {
                (Some(seq), Some(data)) => Some((seq, data)),
                _ => {
                    tracing::warn!(%stream_id, "skipping a malformed queue entry");
                    None
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_map_to_ordered_seqs_and_back() {
        let a = seq_of("1700000000000-0").unwrap();
        let b = seq_of("1700000000000-7").unwrap();
        let c = seq_of("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(stream_id_of(b), "1700000000000-7");
        assert_eq!(seq_of("x-1"), None);
        assert_eq!(seq_of(&format!("1-{}", 1u64 << SEQ_BITS)), None);
    }
}
