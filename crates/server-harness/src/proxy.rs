//! A TCP proxy for fault injection: delay, blackhole (partition) and cut.
//!
//! Put it in front of any server and point the client at [`TcpProxy::addr`]. Each accepted
//! connection gets its own upstream connection and four plain threads (a reader and a writer
//! per direction), so no async runtime is involved.
//!
//! * [`TcpProxy::set_delay`] delays every chunk by a fixed time in each direction (one-way
//!   latency; a request/response round trip costs twice the delay). Throughput is not limited.
//! * [`TcpProxy::blackhole`] stops forwarding in both directions and holds new connections:
//!   like a network partition, TCP connections stay open but nothing arrives, so clients see
//!   timeouts. Bytes sent meanwhile are held, not dropped (a real partition that heals before
//!   TCP gives up also delivers them late). [`TcpProxy::heal`] forwards them and resumes.
//!   Follow a blackhole with [`TcpProxy::cut`] to model a partition that outlives the
//!   connections.
//! * [`TcpProxy::cut`] closes every current connection (both sides see a reset/EOF); new
//!   connections are accepted as usual.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{IoContext, Result};

#[derive(Debug, Default)]
struct Control {
    delay: Duration,
    blackholed: bool,
    /// Incremented by `cut`: connections from an older generation are closed.
    generation: u64,
}

#[derive(Debug, Default)]
struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl Shared {
    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn conns(&self) -> MutexGuard<'_, Vec<(u64, TcpStream, TcpStream)>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fault-injecting TCP proxy on a free loopback port. Dropping it closes every connection.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy that forwards to `upstream`, listening on `127.0.0.1` on a free port.
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").ctx(|| "binding the proxy".into())?;
        let addr = listener
            .local_addr()
            .ctx(|| "reading the proxy address".into())?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("proxy-accept-{addr}"))
            .spawn(move || accept_loop(listener, upstream, s))
            .ctx(|| "starting the proxy thread".into())?;
        Ok(TcpProxy {
            addr,
            upstream,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Delays every forwarded chunk by `delay` (each direction). `Duration::ZERO` turns it off.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.control().delay = delay;
        self.shared.changed.notify_all();
    }

    /// Stops forwarding (partition). Connections stay open; see the module docs.
    pub fn blackhole(&self) {
        self.shared.control().blackholed = true;
        self.shared.changed.notify_all();
    }

    /// Ends a blackhole: held bytes are forwarded and traffic flows again.
    pub fn heal(&self) {
        self.shared.control().blackholed = false;
        self.shared.changed.notify_all();
    }

    /// Whether the proxy is blackholed.
    pub fn is_blackholed(&self) -> bool {
        self.shared.control().blackholed
    }

    /// Closes every current connection on both sides. Later connections work normally.
    pub fn cut(&self) {
        self.shared.control().generation += 1;
        let conns = std::mem::take(&mut *self.shared.conns());
        for (_, client, upstream) in conns {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }

    /// The number of connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// The number of connections accepted since the proxy started.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.heal();
        self.cut();
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(client) = stream else { continue };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let s = shared.clone();
        let _ = thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || handle(client, upstream, s));
    }
}

fn handle(client: TcpStream, upstream_addr: SocketAddr, shared: Arc<Shared>) {
    let generation = {
        // Hold new connections while blackholed, like SYNs lost in a partition.
        let mut c = shared.control();
        while c.blackholed && !shared.stopping.load(Ordering::SeqCst) {
            c = shared
                .changed
                .wait_timeout(c, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        c.generation
    };
    let Ok(upstream) = TcpStream::connect_timeout(&upstream_addr, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    {
        let mut conns = shared.conns();
        if shared.control().generation != generation {
            return; // cut while we were connecting
        }
        conns.push((id, c2, u2));
    }
    let pumps = [
        pump(&client, &upstream, shared.clone(), generation),
        pump(&upstream, &client, shared.clone(), generation),
    ];
    for p in pumps.into_iter().flatten() {
        let _ = p.join();
    }
    shared.conns().retain(|(i, _, _)| *i != id);
}

/// Copies `from` -> `to` with delay and blackhole applied; returns the writer thread.
fn pump(
    from: &TcpStream,
    to: &TcpStream,
    shared: Arc<Shared>,
    generation: u64,
) -> Option<thread::JoinHandle<()>> {
    let mut reader = from.try_clone().ok()?;
    let mut writer = to.try_clone().ok()?;
    let source = from.try_clone().ok()?;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader_thread = thread::Builder::new()
        .name("proxy-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .ok()?;
    thread::Builder::new()
        .name("proxy-write".into())
        .spawn(move || {
            for (read_at, chunk) in rx {
                // Wait for the delay to pass and any blackhole to end.
                let mut c = shared.control();
                loop {
                    if c.generation != generation || shared.stopping.load(Ordering::SeqCst) {
                        let _ = writer.shutdown(Shutdown::Both);
                        return;
                    }
                    let due = read_at + c.delay;
                    let now = Instant::now();
                    if !c.blackholed && now >= due {
                        break;
                    }
                    let wait = if c.blackholed {
                        Duration::from_millis(100)
                    } else {
                        due - now
                    };
                    c = shared
                        .changed
                        .wait_timeout(c, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                drop(c);
                if writer.write_all(&chunk).is_err() {
                    // The destination is gone: stop reading the source too.
                    let _ = source.shutdown(Shutdown::Both);
                    break;
                }
            }
            // The source closed: pass the EOF on.
            let _ = writer.shutdown(Shutdown::Write);
            let _ = reader_thread.join();
        })
        .ok()
}
