//! Mapped devices.
//!
//! A mapped device has a name, a UUID, an *active* table (serving I/O) and possibly an
//! *inactive* one (loaded, waiting for resume). Suspend stops new I/O from reaching the
//! targets and waits for in-flight I/O to finish; requests that arrive while suspended
//! are held (their submitting threads wait) and go on after resume: none is failed.
//!
//! Waiting for in-flight I/O is bounded: a target may hold a request for as long as
//! what it waits for takes (a write waiting for a synchronous SLINK that is down). A
//! suspend that could not drain in time gives up and opens the gate again (the device
//! is active, as before; the kernel rolls back an interrupted suspend the same way). A
//! waiting suspend holds no lock that removal or resume need: removal fails the held
//! requests and ends the wait at once, a resume cancels it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_formats::table::{SegmentSpec, TableSpec};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::iostats::{IoStats, Kind};
use crate::target::{Completion, IoSink, Op, Request, Target, TargetStatus};
use crate::units::sectors_to_bytes;

/// A table whose targets are built.
pub struct LiveTable {
    pub spec: TableSpec,
    segments: Vec<LiveSegment>,
    size: u64,
}

struct LiveSegment {
    /// Byte offset in the device.
    start: u64,
    /// Length in bytes.
    len: u64,
    target: Arc<dyn Target>,
}

impl LiveTable {
    /// Pair a validated spec with its built targets (one per segment, same order).
    pub fn new(spec: TableSpec, targets: Vec<Arc<dyn Target>>) -> Self {
        assert_eq!(spec.segments.len(), targets.len());
        let segments: Vec<LiveSegment> = spec
            .segments
            .iter()
            .zip(targets)
            .map(|(s, target)| LiveSegment { start: sectors_to_bytes(s.start), len: sectors_to_bytes(s.len), target })
            .collect();
        let size = segments.last().map(|s| s.start + s.len).unwrap_or(0);
        LiveTable { spec, segments, size }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn targets(&self) -> impl Iterator<Item = (&SegmentSpec, &Arc<dyn Target>)> {
        self.spec.segments.iter().zip(self.segments.iter().map(|s| &s.target))
    }

    fn supports_discard(&self) -> bool {
        !self.segments.is_empty() && self.segments.iter().all(|s| s.target.supports_discard())
    }

    fn shutdown(&self) {
        for s in &self.segments {
            s.target.shutdown();
        }
    }

    /// Index of the segment holding byte `offset`.
    fn segment_at(&self, offset: u64) -> usize {
        self.segments.partition_point(|s| s.start + s.len <= offset)
    }
}

pub use dmrep_formats::control::{DeviceInfo, DeviceState};

/// How long removing a device waits for its in-flight requests before asking its
/// targets to give them back: requests normally finish in milliseconds; a few seconds
/// leave room for a slow device without letting a dead one block removal or SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a suspend waits for in-flight requests unless told otherwise: requests
/// normally finish in milliseconds, and a slow disk in well under a second; one still
/// in flight after 10 s waits for something that may not come soon (a synchronous
/// SLINK that is down), and an operator is better told so than left waiting.
pub const SUSPEND_TIMEOUT: Duration = Duration::from_secs(10);

/// In-flight accounting and the suspend gate.
struct Gate {
    state: Mutex<GateState>,
    cond: Condvar,
}

struct GateState {
    /// The gate is closed: new I/O waits (a suspend is waiting for in-flight I/O, or done).
    suspended: bool,
    /// The suspend is done: in-flight I/O drained and the targets told (postsuspend).
    quiet: bool,
    /// Grows each time the gate closes or opens: a waiting suspend whose generation is
    /// gone was overtaken (resumed, or given up by another waiter).
    generation: u64,
    /// The generation a suspend that gave up left behind, and how many requests were
    /// still in flight then (for the other suspends that waited with it).
    gave_up: Option<(u64, u64)>,
    /// Removed: new I/O fails with ESHUTDOWN instead of waiting.
    dead: bool,
    inflight: u64,
}

impl Gate {
    /// Admit one request: waits while suspended; false once the device is removed.
    fn enter(&self) -> bool {
        let mut st = self.state.lock();
        while st.suspended && !st.dead {
            self.cond.wait(&mut st);
        }
        if st.dead {
            return false;
        }
        st.inflight += 1;
        true
    }

