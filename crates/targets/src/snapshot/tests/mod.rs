//! Tests of the snapshot targets: a model-checked random workload ([`model`]), power
//! cuts at every I/O of copy-outs ([`crash`]), a full or failing COW device, and tables
//! (claims, reloads) ([`tables`]).

mod crash;
mod model;
mod tables;

use std::io;
use std::sync::Arc;

use dmrep_core::fault::{Fault, IoOp, MemBackend, Trigger};
use dmrep_core::BlockBackend;

use super::{CowOrigin, Snapshot};

const KIB: u64 = 1024;

/// An origin of `size` bytes whose durable contents are a pattern (byte `i` is a hash of
/// `i`), so that a chunk read from the wrong place shows.
fn patterned(size: u64) -> (Arc<MemBackend>, Vec<u8>) {
    let m = Arc::new(MemBackend::named("origin", size));
    let img: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    m.poke(0, &img);
    (m, img)
}

fn read(b: &dyn BlockBackend, off: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    b.read_at(&mut v, off).unwrap();
    v
}

fn snap_read(s: &Snapshot, off: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    s.read_at(&mut v, off).map(|()| v)
}

#[test]
fn a_full_cow_device_invalidates_that_snapshot_only_and_stays_invalid() {
    let (om, img) = patterned(64 * KIB);
    let origin = CowOrigin::new(om.clone());
    // 4 KiB chunks: header, metadata chunk, 3 data chunks.
    let small = Arc::new(MemBackend::named("small-cow", 5 * 4 * KIB));
    let big = Arc::new(MemBackend::named("big-cow", 256 * KIB));
    let s1 = Snapshot::open(&origin, small.clone(), "small-cow", 4096, true).unwrap();
    let s2 = Snapshot::open(&origin, big.clone(), "big-cow", 4096, true).unwrap();
    assert_eq!(s1.total_chunks(), 5);
    assert_eq!(s1.used_chunks(), 1, "the header");
    for c in 0..3u64 {
        origin.write_at(&[0xee; 100], c * 4096 + 10).unwrap();
    }
    assert!(s1.is_valid());
    assert_eq!(s1.used_chunks(), 5);
    assert_eq!(s1.status_line(), "40/40 16");
    // The fourth chunk does not fit: s1 becomes invalid, the origin write goes on.
    origin.write_at(&[0xdd; 8192], 3 * 4096).unwrap();
    assert!(!s1.is_valid() && s2.is_valid());
    assert_eq!(s1.status_line(), "Invalid");
    let e = snap_read(&s1, 0, 512).unwrap_err().to_string();
    assert!(e.contains("small-cow") && e.contains("filled up"), "{e}");
    let e = s1.write_at(Some(&[1]), 0, 1).unwrap_err().to_string();
    assert!(e.contains("small-cow") && e.contains("filled up"), "{e}");
    assert_eq!(read(&*om, 3 * 4096, 8192), vec![0xdd; 8192]);
    assert_eq!(snap_read(&s2, 0, 64 * KIB).unwrap(), img, "the other snapshot is intact");
    // No more copy-outs for s1; the origin keeps working.
    origin.write_at(&[0xcc; 4096], 8 * 4096).unwrap();
    assert_eq!(snap_read(&s2, 0, 64 * KIB).unwrap(), img);
    // The state persists.
    drop(s1);
    let s1 = Snapshot::open(&origin, small.clone(), "small-cow", 4096, true).unwrap();
    assert!(!s1.is_valid());
    let e = snap_read(&s1, 0, 512).unwrap_err().to_string();
    assert!(e.contains("small-cow"), "{e}");
    assert_eq!(s1.status_json()["valid"], false);
}

#[test]
fn a_failing_cow_device_invalidates_the_snapshot_and_blocks_the_origin_only_if_it_cannot_say_so() {
    let (om, img) = patterned(32 * KIB);
    let origin = CowOrigin::new(om.clone());
    let cow = Arc::new(MemBackend::named("cow", 128 * KIB));
    let s = Snapshot::open(&origin, cow.clone(), "cow", 4096, true).unwrap();
    // The data write fails; the header can still say "invalid": the origin goes on.
    cow.faults().fail(IoOp::Write, Fault::Eio, Trigger::Next(1));
    origin.write_at(&[1; 10], 0).unwrap();
    assert!(!s.is_valid());
    let e = snap_read(&s, 0, 1).unwrap_err().to_string();
    assert!(e.contains("cow") && e.contains("failed"), "{e}");
    drop(s);
    assert!(!Snapshot::open(&origin, cow.clone(), "cow", 4096, true).unwrap().is_valid(), "durably invalid");

    // A device that fails every write: the snapshot cannot be marked invalid, so the
    // origin write is refused (a crash would otherwise leave a wrong snapshot).
    let cow2 = Arc::new(MemBackend::named("cow2", 128 * KIB));
    let s2 = Snapshot::open(&origin, cow2.clone(), "cow2", 4096, true).unwrap();
    let before = read(&*om, 0, 32 * KIB);
    cow2.faults().fail(IoOp::Write, Fault::Eio, Trigger::Always);
    let e = origin.write_at(&[2; 10], 4096).unwrap_err().to_string();
    assert!(e.contains("cow2") && e.contains("cannot be marked invalid"), "{e}");
    assert_eq!(read(&*om, 0, 32 * KIB), before, "the origin was not written");
    // Once the device takes writes again, the invalid state is written and the origin
    // goes on.
    cow2.faults().clear_all();
    origin.write_at(&[2; 10], 4096).unwrap();
    assert!(!s2.is_valid());
    let _ = img;
}

