//! What the SDK shows Academy's services to say who it is, and how it knows
//! them: a bearer token, for servers started with `--tokens-file`, and for
//! `https://` URLs the CA to trust and a client certificate for mutual TLS
//! (docs/design.md, "Security"). TLS needs the crate's `tls` feature. PEM
//! files are read again at each new connection, so a renewed certificate
//! is shown without a restart.

use std::fmt;
use std::path::Path;
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
pub(crate) type TlsParts = (Option<Pem>, Option<(Pem, Pem)>);

/// Where a PEM comes from: given, or a file read at each connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Pem {
    Given(Arc<[u8]>),
    File(Arc<Path>),
}

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
    /// The CA to trust. Shared, as are the certificate and key: the
    /// credentials are cloned with every client of a channel (each call,
    /// each peer connection).
    ca: Option<Pem>,
    /// The client certificate and its key.
    identity: Option<(Pem, Pem)>,
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
        self.ca = Some(Pem::Given(ca_pem.into()));
        self
    }

    /// These credentials, trusting servers whose certificate the CA in this
    /// PEM file signed; the file is read at each new connection.
    pub fn with_tls_ca_file(mut self, ca: &Path) -> Self {
        self.ca = Some(Pem::File(ca.into()));
        self
    }

    /// These credentials, showing this client certificate (mutual TLS).
    pub fn with_client_certificate(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Self {
        self.identity = Some((Pem::Given(cert_pem.into()), Pem::Given(key_pem.into())));
        self
    }

    /// These credentials, showing the client certificate and key in these
    /// PEM files (mutual TLS), read at each new connection: a renewed
    /// certificate is shown without a restart.
    pub fn with_client_certificate_files(mut self, cert: &Path, key: &Path) -> Self {
        self.identity = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// These credentials without the token: what peer endpoints are shown,
    /// which check tickets instead (a token is for the exchange alone).
    pub(crate) fn for_peers(&self) -> Self {
        Self { authorization: None, ..self.clone() }
    }

    /// What a connection is made with (the CA trusted, the certificate
    /// shown), compared by content or by file: connections kept for reuse
    /// are kept by it, so that no one uses a connection made as someone
    /// else.
    pub(crate) fn tls_parts(&self) -> TlsParts {
        (self.ca.clone(), self.identity.clone())
    }

    /// From the environment: the token in `ACADEMY_TOKEN`, and the PEM files
    /// named by `ACADEMY_TLS_CA`, `ACADEMY_TLS_CERT` and `ACADEMY_TLS_KEY`
    /// (read now, to fail early, and again at each new connection); each
    /// unset or empty variable adds nothing.
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let read = |name: &str| -> Result<Option<std::path::PathBuf>, ClientError> {
            var(name)
                .map(|path| match std::fs::metadata(&path) {
                    Ok(_) => Ok(path.into()),
                    Err(e) => {
                        Err(ClientError::Transport(format!("{name}: cannot read {path}: {e}")))
                    }
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
            credentials = credentials.with_tls_ca_file(&ca);
        }
        match (read(TLS_CERT_ENV)?, read(TLS_KEY_ENV)?) {
            (Some(cert), Some(key)) => Ok(credentials.with_client_certificate_files(&cert, &key)),
            (None, None) => Ok(credentials),
            _ => Err(ClientError::Transport(format!(
                "{TLS_CERT_ENV} and {TLS_KEY_ENV} go together: set both or neither"
            ))),
        }
    }

    /// The settings of a channel to `url`, for [`Credentials::open`] and
    /// [`Credentials::open_lazy`], which make its connections: over TLS with
    /// these settings for an `https://` URL (checked here), over the socket
    /// of a `unix:/path` one.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ClientError> {
        let bad = |e: tonic::transport::Error| {
            ClientError::Transport(format!("bad url {url:?}: {}", describe(&e)))
        };
        if let Some(path) = unix_path(url) {
            if path.is_empty() {
                return Err(ClientError::Transport(format!(
                    "bad url {url:?}: unix: needs a path, as in unix:/run/academy.sock"
                )));
            }
            // The authority is not used: connections go to the socket.
            return Ok(Endpoint::from_static("http://localhost"));
        }
        let Some(rest) = url.strip_prefix("https://") else {
            return Endpoint::from_shared(url.to_owned()).map_err(bad);
        };
        self.tls(url)?;
        // The connector makes the TLS connection (`open`); requests still
        // name the `https` origin.
        let origin =
            url.parse().map_err(|e| ClientError::Transport(format!("bad url {url:?}: {e}")))?;
        Ok(Endpoint::from_shared(format!("http://{rest}")).map_err(bad)?.origin(origin))
    }

    /// What makes TLS connections to `url` with these settings.
    #[cfg(feature = "tls")]
    fn tls(&self, url: &str) -> Result<tls::Connector, ClientError> {
        tls::Connector::new(self, url)
    }

    #[cfg(not(feature = "tls"))]
    fn tls(&self, url: &str) -> Result<std::convert::Infallible, ClientError> {
        Err(ClientError::Transport(format!(
            "{url:?} needs TLS, which this program was built without: enable the `tls` feature of academy-sdk"
        )))
    }

    /// A connection to the service at `url` whose calls carry these
    /// credentials: for the generated clients, e.g.
    /// `LauncherServiceClient::new(credentials.connect(url).await?)`.
    pub async fn connect(&self, url: &str) -> Result<Authorized, ClientError> {
        Ok(self.on(self.open(self.endpoint(url)?, url).await?))
    }

    /// Connects `endpoint` (from [`Credentials::endpoint`] for `url`): over
    /// the Unix socket a `unix:/path` URL names, over TLS for `https://`
    /// (PEM files read again at each connection), over TCP otherwise.
    pub async fn open(&self, endpoint: Endpoint, url: &str) -> Result<Channel, ClientError> {
        let opened = match unix_path(url) {
            Some(path) => endpoint.connect_with_connector(unix_connector(path)).await,
            #[cfg(feature = "tls")]
            None if url.starts_with("https://") => {
                endpoint.connect_with_connector(self.tls(url)?.service()).await
            }
            None => endpoint.connect().await,
        };
        opened.map_err(|e| {
            ClientError::Transport(format!("cannot connect to {url}: {}", describe(&e)))
        })
    }

    /// [`Credentials::open`], connecting on first use and again whenever the
    /// connection drops.
    pub fn open_lazy(&self, endpoint: Endpoint, url: &str) -> Result<Channel, ClientError> {
        Ok(match unix_path(url) {
            Some(path) => endpoint.connect_with_connector_lazy(unix_connector(path)),
            #[cfg(feature = "tls")]
            None if url.starts_with("https://") => {
                endpoint.connect_with_connector_lazy(self.tls(url)?.service())
            }
            None => endpoint.connect_lazy(),
        })
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

/// TLS connections for `https://` URLs ([`academy_tls`]).
#[cfg(feature = "tls")]
mod tls {
    use academy_tls::tokio_rustls::rustls::pki_types::ServerName;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;

    use super::{ClientError, Credentials, Pem};

    impl Pem {
        fn read(&self) -> Result<Vec<u8>, ClientError> {
            match self {
                Self::Given(pem) => Ok(pem.to_vec()),
                Self::File(path) => std::fs::read(path).map_err(|e| {
                    ClientError::Transport(format!("cannot read {}: {e}", path.display()))
                }),
            }
        }
    }

    /// The host `uri` names, an IPv6 address without its brackets.
    fn host(uri: &tonic::transport::Uri) -> &str {
        uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']')
    }

    /// Makes TLS connections to one URL's server with a client's settings.
    pub(super) struct Connector {
        tls: academy_tls::Connector,
        name: ServerName<'static>,
    }

    impl Connector {
        pub(super) fn new(credentials: &Credentials, url: &str) -> Result<Self, ClientError> {
            let invalid = |why: String| {
                ClientError::Transport(format!("invalid TLS settings for {url:?}: {why}"))
            };
            let mut tls = academy_tls::ClientTls::default();
            tls = match &credentials.ca {
                Some(Pem::File(path)) => tls.with_ca_file(path),
                Some(pem) => tls.with_ca_pem(&pem.read()?),
                None => tls,
            };
            tls = match &credentials.identity {
                Some((Pem::File(cert), Pem::File(key))) => tls.with_identity_files(cert, key),
                Some((cert, key)) => tls.with_identity_pem(&cert.read()?, &key.read()?),
                None => tls,
            };
            let tls = tls.connector().map_err(|e| invalid(e.to_string()))?;
            let uri: tonic::transport::Uri = url.parse().map_err(|e| invalid(format!("{e}")))?;
            let name =
                ServerName::try_from(host(&uri).to_owned()).map_err(|e| invalid(e.to_string()))?;
            Ok(Self { tls, name })
        }

        /// A connector of channels: TCP to the endpoint's host and port,
        /// then TLS with the settings current at each connection.
        pub(super) fn service(
            self,
        ) -> impl tower::Service<
            tonic::transport::Uri,
            Response = TokioIo<academy_tls::tokio_rustls::client::TlsStream<TcpStream>>,
            Error = std::io::Error,
            Future = impl Send,
        > + Clone
        + Send
        + 'static {
            tower::service_fn(move |uri: tonic::transport::Uri| {
                let (tls, name) = (self.tls.current(), self.name.clone());
                async move {
                    let tcp =
                        TcpStream::connect((host(&uri), uri.port_u16().unwrap_or(443))).await?;
                    tcp.set_nodelay(true)?;
                    Ok(TokioIo::new(tls.connect(name, tcp).await?))
                }
            })
        }
    }
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
