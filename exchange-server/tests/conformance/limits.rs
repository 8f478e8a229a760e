//! Limits and errors: every limit refused with the right status, and
//! malformed input answered INVALID_ARGUMENT without harm to the server.
//!
//! docs/design.md, "Limits".

use super::harness::*;

pub(crate) async fn oversized_message_and_full_mailbox_are_resource_exhausted(store: Store) {
    let limits = Limits { max_message_bytes: 1024, max_queued: 3, ..Limits::default() };
    let mut h = start_with(store, limits).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut big = request(&client, &agent, "big");
    if let Some(Body::ActionRequest(r)) = &mut big.body {
        r.args = Some(pb::Payload {
            content_type: "application/json".into(),
            data: vec![b'1'; 2000].into(),
            ..Default::default()
        });
    }
    let err = h.send(big).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("1024"), "names the limit: {}", err.message());

    h.send(request(&client, &agent, "x")).await.unwrap();
    // The bound holds within one batch too: two more fit, the rest are refused.
    let batch = pb::SendBatchRequest { messages: vec![request(&client, &agent, "x"); 4] };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    let exhausted = Code::ResourceExhausted as i32;
    assert_eq!(codes, [0, 0, exhausted, exhausted]);
    let err = h.send(request(&client, &agent, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("full"), "{}", err.message());
    // Nothing was dropped: the three queued messages are all there.
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap();
    assert_eq!(status.into_inner().queued, 3);
}

pub(crate) async fn malformed_input_is_invalid_argument_and_the_server_keeps_running(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let nobody = "agent:not-a-uuid";
    let checks: Vec<(&str, tonic::Status)> = vec![
        (
            "status with empty id",
            h.rpc.status(pb::StatusRequest { mailbox_id: String::new() }).await.unwrap_err(),
        ),
        (
            "terminate with malformed id",
            h.rpc.terminate(pb::TerminateRequest { mailbox_id: nobody.into() }).await.unwrap_err(),
        ),
        (
            "register without behaviour",
            h.rpc.register_agent(pb::RegisterAgentRequest::default()).await.unwrap_err(),
        ),
        (
            "register with a client id",
            h.rpc
                .register_agent(pb::RegisterAgentRequest {
                    behaviour: "x".into(),
                    agent_id: client.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
        ("send without message", h.rpc.send(pb::SendRequest { message: None }).await.unwrap_err()),
        (
            "send without header",
            h.send(pb::Message { header: None, body: Some(Body::PingRequest(pb::PingRequest {})) })
                .await
                .unwrap_err(),
        ),
        (
            "send without body",
            h.send(pb::Message { body: None, ..request(&client, &agent, "x") }).await.unwrap_err(),
        ),
        ("send with empty action", h.send(request(&client, &agent, "")).await.unwrap_err()),
        ("send with malformed dest", h.send(request(&client, nobody, "x")).await.unwrap_err()),
        (
            "send with bad tag",
            h.send(pb::Message {
                header: Some(pb::Header {
                    src: client.clone(),
                    dest: agent.clone(),
                    tag: "t".into(),
                    ..Default::default()
                }),
                ..request(&client, &agent, "x")
            })
            .await
            .unwrap_err(),
        ),
        (
            "subscribe to malformed id",
            h.rpc
                .subscribe(pb::SubscribeRequest { mailbox_id: "x".into(), ..Default::default() })
                .await
                .unwrap_err(),
        ),
        (
            "ack of a seq never delivered",
            h.rpc
                .acknowledge(pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![99] })
                .await
                .unwrap_err(),
        ),
        (
            "invoke with empty action",
            h.rpc
                .invoke(pb::InvokeRequest { agent_id: agent.clone(), ..Default::default() })
                .await
                .unwrap_err(),
        ),
        (
            "invoke on a client",
            h.rpc
                .invoke(pb::InvokeRequest {
                    agent_id: client.clone(),
                    action: "x".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
        ),
    ];
    for (what, status) in checks {
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what} explains itself");
    }
    assert_eq!(h.state(&agent).await, pb::MailboxState::Active, "server still serves");
}

/// Each fixed limit of a request is refused with INVALID_ARGUMENT, reason
/// LIMIT_EXCEEDED, naming it; nothing of the request is done.
pub(crate) async fn requests_beyond_the_protocol_limits_are_refused_naming_them(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let expect = |status: tonic::Status, limit: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let (why, metadata) = reason(&status);
        assert_eq!((why.as_str(), metadata["limit"].as_str()), ("LIMIT_EXCEEDED", limit));
        assert!(status.message().contains(limit), "{}", status.message());
    };
    // A batch of empty messages once answered 23 times its size.
    let batch = pb::SendBatchRequest { messages: vec![pb::Message::default(); 1001] };
    expect(h.rpc.send_batch(batch).await.unwrap_err(), "messages per SendBatch");
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: (1..=10_001).collect() };
    expect(h.rpc.acknowledge(ack).await.unwrap_err(), "seqs per Acknowledge");
    let many = pb::RegisterAgentRequest {
        behaviour: "test.B".into(),
        implements: (0..65).map(|i| format!("test.I{i}")).collect(),
        ..Default::default()
    };
    expect(h.rpc.register_agent(many).await.unwrap_err(), "names an agent implements");
    let long = pb::RegisterAgentRequest { behaviour: "b".repeat(257), ..Default::default() };
    expect(h.rpc.register_agent(long).await.unwrap_err(), "the length of behaviour in bytes");
    let mut labelled = request(&client, &agent, "x");
    labelled.header.as_mut().unwrap().label = "l".repeat(300);
    expect(h.send(labelled).await.unwrap_err(), "the length of header.label in bytes");
    for field in ["traceparent", "tracestate"] {
        let mut traced = request(&client, &agent, "x");
        let header = traced.header.as_mut().unwrap();
        *(if field == "traceparent" { &mut header.traceparent } else { &mut header.tracestate }) =
            "t".repeat(513);
        let limit = format!("the length of header.{field} in bytes");
        expect(h.send(traced).await.unwrap_err(), &limit);
    }
    // At the limits, all is well.
    let batch = pb::SendBatchRequest { messages: vec![request(&client, &agent, "x"); 1000] };
    let results = h.rpc.send_batch(batch).await.unwrap().into_inner().results;
    assert!(results.iter().all(|r| r.code == 0), "a full batch is accepted");
    let mut stream = h.subscribe(&agent).await;
    let seq = next(&mut stream).await[0].seq;
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![seq; 10_000] };
    h.rpc.acknowledge(ack).await.unwrap();
}

