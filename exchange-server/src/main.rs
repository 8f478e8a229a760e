use anyhow::Context as _;
use clap::Parser as _;

use academy_exchange::{Config, RunningServer, telemetry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init_tracing(config.log_format);
    let options = config.server_options()?;
    let server = RunningServer::start(options.clone())
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    shutdown_signal().await;
    tokio::select! {
        () = server.shutdown() => Ok(()),
        () = shutdown_signal() => {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
