//! Invoke: one action call through a transient client mailbox, for callers
//! that don't keep a mailbox of their own.

use std::time::Duration;

use academy_proto::content_type::JSON as CONTENT_TYPE_JSON;
use academy_proto::pb::{self, message::Body};
use academy_proto::{EntityId, ExchangeError};
use serde_json::Value;

use crate::Exchange;

/// Removes the transient mailbox however the call ends (even if it is dropped).
struct Transient {
    exchange: Exchange,
    id: EntityId,
}

impl Drop for Transient {
    fn drop(&mut self) {
        let (exchange, id) = (self.exchange.clone(), self.id);
        tokio::spawn(async move { exchange.forget(&id).await });
    }
}

/// Calls `action` on `agent`; the outer error is the exchange's, the inner one
/// the agent's answer.
pub(crate) async fn invoke(
    exchange: &Exchange,
    agent: EntityId,
    action: &str,
    args: &Value,
    timeout: Duration,
    trace: &opentelemetry::Context,
) -> Result<Result<Value, pb::ErrorResponse>, ExchangeError> {
    let client = Transient { exchange: exchange.clone(), id: exchange.register_client().await? };
    let mut subscription = exchange.subscribe(&client.id).await?;
    let tag = uuid::Uuid::new_v4().to_string();
    let data = serde_json::to_vec(args).expect("a JSON value always serialises");
    let mut header = pb::Header {
        src: client.id.to_string(),
        dest: agent.to_string(),
        tag: tag.clone(),
        ..Default::default()
    };
    academy_proto::trace::stamp(&mut header, trace);
    exchange
        .send(pb::Message {
            header: Some(header),
            body: Some(Body::ActionRequest(pb::ActionRequest {
                action: action.to_owned(),
                args: Some(pb::Payload {
                    content_type: CONTENT_TYPE_JSON.into(),
                    data: data.into(),
                    ..Default::default()
                }),
            })),
        })
        .await?;
    let reply = async {
        loop {
            for delivery in subscription.next_batch(16, usize::MAX).await? {
                let Some(message) = delivery.message else { continue };
                if message.header.as_ref().is_some_and(|h| h.tag == tag) {
                    return Ok::<_, ExchangeError>(message.body);
                }
            }
        }
    };
    let body = tokio::time::timeout(timeout, reply).await.map_err(|_| {
        ExchangeError::DeadlineExceeded(format!(
            "agent {agent} did not answer {action:?} within {timeout:?}"
        ))
    })??;
    Ok(match body {
        Some(Body::ActionResponse(resp)) => {
            let mut payload = resp.result.unwrap_or_default();
            if let Some(blob) = payload.blob.take() {
                match inline(exchange, &blob).await {
                    Ok(data) => payload.data = data,
                    Err(why) => return Ok(Err(why)),
                }
            }
            if payload.content_type != CONTENT_TYPE_JSON {
                Err(internal_error(format!(
                    "agent answered with content type {:?}, not JSON",
                    payload.content_type
                )))
            } else {
                serde_json::from_slice(&payload.data)
                    .map_err(|e| internal_error(format!("agent answered with malformed JSON: {e}")))
            }
        }
        Some(Body::ErrorResponse(err)) => Err(err),
        _ => Err(internal_error("agent answered with something other than a response".into())),
    })
}

/// The bytes of a result kept as a blob, which is then freed (the caller
/// is its reader); refused when they would not fit in an answer.
async fn inline(
    exchange: &Exchange,
    blob: &pb::BlobRef,
) -> Result<bytes::Bytes, pb::ErrorResponse> {
    let refused = |code: tonic::Code, message: String| pb::ErrorResponse {
        code: code as i32,
        kind: "BlobUnreadable".into(),
        message,
        details: Default::default(),
    };
    let limit = exchange.limits().max_message_bytes;
    let data = if blob.store != crate::EXCHANGE_STORE {
        // Not the exchange's to read (nor to free).
        return Err(refused(
            tonic::Code::FailedPrecondition,
            format!(
                "the agent answered with a blob in its node's {} store, which only processes there read",
                academy_proto::excerpt(&blob.store)
            ),
        ));
    } else if blob.size > limit as u64 {
        Err(refused(
            tonic::Code::ResourceExhausted,
            format!(
                "the agent answered with a blob of {} bytes, more than an InvokeResponse holds ({limit}): call it with a client that reads blobs (docs/design.md, \"Blobs\")",
                blob.size
            ),
        ))
    } else {
        read(exchange, &blob.key)
            .await
            .map_err(|e| refused(e.code(), format!("cannot read the agent's answer: {e}")))
    };
    let _ = exchange.delete_blob(&blob.key).await;
    data
}

async fn read(exchange: &Exchange, key: &str) -> Result<bytes::Bytes, ExchangeError> {
    let (_, chunks) = exchange.get_blob(key, 0).await?;
    let chunks: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(chunks).await?;
    Ok(chunks.concat().into())
}

fn internal_error(message: String) -> pb::ErrorResponse {
    pb::ErrorResponse {
        code: tonic::Code::Internal as i32,
        kind: "InvalidResponse".into(),
        message,
        details: Default::default(),
    }
}
