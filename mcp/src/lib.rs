//! A Model Context Protocol gateway (docs/design.md, "MCP"): the actions of
//! the agents an exchange knows, as MCP tools that a language model (or any
//! MCP client) lists and calls.
//!
//! Each action of each active agent that described itself is a tool, named
//! `<behaviour>_<action>_<8 hex digits of the agent id>` with the action's
//! documentation and JSON Schemas. A call goes through the exchange like any
//! other, from a client mailbox of the gateway, with the gateway's
//! credentials: it reaches what its principal may reach. The gateway looks
//! at the exchange every [`GatewayOptions::refresh_every`] (the agents' ids;
//! each agent's description is asked for once, when it is first seen) and
//! tells its clients when tools come or go
//! (`notifications/tools/list_changed`). It
//! serves MCP on stdio ([`Gateway::serve_stdio`], for a desktop client that
//! starts it as a command) or over streamable HTTP ([`Gateway::serve_http`]).
//! Over HTTP it can call as its callers instead
//! ([`GatewayOptions::as_caller`]): each request then carries its caller's
//! own token for the exchange, which decides who may call.

use academy_proto::sync::{lock, read, write};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use academy_proto::pb::{self, exchange_service_client::ExchangeServiceClient};
use academy_sdk::codec::Codec;
use academy_sdk::credentials::Authorized;
use academy_sdk::exchange::GrpcExchange;
use academy_sdk::{ClientError, Credentials, EntityId, HandleError, Manager};
use futures::{StreamExt as _, TryStreamExt as _};
use rmcp::handler::server::ServerHandler;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ErrorData, Implementation, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::{NotificationContext, Peer, RequestContext, RoleServer};
use serde_json::{Value, json};

/// Most tools a gateway offers: agents beyond are left out (and logged).
pub const MAX_TOOLS: usize = 10_000;

/// Descriptions of newly seen agents asked for at once.
const DESCRIBES_IN_FLIGHT: usize = 16;

/// Callers kept at once with [`GatewayOptions::as_caller`], each with a
/// client mailbox of its own on the exchange: the one unused longest goes
/// when another comes.
pub const MAX_CALLERS: usize = 256;

/// New callers' tokens shown to the exchange at once; more wait.
const CALLERS_CHECKED_AT_ONCE: usize = 16;

/// How a gateway looks at the exchange and calls agents.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// How often it looks for agents that came or went.
    pub refresh_every: Duration,
    /// How long a call may take.
    pub call_timeout: Duration,
    /// Only agents implementing this behaviour (all when `None`).
    pub behaviour: Option<String>,
    /// Only agents registered by this principal (anyone's when `None`).
    pub owner: Option<String>,
    /// Over HTTP, call as each caller: every request must carry the
    /// caller's own bearer token for the exchange (`Authorization: Bearer`;
    /// 401 without one, or with one the exchange refuses), and its tool
    /// calls go with that token, from a client mailbox of that principal.
    /// Tools are still looked up with the gateway's credentials. Without
    /// it, everyone who reaches the gateway calls as the gateway.
    pub as_caller: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            refresh_every: Duration::from_secs(1),
            call_timeout: Duration::from_secs(30),
            behaviour: None,
            owner: None,
            as_caller: false,
        }
    }
}

/// The gateway: cheap to clone (each MCP session holds a clone).
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("tools", &read(&self.inner.tools).len()).finish()
    }
}

struct Inner {
    manager: Manager,
    rpc: ExchangeServiceClient<Authorized>,
    options: GatewayOptions,
    /// Tools by name.
    tools: RwLock<BTreeMap<String, Target>>,
    /// The tools of each agent seen at the last look (none for one that
    /// published no description). An agent's description is given when it
    /// registers and does not change while its mailbox lives, so it is
    /// asked for once.
    agents: Mutex<HashMap<EntityId, Arc<[Target]>>>,
    /// Clients to tell when tools change.
    peers: Mutex<Vec<Peer<RoleServer>>>,
    /// Looks at the exchange every `refresh_every`; stopped with the gateway.
    refresher: Mutex<Option<AbortOnDrop>>,
    /// The exchange, and the gateway's credentials (a caller's token
    /// replaces the gateway's own).
    url: String,
    credentials: Credentials,
    /// With `as_caller`: the callers seen lately.
    callers: Mutex<Callers>,
    checking: tokio::sync::Semaphore,
}

