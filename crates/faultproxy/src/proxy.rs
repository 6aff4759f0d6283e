//! The proxy: an accept thread, and per connection four workers (a reader and a
//! writer for each direction) joined by a timestamped queue.
//!
//! A reader stamps each chunk with the time it was read and queues it; the writer of
//! that direction writes it once `stamp + delay` has passed, the direction is not
//! stalled, the connection is not blackholed and the direction's token bucket allows.
//! So delay adds latency without limiting throughput (many chunks are in flight), order
//! is kept (one FIFO per direction), and a held direction pushes back on its sender
//! through TCP flow control once [`QUEUE_LIMIT`] bytes are waiting.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::bucket::{Bucket, Grant};

/// Bytes read at once from a socket: the size of a queued chunk.
pub const CHUNK: usize = 64 * 1024;

/// Bytes queued per direction and connection before the reader stops reading (and TCP
/// flow control stops the sender). With a delay `d`, one connection moves at most
/// `QUEUE_LIMIT / d` bytes per second in a direction: 1.6 GB/s at 20 ms.
pub const QUEUE_LIMIT: usize = 32 * 1024 * 1024;

/// How long a connection to the target may take before the client is dropped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a blocked write waits before looking again whether the connection died.
const WRITE_POLL: Duration = Duration::from_millis(50);

/// One direction of forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to target: what the connecting side sends.
    Up,
    /// Target to client: what the listening side sends back.
    Down,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "up" => Ok(Direction::Up),
            "down" => Ok(Direction::Down),
            _ => Err(format!("direction must be up or down, not {s:?}")),
        }
    }
}

/// Counters since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStats {
    /// Connections accepted, refused ones included.
    pub accepted: u64,
    /// Of those, closed at once because `refuse` was on.
    pub refused: u64,
    /// Connections open now (blackholed ones included).
    pub active: u64,
    /// Bytes written to the target (client to target).
    pub bytes_up: u64,
    /// Bytes written to the client (target to client).
    pub bytes_down: u64,
}

impl ProxyStats {
    /// One line of JSON, as the control socket's `stats` answers.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// A running proxy: forwards every connection accepted on [`addr`](Self::addr) to the
/// target, applying the faults set on it. Dropping it stops it: the listener closes,
/// every connection is reset, and every thread has exited when `drop` returns.
pub struct FaultProxy {
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy").field("addr", &self.addr).field("target", &self.shared.target).finish()
    }
}

impl FaultProxy {
    /// Binds `listen` (port 0 picks one: see [`addr`](Self::addr)) and starts forwarding
    /// to `target`, with no fault set.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = Arc::new(TcpListener::bind(listen)?);
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(target));
        let accept = {
            let shared = shared.clone();
            let listener = listener.clone();
            thread::Builder::new().name("faultproxy-accept".into()).spawn(move || accept_loop(&shared, &listener))?
        };
        Ok(FaultProxy { shared, listener, addr, accept: Some(accept) })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// One-way delay added to each direction (so a round trip gains twice this). Applies
    /// to data already queued as well: a chunk read at `t` is written at `t + delay`.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(us, Ordering::SeqCst);
        self.shared.wake_all();
    }

    /// The one-way delay now in force.
    pub fn delay(&self) -> Duration {
        self.shared.delay()
    }

    /// Caps each direction at `rate` bytes per second, shared by all connections;
    /// `None` lifts the cap, `Some(0)` holds everything until the rate changes.
    pub fn set_rate(&self, rate: Option<u64>) {
        let now = Instant::now();
        for b in &self.shared.buckets {
            b.lock().set_rate(rate, now);
        }
        self.shared.wake_all();
    }

    /// The rate cap now in force.
    pub fn rate(&self) -> Option<u64> {
        self.shared.buckets[0].lock().rate()
    }

    /// Resets every open connection, on both sides (RST: SO_LINGER 0, then close).
    pub fn drop_connections(&self) {
        let conns = self.shared.conns.lock();
        for c in conns.values() {
            c.abort();
        }
    }

    /// `true`: forward nothing either way, send nothing back, discard what arrives, and
    /// accept new connections without connecting them anywhere. `false`: new
    /// connections work again; the connections that were blackholed are reset.
    pub fn blackhole(&self, on: bool) {
        let conns = self.shared.conns.lock();
        let was = self.shared.blackhole.swap(on, Ordering::SeqCst);
        match (was, on) {
            (false, true) => {
                for c in conns.values() {
                    c.blackholed.store(true, Ordering::SeqCst);
                    for p in &c.pipes {
                        let mut q = p.q.lock();
                        q.items.clear();
                        q.bytes = 0;
                        p.cv.notify_all();
                    }
                }
            }
            (true, false) => {
                for c in conns.values().filter(|c| c.blackholed.load(Ordering::SeqCst)) {
                    c.abort();
                }
            }
            _ => {}
        }
    }

    /// Stops (`true`) or resumes forwarding one direction. Held data is kept and flows
    /// again on resume; meanwhile the sender is pushed back by TCP flow control.
    pub fn stall(&self, dir: Direction, on: bool) {
        self.shared.stall[dir.index()].store(on, Ordering::SeqCst);
        self.shared.wake_all();
    }

    /// `true`: new connections are accepted and at once reset.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::SeqCst);
    }

    /// Counters since start.
    pub fn stats(&self) -> ProxyStats {
        let s = &self.shared;
        ProxyStats {
            accepted: s.accepted.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            active: s.conns.lock().len() as u64,
            bytes_up: s.bytes[0].load(Ordering::SeqCst),
            bytes_down: s.bytes[1].load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        // On Linux, shutting a listening socket down wakes a thread blocked in accept().
        // Should it not, a connection of our own does.
        if rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Both).is_err() {
            let _ = TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1));
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for c in s.conns.lock().values() {
            c.abort();
        }
        let mut n = s.threads.lock();
        while *n > 0 {
            s.threads_cv.wait(&mut n);
        }
    }
}

