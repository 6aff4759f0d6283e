//! The copiers: one per SLINK (SLINK 0 included), applying log entries to the site in
//! log order, one epoch at a time, durably, then persisting the SLINK's cursor; or, out
//! of ordered mode, running the resync; or probing an inaccessible site.

use std::io;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::{info, warn};

use super::{cursors, resync, update_mode, Chunk, Inner, State, MAX_APPLY_ENTRIES, PROBE_MAX, PROBE_MIN, TICK};
use crate::replicator::log::{EntryKind, EntryMeta};
use crate::replicator::slink::{ApplyEntry, SlinkHandler};

/// What a copier does next.
enum Work {
    Apply(u64, Vec<(EntryMeta, Option<Chunk>)>),
    Resync,
    Probe,
}

pub(super) fn copier(inner: Arc<Inner>, nr: u16) {
    let Some(handler) = inner.handler(nr) else { return };
    let mut backoff = PROBE_MIN;
    let mut next_probe = Instant::now();
    // Backoff and the outage's start reset only once real work succeeded after a
    // failure, so a site that answers probes but fails I/O is not reported as flapping.
    let mut healthy = true;
    let mut down_since: Option<SystemTime> = None;
    let mut cursor = cursors::CopierCursor::new(&inner, nr);
    loop {
        let work = {
            let mut st = inner.st.lock();
            loop {
                if st.shutdown {
                    return;
                }
                let rt = &st.slinks[&nr];
                let shipping = (nr == 0 || st.shipping) && !rt.paused;
                if !rt.accessible {
                    if Instant::now() >= next_probe {
                        break Work::Probe;
                    }
                } else if shipping && !rt.ordered && !rt.resync.done {
                    break Work::Resync;
                } else if shipping && !rt.outstanding.is_empty() {
                    if let Some(w) = next_epoch(&inner, &mut st, nr, &*handler) {
                        break Work::Apply(st.slinks[&nr].gen, w);
                    }
                }
                inner.copier_cv.wait_for(&mut st, TICK);
            }
        };
        match work {
            Work::Probe => match handler.probe() {
                Ok(()) => {
                    let mut st = inner.st.lock();
                    let rt = st.slinks.get_mut(&nr).expect("slink");
                    rt.accessible = true;
                    info!(group = %inner.name, slink = nr, "slink answers again; resuming shipping");
                }
                Err(e) => {
                    backoff = (backoff * 2).min(PROBE_MAX);
                    next_probe = Instant::now() + backoff;
                    inner.st.lock().slinks.get_mut(&nr).expect("slink").last_error = Some(e.to_string());
                }
            },
            Work::Resync => match resync::step(&inner, nr, &*handler) {
                Ok(()) => recovered(&inner, nr, &mut healthy, &mut backoff, &mut down_since),
                Err(e) => {
                    went_down(&inner, nr, "resync", &e, &mut healthy, &mut backoff, &mut down_since);
                    next_probe = Instant::now() + backoff;
                }
            },
            Work::Apply(gen, batch) => match apply(&inner, nr, &*handler, gen, batch) {
                Ok(None) => {}
                Ok(Some(last)) => {
                    recovered(&inner, nr, &mut healthy, &mut backoff, &mut down_since);
                    cursor.persist(last);
                }
                Err(e) => {
                    went_down(&inner, nr, "applying entries", &e, &mut healthy, &mut backoff, &mut down_since);
                    next_probe = Instant::now() + backoff;
                }
            },
        }
    }
}

/// Entries looked at per step when finding an SLINK's next epoch.
const SCAN_WINDOW: usize = 64;

/// An SLINK's site failed: mark it inaccessible (it is probed with backoff). A failure
/// right after a successful probe keeps the outage's start and the growing backoff.
fn went_down(
    inner: &Inner,
    nr: u16,
    doing: &str,
    e: &io::Error,
    healthy: &mut bool,
    backoff: &mut std::time::Duration,
    down_since: &mut Option<SystemTime>,
) {
    if std::mem::replace(healthy, false) {
        warn!(group = %inner.name, slink = nr, "{doing} failed, marking the slink inaccessible: {e}");
        *backoff = PROBE_MIN;
        *down_since = Some(SystemTime::now());
    } else {
        *backoff = (*backoff * 2).min(PROBE_MAX);
    }
    let mut st = inner.st.lock();
    let rt = st.slinks.get_mut(&nr).expect("slink");
    rt.accessible = false;
    rt.down_since = *down_since;
    rt.last_error = Some(e.to_string());
}

/// Real work succeeded: an outage, if there was one, is over.
fn recovered(
    inner: &Inner,
    nr: u16,
    healthy: &mut bool,
    backoff: &mut std::time::Duration,
    down_since: &mut Option<SystemTime>,
) {
    if !std::mem::replace(healthy, true) {
        *backoff = PROBE_MIN;
        if let Some(t) = down_since.take() {
            info!(group = %inner.name, slink = nr, down_for = ?t.elapsed().unwrap_or_default(), "slink back after an outage");
        }
        inner.st.lock().slinks.get_mut(&nr).expect("slink").down_since = None;
    }
}

