//! Leaving ordered mode, dirty regions, resynchronisation, and the way back.
//!
//! An SLINK leaves ordered (log) mode when the log is full and it holds the oldest
//! entries (and has dirty logs, and its policy lacks `stall`), or when its RD starts
//! out of sync (`sync` dirty log). Then: every entry it still needs becomes dirty
//! regions (durably), it is unregistered from the log (its claims dropped, space freed;
//! after a crash the missing cursor says it was out of sync), and new writes mark
//! regions instead of queueing entries. The resync copies dirty regions LD -> RD,
//! reading through the group's read path (LD plus entries not yet on it). When no region
//! is dirty, the appender re-registers the SLINK at a batch boundary: ordered again.
//!
//! Race rules (all under `dirty_lock`, then `st`):
//! - a write marks its regions durably dirty and is published (overlay, `touch`) in one
//!   step, before it is acknowledged;
//! - the resync notes a region `in_copy` before reading it and clears it only if no
//!   write touched it since; otherwise the region stays dirty and is copied again.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use std::{io, thread};

use serde::Serialize;
use tracing::{info, warn};

use super::{errno, update_mode, Inner, State};
use crate::replicator::dirty::{region_span, DirtyLog};
use crate::replicator::log::{EntryKind, EntryMeta};
use crate::replicator::slink::{ApplyEntry, SlinkHandler};
use dmrep_core::{Completion, Request};

/// Largest read/write the resync does at once.
const RESYNC_CHUNK: u64 = 1 << 20;

/// Per-SLINK resync bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct ResyncState {
    /// No dirty region left: the appender may return the SLINK to ordered mode.
    pub done: bool,
    pub reason: Option<String>,
    pub since: Option<SystemTime>,
    pub regions_done: u64,
    pub bytes_copied: u64,
    pub started: Option<Instant>,
    /// Bytes per second; None: unlimited.
    pub rate_limit: Option<u64>,
    /// Every region must be copied whatever the dirty logs say (log entries were lost).
    pub full: bool,
    /// Added to a live group: its dirty logs say what to copy (`sync`: all, `nosync`:
    /// nothing), even for `core` logs.
    pub new_slink: bool,
}

/// What status shows of an SLINK's synchronisation.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncStatus {
    /// In ordered (log) mode: the RDs are write-order consistent.
    pub ordered: bool,
    /// `ordered`, `out_of_sync` (dirty regions, resync waiting for the SLINK) or `resyncing`.
    pub state: &'static str,
    pub reason: Option<String>,
    pub since_ms: Option<u64>,
    pub dirty_regions: u64,
    pub regions: u64,
    pub regions_done: u64,
    pub bytes_copied: u64,
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
    pub rate_limit: Option<u64>,
}

pub(super) fn status(st: &State, nr: u16) -> ResyncStatus {
    let rt = &st.slinks[&nr];
    let (mut dirty, mut regions, mut region_bytes) = (0, 0, 0);
    for ((s, _), (log, _)) in st.dirty.iter() {
        if *s == nr {
            dirty += log.dirty_count();
            regions += log.regions();
            region_bytes = log.region_bytes();
        }
    }
    let r = &rt.resync;
    // A rate only while a resync runs (after it, elapsed time would only dilute it).
    let rate = match r.started {
        Some(t) if !rt.ordered && t.elapsed() > Duration::from_millis(100) => {
            (r.bytes_copied as f64 / t.elapsed().as_secs_f64()) as u64
        }
        _ => 0,
    };
    let state = if rt.ordered {
        "ordered"
    } else if rt.accessible && !rt.paused {
        "resyncing"
    } else {
        "out_of_sync"
    };
    ResyncStatus {
        ordered: rt.ordered,
        state,
        reason: r.reason.clone(),
        since_ms: r.since.map(super::unix_ms),
        dirty_regions: dirty,
        regions,
        regions_done: r.regions_done,
        bytes_copied: r.bytes_copied,
        rate_bytes_per_s: rate,
        eta_s: (rate > 0 && dirty > 0).then(|| dirty * region_bytes / rate),
        rate_limit: r.rate_limit,
    }
}

