//! The prod overlay's configuration, run: each Deployment's command and
//! environment as the kubelet would give them (Secrets filled in, `$(VAR)`
//! expanded, the pod's name from the downward API) started as processes
//! against a real Redis with a password, with certificates of a test CA in
//! the folders the Secrets are mounted at. The worker must join the launcher
//! over TLS, the launcher reach the exchange over TLS, and a user with a
//! token call an agent. Only what a cluster provides is changed: Services
//! become loopback ports (the certificate names `localhost`), and the mount
//! folders live under a scratch folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use academy_deploy::{kubernetes_dir, parse, pod_template, render};
use academy_examples::behaviours::WordStats;
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::launcher::Launcher;
use academy_sdk::{Credentials, Manager};
use academy_server::testing::{Children, RedisServer, TestPki, binary, free_port, get};
use serde_json::Value;

/// `text` with each `$(NAME)` replaced by its value in `env`, as Kubernetes
/// expands references to variables defined before.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (name, value) in env {
        out = out.replace(&format!("$({name})"), value);
    }
    out
}

/// The container's environment as the kubelet builds it, from `secrets`
/// (`(secret, key)` → value).
fn environment(
    container: &Value,
    secrets: &HashMap<(&str, &str), String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_owned();
        let value = if let Some(value) = var["value"].as_str() {
            expand(value, &env)
        } else if let Some(key_ref) = var["valueFrom"]["secretKeyRef"].as_object() {
            let key = (key_ref["name"].as_str().unwrap(), key_ref["key"].as_str().unwrap());
            secrets.get(&key).unwrap_or_else(|| panic!("no secret {key:?}")).clone()
        } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            "academy-worker-7d9f-x2k4q".to_owned()
        } else {
            panic!("a variable the test does not know how to fill: {var}");
        };
        env.push((name, value));
    }
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prod_overlay_runs_with_tls_tokens_and_a_redis_password() {
    let objects = parse(&render(&kubernetes_dir().join("overlays/prod")).unwrap()).unwrap();
    let scratch =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("prod-{}", std::process::id()));
    let mounts = scratch.join("etc/academy");
    std::fs::create_dir_all(mounts.join("tls")).unwrap();

    // The Secrets, as an operator creates them (deploy/README.md).
    let hex = |n: usize| uuid::Uuid::new_v4().simple().to_string()[..n].to_owned();
    let (password, system, alice) = (hex(24), hex(32), hex(32));
    let tokens = format!("system {system}\nalice {alice}\n");
    let pki = TestPki::new("academy test CA");
    std::fs::write(mounts.join("tokens"), &tokens).unwrap();
    std::fs::write(mounts.join("tls/tls.crt"), &pki.server.cert).unwrap();
    std::fs::write(mounts.join("tls/tls.key"), &pki.server.key).unwrap();
    std::fs::write(mounts.join("tls/ca.crt"), pki.ca()).unwrap();
    let secrets: HashMap<(&str, &str), String> = [
        (("academy-redis", "password"), password.clone()),
        (("academy-tokens", "tokens"), tokens),
        (("academy-tokens", "system-token"), system),
    ]
    .into();

    let redis = RedisServer::start().expect("redis-server must run for these tests");
    redis.command(&["CONFIG", "SET", "requirepass", &password]).unwrap();
    let ports: HashMap<&str, (u16, u16)> = [
        ("academy-exchange", (free_port(), free_port())),
        ("academy-launcher", (free_port(), free_port())),
        ("academy-worker", (0, free_port())),
    ]
    .into();
    // What the cluster would resolve, here.
    let rewrites = [
        ("academy-redis:6379".to_owned(), format!("127.0.0.1:{}", redis.port())),
        ("academy-exchange:50051".to_owned(), format!("localhost:{}", ports["academy-exchange"].0)),
        ("academy-launcher:50052".to_owned(), format!("localhost:{}", ports["academy-launcher"].0)),
        ("/etc/academy".to_owned(), mounts.display().to_string()),
    ];

    let mut processes = Children(Vec::new());
    for name in ["academy-exchange", "academy-launcher", "academy-worker"] {
        let pods = pod_template(&objects, name).unwrap();
        let container = &pods["spec"]["containers"][0];
        let (grpc, metrics) = ports[name];
        let mut env = environment(container, &secrets);
        for (var, value) in &mut env {
            for (from, to) in &rewrites {
                *value = value.replace(from, to);
            }
            if var.ends_with("_METRICS_LISTEN") {
                *value = format!("127.0.0.1:{metrics}");
            } else if var.ends_with("_LISTEN") {
                *value = format!("127.0.0.1:{grpc}");
            }
        }
        let words: Vec<String> = ["command", "args"]
            .iter()
            .flat_map(|k| container[*k].as_array().into_iter().flatten())
            .map(|w| expand(w.as_str().unwrap(), &env))
            .collect();
        let program: PathBuf = binary(&words[0]);
        let log = std::fs::File::create(scratch.join(format!("{name}.log"))).unwrap();
        let child = Command::new(&program)
            .args(&words[1..])
            .env_clear()
            .envs(env)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {} ({e}): build the workspace's binaries", program.display())
            });
        processes.0.push(child);
    }

    // Ready as the kubelet sees it: the worker only once joined, over TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in ["academy-exchange", "academy-launcher", "academy-worker"] {
        let addr = ([127, 0, 0, 1], ports[name].1).into();
        while !get(addr, "/readyz").is_ok_and(|(status, _)| status.ends_with("200 OK")) {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(scratch.join(format!("{name}.log"))).unwrap();
                panic!("{name} not ready after 30 s:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A user with a token, trusting the CA, launches an agent and calls it.
    let credentials = Credentials::bearer(&alice).unwrap().with_tls_ca(pki.ca().as_bytes());
    let exchange_url = format!("https://localhost:{}", ports["academy-exchange"].0);
    let launcher_url = format!("https://localhost:{}", ports["academy-launcher"].0);
    let exchange = GrpcExchange::connect_with(exchange_url.clone(), &credentials).await.unwrap();
    let manager = Manager::new(Arc::new(exchange)).await.unwrap();
    let launcher = Launcher::connect_with(&launcher_url, &credentials).await.unwrap();
    let agent = manager
        .launch_remote::<WordStats>(&launcher, &serde_json::json!({}), Default::default())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(30));
    assert_eq!(agent.analyse("served in production".into()).await.unwrap().words, 3);
    // Without TLS, or without a token, nothing is served.
    let plain = format!("http://localhost:{}", ports["academy-exchange"].0);
    let refused =
        match GrpcExchange::connect_with(plain, &Credentials::bearer(&alice).unwrap()).await {
            Ok(exchange) => Manager::new(Arc::new(exchange)).await.is_err(),
            Err(_) => true,
        };
    assert!(refused, "plaintext was served");
    let anonymous = Credentials::none().with_tls_ca(pki.ca().as_bytes());
    let refused = match GrpcExchange::connect_with(exchange_url, &anonymous).await {
        Ok(exchange) => Manager::new(Arc::new(exchange)).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a call without a token was served");
    drop(processes);
    // Durable state in Redis, TLS on both servers, as their logs say.
    let log = |name: &str| std::fs::read_to_string(scratch.join(format!("{name}.log"))).unwrap();
    let (exchange_log, launcher_log) = (log("academy-exchange"), log("academy-launcher"));
    assert!(exchange_log.contains("using Redis for mailboxes"), "{exchange_log}");
    assert!(launcher_log.contains("launcher state in Redis"), "{launcher_log}");
    for log in [&exchange_log, &launcher_log] {
        assert!(log.contains(r#""tls":true"#) && !log.contains(&password), "{log}");
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}
