//! Accepting connections with bounds (docs/design.md, "Limits"): at most so
//! many at once, and per peer address; a connection must start its
//! handshake within a time limit; running out of file descriptors backs off
//! instead of spinning. Accepted connections have TCP_NODELAY set (small
//! messages must not wait for Nagle). A server listens on TCP or on a
//! Unix-domain socket ([`Address`]), and with TLS completes each
//! connection's handshake (within the same time limit) before serving it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::either::Either;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::Acceptor;

/// Bounds on the connections a server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// Most connections open at once from one peer address.
    pub max_per_peer: usize,
    /// How long a new connection may take to start its handshake (the
    /// HTTP/2 preface, or a TLS ClientHello) before it is closed.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_per_peer: 1_000,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl ConnectionLimits {
    /// These limits, with `max_connections` lowered to leave room within
    /// the process's file descriptor limit (`fd_limit`) for everything else.
    pub fn within(self, fd_limit: u64) -> Self {
        let room = usize::try_from(fd_limit.saturating_sub(64)).unwrap_or(usize::MAX).max(16);
        Self { max_connections: self.max_connections.min(room), ..self }
    }
}

/// Raises the soft limit of open files to the hard limit (servers hold a
/// descriptor per connection); answers the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write `limit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Where a server listens: a TCP address (`HOST:PORT`) or a Unix-domain
/// socket (`unix:/path`), for processes on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Self::Tcp(addr)
    }
}

impl std::str::FromStr for Address {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.strip_prefix("unix:") {
            Some("") => Err("unix: needs a path, as in unix:/run/academy.sock".into()),
            Some(path) => Ok(Self::Unix(path.into())),
            None => text
                .parse()
                .map(Self::Tcp)
                .map_err(|e| format!("{e}: expected HOST:PORT or unix:/path")),
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Address {
    /// The URL clients use: `http(s)://HOST:PORT`, or `unix:/path`.
    pub fn url(&self, tls: bool) -> String {
        match self {
            Self::Tcp(addr) => format!("{}://{addr}", if tls { "https" } else { "http" }),
            Self::Unix(_) => self.to_string(),
        }
    }

    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(addr) => Some(*addr),
            Self::Unix(_) => None,
        }
    }
}

/// A bound listener: TCP, or a Unix socket (whose file the server removes
/// when it stops: [`Address::release`]).
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `address`. A Unix socket file left by a process that died
    /// (nobody accepts on it) is replaced; one a live server listens on is
    /// `AddrInUse`, and any other file `AlreadyExists`.
    pub async fn bind(address: &Address) -> std::io::Result<Self> {
        match address {
            Address::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            Address::Unix(path) => {
                if let Ok(found) = std::fs::symlink_metadata(path) {
                    use std::io::{Error, ErrorKind};
                    use std::os::unix::fs::FileTypeExt as _;
                    let shown = path.display();
                    if !found.file_type().is_socket() {
                        let why = format!("{shown} exists and is not a socket");
                        return Err(Error::new(ErrorKind::AlreadyExists, why));
                    }
                    match UnixStream::connect(path).await {
                        // Only a refusal says nobody listens: a full
                        // backlog (EAGAIN) is a live server too.
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                            std::fs::remove_file(path)?;
                        }
                        Ok(_) => {
                            let why = format!("a server listens on {shown} already");
                            return Err(Error::new(ErrorKind::AddrInUse, why));
                        }
                        Err(e) => {
                            let why =
                                format!("cannot tell whether a server listens on {shown}: {e}");
                            return Err(Error::new(e.kind(), why));
                        }
                    }
                }
                Ok(Self::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }

    /// The address it is bound to (with the port chosen for port 0).
    pub fn address(&self) -> std::io::Result<Address> {
        match self {
            Self::Tcp(listener) => Ok(Address::Tcp(listener.local_addr()?)),
            Self::Unix(_, path) => Ok(Address::Unix(path.clone())),
        }
    }

    async fn accept(&self) -> std::io::Result<(Io, Option<IpAddr>)> {
        match self {
            Self::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((Either::Left(stream), Some(peer.ip())))
            }
            Self::Unix(listener, _) => Ok((Either::Right(listener.accept().await?.0), None)),
        }
    }
}