/// Mark the regions of appended entries dirty for every SLINK out of ordered mode.
/// Durable on return. Caller holds `dirty_lock`.
pub(super) fn mark_written(inner: &Inner, unordered: &[u16], metas: &[EntryMeta]) -> io::Result<()> {
    if unordered.is_empty() {
        return Ok(());
    }
    // Find the logs under the lock, mark (I/O for `disk` logs) outside it.
    let mut marks: Vec<(Arc<dyn DirtyLog>, u64, u64)> = Vec::with_capacity(metas.len() * unordered.len());
    {
        let st = inner.st.lock();
        for m in metas {
            for s in unordered {
                let (log, _) = st
                    .dirty
                    .get(&(*s, m.dev_nr))
                    .ok_or_else(|| io::Error::other(format!("slink {s} has no dirty log for device {}", m.dev_nr)))?;
                marks.push((log.clone(), m.offset, m.len as u64));
            }
        }
    }
    for (log, offset, len) in marks {
        log.mark_range(offset, len);
        log.flush()?;
    }
    Ok(())
}

/// Record writes into regions under copy (caller holds `dirty_lock` and `st`).
pub(super) fn touch(st: &mut State, unordered: &[u16], metas: &[EntryMeta]) {
    if st.in_copy.is_empty() {
        return;
    }
    for m in metas {
        for s in unordered {
            if let Some((log, _)) = st.dirty.get(&(*s, m.dev_nr)) {
                for r in region_span(m.offset, m.len as u64, log.region_bytes()) {
                    if st.in_copy.contains(&(*s, m.dev_nr, r)) {
                        st.touched.insert((*s, m.dev_nr, r));
                    }
                }
            }
        }
    }
}

/// Whether SLINK `nr` may leave ordered mode: not SLINK 0, no `stall`, and a dirty
/// log for every device it carries.
fn may_leave(inner: &Inner, st: &State, nr: u16) -> bool {
    let rt = &st.slinks[&nr];
    nr != 0
        && rt.ordered
        && !rt.policy.stall
        && st.dirty.keys().any(|(s, _)| *s == nr)
        && inner.handler(nr).map(|h| h.devices()).unwrap_or_default().iter().all(|d| st.dirty.contains_key(&(nr, *d)))
}

/// The log is full: the eligible SLINK furthest behind leaves ordered mode. Returns
/// whether one did.
pub(super) fn leave_ordered_for_space(inner: &Inner) -> bool {
    let _d = inner.dirty_lock.lock();
    let mut st = inner.st.lock();
    let victim = st
        .slinks
        .iter()
        .filter(|(nr, rt)| !rt.outstanding.is_empty() && may_leave(inner, &st, **nr))
        .min_by_key(|(_, rt)| rt.applied)
        .map(|(nr, _)| *nr);
    let Some(nr) = victim else { return false };
    match leave_ordered(inner, &mut st, nr, "replication log full") {
        Ok(ready) => {
            drop(st);
            complete_all(ready);
            true
        }
        Err(e) => {
            warn!(group = %inner.name, slink = nr, "could not leave ordered mode: {e}");
            false
        }
    }
}

fn complete_all(ready: Vec<(Request, Completion)>) {
    for (req, done) in ready {
        done.complete(req, Ok(()));
    }
}

/// Take SLINK `nr` out of ordered mode (caller holds `dirty_lock` and `st`). Returns
/// the writes that no longer wait for anything.
fn leave_ordered(inner: &Inner, st: &mut State, nr: u16, reason: &str) -> io::Result<Vec<(Request, Completion)>> {
    let rt = &st.slinks[&nr];
    let Some(last) = rt.outstanding.back().map(|o| o.0) else {
        return finish_leave(inner, st, nr, reason, 0);
    };
    let mut from = rt.applied + 1;
    let mut marked = 0u64;
    loop {
        let metas = inner.log.entries_from(from, 65536);
        let Some(end) = metas.last().map(|m| m.seq) else { break };
        for m in metas.iter().filter(|m| m.seq <= last && m.slinks.contains(nr)) {
            let (log, _) = st
                .dirty
                .get(&(nr, m.dev_nr))
                .ok_or_else(|| io::Error::other(format!("no dirty log for device {}", m.dev_nr)))?;
            log.mark_range(m.offset, m.len as u64);
            log.flush()?;
            marked += 1;
        }
        if end >= last {
            break;
        }
        from = end + 1;
    }
    finish_leave(inner, st, nr, reason, marked)
}

