//! The group's threads. They only wait and do I/O: each asks the machine for work, does
//! it outside the lock, and hands the result back as the next event.
//!
//! - the *appender*: group commit (log appends), dirty-log flushes of the writes it
//!   appended, an SLINK leaving or rejoining ordered mode;
//! - one *copier* per SLINK: applies epochs to the site, copies dirty regions (resync),
//!   probes a site that is down, and persists the SLINK's cursor.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::cursors::CopierCursor;
use super::machine::{ApplyWork, Event, Io, ResyncWork};
use super::{Inner, SlinkNr, TICK};
use crate::replicator::log::EntryKind;
use crate::replicator::marker::{Marker, MarkerOutcome, MarkerReached};
use crate::replicator::slink::{ApplyEntry, SlinkHandler};

/// Fewest writes in the previous batch for the appender to gather before the next one.
const GATHER_MIN_ACKED: usize = 4;

/// Longest the appender waits to gather writes: a fraction of one log sync (~0.2-1 ms
/// here), so a batch never waits longer than it would save.
const GATHER_WAIT: Duration = Duration::from_micros(150);

/// Largest read/write the resync does at once.
const RESYNC_CHUNK: u64 = 1 << 20;

/// Wait until the machine hands out work for `ready` (None: the group shuts down, or
/// the worker is `gone`).
fn wait_for_work(
    inner: &Inner,
    cv: &parking_lot::Condvar,
    ready: impl Fn() -> Event,
    gone: impl Fn(&super::machine::Machine) -> bool,
) -> Option<Io> {
    let mut m = inner.m.lock();
    loop {
        if m.shutdown || gone(&m) {
            return None;
        }
        let fx = m.apply(Instant::now(), ready());
        if fx.io.is_some() || !fx.replies.is_empty() {
            drop(m);
            match inner.carry_out(fx).0 {
                Some(io) => return Some(io),
                None => {
                    m = inner.m.lock();
                    continue;
                }
            }
        }
        drop(fx);
        cv.wait_for(&mut m, TICK);
    }
}

/// Wait until the group shuts down (a copier that may not ship any more).
fn wait_for_shutdown(inner: &Inner) {
    let mut m = inner.m.lock();
    while !m.shutdown {
        inner.copier_cv.wait_for(&mut m, TICK);
    }
}

pub(super) fn appender(inner: Arc<Inner>) {
    // Writes acknowledged by the previous batch: their clients are likely to send about
    // as many again right away (a queue depth at work).
    let mut last_batch = 0usize;
    let mut next: Option<Io> = None;
    loop {
        let io = match next.take() {
            Some(io) => io,
            None => {
                // Gather: with several writers at work, wait a moment for about half as
                // many writes as the last batch held, so one sync serves more of them. A
                // lone writer (QD1) never waits.
                if last_batch >= GATHER_MIN_ACKED {
                    let until = Instant::now() + GATHER_WAIT;
                    let mut m = inner.m.lock();
                    while !m.shutdown && m.queued() < last_batch / 2 && Instant::now() < until {
                        inner.appender_cv.wait_until(&mut m, until);
                    }
                }
                match wait_for_work(&inner, &inner.appender_cv, || Event::AppenderReady, |_| false) {
                    Some(io) => io,
                    None => return,
                }
            }
        };
        let ev = match io {
            Io::Append(batch) => {
                last_batch = batch.writes();
                let t0 = Instant::now();
                let result = inner.log.append(&batch.entries());
                Event::Appended { batch, took: t0.elapsed(), result }
            }
            Io::FlushDirty(logs) => Event::DirtyFlushed { result: logs.iter().try_for_each(|l| l.flush()) },
            Io::Leave { slink, logs } => inner.leave(slink, &logs),
            Io::Reorder { slink } => {
                // The site hears first that its copy stands at the log's last seq (the
                // appender is the only one appending: it stays the last until then).
                // (In the group's history seqs: the log's newest.)
                let seq = inner.log.received();
                match inner.handler(slink).map_or(Ok(()), |h| h.rejoined(seq)) {
                    Ok(()) => {
                        let result = inner.log.register_slink(slink);
                        if result.is_ok() {
                            inner.resync_ended(slink);
                        }
                        Event::Reordered { slink, result }
                    }
                    Err(error) => Event::RejoinFailed { slink, error },
                }
            }
            Io::Apply(_) | Io::Collect { .. } | Io::Resync(_) | Io::Probe { .. } => {
                unreachable!("copier work handed to the appender")
            }
        };
        next = inner.event(ev).0;
    }
}

