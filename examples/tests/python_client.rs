//! A client in another language, generated from `proto/` with grpcio-tools,
//! calls a Rust agent through a real exchange-server: `examples/python/client.py`
//! run as its docstring says (`make test` installs grpcio-tools when missing),
//! with authentication and mutual TLS on: the agent's principal and the
//! script's differ. The script calls with the unary RPCs, then again over one
//! `Session` stream (grpcio's default limits, its own stream handling).

use std::path::{Path, PathBuf};
use std::process::Command;

use academy_examples::behaviours::WordStats;
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::{Credentials, Manager};
use academy_server::auth::Tokens;
use academy_server::testing::TestPki;
use serde_json::{Value, json};

fn python() -> Command {
    Command::new("python3")
}

/// Generates the Python modules of every contract into `out`.
fn generate(root: &Path, out: &Path) {
    let protos = root.join("proto");
    let files: Vec<PathBuf> = std::fs::read_dir(protos.join("academy/v1"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "proto"))
        .collect();
    let done = python()
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&protos)
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .args(&files)
        .output()
        .expect("python3 runs");
    assert!(
        done.status.success(),
        "grpcio-tools must generate the client (python3 -m pip install grpcio-tools): {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

const RUST_TOKEN: &str = "rust-token-0123456789";
const PYTHON_TOKEN: &str = "python-token-0123456789";

#[tokio::test(flavor = "multi_thread")]
async fn a_python_client_generated_from_the_protos_calls_a_rust_agent() {
    let tokens = Tokens::parse(&format!("rust {RUST_TOKEN}\npython {PYTHON_TOKEN}")).unwrap();
    let pki = TestPki::new("academy test CA");
    let tls = Some(pki.server_tls(true));
    let options = ExchangeOptions { tokens: Some(tokens), tls, ..Default::default() };
    let exchange = RunningExchange::start(options).await.unwrap();
    let credentials = Credentials::bearer(RUST_TOKEN)
        .unwrap()
        .with_tls_ca(pki.ca().as_bytes())
        .with_client_certificate(pki.client.cert.as_bytes(), pki.client.key.as_bytes());
    let rust = GrpcExchange::connect_with(exchange.url(), &credentials).await.unwrap();
    let manager = Manager::new(std::sync::Arc::new(rust)).await.unwrap();
    // Every answer goes by reference: the client reads it with GetBlob.
    let config = academy_sdk::AgentConfig { blob_threshold: 1, ..Default::default() };
    let options = academy_sdk::LaunchOptions { config, ..Default::default() };
    let agent = manager.launch_with(WordStats::default(), options).await.unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-python-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&out).unwrap();
    generate(&root, &out);
    let pem = [
        ("ACADEMY_TLS_CA", "ca.pem", pki.ca()),
        ("ACADEMY_TLS_CERT", "client.pem", pki.client.cert.clone()),
        ("ACADEMY_TLS_KEY", "client.key", pki.client.key.clone()),
    ]
    .map(|(var, name, text)| {
        std::fs::write(out.join(name), text).unwrap();
        (var, out.join(name))
    });
    let target = exchange.addr().to_string();
    let script = root.join("examples/python/client.py");
    let pythonpath = out.clone();
    let run_with = |token: Option<&'static str>, session: bool| {
        let mut command = python();
        command.arg(&script).args([target.as_str(), "example.Analyser"]);
        if session {
            command.arg("--session");
        }
        command.env("PYTHONPATH", &pythonpath).env_remove("ACADEMY_TOKEN");
        command.envs(pem.clone());
        if let Some(token) = token {
            command.env("ACADEMY_TOKEN", token);
        }
        tokio::task::spawn_blocking(move || command.output().expect("python3 runs"))
    };
    let refused = run_with(None, false).await.unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("UNAUTHENTICATED"), "{stderr}");
    // The same calls with the unary RPCs, then on one Session stream.
    for session in [false, true] {
        let run = run_with(Some(PYTHON_TOKEN), session).await.unwrap();
        check_client_output(&run, &agent.id().to_string());
        let kept = exchange.exchange().blob_usage().await.unwrap();
        assert_eq!(kept.blobs, 0, "the client freed its blob and the answers' blobs");
    }
    std::fs::remove_dir_all(&out).unwrap();
    manager.close().await.unwrap();
    exchange.shutdown().await;
}