/// A mailbox holds at most `max_queued_bytes` of unacknowledged messages;
/// acknowledging gives room back.
pub(crate) async fn a_mailbox_holds_a_bounded_number_of_bytes(store: Store) {
    let limits = Limits { max_message_bytes: 3000, max_queued_bytes: 10_000, ..Limits::default() };
    let mut h = start_with(store, limits).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    for _ in 0..3 {
        h.send(sized(&client, &agent, 3000)).await.unwrap();
    }
    let err = h.send(sized(&client, &agent, 3000)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let (why, metadata) = reason(&err);
    assert_eq!((why.as_str(), metadata["limit_bytes"].as_str()), ("MAILBOX_FULL", "10000"));
    assert!(err.message().contains("10000 bytes"), "{}", err.message());
    h.send(sized(&client, &agent, 1000)).await.unwrap();
    let mut stream = h.subscribe(&agent).await;
    let first = next(&mut stream).await[0].seq;
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![first] };
    h.rpc.acknowledge(ack).await.unwrap();
    h.send(sized(&client, &agent, 3000)).await.unwrap();
}

/// Every delivery fits in what a gRPC client accepts by default (4 MiB): a
/// message of the largest size is delivered alone, a backlog of them one by
/// one, to a subscriber with gRPC's default limits (the harness's client).
pub(crate) async fn deliveries_fit_what_a_default_client_accepts(store: Store) {
    let mut h = start(store).await;
    let max = Limits::default().max_message_bytes;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let err = h.send(sized(&client, &agent, max + 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    for bytes in [max, max, 200, max - 100, 200] {
        h.send(sized(&client, &agent, bytes)).await.unwrap();
    }
    let mut stream = h.subscribe(&agent).await;
    let mut got = 0;
    while got < 5 {
        let frame = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        let frame = frame.expect("a delivery in time").expect("open").expect("under 4 MiB");
        got += frame.deliveries.len();
    }
    assert_eq!(got, 5);
}

/// What tonic itself refuses follows the exchange's codes: a request that
/// does not decode is INVALID_ARGUMENT; one over the size limit is
/// RESOURCE_EXHAUSTED naming the configured limit; an error never echoes a
/// large input back.
pub(crate) async fn undecodable_and_oversized_requests_get_the_documented_codes(store: Store) {
    let mut h = start(store).await;
    // A string field holding bytes that are not UTF-8.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Raw {
        #[prost(bytes = "vec", tag = "1")]
        mailbox_id: Vec<u8>,
    }
    let status = "/academy.v1.ExchangeService/Status";
    let err = raw_call(&h, status, Raw { mailbox_id: vec![0xff, 0xfe, 0xfd] }).await;
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("does not decode"), "{}", err.message());
    // Invoke arguments nested deeper than protobuf decoders allow.
    let mut deep = academy_proto::json::to_proto(serde_json::json!(1));
    for _ in 0..200 {
        deep = academy_proto::prost_types::Value {
            kind: Some(academy_proto::prost_types::value::Kind::ListValue(
                academy_proto::prost_types::ListValue { values: vec![deep] },
            )),
        };
    }
    let invoke = pb::InvokeRequest {
        agent_id: EntityId::new_agent().to_string(),
        action: "x".into(),
        args: Some(deep),
        ..Default::default()
    };
    let err = h.rpc.invoke(invoke).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Well over the limit (past the slack the server decodes).
    let limit = Limits::default().max_message_bytes;
    let huge = pb::StatusRequest { mailbox_id: "x".repeat(limit + 100_000) };
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut big = ExchangeServiceClient::new(channel).max_encoding_message_size(usize::MAX);
    let err = big.status(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let (why, metadata) = reason(&err);
    assert_eq!((why.as_str(), metadata["limit"].clone()), ("MESSAGE_TOO_LARGE", limit.to_string()));
    // A large malformed id comes back as an excerpt, not whole.
    let long_id = format!("agent:{}", "z".repeat(10_000));
    let err = h.rpc.status(pb::StatusRequest { mailbox_id: long_id }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().len() < 300, "{} bytes of message", err.message().len());
    let alive = h.client().await;
    h.rpc.status(pb::StatusRequest { mailbox_id: alive }).await.unwrap();
}
