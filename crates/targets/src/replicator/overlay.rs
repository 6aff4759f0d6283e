//! Read-your-writes: the entries not yet applied to the LDs (SLINK 0), by device and
//! offset, so that a read of such a range is served from the log.

use std::collections::BTreeMap;

use super::log::EntryMeta;

/// Entries pending on SLINK 0, per device.
#[derive(Default)]
pub struct Overlay {
    /// (dev_nr, offset, seq) -> entry.
    map: BTreeMap<(u32, u64, u64), EntryMeta>,
    /// Largest entry length ever inserted: bounds the backwards search.
    max_len: u64,
}

impl Overlay {
    pub fn insert(&mut self, e: EntryMeta) {
        self.max_len = self.max_len.max(e.len as u64);
        self.map.insert((e.dev_nr, e.offset, e.seq), e);
    }

    pub fn remove(&mut self, e: &EntryMeta) {
        self.map.remove(&(e.dev_nr, e.offset, e.seq));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries of `dev_nr` overlapping `[offset, offset+len)`, in log order.
    pub fn overlapping(&self, dev_nr: u32, offset: u64, len: u64) -> Vec<EntryMeta> {
        let lo = offset.saturating_sub(self.max_len);
        let end = offset + len;
        let mut v: Vec<EntryMeta> = self
            .map
            .range((dev_nr, lo, 0)..(dev_nr, end, 0))
            .filter(|(_, e)| e.offset + e.len as u64 > offset)
            .map(|(_, e)| e.clone())
            .collect();
        v.sort_by_key(|e| e.seq);
        v
    }
}
