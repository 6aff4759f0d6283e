//! The mirror's region and leg state: one place where it changes, under one lock.
//!
//! Per leg: its health and a bitmap of the regions it may lack (`stale`). Per region:
//! the writes in flight into it and whether the resync is copying it. The region log
//! ([`DirtyLog`]) holds the union the crash-safety rule needs: a region is marked
//! (durably, for `disk`) before a write into it starts, and cleared only when no write
//! is in flight into it and no leg is stale there. Clears are lazy and batched: a region
//! becomes a candidate when its last write ends, and is cleared after it stayed idle for
//! a whole tick of the worker (`young` -> `old` -> cleared), so a region written
//! continuously is not cleared and marked again (a log flush each time) at every write.
//!
//! No I/O happens here: the write and resync paths (in `io`) take what they need under
//! the lock, do their I/O without it, and report back.

use std::collections::{HashMap, HashSet};
use std::io;

use crate::replicator::dirty::{region_span, Bitmap, DirtyLog};

/// Why a leg was failed; the letter is dm-mirror's status character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// A write failed (`D`, dead).
    Write,
    /// A read failed (`R`).
    Read,
    /// A resync copy onto it failed (`S`).
    Sync,
    /// A flush failed (`F`).
    Flush,
}

impl FailKind {
    pub fn letter(self) -> char {
        match self {
            FailKind::Write => 'D',
            FailKind::Read => 'R',
            FailKind::Sync => 'S',
            FailKind::Flush => 'F',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FailKind::Write => "write",
            FailKind::Read => "read",
            FailKind::Sync => "sync",
            FailKind::Flush => "flush",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Takes writes and (where not stale) reads.
    Alive,
    /// Dropped after an I/O error (`handle_errors`): takes nothing until `leg N recover`.
    Failed(FailKind),
    /// Split off (`split N`): an independent copy, no longer part of the mirror.
    Split,
}

#[derive(Debug, Clone)]
pub struct LegState {
    pub health: Health,
    /// Regions this leg may lack.
    pub stale: Bitmap,
    /// The last error seen on this leg (also without `handle_errors`, where the leg
    /// stays in use and only the failed region is out of sync).
    pub error: Option<FailKind>,
    pub last_error: Option<String>,
    pub errors: u64,
    /// A resync copy onto this leg failed without `handle_errors`: copies to it wait
    /// for `leg N recover` rather than failing in a loop.
    pub resync_blocked: bool,
}

impl LegState {
    pub fn new(regions: u64) -> Self {
        LegState {
            health: Health::Alive,
            stale: Bitmap::new(regions),
            error: None,
            last_error: None,
            errors: 0,
            resync_blocked: false,
        }
    }

    pub fn alive(&self) -> bool {
        self.health == Health::Alive
    }

    /// The status letter: `A`, or the letter of the failure (dropped or not).
    pub fn letter(&self) -> char {
        match self.health {
            Health::Failed(k) => k.letter(),
            _ => self.error.map_or('A', FailKind::letter),
        }
    }
}

/// What a write may proceed with, taken under the lock by [`State::begin_write`].
#[derive(Debug)]
pub struct WriteTicket {
    id: u64,
    pub regions: std::ops::Range<u64>,
    /// Legs to write to (alive when the write began).
    pub legs: Vec<usize>,
    /// The log must be flushed before the data is written (a region was marked now, or
    /// was marked by a write whose flush has not returned yet).
    pub needs_flush: bool,
}

/// One region copy the resync worker does.
#[derive(Debug)]
pub struct Copy {
    pub region: u64,
    pub source: usize,
    pub targets: Vec<usize>,
}

pub struct State {
    pub legs: Vec<LegState>,
    pub regions: u64,
    pub region_bytes: u64,
    /// Writes in flight per region.
    inflight: HashMap<u64, u32>,
    /// Writes in flight (any region): a split waits for zero.
    pub active_writes: u64,
    /// Byte ranges of the writes in flight, by ticket id: a write overlapping one waits
    /// for it, so two overlapping writes reach every leg in the same order (otherwise
    /// legs could keep different data for a region the log calls in sync).
    ranges: Vec<(u64, u64, u64)>,
    next_id: u64,
    /// The region the resync is copying: writes into it wait.
    pub recovering: Option<u64>,
    /// New writes wait while set (a split in progress).
    pub writes_held: bool,
    /// Clear candidates: idle since the last tick, and since the one before.
    young: HashSet<u64>,
    old: HashSet<u64>,
    /// The regions a tick clears once the legs are synced.
    clearing: HashSet<u64>,
    /// Regions marked in the log whose flush has not returned yet.
    unflushed: HashSet<u64>,
    /// Round robin for reads.
    rr: usize,
    /// Where the resync looks next.
    cursor: u64,
    pub regions_copied: u64,
    pub bytes_copied: u64,
    /// The log could not be made durable (its status letter becomes `D`).
    pub log_failed: bool,
    pub stopping: bool,
    /// Threads waiting on the condition variable for a write, a split or a suspend.
    pub waiters: u32,
    /// The worker waits for work (a copy blocked by a write, or a tick).
    pub worker_idle: bool,
}

impl State {
    pub fn new(legs: usize, regions: u64, region_bytes: u64) -> Self {
        State {
            legs: (0..legs).map(|_| LegState::new(regions)).collect(),
            regions,
            region_bytes,
            inflight: HashMap::new(),
            active_writes: 0,
            ranges: Vec::new(),
            next_id: 0,
            recovering: None,
            writes_held: false,
            young: HashSet::new(),
            old: HashSet::new(),
            clearing: HashSet::new(),
            unflushed: HashSet::new(),
            rr: 0,
            cursor: 0,
            regions_copied: 0,
            bytes_copied: 0,
            log_failed: false,
            stopping: false,
            waiters: 0,
            worker_idle: false,
        }
    }

    pub fn span(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let r = region_span(offset, len.max(1), self.region_bytes);
        r.start..r.end.min(self.regions)
    }

    /// Whether a write of `[offset, offset+len)` into `regions` must wait (resync
    /// copying one, a split, or an overlapping write in flight).
    pub fn write_blocked(&self, offset: u64, len: u64, regions: &std::ops::Range<u64>) -> bool {
        self.writes_held
            || self.recovering.is_some_and(|r| regions.contains(&r))
            || self.ranges.iter().any(|&(o, l, _)| o < offset + len.max(1) && offset < o + l.max(1))
    }

    /// Whether any leg that is part of the mirror is stale in region `r`.
    pub fn any_stale(&self, r: u64) -> bool {
        self.legs.iter().any(|l| l.health != Health::Split && l.stale.get(r))
    }

    /// Start a write into `regions` (the caller checked [`State::write_blocked`]): count
    /// it in flight, mark its regions in the log (in memory) and say whether the log
    /// must be flushed before the data goes out.
    pub fn begin_write(&mut self, log: &dyn DirtyLog, offset: u64, len: u64) -> WriteTicket {
        let regions = self.span(offset, len);
        self.next_id += 1;
        let id = self.next_id;
        self.ranges.push((offset, len, id));
        let mut needs_flush = false;
        for r in regions.clone() {
            *self.inflight.entry(r).or_insert(0) += 1;
            self.young.remove(&r);
            self.old.remove(&r);
            self.clearing.remove(&r);
            if !log.is_dirty(r) {
                log.mark_range(r * self.region_bytes, 1);
                self.unflushed.insert(r);
                needs_flush = true;
            } else if self.unflushed.contains(&r) {
                needs_flush = true;
            }
        }
        self.active_writes += 1;
        let legs = (0..self.legs.len()).filter(|&i| self.legs[i].alive()).collect();
        WriteTicket { id, regions, legs, needs_flush }
    }

    /// The log flush a write waited for returned Ok: its marks are durable.
    pub fn marks_durable(&mut self, regions: std::ops::Range<u64>) {
        for r in regions {
            self.unflushed.remove(&r);
        }
    }

    /// Finish a write: `ok[i]` says whether leg `i` has the data. Legs that do not
    /// (failed now, dropped before, or recovered meanwhile) become stale there; with
    /// `handle_errors` a leg that failed is dropped. Returns the legs failed *now*
    /// (to report them) and the write's result.
    pub fn end_write(
        &mut self,
        t: &WriteTicket,
        ok: &[bool],
        failed: &[(usize, FailKind, String)],
        handle_errors: bool,
    ) -> (Vec<usize>, io::Result<()>) {
        let mut dropped = Vec::new();
        for (i, kind, msg) in failed {
            let leg = &mut self.legs[*i];
            leg.errors += 1;
            leg.error = Some(*kind);
            leg.last_error = Some(msg.clone());
            if handle_errors && leg.alive() {
                leg.health = Health::Failed(*kind);
                dropped.push(*i);
            }
        }
        for (i, leg) in self.legs.iter_mut().enumerate() {
            if leg.health != Health::Split && !ok[i] {
                for r in t.regions.clone() {
                    leg.stale.set(r);
                }
            }
        }
        self.active_writes -= 1;
        self.ranges.retain(|&(_, _, id)| id != t.id);
        for r in t.regions.clone() {
            let n = self.inflight.get_mut(&r).expect("region in flight");
            *n -= 1;
            if *n == 0 {
                self.inflight.remove(&r);
                if !self.any_stale(r) {
                    self.young.insert(r);
                }
            }
        }
        let any_ok = ok.iter().any(|&o| o);
        let result = if failed.is_empty() || (handle_errors && any_ok) {
            Ok(())
        } else {
            Err(io::Error::from(rustix::io::Errno::IO))
        };
        (dropped, result)
    }

    /// Undo [`State::begin_write`] for a write that never went out (its log flush
    /// failed). Its regions stay marked.
    pub fn abort_write(&mut self, t: &WriteTicket) {
        self.active_writes -= 1;
        self.ranges.retain(|&(_, _, id)| id != t.id);
        for r in t.regions.clone() {
            if let Some(n) = self.inflight.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    self.inflight.remove(&r);
                }
            }
        }
    }

