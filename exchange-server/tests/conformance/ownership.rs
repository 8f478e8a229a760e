//! Ownership: a mailbox belongs to the principal that registered it; tokens
//! files are followed.
//!
//! docs/design.md, "Security".

use super::harness::*;

pub(crate) use crate::common::Bearer;

pub(crate) const ALICE: &str = "alice-token-0123456789";

pub(crate) const BOB: &str = "bob-token-0123456789";

pub(crate) async fn mailboxes_belong_to_the_principal_that_registered_them(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let as_ = |token| ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(token));
    let (mut alice, mut bob, mut nobody) = (as_(ALICE), as_(BOB), h.rpc.clone());

    // Without a token, or with an unknown one: UNAUTHENTICATED, health excepted.
    let err = nobody.register_client(pb::RegisterClientRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization: Bearer"), "{}", err.message());
    let mut stranger = as_("mallory-token-0123456789");
    let err = stranger.status(pb::StatusRequest { mailbox_id: "x".into() }).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::Unauthenticated, "unknown bearer token"));
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check =
        tonic_health::pb::HealthCheckRequest { service: "academy.v1.ExchangeService".into() };
    assert_eq!(health.check(check).await.unwrap().into_inner().status, 1); // SERVING

    let (agent, client) = common::agent_and_client(&mut alice, "test.A").await;
    let register = pb::RegisterClientRequest::default();
    let bobs = bob.register_client(register).await.unwrap().into_inner().client_id;
    // Anyone may send to it and ask about it...
    bob.send(pb::SendRequest { message: Some(common::ping(&bobs, &agent, 1)) }).await.unwrap();
    let status =
        bob.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.queued), (pb::MailboxState::Active, 1));
    // ...but only alice may receive from it or end it.
    let denied = |status: tonic::Status| {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let id = agent.parse().unwrap();
        let expected = ExchangeError::PermissionDenied { id, owner: "alice".into() };
        assert_eq!(ExchangeError::from_status(&status), Some(expected));
    };
    let subscribe = pb::SubscribeRequest { mailbox_id: agent.clone(), ..Default::default() };
    denied(bob.subscribe(subscribe).await.unwrap_err());
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![0] };
    denied(bob.acknowledge(ack).await.unwrap_err());
    denied(bob.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap_err());
    let status =
        bob.status(pb::StatusRequest { mailbox_id: agent.clone() }).await.unwrap().into_inner();
    assert_eq!((status.state(), status.queued), (pb::MailboxState::Active, 1));

    let mut stream = common::subscribe(&mut alice, &agent).await;
    let delivered = next(&mut stream).await;
    assert_eq!(common::number(delivered[0].message.as_ref().unwrap()), 1);
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![delivered[0].seq] };
    alice.acknowledge(ack).await.unwrap();
    // Asking an agent to shut down is like terminating it: the owner's call.
    let shutdown = |from: &str| {
        let body = Body::ShutdownRequest(pb::ShutdownRequest { terminate: Some(true) });
        pb::SendRequest { message: Some(message(from, &agent, body)) }
    };
    denied(bob.send(shutdown(&bobs)).await.unwrap_err());
    // Nor may bob send in alice's name (from her mailbox), or from a mailbox
    // nobody registered: the agent must be able to trust `header.src`.
    let unregistered = EntityId::new_client().to_string();
    let batch = pb::SendBatchRequest {
        messages: vec![
            common::ping(&bobs, &agent, 2),
            shutdown(&bobs).message.unwrap(),
            common::ping(&client, &agent, 3),
            common::ping(&unregistered, &agent, 4),
            common::ping(&bobs, &agent, 5),
        ],
    };
    let results = bob.send_batch(batch).await.unwrap().into_inner().results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    let (ok, no, bad) =
        (Code::Ok as i32, Code::PermissionDenied as i32, Code::InvalidArgument as i32);
    assert_eq!(codes, [ok, no, no, bad, ok]);
    assert_eq!(results[1].metadata.get("owner").map(String::as_str), Some("alice"));
    assert_eq!(results[2].metadata.get("id"), Some(&client), "{results:?}");
    assert_eq!(results[2].metadata.get("owner").map(String::as_str), Some("alice"));
    assert!(results[3].message.contains("is not a registered mailbox"), "{results:?}");
    let spoofed = bob.send(pb::SendRequest { message: Some(common::ping(&client, &agent, 6)) });
    let err = spoofed.await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("send from it"), "{}", err.message());
    alice.send(shutdown(&client)).await.unwrap();
    let mut kinds: Vec<pb::Message> =
        next(&mut stream).await.into_iter().map(|d| d.message.unwrap()).collect();
    while kinds.len() < 3 {
        kinds.extend(next(&mut stream).await.into_iter().map(|d| d.message.unwrap()));
    }
    assert!(matches!(kinds[2].body, Some(Body::ShutdownRequest(_))), "{kinds:?}");
    let labels: Vec<_> = kinds.iter().map(|m| m.header.as_ref().unwrap().label.as_str()).collect();
    assert_eq!(labels, ["2", "5", ""], "only bob's own pings, then alice's shutdown request");
    // Bob's Invoke gets a mailbox of his own to wait in: the agent is idle, so
    // the call times out rather than being refused.
    let invoke = pb::InvokeRequest {
        agent_id: agent.clone(),
        action: "get".into(),
        timeout: Some(academy_proto::duration::to_proto(Duration::from_millis(100))),
        ..Default::default()
    };
    assert_eq!(bob.invoke(invoke).await.unwrap_err().code(), Code::DeadlineExceeded);
    let done = alice.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(done.into_inner().previous_state(), pb::MailboxState::Active);
    // A gravestone has no owner: terminating it again changes nothing, and
    // tells anyone only what Status tells anyone.
    let again = bob.terminate(pb::TerminateRequest { mailbox_id: agent.clone() }).await.unwrap();
    assert_eq!(again.into_inner().previous_state(), pb::MailboxState::Terminated);
}

