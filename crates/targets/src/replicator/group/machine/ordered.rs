//! Leaving ordered mode (the log is full, or an initial copy), and the way back.

use super::*;

impl Machine {
    /// Whether SLINK `nr` may leave ordered mode: not SLINK 0, no `stall`.
    pub(super) fn may_leave(&self, nr: SlinkNr) -> bool {
        let rt = &self.slinks[&nr];
        nr != 0 && rt.ordered && !rt.leaving && !rt.policy.stall
    }

    /// The log is full (`needed` bytes): the SLINK that holds the log's oldest entries
    /// leaves ordered mode, if it may and if leaving frees the space needed and a good
    /// share of the ring (so that a replica just behind another does not flap).
    /// Otherwise nobody leaves: writes wait for the copiers (SLINK 0, usually).
    pub(super) fn log_full_victim(&self, needed: u64) -> Option<SlinkNr> {
        let mut holders: Vec<(Seq, SlinkNr)> = self
            .slinks
            .iter()
            .filter(|(_, rt)| rt.ordered && !rt.leaving)
            .filter_map(|(nr, rt)| rt.outstanding.front().map(|o| (o.0, *nr)))
            .collect();
        holders.sort();
        let &(oldest, nr) = holders.first()?;
        if !self.may_leave(nr) {
            return None;
        }
        // The holder's entries before the next holder's oldest are what leaving frees.
        let next = holders.iter().find(|(_, n)| *n != nr).map(|h| h.0).unwrap_or(Seq::MAX);
        let freed: u64 = self.slinks[&nr].outstanding.iter().take_while(|o| o.0 < next).map(|o| footprint(o.1)).sum();
        // A reachable SLINK that ships (it throttles writes) is expelled only when it holds
        // half the ring on its own: a replica that is merely a little behind another
        // under a busy primary stays ordered and writes wait. One down or paused holds
        // the log for nothing: an eighth is enough.
        let share = if self.slinks[&nr].throttles() { 2 } else { 8 };
        let enough = needed.max(self.ring_len / share);
        if freed < enough {
            tracing::debug!(group = %self.name, slink = nr, oldest, freed, enough, "log full: leaving would free too little; writes wait");
            return None;
        }
        Some(nr)
    }

