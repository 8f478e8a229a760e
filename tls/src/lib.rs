//! TLS for Academy's listeners (the exchange's, the launcher's, the SDK's
//! peer endpoints) and its clients (docs/design.md, "Security"). A
//! certificate, key and CA are given as PEM or as files, and files are read
//! again while they are in use (a certificate renewed by cert-manager, say):
//! a listener's every [`RELOAD_EVERY`] while its [`Acceptor`] lives, a
//! client's at each connection it makes ([`Connector::current`]). New
//! connections get what changed, open ones keep theirs, and files that do
//! not load together are logged and the last good ones kept.
//!
//! ```no_run
//! # async fn demo() -> Result<(), academy_tls::TlsError> {
//! use std::path::Path;
//! let tls = academy_tls::ServerTls::from_files(Path::new("tls.crt"), Path::new("tls.key"))?
//!     .with_client_ca_file(Path::new("ca.crt"));
//! let acceptor = tls.acceptor()?; // inside a tokio runtime: it follows the files
//! let _handshake = acceptor.current(); // a tokio_rustls::TlsAcceptor
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

pub use tokio_rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

/// How often a listener looks at its certificate files again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// TLS material that cannot be read or used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Where one PEM comes from.
#[derive(Clone, PartialEq, Eq)]
enum Source {
    Pem(Arc<[u8]>),
    File(Arc<Path>),
}

impl Source {
    fn pem(pem: &[u8]) -> Self {
        Self::Pem(pem.into())
    }

    fn file(path: &Path) -> Self {
        Self::File(PathBuf::from(path).into())
    }

    fn read(&self, what: &str) -> Result<Vec<u8>, TlsError> {
        match self {
            Self::Pem(pem) => Ok(pem.to_vec()),
            Self::File(path) => std::fs::read(path).map_err(|e| {
                TlsError(format!("cannot read the TLS {what} {}: {e}", path.display()))
            }),
        }
    }

    fn is_file(&self) -> bool {
        matches!(self, Self::File(_))
    }
}

/// A listener's certificate (with the names it is reached by) and key, and
/// for mutual TLS the CA whose certificates its clients must show.
#[derive(Clone)]
pub struct ServerTls {
    cert: Source,
    key: Source,
    client_ca: Option<Source>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("ServerTls")
            .field("mutual", &self.is_mutual())
            .field("from_files", &self.follows_files())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// This certificate and key, as PEM.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Self {
        Self { cert: Source::pem(cert), key: Source::pem(key), client_ca: None }
    }

    /// The certificate and key in these PEM files, read now (to fail early)
    /// and again by every [`Acceptor`] while it lives.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let tls = Self { cert: Source::file(cert), key: Source::file(key), client_ca: None };
        tls.read()?;
        Ok(tls)
    }

    /// Requiring clients to show a certificate that this CA (PEM) signed.
    pub fn with_client_ca_pem(mut self, ca: &[u8]) -> Self {
        self.client_ca = Some(Source::pem(ca));
        self
    }

    /// Requiring clients to show a certificate that the CA in this PEM file
    /// signed; the file is read when an [`Acceptor`] is made, and again
    /// while it lives.
    pub fn with_client_ca_file(mut self, ca: &Path) -> Self {
        self.client_ca = Some(Source::file(ca));
        self
    }

    /// Whether clients must show a certificate.
    pub fn is_mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    fn follows_files(&self) -> bool {
        self.cert.is_file()
            || self.key.is_file()
            || self.client_ca.as_ref().is_some_and(Source::is_file)
    }

    fn read(&self) -> Result<Pem, TlsError> {
        let client_ca = self.client_ca.as_ref().map(|ca| ca.read("client CA")).transpose()?;
        Ok(Pem { cert: self.cert.read("certificate")?, key: self.key.read("key")?, client_ca })
    }

    /// What makes TLS connections of accepted ones. Fails if the
    /// certificate, key or client CA cannot be read, is not valid PEM, or
    /// the key is not the certificate's. With files, it reads them again
    /// every [`RELOAD_EVERY`] for as long as it lives, so it must be made
    /// inside a tokio runtime.
    pub fn acceptor(&self) -> Result<Acceptor, TlsError> {
        let pem = self.read()?;
        let acceptor = Acceptor { current: Arc::new(RwLock::new(pem.config()?)) };
        if self.follows_files() {
            tokio::spawn(follow(Arc::downgrade(&acceptor.current), self.clone(), pem));
        }
        Ok(acceptor)
    }
}

