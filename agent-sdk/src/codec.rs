//! Payload codecs. JSON always works (any language, grpcurl); MessagePack is
//! what Rust peers use by default: self-describing like JSON, but strings and
//! byte strings travel as length-prefixed copies instead of escaped text.

use academy_proto::content_type::{JSON as CONTENT_TYPE_JSON, MSGPACK as CONTENT_TYPE_MSGPACK};
use academy_proto::pb;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ActionError;

/// Error type an agent answers for a payload whose content type it can't read;
/// the caller may then retry in JSON.
pub(crate) const UNSUPPORTED_CONTENT_TYPE: &str = "UnsupportedContentType";

/// How a handle encodes arguments (the agent answers in the same codec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// JSON (`application/json`): what every peer reads.
    Json,
    /// MessagePack (`application/msgpack`): what Rust peers send by default.
    #[default]
    MsgPack,
}

impl Codec {
    fn of(payload: &pb::Payload) -> Option<Self> {
        match payload.content_type.as_str() {
            CONTENT_TYPE_JSON => Some(Self::Json),
            CONTENT_TYPE_MSGPACK => Some(Self::MsgPack),
            _ => None,
        }
    }

    pub(crate) fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<pb::Payload, String> {
        let (content_type, data) = match self {
            Self::Json => {
                (CONTENT_TYPE_JSON, serde_json::to_vec(value).map_err(|e| e.to_string())?)
            }
            Self::MsgPack => (CONTENT_TYPE_MSGPACK, msgpack(value).map_err(|e| e.to_string())?),
        };
        Ok(pb::Payload {
            content_type: content_type.into(),
            data: data.into(),
            ..Default::default()
        })
    }
}

/// `value` in MessagePack, in a buffer of its exact size: a first pass only
/// counts the bytes (strings and byte strings by their length, not copied),
/// so a large payload is written once into memory allocated once, instead
/// of through a chain of ever larger buffers, and a small one in one
/// allocation instead of five.
fn msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    rmp_serde::encode::write_named(&mut count, value)?;
    let mut data = Vec::with_capacity(count.0);
    rmp_serde::encode::write_named(&mut data, value)?;
    Ok(data)
}

pub(crate) fn decode<T: DeserializeOwned>(payload: Option<&pb::Payload>) -> Result<T, String> {
    let payload = payload.ok_or("payload is missing")?;
    match Codec::of(payload) {
        Some(Codec::Json) => serde_json::from_slice(&payload.data).map_err(|e| e.to_string()),
        Some(Codec::MsgPack) => rmp_serde::from_slice(&payload.data).map_err(|e| e.to_string()),
        None => Err(format!("unsupported content type {:?}", payload.content_type)),
    }
}

/// The codec to answer a request in: the request's own.
#[doc(hidden)]
pub fn reply_codec(args: Option<&pb::Payload>) -> Codec {
    args.and_then(Codec::of).unwrap_or(Codec::Json)
}

/// Encodes an action's result (used by `#[behaviour]`).
#[doc(hidden)]
pub fn encode_result<T: Serialize>(
    action: &str,
    codec: Codec,
    value: &T,
) -> Result<pb::Payload, ActionError> {
    codec
        .encode(value)
        .map_err(|e| ActionError::internal(format!("{action}: cannot encode result: {e}")))
}

/// Decodes an action's arguments into the tuple `T` of its parameters (used by
/// `#[behaviour]`). MessagePack carries the tuple itself; JSON goes through
/// [`Args`], which also accepts arguments by name and names the bad one.
#[doc(hidden)]
pub fn decode_args<T: DeserializeOwned>(
    action: &'static str,
    names: &'static [&'static str],
    payload: Option<&pb::Payload>,
    from_json: impl FnOnce(&mut Args) -> Result<T, ActionError>,
) -> Result<T, ActionError> {
    match payload.filter(|p| !p.data.is_empty()) {
        Some(p) if p.content_type == CONTENT_TYPE_MSGPACK => {
            rmp_serde::from_slice(&p.data).or_else(|err| {
                let err = ActionError::invalid_args(format!("{action}: {err}"));
                // Read it again loosely, only to name the argument that is wrong.
                let loose = rmp_serde::from_slice(&p.data).map_err(|_| err.clone())?;
                from_json(&mut Args::from_value(action, names, loose)?)?;
                Err(err)
            })
        }
        Some(p) if p.content_type != CONTENT_TYPE_JSON => Err(ActionError {
            code: tonic::Code::InvalidArgument,
            kind: UNSUPPORTED_CONTENT_TYPE.into(),
            message: format!(
                "{action}: unsupported content type {:?} (use {CONTENT_TYPE_JSON} or {CONTENT_TYPE_MSGPACK})",
                p.content_type
            ),
        }),
        _ => from_json(&mut Args::decode(action, names, payload)?),
    }
}

/// The JSON arguments of one action request.
///
/// They are an array (positional), an object (by parameter name), null or
/// absent (no arguments), or a lone value when the action takes one.
#[doc(hidden)]
#[derive(Debug)]
pub struct Args {
    action: &'static str,
    names: &'static [&'static str],
    values: Vec<Value>,
}

