//! TLS and mutual TLS for Academy's servers, shared by the exchange and the
//! launcher (docs/design.md, "Security"): [`academy_tls`], and whether
//! client certificates name principals. Certificate files are read again
//! when they change (a certificate renewed by cert-manager, say).

use std::path::Path;

use academy_tls::ServerTls;
pub use academy_tls::{Acceptor, RELOAD_EVERY};

/// A server's certificate and key, and with mutual TLS the CA its clients'
/// certificates must chain to, and whether those certificates name the
/// clients' principals.
#[derive(Debug, Clone)]
pub struct Tls {
    tls: ServerTls,
    client_principals: bool,
}

impl Tls {
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Self {
        let tls = ServerTls::from_pem(cert, key);
        let tls = match client_ca {
            Some(ca) => tls.with_client_ca_pem(ca),
            None => tls,
        };
        Self { tls, client_principals: false }
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
        let tls = ServerTls::from_files(cert, key)?;
        let tls = match client_ca {
            Some(ca) => tls.with_client_ca_file(ca),
            None => tls,
        };
        Ok(Self { tls, client_principals: false })
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
        self.tls.is_mutual()
    }

    /// What makes TLS connections of accepted ones (see
    /// [`ServerTls::acceptor`]): files are read again every
    /// [`RELOAD_EVERY`] while it lives.
    pub fn acceptor(&self) -> anyhow::Result<Acceptor> {
        Ok(self.tls.acceptor()?)
    }
}
