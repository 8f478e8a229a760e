//! TLS and mutual TLS between the SDK and a real exchange-server on loopback,
//! with certificates made for the test (a CA, the server's, a client's).

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_proto::ExchangeError;
use academy_sdk::exchange::{ExchangeApi as _, GrpcExchange};
use academy_sdk::{ClientError, Credentials, Manager, behaviour};
use academy_server::auth::Tokens;
use academy_server::testing::{CertifiedKey, PemFiles, TestPki};
use academy_server::tls::Tls;

#[derive(Default)]
struct Echo;

#[behaviour(name = "test.Echo")]
impl Echo {
    #[action]
    async fn echo(&self, text: String) -> String {
        text
    }
}

async fn serve(pki: &TestPki, mutual: bool) -> RunningExchange {
    let options = ExchangeOptions { tls: Some(pki.server_tls(mutual)), ..Default::default() };
    RunningExchange::start(options).await.unwrap()
}

/// An agent called over the exchange through `credentials`.
async fn round_trip(url: &str, credentials: &Credentials) -> Result<String, ClientError> {
    let exchange = GrpcExchange::connect_with(url, credentials).await?;
    let manager = Manager::new(std::sync::Arc::new(exchange)).await?;
    let echo = manager.launch(Echo).await?;
    let answer =
        echo.echo("over TLS".into()).await.map_err(|e| ClientError::Transport(e.to_string()))?;
    manager.close().await.map_err(|e| ClientError::Transport(e.to_string()))?;
    Ok(answer)
}

#[tokio::test]
async fn the_sdk_talks_tls_to_an_exchange_and_refuses_what_it_cannot_trust() {
    let pki = TestPki::new("academy test CA");
    let server = serve(&pki, false).await;
    assert!(server.url().starts_with("https://"), "{}", server.url());
    let trusting = Credentials::none().with_tls_ca(pki.ca().as_bytes());
    assert_eq!(round_trip(&server.url(), &trusting).await.unwrap(), "over TLS");

    // A server signed by a CA the client does not trust, and plaintext to a
    // TLS port: no connection.
    let stranger = Credentials::none().with_tls_ca(TestPki::new("another CA").ca().as_bytes());
    let err = GrpcExchange::connect_with(server.url(), &stranger).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    let plaintext = server.url().replace("https://", "http://");
    let err = round_trip(&plaintext, &Credentials::none()).await.unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");
}

#[tokio::test]
async fn with_mutual_tls_only_clients_with_a_certificate_from_the_ca_get_in() {
    let pki = TestPki::new("academy test CA");
    let server = serve(&pki, true).await;
    let ca = Credentials::none().with_tls_ca(pki.ca().as_bytes());
    let alice =
        ca.clone().with_client_certificate(pki.client.cert.as_bytes(), pki.client.key.as_bytes());
    assert_eq!(round_trip(&server.url(), &alice).await.unwrap(), "over TLS");

    // No certificate, or one from another CA: the handshake fails.
    let forged = TestPki::new("another CA").client;
    let mallory = ca.clone().with_client_certificate(forged.cert.as_bytes(), forged.key.as_bytes());
    for credentials in [ca, mallory] {
        let err = round_trip(&server.url(), &credentials).await.unwrap_err();
        assert!(matches!(err, ClientError::Transport(_)), "{err}");
    }
}

#[tokio::test]
async fn a_server_with_a_key_that_is_not_pem_refuses_to_start() {
    let pki = TestPki::new("academy test CA");
    let tls = Tls::from_pem(pki.server.cert.as_bytes(), b"not a key", None);
    let err = RunningExchange::start(ExchangeOptions { tls: Some(tls), ..Default::default() })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid TLS certificate or key"), "{err}");
}

#[tokio::test]
async fn client_certificates_name_principals_and_a_token_wins() {
    let pki = TestPki::new("academy test CA");
    let tokens = Tokens::parse("carol carol-0123456789abcdef").unwrap();
    let tls = pki.server_tls(true).with_client_principals().unwrap();
    let options = ExchangeOptions { tls: Some(tls), tokens: Some(tokens), ..Default::default() };
    let server = RunningExchange::start(options).await.unwrap();
    let ca = Credentials::none().with_tls_ca(pki.ca().as_bytes());
    let as_holder = |cert: &CertifiedKey| {
        ca.clone().with_client_certificate(cert.cert.as_bytes(), cert.key.as_bytes())
    };
    let connect = async |credentials: &Credentials| {
        GrpcExchange::connect_with(server.url(), credentials).await.unwrap()
    };
    let spiffe = "spiffe://lab.example/ns/academy/sa/analyst";
    let analyst = connect(&as_holder(&pki.issue(&[spiffe, "analyst.lab.example"]))).await;
    let bob = connect(&as_holder(&pki.issue(&["bob.lab.example"]))).await;

    // A mailbox belongs to the principal the certificate names: the URI if
    // it has one, else its DNS name.
    let id = analyst.register_agent("test.Owned", &[], "", None, None).await.unwrap();
    let err = bob.terminate(&id).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Exchange(ExchangeError::PermissionDenied { owner, .. })
            if owner == spiffe),
        "{err}"
    );
    let bobs = bob.register_agent("test.Owned", &[], "", None, None).await.unwrap();
    let err = analyst.terminate(&bobs).await.unwrap_err();
    assert!(err.to_string().contains("\"bob.lab.example\""), "{err}");
    analyst.terminate(&id).await.unwrap();

    // A bearer token names the caller whatever its certificate.
    let carol = connect(
        &as_holder(&pki.issue(&["bob.lab.example"])).with_token("carol-0123456789abcdef").unwrap(),
    )
    .await;
    let carols = carol.register_agent("test.Owned", &[], "", None, None).await.unwrap();
    let err = bob.terminate(&carols).await.unwrap_err();
    assert!(err.to_string().contains("principal \"carol\""), "{err}");

    // A certificate that names no one is refused, with what to do.
    let nameless = connect(&as_holder(&pki.issue(&[]))).await;
    let err = nameless.register_agent("test.Owned", &[], "", None, None).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Exchange(ExchangeError::Unauthenticated(why))
            if why.contains("subject alternative name")),
        "{err}"
    );
}

