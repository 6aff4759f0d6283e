//! The transmission phase of one connection.
//!
//! # Threads
//!
//! A connection owns up to `workers_per_conn` threads (the first is the thread that ran
//! the handshake; the others are spawned on demand). They take turns as the *reader*:
//! whoever holds the reader lock parses the next request (header and, for writes, its
//! payload) and then either
//!
//! - hands the reader role on (unlocks, spawning a follower if none is waiting and the
//!   pool is not full) and submits the request itself, when more input is already
//!   queued on the socket and submits have recently been slow (see
//!   [`HANDOFF_MIN_SUBMIT_NS`]): requests then run in parallel; or
//! - submits the request while keeping the role, otherwise: at queue depth 1, or with
//!   a fast or asynchronous target, waking another thread would cost more than it
//!   saves.
//!
//! `MappedDevice::submit` may block (a suspended device holds requests): the blocked
//! thread simply keeps its request, and the others go on reading until all are held.
//!
//! # Replies
//!
//! A request completes through [`IoSink::complete`] on whatever thread the target
//! chooses, now or later. The reply (header and data) is written there, with one
//! non-blocking vectored `sendmsg`, so replies go out in completion order; if the client
//! is slow to read, the reply waits in a backlog instead of blocking that thread (see
//! [`crate::reply`]).
//!
//! # Memory
//!
//! Each request in flight takes a slot (cookie and export offset, needed for the reply
//! because the device rewrites `Request::offset` to be segment-relative); the slot index
//! travels as `Request::tag`. Data buffers are recycled through a per-connection pool,
//! so the steady state allocates nothing. Requests and bytes in flight are capped; the
//! reader waits for completions at the cap (back-pressure, never failure).
//!
//! # End
//!
//! On `NBD_CMD_DISC`, end of stream, a malformed request or a failed reply write, the
//! reader stops; the connection then joins its threads and waits for every request in
//! flight to complete (replies still go out after `DISC`) before the socket is closed
//! and the device's open handle dropped.

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use dmrep_core::{IoSink, MappedDevice, Op, Request};
use dmrep_formats::nbd::{
    self, Command, RequestHeader, SimpleReplyHeader, CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE,
};
use parking_lot::{Condvar, Mutex};

use crate::handshake::Negotiated;
use crate::reply::{Replies, Reply, Sent};
use crate::sock::Sock;

/// Read-ahead buffer size: holds a few dozen pipelined request headers (with small write
/// payloads), so a deep queue costs one `recv` per batch rather than per request.
const READ_AHEAD: usize = 64 * 1024;
/// Payload remainders at least this long are received straight into the request buffer
/// (no copy); shorter ones go through the read-ahead buffer, which may also pick up the
/// requests that follow (one copy of a few KiB is cheaper than one more system call).
const DIRECT_RECV_MIN: usize = 16 * 1024;
/// Most requests in flight per connection. Above any queue depth NBD clients use
/// (the kernel client: 128; qemu: 16; libnbd default: unlimited but fio rarely > 256).
const MAX_INFLIGHT: usize = 256;
/// Most payload bytes in flight per connection (one request is always admitted).
const MAX_INFLIGHT_BYTES: u64 = 256 << 20;
/// Buffers larger than this are not pooled: large requests are rare and their
/// allocation cost is small against their I/O.
const POOL_MAX_BUF: usize = 4 << 20;
/// Total capacity the buffer pool may keep per connection.
const POOL_MAX_BYTES: usize = 16 << 20;
/// The spec says payloads up to 32 MiB "SHOULD NOT be considered a denial of service";
/// an oversized write up to twice the larger of that and the advertised maximum is read
/// and discarded (and failed); anything larger closes the connection.
const SPEC_DOS_FLOOR: u64 = 1 << 25;

