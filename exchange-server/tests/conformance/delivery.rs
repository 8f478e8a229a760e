//! Delivery: at-least-once with acknowledgements, one subscriber at a time,
//! FIFO per sender, batches with a result each, and Invoke.
//!
//! docs/design.md, "Delivery".

use super::harness::*;

pub(crate) async fn unacknowledged_messages_are_redelivered_to_the_next_subscriber(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let first = request(&client, &agent, "one");
    let second = request(&client, &agent, "two");
    h.send(first.clone()).await.unwrap();
    h.send(second.clone()).await.unwrap();

    let mut stream = h.subscribe(&agent).await;
    let got = next(&mut stream).await;
    assert_eq!(got.len(), 2);
    // Acknowledge only the first (among thousands of unknown seqs, which are
    // ignored), then drop the connection's stream.
    let mut seqs: Vec<u64> = (1..=9_000).filter(|s| *s < got[0].seq).collect();
    seqs.push(got[0].seq);
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs };
    h.rpc.acknowledge(ack).await.unwrap();
    drop(stream);

    let mut stream = h.subscribe(&agent).await;
    let again = next(&mut stream).await;
    assert_eq!(again.len(), 1, "only the unacknowledged message comes back");
    assert_eq!(tag(again[0].message.as_ref().unwrap()), tag(&second));
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(status.into_inner().queued, 1);
}

pub(crate) async fn a_new_subscriber_supersedes_the_old_one(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.A", &[]).await;
    let mut old = h.subscribe(&agent).await;
    let _new = h.subscribe(&agent).await;
    let end = tokio::time::timeout(Duration::from_secs(1), old.next()).await.unwrap();
    assert_eq!(end.unwrap().unwrap_err().code(), Code::Aborted);
}

pub(crate) async fn messages_from_one_sender_arrive_in_order(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    // A batch larger than a backend's chunk (Redis: 128), then single sends.
    let sent: Vec<_> = (0..400).map(|i| request(&client, &agent, &format!("a{i}"))).collect();
    let batch = pb::SendBatchRequest { messages: sent[..300].to_vec() };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 300);
    assert!(results.iter().all(|r| r.code == 0));
    for m in &sent[300..] {
        h.send(m.clone()).await.unwrap();
    }
    let mut stream = h.subscribe(&agent).await;
    let expected: Vec<_> = sent.iter().map(|m| tag(m).to_owned()).collect();
    assert_eq!(tags(&mut stream, sent.len()).await, expected);
}

pub(crate) async fn send_batch_reports_each_message(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let other = h.agent("test.A", &[]).await;
    let gone = h.agent("test.A", &[]).await;
    h.terminate(&gone).await;
    let missing = format!("agent:{}", uuid::Uuid::new_v4());
    // One subscriber is there when the batch arrives, the other comes later.
    let mut stream = h.subscribe(&agent).await;
    // Mailboxes interleaved, so each answer must be matched to its message.
    let to = [&agent, &gone, &other, &missing, &agent, &other, &gone, &agent];
    let messages: Vec<_> =
        to.iter().enumerate().map(|(i, dest)| request(&client, dest, &format!("m{i}"))).collect();
    let batch = pb::SendBatchRequest { messages: messages.clone() };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    let codes: Vec<_> = results.iter().map(|r| Code::from_i32(r.code)).collect();
    let (ok, dead, unknown) = (Code::Ok, Code::FailedPrecondition, Code::NotFound);
    assert_eq!(codes, vec![ok, dead, ok, unknown, ok, ok, dead, ok]);
    assert_eq!(results[1].reason, "MAILBOX_TERMINATED");
    assert_eq!(results[1].metadata.get("id"), Some(&gone));
    assert_eq!(results[3].metadata.get("id"), Some(&missing));

    let expect = |idx: &[usize]| -> Vec<String> {
        idx.iter().map(|i| tag(&messages[*i]).to_owned()).collect()
    };
    assert_eq!(tags(&mut stream, 3).await, expect(&[0, 4, 7]));
    let mut stream = h.subscribe(&other).await;
    assert_eq!(tags(&mut stream, 2).await, expect(&[2, 5]));
}