#[test]
fn client_principals_need_mutual_tls() {
    let pki = TestPki::new("academy test CA");
    let err = pki.server_tls(false).with_client_principals().unwrap_err();
    assert!(err.to_string().contains("mutual TLS"), "{err}");
}

/// A server reads its certificate files again: after they are replaced (a
/// renewal by another CA here), new connections get the new certificate;
/// files that do not load leave the last good one served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_serves_its_renewed_certificate_without_a_restart() {
    let files = PemFiles::new("tls-reload");
    let (old, new) = (TestPki::new("old CA"), TestPki::new("new CA"));
    files.write(&old.server);
    let tls = Tls::load(&files.cert, &files.key, None).unwrap();
    let server = RunningExchange::start(ExchangeOptions { tls: Some(tls), ..Default::default() })
        .await
        .unwrap();
    let trusts = |pki: &TestPki| Credentials::none().with_tls_ca(pki.ca().as_bytes());
    let connects =
        async |pki: &TestPki| GrpcExchange::connect_with(server.url(), &trusts(pki)).await.is_ok();
    assert!(connects(&old).await && !connects(&new).await);
    // A connection made before stays up, with the certificate it got.
    let kept = GrpcExchange::connect_with(server.url(), &trusts(&old)).await.unwrap();
    let manager = Manager::new(std::sync::Arc::new(kept)).await.unwrap();
    let echo = manager.launch(Echo).await.unwrap();

    files.write(&new.server);
    let deadline = std::time::Instant::now() + tls_reload_bound();
    while !connects(&new).await {
        assert!(std::time::Instant::now() < deadline, "the renewed certificate was never served");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!connects(&old).await, "new connections get the new certificate only");
    assert_eq!(round_trip(&server.url(), &trusts(&new)).await.unwrap(), "over TLS");
    assert_eq!(echo.echo("still up".into()).await.unwrap(), "still up");
    manager.close().await.unwrap();

    // A key that is not PEM (or not the certificate's): the last good pair stays.
    std::fs::write(&files.key, "not a key").unwrap();
    tokio::time::sleep(tls_reload_bound()).await;
    assert!(connects(&new).await, "a broken renewal is not taken");
}

/// A client reads its CA and certificate files again at each new
/// connection: a channel made before a renewal (here, from a CA the server
/// does not trust to one it does) connects with the renewed files, without
/// a restart. Files that do not load are refused to new channels, naming
/// them, and leave channels made before working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_shows_its_renewed_certificate_without_a_restart() {
    let files = PemFiles::new("client-tls");
    let write = |pki: &TestPki| {
        files.write_ca(pki);
        files.write(&pki.client);
    };
    let (pki, stale) = (TestPki::new("academy test CA"), TestPki::new("stale CA"));
    let server = serve(&pki, true).await;
    write(&stale);
    let credentials = Credentials::none()
        .with_tls_ca_file(&files.ca)
        .with_client_certificate_files(&files.cert, &files.key);
    let exchange = GrpcExchange::lazy(&server.url(), &credentials).unwrap();
    let register = async || exchange.register_agent("test.Renewed", &[], "", None, None).await;
    let err = register().await.unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err}");

    write(&pki);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Err(e) = register().await {
        assert!(std::time::Instant::now() < deadline, "the renewed files were never used: {e}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    std::fs::write(&files.key, "not a key").unwrap();
    let err = GrpcExchange::connect_with(server.url(), &credentials).await.unwrap_err();
    assert!(err.to_string().contains("invalid TLS settings"), "{err}");
    register().await.unwrap();
}

/// Long enough for a server to have looked at its files again.
fn tls_reload_bound() -> std::time::Duration {
    academy_server::tls::RELOAD_EVERY * 2
}