#[test]
fn transient_snapshots_keep_the_map_in_memory_only() {
    let (om, img) = patterned(32 * KIB);
    let origin = CowOrigin::new(om.clone());
    let cow = Arc::new(MemBackend::named("cow", 64 * KIB));
    let s = Snapshot::open(&origin, cow.clone(), "cow", 1024, false).unwrap();
    origin.write_at(&[9; 3000], 100).unwrap();
    assert_eq!(snap_read(&s, 0, 32 * KIB).unwrap(), img);
    assert_eq!(s.status_line(), "8/128 0", "4 chunks of 2 sectors used, no metadata");
    assert_eq!(read(&*cow, 0, 8), img[0..8].to_vec(), "data from chunk 0: no header");
    drop(s);
    // Reopened: empty again, equal to the origin as it is now.
    let s = Snapshot::open(&origin, cow, "cow", 1024, false).unwrap();
    assert_eq!(snap_read(&s, 0, 32 * KIB).unwrap(), read(&*om, 0, 32 * KIB));
}

#[test]
fn a_chunk_size_other_than_the_stored_one_is_refused() {
    let (om, _) = patterned(32 * KIB);
    let origin = CowOrigin::new(om);
    let cow = Arc::new(MemBackend::named("cow", 64 * KIB));
    drop(Snapshot::open(&origin, cow.clone(), "cow", 4096, true).unwrap());
    let e = Snapshot::open(&origin, cow.clone(), "cow", 8192, true).err().unwrap().to_string();
    assert!(e.contains("cow") && e.contains("chunk size 8 sectors") && e.contains("16"), "{e}");
    let tiny = Arc::new(MemBackend::named("tiny", 8 * KIB));
    let e = Snapshot::open(&origin, tiny, "tiny", 4096, true).err().unwrap().to_string();
    assert!(e.contains("too small"), "{e}");
    // A damaged header is an error, not a reformat.
    cow.poke(20, &[0x55]);
    let e = Snapshot::open(&origin, cow, "cow", 4096, true).err().unwrap().to_string();
    assert!(e.contains("damaged header"), "{e}");
}

#[test]
fn concurrent_writers_of_origin_and_snapshot_keep_both_right() {
    // A few rounds: a race lost once in a while still shows.
    for _ in 0..8 {
        concurrent_round();
    }
}

fn concurrent_round() {
    const SIZE: u64 = 256 * KIB;
    let (om, img) = patterned(SIZE);
    let origin = CowOrigin::new(om.clone());
    let cow = Arc::new(MemBackend::named("cow", 2 * SIZE));
    let s = Snapshot::open(&origin, cow.clone(), "cow", 4096, true).unwrap();
    // Thread t owns the bytes i with (i / 700) % 4 == t: neighbours share chunks, so
    // copy-outs race on the same chunk; threads 0-1 write the origin, 2-3 the snapshot.
    let owns = |t: u64, i: u64| (i / 700) % 4 == t;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (origin, s) = (origin.clone(), s.clone());
            std::thread::spawn(move || {
                let mut at = 0u64;
                while at < SIZE {
                    let run = 700 - at % 700;
                    let len = run.min(SIZE - at);
                    if owns(t, at) {
                        let data = vec![0x10 + t as u8; len as usize];
                        if t < 2 {
                            origin.write_at(&data, at).unwrap();
                        } else {
                            s.write_at(Some(&data), at, len).unwrap();
                        }
                    }
                    at += len;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let want_origin: Vec<u8> = (0..SIZE)
        .map(|i| {
            if owns(0, i) {
                0x10
            } else if owns(1, i) {
                0x11
            } else {
                img[i as usize]
            }
        })
        .collect();
    let want_snap: Vec<u8> = (0..SIZE)
        .map(|i| {
            if owns(2, i) {
                0x12
            } else if owns(3, i) {
                0x13
            } else {
                img[i as usize]
            }
        })
        .collect();
    assert!(read(&*om, 0, SIZE) == want_origin, "origin");
    assert!(snap_read(&s, 0, SIZE).unwrap() == want_snap, "snapshot");
    // Every exception was committed: a reopen reads the same (after a flush of the
    // snapshot writes into existing exceptions).
    s.sync().unwrap();
    drop(s);
    let s = Snapshot::open(&origin, cow, "cow", 4096, true).unwrap();
    assert!(snap_read(&s, 0, SIZE).unwrap() == want_snap, "snapshot after reopen");
    assert_eq!(s.store().exceptions(), SIZE / 4096);
}