/// The address to connect to in order to reach a listener bound to `addr`.
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
}

struct Shared {
    target: SocketAddr,
    stop: AtomicBool,
    delay_us: AtomicU64,
    stall: [AtomicBool; 2],
    /// Changed only with `conns` locked, so a connection registers knowing it.
    blackhole: AtomicBool,
    refuse: AtomicBool,
    buckets: [Mutex<Bucket>; 2],
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    bytes: [AtomicU64; 2],
    /// Threads running besides the accept thread; `Drop` waits for none.
    threads: Mutex<usize>,
    threads_cv: Condvar,
}

impl Shared {
    fn new(target: SocketAddr) -> Self {
        Shared {
            target,
            stop: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            stall: [AtomicBool::new(false), AtomicBool::new(false)],
            blackhole: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            buckets: [Mutex::new(Bucket::new()), Mutex::new(Bucket::new())],
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            threads: Mutex::new(0),
            threads_cv: Condvar::new(),
        }
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::SeqCst))
    }

    /// Wakes every writer so it sees a changed setting. Writers read settings with
    /// their queue locked, and this takes each queue's lock, so no wake-up is lost.
    fn wake_all(&self) {
        for c in self.conns.lock().values() {
            c.wake();
        }
    }

    /// Spawns `f` as a counted thread (see `threads`).
    fn spawn(self: &Arc<Self>, name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let guard = ThreadGuard::new(self.clone());
        thread::Builder::new().name(name).spawn(move || {
            let _guard = guard;
            f()
        })?;
        Ok(())
    }
}

struct ThreadGuard(Arc<Shared>);

impl ThreadGuard {
    fn new(shared: Arc<Shared>) -> Self {
        *shared.threads.lock() += 1;
        ThreadGuard(shared)
    }
}

