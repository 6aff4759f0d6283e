//! The mirror's I/O: writes to every live leg, reads from one, flushes, the worker
//! (lazy clears and the resync copier), and the quiesce a suspend needs.
//!
//! Legs are written in turn on the submitting thread (the NBD front end runs several
//! submitting threads per connection, so requests still overlap).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_core::errors::io_error_text;
use dmrep_core::{Op, Request};

use super::state::{Copy, FailKind, Health};
use super::{Leg, Shared};
use crate::replicator::dirty::DirtyLog;

/// How often the worker clears idle regions: a region is cleared after it was idle for
/// between one and two ticks, at the cost of one sync per leg and one log flush per
/// tick that clears something. A tenth of a second keeps a region written now and then
/// from being marked (a log flush) over and over, and a restart's resync small.
pub const TICK: Duration = Duration::from_millis(100);

/// Do one write-like request on a leg.
fn write_leg(leg: &Leg, req: &Request) -> io::Result<()> {
    let off = leg.offset + req.offset;
    match req.op {
        Op::Write { fua } => {
            leg.dev.write_at(&req.buf, off)?;
            if fua {
                leg.dev.sync()?;
            }
            Ok(())
        }
        Op::Discard => leg.dev.discard(off, req.len),
        Op::WriteZeroes { may_trim, fua } => {
            leg.dev.write_zeroes(off, req.len, may_trim)?;
            if fua {
                leg.dev.sync()?;
            }
            Ok(())
        }
        Op::Read | Op::Flush => unreachable!("not a write"),
    }
}

impl Shared {
    /// A write (or discard, write-zeroes): mark its regions durably, write every live
    /// leg, then account for which legs have it.
    pub(crate) fn write(self: &Arc<Self>, req: &Request) -> io::Result<()> {
        let log = self.log();
        let ticket = {
            let mut st = self.state.lock();
            let span = st.span(req.offset, req.len);
            while st.write_blocked(req.offset, req.len, &span) && !st.stopping {
                st.waiters += 1;
                self.cv.wait(&mut st);
                st.waiters -= 1;
            }
            st.begin_write(&*log, req.offset, req.len)
        };
        if ticket.needs_flush {
            if let Err(e) = log.flush() {
                let mut st = self.state.lock();
                st.abort_write(&ticket);
                if !std::mem::replace(&mut st.log_failed, true) {
                    tracing::error!(device = %self.device, error = %io_error_text(&e), "mirror: the region log cannot be written: writes fail");
                }
                self.cv.notify_all();
                return Err(e);
            }
            self.state.lock().marks_durable(ticket.regions.clone());
        }
        let mut ok = vec![false; self.legs.len()];
        let mut failed = Vec::new();
        for &i in &ticket.legs {
            match write_leg(&self.legs[i], req) {
                Ok(()) => ok[i] = true,
                Err(e) => failed.push((i, FailKind::Write, io_error_text(&e))),
            }
        }
        let (dropped, result) = {
            let mut st = self.state.lock();
            let r = st.end_write(&ticket, &ok, &failed, self.handle_errors);
            if st.anyone_waits() {
                self.cv.notify_all();
            }
            r
        };
        for (i, _, msg) in &failed {
            self.report_failure(*i, FailKind::Write, msg, dropped.contains(i));
        }
        result
    }

    /// A read: from a leg that has every region of it, in round robin; a failing leg
    /// is skipped (and dropped with `handle_errors`) and the next one tried.
    pub(crate) fn read(self: &Arc<Self>, req: &mut Request) -> io::Result<()> {
        self.log();
        let order = {
            let mut st = self.state.lock();
            let span = st.span(req.offset, req.len);
            st.read_order(span)
        };
        let mut last = None;
        for i in order {
            let leg = &self.legs[i];
            match leg.dev.read_at(&mut req.buf, leg.offset + req.offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let msg = io_error_text(&e);
                    let dropped = self.state.lock().read_failed(i, msg.clone(), self.handle_errors);
                    self.report_failure(i, FailKind::Read, &msg, dropped);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("mirror: no leg left to read from")))
    }

