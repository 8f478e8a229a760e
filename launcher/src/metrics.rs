//! The launcher's own metrics, read from its state at each scrape.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use academy_proto::pb::AgentState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::cluster::Cluster;

/// Agents by state and connected workers, counted when scraped.
#[derive(Debug)]
pub(crate) struct ClusterGauges(pub(crate) Arc<Mutex<Cluster>>);

impl Collector for ClusterGauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (agents, workers, counts) = {
            let cluster = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut agents: BTreeMap<&'static str, i64> =
                STATES.iter().map(|s| (s.as_str_name(), 0)).collect();
            for state in cluster.agent_states() {
                *agents.entry(state.as_str_name()).or_default() += 1;
            }
            (agents, cluster.worker_count(), cluster.counts)
        };
        let placements = ConstCounter::new(counts.placements);
        placements.encode(encoder.encode_descriptor(
            "academy_launcher_placements",
            "Agents placed on a worker (every start, first or again)",
            None,
            placements.metric_type(),
        )?)?;
        let mut again = encoder.encode_descriptor(
            "academy_launcher_replacements",
            "Agents placed again, by why: worker_lost, drained (or its worker left), restarted (after failing)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in [
            ("worker_lost", counts.worker_lost),
            ("drained", counts.drained),
            ("restarted", counts.restarted),
        ] {
            ConstCounter::new(n).encode(again.encode_family(&[("reason", reason)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "academy_launcher_agents",
            "Agents the launcher knows, by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in agents {
            let labels = [("state", state.trim_start_matches("AGENT_STATE_").to_lowercase())];
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }
        let gauge = ConstGauge::new(workers as i64);
        let descriptor = encoder.encode_descriptor(
            "academy_launcher_workers",
            "Workers connected to the launcher",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(descriptor)
    }
}

/// Every state an agent can be in, so each shows in the metrics even at 0.
const STATES: [AgentState; 6] = [
    AgentState::Pending,
    AgentState::Starting,
    AgentState::Running,
    AgentState::Stopping,
    AgentState::Stopped,
    AgentState::Failed,
];
