//! Helpers shared by the exchange's integration tests.
#![allow(dead_code, unreachable_pub)]

use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient, message::Body};
use tonic::Streaming;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub &'static str);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = format!("Bearer {}", self.0).parse().expect("ascii token");
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

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

/// Starts the `academy-exchange` binary on a free port, with `envs` and
/// `args`, and returns it with its URL, read from its JSON "listening" log
/// line. Its logs are read (and dropped) for as long as it runs.
pub fn spawn_exchange(envs: &[(&str, &str)], args: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead as _, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_academy-exchange"))
        .env("ACADEMY_EXCHANGE_LISTEN", "127.0.0.1:0")
        .env("ACADEMY_LOG_FORMAT", "json")
        .env("ACADEMY_EXCHANGE_WORKER_THREADS", "1")
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let log: serde_json::Value = serde_json::from_str(&line).expect("json logs");
        if let Some(addr) = log["fields"]["addr"].as_str() {
            // Keep reading its logs so it never writes to a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return (child, format!("http://{addr}"));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the exchange never said where it listens");
}

/// The resident memory of process `pid`, in bytes (from /proc).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// How many file descriptors process `pid` holds.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
