//! dmrep frontend: the NBD server that exports every mapped device.
//!
//! One export per mapped device, named after it. Clients connect over a Unix socket or
//! TCP ([`NbdServer::listen_unix`], [`NbdServer::listen_tcp`]), negotiate with the
//! fixed newstyle handshake (`handshake.rs`), and then send requests that the connection
//! (`conn.rs`) maps onto [`dmrep_core::MappedDevice::submit`]. The wire format itself
//! lives in [`dmrep_formats::nbd`].
//!
//! Threads: one accept thread per listener; per connection, one thread for the
//! handshake that then becomes the first of up to [`NbdConfig::workers_per_conn`]
//! transmission workers (spawned only when requests are slow enough to be worth running
//! in parallel), plus a reply flusher if the client ever falls behind reading replies.
//! See `conn.rs` for the request path and `reply.rs` for how replies are written.

#![forbid(unsafe_code)]

mod conn;
mod handshake;
mod reply;
mod sock;

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dmrep_core::DeviceRegistry;
use parking_lot::Mutex;
use rustix::io::Errno;

use crate::conn::ConnParams;
use crate::handshake::{HandshakeError, Limits};
use crate::sock::Sock;

/// NBD server settings.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Most threads serving one connection's requests at once (at least 1). Requests
    /// beyond that wait on the socket; a device that blocks `submit` (suspended) holds
    /// at most this many requests per connection.
    pub workers_per_conn: usize,
    /// Largest READ/WRITE payload accepted, advertised as the maximum block size.
    /// Clamped to 4 KiB ..= 1 GiB.
    pub max_request_bytes: u32,
}

impl Default for NbdConfig {
    /// 16 workers (nbdkit's default thread count per connection); 32 MiB requests (the
    /// payload size the NBD spec says every server should accept).
    fn default() -> Self {
        NbdConfig { workers_per_conn: 16, max_request_bytes: 32 << 20 }
    }
}

/// Lowest accepted `max_request_bytes`: the advertised preferred block size, which the
/// spec requires the maximum to be at least.
const MIN_REQUEST_MAX: u32 = handshake::PREFERRED_BLOCK;
/// Highest accepted `max_request_bytes`: keeps one request's buffer reasonable.
const MAX_REQUEST_MAX: u32 = 1 << 30;
/// Pause after `accept` fails for lack of resources (file descriptors, memory), so the
/// accept loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long `shutdown` lets a connection finish its requests in flight before cutting
/// the socket (a client that does not read its replies would otherwise hold it forever).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A listening socket, kept so that `shutdown` can wake its accept thread.
enum Listener {
    Unix {
        listener: Arc<UnixListener>,
        path: PathBuf,
        /// (device, inode) of the socket file we created: removed at shutdown only if
        /// it is still ours.
        id: (u64, u64),
    },
    Tcp(Arc<TcpListener>),
}

struct ConnEntry {
    sock: Arc<Sock>,
    thread: Option<JoinHandle<()>>,
}

/// The NBD server. Create with [`NbdServer::new`], add listeners, and call
/// [`NbdServer::shutdown`] to stop (its threads hold references to it until then).
pub struct NbdServer {
    devices: Arc<DeviceRegistry>,
    cfg: NbdConfig,
    shutting_down: Arc<AtomicBool>,
    listeners: Mutex<Vec<Listener>>,
    accept_threads: Mutex<Vec<JoinHandle<()>>>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
}

