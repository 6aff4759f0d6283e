//! Byte-range locks of an origin: a copy-out and the origin write it protects, a
//! snapshot read of chunks still on the origin, and a snapshot write that allocates an
//! exception each hold the bytes they touch, so that they never race on one chunk;
//! operations on other bytes go on in parallel.
//!
//! Each operation takes one contiguous range at a time and waits for nothing else while
//! holding it, so the locks cannot deadlock.

use parking_lot::{Condvar, Mutex};

/// The ranges held, and a condition variable to wait for one to be released.
#[derive(Default)]
pub(crate) struct RangeLocks {
    /// `(start, end)` byte ranges held; few at a time (one per request in flight).
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// One range held; released when dropped.
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no held range overlaps `start..end`, then holds it.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            self.released.wait(&mut held);
        }
        held.push((start, end));
        RangeGuard { locks: self, range: (start, end) }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let g = locks.lock(0, 4096);
        let _other = locks.lock(4096, 8192); // adjacent: no wait
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, got) = (locks.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(4000, 4001);
                got.store(true, Ordering::SeqCst);
            })
        };
        // The waiter cannot get in while either overlapping range is held.
        std::thread::yield_now();
        assert!(!got.load(Ordering::SeqCst));
        drop(g);
        drop(_other);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
