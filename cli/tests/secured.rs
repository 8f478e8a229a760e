//! A system with security on (docs/design.md, "Security"): an exchange and a
//! launcher with the same tokens file, serving mutual TLS; a worker and the
//! launcher acting as one principal, users as others. Real servers on
//! loopback, the real CLI.

use std::path::PathBuf;
use std::process::Command;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_launcher::{LauncherOptions, RunningLauncher};
use academy_proto::{ExchangeError, pb};
use academy_sdk::credentials::{TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV};
use academy_sdk::exchange::{ExchangeApi, GrpcExchange};
use academy_sdk::launcher::{Launcher, RemoteLaunch};
use academy_sdk::worker::Worker;
use academy_sdk::{ClientError, Credentials, HandleError, MailboxPolicy, Manager, behaviour};
use academy_server::auth::Tokens;
use academy_server::testing::TestPki;

#[derive(Default, serde::Deserialize)]
struct Greeter {
    greeting: String,
}

#[behaviour(name = "test.Greeter")]
impl Greeter {
    #[action]
    async fn greet(&self, name: String) -> String {
        format!("{} {name}", self.greeting)
    }
}

const SYSTEM: &str = "system-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

static PKI: LazyLock<TestPki> = LazyLock::new(|| TestPki::new("academy test CA"));

/// The token, and what mutual TLS needs: the CA and a client certificate.
fn creds(token: &str) -> Credentials {
    let client = &PKI.client;
    Credentials::none()
        .with_tls_ca(PKI.ca().as_bytes())
        .with_client_certificate(client.cert.as_bytes(), client.key.as_bytes())
        .with_token(token)
        .unwrap()
}

/// The PEM files the CLI reads (ACADEMY_TLS_*), in a fresh directory.
fn pem_files() -> Vec<(&'static str, PathBuf)> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("academy-pem-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = [
        (TLS_CA_ENV, "ca.pem", PKI.ca()),
        (TLS_CERT_ENV, "client.pem", PKI.client.cert.clone()),
        (TLS_KEY_ENV, "client.key", PKI.client.key.clone()),
    ];
    files
        .into_iter()
        .map(|(var, name, pem)| {
            std::fs::write(dir.join(name), pem).unwrap();
            (var, dir.join(name))
        })
        .collect()
}

