//! Authentication (docs/design.md, "Security"), shared by the exchange and the
//! launcher: a tokens file names the principal behind each token, and with
//! mutual TLS a client certificate can name it too; an interceptor turns a
//! call's `authorization: Bearer <token>`, or else its client certificate,
//! into that principal, or refuses the call with `UNAUTHENTICATED`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::Duration;

use tonic::{Request, Status};

use academy_proto::ExchangeError;

/// Shortest token accepted: anything shorter can be guessed.
const MIN_TOKEN_CHARS: usize = 16;

/// Who made a call, as its token or certificate says. Put in the request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(pub Arc<str>);

impl Principal {
    /// The principal of a call that passed [`Authenticator`]; `None` when the
    /// server does not authenticate.
    pub fn of<T>(request: &Request<T>) -> Option<Arc<str>> {
        request.extensions().get::<Self>().map(|p| p.0.clone())
    }
}

/// Token → principal, read from a file of `principal token` lines (blank
/// lines are skipped; `#` at the start of a line or after a space starts a
/// comment). Several tokens may name one
/// principal, so a token can be rotated without downtime.
///
/// Tokens loaded from a file follow it: a server reads it again every
/// [`RELOAD_EVERY`] (or as set by [`Tokens::reload_every`]) and, if it
/// changed and parses, uses the new tokens; if it does not parse, it keeps the
/// old ones and logs why. A Kubernetes Secret mounted as a volume is updated
/// in place, so tokens rotate without restarting anything.
#[derive(Clone, PartialEq, Eq)]
pub struct Tokens {
    map: HashMap<String, Principal>,
    /// The [`fingerprint`]s of the tokens and their principals.
    fingerprints: HashSet<String>,
    /// The file they came from, and how often to look at it again.
    source: Option<(PathBuf, Duration)>,
}

/// How often a tokens file is read again, by default.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens themselves.
        f.debug_struct("Tokens")
            .field("principals", &self.principals())
            .field("source", &self.source)
            .finish()
    }
}

impl Tokens {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read tokens file {}: {e}", path.display()))?;
        let tokens = Self::parse(&text)
            .map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?;
        Ok(Self { source: Some((path.to_owned(), RELOAD_EVERY)), ..tokens })
    }

    /// Tokens from a file, read again this often (see [`Tokens`]).
    pub fn reload_every(mut self, every: Duration) -> Self {
        if let Some((_, interval)) = &mut self.source {
            *interval = every;
        }
        self
    }

    /// The principals named, sorted, each once.
    pub fn principals(&self) -> Vec<&str> {
        let mut principals: Vec<&str> = self.map.values().map(|p| &*p.0).collect();
        principals.sort_unstable();
        principals.dedup();
        principals
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = HashMap::new();
        for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, uncommented(l))) {
            if line.is_empty() {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let [principal, token] = words[..] else {
                return Err(format!(
                    "line {number}: expected `principal token`, found {} words",
                    words.len()
                ));
            };
            if token.chars().count() < MIN_TOKEN_CHARS {
                return Err(format!(
                    "line {number}: the token of {principal:?} is shorter than {MIN_TOKEN_CHARS} characters"
                ));
            }
            if !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(format!(
                    "line {number}: the token of {principal:?} has characters a header can't carry"
                ));
            }
            let principal = Principal(principal.into());
            if tokens.insert(token.to_owned(), principal).is_some() {
                return Err(format!("line {number}: this token is listed twice"));
            }
        }
        if tokens.is_empty() {
            return Err("no tokens: every call would be refused".into());
        }
        let fingerprints = tokens.iter().map(|(token, p)| fingerprint(&p.0, token)).collect();
        Ok(Self { map: tokens, fingerprints, source: None })
    }
}