/// A tokens file that changes is followed: a new token works and a removed
/// one stops working, without a restart; a broken file changes nothing.
#[tokio::test]
async fn a_changed_tokens_file_takes_effect_without_a_restart() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-reload-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, format!("alice {ALICE}\n")).unwrap();
    let tokens = Tokens::load(&file).unwrap().reload_every(Duration::from_millis(20));
    let h = start_as(Store::Memory, ExchangeOptions { tokens: Some(tokens), ..Default::default() })
        .await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let code = |token| {
        let mut rpc = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(token));
        async move {
            let status = rpc.status(pb::StatusRequest { mailbox_id: "client:nope".into() }).await;
            status.err().map_or(Code::Ok, |e| e.code())
        }
    };
    // An unknown id is INVALID_ARGUMENT: the call got past authentication.
    let (passed, refused) = (Code::InvalidArgument, Code::Unauthenticated);
    assert_eq!((code(ALICE).await, code(BOB).await), (passed, refused));

    std::fs::write(&file, format!("bob {BOB}\n")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while code(BOB).await != passed {
        assert!(tokio::time::Instant::now() < deadline, "the new token never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code(ALICE).await, refused);

    std::fs::write(&file, "bob short\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((code(ALICE).await, code(BOB).await), (refused, passed));
    std::fs::remove_dir_all(dir).unwrap();
}

/// A principal owns at most `max_mailboxes_per_principal` active mailboxes
/// and has at most `max_queued_bytes_per_principal` queued unacknowledged;
/// terminating and acknowledging give room back. Others are not held up.
pub(crate) async fn principals_are_held_to_their_quotas(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let limits = Limits {
        max_mailboxes_per_principal: 3,
        max_queued_bytes_per_principal: 8_000,
        ..Limits::default()
    };
    let options = ExchangeOptions { tokens: Some(tokens), limits, ..Default::default() };
    let h = start_as(store, options).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let mut bob = ExchangeServiceClient::with_interceptor(channel, Bearer(BOB));
    let register = || pb::RegisterAgentRequest { behaviour: "test.A".into(), ..Default::default() };
    let mut agents = Vec::new();
    for _ in 0..3 {
        agents.push(alice.register_agent(register()).await.unwrap().into_inner().agent_id);
    }
    let err = alice.register_agent(register()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let (why, metadata) = reason(&err);
    assert_eq!((why.as_str(), metadata["principal"].as_str()), ("QUOTA_EXCEEDED", "alice"));
    assert!(err.message().contains("active mailboxes"), "{}", err.message());
    let err = alice.register_client(pb::RegisterClientRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "clients count too");
    let gone = agents.pop().unwrap();
    alice.terminate(pb::TerminateRequest { mailbox_id: gone }).await.unwrap();
    let agent = alice.register_agent(register()).await.unwrap().into_inner().agent_id;

    // Bob sends from his own mailbox; his bytes queued are bounded.
    let bobs = bob.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let bobs = bobs.into_inner().client_id;
    let send = |m: pb::Message| pb::SendRequest { message: Some(m) };
    bob.send(send(sized(&bobs, &agent, 3000))).await.unwrap();
    bob.send(send(sized(&bobs, &agents[0], 3000))).await.unwrap();
    let err = bob.send(send(sized(&bobs, &agent, 3000))).await.unwrap_err();
    assert_eq!((err.code(), reason(&err).0.as_str()), (Code::ResourceExhausted, "QUOTA_EXCEEDED"));
    // Alice is not held up by bob's quota.
    let alices = alice.register_client(pb::RegisterClientRequest::default()).await.unwrap_err();
    assert_eq!(alices.code(), Code::ResourceExhausted, "she is at her mailbox quota");
    // Acknowledging gives bob room back; so does terminating a mailbox.
    let request = pb::SubscribeRequest { mailbox_id: agent.clone(), ..Default::default() };
    let mut stream = alice.subscribe(request).await.unwrap().into_inner();
    let seq = next(&mut stream).await[0].seq;
    let ack = pb::AcknowledgeRequest { mailbox_id: agent.clone(), seqs: vec![seq] };
    alice.acknowledge(ack).await.unwrap();
    bob.send(send(sized(&bobs, &agent, 3000))).await.unwrap();
    let err = bob.send(send(sized(&bobs, &agent, 3000))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    alice.terminate(pb::TerminateRequest { mailbox_id: agents[0].clone() }).await.unwrap();
    bob.send(send(sized(&bobs, &agent, 3000))).await.unwrap();
}

/// Alice's and Bob's tokens in a file of a directory of its own, read
/// again every 20 ms: the directory, the file, the tokens.
fn alice_and_bob_in_a_file() -> (std::path::PathBuf, std::path::PathBuf, Tokens) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-revoke-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let tokens = Tokens::load(&file).unwrap().reload_every(Duration::from_millis(20));
    (dir, file, tokens)
}

/// A stream lasts no longer than the token that opened it: once the tokens
/// file no longer holds it, the stream ends UNAUTHENTICATED.
pub(crate) async fn a_revoked_token_ends_the_streams_it_opened(store: Store) {
    let (dir, file, tokens) = alice_and_bob_in_a_file();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let mut bob = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(BOB));
    let open = async |rpc: &mut ExchangeServiceClient<_>| {
        let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
        let request = pb::SubscribeRequest {
            mailbox_id: client.into_inner().client_id,
            epoch: 0,
            ..Default::default()
        };
        rpc.subscribe(request).await.unwrap().into_inner()
    };
    let (mut alices, mut bobs) = (open(&mut alice).await, open(&mut bob).await);
    let mut session = crate::session::RawSession::open(&mut alice).await.unwrap();
    // A put left open, alice's.
    use academy_proto::pb::blob_service_client::BlobServiceClient;
    let blobs = BlobServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let owner = alice.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let owner = owner.into_inner().client_id;
    let chunk = || pb::PutBlobRequest { data: vec![1; 1 << 20].into(), ..Default::default() };
    let head = pb::PutBlobRequest { owner, size: 16 << 20, ..Default::default() };
    let (feed, frames) = tokio::sync::mpsc::channel(4);
    feed.send(head).await.unwrap();
    feed.send(chunk()).await.unwrap();
    let mut putting = blobs.clone();
    let put = tokio::spawn(async move {
        putting.put_blob(tokio_stream::wrappers::ReceiverStream::new(frames)).await
    });
    std::fs::write(&file, format!("bob {BOB}\n")).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), alices.next()).await;
    let status = ended.expect("the stream ends").expect("with a status").unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{}", status.message());
    let status = session.next().await.expect_err("the session ends too");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let put = tokio::time::timeout(Duration::from_secs(5), put).await.expect("the put ends");
    let status = put.unwrap().expect_err("refused, keeping nothing");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    drop(feed);
    assert_eq!(h.server.exchange().blob_usage().await.unwrap().blobs, 0);
    // Bob's token stays: his stream stays open.
    let still = tokio::time::timeout(Duration::from_millis(300), bobs.next()).await;
    assert!(still.is_err(), "bob's stream ended: {still:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Discovery says whose agents they are, and finds one principal's among
/// many of another's, a bounded scan per page.
pub(crate) async fn discovery_tells_whose_agents_they_are(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let mut bob = ExchangeServiceClient::with_interceptor(channel, Bearer(BOB));
    let sensor =
        || pb::RegisterAgentRequest { behaviour: "lab.Sensor".into(), ..Default::default() };
    for _ in 0..1_500 {
        bob.register_agent(sensor()).await.unwrap();
    }
    let mine = alice.register_agent(sensor()).await.unwrap().into_inner().agent_id;
    let (mut pages, mut found, mut page_token) = (0, Vec::new(), String::new());
    loop {
        let request = pb::DiscoverRequest {
            behaviour: "lab.Sensor".into(),
            owner: "alice".into(),
            page_size: 10,
            page_token,
            ..Default::default()
        };
        let page = bob.discover(request).await.unwrap().into_inner();
        pages += 1;
        found.extend(page.agents);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert!(pages > 1, "a page scans a bounded number of agents");
    let ids: Vec<&str> = found.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!((ids, found[0].owner.as_str()), (vec![mine.as_str()], "alice"));
    let all = bob.discover(pb::DiscoverRequest { page_size: 2, ..Default::default() }).await;
    assert_eq!(all.unwrap().into_inner().agents[0].owner, "bob");
}

/// Tickets for direct delivery (docs/design.md, "Direct delivery"): only who
/// may send from a mailbox gets one for it; a peer endpoint that checks it
/// learns that mailbox; a new ticket retires the mailbox's earlier one;
/// anything else is UNAUTHENTICATED.
pub(crate) async fn tickets_are_issued_to_whoever_may_send_from_the_mailbox(store: Store) {
    let tokens = Tokens::parse(&format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let mut bob = ExchangeServiceClient::with_interceptor(channel, Bearer(BOB));
    let (_, client) = common::agent_and_client(&mut alice, "test.A").await;
    let issue = |id: &str| pb::IssueTicketRequest { mailbox_id: id.to_owned() };
    let first = alice.issue_ticket(issue(&client)).await.unwrap().into_inner();
    let ttl = first.expires_in.unwrap();
    assert!(ttl.seconds > 60, "{ttl:?}");
    let check = |ticket: &str| pb::CheckTicketRequest { ticket: ticket.to_owned() };
    // Bob (a peer endpoint's host, say) checks it: Alice's client mailbox.
    let checked = bob.check_ticket(check(&first.ticket)).await.unwrap().into_inner();
    assert_eq!(checked.mailbox_id, client);

    let refused = bob.issue_ticket(issue(&client)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let missing = format!("client:{}", uuid::Uuid::new_v4());
    let refused = alice.issue_ticket(issue(&missing)).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");

    let second = alice.issue_ticket(issue(&client)).await.unwrap().into_inner();
    assert_ne!(second.ticket, first.ticket);
    assert_eq!(
        bob.check_ticket(check(&second.ticket)).await.unwrap().into_inner().mailbox_id,
        client
    );
    for stale in [first.ticket.as_str(), "0123abcd", "not a ticket at all", &"f".repeat(4096)] {
        let refused = bob.check_ticket(check(stale)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().len() < 200, "the ticket is not echoed back");
    }
}

/// A ticket lasts no longer than the token it was issued to: once the
/// tokens file no longer holds that token, peer endpoints checking the
/// ticket are told it is unknown; tickets of tokens that stay still hold.
pub(crate) async fn a_revoked_token_takes_its_tickets_with_it(store: Store) {
    let (dir, file, tokens) = alice_and_bob_in_a_file();
    let h = start_as(store, ExchangeOptions { tokens: Some(tokens), ..Default::default() }).await;
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut alice = ExchangeServiceClient::with_interceptor(channel.clone(), Bearer(ALICE));
    let mut bob = ExchangeServiceClient::with_interceptor(channel, Bearer(BOB));
    let issue = async |rpc: &mut ExchangeServiceClient<_>| {
        let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
        let mailbox_id = client.into_inner().client_id;
        rpc.issue_ticket(pb::IssueTicketRequest { mailbox_id }).await.unwrap().into_inner().ticket
    };
    let (alices, bobs) = (issue(&mut alice).await, issue(&mut bob).await);
    let check = |ticket: &str| pb::CheckTicketRequest { ticket: ticket.to_owned() };
    bob.check_ticket(check(&alices)).await.unwrap();

    std::fs::write(&file, format!("bob {BOB}\n")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match bob.check_ticket(check(&alices)).await {
            Err(refused) => break refused,
            Ok(_) => assert!(tokio::time::Instant::now() < deadline, "alice's ticket holds"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    bob.check_ticket(check(&bobs)).await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
