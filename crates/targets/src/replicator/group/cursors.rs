//! Persisting the SLINKs' cursors: one committer per group writes every pending cursor
//! update in one superblock write and sync, so the copiers of several SLINKs that finish
//! epochs at about the same time share it.
//!
//! Order rule (why copiers may go on before their cursor is durable): after a crash a
//! copier re-applies every entry after its durable cursor. Re-applying epoch e over a
//! site that also holds part of epoch e+1 is harmless (e+1's writes were concurrent with
//! each other), but re-applying e-1 over e+1 could roll back a block e+1 depends on. So
//! before epoch e+1 starts, the cursor of epoch e-1 must be durable: each copier waits
//! for its previous ticket before handing in the next one ([`CopierCursor::persist`]).
//!
//! A ticket is done only when what it asked is durable (or has nothing left to say: its
//! SLINK left ordered mode). When persisting fails, no later ticket is ever done: the
//! copiers stop, and the machine learns of it ([`Event::CursorsFailed`]) and refuses
//! writes.

use std::collections::BTreeMap;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tracing::warn;

use super::machine::Event;
use super::{Inner, Seq, SlinkNr, TICK};
use crate::replicator::log::LogError;

/// How long the committer waits for more cursors before a commit: about one copier's
/// apply on a disk (write + sync), so the cursors of SLINKs finishing the same epoch
/// share one superblock sync. Copiers do not wait for it (a copier waits only for the
/// ticket of the epoch before its previous one).
const GATHER: std::time::Duration = std::time::Duration::from_micros(300);

/// Persisting cursors failed: the order rule cannot be kept, shipping stops.
#[derive(Debug)]
pub(super) struct CursorsFailed;

#[derive(Default)]
struct State {
    /// Newest cursor per SLINK not yet handed to the log.
    pending: BTreeMap<SlinkNr, Seq>,
    /// Tickets handed out, and the highest one durable.
    requested: u64,
    done: u64,
    /// Persisting failed: no ticket after `done` will ever be.
    failed: bool,
    stop: bool,
}

#[derive(Default)]
pub(super) struct Committer {
    st: Mutex<State>,
    cv: Condvar,
}

impl Committer {
    /// Queue SLINK `nr`'s cursor `seq`; returns the ticket to wait for.
    pub(super) fn submit(&self, nr: SlinkNr, seq: Seq) -> u64 {
        let mut st = self.st.lock();
        let e = st.pending.entry(nr).or_insert(seq);
        *e = (*e).max(seq);
        st.requested += 1;
        let t = st.requested;
        self.cv.notify_all();
        t
    }

    /// Wait until `ticket` is durable (or the committer stopped). Err: it never will be.
    fn wait(&self, ticket: u64) -> Result<(), CursorsFailed> {
        let mut st = self.st.lock();
        while st.done < ticket && !st.stop && !st.failed {
            self.cv.wait(&mut st);
        }
        if st.done >= ticket {
            Ok(())
        } else {
            Err(CursorsFailed)
        }
    }

    /// Stop once nothing is pending (after the copiers have exited).
    pub(super) fn stop(&self) {
        self.st.lock().stop = true;
        self.cv.notify_all();
    }
}

/// The committer thread.
pub(super) fn run(inner: &Inner) {
    let c = &inner.cursors;
    loop {
        let (batch, ticket) = {
            let mut st = c.st.lock();
            loop {
                if !st.pending.is_empty() {
                    break;
                }
                if st.stop {
                    return;
                }
                c.cv.wait_for(&mut st, TICK);
            }
            // Gather: the other SLINKs' copiers finish their epochs at about the same
            // time; a short wait lets one superblock sync carry all their cursors (it
            // competes with the log's own sync on the disk). No write waits for it.
            let until = Instant::now() + GATHER;
            while !st.stop && Instant::now() < until {
                if c.cv.wait_until(&mut st, until).timed_out() {
                    break;
                }
            }
            (std::mem::take(&mut st.pending), st.requested)
        };
        let t0 = Instant::now();
        // An SLINK that left ordered mode since has no cursor; one that came back has a
        // newer one: those updates have nothing left to say. Filter, and filter again if
        // the state moved between the filter and the write.
        let mut result = Ok(());
        for _ in 0..2 {
            let updates: Vec<(SlinkNr, Seq)> = batch
                .iter()
                .filter(|(nr, seq)| inner.log.cursor(**nr).is_some_and(|cur| **seq >= cur))
                .map(|(n, s)| (*n, *s))
                .collect();
            if updates.is_empty() {
                break;
            }
            result = inner.log.set_cursors(&updates);
            match &result {
                Err(LogError::UnknownSlink(_) | LogError::CursorBackwards { .. }) => continue,
                _ => break,
            }
        }
        match result {
            Ok(()) | Err(LogError::UnknownSlink(_) | LogError::CursorBackwards { .. }) => {
                let _ = inner
                    .event(Event::CursorsPersisted { slinks: batch.keys().copied().collect(), took: t0.elapsed() });
                let mut st = c.st.lock();
                st.done = st.done.max(ticket);
                c.cv.notify_all();
            }
            Err(error) => {
                warn!(group = %inner.name, "persisting slink cursors failed: {error}");
                // The machine first (it hands out no more epochs), then the copiers.
                let _ = inner.event(Event::CursorsFailed { error });
                c.st.lock().failed = true;
                c.cv.notify_all();
            }
        }
    }
}

/// One copier's view: the order rule above.
pub(super) struct CopierCursor<'a> {
    committer: &'a Committer,
    nr: SlinkNr,
    prev: Option<u64>,
}

impl<'a> CopierCursor<'a> {
    pub(super) fn new(inner: &'a Inner, nr: SlinkNr) -> Self {
        CopierCursor { committer: &inner.cursors, nr, prev: None }
    }

    /// Wait until the previous cursor is durable, then hand in `seq`. Err: the previous
    /// one never will be; `seq` is not handed in.
    pub(super) fn persist(&mut self, seq: Seq) -> Result<(), CursorsFailed> {
        if let Some(t) = self.prev.take() {
            self.committer.wait(t)?;
        }
        self.prev = Some(self.committer.submit(self.nr, seq));
        Ok(())
    }
}

impl Drop for CopierCursor<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.prev.take() {
            let _ = self.committer.wait(t);
        }
    }
}
