//! Unit tests of the replication log (the model-based property test is in `proptests`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_core::fault::{CrashMode, Fault, FaultBackend, IoOp, MemBackend, Trigger};
use dmrep_core::{BlockBackend, FileBackend};
use dmrep_formats::replog::{RecordKind, ENTRY_HEADER_SIZE, RING_OFFSET};

use super::*;

/// Smallest allowed log: wraps quickly.
const LOG: u64 = 1 << 20;
const RING: u64 = LOG - RING_OFFSET;

fn mem() -> (Arc<MemBackend>, Arc<dyn BlockBackend>) {
    let m = Arc::new(MemBackend::named("mem0", 2 * LOG));
    let b: Arc<dyn BlockBackend> = m.clone();
    (m, b)
}

/// Deterministic data for entry `id`.
fn pattern(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
}

fn slinks(s: &[u16]) -> SlinkSet {
    SlinkSet::from_slinks(s.iter().copied())
}

fn write<'a>(id: u64, data: &'a [u8], s: &[u16]) -> NewEntry<'a> {
    NewEntry {
        dev_nr: (id % 3) as u32,
        offset: id * 4096,
        kind: EntryKind::Write,
        len: data.len() as u32,
        data,
        slinks: slinks(s),
        origin: None,
    }
}

/// Appends one single-entry batch with data `pattern(id, len)`.
fn put(log: &RingLog, id: u64, len: usize, s: &[u16]) -> Result<EntryMeta, LogError> {
    let d = pattern(id, len);
    Ok(log.append(&[write(id, &d, s)])?.remove(0))
}

fn read(log: &RingLog, e: &EntryMeta) -> Vec<u8> {
    let mut buf = vec![0u8; if e.kind == EntryKind::Write { e.len as usize } else { 0 }];
    log.read_data(e, &mut buf).unwrap();
    buf
}

/// Every live entry's id (offset / 4096), checking its data.
fn live_ids(log: &RingLog) -> Vec<u64> {
    log.entries_from(0, usize::MAX)
        .iter()
        .map(|e| {
            let id = e.offset / 4096;
            if e.kind == EntryKind::Write {
                assert_eq!(read(log, e), pattern(id, e.len as usize), "data of seq {}", e.seq);
            }
            id
        })
        .collect()
}

