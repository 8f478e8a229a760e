//! Fuzz targets: each takes arbitrary bytes, as they could come off the
//! network or from a file, and must neither panic nor hang. They run in
//! `make fuzz` (10⁶ cases each) and briefly in `make test`.
//!
//! Inputs are made by [`Inputs`]: random bytes, and mutations (bit flips,
//! insertions, deletions, splices) of valid seeds, so that decoding gets
//! past the first byte. The runner is not coverage-guided; it is plain
//! Rust on the stable toolchain, so it runs in CI.

use std::sync::OnceLock;

use academy_exchange::Exchange;
use academy_proto::{EntityId, pb};
use prost::Message as _;
use serde::Deserialize;

/// A fuzz target: a name, the function, and seeds to mutate.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Its name, for `--target`.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
    /// Valid inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target { name: "exchange_requests", run: exchange_requests, seeds: request_seeds },
    Target { name: "sdk_arguments", run: sdk_arguments, seeds: argument_seeds },
    Target { name: "ids", run: ids, seeds: id_seeds },
    Target { name: "tokens_files", run: tokens_files, seeds: tokens_seeds },
    Target { name: "json_values", run: json_values, seeds: json_seeds },
];

/// A runtime for the targets that call an exchange.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

thread_local! {
    /// The exchange the requests go to, and how many it took: a fresh one
    /// every 10,000, so a long run does not fill memory with mailboxes.
    static EXCHANGE: std::cell::RefCell<(Exchange, u32)> = std::cell::RefCell::new((Exchange::default(), 0));
}

/// The exchange for the next request.
fn exchange() -> Exchange {
    EXCHANGE.with_borrow_mut(|(exchange, calls)| {
        *calls += 1;
        if *calls >= 10_000 {
            *exchange = Exchange::default();
            *calls = 0;
        }
        exchange.clone()
    })
}

/// The first byte chooses a request type; the rest is decoded as it and,
/// when it decodes, handled by an in-process exchange as the gRPC service
/// would.
fn exchange_requests(data: &[u8]) {
    let Some((kind, body)) = data.split_first() else { return };
    let exchange = exchange();
    runtime().block_on(async {
        match kind % 10 {
            0 => {
                if let Ok(req) = pb::SendBatchRequest::decode(body) {
                    let _ = exchange.send_batch(req.messages).await;
                }
            }
            1 => {
                if let Ok(req) = pb::RegisterAgentRequest::decode(body) {
                    let id = req.agent_id.parse().ok();
                    let (behaviour, description) = (&req.behaviour, req.description);
                    let _ = exchange
                        .register_agent(behaviour, req.implements, req.name, id, description)
                        .await;
                }
            }
            2 => {
                if let Ok(req) = pb::AcknowledgeRequest::decode(body)
                    && let Ok(id) = EntityId::parse_field(&req.mailbox_id, "mailbox_id")
                {
                    let _ = exchange.acknowledge(&id, &req.seqs).await;
                }
            }
            3 => {
                if let Ok(req) = pb::DiscoverRequest::decode(body) {
                    let after = req.page_token.parse().ok();
                    let matching = academy_proto::Matching::exact(req.exact);
                    let owner = Some(req.owner.as_str()).filter(|o| !o.is_empty());
                    let _ = exchange
                        .discover_page(&req.behaviour, matching, after, Some(10), owner)
                        .await;
                }
            }
            4 => {
                if let Ok(req) = pb::InvokeRequest::decode(body) {
                    let args = req.args.map(academy_proto::json::from_proto);
                    let _ = args.map(|a| serde_json::to_vec(&a));
                    let _ = req.timeout.map(|t| academy_proto::duration::from_proto(t, "timeout"));
                }
            }
            5 => {
                if let Ok(req) = pb::SaveStateRequest::decode(body)
                    && let Ok(id) = EntityId::parse_field(&req.agent_id, "agent_id")
                {
                    let data = req.data.unwrap_or_default();
                    let _ = exchange
                        .save_state(&id, req.epoch, req.expected_revision, data, req.version)
                        .await;
                }
            }
            6 => {
                if let Ok(req) = pb::LoadStateRequest::decode(body)
                    && let Ok(id) = EntityId::parse_field(&req.agent_id, "agent_id")
                {
                    let _ = exchange.load_state(&id).await;
                }
            }
            8 => {
                if let Ok(req) = pb::CommitRequest::decode(body) {
                    let save = req.state.unwrap_or_default();
                    if let Ok(id) = EntityId::parse_field(&save.agent_id, "state.agent_id") {
                        let _ = exchange.commit(&id, save, req.seqs, req.answers).await;
                    }
                }
            }
            9 => {
                if let Ok(req) = pb::MarkRequest::decode(body)
                    && let Ok(mark) =
                        academy_exchange::clock::Mark::of(req.kind(), req.key, req.answer_key)
                {
                    let _ = exchange.clock().mark(req.participant, mark);
                }
            }
            _ => {
                if let Ok(message) = pb::Message::decode(body) {
                    let _ = exchange.validate(&message);
                }
            }
        }
    });
}

