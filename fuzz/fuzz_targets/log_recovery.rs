//! Replication-log recovery (`RingLog::open`) over an in-memory device that holds a real
//! log (wrapped around the ring, several epochs, cursors) patched with fuzz bytes.
//!
//! Input: one flags byte, then patches `[offset u32 LE][len u8][len bytes]` applied to
//! the log image. Flags (so that the checks behind the crcs are reached): bit 0 reseals
//! both superblock slots that have the magic, bit 1 recomputes the data crc of every
//! write record whose header has the entry magic, bit 2 reseals those headers.
//!
//! Properties: open never panics; every recovered entry reads back with its data crc;
//! a log that opened takes a new entry, and opens again with that entry as its last.

#![no_main]

use std::sync::{Arc, OnceLock};

use dmrep_core::fault::MemBackend;
use dmrep_core::BlockBackend;
use dmrep_formats::replog::{ENTRY_HEADER_SIZE, ENTRY_MAGIC, RECORD_ALIGN, RING_OFFSET, SB_MAGIC, SB_SLOT_SIZE};
use dmrep_targets::replicator::log::{EntryKind, NewEntry, RingLog, SlinkSet};
use libfuzzer_sys::fuzz_target;

/// The smallest log (1 MiB): small images keep iterations fast.
const LOG: u64 = 1 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed as usize * 131 + i * 7) as u8).collect()
}

/// A log that has wrapped: about 1.3 ring lengths written (72 rounds of 18944 bytes),
/// the oldest freed by cursors.
fn template() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let mem = Arc::new(MemBackend::new(LOG));
        let log = RingLog::create(mem.clone(), 0, LOG).expect("create");
        log.register_slink(1).expect("register 1");
        log.register_slink(2).expect("register 2");
        let mut n = 0u64;
        for round in 0..72u64 {
            let a = pattern(n, 16 << 10);
            let b = pattern(n + 1, 512);
            let batch = [
                NewEntry {
                    dev_nr: 0,
                    offset: n * 4096,
                    kind: EntryKind::Write,
                    len: a.len() as u32,
                    data: &a,
                    slinks: SlinkSet::from_slinks([1, 2]),
                    origin: None,
                },
                NewEntry {
                    dev_nr: 1,
                    offset: 0,
                    kind: EntryKind::WriteZeroes,
                    len: 8192,
                    data: &[],
                    slinks: SlinkSet::from_slinks([1]),
                    origin: None,
                },
                NewEntry {
                    dev_nr: 0,
                    offset: 512,
                    kind: EntryKind::Write,
                    len: b.len() as u32,
                    data: &b,
                    slinks: SlinkSet::from_slinks([2]),
                    origin: None,
                },
                NewEntry {
                    dev_nr: 2,
                    offset: 0,
                    kind: EntryKind::Discard,
                    len: 4096,
                    data: &[],
                    slinks: SlinkSet::new(),
                    origin: None,
                },
            ];
            let metas = log.append(&batch).expect("append");
            n += 2;
            let last = metas.last().unwrap().seq;
            // SLINK 1 keeps up to 8 entries back, SLINK 2 up to 30.
            if round % 3 == 0 {
                log.set_cursors(&[(1, last.saturating_sub(8)), (2, last.saturating_sub(30))]).expect("cursors");
            }
        }
        drop(log);
        mem.durable_image()
    })
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// crc32c of `b` with the 4 bytes at `at` taken as zero, stored there.
fn seal(b: &mut [u8], at: usize) {
    put_u32(b, at, 0);
    let crc = crc32c::crc32c(b);
    put_u32(b, at, crc);
}

fn reseal(img: &mut [u8], flags: u8) {
    if flags & 1 != 0 {
        for slot in 0..2 {
            let s = &mut img[slot * SB_SLOT_SIZE..(slot + 1) * SB_SLOT_SIZE];
            if s[0..8] == SB_MAGIC {
                seal(s, 12);
            }
        }
    }
    if flags & 6 == 0 {
        return;
    }
    let ring = RING_OFFSET as usize;
    let mut pos = ring;
    while pos + ENTRY_HEADER_SIZE <= img.len() {
        if get_u32(img, pos) == ENTRY_MAGIC {
            let (kind, len) = (img[pos + 6], get_u32(img, pos + 68) as usize);
            let data = pos + ENTRY_HEADER_SIZE;
            if flags & 2 != 0 && kind == 1 && data + len <= img.len() {
                let crc = crc32c::crc32c(&img[data..data + len]);
                put_u32(img, pos + 12, crc);
            }
            if flags & 4 != 0 {
                seal(&mut img[pos..pos + ENTRY_HEADER_SIZE], 8);
            }
        }
        pos += RECORD_ALIGN as usize;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else { return };
    let mut img = template().to_vec();
    while rest.len() >= 5 {
        let off = get_u32(rest, 0) as usize % img.len();
        let len = (rest[4] as usize).min(rest.len() - 5).min(img.len() - off);
        img[off..off + len].copy_from_slice(&rest[5..5 + len]);
        rest = &rest[5 + len..];
    }
    reseal(&mut img, flags);

    let mem = Arc::new(MemBackend::new(LOG));
    mem.poke(0, &img);
    let dev: Arc<dyn BlockBackend> = mem.clone();
    let Ok((log, report)) = RingLog::open(dev.clone(), 0) else { return };
    let entries = log.entries_from(0, usize::MAX);
    assert_eq!(entries.len() as u64, report.entries);
    for e in &entries {
        let mut buf = vec![0u8; if e.kind == EntryKind::Write { e.len as usize } else { 0 }];
        log.read_data(e, &mut buf).unwrap_or_else(|err| panic!("recovered entry {} does not read back: {err}", e.seq));
    }

    let d = pattern(99, 4096);
    let new = NewEntry { dev_nr: 0, offset: 0, kind: EntryKind::Write, len: 4096, data: &d, slinks: SlinkSet::new(), origin: None };
    let Ok(metas) = log.append(&[new]) else { return };
    let seq = metas[0].seq;
    drop(log);
    let (log, report) =
        RingLog::open(dev, 0).unwrap_or_else(|e| panic!("a log that took seq {seq} does not reopen: {e}"));
    assert_eq!(report.next_seq, seq + 1, "the reopened log does not end with the entry just appended");
    if let Some(e) = log.entries_from(seq, 1).first().filter(|e| e.seq == seq) {
        let mut buf = vec![0u8; 4096];
        log.read_data(e, &mut buf).expect("the appended entry reads back");
        assert_eq!(buf, d);
    }
});
