//! TLS and mutual TLS for Academy's servers (rustls), shared by the
//! exchange and the launcher (docs/design.md, "Security"). A certificate,
//! key and client CA read from files are read again when the files change
//! (a certificate renewed by cert-manager, say): new connections get the
//! new ones, open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// How often a server looks at its certificate files again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A server's certificate and key, and with mutual TLS the CA its clients'
/// certificates must chain to, and whether those certificates name the
/// clients' principals. All PEM.
#[derive(Clone)]
pub struct Tls {
    pem: Arc<Pem>,
    /// Where the PEM was read from, to be read again.
    files: Option<Arc<Files>>,
    client_principals: bool,
}

#[derive(Clone, PartialEq, Eq)]
struct Pem {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Tls")
            .field("mutual", &self.is_mutual())
            .field("client_principals", &self.client_principals)
            .field("from_files", &self.files.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Self {
        let pem = Pem {
            cert: cert.to_vec(),
            key: key.to_vec(),
            client_ca: client_ca.map(<[u8]>::to_vec),
        };
        Self { pem: Arc::new(pem), files: None, client_principals: false }
    }

    /// A client's certificate names its principal (see
    /// [`Authenticator::with_client_certificates`](crate::auth::Authenticator::with_client_certificates)),
    /// as a bearer token does; mutual TLS only.
    pub fn with_client_principals(mut self) -> anyhow::Result<Self> {
        anyhow::ensure!(
            self.is_mutual(),
            "client certificates can name principals only with mutual TLS (a client CA)"
        );
        self.client_principals = true;
        Ok(self)
    }

    /// Whether client certificates name principals.
    pub fn client_principals(&self) -> bool {
        self.client_principals
    }

    /// Reads the PEM files (`client_ca`: require client certificates it
    /// signed); a server reads them again every [`RELOAD_EVERY`].
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Self> {
        let files =
            Files { cert: cert.into(), key: key.into(), client_ca: client_ca.map(Into::into) };
        let pem = files.read()?;
        Ok(Self { pem: Arc::new(pem), files: Some(Arc::new(files)), client_principals: false })
    }

    /// From the certificate, key, client CA and client principals flags of
    /// a server; `None` without a certificate (the flags' `requires` pair
    /// cert and key).
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
        client_principals: bool,
    ) -> anyhow::Result<Option<Self>> {
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => Self::load(cert, key, client_ca)?,
            (None, None) if client_principals => {
                anyhow::bail!("client certificates can name principals only with mutual TLS")
            }
            (None, None) => return Ok(None),
            _ => anyhow::bail!("a TLS certificate and its key go together"),
        };
        Ok(Some(if client_principals { tls.with_client_principals()? } else { tls }))
    }

    /// Whether clients must show a certificate.
    pub fn is_mutual(&self) -> bool {
        self.pem.client_ca.is_some()
    }

    /// What makes TLS connections of accepted ones; fails if the
    /// certificate, key or client CA is not valid PEM, or the key is not
    /// the certificate's. Read from files, they are read again every
    /// [`RELOAD_EVERY`] (inside a tokio runtime) for as long as the
    /// acceptor lives; one that fails to load is logged and the last good
    /// one kept.
    pub fn acceptor(&self) -> anyhow::Result<Acceptor> {
        let acceptor = Acceptor { current: Arc::new(RwLock::new(self.pem.config()?)) };
        if let Some(files) = &self.files {
            let (current, last) = (Arc::downgrade(&acceptor.current), (*self.pem).clone());
            tokio::spawn(follow(current, files.clone(), last));
        }
        Ok(acceptor)
    }
}

impl Files {
    fn read(&self) -> anyhow::Result<Pem> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read the TLS {what} {}: {e}", path.display()))
        };
        let client_ca =
            self.client_ca.as_deref().map(|path| read(path, "client CA")).transpose()?;
        Ok(Pem { cert: read(&self.cert, "certificate")?, key: read(&self.key, "key")?, client_ca })
    }
}

impl Pem {
    fn config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let invalid =
                    |e: &dyn std::fmt::Display| anyhow::anyhow!("invalid TLS client CA: {e}");
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots.add(cert.map_err(|e| invalid(&e))?).map_err(|e| invalid(&e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| invalid(&e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let invalid =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("invalid TLS certificate or key: {e}");
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&e))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "invalid TLS certificate or key: no certificate in the PEM"
        );
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| invalid(&e))?;
        let mut config = builder.with_single_cert(certs, key).map_err(|e| invalid(&e))?;
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(Arc::new(config))
    }
}

/// Makes TLS connections with a server's current certificate.
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

/// Reads the files every [`RELOAD_EVERY`] until the acceptor is gone,
/// taking what changed when it loads.
async fn follow(current: Weak<RwLock<Arc<ServerConfig>>>, files: Arc<Files>, mut last: Pem) {
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Some(current) = current.upgrade() else { return };
        let pem = match files.read() {
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
                tracing::info!(cert = %files.cert.display(), "TLS certificate loaded again: new connections get it");
            }
            // A certificate and key written one after the other match
            // again at the next look.
            Err(e) => tracing::warn!(error = %e, "keeping the TLS certificate loaded before"),
        }
        last = pem;
    }
}