impl NbdServer {
    pub fn new(devices: Arc<DeviceRegistry>, cfg: NbdConfig) -> Arc<Self> {
        let cfg = NbdConfig {
            workers_per_conn: cfg.workers_per_conn.max(1),
            max_request_bytes: cfg.max_request_bytes.clamp(MIN_REQUEST_MAX, MAX_REQUEST_MAX),
        };
        Arc::new(NbdServer {
            devices,
            cfg,
            shutting_down: Arc::new(AtomicBool::new(false)),
            listeners: Mutex::new(Vec::new()),
            accept_threads: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Listen on a Unix socket at `path`. A stale socket file there (nobody accepting)
    /// is removed; a live one, or any other kind of file, is an error.
    pub fn listen_unix(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        self.check_running()?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = Arc::new(UnixListener::bind(path)?);
        let meta = std::fs::symlink_metadata(path)?;
        let l = listener.clone();
        self.start_accept(
            format!("unix:{}", path.display()),
            Listener::Unix { listener, path: path.to_path_buf(), id: (meta.dev(), meta.ino()) },
            move || l.accept().map(|(s, _)| Sock::Unix(s)),
        )?;
        tracing::info!(path = %path.display(), "NBD server listening");
        Ok(())
    }

    /// Listen on TCP at `addr` (`host:port`; port 0 picks one). Returns the bound address.
    pub fn listen_tcp(self: &Arc<Self>, addr: &str) -> io::Result<SocketAddr> {
        self.check_running()?;
        let listener = Arc::new(TcpListener::bind(addr)?);
        let local = listener.local_addr()?;
        let l = listener.clone();
        self.start_accept(format!("tcp:{local}"), Listener::Tcp(listener), move || {
            let (s, _) = l.accept()?;
            // Replies are single sendmsg calls; never hold one back waiting for more.
            s.set_nodelay(true)?;
            Ok(Sock::Tcp(s))
        })?;
        tracing::info!(addr = %local, "NBD server listening");
        Ok(local)
    }

    /// Stop: stop accepting, stop reading requests on every connection, wait for the
    /// requests in flight to be answered, close the connections and join all threads.
    /// Requests held by a suspended device are waited for too.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let listeners = std::mem::take(&mut *self.listeners.lock());
        for l in &listeners {
            // Wakes the blocked accept() (Linux returns EINVAL to it).
            let _ = match l {
                Listener::Unix { listener, .. } => rustix::net::shutdown(listener.as_fd(), rustix::net::Shutdown::Both),
                Listener::Tcp(listener) => rustix::net::shutdown(listener.as_fd(), rustix::net::Shutdown::Both),
            };
        }
        let accepters = std::mem::take(&mut *self.accept_threads.lock());
        for t in accepters {
            let _ = t.join();
        }
        for l in listeners {
            if let Listener::Unix { path, id, .. } = l {
                let ours = std::fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino()) == id).unwrap_or(false);
                if ours {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        loop {
            let entries: Vec<ConnEntry> = self.conns.lock().drain().map(|(_, e)| e).collect();
            if entries.is_empty() {
                break;
            }
            for e in &entries {
                // Stop reading; replies to requests in flight can still go out.
                e.sock.shutdown(Shutdown::Read);
            }
            for e in entries {
                let Some(t) = e.thread else { continue };
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if !t.is_finished() {
                    tracing::warn!("an NBD connection did not finish in time; cutting it");
                    e.sock.shutdown(Shutdown::Both);
                }
                let _ = t.join();
            }
        }
        tracing::info!("NBD server stopped");
    }

    /// Open connections (negotiating or transmitting).
    pub fn connections(&self) -> usize {
        self.conns.lock().len()
    }

    fn check_running(&self) -> io::Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(io::Error::other("the NBD server is shut down"));
        }
        Ok(())
    }

    fn start_accept(
        self: &Arc<Self>,
        name: String,
        listener: Listener,
        accept: impl Fn() -> io::Result<Sock> + Send + 'static,
    ) -> io::Result<()> {
        let me = self.clone();
        let thread =
            std::thread::Builder::new().name("nbd-accept".into()).spawn(move || me.accept_loop(&name, accept))?;
        self.listeners.lock().push(listener);
        self.accept_threads.lock().push(thread);
        if self.shutting_down.load(Ordering::SeqCst) {
            // Raced with shutdown(): undo, so nothing is left running.
            self.shutdown();
        }
        Ok(())
    }

    fn accept_loop(self: &Arc<Self>, name: &str, accept: impl Fn() -> io::Result<Sock>) {
        loop {
            let res = accept();
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            match res {
                Ok(sock) => self.spawn_conn(sock),
                Err(e) => match rustix::io::Errno::from_io_error(&e) {
                    Some(Errno::INTR) | Some(Errno::CONNABORTED) => {}
                    Some(Errno::MFILE) | Some(Errno::NFILE) | Some(Errno::NOBUFS) | Some(Errno::NOMEM) => {
                        tracing::warn!(listener = name, "accept: {e}; retrying shortly");
                        std::thread::sleep(ACCEPT_BACKOFF);
                    }
                    Some(Errno::INVAL) | Some(Errno::BADF) => {
                        tracing::error!(listener = name, "accept: {e}; listener stopped");
                        return;
                    }
                    _ => tracing::warn!(listener = name, "accept: {e}"),
                },
            }
        }
    }

    fn spawn_conn(self: &Arc<Self>, sock: Sock) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sock = Arc::new(sock);
        let mut conns = self.conns.lock();
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let s = sock.clone();
        let spawned = std::thread::Builder::new().name(format!("nbd-c{id}")).spawn(move || {
            me.run_conn(id, s);
            me.conns.lock().remove(&id);
        });
        match spawned {
            Ok(t) => {
                conns.insert(id, ConnEntry { sock, thread: Some(t) });
            }
            Err(e) => tracing::warn!("cannot spawn a connection thread: {e}"),
        }
    }

    fn run_conn(&self, id: u64, sock: Arc<Sock>) {
        let span = tracing::info_span!("nbd", conn = id, peer = %sock.peer());
        let _e = span.enter();
        tracing::debug!("NBD connection opened");
        let limits = Limits { max_request: self.cfg.max_request_bytes };
        match handshake::negotiate(&sock, &self.devices, &limits) {
            Ok(Some(neg)) => {
                tracing::info!(
                    export = %neg.export,
                    structured = neg.structured,
                    "NBD client entered transmission"
                );
                let params = ConnParams {
                    id,
                    max_request: self.cfg.max_request_bytes,
                    workers: self.cfg.workers_per_conn,
                    server_stop: self.shutting_down.clone(),
                };
                conn::serve(sock.clone(), neg, params, span.clone());
            }
            Ok(None) => tracing::debug!("NBD client aborted the negotiation"),
            Err(HandshakeError::Io(e)) => tracing::debug!("NBD handshake: {e}"),
            Err(e) => tracing::warn!("NBD handshake failed: {e}"),
        }
        sock.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests;