/// What something that outlives a call (a direct-delivery ticket) keeps of
/// the token it was granted to: a digest of the token and its principal
/// (the token itself is not kept). It stops matching once the tokens
/// file no longer grants that principal that token
/// ([`Authenticator::still_grants`]).
fn fingerprint(principal: &str, token: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(principal)
        .chain_update([0])
        .chain_update(token)
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// `line` without its comment (from a `#` at its start or after whitespace:
/// a token may hold `#`), trimmed.
fn uncommented(line: &str) -> &str {
    let mut previous = ' ';
    let end = line
        .char_indices()
        .find(|(_, c)| {
            let comment = *c == '#' && previous.is_whitespace();
            previous = *c;
            comment
        })
        .map_or(line.len(), |(i, _)| i);
    line[..end].trim()
}

/// `stream`, ended with `UNAUTHENTICATED` once `grant` (the call's, if it
/// came with a token) is revoked: an open stream lasts no longer than the
/// token that opened it.
pub fn until_revoked<S, T>(
    stream: S,
    grant: Option<Grant>,
) -> impl futures::Stream<Item = Result<T, Status>> + Send + 'static
where
    S: futures::Stream<Item = Result<T, Status>> + Send + 'static,
    T: Send + 'static,
{
    use futures::StreamExt as _;
    let revoked: futures::future::BoxFuture<'static, ()> = match grant {
        Some(grant) => Box::pin(grant.revoked()),
        None => Box::pin(std::future::pending()),
    };
    let state = (Box::pin(stream), revoked, false);
    futures::stream::unfold(state, |(mut stream, mut revoked, ended)| async move {
        if ended {
            return None;
        }
        tokio::select! {
            () = &mut revoked => {
                let revoked_now = denied("the token that opened this stream was revoked");
                Some((Err(revoked_now), (stream, revoked, true)))
            }
            item = stream.next() => item.map(|item| (item, (stream, revoked, false))),
        }
    })
}

/// A tonic interceptor: with tokens, every call must carry a known bearer
/// token, whose principal it adds to the request; with client certificates
/// ([`with_client_certificates`](Self::with_client_certificates)), a call
/// without a token is its certificate's principal; with neither, calls pass
/// as they are (no principal: the server trusts its network).
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: Option<Arc<Shared>>,
    client_certificates: bool,
}

/// The tokens in use, and a signal each time they change.
#[derive(Debug)]
struct Shared {
    tokens: RwLock<Tokens>,
    changed: tokio::sync::watch::Sender<()>,
}

/// What a bearer token granted a call: for a stream that lasts, a way to
/// end it once the token is revoked (gone from the tokens file, or naming
/// another principal). Put in the request's extensions.
#[derive(Debug, Clone)]
pub struct Grant {
    shared: Arc<Shared>,
    token: Arc<str>,
    principal: Principal,
}

impl Grant {
    /// The grant of a call that passed [`Authenticator`] with a token.
    pub fn of<T>(request: &Request<T>) -> Option<Self> {
        request.extensions().get::<Self>().cloned()
    }

