//! Read-your-writes: the entries not yet applied to the LDs (SLINK 0), by device and
//! offset, so that a read of such a range is served from the log.

use std::collections::BTreeMap;

use super::log::EntryMeta;

/// Entries pending on SLINK 0, per device.
#[derive(Default)]
pub struct Overlay {
    /// (dev_nr, offset, seq) -> entry.
    map: BTreeMap<(u32, u64, u64), EntryMeta>,
    /// seq -> (dev_nr, offset): what SLINK 0 applies goes in seq order.
    by_seq: BTreeMap<u64, (u32, u64)>,
    /// Largest entry length ever inserted: bounds the backwards search.
    max_len: u64,
}

impl Overlay {
    pub fn insert(&mut self, e: EntryMeta) {
        self.max_len = self.max_len.max(e.len as u64);
        self.by_seq.insert(e.seq, (e.dev_nr, e.offset));
        self.map.insert((e.dev_nr, e.offset, e.seq), e);
    }

    /// Forget every entry up to `seq` (SLINK 0 applied them).
    pub fn remove_through(&mut self, seq: u64) {
        while let Some((&s, &(dev, off))) = self.by_seq.first_key_value() {
            if s > seq {
                break;
            }
            self.by_seq.remove(&s);
            self.map.remove(&(dev, off, s));
        }
    }

    /// The seq of the last entry of device `dev_nr` not yet on its LD.
    pub fn last_seq_of(&self, dev_nr: u32) -> Option<u64> {
        self.map.range((dev_nr, 0, 0)..=(dev_nr, u64::MAX, u64::MAX)).map(|(k, _)| k.2).max()
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
