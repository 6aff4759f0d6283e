//! Roles: a secondary's standby SLINKs, fencing, a history discarded, a resync a site
//! asks for (follow the sun).
//!
//! At a secondary, the SLINKs to other dmrep sites (those whose site keeps a log of its
//! own) are *standby*: they ship nothing and never throttle, but the log keeps their
//! entries until the primary says (in its `peers` frames) that their site has them. So a
//! secondary promoted to primary ships each other site what it lacks from its own log,
//! with no copy; entries a site lacks beyond what the log can hold become dirty regions
//! when the log fills, like for any SLINK.

use super::*;
use dmrep_formats::site::Region;

impl Machine {
    /// Whether SLINK `nr` is on standby when the site is `secondary`.
    pub(super) fn standby_for(nr: SlinkNr, handler: &dyn SlinkHandler, secondary: bool) -> bool {
        secondary && nr != 0 && handler.keeps_log()
    }

    /// The site's role changed (durable already): SLINKs to other sites go on standby
    /// (secondary) or start shipping (primary); a site that becomes a secondary refuses
    /// the writes it had queued as a primary (never appended: their clients get an error).
    pub(super) fn set_role(&mut self, now: Instant, secondary: bool) -> Effects {
        let mut fx = Effects { wake_appender: true, wake_copiers: true, ..Default::default() };
        self.secondary = secondary;
        let role = if secondary { "secondary" } else { "primary" };
        let generation = self.log.site().generation().to_string();
        group_event("site", &self.name, &[("role", role.into()), ("generation", generation)]);
        if secondary {
            self.refuse_queued_writes(&mut fx, Errno::ROFS);
        }
        // A secondary takes no application writes anyway; a promoted site takes them.
        if let Some(why) = self.fenced.take() {
            info!(group = %self.name, "no longer fenced (was: {why})");
        }
        for (nr, rt) in self.slinks.iter_mut() {
            let standby = Self::standby_for(*nr, &*rt.handler, secondary);
            if standby == rt.standby {
                continue;
            }
            rt.standby = standby;
            // Work handed out before is void; shipping starts over from what is durable.
            rt.era += 1;
            rt.shipped = rt.durable;
            let l = &mut rt.link;
            if standby {
                (l.accessible, l.down_since, l.last_error, l.healthy) = (true, None, None, true);
            } else {
                // Connect at once.
                (l.accessible, l.next_probe, l.backoff) = (false, now, PROBE_MIN);
                l.last_error = Some("connecting after the promotion".into());
            }
            rt.update_mode(&self.name, *nr, now);
        }
        self.release_waits(&mut fx);
        self.prune_cache();
        fx
    }

    /// A newer generation of the group exists: application writes are refused from now
    /// on (EPERM), until this site is demoted or promoted again.
    pub(super) fn fence(&mut self, why: String) -> Effects {
        let mut fx = Effects::default();
        if self.fenced.is_none() {
            warn!(group = %self.name, "fenced: writes are refused from now on: {why}");
            group_event("site", &self.name, &[("fenced", "true".into()), ("reason", why.clone())]);
        }
        self.fenced = Some(why);
        // Writes queued and not yet in the log (held by a switchover, say) are refused too.
        self.refuse_queued_writes(&mut fx, Errno::PERM);
        fx
    }

    /// Every dirty region of SLINK `nr` is moot: cleared in memory; the dirty logs
    /// returned are for the caller to flush (no I/O under the machine's lock).
    pub(crate) fn clear_dirty(&mut self, nr: SlinkNr) -> Vec<Arc<dyn DirtyLog>> {
        let logs: Vec<Arc<dyn DirtyLog>> =
            self.dirty.range((nr, 0)..=(nr, DevNr::MAX)).map(|(_, (l, _))| l.clone()).collect();
        for log in &logs {
            let mut r = 0;
            while let Some(d) = log.next_dirty(r) {
                log.clear(d);
                r = d + 1;
            }
        }
        self.missed.retain(|k| k.0 != nr);
        self.touched.retain(|k| k.0 != nr);
        logs
    }

    /// Fail the application writes still queued (never appended) with `errno`; writes
    /// received from a primary stay.
    fn refuse_queued_writes(&mut self, fx: &mut Effects, errno: Errno) {
        let queue = std::mem::take(&mut self.queue);
        for p in queue {
            if p.origin.is_some() {
                self.queue.push_back(p);
            } else {
                fx.fail(p.req, p.done, errno);
            }
        }
    }

    /// A split brain was found (`Some`: what) or is over (`None`): reported in status,
    /// the events and the daemon log until resolved.
    pub(super) fn set_split_brain(&mut self, found: Option<String>) {
        if found.is_some() != self.split_brain.is_some() {
            let mut f = vec![("split_brain", found.is_some().to_string())];
            if let Some(w) = &found {
                f.push(("reason", w.clone()));
            }
            group_event("site", &self.name, &f);
        }
        if let (Some(why), None) = (&found, &self.split_brain) {
            tracing::error!(group = %self.name, "SPLIT BRAIN: {why}; both sides keep serving as they are \
                until an operator runs `dmrep resolve {} --discard-local` at the losing site", self.name);
        }
        self.split_brain = found;
    }

