use anyhow::Context as _;
use clap::Parser as _;

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_server::grpc::{runtime, shutdown_signal};
use academy_server::telemetry;

mod cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = cli::Config::parse();
    let _telemetry = telemetry::init(config.log_format, "academy-exchange");
    let options = config.options()?;
    let runtime = runtime(config.worker_threads).context("cannot start the runtime")?;
    runtime.block_on(serve(options))
}

async fn serve(options: ExchangeOptions) -> anyhow::Result<()> {
    let server = RunningExchange::start(options.clone())
        .await
        .with_context(|| format!("cannot start the exchange on {}", options.listen))?;
    shutdown_signal().await;
    tokio::select! {
        () = server.shutdown() => Ok(()),
        () = shutdown_signal() => {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
