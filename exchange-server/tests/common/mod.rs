//! Helpers shared by the exchange's integration tests.
#![allow(dead_code, unreachable_pub)]

use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient, message::Body};
use tonic::Streaming;

/// A message from `src` to `dest` with a fresh tag.
pub fn message(src: &str, dest: &str, body: Body) -> pb::Message {
    pb::Message {
        header: Some(pb::Header {
            src: src.into(),
            dest: dest.into(),
            tag: uuid::Uuid::new_v4().to_string(),
            ..Default::default()
        }),
        body: Some(body),
    }
}

/// A ping numbered `n` (the number rides in the label).
pub fn ping(src: &str, dest: &str, n: usize) -> pb::Message {
    let mut ping = message(src, dest, Body::PingRequest(pb::PingRequest {}));
    ping.header.as_mut().expect("just built").label = n.to_string();
    ping
}

pub fn number(message: &pb::Message) -> usize {
    message.header.as_ref().unwrap().label.parse().unwrap()
}

/// Registers an agent of `behaviour` and a client; returns their ids.
pub async fn agent_and_client<T>(
    rpc: &mut ExchangeServiceClient<T>,
    behaviour: &str,
) -> (String, String)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let register = pb::RegisterAgentRequest { behaviour: behaviour.into(), ..Default::default() };
    let agent = rpc.register_agent(register).await.unwrap().into_inner().agent_id;
    let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    (agent, client.into_inner().client_id)
}

/// Subscribes to mailbox `id`.
pub async fn subscribe<T>(
    rpc: &mut ExchangeServiceClient<T>,
    id: &str,
) -> Streaming<pb::SubscribeResponse>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let request = pb::SubscribeRequest { mailbox_id: id.into(), ..Default::default() };
    rpc.subscribe(request).await.unwrap().into_inner()
}