    fn exit(&self) {
        let mut st = self.state.lock();
        st.inflight -= 1;
        if st.inflight == 0 {
            self.cond.notify_all();
        }
    }
}

/// Releases one in-flight slot when the request completes, and counts it in the
/// device's I/O statistics.
pub(crate) struct InflightGuard {
    gate: Arc<Gate>,
    stats: Arc<IoStats>,
    kind: Kind,
    bytes: u64,
    started: std::time::Instant,
    pub(crate) ok: bool,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.stats.record(self.kind, self.bytes, self.started.elapsed(), self.ok);
        self.gate.exit();
    }
}

/// A mapped device.
pub struct MappedDevice {
    name: RwLock<String>,
    uuid: String,
    live: RwLock<Option<Arc<LiveTable>>>,
    inactive: Mutex<Option<Arc<LiveTable>>>,
    gate: Arc<Gate>,
    open_count: AtomicU32,
    /// I/O counters and latencies since the device was created.
    stats: Arc<IoStats>,
    /// Writes fail with EPERM (`create --readonly`); NBD advertises the export read-only.
    read_only: AtomicBool,
    /// Serialises suspend/resume/load against each other (never held while a suspend
    /// waits for in-flight I/O).
    lifecycle: Mutex<()>,
}

/// What waited for a device's in-flight requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesce {
    /// `suspend`.
    Suspend,
    /// `resume` swapping in a loaded table (which needs the device quiet).
    Swap,
}

/// Errors of device lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0} has no inactive table to resume with")]
    NoInactiveTable(String),
    #[error("device {name} is open {count} time(s)")]
    Busy { name: String, count: u32 },
    #[error(
        "{} {name} gave up after {}: {inflight} request(s) still in flight, held by its target \
         (e.g. writes waiting for a synchronous SLINK that is down); {}",
        match during { Quiesce::Suspend => "suspend of", Quiesce::Swap => "resume of" },
        secs(*waited),
        match during {
            Quiesce::Suspend => "the device is active again (retry later, or `dmrep remove --force` fails them)",
            Quiesce::Swap => "the loaded table was not swapped in: the old one stays active, the new one stays loaded",
        }
    )]
    NotDrained { name: String, inflight: u64, waited: Duration, during: Quiesce },
    #[error("suspend of {0} did not complete: the device was resumed while it waited for in-flight requests")]
    SuspendCancelled(String),
    #[error("device {0} was removed while waiting for its in-flight requests")]
    Removed(String),
}

