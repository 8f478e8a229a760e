//! Test support: a real `redis-server` on a free loopback port (and a Unix
//! socket), stopped on drop; certificates for TLS tests ([`TestPki`]); reading a server's
//! metrics ([`scrape`]); the workspace's binaries as processes ([`binary`],
//! [`Children`], [`free_port`]).
//!
//! ```no_run
//! let redis = academy_server::testing::RedisServer::start().expect("redis-server runs");
//! println!("{}", redis.url());
//! ```

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process in its own directory, saving only when
/// restarted.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` (from `PATH`) and waits until it answers PING.
    /// Fails with an actionable message when it is not installed.
    pub fn start() -> std::io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("academy-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = spawn(port, &dir)?;
        let mut server = Self { child, port, dir };
        server.wait_until_ready()?;
        Ok(server)
    }

    /// Stops the server, keeping its data (`SHUTDOWN SAVE`), and starts it
    /// again on the same port: what a Redis restart looks like to clients.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Stops the server, keeping its data (`SHUTDOWN SAVE`): clients see
    /// their connections refused until [`start_again`](Self::start_again).
    pub fn stop(&mut self) -> std::io::Result<()> {
        // The connection closes as Redis exits: no answer to read.
        let _ = self.command(&["SHUTDOWN", "SAVE"]);
        self.child.wait()?;
        Ok(())
    }

    /// Starts a stopped server again on the same port, with its data.
    pub fn start_again(&mut self) -> std::io::Result<()> {
        self.child = spawn(self.port, &self.dir)?;
        self.wait_until_ready()
    }

    fn wait_until_ready(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "redis-server exited at start: {status}"
                )));
            }
            if let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                let mut pong = [0; 7];
                if conn.write_all(b"PING\r\n").is_ok()
                    && conn.read_exact(&mut pong).is_ok()
                    && &pong == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server did not answer PING within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The same server on its Unix-domain socket: `redis+unix:///PATH?db=0`.
    pub fn unix_url(&self) -> String {
        format!("redis+unix://{}?db=0", self.socket().display())
    }

    /// Its Unix-domain socket (beside its data, owner only).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// Sends one command and returns its answer's first line (e.g. `+OK`,
    /// `:1`), or for a bulk string its value (`$-1` for none).
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(request.as_bytes())?;
        let line = |conn: &mut TcpStream| -> std::io::Result<String> {
            let mut answer = Vec::new();
            let mut byte = [0; 1];
            while conn.read(&mut byte)? == 1 && byte[0] != b'\n' {
                answer.push(byte[0]);
            }
            Ok(String::from_utf8_lossy(&answer).trim_end().to_owned())
        };
        let first = line(&mut conn)?;
        match first.strip_prefix('$').and_then(|len| len.parse::<usize>().ok()) {
            Some(len) => {
                // The whole bulk string, which may hold lines (INFO).
                let mut bulk = vec![0; len + 2];
                conn.read_exact(&mut bulk)?;
                bulk.truncate(len);
                Ok(String::from_utf8_lossy(&bulk).into_owned())
            }
            None => Ok(first),
        }
    }

    /// The server's process id (to measure its memory).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn spawn(port: u16, dir: &std::path::Path) -> std::io::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .arg("--unixsocket")
        .arg(dir.join("redis.sock"))
        .args(["--unixsocketperm", "700", "--appendonly", "no", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot run redis-server ({e}): install it with `apt-get install -y redis-server`"),
            )
        })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// PEM certificate and private key.
#[derive(Debug, Clone)]
pub struct CertifiedKey {
    pub cert: String,
    pub key: String,
}

/// Certificates for TLS tests: a CA, a server certificate it signed for
/// `localhost` and `127.0.0.1`, and a client certificate it signed.
#[derive(Debug)]
pub struct TestPki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub server: CertifiedKey,
    pub client: CertifiedKey,
}

impl TestPki {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("no names");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("a key pair generates");
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).expect("the CA signs itself");
        let server = Self::issue_by(&ca, &["localhost", "127.0.0.1"]);
        let client = Self::issue_by(&ca, &["client"]);
        Self { ca, server, client }
    }

    /// The CA's certificate (PEM).
    pub fn ca(&self) -> String {
        self.ca.pem()
    }

    /// A client certificate signed by this CA, with these DNS (or, with a
    /// scheme, URI) subject alternative names.
    pub fn issue(&self, names: &[&str]) -> CertifiedKey {
        Self::issue_by(&self.ca, names)
    }

    fn issue_by(ca: &rcgen::Issuer<'static, rcgen::KeyPair>, names: &[&str]) -> CertifiedKey {
        let key = rcgen::KeyPair::generate().expect("a key pair generates");
        let (uris, names): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| n.contains("://"));
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("valid names");
        for uri in uris {
            let uri = rcgen::string::Ia5String::try_from(uri).expect("an ASCII URI");
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        let cert = params.signed_by(&key, ca).expect("the CA signs");
        CertifiedKey { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// The server side: this PKI's server certificate, and with `mutual` its
    /// CA for client certificates.
    pub fn server_tls(&self, mutual: bool) -> crate::tls::Tls {
        let ca = self.ca();
        let client_ca = mutual.then_some(ca.as_bytes());
        crate::tls::Tls::from_pem(
            self.server.cert.as_bytes(),
            self.server.key.as_bytes(),
            client_ca,
        )
    }
}

/// A certificate, its key and a CA in PEM files of a directory of their own
/// (removed on drop), written again as a renewal would.
#[derive(Debug)]
pub struct PemFiles {
    dir: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

impl PemFiles {
    /// Files in a fresh directory named after `tag` and this process.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("academy-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let (cert, key, ca) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
        Self { dir, cert, key, ca }
    }

    /// Writes `pem`'s certificate and key.
    pub fn write(&self, pem: &CertifiedKey) {
        std::fs::write(&self.cert, &pem.cert).expect("the certificate file");
        std::fs::write(&self.key, &pem.key).expect("the key file");
    }

    /// Writes `ca`'s certificate.
    pub fn write_ca(&self, ca: &TestPki) {
        std::fs::write(&self.ca, ca.ca()).expect("the CA file");
    }
}

impl Drop for PemFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /metrics` from `addr` (blocking; plain HTTP/1.1): the status line
/// and the body.
pub fn scrape(addr: SocketAddr) -> std::io::Result<(String, String)> {
    get(addr, "/metrics")
}

/// `GET path` from `addr` (blocking; plain HTTP/1.1): the status line and
/// the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

/// The value of the sample `series` (name with labels, as printed) in
/// metrics `text`, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A loopback port that is free now, for a process told to listen on it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The workspace's binary `name`, beside the running test's (a test binary
/// runs from `target/<profile>/deps/`; `cargo nextest run --workspace`
/// builds every binary of the workspace first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.parent().and_then(std::path::Path::parent).expect("target/<profile>/deps").join(name)
}

/// Processes killed and reaped when dropped, however the test ends.
#[derive(Debug, Default)]
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