fn finish_leave(
    inner: &Inner,
    st: &mut State,
    nr: u16,
    reason: &str,
    marked: u64,
) -> io::Result<Vec<(Request, Completion)>> {
    inner.log.unregister_slink(nr).map_err(io::Error::other)?;
    let now = Instant::now();
    let rt = st.slinks.get_mut(&nr).expect("slink");
    rt.ordered = false;
    rt.gen += 1;
    rt.outstanding.clear();
    rt.out_bytes = 0;
    rt.resync = ResyncState {
        reason: Some(reason.to_string()),
        since: Some(SystemTime::now()),
        rate_limit: rt.resync.rate_limit,
        ..Default::default()
    };
    update_mode(&inner.name, nr, rt, now);
    let dirty: u64 = st.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum();
    warn!(group = %inner.name, slink = nr, reason, entries = marked, dirty_regions = dirty, "slink left ordered mode: its devices are out of sync until resync ends");
    // Writes that waited for this SLINK no longer do.
    let mut ready = Vec::new();
    let done: Vec<u64> = st
        .awaiting
        .iter_mut()
        .filter_map(|(seq, a)| {
            a.wait.remove(&nr);
            a.wait.is_empty().then_some(*seq)
        })
        .collect();
    for s in done {
        let a = st.awaiting.remove(&s).expect("present");
        ready.push((a.req, a.done));
    }
    // Cached data no SLINK in ordered mode still needs is dropped by the copiers.
    inner.copier_cv.notify_all();
    inner.appender_cv.notify_all();
    Ok(ready)
}

/// Called by the appender between batches: SLINKs whose resync found nothing dirty go
/// back to ordered mode.
pub(super) fn maybe_reorder(inner: &Inner, st: &mut State) {
    let candidates: Vec<u16> =
        st.slinks.iter().filter(|(_, rt)| !rt.ordered && rt.resync.done).map(|(nr, _)| *nr).collect();
    for nr in candidates {
        let dirty: u64 = st.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum();
        let all_attached =
            inner.handler(nr).map(|h| h.devices()).unwrap_or_default().iter().all(|d| st.dirty.contains_key(&(nr, *d)));
        if dirty > 0 || st.in_copy.iter().any(|k| k.0 == nr) || !all_attached {
            st.slinks.get_mut(&nr).expect("slink").resync.done = false;
            continue;
        }
        if let Err(e) = inner.log.register_slink(nr) {
            warn!(group = %inner.name, slink = nr, "cannot return to ordered mode: {e}");
            continue;
        }
        let applied = inner.log.cursor(nr).unwrap_or(0);
        let rt = st.slinks.get_mut(&nr).expect("slink");
        rt.ordered = true;
        rt.gen += 1;
        rt.applied = applied;
        rt.outstanding.clear();
        rt.out_bytes = 0;
        let took = rt.resync.started.map(|t| t.elapsed());
        info!(
            group = %inner.name, slink = nr, regions = rt.resync.regions_done, bytes = rt.resync.bytes_copied, took = ?took,
            "resync complete: slink back in ordered mode"
        );
        rt.resync.done = false;
        rt.resync.full = false;
        rt.resync.new_slink = false;
        rt.resync.reason = None;
        rt.resync.since = None;
    }
}

/// Copy one dirty region of SLINK `nr` LD -> RD. Sets `done` when none is left.
pub(super) fn step(inner: &Inner, nr: u16, handler: &dyn SlinkHandler) -> io::Result<()> {
    let next = {
        let mut st = inner.st.lock();
        let found = st
            .dirty
            .iter()
            .filter(|((s, _), _)| *s == nr)
            .find_map(|((_, dev), (log, bytes))| log.next_dirty(0).map(|r| (*dev, r, log.clone(), *bytes)));
        if found.is_none() {
            st.slinks.get_mut(&nr).expect("slink").resync.done = true;
            drop(st);
            inner.appender_cv.notify_all();
            return Ok(());
        }
        let rt = st.slinks.get_mut(&nr).expect("slink");
        rt.resync.started.get_or_insert_with(Instant::now);
        found
    };
    let Some((dev, region, log, dev_bytes)) = next else { return Ok(()) };
    if !handler.has_device(dev) {
        // Not attached yet (two-target form): try again later.
        thread::sleep(Duration::from_millis(50));
        return Ok(());
    }
    let key = (nr, dev, region);
    {
        let _d = inner.dirty_lock.lock();
        let mut st = inner.st.lock();
        st.in_copy.insert(key);
        st.touched.remove(&key);
    }
    let rb = log.region_bytes();
    let off = region * rb;
    let len = rb.min(dev_bytes.saturating_sub(off));
    let result = copy_region(inner, handler, dev, off, len);
    let _d = inner.dirty_lock.lock();
    let mut st = inner.st.lock();
    st.in_copy.remove(&key);
    let retouched = st.touched.remove(&key);
    result?;
    if !retouched {
        drop(st);
        log.clear(region);
        log.flush()?;
        let mut st = inner.st.lock();
        let rt = st.slinks.get_mut(&nr).expect("slink");
        rt.resync.regions_done += 1;
        rt.resync.bytes_copied += len;
        let limit = rt.resync.rate_limit;
        drop(st);
        drop(_d);
        if let Some(rate) = limit.filter(|r| *r > 0) {
            thread::sleep(Duration::from_secs_f64(len as f64 / rate as f64).min(Duration::from_secs(5)));
        }
    }
    Ok(())
}

