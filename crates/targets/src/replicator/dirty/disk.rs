//! `disk`: a persistent dirty log in a file or block device.
//!
//! The on-disk layout (a header block, then the bitmap in checksummed blocks) is
//! documented where it is encoded, in [`dmrep_formats::dirtylog`]. This module opens,
//! formats and flushes it.
//!
//! On open, a header without the magic means an unformatted log: it is formatted (all
//! dirty for `sync`). A header with the magic that does not decode (damaged, another
//! version, contradictory fields) or that was written for another geometry is an error
//! naming the path and what is wrong, so the table load fails: guessing could forget
//! regions the RD lacks. A bitmap block that does not decode (a torn write) is read as
//! all dirty.
//!
//! Changes are made in memory and remembered by block; [`DirtyLog::flush`] rewrites the
//! changed blocks and syncs (flushes are serialised, so a later flush never writes an
//! older image of a block over a newer one). A crash can only cause extra resync, never
//! a missed region.

use std::io;
use std::path::Path;
use std::sync::Arc;

use dmrep_core::{BlockBackend, Claim, FileBackend};
use dmrep_formats::dirtylog::{
    self, block_offset, decode_block, encode_block, DecodeError, Header, BITS_PER_BLOCK, BLOCK_SIZE, MAGIC,
    WORDS_PER_BLOCK,
};
use parking_lot::Mutex;

use super::{region_span, Bitmap, DirtyLog};

/// Bytes written atomically by a device: the header's first sector, holding the magic,
/// is written last and alone when formatting, so a crash never leaves half a header
/// with the magic.
const SECTOR: usize = 512;

pub struct DiskLog {
    dev: Arc<dyn BlockBackend>,
    bits: Mutex<Bits>,
    /// Serialises flushes (held across their I/O; never taken under `bits`).
    flushing: Mutex<()>,
    region_bytes: u64,
    /// The file's claim (DESIGN 4.9), released when the last user of the log drops it.
    claim: Option<Claim>,
}

/// The bitmap and the blocks changed since the last flush took them.
struct Bits {
    map: Bitmap,
    changed: std::collections::BTreeSet<usize>,
}

