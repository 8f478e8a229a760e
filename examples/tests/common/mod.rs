//! What several of the examples' tests share.
#![allow(dead_code)]

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use academy_exchange::RunningExchange;
use academy_proto::pb::{self, launcher_service_client::LauncherServiceClient};
use tonic::transport::Channel;

use academy_examples::behaviours::WordStats;
use academy_sdk::Manager;
use tokio::task::JoinHandle;

/// A launcher on the exchange at `exchange_url` that counts a worker
/// silent for a second as lost.
pub(crate) async fn launcher_on(exchange_url: String) -> academy_launcher::RunningLauncher {
    let options = academy_launcher::LauncherOptions {
        exchange_url,
        heartbeat_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    academy_launcher::RunningLauncher::start(options).await.unwrap()
}

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

/// A child process, killed (SIGKILL) and reaped when dropped.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ready` every 20 ms for up to 20 s.
pub(crate) async fn until<F: AsyncFnMut() -> bool>(what: &str, mut ready: F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The peer endpoint agent `id` advertises, once `exchange` shows it (an
/// agent's endpoint comes with its mailbox's subscription, after it is
/// launched, or reported RUNNING).
pub(crate) async fn until_advertised(
    exchange: &academy_sdk::exchange::SharedExchange,
    id: academy_sdk::EntityId,
) -> String {
    let mut advertised = String::new();
    until("the endpoint is advertised", async || {
        advertised = exchange.status(&id).await.unwrap().endpoint;
        !advertised.is_empty()
    })
    .await;
    advertised
}

/// Options of an in-memory exchange whose messages [`accepted`] counts (it
/// serves metrics on a loopback port).
pub(crate) fn counted() -> academy_exchange::ExchangeOptions {
    academy_exchange::ExchangeOptions {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    }
}

/// Messages `exchange` (started with [`counted`] options) has queued so far.
pub(crate) fn accepted(exchange: &RunningExchange) -> f64 {
    use academy_server::testing::{sample, scrape};
    let (_, body) = scrape(exchange.metrics_addr().unwrap()).unwrap();
    sample(&body, "academy_exchange_messages_accepted_total").unwrap_or(0.0)
}

/// Waits until `n` workers have joined the launcher.
pub(crate) async fn until_workers(rpc: &mut LauncherServiceClient<Channel>, n: usize) {
    until(&format!("{n} workers join"), async || {
        let request = pb::ListWorkersRequest::default();
        rpc.list_workers(request).await.unwrap().into_inner().workers.len() == n
    })
    .await;
}

/// Launches `behaviour` through the launcher and waits until it runs; its id.
pub(crate) async fn launch_running(
    rpc: &mut LauncherServiceClient<Channel>,
    behaviour: &str,
) -> String {
    let launch = pb::LaunchAgentRequest { behaviour: behaviour.into(), ..Default::default() };
    let id = rpc.launch_agent(launch).await.unwrap().into_inner().agent.unwrap().agent_id;
    until("the agent runs", async || {
        let request = pb::GetAgentRequest { agent_id: id.clone() };
        let agent = rpc.get_agent(request).await.unwrap().into_inner().agent.unwrap();
        agent.state() == pb::AgentState::Running
    })
    .await;
    id
}
