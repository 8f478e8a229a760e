//! The Academy launcher: places agents on worker nodes by free capacity and
//! labels, watches them, restarts failed ones up to their retry limit and moves
//! the agents of lost workers, while the exchange keeps their mailboxes.
//!
//! Workers are programs built with [`academy_sdk::Worker`]; they join the
//! launcher over the `Join` stream of `academy.v1.LauncherService`.

mod cluster;
mod metrics;
mod server;
mod service;
mod store;

pub use server::{LauncherOptions, RunningLauncher};
pub use service::LauncherGrpc;