impl Bits {
    fn note(&mut self, region: u64) {
        self.changed.insert((region / BITS_PER_BLOCK) as usize);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskLogError {
    #[error("dirty log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("dirty log {path}: needs {need} bytes for {regions} regions, has {have}")]
    TooSmall { path: String, need: u64, have: u64, regions: u64 },
    #[error("dirty log {path}: written for {found_regions} regions of {found_bytes} bytes, the table says {regions} of {region_bytes}")]
    Geometry { path: String, found_regions: u64, found_bytes: u64, regions: u64, region_bytes: u64 },
    /// The header has the magic but does not decode: refused, never reformatted.
    #[error("dirty log {path}: damaged or unsupported header: {source}")]
    Header {
        path: String,
        #[source]
        source: DecodeError,
    },
    /// The table asks for a geometry the format cannot hold (nothing was read or written).
    #[error("dirty log {path}: unusable geometry: {source}")]
    BadGeometry {
        path: String,
        #[source]
        source: DecodeError,
    },
}

/// Bytes a disk dirty log needs for `regions` regions.
pub fn bytes_needed(regions: u64) -> u64 {
    dirtylog::bytes_needed(regions)
}

impl DiskLog {
    /// Open the dirty log at `path`; `initial_dirty` says what a fresh (unformatted)
    /// log starts as (`sync`: all dirty).
    pub fn open(
        path: &str,
        dev_bytes: u64,
        region_bytes: u64,
        initial_dirty: bool,
    ) -> Result<(Self, bool), DiskLogError> {
        let ioe = |e| DiskLogError::Io { path: path.to_string(), source: e };
        let dev: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(Path::new(path)).map_err(ioe)?);
        Self::open_on(dev, path, dev_bytes, region_bytes, initial_dirty)
    }

    /// Open on a given back-end. Returns the log and whether it was freshly formatted.
    pub fn open_on(
        dev: Arc<dyn BlockBackend>,
        path: &str,
        dev_bytes: u64,
        region_bytes: u64,
        initial_dirty: bool,
    ) -> Result<(Self, bool), DiskLogError> {
        let ioe = |e| DiskLogError::Io { path: path.to_string(), source: e };
        // (A zero region size fails validation; `max` only keeps the division defined.)
        let regions = dev_bytes.div_ceil(region_bytes.max(1));
        let want = Header::new(region_bytes, regions);
        want.validate().map_err(|source| DiskLogError::BadGeometry { path: path.to_string(), source })?;
        let need = bytes_needed(regions);
        if dev.size() < need {
            return Err(DiskLogError::TooSmall { path: path.to_string(), need, have: dev.size(), regions });
        }
        let mut h = vec![0u8; BLOCK_SIZE];
        dev.read_at(&mut h, 0).map_err(ioe)?;
        let found = Header::decode(&h).map_err(|source| DiskLogError::Header { path: path.to_string(), source })?;
        let blocks = want.blocks();
        if let Some(found) = found {
            if found.region_bytes != region_bytes || found.regions != regions {
                return Err(DiskLogError::Geometry {
                    path: path.to_string(),
                    found_regions: found.regions,
                    found_bytes: found.region_bytes,
                    regions,
                    region_bytes,
                });
            }
            let mut words = Vec::with_capacity(blocks as usize * WORDS_PER_BLOCK);
            let mut buf = vec![0u8; BLOCK_SIZE];
            for i in 0..blocks {
                dev.read_at(&mut buf, block_offset(i)).map_err(ioe)?;
                match decode_block(&buf, i as u32) {
                    Ok(block) => words.extend_from_slice(&block),
                    Err(e) => {
                        tracing::warn!(path, block = i, error = %e, "dirty log block does not decode: its regions count as dirty");
                        words.extend(std::iter::repeat_n(u64::MAX, WORDS_PER_BLOCK));
                    }
                }
            }
            return Ok((Self::with(dev, Bitmap::from_words(words, regions), region_bytes), false));
        }
        // Fresh: the bitmap first, then the header without its magic, then the sector
        // with the magic that makes it valid (see the format's module documentation).
        let mut bits = Bitmap::new(regions);
        if initial_dirty {
            for r in 0..regions {
                bits.set(r);
            }
        }
        let log = Self::with(dev, bits, region_bytes);
        for i in 0..blocks as usize {
            let block = block_image(&log.bits.lock().map, i);
            log.dev.write_at(&block, block_offset(i as u64)).map_err(ioe)?;
        }
        log.dev.sync().map_err(ioe)?;
        let header = want.encode();
        let mut unsealed = header;
        unsealed[..MAGIC.len()].fill(0);
        log.dev.write_at(&unsealed, 0).map_err(ioe)?;
        log.dev.sync().map_err(ioe)?;
        log.dev.write_at(&header[..SECTOR], 0).map_err(ioe)?;
        log.dev.sync().map_err(ioe)?;
        Ok((log, true))
    }

    fn with(dev: Arc<dyn BlockBackend>, map: Bitmap, region_bytes: u64) -> Self {
        DiskLog {
            dev,
            bits: Mutex::new(Bits { map, changed: Default::default() }),
            flushing: Mutex::new(()),
            region_bytes,
            claim: None,
        }
    }

    /// Hold `claim` (the file's bytes) as long as the log lives.
    pub fn keep_claim(&mut self, claim: Claim) {
        self.claim = Some(claim);
    }
}

/// Bitmap block `i` as it goes on disk.
fn block_image(b: &Bitmap, i: usize) -> [u8; BLOCK_SIZE] {
    let words = b.words();
    let from = (i * WORDS_PER_BLOCK).min(words.len());
    let to = ((i + 1) * WORDS_PER_BLOCK).min(words.len());
    encode_block(i as u32, &words[from..to])
}

impl DirtyLog for DiskLog {
    fn region_bytes(&self) -> u64 {
        self.region_bytes
    }
    fn regions(&self) -> u64 {
        self.bits.lock().map.regions()
    }
    fn mark_range(&self, offset: u64, len: u64) {
        let mut b = self.bits.lock();
        for r in region_span(offset, len, self.region_bytes) {
            if r < b.map.regions() && b.map.set(r) {
                b.note(r);
            }
        }
    }
    fn mark_all(&self) {
        let mut b = self.bits.lock();
        for r in 0..b.map.regions() {
            if b.map.set(r) {
                b.note(r);
            }
        }
    }
    fn clear(&self, region: u64) {
        let mut b = self.bits.lock();
        if region < b.map.regions() && b.map.unset(region) {
            b.note(region);
        }
    }
    fn flush(&self) -> io::Result<()> {
        let _serial = self.flushing.lock();
        // Images of the changed blocks as they are now; the I/O runs without `bits`.
        let blocks: Vec<(usize, [u8; BLOCK_SIZE])> = {
            let mut b = self.bits.lock();
            let changed = std::mem::take(&mut b.changed);
            changed.into_iter().map(|i| (i, block_image(&b.map, i))).collect()
        };
        if blocks.is_empty() {
            return Ok(());
        }
        let result = blocks
            .iter()
            .try_for_each(|(i, buf)| self.dev.write_at(buf, block_offset(*i as u64)))
            .and_then(|()| self.dev.sync());
        if result.is_err() {
            // Not durable: the next flush writes them again.
            self.bits.lock().changed.extend(blocks.iter().map(|(i, _)| *i));
        }
        result
    }
    fn is_dirty(&self, region: u64) -> bool {
        self.bits.lock().map.get(region)
    }
    fn next_dirty(&self, from: u64) -> Option<u64> {
        self.bits.lock().map.next_set(from)
    }
    fn dirty_count(&self) -> u64 {
        self.bits.lock().map.count()
    }
    fn kind(&self) -> &'static str {
        "disk"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmrep_core::fault::{CrashMode, Fault, IoOp, MemBackend, Trigger};

