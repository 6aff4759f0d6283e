//! Operators' and tables' commands.

use super::*;

impl Machine {
    /// Apply an operator's or a table's command.
    pub(crate) fn control(&mut self, now: Instant, c: Control) -> Result<Effects, GroupError> {
        let mut fx = Effects { wake_appender: true, wake_copiers: true, ..Default::default() };
        match c {
            Control::AddSlink(s, dirty) => return self.add_slink(now, s, dirty),
            Control::SetPolicy { slink, policy, thresholds } => {
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                let t = thresholds.unwrap_or(rt.thresholds);
                if policy.is_synchronous() && !t.is_empty() {
                    return Err(GroupError::SyncWithThresholds(slink));
                }
                rt.policy = policy;
                rt.thresholds = t;
                rt.update_mode(&self.name, slink, now);
                self.release_waits(&mut fx);
            }
            Control::SetThresholds { slink, update, clear } => {
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                if rt.policy.is_synchronous() && !update.is_empty() {
                    return Err(GroupError::ThresholdsOnSync(slink));
                }
                let t = &mut rt.thresholds;
                if clear {
                    *t = Thresholds::default();
                }
                t.ios = update.ios.or(t.ios);
                t.bytes = update.bytes.or(t.bytes);
                t.timeout = update.timeout.or(t.timeout);
                rt.update_mode(&self.name, slink, now);
                self.release_waits(&mut fx);
            }
            Control::Pause { slink, paused } => {
                if slink == 0 {
                    return Err(GroupError::Slink0("paused"));
                }
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                rt.paused = paused;
                rt.update_mode(&self.name, slink, now);
                info!(group = %self.name, slink, paused, "slink shipping {}", if paused { "paused" } else { "resumed" });
                self.release_waits(&mut fx);
            }
            Control::Shipping(on) => self.shipping = on,
            Control::Statistics(cmd) => match cmd.as_str() {
                "on" => self.stats.enabled = true,
                "off" => self.stats.enabled = false,
                "reset" => self.stats = Stats { enabled: self.stats.enabled, ..Stats::default() },
                _ => return Err(GroupError::Statistics(cmd)),
            },
            Control::Invalidate(slink) => return self.invalidate(now, slink),
            Control::SetRole(secondary) => return Ok(self.set_role(now, secondary)),
            Control::Fence(why) => return Ok(self.fence(why)),
            Control::ProbeNow(nr) => {
                if let Some(rt) = self.slinks.get_mut(&nr).filter(|rt| !rt.accessible() && !rt.standby) {
                    rt.probe_now(now);
                }
            }
            Control::SplitBrain(found) => self.set_split_brain(found),
            Control::StandbyAcked { slink, through } => return Ok(self.standby_acked(slink, through)),
            Control::SiteResync { slink, after, regions, full, why } => {
                return self.site_resync(now, slink, after, &regions, full, &why)
            }
            Control::RemoveSlink(nr) => self.remove_slink(nr, &mut fx)?,
            Control::Freeze(on) => {
                if std::mem::replace(&mut self.frozen, on) != on {
                    info!(group = %self.name, "group writes {}", if on { "held (control device suspended)" } else { "released" });
                }
            }
            Control::ResyncRate { slink, rate } => {
                let rt = self.slinks.get_mut(&slink).ok_or(GroupError::NoSlink(slink))?;
                rt.resync.rate_limit = (rate > 0).then_some(rate);
            }
            Control::AttachDirty { slink, dev, log, dev_bytes, initial_dirty } => {
                return self.attach_dirty(now, slink, dev, log, dev_bytes, initial_dirty)
            }
            Control::RemoveDevice(dev) => self.remove_device(dev),
            Control::CancelDevice(dev) => self.cancel_device(dev, &mut fx),
            Control::Shutdown => {
                self.shutdown = true;
                for p in self.queue.drain(..) {
                    fx.fail(p.req, p.done, Errno::SHUTDOWN);
                }
                for (_, a) in std::mem::take(&mut self.awaiting) {
                    fx.fail(a.req, a.done, Errno::SHUTDOWN);
                }
                for a in self.unflushed.drain(..) {
                    fx.fail(a.req, a.done, Errno::SHUTDOWN);
                }
            }
        }
        Ok(fx)
    }