    /// The legs a read of `regions` may use, in the order to try them: alive legs
    /// with none of the regions stale, starting at the next one in round robin. If no
    /// alive leg has them all (after a crash the log does not say which leg wrote
    /// last), the first alive leg is the authority, as the resync would make it.
    pub fn read_order(&mut self, regions: std::ops::Range<u64>) -> Vec<usize> {
        let n = self.legs.len();
        self.rr = (self.rr + 1) % n;
        let good: Vec<usize> = (0..n)
            .map(|k| (self.rr + k) % n)
            .filter(|&i| self.legs[i].alive() && !regions.clone().any(|r| self.legs[i].stale.get(r)))
            .collect();
        if !good.is_empty() {
            return good;
        }
        self.legs.iter().position(LegState::alive).into_iter().collect()
    }

    /// Record a failed read on leg `i`; with `handle_errors` the leg is dropped.
    /// Returns whether it was dropped now.
    pub fn read_failed(&mut self, i: usize, msg: String, handle_errors: bool) -> bool {
        let leg = &mut self.legs[i];
        leg.errors += 1;
        leg.error = Some(FailKind::Read);
        leg.last_error = Some(msg);
        if handle_errors && leg.alive() {
            leg.health = Health::Failed(FailKind::Read);
            return true;
        }
        false
    }