impl Drop for ThreadGuard {
    fn drop(&mut self) {
        let mut n = self.0.threads.lock();
        *n -= 1;
        if *n == 0 {
            self.0.threads_cv.notify_all();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let res = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let client = match res {
            Ok((s, _)) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
            Err(_) => {
                // Out of descriptors and the like: give closing connections a moment.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refuse.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            reset(&client);
            continue;
        }
        let s = shared.clone();
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        // A failed spawn drops the client: it sees the connection close.
        let _ = shared.spawn(format!("faultproxy-setup-{id}"), move || setup(&s, id, client));
    }
}

/// Closes `sock` with a reset rather than a FIN.
fn reset(sock: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(sock, Some(Duration::ZERO));
}

/// Connects an accepted client to the target (unless blackholed) and starts its workers.
fn setup(shared: &Arc<Shared>, id: u64, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = client.set_write_timeout(Some(WRITE_POLL));
    {
        let mut conns = shared.conns.lock();
        if shared.blackhole.load(Ordering::SeqCst) {
            // Goes nowhere: read and discard until the blackhole lifts.
            let conn = Arc::new(Conn::new(id, client, None, true));
            if shared.stop.load(Ordering::SeqCst) {
                conn.abort();
                return;
            }
            conns.insert(id, conn.clone());
            drop(conns);
            start_workers(shared, &conn, vec![("bh", Box::new(|s, c| reader(s, c, Direction::Up)))]);
            return;
        }
    }
    let target = match TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) {
        Ok(t) => t,
        Err(_) => {
            reset(&client);
            return;
        }
    };
    let _ = target.set_nodelay(true);
    let _ = target.set_write_timeout(Some(WRITE_POLL));
    let mut conns = shared.conns.lock();
    let conn = Arc::new(Conn::new(id, client, Some(target), shared.blackhole.load(Ordering::SeqCst)));
    if shared.stop.load(Ordering::SeqCst) {
        conn.abort();
        return;
    }
    conns.insert(id, conn.clone());
    drop(conns);
    start_workers(
        shared,
        &conn,
        vec![
            ("up-rd", Box::new(|s, c| reader(s, c, Direction::Up))),
            ("up-wr", Box::new(|s, c| writer(s, c, Direction::Up))),
            ("down-rd", Box::new(|s, c| reader(s, c, Direction::Down))),
            ("down-wr", Box::new(|s, c| writer(s, c, Direction::Down))),
        ],
    );
}

type Work = Box<dyn FnOnce(&Shared, &Conn) + Send>;

/// Runs each of `work` on a thread of its own as `conn`'s workers; the last worker to
/// end unregisters the connection, which closes its sockets.
fn start_workers(shared: &Arc<Shared>, conn: &Arc<Conn>, work: Vec<(&str, Work)>) {
    // Counted before any starts, so that one ending early does not unregister the rest.
    conn.workers.store(work.len(), Ordering::SeqCst);
    for (what, f) in work {
        let guard = WorkerGuard { shared: shared.clone(), conn: conn.clone() };
        let res = shared.spawn(format!("faultproxy-{}-{what}", conn.id), move || f(&guard.shared, &guard.conn));
        if res.is_err() {
            conn.abort();
        }
    }
}

struct WorkerGuard {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        if self.conn.workers.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.conns.lock().remove(&self.conn.id);
        }
    }
}

enum Item {
    Data { at: Instant, data: Vec<u8> },
    Eof { at: Instant },
}

