//! Dirty logs: per-RD region bitmaps of the regions the RD lacks.
//!
//! An SLINK leaves ordered (log) mode when the log cannot hold what it still needs
//! (DESIGN invariant 5): its pending entries become dirty regions, and new writes mark
//! regions instead of queueing entries. Resync copies the dirty regions LD -> RD and
//! clears them. Two implementations behind one trait: [`core`] (memory) and [`disk`]
//! (persistent, checksummed, crash-safe).
//!
//! Changes are made in memory (cheap, under the group's lock) and made durable by
//! [`DirtyLog::flush`] (I/O, never under the group's lock). Crash-safety rule (for
//! `disk`): a region is durably marked (a flush that began after the mark returned)
//! before a write into it can be missing from the RD (before the write is acknowledged),
//! and cleared only after its copy is durable on the RD.

pub mod core;
pub mod disk;

use std::io;

/// A region bitmap.
pub trait DirtyLog: Send + Sync {
    /// Region size in bytes.
    fn region_bytes(&self) -> u64;
    /// Number of regions.
    fn regions(&self) -> u64;
    /// Mark every region touched by `[offset, offset+len)` dirty, in memory.
    fn mark_range(&self, offset: u64, len: u64);
    /// Mark all regions dirty (initial full sync), in memory.
    fn mark_all(&self);
    /// Clear one region, in memory.
    fn clear(&self, region: u64);
    /// Make every change made before this call durable. Concurrent flushes are
    /// serialised: one that returns Ok covers every change made before it began.
    fn flush(&self) -> io::Result<()>;
    /// Whether a region is dirty.
    fn is_dirty(&self, region: u64) -> bool;
    /// The first dirty region at or after `from`.
    fn next_dirty(&self, from: u64) -> Option<u64>;
    /// How many regions are dirty.
    fn dirty_count(&self) -> u64;
    /// `core` or `disk`.
    fn kind(&self) -> &'static str;
}

/// An in-memory bitmap; the common part of both implementations.
#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    regions: u64,
    dirty: u64,
}

impl Bitmap {
    pub fn new(regions: u64) -> Self {
        Bitmap { words: vec![0; regions.div_ceil(64) as usize], regions, dirty: 0 }
    }

    pub fn set(&mut self, r: u64) -> bool {
        let (w, b) = ((r / 64) as usize, r % 64);
        let was = self.words[w] & (1 << b) != 0;
        if !was {
            self.words[w] |= 1 << b;
            self.dirty += 1;
        }
        !was
    }

    pub fn unset(&mut self, r: u64) -> bool {
        let (w, b) = ((r / 64) as usize, r % 64);
        let was = self.words[w] & (1 << b) != 0;
        if was {
            self.words[w] &= !(1 << b);
            self.dirty -= 1;
        }
        was
    }

    pub fn get(&self, r: u64) -> bool {
        r < self.regions && self.words[(r / 64) as usize] & (1 << (r % 64)) != 0
    }

    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut r = from;
        while r < self.regions {
            let w = self.words[(r / 64) as usize] >> (r % 64);
            if w != 0 {
                let n = r + w.trailing_zeros() as u64;
                return (n < self.regions).then_some(n);
            }
            r = (r / 64 + 1) * 64;
        }
        None
    }

    pub fn count(&self) -> u64 {
        self.dirty
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn from_words(mut words: Vec<u64>, regions: u64) -> Self {
        words.resize(regions.div_ceil(64) as usize, 0);
        let mut b = Bitmap { words, regions, dirty: 0 };
        // Bits past the last region are not regions.
        if !regions.is_multiple_of(64) {
            if let Some(last) = b.words.last_mut() {
                *last &= (1u64 << (regions % 64)) - 1;
            }
        }
        b.dirty = b.words.iter().map(|w| w.count_ones() as u64).sum();
        b
    }
}

/// Regions touched by a byte range.
pub fn region_span(offset: u64, len: u64, region_bytes: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / region_bytes..(offset + len).div_ceil(region_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_basics() {
        let mut b = Bitmap::new(130);
        assert!(b.set(3));
        assert!(!b.set(3));
        assert!(b.set(129));
        assert_eq!(b.count(), 2);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(129));
        assert_eq!(b.next_set(130), None);
        assert!(b.unset(3));
        assert_eq!(b.next_set(0), Some(129));
        let c = Bitmap::from_words(vec![u64::MAX, u64::MAX, u64::MAX], 130);
        assert_eq!(c.count(), 130);
        assert_eq!(region_span(0, 1, 1024), 0..1);
        assert_eq!(region_span(1023, 2, 1024), 0..2);
        assert_eq!(region_span(1024, 1024, 1024), 1..2);
    }
}
