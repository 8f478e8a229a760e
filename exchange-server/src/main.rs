use anyhow::Context as _;
use clap::Parser as _;

use academy_exchange::{
    Config, RunningServer, ServerOptions, server_runtime, shutdown_signal, telemetry,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init_tracing(config.log_format);
    let options = config.server_options()?;
    let runtime = server_runtime(config.worker_threads).context("cannot start the runtime")?;
    runtime.block_on(serve(options))
}

async fn serve(options: ServerOptions) -> anyhow::Result<()> {
    let server = RunningServer::start(options.clone())
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
