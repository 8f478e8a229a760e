//! Metrics: calls, messages and subscriptions, scraped over HTTP.
//!
//! docs/design.md, "Metrics".

use super::harness::*;

/// Calls, messages and subscriptions show in the metrics, with the status
/// codes of the calls that failed.
pub(crate) async fn metrics_count_calls_messages_and_subscriptions(store: Store) {
    let listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let mut h =
        start_as(store, ExchangeOptions { metrics_listen: listen, ..Default::default() }).await;
    let addr = h.server.metrics_addr().expect("metrics served");
    let scrape = || async move {
        let (status, text) =
            tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap().unwrap();
        assert!(status.ends_with("200 OK"), "{status}");
        text
    };
    let value = |text: &str, series: &str| sample(text, series).unwrap_or(0.0);
    let send = r#"academy_grpc_calls_total{service="academy.v1.ExchangeService",method="Send","#;
    let subscriptions = "academy_exchange_subscriptions";

    let (agent, client) = common::agent_and_client(&mut h.rpc, "test.A").await;
    h.send(common::ping(&client, &agent, 1)).await.unwrap();
    let unknown = EntityId::new_agent().to_string();
    assert_eq!(
        h.send(common::ping(&client, &unknown, 2)).await.unwrap_err().code(),
        Code::NotFound
    );
    let stream = h.subscribe(&agent).await;
    let mut stream = stream;
    next(&mut stream).await;
    let text = scrape().await;
    assert_eq!(value(&text, &format!(r#"{send}code="OK"}}"#)), 1.0, "{text}");
    assert_eq!(value(&text, &format!(r#"{send}code="NOT_FOUND"}}"#)), 1.0, "{text}");
    assert_eq!(value(&text, "academy_exchange_messages_accepted_total"), 1.0, "{text}");
    let refused = r#"academy_exchange_messages_refused_total{reason="MAILBOX_NOT_FOUND"}"#;
    assert_eq!(value(&text, refused), 1.0, "{text}");
    assert_eq!(value(&text, "academy_exchange_messages_delivered_total"), 1.0, "{text}");
    assert_eq!(value(&text, subscriptions), 1.0, "{text}");
    let count =
        r#"academy_grpc_call_seconds_count{service="academy.v1.ExchangeService",method="Send"}"#;
    assert_eq!(value(&text, count), 2.0, "{text}");

    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while value(&scrape().await, subscriptions) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "the subscription never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What is queued shows per behaviour (clients under the empty one): each
/// message queued counts, an acknowledged one leaves, and a terminated
/// mailbox takes its queue with it. In memory it is counted when asked; on
/// Redis the scripts keep the count.
pub(crate) async fn queue_depth_counts_what_is_queued_per_behaviour(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let a = h.agent("test.A", &[]).await;
    let b = h.agent("test.B", &[]).await;
    let mut bytes = 0;
    for (dest, n) in [(&a, 3), (&b, 2), (&client, 1)] {
        for i in 0..n {
            let message = request(&client, dest, &format!("action{i}"));
            if *dest == a {
                bytes += prost::Message::encoded_len(&message) as u64;
            }
            h.send(message).await.unwrap();
        }
    }
    let depth = |h: &Harness| {
        let exchange = h.server.exchange().clone();
        async move {
            let mut all = exchange.queued().await.unwrap();
            all.sort_by(|x, y| x.behaviour.cmp(&y.behaviour));
            all.into_iter().map(|d| (d.behaviour, d.messages, d.bytes)).collect::<Vec<_>>()
        }
    };
    let now = depth(&h).await;
    assert_eq!(now.len(), 3, "{now:?}");
    assert_eq!((now[0].0.as_str(), now[0].1), ("", 1), "{now:?}");
    assert_eq!(now[1], ("test.A".to_owned(), 3, bytes), "{now:?}");
    assert_eq!((now[2].0.as_str(), now[2].1), ("test.B", 2), "{now:?}");

    let mut stream = h.subscribe(&a).await;
    let delivered = next(&mut stream).await;
    let seqs: Vec<u64> = delivered.iter().take(2).map(|d| d.seq).collect();
    let ack = pb::AcknowledgeRequest { mailbox_id: a.clone(), seqs };
    h.rpc.acknowledge(ack).await.unwrap();
    h.terminate(&b).await;
    let now = depth(&h).await;
    let a_now = now.iter().find(|d| d.0 == "test.A").unwrap();
    assert_eq!(a_now.1, 1, "{now:?}");
    assert!(a_now.2 > 0 && a_now.2 < bytes, "{now:?}");
    assert!(
        now.iter().all(|d| d.0 != "test.B"),
        "a terminated mailbox's queue went with it: {now:?}"
    );
}
