//! `core`: the dirty log lives in memory. After a primary crash it is lost, so the
//! replicator treats every region of such an RD as dirty when it cannot prove
//! otherwise (it restarts a resync that was running).

use std::io;

use parking_lot::Mutex;

use super::{region_span, Bitmap, DirtyLog};

pub struct CoreLog {
    bits: Mutex<Bitmap>,
    region_bytes: u64,
}

impl CoreLog {
    pub fn new(dev_bytes: u64, region_bytes: u64) -> Self {
        CoreLog { bits: Mutex::new(Bitmap::new(dev_bytes.div_ceil(region_bytes))), region_bytes }
    }
}

impl DirtyLog for CoreLog {
    fn region_bytes(&self) -> u64 {
        self.region_bytes
    }
    fn regions(&self) -> u64 {
        self.bits.lock().regions()
    }
    fn mark_range(&self, offset: u64, len: u64) {
        let mut b = self.bits.lock();
        for r in region_span(offset, len, self.region_bytes) {
            if r < b.regions() {
                b.set(r);
            }
        }
    }
    fn mark_all(&self) {
        let mut b = self.bits.lock();
        for r in 0..b.regions() {
            b.set(r);
        }
    }
    fn clear(&self, region: u64) {
        self.bits.lock().unset(region);
    }
    /// Nothing to make durable: a `core` log lives in memory.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_dirty(&self, region: u64) -> bool {
        self.bits.lock().get(region)
    }
    fn next_dirty(&self, from: u64) -> Option<u64> {
        self.bits.lock().next_set(from)
    }
    fn dirty_count(&self) -> u64 {
        self.bits.lock().count()
    }
    fn kind(&self) -> &'static str {
        "core"
    }
}
