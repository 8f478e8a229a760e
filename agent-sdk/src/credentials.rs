//! What the SDK shows Academy's services to say who it is, and how it knows
//! them: a bearer token, for servers started with `--tokens-file`, and for
//! `https://` URLs the CA to trust and a client certificate for mutual TLS
//! (docs/design.md, "Security"). TLS needs the crate's `tls` feature.

use std::fmt;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::ClientError;
use crate::error::describe;

/// The environment variable [`Credentials::from_env`] reads the token from.
pub const TOKEN_ENV: &str = "ACADEMY_TOKEN";
/// The environment variable naming the PEM file of the CA to trust for
/// `https://` URLs (instead of the public web roots).
pub const TLS_CA_ENV: &str = "ACADEMY_TLS_CA";
/// The environment variable naming the PEM file of the client certificate
/// (mutual TLS), with [`TLS_KEY_ENV`].
pub const TLS_CERT_ENV: &str = "ACADEMY_TLS_CERT";
/// The environment variable naming the PEM file of the client certificate's key.
pub const TLS_KEY_ENV: &str = "ACADEMY_TLS_KEY";

/// See [`Credentials::tls_parts`].
pub(crate) type TlsParts = (Option<Arc<[u8]>>, Option<Arc<(Vec<u8>, Vec<u8>)>>);

