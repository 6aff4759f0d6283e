//! Writes: queueing, group commit planning, the append's result, acknowledgements.

use super::*;

impl Machine {
    /// Why a write (or marker) from `origin` (`None`: this site's application) is refused
    /// now, if it is.
    fn refusal(&self, origin: Option<Origin>) -> Option<Errno> {
        if self.shutdown {
            return Some(Errno::SHUTDOWN);
        }
        // A secondary's devices take writes only from its primary's stream; a primary
        // never takes a stream.
        let secondary = self.secondary;
        if secondary != origin.is_some() {
            tracing::debug!(group = %self.name, secondary, "write refused: wrong role for its source");
            return Some(if secondary { Errno::ROFS } else { Errno::PERM });
        }
        if let Some(why) = self.fenced.as_ref().filter(|_| origin.is_none()) {
            tracing::debug!(group = %self.name, "write refused: fenced: {why}");
            return Some(Errno::PERM);
        }
        if let Some(e) = &self.log_error {
            // (The log error itself was logged once, when it happened: not per write.)
            tracing::debug!(group = %self.name, "write refused: {e}");
            return Some(e.errno());
        }
        None
    }

    pub(super) fn submit(&mut self, dev_nr: DevNr, req: Request, done: Completion, origin: Option<Origin>) -> Effects {
        let mut fx = Effects::default();
        if let Some(e) = self.refusal(origin) {
            fx.fail(req, done, e);
            return fx;
        }
        if self.stats.enabled {
            self.stats.writes += 1;
            self.stats.write_bytes += req.len;
        }
        if let Some(w) = self.verify_watch.as_mut() {
            let r = super::super::verify::VERIFY_REGION;
            for region in req.offset / r..(req.offset + req.len).div_ceil(r) {
                w.insert((dev_nr, region));
            }
        }
        self.queue.push_back(Pending { dev_nr, req, done, data: None, appended: 0, origin, marker: false });
        fx.wake_appender = true;
        fx
    }

    /// Queue a marker: one entry, after every write queued before it.
    pub(super) fn submit_marker(&mut self, description: Vec<u8>, done: Completion, origin: Option<Origin>) -> Effects {
        let mut fx = Effects::default();
        let len = description.len() as u64;
        let req = Request::new(Op::Flush, 0, len, description, 0);
        if let Some(e) = self.refusal(origin) {
            fx.fail(req, done, e);
            return fx;
        }
        if len > MAX_MARKER_DATA as u64 {
            fx.fail(req, done, Errno::INVAL);
            return fx;
        }
        self.queue.push_back(Pending { dev_nr: 0, req, done, data: None, appended: 0, origin, marker: true });
        fx.wake_appender = true;
        fx
    }

    pub(super) fn appender_ready(&mut self, now: Instant) -> Effects {
        if self.shutdown {
            return Effects::default();
        }
        if let Some(e) = self.log_error.clone() {
            let mut fx = Effects::default();
            for p in self.queue.drain(..) {
                fx.fail(p.req, p.done, e.errno());
            }
            return fx;
        }
        if let Some(nr) = self.reorder_candidate() {
            return Effects::io(Io::Reorder { slink: nr });
        }
        if self.log_full.is_some_and(|t| now.saturating_duration_since(t) < crate::replicator::group::TICK) {
            return Effects::default();
        }
        if self.frozen {
            return Effects::default();
        }
        match self.plan(now) {
            Some(b) => {
                self.appending = true;
                Effects::io(Io::Append(Box::new(b)))
            }
            None => Effects::default(),
        }
    }