/// `10 s`, `1.5 s`, `250 ms`: a wait as a user reads it.
fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl MappedDevice {
    /// A new device with no table, active (and so serving nothing until a table is resumed).
    pub fn new(name: &str, uuid: Option<String>) -> Arc<Self> {
        Arc::new(MappedDevice {
            name: RwLock::new(name.to_string()),
            uuid: uuid.unwrap_or_else(|| format!("DMREP-{}", uuid::Uuid::new_v4())),
            live: RwLock::new(None),
            inactive: Mutex::new(None),
            gate: Arc::new(Gate {
                state: Mutex::new(GateState {
                    suspended: false,
                    quiet: false,
                    generation: 0,
                    gave_up: None,
                    dead: false,
                    inflight: 0,
                }),
                cond: Condvar::new(),
            }),
            open_count: AtomicU32::new(0),
            stats: Arc::default(),
            read_only: AtomicBool::new(false),
            lifecycle: Mutex::new(()),
        })
    }

    pub fn name(&self) -> String {
        self.name.read().clone()
    }

    /// The device's I/O counters and latencies.
    pub fn io_stats(&self) -> &IoStats {
        &self.stats
    }

    pub(crate) fn set_name(&self, name: &str) {
        *self.name.write() = name.to_string();
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Size of the active table in bytes (0 without one).
    pub fn size(&self) -> u64 {
        self.live.read().as_ref().map(|t| t.size()).unwrap_or(0)
    }

    pub fn supports_discard(&self) -> bool {
        self.live.read().as_ref().map(|t| t.supports_discard()).unwrap_or(false)
    }

    /// Whether writes are refused (EPERM), whatever the table.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }

    /// Whether the device is exported read-only: set so (`--readonly`), or a target of
    /// its active table takes no writes now (a secondary site's device).
    pub fn export_read_only(&self) -> bool {
        self.read_only() || self.live.read().as_ref().is_some_and(|t| t.segments.iter().any(|s| s.target.read_only()))
    }

    pub fn set_read_only(&self, read_only: bool) {
        self.read_only.store(read_only, Ordering::SeqCst);
    }

    /// Whether the device holds data to export: false only when its active table has a
    /// target that holds none (a replicator control device).
    pub fn holds_data(&self) -> bool {
        self.live.read().as_ref().is_none_or(|t| t.segments.iter().all(|s| s.target.holds_data()))
    }

    pub fn state(&self) -> DeviceState {
        if self.gate.state.lock().suspended {
            DeviceState::Suspended
        } else {
            DeviceState::Active
        }
    }

    /// The active table, if any.
    pub fn live_table(&self) -> Option<Arc<LiveTable>> {
        self.live.read().clone()
    }

    /// The inactive (loaded, not yet resumed) table, if any.
    pub fn inactive_table(&self) -> Option<Arc<LiveTable>> {
        self.inactive.lock().clone()
    }

    /// Load a table as the inactive one, replacing (and shutting down) any previous one.
    pub fn load(&self, table: LiveTable) {
        let _l = self.lifecycle.lock();
        if let Some(old) = self.inactive.lock().replace(Arc::new(table)) {
            old.shutdown();
        }
    }

    /// Drop the inactive table.
    pub fn clear_inactive(&self) -> bool {
        let _l = self.lifecycle.lock();
        match self.inactive.lock().take() {
            Some(old) => {
                old.shutdown();
                true
            }
            None => false,
        }
    }

    /// Hold new I/O and wait, up to `timeout`, for in-flight I/O to finish.
    ///
    /// The wait holds no lock: [`MappedDevice::shutdown`] ends it at once (the device
    /// is removed), [`MappedDevice::resume`] cancels it. A device that does not drain in
    /// time is let go again (active, as before) and the error says how many requests
    /// its targets still hold. Suspending a suspended device does nothing; a suspend
    /// while another one waits waits with it.
    pub fn suspend(&self, timeout: Duration) -> Result<(), DeviceError> {
        self.quiesce(timeout, Quiesce::Suspend)
    }

    /// Suspend for `during`: see [`MappedDevice::suspend`]. (`Quiesce::Swap`: a resume
    /// that is about to swap tables waits first, with nothing locked.)
    pub fn quiesce(&self, timeout: Duration, during: Quiesce) -> Result<(), DeviceError> {
        let deadline = Instant::now() + timeout;
        let gen = {
            let _l = self.lifecycle.lock();
            match self.close_gate()? {
                Some(gen) => gen,
                None => return Ok(()),
            }
        };
        self.wait_drained(gen, deadline);
        let _l = self.lifecycle.lock();
        let mut st = self.gate.state.lock();
        if st.dead {
            return Err(DeviceError::Removed(self.name()));
        }
        if st.generation != gen {
            return Err(match st.gave_up {
                Some((g, inflight)) if g == gen => {
                    DeviceError::NotDrained { name: self.name(), inflight, waited: timeout, during }
                }
                _ => DeviceError::SuspendCancelled(self.name()),
            });
        }
        if st.quiet {
            return Ok(());
        }
        if st.inflight == 0 {
            st.quiet = true;
            drop(st);
            self.postsuspend_targets();
            return Ok(());
        }
        // Give up: open the gate again, as it was.
        let inflight = st.inflight;
        st.gave_up = Some((gen, inflight));
        drop(st);
        self.open_gate();
        tracing::warn!(device = %self.name(), inflight, "suspend gave up: requests still in flight");
        Err(DeviceError::NotDrained { name: self.name(), inflight, waited: timeout, during })
    }

    /// Close the gate (lifecycle lock held): `None` if the device is suspended already
    /// (drained), else the generation to wait for.
    fn close_gate(&self) -> Result<Option<u64>, DeviceError> {
        {
            let st = self.gate.state.lock();
            if st.dead {
                return Err(DeviceError::Removed(self.name()));
            }
            if st.suspended {
                return Ok((!st.quiet).then_some(st.generation));
            }
        }
        if let Some(t) = self.live.read().as_ref() {
            for s in &t.segments {
                s.target.presuspend();
            }
        }
        let mut st = self.gate.state.lock();
        st.suspended = true;
        st.quiet = false;
        st.generation += 1;
        Ok(Some(st.generation))
    }

    /// Wait until the requests in flight are done, the device is removed, the gate's
    /// generation moves on, or `deadline`. Holds no lock but the gate's (released while
    /// waiting).
    fn wait_drained(&self, gen: u64, deadline: Instant) {
        let mut st = self.gate.state.lock();
        while st.inflight > 0 && !st.dead && st.generation == gen {
            if self.gate.cond.wait_until(&mut st, deadline).timed_out() {
                break;
            }
        }
    }

    fn postsuspend_targets(&self) {
        if let Some(t) = self.live.read().as_ref() {
            for s in &t.segments {
                s.target.postsuspend();
            }
        }
    }

    /// Tell the targets and let I/O flow (lifecycle lock held). Cancels waiting suspends.
    fn open_gate(&self) {
        if let Some(t) = self.live.read().as_ref() {
            for s in &t.segments {
                s.target.resume();
            }
        }
        let mut st = self.gate.state.lock();
        if st.suspended {
            st.suspended = false;
            st.quiet = false;
            st.generation += 1;
        }
        self.gate.cond.notify_all();
    }

    /// Swap in the inactive table, if there is one, and let I/O flow again. Returns
    /// whether a table was swapped in. A device without any table stays empty.
    ///
    /// A swap needs the device quiet: if it is not suspended yet, it is suspended first
    /// (waiting up to `timeout`, see [`MappedDevice::suspend`]); if that does not drain,
    /// the loaded table stays loaded, the device goes on with the old one, and the error
    /// says why. Either way a suspend waiting for in-flight I/O is cancelled.
    pub fn resume(&self, timeout: Duration) -> Result<bool, DeviceError> {
        let _l = self.lifecycle.lock();
        let next = self.inactive.lock().take();
        let mut result = Ok(false);
        if let Some(next) = next {
            match self.drain_locked(timeout) {
                Ok(()) => {
                    let old = self.live.write().replace(next);
                    if let Some(old) = old {
                        old.shutdown();
                    }
                    result = Ok(true);
                }
                Err(e) => {
                    *self.inactive.lock() = Some(next);
                    if matches!(e, DeviceError::Removed(_)) {
                        return Err(e);
                    }
                    result = Err(e);
                }
            }
        }
        if self.gate.state.lock().dead {
            return Err(DeviceError::Removed(self.name()));
        }
        self.open_gate();
        result
    }

    /// Suspend with the lifecycle lock held (a resume about to swap tables). Only a
    /// race makes this wait: the daemon quiesces the device before it resumes.
    fn drain_locked(&self, timeout: Duration) -> Result<(), DeviceError> {
        let deadline = Instant::now() + timeout;
        let Some(gen) = self.close_gate()? else { return Ok(()) };
        self.wait_drained(gen, deadline);
        let mut st = self.gate.state.lock();
        if st.dead {
            return Err(DeviceError::Removed(self.name()));
        }
        if st.inflight > 0 {
            return Err(DeviceError::NotDrained {
                name: self.name(),
                inflight: st.inflight,
                waited: timeout,
                during: Quiesce::Swap,
            });
        }
        if !st.quiet {
            st.quiet = true;
            drop(st);
            self.postsuspend_targets();
        }
        Ok(())
    }

    /// Quiesce and shut the targets down (device removal). Requests held by a suspend
    /// and any that arrive later fail with ESHUTDOWN; a suspend or resume waiting for
    /// in-flight requests stops waiting at once.
    pub fn shutdown(&self) {
        {
            // Before the lifecycle lock: a waiting resume may hold it until it sees this.
            let mut st = self.gate.state.lock();
            st.dead = true;
            self.gate.cond.notify_all();
        }
        let _l = self.lifecycle.lock();
        {
            let mut st = self.gate.state.lock();
            let mut deadline = Instant::now() + SHUTDOWN_GRACE;
            let mut warned = false;
            while st.inflight > 0 {
                if !self.gate.cond.wait_until(&mut st, deadline).timed_out() || st.inflight == 0 {
                    continue;
                }
                // Requests a target holds for something that may never come (a
                // synchronous SLINK that is down): ask for them back, again each second
                // (one may have been between two hands the first time). Completions take
                // the gate lock, so not while holding it.
                drop(st);
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(device = %self.name(), "in-flight requests did not finish: cancelling them");
                }
                for t in [self.live.read().clone(), self.inactive.lock().clone()].into_iter().flatten() {
                    t.segments.iter().for_each(|s| s.target.cancel());
                }
                st = self.gate.state.lock();
                deadline = Instant::now() + Duration::from_secs(1);
            }
        }
        if let Some(t) = self.live.write().take() {
            t.shutdown();
        }
        if let Some(t) = self.inactive.lock().take() {
            t.shutdown();
        }
    }

    /// Open/close accounting (NBD connections).
    pub fn open(self: &Arc<Self>) -> OpenHandle {
        self.open_count.fetch_add(1, Ordering::SeqCst);
        OpenHandle(self.clone())
    }

    pub fn open_count(&self) -> u32 {
        self.open_count.load(Ordering::SeqCst)
    }

    pub fn info(&self) -> DeviceInfo {
        let live = self.live_table();
        let size = live.as_ref().map(|t| t.size()).unwrap_or(0);
        DeviceInfo {
            name: self.name(),
            uuid: self.uuid.clone(),
            state: self.state(),
            open_count: self.open_count(),
            segments: live.as_ref().map(|t| t.segments.len()).unwrap_or(0),
            size_bytes: size,
            size_sectors: size / crate::units::SECTOR_SIZE,
            live_table: live.is_some(),
            inactive_table: self.inactive.lock().is_some(),
            read_only: self.read_only(),
            reason: None,
        }
    }

    /// Status of each segment of the active table: `(spec, status)`.
    pub fn status(&self) -> Vec<(SegmentSpec, TargetStatus)> {
        match self.live_table() {
            Some(t) => t.targets().map(|(s, tg)| (s.clone(), tg.status())).collect(),
            None => Vec::new(),
        }
    }

    /// Submit a request (offset and length in bytes, relative to the device).
    ///
    /// Blocks the caller while the device is suspended. Out-of-range requests complete
    /// with `EINVAL` (beyond the end: `ENOSPC` for writes, as NBD asks).
    pub fn submit(&self, req: Request, sink: Arc<dyn IoSink>) {
        if !self.gate.enter() {
            sink.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::SHUTDOWN.raw_os_error())));
            return;
        }
        let guard = InflightGuard {
            gate: self.gate.clone(),
            stats: self.stats.clone(),
            kind: Kind::of(req.op),
            bytes: req.len,
            started: std::time::Instant::now(),
            ok: true,
        };
        let done = Completion::with_guard(sink, req.tag, guard);
        let table = self.live.read().clone();
        let Some(table) = table else {
            done.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::NXIO.raw_os_error())));
            return;
        };
        if req.op.is_write() && self.read_only() {
            done.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::PERM.raw_os_error())));
            return;
        }
        if req.op == Op::Flush {
            return flush_all(&table, req, done);
        }
        let end = req.offset.checked_add(req.len);
        match end {
            Some(end) if end <= table.size => {}
            _ => {
                let errno = if req.op.is_write() { rustix::io::Errno::NOSPC } else { rustix::io::Errno::INVAL };
                done.complete(req, Err(io::Error::from_raw_os_error(errno.raw_os_error())));
                return;
            }
        }
        if req.len == 0 {
            // Nothing to do, and no segment to name when `offset` is the device's end.
            done.complete(req, Ok(()));
            return;
        }
        let first = table.segment_at(req.offset);
        let seg = &table.segments[first];
        if req.offset + req.len <= seg.start + seg.len {
            // Targets see segment-relative offsets; submitters identify requests by `tag`.
            let mut req = req;
            req.offset -= seg.start;
            seg.target.submit(req, done);
        } else {
            split_submit(&table, first, req, done);
        }
    }
}