/// Submits shorter than this (on average) run inline on the reader even when more
/// requests are queued: handing the reader role to another thread costs a futex wake-up
/// and a context switch (a few microseconds of CPU), more than a memory copy or a
/// page-cache hit saves by running in parallel. Slower targets (disk misses, blocking
/// writes) go parallel; asynchronous ones (which return at once) stay inline.
const HANDOFF_MIN_SUBMIT_NS: u64 = 20_000;

/// Most replies the reader corks before sending them (one `sendmsg` for all).
const CORK_MAX_REPLIES: usize = 32;
/// Most reply bytes the reader corks: beyond this, batching saves nothing.
const CORK_MAX_BYTES: usize = 256 << 10;

thread_local! {
    /// The connection (its address) whose reader role this thread holds: replies
    /// completed on this thread for it are corked, and sent together when the reader
    /// is about to wait for input (or the cork is full).
    static CORKING: Cell<usize> = const { Cell::new(0) };
}

/// Replies corked by the reader, and a spare list for the sent ones (both keep their
/// capacity, so corking allocates nothing in the steady state).
struct Cork {
    replies: Vec<Reply>,
    done: Vec<Reply>,
    bytes: usize,
}

/// Corking for as long as the reader role is held; flushes when dropped.
struct CorkGuard<'a>(&'a Conn);

impl<'a> CorkGuard<'a> {
    fn new(conn: &'a Conn) -> Self {
        CORKING.with(|c| c.set(conn.addr()));
        CorkGuard(conn)
    }
}

impl Drop for CorkGuard<'_> {
    fn drop(&mut self) {
        CORKING.with(|c| c.set(0));
        self.0.flush_cork();
    }
}

/// Per-connection settings.
pub(crate) struct ConnParams {
    pub id: u64,
    pub max_request: u32,
    pub workers: usize,
    /// Set when the server shuts down: read no more requests.
    pub server_stop: Arc<AtomicBool>,
}

/// The data needed to reply to a request in flight.
struct Slot {
    busy: AtomicBool,
    cookie: AtomicU64,
    offset: AtomicU64,
    /// Payload bytes counted against `MAX_INFLIGHT_BYTES` (also the expected read length).
    len: AtomicU32,
}

/// Requests in flight and the buffer pool: one lock, taken once to admit a request and
/// once to release it.
struct Inflight {
    free: Vec<u32>,
    count: usize,
    bytes: u64,
    /// Requests lost to a panicking target: never completed, not waited for.
    lost: usize,
    pool: Vec<Vec<u8>>,
    pool_bytes: usize,
}

