//! A replica's presence: a key renewed while it runs, so that the
//! subscribers of a replica that died stop counting as subscribed.

use std::time::Duration;

use academy_proto::ExchangeError;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::reply::unavailable;

/// How often a replica renews its presence, and how long it lasts.
pub(super) const PRESENCE_EVERY: Duration = Duration::from_secs(5);
const PRESENCE_TTL: Duration = Duration::from_secs(15);

/// Sets (or renews) presence key `key`.
pub(super) async fn renew(conn: &Conn, key: &str) -> Result<(), ExchangeError> {
    let mut set = redis::cmd("SET");
    set.arg(key).arg(1);
    set.arg("PX").arg(u64::try_from(PRESENCE_TTL.as_millis()).unwrap_or(u64::MAX));
    set.query_async(&mut conn.clone()).await.map_err(unavailable)
}

/// Held by every handle on a backend but its own background tasks': when
/// the last one goes, the tasks stop and the replica's presence is withdrawn.
#[derive(Debug)]
pub(super) struct InUse {
    pub(super) stop: CancellationToken,
    pub(super) conn: Conn,
    pub(super) presence: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (mut conn, key) = (self.conn.clone(), std::mem::take(&mut self.presence));
            runtime.spawn(async move {
                let _: Result<(), _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
            });
        }
    }
}
