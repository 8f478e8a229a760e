//! Retention: what terminated and abandoned mailboxes leave, and for how
//! long.
//!
//! docs/design.md, "Retention".

use super::harness::*;
use super::ownership::{ALICE, Bearer};

/// Polls `id`'s state until it is `want`, for at most 10 s.
async fn until_state(h: &mut Harness, id: &str, want: pb::MailboxState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = h.state(id).await;
        if state == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{id} still {state:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn retention(gravestones: Option<u64>, abandoned_clients: Option<u64>) -> Limits {
    let secs = |s: Option<u64>| s.map(Duration::from_secs);
    let retention = academy_exchange::Retention {
        gravestones: secs(gravestones),
        abandoned_clients: secs(abandoned_clients),
    };
    Limits { retention, ..Limits::default() }
}

pub(crate) async fn a_terminated_client_leaves_no_gravestone(store: Store) {
    let mut h = start(store).await;
    let (client, other) = (h.client().await, h.client().await);
    assert_eq!(h.terminate(&client).await, pb::MailboxState::Active);
    // Nobody could ever register its id: there is nothing to keep dead.
    assert_eq!(h.state(&client).await, pb::MailboxState::Missing);
    assert_eq!(h.send(request(&other, &client, "x")).await.unwrap_err().code(), Code::NotFound);
    let sub = pb::SubscribeRequest { mailbox_id: client.clone(), ..Default::default() };
    assert_eq!(h.rpc.subscribe(sub).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(h.terminate(&client).await, pb::MailboxState::Missing);
    // An agent's does stay, for whatever asks about it.
    let agent = h.agent("test.A", &[]).await;
    h.terminate(&agent).await;
    let err = h.send(request(&other, &agent, "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![0] };
    assert_eq!(h.rpc.acknowledge(ack).await.unwrap_err().code(), Code::FailedPrecondition);
}

pub(crate) async fn gravestones_expire_after_their_retention(store: Store) {
    let mut h = start_with(store, retention(Some(1), None)).await;
    let id = h.agent("test.A", &[]).await;
    let again = pb::RegisterAgentRequest {
        behaviour: "test.A".into(),
        agent_id: id.clone(),
        ..Default::default()
    };
    h.terminate(&id).await;
    assert_eq!(h.state(&id).await, pb::MailboxState::Terminated);
    let err = h.rpc.register_agent(again.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    // A second later (plus the slack of at most 1/8 and the sweep), the id
    // is unknown, and may be registered again.
    until_state(&mut h, &id, pb::MailboxState::Missing).await;
    let back = h.rpc.register_agent(again).await.unwrap().into_inner().agent_id;
    assert_eq!((back.as_str(), h.state(&id).await), (id.as_str(), pb::MailboxState::Active));
}

pub(crate) async fn abandoned_clients_expire_and_give_their_quota_back(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\n")).unwrap();
    let limits = Limits { max_mailboxes_per_principal: 2, ..retention(None, Some(1)) };
    let options = ExchangeOptions { tokens: Some(tokens), limits, ..Default::default() };
    let h = start_as(store, options).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel, Bearer(ALICE));
    let register = || pb::RegisterClientRequest::default();
    let listening = alice.register_client(register()).await.unwrap().into_inner().client_id;
    let sub = pb::SubscribeRequest { mailbox_id: listening.clone(), ..Default::default() };
    let stream = alice.subscribe(sub).await.unwrap().into_inner();
    let idle = alice.register_client(register()).await.unwrap().into_inner().client_id;
    let err = alice.register_client(register()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Every call needs a token here, Status too.
    let reader = alice.clone();
    let state = move |id: String| {
        let mut alice = reader.clone();
        async move {
            let status = alice.status(pb::StatusRequest { mailbox_id: id }).await.unwrap();
            status.into_inner().state()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state(idle.clone()).await != pb::MailboxState::Missing {
        assert!(tokio::time::Instant::now() < deadline, "{idle} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its place in alice's quota is free again.
    alice.register_client(register()).await.unwrap();
    // The one with a subscriber stays, however long it listens: two more
    // retentions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state(listening.clone()).await, pb::MailboxState::Active);
    // Once nobody listens, it is abandoned too.
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state(listening.clone()).await != pb::MailboxState::Missing {
        assert!(tokio::time::Instant::now() < deadline, "{listening} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
