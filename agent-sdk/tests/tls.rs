//! TLS and mutual TLS between the SDK and a real exchange-server on loopback,
//! with certificates made for the test (a CA, the server's, a client's).

use academy_exchange::testing::TestPki;
use academy_exchange::tls::Tls;
use academy_exchange::{RunningServer, ServerOptions};
use academy_sdk::{ClientError, Credentials, GrpcExchange, Manager, behaviour};

#[derive(Default)]
struct Echo;

#[behaviour(name = "test.Echo")]
impl Echo {
    #[action]
    async fn echo(&self, text: String) -> String {
        text
    }
}

async fn serve(pki: &TestPki, mutual: bool) -> RunningServer {
    let options = ServerOptions { tls: Some(pki.server_tls(mutual)), ..Default::default() };
    RunningServer::start(options).await.unwrap()
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
    let err = RunningServer::start(ServerOptions { tls: Some(tls), ..Default::default() })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid TLS certificate or key"), "{err}");
}
