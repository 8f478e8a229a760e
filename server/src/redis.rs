//! Connecting to Redis the way every Academy service does.

use std::time::Duration;

use academy_proto::ExchangeError;
use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long a Redis call may wait, by default: for the connection (two
/// attempts of half of it each) or for the answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// `url` fit for logs and error messages: a password in it shows as `***`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = rest[..at].split_once(':').map_or("", |(user, _)| user);
    format!("{scheme}://{user}:***{}", &rest[at..])
}

/// Connects to the Redis at `url`: a bad URL, a wrong password or a forbidden
/// command fails at once; an unreachable Redis is retried for a while, as it
/// may be starting. Afterwards each call waits at most about `timeout` for
/// Redis (to reconnect, or to answer) before failing with
/// [`ExchangeError::Unavailable`], so a Redis outage fails calls fast rather
/// than past their callers' deadlines. Errors never show the password.
pub async fn connect(
    url: &str,
    timeout: Duration,
) -> Result<(redis::Client, ConnectionManager), ExchangeError> {
    let shown = redacted_url(url);
    let client = redis::Client::open(url)
        .map_err(|e| ExchangeError::InvalidArgument(format!("bad Redis URL {shown:?}: {e}")))?;
    let unreachable =
        |e: RedisError| ExchangeError::Unavailable(format!("cannot reach Redis at {shown}: {e}"));
    // The connection manager's retries are for a Redis that is starting; a
    // wrong password or a forbidden command won't mend, so one plain
    // connection is tried first.
    let first = tokio::time::timeout(timeout, client.get_multiplexed_async_connection());
    if let Ok(Err(e)) = first.await
        && matches!(
            e.kind(),
            redis::ErrorKind::AuthenticationFailed
                | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
        )
    {
        return Err(unreachable(e));
    }
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout / 2))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(timeout / 4);
    let conn =
        ConnectionManager::new_with_config(client.clone(), config).await.map_err(unreachable)?;
    Ok((client, conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_redis_urls_are_redacted() {
        for (url, shown) in [
            ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
            ("redis://app:hunter2@redis:6379", "redis://app:***@redis:6379"),
            ("rediss://hunter2@redis/1", "rediss://:***@redis/1"),
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            ("redis://redis/0?x=a@b", "redis://redis/0?x=a@b"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redacted_url(url), shown);
        }
    }
}
