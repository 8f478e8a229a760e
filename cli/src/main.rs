//! `academy`: inspect and drive a live system from the shell.

use std::collections::HashMap;

use std::time::Duration;

use academy_proto::pb::{
    self, exchange_service_client::ExchangeServiceClient,
    launcher_service_client::LauncherServiceClient,
};
use academy_proto::{duration, json};
use academy_sdk::credentials::Authorized;
use academy_sdk::exchange::{ExchangeApi as _, GrpcExchange};
use academy_sdk::{Credentials, Matching};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod table;
use futures::StreamExt as _;
use serde_json::{Value, json};

// As the exchange, the launcher and the worker: `academy mcp` is a
// long-running gateway that relays agents' answers.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Academy command line: agents, workers, discovery and calls.
#[derive(Debug, Parser)]
#[command(name = "academy", version)]
struct Cli {
    /// URL of the exchange.
    #[arg(
        long,
        global = true,
        env = "ACADEMY_EXCHANGE_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    exchange: String,
    /// URL of the launcher.
    #[arg(
        long,
        global = true,
        env = "ACADEMY_LAUNCHER_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    launcher: String,
    /// Bearer token, for services started with --tokens-file.
    #[arg(long, global = true, env = "ACADEMY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (one object per line, every field whole) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Print table cells whole (long ones are cut at 60 characters).
    #[arg(long, global = true)]
    wide: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Agents placed by the launcher.
    #[command(subcommand)]
    Agents(Agents),
    /// Worker nodes.
    #[command(subcommand)]
    Workers(Workers),
    /// Active agents implementing a behaviour (all when no name is given).
    Discover {
        behaviour: Option<String>,
        /// Only agents whose own behaviour is this one.
        #[arg(long)]
        exact: bool,
    },
    /// State of a mailbox.
    Status { id: String },
    /// What an agent can do: its actions, their parameters and documentation
    /// (`--json`: with the JSON Schemas of their arguments and results).
    Describe { agent_id: String },
    /// Serves the actions of the exchange's agents as the tools of a Model
    /// Context Protocol server: on stdin/stdout, for a desktop MCP client that
    /// starts it as a command, or over streamable HTTP at http://ADDR/mcp.
    /// Tools come and go with the agents; calls go through the exchange with
    /// this command's credentials.
    Mcp {
        /// Serve streamable HTTP on this address (loopback unless you mean
        /// otherwise) instead of stdio.
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// Host names HTTP requests may name (DNS rebinding protection);
        /// loopback names by default.
        #[arg(long = "allowed-host")]
        allowed_hosts: Vec<String>,
        /// Only agents implementing this behaviour.
        #[arg(long)]
        behaviour: Option<String>,
        /// Only agents registered by this principal.
        #[arg(long)]
        owner: Option<String>,
        /// How often to look for agents that came or went, in milliseconds.
        #[arg(long, default_value_t = 1_000)]
        refresh_ms: u64,
        /// How long a call may take, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        /// With --http: call as each caller. Every request must carry the
        /// caller's own exchange token (Authorization: Bearer), and its tool
        /// calls go with that token instead of this command's. Needed to
        /// listen on an address other than loopback.
        #[arg(long, requires = "http")]
        as_caller: bool,
    },
    /// Calls an action with JSON arguments and prints the result.
    Invoke {
        agent_id: String,
        action: String,
        /// JSON array of positional arguments, or object of named ones.
        args: Option<String>,
        /// Milliseconds to wait for the result.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u32,
    },
}

#[derive(Debug, Clone, Subcommand)]
enum Agents {
    /// Agents, page by page, with the filters given.
    List {
        #[command(flatten)]
        filter: Filter,
    },
    /// Launches an agent on a worker that offers its behaviour.
    Launch {
        behaviour: String,
        /// JSON configuration of the behaviour.
        #[arg(long, default_value = "{}")]
        config: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Worker labels required, as key=value (repeatable).
        #[arg(long = "selector", value_parser = key_value)]
        selector: Vec<(String, String)>,
        /// Restarts allowed after failures.
        #[arg(long, default_value_t = 0)]
        retries: u32,
    },
    /// Stops an agent (keeping its mailbox unless --terminate).
    Stop {
        agent_id: String,
        #[arg(long)]
        terminate: bool,
    },
    /// Prints every agent, then each change as it happens.
    Watch {
        #[command(flatten)]
        filter: Filter,
    },
    /// An agent's kept state: its revision, version, the incarnation that
    /// saved it, when, its size, and the state itself as JSON (`--json`
    /// prints it whole; the table shows the first 200 characters).
    State { agent_id: String },
}

#[derive(Debug, Clone, Subcommand)]
enum Workers {
    List,
    /// Moves a worker's agents elsewhere and places nothing new on it.
    Drain {
        /// Its id (`worker:<uuid>`), or its name (e.g. a pod's name).
        worker: String,
    },
}

