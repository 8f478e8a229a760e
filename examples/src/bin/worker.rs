//! A worker node with the example behaviours compiled in: the launcher places
//! agents on it.
//!
//! `cargo run -p academy-examples --bin worker -- --launcher http://127.0.0.1:50052`

use academy_examples::behaviours::{Cleaner, Coordinator, Crashy, WordStats};
use academy_sdk::worker::Worker;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// URL of the launcher.
    #[arg(long, env = "ACADEMY_LAUNCHER_URL", default_value = "http://127.0.0.1:50052")]
    launcher: String,
    /// Name shown by `workers list`, by which `workers drain` finds it (in
    /// Kubernetes, the pod's name from the downward API).
    #[arg(long, env = "ACADEMY_WORKER_NAME", default_value = "worker")]
    name: String,
    /// How many agents it runs at once.
    #[arg(long, default_value_t = 16)]
    capacity: u32,
    /// Labels launch selectors can match, as key=value.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or("a label is key=value")?;
    Ok((k.to_owned(), v.to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let args = Args::parse();
    let mut worker = Worker::new(args.launcher).name(args.name).capacity(args.capacity);
    for (key, value) in args.labels {
        worker = worker.label(key, value);
    }
    worker
        .register::<Cleaner>()
        .register::<WordStats>()
        .register::<Coordinator>()
        .register::<Crashy>()
        .run()
        .await?;
    Ok(())
}