fn request_seeds() -> Vec<Vec<u8>> {
    let exchange = exchange();
    let (agent, client) = runtime().block_on(async {
        let agent =
            exchange.register_agent("fuzz.A", vec![], String::new(), None, None).await.unwrap();
        (agent, exchange.register_client().await.unwrap())
    });
    let message = pb::Message {
        header: Some(pb::Header {
            src: client.to_string(),
            dest: agent.to_string(),
            tag: "01936f2c-7b5e-7c3a-9f00-000000000001".into(),
            ..Default::default()
        }),
        body: Some(pb::message::Body::ActionRequest(pb::ActionRequest {
            action: "go".into(),
            args: Some(pb::Payload {
                content_type: "application/json".into(),
                data: b"[1]".to_vec().into(),
                ..Default::default()
            }),
        })),
    };
    let with = |kind: u8, body: Vec<u8>| [vec![kind], body].concat();
    vec![
        with(0, pb::SendBatchRequest { messages: vec![message.clone(); 3] }.encode_to_vec()),
        with(
            1,
            pb::RegisterAgentRequest {
                behaviour: "b".into(),
                implements: vec!["i".into()],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        with(
            2,
            pb::AcknowledgeRequest { mailbox_id: agent.to_string(), seqs: vec![0, 1, 7] }
                .encode_to_vec(),
        ),
        with(
            3,
            pb::DiscoverRequest { behaviour: "fuzz.A".into(), page_size: 3, ..Default::default() }
                .encode_to_vec(),
        ),
        with(
            4,
            pb::InvokeRequest {
                agent_id: agent.to_string(),
                action: "go".into(),
                args: Some(academy_proto::json::to_proto(
                    serde_json::json!([1, {"a": [true, null, "x"]}]),
                )),
                timeout: Some(academy_proto::duration::to_proto(std::time::Duration::from_millis(
                    5,
                ))),
            }
            .encode_to_vec(),
        ),
        with(
            5,
            pb::SaveStateRequest {
                agent_id: agent.to_string(),
                epoch: 2,
                expected_revision: 0,
                data: Some(pb::Payload {
                    content_type: "application/json".into(),
                    data: br#"{"n":1}"#.to_vec().into(),
                    ..Default::default()
                }),
                version: 1,
            }
            .encode_to_vec(),
        ),
        with(6, pb::LoadStateRequest { agent_id: agent.to_string() }.encode_to_vec()),
        with(7, message.encode_to_vec()),
        with(
            8,
            pb::CommitRequest {
                state: Some(pb::SaveStateRequest {
                    agent_id: agent.to_string(),
                    epoch: 2,
                    ..Default::default()
                }),
                seqs: vec![0, 1],
                answers: vec![message],
            }
            .encode_to_vec(),
        ),
        with(
            9,
            pb::MarkRequest {
                kind: pb::MarkKind::Send.into(),
                key: "k".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ]
}

/// What an action may take: every kind of value serde knows.
#[derive(Debug, Deserialize)]
#[allow(dead_code)]
struct Nested {
    name: String,
    values: Vec<f64>,
    maybe: Option<Box<Nested>>,
    flags: std::collections::HashMap<String, bool>,
}

/// The first byte chooses the content type; the rest are an action's
/// arguments, decoded as an agent decodes them for several signatures.
fn sdk_arguments(data: &[u8]) {
    use academy_sdk::__private::decode_args;
    let Some((kind, body)) = data.split_first() else { return };
    let content_type = if kind % 2 == 0 { "application/json" } else { "application/msgpack" };
    let payload = pb::Payload {
        content_type: content_type.into(),
        data: body.to_vec().into(),
        ..Default::default()
    };
    let p = Some(&payload);
    let _: Result<(u64, String), _> =
        decode_args("f", &["a", "b"], p, |args| Ok((args.take(0)?, args.take(1)?)));
    let _: Result<(Nested,), _> = decode_args("g", &["n"], p, |args| Ok((args.take(0)?,)));
    let _: Result<(Option<Vec<i8>>, bool, char), _> =
        decode_args("h", &["a", "b", "c"], p, |args| {
            Ok((args.take(0)?, args.take(1)?, args.take(2)?))
        });
    let _: Result<(), _> = decode_args("i", &[], p, |_| Ok(()));
}

fn argument_seeds() -> Vec<Vec<u8>> {
    let json = |v: serde_json::Value| [vec![0], serde_json::to_vec(&v).unwrap()].concat();
    let pack = |bytes: Vec<u8>| [vec![1], bytes].concat();
    vec![
        json(serde_json::json!([7, "x"])),
        json(serde_json::json!({"b": "y", "a": 3})),
        json(
            serde_json::json!([{"name": "n", "values": [1.5], "maybe": null, "flags": {"f": true}}]),
        ),
        json(serde_json::json!([[1, 2], true, "c"])),
        pack(rmp_serde::to_vec_named(&(7u64, "x")).unwrap()),
        pack(rmp_serde::to_vec_named(&(Some(vec![1i8, -2]), false, 'z')).unwrap()),
    ]
}

fn ids(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = text.parse::<EntityId>() {
        // What parses prints back to itself.
        assert_eq!(id.to_string().parse::<EntityId>().ok(), Some(id));
    }
    let _ = EntityId::parse_field(&text, "id");
}

fn id_seeds() -> Vec<Vec<u8>> {
    vec![
        EntityId::new_agent().to_string().into_bytes(),
        EntityId::new_client().to_string().into_bytes(),
        b"agent:00000000-0000-4000-8000-000000000000".to_vec(),
    ]
}

fn tokens_files(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(tokens) = academy_server::auth::Tokens::parse(&text) {
        assert!(!tokens.principals().is_empty());
    }
}

fn tokens_seeds() -> Vec<Vec<u8>> {
    vec![
        b"# who\nalice alice-0123456789abcdef  # a comment\nbob bob-0123456789abcdef\n".to_vec(),
        b"system 3f9c6a0e1b7d4c25a8e2\n\n".to_vec(),
    ]
}

/// JSON as Invoke and the launcher take it: to protobuf values and back.
fn json_values(data: &[u8]) {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let proto = academy_proto::json::to_proto(value);
        let _ = academy_proto::json::from_proto(proto.clone());
        let _ = proto.encode_to_vec();
    }
}

fn json_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"{"a": [1, 2.5, "x", null, true], "b": {"c": -7}}"#.to_vec(),
        b"[[[[[[[[1]]]]]]]]".to_vec(),
        b"1e308".to_vec(),
    ]
}

/// Inputs for a target: random bytes and mutations of its seeds, from a
/// seeded generator (xorshift), so a run can be repeated.
#[derive(Debug)]
pub struct Inputs {
    state: u64,
    seeds: Vec<Vec<u8>>,
}

impl Inputs {
    /// Inputs for `target` from seed `seed`.
    pub fn new(target: &Target, seed: u64) -> Self {
        Self { state: seed.max(1), seeds: (target.seeds)() }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// The next input.
    pub fn next_input(&mut self) -> Vec<u8> {
        if self.seeds.is_empty() || self.below(8) == 0 {
            let len = self.below(256);
            return (0..len).map(|_| self.next_u64() as u8).collect();
        }
        let pick = self.below(self.seeds.len());
        let mut input = self.seeds[pick].clone();
        for _ in 0..=self.below(4) {
            match self.below(5) {
                0 if !input.is_empty() => {
                    let i = self.below(input.len());
                    input[i] ^= 1 << self.below(8);
                }
                1 => {
                    let i = self.below(input.len() + 1);
                    let byte = self.next_u64() as u8;
                    input.insert(i, byte);
                }
                2 if !input.is_empty() => {
                    let i = self.below(input.len());
                    input.remove(i);
                }
                3 if !input.is_empty() => {
                    // A special value where the decoders look: 0, 0xff, 0x80.
                    let i = self.below(input.len());
                    input[i] = [0, 0xff, 0x80, 0x7f][self.below(4)];
                }
                _ => {
                    let pick = self.below(self.seeds.len());
                    let other = self.seeds[pick].clone();
                    let (a, b) = (self.below(input.len() + 1), self.below(other.len() + 1));
                    input.truncate(a);
                    input.extend_from_slice(&other[b..]);
                }
            }
        }
        input
    }
}

/// Runs `cases` inputs through `target`; the first input that panicked, if any.
pub fn run(target: &Target, cases: u64, seed: u64) -> Option<Vec<u8>> {
    let mut inputs = Inputs::new(target, seed);
    for _ in 0..cases {
        let input = inputs.next_input();
        if std::panic::catch_unwind(|| (target.run)(&input)).is_err() {
            return Some(input);
        }
    }
    None
}