/// Runs `academy ARGS` with `token` (if any); (success, stdout, stderr).
async fn cli(
    launcher: String,
    token: Option<&'static str>,
    args: &'static [&str],
) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_academy"));
        command.env_remove("ACADEMY_TOKEN").args(["--launcher", &launcher]);
        command.envs(pem_files());
        if let Some(token) = token {
            command.env("ACADEMY_TOKEN", token);
        }
        let out = command.args(args).output().expect("academy runs");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), text(&out.stdout), text(&out.stderr))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_launch_call_and_stop_only_their_own_agents() {
    let tokens = tokens_again();
    let tls = || Some(PKI.server_tls(true));
    let options =
        ExchangeOptions { tokens: Some(tokens.clone()), tls: tls(), ..Default::default() };
    let exchange = RunningExchange::start(options).await.unwrap();
    assert!(exchange.url().starts_with("https://"));
    let options = |tokens, worker_principal: Option<&str>| LauncherOptions {
        exchange_url: exchange.url(),
        tokens,
        worker_principal: worker_principal.map(Into::into),
        exchange_credentials: creds(SYSTEM),
        tls: tls(),
        ..Default::default()
    };
    let err = RunningLauncher::start(options(Some(tokens.clone()), None)).await.unwrap_err();
    assert!(err.to_string().contains("--worker-principal"), "{err}");
    let launcher = RunningLauncher::start(options(Some(tokens), Some("system"))).await.unwrap();

    // Only the workers' principal may join as a worker.
    let alice_creds = creds(ALICE);
    let mut intruder = pb::launcher_service_client::LauncherServiceClient::new(
        alice_creds.connect(&launcher.url()).await.unwrap(),
    );
    let join = intruder.join(futures::stream::empty()).await.unwrap_err();
    assert_eq!(join.code(), tonic::Code::PermissionDenied, "{join:?}");
    let stop_worker = tokio_util::sync::CancellationToken::new();
    let worker = Worker::new(launcher.url()).credentials(creds(SYSTEM)).register::<Greeter>();
    let worker = tokio::spawn(worker.run_until(stop_worker.clone().cancelled_owned()));

    // Without a token nothing is served.
    let (ok, _, err) = cli(launcher.url(), None, &["agents", "list"]).await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let bad =
        Launcher::connect_with(&launcher.url(), &creds("nobody-token-0123456789")).await.unwrap();
    assert!(matches!(
        bad.get(academy_sdk::EntityId::new_agent()).await,
        Err(ClientError::Exchange(ExchangeError::Unauthenticated(_)))
    ));

    let alice = Launcher::connect_with(&launcher.url(), &creds(ALICE)).await.unwrap();
    let manager = Manager::new(std::sync::Arc::new(
        GrpcExchange::connect_with(exchange.url(), &creds(ALICE)).await.unwrap(),
    ))
    .await
    .unwrap();
    let config = serde_json::json!({ "greeting": "hello" });
    let deadline = Instant::now() + Duration::from_secs(10);
    let greeter = loop {
        match manager.launch_remote::<Greeter>(&alice, &config, RemoteLaunch::default()).await {
            Ok(handle) => break handle,
            // The worker may not have joined yet.
            Err(e) => assert!(Instant::now() < deadline, "cannot launch: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The worker (as `system`) subscribed to the mailbox the launcher (as
    // `system`) registered; alice's call went through it.
    assert_eq!(greeter.greet("alice".into()).await.unwrap(), "hello alice");
    let record = alice.get(greeter.id()).await.unwrap();
    assert_eq!(record.owner, "alice");
    assert!(record.config.is_some() && !record.config_redacted, "alice sees her config");

    // Bob may call it, but not stop it, nor end its mailbox behind the launcher's back.
    let bob = Launcher::connect_with(&launcher.url(), &creds(BOB)).await.unwrap();
    let Err(ClientError::Refused { code: tonic::Code::PermissionDenied, message }) =
        bob.stop(greeter.id(), MailboxPolicy::Terminate).await
    else {
        panic!("bob stopped alice's agent");
    };
    assert!(message.contains("launched by principal \"alice\""), "{message}");
    // Nor see its config, which may hold secrets.
    let seen = bob.get(greeter.id()).await.unwrap();
    assert!(seen.config.is_none() && seen.config_redacted, "{seen:?}");
    let (ok, out, _) = cli(launcher.url(), Some(BOB), &["--json", "agents", "list"]).await;
    assert!(ok && out.contains("\"config\":null") && !out.contains("hello"), "{out}");
    let bob_exchange = GrpcExchange::connect_with(exchange.url(), &creds(BOB)).await.unwrap();
    let terminate = ExchangeApi::terminate(&bob_exchange, &greeter.id()).await;
    assert!(
        matches!(terminate, Err(ClientError::Exchange(ExchangeError::PermissionDenied { ref owner, .. })) if owner == "system"),
        "{terminate:?}"
    );
    let (ok, _, err) = cli(launcher.url(), Some(BOB), &["workers", "drain", "worker:x"]).await;
    assert!(!ok && err.contains("PermissionDenied"), "{err}");

    // The CLI, with alice's token, sees her agent; she stops it.
    let (ok, out, err) = cli(launcher.url(), Some(ALICE), &["--json", "agents", "list"]).await;
    assert!(ok && out.contains("\"owner\":\"alice\""), "{out}{err}");
    alice.stop(greeter.id(), MailboxPolicy::Terminate).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match greeter.greet("again".into()).await {
            Err(HandleError::Terminated(_)) => break,
            other => assert!(Instant::now() < deadline, "still answering: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A launcher whose own token the exchange refuses says so, rather than
    // telling alice that hers is wrong.
    let misconfigured = RunningLauncher::start(LauncherOptions {
        exchange_credentials: creds("stale-token-0123456789"),
        ..options(Some(tokens_again()), Some("system"))
    })
    .await
    .unwrap();
    let worker2 = Worker::new(misconfigured.url()).credentials(creds(SYSTEM)).register::<Greeter>();
    let worker2 = tokio::spawn(worker2.run_until(stop_worker.clone().cancelled_owned()));
    let alice2 = Launcher::connect_with(&misconfigured.url(), &creds(ALICE)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match alice2.launch::<Greeter>(&config, RemoteLaunch::default()).await {
            // The worker may not have joined yet.
            Err(ClientError::Refused { code: tonic::Code::FailedPrecondition, .. }) => {}
            other => break other,
        }
        assert!(Instant::now() < deadline, "the worker never joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // INTERNAL: the SDK reports it as retryable (an operator can fix it).
    let Err(ClientError::Transport(message)) = refused else {
        panic!("expected INTERNAL, got {refused:?}");
    };
    assert!(message.contains("refused the launcher's credentials"), "{message}");

    stop_worker.cancel();
    worker.await.unwrap().unwrap();
    worker2.await.unwrap().unwrap();
}

fn tokens_again() -> Tokens {
    Tokens::parse(&format!("system {SYSTEM}\nalice {ALICE}\nbob {BOB}\n")).unwrap()
}