/// Which agents to show.
#[derive(Debug, Clone, clap::Args)]
struct Filter {
    /// Only agents in this state (pending, starting, running, stopping,
    /// stopped, failed).
    #[arg(long, value_parser = agent_state)]
    state: Option<pb::AgentState>,
    /// Only agents of this behaviour.
    #[arg(long)]
    behaviour: Option<String>,
    /// Only agents on this worker (its id).
    #[arg(long)]
    worker: Option<String>,
    /// Only agents launched by this principal.
    #[arg(long)]
    owner: Option<String>,
}

impl Filter {
    fn to_pb(&self) -> pb::AgentFilter {
        pb::AgentFilter {
            state: self.state.unwrap_or_default().into(),
            behaviour: self.behaviour.clone().unwrap_or_default(),
            worker_id: self.worker.clone().unwrap_or_default(),
            owner: self.owner.clone().unwrap_or_default(),
        }
    }
}

fn agent_state(text: &str) -> Result<pb::AgentState, String> {
    let name = format!("AGENT_STATE_{}", text.to_uppercase());
    pb::AgentState::from_str_name(&name).filter(|s| *s != pb::AgentState::Unspecified).ok_or_else(
        || format!("no state {text:?}: pending, starting, running, stopping, stopped, failed"),
    )
}

fn key_value(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or("expected key=value")?;
    Ok((k.to_owned(), v.to_owned()))
}

fn state_name(state: i32) -> String {
    pb::AgentState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("AGENT_STATE_").to_lowercase())
        .unwrap_or_else(|_| state.to_string())
}

fn agent_json(a: &pb::AgentRecord) -> Value {
    json!({
        "agent_id": a.agent_id, "behaviour": a.behaviour, "name": a.name,
        "state": state_name(a.state), "worker_id": a.worker_id, "epoch": a.epoch,
        "restarts": a.restarts, "retry_limit": a.retry_limit, "reason": a.reason, "owner": a.owner,
        "selector": a.selector, "config": a.config.clone().map_or(Value::Null, json::from_proto),
        "config_redacted": a.config_redacted,
    })
}

fn worker_json(w: &pb::WorkerRecord) -> Value {
    json!({
        "worker_id": w.worker_id, "name": w.name, "capacity": w.capacity, "labels": w.labels,
        "behaviours": w.behaviours, "agents": w.agent_count, "draining": w.draining,
    })
}

/// An agent's description: one row per action (`--json`: one object, whole).
fn description_rows(agent: &pb::AgentInfo) -> Vec<Value> {
    let described = agent.description.clone().unwrap_or_default();
    described
        .actions
        .iter()
        .map(|a| {
            json!({
                "action": a.name, "params": a.params.join(", "), "read_only": a.read_only,
                "doc": a.doc.lines().next().unwrap_or_default(),
            })
        })
        .collect()
}

fn description_json(agent: &pb::AgentInfo) -> Value {
    let described = agent.description.clone().unwrap_or_default();
    let schema = |s: &Option<academy_proto::prost_types::Value>| {
        s.clone().map_or(json!({}), json::from_proto)
    };
    let actions: Vec<Value> = described
        .actions
        .iter()
        .map(|a| {
            json!({
                "name": a.name, "doc": a.doc, "params": a.params, "read_only": a.read_only,
                "input_schema": schema(&a.input_schema), "output_schema": schema(&a.output_schema),
            })
        })
        .collect();
    json!({
        "agent_id": agent.agent_id, "behaviour": agent.behaviour, "name": agent.name,
        "described": agent.description.is_some(), "doc": described.doc, "actions": actions,
    })
}

const AGENT_COLUMNS: &[&str] =
    &["agent_id", "behaviour", "state", "worker_id", "restarts", "reason"];

impl Cli {
    /// ACADEMY_TLS_* from the environment, the token from --token or ACADEMY_TOKEN.
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let credentials = Credentials::from_env()?;
        match self.token.as_deref().map(str::trim) {
            Some(token) if !token.is_empty() => Ok(credentials.with_token(token)?),
            _ => Ok(credentials),
        }
    }

    async fn channel(&self, url: &str, service: &str) -> anyhow::Result<Authorized> {
        let channel = self.credentials()?.connect(url).await;
        channel.with_context(|| format!("cannot reach the {service}"))
    }
}

async fn launcher(cli: &Cli) -> anyhow::Result<LauncherServiceClient<Authorized>> {
    let channel = cli.channel(&cli.launcher, "launcher").await?;
    // Answers are paged; no page can outgrow a receive limit.
    Ok(LauncherServiceClient::new(channel).max_decoding_message_size(usize::MAX))
}

