//! What the SDK shows Academy's services to say who it is: a bearer token,
//! for servers started with `--tokens-file` (DESIGN.md, "Security").

use std::fmt;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::ClientError;

/// The environment variable [`Credentials::from_env`] reads.
pub const TOKEN_ENV: &str = "ACADEMY_TOKEN";

/// A bearer token sent with every call, or nothing. `connect` functions use
/// [`Credentials::from_env`]; the `connect_with` ones take them explicitly.
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
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.authorization {
            Some(_) => f.write_str("Credentials(bearer ***)"),
            None => f.write_str("Credentials(none)"),
        }
    }
}

impl Credentials {
    /// No token: for servers that do not authenticate.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn bearer(token: &str) -> Result<Self, ClientError> {
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            ClientError::Transport("the bearer token has characters a header can't carry".into())
        })?;
        Ok(Self { authorization: Some(value) })
    }

    /// The token in `ACADEMY_TOKEN`, or none when it is unset or empty.
    pub fn from_env() -> Result<Self, ClientError> {
        match std::env::var(TOKEN_ENV) {
            Ok(token) if !token.trim().is_empty() => Self::bearer(&token)
                .map_err(|e| ClientError::Transport(format!("{TOKEN_ENV}: {e}"))),
            _ => Ok(Self::none()),
        }
    }

    /// `channel`, sending these credentials with every call: for the
    /// generated clients, e.g. `ExchangeClient::new(credentials.on(channel))`.
    pub fn on(&self, channel: Channel) -> Authorized {
        InterceptedService::new(channel, self.clone())
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