#[test]
fn create_open_roundtrip() {
    let (_m, b) = mem();
    let log = RingLog::create(b.clone(), 4096, LOG).unwrap();
    log.register_slink(0).unwrap();
    log.register_slink(3).unwrap();
    let d1 = pattern(1, 5000);
    let d2 = pattern(2, 512);
    let metas = log
        .append(&[
            write(1, &d1, &[0, 3]),
            write(2, &d2, &[0]),
            NewEntry {
                dev_nr: 1,
                offset: 3 * 4096,
                kind: EntryKind::WriteZeroes,
                len: 8192,
                data: &[],
                slinks: slinks(&[3]),
                origin: None,
            },
            NewEntry {
                dev_nr: 2,
                offset: 4 * 4096,
                kind: EntryKind::Discard,
                len: 1 << 20,
                data: &[],
                slinks: slinks(&[0]),
                origin: None,
            },
        ])
        .unwrap();
    assert_eq!(metas.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert!(metas.iter().all(|e| e.epoch == metas[0].epoch));
    let e2 = put(&log, 5, 100, &[0, 3]).unwrap();
    assert!(e2.epoch > metas[0].epoch);
    log.set_cursors(&[(0, 2)]).unwrap();
    let uuid = log.uuid();
    let before = log.entries_from(0, 100);
    drop(log);

    let (log, report) = RingLog::open(b.clone(), 4096).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!((report.entries, report.first_seq, report.next_seq, report.incarnation), (5, 1, 6, 2));
    assert_eq!(log.uuid(), uuid);
    assert_eq!(log.entries_from(0, 100), before);
    assert_eq!(log.cursor(0), Some(2));
    assert_eq!(log.cursor(3), Some(0));
    assert_eq!(live_ids(&log), vec![1, 2, 3, 4, 5]);
    assert_eq!(log.entries_from(4, 1).iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
    let st = log.stats();
    assert_eq!(st.slinks[0], SlinkStats { slink: 0, cursor: 2, pending_entries: 2, pending_bytes: (1 << 20) + 100 });
    assert_eq!(st.slinks[1], SlinkStats { slink: 3, cursor: 0, pending_entries: 3, pending_bytes: 5000 + 8192 + 100 });
    // Appends go on after the recovered tail.
    assert_eq!(put(&log, 6, 10, &[0]).unwrap().seq, 6);
    // open_or_create finds the existing log; the size on disk wins.
    drop(log);
    let (log, report) = RingLog::open_or_create(b, 4096, 2 * LOG - 4096).unwrap();
    assert!(report.is_some());
    assert_eq!(log.stats().size, LOG);
}

#[test]
fn geometry_is_checked() {
    let (_m, b) = mem();
    for (start, size) in [(100, LOG), (0, LOG + 100), (0, LOG / 2), (LOG + 4096, LOG)] {
        assert!(matches!(RingLog::create(b.clone(), start, size), Err(LogError::Geometry { .. })), "{start}+{size}");
    }
}

#[test]
fn wrap_around_many_laps() {
    let (m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    // 100 KiB entries in a ~1 MiB ring: a wrap every 10 entries. Keep 5 live.
    let mut id = 0;
    let mut saw_wrap = false;
    for _ in 0..60 {
        id += 1;
        let e = put(&log, id, 100 * 1024 + 17, &[0]).unwrap();
        if e.seq > 5 {
            log.set_cursors(&[(0, e.seq - 5)]).unwrap();
        }
        let dump = inspect(&*b, 0).unwrap();
        saw_wrap |= dump.records.iter().any(|r| r.kind == RecordKind::Wrap);
        assert!(dump.is_clean(), "{dump}");
    }
    assert!(saw_wrap);
    assert_eq!(live_ids(&log), (56..=60).collect::<Vec<_>>());
    drop(log);
    m.crash(CrashMode::DropAllUnsynced);
    let (log, report) = RingLog::open(b, 0).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(live_ids(&log), (56..=60).collect::<Vec<_>>());
}

#[test]
fn full_and_too_large() {
    let (m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(1).unwrap();
    let max = log.max_entry_data();
    assert_eq!(max, RING - ENTRY_HEADER_SIZE as u64);
    let big = vec![0u8; max as usize + 1];
    assert!(matches!(log.append(&[write(0, &big, &[1])]), Err(LogError::TooLarge { index: 0, .. })));
    let half = vec![0u8; (RING / 2) as usize];
    assert!(matches!(log.append(&[write(0, &half, &[1]), write(1, &half, &[1])]), Err(LogError::BatchTooLarge { .. })));
    // Fill with 64 KiB entries until full.
    let mut n = 0;
    let err = loop {
        match put(&log, n, 64 * 1024, &[1]) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
    };
    let LogError::Full { needed, free } = err else { panic!("{err}") };
    assert_eq!(needed, 512 + 64 * 1024);
    assert!(free < needed);
    assert_eq!(n, RING / (512 + 64 * 1024));
    // Full writes nothing.
    let before = m.counters();
    assert!(matches!(put(&log, 99, 64 * 1024, &[1]), Err(LogError::Full { .. })));
    assert_eq!(m.counters().bytes_written, before.bytes_written);
    // Freeing the first entry makes room for one more.
    log.set_cursors(&[(1, 1)]).unwrap();
    assert_eq!(put(&log, n, 64 * 1024, &[1]).unwrap().seq, n + 1);
    // Drain everything: the log is empty with its head mid-ring; the largest entry still
    // fits (the head moves to the ring start).
    log.set_cursors(&[(1, n + 1)]).unwrap();
    assert_eq!(log.stats().entries, 0);
    let huge = pattern(500, max as usize);
    let e = log.append(&[write(500, &huge, &[1])]).unwrap().remove(0);
    assert_eq!(e.ring_pos(), 0);
    assert_eq!(log.stats().free_bytes, 0);
    assert_eq!(read(&log, &e), huge);
    drop(log);
    let (log, _) = RingLog::open(b, 0).unwrap();
    assert_eq!(live_ids(&log), vec![500]);
}

#[test]
fn entries_nobody_needs_are_freed_when_space_runs_out() {
    let (_m, b) = mem();
    let log = RingLog::create(b, 0, LOG).unwrap();
    // No SLINK registered: nothing waits; the head advances on demand.
    for i in 0..100 {
        put(&log, i, 64 * 1024, &[0, 1]).unwrap();
    }
    assert!(log.stats().entries < 20);
}

#[test]
fn head_advances_only_when_every_slink_of_an_entry_passed_it() {
    let (_m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    for s in [0, 1, 2] {
        log.register_slink(s).unwrap();
    }
    put(&log, 1, 1000, &[0, 1]).unwrap(); // seq 1
    put(&log, 2, 1000, &[0]).unwrap(); // seq 2
    put(&log, 3, 1000, &[1, 2]).unwrap(); // seq 3
    put(&log, 4, 1000, &[]).unwrap(); // seq 4: nobody needs it
    let head = || log.stats().head_seq;
    log.set_cursors(&[(0, 4)]).unwrap();
    assert_eq!(head(), 1, "slink 1 still needs seq 1");
    log.set_cursors(&[(1, 1)]).unwrap();
    assert_eq!(head(), 3, "seq 2 only needed slink 0");
    log.set_cursors(&[(1, 3)]).unwrap();
    assert_eq!(head(), 3, "slink 2 still needs seq 3");
    assert_eq!(log.slink_stats(2), Some(SlinkStats { slink: 2, cursor: 0, pending_entries: 1, pending_bytes: 1000 }));
    // Unregistering slink 2 releases seq 3, and seq 4 needs nobody.
    log.unregister_slink(2).unwrap();
    assert_eq!(head(), 5);
    assert_eq!(log.stats().used_bytes, 0);
    assert_eq!(log.cursor(2), None);
    // Registered later: needs nothing old.
    put(&log, 5, 1000, &[2]).unwrap();
    log.register_slink(2).unwrap();
    assert_eq!(log.cursor(2), Some(5));
    assert_eq!(log.slink_stats(2).unwrap().pending_entries, 0);
    // Re-registering keeps the cursor.
    log.register_slink(0).unwrap();
    assert_eq!(log.cursor(0), Some(4));
    // The head is durable.
    drop(log);
    let (log, _) = RingLog::open(b, 0).unwrap();
    // Seq 5 only needed slink 2, registered after it: done, passed.
    assert_eq!(log.stats().head_seq, 6);
    assert_eq!((log.cursor(0), log.cursor(1), log.cursor(2)), (Some(4), Some(3), Some(5)));
}

#[test]
fn cursor_and_slink_errors() {
    let (_m, b) = mem();
    let log = RingLog::create(b, 0, LOG).unwrap();
    log.register_slink(1).unwrap();
    put(&log, 1, 10, &[1]).unwrap();
    put(&log, 2, 10, &[1]).unwrap();
    assert!(matches!(log.set_cursors(&[(7, 1)]), Err(LogError::UnknownSlink(7))));
    assert!(matches!(log.set_cursors(&[(1, 3)]), Err(LogError::CursorBeyondTail { slink: 1, seq: 3, last: 2 })));
    log.set_cursors(&[(1, 2)]).unwrap();
    assert!(matches!(log.set_cursors(&[(1, 1)]), Err(LogError::CursorBackwards { .. })));
    assert!(matches!(log.register_slink(2048), Err(LogError::SlinkOutOfRange(2048))));
    for s in 2..257 {
        log.register_slink(s).unwrap();
    }
    assert!(matches!(log.register_slink(300), Err(LogError::TooManySlinks { .. })));
    let e = log.entries_from(0, 1);
    assert!(e.is_empty(), "head passed both entries");
}

#[test]
fn read_data_checks() {
    let (_m, b) = mem();
    let log = RingLog::create(b, 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    let e = put(&log, 1, 1000, &[0]).unwrap();
    assert!(matches!(log.read_data(&e, &mut [0u8; 999]), Err(LogError::BufferSize { .. })));
    let mut lie = e.clone();
    lie.data_crc ^= 1;
    assert!(matches!(log.read_data(&lie, &mut [0u8; 1000]), Err(LogError::DataCrc { seq: 1, .. })));
    log.set_cursors(&[(0, 1)]).unwrap();
    assert!(matches!(log.read_data(&e, &mut [0u8; 1000]), Err(LogError::NotLive { seq: 1, head_seq: 2 })));
    let bad = NewEntry {
        dev_nr: 0,
        offset: 0,
        kind: EntryKind::Write,
        len: 10,
        data: &[1, 2],
        slinks: slinks(&[0]),
        origin: None,
    };
    assert!(matches!(log.append(&[bad]), Err(LogError::BadEntry { index: 0, .. })));
    let bad = NewEntry { kind: EntryKind::Discard, len: 2, ..bad };
    assert!(matches!(log.append(&[bad]), Err(LogError::BadEntry { .. })));
}

/// Offset of superblock slot `i` of a log at 0.
fn slot(i: u64) -> u64 {
    i * 4096
}

#[test]
fn superblock_slot_corrupted_falls_back_to_the_other() {
    for corrupt in [0, 1] {
        let (m, b) = mem();
        let log = RingLog::create(b.clone(), 0, LOG).unwrap();
        log.register_slink(0).unwrap();
        put(&log, 1, 100, &[0]).unwrap();
        put(&log, 2, 100, &[0]).unwrap();
        log.set_cursors(&[(0, 1)]).unwrap();
        drop(log);
        m.poke(slot(corrupt) + 200, &[0xff; 8]);
        let (log, report) = RingLog::open(b.clone(), 0).unwrap();
        assert_eq!(report.truncated, None);
        // Whichever slot survived, entry 2 is live and slink 0 is registered.
        assert!(live_ids(&log).contains(&2));
        assert!(log.cursor(0).is_some());
        let dump = inspect(&*b, 0).unwrap();
        assert!(dump.slots.iter().filter(|s| s.error.is_none()).count() >= 1);
    }
}

#[test]
fn torn_superblock_write_keeps_the_previous_one() {
    let mut fell_back = 0;
    for seed in 0..24 {
        let (m, b) = mem();
        let log = RingLog::create(b.clone(), 0, LOG).unwrap();
        // 100 SLINKs: SLINK 99's cursor row lies in the slot's third sector, so a torn
        // write can mix sectors of two superblocks.
        for s in 0..100 {
            log.register_slink(s).unwrap();
        }
        for i in 1..=3 {
            put(&log, i, 700, &[99]).unwrap();
        }
        log.set_cursors(&[(99, 1)]).unwrap();
        m.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Next(1));
        assert!(log.set_cursors(&[(99, 2)]).is_err());
        assert_eq!(log.cursor(99), Some(1), "a failed update is not installed");
        drop(log);
        m.crash(CrashMode::KeepRandomSubset(seed));
        fell_back += inspect(&*b, 0).unwrap().slots.iter().filter(|s| s.error.is_some()).count();
        let (log, report) = RingLog::open(b, 0).unwrap();
        assert_eq!(report.truncated, None);
        let c = log.cursor(99).unwrap();
        assert!(c == 1 || c == 2, "cursor {c}");
        assert_eq!(live_ids(&log), (c + 1..=3).collect::<Vec<_>>());
    }
    assert!(fell_back > 0, "no seed tore the superblock");
}

#[test]
fn both_superblocks_corrupt() {
    let (m, b) = mem();
    let log = RingLog::create(b.clone(), 8192, LOG).unwrap();
    put(&log, 1, 100, &[]).unwrap();
    let old_uuid = log.uuid();
    drop(log);
    m.poke(8192 + 100, &[1]);
    m.poke(8192 + 4096, b"DMREPLOG\x01\0\0\0garbage");
    let err = RingLog::open(b.clone(), 8192).err().unwrap();
    assert!(matches!(err, LogError::NoSuperblock { .. }));
    let msg = err.to_string();
    assert!(msg.starts_with("no valid dmrep log superblock at mem0+8192"), "{msg}");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    let dump = inspect(&*b, 8192).unwrap();
    assert!(!dump.is_clean() && dump.error.is_some());
    assert!(dump.to_string().contains("no usable log"));
    // `auto` never overwrites a damaged log (its entries may be acknowledged writes);
    // `create` does, when asked.
    let err = RingLog::open_or_create(b.clone(), 8192, LOG).err().expect("a damaged log is refused");
    assert!(matches!(err, LogError::NoSuperblock { .. }), "{err}");
    let log = RingLog::create(b, 8192, LOG).unwrap();
    assert_ne!(log.uuid(), old_uuid);
    assert_eq!(log.stats().entries, 0);
}

#[test]
fn newer_format_version_is_refused() {
    let (m, b) = mem();
    drop(RingLog::create(b.clone(), 0, LOG).unwrap());
    m.poke(8, &5u32.to_le_bytes());
    for r in [RingLog::open(b.clone(), 0).err(), RingLog::open_or_create(b.clone(), 0, LOG).err()] {
        let err = r.expect("must be refused");
        assert!(matches!(err, LogError::NewerVersion { found: 5, supported: 4, .. }), "{err}");
        assert!(err.to_string().contains("has format version 5; this build supports versions up to 4"));
    }
}

/// Acked batches, then one whose sync fails, then a power cut keeping a random subset
/// of the unsynced writes: recovery gives the acked prefix, plus the failed batch whole
/// or not at all.
#[test]
fn torn_tail_recovers_to_a_prefix() {
    let mut truncated_seen = 0;
    for seed in 0..64u64 {
        let (m, b) = mem();
        let log = RingLog::create(b.clone(), 0, LOG).unwrap();
        log.register_slink(0).unwrap();
        for i in 1..=4 {
            put(&log, i, 3000, &[0]).unwrap();
        }
        let data: Vec<Vec<u8>> = (5..=8).map(|i| pattern(i, 5000 + i as usize)).collect();
        let batch: Vec<NewEntry<'_>> = data.iter().zip(5..).map(|(d, i)| write(i, d, &[0])).collect();
        m.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Next(1));
        assert!(log.append(&batch).is_err());
        drop(log);
        // Keep the scrub out of the crash so the batch's own writes are what is judged.
        m.crash(CrashMode::KeepRandomSubset(seed));
        let (log, report) = RingLog::open(b, 0).unwrap();
        let ids = live_ids(&log);
        assert!(ids == vec![1, 2, 3, 4] || ids == (1..=8).collect::<Vec<_>>(), "seed {seed}: {ids:?}");
        assert_eq!(report.next_seq, ids.len() as u64 + 1);
        if let Some(t) = &report.truncated {
            truncated_seen += 1;
            assert!(t.contains("ring offset"), "{t}");
        }
        put(&log, 100, 10, &[0]).unwrap();
    }
    assert!(truncated_seen > 0);
}

#[test]
fn corrupt_data_truncates_to_the_last_good_prefix() {
    let (m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    let metas: Vec<EntryMeta> = (1..=6).map(|i| put(&log, i, 2000, &[0]).unwrap()).collect();
    drop(log);
    // Damage the data of seq 5: seq 5 and 6 are lost, 1..=4 kept.
    m.poke(RING_OFFSET + metas[4].ring_pos() + 512 + 100, &[0xee; 3]);
    let dump = inspect(&*b, 0).unwrap();
    assert!(!dump.is_clean());
    assert!(dump.stop.as_ref().unwrap().corrupt);
    let (log, report) = RingLog::open(b.clone(), 0).unwrap();
    let t = report.truncated.expect("truncation reported");
    assert_eq!(t, format!("ring offset {}: data crc mismatch (seq 5)", metas[4].ring_pos()));
    assert_eq!(live_ids(&log), vec![1, 2, 3, 4]);
    assert_eq!(report.next_seq, 5);
    // A damaged header is reported too.
    put(&log, 50, 10, &[0]).unwrap();
    drop(log);
    m.poke(RING_OFFSET + metas[1].ring_pos() + 40, &[1]);
    let (log, report) = RingLog::open(b, 0).unwrap();
    assert!(report.truncated.unwrap().contains("header crc mismatch"));
    assert_eq!(live_ids(&log), vec![1]);
}

#[test]
fn a_cursor_beyond_the_recovered_log_is_reported() {
    let (m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    log.register_slink(1).unwrap();
    let metas: Vec<EntryMeta> = (1..=5).map(|i| put(&log, i, 600, &[0, 1]).unwrap()).collect();
    log.set_cursors(&[(1, 5)]).unwrap();
    drop(log);
    m.poke(RING_OFFSET + metas[2].ring_pos() + 512, &[0xaa; 8]);
    let (log, report) = RingLog::open(b, 0).unwrap();
    assert_eq!(report.slinks_ahead, vec![(1, 5)]);
    assert_eq!(log.cursor(1), Some(2));
    assert_eq!(put(&log, 9, 10, &[0, 1]).unwrap().seq, 3);
}

/// The incarnation case: after a truncation at N, a new N of the same size lands where
/// the old N was; the old N+1 behind it, intact on disk, must never come back.
#[test]
fn stale_entries_are_never_resurrected() {
    for advance_head in [false, true] {
        let (m, b) = mem();
        let log = RingLog::create(b.clone(), 0, LOG).unwrap();
        log.register_slink(0).unwrap();
        let metas: Vec<EntryMeta> = (1..=7).map(|i| put(&log, i, 1500, &[0]).unwrap()).collect();
        drop(log);
        // Damage seq 6: recovery truncates at 6; seq 7 stays on disk, intact.
        m.poke(RING_OFFSET + metas[5].ring_pos() + 600, &[0; 1]);
        m.poke(RING_OFFSET + metas[5].ring_pos() + 601, &[0xff; 1]);
        let (log, report) = RingLog::open(b.clone(), 0).unwrap();
        assert!(report.truncated.is_some());
        assert_eq!(live_ids(&log), vec![1, 2, 3, 4, 5]);
        // A new seq 6 of the same size, at the same place.
        let e = put(&log, 60, 1500, &[0]).unwrap();
        assert_eq!((e.seq, e.ring_pos()), (6, metas[5].ring_pos()));
        if advance_head {
            // The head then points exactly at the old seq 7.
            log.set_cursors(&[(0, 6)]).unwrap();
        }
        drop(log);
        m.crash(CrashMode::DropAllUnsynced);
        let (log, report) = RingLog::open(b.clone(), 0).unwrap();
        let ids = live_ids(&log);
        let want: Vec<u64> = if advance_head { vec![] } else { vec![1, 2, 3, 4, 5, 60] };
        assert_eq!(ids, want, "advance_head {advance_head}");
        assert_eq!(report.next_seq, 7);
        assert_eq!(report.truncated, None, "a stale entry is the normal end");
        let dump = inspect(&*b, 0).unwrap();
        assert!(dump.stop.unwrap().reason.contains("stale"));
    }
}

#[test]
fn a_failed_append_never_survives_a_later_sync() {
    for fail in [IoOp::Write, IoOp::Sync] {
        let (m, b) = mem();
        let log = RingLog::create(b.clone(), 0, LOG).unwrap();
        log.register_slink(0).unwrap();
        put(&log, 1, 100, &[0]).unwrap();
        m.faults().fail(fail, Fault::Eio, Trigger::Next(1));
        let err = put(&log, 2, 100, &[0]).unwrap_err();
        let LogError::Io { source, .. } = &err else { panic!("{err}") };
        assert_eq!(source.raw_os_error(), Some(5));
        log.sync().unwrap();
        drop(log);
        m.crash(CrashMode::KeepAll);
        let (log, _) = RingLog::open(b.clone(), 0).unwrap();
        assert_eq!(live_ids(&log), vec![1], "{fail:?}");
        // And a later append takes its seq.
        assert_eq!(put(&log, 3, 100, &[0]).unwrap().seq, 2);
        drop(log);
        m.crash(CrashMode::KeepAll);
        let (log, _) = RingLog::open(b, 0).unwrap();
        assert_eq!(live_ids(&log), vec![1, 3]);
    }
}

#[test]
fn file_backed_log_with_enospc() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("replog");
    std::fs::write(&p, vec![0u8; 4 << 20]).unwrap();
    let fb = Arc::new(FaultBackend::new(FileBackend::open(&p).unwrap()));
    let b: Arc<dyn BlockBackend> = fb.clone();
    let (log, report) = RingLog::open_or_create(b.clone(), 1 << 20, 2 << 20).unwrap();
    assert!(report.is_none());
    log.register_slink(0).unwrap();
    // Many entries in one batch: more iovecs than one pwritev takes.
    let data: Vec<Vec<u8>> = (0..700).map(|i| pattern(i, 100 + i as usize)).collect();
    let batch: Vec<NewEntry<'_>> = data.iter().zip(0..).map(|(d, i)| write(i, d, &[0])).collect();
    log.append(&batch).unwrap();
    fb.faults().fail(IoOp::Write, Fault::Enospc, Trigger::Next(1));
    let err = put(&log, 1000, 10, &[0]).unwrap_err();
    let LogError::Io { source, what, .. } = &err else { panic!("{err}") };
    assert_eq!((source.raw_os_error(), *what), (Some(28), "writing log entries"));
    assert!(std::error::Error::source(&err).is_some());
    drop(log);
    let (log, report) = RingLog::open(b, 1 << 20).unwrap();
    assert_eq!(report.truncated, None);
    assert_eq!(live_ids(&log), (0..700).collect::<Vec<_>>());
}

/// Creating a log on a file system that fills up (ENOSPC while the ring is pre-written)
/// fails with the OS error and gives the space it took back: the file is as sparse as
/// before, with no superblock.
#[test]
fn a_failed_create_gives_its_space_back() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("replog");
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    let fb = Arc::new(FaultBackend::new(FileBackend::open(&p).unwrap()));
    // Two 1 MiB chunks of the ring are written, the third finds the file system full.
    fb.faults().fail(IoOp::Write, Fault::Enospc, Trigger::After { skip: 2, count: 1 });
    let b: Arc<dyn BlockBackend> = fb.clone();
    let err = RingLog::create(b.clone(), 0, 8 << 20).err().expect("create fails");
    let LogError::Io { source, what, .. } = &err else { panic!("{err}") };
    assert_eq!((source.raw_os_error(), *what), (Some(28), "pre-writing the new log"));
    assert_eq!(
        dmrep_core::errors::with_causes(&err),
        format!("{err}: No space left on device (ENOSPC)"),
        "the cause, by name, for the one-line report"
    );
    assert_eq!(std::fs::metadata(&p).unwrap().blocks(), 0, "the pre-written ring was given back");
    assert!(matches!(RingLog::open(b, 0), Err(LogError::NoSuperblock { .. })));
}

#[test]
fn inspect_dump_shows_everything() {
    let (_m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    log.register_slink(5).unwrap();
    let d = pattern(1, 300);
    log.append(&[
        write(1, &d, &[0, 5]),
        NewEntry {
            dev_nr: 2,
            offset: 1 << 30,
            kind: EntryKind::Discard,
            len: 4096,
            data: &[],
            slinks: slinks(&[5]),
            origin: None,
        },
    ])
    .unwrap();
    log.set_cursors(&[(0, 1)]).unwrap();
    let dump = inspect(&*b, 0).unwrap();
    assert!(dump.is_clean());
    assert_eq!(dump.entries, 2);
    assert_eq!(
        dump.active_slot.map(|s| dump.slots[s].superblock.as_ref().unwrap().cursors.clone()),
        Some(vec![(0, 1), (5, 0)])
    );
    let text = dump.to_string();
    for want in ["superblock A", "superblock B", "[active]", "discard", "0,5", "slink 5 = 0", "clean"] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let json = serde_json::to_value(&dump).unwrap();
    assert_eq!(json["records"][0]["slinks"], serde_json::json!([0, 5]));
    assert_eq!(json["records"][1]["kind"], "discard");
    assert_eq!(json["stop"]["corrupt"], false);
}

/// One appender, two copiers reading and setting cursors concurrently; the appender
/// waits when the log is full. Deadline-based: a deadlock fails the test.
#[test]
fn concurrent_appender_and_copiers() {
    const BATCHES: u64 = 300;
    let (_m, b) = mem();
    let log = Arc::new(RingLog::create(b, 0, LOG).unwrap());
    log.register_slink(1).unwrap();
    log.register_slink(2).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded::<Result<&'static str, String>>();
    let deadline = Instant::now() + Duration::from_secs(60);

    {
        let (log, tx, stop) = (log.clone(), tx.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut id = 0u64;
            for n in 0..BATCHES {
                let data: Vec<Vec<u8>> =
                    (0..1 + n % 4).map(|k| pattern(id + k, 1000 + ((n * 997 + k * 13) % 30000) as usize)).collect();
                let batch: Vec<NewEntry<'_>> =
                    data.iter().zip(id..).map(|(d, i)| write(i, d, &[1, 2][..1 + (i % 2) as usize])).collect();
                loop {
                    match log.append(&batch) {
                        Ok(_) => break,
                        Err(LogError::Full { .. }) if Instant::now() < deadline && !stop.load(Ordering::Relaxed) => {
                            std::thread::yield_now()
                        }
                        Err(e) => {
                            let _ = tx.send(Err(format!("append: {e}")));
                            return;
                        }
                    }
                }
                id += batch.len() as u64;
            }
            let _ = tx.send(Ok("appender"));
        });
    }
    for slink in [1u16, 2] {
        let (log, tx, stop) = (log.clone(), tx.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut cursor = log.cursor(slink).unwrap();
            let mut applied = 0u64;
            loop {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    let _ = tx.send(Err(format!("copier {slink}: timed out at cursor {cursor}")));
                    return;
                }
                let finished = appender_done(&log);
                let batch = log.entries_from(cursor + 1, 8);
                if batch.is_empty() {
                    if finished {
                        // Nothing after our cursor, and nothing more will come.
                        let _ = tx.send(if applied > 0 { Ok("copier") } else { Err(format!("copier {slink} idle")) });
                        return;
                    }
                    std::thread::yield_now();
                    continue;
                }
                for e in &batch {
                    // Entries this SLINK does not need may be gone already.
                    if e.seq <= cursor {
                        let _ = tx.send(Err(format!("copier {slink}: seq {} after cursor {cursor}", e.seq)));
                        return;
                    }
                    if e.slinks.contains(slink) {
                        let mut buf = vec![0u8; e.len as usize];
                        if let Err(err) = log.read_data(e, &mut buf) {
                            let _ = tx.send(Err(format!("copier {slink}: {err}")));
                            return;
                        }
                        if buf != pattern(e.offset / 4096, e.len as usize) {
                            let _ = tx.send(Err(format!("copier {slink}: data mismatch at seq {}", e.seq)));
                            return;
                        }
                        applied += 1;
                    }
                    cursor = e.seq;
                }
                if let Err(err) = log.set_cursors(&[(slink, cursor)]) {
                    let _ = tx.send(Err(format!("copier {slink}: {err}")));
                    return;
                }
            }
        });
    }
    // The copiers finish once the appender has and they caught up.
    fn appender_done(log: &RingLog) -> bool {
        log.stats().next_seq > expected_entries()
    }
    fn expected_entries() -> u64 {
        (0..BATCHES).map(|n| 1 + n % 4).sum()
    }
    let mut done = Vec::new();
    while done.len() < 3 {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(who)) => done.push(who),
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                panic!("{e}");
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                panic!("deadline passed: deadlock or livelock (finished: {done:?})");
            }
        }
    }
    let st = log.stats();
    assert_eq!(st.next_seq, expected_entries() + 1);
    assert_eq!(st.entries, 0);
    assert!(st.slinks.iter().all(|s| s.pending_entries == 0 && s.pending_bytes == 0), "{:?}", st.slinks);
}

