//! The backend's connection to Redis: redis-rs's connection manager, and a
//! few connections of the calling tasks' own for script calls.
//!
//! The manager's multiplexed connection hands each call to its driver task
//! and the answer back: two task wake-ups, which on a two-core machine cost
//! 25–35 µs per round trip against a 40–50 µs round trip to Redis itself.
//! Script calls are the hot path (an exchange-routed call runs two enqueue
//! scripts in a row), so [`Conn::pipeline`] takes one of a few *lanes*
//! instead: a connection the caller holds for its whole round trip, writing
//! its pipeline and reading the answers itself. When every lane is busy (the
//! manager's pipelining then serves the crowd better), when the URL asks for
//! TLS, or for a second after a lane could not connect, it uses the manager.
//!
//! A lane whose round trip fails, times out or is abandoned part way is
//! closed, as what it would read next is unknown; and the idle ones with it,
//! as a Redis that went away took them all. The next caller connects anew;
//! a lane idle for a while is checked first, as Redis may have closed it.
//! Lanes speak RESP2 (what the scripts' answers are read as), and
//! authenticate and select the database as the URL says.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{ConnectionAddr, ErrorKind, RedisConnectionInfo, RedisError, RedisResult, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most lanes open at once.
const LANES: usize = 4;

/// How long lanes are left alone after one could not connect.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// A lane idle this long is checked before use: Redis may have closed it
/// (its `timeout` setting, a restart).
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Bytes read at a time from a lane.
const READ_AT_LEAST: usize = 16 * 1024;

/// The most a lane keeps of its read buffer between round trips: one that
/// read a large answer (a saved state) gives the memory back.
const KEEP_BUFFER: usize = 1024 * 1024;

#[derive(Clone)]
pub(super) struct Conn {
    manager: ConnectionManager,
    lanes: std::sync::Arc<Lanes>,
}

impl Conn {
    /// `timeout` bounds a lane's connecting and round trip together, as the
    /// manager's own timeouts bound its calls.
    pub(super) fn new(
        client: &redis::Client,
        manager: ConnectionManager,
        timeout: Duration,
    ) -> Self {
        let info = client.get_connection_info();
        let target = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Some(Target::Tcp(format!("{host}:{port}"))),
            ConnectionAddr::Unix(path) => Some(Target::Unix(path.clone())),
            _ => None,
        };
        let lanes = Lanes {
            target: target.map(|t| (t, info.redis_settings().clone())),
            timeout,
            idle: Mutex::new(Vec::new()),
            open: AtomicUsize::new(0),
            broken_at: Mutex::new(None),
        };
        Self { manager, lanes: std::sync::Arc::new(lanes) }
    }

    /// Runs `pipe` (one answer per command, errors as `Value::ServerError`:
    /// `ignore_errors`) on a lane if one is free, else on the manager.
    pub(super) async fn pipeline(&self, pipe: &redis::Pipeline) -> RedisResult<Vec<Value>> {
        match self.lanes.take() {
            Some(taken) => taken.run(&self.lanes, pipe).await,
            None => pipe.query_async(&mut self.manager.clone()).await,
        }
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("lanes", &self.lanes.open.load(Ordering::Relaxed)).finish()
    }
}

/// Every other command goes through the manager.
impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        self.manager.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        self.manager.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.manager.get_db()
    }
}

enum Target {
    Tcp(String),
    Unix(std::path::PathBuf),
}

struct Lanes {
    /// Where lanes connect to, and as whom; none over TLS.
    target: Option<(Target, RedisConnectionInfo)>,
    timeout: Duration,
    idle: Mutex<Vec<Lane>>,
    /// Lanes idle or in use.
    open: AtomicUsize,
    /// When a lane last failed to connect.
    broken_at: Mutex<Option<Instant>>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

struct Lane {
    io: Box<dyn Io>,
    /// Read but not yet parsed: always empty between round trips.
    buf: Vec<u8>,
    /// When its last round trip ended.
    idle_since: Instant,
}

/// A lane taken for one round trip (`None`: to connect first). Dropped
/// without being given back, it is closed and no longer counted.
struct Taken<'a> {
    lanes: &'a Lanes,
    lane: Option<Lane>,
    kept: bool,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.lanes.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Lanes {
    fn take(&self) -> Option<Taken<'_>> {
        self.target.as_ref()?;
        if let Some(lane) = self.idle.lock().expect("lanes").pop() {
            return Some(Taken { lanes: self, lane: Some(lane), kept: false });
        }
        let broken_at = *self.broken_at.lock().expect("lanes");
        if broken_at.is_some_and(|at| at.elapsed() < RECONNECT_AFTER) {
            return None;
        }
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        let taken = Taken { lanes: self, lane: None, kept: false };
        (open < LANES).then_some(taken)
    }