    /// The source of region `r`: the first alive leg not stale there, or (none has it:
    /// after a crash) the first alive leg, which then becomes the authority.
    fn source_of(&self, r: u64) -> Option<usize> {
        let alive = |l: &&LegState| l.alive();
        self.legs
            .iter()
            .position(|l| l.alive() && !l.stale.get(r))
            .or_else(|| self.legs.iter().enumerate().find(|(_, l)| alive(l)).map(|(i, _)| i))
    }

    /// The next region to copy, if one is ready: a region where an alive leg is stale
    /// (and not blocked), with no write in flight into it (a busy region is passed over
    /// and found again on the next round). Sets `recovering`.
    pub fn next_copy(&mut self) -> Option<Copy> {
        if self.recovering.is_some() || self.writes_held {
            return None;
        }
        let wanted: Vec<usize> =
            (0..self.legs.len()).filter(|&i| self.legs[i].alive() && !self.legs[i].resync_blocked).collect();
        // Each round either returns, moves the cursor on, or clears a stale bit: bounded.
        let mut busy_seen = HashSet::new();
        loop {
            let cursor = self.cursor;
            let key = |x: u64| (x < cursor, x);
            let r = wanted
                .iter()
                .filter_map(|&i| {
                    let s = &self.legs[i].stale;
                    s.next_set(cursor).or_else(|| s.next_set(0))
                })
                .min_by_key(|&x| key(x))?;
            if self.inflight.contains_key(&r) {
                // A write is in it: come back to it later (the worker is woken then).
                if !busy_seen.insert(r) {
                    return None;
                }
                self.cursor = r + 1;
                continue;
            }
            let source = self.source_of(r)?;
            let targets: Vec<usize> =
                wanted.iter().copied().filter(|&i| i != source && self.legs[i].stale.get(r)).collect();
            if targets.is_empty() {
                // Only the source was stale (a crash): it is the authority now.
                self.legs[source].stale.unset(r);
                self.after_copy(r);
                continue;
            }
            self.recovering = Some(r);
            self.cursor = r + 1;
            return Some(Copy { region: r, source, targets });
        }
    }

