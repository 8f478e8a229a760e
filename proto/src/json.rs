//! `google.protobuf.Value` ↔ `serde_json::Value`, for Invoke's plain-JSON arguments.

use prost_types::value::Kind;
use serde_json::Value;

/// Largest integer an f64 holds exactly; whole numbers up to it become JSON integers.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A `google.protobuf.Value` as JSON: whole numbers up to 2^53 become integers.
pub fn from_proto(value: prost_types::Value) -> Value {
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::ListValue(list)) => list.values.into_iter().map(from_proto).collect(),
        Some(Kind::StructValue(s)) => {
            Value::Object(s.fields.into_iter().map(|(k, v)| (k, from_proto(v))).collect())
        }
    }
}

/// JSON as a `google.protobuf.Value` (numbers become doubles).
pub fn to_proto(value: Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_proto).collect(),
        }),
        Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, to_proto(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_and_keeps_integers_integral() {
        let v = json!({"a": [1, 2.5, "x", null, true], "b": {"c": -7}});
        assert_eq!(from_proto(to_proto(v.clone())), v);
        assert!(from_proto(to_proto(json!(5))).is_i64());
    }
}
