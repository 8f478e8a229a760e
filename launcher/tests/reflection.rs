//! What grpcurl lists: each server advertises its own service, health and
//! reflection, and not the other server's service.

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

async fn ask(url: String, request: MessageRequest) -> MessageResponse {
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut answers =
        client.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let answer: ServerReflectionResponse = answers.message().await.unwrap().unwrap();
    answer.message_response.unwrap()
}

async fn services(url: String) -> Vec<String> {
    match ask(url, MessageRequest::ListServices(String::new())).await {
        MessageResponse::ListServicesResponse(list) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("expected a list of services, got {other:?}"),
    }
}

/// An in-memory exchange and a launcher using it, both on loopback.
async fn exchange_and_launcher() -> (RunningExchange, RunningLauncher) {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    (exchange, launcher)
}

#[tokio::test]
async fn each_server_lists_its_own_services() {
    let (exchange, launcher) = exchange_and_launcher().await;
    let common = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"];
    let common = [&common[..], &["grpc.reflection.v1alpha.ServerReflection"]].concat();
    for (url, own) in [
        (
            exchange.url(),
            &["academy.v1.BlobService", "academy.v1.ClockService", "academy.v1.ExchangeService"][..],
        ),
        (launcher.url(), &["academy.v1.LauncherService"][..]),
    ] {
        let mut expected: Vec<String> = common.iter().chain(own).map(|s| (*s).to_owned()).collect();
        expected.sort();
        assert_eq!(services(url.clone()).await, expected, "services of {url}");
        // Messages of the other contracts are still described (ErrorInfo too).
        let described =
            ask(url, MessageRequest::FileContainingSymbol("google.rpc.ErrorInfo".into())).await;
        assert!(
            matches!(described, MessageResponse::FileDescriptorResponse(ref f) if !f.file_descriptor_proto.is_empty()),
            "{described:?}"
        );
    }
    launcher.shutdown().await;
    exchange.shutdown().await;
}