impl Item {
    fn at(&self) -> Instant {
        match self {
            Item::Data { at, .. } | Item::Eof { at } => *at,
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
}

/// One direction's queue. Its condvar wakes both the reader (room) and the writer (data,
/// or a changed setting).
#[derive(Default)]
struct Pipe {
    q: Mutex<Queue>,
    cv: Condvar,
}

struct Conn {
    id: u64,
    client: TcpStream,
    /// `None` for a connection accepted while blackholed.
    target: Option<TcpStream>,
    pipes: [Pipe; 2],
    dead: AtomicBool,
    blackholed: AtomicBool,
    workers: AtomicUsize,
}

impl Conn {
    fn new(id: u64, client: TcpStream, target: Option<TcpStream>, blackholed: bool) -> Self {
        Conn {
            id,
            client,
            target,
            pipes: [Pipe::default(), Pipe::default()],
            dead: AtomicBool::new(false),
            blackholed: AtomicBool::new(blackholed),
            workers: AtomicUsize::new(0),
        }
    }

    fn dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn blackholed(&self) -> bool {
        self.blackholed.load(Ordering::SeqCst)
    }

    /// The socket a direction reads from.
    fn src(&self, dir: Direction) -> Option<&TcpStream> {
        match dir {
            Direction::Up => Some(&self.client),
            Direction::Down => self.target.as_ref(),
        }
    }

    /// The socket a direction writes to.
    fn dst(&self, dir: Direction) -> Option<&TcpStream> {
        match dir {
            Direction::Up => self.target.as_ref(),
            Direction::Down => Some(&self.client),
        }
    }

    fn wake(&self) {
        for p in &self.pipes {
            let _q = p.q.lock();
            p.cv.notify_all();
        }
    }

    /// Kills the connection: both sockets will close with a reset once the workers,
    /// woken here, have let go of them.
    fn abort(&self) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        for s in std::iter::once(&self.client).chain(self.target.as_ref()) {
            reset(s);
            // Wakes a reader blocked in read() (it returns 0) and sends nothing.
            let _ = s.shutdown(Shutdown::Read);
        }
        self.wake();
    }
}

/// Reads one direction's source into its queue, stamped with the time read.
fn reader(_shared: &Shared, conn: &Conn, dir: Direction) {
    let Some(mut src) = conn.src(dir) else { return };
    let pipe = &conn.pipes[dir.index()];
    let mut buf = vec![0u8; CHUNK];
    loop {
        let res = src.read(&mut buf);
        let at = Instant::now();
        match res {
            Ok(0) => {
                // The peer's FIN, or our own shutdown. While blackholed the FIN is lost
                // like everything else: hold on until the connection is reset.
                let mut q = pipe.q.lock();
                loop {
                    if conn.dead() {
                        return;
                    }
                    if !conn.blackholed() {
                        break;
                    }
                    pipe.cv.wait(&mut q);
                }
                q.items.push_back(Item::Eof { at });
                pipe.cv.notify_all();
                return;
            }
            Ok(n) => {
                let mut q = pipe.q.lock();
                loop {
                    if conn.dead() {
                        return;
                    }
                    if conn.blackholed() {
                        break; // discarded
                    }
                    if q.bytes < QUEUE_LIMIT {
                        q.items.push_back(Item::Data { at, data: buf[..n].to_vec() });
                        q.bytes += n;
                        pipe.cv.notify_all();
                        break;
                    }
                    pipe.cv.wait(&mut q);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
            Err(_) => {
                // A reset (or worse) on one side resets the other.
                conn.abort();
                return;
            }
        }
    }
}

/// Writes one direction's queue to its destination when due, allowed and not held.
fn writer(shared: &Shared, conn: &Conn, dir: Direction) {
    let Some(dst) = conn.dst(dir) else { return };
    let i = dir.index();
    let pipe = &conn.pipes[i];
    // The chunk being written and how much of it is written.
    let mut cur: Option<(Vec<u8>, usize)> = None;
    loop {
        let n = {
            let mut q = pipe.q.lock();
            loop {
                if conn.dead() {
                    return;
                }
                if conn.blackholed() {
                    cur = None;
                    pipe.cv.wait(&mut q);
                    continue;
                }
                if shared.stall[i].load(Ordering::SeqCst) {
                    pipe.cv.wait(&mut q);
                    continue;
                }
                let want = match &cur {
                    Some((data, off)) => data.len() - off,
                    None => {
                        let Some(front) = q.items.front() else {
                            pipe.cv.wait(&mut q);
                            continue;
                        };
                        let Some(due) = front.at().checked_add(shared.delay()) else {
                            pipe.cv.wait(&mut q);
                            continue;
                        };
                        let now = Instant::now();
                        if now < due {
                            pipe.cv.wait_for(&mut q, due - now);
                            continue;
                        }
                        match q.items.pop_front() {
                            Some(Item::Data { data, .. }) => {
                                q.bytes -= data.len();
                                pipe.cv.notify_all();
                                let len = data.len();
                                cur = Some((data, 0));
                                len
                            }
                            Some(Item::Eof { .. }) => {
                                drop(q);
                                // Pass the FIN on; the other direction may go on.
                                let _ = dst.shutdown(Shutdown::Write);
                                return;
                            }
                            None => continue,
                        }
                    }
                };
                let grant = shared.buckets[i].lock().take(want, Instant::now());
                match grant {
                    Grant::Bytes(n) => break n,
                    Grant::Wait(Some(d)) => {
                        pipe.cv.wait_for(&mut q, d);
                    }
                    Grant::Wait(None) => pipe.cv.wait(&mut q),
                }
            }
        };
        let Some((data, off)) = cur.as_mut() else { continue };
        match write_all(shared, conn, dst, i, &data[*off..*off + n]) {
            Written::All => {
                *off += n;
                if *off == data.len() {
                    cur = None;
                }
            }
            // The rest of the chunk goes into the hole.
            Written::Blackholed => cur = None,
            Written::Failed => {
                conn.abort();
                return;
            }
        }
    }
}

enum Written {
    All,
    /// Stopped part way: the connection was blackholed meanwhile.
    Blackholed,
    /// The connection died, or the destination failed.
    Failed,
}

/// Writes all of `buf`, counting bytes as they go. A write blocked on a peer that does
/// not read wakes every [`WRITE_POLL`] to see whether to go on.
fn write_all(shared: &Shared, conn: &Conn, mut dst: &TcpStream, i: usize, mut buf: &[u8]) -> Written {
    while !buf.is_empty() {
        if conn.dead() {
            return Written::Failed;
        }
        if conn.blackholed() {
            return Written::Blackholed;
        }
        match dst.write(buf) {
            Ok(0) => return Written::Failed,
            Ok(n) => {
                shared.bytes[i].fetch_add(n as u64, Ordering::SeqCst);
                buf = &buf[n..];
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Written::Failed,
        }
    }
    Written::All
}