/// The PEM read at one time.
#[derive(PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Pem {
    fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", e))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots(ca, "client CA")?;
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| invalid("TLS client CA", e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let (certs, key) = certified(&self.cert, &self.key, "certificate or key")?;
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid("TLS certificate or key", e))?;
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(Arc::new(config))
    }
}

/// `what` (PEM) that does not load.
fn invalid(what: &str, why: impl std::fmt::Display) -> TlsError {
    TlsError(format!("invalid {what}: {why}"))
}

/// The CA certificates in `pem`, at least one.
fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let what = format!("TLS {what}");
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.map_err(|e| invalid(&what, e))?).map_err(|e| invalid(&what, e))?;
    }
    if roots.is_empty() {
        return Err(invalid(&what, "no certificate in the PEM"));
    }
    Ok(roots)
}

/// The certificate chain in `cert` (at least one) and the key in `key`.
fn certified(
    cert: &[u8],
    key: &[u8],
    what: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let what = format!("TLS {what}");
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&what, e))?;
    if certs.is_empty() {
        return Err(invalid(&what, "no certificate in the PEM"));
    }
    Ok((certs, PrivateKeyDer::from_pem_slice(key).map_err(|e| invalid(&what, e))?))
}

/// Makes TLS connections with a listener's current certificate.
#[derive(Clone)]
pub struct Acceptor {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").finish_non_exhaustive()
    }
}

impl Acceptor {
    /// An acceptor of the certificate now.
    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone().into()
    }
}

/// The TLS connection over `io` once its handshake with `tls` completes
/// within `timeout`; `None` (logged) when it fails or takes longer.
pub async fn handshake<IO>(
    tls: tokio_rustls::TlsAcceptor,
    io: IO,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, tls.accept(io)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(?timeout, "TLS handshake took too long");
            None
        }
    }
}

/// Reads the files every [`RELOAD_EVERY`] until the acceptor is gone,
/// taking what changed when it loads.
async fn follow(current: Weak<RwLock<Arc<ServerConfig>>>, tls: ServerTls, mut last: Pem) {
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Some(current) = current.upgrade() else { return };
        let pem = match tls.read() {
            Ok(pem) if pem == last => continue,
            Ok(pem) => pem,
            Err(e) => {
                tracing::warn!(error = %e, "keeping the TLS certificate loaded before");
                continue;
            }
        };
        match pem.config() {
            Ok(config) => {
                *current.write().unwrap_or_else(PoisonError::into_inner) = config;
                let cert = match &tls.cert {
                    Source::File(path) => path.display().to_string(),
                    Source::Pem(_) => "given as PEM".to_owned(),
                };
                tracing::info!(%cert, "TLS certificate loaded again: new connections get it");
            }
            // A certificate and key written one after the other match
            // again at the next look.
            Err(e) => tracing::warn!(error = %e, "keeping the TLS certificate loaded before"),
        }
        last = pem;
    }
}

/// What a client trusts and shows: the CA its servers' certificates must
/// chain to (the public web roots without one), and for mutual TLS its own
/// certificate and key.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<Source>,
    identity: Option<(Source, Source)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Trusting servers whose certificate this CA (PEM) signed.
    pub fn with_ca_pem(mut self, ca: &[u8]) -> Self {
        self.ca = Some(Source::pem(ca));
        self
    }

    /// Trusting servers whose certificate the CA in this PEM file signed.
    pub fn with_ca_file(mut self, ca: &Path) -> Self {
        self.ca = Some(Source::file(ca));
        self
    }

    /// Showing this certificate and key (PEM).
    pub fn with_identity_pem(mut self, cert: &[u8], key: &[u8]) -> Self {
        self.identity = Some((Source::pem(cert), Source::pem(key)));
        self
    }

    /// Showing the certificate and key in these PEM files.
    pub fn with_identity_files(mut self, cert: &Path, key: &Path) -> Self {
        self.identity = Some((Source::file(cert), Source::file(key)));
        self
    }

    fn follows_files(&self) -> bool {
        self.ca.as_ref().is_some_and(Source::is_file)
            || self.identity.as_ref().is_some_and(|(cert, key)| cert.is_file() || key.is_file())
    }

    fn read(&self) -> Result<ClientPem, TlsError> {
        let ca = self.ca.as_ref().map(|ca| ca.read("CA")).transpose()?;
        let identity = match &self.identity {
            Some((cert, key)) => Some((cert.read("client certificate")?, key.read("client key")?)),
            None => None,
        };
        Ok(ClientPem { ca, identity })
    }

    /// What makes TLS connections to servers. Fails if the CA, certificate
    /// or key cannot be read or used; [`Connector::current`] reads files
    /// again.
    pub fn connector(&self) -> Result<Connector, TlsError> {
        let pem = self.read()?;
        let config = pem.config()?;
        let cached = Arc::new(RwLock::new((pem, config)));
        Ok(Connector { tls: self.clone(), cached })
    }
}

