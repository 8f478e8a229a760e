//! A Node.js client (`examples/node/client.js`: @grpc/grpc-js, the protos
//! loaded at run time by @grpc/proto-loader, both installed by `make deps`)
//! calls a Rust agent through a real exchange-server, and meets the
//! exchange's bounds with grpc-js's default limits: it sends without a
//! bound and receives at most 4 MiB.

use std::path::Path;
use std::process::Command;

use academy_examples::behaviours::WordStats;
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_sdk::Manager;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread")]
async fn a_node_client_with_default_limits_calls_a_rust_agent() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let manager = Manager::connect(&exchange.url()).await.unwrap();
    let agent = manager.launch(WordStats::default()).await.unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
    let modules = root.join(".tools/node_modules");
    assert!(
        modules.join("@grpc/grpc-js").is_dir() && modules.join("@grpc/proto-loader").is_dir(),
        "run `make deps`: it installs @grpc/grpc-js and @grpc/proto-loader into .tools/"
    );
    let mut command = Command::new("node");
    command.arg(root.join("examples/node/client.js"));
    command.args([exchange.addr().to_string().as_str(), "example.Analyser"]);
    command.env("NODE_PATH", &modules);
    let run = tokio::task::spawn_blocking(move || command.output().expect("node runs"));
    let run = run.await.unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));

    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 7, "{stdout}");
    assert_eq!(lines[0]["discovered"], agent.id().to_string().as_str());
    assert_eq!(lines[0]["behaviour"], "example.WordStats");
    assert_eq!(lines[1]["analyse"], json!({"words": 6, "distinct": 4, "top": ["be", 2]}));
    let unknown = &lines[2]["unknown_action"];
    assert_eq!(unknown["code"], "UNIMPLEMENTED", "{unknown}");
    assert!(unknown["message"].as_str().unwrap().contains("nope"), "{unknown}");
    // A 4 MiB payload is refused with a short message (its bytes not echoed).
    let too_large = &lines[3]["too_large"];
    assert_eq!(too_large["code"], "RESOURCE_EXHAUSTED", "{too_large}");
    assert!(too_large["message_bytes"].as_u64().unwrap() < 512, "{too_large}");
    // The largest message taken comes back whole, inside 4 MiB; one byte
    // more is refused.
    let largest = &lines[4]["largest"];
    assert_eq!(largest["received"], largest["sent"], "{largest}");
    let sent = largest["sent"].as_u64().unwrap();
    assert!(sent > (4 << 20) - 2048 && sent < 4 << 20, "{largest}");
    assert_eq!(largest["one_more"], "RESOURCE_EXHAUSTED", "{largest}");
    // Messages that would not fit in 4 MiB together come in answers apart.
    assert_eq!(lines[5]["batched"], json!({"received": 3, "answers": 3}), "{stdout}");
    assert_eq!(lines[6]["unknown_mailbox"]["code"], "NOT_FOUND", "{stdout}");
    manager.close().await.unwrap();
}
