//! Limits and errors: every limit refused with the right status, and
//! malformed input answered INVALID_ARGUMENT without harm to the server.
//!
//! docs/design.md, "Limits".

use super::harness::*;

pub(crate) async fn oversized_message_and_full_mailbox_are_resource_exhausted(store: Store) {
    let limits = Limits { max_message_bytes: 1024, max_queued: 3 };
    let mut h = start_with(store, limits).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut big = request(&client, &agent, "big");
    if let Some(Body::ActionRequest(r)) = &mut big.body {
        r.args = Some(pb::Payload {
            content_type: "application/json".into(),
            data: vec![b'1'; 2000].into(),
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
            h.rpc.subscribe(pb::SubscribeRequest { mailbox_id: "x".into() }).await.unwrap_err(),
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