/// Read `[off, off+len)` of device `dev` as the application sees it and write it to
/// the SLINK's copy, durably.
fn copy_region(inner: &Inner, handler: &dyn SlinkHandler, dev: u32, off: u64, len: u64) -> io::Result<()> {
    let mut bufs = Vec::new();
    let mut at = off;
    while at < off + len {
        let n = RESYNC_CHUNK.min(off + len - at);
        let mut buf = vec![0u8; n as usize];
        inner.read(dev, at, &mut buf)?;
        bufs.push((at, buf));
        at += n;
    }
    let entries: Vec<ApplyEntry<'_>> = bufs
        .iter()
        .map(|(at, b)| ApplyEntry { dev_nr: dev, offset: *at, len: b.len() as u32, kind: EntryKind::Write, data: b })
        .collect();
    handler.apply(&entries)
}

impl super::Group {
    /// Attach the dirty log of device `dev` on SLINK `nr`. With `initial_dirty` every
    /// region starts dirty (a `sync` dirty log on a new RD: initial full copy).
    pub fn attach_dirty_log(
        &self,
        nr: u16,
        dev: u32,
        log: Arc<dyn DirtyLog>,
        dev_bytes: u64,
        initial_dirty: bool,
    ) -> io::Result<()> {
        let inner = &self.inner;
        let _d = inner.dirty_lock.lock();
        let mut st = inner.st.lock();
        let rt = st.slinks.get(&nr).ok_or_else(|| errno(22))?;
        if initial_dirty || rt.resync.full || (!rt.ordered && !rt.resync.new_slink && log.kind() == "core") {
            // A new RD to fill, or an out-of-sync RD whose in-memory regions were lost.
            log.mark_all();
            log.flush()?;
        }
        let ordered = rt.ordered;
        st.dirty.insert((nr, dev), (log.clone(), dev_bytes));
        let mut ready = Vec::new();
        if ordered && nr != 0 && log.dirty_count() > 0 {
            ready = leave_ordered(inner, &mut st, nr, "initial synchronisation")?;
        }
        st.slinks.get_mut(&nr).expect("slink").resync.done = false;
        drop(st);
        drop(_d);
        complete_all(ready);
        inner.copier_cv.notify_all();
        Ok(())
    }

    /// Forget the dirty log of a device going away.
    pub fn detach_dirty_log(&self, nr: u16, dev: u32) {
        let _d = self.inner.dirty_lock.lock();
        self.inner.st.lock().dirty.remove(&(nr, dev));
    }

    /// Limit the resync of SLINK `nr` to `rate` bytes per second (0: unlimited).
    pub fn set_resync_rate(&self, nr: u16, rate: u64) -> Result<(), String> {
        let mut st = self.inner.st.lock();
        let rt = st.slinks.get_mut(&nr).ok_or_else(|| format!("no slink {nr}"))?;
        rt.resync.rate_limit = (rate > 0).then_some(rate);
        Ok(())
    }

    /// Synchronisation status of SLINK `nr`.
    pub fn resync_status(&self, nr: u16) -> Option<ResyncStatus> {
        let st = self.inner.st.lock();
        st.slinks.contains_key(&nr).then(|| status(&st, nr))
    }

    /// Dirty and total regions of device `dev` on SLINK `nr`.
    pub fn device_regions(&self, nr: u16, dev: u32) -> Option<(u64, u64)> {
        let st = self.inner.st.lock();
        st.dirty.get(&(nr, dev)).map(|(l, _)| (l.dirty_count(), l.regions()))
    }

    /// Whether SLINK `nr` is in ordered mode.
    pub fn is_ordered(&self, nr: u16) -> bool {
        self.inner.st.lock().slinks.get(&nr).is_some_and(|rt| rt.ordered)
    }
}
