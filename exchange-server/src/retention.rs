//! How long an exchange keeps what is over (docs/design.md, "Retention"):
//! the gravestones of terminated agents, and client mailboxes nobody
//! subscribes to any more. The same policy on both backends.

use std::sync::Weak;
use std::time::Duration;

use crate::backend::Backend;

/// What an exchange keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// How long a terminated agent's id stays refused and answered as
    /// terminated (`None`: forever). Kept between this and 1/8 more.
    pub gravestones: Option<Duration>,
    /// How long a client mailbox may have no subscriber before it is
    /// removed (`None`: never). Counted from its creation or the end of its
    /// last subscription.
    pub abandoned_clients: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            gravestones: Some(Duration::from_secs(24 * 3600)),
            abandoned_clients: Some(Duration::from_secs(3600)),
        }
    }
}

/// Clock granularity of the retention: gravestones are kept in 16 slices of
/// their retention, and expiry is looked for a few times per retention.
pub(crate) const SLICES: u32 = 16;

impl Retention {
    /// How often to look for what expired: a few times per retention, at
    /// least every minute, at most every 50 ms.
    pub(crate) fn sweep_every(&self) -> Duration {
        let gravestones = self.gravestones.map(|t| t / SLICES);
        let clients = self.abandoned_clients.map(|t| t / 4);
        [gravestones, clients]
            .into_iter()
            .flatten()
            .fold(Duration::from_secs(60), Duration::min)
            .max(Duration::from_millis(50))
    }
}

/// Removes what expired from `backend`, every [`Retention::sweep_every`],
/// until the backend is dropped.
pub(crate) fn spawn_sweeper(backend: Weak<dyn Backend>, retention: Retention) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let mut every = tokio::time::interval(retention.sweep_every());
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(backend) = backend.upgrade() else { return };
            match backend.sweep(&retention).await {
                Ok(swept) if swept.any() => tracing::info!(
                    gravestones = swept.gravestones,
                    abandoned_clients = swept.abandoned_clients,
                    "expired"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look for what expired"),
            }
        }
    });
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Swept {
    /// Gravestones (in memory; Redis expires them by itself).
    pub(crate) gravestones: usize,
    pub(crate) abandoned_clients: usize,
}

impl Swept {
    fn any(&self) -> bool {
        self.gravestones > 0 || self.abandoned_clients > 0
    }
}