/// The managers that call as callers, by their bearer token.
#[derive(Default)]
struct Callers {
    by_token: HashMap<String, (Arc<Manager>, u64)>,
    /// Counts uses: a caller's is its last.
    uses: u64,
}

impl Callers {
    fn get(&mut self, token: &str) -> Option<Arc<Manager>> {
        self.uses += 1;
        let (manager, used) = self.by_token.get_mut(token)?;
        *used = self.uses;
        Some(manager.clone())
    }

    /// Keeps `manager` for `token`; answers the one that had to go.
    fn keep(&mut self, token: &str, manager: Arc<Manager>) -> Option<Arc<Manager>> {
        self.uses += 1;
        let mut gone = None;
        if self.by_token.len() >= MAX_CALLERS && !self.by_token.contains_key(token) {
            let oldest = self.by_token.iter().min_by_key(|(_, (_, used))| *used);
            let oldest = oldest.map(|(token, _)| token.clone());
            gone = oldest.and_then(|t| self.by_token.remove(&t)).map(|(m, _)| m);
        }
        let replaced = self.by_token.insert(token.to_owned(), (manager, self.uses));
        gone.or(replaced.map(|(m, _)| m))
    }
}

/// Closes a caller's client mailbox once nothing uses its manager.
fn retire(manager: Arc<Manager>) {
    if let Some(manager) = Arc::into_inner(manager) {
        tokio::spawn(async move {
            if let Err(e) = manager.close().await {
                tracing::debug!(error = %e, "cannot close a caller's mailbox");
            }
        });
    }
}

/// What a tool calls.
#[derive(Debug, Clone)]
struct Target {
    agent: EntityId,
    action: String,
    tool: Tool,
}

