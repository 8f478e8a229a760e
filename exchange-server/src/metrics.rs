//! What an exchange counts beside its calls (the calls themselves are
//! counted by `academy_server::metrics::RpcMetrics`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// What an exchange counts beside its calls.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExchangeMetrics {
    pub(crate) accepted: Counter,
    pub(crate) refused: Family<ReasonLabels, Counter>,
    pub(crate) delivered: Counter,
    pub(crate) subscriptions: Gauge,
    /// Bytes of blobs kept by `PutBlob`, and sent by `GetBlob`.
    pub(crate) blob_bytes_put: Counter,
    pub(crate) blob_bytes_read: Counter,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: &'static str,
}

impl ExchangeMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "academy_exchange_messages_accepted",
            "Messages queued by Send, SendBatch, Session sends and commits",
            metrics.accepted.clone(),
        );
        registry.register(
            "academy_exchange_messages_refused",
            "Messages refused, by reason (as in the error's ErrorInfo)",
            metrics.refused.clone(),
        );
        registry.register(
            "academy_exchange_messages_delivered",
            "Messages streamed to subscribers (redeliveries included)",
            metrics.delivered.clone(),
        );
        registry.register(
            "academy_exchange_blob_bytes_put",
            "Bytes of blobs kept (PutBlob calls that succeeded)",
            metrics.blob_bytes_put.clone(),
        );
        registry.register(
            "academy_exchange_blob_bytes_read",
            "Bytes of blobs sent to readers (GetBlob)",
            metrics.blob_bytes_read.clone(),
        );
        registry.register(
            "academy_exchange_subscriptions",
            "Subscriptions open on this replica (Subscribe streams and Session subscriptions)",
            metrics.subscriptions.clone(),
        );
        metrics
    }

    /// Counts the outcome of one message sent.
    pub(crate) fn sent(&self, result: &Result<(), academy_proto::ExchangeError>) {
        match result {
            Ok(()) => {
                self.accepted.inc();
            }
            Err(e) => {
                self.refused.get_or_create(&ReasonLabels { reason: e.reason() }).inc();
            }
        }
    }
}

/// How often the queue depth is read (a hash on Redis; every mailbox in memory).
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Behaviours shown by name in the queue depth, the most queued first; the
/// rest add up under `(other)`.
const DEPTH_BEHAVIOURS: usize = 50;

/// `academy_exchange_queued_messages{behaviour}` and `_bytes`: what is
/// queued unacknowledged, per behaviour of the mailboxes (`(client)` for
/// client mailboxes), read every [`DEPTH_EVERY`] by a task of its own
/// (scrapes are synchronous, reading Redis is not).
#[derive(Debug, Default, Clone)]
pub(crate) struct QueueDepth(Arc<Mutex<Vec<crate::Depth>>>);

impl QueueDepth {
    /// Reads `exchange`'s depth now and every few seconds, until `stop`.
    pub(crate) fn follow(
        exchange: crate::Exchange,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let depth = Self::default();
        let shared = depth.0.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(DEPTH_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => {}
                }
                match exchange.queued().await {
                    Ok(now) => {
                        *shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = now
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot read the queue depth"),
                }
            }
        });
        depth
    }

    /// The depth per behaviour as shown: the most queued by name, the rest
    /// as `(other)`.
    fn rows(&self) -> Vec<(String, u64, u64)> {
        let mut all = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        all.sort_by(|a, b| b.messages.cmp(&a.messages).then_with(|| a.behaviour.cmp(&b.behaviour)));
        let mut rows: Vec<(String, u64, u64)> = Vec::new();
        for (i, depth) in all.into_iter().enumerate() {
            let name = match depth.behaviour.as_str() {
                _ if i >= DEPTH_BEHAVIOURS => "(other)".to_owned(),
                "" => "(client)".to_owned(),
                name => name.to_owned(),
            };
            match rows.iter_mut().find(|(n, _, _)| *n == name) {
                Some(row) => {
                    row.1 += depth.messages;
                    row.2 += depth.bytes;
                }
                None => rows.push((name, depth.messages, depth.bytes)),
            }
        }
        rows
    }
}

impl Collector for QueueDepth {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let rows = self.rows();
        for (name, help, bytes) in [
            (
                "academy_exchange_queued_messages",
                "Messages queued unacknowledged, by behaviour of their mailbox",
                false,
            ),
            (
                "academy_exchange_queued_bytes",
                "Bytes of messages queued unacknowledged, by behaviour of their mailbox",
                true,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (behaviour, messages, size) in &rows {
                let value =
                    i64::try_from(if bytes { *size } else { *messages }).unwrap_or(i64::MAX);
                ConstGauge::new(value)
                    .encode(family.encode_family(&[("behaviour", behaviour.as_str())])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_queued_behaviours_show_by_name_and_the_rest_add_up() {
        let depth = QueueDepth::default();
        let mut all: Vec<crate::Depth> = (0..60u64)
            .map(|i| crate::Depth { behaviour: format!("b{i:02}"), messages: 100 + i, bytes: 1000 })
            .collect();
        all.push(crate::Depth { behaviour: String::new(), messages: 1000, bytes: 7 });
        *depth.0.lock().unwrap() = all;
        let rows = depth.rows();
        assert_eq!(rows.len(), DEPTH_BEHAVIOURS + 1, "{rows:?}");
        assert_eq!(rows[0], ("(client)".to_owned(), 1000, 7));
        let other = rows.iter().find(|r| r.0 == "(other)").unwrap();
        // 61 in all, 50 by name: the 11 least queued, b00..b10.
        assert_eq!((other.1, other.2), ((100..=110).sum(), 11_000));
    }
}
