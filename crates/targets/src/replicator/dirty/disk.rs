//! `disk`: a persistent dirty log in a file or block device.
//!
//! Layout (little-endian):
//!
//! ```text
//! header, 4096 bytes at offset 0:
//!   0   magic         b"DMREPDRT"   what this is
//!   8   version       u32 = 1       refuse layouts we do not know
//!   12  flags         u32 = 0
//!   16  region_bytes  u64           must match the table
//!   24  regions       u64           must match the device size
//!   32  bits_per_block u64 = 32704  bits in one bitmap block (4088 bytes)
//!   40  ..4092        zero
//!   4092 crc32c       u32           over the header with this field zeroed
//! bitmap block i, 4096 bytes at offset 4096 * (1 + i):
//!   0    bits         4088 bytes    regions i*32704 .. (LSB first)
//!   4088 block index  u32           catches a block written at the wrong place
//!   4092 crc32c       u32           over bytes 0..4092
//! ```
//!
//! Changes are made in memory and remembered by block; [`DirtyLog::flush`] rewrites the
//! changed blocks and syncs (flushes are serialised, so a later flush never writes an
//! older image of a block over a newer one). A block whose crc does not check (a torn
//! write) is read as all dirty: a crash can only cause extra resync, never a missed
//! region.

use std::io;
use std::path::Path;
use std::sync::Arc;

use dmrep_core::{BlockBackend, Claim, FileBackend};
use parking_lot::Mutex;

use super::{region_span, Bitmap, DirtyLog};

const MAGIC: &[u8; 8] = b"DMREPDRT";
const VERSION: u32 = 1;
const BLOCK: usize = 4096;
/// Bits per bitmap block: 4088 bytes of bits, 8 bytes of index and crc.
const BITS_PER_BLOCK: u64 = 4088 * 8;

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
    #[error("dirty log {path}: format version {0} is newer than this dmrep understands ({VERSION})", .found)]
    Version { path: String, found: u32 },
}

/// Bytes a disk dirty log needs for `regions` regions.
pub fn bytes_needed(regions: u64) -> u64 {
    (1 + regions.div_ceil(BITS_PER_BLOCK)) * BLOCK as u64
}

fn encode_header(region_bytes: u64, regions: u64) -> Vec<u8> {
    let mut h = vec![0u8; BLOCK];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&region_bytes.to_le_bytes());
    h[24..32].copy_from_slice(&regions.to_le_bytes());
    h[32..40].copy_from_slice(&BITS_PER_BLOCK.to_le_bytes());
    let crc = crc32c::crc32c(&h[..4092]);
    h[4092..].copy_from_slice(&crc.to_le_bytes());
    h
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
        let regions = dev_bytes.div_ceil(region_bytes);
        let need = bytes_needed(regions);
        if dev.size() < need {
            return Err(DiskLogError::TooSmall { path: path.to_string(), need, have: dev.size(), regions });
        }
        let mut h = vec![0u8; BLOCK];
        dev.read_at(&mut h, 0).map_err(ioe)?;
        let valid =
            &h[0..8] == MAGIC && u32::from_le_bytes(h[4092..].try_into().unwrap()) == crc32c::crc32c(&h[..4092]);
        let blocks = regions.div_ceil(BITS_PER_BLOCK) as usize;
        if valid {
            let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
            if version > VERSION {
                return Err(DiskLogError::Version { path: path.to_string(), found: version });
            }
            let rb = u64::from_le_bytes(h[16..24].try_into().unwrap());
            let rn = u64::from_le_bytes(h[24..32].try_into().unwrap());
            if rb != region_bytes || rn != regions {
                return Err(DiskLogError::Geometry {
                    path: path.to_string(),
                    found_regions: rn,
                    found_bytes: rb,
                    regions,
                    region_bytes,
                });
            }
            let mut words = vec![0u64; (blocks as u64 * BITS_PER_BLOCK / 64) as usize];
            let mut buf = vec![0u8; BLOCK];
            for i in 0..blocks {
                dev.read_at(&mut buf, ((1 + i) * BLOCK) as u64).map_err(ioe)?;
                let ok = u32::from_le_bytes(buf[4092..].try_into().unwrap()) == crc32c::crc32c(&buf[..4092])
                    && u32::from_le_bytes(buf[4088..4092].try_into().unwrap()) == i as u32;
                let base = i * (BITS_PER_BLOCK as usize / 64);
                for w in 0..(4088 / 8) {
                    words[base + w] = if ok {
                        u64::from_le_bytes(buf[w * 8..w * 8 + 8].try_into().unwrap())
                    } else {
                        tracing::warn!(
                            path,
                            block = i,
                            "dirty log block fails its checksum: its regions count as dirty"
                        );
                        u64::MAX
                    };
                }
            }
            return Ok((Self::with(dev, Bitmap::from_words(words, regions), region_bytes), false));
        }
        // Fresh: write the bitmap first, then the header that makes it valid.
        let mut bits = Bitmap::new(regions);
        if initial_dirty {
            for r in 0..regions {
                bits.set(r);
            }
        }
        let log = Self::with(dev, bits, region_bytes);
        for i in 0..blocks {
            let block = encode_block(&log.bits.lock().map, i);
            log.dev.write_at(&block, ((1 + i) * BLOCK) as u64).map_err(ioe)?;
        }
        log.dev.sync().map_err(ioe)?;
        log.dev.write_at(&encode_header(region_bytes, regions), 0).map_err(ioe)?;
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
fn encode_block(b: &Bitmap, i: usize) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    let per = BITS_PER_BLOCK as usize / 64;
    for w in 0..per {
        let v = b.words().get(i * per + w).copied().unwrap_or(0);
        buf[w * 8..w * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    buf[4088..4092].copy_from_slice(&(i as u32).to_le_bytes());
    let crc = crc32c::crc32c(&buf[..4092]);
    buf[4092..].copy_from_slice(&crc.to_le_bytes());
    buf
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
        let blocks: Vec<(usize, Vec<u8>)> = {
            let mut b = self.bits.lock();
            let changed = std::mem::take(&mut b.changed);
            changed.into_iter().map(|i| (i, encode_block(&b.map, i))).collect()
        };
        if blocks.is_empty() {
            return Ok(());
        }
        let result = blocks
            .iter()
            .try_for_each(|(i, buf)| self.dev.write_at(buf, ((1 + i) * BLOCK) as u64))
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
    use dmrep_core::fault::{CrashMode, MemBackend};

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
}
