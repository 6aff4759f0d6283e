//! The appender: group commit. Takes queued writes, appends them to the log as one
//! epoch with one sync, publishes them (overlay, SLINK queues, dirty regions for SLINKs
//! out of ordered mode) and acknowledges what may be acknowledged.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use dmrep_core::Op;
use tracing::warn;

use super::{
    errno, fallbehind, resync, update_mode, Awaiting, Chunk, Inner, Pending, State, CACHE_BUDGET, MAX_BATCH_BYTES,
    MAX_BATCH_ENTRIES, MAX_ENTRY_DATA, TICK,
};
use crate::replicator::log::{EntryKind, EntryMeta, NewEntry, SlinkSet};

/// Fewest writes in the previous batch for the appender to gather before the next one.
const GATHER_MIN_ACKED: usize = 4;

/// Longest the appender waits to gather writes: a fraction of one log sync (~0.2-1 ms
/// here), so a batch never waits longer than it would save.
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_micros(150);

/// One slice of a pending write planned into a batch.
struct Slice {
    /// Index into the batch's pendings.
    p: usize,
    start: u64,
    len: u64,
}

fn entry_kind(op: Op) -> EntryKind {
    match op {
        Op::Write { .. } => EntryKind::Write,
        Op::WriteZeroes { .. } => EntryKind::WriteZeroes,
        _ => EntryKind::Discard,
    }
}

/// Plan a batch from the queue front: slices within batch limits and every async
/// SLINK's fall-behind admission. Takes the planned pendings off the queue.
fn plan(st: &mut State, now: Instant, batch_bytes: u64) -> Option<(Vec<Pending>, Vec<Slice>)> {
    if st.queue.is_empty() {
        return None;
    }
    // Sizes of upcoming slices, for admission.
    let mut sizes = Vec::new();
    let mut bytes = 0u64;
    'outer: for p in st.queue.iter() {
        let data = matches!(p.req.op, Op::Write { .. });
        let mut at = p.appended;
        loop {
            let n = (p.req.len - at).min(if data { MAX_ENTRY_DATA } else { u32::MAX as u64 & !511 });
            if sizes.len() >= MAX_BATCH_ENTRIES || (bytes + n > batch_bytes && !sizes.is_empty()) {
                break 'outer;
            }
            sizes.push((n, if data { n } else { 0 }));
            bytes += if data { n } else { 0 };
            at += n;
            if at >= p.req.len {
                break;
            }
        }
    }
    let mut admit = sizes.len();
    for rt in st.slinks.values().filter(|rt| rt.throttles()) {
        let lag = rt.lag(now);
        admit = admit.min(fallbehind::admit(&rt.policy, &rt.thresholds, &lag, sizes.iter().map(|s| s.0)));
    }
    if admit == 0 {
        return None;
    }
    let mut pendings = Vec::new();
    let mut slices = Vec::new();
    let mut left = admit;
    while left > 0 {
        let Some(mut p) = st.queue.pop_front() else { break };
        if p.data.is_none() {
            p.data = Some(Arc::new(std::mem::take(&mut p.req.buf)));
        }
        let idx = pendings.len();
        let mut at = p.appended;
        let data = matches!(p.req.op, Op::Write { .. });
        while left > 0 && at < p.req.len {
            let n = (p.req.len - at).min(if data { MAX_ENTRY_DATA } else { u32::MAX as u64 & !511 });
            slices.push(Slice { p: idx, start: at, len: n });
            at += n;
            left -= 1;
        }
        pendings.push(p);
    }
    Some((pendings, slices))
}