    /// A flush: every live leg. A leg that fails it may have lost writes it
    /// acknowledged; with `handle_errors` it is dropped (and copied in full when it
    /// comes back), otherwise the flush fails.
    pub(crate) fn flush_legs(self: &Arc<Self>) -> io::Result<()> {
        self.log();
        let legs: Vec<usize> = {
            let st = self.state.lock();
            (0..self.legs.len()).filter(|&i| st.legs[i].alive()).collect()
        };
        let mut failed = Vec::new();
        for &i in &legs {
            if let Err(e) = self.legs[i].dev.sync() {
                failed.push((i, e));
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        let mut dropped = Vec::new();
        {
            let mut st = self.state.lock();
            for (i, e) in &failed {
                let leg = &mut st.legs[*i];
                leg.errors += 1;
                leg.error = Some(FailKind::Flush);
                leg.last_error = Some(io_error_text(e));
                if self.handle_errors && leg.alive() {
                    leg.health = Health::Failed(FailKind::Flush);
                    dropped.push(*i);
                }
            }
            self.cv.notify_all();
        }
        for (i, e) in &failed {
            self.report_failure(*i, FailKind::Flush, &io_error_text(e), dropped.contains(i));
        }
        if self.handle_errors && legs.len() > failed.len() {
            return Ok(());
        }
        Err(failed.swap_remove(0).1)
    }

    pub(crate) fn report_failure(&self, leg: usize, kind: FailKind, msg: &str, dropped: bool) {
        if dropped {
            tracing::warn!(device = %self.device, leg, path = %self.legs[leg].path, error = msg, op = kind.name(),
                "mirror: leg failed and is dropped: writes go on to the other legs, its regions are marked");
            self.emit(leg, "dead", format!("{} error: {msg}", kind.name()));
        } else {
            tracing::warn!(device = %self.device, leg, path = %self.legs[leg].path, error = msg, op = kind.name(),
                "mirror: I/O error on a leg");
        }
    }

    /// The worker: every [`TICK`] clear idle regions; in between, copy the regions
    /// legs lack (unless the device is suspended).
    pub(crate) fn worker(self: Arc<Self>) {
        let log = self.log.lock().clone().expect("the worker starts after the log is open");
        let mut next_tick = Instant::now() + TICK;
        let mut syncing = false;
        loop {
            let paused = self.life.lock().paused;
            let mut st = self.state.lock();
            if st.stopping {
                return;
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                if st.tick_take() {
                    drop(st);
                    self.clear_tick(&*log);
                }
                continue;
            }
            let pending = st.resync_pending();
            if pending && !paused {
                if let Some(c) = st.next_copy() {
                    drop(st);
                    if !syncing {
                        syncing = true;
                        tracing::info!(device = %self.device, "mirror: resync started");
                    }
                    self.copy(c);
                    continue;
                }
            }
            if syncing && !pending {
                syncing = false;
                let (copied, bytes) = (st.regions_copied, st.bytes_copied);
                drop(st);
                tracing::info!(device = %self.device, regions_copied = copied, bytes_copied = bytes, "mirror: resync complete: legs in sync");
                let fields = [
                    ("name", self.device.clone()),
                    ("target", "mirror".to_string()),
                    ("sync", "complete".to_string()),
                    ("regions_copied", copied.to_string()),
                ];
                dmrep_core::events::emit(dmrep_core::events::Action::Change, "device", &fields);
                continue;
            }
            st.worker_idle = true;
            self.cv.wait_until(&mut st, next_tick);
            st.worker_idle = false;
        }
    }

    /// Sync every live leg, then clear the regions of this tick and flush the log.
    fn clear_tick(&self, log: &dyn DirtyLog) {
        let legs: Vec<usize> = {
            let st = self.state.lock();
            (0..self.legs.len()).filter(|&i| st.legs[i].alive()).collect()
        };
        let synced = legs.iter().all(|&i| self.legs[i].dev.sync().is_ok());
        let n = self.state.lock().tick_finish(log, synced);
        if n > 0 {
            if let Err(e) = log.flush() {
                tracing::warn!(device = %self.device, error = %io_error_text(&e), "mirror: region log flush failed (clears retried)");
            }
        }
    }

    /// Copy one region from its source to the legs that lack it.
    fn copy(&self, c: Copy) {
        let off = c.region * self.region_bytes;
        let n = self.region_bytes.min(self.len - off);
        let mut buf = vec![0u8; n as usize];
        let src = &self.legs[c.source];
        if let Err(e) = src.dev.read_at(&mut buf, src.offset + off) {
            let msg = io_error_text(&e);
            let dropped = {
                let mut st = self.state.lock();
                let dropped = st.read_failed(c.source, msg.clone(), self.handle_errors);
                if !dropped {
                    // Without handle_errors the source stays; the copies wait for an
                    // operator (`leg N recover`) instead of failing in a loop.
                    for &t in &c.targets {
                        st.legs[t].resync_blocked = true;
                    }
                }
                st.copy_abort();
                self.cv.notify_all();
                dropped
            };
            self.report_failure(c.source, FailKind::Read, &msg, dropped);
            return;
        }
        let mut copied = Vec::new();
        let mut failed = Vec::new();
        for &t in &c.targets {
            let leg = &self.legs[t];
            match leg.dev.write_at(&buf, leg.offset + off) {
                Ok(()) => copied.push(t),
                Err(e) => failed.push((t, io_error_text(&e))),
            }
        }
        let mut dropped = Vec::new();
        {
            let mut st = self.state.lock();
            for (t, msg) in &failed {
                let leg = &mut st.legs[*t];
                leg.errors += 1;
                leg.error = Some(FailKind::Sync);
                leg.last_error = Some(msg.clone());
                if self.handle_errors {
                    leg.health = Health::Failed(FailKind::Sync);
                    dropped.push(*t);
                } else {
                    leg.resync_blocked = true;
                }
            }
            st.copy_done(&c, &copied, n);
            self.cv.notify_all();
        }
        for (t, msg) in &failed {
            self.report_failure(*t, FailKind::Sync, msg, dropped.contains(t));
        }
    }

    /// The device is quiet (postsuspend, shutdown): let a copy in progress end, sync the
    /// legs, clear every idle region and flush the log, so that what is marked is what
    /// legs lack.
    pub(crate) fn quiesce(&self) {
        let Some(log) = self.log.lock().clone() else { return };
        {
            let mut st = self.state.lock();
            let deadline = Instant::now() + Duration::from_secs(30);
            while st.recovering.is_some() {
                st.waiters += 1;
                let timed_out = self.cv.wait_until(&mut st, deadline).timed_out();
                st.waiters -= 1;
                if timed_out {
                    break;
                }
            }
            st.tick_take();
            st.tick_take();
        }
        self.clear_tick(&*log);
        if let Err(e) = log.flush() {
            tracing::warn!(device = %self.device, error = %io_error_text(&e), "mirror: region log flush failed at suspend");
        }
    }
}
