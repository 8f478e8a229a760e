//! Helpers shared by the launcher's integration tests.

use academy_exchange::{RunningServer, ServerOptions};
use academy_launcher::{LauncherOptions, RunningLauncher};

/// An in-memory exchange and a launcher using it, both on loopback.
pub(crate) async fn exchange_and_launcher() -> (RunningServer, RunningLauncher) {
    let exchange = RunningServer::start(ServerOptions::default()).await.unwrap();
    let options = LauncherOptions { exchange_url: exchange.url(), ..Default::default() };
    let launcher = RunningLauncher::start(options).await.unwrap();
    (exchange, launcher)
}
