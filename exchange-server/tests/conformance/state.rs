//! An agent's saved state: docs/design.md, "State".

use super::harness::*;
use super::ownership::{ALICE, BOB, Bearer};

fn json(value: &str) -> pb::Payload {
    pb::Payload {
        content_type: "application/json".into(),
        data: value.as_bytes().to_vec().into(),
        ..Default::default()
    }
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
    let subscribe =
        pb::SubscribeRequest { mailbox_id: agent.clone(), epoch: 2, ..Default::default() };
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
    // Inline only: a state is not a blob.
    let mut by_reference = save(&agent, 3, 0, "");
    by_reference.data.as_mut().unwrap().blob =
        Some(pb::BlobRef { store: "exchange".into(), key: "ab".repeat(32), ..Default::default() });
    let refused = h.rpc.save_state(by_reference).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("inline"), "{}", refused.message());
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
    let denied = bob.commit(commit(&agent, 0, Some(r#""bob's""#), vec![], vec![])).await;
    assert_eq!(denied.unwrap_err().code(), Code::PermissionDenied);
    let request = pb::LoadStateRequest { agent_id: agent.clone() };
    let denied = bob.load_state(request.clone()).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let state = alice.load_state(request).await.unwrap().into_inner().state.unwrap();
    assert_eq!(state.data.unwrap().data.as_ref(), br#""alice's""#);
}

fn answer(agent: &str, request: &pb::Message, n: u64) -> pb::Message {
    let header = request.header.as_ref().unwrap().reply_from(agent.to_owned());
    let result = json(&n.to_string());
    let response = pb::ActionResponse { action: "add".into(), result: Some(result) };
    pb::Message { header: Some(header), body: Some(Body::ActionResponse(response)) }
}

fn commit(
    agent: &str,
    epoch: u64,
    state: Option<&str>,
    seqs: Vec<u64>,
    answers: Vec<pb::Message>,
) -> pb::CommitRequest {
    let mut save = save(agent, epoch, 0, state.unwrap_or_default());
    if state.is_none() {
        save.data = None;
    }
    pb::CommitRequest { state: Some(save), seqs, answers }
}

async fn subscribe_as(
    h: &mut Harness,
    id: &str,
    epoch: u64,
) -> tonic::Streaming<pb::SubscribeResponse> {
    let request = pb::SubscribeRequest { mailbox_id: id.to_owned(), epoch, ..Default::default() };
    h.rpc.subscribe(request).await.unwrap().into_inner()
}

/// A commit saves the state, acknowledges the requests and queues their
/// answers in one step, or does none of it: a stale incarnation's or one
/// acknowledging what was never delivered changes nothing; an answer it
/// cannot queue gets its own error while the rest commits.
pub(crate) async fn a_commit_saves_acknowledges_and_answers_in_one_step(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.Counter", &[]).await;
    let client = h.client().await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        let request = request(&client, &agent, "add");
        sent.push(tag(&request).to_owned());
        h.send(request).await.unwrap();
    }
    let mut inbox = subscribe_as(&mut h, &agent, 2).await;
    let delivered = next(&mut inbox).await;
    assert_eq!(delivered.len(), 3);
    let seq = |i: usize| delivered[i].seq;
    let req = |i: usize| delivered[i].message.clone().unwrap();

    let first =
        commit(&agent, 2, Some(r#"{"n":1}"#), vec![seq(0)], vec![answer(&agent, &req(0), 1)]);
    let done = h.rpc.commit(first).await.unwrap().into_inner();
    assert_eq!(done.revision, 1);
    assert_eq!(done.results, vec![pb::SendResult::default()]);
    let mut answers = h.subscribe(&client).await;
    assert_eq!(tags(&mut answers, 1).await, sent[..1]);

    // Refused whole: an earlier incarnation, or a seq never delivered.
    let stale =
        commit(&agent, 1, Some(r#"{"n":9}"#), vec![seq(1)], vec![answer(&agent, &req(1), 9)]);
    let refused = h.rpc.commit(stale).await.unwrap_err();
    assert_eq!(reason(&refused).0, "STALE_EPOCH", "{refused:?}");
    let never = commit(
        &agent,
        2,
        Some(r#"{"n":9}"#),
        vec![seq(2) + 1000],
        vec![answer(&agent, &req(1), 9)],
    );
    let refused = h.rpc.commit(never).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("never delivered"), "{}", refused.message());
    let state = h.rpc.load_state(pb::LoadStateRequest { agent_id: agent.clone() }).await;
    let state = state.unwrap().into_inner().state.unwrap();
    assert_eq!((state.revision, state.data.unwrap().data.as_ref()), (1, &br#"{"n":1}"#[..]));

    // What was not committed is delivered again; what was, is not.
    let mut inbox = subscribe_as(&mut h, &agent, 2).await;
    let again: Vec<u64> = next(&mut inbox).await.iter().map(|d| d.seq).collect();
    assert_eq!(again, [seq(1), seq(2)]);

    // Without data the state stays; each answer gets its own result: one
    // not from the agent, or not an answer, is refused; the rest commits.
    let mut forged = answer(&agent, &req(1), 2);
    forged.header.as_mut().unwrap().src = client.clone();
    let not_an_answer = request(&agent, &client, "add");
    let answers_ = vec![answer(&agent, &req(1), 2), forged, not_an_answer];
    let done = h.rpc.commit(commit(&agent, 2, None, vec![seq(1)], answers_)).await;
    let done = done.unwrap().into_inner();
    assert_eq!(done.revision, 1, "no data keeps the saved state");
    let codes: Vec<i32> = done.results.iter().map(|r| r.code).collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(codes, [0, invalid, invalid], "{:?}", done.results);
    assert_eq!(tags(&mut answers, 1).await, sent[1..2]);

    // An answer to a mailbox gone is that answer's error; the state and
    // the acknowledgement commit.
    h.terminate(&client).await;
    let last =
        commit(&agent, 2, Some(r#"{"n":3}"#), vec![seq(2)], vec![answer(&agent, &req(2), 3)]);
    let done = h.rpc.commit(last).await.unwrap().into_inner();
    assert_eq!(done.revision, 2);
    assert_ne!(done.results[0].code, 0, "{:?}", done.results);
    let mut inbox = subscribe_as(&mut h, &agent, 2).await;
    let quiet = tokio::time::timeout(Duration::from_millis(300), inbox.next()).await;
    assert!(quiet.is_err(), "every request was committed: {quiet:?}");

    // Bounded, and for agents only.
    let many = commit(&agent, 2, None, vec![0; 1001], Vec::new());
    let refused = h.rpc.commit(many).await.unwrap_err();
    assert!(refused.message().contains("seqs per Commit"), "{}", refused.message());
    let refused = h.rpc.commit(commit(&client, 0, Some("{}"), Vec::new(), Vec::new())).await;
    assert_eq!(refused.unwrap_err().code(), Code::InvalidArgument);
}