    #[test]
    fn persists_and_survives_a_torn_block() {
        let mem = Arc::new(MemBackend::new(64 << 10));
        let dev_bytes = 40_000 * 4096; // 40000 regions of 4 KiB: two bitmap blocks
        let (log, fresh) = DiskLog::open_on(mem.clone(), "m", dev_bytes, 4096, false).unwrap();
        assert!(fresh);
        assert_eq!(log.dirty_count(), 0);
        log.mark_range(4096 * 5, 8192);
        log.mark_range(4096 * 39_000, 1);
        log.clear(6);
        log.flush().unwrap();
        log.mark_range(4096 * 7, 1); // never flushed: lost in the crash
        drop(log);
        mem.crash(CrashMode::DropAllUnsynced);
        let (log, fresh) = DiskLog::open_on(mem.clone(), "m", dev_bytes, 4096, true).unwrap();
        assert!(!fresh);
        assert_eq!(log.dirty_count(), 2);
        assert!(log.is_dirty(5) && log.is_dirty(39_000) && !log.is_dirty(6));
        // Tear the second bitmap block: its regions all count as dirty, the first's not.
        mem.poke(2 * 4096 + 100, &[0xff; 8]);
        let (log, _) = DiskLog::open_on(mem.clone(), "m", dev_bytes, 4096, false).unwrap();
        assert_eq!(log.next_dirty(0), Some(5));
        assert!(log.is_dirty(BITS_PER_BLOCK) && log.is_dirty(39_999));
        assert_eq!(log.dirty_count(), 1 + (40_000 - BITS_PER_BLOCK));
    }

    #[test]
    fn refuses_other_geometry_and_small_devices() {
        let mem = Arc::new(MemBackend::new(16 << 10));
        DiskLog::open_on(mem.clone(), "m", 1000 * 4096, 4096, true).unwrap();
        assert!(DiskLog::open_on(mem.clone(), "m", 1000 * 4096, 8192, true)
            .err()
            .unwrap()
            .to_string()
            .contains("table says"));
        let tiny = Arc::new(MemBackend::new(4096));
        assert!(DiskLog::open_on(tiny, "t", 1000 * 4096, 4096, true).err().unwrap().to_string().contains("needs"));
    }

