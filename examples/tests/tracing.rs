//! One call followed across processes by its trace: a real OTLP receiver
//! (the collector's gRPC service, in this test), an exchange and a worker as
//! processes exporting to it, and an `Invoke` that carries a W3C
//! `traceparent` in its metadata, as an instrumented client sends it. The
//! coordinator agent it calls calls two more agents; every span must land in
//! the caller's trace, each under the span that caused it, and a failed
//! action must say so in its span.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::pb::exchange_service_client::ExchangeServiceClient;
use academy_proto::pb::launcher_service_client::LauncherServiceClient;
use academy_proto::pb::{self, AgentState};
use academy_server::testing::{Children, binary, free_port};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

/// A span as received: its process, ids, name and status.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    failed: bool,
}

#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    trace: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    // STATUS_CODE_ERROR
                    failed: span.status.is_some_and(|s| s.code == 2),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A client of the exchange process at `url`, once it answers.
async fn exchange_up(url: &str) -> ExchangeServiceClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ExchangeServiceClient::connect(url.to_owned()).await {
            Ok(rpc) => return rpc,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("no exchange: {e}"),
        }
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The span of a client that sets the header itself.
const RAW_SPAN: &str = "2222222222222222";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_call_through_the_exchange_and_three_agents() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server =
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(receiver.clone()));
    tokio::spawn(server.serve_with_incoming(incoming));

    // Processes export every 100 ms to the receiver.
    let traced = |command: &mut Command| {
        command
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_SERVICE_NAME")
            .stderr(std::process::Stdio::null());
    };
    let port = free_port();
    let mut exchange = Command::new(binary("academy-exchange"));
    exchange.env("ACADEMY_EXCHANGE_LISTEN", format!("127.0.0.1:{port}"));
    traced(&mut exchange);
    let mut children = Children(vec![exchange.spawn().expect("build the workspace's binaries")]);
    let exchange_url = format!("http://127.0.0.1:{port}");
    let mut rpc = exchange_up(&exchange_url).await;
    let launcher = RunningLauncher::start(LauncherOptions {
        exchange_url: exchange_url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut worker = Command::new(binary("worker"));
    worker.args(["--launcher", &launcher.url(), "--name", "traced"]);
    traced(&mut worker);
    children.0.push(worker.spawn().unwrap());

    let mut launchers = LauncherServiceClient::connect(launcher.url()).await.unwrap();
    let mut ids = HashMap::new();
    for behaviour in ["example.Coordinator", "example.Cleaner", "example.WordStats"] {
        let request = pb::LaunchAgentRequest { behaviour: behaviour.into(), ..Default::default() };
        let deadline = Instant::now() + Duration::from_secs(20);
        let id = loop {
            match launchers.launch_agent(request.clone()).await {
                Ok(answer) => break answer.into_inner().agent.unwrap().agent_id,
                // The worker may not have joined yet.
                Err(s)
                    if s.code() == tonic::Code::FailedPrecondition && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!("{behaviour}: {s:?}"),
            }
        };
        loop {
            let agent =
                launchers.get_agent(pb::GetAgentRequest { agent_id: id.clone() }).await.unwrap();
            if agent.into_inner().agent.unwrap().state() == AgentState::Running {
                break;
            }
            assert!(Instant::now() < deadline, "{behaviour} not running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ids.insert(behaviour, id);
    }

    let invoke = |agent: &str, action: &str, args: serde_json::Value, span: &str| {
        let mut request = tonic::Request::new(pb::InvokeRequest {
            agent_id: agent.to_owned(),
            action: action.to_owned(),
            args: Some(academy_proto::json::to_proto(args)),
            ..Default::default()
        });
        let parent = format!("00-{TRACE}-{span}-01");
        request.metadata_mut().insert("traceparent", parent.parse().unwrap());
        request
    };
    let args = json!({
        "cleaner": ids["example.Cleaner"],
        "analyser": ids["example.WordStats"],
        "documents": ["One two", "three"],
    });
    let answer = rpc
        .invoke(invoke(&ids["example.Coordinator"], "process", args, CALLER_SPAN))
        .await
        .unwrap();
    let reports = academy_proto::json::from_proto(answer.into_inner().result.unwrap());
    assert_eq!(reports.as_array().unwrap().len(), 2, "{reports}");
    // A failed action: analysing nothing is an error.
    let failing_span = "1111111111111111";
    let failed =
        rpc.invoke(invoke(&ids["example.WordStats"], "analyse", json!([""]), failing_span)).await;
    // A client in any language joins the trace by the message header alone
    // (as examples/python/client.py does): a raw Send, no SDK.
    let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let header = pb::Header {
        src: client.into_inner().client_id,
        dest: ids["example.WordStats"].clone(),
        tag: uuid::Uuid::new_v4().to_string(),
        traceparent: format!("00-{TRACE}-{RAW_SPAN}-01"),
        ..Default::default()
    };
    let args = pb::Payload {
        content_type: "application/json".into(),
        data: br#"["from a raw client"]"#.to_vec().into(),
        ..Default::default()
    };
    let request = pb::ActionRequest { action: "analyse".into(), args: Some(args) };
    let message =
        pb::Message { header: Some(header), body: Some(pb::message::Body::ActionRequest(request)) };
    rpc.send(pb::SendRequest { message: Some(message) }).await.unwrap();
    assert!(failed.is_err());

    // Every process exports within about 100 ms: wait until the whole
    // tree is there (or 20 s have passed).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<Received> =
            receiver.0.lock().unwrap().iter().filter(|s| s.trace == TRACE).cloned().collect();
        match the_tree(&spans, failing_span) {
            Ok(()) => {
                let services: std::collections::BTreeSet<&str> =
                    spans.iter().map(|s| s.service.as_str()).collect();
                println!("one trace: {} spans from {services:?}", spans.len());
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}\n{spans:#?}"),
        }
    }
    drop(children);
    launcher.shutdown().await;
}

/// Whether `spans` hold the expected tree; what is missing if not.
fn the_tree(spans: &[Received], failing_span: &str) -> Result<(), String> {
    let find = |name: &str, parent: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.parent == parent)
            .ok_or_else(|| format!("no span {name:?} under {parent}"))
    };
    let expect = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    // Exchange: Invoke under the caller's span.
    let invoked = find("Invoke process", CALLER_SPAN)?;
    expect(invoked.service == "academy-exchange", format!("{invoked:?}"))?;
    // Worker: the coordinator's action under Invoke; its calls under it;
    // each callee's action under its call, and the exchange's accepting and
    // delivering of each request under the call too.
    let coordinator = find("example.Coordinator process", &invoked.id)?;
    expect(coordinator.service == "academy-worker", format!("{coordinator:?}"))?;
    let mut calls = 0;
    for (call, action) in
        [("call clean", "example.Cleaner clean"), ("call analyse", "example.WordStats analyse")]
    {
        for call in spans.iter().filter(|s| s.name == call && s.parent == coordinator.id) {
            expect(call.service == "academy-worker", format!("{call:?}"))?;
            let served = find(action, &call.id)?;
            expect(!served.failed, format!("failed: {served:?}"))?;
            for step in ["accept", "deliver"] {
                let seen = find(step, &call.id)?;
                expect(seen.service == "academy-exchange", format!("{seen:?}"))?;
            }
            calls += 1;
        }
    }
    expect(calls == 4, format!("{calls} calls, not 4 (two documents, each cleaned and analysed)"))?;
    // The failed action's span says so, and so does Invoke's.
    let invoked = find("Invoke analyse", failing_span)?;
    expect(invoked.failed, format!("not failed: {invoked:?}"))?;
    let raw = find("example.WordStats analyse", RAW_SPAN)?;
    expect(!raw.failed && raw.service == "academy-worker", format!("{raw:?}"))?;
    let failed = find("example.WordStats analyse", &invoked.id)?;
    expect(failed.failed, format!("not failed: {failed:?}"))
}

/// Traces go to a collector that takes them only over mutual TLS: the
/// exchange trusts it by the CA in `OTEL_EXPORTER_OTLP_CERTIFICATE` and
/// shows the client certificate in `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_collector_over_mutual_tls() {
    let pki = academy_server::testing::TestPki::new("collector CA");
    let dir = std::env::temp_dir().join(format!("academy-otlp-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca = file("ca.pem", &pki.ca());
    let (cert, key) = (file("client.pem", &pki.client.cert), file("client.key", &pki.client.key));

    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("https://{}", listener.local_addr().unwrap());
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&pki.server.cert, &pki.server.key))
        .client_ca_root(tonic::transport::Certificate::from_pem(pki.ca()));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(TraceServiceServer::new(receiver.clone()));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(server.serve_with_incoming(incoming));

    let port = free_port();
    let exchange = Command::new(binary("academy-exchange"))
        .env("ACADEMY_EXCHANGE_LISTEN", format!("127.0.0.1:{port}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca)
        .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert)
        .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("build the workspace's binaries");
    let _children = Children(vec![exchange]);
    let url = format!("http://127.0.0.1:{port}");
    let mut rpc = exchange_up(&url).await;
    // A traced message, sent by a client to itself: the exchange's span of
    // accepting it goes to the collector.
    let client = rpc.register_client(pb::RegisterClientRequest::default()).await.unwrap();
    let id = client.into_inner().client_id;
    let header = pb::Header {
        src: id.clone(),
        dest: id,
        tag: uuid::Uuid::new_v4().to_string(),
        traceparent: format!("00-{TRACE}-{RAW_SPAN}-01"),
        ..Default::default()
    };
    let request = pb::ActionRequest { action: "noop".into(), args: None };
    let message =
        pb::Message { header: Some(header), body: Some(pb::message::Body::ActionRequest(request)) };
    rpc.send(pb::SendRequest { message: Some(message) }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = receiver.0.lock().unwrap().clone();
        if spans.iter().any(|s| s.trace == TRACE && s.service == "academy-exchange") {
            break;
        }
        assert!(Instant::now() < deadline, "no span came over TLS: {spans:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
