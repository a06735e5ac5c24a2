//! A TCP forwarder between the relay and a server (Postgres, a broker) that
//! can fail the way networks do without telling anyone:
//! - [`freeze`](Proxy::freeze): existing connections stop forwarding while
//!   their sockets stay open (a frozen NAT entry, a dead VM behind a proxy);
//!   new connections pass;
//! - [`blackhole`](Proxy::blackhole): nothing forwards, new connections
//!   included (they are accepted, then hang);
//! - [`cut`](Proxy::cut): existing connections are closed.
//!
//! Userspace: the kernel acknowledges every byte sent to the proxy, so only
//! application-level timeouts notice a freeze.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A forwarder on 127.0.0.1 (port 0) to `target`, running on the test's
/// tokio runtime until dropped.
pub struct Proxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// Ids of accepted connections, in order.
    next_id: AtomicU64,
    /// Connections with an id below this are frozen.
    frozen_below: AtomicU64,
    /// Connections with an id below this are closed.
    cut_below: AtomicU64,
    blackhole: AtomicBool,
    /// Bumped on every state change, so parked pumps re-check.
    changes: watch::Sender<u64>,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Where new connections go.
    target: std::sync::Mutex<SocketAddr>,
}

impl Shared {
    fn stalled(&self, id: u64) -> bool {
        self.blackhole.load(Ordering::SeqCst) || id < self.frozen_below.load(Ordering::SeqCst)
    }

    fn is_cut(&self, id: u64) -> bool {
        id < self.cut_below.load(Ordering::SeqCst)
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }
}

impl Proxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy on 127.0.0.1:0");
        let address = listener.local_addr().expect("proxy address");
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(0),
            frozen_below: AtomicU64::new(0),
            cut_below: AtomicU64::new(0),
            blackhole: AtomicBool::new(false),
            changes,
            accepted: AtomicUsize::new(0),
            target: std::sync::Mutex::new(target),
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let shared = accept_shared.clone();
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let target = *shared.target.lock().unwrap_or_else(|p| p.into_inner());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = tokio::spawn(pump(client_read, server_write, id, shared.clone()));
                    let down = tokio::spawn(pump(server_read, client_write, id, shared));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Proxy { address, shared, task }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sends new connections to `target` (for a server started after the proxy).
    pub fn retarget(&self, target: SocketAddr) {
        *self.shared.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Existing connections stop forwarding (sockets stay open); new ones pass.
    pub fn freeze(&self) {
        let next = self.shared.next_id.load(Ordering::SeqCst);
        self.shared.frozen_below.store(next, Ordering::SeqCst);
        self.shared.changed();
    }

    /// Nothing forwards, on any connection, new ones included.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
        self.shared.changed();
    }

    /// Closes every existing connection.
    pub fn cut(&self) {
        let next = self.shared.next_id.load(Ordering::SeqCst);
        self.shared.cut_below.store(next, Ordering::SeqCst);
        self.shared.changed();
    }

    /// Connections accepted so far (reconnects show up here).
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// Copies `from` to `to` while the connection is neither stalled nor cut;
/// a stalled connection keeps both sockets open and reads nothing.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, id: u64, shared: Arc<Shared>) {
    let mut changes = shared.changes.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while shared.stalled(id) && !shared.is_cut(id) {
            if changes.changed().await.is_err() {
                return;
            }
        }
        if shared.is_cut(id) {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => { let _ = to.shutdown().await; return; }
                Ok(n) => n,
            },
            _ = changes.changed() => continue,
        };
        // A freeze that began while reading swallows what was read, as a dead path does.
        if shared.stalled(id) || shared.is_cut(id) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