    /// A copy is done: `copied` legs now hold the region (their stale bit goes).
    pub fn copy_done(&mut self, c: &Copy, copied: &[usize], bytes: u64) {
        for &i in copied {
            self.legs[i].stale.unset(c.region);
        }
        // The source is the authority for the region from now on.
        self.legs[c.source].stale.unset(c.region);
        if !copied.is_empty() {
            self.regions_copied += 1;
            self.bytes_copied += bytes * copied.len() as u64;
        }
        self.recovering = None;
        self.after_copy(c.region);
    }

    /// A copy could not be made (its source failed): the region stays as it was.
    pub fn copy_abort(&mut self) {
        self.recovering = None;
    }

    fn after_copy(&mut self, r: u64) {
        if !self.any_stale(r) && !self.inflight.contains_key(&r) {
            self.young.insert(r);
        }
    }

    /// Whether anyone waits for a change: the I/O path wakes the condition variable only
    /// then (a wake-up per write would cost a context switch per write).
    pub fn anyone_waits(&self) -> bool {
        self.waiters > 0 || (self.worker_idle && self.resync_pending())
    }

    /// Whether the resync has work it could do now or soon.
    pub fn resync_pending(&self) -> bool {
        self.legs.iter().any(|l| l.alive() && !l.resync_blocked && l.stale.count() > 0)
    }

    /// Start a tick of lazy clearing: the regions idle for a whole tick become the ones
    /// to clear once the legs are synced (a write into one takes it off the list).
    /// Returns whether there is anything to clear.
    pub fn tick_take(&mut self) -> bool {
        let old = std::mem::replace(&mut self.old, std::mem::take(&mut self.young));
        self.clearing.extend(old);
        !self.clearing.is_empty()
    }

    /// Finish the tick: `synced` says whether every leg's sync succeeded (the data
    /// written into those regions is durable); then they are cleared in the log (in
    /// memory; the caller flushes). Otherwise they wait for the next tick. Returns how
    /// many were cleared.
    pub fn tick_finish(&mut self, log: &dyn DirtyLog, synced: bool) -> usize {
        let clearing = std::mem::take(&mut self.clearing);
        if !synced {
            self.young.extend(clearing);
            return 0;
        }
        let mut n = 0;
        for r in clearing {
            if !self.inflight.contains_key(&r) && !self.any_stale(r) && self.recovering != Some(r) {
                log.clear(r);
                n += 1;
            }
        }
        n
    }

    /// Both halves of a tick at once (nothing to sync: tests, and a quiet device whose
    /// legs were synced by the caller).
    pub fn tick(&mut self, log: &dyn DirtyLog) -> usize {
        self.tick_take();
        self.tick_finish(log, true)
    }

    /// Queue every region marked in the log that no leg needs copied (left marked by a
    /// crash or a reload before its clear): cleared by the next ticks.
    pub fn queue_clean_marks(&mut self, log: &dyn DirtyLog) {
        let mut r = 0;
        while let Some(m) = log.next_dirty(r) {
            if !self.any_stale(m) {
                self.young.insert(m);
            }
            r = m + 1;
        }
    }