    /// The token's fingerprint, for [`Authenticator::still_grants`] to
    /// answer later, on any replica reading the same tokens file.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.principal.0, &self.token)
    }

    /// Completes once the token no longer grants this principal (it never
    /// does while the token stays).
    pub async fn revoked(self) {
        // Watching first, then looking: a change between the call's check
        // and this future's first poll is not missed.
        let mut changes = self.shared.changed.subscribe();
        loop {
            {
                let tokens = self.shared.tokens.read().unwrap_or_else(PoisonError::into_inner);
                if tokens.map.get(&*self.token) != Some(&self.principal) {
                    return;
                }
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

impl Authenticator {
    /// Checks calls against `tokens`; if they came from a file, follows it
    /// (see [`Tokens`]) for as long as a clone of this authenticator lives.
    /// Must be called inside a tokio runtime when they came from a file.
    pub fn new(tokens: Option<Tokens>) -> Self {
        let source = tokens.as_ref().and_then(|t| t.source.clone());
        let tokens = tokens.map(|t| {
            Arc::new(Shared {
                tokens: RwLock::new(t),
                changed: tokio::sync::watch::Sender::new(()),
            })
        });
        if let (Some(shared), Some((path, every))) = (&tokens, source) {
            tokio::spawn(follow(Arc::downgrade(shared), path, every));
        }
        Self { tokens, client_certificates: false }
    }

    /// Also takes a call's principal from its client certificate (mutual
    /// TLS): its first URI subject alternative name (a SPIFFE id, say), else
    /// its first DNS name. A bearer token, when the call has one, wins.
    pub fn with_client_certificates(mut self, on: bool) -> Self {
        self.client_certificates = on;
        self
    }

    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some() || self.client_certificates
    }

    /// Whether the tokens in use still grant the token of `fingerprint`
    /// ([`Grant::fingerprint`]) to the principal it was granted to.
    pub fn still_grants(&self, fingerprint: &str) -> bool {
        self.tokens.as_ref().is_some_and(|shared| {
            let tokens = shared.tokens.read().unwrap_or_else(PoisonError::into_inner);
            tokens.fingerprints.contains(fingerprint)
        })
    }
}

fn denied(why: &str) -> Status {
    Status::from(ExchangeError::Unauthenticated(why.to_owned()))
}

/// What bearer token `header` (`Bearer <token>`) grants.
fn token_grant(
    shared: &Arc<Shared>,
    header: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
) -> Result<Grant, Status> {
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .ok_or_else(|| denied("the authorization header is not `Bearer <token>`"))?
        .trim();
    let tokens = shared.tokens.read().unwrap_or_else(PoisonError::into_inner);
    let principal = tokens.map.get(token).cloned().ok_or_else(|| denied("unknown bearer token"))?;
    Ok(Grant { shared: shared.clone(), token: token.into(), principal })
}

/// The principal a call's client certificate names (already verified by
/// the TLS handshake against the server's client CA).
fn certificate_principal(request: &Request<()>) -> Result<Principal, Status> {
    let info = request.extensions().get::<crate::listen::ConnectInfo>();
    let certs = info.and_then(|i| i.peer_certs.clone()).ok_or_else(|| {
        denied("this server needs a client certificate (mutual TLS) or a bearer token")
    })?;
    let leaf = certs.first().ok_or_else(|| denied("no client certificate was presented"))?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| denied(&format!("cannot read the client certificate: {e:?}")))?;
    let name = cert.valid_uri_names().next().or_else(|| cert.valid_dns_names().next());
    let name = name.ok_or_else(|| {
        denied(
            "the client certificate names no principal: give it a URI or DNS subject alternative name",
        )
    })?;
    Ok(Principal(name.into()))
}

/// Reads the tokens file every `every`, until the authenticator is gone,
/// taking its tokens when the file changed and still parses.
async fn follow(tokens: Weak<Shared>, path: PathBuf, every: Duration) {
    let mut last = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = tokens.upgrade() else { return };
        let text = match std::fs::read(&path) {
            Ok(text) if Some(&text) == last.as_ref() => continue,
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the tokens file; keeping the tokens in use");
                continue;
            }
        };
        match Tokens::parse(&String::from_utf8_lossy(&text)) {
            Ok(fresh) => {
                let principals = fresh.principals().len();
                let fresh = Tokens { source: Some((path.clone(), every)), ..fresh };
                *shared.tokens.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                shared.changed.send_replace(());
                tracing::info!(path = %path.display(), principals, "tokens file changed; new tokens in use");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the tokens file changed but is not valid; keeping the tokens in use");
            }
        }
        last = Some(text);
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if !self.is_enabled() {
            return Ok(request);
        }
        let header = request.metadata().get("authorization");
        let principal = match (&self.tokens, header) {
            (Some(tokens), Some(header)) => {
                let grant = token_grant(tokens, header)?;
                let principal = grant.principal.clone();
                request.extensions_mut().insert(grant);
                principal
            }
            _ if self.client_certificates => certificate_principal(&request)?,
            _ => {
                return Err(denied(
                    "this server needs a bearer token: send the header `authorization: Bearer <token>`",
                ));
            }
        };
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor as _;

    use super::*;

    const ALICE: &str = "alice-0123456789abcdef";

    fn call(auth: &mut Authenticator, header: Option<&str>) -> Result<Option<Arc<str>>, Status> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request.metadata_mut().insert("authorization", value.parse().unwrap());
        }
        auth.call(request).map(|r| Principal::of(&r))
    }

    #[test]
    fn tokens_files_parse_and_bad_ones_say_which_line() {
        let tokens = Tokens::parse(&format!(
            "# who\n\nalice {ALICE}   # the first\n bob  bob-0123456789abcdef \nalice alice-second#token-xyz\n"
        ))
        .unwrap();
        assert_eq!(tokens.map.len(), 3);
        assert_eq!(tokens.map[ALICE], Principal("alice".into()));
        assert!(!format!("{tokens:?}").contains(ALICE), "Debug must not show tokens");
        for (text, expected) in [
            ("alice\n", "line 1: expected `principal token`, found 1 words"),
            ("# c\nalice short\n", "line 2: the token of \"alice\" is shorter than 16 characters"),
            (&format!("a {ALICE}\nb {ALICE}\n"), "line 2: this token is listed twice"),
            ("# nobody\n", "no tokens: every call would be refused"),
        ] {
            assert_eq!(Tokens::parse(text).unwrap_err(), expected);
        }
    }

    #[test]
    fn the_tokens_file_of_the_docs_parses() {
        let docs = include_str!("../../docs/security.md");
        let start = docs.find("cat > tokens <<'END'\n").expect("the docs show a tokens file");
        let file = &docs[start..].split_once('\n').unwrap().1;
        let file = &file[..file.find("END\n").unwrap()];
        let tokens = Tokens::parse(file).unwrap();
        assert_eq!(tokens.principals(), ["alice", "system"]);
    }

    #[test]
    fn calls_need_a_known_bearer_token() {
        let mut open = Authenticator::default();
        assert_eq!(call(&mut open, None).unwrap(), None);
        let mut auth = Authenticator::new(Some(Tokens::parse(&format!("alice {ALICE}")).unwrap()));
        assert_eq!(
            call(&mut auth, Some(&format!("Bearer {ALICE}"))).unwrap().as_deref(),
            Some("alice")
        );
        for header in [None, Some("Basic abc"), Some("Bearer nope-nope-nope-nope")] {
            let status = call(&mut auth, header).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
        }
    }

    /// A fingerprint stays good while its token grants the same principal,
    /// and no longer once the token is gone or names another.
    #[test]
    fn a_fingerprint_holds_while_its_token_grants_its_principal() {
        let alice = |text: &str| Authenticator::new(Some(Tokens::parse(text).unwrap()));
        let mut auth = alice(&format!("alice {ALICE}"));
        let mut request = Request::new(());
        request.metadata_mut().insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
        let grant = Grant::of(&auth.call(request).unwrap()).unwrap();
        let print = grant.fingerprint();
        assert!(!print.contains(ALICE) && print.len() == 32, "{print}");
        assert!(auth.still_grants(&print));
        assert!(alice(&format!("bob bob-0123456789abcdef\nalice {ALICE}")).still_grants(&print));
        assert!(!alice("alice alice-rotated-0123456789").still_grants(&print));
        assert!(!alice(&format!("mallory {ALICE}")).still_grants(&print));
        assert!(!Authenticator::default().still_grants(&print));
    }

    #[test]
    fn with_client_certificates_a_call_without_a_token_needs_a_certificate() {
        let mut certs = Authenticator::default().with_client_certificates(true);
        assert!(certs.is_enabled());
        // A token means nothing to a server without tokens.
        for header in [None, Some(format!("Bearer {ALICE}"))] {
            let status = call(&mut certs, header.as_deref()).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
            assert!(status.message().contains("client certificate"), "{}", status.message());
        }
    }
}
