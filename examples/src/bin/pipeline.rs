//! A pipeline of three agents: the coordinator receives handles to a cleaner
//! and an analyser as arguments and calls them from its own mailbox.
//!
//! `cargo run -p academy-examples --bin pipeline [-- --exchange http://HOST:PORT]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use academy_sdk::{Handle, HandleError, behaviour};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Normalises text: lower case, letters and spaces only.
struct Cleaner;

#[behaviour(name = "example.Cleaner")]
impl Cleaner {
    #[action]
    async fn clean(&self, text: String) -> String {
        text.chars()
            .map(|c| if c.is_alphanumeric() { c.to_ascii_lowercase() } else { ' ' })
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    words: usize,
    distinct: usize,
    top: Option<(String, usize)>,
}

/// Counts words; discoverable as any `example.Analyser`.
struct WordStats;

#[behaviour(name = "example.WordStats", implements("example.Analyser"))]
impl WordStats {
    #[action]
    async fn analyse(&self, text: String) -> Result<Report, String> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for word in text.split_whitespace() {
            *counts.entry(word).or_default() += 1;
        }
        if counts.is_empty() {
            return Err("nothing to analyse".into());
        }
        let top = counts.iter().max_by_key(|(w, n)| (**n, std::cmp::Reverse(**w)));
        Ok(Report {
            words: counts.values().sum(),
            distinct: counts.len(),
            top: top.map(|(w, n)| ((*w).to_owned(), *n)),
        })
    }
}

/// Runs documents through the cleaner and the analyser, all concurrently.
#[derive(Default)]
struct Coordinator {
    processed: AtomicU64,
}

#[behaviour(name = "example.Coordinator")]
impl Coordinator {
    #[action]
    async fn process(
        &self,
        cleaner: Handle<Cleaner>,
        analyser: Handle<WordStats>,
        documents: Vec<String>,
    ) -> Result<Vec<Report>, HandleError> {
        let jobs = documents.into_iter().map(|doc| async {
            let clean = cleaner.clean(doc).await?;
            let report = analyser.analyse(clean).await?;
            self.processed.fetch_add(1, Ordering::Relaxed);
            Ok(report)
        });
        futures::future::try_join_all(jobs).await
    }

    /// A control loop on a timer: report progress.
    #[timer(every = Duration::from_millis(200))]
    async fn progress(&self) {
        tracing::info!(processed = self.processed.load(Ordering::Relaxed), "coordinator");
    }
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    exchange: academy_examples::ExchangeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    academy_examples::init_logging();
    let (manager, _server) = Args::parse().exchange.connect().await?;

    let cleaner = manager.launch(Cleaner).await?;
    let analyser = manager.launch(WordStats).await?;
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