impl Gateway {
    /// A gateway to the exchange at `url`, calling with `credentials`; it
    /// has looked at the exchange once when this returns.
    pub async fn connect(
        url: &str,
        credentials: &Credentials,
        options: GatewayOptions,
    ) -> Result<Self, academy_sdk::ClientError> {
        let exchange = GrpcExchange::connect_with(url.to_owned(), credentials).await?;
        let manager = Manager::new(Arc::new(exchange)).await?;
        let channel = credentials.connect(url).await?;
        let rpc = ExchangeServiceClient::new(channel).max_decoding_message_size(usize::MAX);
        let inner = Arc::new(Inner {
            manager,
            rpc,
            options,
            tools: RwLock::default(),
            agents: Mutex::default(),
            peers: Mutex::default(),
            refresher: Mutex::default(),
            url: url.to_owned(),
            credentials: credentials.clone(),
            callers: Mutex::default(),
            checking: tokio::sync::Semaphore::new(CALLERS_CHECKED_AT_ONCE),
        });
        let gateway = Self { inner };
        if gateway.inner.options.as_caller {
            gateway.ensure_callers_are_checked().await?;
        }
        gateway.refresh().await?;
        let weak = Arc::downgrade(&gateway.inner);
        let every = gateway.inner.options.refresh_every;
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let gateway = Gateway { inner };
                match gateway.refresh().await {
                    Ok(true) => gateway.tell_peers().await,
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot look at the exchange"),
                }
            }
        });
        *lock(&gateway.inner.refresher) = Some(AbortOnDrop(refresher));
        Ok(gateway)
    }

    /// The names of the tools it offers now.
    pub fn tool_names(&self) -> Vec<String> {
        read(&self.inner.tools).keys().cloned().collect()
    }

    /// Serves MCP on this process's stdin and stdout until the client leaves.
    pub async fn serve_stdio(self) -> Result<(), std::io::Error> {
        use rmcp::ServiceExt as _;
        let running = self.serve(rmcp::transport::stdio()).await.map_err(std::io::Error::other)?;
        running.waiting().await.map_err(std::io::Error::other)?;
        Ok(())
    }

    /// Serves MCP over streamable HTTP at `/mcp` on `listener` until
    /// `shutdown` resolves. Requests must name a loopback host (DNS
    /// rebinding protection) unless `allowed_hosts` says more; with
    /// [`GatewayOptions::as_caller`], they must carry a token the exchange
    /// takes.
    pub async fn serve_http(
        self,
        listener: tokio::net::TcpListener,
        allowed_hosts: Vec<String>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), std::io::Error> {
        use rmcp::transport::streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        };
        let mut config = StreamableHttpServerConfig::default();
        if !allowed_hosts.is_empty() {
            config = config.with_allowed_hosts(allowed_hosts);
        }
        let gateway = self.clone();
        let service = StreamableHttpService::new(
            move || Ok(gateway.clone()),
            Arc::new(LocalSessionManager::default()),
            config,
        );
        let mut router = axum::Router::new().nest_service("/mcp", service);
        if self.inner.options.as_caller {
            router = router.layer(axum::middleware::from_fn_with_state(self, authenticate));
        }
        axum::serve(listener, router).with_graceful_shutdown(shutdown).await
    }

    /// Refuses to call as callers through an exchange that does not
    /// authenticate: it would take any token, so anyone could call.
    async fn ensure_callers_are_checked(&self) -> Result<(), ClientError> {
        let probe = format!("academy-mcp-probe-{}", EntityId::new_client().uuid().simple());
        match self.caller(&probe).await {
            Err(e) if refused_token(&e) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => {
                self.forget_caller(&probe);
                Err(ClientError::Refused {
                    code: tonic::Code::FailedPrecondition,
                    message: "the exchange does not authenticate its callers, so calling as \
                              them would let anyone in: start it with --tokens-file, or \
                              serve without as_caller"
                        .into(),
                })
            }
        }
    }

    /// The manager that calls as the caller with `token`: kept, or opened
    /// with that token (the exchange refuses one it does not know).
    async fn caller(&self, token: &str) -> Result<Arc<Manager>, ClientError> {
        if let Some(manager) = lock(&self.inner.callers).get(token) {
            return Ok(manager);
        }
        let _turn = self.inner.checking.acquire().await.expect("never closed");
        if let Some(manager) = lock(&self.inner.callers).get(token) {
            return Ok(manager);
        }
        let credentials = self.inner.credentials.clone().with_token(token)?;
        let exchange = GrpcExchange::connect_with(self.inner.url.clone(), &credentials).await?;
        let manager = Arc::new(Manager::new(Arc::new(exchange)).await?);
        if let Some(gone) = lock(&self.inner.callers).keep(token, manager.clone()) {
            retire(gone);
        }
        Ok(manager)
    }

    /// Drops the caller with `token`: the next request shows its token to
    /// the exchange again (it may have been revoked).
    fn forget_caller(&self, token: &str) {
        let gone = lock(&self.inner.callers).by_token.remove(token);
        if let Some((manager, _)) = gone {
            retire(manager);
        }
    }

    /// Looks at the exchange: every active agent (of the behaviour and
    /// owner asked for) that described itself, one tool per action. True
    /// when the names changed. Only agents not seen before are described.
    async fn refresh(&self) -> Result<bool, ClientError> {
        let mut known = std::mem::take(&mut *lock(&self.inner.agents));
        let mut seen = HashMap::new();
        let looked = self.look(&mut known, &mut seen).await;
        let mut agents = lock(&self.inner.agents);
        let found = match looked {
            Ok(found) => found,
            Err(e) => {
                // What was described stays known for the next look.
                known.extend(seen);
                *agents = known;
                return Err(e);
            }
        };
        *agents = seen;
        drop(agents);
        let mut tools = write(&self.inner.tools);
        let changed = !tools.keys().eq(found.keys());
        *tools = found;
        Ok(changed)
    }

    /// The tools of the agents Discover lists now, by name; the agents
    /// listed go from `known` (describing those not in it) to `seen`.
    async fn look(
        &self,
        known: &mut HashMap<EntityId, Arc<[Target]>>,
        seen: &mut HashMap<EntityId, Arc<[Target]>>,
    ) -> Result<BTreeMap<String, Target>, ClientError> {
        let options = &self.inner.options;
        let mut found = BTreeMap::new();
        let mut page_token = String::new();
        'pages: loop {
            let request = pb::DiscoverRequest {
                behaviour: options.behaviour.clone().unwrap_or_default(),
                page_token,
                owner: options.owner.clone().unwrap_or_default(),
                ..Default::default()
            };
            let page = self.inner.rpc.clone().discover(request).await?.into_inner();
            let ids: Vec<EntityId> =
                page.agents.iter().filter_map(|a| a.agent_id.parse().ok()).collect();
            let new: Vec<EntityId> =
                ids.iter().filter(|id| !known.contains_key(id)).copied().collect();
            let rpc = self.inner.rpc.clone();
            let described: Vec<_> = futures::stream::iter(new)
                .map(move |id| describe(rpc.clone(), id))
                .buffer_unordered(DESCRIBES_IN_FLIGHT)
                .try_collect()
                .await?;
            known.extend(described.into_iter().flatten());
            for id in ids {
                // None: gone since it was listed.
                let Some(targets) = known.remove(&id) else { continue };
                if found.len() + targets.len() > MAX_TOOLS {
                    tracing::warn!(
                        max = MAX_TOOLS,
                        "more agents than tools offered; some left out"
                    );
                    break 'pages;
                }
                found.extend(targets.iter().map(|t| (t.tool.name.to_string(), t.clone())));
                seen.insert(id, targets);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        Ok(found)
    }

    /// Tells every client that the tools changed, forgetting those gone.
    async fn tell_peers(&self) {
        let peers = std::mem::take(&mut *lock(&self.inner.peers));
        let mut alive = Vec::with_capacity(peers.len());
        for peer in peers {
            if peer.notify_tool_list_changed().await.is_ok() {
                alive.push(peer);
            }
        }
        // Clients that came meanwhile stay.
        lock(&self.inner.peers).extend(alive);
    }

    /// Calls the action behind tool `name` with `arguments` (by parameter
    /// name). An action's failure is a tool result marked as an error, with
    /// the error as structured content; an unknown tool is a protocol error.
    /// With [`GatewayOptions::as_caller`] it calls as the caller with
    /// `token` (requests without one never get here).
    async fn call(
        &self,
        name: &str,
        arguments: JsonObject,
        token: Option<&str>,
    ) -> Result<CallToolResult, ErrorData> {
        let Some(target) = read(&self.inner.tools).get(name).cloned() else {
            return Err(ErrorData::invalid_params(
                format!("no tool {:?}: list the tools again", academy_proto::bounded(name)),
                None,
            ));
        };
        let caller = match token.filter(|_| self.inner.options.as_caller) {
            Some(token) => match self.caller(token).await {
                Ok(manager) => Some(manager),
                Err(e) => return Ok(failed(&e.to_string())),
            },
            None => None,
        };
        let manager = caller.as_deref().unwrap_or(&self.inner.manager);
        let handle = manager
            .raw_handle(target.agent)
            .with_codec(Codec::Json)
            .with_timeout(self.inner.options.call_timeout);
        let called = handle.call::<Value, Value>(&target.action, Value::Object(arguments)).await;
        if let (Some(token), Some(_), Err(e)) = (token, &caller, &called)
            && !matches!(e, HandleError::Remote { .. } | HandleError::Codec(_))
        {
            // Not the action's answer: its mailbox or connection may be
            // gone, its token revoked. The next request shows it again.
            self.forget_caller(token);
        }
        Ok(match called {
            Ok(result) => CallToolResult::structured(json!({ "result": result })),
            Err(HandleError::Remote { code, kind, message, .. }) => {
                CallToolResult::structured_error(json!({
                    "error": { "code": format!("{code:?}"), "kind": kind, "message": message },
                }))
            }
            Err(other) => failed(&other.to_string()),
        })
    }
}