    /// Take SLINK `nr` out of ordered mode: every entry it still needs becomes dirty
    /// regions (in memory now, durable by the returned [`Io::Leave`], which then drops
    /// its cursor from the log). Writes waiting for it are released by [`Event::Left`].
    pub(super) fn begin_leave(&mut self, now: Instant, nr: SlinkNr, reason: &str) -> Effects {
        let rt = self.slinks.get_mut(&nr).expect("slink");
        let last = rt.outstanding.back().map(|o| o.0);
        let from = rt.durable + 1;
        rt.leaving = true;
        rt.era += 1;
        rt.outstanding.clear();
        rt.out_bytes = 0;
        let rate_limit = rt.resync.rate_limit;
        rt.resync = ResyncState {
            reason: Some(reason.to_string()),
            since: Some(SystemTime::now()),
            rate_limit,
            ..Default::default()
        };
        rt.update_mode(&self.name, nr, now);
        let mut marked = 0u64;
        if let Some(last) = last {
            let mut from = from;
            'scan: loop {
                let metas = self.log.entries_from(from, 65536);
                let Some(end) = metas.last().map(|m| m.seq) else { break };
                for m in metas {
                    if m.seq > last {
                        break 'scan;
                    }
                    if !m.slinks.contains(nr) {
                        continue;
                    }
                    match self.dirty.get(&(nr, m.dev_nr)) {
                        Some((log, _)) => log.mark_range(m.offset, m.len as u64),
                        None => {
                            self.missed.insert((nr, m.dev_nr));
                        }
                    }
                    marked += 1;
                }
                from = end + 1;
            }
        }
        let logs: Vec<Arc<dyn DirtyLog>> =
            self.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.clone()).collect();
        warn!(group = %self.name, slink = nr, reason, entries = marked, "slink left ordered mode: its devices are out of sync until a resync ends");
        slink_event(&self.name, nr, &[("mode", "dirty".into()), ("reason", reason.to_string())]);
        Effects::io(Io::Leave { slink: nr, logs })
    }

    pub(super) fn left(&mut self, now: Instant, nr: SlinkNr, result: Result<(), GroupError>) -> Effects {
        let mut fx = Effects::default();
        if let Err(e) = result {
            // Its dirty regions may not be durable: writes that waited for it cannot be
            // acknowledged as safe, and the log cannot be trusted to be consistent.
            let mut more = self.fail_log(e);
            fx.replies.append(&mut more.replies);
        }
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.leaving = false;
        rt.ordered = false;
        rt.update_mode(&self.name, nr, now);
        let dirty: u64 = self.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum();
        info!(group = %self.name, slink = nr, dirty_regions = dirty, "slink out of ordered mode");
        // Writes that waited for this SLINK no longer do.
        for a in self.release(nr, Seq::MAX) {
            if self.log_error.is_some() {
                fx.fail(a.req, a.done, Errno::IO);
            } else {
                fx.ok(a.req, a.done);
            }
        }
        self.prune_cache();
        self.log_full = None;
        fx.wake_appender = true;
        fx.wake_copiers = true;
        fx
    }

    /// An SLINK out of ordered mode whose resync found nothing dirty, with a device and
    /// a dirty log for every device of the group.
    pub(super) fn reorder_candidate(&self) -> Option<SlinkNr> {
        // Asked before every batch: nothing to look at (no allocation) in the usual case.
        if !self.slinks.values().any(|rt| !rt.ordered && rt.resync.done) {
            return None;
        }
        let devices = self.devices();
        self.slinks
            .iter()
            .find(|(nr, rt)| {
                !rt.ordered
                    && !rt.leaving
                    && !rt.standby
                    && rt.resync.done
                    && devices.iter().all(|d| {
                        rt.handler.has_device(*d)
                            && self.dirty.get(&(**nr, *d)).is_some_and(|(l, _)| l.dirty_count() == 0)
                            && !self.missed.contains(&(**nr, *d))
                    })
                    && !self.in_copy.iter().any(|k| k.0 == **nr)
            })
            .map(|(nr, _)| *nr)
    }

    pub(super) fn reordered(&mut self, now: Instant, nr: SlinkNr, result: Result<(), LogError>) -> Effects {
        if let Err(e) = result {
            warn!(group = %self.name, slink = nr, "cannot return to ordered mode: {e}");
            return self.fail_log(GroupError::Log(e));
        }
        let durable = self.log.cursor(nr).unwrap_or(0);
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.ordered = true;
        rt.era += 1;
        rt.durable = durable;
        rt.shipped = durable;
        rt.outstanding.clear();
        rt.out_bytes = 0;
        let took = rt.resync.started.map(|t| now.saturating_duration_since(t));
        info!(
            group = %self.name, slink = nr, regions = rt.resync.regions_done, bytes = rt.resync.bytes_copied, took = ?took,
            "resync complete: slink in ordered mode"
        );
        let (regions, bytes) = (rt.resync.regions_done.to_string(), rt.resync.bytes_copied.to_string());
        slink_event(&self.name, nr, &[("resync", "end".into()), ("regions", regions), ("bytes_copied", bytes)]);
        // What the resync did stays in the status until the next one starts.
        rt.resync.done = false;
        rt.resync.reason = None;
        rt.resync.since = None;
        rt.resync.cursor = (0, 0);
        rt.update_mode(&self.name, nr, now);
        let dirty: u64 = self.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum();
        if dirty > 0 {
            // A dirty log attached meanwhile with regions to copy.
            return self.begin_leave(now, nr, "initial synchronisation");
        }
        Effects { wake_copiers: true, ..Default::default() }
    }
}
