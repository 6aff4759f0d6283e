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

use std::collections::BTreeMap;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use tracing::warn;

use super::{Inner, TICK};
use crate::replicator::log::LogError;

#[derive(Default)]
struct State {
    /// Newest cursor per SLINK not yet handed to the log.
    pending: BTreeMap<u16, u64>,
    /// Tickets handed out, and the highest one durable.
    requested: u64,
    done: u64,
    stop: bool,
}

#[derive(Default)]
pub(super) struct Committer {
    st: Mutex<State>,
    cv: Condvar,
}

impl Committer {
    /// Queue SLINK `nr`'s cursor `seq`; returns the ticket to wait for.
    fn submit(&self, nr: u16, seq: u64) -> u64 {
        let mut st = self.st.lock();
        let e = st.pending.entry(nr).or_insert(seq);
        *e = (*e).max(seq);
        st.requested += 1;
        let t = st.requested;
        self.cv.notify_all();
        t
    }

    /// Wait until `ticket` is durable (or the committer stopped).
    fn wait(&self, ticket: u64) {
        let mut st = self.st.lock();
        while st.done < ticket && !st.stop {
            self.cv.wait(&mut st);
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
            (std::mem::take(&mut st.pending), st.requested)
        };
        let t0 = Instant::now();
        // An SLINK that left ordered mode since has no cursor; one that came back has a
        // newer one: those updates have nothing left to say. Filter, and filter again if
        // the state moved between the filter and the write.
        for _ in 0..2 {
            let updates: Vec<(u16, u64)> = batch
                .iter()
                .filter(|(nr, seq)| inner.log.cursor(**nr).is_some_and(|cur| **seq >= cur))
                .map(|(n, s)| (*n, *s))
                .collect();
            if updates.is_empty() {
                break;
            }
            match inner.log.set_cursors(&updates) {
                Ok(()) => break,
                Err(LogError::UnknownSlink(_) | LogError::CursorBackwards { .. }) => continue,
                Err(e) => {
                    warn!(group = %inner.name, "persisting slink cursors failed: {e}");
                    inner.st.lock().log_error = Some(format!("persisting slink cursors: {e}"));
                    break;
                }
            }
        }
        let us = t0.elapsed().as_micros() as u64;
        {
            let mut st = inner.st.lock();
            for nr in batch.keys() {
                if let Some(rt) = st.slinks.get_mut(nr) {
                    rt.cursor_us += us;
                }
            }
        }
        let mut st = c.st.lock();
        st.done = st.done.max(ticket);
        c.cv.notify_all();
    }
}

/// One copier's view: the order rule above.
pub(super) struct CopierCursor<'a> {
    committer: &'a Committer,
    nr: u16,
    prev: Option<u64>,
}

impl<'a> CopierCursor<'a> {
    pub(super) fn new(inner: &'a Inner, nr: u16) -> Self {
        CopierCursor { committer: &inner.cursors, nr, prev: None }
    }

    /// Wait until the previous cursor is durable, then hand in `seq`.
    pub(super) fn persist(&mut self, seq: u64) {
        if let Some(t) = self.prev.take() {
            self.committer.wait(t);
        }
        self.prev = Some(self.committer.submit(self.nr, seq));
    }
}

impl Drop for CopierCursor<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.prev.take() {
            self.committer.wait(t);
        }
    }
}
