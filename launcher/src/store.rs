//! Optional persistence of the launcher's agent records in Redis: one hash,
//! agent id → protobuf record, written in order by one task.

use academy_proto::pb::{self, AgentState};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

/// Work for the writer task.
#[derive(Debug)]
pub(crate) enum Write {
    Record(Box<pb::AgentRecord>),
    /// The record of an agent forgotten after its retention period.
    Forget(String),
    /// Answered once every earlier write is in Redis.
    Flush(oneshot::Sender<()>),
}

/// What records written before `config` became a JSON value (field 13) kept
/// in field 4, as JSON text: read once, when such a record is loaded.
#[derive(Clone, PartialEq, prost::Message)]
struct Legacy {
    #[prost(string, tag = "4")]
    config_json: String,
}

impl Legacy {
    fn config(bytes: &[u8]) -> Option<academy_proto::prost_types::Value> {
        let legacy = Self::decode(bytes).ok()?;
        let value = serde_json::from_str(&legacy.config_json).ok()?;
        Some(academy_proto::json::to_proto(value))
    }
}

/// Connects, loads the records kept there, and starts the writer.
pub(crate) async fn open(
    url: &str,
    prefix: &str,
) -> anyhow::Result<(Vec<pb::AgentRecord>, mpsc::UnboundedSender<Write>)> {
    let timeout = academy_server::redis::DEFAULT_TIMEOUT;
    let (_, mut conn) = academy_server::redis::connect(url, timeout).await.map_err(|e| {
        // Its own words, not the exchange's ("mailbox store unavailable").
        let why = match e {
            academy_proto::ExchangeError::Unavailable(why) => why,
            other => other.to_string(),
        };
        anyhow::anyhow!("cannot keep the launcher's records in Redis: {why}")
    })?;
    let key = format!("{prefix}:launcher:agents");
    let stored: Vec<Vec<u8>> = redis::cmd("HVALS").arg(&key).query_async(&mut conn).await?;
    let mut records = Vec::with_capacity(stored.len());
    for bytes in stored {
        let mut record = pb::AgentRecord::decode(bytes.as_slice())?;
        if record.config.is_none() {
            record.config = Legacy::config(&bytes);
        }
        // Workers keep their agents running while the launcher is away (for
        // a grace): whatever was placed waits for its worker to bring it
        // back, or to be placed again once the rejoin grace is over.
        match record.state() {
            AgentState::Starting | AgentState::Running => {
                record.state = AgentState::Pending.into();
                record.reason = "the launcher restarted: waiting for its worker to rejoin".into();
            }
            AgentState::Stopping => record.state = AgentState::Stopped.into(),
            _ => {}
        }
        record.worker_id.clear();
        records.push(record);
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(write) = rx.recv().await {
            match write {
                Write::Record(record) => {
                    let stored: Result<(), _> = redis::cmd("HSET")
                        .arg(&key)
                        .arg(&record.agent_id)
                        .arg(record.encode_to_vec())
                        .query_async(&mut conn)
                        .await;
                    if let Err(e) = stored {
                        tracing::error!(agent = %record.agent_id, error = %e, "cannot persist agent record");
                    }
                }
                Write::Forget(id) => {
                    let deleted: Result<(), _> =
                        redis::cmd("HDEL").arg(&key).arg(&id).query_async(&mut conn).await;
                    if let Err(e) = deleted {
                        tracing::error!(agent = %id, error = %e, "cannot forget an agent record");
                    }
                }
                Write::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    });
    let url = academy_server::redis::redacted_url(url);
    tracing::info!(%url, records = records.len(), "launcher state in Redis");
    Ok((records, tx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_earlier_versions_keep_their_config() {
        let old = Legacy { config_json: r#"{"greeting": "hi", "n": 3}"#.into() }.encode_to_vec();
        let record = pb::AgentRecord::decode(old.as_slice()).unwrap();
        assert_eq!(record.config, None);
        let config = academy_proto::json::from_proto(Legacy::config(&old).unwrap());
        assert_eq!(config, serde_json::json!({"greeting": "hi", "n": 3}));
    }
}