    async fn connect(&self) -> RedisResult<Lane> {
        let (target, settings) = self.target.as_ref().expect("taken only with a target");
        let io: Box<dyn Io> = match target {
            Target::Tcp(address) => {
                let stream = tokio::net::TcpStream::connect(address).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Target::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        };
        let mut lane = Lane { io, buf: Vec::new(), idle_since: Instant::now() };
        let mut hello = redis::pipe();
        if let Some(password) = settings.password() {
            let auth = hello.cmd("AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username);
            }
            auth.arg(password);
        }
        if settings.db() != 0 {
            hello.cmd("SELECT").arg(settings.db());
        }
        if !hello.is_empty() {
            for answer in lane.round_trip(&hello).await? {
                if let Value::ServerError(e) = answer {
                    return Err(e.into());
                }
            }
        }
        Ok(lane)
    }
}

impl Taken<'_> {
    async fn run(mut self, lanes: &Lanes, pipe: &redis::Pipeline) -> RedisResult<Vec<Value>> {
        let answers = tokio::time::timeout(lanes.timeout, async {
            let lane = self.lane.take().and_then(|mut lane| lane.is_open().then_some(lane));
            let mut lane = match lane {
                Some(lane) => lane,
                None => lanes.connect().await.inspect_err(|_| {
                    *lanes.broken_at.lock().expect("lanes") = Some(Instant::now());
                })?,
            };
            let answers = lane.round_trip(pipe).await?;
            Ok::<_, RedisError>((lane, answers))
        })
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()));
        match answers {
            Ok((mut lane, answers)) => {
                lane.idle_since = Instant::now();
                lanes.idle.lock().expect("lanes").push(lane);
                self.kept = true;
                Ok(answers)
            }
            Err(e) => {
                // The idle ones go too, as Redis is likely gone for them
                // all; they no longer count as open.
                let closed = std::mem::take(&mut *lanes.idle.lock().expect("lanes")).len();
                lanes.open.fetch_sub(closed, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

impl Lane {
    /// Whether it can be used: Redis did not close it, nor send what was
    /// not asked for, while it was idle. Checked (a read that must not find
    /// anything) only after a while idle, as a busy lane was just fine.
    fn is_open(&mut self) -> bool {
        if self.idle_since.elapsed() < CHECK_IDLE_AFTER {
            return true;
        }
        let mut byte = [0u8; 1];
        futures::FutureExt::now_or_never(self.io.read(&mut byte)).is_none()
    }

    /// Writes `pipe` and reads one answer per command.
    async fn round_trip(&mut self, pipe: &redis::Pipeline) -> RedisResult<Vec<Value>> {
        self.io.write_all(&pipe.get_packed_pipeline()).await?;
        let count = pipe.len();
        let mut ends = Vec::with_capacity(count);
        while ends.len() < count {
            let from = ends.last().copied().unwrap_or(0);
            match reply_end(&self.buf, from) {
                Some(end) => ends.push(end),
                None => {
                    self.buf.reserve(READ_AT_LEAST);
                    if self.io.read_buf(&mut self.buf).await? == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                }
            }
        }
        let mut from = 0;
        let mut answers = Vec::with_capacity(count);
        for end in ends {
            answers.push(redis::parse_redis_value(&self.buf[from..end])?);
            from = end;
        }
        if from != self.buf.len() {
            return Err(RedisError::from((ErrorKind::Parse, "more read than was asked for")));
        }
        self.buf.clear();
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        Ok(answers)
    }
}

/// Where the RESP2 reply that starts at `at` in `buf` ends, if `buf` holds
/// all of it. Only its lines are read (and bulk strings skipped by their
/// length), so looking again as more arrives costs little; a reply that is
/// not RESP2 ends at its first line, for the parser to refuse.
fn reply_end(buf: &[u8], at: usize) -> Option<usize> {
    let (mut pos, mut pending) = (at, 1u64);
    while pending > 0 {
        let line = pos + buf.get(pos..)?.windows(2).position(|w| w == b"\r\n")?;
        let (kind, digits) = buf[pos..line].split_first().unwrap_or((&b'?', &[]));
        let length = std::str::from_utf8(digits).ok().and_then(|n| n.parse::<u64>().ok());
        pos = line + 2;
        pending -= 1;
        match (kind, length) {
            (b'$', Some(n)) => {
                let end = usize::try_from(n).ok().and_then(|n| pos.checked_add(n)?.checked_add(2));
                pos = end.filter(|end| *end <= buf.len())?;
            }
            (b'*', Some(n)) => pending = pending.saturating_add(n),
            _ => {}
        }
    }
    Some(pos)
}

#[cfg(test)]
mod tests {
    use academy_server::testing::RedisServer;

    use super::*;

    async fn connect(url: &str) -> Conn {
        let timeout = Duration::from_secs(2);
        let (client, manager) = academy_server::redis::connect(url, timeout).await.unwrap();
        Conn::new(&client, manager, timeout)
    }

    fn pipe<'a>(commands: impl IntoIterator<Item = &'a [&'a str]>) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for args in commands {
            pipe.cmd(args[0]).arg(&args[1..]);
        }
        pipe
    }

    fn idle(conn: &Conn) -> usize {
        conn.lanes.idle.lock().unwrap().len()
    }

    /// An answer of many reads is read whole, and the buffer it took is
    /// not kept.
    #[tokio::test]
    async fn a_large_answer_is_read_whole_and_its_buffer_given_back() {
        let redis = RedisServer::start().expect("redis-server must run for this test");
        let conn = connect(&redis.url()).await;
        let big = "x".repeat(3 << 20);
        let commands: [&[&str]; 3] = [&["SET", "big", &big], &["GET", "big"], &["ECHO", "after"]];
        let answers = conn.pipeline(&pipe(commands)).await.unwrap();
        assert_eq!(answers[1], Value::BulkString(big.into_bytes()));
        assert_eq!(answers[2], Value::BulkString(b"after".to_vec()));
        let lanes = conn.lanes.idle.lock().unwrap();
        assert!(lanes.len() == 1 && lanes[0].buf.capacity() <= KEEP_BUFFER);
    }

    /// As the URL says: a user and password, a database other than 0.
    #[tokio::test]
    async fn a_lane_signs_in_and_selects_the_database() {
        let redis = RedisServer::start().expect("redis-server must run for this test");
        let user = ["ACL", "SETUSER", "app", "on", ">hunter2", "~*", "+@all"];
        assert_eq!(redis.command(&user).unwrap(), "+OK");
        assert_eq!(redis.command(&["CONFIG", "SET", "requirepass", "other"]).unwrap(), "+OK");
        let url = redis.url().replace("redis://", "redis://app:hunter2@").replace("/0", "/3");
        let conn = connect(&url).await;
        let commands: [&[&str]; 3] = [&["SET", "k", "v"], &["INCR", "k"], &["GET", "k"]];
        let answers = conn.pipeline(&pipe(commands)).await.unwrap();
        assert_eq!(idle(&conn), 1, "the round trip was a lane's, and it is kept");
        assert!(matches!(answers[0], Value::Okay), "{answers:?}");
        assert!(matches!(&answers[1], Value::ServerError(e) if e.code() == "ERR"), "{answers:?}");
        assert_eq!(answers[2], Value::BulkString(b"v".to_vec()));
        // The manager, on the same database, sees it; database 0 does not.
        let got: String = redis::cmd("GET").arg("k").query_async(&mut conn.clone()).await.unwrap();
        assert_eq!(got, "v");
        let other = connect(&url.replace("/3", "/0")).await;
        let got: Option<String> =
            redis::cmd("GET").arg("k").query_async(&mut other.clone()).await.unwrap();
        assert_eq!(got, None);
    }

    /// A lane whose connection Redis closed fails its round trip (whether
    /// the command ran is unknown, so it is not sent again), the idle ones
    /// are closed with it, and the next call connects anew.
    #[tokio::test]
    async fn a_closed_lane_fails_once_and_the_next_call_connects_anew() {
        let redis = RedisServer::start().expect("redis-server must run for this test");
        let conn = connect(&redis.url()).await;
        let ping: [&[&str]; 1] = [&["PING"]];
        // Two lanes open, both idle.
        let (first, second) = (conn.lanes.take().unwrap(), conn.lanes.take().unwrap());
        first.run(&conn.lanes, &pipe(ping)).await.unwrap();
        second.run(&conn.lanes, &pipe(ping)).await.unwrap();
        assert_eq!((conn.lanes.open.load(Ordering::Relaxed), idle(&conn)), (2, 2));
        let killed = redis.command(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
        assert_ne!(killed.unwrap(), ":0");
        // One fails, and the other is closed with it: none counts as open.
        assert!(conn.pipeline(&pipe(ping)).await.is_err());
        assert_eq!((conn.lanes.open.load(Ordering::Relaxed), idle(&conn)), (0, 0));
        let answers = conn.pipeline(&pipe(ping)).await.unwrap();
        assert_eq!(answers, [Value::SimpleString("PONG".into())]);
        assert_eq!(idle(&conn), 1);
    }

    /// Redis closes connections idle longer than its `timeout`: a lane it
    /// closed is found closed before use, and the call goes through.
    #[tokio::test]
    async fn a_lane_redis_closed_while_idle_is_not_used() {
        let redis = RedisServer::start().expect("redis-server must run for this test");
        assert_eq!(redis.command(&["CONFIG", "SET", "timeout", "1"]).unwrap(), "+OK");
        let conn = connect(&redis.url()).await;
        let ping: [&[&str]; 1] = [&["PING"]];
        conn.pipeline(&pipe(ping)).await.unwrap();
        let clients = || redis.command(&["CLIENT", "LIST"]).unwrap().matches("id=").count();
        let before = clients();
        let deadline = Instant::now() + Duration::from_secs(10);
        while clients() >= before {
            assert!(Instant::now() < deadline, "Redis never closed the idle connections");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(idle(&conn), 1, "the lane, closed by Redis, is still idle here");
        let answers = conn.pipeline(&pipe(ping)).await.unwrap();
        assert_eq!(answers, [Value::SimpleString("PONG".into())]);
    }

    /// A round trip given up part way closes its lane: its answer, when it
    /// comes, is never read as another call's.
    #[tokio::test]
    async fn an_abandoned_round_trip_closes_its_lane() {
        let redis = RedisServer::start().expect("redis-server must run for this test");
        let conn = connect(&redis.url()).await;
        let slow: [&[&str]; 1] =
            [&["EVAL", "local i = 0 while i < 20000000 do i = i + 1 end return 'slow'", "0"]];
        let slow = pipe(slow);
        let given_up = tokio::time::timeout(Duration::from_millis(20), conn.pipeline(&slow)).await;
        assert!(given_up.is_err(), "the script takes longer than that");
        assert_eq!((conn.lanes.open.load(Ordering::Relaxed), idle(&conn)), (0, 0));
        let echo: [&[&str]; 1] = [&["ECHO", "mine"]];
        let answers = conn.pipeline(&pipe(echo)).await.unwrap();
        assert_eq!(answers, [Value::BulkString(b"mine".to_vec())]);
    }

    /// Calls beyond the lanes go through the manager: no more lanes open.
    #[tokio::test]
    async fn no_more_than_the_lanes_are_opened() {
        let redis = RedisServer::start().expect("redis-server must run for this test");
        let conn = connect(&redis.url()).await;
        let calls = (0..4 * LANES).map(|n| {
            let conn = conn.clone();
            async move {
                let n = n.to_string();
                let echo: [&[&str]; 1] = [&["ECHO", &n]];
                let answers = conn.pipeline(&pipe(echo)).await.unwrap();
                assert_eq!(answers, [Value::BulkString(n.into_bytes())]);
            }
        });
        futures::future::join_all(calls.map(tokio::spawn))
            .await
            .into_iter()
            .for_each(|r| r.unwrap());
        let open = conn.lanes.open.load(Ordering::Relaxed);
        assert!((1..=LANES).contains(&open) && idle(&conn) == open, "{open} open");
    }

    #[test]
    fn a_reply_ends_only_once_all_of_it_is_there() {
        let whole = b"*3\r\n$5\r\nhello\r\n:42\r\n*2\r\n$-1\r\n-ERR no\r\n+OK\r\n";
        let first = whole.len() - 5;
        for cut in 0..first {
            assert_eq!(reply_end(&whole[..cut], 0), None, "cut at {cut}");
        }
        assert_eq!(reply_end(whole, 0), Some(first));
        assert_eq!(reply_end(whole, first), Some(whole.len()));
        // A bulk string holding CRLF is skipped by its length.
        assert_eq!(reply_end(b"$4\r\n\r\n\r\n\r\n", 0), Some(10));
        assert_eq!(reply_end(b"*0\r\n", 0), Some(4));
        assert_eq!(reply_end(b"*-1\r\n", 0), Some(5));
        // Not RESP2: ends at its line, for the parser to refuse.
        assert_eq!(reply_end(b"?what\r\nmore", 0), Some(7));
        assert_eq!(reply_end(b"\r\nmore", 0), Some(2));
        // Lengths past what could ever arrive wait for more (bounded by the
        // round trip's timeout), without overflowing.
        assert_eq!(reply_end(b"$18446744073709551615\r\nab", 0), None);
        assert_eq!(reply_end(b"*18446744073709551615\r\n*18446744073709551615\r\n", 0), None);
    }

    #[test]
    fn an_error_reply_is_an_answer_not_a_failed_round_trip() {
        // As the manager answers a pipeline that ignores errors.
        let answer = redis::parse_redis_value(b"-NOSCRIPT No matching script\r\n").unwrap();
        assert!(matches!(answer, Value::ServerError(e) if e.code() == "NOSCRIPT"));
    }
}