/// Allows one log line per second on the I/O path; counts the rest.
struct RateLimit {
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    fn new() -> Self {
        RateLimit { next_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(suppressed since the last line)` if a line may be logged now.
    fn check(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self.next_ms.compare_exchange(next, now_ms + 1000, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Where the reader's blocking receives come from: the socket, via the connection (which
/// first sends the replies it corked, since the reader is about to wait for the client).
trait Input {
    fn recv_blocking(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl Input for Sock {
    fn recv_blocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

/// Buffered reader over the socket. Only the thread holding the reader role uses it.
struct ReadBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "client disconnected in the middle of a request")
}

impl ReadBuf {
    fn new() -> Self {
        ReadBuf { buf: vec![0u8; READ_AHEAD].into_boxed_slice(), start: 0, end: 0 }
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Receive more into the buffer (blocking). `false` at end of stream.
    fn fill(&mut self, src: &impl Input) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = src.recv_blocking(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n > 0)
    }

    /// Move up to `dst.len()` buffered bytes into `dst`; returns how many.
    fn take_into(&mut self, dst: &mut [u8]) -> usize {
        let n = self.buffered().min(dst.len());
        dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        n
    }

    /// The next request header; `None` at a clean end of stream (between requests).
    fn read_header(&mut self, src: &impl Input) -> io::Result<Option<[u8; RequestHeader::LEN]>> {
        while self.buffered() < RequestHeader::LEN {
            if self.buf.len() - self.start < RequestHeader::LEN {
                // Too close to the end for a whole header: move the partial one down.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if !self.fill(src)? {
                return if self.buffered() == 0 { Ok(None) } else { Err(eof()) };
            }
        }
        let mut h = [0u8; RequestHeader::LEN];
        self.take_into(&mut h);
        Ok(Some(h))
    }

    /// Fill `dst` from the buffer, then the socket.
    fn read_exact(&mut self, src: &impl Input, dst: &mut [u8]) -> io::Result<()> {
        let mut done = self.take_into(dst);
        while done < dst.len() {
            if dst.len() - done >= DIRECT_RECV_MIN {
                let n = src.recv_blocking(&mut dst[done..])?;
                if n == 0 {
                    return Err(eof());
                }
                done += n;
            } else {
                if !self.fill(src)? {
                    return Err(eof());
                }
                done += self.take_into(&mut dst[done..]);
            }
        }
        Ok(())
    }

    /// Read and drop `n` bytes.
    fn discard(&mut self, src: &impl Input, mut n: u64) -> io::Result<()> {
        loop {
            let k = (self.buffered() as u64).min(n);
            self.start += k as usize;
            n -= k;
            if n == 0 {
                return Ok(());
            }
            if !self.fill(src)? {
                return Err(eof());
            }
        }
    }

    /// Whether more input is queued: buffered, or waiting in the socket (received now,
    /// without blocking).
    fn more_pending(&mut self, sock: &Sock) -> bool {
        if self.buffered() > 0 {
            return true;
        }
        self.start = 0;
        self.end = 0;
        match sock.recv_nowait(&mut self.buf) {
            Ok(Some(n)) => {
                self.end = n;
                n > 0
            }
            _ => false,
        }
    }
}

/// What the reader got from the stream.
enum Next {
    /// A request to submit.
    Submit(Request),
    /// Handled already (answered with an error without reaching the device).
    Again,
    /// Stop reading, for the given reason.
    Stop(&'static str),
}

/// One connection in transmission phase. Also the [`IoSink`] of its requests.
pub(crate) struct Conn {
    me: Weak<Conn>,
    params: ConnParams,
    sock: Arc<Sock>,
    device: Arc<MappedDevice>,
    structured: bool,
    span: tracing::Span,
    started: Instant,
    reader: Mutex<ReadBuf>,
    /// Threads waiting for (or about to wait for) the reader role.
    waiting: AtomicUsize,
    nthreads: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Set (under the reader lock) when no more requests are to be read.
    stopping: AtomicBool,
    close_reason: Mutex<&'static str>,
    replies: Replies,
    cork: Mutex<Cork>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    inflight: Mutex<Inflight>,
    changed: Condvar,
    slots: Box<[Slot]>,
    requests: AtomicU64,
    /// Moving average of the time `MappedDevice::submit` takes (inline completion
    /// included), in nanoseconds.
    submit_ns: AtomicU64,
    warn_limit: RateLimit,
}

/// Serve the transmission phase on the calling thread until the connection ends.
pub(crate) fn serve(sock: Arc<Sock>, neg: Negotiated, params: ConnParams, span: tracing::Span) {
    let Negotiated { device, open, structured, export } = neg;
    let conn = Arc::new_cyclic(|me| Conn {
        me: me.clone(),
        sock,
        device,
        structured,
        span,
        started: Instant::now(),
        reader: Mutex::new(ReadBuf::new()),
        waiting: AtomicUsize::new(0),
        nthreads: AtomicUsize::new(1),
        threads: Mutex::new(Vec::new()),
        stopping: AtomicBool::new(false),
        close_reason: Mutex::new("end of stream"),
        replies: Replies::new(),
        cork: Mutex::new(Cork { replies: Vec::new(), done: Vec::new(), bytes: 0 }),
        flusher: Mutex::new(None),
        inflight: Mutex::new(Inflight {
            free: (0..MAX_INFLIGHT as u32).rev().collect(),
            count: 0,
            bytes: 0,
            lost: 0,
            pool: Vec::new(),
            pool_bytes: 0,
        }),
        changed: Condvar::new(),
        slots: (0..MAX_INFLIGHT)
            .map(|_| Slot {
                busy: AtomicBool::new(false),
                cookie: AtomicU64::new(0),
                offset: AtomicU64::new(0),
                len: AtomicU32::new(0),
            })
            .collect(),
        requests: AtomicU64::new(0),
        submit_ns: AtomicU64::new(0),
        warn_limit: RateLimit::new(),
        params,
    });
    conn.run_worker(false);

    // Only a thread holding the reader role spawns workers, and only before `stopping`:
    // once this thread left its loop, the list is complete.
    let handles = std::mem::take(&mut *conn.threads.lock());
    for h in handles {
        if h.join().is_err() {
            tracing::error!("an NBD worker thread panicked");
        }
    }
    {
        let mut st = conn.inflight.lock();
        while st.count > st.lost {
            conn.changed.wait(&mut st);
        }
    }
    // Every reply holding a slot is out; let the flusher send what is left and exit.
    conn.replies.close();
    let flusher = conn.flusher.lock().take();
    if let Some(f) = flusher {
        if f.join().is_err() {
            tracing::error!("the NBD reply flusher thread panicked");
        }
    }
    conn.replies.broken.store(true, Ordering::SeqCst);
    conn.sock.shutdown(Shutdown::Both);
    tracing::info!(
        export = %export,
        requests = conn.requests.load(Ordering::Relaxed),
        reason = *conn.close_reason.lock(),
        "NBD connection closed"
    );
    drop(open);
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Take turns as the reader until the connection stops. `counted`: the spawner
    /// already counted this thread in `waiting`.
    fn run_worker(self: &Arc<Self>, counted: bool) {
        let _e = self.span.enter();
        let mut counted = counted;
        loop {
            if !counted {
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
            counted = false;
            let mut rd = self.reader.lock();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            let cork = CorkGuard::new(self);
            // Keep the reader role for as long as requests are served inline.
            loop {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if self.params.server_stop.load(Ordering::SeqCst) {
                    *self.close_reason.lock() = "server shutdown";
                    self.stopping.store(true, Ordering::SeqCst);
                    return;
                }
                match self.next(&mut rd) {
                    Next::Again => {}
                    Next::Stop(reason) => {
                        *self.close_reason.lock() = reason;
                        self.stopping.store(true, Ordering::SeqCst);
                        return;
                    }
                    Next::Submit(req) => {
                        if self.submits_are_slow() && rd.more_pending(&self.sock) {
                            self.ensure_follower();
                            drop(cork);
                            drop(rd);
                            self.submit(req);
                            break;
                        }
                        self.submit(req);
                    }
                }
            }
        }
    }

    /// Whether recent submits took long enough that running the next request in
    /// parallel (at the price of waking another thread) beats running it inline.
    fn submits_are_slow(&self) -> bool {
        self.submit_ns.load(Ordering::Relaxed) >= HANDOFF_MIN_SUBMIT_NS
    }

    /// Make sure someone will take the reader role: spawn a worker if none is waiting
    /// and the pool is not full. Called with the reader lock held.
    fn ensure_follower(self: &Arc<Self>) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        let n = self.nthreads.load(Ordering::SeqCst);
        if n >= self.params.workers {
            return;
        }
        self.nthreads.store(n + 1, Ordering::SeqCst);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-c{}-w{}", self.params.id, n))
            .spawn(move || me.run_worker(true));
        match spawned {
            Ok(h) => self.threads.lock().push(h),
            Err(e) => {
                self.nthreads.fetch_sub(1, Ordering::SeqCst);
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!("cannot spawn an NBD worker thread: {e}");
            }
        }
    }

    fn submit(self: &Arc<Self>, req: Request) {
        let tag = req.tag as usize;
        let sink: Arc<dyn IoSink> = self.clone();
        let device = &self.device;
        let t0 = Instant::now();
        let res = catch_unwind(AssertUnwindSafe(|| device.submit(req, sink)));
        // Moving average over ~8 submits; racy updates from several threads are fine.
        let ns = t0.elapsed().as_nanos().min(u128::from(u32::MAX)) as u64;
        let avg = self.submit_ns.load(Ordering::Relaxed);
        self.submit_ns.store(avg - avg / 8 + ns / 8, Ordering::Relaxed);
        if res.is_err() {
            // The request is gone with the panic: no reply is possible, and the
            // stream's request/reply pairing is broken. Close, and do not wait for it.
            tracing::error!("target panicked on a request; closing the connection");
            let mut st = self.inflight.lock();
            if self.slots[tag].busy.load(Ordering::Acquire) {
                st.lost += 1;
            }
            drop(st);
            self.changed.notify_all();
            self.abort();
        }
    }

    /// Stop using the socket at once (protocol error, dead peer).
    fn abort(&self) {
        self.replies.break_stream(&self.sock);
    }

    /// Read and check the next request. Called with the reader lock held.
    fn next(&self, rd: &mut ReadBuf) -> Next {
        let bytes = match rd.read_header(self) {
            Ok(Some(b)) => b,
            Ok(None) => return Next::Stop("client closed the connection"),
            Err(e) => {
                if !self.replies.broken.load(Ordering::Relaxed) {
                    tracing::debug!("reading a request: {e}");
                }
                return Next::Stop("client disconnected mid-request");
            }
        };
        let hdr = match RequestHeader::decode(&bytes) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("protocol error: {e}; closing the connection");
                self.abort();
                return Next::Stop("protocol error");
            }
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        let RequestHeader { flags, command, cookie, offset, len } = hdr;
        let allowed = match command {
            Command::Read if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            Command::Disc => !0,
            _ => CMD_FLAG_FUA,
        };
        let bad_flags = flags.outside(allowed) != 0;
        let op = match command {
            Command::Disc => return Next::Stop("client sent DISC"),
            Command::Write => {
                if bad_flags || len > self.params.max_request {
                    return self.refuse_write(rd, cookie, len, bad_flags);
                }
                let (slot, mut buf) = self.admit(cookie, offset, len);
                if let Err(e) = rd.read_exact(self, &mut buf) {
                    tracing::debug!("reading a write payload: {e}");
                    self.slots[slot as usize].busy.store(false, Ordering::Release);
                    self.release(slot, buf);
                    return Next::Stop("client disconnected mid-request");
                }
                return Next::Submit(Request::new(
                    Op::Write { fua: flags.fua() },
                    offset,
                    u64::from(len),
                    buf,
                    u64::from(slot),
                ));
            }
            _ if bad_flags => {
                self.send(self.error_reply(cookie, nbd::EINVAL, bad_flags_msg(command), None));
                return Next::Again;
            }
            Command::Read => {
                if len > self.params.max_request {
                    let err = if flags.df() { nbd::EOVERFLOW } else { nbd::EINVAL };
                    self.send(self.error_reply(cookie, err, "read longer than the maximum", None));
                    return Next::Again;
                }
                Op::Read
            }
            Command::Flush => Op::Flush,
            Command::Trim => Op::Discard,
            Command::WriteZeroes => Op::WriteZeroes { may_trim: !flags.no_hole(), fua: flags.fua() },
            Command::Cache | Command::BlockStatus | Command::Other(_) => {
                self.send(self.error_reply(cookie, nbd::EINVAL, "command not supported by this server", None));
                return Next::Again;
            }
        };
        let (offset, len) = if op == Op::Flush { (0, 0) } else { (offset, len) };
        let data_len = if op == Op::Read { len } else { 0 };
        let (slot, buf) = self.admit(cookie, offset, data_len);
        Next::Submit(Request::new(op, offset, u64::from(len), buf, u64::from(slot)))
    }

    /// A write that will not reach the device: consume its payload and fail it, or
    /// close the connection if the payload is too large to be worth reading.
    fn refuse_write(&self, rd: &mut ReadBuf, cookie: u64, len: u32, bad_flags: bool) -> Next {
        let limit = u64::from(self.params.max_request).max(SPEC_DOS_FLOOR) * 2;
        if u64::from(len) > limit {
            tracing::warn!(len, limit, "write payload too large; closing the connection");
            self.abort();
            return Next::Stop("oversized write");
        }
        if let Err(e) = rd.discard(self, u64::from(len)) {
            tracing::debug!("discarding a write payload: {e}");
            return Next::Stop("client disconnected mid-request");
        }
        let (err, msg) = if bad_flags {
            (nbd::EINVAL, bad_flags_msg(Command::Write))
        } else {
            (nbd::EOVERFLOW, "write longer than the maximum")
        };
        self.send(self.error_reply(cookie, err, msg, None));
        Next::Again
    }

    /// Take a slot (and a buffer of `data_len` bytes), waiting at the in-flight caps.
    fn admit(&self, cookie: u64, offset: u64, data_len: u32) -> (u32, Vec<u8>) {
        let cost = u64::from(data_len);
        let want = data_len as usize;
        let mut st = self.inflight.lock();
        let full = |st: &Inflight| st.free.is_empty() || (st.count > 0 && st.bytes + cost > MAX_INFLIGHT_BYTES);
        if full(&st) {
            // Corked replies hold slots: send them before waiting for slots to free.
            drop(st);
            self.flush_cork();
            st = self.inflight.lock();
        }
        while full(&st) {
            self.changed.wait(&mut st);
        }
        let slot = st.free.pop().expect("a free slot");
        st.count += 1;
        st.bytes += cost;
        let mut buf = Vec::new();
        if want > 0 && !st.pool.is_empty() {
            let i = st.pool.iter().position(|b| b.capacity() >= want).unwrap_or(st.pool.len() - 1);
            buf = st.pool.swap_remove(i);
            st.pool_bytes -= buf.capacity();
        }
        drop(st);
        let s = &self.slots[slot as usize];
        s.cookie.store(cookie, Ordering::Relaxed);
        s.offset.store(offset, Ordering::Relaxed);
        s.len.store(data_len, Ordering::Relaxed);
        s.busy.store(true, Ordering::Release);
        // Shrinking is free; growing zero-fills only the new tail (once per buffer size).
        if buf.len() >= want {
            buf.truncate(want);
        } else {
            buf.resize(want, 0);
        }
        (slot, buf)
    }

    /// Give back a slot and its buffer.
    fn release(&self, slot: u32, buf: Vec<u8>) {
        let cost = u64::from(self.slots[slot as usize].len.load(Ordering::Relaxed));
        let mut spare = None;
        let mut st = self.inflight.lock();
        st.free.push(slot);
        st.count -= 1;
        st.bytes -= cost;
        let cap = buf.capacity();
        if cap > 0 && cap <= POOL_MAX_BUF && st.pool_bytes + cap <= POOL_MAX_BYTES {
            st.pool_bytes += cap;
            st.pool.push(buf);
        } else {
            spare = Some(buf);
        }
        drop(st);
        self.changed.notify_all();
        drop(spare);
    }

    /// Send (or queue) one reply; release its slot and buffer once it is out.
    fn send(&self, r: Reply) {
        if CORKING.with(|c| c.get()) == self.addr() {
            let mut cork = self.cork.lock();
            cork.bytes += r.len();
            cork.replies.push(r);
            let full = cork.replies.len() >= CORK_MAX_REPLIES || cork.bytes >= CORK_MAX_BYTES;
            drop(cork);
            if full {
                self.flush_cork();
            }
            return;
        }
        match self.replies.send(&self.sock, r) {
            Sent::Done(r) => self.finish(r),
            Sent::Queued { start_flusher: false } => {}
            Sent::Queued { start_flusher: true } => self.start_flusher(),
        }
    }

    /// Send the corked replies.
    fn flush_cork(&self) {
        let mut cork = self.cork.lock();
        if cork.replies.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut cork.replies);
        let mut done = std::mem::take(&mut cork.done);
        cork.bytes = 0;
        drop(cork);
        let start_flusher = self.replies.send_batch(&self.sock, &mut batch, &mut done);
        for r in done.drain(..) {
            self.finish(r);
        }
        let mut cork = self.cork.lock();
        cork.replies = batch;
        cork.done = done;
        drop(cork);
        if start_flusher {
            self.start_flusher();
        }
    }

    /// This connection's identity for [`CORKING`].
    fn addr(&self) -> usize {
        self as *const Conn as usize
    }

    fn finish(&self, r: Reply) {
        if let Some(slot) = r.slot {
            self.release(slot, r.buf);
        }
    }

    fn start_flusher(&self) {
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new().name(format!("nbd-c{}-flush", self.params.id)).spawn(move || {
            let _e = me.span.enter();
            me.replies.flush(&me.sock, |r| me.finish(r));
        });
        match spawned {
            Ok(h) => *self.flusher.lock() = Some(h),
            Err(e) => {
                // Without a flusher the backlog would never drain: give up on the client.
                tracing::warn!("cannot spawn the NBD reply flusher: {e}; closing the connection");
                self.abort();
                for r in self.replies.take_backlog() {
                    self.finish(r);
                }
            }
        }
    }

    /// A failed request's reply. Structured replies carry the message; simple ones cannot
    /// (and a failed simple read carries no data, as the spec allows).
    fn error_reply(&self, cookie: u64, error: u32, msg: &str, slot: Option<u32>) -> Reply {
        if !self.structured {
            return Reply::new(&SimpleReplyHeader { error, cookie }.encode(), slot);
        }
        if msg.is_empty() {
            return Reply::new(&nbd::error_chunk(cookie, error), slot);
        }
        let mut chunk = Vec::with_capacity(nbd::ERROR_CHUNK_LEN + msg.len());
        nbd::encode_error_chunk(cookie, error, msg, &mut chunk);
        Reply::new(&[], slot).with_msg(chunk)
    }

    /// The reply to a completed request (which keeps its slot until the reply is out).
    fn reply(&self, slot: u32, req: Request, result: io::Result<()>) -> Reply {
        let s = &self.slots[slot as usize];
        let cookie = s.cookie.load(Ordering::Relaxed);
        let offset = s.offset.load(Ordering::Relaxed);
        let want = s.len.load(Ordering::Relaxed);
        let is_read = req.op == Op::Read;
        let result = match result {
            Ok(()) if is_read && req.buf.len() != want as usize => {
                Err(io::Error::other("target returned a read buffer of the wrong length"))
            }
            // TRIM is a hint: a target that cannot discard has done all it must.
            Err(e) if req.op == Op::Discard && nbd_error(&e) == nbd::ENOTSUP => Ok(()),
            r => r,
        };
        let slot = Some(slot);
        match result {
            Ok(()) if is_read && self.structured && !req.buf.is_empty() => {
                match nbd::offset_data_prefix(cookie, offset, want, true) {
                    Ok(prefix) => Reply::new(&prefix, slot).with_buf(req.buf, true),
                    Err(e) => self.error_reply(cookie, nbd::EOVERFLOW, &e.to_string(), slot).with_buf(req.buf, false),
                }
            }
            Ok(()) if is_read && self.structured => Reply::new(&nbd::none_chunk(cookie), slot),
            Ok(()) => Reply::new(&SimpleReplyHeader { error: 0, cookie }.encode(), slot).with_buf(req.buf, is_read),
            Err(e) => {
                let error = nbd_error(&e);
                if let Some(suppressed) = self.warn_limit.check(self.now_ms()) {
                    if error == nbd::EINVAL || error == nbd::ENOSPC {
                        tracing::debug!(op = ?req.op, offset, suppressed, "request failed: {e}");
                    } else {
                        tracing::warn!(op = ?req.op, offset, suppressed, "request failed: {e}");
                    }
                }
                self.error_reply(cookie, error, &e.to_string(), slot).with_buf(req.buf, false)
            }
        }
    }
}

impl Input for Conn {
    fn recv_blocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.flush_cork();
        self.sock.recv(buf)
    }
}

impl IoSink for Conn {
    fn complete(&self, req: Request, result: io::Result<()>) {
        let Some(slot) = usize::try_from(req.tag).ok().filter(|&i| i < self.slots.len()) else {
            tracing::error!(tag = req.tag, "completion with an unknown tag dropped");
            return;
        };
        if !self.slots[slot].busy.swap(false, Ordering::AcqRel) {
            tracing::error!(tag = req.tag, "request completed twice; dropped");
            return;
        }
        let r = self.reply(slot as u32, req, result);
        self.send(r);
    }
}

/// The NBD error value for an I/O error.
pub(crate) fn nbd_error(e: &io::Error) -> u32 {
    if let Some(errno) = e.raw_os_error() {
        return nbd::error_from_errno(errno);
    }
    match e.kind() {
        io::ErrorKind::InvalidInput => nbd::EINVAL,
        io::ErrorKind::PermissionDenied => nbd::EPERM,
        io::ErrorKind::OutOfMemory => nbd::ENOMEM,
        io::ErrorKind::Unsupported => nbd::ENOTSUP,
        _ => nbd::EIO,
    }
}

fn bad_flags_msg(command: Command) -> &'static str {
    match command {
        Command::Read => "invalid flags for READ",
        Command::Write => "invalid flags for WRITE",
        Command::Flush => "invalid flags for FLUSH",
        Command::Trim => "invalid flags for TRIM",
        Command::WriteZeroes => "invalid flags for WRITE_ZEROES (FAST_ZERO is not supported)",
        _ => "invalid command flags",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmrep_formats::nbd::CmdFlags;

    #[test]
    fn errno_mapping() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(nbd_error(&e(22)), nbd::EINVAL);
        assert_eq!(nbd_error(&e(28)), nbd::ENOSPC);
        assert_eq!(nbd_error(&e(108)), nbd::ESHUTDOWN);
        assert_eq!(nbd_error(&e(6)), nbd::EIO);
        assert_eq!(nbd_error(&io::Error::new(io::ErrorKind::InvalidInput, "x")), nbd::EINVAL);
        assert_eq!(nbd_error(&io::Error::other("x")), nbd::EIO);
    }

    #[test]
    fn rate_limit() {
        let r = RateLimit::new();
        assert_eq!(r.check(0), Some(0));
        assert_eq!(r.check(10), None);
        assert_eq!(r.check(999), None);
        assert_eq!(r.check(1000), Some(2));
        assert_eq!(r.check(1001), None);
    }

    #[test]
    fn read_buf_mixes_buffered_and_direct() {
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let a = Sock::Unix(a);
        let b = Sock::Unix(b);
        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut msg = RequestHeader {
            flags: CmdFlags(0),
            command: Command::Write,
            cookie: 1,
            offset: 0,
            len: payload.len() as u32,
        }
        .encode()
        .to_vec();
        msg.extend_from_slice(&payload);
        msg.extend_from_slice(&[0xee; 10]);
        let writer = std::thread::spawn(move || {
            for c in msg.chunks(7000) {
                b.send_all(&[c]).unwrap();
            }
            b
        });
        let mut rd = ReadBuf::new();
        let h = rd.read_header(&a).unwrap().unwrap();
        assert_eq!(RequestHeader::decode(&h).unwrap().len, 100_000);
        let mut got = vec![0u8; 100_000];
        rd.read_exact(&a, &mut got).unwrap();
        assert_eq!(got, payload);
        rd.discard(&a, 4).unwrap();
        let b = writer.join().unwrap();
        let mut rest = [0u8; 6];
        rd.read_exact(&a, &mut rest).unwrap();
        assert_eq!(rest, [0xee; 6]);
        drop(b);
        assert!(rd.read_header(&a).unwrap().is_none());
    }
}