    /// After a policy or link change: writes no longer waiting for anything go.
    pub(super) fn release_waits(&mut self, fx: &mut Effects) {
        let slinks = &self.slinks;
        let released: Vec<Seq> = self
            .awaiting
            .iter_mut()
            .filter_map(|(seq, a)| {
                a.wait.retain(|nr| slinks.get(nr).is_some_and(|rt| rt.makes_writes_wait() && rt.durable < *seq));
                a.wait.is_empty().then_some(*seq)
            })
            .collect();
        for s in released {
            let a = self.awaiting.remove(&s).expect("present");
            fx.ok(a.req, a.done);
        }
    }

    /// Add an SLINK with a dirty log for every device of the group (atomically: it
    /// joins with them or not at all). With no device in the group it joins ordered
    /// mode at once (nothing to copy); otherwise it starts out of ordered mode and its
    /// resync (a `sync` dirty log: every region) brings it in.
    pub(super) fn add_slink(
        &mut self,
        now: Instant,
        s: SlinkSetup,
        dirty: Vec<(DevNr, Arc<dyn DirtyLog>, u64, bool)>,
    ) -> Result<Effects, GroupError> {
        if self.slinks.contains_key(&s.nr) {
            return Err(GroupError::SlinkExists(s.nr));
        }
        let nr = s.nr;
        let mut rt = SlinkRt::new(s, false, 0, now);
        rt.resync.reason = Some("slink added".into());
        rt.resync.since = Some(SystemTime::now());
        self.slinks.insert(nr, rt);
        for (dev, log, bytes, initial) in dirty {
            if initial {
                log.mark_all();
            }
            self.dirty.insert((nr, dev), (log, bytes));
        }
        info!(group = %self.name, slink = nr, "slink added to the live group");
        Ok(Effects { wake_appender: true, wake_copiers: true, ..Default::default() })
    }

    /// Attach the dirty log of device `dev` on SLINK `nr`. Every region starts dirty when
    /// asked (`sync` on a new RD), when the SLINK missed writes of the device with no
    /// dirty log to record them, or when an out-of-sync SLINK's in-memory log was lost.
    pub(super) fn attach_dirty(
        &mut self,
        now: Instant,
        nr: SlinkNr,
        dev: DevNr,
        log: Arc<dyn DirtyLog>,
        dev_bytes: u64,
        initial_dirty: bool,
    ) -> Result<Effects, GroupError> {
        let rt = self.slinks.get(&nr).ok_or(GroupError::NoSlink(nr))?;
        let missed = self.missed.remove(&(nr, dev));
        if initial_dirty || missed || (!rt.ordered && log.kind() == "core") {
            log.mark_all();
        }
        self.removed.remove(&dev);
        self.dirty.insert((nr, dev), (log.clone(), dev_bytes));
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.resync.done = false;
        if rt.ordered && !rt.leaving && nr != 0 && log.dirty_count() > 0 {
            return Ok(self.begin_leave(now, nr, "initial synchronisation"));
        }
        Ok(Effects { flush: vec![log], wake_copiers: true, ..Default::default() })
    }

