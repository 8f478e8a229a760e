//! A pipeline of three agents: the coordinator receives handles to a cleaner
//! and an analyser as arguments and calls them from its own mailbox.
//!
//! `cargo run -p academy-examples --bin pipeline [-- --exchange http://HOST:PORT]`

use academy_examples::behaviours::{Cleaner, Coordinator, WordStats};
use std::time::Duration;

use academy_sdk::HandleError;
use academy_sdk::launcher::{Launcher, RemoteLaunch};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    exchange: academy_examples::ExchangeArgs,
    /// Launch the agents on workers through this launcher (the agents keep
    /// running after the pipeline ends) instead of in this process.
    #[arg(long)]
    launcher: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    academy_examples::init_logging();
    let args = Args::parse();
    let (manager, _server) = args.exchange.connect().await?;

    let (cleaner, analyser, coordinator) = match &args.launcher {
        None => (
            manager.launch(Cleaner::default()).await?,
            manager.launch(WordStats::default()).await?,
            manager.launch(Coordinator::default()).await?,
        ),
        Some(url) => {
            let launcher = Launcher::connect(url).await?;
            let config = serde_json::json!({});
            let options = RemoteLaunch { retry_limit: 3, ..Default::default() };
            let timeout = Duration::from_secs(30);
            (
                manager
                    .launch_remote::<Cleaner>(&launcher, &config, options.clone())
                    .await?
                    .with_timeout(timeout),
                manager
                    .launch_remote::<WordStats>(&launcher, &config, options.clone())
                    .await?
                    .with_timeout(timeout),
                manager
                    .launch_remote::<Coordinator>(&launcher, &config, options)
                    .await?
                    .with_timeout(timeout),
            )
        }
    };

    let found = manager.discover("example.Analyser", academy_sdk::Matching::Implements).await?;
    println!("analysers found by discovery: {}", found.len());

    let documents = vec![
        "The quick brown fox jumps over the lazy dog.".to_owned(),
        "To be, or not to be: that is the question.".to_owned(),
        "Agents, agents everywhere; and every agent has a mailbox!".to_owned(),
    ];
    let reports = coordinator.process(cleaner, analyser.clone(), documents).await?;
    for report in &reports {
        println!("{report:?}");
    }

    // Errors are data: the analyser fails, the caller gets a typed error, and
    // the analyser keeps serving.
    match analyser.analyse("   ".into()).await {
        Err(HandleError::Remote { kind, message, .. }) => {
            println!("expected error: {kind}: {message}")
        }
        other => anyhow::bail!("expected a remote error, got {other:?}"),
    }
    println!("analyser still serves: {:?}", analyser.analyse("still here".into()).await?.words);

    manager.close().await?;
    Ok(())
}
