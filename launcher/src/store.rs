//! Optional persistence of the launcher's agent records in Redis: one hash,
//! agent id → protobuf record, written in order by one task.

use academy_proto::pb::{self, AgentState};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

/// Work for the writer task.
#[derive(Debug)]
pub(crate) enum Write {
    Record(Box<pb::AgentRecord>),
    /// Answered once every earlier write is in Redis.
    Flush(oneshot::Sender<()>),
}

/// Connects, loads the records kept there, and starts the writer.
pub(crate) async fn open(
    url: &str,
    prefix: &str,
) -> anyhow::Result<(Vec<pb::AgentRecord>, mpsc::UnboundedSender<Write>)> {
    let (_, mut conn) = academy_server::redis::connect(url).await.map_err(|e| {
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
        // Workers stop their agents when the launcher goes away: whatever
        // was placed must be placed again.
        match record.state() {
            AgentState::Starting | AgentState::Running => {
                record.state = AgentState::Pending.into();
                record.reason = "the launcher restarted".into();
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
