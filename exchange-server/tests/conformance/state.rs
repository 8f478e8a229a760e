//! An agent's saved state: docs/design.md, "State".

use super::harness::*;
use super::ownership::{ALICE, BOB, Bearer};

fn json(value: &str) -> pb::Payload {
    pb::Payload { content_type: "application/json".into(), data: value.as_bytes().to_vec().into() }
}

fn save(agent: &str, epoch: u64, expected: u64, value: &str) -> pb::SaveStateRequest {
    pb::SaveStateRequest {
        agent_id: agent.to_owned(),
        epoch,
        expected_revision: expected,
        data: Some(json(value)),
        version: 1,
    }
}

/// An agent saves and loads its state; each save is a revision; a saver
/// who expected another revision conflicts; an earlier incarnation than the
/// last that subscribed or saved is stale, and a save fences earlier
/// incarnations off the mailbox too; the size is bounded; terminate takes
/// the state with the mailbox.
pub(crate) async fn an_agent_saves_its_state_fenced_by_epoch_and_revision(store: Store) {
    let limits = Limits { max_state_bytes: 1000, ..Limits::default() };
    let mut h = start_with(store, limits).await;
    let agent = h.agent("test.S", &[]).await;
    let load = |rpc: &mut ExchangeServiceClient<Channel>, agent: &str| {
        let mut rpc = rpc.clone();
        let request = pb::LoadStateRequest { agent_id: agent.to_owned() };
        async move { rpc.load_state(request).await.map(|r| r.into_inner().state) }
    };
    assert_eq!(load(&mut h.rpc, &agent).await.unwrap(), None, "nothing saved yet");

    let saved = h.rpc.save_state(save(&agent, 0, 0, r#"{"n":1}"#)).await.unwrap();
    assert_eq!(saved.into_inner().revision, 1);
    let state = load(&mut h.rpc, &agent).await.unwrap().unwrap();
    assert_eq!((state.revision, state.epoch, state.version), (1, 0, 1));
    assert_eq!(state.data.unwrap().data.as_ref(), br#"{"n":1}"#);
    assert!(state.saved_at.is_some());

    // Optimistic: a saver that saw revision 1 may save once.
    assert_eq!(
        h.rpc.save_state(save(&agent, 0, 1, r#"{"n":2}"#)).await.unwrap().into_inner().revision,
        2
    );
    let conflict = h.rpc.save_state(save(&agent, 0, 1, r#"{"n":3}"#)).await.unwrap_err();
    assert_eq!(conflict.code(), Code::Aborted, "{conflict:?}");
    let (why, metadata) = reason(&conflict);
    assert_eq!((why.as_str(), metadata["current"].as_str()), ("STATE_CONFLICT", "2"));

    // Fencing: incarnation 3 saves; 2 can neither save nor subscribe now.
    assert_eq!(
        h.rpc.save_state(save(&agent, 3, 0, r#"{"n":4}"#)).await.unwrap().into_inner().revision,
        3
    );
    let stale = h.rpc.save_state(save(&agent, 2, 0, r#"{"n":5}"#)).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    let (why, metadata) = reason(&stale);
    assert_eq!((why.as_str(), metadata["current"].as_str()), ("STALE_EPOCH", "3"));
    let subscribe = pb::SubscribeRequest { mailbox_id: agent.clone(), epoch: 2 };
    let fenced = match h.rpc.subscribe(subscribe).await {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(reason(&fenced).0, "STALE_EPOCH", "{fenced:?}");
    let state = load(&mut h.rpc, &agent).await.unwrap().unwrap();
    assert_eq!((state.revision, state.epoch), (3, 3));
    assert_eq!(state.data.unwrap().data.as_ref(), br#"{"n":4}"#);

    // Bounded: a state larger than the limit is refused, naming it.
    let big = "x".repeat(1001);
    let refused = h.rpc.save_state(save(&agent, 3, 0, &big)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("the bytes of a saved state"), "{}", refused.message());
    assert!(refused.message().len() < 200, "the input is not echoed: {}", refused.message());
    // Only agents keep state; unknown agents have none to keep.
    let client = h.client().await;
    let refused = h.rpc.save_state(save(&client, 0, 0, "{}")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let nobody = EntityId::new_agent().to_string();
    assert_eq!(load(&mut h.rpc, &nobody).await.unwrap_err().code(), Code::NotFound);

    // Terminated: the state went with the mailbox.
    h.terminate(&agent).await;
    let gone = load(&mut h.rpc, &agent).await.unwrap_err();
    assert_eq!(reason(&gone).0, "MAILBOX_TERMINATED", "{gone:?}");
    let gone = h.rpc.save_state(save(&agent, 3, 0, "{}")).await.unwrap_err();
    assert_eq!(reason(&gone).0, "MAILBOX_TERMINATED", "{gone:?}");
}

/// Only the principal that owns an agent's mailbox reads or writes its state.
pub(crate) async fn only_the_owner_reads_or_writes_an_agents_state(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let as_ = |token| ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(token));
    let (mut alice, mut bob) = (as_(ALICE), as_(BOB));
    let (agent, _) = common::agent_and_client(&mut alice, "test.Owned").await;
    alice.save_state(save(&agent, 0, 0, r#""alice's""#)).await.unwrap();
    let denied = bob.save_state(save(&agent, 0, 0, r#""bob's""#)).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let request = pb::LoadStateRequest { agent_id: agent.clone() };
    let denied = bob.load_state(request.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let state = alice.load_state(request).await.unwrap().into_inner().state.unwrap();
    assert_eq!(state.data.unwrap().data.as_ref(), br#""alice's""#);
}