    /// A standby SLINK's site has received everything through `through` (a local seq).
    pub(super) fn standby_acked(&mut self, nr: SlinkNr, through: Seq) -> Effects {
        let mut fx = Effects::default();
        let Some(rt) = self.slinks.get_mut(&nr) else { return fx };
        if !rt.standby || !rt.ordered || rt.leaving {
            return fx;
        }
        let through = through.min(rt.outstanding.back().map_or(rt.durable, |o| o.0));
        if through <= rt.durable {
            return fx;
        }
        while rt.outstanding.front().is_some_and(|o| o.0 <= through) {
            let (_, b, _) = rt.outstanding.pop_front().expect("front");
            rt.out_bytes -= b;
        }
        rt.durable = through;
        rt.shipped = through;
        self.prune_cache();
        self.log_full = None;
        fx.cursor = Some(through);
        fx.wake_appender = true;
        fx
    }

    /// Forget every entry the SLINKs other than 0 still need, and every dirty region:
    /// this site's history after some point is being replaced by another site's (which
    /// then answers for every other site). SLINK 0 must have applied everything and no
    /// write may be under way. Returns the log's last seq (every cursor goes there) and
    /// the SLINKs out of ordered mode (their dirty logs to flush, then to register in the
    /// log again).
    pub(crate) fn discard_outstanding(&mut self) -> Result<(Seq, Vec<SlinkNr>), GroupError> {
        let busy = |why: &str| Err(GroupError::Role(format!("cannot discard this site's history now: {why}")));
        if self.slinks.get(&0).is_some_and(|rt| !rt.outstanding.is_empty()) {
            return busy("entries are still being applied to the local devices");
        }
        if self.appending || self.queue.iter().any(|p| p.origin.is_none()) {
            return busy("application writes are under way");
        }
        if self.slinks.values().any(|rt| rt.leaving) {
            return busy("an slink is leaving ordered mode");
        }
        let tail = self.log.stats().next_seq.saturating_sub(1);
        let mut unordered = Vec::new();
        for (nr, rt) in self.slinks.iter_mut().filter(|(nr, _)| **nr != 0) {
            rt.outstanding.clear();
            rt.out_bytes = 0;
            rt.era += 1;
            rt.durable = tail;
            rt.shipped = tail;
            if !rt.ordered {
                unordered.push(*nr);
            }
        }
        for nr in &unordered {
            self.clear_dirty(*nr);
        }
        self.prune_cache();
        Ok((tail, unordered))
    }

    /// SLINKs registered in the log again after [`Machine::discard_outstanding`]: ordered,
    /// nothing outstanding.
    pub(crate) fn reordered_clean(&mut self, now: Instant, slinks: &[SlinkNr]) {
        for nr in slinks {
            let durable = self.log.cursor(*nr).unwrap_or(0);
            if let Some(rt) = self.slinks.get_mut(nr) {
                rt.ordered = true;
                rt.era += 1;
                (rt.durable, rt.shipped) = (durable, durable);
                let rate_limit = rt.resync.rate_limit;
                rt.resync = ResyncState { rate_limit, ..Default::default() };
                rt.update_mode(&self.name, *nr, now);
            }
        }
    }

    /// The site of SLINK `nr` needs a resync: its entries after history seq `after` are
    /// not ours, or it lacks entries the log no longer holds. Entries it has (history seq
    /// up to `after`) are dropped; the rest, `regions` and (with `full`) every region
    /// become dirty, and the resync copies them.
    pub(super) fn site_resync(
        &mut self,
        now: Instant,
        nr: SlinkNr,
        after: u64,
        regions: &[Region],
        full: bool,
        why: &str,
    ) -> Result<Effects, GroupError> {
        if nr == 0 {
            return Err(GroupError::Slink0("resynchronised"));
        }
        let rt = self.slinks.get(&nr).ok_or(GroupError::NoSlink(nr))?;
        if rt.ordered && !rt.leaving {
            // Drop the entries the site has: history seq up to `after`.
            let mut through = rt.durable;
            let last = rt.outstanding.back().map_or(rt.durable, |o| o.0);
            'scan: loop {
                let metas = self.log.entries_from(through + 1, 4096);
                let Some(end) = metas.last().map(|m| m.seq) else { break };
                for m in metas {
                    if m.seq > last || m.origin_seq > after {
                        break 'scan;
                    }
                    through = m.seq;
                }
                if end >= last {
                    break;
                }
            }
            let rt = self.slinks.get_mut(&nr).expect("slink");
            while rt.outstanding.front().is_some_and(|o| o.0 <= through) {
                let (_, b, _) = rt.outstanding.pop_front().expect("front");
                rt.out_bytes -= b;
            }
            (rt.durable, rt.shipped) = (through, through);
        }
        let mut logs = Vec::new();
        for d in self.devices() {
            match self.dirty.get(&(nr, d)) {
                Some((log, _)) => {
                    if full {
                        log.mark_all();
                    }
                    for r in regions.iter().filter(|r| r.dev_nr == d) {
                        log.mark_range(r.offset, r.len);
                    }
                    logs.push(log.clone());
                }
                None => {
                    self.missed.insert((nr, d));
                }
            }
        }
        let bytes: u64 = regions.iter().map(|r| r.len).sum();
        warn!(group = %self.name, slink = nr, after, regions = regions.len(), bytes, full, "site needs a resync: {why}");
        let rt = &self.slinks[&nr];
        if rt.ordered && !rt.leaving {
            return Ok(self.begin_leave(now, nr, why));
        }
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.resync.done = false;
        rt.resync.cursor = (0, 0);
        rt.resync.reason = Some(why.to_string());
        Ok(Effects { flush: logs, wake_copiers: true, ..Default::default() })
    }
}
