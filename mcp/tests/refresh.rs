//! The gateway's look at the exchange, over gRPC to a real exchange: tools
//! follow agents as they come and go, and each agent's description is asked
//! for once, however often the gateway looks (the exchange's own call
//! counts, scraped from its metrics, say how often it was asked).

use std::net::SocketAddr;
use std::time::Duration;

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_mcp::{Gateway, GatewayOptions};
use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient};
use academy_sdk::Credentials;
use academy_server::testing::scrape;

/// Exchange calls of `method` answered so far, by any status.
async fn calls(metrics: SocketAddr, method: &str) -> f64 {
    let (status, text) =
        tokio::task::spawn_blocking(move || scrape(metrics)).await.unwrap().unwrap();
    assert!(status.ends_with("200 OK"), "{status}");
    let series = format!(
        r#"academy_grpc_calls_total{{service="academy.v1.ExchangeService",method="{method}",code="#
    );
    text.lines()
        .filter(|line| line.starts_with(&series))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v)
}

/// Registers an agent of `behaviour` with actions `actions` (none: it
/// published no description).
async fn register(
    rpc: &mut ExchangeServiceClient<tonic::transport::Channel>,
    behaviour: &str,
    actions: &[&str],
) -> String {
    let description = (!actions.is_empty()).then(|| pb::AgentDescription {
        doc: String::new(),
        actions: actions
            .iter()
            .map(|name| pb::ActionDescription { name: (*name).into(), ..Default::default() })
            .collect(),
    });
    let request =
        pb::RegisterAgentRequest { behaviour: behaviour.into(), description, ..Default::default() };
    rpc.register_agent(request).await.unwrap().into_inner().agent_id
}

/// Waits until `done`, looking every 10 ms, for at most 10 s.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_is_described_once_and_tools_follow_agents() {
    let listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let exchange =
        RunningExchange::start(ExchangeOptions { metrics_listen: listen, ..Default::default() })
            .await
            .unwrap();
    let metrics = exchange.metrics_addr().unwrap();
    let url = exchange.url();
    let mut rpc = ExchangeServiceClient::connect(url.clone()).await.unwrap();
    let counter = register(&mut rpc, "test.Counter", &["get", "increment"]).await;
    register(&mut rpc, "test.Echo", &["echo"]).await;
    register(&mut rpc, "test.Silent", &[]).await;

    let options =
        GatewayOptions { refresh_every: Duration::from_millis(20), ..GatewayOptions::default() };
    let gateway = Gateway::connect(&url, &Credentials::default(), options).await.unwrap();
    let names = gateway.tool_names();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("Counter_increment_")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("Echo_echo_")), "{names:?}");

    // Many looks later, the three agents were described once each.
    let discovered = calls(metrics, "Discover").await;
    until("ten more looks", async || calls(metrics, "Discover").await >= discovered + 10.0).await;
    assert_eq!(calls(metrics, "Describe").await, 3.0);

    // A new agent is described (once) and its tool offered.
    register(&mut rpc, "test.Late", &["late"]).await;
    until("the new agent's tool", async || {
        gateway.tool_names().iter().any(|n| n.starts_with("Late_late_"))
    })
    .await;
    let discovered = calls(metrics, "Discover").await;
    until("ten more looks", async || calls(metrics, "Discover").await >= discovered + 10.0).await;
    assert_eq!(calls(metrics, "Describe").await, 4.0);

    // A terminated agent's tools go; nothing is described again.
    rpc.terminate(pb::TerminateRequest { mailbox_id: counter }).await.unwrap();
    until("the terminated agent's tools gone", async || {
        !gateway.tool_names().iter().any(|n| n.starts_with("Counter_"))
    })
    .await;
    assert_eq!(gateway.tool_names().len(), 2, "{:?}", gateway.tool_names());
    assert_eq!(calls(metrics, "Describe").await, 4.0);
    exchange.shutdown().await;
}