impl ServerHandler for Gateway {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder().enable_tools().enable_tool_list_changed();
        ServerConfig::new(capabilities.build())
            .with_server_info(Implementation::new("academy", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Each tool calls one action of one agent of an Academy exchange. Tools come \
                 and go with the agents. Results are {\"result\": ...}; a failed action \
                 answers {\"error\": {code, kind, message}}.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let tools = read(&self.inner.tools).values().map(|t| t.tool.clone()).collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let arguments = request.arguments.unwrap_or_default();
        let parts = context.extensions.get::<axum::http::request::Parts>();
        let token = parts.and_then(|p| bearer(&p.headers));
        self.call(&request.name, arguments, token).await.map(Into::into)
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        lock(&self.inner.peers).push(context.peer);
    }
}

/// The tools of agent `id`, as it described itself; `None` when it is
/// gone.
async fn describe(
    mut rpc: ExchangeServiceClient<Authorized>,
    id: EntityId,
) -> Result<Option<(EntityId, Arc<[Target]>)>, ClientError> {
    let request = pb::DescribeRequest { agent_id: id.to_string() };
    let agent = match rpc.describe(request).await {
        Ok(answer) => answer.into_inner().agent.unwrap_or_default(),
        Err(status)
            if matches!(status.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition) =>
        {
            return Ok(None);
        }
        Err(status) => return Err(status.into()),
    };
    let targets = match &agent.description {
        Some(described) => described
            .actions
            .iter()
            .map(|action| Target {
                agent: id,
                action: action.name.clone(),
                tool: tool(&agent, id, described, action),
            })
            .collect(),
        None => Arc::from([]),
    };
    Ok(Some((id, targets)))
}

/// A tool result for a call that could not be made.
fn failed(why: &str) -> CallToolResult {
    CallToolResult::structured_error(json!({
        "error": { "code": "Unavailable", "kind": "CallFailed", "message": why },
    }))
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The exchange refused the token shown to it.
fn refused_token(error: &ClientError) -> bool {
    match error {
        ClientError::Exchange(academy_proto::ExchangeError::Unauthenticated(_)) => true,
        ClientError::Refused { code, .. } => *code == tonic::Code::Unauthenticated,
        _ => false,
    }
}

/// Lets through only HTTP requests whose bearer token the exchange takes
/// (with [`GatewayOptions::as_caller`]); 401 otherwise, 503 when the
/// exchange cannot say.
async fn authenticate(
    axum::extract::State(gateway): axum::extract::State<Gateway>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse as _;
    let unauthorized = |why: &'static str| {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], why).into_response()
    };
    let Some(token) = bearer(request.headers()) else {
        return unauthorized(
            "this gateway calls as its callers: send your exchange token as \
                             Authorization: Bearer <token>\n",
        );
    };
    match gateway.caller(token).await {
        Ok(caller) => {
            // A kept caller's token may have been revoked since: the
            // exchange says (one small call per request).
            let mailbox = caller.client_id();
            match caller.exchange().status(&mailbox).await {
                Err(e) if refused_token(&e) => {
                    gateway.forget_caller(token);
                    unauthorized("the exchange does not take this token\n")
                }
                _ => next.run(request).await,
            }
        }
        Err(e) if refused_token(&e) => unauthorized("the exchange does not take this token\n"),
        // The caller's own limits (a client mailbox is one of its mailboxes).
        Err(ClientError::Exchange(e @ academy_proto::ExchangeError::QuotaExceeded { .. })) => {
            (StatusCode::TOO_MANY_REQUESTS, format!("the exchange refused: {e}\n")).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a caller's token with the exchange");
            (StatusCode::SERVICE_UNAVAILABLE, "cannot reach the exchange\n").into_response()
        }
    }
}

/// The tool for `action` of `agent`.
fn tool(
    agent: &pb::AgentInfo,
    id: EntityId,
    described: &pb::AgentDescription,
    action: &pb::ActionDescription,
) -> Tool {
    let schema = |s: &Option<academy_proto::prost_types::Value>| {
        s.clone().map(academy_proto::json::from_proto).unwrap_or_else(|| json!({}))
    };
    let mut input = match schema(&action.input_schema) {
        Value::Object(object) => object,
        _ => JsonObject::new(),
    };
    input.entry("type").or_insert_with(|| json!("object"));
    // Results come as {"result": ...}: MCP wants an object.
    let mut output = schema(&action.output_schema);
    let definitions = output.as_object_mut().and_then(|o| o.remove("$defs"));
    let mut output = json!({
        "type": "object",
        "properties": { "result": output },
        "required": ["result"],
    });
    if let (Some(definitions), Some(object)) = (definitions, output.as_object_mut()) {
        object.insert("$defs".into(), definitions);
    }
    let behaviour = agent.behaviour.rsplit('.').next().unwrap_or_default();
    let uuid = id.uuid().simple().to_string();
    let name = format!("{}_{}_{}", clean(behaviour), clean(&action.name), &uuid[uuid.len() - 8..]);
    let mut text = action.doc.clone();
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(&format!(
        "Action {} of agent {} ({})",
        action.name, agent.agent_id, agent.behaviour
    ));
    if !agent.name.is_empty() {
        text.push_str(&format!(", named {}", agent.name));
    }
    if !described.doc.is_empty() {
        text.push_str(&format!(": {}", described.doc));
    }
    let Value::Object(output) = output else { unreachable!("built as an object") };
    Tool::new(name, text, input)
        .with_title(format!("{} {} ({})", agent.behaviour, action.name, agent.agent_id))
        .with_raw_output_schema(Arc::new(output))
        .with_annotations(ToolAnnotations::new().read_only(action.read_only))
}

/// `text` with only the characters every MCP client takes in a tool name.
fn clean(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .take(48)
        .collect();
    if cleaned.is_empty() { "agent".into() } else { cleaned }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
