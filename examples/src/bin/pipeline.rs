//! A pipeline of three agents: the coordinator receives handles to a cleaner
//! and an analyser as arguments and calls them from its own mailbox.
//!
//! `cargo run -p academy-examples --bin pipeline [-- --exchange http://HOST:PORT]`

use academy_examples::behaviours::{Cleaner, Coordinator, WordStats};
use academy_sdk::HandleError;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    exchange: academy_examples::ExchangeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    academy_examples::init_logging();
    let (manager, _server) = Args::parse().exchange.connect().await?;

    let cleaner = manager.launch(Cleaner::default()).await?;
    let analyser = manager.launch(WordStats::default()).await?;
    let coordinator = manager.launch(Coordinator::default()).await?;

    let found = manager.discover("example.Analyser", false).await?;
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