/// The PEM of a client read at one time.
#[derive(PartialEq, Eq)]
struct ClientPem {
    ca: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientPem {
    fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("TLS", e))?;
        let roots = match &self.ca {
            None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
            Some(ca) => roots(ca, "CA")?,
        };
        let builder = builder.with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let (certs, key) = certified(cert, key, "client certificate or key")?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| invalid("TLS client certificate or key", e))?
            }
        };
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(Arc::new(config))
    }
}

/// Makes a client's TLS connections with its current CA and certificate.
#[derive(Clone)]
pub struct Connector {
    tls: ClientTls,
    /// The PEM last read that loaded, and its config.
    cached: Arc<RwLock<(ClientPem, Arc<ClientConfig>)>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").field("tls", &self.tls).finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector with the CA and certificate now: files are read again,
    /// and what changed is taken if it loads (else logged, and the last
    /// good ones kept).
    pub fn current(&self) -> tokio_rustls::TlsConnector {
        if !self.tls.follows_files() {
            // Given as PEM: nothing to read again.
            return self.cached.read().unwrap_or_else(PoisonError::into_inner).1.clone().into();
        }
        let config = match self.tls.read() {
            Ok(pem) => {
                let cached = self.cached.read().unwrap_or_else(PoisonError::into_inner);
                if pem == cached.0 {
                    cached.1.clone()
                } else {
                    drop(cached);
                    self.take(pem)
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the TLS client settings loaded before");
                self.cached.read().unwrap_or_else(PoisonError::into_inner).1.clone()
            }
        };
        config.into()
    }

    /// Takes `pem`, read anew, if it loads.
    fn take(&self, pem: ClientPem) -> Arc<ClientConfig> {
        let mut cached = self.cached.write().unwrap_or_else(PoisonError::into_inner);
        match pem.config() {
            Ok(config) => {
                tracing::info!("TLS client settings loaded again: new connections use them");
                *cached = (pem, config.clone());
                config
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the TLS client settings loaded before");
                cached.1.clone()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_certificates_is_refused_naming_what() {
        let err = roots(b"", "client CA").unwrap_err();
        assert_eq!(err.to_string(), "invalid TLS client CA: no certificate in the PEM");
        let err = certified(b"not PEM", b"not PEM", "certificate or key").unwrap_err();
        assert!(err.to_string().starts_with("invalid TLS certificate or key: "), "{err}");
        let server = ServerTls::from_pem(b"", b"").with_client_ca_pem(b"");
        assert!(server.acceptor().is_err());
        let client = ClientTls::default().with_ca_pem(b"-----BEGIN CERTIFICATE-----\n");
        assert!(client.connector().unwrap_err().to_string().contains("invalid TLS CA"));
    }

    #[test]
    fn files_that_cannot_be_read_are_named() {
        let missing = Path::new("/nonexistent/academy/tls.crt");
        let err = ServerTls::from_files(missing, missing).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/academy/tls.crt"), "{err}");
        let err = ClientTls::default().with_ca_file(missing).connector().unwrap_err();
        assert!(err.to_string().contains("cannot read the TLS CA"), "{err}");
    }

    #[test]
    fn the_public_web_roots_are_trusted_without_a_ca() {
        assert!(ClientTls::default().connector().is_ok());
    }
}
