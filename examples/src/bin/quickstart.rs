//! Quickstart: a counter agent and a client talking through a real exchange-server.
//!
//! `cargo run -p academy-examples --bin quickstart` (add `-- --serve --listen
//! 127.0.0.1:50051` to keep the agent running for grpcurl).

use std::sync::atomic::{AtomicU64, Ordering};

use academy_sdk::behaviour;
use clap::Parser;

/// An agent: state (a count) and actions that others call remotely.
#[derive(Default)]
struct Counter {
    count: AtomicU64,
}

#[behaviour(name = "example.Counter")]
impl Counter {
    /// Adds `by` to the count and returns the new count.
    #[action]
    async fn increment(&self, by: u64) -> u64 {
        self.count.fetch_add(by, Ordering::SeqCst) + by
    }

    /// The count.
    #[action(read_only)]
    async fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    exchange: academy_examples::ExchangeArgs,
    /// Keep the agent running (for grpcurl) until Ctrl-C.
    #[arg(long)]
    serve: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    academy_examples::init_logging();
    let args = Args::parse();
    let (manager, server) = args.exchange.connect().await?;

    let counter = manager.launch(Counter::default()).await?;
    println!("launched {}", counter.id());
    println!("increment(1)  -> {}", counter.increment(1).await?);
    println!("increment(41) -> {}", counter.increment(41).await?);
    println!("get()         -> {}", counter.get().await?);
    println!("ping          -> {:?}", counter.ping().await?);

    if args.serve {
        let addr = server.as_ref().map_or("HOST:PORT".into(), |s| s.addr().to_string());
        println!("\nserving until Ctrl-C; try:");
        println!(
            "  grpcurl -plaintext -d '{{\"agent_id\":\"{}\",\"action\":\"increment\",\"args\":[5]}}' {addr} academy.v1.ExchangeService/Invoke",
            counter.id()
        );
        tokio::signal::ctrl_c().await?;
    }
    manager.close().await?;
    Ok(())
}