    #[test]
    fn fresh_sync_log_is_all_dirty() {
        let mem = Arc::new(MemBackend::new(16 << 10));
        let (log, _) = DiskLog::open_on(mem, "m", 100 * 4096, 4096, true).unwrap();
        assert_eq!(log.dirty_count(), 100);
    }

    #[test]
    fn a_damaged_header_is_refused_not_reformatted() {
        let mem = Arc::new(MemBackend::new(16 << 10));
        let (log, _) = DiskLog::open_on(mem.clone(), "/dev/dl0", 100 * 4096, 4096, false).unwrap();
        log.mark_range(0, 4096);
        log.flush().unwrap();
        drop(log);
        // A flipped bit in the region count: the crc catches it.
        mem.poke(24, &[0x65]);
        let before = mem.current_image();
        let e = DiskLog::open_on(mem.clone(), "/dev/dl0", 100 * 4096, 4096, true).err().unwrap();
        assert!(matches!(e, DiskLogError::Header { source: DecodeError::HeaderCrc { .. }, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("/dev/dl0") && msg.contains("checksum mismatch"), "{msg}");
        assert_eq!(mem.current_image(), before, "a refused log is left as it was");
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let mem = Arc::new(MemBackend::new(16 << 10));
        let mut h = Header::new(4096, 100).encode();
        h[8] = 2;
        let crc = crc32c::crc32c(&h[..4092]);
        h[4092..].copy_from_slice(&crc.to_le_bytes());
        mem.poke(0, &h);
        let e = DiskLog::open_on(mem, "dl", 100 * 4096, 4096, true).err().unwrap();
        assert!(e.to_string().contains("dirty log dl: damaged or unsupported header: format version 2"), "{e}");
    }

    #[test]
    fn an_unformatted_log_is_formatted() {
        // No magic (whatever else the device holds): formatted, not refused.
        let mem = Arc::new(MemBackend::new(16 << 10));
        mem.poke(100, &[0xab; 300]);
        let (log, fresh) = DiskLog::open_on(mem.clone(), "m", 100 * 4096, 4096, true).unwrap();
        assert!(fresh);
        assert_eq!(log.dirty_count(), 100);
        assert_eq!(Header::decode(&mem.durable_image()[..4096]), Ok(Some(Header::new(4096, 100))));
    }

    #[test]
    fn a_region_size_the_format_cannot_hold_is_refused() {
        let mem = Arc::new(MemBackend::new(16 << 10));
        let e = DiskLog::open_on(mem.clone(), "m", 100 * 4096, 3000, true).err().unwrap();
        assert!(matches!(e, DiskLogError::BadGeometry { source: DecodeError::RegionBytes(3000), .. }), "{e}");
        assert_eq!(mem.counters().writes, 0);
    }

    #[test]
    fn a_crash_while_formatting_never_leaves_a_damaged_header() {
        // Power cut with each sync of the format failing, writes torn at random.
        for failing_sync in 0..3 {
            for seed in 0..40 {
                let mem = Arc::new(MemBackend::new(64 << 10));
                mem.faults().fail(IoOp::Sync, Fault::Eio, Trigger::After { skip: failing_sync, count: 1 });
                assert!(DiskLog::open_on(mem.clone(), "m", 40_000 * 4096, 4096, true).is_err());
                mem.faults().clear_all();
                mem.crash(CrashMode::KeepRandomSubset(seed));
                let (log, _) = DiskLog::open_on(mem.clone(), "m", 40_000 * 4096, 4096, true)
                    .unwrap_or_else(|e| panic!("sync {failing_sync} failed, seed {seed}: {e}"));
                assert_eq!(log.dirty_count(), 40_000, "sync {failing_sync}, seed {seed}");
            }
        }
    }
}
