//! What an exchange counts beside its calls (the calls themselves are
//! counted by `academy_server::metrics::RpcMetrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// What an exchange counts beside its calls.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExchangeMetrics {
    pub(crate) accepted: Counter,
    pub(crate) refused: Family<ReasonLabels, Counter>,
    pub(crate) delivered: Counter,
    pub(crate) subscriptions: Gauge,
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
            "Messages queued by Send and SendBatch",
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
            "academy_exchange_subscriptions",
            "Subscribe streams open on this replica",
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
