//! The MCP gateway (`academy mcp`) used by a real MCP client, the Model
//! Context Protocol's Python SDK (`examples/python/mcp_client.py`; `make
//! test` installs it when missing), on stdio and over streamable HTTP: it
//! lists and calls the quickstart counter's actions, gets a structured error
//! from a failing one, and hears of a new agent's tools coming and going. The exchange
//! authenticates; the gateway calls with its own token.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use academy_examples::behaviours::WordStats;
use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::{Credentials, Manager};
use academy_server::auth::Tokens;
use academy_server::testing::{Children, binary, free_port};
use serde_json::{Value, json};

const GATEWAY_TOKEN: &str = "gateway-token-0123456789";
const OWNER_TOKEN: &str = "owner-token-0123456789";

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn academy() -> std::path::PathBuf {
    let academy = binary("academy");
    assert!(academy.exists(), "{} is built by `cargo nextest run --workspace`", academy.display());
    academy
}

/// The next line of `lines` as JSON.
fn next(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Value {
    let line = lines.next().expect("another line").unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// What the script prints about the counter, the same on either transport.
fn check_counter_calls(lines: &mut impl Iterator<Item = std::io::Result<String>>, start: u64) {
    let tools = next(lines);
    let names: Vec<&str> =
        tools["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(names.iter().any(|n| n.starts_with("Counter_increment_")), "{tools}");
    let get = tools["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap().starts_with("Counter_get_"));
    assert_eq!(get.unwrap()["read_only"], true, "{tools}");
    assert_eq!(next(lines), json!({"get": {"result": start}, "error": false}));
    assert_eq!(next(lines), json!({"increment": {"result": start + 5}, "error": false}));
    let bad = next(lines);
    assert_eq!(bad["error"], true, "{bad}");
    assert_eq!(bad["bad_increment"]["error"]["kind"], "InvalidArguments", "{bad}");
    assert!(bad["bad_increment"]["error"]["message"].as_str().unwrap().contains("\"by\""), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_lists_and_calls_agents_through_the_gateway() {
    let tokens = Tokens::parse(&format!("gateway {GATEWAY_TOKEN}\nowner {OWNER_TOKEN}")).unwrap();
    let options = ExchangeOptions { tokens: Some(tokens), ..Default::default() };
    let exchange = RunningExchange::start(options).await.unwrap();
    let url = exchange.url();
    let mut children = Children::default();

    // The quickstart's counter, left running (it counts to 42 first).
    let mut quickstart = Command::new(env!("CARGO_BIN_EXE_quickstart"))
        .args(["--exchange", &url, "--serve"])
        .env("ACADEMY_TOKEN", OWNER_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = BufReader::new(quickstart.stdout.take().unwrap()).lines();
    children.0.push(quickstart);
    loop {
        let line = printed.next().expect("the quickstart runs").unwrap();
        if line.starts_with("serving") {
            break;
        }
    }

    // Without a token the gateway does not start.
    let refused = Command::new(academy())
        .args(["--exchange", &url, "mcp"])
        .env_remove("ACADEMY_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("bearer token"), "{stderr}");

    // On stdio, started by the client as a desktop client would.
    let mut client = Command::new("python3")
        .arg(root().join("examples/python/mcp_client.py"))
        .args(["stdio", &url])
        .arg(academy())
        .arg("2")
        .env("ACADEMY_TOKEN", GATEWAY_TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (python3 -m pip install mcp)");
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    children.0.push(client);
    let mut lines = tokio::task::block_in_place(|| {
        check_counter_calls(&mut lines, 42);
        assert_eq!(next(&mut lines), json!({"waiting": true}));
        lines
    });
    // Another agent comes: its tools appear, and the client is told.
    let credentials = Credentials::bearer(OWNER_TOKEN).unwrap();
    let owner = GrpcExchange::connect_with(url.clone(), &credentials).await.unwrap();
    let manager = Manager::new(std::sync::Arc::new(owner)).await.unwrap();
    let stats = manager.launch(WordStats::default()).await.unwrap();
    let changed = tokio::task::block_in_place(|| next(&mut lines));
    let tail = &stats.id().to_string()[stats.id().to_string().len() - 8..];
    let names: Vec<&str> =
        changed["changed"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(names.contains(&format!("WordStats_analyse_{tail}").as_str()), "{changed}");
    assert!(names.iter().any(|n| n.starts_with("Counter_get_")), "{changed}");
    // It goes: its tools disappear, and the client is told again.
    let waiting = tokio::task::block_in_place(|| next(&mut lines));
    assert_eq!(waiting, json!({"waiting": true}));
    stats.shutdown(academy_sdk::MailboxPolicy::Terminate).await.unwrap();
    let changed = tokio::task::block_in_place(|| next(&mut lines));
    let names: Vec<&str> =
        changed["changed"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert!(!names.iter().any(|n| n.starts_with("WordStats_")), "{changed}");
    assert!(names.iter().any(|n| n.starts_with("Counter_get_")), "{changed}");
    let status = tokio::task::block_in_place(|| children.0[1].wait().unwrap());
    assert!(status.success());

    // Over streamable HTTP.
    let port = free_port();
    let mut gateway = Command::new(academy())
        .args(["--exchange", &url, "mcp", "--http", &format!("127.0.0.1:{port}")])
        .env("ACADEMY_TOKEN", GATEWAY_TOKEN)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(gateway.stderr.take().unwrap()).lines();
    let serving = tokio::task::block_in_place(|| said.next().unwrap().unwrap());
    assert!(serving.contains(&format!("127.0.0.1:{port}/mcp")), "{serving}");
    children.0.push(gateway);
    let done = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(root().join("examples/python/mcp_client.py"))
            .args(["http", &format!("http://127.0.0.1:{port}/mcp")])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    assert!(done.status.success(), "{stdout}{}", String::from_utf8_lossy(&done.stderr));
    check_counter_calls(&mut stdout.lines().map(|l| Ok(l.to_owned())), 47);
    let gateway = children.0.last_mut().unwrap();
    signal(gateway, "-TERM");
    let status = tokio::task::block_in_place(|| gateway.wait().unwrap());
    assert!(status.success(), "the gateway exits on SIGTERM");
    manager.close().await.unwrap();
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill").args([name, &child.id().to_string()]).status().unwrap();
    assert!(sent.success());
}

/// One POST of `body` to the gateway's `/mcp` on `port`, with `token` as a
/// bearer token and `session` as its MCP session: the status code, the
/// session the answer names, and the JSON-RPC message it carries (plain
/// JSON or the first server-sent event), if any.
fn post(
    port: u16,
    token: Option<&str>,
    session: Option<&str>,
    body: &Value,
) -> (u16, Option<String>, Option<Value>) {
    use std::io::{Read as _, Write as _};
    let body = body.to_string();
    let mut head = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(session) = session {
        head.push_str(&format!(
            "Mcp-Session-Id: {session}\r\nMcp-Protocol-Version: 2025-06-18\r\n"
        ));
    }
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    conn.write_all(format!("{head}\r\n{body}").as_bytes()).unwrap();
    // Read until the answer's message is whole (an event stream may stay open).
    let (mut answer, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        let n = conn.read(&mut buf).unwrap_or(0);
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        let Some((head, rest)) = text.split_once("\r\n\r\n") else {
            assert!(n > 0, "no answer: {text}");
            continue;
        };
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let session = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("mcp-session-id").then(|| value.trim().to_owned())
        });
        let message = rest
            .lines()
            .map(|l| l.strip_prefix("data:").unwrap_or(l).trim())
            .find_map(|l| serde_json::from_str::<Value>(l).ok().filter(Value::is_object));
        if message.is_some() || n == 0 {
            return (status, session, message);
        }
    }
}

/// An MCP session opened with `token`: its id.
fn initialize(port: u16, token: &str) -> String {
    let hello = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}});
    let (status, session, answer) = post(port, Some(token), None, &hello);
    assert_eq!(status, 200, "{answer:?}");
    let session = session.expect("a session id");
    let ready = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (status, _, _) = post(port, Some(token), Some(&session), &ready);
    assert_eq!(status, 202);
    session
}

/// Over HTTP with `--as-caller`, the gateway lets in only requests with a
/// token the exchange takes, and calls as their caller: a caller whose
/// token is revoked is shut out while others go on. It will not serve a
/// non-loopback address without it, nor call as callers through an exchange
/// that takes any token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_the_gateway_calls_as_its_callers() {
    const ALICE: &str = "alice-token-0123456789";
    const BOB: &str = "bob-token-0123456789";
    const CAROL: &str = "carol-token-0123456789";
    let dir = std::env::temp_dir().join(format!("academy-mcp-callers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    let everyone = format!(
        "gateway {GATEWAY_TOKEN}\nowner {OWNER_TOKEN}\nalice {ALICE}\nbob {BOB}\ncarol {CAROL}\n"
    );
    std::fs::write(&file, &everyone).unwrap();
    let tokens = Tokens::load(&file).unwrap().reload_every(std::time::Duration::from_millis(100));
    // Two mailboxes each: the owner's client and agent, and Carol's two.
    let limits = academy_exchange::Limits { max_mailboxes_per_principal: 2, ..Default::default() };
    let options = ExchangeOptions { tokens: Some(tokens), limits, ..Default::default() };
    let exchange = RunningExchange::start(options).await.unwrap();
    let url = exchange.url();
    let carols = Credentials::bearer(CAROL).unwrap();
    let carols = GrpcExchange::connect_with(url.clone(), &carols).await.unwrap();
    for _ in 0..2 {
        academy_sdk::exchange::ExchangeApi::register_client(&carols).await.unwrap();
    }
    let credentials = Credentials::bearer(OWNER_TOKEN).unwrap();
    let owner = GrpcExchange::connect_with(url.clone(), &credentials).await.unwrap();
    let manager = Manager::new(std::sync::Arc::new(owner)).await.unwrap();
    let stats = manager.launch(WordStats::default()).await.unwrap();
    let id = stats.id().to_string();
    let tool = format!("WordStats_analyse_{}", &id[id.len() - 8..]);

    // Everyone who reaches a non-loopback address would call as the gateway.
    let open = Command::new(academy())
        .args(["--exchange", &url, "mcp", "--http", &format!("0.0.0.0:{}", free_port())])
        .env("ACADEMY_TOKEN", GATEWAY_TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(!open.status.success() && stderr.contains("--as-caller"), "{stderr}");

    let port = free_port();
    let mut children = Children::default();
    let mut gateway = Command::new(academy())
        .args(["--exchange", &url, "mcp", "--as-caller", "--refresh-ms", "100"])
        .args(["--timeout-ms", "3000", "--http", &format!("127.0.0.1:{port}")])
        .env("ACADEMY_TOKEN", GATEWAY_TOKEN)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = BufReader::new(gateway.stderr.take().unwrap()).lines();
    children.0.push(gateway);
    let serving = tokio::task::block_in_place(|| said.next().unwrap().unwrap());
    assert!(serving.contains("/mcp"), "{serving}");

    tokio::task::block_in_place(|| {
        let hello = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}});
        assert_eq!(post(port, None, None, &hello).0, 401, "no token");
        assert_eq!(post(port, Some("nobody-token-0123456789"), None, &hello).0, 401, "unknown");
        // Carol has no mailbox left to call from.
        let (status, _, _) = post(port, Some(CAROL), None, &hello);
        assert_eq!(status, 429, "over her quota");

        let call = |token: &str, session: &str| {
            let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": tool, "arguments": {"text": "to be or not to be"}}});
            post(port, Some(token), Some(session), &call)
        };
        let alice = initialize(port, ALICE);
        let (status, _, answer) = call(ALICE, &alice);
        assert_eq!(status, 200, "{answer:?}");
        let answer = answer.unwrap();
        assert_eq!(answer["result"]["structuredContent"]["result"]["words"], 6, "{answer}");

        // Alice's token revoked: her requests are refused, even those that
        // call nothing (listing the tools), once the exchange reads its
        // file again; Bob's go on.
        std::fs::write(&file, everyone.replace(&format!("alice {ALICE}\n"), "")).unwrap();
        let list = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"});
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let (status, _, answer) = post(port, Some(ALICE), Some(&alice), &list);
            if status == 401 {
                break;
            }
            assert_eq!(status, 200, "{answer:?}");
            assert!(std::time::Instant::now() < deadline, "alice still lists: {answer:?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(call(ALICE, &alice).0, 401);
        let bob = initialize(port, BOB);
        let (status, _, answer) = call(BOB, &bob);
        assert_eq!(status, 200, "{answer:?}");
        assert_eq!(answer.unwrap()["result"]["isError"], false);
    });

    // Through an exchange that takes any token, calling as callers is refused.
    let open_exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let refused = Command::new(academy())
        .args(["--exchange", &open_exchange.url(), "mcp", "--as-caller"])
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("does not authenticate"), "{stderr}");
    stats.shutdown(academy_sdk::MailboxPolicy::Terminate).await.unwrap();
    manager.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
