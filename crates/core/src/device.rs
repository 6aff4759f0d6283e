//! Mapped devices.
//!
//! A mapped device has a name, a UUID, an *active* table (serving I/O) and possibly an
//! *inactive* one (loaded, waiting for resume). Suspend stops new I/O from reaching the
//! targets and waits for in-flight I/O to finish; requests that arrive while suspended
//! are held (their submitting threads wait) and go on after resume: none is failed.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use dmrep_formats::table::{SegmentSpec, TableSpec};
use parking_lot::{Condvar, Mutex, RwLock};

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

/// In-flight accounting and the suspend gate.
struct Gate {
    state: Mutex<GateState>,
    cond: Condvar,
}

struct GateState {
    suspended: bool,
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

/// Releases one in-flight slot when the request completes.
pub(crate) struct InflightGuard(Arc<Gate>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.exit();
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
    /// Serialises suspend/resume/load against each other.
    lifecycle: Mutex<()>,
}

/// Errors of device lifecycle operations.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {0} has no inactive table to resume with")]
    NoInactiveTable(String),
    #[error("device {name} is open {count} time(s)")]
    Busy { name: String, count: u32 },
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
                state: Mutex::new(GateState { suspended: false, dead: false, inflight: 0 }),
                cond: Condvar::new(),
            }),
            open_count: AtomicU32::new(0),
            lifecycle: Mutex::new(()),
        })
    }

    pub fn name(&self) -> String {
        self.name.read().clone()
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

    /// Hold new I/O and wait for in-flight I/O to finish.
    pub fn suspend(&self) {
        let _l = self.lifecycle.lock();
        self.suspend_locked();
    }

    fn suspend_locked(&self) {
        if let Some(t) = self.live.read().as_ref() {
            for s in &t.segments {
                s.target.presuspend();
            }
        }
        let mut st = self.gate.state.lock();
        st.suspended = true;
        while st.inflight > 0 {
            self.gate.cond.wait(&mut st);
        }
        drop(st);
        if let Some(t) = self.live.read().as_ref() {
            for s in &t.segments {
                s.target.postsuspend();
            }
        }
    }

    /// Swap in the inactive table, if there is one, and let I/O flow again.
    /// Returns whether a table was swapped in. A device without any table stays empty.
    pub fn resume(&self) -> bool {
        let _l = self.lifecycle.lock();
        let next = self.inactive.lock().take();
        let swapped = next.is_some();
        if let Some(next) = next {
            // A swap needs the device quiet, whatever state it is in now.
            if !self.gate.state.lock().suspended {
                self.suspend_locked();
            }
            let old = self.live.write().replace(next);
            if let Some(old) = old {
                old.shutdown();
            }
        }
        if let Some(t) = self.live.read().as_ref() {
            for s in &t.segments {
                s.target.resume();
            }
        }
        let mut st = self.gate.state.lock();
        st.suspended = false;
        self.gate.cond.notify_all();
        swapped
    }

    /// Quiesce and shut the targets down (device removal). Requests held by a suspend
    /// and any that arrive later fail with ESHUTDOWN.
    pub fn shutdown(&self) {
        let _l = self.lifecycle.lock();
        {
            let mut st = self.gate.state.lock();
            st.dead = true;
            self.gate.cond.notify_all();
            let mut deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
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
                deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
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
        let done = Completion::with_guard(sink, req.tag, InflightGuard(self.gate.clone()));
        let table = self.live.read().clone();
        let Some(table) = table else {
            done.complete(req, Err(io::Error::from_raw_os_error(rustix::io::Errno::NXIO.raw_os_error())));
            return;
        };
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
        dev.resume();
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

    #[test]
    fn a_request_across_segments_is_split_and_joined() {
        let (dev, targets) = device(2);
        let (req, r) = dev.submit_wait(Request::new(Op::Read, 2048, 4096, vec![1; 4096], 0));
        r.unwrap();
        assert!(req.buf.iter().all(|&b| b == 0));
        assert!(targets.iter().all(|t| t.0.load(Ordering::SeqCst) == 1));
    }
}