/// A batch whose sync failed, followed (no crash) by a smaller batch at the same place:
/// the failed batch's later records, intact behind it and with the right seqs, belong to
/// an older epoch and must not be taken for the log's continuation.
#[test]
fn leftovers_of_a_failed_batch_behind_a_newer_one_are_ignored() {
    let (m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    put(&log, 1, 100, &[0]).unwrap();
    let (d2, d3) = (pattern(2, 4096), pattern(3, 4096));
    m.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Next(1));
    assert!(log.append(&[write(2, &d2, &[0]), write(3, &d3, &[0])]).is_err());
    // Same size as the failed batch's first entry: seq 3 of the failed batch sits right
    // behind it with the seq the walk expects next.
    let e = put(&log, 20, 4096, &[0]).unwrap();
    assert_eq!(e.seq, 2);
    drop(log);
    m.crash(CrashMode::KeepAll);
    let (log, report) = RingLog::open(b, 0).unwrap();
    assert_eq!(live_ids(&log), vec![1, 20]);
    assert_eq!(report.truncated, None);
}

/// A secondary's log: received entries keep the primary's seq and time across a reopen;
/// the role, group and generation are durable; what it received survives the log
/// emptying (the origin floor); an origin that does not grow is refused.
#[test]
fn origins_and_site_state_survive_reopen() {
    use dmrep_formats::replog::SiteRole;
    let (_m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    assert_eq!(log.site().role, SiteRole::Primary);
    assert_eq!(log.site().group_uuid, log.uuid(), "a new log names its own group");
    log.set_site(|s| {
        s.role = SiteRole::Secondary;
        s.group_uuid = [9; 16];
        s.lineage = s.lineage.promoted(7, 1).promoted(8, 1).promoted(9, 1);
    })
    .unwrap();
    log.register_slink(0).unwrap();
    let d = pattern(1, 4096);
    let mut e = write(1, &d, &[0]);
    e.origin = Some(Origin { seq: 500, time_us: 1_700_000_000_000_000 });
    let mut e2 = write(2, &d, &[0]);
    e2.origin = Some(Origin { seq: 503, time_us: 1_700_000_000_000_100 });
    let metas = log.append(&[e, e2]).unwrap();
    assert_eq!((metas[0].seq, metas[0].origin_seq, metas[1].origin_seq), (1, 500, 503));
    assert_eq!(log.received(), 503);
    let mut stale = write(3, &d, &[0]);
    stale.origin = Some(Origin { seq: 503, time_us: 0 });
    assert!(matches!(log.append(&[stale]), Err(LogError::BadEntry { .. })), "a duplicate origin is refused");
    drop(log);

    let (log, _) = RingLog::open(b.clone(), 0).unwrap();
    let site = log.site();
    assert_eq!((site.role, site.group_uuid, site.generation()), (SiteRole::Secondary, [9; 16], 4));
    let metas = log.entries_from(0, 10);
    assert_eq!(
        metas.iter().map(|m| (m.origin_seq, m.origin_time_us)).collect::<Vec<_>>(),
        vec![(500, 1_700_000_000_000_000), (503, 1_700_000_000_000_100)]
    );
    assert_eq!(log.received(), 503);
    // Applied and dropped: the log is empty but still knows what it received.
    log.set_cursors(&[(0, 2)]).unwrap();
    assert!(log.entries_from(0, 10).is_empty());
    drop(log);
    let (log, _) = RingLog::open(b.clone(), 0).unwrap();
    assert_eq!(log.received(), 503);
    // A primary's own entries: origin = seq, time = now.
    let d = pattern(9, 512);
    let log2 = RingLog::create(Arc::new(MemBackend::new(LOG)), 0, LOG).unwrap();
    let m = log2.append(&[write(9, &d, &[])]).unwrap().remove(0);
    assert_eq!(m.origin_seq, m.seq);
    assert!(m.origin_time_us > 1_700_000_000_000_000);
}

/// A site promoted to primary numbers its application's writes on from the history seq
/// it had received (the group's history goes on across sites), durably; a history can
/// start over only from an empty log.
#[test]
fn application_writes_continue_the_history_the_site_received() {
    let (_m, b) = mem();
    let log = RingLog::create(b.clone(), 0, LOG).unwrap();
    log.register_slink(0).unwrap();
    log.set_received(100).unwrap();
    let d = pattern(1, 4096);
    let metas = log.append(&[write(1, &d, &[0]), write(2, &d, &[0])]).unwrap();
    assert_eq!((metas[0].seq, metas[0].origin_seq, metas[1].origin_seq), (1, 101, 102));
    assert_eq!(log.received(), 102);
    assert!(log.rebase_origin(50).is_err(), "the log still holds entries");
    drop(log);
    let (log, _) = RingLog::open(b.clone(), 0).unwrap();
    assert_eq!(log.entries_from(0, 4).iter().map(|m| m.origin_seq).collect::<Vec<_>>(), vec![101, 102]);
    log.cursors_to_tail().unwrap();
    assert!(log.entries_from(0, 4).is_empty());
    log.rebase_origin(90).unwrap();
    assert_eq!(log.received(), 90);
    drop(log);
    let (log, _) = RingLog::open(b, 0).unwrap();
    assert_eq!(log.received(), 90, "the new start is durable");
    assert_eq!(log.append(&[write(3, &d, &[0])]).unwrap()[0].origin_seq, 91);
}