    /// Plan a batch from the queue front: slices within batch limits (entry headers
    /// counted) and every throttling SLINK's fall-behind admission.
    pub(super) fn plan(&mut self, now: Instant) -> Option<Batch> {
        if self.queue.is_empty() {
            return None;
        }
        let slice_max = |data: bool| if data { MAX_ENTRY_DATA } else { u32::MAX as u64 & !511 };
        let mut sizes = Vec::new();
        let mut bytes = 0u64;
        'outer: for p in self.queue.iter() {
            let data = p.marker || matches!(p.req.op, Op::Write { .. });
            let mut at = p.appended;
            while at < p.req.len {
                let n = (p.req.len - at).min(slice_max(data));
                let ring = footprint(if data { n } else { 0 });
                if sizes.len() >= MAX_BATCH_ENTRIES || (bytes + ring > self.batch_bytes && !sizes.is_empty()) {
                    break 'outer;
                }
                sizes.push(n);
                bytes += ring;
                at += n;
            }
        }
        let mut admit = sizes.len();
        for rt in self.slinks.values().filter(|rt| rt.throttles()) {
            admit = admit.min(fallbehind::admit(&rt.policy, &rt.thresholds, &rt.lag(now), sizes.iter().copied()));
        }
        if admit == 0 {
            return None;
        }
        let mut pendings = Vec::new();
        let mut slices = Vec::new();
        let mut left = admit;
        while left > 0 {
            let Some(mut p) = self.queue.pop_front() else { break };
            if p.data.is_none() {
                p.data = Some(Arc::new(std::mem::take(&mut p.req.buf)));
            }
            let data = p.marker || matches!(p.req.op, Op::Write { .. });
            let mut at = p.appended;
            while left > 0 && at < p.req.len {
                let n = (p.req.len - at).min(slice_max(data));
                slices.push(Slice { p: pendings.len(), start: at, len: n });
                at += n;
                left -= 1;
            }
            pendings.push(p);
        }
        let mut set = SlinkSet::default();
        let mut eras = BTreeMap::new();
        for (nr, rt) in &self.slinks {
            if rt.ordered && !rt.leaving {
                set.insert(*nr);
            }
            eras.insert(*nr, rt.era);
        }
        Some(Batch { pendings, slices, slinks: set, eras })
    }

    pub(super) fn appended(
        &mut self,
        now: Instant,
        batch: Box<Batch>,
        result: Result<Vec<EntryMeta>, LogError>,
    ) -> Effects {
        let mut fx = Effects::default();
        let Batch { mut pendings, slices, slinks: _, eras } = *batch;
        self.appending = false;
        if self.shutdown {
            for p in pendings {
                fx.fail(p.req, p.done, Errno::SHUTDOWN);
            }
            return fx;
        }
        let metas = match result {
            Ok(m) => m,
            Err(LogError::Full { needed, .. }) => {
                // Nothing was written: put the writes back, in order.
                self.stats.log_full_waits += 1;
                for p in pendings.drain(..).rev() {
                    self.queue.push_front(p);
                }
                return match self.log_full_victim(needed) {
                    Some(nr) => self.begin_leave(now, nr, "replication log full"),
                    None => {
                        if self.log_full.is_none() {
                            group_event("group", &self.name, &[("log", "full".into())]);
                        }
                        self.log_full = Some(now);
                        fx
                    }
                };
            }
            Err(e) => {
                warn!(group = %self.name, "replication log append failed: {e}");
                for p in pendings {
                    fx.fail(p.req, p.done, Errno::IO);
                }
                let mut more = self.fail_log(GroupError::Log(e));
                fx.replies.append(&mut more.replies);
                return fx;
            }
        };
        self.log_full = None;
        self.stats.batches += 1;
        self.stats.entries += metas.len() as u64;
        let mut last_seq = vec![0; pendings.len()];
        let mut added = vec![0; pendings.len()];
        let mut flush: Vec<Arc<dyn DirtyLog>> = Vec::new();
        for (s, m) in slices.iter().zip(metas) {
            last_seq[s.p] = m.seq;
            added[s.p] += s.len;
            if m.kind == EntryKind::Write && self.cache_bytes + m.len as u64 <= CACHE_BUDGET {
                let buf = pendings[s.p].data.clone().expect("planned");
                self.cache_bytes += m.len as u64;
                self.cache.insert(m.seq, Chunk { buf, start: s.start as usize, len: s.len as usize });
            }
            if pendings[s.p].marker {
                // Its seq goes back with its completion.
                pendings[s.p].req.offset = m.seq;
            }
            for (nr, rt) in self.slinks.iter_mut() {
                let named = m.slinks.contains(*nr) && eras.get(nr) == Some(&rt.era);
                if rt.ordered && !rt.leaving && named {
                    rt.outstanding.push_back((m.seq, m.len as u64, now));
                    rt.out_bytes += m.len as u64;
                } else if !m.kind.changes_data() {
                    // A marker an SLINK out of ordered mode misses: no region to copy.
                } else if !rt.ordered || rt.leaving {
                    // Out of ordered mode now (even if it was not when planned): the
                    // write becomes dirty regions, published with it. A resync that had
                    // found nothing left to copy has one more region now.
                    rt.resync.done = false;
                    match self.dirty.get(&(*nr, m.dev_nr)) {
                        Some((log, _)) => {
                            log.mark_range(m.offset, m.len as u64);
                            if !flush.iter().any(|l| Arc::ptr_eq(l, log)) {
                                flush.push(log.clone());
                            }
                            for r in region_span(m.offset, m.len as u64, log.region_bytes()) {
                                if self.in_copy.contains(&(*nr, m.dev_nr, r)) {
                                    self.touched.insert((*nr, m.dev_nr, r));
                                }
                            }
                        }
                        None => {
                            self.missed.insert((*nr, m.dev_nr));
                        }
                    }
                } else {
                    // Ordered but not named: it joined ordered mode after the plan,
                    // which only the appender does, between batches.
                    debug_assert!(false, "slink {nr} ordered but not named by entry {}", m.seq);
                    self.missed.insert((*nr, m.dev_nr));
                }
            }
            if m.slinks.contains(0) && m.kind.changes_data() {
                self.overlay.insert(m);
            }
        }
        for (nr, rt) in self.slinks.iter_mut() {
            rt.update_mode(&self.name, *nr, now);
        }
        let waiting: BTreeSet<SlinkNr> =
            self.slinks.iter().filter(|(_, rt)| rt.makes_writes_wait()).map(|(nr, _)| *nr).collect();
        let mut done = Vec::new();
        for (i, mut p) in pendings.into_iter().enumerate() {
            p.appended += added[i];
            if p.appended < p.req.len {
                // The rest goes in a later batch, before anything queued after it.
                self.queue.push_front(p);
                continue;
            }
            done.push(Waiting { dev_nr: p.dev_nr, req: p.req, done: p.done, seq: last_seq[i], wait: waiting.clone() });
        }
        if flush.is_empty() {
            for w in done {
                self.settle(w, &mut fx);
            }
        } else {
            self.unflushed.extend(done);
            fx.io = Some(Io::FlushDirty(flush));
        }
        fx.wake_copiers = true;
        fx
    }

    /// A write whose entries (and dirty marks) are durable: acknowledge it, or make it
    /// wait for the SLINKs that still lack it.
    pub(super) fn settle(&mut self, mut w: Waiting, fx: &mut Effects) {
        w.wait.retain(|nr| self.slinks.get(nr).is_some_and(|rt| rt.makes_writes_wait() && rt.durable < w.seq));
        if w.wait.is_empty() {
            fx.ok(w.req, w.done);
        } else {
            self.awaiting.insert(w.seq, w);
        }
    }

    pub(super) fn dirty_flushed(&mut self, result: io::Result<()>) -> Effects {
        let mut fx = Effects::default();
        let held = std::mem::take(&mut self.unflushed);
        match result {
            Ok(()) => {
                for w in held {
                    self.settle(w, &mut fx);
                }
            }
            Err(e) => {
                warn!(group = %self.name, "marking dirty regions failed: {e}");
                for w in held {
                    fx.fail(w.req, w.done, Errno::IO);
                }
                let mut more = self.fail_log(GroupError::DirtyLog { slink: 0, source: e });
                fx.replies.append(&mut more.replies);
            }
        }
        fx
    }

    /// The log is failing: refuse writes from now on (they fail with EIO), and fail
    /// those queued. Writes already in the log keep their way to the sites, except that
    /// copiers stop when cursors cannot be persisted.
    pub(super) fn fail_log(&mut self, e: GroupError) -> Effects {
        let mut fx = Effects::default();
        if self.log_error.is_none() {
            warn!(group = %self.name, "replication group refuses writes from now on: {e}");
            group_event("group", &self.name, &[("error", e.to_string())]);
            self.log_error = Some(Arc::new(e));
        }
        for p in self.queue.drain(..) {
            fx.fail(p.req, p.done, Errno::IO);
        }
        fx.wake_copiers = true;
        fx.wake_appender = true;
        fx
    }
}