impl Address {
    /// Removes the socket file of a Unix address (a server that stopped
    /// listening on it); nothing for TCP.
    pub fn release(&self) {
        if let Self::Unix(path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A TCP or a Unix-domain connection.
type Io = Either<TcpStream, UnixStream>;

/// A connection, over TLS or not.
type Secured = Either<Io, Box<tokio_rustls::server::TlsStream<Io>>>;

/// A connection accepted within the limits; its slots are given back when it
/// closes.
#[derive(Debug)]
pub struct Bounded {
    stream: Secured,
    _slot: OwnedSemaphorePermit,
    /// Its peer's share of the per-peer limit (TCP only: a Unix socket's
    /// peers are this node's processes, guarded by the file's permissions).
    _peer: Option<PeerSlot>,
}

/// One of a peer's connections; the count goes down when it is dropped.
#[derive(Debug)]
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = peers.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

/// What a call's request knows of its connection (in its extensions).
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    /// The addresses of a TCP connection.
    pub tcp: TcpConnectInfo,
    /// The certificates the client showed (mutual TLS), leaf first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Connected for Bounded {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let (io, peer_certs) = match &self.stream {
            Either::Left(io) => (io, None),
            Either::Right(tls) => {
                let (io, session) = tls.get_ref();
                (io, session.peer_certificates().map(|certs| Arc::new(certs.to_vec())))
            }
        };
        let tcp = match io {
            Either::Left(tcp) => tcp.connect_info(),
            Either::Right(_) => TcpConnectInfo { local_addr: None, remote_addr: None },
        };
        ConnectInfo { tcp, peer_certs }
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections of `listener` that come within `limits` (with `tls`,
/// those whose TLS handshake completes), as a stream for tonic's
/// `serve_with_incoming`. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: Listener,
    limits: ConnectionLimits,
    tls: Option<Acceptor>,
) -> impl futures::Stream<Item = std::io::Result<Bounded>> {
    let (ready, accepted) = mpsc::channel(128);
    tokio::spawn(accept(listener, limits, tls, ready));
    tokio_stream::wrappers::ReceiverStream::new(accepted)
}

/// Bytes that show a handshake has started: the whole HTTP/2 preface of a
/// plaintext client, or the header of a TLS record.
fn handshake_bytes(first: u8) -> usize {
    if first == b'P' { 24 } else { 5 }
}

async fn accept(
    listener: Listener,
    limits: ConnectionLimits,
    tls: Option<Acceptor>,
    ready: mpsc::Sender<std::io::Result<Bounded>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut refused = Refusals::default();
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = tokio::select! {
            () = ready.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(10);
                    accepted
                }
                Err(e) if out_of_resources(&e) => {
                    // Out of descriptors: accepting again at once would
                    // spin; connections closing will free some.
                    refused.note("the process is out of file descriptors");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                Err(_) => continue,
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.note("the server holds --max-connections connections");
            continue;
        };
        let peer = match peer {
            None => None,
            Some(ip) => {
                let mut counts = peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let count = counts.entry(ip).or_default();
                if *count >= limits.max_per_peer {
                    drop(counts);
                    refused.note("a peer holds --max-connections-per-peer connections");
                    continue;
                }
                *count += 1;
                Some(PeerSlot { peers: peers.clone(), ip })
            }
        };
        let (ready, tls) = (ready.clone(), tls.as_ref().map(Acceptor::current));
        tokio::spawn(async move {
            let ready_to_go = match &stream {
                Either::Left(tcp) => {
                    handshake(tcp, limits.handshake_timeout).await && tcp.set_nodelay(true).is_ok()
                }
                Either::Right(_) => true,
            };
            if !ready_to_go {
                return;
            }
            let stream = match tls {
                None => Either::Left(stream),
                Some(tls) => {
                    match academy_tls::handshake(tls, stream, limits.handshake_timeout).await {
                        Some(tls) => Either::Right(Box::new(tls)),
                        None => return,
                    }
                }
            };
            let _ = ready.send(Ok(Bounded { stream, _slot: slot, _peer: peer })).await;
        });
    }
}

/// Waits until `stream` shows the start of a handshake, at most `timeout`.
async fn handshake(stream: &TcpStream, timeout: Duration) -> bool {
    let started = async {
        let mut bytes = [0u8; 24];
        loop {
            let n = stream.peek(&mut bytes).await.ok()?;
            if n == 0 {
                return None; // closed
            }
            if n >= handshake_bytes(bytes[0]) {
                return Some(());
            }
            // A few bytes so far: wait for the rest of the packet(s).
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    matches!(tokio::time::timeout(timeout, started).await, Ok(Some(())))
}

fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Counts refused connections, logging at most every ten seconds.
#[derive(Debug, Default)]
struct Refusals {
    since: Option<Instant>,
    count: usize,
}

impl Refusals {
    fn note(&mut self, why: &str) {
        self.count += 1;
        if self.since.is_none_or(|since| since.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!(refused = self.count, why, "closing new connections");
            self.since = Some(Instant::now());
            self.count = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_tcp_or_unix_sockets() {
        let unix: Address = "unix:/run/a.sock".parse().unwrap();
        assert_eq!(unix, Address::Unix("/run/a.sock".into()));
        assert_eq!(
            (unix.to_string(), unix.url(true)),
            ("unix:/run/a.sock".into(), "unix:/run/a.sock".into())
        );
        let tcp: Address = "127.0.0.1:50051".parse().unwrap();
        assert_eq!(tcp.url(false), "http://127.0.0.1:50051");
        assert_eq!(tcp.url(true), "https://127.0.0.1:50051");
        assert!("unix:".parse::<Address>().unwrap_err().contains("needs a path"));
        assert!("example.org".parse::<Address>().unwrap_err().contains("unix:/path"));
    }

    /// A socket file nobody accepts on is taken over; one whose server
    /// lives is not, even with its backlog full; nor is any other file.
    #[tokio::test]
    async fn a_unix_socket_is_taken_over_only_when_nobody_listens() {
        let dir = std::env::temp_dir().join(format!("academy-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let address = Address::Unix(path.clone());
        // Left by a process that died: the file stays, nobody accepts.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let taken = Listener::bind(&address).await.unwrap();
        drop(taken);
        let _ = std::fs::remove_file(&path);
        // A live server that accepts nothing, its backlog filled up.
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut queued = Vec::new();
        for _ in 0..100_000 {
            match UnixStream::connect(&path).await {
                Ok(stream) => queued.push(stream),
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
                    break;
                }
            }
        }
        let Err(err) = Listener::bind(&address).await else {
            panic!("a live server's socket is kept")
        };
        assert!(err.to_string().contains("s.sock"), "{err}");
        assert!(path.exists());
        drop((live, queued));
        std::fs::remove_file(&path).unwrap();
        // Any other file is left alone.
        std::fs::write(&path, "keep me").unwrap();
        let Err(err) = Listener::bind(&address).await else { panic!("a plain file is kept") };
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_connection_cap_leaves_room_within_the_descriptor_limit() {
        let limits = ConnectionLimits::default();
        assert_eq!(limits.within(1024).max_connections, 960);
        assert_eq!(limits.within(1 << 20).max_connections, 10_000);
        assert_eq!(limits.within(10).max_connections, 16);
        assert!(raise_fd_limit() >= 64);
    }
}