/// What `client.py` prints when it calls `agent`, a WordStats.
fn check_client_output(run: &std::process::Output, agent: &str) {
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));

    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    assert_eq!(lines[0]["discovered"], agent);
    assert_eq!(lines[0]["behaviour"], "example.WordStats");
    assert_eq!(lines[1]["analyse"]["result"], json!({"words": 6, "distinct": 4, "top": ["be", 2]}));
    assert_eq!(lines[1]["analyse"]["in_trace"], true, "the answer came back in the caller's trace");
    let unknown = &lines[2]["unknown_action"]["error"];
    assert_eq!(unknown["code"], 12, "UNIMPLEMENTED: {unknown}");
    assert!(unknown["message"].as_str().unwrap().contains("analyse"), "{unknown}");
    let by_reference = &lines[3]["analyse_by_reference"];
    let top = json!({"words": 1_800_000, "distinct": 4, "top": ["be", 600_000]});
    assert_eq!(by_reference["result"], top, "arguments put as a blob: {by_reference}");
    assert_eq!(lines[3]["read_back"], true, "the blob read back is the bytes put");
    assert_eq!(lines[4]["unknown_mailbox"]["code"], "NOT_FOUND");
}

/// An agent written in Python (`examples/python/agent.py`) publishes a
/// description that the exchange gives back, and answers a Rust handle
/// (which falls back from MessagePack to JSON) until shut down.
#[tokio::test(flavor = "multi_thread")]
async fn a_python_agent_describes_itself_and_answers_rust() {
    use academy_proto::pb;
    use std::io::BufRead as _;
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-python-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&out).unwrap();
    generate(&root, &out);
    let pythonpath = std::env::join_paths([out.clone(), root.join("examples/python")]).unwrap();
    let mut agent = python()
        .arg(root.join("examples/python/agent.py"))
        .arg(exchange.addr().to_string())
        .env("PYTHONPATH", pythonpath)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut first = String::new();
    std::io::BufReader::new(agent.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let id: String = serde_json::from_str::<Value>(&first).unwrap()["agent_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no agent id: {first:?}"))
        .to_owned();

    let mut rpc =
        pb::exchange_service_client::ExchangeServiceClient::connect(exchange.url()).await.unwrap();
    let described = rpc.describe(pb::DescribeRequest { agent_id: id.clone() }).await.unwrap();
    let described = described.into_inner().agent.unwrap();
    assert_eq!(described.behaviour, "example.PyGreeter");
    let description = described.description.unwrap();
    assert_eq!(description.doc, "Greets people, from Python.");
    let greet = &description.actions[0];
    assert_eq!((greet.name.as_str(), greet.params.as_slice()), ("greet", &["name".to_owned()][..]));
    let input = academy_proto::json::from_proto(greet.input_schema.clone().unwrap());
    assert_eq!(input["properties"]["name"], json!({"type": "string"}));

    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let handle = manager.raw_handle(id.parse().unwrap());
    let hello: String = handle.call("greet", ("Ada",)).await.unwrap();
    assert_eq!(hello, "Hello, Ada!");
    let refused = handle.call::<_, String>("greet", ("",)).await.unwrap_err();
    assert!(refused.to_string().contains("non-empty"), "{refused}");
    handle.shutdown(academy_sdk::MailboxPolicy::Terminate).await.unwrap();
    let status = tokio::task::spawn_blocking(move || agent.wait().unwrap()).await.unwrap();
    assert!(status.success(), "the Python agent exits once asked to shut down");
    std::fs::remove_dir_all(&out).unwrap();
    manager.close().await.unwrap();
}