/// The next entries SLINK `nr` must apply: the rest of the first epoch it lacks, only
/// entries the appender has recorded (seq <= its last outstanding), and only once
/// their devices are attached.
fn next_epoch(
    inner: &Inner,
    st: &mut State,
    nr: u16,
    handler: &dyn SlinkHandler,
) -> Option<Vec<(EntryMeta, Option<Chunk>)>> {
    let rt = &st.slinks[&nr];
    let last_known = rt.outstanding.back()?.0;
    // Scan the log in small windows: the first epoch is usually short, and copying
    // thousands of entry records to apply one would be work on every pass.
    let mut from = rt.applied + 1;
    let mut epoch = None;
    let mut out = Vec::new();
    'scan: loop {
        let metas = inner.log.entries_from(from, SCAN_WINDOW);
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
                Some(e) if e != m.epoch => break 'scan,
                _ => {}
            }
            if !handler.has_device(m.dev_nr) {
                let rt = st.slinks.get_mut(&nr).expect("slink");
                rt.waiting_for_device = Some(m.dev_nr);
                return None;
            }
            let c = st.cache.get(&m.seq).cloned();
            out.push((m, c));
        }
        if !full {
            break;
        }
        from = next;
    }
    st.slinks.get_mut(&nr).expect("slink").waiting_for_device = None;
    (!out.is_empty()).then_some(out)
}

/// Apply entries to the site (durably), then account and acknowledge. Returns the last
/// seq applied; the caller persists it as the SLINK's cursor.
fn apply(
    inner: &Inner,
    nr: u16,
    handler: &dyn SlinkHandler,
    gen: u64,
    batch: Vec<(EntryMeta, Option<Chunk>)>,
) -> io::Result<Option<u64>> {
    // Entries not in the cache are read back from the log.
    let mut owned: Vec<Option<Vec<u8>>> = Vec::with_capacity(batch.len());
    for (m, c) in &batch {
        if m.kind == EntryKind::Write && c.is_none() {
            let mut v = vec![0u8; m.len as usize];
            inner.log.read_data(m, &mut v).map_err(io::Error::other)?;
            owned.push(Some(v));
        } else {
            owned.push(None);
        }
    }
    let entries: Vec<ApplyEntry<'_>> = batch
        .iter()
        .zip(&owned)
        .map(|((m, c), o)| ApplyEntry {
            dev_nr: m.dev_nr,
            offset: m.offset,
            len: m.len,
            kind: m.kind,
            data: match (c, o) {
                (Some(c), _) => c.bytes(),
                (None, Some(v)) => v,
                _ => &[],
            },
        })
        .collect();
    let t0 = Instant::now();
    handler.apply(&entries)?;
    let t1 = Instant::now();
    let last = batch.last().expect("non-empty").0.seq;

    let now = Instant::now();
    let mut ready = Vec::new();
    let mut st = inner.st.lock();
    let rt = st.slinks.get_mut(&nr).expect("slink");
    if rt.gen != gen {
        // The SLINK left ordered mode meanwhile: these entries are dirty regions now.
        return Ok(None);
    }
    rt.applied = last;
    rt.applies += 1;
    rt.apply_us += (t1 - t0).as_micros() as u64;
    while rt.outstanding.front().is_some_and(|o| o.0 <= last) {
        let (_, b, _) = rt.outstanding.pop_front().expect("front");
        rt.out_bytes -= b;
        rt.applied_entries += 1;
        rt.applied_bytes += b;
    }
    update_mode(&inner.name, nr, rt, now);
    if nr == 0 {
        for (m, _) in &batch {
            st.overlay.remove(m);
        }
    }
    let done_seqs: Vec<u64> = st
        .awaiting
        .range_mut(..=last)
        .filter_map(|(seq, a)| {
            a.wait.remove(&nr);
            a.wait.is_empty().then_some(*seq)
        })
        .collect();
    for s in done_seqs {
        let a = st.awaiting.remove(&s).expect("present");
        ready.push((a.req, a.done));
    }
    // Data every SLINK has applied leaves the cache.
    // (SLINKs out of ordered mode need no entries: they do not hold the cache.)
    let min_applied = st.slinks.values().filter(|r| r.ordered).map(|r| r.applied).min().unwrap_or(0);
    while let Some((&seq, _)) = st.cache.first_key_value() {
        if seq > min_applied {
            break;
        }
        let c = st.cache.remove(&seq).expect("present");
        st.cache_bytes -= c.len as u64;
    }
    drop(st);
    inner.appender_cv.notify_all();
    for (req, done) in ready {
        done.complete(req, Ok(()));
    }
    Ok(Some(last))
}
