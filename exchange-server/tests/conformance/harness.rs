//! A real exchange-server on loopback over either backend, and what the
//! rules' tests share.

pub(crate) use std::time::Duration;

pub(crate) use crate::common::{self, message};

pub(crate) use academy_exchange::{
    ExchangeOptions, Limits, MailboxStore, RedisOptions, RunningExchange,
};
pub(crate) use academy_proto::pb::{
    self, exchange_service_client::ExchangeServiceClient, message::Body,
};
pub(crate) use academy_proto::{EntityId, ExchangeError};
pub(crate) use academy_server::auth::Tokens;
pub(crate) use academy_server::testing::{RedisServer, sample, scrape};
pub(crate) use tokio_stream::StreamExt as _;
pub(crate) use tonic::transport::Channel;
pub(crate) use tonic::{Code, Streaming};

#[derive(Debug, Clone, Copy)]
pub(crate) enum Store {
    Memory,
    Redis,
}

pub(crate) struct Harness {
    pub(crate) server: RunningExchange,
    pub(crate) rpc: ExchangeServiceClient<Channel>,
    _redis: Option<RedisServer>,
}

pub(crate) async fn start_with(store: Store, limits: Limits) -> Harness {
    start_as(store, ExchangeOptions { limits, ..Default::default() }).await
}

/// A server of `options`, over `store`.
pub(crate) async fn start_as(store: Store, options: ExchangeOptions) -> Harness {
    let (backend, redis) = match store {
        Store::Memory => (MailboxStore::Memory, None),
        Store::Redis => {
            let redis = RedisServer::start().expect("redis-server must run for these tests");
            let options = RedisOptions { url: redis.url(), ..Default::default() };
            (MailboxStore::Redis(options), Some(redis))
        }
    };
    let server = RunningExchange::start(ExchangeOptions { store: backend, ..options })
        .await
        .expect("starts");
    let rpc = ExchangeServiceClient::connect(server.url()).await.expect("client connects");
    Harness { server, rpc, _redis: redis }
}

pub(crate) async fn start(store: Store) -> Harness {
    start_with(store, Limits::default()).await
}

impl Harness {
    pub(crate) async fn agent(&mut self, behaviour: &str, implements: &[&str]) -> String {
        let req = pb::RegisterAgentRequest {
            behaviour: behaviour.into(),
            implements: implements.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.rpc.register_agent(req).await.unwrap().into_inner().agent_id
    }

    pub(crate) async fn client(&mut self) -> String {
        self.rpc
            .register_client(pb::RegisterClientRequest::default())
            .await
            .unwrap()
            .into_inner()
            .client_id
    }

    pub(crate) async fn state(&mut self, id: &str) -> pb::MailboxState {
        let resp = self
            .rpc
            .status(pb::StatusRequest { mailbox_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        resp.state()
    }

    pub(crate) async fn subscribed(&mut self, id: &str) -> bool {
        let resp = self.rpc.status(pb::StatusRequest { mailbox_id: id.into() }).await.unwrap();
        resp.into_inner().subscribed
    }

    /// Waits up to 5 s for the server to see a subscription end.
    pub(crate) async fn until_unsubscribed(&mut self, id: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.subscribed(id).await {
            assert!(tokio::time::Instant::now() < deadline, "{id} still has a subscriber");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn send(&mut self, message: pb::Message) -> Result<(), tonic::Status> {
        self.rpc.send(pb::SendRequest { message: Some(message) }).await.map(drop)
    }

    pub(crate) async fn subscribe(&mut self, id: &str) -> Streaming<pb::SubscribeResponse> {
        common::subscribe(&mut self.rpc, id).await
    }

    pub(crate) async fn terminate(&mut self, id: &str) -> pb::MailboxState {
        let resp =
            self.rpc.terminate(pb::TerminateRequest { mailbox_id: id.into() }).await.unwrap();
        resp.into_inner().previous_state()
    }
}

pub(crate) fn request(src: &str, dest: &str, action: &str) -> pb::Message {
    message(src, dest, Body::ActionRequest(pb::ActionRequest { action: action.into(), args: None }))
}

/// Next delivered message, failing the test if none comes within a second.
pub(crate) async fn next(stream: &mut Streaming<pb::SubscribeResponse>) -> Vec<pb::Delivery> {
    let frame = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
    frame.expect("a delivery within 1s").expect("stream open").expect("no error").deliveries
}

pub(crate) fn tag(m: &pb::Message) -> &str {
    &m.header.as_ref().unwrap().tag
}

/// The tags of the next `n` messages delivered.
pub(crate) async fn tags(stream: &mut Streaming<pb::SubscribeResponse>, n: usize) -> Vec<String> {
    let mut tags = Vec::new();
    while tags.len() < n {
        tags.extend(next(stream).await.iter().map(|d| tag(d.message.as_ref().unwrap()).to_owned()));
    }
    tags
}

/// The `google.rpc.ErrorInfo` reason and metadata of an exchange error.
pub(crate) fn reason(
    status: &tonic::Status,
) -> (String, std::collections::HashMap<String, String>) {
    use tonic_types::StatusExt as _;
    let info = status.get_details_error_info().expect("an exchange error carries ErrorInfo");
    (info.reason, info.metadata)
}

/// A message of `bytes` encoded bytes (the arguments make up the rest).
pub(crate) fn sized(src: &str, dest: &str, bytes: usize) -> pb::Message {
    use prost::Message as _;
    let mut m = request(src, dest, "big");
    let overhead = m.encoded_len() + 16;
    if let Some(Body::ActionRequest(r)) = &mut m.body {
        let data = vec![b'x'; bytes - overhead];
        r.args = Some(pb::Payload {
            content_type: "application/octet-stream".into(),
            data: data.into(),
            ..Default::default()
        });
    }
    // The length prefixes grow with the data: trim to the exact size.
    let over = m.encoded_len() - bytes;
    if let Some(Body::ActionRequest(r)) = &mut m.body {
        let args = r.args.as_mut().unwrap();
        args.data = args.data.slice(..args.data.len() - over);
    }
    assert_eq!(m.encoded_len(), bytes);
    m
}

/// Sends `request` (any message) to `path` on the harness's server, as raw
/// protobuf: for requests the generated client cannot make.
pub(crate) async fn raw_call<Req>(h: &Harness, path: &'static str, request: Req) -> tonic::Status
where
    Req: prost::Message + Send + Sync + 'static,
{
    let channel = Channel::from_shared(h.server.url()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Req, pb::StatusResponse>::default();
    let path = http::uri::PathAndQuery::from_static(path);
    let answer = grpc.unary(tonic::Request::new(request), path, codec).await;
    answer.expect_err("the server refuses it")
}