pub(super) fn spawn_copier(inner: &Arc<Inner>, nr: SlinkNr) -> io::Result<JoinHandle<()>> {
    let i = inner.clone();
    std::thread::Builder::new().name(format!("{}-slink{nr}", inner.name)).spawn(move || copier(i, nr))
}

fn copier(inner: Arc<Inner>, nr: SlinkNr) {
    let Some(handler) = inner.handler(nr) else { return };
    let mut cursor = CopierCursor::new(&inner, nr);
    let mut next: Option<Io> = None;
    loop {
        let io = match next.take() {
            Some(io) => io,
            None => match wait_for_work(
                &inner,
                &inner.copier_cv,
                || Event::CopierReady { slink: nr },
                |m| !m.slinks.contains_key(&nr),
            ) {
                Some(io) => io,
                None => return,
            },
        };
        let mut pause = None;
        let ev = match io {
            Io::Apply(w) => apply(&inner, &*handler, w),
            Io::Collect { slink, era, last } => {
                let t0 = Instant::now();
                let result = handler.collect();
                Event::Applied { slink, era, last, took: t0.elapsed(), result }
            }
            Io::Resync(w) => {
                if !handler.keeps_log() {
                    // (A site with a log of its own snapshots its devices itself.)
                    inner.resync_begins(nr);
                }
                let result = copy_region(&inner, &*handler, &w);
                if let Some(rate) = w.rate_limit.filter(|r| *r > 0) {
                    pause = Some(Duration::from_secs_f64(w.len as f64 / rate as f64).min(Duration::from_secs(5)));
                }
                Event::Resynced { work: w, result }
            }
            Io::Probe { slink } => Event::Probed { slink, result: handler.probe() },
            Io::Append(_) | Io::FlushDirty(_) | Io::Leave { .. } | Io::Reorder { .. } => {
                unreachable!("appender work handed to a copier")
            }
        };
        let (io, applied) = inner.event(ev);
        next = io;
        while let Some(news) = handler.take_news() {
            super::Group::link_news(&inner, nr, news);
        }
        if let Some(seq) = applied {
            // A cursor that cannot be made durable stops this copier's shipping: the
            // machine knows (the committer reported it) and hands out no more epochs.
            if cursor.persist(seq).is_err() {
                warn!(group = %inner.name, slink = nr, "cursor not persisted: shipping stops");
                wait_for_shutdown(&inner);
                return;
            }
        }
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    }
}

