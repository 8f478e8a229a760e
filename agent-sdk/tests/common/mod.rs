//! A TCP proxy between a test's clients and a server, to stand for the
//! network: it can stall (a partition, a stalled server) and cut every
//! connection (a broken network; clients then connect again through it).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub(crate) struct Proxy {
    pub(crate) addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    /// The forwarding tasks of the connections open now.
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    /// Forwards connections to `upstream`.
    pub(crate) async fn to(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (gate, tasks) = (Arc::clone(&frozen), Arc::clone(&open));
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(ro), Box::new(wi)),
                ] {
                    let gate = gate.clone();
                    let forward = tokio::spawn(async move {
                        let mut buf = vec![0; 64 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf).await {
                            while gate.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    tasks.lock().unwrap().push(forward.abort_handle());
                }
            }
        });
        Self { addr, frozen, open }
    }

    /// Stops forwarding (`true`) or goes on (`false`).
    pub(crate) fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }

    /// Closes every connection open now; new ones go through.
    pub(crate) fn cut(&self) {
        for forward in self.open.lock().unwrap().drain(..) {
            forward.abort();
        }
    }
}