    /// A replicator-dev went away: its RDs leave the group at once (SLINKs skip its
    /// entries and forget its regions); its LD stays on SLINK 0 until SLINK 0 applied
    /// every entry of it (acknowledged writes reach the LD).
    pub(super) fn remove_device(&mut self, dev: DevNr) {
        self.removed.insert(dev);
        // An RD that lacks writes of the device (dirty regions, or entries still to
        // ship, which its SLINK will skip) has missed them: if the device comes back under
        // the same number, that RD is copied in full, whatever its dirty log says.
        for (nr, rt) in &self.slinks {
            let dirty = self.dirty.get(&(*nr, dev)).is_some_and(|(l, _)| l.dirty_count() > 0);
            let backlog = self.last_needed(dev, *nr) > 0;
            if *nr != 0 && (dirty || backlog || !rt.ordered) {
                self.missed.insert((*nr, dev));
            }
        }
        self.dirty.retain(|(_, d), _| *d != dev);
        self.in_copy.retain(|k| k.1 != dev);
        self.touched.retain(|k| k.1 != dev);
        for (nr, rt) in self.slinks.iter() {
            if *nr != 0 {
                rt.handler.detach(dev);
            }
        }
        let pending_on_ld = self.overlay.last_seq_of(dev);
        match pending_on_ld {
            Some(seq) => {
                self.detach_ld.insert(dev, seq);
            }
            None => self.slinks[&0].handler.detach(dev),
        }
    }

    /// Fail the writes of device `dev` that the group holds (queued, or waiting for a
    /// synchronous SLINK): its device is going away. Entries in the log stay.
    pub(super) fn cancel_device(&mut self, dev: DevNr, fx: &mut Effects) {
        let (gone, keep): (VecDeque<Pending>, VecDeque<Pending>) =
            std::mem::take(&mut self.queue).into_iter().partition(|p| p.dev_nr == dev);
        self.queue = keep;
        let seqs: Vec<Seq> = self.awaiting.iter().filter(|(_, a)| a.dev_nr == dev).map(|(s, _)| *s).collect();
        if !gone.is_empty() || !seqs.is_empty() {
            warn!(group = %self.name, dev_nr = dev, queued = gone.len(), waiting = seqs.len(), "device going away: its held writes fail");
        }
        for p in gone {
            fx.fail(p.req, p.done, Errno::SHUTDOWN);
        }
        for s in seqs {
            let a = self.awaiting.remove(&s).expect("present");
            fx.fail(a.req, a.done, Errno::SHUTDOWN);
        }
    }

    /// Every region of SLINK `nr`'s devices becomes dirty: a full resync, out of
    /// ordered mode until it ends.
    fn invalidate(&mut self, now: Instant, nr: SlinkNr) -> Result<Effects, GroupError> {
        if nr == 0 {
            return Err(GroupError::Slink0("invalidated"));
        }
        let rt = self.slinks.get(&nr).ok_or(GroupError::NoSlink(nr))?;
        let (ordered, leaving) = (rt.ordered, rt.leaving());
        let mut logs = Vec::new();
        for d in self.devices() {
            match self.dirty.get(&(nr, d)) {
                Some((log, _)) => {
                    log.mark_all();
                    logs.push(log.clone());
                }
                None => {
                    self.missed.insert((nr, d));
                }
            }
        }
        warn!(group = %self.name, slink = nr, "slink invalidated: every region will be copied again");
        if ordered && !leaving {
            return Ok(self.begin_leave(now, nr, "invalidated"));
        }
        let rt = self.slinks.get_mut(&nr).expect("slink");
        rt.resync.done = false;
        rt.resync.cursor = (0, 0);
        Ok(Effects { flush: logs, wake_copiers: true, ..Default::default() })
    }

    fn remove_slink(&mut self, nr: SlinkNr, fx: &mut Effects) -> Result<(), GroupError> {
        if nr == 0 {
            return Err(GroupError::Slink0("removed"));
        }
        let rt = self.slinks.remove(&nr).ok_or(GroupError::NoSlink(nr))?;
        for d in rt.handler.devices() {
            rt.handler.detach(d);
        }
        self.dirty.retain(|(s, _), _| *s != nr);
        self.in_copy.retain(|k| k.0 != nr);
        self.touched.retain(|k| k.0 != nr);
        self.missed.retain(|k| k.0 != nr);
        for a in self.release(nr, Seq::MAX) {
            fx.ok(a.req, a.done);
        }
        self.prune_cache();
        info!(group = %self.name, slink = nr, "slink removed from the group");
        Ok(())
    }
}