/// Apply an epoch to the site, durably. Entries not in the cache are read back from the
/// log; a failure to read the log is a log error, not a site outage.
fn apply(inner: &Inner, handler: &dyn SlinkHandler, w: ApplyWork) -> Event {
    let mut owned: Vec<Option<Vec<u8>>> = Vec::with_capacity(w.entries.len());
    for (m, c) in &w.entries {
        if m.kind.has_data() && c.is_none() {
            let mut v = vec![0u8; m.len as usize];
            if let Err(error) = inner.log.read_data(m, &mut v) {
                return Event::LogReadFailed { slink: w.slink, seq: m.seq, error };
            }
            owned.push(Some(v));
        } else {
            owned.push(None);
        }
    }
    let entries: Vec<ApplyEntry<'_>> = w
        .entries
        .iter()
        .zip(&owned)
        .map(|((m, c), o)| ApplyEntry {
            seq: m.origin_seq,
            epoch: m.epoch,
            time_us: m.origin_time_us,
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
    let seqs: Vec<u64> = w.entries.iter().map(|(m, _)| m.seq).collect();
    let result = if entries.is_empty() { Ok(w.last) } else { ship(inner, w.slink, handler, &entries, &seqs, w.last) };
    Event::Applied { slink: w.slink, era: w.era, last: w.last, took: t0.elapsed(), result }
}

/// Ship `entries` (log seqs `seqs`, ending at `last`); at each marker this SLINK acts on
/// (a local site: its apply is durable when it returns), first make what precedes it
/// durable, then let the hook act, then go on.
fn ship(
    inner: &Inner,
    nr: SlinkNr,
    handler: &dyn SlinkHandler,
    entries: &[ApplyEntry<'_>],
    seqs: &[u64],
    last: u64,
) -> io::Result<u64> {
    let mut from = 0;
    if !handler.keeps_log() {
        for (i, e) in entries.iter().enumerate() {
            if e.kind != EntryKind::Marker {
                continue;
            }
            if i > from {
                handler.ship(&entries[from..i], seqs[i - 1])?;
            }
            reached_marker(inner, nr, handler, e);
            from = i + 1;
        }
    }
    if from == entries.len() {
        return Ok(last);
    }
    handler.ship(&entries[from..], last)
}

/// The copier of SLINK `nr` reached marker `e`, with everything before it durable at
/// the site: act on it if it names this SLINK (see [`crate::replicator::marker`]).
fn reached_marker(inner: &Inner, nr: SlinkNr, handler: &dyn SlinkHandler, e: &ApplyEntry<'_>) {
    let marker = match Marker::decode(e.data) {
        Ok(m) => m,
        Err(why) => {
            warn!(group = %inner.name, slink = nr, seq = e.seq, "marker ignored: {why}");
            return;
        }
    };
    let secondary = inner.m.lock().secondary;
    if !marker.acts_at(nr, secondary) {
        return;
    }
    // A group starting up gets its hook right after its threads start.
    let hook = {
        let until = Instant::now() + Duration::from_secs(5);
        let mut h = inner.hook.lock();
        while h.is_none() && !inner.hook_set.wait_until(&mut h, until).timed_out() {}
        h.clone()
    };
    let outcome = match hook {
        None => MarkerOutcome::Failed("this program takes no snapshots (no marker hook)".into()),
        Some(h) => {
            let devices = crate::replicator::marker::device_paths(handler);
            let at = MarkerReached {
                group: inner.name.clone(),
                marker: marker.clone(),
                slink: nr,
                seq: e.seq,
                time_us: e.time_us,
                devices,
            };
            h.reached(&at)
        }
    };
    match &outcome {
        MarkerOutcome::Done(what) => {
            info!(group = %inner.name, slink = nr, seq = e.seq, name = %marker.name, "marker reached: {what}")
        }
        MarkerOutcome::Failed(why) => {
            warn!(group = %inner.name, slink = nr, seq = e.seq, name = %marker.name, "marker reached, but: {why}")
        }
        MarkerOutcome::NotHere => return,
    }
    inner.markers.record(&marker.name, outcome);
}

/// Read the region as the application sees it (LD plus entries not yet on it) and write
/// it to the SLINK's copy, durably, a chunk at a time.
fn copy_region(inner: &Inner, handler: &dyn SlinkHandler, w: &ResyncWork) -> io::Result<()> {
    let mut at = w.offset;
    while at < w.offset + w.len {
        let n = RESYNC_CHUNK.min(w.offset + w.len - at);
        let mut buf = vec![0u8; n as usize];
        inner.read(w.dev, at, &mut buf)?;
        handler.copy_region(w.dev, at, &buf)?;
        at += n;
    }
    Ok(())
}