/// Decrements the open count when an opener goes away.
pub struct OpenHandle(Arc<MappedDevice>);

impl OpenHandle {
    pub fn device(&self) -> &Arc<MappedDevice> {
        &self.0
    }
}

impl Drop for OpenHandle {
    fn drop(&mut self) {
        self.0.open_count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Flush goes to every segment; completes when all did, with the first error.
fn flush_all(table: &LiveTable, req: Request, done: Completion) {
    let join = Join::new(req, done, table.segments.len());
    for (i, seg) in table.segments.iter().enumerate() {
        seg.target.submit(Request::new(Op::Flush, 0, 0, Vec::new(), i as u64), Completion::new(join.clone(), i as u64));
    }
}

/// A request that crosses segment boundaries: split it, join the parts. Rare (clients
/// do not usually straddle segments), so it may allocate.
fn split_submit(table: &LiveTable, first: usize, req: Request, done: Completion) {
    let mut parts = Vec::new();
    let mut off = req.offset;
    let end = req.offset + req.len;
    let mut idx = first;
    while off < end {
        let seg = &table.segments[idx];
        let n = (seg.start + seg.len).min(end) - off;
        parts.push((idx, off, n));
        off += n;
        idx += 1;
    }
    let op = req.op;
    let base = req.offset;
    let bufs: Vec<Vec<u8>> = parts
        .iter()
        .map(|&(_, o, n)| match op {
            Op::Write { .. } => req.buf[(o - base) as usize..(o - base + n) as usize].to_vec(),
            Op::Read => vec![0u8; n as usize],
            _ => Vec::new(),
        })
        .collect();
    let join = Join::new(req, done, parts.len());
    for ((idx, o, n), buf) in parts.into_iter().zip(bufs) {
        let seg = &table.segments[idx];
        // The tag carries the part's byte offset inside the parent request.
        seg.target.submit(Request::new(op, o - seg.start, n, buf, o - base), Completion::new(join.clone(), o - base));
    }
}

/// Joins the parts of a split (or broadcast) request.
struct Join {
    inner: Mutex<JoinState>,
}

struct JoinState {
    parent: Option<(Request, Completion)>,
    remaining: usize,
    error: Option<io::Error>,
}

impl Join {
    fn new(req: Request, done: Completion, parts: usize) -> Arc<Join> {
        Arc::new(Join { inner: Mutex::new(JoinState { parent: Some((req, done)), remaining: parts, error: None }) })
    }
}

impl IoSink for Join {
    fn complete(&self, part: Request, result: io::Result<()>) {
        let mut st = self.inner.lock();
        if let Err(e) = result {
            st.error.get_or_insert(e);
        } else if part.op == Op::Read {
            if let Some((parent, _)) = st.parent.as_mut() {
                let at = part.tag as usize;
                parent.buf[at..at + part.buf.len()].copy_from_slice(&part.buf);
            }
        }
        st.remaining -= 1;
        if st.remaining == 0 {
            let (parent, done) = st.parent.take().expect("join completes once");
            let res = match st.error.take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
            drop(st);
            done.complete(parent, res);
        }
    }
}

/// A sink that lets a thread wait for one request (control paths, tests).
#[derive(Default)]
pub struct WaitSink {
    slot: Mutex<Option<(Request, io::Result<()>)>>,
    cond: Condvar,
}

impl IoSink for WaitSink {
    fn complete(&self, req: Request, result: io::Result<()>) {
        *self.slot.lock() = Some((req, result));
        self.cond.notify_all();
    }
}

impl WaitSink {
    /// Wait for the completion.
    pub fn wait(&self) -> (Request, io::Result<()>) {
        let mut s = self.slot.lock();
        loop {
            if let Some(r) = s.take() {
                return r;
            }
            self.cond.wait(&mut s);
        }
    }
}

impl MappedDevice {
    /// Submit and wait for the completion.
    pub fn submit_wait(&self, req: Request) -> (Request, io::Result<()>) {
        let sink = Arc::new(WaitSink::default());
        self.submit(req, sink.clone());
        sink.wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmrep_formats::table::SegmentSpec;

    /// A target that reads zeros and counts what reaches it.
    struct Counting(std::sync::atomic::AtomicU32);

    impl Target for Counting {
        fn type_name(&self) -> &'static str {
            "counting"
        }
        fn submit(&self, mut req: Request, done: Completion) {
            self.0.fetch_add(1, Ordering::SeqCst);
            req.buf.fill(0);
            done.complete(req, Ok(()));
        }
    }

    fn device(segments: u64) -> (Arc<MappedDevice>, Vec<Arc<Counting>>) {
        let dev = MappedDevice::new("t", None);
        let targets: Vec<Arc<Counting>> = (0..segments).map(|_| Arc::new(Counting(0.into()))).collect();
        let spec = TableSpec {
            segments: (0..segments)
                .map(|i| SegmentSpec { start: i * 8, len: 8, target: "counting".into(), args: vec![], line: 0 })
                .collect(),
        };
        dev.load(LiveTable::new(spec, targets.iter().map(|t| t.clone() as Arc<dyn Target>).collect()));
        dev.resume(SUSPEND_TIMEOUT).unwrap();
        (dev, targets)
    }

    #[test]
    fn zero_length_requests_complete_without_reaching_a_target() {
        let (dev, targets) = device(2);
        for (op, off) in [(Op::Read, 8192), (Op::Write { fua: false }, 8192), (Op::Read, 4096), (Op::Discard, 0)] {
            let (_, r) = dev.submit_wait(Request::new(op, off, 0, Vec::new(), 0));
            assert!(r.is_ok(), "{op:?} of 0 bytes at {off}: {r:?}");
        }
        assert!(targets.iter().all(|t| t.0.load(Ordering::SeqCst) == 0));
        // Past the end is still an error.
        let (_, r) = dev.submit_wait(Request::new(Op::Read, 8193, 0, Vec::new(), 0));
        assert_eq!(r.unwrap_err().raw_os_error(), Some(22));
    }

    /// A target that holds every write until told to let go (like a write waiting for
    /// a synchronous SLINK that is down); `cancel` fails them with ESHUTDOWN.
    #[derive(Default)]
    struct Holding(Mutex<Vec<(Request, Completion)>>);

    impl Target for Holding {
        fn type_name(&self) -> &'static str {
            "holding"
        }
        fn submit(&self, req: Request, done: Completion) {
            match req.op {
                Op::Read => done.complete(req, Ok(())),
                _ => self.0.lock().push((req, done)),
            }
        }
        fn cancel(&self) {
            for (req, done) in self.0.lock().drain(..) {
                done.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::SHUTDOWN.raw_os_error())));
            }
        }
    }

    impl Holding {
        fn release(&self) {
            for (req, done) in self.0.lock().drain(..) {
                done.complete(req, Ok(()));
            }
        }
    }

    /// A one-segment device over a [`Holding`] target with one write held.
    fn holding_device() -> (Arc<MappedDevice>, Arc<Holding>, Arc<WaitSink>) {
        let dev = MappedDevice::new("h", None);
        let target = Arc::new(Holding::default());
        let spec = TableSpec {
            segments: vec![SegmentSpec { start: 0, len: 8, target: "holding".into(), args: vec![], line: 0 }],
        };
        dev.load(LiveTable::new(spec, vec![target.clone() as Arc<dyn Target>]));
        dev.resume(SUSPEND_TIMEOUT).unwrap();
        let sink = Arc::new(WaitSink::default());
        dev.submit(Request::new(Op::Write { fua: false }, 0, 512, vec![1; 512], 7), sink.clone());
        assert_eq!(target.0.lock().len(), 1);
        (dev, target, sink)
    }

    /// Wait (bounded) until the device's gate is closed.
    fn wait_suspended(dev: &MappedDevice) {
        let end = Instant::now() + Duration::from_secs(10);
        while dev.state() != DeviceState::Suspended {
            assert!(Instant::now() < end, "the suspend did not close the gate");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_suspend_that_cannot_drain_gives_up_and_the_device_is_active_again() {
        let (dev, target, sink) = holding_device();
        let e = dev.suspend(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, DeviceError::NotDrained { inflight: 1, during: Quiesce::Suspend, .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("suspend of h gave up after 100 ms: 1 request(s) still in flight"), "{text}");
        assert!(text.contains("the device is active again"), "{text}");
        assert_eq!(dev.state(), DeviceState::Active);
        // New I/O flows; the held write completes when its target lets go.
        let (_, r) = dev.submit_wait(Request::new(Op::Read, 0, 512, vec![0; 512], 1));
        r.unwrap();
        target.release();
        sink.wait().1.unwrap();
        dev.suspend(Duration::from_millis(100)).unwrap();
        assert_eq!(dev.state(), DeviceState::Suspended);
    }

    #[test]
    fn removal_ends_a_waiting_suspend_and_fails_the_held_request() {
        let (dev, _target, sink) = holding_device();
        let d = dev.clone();
        let suspend = std::thread::spawn(move || d.suspend(Duration::from_secs(600)));
        wait_suspended(&dev);
        let t0 = Instant::now();
        dev.shutdown();
        // The grace period, then the target's cancel: never the suspend's 600 s.
        assert!(t0.elapsed() < SHUTDOWN_GRACE + Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(matches!(suspend.join().unwrap(), Err(DeviceError::Removed(_))));
        assert_eq!(sink.wait().1.unwrap_err().raw_os_error(), Some(rustix::io::Errno::SHUTDOWN.raw_os_error()));
    }

    #[test]
    fn resume_cancels_a_waiting_suspend() {
        let (dev, target, sink) = holding_device();
        let d = dev.clone();
        let suspend = std::thread::spawn(move || d.suspend(Duration::from_secs(600)));
        wait_suspended(&dev);
        assert!(!dev.resume(SUSPEND_TIMEOUT).unwrap());
        let e = suspend.join().unwrap().unwrap_err();
        assert!(matches!(e, DeviceError::SuspendCancelled(_)), "{e:?}");
        assert_eq!(dev.state(), DeviceState::Active);
        target.release();
        sink.wait().1.unwrap();
    }

    #[test]
    fn a_swap_that_cannot_drain_keeps_the_old_table_and_the_loaded_one() {
        let (dev, target, sink) = holding_device();
        let spec = TableSpec {
            segments: vec![SegmentSpec { start: 0, len: 16, target: "counting".into(), args: vec![], line: 0 }],
        };
        dev.load(LiveTable::new(spec, vec![Arc::new(Counting(0.into())) as Arc<dyn Target>]));
        let e = dev.resume(Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, DeviceError::NotDrained { during: Quiesce::Swap, .. }), "{e:?}");
        assert!(e.to_string().contains("the loaded table was not swapped in"), "{e}");
        assert_eq!((dev.state(), dev.size(), dev.inactive_table().is_some()), (DeviceState::Active, 4096, true));
        target.release();
        sink.wait().1.unwrap();
        assert!(dev.resume(Duration::from_millis(100)).unwrap());
        assert_eq!(dev.size(), 8192);
    }

    #[test]
    fn a_read_only_device_refuses_writes_with_eperm() {
        let (dev, targets) = device(1);
        dev.set_read_only(true);
        for op in [Op::Write { fua: false }, Op::Discard, Op::WriteZeroes { may_trim: true, fua: false }] {
            let (_, r) = dev.submit_wait(Request::new(op, 0, 512, vec![0; 512], 0));
            assert_eq!(r.unwrap_err().raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()), "{op:?}");
        }
        let (_, r) = dev.submit_wait(Request::new(Op::Read, 0, 512, vec![0; 512], 0));
        r.unwrap();
        let (_, r) = dev.submit_wait(Request::new(Op::Flush, 0, 0, Vec::new(), 0));
        r.unwrap();
        assert_eq!(targets[0].0.load(Ordering::SeqCst), 2, "only the read and the flush reach the target");
    }

    #[test]
    fn a_request_across_segments_is_split_and_joined() {
        let (dev, targets) = device(2);
        let (req, r) = dev.submit_wait(Request::new(Op::Read, 2048, 4096, vec![1; 4096], 0));
        r.unwrap();
        assert!(req.buf.iter().all(|&b| b == 0));
        assert!(targets.iter().all(|t| t.0.load(Ordering::SeqCst) == 1));
    }
}
