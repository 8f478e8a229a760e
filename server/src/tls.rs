//! TLS and mutual TLS for Academy's servers (rustls, via tonic), shared by the
//! exchange and the launcher (docs/design.md, "Security").

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A server's certificate and key, and with mutual TLS the CA its clients'
/// certificates must chain to, and whether those certificates name the
/// clients' principals. All PEM.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    client_ca: Option<Certificate>,
    client_principals: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Tls")
            .field("mutual", &self.client_ca.is_some())
            .field("client_principals", &self.client_principals)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Self {
        Self {
            identity: Identity::from_pem(cert, key),
            client_ca: client_ca.map(Certificate::from_pem),
            client_principals: false,
        }
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

    /// Reads the PEM files (`client_ca`: require client certificates it signed).
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Self> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read the TLS {what} {}: {e}", path.display()))
        };
        let client_ca = client_ca.map(|path| read(path, "client CA")).transpose()?;
        Ok(Self::from_pem(&read(cert, "certificate")?, &read(key, "key")?, client_ca.as_deref()))
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
        self.client_ca.is_some()
    }

    /// A server builder serving TLS; fails if the certificate or key is not
    /// valid PEM or they don't match.
    pub fn server(&self) -> anyhow::Result<tonic::transport::Server> {
        let mut config = ServerTlsConfig::new().identity(self.identity.clone());
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(ca.clone());
        }
        tonic::transport::Server::builder()
            .tls_config(config)
            .map_err(|e| anyhow::anyhow!("invalid TLS certificate or key: {}", source_chain(&e)))
    }
}

/// `err` and its causes, as one line.
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// A server builder: with TLS when `tls` is given, plaintext otherwise.
pub fn server_builder(tls: Option<&Tls>) -> anyhow::Result<tonic::transport::Server> {
    match tls {
        Some(tls) => tls.server(),
        None => Ok(tonic::transport::Server::builder()),
    }
}