impl Args {
    fn decode(
        action: &'static str,
        names: &'static [&'static str],
        payload: Option<&pb::Payload>,
    ) -> Result<Self, ActionError> {
        let value = match payload {
            Some(p) if !p.data.is_empty() => serde_json::from_slice(&p.data)
                .map_err(|e| ActionError::invalid_args(format!("{action}: {e}")))?,
            _ => Value::Null,
        };
        Self::from_value(action, names, value)
    }

    fn from_value(
        action: &'static str,
        names: &'static [&'static str],
        value: Value,
    ) -> Result<Self, ActionError> {
        let invalid = |m: String| ActionError::invalid_args(format!("{action}: {m}"));
        let mut values = match value {
            Value::Null => Vec::new(),
            Value::Array(items) => {
                if items.len() > names.len() {
                    return Err(invalid(format!(
                        "takes {} argument(s) {names:?}, got {}",
                        names.len(),
                        items.len()
                    )));
                }
                items
            }
            Value::Object(mut map) => {
                let values = names.iter().map(|n| map.remove(*n).unwrap_or(Value::Null)).collect();
                if let Some(extra) = map.keys().next() {
                    return Err(invalid(format!(
                        "has no parameter {extra:?} (parameters: {names:?})"
                    )));
                }
                values
            }
            lone if names.len() == 1 => vec![lone],
            _ => {
                return Err(invalid(format!(
                    "arguments must be an array or an object of {names:?}"
                )));
            }
        };
        values.resize(names.len(), Value::Null);
        Ok(Self { action, names, values })
    }

    /// Takes argument `index` as a `T`.
    pub fn take<T: DeserializeOwned>(&mut self, index: usize) -> Result<T, ActionError> {
        let value = std::mem::take(&mut self.values[index]);
        let missing = value.is_null();
        serde_json::from_value(value).map_err(|e| {
            let name = self.names[index];
            ActionError::invalid_args(if missing {
                format!("{}: missing argument {name:?}", self.action)
            } else {
                format!("{}: argument {name:?}: {e}", self.action)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> pb::Payload {
        pb::Payload {
            content_type: CONTENT_TYPE_JSON.into(),
            data: text.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    /// MessagePack is written into a buffer of its exact size, small or
    /// large, and reads back as what was written.
    #[test]
    fn msgpack_is_written_in_one_buffer_of_its_size() {
        let map: std::collections::HashMap<String, u64> =
            (0..100).map(|i| (format!("k{i}"), i)).collect();
        for big in [0, 100, 1 << 20] {
            let value = ("x".repeat(big), 7u8, vec![1.5f64; 3], map.clone());
            let payload = Codec::MsgPack.encode(&value).unwrap();
            let data = msgpack(&value).unwrap();
            assert_eq!(data.capacity(), data.len(), "{big}");
            assert_eq!(payload.data, data);
            let back: (String, u8, Vec<f64>, std::collections::HashMap<String, u64>) =
                decode(Some(&payload)).unwrap();
            assert_eq!(back, value);
        }
    }

    fn two(payload: Option<&pb::Payload>) -> Result<(u32, Option<String>), ActionError> {
        decode_args("f", &["a", "b"], payload, |args| Ok((args.take(0)?, args.take(1)?)))
    }

    #[test]
    fn decodes_positional_named_lone_and_msgpack_arguments() {
        assert_eq!(two(Some(&json("[1, \"x\"]"))).unwrap(), (1, Some("x".into())));
        assert_eq!(two(Some(&json(r#"{"b": "y", "a": 2}"#))).unwrap(), (2, Some("y".into())));
        assert_eq!(two(Some(&json("[3]"))).unwrap(), (3, None));
        let lone: (u32,) =
            decode_args("f", &["a"], Some(&json("7")), |args| Ok((args.take(0)?,))).unwrap();
        assert_eq!(lone, (7,));
        let packed = Codec::MsgPack.encode(&(4u32, Some("z"))).unwrap();
        assert_eq!(two(Some(&packed)).unwrap(), (4, Some("z".into())));
        let wrong = Codec::MsgPack.encode(&("four", "z")).unwrap();
        let err = two(Some(&wrong)).unwrap_err();
        assert!(err.message.contains("argument \"a\""), "named even in MessagePack: {err:?}");
    }

    #[test]
    fn rejects_bad_arguments_with_names() {
        let err = two(Some(&json("[1, 2, 3]"))).unwrap_err();
        assert!(err.message.contains("takes 2 argument"), "{err:?}");
        let err = two(Some(&json(r#"{"z": 1}"#))).unwrap_err();
        assert!(err.message.contains("\"z\""), "{err:?}");
        let err = two(None).unwrap_err();
        assert!(err.message.contains("missing argument \"a\""), "{err:?}");
        assert_eq!(err.code, tonic::Code::InvalidArgument);
        let err = two(Some(&json("[\"x\"]"))).unwrap_err();
        assert!(err.message.contains("argument \"a\""), "{err:?}");
        let bad = pb::Payload {
            content_type: "text/plain".into(),
            data: b"1".to_vec().into(),
            ..Default::default()
        };
        assert_eq!(two(Some(&bad)).unwrap_err().kind, UNSUPPORTED_CONTENT_TYPE);
    }

    #[test]
    fn both_codecs_round_trip_results() {
        for codec in [Codec::Json, Codec::MsgPack] {
            let payload = codec.encode(&vec![Some(1.5f64), None]).unwrap();
            assert_eq!(decode::<Vec<Option<f64>>>(Some(&payload)).unwrap(), vec![Some(1.5), None]);
            assert_eq!(reply_codec(Some(&payload)), codec);
        }
    }
}
