//! Reading Redis replies.

use bytes::Bytes;
use redis::{RedisError, Value};

use academy_proto::ExchangeError;

pub(super) fn unavailable(err: RedisError) -> ExchangeError {
    ExchangeError::Unavailable(format!("Redis does not answer: {err}"))
}

pub(super) fn string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

pub(super) fn array(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

pub(super) fn bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::BulkString(b) => Some(Bytes::from(b)),
        _ => None,
    }
}

pub(super) fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => string(other)?.parse().ok(),
    }
}
