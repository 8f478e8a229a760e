//! What several of the examples' tests share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use academy_examples::behaviours::WordStats;
use academy_sdk::Manager;
use tokio::task::JoinHandle;

/// Callers that call each agent of `ids` (`example.WordStats`) one call
/// after another until `stop`: per agent, the calls answered right and
/// what went wrong otherwise.
pub(crate) fn call_until(
    manager: &Manager,
    ids: &[String],
    stop: &Arc<AtomicBool>,
) -> Vec<JoinHandle<(u32, Vec<String>)>> {
    ids.iter()
        .map(|id| {
            let handle = manager
                .handle::<WordStats>(id.parse().unwrap())
                .with_timeout(Duration::from_secs(20));
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut answered, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match handle.analyse("one two three".into()).await {
                        Ok(report) if report.words == 3 => answered += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (answered, failed)
            })
        })
        .collect()
}
