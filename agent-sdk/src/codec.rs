//! Payload encoding: JSON, which every peer speaks.

use academy_exchange::CONTENT_TYPE_JSON;
use academy_proto::pb;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ActionError;

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<pb::Payload, String> {
    let data = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    Ok(pb::Payload {
        content_type: CONTENT_TYPE_JSON.into(),
        data: data.into(),
    })
}

pub(crate) fn decode<T: DeserializeOwned>(payload: Option<&pb::Payload>) -> Result<T, String> {
    let payload = payload.ok_or("payload is missing")?;
    if payload.content_type != CONTENT_TYPE_JSON {
        return Err(format!(
            "unsupported content type {:?}",
            payload.content_type
        ));
    }
    serde_json::from_slice(&payload.data).map_err(|e| e.to_string())
}

/// Encodes an action's result (used by `#[behaviour]`).
#[doc(hidden)]
pub fn encode_result<T: Serialize>(action: &str, value: &T) -> Result<pb::Payload, ActionError> {
    encode(value).map_err(|e| ActionError::internal(format!("{action}: cannot encode result: {e}")))
}

/// The decoded arguments of one action request (used by `#[behaviour]`).
///
/// JSON arguments are an array (positional), an object (by parameter name),
/// null or absent (no arguments), or a lone value when the action takes one.
#[doc(hidden)]
#[derive(Debug)]
pub struct Args {
    action: &'static str,
    names: &'static [&'static str],
    values: Vec<Value>,
}

impl Args {
    pub fn decode(
        action: &'static str,
        names: &'static [&'static str],
        payload: Option<&pb::Payload>,
    ) -> Result<Self, ActionError> {
        let invalid = |m: String| ActionError::invalid_args(format!("{action}: {m}"));
        let value = match payload {
            Some(p) if !p.data.is_empty() => decode::<Value>(Some(p)).map_err(invalid)?,
            _ => Value::Null,
        };
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
                let values = names
                    .iter()
                    .map(|n| map.remove(*n).unwrap_or(Value::Null))
                    .collect();
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
        Ok(Self {
            action,
            names,
            values,
        })
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

    fn payload(json: &str) -> pb::Payload {
        pb::Payload {
            content_type: CONTENT_TYPE_JSON.into(),
            data: json.as_bytes().to_vec().into(),
        }
    }

    #[test]
    fn decodes_positional_named_and_lone_arguments() {
        const NAMES: &[&str] = &["a", "b"];
        let mut args = Args::decode("f", NAMES, Some(&payload("[1, \"x\"]"))).unwrap();
        assert_eq!(args.take::<u32>(0).unwrap(), 1);
        assert_eq!(args.take::<String>(1).unwrap(), "x");
        let mut args = Args::decode("f", NAMES, Some(&payload(r#"{"b": "y", "a": 2}"#))).unwrap();
        assert_eq!(args.take::<u32>(0).unwrap(), 2);
        let mut args = Args::decode("f", &["a"], Some(&payload("7"))).unwrap();
        assert_eq!(args.take::<u32>(0).unwrap(), 7);
        let mut args = Args::decode("f", NAMES, Some(&payload("[1]"))).unwrap();
        assert_eq!(args.take::<Option<String>>(1).unwrap(), None);
    }

    #[test]
    fn rejects_bad_arguments_with_names() {
        const NAMES: &[&str] = &["a"];
        let err = Args::decode("f", NAMES, Some(&payload("[1, 2]"))).unwrap_err();
        assert!(err.message.contains("takes 1 argument"), "{err:?}");
        let err = Args::decode("f", NAMES, Some(&payload(r#"{"z": 1}"#))).unwrap_err();
        assert!(err.message.contains("\"z\""), "{err:?}");
        let mut args = Args::decode("f", NAMES, None).unwrap();
        let err = args.take::<u32>(0).unwrap_err();
        assert!(err.message.contains("missing argument \"a\""), "{err:?}");
        assert_eq!(err.code, tonic::Code::InvalidArgument);
        let bad = pb::Payload {
            content_type: "text/plain".into(),
            data: b"1".to_vec().into(),
        };
        assert!(Args::decode("f", NAMES, Some(&bad)).is_err());
    }
}