pub(super) fn appender(inner: Arc<Inner>) {
    // A batch must fit in the ring with room to spare, however small the log: a quarter
    // of the ring (at least one maximal entry is always admitted alone).
    let batch_bytes = MAX_BATCH_BYTES.min(inner.log.stats().ring_len / 4);
    // Writes acknowledged by the previous batch: their clients are likely to send about
    // as many again right away (a queue depth at work).
    let mut last_acked = 0usize;
    loop {
        let (mut pendings, slices, waits, slinks, unordered) = {
            let mut st = inner.st.lock();
            // Gather: with several writers at work, wait a moment for about half as many
            // writes as the last batch acknowledged, so one sync serves more of them. A
            // lone writer (QD1) never waits.
            if last_acked >= GATHER_MIN_ACKED {
                let until = Instant::now() + GATHER_WAIT;
                while !st.shutdown && st.queue.len() < last_acked / 2 && Instant::now() < until {
                    inner.appender_cv.wait_until(&mut st, until);
                }
            }
            let planned = loop {
                if st.shutdown {
                    return;
                }
                resync::maybe_reorder(&inner, &mut st);
                if let Some(p) = plan(&mut st, Instant::now(), batch_bytes) {
                    break p;
                }
                inner.appender_cv.wait_for(&mut st, TICK);
            };
            last_acked = planned.0.len();
            let now = Instant::now();
            // Every SLINK in ordered mode needs the new entries; the others get their
            // regions marked dirty instead.
            let mut set = SlinkSet::default();
            let mut waits = BTreeSet::new();
            let mut unordered = Vec::new();
            for (nr, rt) in st.slinks.iter_mut() {
                if !rt.ordered {
                    unordered.push(*nr);
                    continue;
                }
                set.insert(*nr);
                update_mode(&inner.name, *nr, rt, now);
                if rt.throttles() && rt.mode.waits() {
                    waits.insert(*nr);
                }
            }
            (planned.0, planned.1, waits, set, unordered)
        };
        let entries: Vec<NewEntry<'_>> = slices
            .iter()
            .map(|s| {
                let p = &pendings[s.p];
                let kind = entry_kind(p.req.op);
                let data: &[u8] = match kind {
                    EntryKind::Write => {
                        &p.data.as_ref().expect("planned")[s.start as usize..(s.start + s.len) as usize]
                    }
                    _ => &[],
                };
                NewEntry { dev_nr: p.dev_nr, offset: p.req.offset + s.start, kind, len: s.len as u32, data, slinks }
            })
            .collect();
        let t0 = Instant::now();
        let result = inner.log.append(&entries);
        let append_us = t0.elapsed().as_micros() as u64;
        drop(entries);
        inner.st.lock().stats.append_us += append_us;
        match result {
            Ok(metas) => {
                // SLINKs out of ordered mode: their regions are durably dirty before
                // the write is acknowledged, and published with the write (under the
                // dirty lock) so that a resync of the region cannot miss it.
                let _d = inner.dirty_lock.lock();
                if let Err(e) = resync::mark_written(&inner, &unordered, &metas) {
                    warn!(group = %inner.name, "marking dirty regions failed: {e}");
                    inner.st.lock().log_error = Some(format!("dirty log: {e}"));
                    for p in pendings {
                        p.done.complete(p.req, Err(errno(5)));
                    }
                    continue;
                }
                finish_append(&inner, pendings, &slices, metas, &waits, &unordered)
            }
            Err(crate::replicator::log::LogError::Full { .. }) => {
                // Nothing was written: put the writes back, in order. An SLINK holding
                // the log that may leave ordered mode does so; else wait for copiers.
                let switched = resync::leave_ordered_for_space(&inner);
                let mut st = inner.st.lock();
                st.stats.log_full_waits += 1;
                for p in pendings.drain(..).rev() {
                    st.queue.push_front(p);
                }
                if !switched {
                    inner.appender_cv.wait_for(&mut st, TICK);
                }
            }
            Err(e) => {
                warn!(group = %inner.name, "replication log append failed: {e}");
                let mut st = inner.st.lock();
                st.log_error = Some(e.to_string());
                drop(st);
                for p in pendings {
                    p.done.complete(p.req, Err(errno(5)));
                }
            }
        }
    }
}

/// Record appended entries, acknowledge what may be acknowledged.
fn finish_append(
    inner: &Inner,
    pendings: Vec<Pending>,
    slices: &[Slice],
    metas: Vec<EntryMeta>,
    waits: &BTreeSet<u16>,
    unordered: &[u16],
) {
    let now = Instant::now();
    let mut ready = Vec::new();
    let mut st = inner.st.lock();
    resync::touch(&mut st, unordered, &metas);
    st.stats.batches += 1;
    st.stats.entries += metas.len() as u64;
    let mut last_seq: Vec<u64> = vec![0; pendings.len()];
    let mut added: Vec<u64> = vec![0; pendings.len()];
    for (s, m) in slices.iter().zip(metas) {
        last_seq[s.p] = m.seq;
        added[s.p] += s.len;
        if m.kind == EntryKind::Write && st.cache_bytes + m.len as u64 <= CACHE_BUDGET {
            let buf = pendings[s.p].data.clone().expect("planned");
            st.cache_bytes += m.len as u64;
            st.cache.insert(m.seq, Chunk { buf, start: s.start as usize, len: s.len as usize });
        }
        for (nr, rt) in st.slinks.iter_mut() {
            // An SLINK that left ordered mode during the append (initial sync of a new
            // RD) has every region dirty already: it does not queue entries.
            if m.slinks.contains(*nr) && rt.ordered {
                rt.outstanding.push_back((m.seq, m.len as u64, now));
                rt.out_bytes += m.len as u64;
            }
        }
        if m.slinks.contains(0) {
            st.overlay.insert(m);
        }
    }
    for (nr, rt) in st.slinks.iter_mut() {
        update_mode(&inner.name, *nr, rt, now);
    }
    for (i, mut p) in pendings.into_iter().enumerate() {
        p.wait.extend(waits.iter().copied());
        p.appended += added[i];
        if p.appended < p.req.len {
            // The rest goes in a later batch, before anything queued after it.
            st.queue.push_front(p);
            continue;
        }
        // Only SLINKs still in ordered mode and behind the last seq are waited for
        // (a fast copier may have applied the slices already).
        let seq = last_seq[i];
        p.wait.retain(|nr| st.slinks.get(nr).is_some_and(|rt| rt.ordered && rt.applied < seq));
        if p.wait.is_empty() {
            ready.push((p.req, p.done));
        } else {
            st.awaiting.insert(seq, Awaiting { dev_nr: p.dev_nr, req: p.req, done: p.done, wait: p.wait });
        }
    }
    drop(st);
    inner.copier_cv.notify_all();
    for (req, done) in ready {
        done.complete(req, Ok(()));
    }
}
