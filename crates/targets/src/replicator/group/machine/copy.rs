//! Copiers: epochs to apply and their results, probes, the resync's regions.

use super::*;

impl Machine {
    pub(super) fn copier_ready(&mut self, now: Instant, nr: SlinkNr) -> Effects {
        if self.shutdown || self.log_error.is_some() {
            // With a failed log, cursors may not be durable: shipping more epochs could
            // break the crash-replay order rule.
            return Effects::default();
        }
        let name = &self.name;
        let Some(rt) = self.slinks.get_mut(&nr) else { return Effects::default() };
        if rt.standby {
            // (Its site's position comes from the primary: see `machine::roles`.)
            return Effects::default();
        }
        // Time-based mode changes (a dwell ending, a `timeout` threshold) are seen here,
        // at least every tick, so status shows the mode in force even when idle.
        rt.update_mode(name, nr, now);
        if rt.link.accessible {
            if let Some(why) = rt.handler.known_down() {
                self.went_down(now, nr, "the link", &io::Error::new(io::ErrorKind::NotConnected, why));
            }
        }
        let rt = &self.slinks[&nr];
        if rt.leaving {
            return Effects::default();
        }
        if !rt.link.accessible {
            return if now >= rt.link.next_probe { Effects::io(Io::Probe { slink: nr }) } else { Effects::default() };
        }
        let shipping = (nr == 0 || self.shipping) && !rt.paused;
        if !shipping {
            return Effects::default();
        }
        if !rt.ordered {
            if rt.resync.done {
                return Effects::default();
            }
            return self.next_region(now, nr);
        }
        if rt.outstanding.is_empty() {
            return Effects::default();
        }
        if rt.shipped > rt.durable {
            // A pipelining SLINK with a batch in flight: the next batch if there is one
            // (the handler waits for the older one's acknowledgement meanwhile), else
            // wait for what is in flight.
            if !rt.handler.keeps_log() {
                return Effects::default();
            }
            let (era, shipped) = (rt.era, rt.shipped);
            return match self.next_epoch(nr) {
                Some(w) => {
                    self.slinks.get_mut(&nr).expect("slink").shipped = w.last;
                    Effects::io(Io::Apply(w))
                }
                None => Effects::io(Io::Collect { slink: nr, era, last: shipped }),
            };
        }
        match self.next_epoch(nr) {
            Some(w) => {
                self.slinks.get_mut(&nr).expect("slink").shipped = w.last;
                Effects::io(Io::Apply(w))
            }
            None => Effects::default(),
        }
    }