pub(crate) async fn invoke_reports_unknown_agents_and_times_out_on_idle_ones(store: Store) {
    let mut h = start(store).await;
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    let req = pb::InvokeRequest { agent_id: unknown, action: "get".into(), ..Default::default() };
    assert_eq!(h.rpc.invoke(req).await.unwrap_err().code(), Code::NotFound);
    let idle = h.agent("test.A", &[]).await;
    let req = pb::InvokeRequest {
        agent_id: idle.clone(),
        action: "get".into(),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_millis(100))),
        ..Default::default()
    };
    let err = h.rpc.invoke(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains(&idle), "{}", err.message());
}

/// An agent's later incarnation (a higher epoch) fences the earlier ones: an
/// earlier one cannot subscribe again, and its stream ends when the later
/// one subscribes. Epoch 0 is not fenced.
pub(crate) async fn a_later_incarnation_fences_the_earlier_ones(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.A", &[]).await;
    let subscribe =
        |epoch| pb::SubscribeRequest { mailbox_id: agent.clone(), epoch, ..Default::default() };
    let mut second = h.rpc.subscribe(subscribe(2)).await.unwrap().into_inner();
    let err = h.rpc.subscribe(subscribe(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let (why, metadata) = reason(&err);
    assert_eq!((why.as_str(), metadata["current"].as_str()), ("STALE_EPOCH", "2"));
    let mut third = h.rpc.subscribe(subscribe(3)).await.unwrap().into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(5), second.next()).await.unwrap();
    assert_eq!(ended.unwrap().unwrap_err().code(), Code::Aborted);
    assert_eq!(h.rpc.subscribe(subscribe(2)).await.unwrap_err().code(), Code::FailedPrecondition);
    // The same incarnation may subscribe again (after a broken stream).
    drop(third);
    third = h.rpc.subscribe(subscribe(3)).await.unwrap().into_inner();
    let client = h.client().await;
    h.send(request(&client, &agent, "x")).await.unwrap();
    assert_eq!(next(&mut third).await.len(), 1);
}

/// Concurrent subscriptions to one mailbox leave exactly one of them open,
/// which gets what is sent, and Status agrees.
pub(crate) async fn concurrent_subscriptions_leave_exactly_one(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.A", &[]).await;
    let client = h.client().await;
    for round in 0..10 {
        let subscribes = (0..16).map(|_| {
            let (mut rpc, agent) = (h.rpc.clone(), agent.clone());
            tokio::spawn(async move { common::subscribe(&mut rpc, &agent).await })
        });
        let mut streams = Vec::new();
        for s in subscribes {
            streams.push(s.await.unwrap());
        }
        let sent = request(&client, &agent, &format!("round {round}"));
        let sent_tag = tag(&sent).to_owned();
        h.send(sent).await.unwrap();
        // Each stream either ends (taken over) or gets the message (after
        // the earlier rounds' ones, which it may get again).
        let mut open = Vec::new();
        for mut stream in streams {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
                    Ok(Some(Ok(frame))) => {
                        let got = frame
                            .deliveries
                            .iter()
                            .find(|d| tag(d.message.as_ref().unwrap()) == sent_tag);
                        if let Some(delivery) = got {
                            let seqs = vec![delivery.seq];
                            let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs };
                            h.rpc.acknowledge(ack).await.unwrap();
                            open.push(stream);
                            break;
                        }
                    }
                    Ok(Some(Err(status))) => {
                        assert_eq!(status.code(), Code::Aborted);
                        break;
                    }
                    other => panic!("round {round}: neither the message nor an end: {other:?}"),
                }
            }
        }
        assert_eq!(open.len(), 1, "round {round}: exactly one subscription stays");
        assert!(h.subscribed(&agent).await, "round {round}");
    }
}