async fn exchange(cli: &Cli) -> anyhow::Result<ExchangeServiceClient<Authorized>> {
    let channel = cli.channel(&cli.exchange, "exchange").await?;
    Ok(ExchangeServiceClient::new(channel).max_decoding_message_size(usize::MAX))
}

/// A gRPC error as a one-line message for people.
fn failed(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), academy_sdk::error::status_text(&status))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let format = table::Format { json: cli.json, wide: cli.wide };
    match cli.command.clone() {
        Command::Agents(Agents::List { filter }) => {
            let mut rpc = launcher(&cli).await?;
            let (mut rows, mut page_token) = (Vec::new(), String::new());
            loop {
                let filter = Some(filter.to_pb());
                let request = pb::ListAgentsRequest { page_token, filter, ..Default::default() };
                let page = rpc.list_agents(request).await.map_err(failed)?.into_inner();
                rows.extend(page.agents.iter().map(agent_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            format.print(AGENT_COLUMNS, &rows);
        }
        Command::Agents(Agents::Launch { behaviour, config, name, selector, retries }) => {
            let config: Value = serde_json::from_str(&config).context("--config must be JSON")?;
            let request = pb::LaunchAgentRequest {
                behaviour,
                config: Some(json::to_proto(config)),
                name,
                selector: selector.into_iter().collect::<HashMap<_, _>>(),
                retry_limit: retries,
            };
            let agent = launcher(&cli).await?.launch_agent(request).await.map_err(failed)?;
            let agent = agent.into_inner().agent.context("no record returned")?;
            format.print(AGENT_COLUMNS, &[agent_json(&agent)]);
        }
        Command::Agents(Agents::Stop { agent_id, terminate }) => {
            let mut rpc = launcher(&cli).await?;
            let agent = rpc
                .stop_agent(pb::StopAgentRequest { agent_id, terminate })
                .await
                .map_err(failed)?
                .into_inner()
                .agent
                .context("no record returned")?;
            format.print(AGENT_COLUMNS, &[agent_json(&agent)]);
        }
        Command::Agents(Agents::Watch { filter }) => {
            let mut changes = launcher(&cli)
                .await?
                .watch_agents(pb::WatchAgentsRequest { filter: Some(filter.to_pb()) })
                .await
                .map_err(failed)?
                .into_inner();
            while let Some(change) = changes.next().await {
                let agent = change.map_err(failed)?.agent.context("no record")?;
                let row = agent_json(&agent);
                if cli.json {
                    println!("{row}");
                } else {
                    println!(
                        "{} {} {} {} {}",
                        row["agent_id"],
                        row["behaviour"],
                        row["state"],
                        row["worker_id"],
                        row["reason"]
                    );
                }
            }
        }
        Command::Workers(Workers::List) => {
            let mut rpc = launcher(&cli).await?;
            let (mut rows, mut page_token) = (Vec::new(), String::new());
            loop {
                let request = pb::ListWorkersRequest { page_token, ..Default::default() };
                let page = rpc.list_workers(request).await.map_err(failed)?.into_inner();
                rows.extend(page.workers.iter().map(worker_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let columns = ["worker_id", "name", "capacity", "agents", "draining", "behaviours"];
            format.print(&columns, &rows);
        }
        Command::Workers(Workers::Drain { worker }) => {
            let mut rpc = launcher(&cli).await?;
            let request = if worker.starts_with("worker:") {
                pb::DrainWorkerRequest { worker_id: worker, name: String::new() }
            } else {
                pb::DrainWorkerRequest { worker_id: String::new(), name: worker }
            };
            let worker = rpc
                .drain_worker(request)
                .await
                .map_err(failed)?
                .into_inner()
                .worker
                .context("no record returned")?;
            format.print(&["worker_id", "name", "agents", "draining"], &[worker_json(&worker)]);
        }
        Command::Discover { behaviour, exact } => {
            // The SDK's client pages through large fleets.
            let client = GrpcExchange::connect_with(&cli.exchange, &cli.credentials()?).await?;
            let found =
                client.discover(&behaviour.unwrap_or_default(), Matching::exact(exact)).await?;
            let rows: Vec<Value> = found
                .iter()
                .map(|a| json!({"agent_id": a.id.to_string(), "behaviour": a.behaviour, "implements": a.implements, "name": a.name}))
                .collect();
            format.print(&["agent_id", "behaviour", "implements", "name"], &rows);
        }
        Command::Agents(Agents::State { agent_id }) => {
            let request = pb::LoadStateRequest { agent_id: agent_id.clone() };
            let answer = exchange(&cli).await?.load_state(request).await.map_err(failed)?;
            let Some(saved) = answer.into_inner().state else {
                anyhow::bail!("agent {agent_id} has no saved state");
            };
            let data = saved.data.unwrap_or_default();
            let state = match serde_json::from_slice::<Value>(&data.data) {
                Ok(value) => value,
                Err(_) => {
                    Value::String(format!("({} bytes of {})", data.data.len(), data.content_type))
                }
            };
            // Seconds since the epoch (UTC).
            let saved_at = saved.saved_at.map(|t| t.seconds);
            let shown = if format.json {
                state
            } else {
                let text = state.to_string();
                match text.char_indices().nth(200) {
                    Some((end, _)) => Value::String(format!("{}…", &text[..end])),
                    None => Value::String(text),
                }
            };
            let row = json!({
                "agent_id": agent_id,
                "revision": saved.revision,
                "version": saved.version,
                "epoch": saved.epoch,
                "saved_at": saved_at,
                "bytes": data.data.len(),
                "state": shown,
            });
            format.print(
                &["agent_id", "revision", "version", "epoch", "saved_at", "bytes", "state"],
                &[row],
            );
        }
        Command::Mcp {
            http,
            allowed_hosts,
            behaviour,
            owner,
            refresh_ms,
            timeout_ms,
            as_caller,
        } => {
            if let Some(addr) = http.filter(|a| !a.ip().is_loopback() && !as_caller) {
                anyhow::bail!(
                    "--http {addr} would let everyone who reaches it call agents with this \
                     command's credentials: add --as-caller (each request then needs its \
                     caller's own exchange token), or listen on a loopback address"
                );
            }
            let options = academy_mcp::GatewayOptions {
                refresh_every: Duration::from_millis(refresh_ms.max(50)),
                call_timeout: Duration::from_millis(timeout_ms),
                behaviour,
                owner,
                as_caller,
            };
            let credentials = cli.credentials()?;
            let gateway = academy_mcp::Gateway::connect(&cli.exchange, &credentials, options)
                .await
                .with_context(|| format!("cannot serve the agents of {}", cli.exchange))?;
            match http {
                None => gateway.serve_stdio().await?,
                Some(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr}"))?;
                    eprintln!("MCP on http://{}/mcp", listener.local_addr()?);
                    let stop = async {
                        use tokio::signal::unix::{SignalKind, signal};
                        match signal(SignalKind::terminate()) {
                            Ok(mut term) => tokio::select! {
                                _ = tokio::signal::ctrl_c() => {}
                                _ = term.recv() => {}
                            },
                            Err(_) => drop(tokio::signal::ctrl_c().await),
                        }
                    };
                    gateway.serve_http(listener, allowed_hosts, stop).await?;
                }
            }
        }
        Command::Describe { agent_id } => {
            let agent = exchange(&cli)
                .await?
                .describe(pb::DescribeRequest { agent_id })
                .await
                .map_err(failed)?
                .into_inner()
                .agent
                .context("no agent returned")?;
            if cli.json {
                println!("{}", description_json(&agent));
            } else {
                let described = agent.description.as_ref();
                let doc = described.map(|d| d.doc.as_str()).filter(|d| !d.is_empty());
                println!("{} ({})", agent.agent_id, agent.behaviour);
                match (described, doc) {
                    (None, _) => println!("It published no description."),
                    (Some(_), Some(doc)) => println!("{doc}\n"),
                    (Some(_), None) => println!(),
                }
                format.print(&["action", "params", "read_only", "doc"], &description_rows(&agent));
            }
        }
        Command::Status { id } => {
            let status = exchange(&cli)
                .await?
                .status(pb::StatusRequest { mailbox_id: id.clone() })
                .await
                .map_err(failed)?
                .into_inner();
            let state =
                status.state().as_str_name().trim_start_matches("MAILBOX_STATE_").to_lowercase();
            let behaviour = status.agent.map(|a| a.behaviour).unwrap_or_default();
            let row = json!({
                "id": id,
                "state": state,
                "subscribed": status.subscribed,
                "queued": status.queued,
                "behaviour": behaviour,
            });
            format.print(&["id", "state", "subscribed", "queued", "behaviour"], &[row]);
        }
        Command::Invoke { agent_id, action, args, timeout_ms } => {
            let args = match args {
                Some(text) => {
                    Some(json::to_proto(serde_json::from_str(&text).context("args must be JSON")?))
                }
                None => None,
            };
            let timeout = Some(duration::to_proto(Duration::from_millis(timeout_ms.into())));
            let request = pb::InvokeRequest { agent_id, action, args, timeout };
            let result = exchange(&cli).await?.invoke(request).await.map_err(failed)?;
            let result = result.into_inner().result.map_or(Value::Null, json::from_proto);
            println!(
                "{}",
                if cli.json { result.to_string() } else { serde_json::to_string_pretty(&result)? }
            );
        }
    }
    Ok(())
}