    /// The next entries SLINK `nr` must apply: the rest of the first epoch it lacks,
    /// only entries the machine has recorded, and only once their devices are attached.
    /// Entries of removed devices are skipped (SLINK 0 keeps its LDs until applied).
    ///
    /// An SLINK whose site keeps its own log (a remote dmrep site) takes several epochs
    /// at once (up to [`MAX_MULTI_EPOCH_BYTES`]): that site recovers to a prefix state from
    /// its log by itself. A local RD gets one epoch per apply: it must be a prefix state at
    /// every instant (it may be all a disaster leaves), so each epoch is durable before the
    /// next one starts. SLINK 0 gets one epoch per apply too, though crash replay would make
    /// the LD whole: measured, taking many epochs per LD sync did not speed the group up
    /// (the log's sync bounds it), and an LD faster than its RDs makes a healthy RD the
    /// holder of a full log, which expels it (tests/busy.rs).
    pub(super) fn next_epoch(&mut self, nr: SlinkNr) -> Option<ApplyWork> {
        let rt = &self.slinks[&nr];
        let last_known = rt.outstanding.back()?.0;
        let mut from = rt.shipped + 1;
        let mut epoch = None;
        let mut out = Vec::new();
        let mut last = rt.shipped;
        let mut bytes = 0u64;
        const SCAN_WINDOW: usize = 64;
        'scan: loop {
            let metas = self.log.entries_from(from, SCAN_WINDOW);
            let full = metas.len() == SCAN_WINDOW;
            let Some(next) = metas.last().map(|m| m.seq + 1) else { break };
            for m in metas {
                if m.seq > last_known || out.len() == MAX_APPLY_ENTRIES {
                    break 'scan;
                }
                if !m.slinks.contains(nr) {
                    continue;
                }
                match epoch {
                    None => epoch = Some(m.epoch),
                    Some(e) if e != m.epoch => {
                        if !rt.handler.keeps_log() || bytes >= MAX_MULTI_EPOCH_BYTES {
                            break 'scan;
                        }
                        epoch = Some(m.epoch);
                    }
                    _ => {}
                }
                let marker = !m.kind.changes_data();
                if !marker && nr != 0 && self.removed.contains(&m.dev_nr) {
                    last = m.seq;
                    continue;
                }
                if !marker && !rt.handler.has_device(m.dev_nr) {
                    let dev = m.dev_nr;
                    self.slinks.get_mut(&nr).expect("slink").waiting_for_device = Some(dev);
                    return None;
                }
                last = m.seq;
                bytes += u64::from(m.len);
                let c = self.cache.get(&m.seq).cloned();
                out.push((m, c));
            }
            if !full {
                break;
            }
            from = next;
        }
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.waiting_for_device = None;
        (last > rt.shipped).then_some(ApplyWork { slink: nr, era: rt.era, entries: out, last })
    }

    pub(super) fn applied(
        &mut self,
        now: Instant,
        nr: SlinkNr,
        era: u64,
        last: Seq,
        took: Duration,
        result: io::Result<Seq>,
    ) -> Effects {
        let mut fx = Effects::default();
        let Some(rt) = self.slinks.get_mut(&nr) else { return fx };
        if rt.era != era {
            // The SLINK left ordered mode meanwhile: these entries are dirty regions now.
            return fx;
        }
        let durable = match result {
            Ok(d) => d,
            Err(e) => {
                rt.shipped = rt.durable;
                self.went_down(now, nr, "applying entries", &e);
                return fx;
            }
        };
        self.recovered(nr);
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.shipped = rt.shipped.max(last);
        // (Never past what was shipped, never backwards.)
        let last = durable.min(rt.shipped);
        if last <= rt.durable {
            // Shipped, nothing newly durable: the copier goes on (more to ship, or collect).
            fx.wake_copiers = true;
            return fx;
        }
        rt.durable = last;
        rt.applies += 1;
        rt.apply_us += took.as_micros() as u64;
        while rt.outstanding.front().is_some_and(|o| o.0 <= last) {
            let (_, b, _) = rt.outstanding.pop_front().expect("front");
            rt.out_bytes -= b;
            rt.applied_entries += 1;
            rt.applied_bytes += b;
        }
        rt.update_mode(&self.name, nr, now);
        if nr == 0 {
            self.overlay.remove_through(last);
            let drained: Vec<DevNr> = self.detach_ld.iter().filter(|(_, s)| **s <= last).map(|(d, _)| *d).collect();
            for d in drained {
                self.detach_ld.remove(&d);
                self.slinks[&0].handler.detach(d);
                info!(group = %self.name, dev_nr = d, "removed device's entries are on its LD: detached");
            }
        }
        for a in self.release(nr, last) {
            fx.ok(a.req, a.done);
        }
        self.prune_cache();
        self.log_full = None;
        fx.cursor = Some(last);
        fx.wake_appender = true;
        fx.wake_copiers = true;
        fx
    }

    /// Data every SLINK in ordered mode has applied leaves the cache.
    pub(super) fn prune_cache(&mut self) {
        // (Standby SLINKs never read entries: their sites get them from the primary.)
        let min = self
            .slinks
            .values()
            .filter(|r| r.ordered && !r.leaving && !r.standby)
            .map(|r| r.durable)
            .min()
            .unwrap_or(Seq::MAX);
        while let Some((&seq, _)) = self.cache.first_key_value() {
            if seq > min {
                break;
            }
            let c = self.cache.remove(&seq).expect("present");
            self.cache_bytes -= c.len as u64;
        }
    }

    pub(super) fn went_down(&mut self, now: Instant, nr: SlinkNr, doing: &str, e: &io::Error) {
        let rt = self.slinks.get_mut(&nr).expect("slink");
        let l = &mut rt.link;
        if std::mem::replace(&mut l.healthy, false) {
            warn!(group = %self.name, slink = nr, "{doing} failed, marking the slink inaccessible: {e}");
            l.backoff = PROBE_MIN;
            l.down_since = Some(SystemTime::now());
        } else {
            l.backoff = (l.backoff * 2).min(PROBE_MAX);
        }
        if std::mem::replace(&mut l.accessible, false) {
            slink_event(&self.name, nr, &[("up", "false".into()), ("reason", format!("{doing}: {e}"))]);
        }
        l.next_probe = now + l.backoff;
        l.last_error = Some(e.to_string());
        rt.update_mode(&self.name, nr, now);
    }

    /// Real work succeeded: an outage, if there was one, is over.
    pub(super) fn recovered(&mut self, nr: SlinkNr) {
        let l = &mut self.slinks.get_mut(&nr).expect("slink").link;
        if !std::mem::replace(&mut l.healthy, true) {
            l.backoff = PROBE_MIN;
            if let Some(t) = l.down_since.take() {
                info!(group = %self.name, slink = nr, down_for = ?t.elapsed().unwrap_or_default(), "slink back after an outage");
            }
        }
    }

    pub(super) fn probed(&mut self, now: Instant, nr: SlinkNr, result: io::Result<()>) -> Effects {
        let Some(rt) = self.slinks.get_mut(&nr) else { return Effects::default() };
        match result {
            Ok(()) => {
                if !std::mem::replace(&mut rt.link.accessible, true) {
                    slink_event(&self.name, nr, &[("up", "true".into())]);
                }
                rt.update_mode(&self.name, nr, now);
                info!(group = %self.name, slink = nr, "slink answers again; resuming shipping");
            }
            Err(e) => {
                rt.link.backoff = (rt.link.backoff * 2).min(PROBE_MAX);
                rt.link.next_probe = now + rt.link.backoff;
                rt.link.last_error = Some(e.to_string());
            }
        }
        Effects { wake_copiers: true, wake_appender: true, ..Default::default() }
    }

    // ---------------------------------------------------------------------------------
    // Resync

    /// The next dirty region of SLINK `nr`, from where the pass is; marks it in copy.
    pub(super) fn next_region(&mut self, now: Instant, nr: SlinkNr) -> Effects {
        let rt = &self.slinks[&nr];
        let (cur_dev, cur_region) = rt.resync.cursor;
        // Regions at or after the cursor first, then from the start (a new pass).
        let mut found = None;
        let mut waiting = None;
        for pass in 0..2 {
            for ((s, dev), (log, bytes)) in self.dirty.range((nr, 0)..=(nr, DevNr::MAX)) {
                debug_assert_eq!(*s, nr);
                let from = match (pass, dev.cmp(&cur_dev)) {
                    (0, std::cmp::Ordering::Less) => continue,
                    (0, std::cmp::Ordering::Equal) => cur_region,
                    _ => 0,
                };
                let Some(r) = log.next_dirty(from) else { continue };
                if !rt.handler.has_device(*dev) {
                    waiting = Some(*dev);
                    continue;
                }
                let rb = log.region_bytes();
                found = Some((*dev, r, r * rb, rb.min(bytes.saturating_sub(r * rb))));
                break;
            }
            if found.is_some() {
                break;
            }
        }
        let era = rt.era;
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.waiting_for_device = waiting;
        let Some((dev, region, offset, len)) = found else {
            if waiting.is_none() {
                rt.resync.done = true;
                return Effects { wake_appender: true, ..Default::default() };
            }
            return Effects::default();
        };
        if rt.resync.started.is_none() {
            rt.resync.started = Some(now);
            let reason = rt.resync.reason.clone().unwrap_or_default();
            slink_event(&self.name, nr, &[("resync", "start".into()), ("reason", reason)]);
        }
        rt.resync.cursor = (dev, region + 1);
        let rate_limit = rt.resync.rate_limit;
        self.in_copy.insert((nr, dev, region));
        self.touched.remove(&(nr, dev, region));
        Effects::io(Io::Resync(ResyncWork { slink: nr, era, dev, region, offset, len, rate_limit }))
    }

    pub(super) fn resynced(&mut self, now: Instant, w: ResyncWork, result: io::Result<()>) -> Effects {
        let key = (w.slink, w.dev, w.region);
        self.in_copy.remove(&key);
        let retouched = self.touched.remove(&key);
        let mut fx = Effects { wake_copiers: true, ..Default::default() };
        let Some(rt) = self.slinks.get_mut(&w.slink) else { return fx };
        if let Err(e) = result {
            self.went_down(now, w.slink, "resync", &e);
            return fx;
        }
        if rt.era != w.era {
            return fx;
        }
        self.recovered(w.slink);
        if !retouched {
            if let Some((log, _)) = self.dirty.get(&(w.slink, w.dev)) {
                log.clear(w.region);
                fx.flush.push(log.clone());
            }
            let rt = self.slinks.get_mut(&w.slink).expect("slink");
            rt.resync.regions_done += 1;
            rt.resync.bytes_copied += w.len;
            // Progress: every 64 regions copied.
            if rt.resync.regions_done.is_multiple_of(64) {
                let left: u64 =
                    self.dirty.range((w.slink, 0)..=(w.slink, DevNr::MAX)).map(|(_, (l, _))| l.dirty_count()).sum();
                let rt = &self.slinks[&w.slink];
                slink_event(
                    &self.name,
                    w.slink,
                    &[
                        ("resync", "progress".into()),
                        ("regions_done", rt.resync.regions_done.to_string()),
                        ("regions_left", left.to_string()),
                        ("bytes_copied", rt.resync.bytes_copied.to_string()),
                    ],
                );
            }
        }
        fx
    }
}
