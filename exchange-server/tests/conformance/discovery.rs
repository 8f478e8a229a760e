//! Discovery: by behaviour or interface, without terminated agents, in pages.
//!
//! docs/design.md, "Discovery".

use super::harness::*;

pub(crate) async fn discovery_by_name_interface_and_without_terminated_agents(store: Store) {
    let mut h = start(store).await;
    let a = h.agent("lab.Thermometer", &["lab.Sensor"]).await;
    let b = h.agent("lab.Hygrometer", &["lab.Sensor"]).await;
    let c = h.agent("lab.Sensor", &[]).await;
    let mut discover = async |name: &str, exact: bool| {
        let req = pb::DiscoverRequest { behaviour: name.into(), exact, ..Default::default() };
        let agents = h.rpc.discover(req).await.unwrap().into_inner().agents;
        agents.into_iter().map(|a| a.agent_id).collect::<Vec<_>>()
    };
    assert_eq!(discover("lab.Sensor", false).await, vec![a.clone(), b.clone(), c.clone()]);
    assert_eq!(discover("lab.Sensor", true).await, vec![c.clone()]);
    assert_eq!(discover("lab.Thermometer", true).await, vec![a.clone()]);
    assert_eq!(discover("", false).await.len(), 3);
    assert!(discover("lab.Nothing", false).await.is_empty());
    h.terminate(&a).await;
    assert_eq!(
        h.rpc
            .discover(pb::DiscoverRequest {
                behaviour: "lab.Sensor".into(),
                exact: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .agents
            .len(),
        2
    );
    let err = h
        .rpc
        .discover(pb::DiscoverRequest {
            behaviour: String::new(),
            exact: true,
            ..Default::default()
        })
        .await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
}

pub(crate) async fn discovery_pages_through_large_answers(store: Store) {
    let mut h = start(store).await;
    let mut all = Vec::new();
    for _ in 0..5 {
        all.push(h.agent("lab.Paged", &[]).await);
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let req = pb::DiscoverRequest {
            behaviour: "lab.Paged".into(),
            page_size: 2,
            page_token,
            ..Default::default()
        };
        let page = h.rpc.discover(req).await.unwrap().into_inner();
        assert!(page.agents.len() <= 2);
        seen.extend(page.agents.into_iter().map(|a| a.agent_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!((seen, pages), (all.clone(), 3), "every agent once, in order, in three pages");

    // A page as long as what is left is the last; a token whose agent has
    // left discovery still says where to go on.
    let page = async |rpc: &mut ExchangeServiceClient<Channel>, exact: bool, page_token: &str| {
        let behaviour = "lab.Paged".into();
        let page_token = page_token.into();
        let req = pb::DiscoverRequest {
            behaviour,
            exact,
            page_size: 2,
            page_token,
            ..Default::default()
        };
        let page = rpc.discover(req).await.unwrap().into_inner();
        let ids: Vec<String> = page.agents.into_iter().map(|a| a.agent_id).collect();
        (ids, page.next_page_token)
    };
    h.terminate(&all[1]).await;
    assert_eq!(page(&mut h.rpc, false, &all[1]).await, (all[2..4].to_vec(), all[3].clone()));
    assert_eq!(page(&mut h.rpc, true, &all[2]).await, (all[3..5].to_vec(), String::new()));

    // Agents with many long names come fewer to an answer (it stays under
    // 1 MiB), whatever the page size: 70 agents listing 64 names of 256
    // bytes (~16.6 kB each) take two answers.
    let implements: Vec<String> = (0..64).map(|i| format!("{i:0>256}")).collect();
    for _ in 0..70 {
        let long = pb::RegisterAgentRequest {
            behaviour: "lab.Long".into(),
            implements: implements.clone(),
            ..Default::default()
        };
        h.rpc.register_agent(long).await.unwrap();
    }
    let mut sizes = Vec::new();
    let mut page_token = String::new();
    loop {
        let req =
            pb::DiscoverRequest { behaviour: "lab.Long".into(), page_token, ..Default::default() };
        let page = h.rpc.discover(req).await.unwrap().into_inner();
        assert!(prost::Message::encoded_len(&page) <= 1 << 20);
        sizes.push(page.agents.len());
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!((sizes.len(), sizes.iter().sum::<usize>()), (2, 70), "{sizes:?}");
    let bad = pb::DiscoverRequest {
        behaviour: "lab.Paged".into(),
        page_token: "page two".into(),
        ..Default::default()
    };
    assert_eq!(h.rpc.discover(bad).await.unwrap_err().code(), Code::InvalidArgument);
}

fn description(doc: &str) -> pb::AgentDescription {
    let schema = academy_proto::json::to_proto(serde_json::json!({
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
    }));
    pb::AgentDescription {
        doc: doc.into(),
        actions: vec![pb::ActionDescription {
            name: "add".into(),
            doc: "Adds n.".into(),
            params: vec!["n".into()],
            input_schema: Some(schema),
            output_schema: Some(academy_proto::json::to_proto(
                serde_json::json!({"type": "integer"}),
            )),
            read_only: false,
        }],
    }
}

/// An agent publishes what it can do when registered: Describe returns it
/// to anyone, Discover when asked; it is bounded, and goes with the mailbox.
pub(crate) async fn agents_describe_themselves(store: Store) {
    let mut h = start(store).await;
    let register = |doc: &str| pb::RegisterAgentRequest {
        behaviour: "lab.Counter".into(),
        description: Some(description(doc)),
        ..Default::default()
    };
    let described = h.rpc.register_agent(register("Counts.")).await.unwrap().into_inner().agent_id;
    let plain = h.agent("lab.Counter", &[]).await;
    let describe = |id: &str| pb::DescribeRequest { agent_id: id.into() };

    let agent = h.rpc.describe(describe(&described)).await.unwrap().into_inner().agent.unwrap();
    assert_eq!(
        (agent.agent_id.as_str(), agent.behaviour.as_str()),
        (described.as_str(), "lab.Counter")
    );
    assert_eq!(agent.description, Some(description("Counts.")));
    let agent = h.rpc.describe(describe(&plain)).await.unwrap().into_inner().agent.unwrap();
    assert_eq!(agent.description, None, "it published none");

    // Discover: descriptions only when asked.
    let mut discover = async |describe: bool| {
        let req =
            pb::DiscoverRequest { behaviour: "lab.Counter".into(), describe, ..Default::default() };
        let agents = h.rpc.discover(req).await.unwrap().into_inner().agents;
        agents.into_iter().map(|a| (a.agent_id, a.description.map(|d| d.doc))).collect::<Vec<_>>()
    };
    assert_eq!(discover(false).await, [(described.clone(), None), (plain.clone(), None)]);
    assert_eq!(
        discover(true).await,
        [(described.clone(), Some("Counts.".to_owned())), (plain.clone(), None)]
    );

    // Bounded, naming the limit, without echoing the input.
    let refused = h.rpc.register_agent(register(&"x".repeat(70_000))).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("the bytes of a description"), "{}", refused.message());
    assert!(refused.message().len() < 200);

    // Unknown, a client's, terminated.
    let nobody = EntityId::new_agent().to_string();
    assert_eq!(h.rpc.describe(describe(&nobody)).await.unwrap_err().code(), Code::NotFound);
    let client = h.client().await;
    assert_eq!(h.rpc.describe(describe(&client)).await.unwrap_err().code(), Code::InvalidArgument);
    h.terminate(&described).await;
    let gone = h.rpc.describe(describe(&described)).await.unwrap_err();
    assert_eq!(reason(&gone).0, "MAILBOX_TERMINATED", "{gone:?}");
}

/// A subscriber may advertise a peer endpoint (docs/design.md, "Direct
/// delivery"): Status and Discover show it while the subscription lasts;
/// a newer subscription's replaces it; a malformed one is refused.
pub(crate) async fn subscribers_advertise_their_peer_endpoint(store: Store) {
    let mut h = start(store).await;
    let agent = h.agent("test.Peer", &[]).await;
    let status = async |h: &mut Harness| {
        let request = pb::StatusRequest { mailbox_id: agent.clone() };
        h.rpc.status(request).await.unwrap().into_inner().endpoint
    };
    let discovered = async |h: &mut Harness| {
        let request = pb::DiscoverRequest { behaviour: "test.Peer".into(), ..Default::default() };
        h.rpc.discover(request).await.unwrap().into_inner().agents[0].endpoint.clone()
    };
    assert_eq!(status(&mut h).await, "");
    let subscribe = |endpoint: &str| pb::SubscribeRequest {
        mailbox_id: agent.clone(),
        epoch: 0,
        endpoint: endpoint.into(),
    };
    let first = h.rpc.subscribe(subscribe("http://10.1.2.3:7000")).await.unwrap().into_inner();
    assert_eq!(status(&mut h).await, "http://10.1.2.3:7000");
    assert_eq!(discovered(&mut h).await, "http://10.1.2.3:7000");
    let second = h.rpc.subscribe(subscribe("unix:/run/peer.sock")).await.unwrap().into_inner();
    assert_eq!(status(&mut h).await, "unix:/run/peer.sock");
    drop(first);
    drop(second);
    h.until_unsubscribed(&agent).await;
    assert_eq!(status(&mut h).await, "", "no subscriber: no endpoint");
    assert_eq!(discovered(&mut h).await, "");
    for bad in ["ftp://x", "http://a b", &format!("http://{}", "x".repeat(300))] {
        let refused = h.rpc.subscribe(subscribe(bad)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{bad}: {refused:?}");
        assert!(refused.message().contains("endpoint"), "{}", refused.message());
    }
}
