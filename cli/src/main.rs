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
use futures::StreamExt as _;
use serde_json::{Value, json};

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
    /// Print JSON (one object per line) instead of tables.
    #[arg(long, global = true)]
    json: bool,
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
    List,
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
    Watch,
}

#[derive(Debug, Clone, Subcommand)]
enum Workers {
    List,
    /// Moves a worker's agents elsewhere and places nothing new on it.
    Drain {
        worker_id: String,
    },
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

/// Prints rows as JSON lines or as an aligned table of `columns`.
fn print(json: bool, columns: &[&str], rows: &[Value]) {
    if json {
        for row in rows {
            println!("{row}");
        }
        return;
    }
    let cell = |row: &Value, column: &str| match &row[column] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or(v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| rows.iter().map(|r| cell(r, c).len()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|c| c.to_uppercase()).collect());
    for row in rows {
        line(columns.iter().map(|c| cell(row, c)).collect());
    }
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
    Ok(LauncherServiceClient::new(cli.channel(&cli.launcher, "launcher").await?))
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
    match cli.command.clone() {
        Command::Agents(Agents::List) => {
            let mut rpc = launcher(&cli).await?;
            let (mut rows, mut page_token) = (Vec::new(), String::new());
            loop {
                let request = pb::ListAgentsRequest { page_token, ..Default::default() };
                let page = rpc.list_agents(request).await.map_err(failed)?.into_inner();
                rows.extend(page.agents.iter().map(agent_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print(cli.json, AGENT_COLUMNS, &rows);
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
            print(cli.json, AGENT_COLUMNS, &[agent_json(&agent)]);
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
            print(cli.json, AGENT_COLUMNS, &[agent_json(&agent)]);
        }
        Command::Agents(Agents::Watch) => {
            let mut changes = launcher(&cli)
                .await?
                .watch_agents(pb::WatchAgentsRequest {})
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
            print(
                cli.json,
                &["worker_id", "name", "capacity", "agents", "draining", "behaviours"],
                &rows,
            );
        }
        Command::Workers(Workers::Drain { worker_id }) => {
            let mut rpc = launcher(&cli).await?;
            let worker = rpc
                .drain_worker(pb::DrainWorkerRequest { worker_id })
                .await
                .map_err(failed)?
                .into_inner()
                .worker
                .context("no record returned")?;
            print(cli.json, &["worker_id", "name", "agents", "draining"], &[worker_json(&worker)]);
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
            print(cli.json, &["agent_id", "behaviour", "implements", "name"], &rows);
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
            print(cli.json, &["id", "state", "subscribed", "queued", "behaviour"], &[row]);
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