    /// Regions where every leg of the mirror holds the data.
    pub fn in_sync_regions(&self) -> u64 {
        let legs: Vec<&LegState> = self.legs.iter().filter(|l| l.health != Health::Split).collect();
        let words = self.regions.div_ceil(64) as usize;
        let mut stale = 0u64;
        for w in 0..words {
            let mut u = 0u64;
            for l in &legs {
                u |= l.stale.words()[w];
            }
            stale += u.count_ones() as u64;
        }
        self.regions - stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicator::dirty::core::CoreLog;

    #[test]
    fn a_write_marks_then_clears_after_two_idle_ticks() {
        let log = CoreLog::new(16 * 4096, 4096);
        let mut s = State::new(2, 16, 4096);
        let t = s.begin_write(&log, 4096, 8192);
        assert_eq!(t.regions, 1..3);
        assert!(t.needs_flush && log.is_dirty(1) && log.is_dirty(2));
        // A second write into a marked region whose flush has not returned still waits.
        let t2 = s.begin_write(&log, 4096, 1);
        assert!(t2.needs_flush);
        s.marks_durable(1..3);
        let t3 = s.begin_write(&log, 4096, 1);
        assert!(!t3.needs_flush);
        for t in [&t, &t2, &t3] {
            let (_, r) = s.end_write(t, &[true, true], &[], false);
            r.unwrap();
        }
        assert_eq!(s.tick(&log), 0, "young after the first tick");
        assert_eq!(s.tick(&log), 2);
        assert_eq!(log.dirty_count(), 0);
    }

    #[test]
    fn a_failed_leg_is_dropped_and_its_regions_stay_marked() {
        let log = CoreLog::new(16 * 4096, 4096);
        let mut s = State::new(2, 16, 4096);
        let t = s.begin_write(&log, 0, 4096);
        let (dropped, r) = s.end_write(&t, &[true, false], &[(1, FailKind::Write, "EIO".into())], true);
        assert!(r.is_ok());
        assert_eq!(dropped, vec![1]);
        assert_eq!(s.legs[1].letter(), 'D');
        let t = s.begin_write(&log, 3 * 4096, 1);
        assert_eq!(t.legs, vec![0]);
        s.end_write(&t, &[true, false], &[], true).1.unwrap();
        s.tick(&log);
        s.tick(&log);
        assert_eq!(log.dirty_count(), 2);
        assert_eq!(s.in_sync_regions(), 14);
        // Reads avoid the dead leg; nothing to copy while it is dead.
        assert_eq!(s.read_order(0..1), vec![0]);
        assert!(s.next_copy().is_none());
        s.legs[1].health = Health::Alive;
        let c = s.next_copy().unwrap();
        assert_eq!((c.region, c.source, c.targets.clone()), (0, 0, vec![1]));
        assert!(s.write_blocked(0, 1, &(0..1)));
        s.copy_done(&c, &[1], 4096);
        let c = s.next_copy().unwrap();
        assert_eq!(c.region, 3);
        s.copy_done(&c, &[1], 4096);
        assert!(s.next_copy().is_none());
        assert_eq!((s.regions_copied, s.bytes_copied), (2, 8192));
        assert_eq!(s.in_sync_regions(), 16);
    }

    #[test]
    fn without_handle_errors_the_write_fails_and_the_leg_stays() {
        let log = CoreLog::new(16 * 4096, 4096);
        let mut s = State::new(2, 16, 4096);
        let t = s.begin_write(&log, 0, 4096);
        let (dropped, r) = s.end_write(&t, &[true, false], &[(1, FailKind::Write, "EIO".into())], false);
        assert!(r.is_err() && dropped.is_empty());
        assert!(s.legs[1].alive() && s.legs[1].stale.get(0));
        assert_eq!(s.legs[1].letter(), 'D');
    }

    #[test]
    fn reads_round_robin_over_legs_that_have_the_region() {
        let mut s = State::new(3, 4, 4096);
        let order: Vec<usize> = (0..6).map(|_| s.read_order(0..1)[0]).collect();
        assert_eq!(order, vec![1, 2, 0, 1, 2, 0]);
        s.legs[2].stale.set(0);
        assert!(!s.read_order(0..1).contains(&2));
        assert!(s.read_order(1..2).contains(&2));
        // Nobody has it (a crash): the first alive leg is the authority.
        s.legs[0].stale.set(0);
        s.legs[1].stale.set(0);
        assert_eq!(s.read_order(0..1), vec![0]);
    }
}