/// A bearer token sent with every call (or none), and the TLS settings of
/// `https://` URLs. `connect` functions use [`Credentials::from_env`]; the
/// `connect_with` ones take them explicitly.
///
/// ```
/// # fn demo() -> Result<(), academy_sdk::ClientError> {
/// let alice = academy_sdk::Credentials::bearer("alice-0123456789abcdef")?;
/// assert!(format!("{alice:?}").contains("bearer"));
/// assert!(!format!("{alice:?}").contains("alice-0123")); // never printed
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
    /// PEM of the CA to trust. Shared, as are the certificate and key:
    /// the credentials are cloned with every client of a channel (each call,
    /// each peer connection).
    ca: Option<Arc<[u8]>>,
    /// PEM of the client certificate and its key.
    identity: Option<Arc<(Vec<u8>, Vec<u8>)>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = if self.authorization.is_some() { "bearer ***" } else { "none" };
        f.debug_struct("Credentials")
            .field("token", &token)
            .field("tls_ca", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl Credentials {
    /// No token: for servers that do not authenticate.
    pub fn none() -> Self {
        Self::default()
    }

    /// A bearer token (for servers started with `--tokens-file`).
    pub fn bearer(token: &str) -> Result<Self, ClientError> {
        Self::none().with_token(token)
    }

    /// These credentials, with a bearer token.
    pub fn with_token(mut self, token: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            ClientError::Transport("the bearer token has characters a header can't carry".into())
        })?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// These credentials, trusting servers whose certificate `ca_pem` signed.
    pub fn with_tls_ca(mut self, ca_pem: &[u8]) -> Self {
        self.ca = Some(ca_pem.into());
        self
    }

    /// These credentials, showing this client certificate (mutual TLS).
    pub fn with_client_certificate(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Self {
        self.identity = Some(Arc::new((cert_pem.to_vec(), key_pem.to_vec())));
        self
    }

    /// These credentials without the token: what peer endpoints are shown,
    /// which check tickets instead (a token is for the exchange alone).
    pub(crate) fn for_peers(&self) -> Self {
        Self { authorization: None, ..self.clone() }
    }

    /// What a connection is made with (the CA trusted, the certificate
    /// shown), compared by content: connections kept for reuse are kept
    /// by it, so that no one uses a connection made as someone else.
    pub(crate) fn tls_parts(&self) -> TlsParts {
        (self.ca.clone(), self.identity.clone())
    }

    /// From the environment: the token in `ACADEMY_TOKEN`, and the PEM files
    /// named by `ACADEMY_TLS_CA`, `ACADEMY_TLS_CERT` and `ACADEMY_TLS_KEY`;
    /// each unset or empty variable adds nothing.
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let read = |name: &str| -> Result<Option<Vec<u8>>, ClientError> {
            var(name)
                .map(|path| {
                    std::fs::read(&path).map_err(|e| {
                        ClientError::Transport(format!("{name}: cannot read {path}: {e}"))
                    })
                })
                .transpose()
        };
        let mut credentials = Self::none();
        if let Some(token) = var(TOKEN_ENV) {
            credentials = credentials
                .with_token(&token)
                .map_err(|e| ClientError::Transport(format!("{TOKEN_ENV}: {e}")))?;
        }
        if let Some(ca) = read(TLS_CA_ENV)? {
            credentials = credentials.with_tls_ca(&ca);
        }
        match (read(TLS_CERT_ENV)?, read(TLS_KEY_ENV)?) {
            (Some(cert), Some(key)) => Ok(credentials.with_client_certificate(&cert, &key)),
            (None, None) => Ok(credentials),
            _ => Err(ClientError::Transport(format!(
                "{TLS_CERT_ENV} and {TLS_KEY_ENV} go together: set both or neither"
            ))),
        }
    }

    /// An endpoint for `url`: TLS (with these settings) when it is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ClientError> {
        if let Some(path) = unix_path(url) {
            if path.is_empty() {
                return Err(ClientError::Transport(format!(
                    "bad url {url:?}: unix: needs a path, as in unix:/run/academy.sock"
                )));
            }
            // The authority is not used: connections go to the socket.
            return Ok(Endpoint::from_static("http://localhost"));
        }
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| ClientError::Transport(format!("bad url {url:?}: {}", describe(&e))))?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        self.tls(endpoint, url)
    }

    #[cfg(feature = "tls")]
    fn tls(&self, endpoint: Endpoint, url: &str) -> Result<Endpoint, ClientError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
            None => tls.with_webpki_roots(),
        };
        if let Some((cert, key)) = self.identity.as_deref() {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint.tls_config(tls).map_err(|e| {
            ClientError::Transport(format!("invalid TLS settings for {url:?}: {}", describe(&e)))
        })
    }

    #[cfg(not(feature = "tls"))]
    fn tls(&self, _endpoint: Endpoint, url: &str) -> Result<Endpoint, ClientError> {
        Err(ClientError::Transport(format!(
            "{url:?} needs TLS, which this program was built without: enable the `tls` feature of academy-sdk"
        )))
    }

    /// A connection to the service at `url` whose calls carry these
    /// credentials: for the generated clients, e.g.
    /// `LauncherServiceClient::new(credentials.connect(url).await?)`.
    pub async fn connect(&self, url: &str) -> Result<Authorized, ClientError> {
        Ok(self.on(open(self.endpoint(url)?, url).await?))
    }

    /// `channel`, sending these credentials with every call: for the
    /// generated clients, e.g. `ExchangeServiceClient::new(credentials.on(channel))`.
    pub fn on(&self, channel: Channel) -> Authorized {
        InterceptedService::new(channel, self.clone())
    }
}

/// The socket a `unix:/path` URL names.
fn unix_path(url: &str) -> Option<&str> {
    url.strip_prefix("unix:")
}

/// Connects `endpoint` (from [`Credentials::endpoint`] for `url`): over the
/// Unix socket a `unix:/path` URL names, over TCP otherwise.
pub async fn open(endpoint: Endpoint, url: &str) -> Result<Channel, ClientError> {
    let opened = match unix_path(url) {
        Some(path) => endpoint.connect_with_connector(unix_connector(path)).await,
        None => endpoint.connect().await,
    };
    opened.map_err(|e| ClientError::Transport(format!("cannot connect to {url}: {}", describe(&e))))
}

/// [`open`], connecting on first use and again whenever the connection drops.
pub fn open_lazy(endpoint: Endpoint, url: &str) -> Channel {
    match unix_path(url) {
        Some(path) => endpoint.connect_with_connector_lazy(unix_connector(path)),
        None => endpoint.connect_lazy(),
    }
}

fn unix_connector(
    path: &str,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let path = std::path::PathBuf::from(path);
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move { Ok(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    })
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry [`Credentials`].
pub type Authorized = InterceptedService<Channel, Credentials>;
