//! A mailbox's states and life: registration, status, terminate and its
//! answers to the requests left queued, gravestones, and shutdown.
//!
//! docs/design.md, "Mailboxes".

use super::harness::*;

pub(crate) async fn status_lifecycle_and_idempotent_terminate(store: Store) {
    let mut h = start(store).await;
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    assert_eq!(h.state(&unknown).await, pb::MailboxState::Missing);
    let id = h.agent("test.A", &[]).await;
    assert_eq!(h.state(&id).await, pb::MailboxState::Active);
    assert_eq!(h.terminate(&id).await, pb::MailboxState::Active);
    assert_eq!(h.state(&id).await, pb::MailboxState::Terminated);
    assert_eq!(h.terminate(&id).await, pb::MailboxState::Terminated);
    // Terminating what is not there changes nothing and says so: a retry
    // after a lost answer succeeds.
    assert_eq!(h.terminate(&unknown).await, pb::MailboxState::Missing);
    assert_eq!(h.state(&unknown).await, pb::MailboxState::Missing);
}

pub(crate) async fn send_to_unknown_id_is_not_found(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let unknown = format!("agent:{}", uuid::Uuid::new_v4());
    let err = h.send(request(&client, &unknown, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(&unknown), "{}", err.message());
}

pub(crate) async fn terminated_mailbox_refuses_send_subscribe_and_reregistration(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let id = h.agent("test.A", &[]).await;
    h.terminate(&id).await;
    let err = h.send(request(&client, &id, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("terminated"), "{}", err.message());
    let sub = h
        .rpc
        .subscribe(pb::SubscribeRequest { mailbox_id: id.clone(), ..Default::default() })
        .await;
    assert_eq!(sub.unwrap_err().code(), Code::FailedPrecondition);
    let again = pb::RegisterAgentRequest {
        behaviour: "test.A".into(),
        agent_id: id.clone(),
        ..Default::default()
    };
    let err = h.rpc.register_agent(again).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "a gravestone keeps the id dead");
}

pub(crate) async fn terminate_answers_queued_requests_with_errors_of_the_same_tag(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut replies = h.subscribe(&client).await;
    let asked = request(&client, &agent, "work");
    h.send(asked.clone()).await.unwrap();
    h.terminate(&agent).await;
    let delivered = next(&mut replies).await;
    let reply = delivered[0].message.as_ref().unwrap();
    assert_eq!(tag(reply), tag(&asked));
    match &reply.body {
        Some(Body::ErrorResponse(e)) => {
            assert_eq!(e.code, Code::FailedPrecondition as i32);
            assert!(e.message.contains(&agent), "{}", e.message);
        }
        other => panic!("expected an error response, got {other:?}"),
    }
}

/// Hundreds queued, with arguments and with messages that await no answer
/// among them: every request is answered, in order, and nothing else.
pub(crate) async fn terminate_answers_every_request_of_a_long_queue(store: Store) {
    let mut h = start(store).await;
    let client = h.client().await;
    let agent = h.agent("test.A", &[]).await;
    let mut replies = h.subscribe(&client).await;
    let args = pb::Payload {
        content_type: "application/json".into(),
        data: vec![b'1'; 4096].into(),
        ..Default::default()
    };
    let mut asked = Vec::new();
    let mut messages = Vec::new();
    for n in 0..300 {
        let message = match n % 3 {
            0 => message(&client, &agent, Body::ActionResponse(pb::ActionResponse::default())),
            1 => common::ping(&client, &agent, n),
            _ => message(
                &client,
                &agent,
                Body::ActionRequest(pb::ActionRequest {
                    action: "work".into(),
                    args: Some(args.clone()),
                }),
            ),
        };
        if n % 3 != 0 {
            asked.push(tag(&message).to_owned());
        }
        messages.push(message);
    }
    let results = h.rpc.send_batch(pb::SendBatchRequest { messages }).await.unwrap();
    assert!(results.into_inner().results.iter().all(|r| r.code == 0));
    assert_eq!(h.terminate(&agent).await, pb::MailboxState::Active);
    assert_eq!(tags(&mut replies, asked.len()).await, asked);
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: agent }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.queued), (pb::MailboxState::Terminated, 0));
}

pub(crate) async fn status_says_whether_a_subscriber_listens(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("lab.Listener", &[]).await;
    assert!(!h.subscribed(&agent).await, "no subscriber yet");
    let first = h.subscribe(&agent).await;
    assert!(h.subscribed(&agent).await);

    // A subscriber that was taken over leaving does not count.
    let second = h.subscribe(&agent).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.subscribed(&agent).await, "the newer subscriber still listens");
    // A subscriber whose connection closes stops counting.
    drop(second);
    h.until_unsubscribed(&agent).await;

    let _third = h.subscribe(&agent).await;
    assert!(h.subscribed(&agent).await);
    h.terminate(&agent).await;
    assert!(!h.subscribed(&agent).await, "a terminated mailbox has no subscriber");
    let unknown = EntityId::new_agent().to_string();
    assert!(!h.subscribed(&unknown).await);
}

pub(crate) async fn shutdown_ends_open_subscriptions_promptly(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.A", &[]).await;
    let client = h.client().await;
    let mut stream = h.subscribe(&agent).await;
    // And a session, with a subscription open on it.
    let mut session = crate::session::RawSession::open(&mut h.rpc).await.unwrap();
    session.subscribe(1, &client).await;
    let stopped = tokio::time::timeout(Duration::from_secs(5), h.server.shutdown()).await;
    assert!(stopped.is_ok(), "shutdown must not wait on open streams");
    let end = tokio::time::timeout(Duration::from_secs(1), stream.next()).await.unwrap();
    match end {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable),
        None => {}
        Some(Ok(frame)) => panic!("unexpected frame {frame:?}"),
    }
    // The session ends with it: its subscription first, if in time.
    loop {
        match session.next().await {
            Ok(answer) => assert_eq!(answer.call, 1, "only the subscription's end: {answer:?}"),
            Err(status) => break assert_eq!(status.code(), Code::Unavailable),
        }
    }
}

/// The answers terminate sends for the requests left queued respect each
/// requester's bounds: a requester's full mailbox is not overfilled.
pub(crate) async fn terminate_answers_within_the_requesters_bounds(store: Store) {
    let limits = Limits { max_queued: 3, ..Limits::default() };
    let mut h = start_with(store, limits).await;
    let client = h.client().await;
    let (a, b) = (h.agent("test.A", &[]).await, h.agent("test.A", &[]).await);
    for agent in [&a, &a, &a, &b, &b, &b] {
        h.send(request(&client, agent, "x")).await.unwrap();
    }
    h.terminate(&a).await;
    h.terminate(&b).await;
    let status = h.rpc.status(pb::StatusRequest { mailbox_id: client }).await.unwrap();
    assert_eq!(status.into_inner().queued, 3, "six answers, room for three");
}
