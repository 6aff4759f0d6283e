//! The mirror over memory back-ends: fan-out, balanced reads, a failing leg dropped and
//! brought back by region, errors without `handle_errors`, split, reload hand-over, and
//! power cuts of the log and legs together mid-write.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmrep_core::fault::{CrashMode, Fault, IoOp, MemBackend, Trigger};
use dmrep_core::{BlockBackend, Completion, IoSink, Op, Request, Target};
use parking_lot::RwLock;

use super::spec::{LegSpec, LogSpec, MirrorSpec, SyncMode};
use super::*;
use crate::replicator::dirty::disk::{bytes_needed, DiskLog};

const RB: u64 = 4096; // region bytes (8 sectors)
const LEN: u64 = 64 * RB;

struct Sink(std::sync::Mutex<Option<(Request, io::Result<()>)>>);
impl IoSink for Sink {
    fn complete(&self, req: Request, r: io::Result<()>) {
        *self.0.lock().unwrap() = Some((req, r));
    }
}

/// Submit one request and return it with its result (the mirror completes inline).
fn io(m: &Mirror, op: Op, offset: u64, buf: Vec<u8>) -> (Request, io::Result<()>) {
    let sink = Arc::new(Sink(std::sync::Mutex::new(None)));
    let len = if buf.is_empty() { 0 } else { buf.len() as u64 };
    m.submit(Request::new(op, offset, len, buf, 0), Completion::new(sink.clone(), 0));
    let out = sink.0.lock().unwrap().take();
    out.expect("completed inline")
}

fn write(m: &Mirror, offset: u64, byte: u8, len: usize) -> io::Result<()> {
    io(m, Op::Write { fua: false }, offset, vec![byte; len]).1
}

fn read(m: &Mirror, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let (req, r) = io(m, Op::Read, offset, vec![0; len]);
    r.map(|()| req.buf)
}

fn spec(n: usize, log: LogSpec, handle_errors: bool) -> MirrorSpec {
    let legs = (0..n).map(|i| LegSpec { path: format!("mem{i}"), offset_sectors: 0 }).collect();
    MirrorSpec { log, legs, handle_errors }
}

fn core(sync: SyncMode) -> LogSpec {
    LogSpec::Core { region_sectors: RB / 512, sync }
}

fn legs_of(devs: &[Arc<dyn BlockBackend>]) -> Vec<Leg> {
    devs.iter().enumerate().map(|(i, d)| Leg::new(d.clone(), &format!("mem{i}"), 0, None)).collect()
}

fn mems(n: usize) -> (Vec<Arc<MemBackend>>, Vec<Arc<dyn BlockBackend>>) {
    let m: Vec<Arc<MemBackend>> = (0..n).map(|i| Arc::new(MemBackend::named(&format!("mem{i}"), LEN))).collect();
    let d = m.iter().map(|x| x.clone() as Arc<dyn BlockBackend>).collect();
    (m, d)
}

fn core_mirror(devs: &[Arc<dyn BlockBackend>], sync: SyncMode, he: bool) -> Mirror {
    let m = Mirror::new(legs_of(devs), spec(devs.len(), core(sync), he), LEN, LogDev::Core, "m", None);
    m.resume();
    m
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn in_sync(m: &Mirror) -> bool {
    m.status().json["in_sync"] == true
}

#[test]
fn writes_reach_every_leg_and_reads_are_balanced() {
    let (mem, devs) = mems(3);
    let m = core_mirror(&devs, SyncMode::NoSync, false);
    write(&m, 8192, 0xab, 12288).unwrap();
    io(&m, Op::Write { fua: true }, 0, vec![1; 512]).1.unwrap();
    for x in &mem {
        let img = x.current_image();
        assert_eq!(&img[8192..20480], &[0xab; 12288][..]);
        assert_eq!(x.durable_image()[0], 1, "FUA made it durable on {}", x.describe());
    }
    let before: Vec<u64> = mem.iter().map(|x| x.counters().reads).collect();
    for _ in 0..30 {
        assert_eq!(read(&m, 8192, 4096).unwrap(), vec![0xab; 4096]);
    }
    let reads: Vec<u64> = mem.iter().zip(&before).map(|(x, b)| x.counters().reads - b).collect();
    assert_eq!(reads, vec![10, 10, 10], "round robin over the legs");
    assert_eq!(m.status().line, "3 mem0 mem1 mem2 64/64 1 AAA 1 core");
    m.shutdown();
}

#[test]
fn initial_sync_copies_leg_0_to_the_others() {
    let (mem, devs) = mems(2);
    mem[0].poke(0, &[7u8; LEN as usize]);
    let m = core_mirror(&devs, SyncMode::Default, false);
    // Reads of regions leg 1 lacks go to leg 0 only.
    assert_eq!(read(&m, RB * 63, 10).unwrap(), vec![7; 10]);
    wait_until("initial sync", || in_sync(&m));
    assert_eq!(mem[1].current_image(), mem[0].current_image());
    assert_eq!(m.status().json["resync"]["bytes_copied"], LEN);
    m.shutdown();
}

#[test]
fn a_failing_leg_is_dropped_and_recovery_copies_only_the_regions_written_meanwhile() {
    let (mem, devs) = mems(2);
    let m = core_mirror(&devs, SyncMode::NoSync, true);
    write(&m, 0, 1, LEN as usize).unwrap();
    mem[1].faults().fail(IoOp::Write, Fault::Eio, Trigger::Always);
    // Writes go on while leg 1 fails: regions 3, 4 (one write across both), 10, 40.
    write(&m, 3 * RB + 100, 2, RB as usize).unwrap();
    write(&m, 10 * RB, 3, 512).unwrap();
    write(&m, 40 * RB, 4, 8).unwrap();
    let st = m.status();
    assert_eq!(st.json["legs"][1]["health"], "dead", "{}", st.json);
    assert_eq!(st.line, "2 mem0 mem1 60/64 1 AD 1 core");
    assert_eq!(st.json["legs"][1]["regions_to_copy"], 4);
    // Reads of a region leg 1 lacks never go there (and it is dropped anyway).
    for _ in 0..4 {
        assert_eq!(read(&m, 10 * RB, 512).unwrap(), vec![3; 512]);
    }
    // The device comes back: exactly the 4 regions are copied.
    mem[1].faults().clear_all();
    let written = mem[1].counters().bytes_written;
    assert!(m.message(&["leg".into(), "1".into(), "recover".into()]).unwrap().contains("4 regions"));
    wait_until("resync after recover", || in_sync(&m));
    assert_eq!(mem[1].counters().bytes_written - written, 4 * RB, "only the regions written meanwhile");
    assert_eq!(m.status().json["resync"]["regions_copied"], 4);
    assert_eq!(mem[1].current_image(), mem[0].current_image());
    assert_eq!(m.status().line, "2 mem0 mem1 64/64 1 AA 1 core");
    m.shutdown();
}

#[test]
fn without_handle_errors_a_leg_error_fails_the_write_and_is_repaired() {
    let (mem, devs) = mems(2);
    let m = core_mirror(&devs, SyncMode::NoSync, false);
    mem[1].faults().fail(IoOp::Write, Fault::Eio, Trigger::Next(1));
    let e = write(&m, 5 * RB, 9, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(rustix::io::Errno::IO.raw_os_error()));
    let st = m.status().json;
    assert_eq!(st["legs"][1]["health"], "alive", "not dropped: {st}");
    assert_eq!(st["legs"][1]["status_char"], "D");
    // The region differed; the worker copies it (the leg works again).
    wait_until("the failed region copied", || in_sync(&m));
    assert_eq!(mem[1].current_image(), mem[0].current_image());
    m.shutdown();
}

#[test]
fn a_read_error_retries_another_leg_and_drops_the_leg() {
    let (mem, devs) = mems(2);
    let m = core_mirror(&devs, SyncMode::NoSync, true);
    write(&m, 0, 5, 4096).unwrap();
    mem[0].faults().fail(IoOp::Read, Fault::Eio, Trigger::Always);
    mem[1].faults().fail(IoOp::Read, Fault::Eio, Trigger::Always);
    assert!(read(&m, 0, 4096).is_err(), "no leg can read");
    mem[1].faults().clear_all();
    // Leg 1 was dropped by the first failure too (handle_errors): bring it back.
    m.message(&["leg".into(), "1".into(), "recover".into()]).unwrap();
    for _ in 0..4 {
        assert_eq!(read(&m, 0, 4096).unwrap(), vec![5; 4096]);
    }
    assert_eq!(m.status().json["legs"][0]["health"], "read-failed");
    assert_eq!(m.status().line, "2 mem0 mem1 64/64 1 RA 1 core");
    m.shutdown();
}

#[test]
fn split_leaves_a_consistent_copy_that_takes_no_later_writes() {
    let (mem, devs) = mems(3);
    let m = core_mirror(&devs, SyncMode::NoSync, false);
    write(&m, 0, 1, 8192).unwrap();
    let e = m.message(&["split".into(), "7".into()]).unwrap_err().to_string();
    assert!(e.contains("leg: expected 0..3"), "{e}");
    m.message(&["split".into(), "2".into()]).unwrap();
    write(&m, 0, 2, 4096).unwrap();
    assert_eq!(&mem[2].durable_image()[..8192], &[1u8; 8192][..], "the split copy is durable and frozen");
    assert_eq!(&mem[0].current_image()[..4096], &[2u8; 4096][..]);
    assert_eq!(m.status().line, "2 mem0 mem1 64/64 1 AA 1 core");
    assert_eq!(m.status().json["legs"][2]["health"], "split");
    // A leg that lacks regions is not a consistent copy.
    mem[1].faults().fail(IoOp::Write, Fault::Eio, Trigger::Always);
    write(&m, 0, 3, 4096).unwrap_err();
    assert!(m.message(&["split".into(), "1".into()]).unwrap_err().to_string().contains("not in sync"));
    let e = m.message(&["split".into(), "0".into()]).unwrap_err().to_string();
    assert!(e.contains("no other leg in sync"), "{e}");
    m.shutdown();
}

#[test]
fn a_reload_hands_the_dead_legs_regions_over() {
    let (mem, devs) = mems(2);
    let old = core_mirror(&devs, SyncMode::NoSync, true);
    mem[1].faults().fail(IoOp::Write, Fault::Eio, Trigger::Always);
    write(&old, 2 * RB, 4, 100).unwrap();
    write(&old, 30 * RB, 4, 100).unwrap();
    mem[1].faults().clear_all();
    // The new table is built while the old one is live, then swapped in.
    let new = Mirror::new(
        legs_of(&devs),
        spec(2, core(SyncMode::Default), true),
        LEN,
        LogDev::Core,
        "m",
        Some(Arc::downgrade(&old.s)),
    );
    old.presuspend();
    old.postsuspend();
    old.shutdown();
    let written = mem[1].counters().bytes_written;
    new.resume();
    wait_until("resync after the reload", || in_sync(&new));
    assert_eq!(mem[1].counters().bytes_written - written, 2 * RB, "not a full copy: the two regions");
    assert_eq!(mem[1].current_image(), mem[0].current_image());
    new.shutdown();
}

// ----------------------------------------------------------------------------------
// Power cuts: log and legs lose power at one instant, mid-write.

/// Shared power for several back-ends: while on, operations pass (holding it shared);
/// [`Power::cut`] waits for the operations under way, then fails every later one.
struct Power(RwLock<bool>);

struct Powered {
    inner: Arc<MemBackend>,
    power: Arc<Power>,
}

impl Powered {
    fn on<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        let off = self.power.0.read();
        if *off {
            return Err(io::Error::from(rustix::io::Errno::IO));
        }
        f()
    }
}

impl BlockBackend for Powered {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.on(|| self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.on(|| self.inner.write_at(buf, offset))
    }
    fn sync(&self) -> io::Result<()> {
        self.on(|| self.inner.sync())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.on(|| self.inner.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.on(|| self.inner.write_zeroes(offset, len, may_trim))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn disk_log(dev: Arc<dyn BlockBackend>) -> LogDev {
    let (_, fresh) = DiskLog::open_on(dev.clone(), "memlog", LEN, RB, true).unwrap();
    LogDev::Disk { dev, path: "memlog".into(), fresh, claim: None }
}

fn disk_spec() -> MirrorSpec {
    spec(2, LogSpec::Disk { path: "memlog".into(), region_sectors: RB / 512, sync: SyncMode::Default }, false)
}

fn fresh_mem(img: &[u8], name: &str) -> Arc<MemBackend> {
    let m = Arc::new(MemBackend::named(name, img.len() as u64));
    m.poke(0, img);
    m
}

#[test]
fn after_a_power_cut_every_region_whose_legs_differ_is_marked_and_resynced() {
    let log_bytes = bytes_needed(LEN / RB);
    for seed in 0..6u64 {
        let power = Arc::new(Power(RwLock::new(false)));
        let mem: Vec<Arc<MemBackend>> = (0..2).map(|i| Arc::new(MemBackend::named(&format!("mem{i}"), LEN))).collect();
        let logm = Arc::new(MemBackend::named("log", log_bytes));
        let p =
            |m: &Arc<MemBackend>| Arc::new(Powered { inner: m.clone(), power: power.clone() }) as Arc<dyn BlockBackend>;
        let devs: Vec<Arc<dyn BlockBackend>> = mem.iter().map(p).collect();
        // nosync start: a fresh log formatted all clean, the legs equal (zeros).
        let (_, fresh) = DiskLog::open_on(p(&logm), "memlog", LEN, RB, false).unwrap();
        let log = LogDev::Disk { dev: p(&logm), path: "memlog".into(), fresh, claim: None };
        let m = Arc::new(Mirror::new(legs_of(&devs), disk_spec(), LEN, log, "m", None));
        m.resume();
        // Slow leg 1 so writes are often half done when the power goes.
        mem[1].faults().set_write_delay(Some(Duration::from_micros(300)));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (m, stop) = (m.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut x = seed * 7919 + w * 104_729 + 1;
                    let mut i = 0u8;
                    let start = std::time::Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // A window of 8 regions that moves on every 60 ms: the regions
                        // left behind go idle and are cleared while the writes go on.
                        let window = (start.elapsed().as_millis() as u64 / 60 * 8) % (LEN / RB);
                        let off = window * RB + (x % (8 * RB / 512 - 16)) * 512;
                        let len = 512 * (1 + (x >> 40) % 16) as usize;
                        i = i.wrapping_add(1);
                        let _ = write(&m, off, i | 1, len);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + seed * 50));
        // The cut: one instant for the log and both legs.
        let images: Vec<Vec<u8>> = {
            let mut off = power.0.write();
            *off = true;
            [&mem[0], &mem[1], &logm]
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    d.crash(CrashMode::KeepRandomSubset(seed * 3 + i as u64));
                    d.durable_image()
                })
                .collect()
        };
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        m.shutdown();
        // Restart on what survived.
        let (l0, l1, lg) = (fresh_mem(&images[0], "mem0"), fresh_mem(&images[1], "mem1"), fresh_mem(&images[2], "log"));
        let devs: Vec<Arc<dyn BlockBackend>> = vec![l0.clone(), l1.clone()];
        let m2 = Mirror::new(legs_of(&devs), disk_spec(), LEN, disk_log(lg.clone()), "m", None);
        let differ: Vec<u64> = (0..LEN / RB)
            .filter(|&r| {
                images[0][(r * RB) as usize..((r + 1) * RB) as usize]
                    != images[1][(r * RB) as usize..((r + 1) * RB) as usize]
            })
            .collect();
        // Look before the resync runs: pause it (a suspended device does not copy).
        m2.presuspend();
        m2.s.log();
        {
            let st = m2.s.state.lock();
            for &r in &differ {
                if !st.legs[1].stale.get(r) {
                    let a = &images[0][(r * RB) as usize..((r + 1) * RB) as usize];
                    let b = &images[1][(r * RB) as usize..((r + 1) * RB) as usize];
                    let diff: Vec<usize> = (0..RB as usize / 512)
                        .filter(|&k| a[k * 512..(k + 1) * 512] != b[k * 512..(k + 1) * 512])
                        .collect();
                    let first = diff[0] * 512;
                    panic!(
                        "seed {seed}: region {r} differs between the legs but is not marked: sectors {diff:?}, leg0 {:?} leg1 {:?}",
                        &a[first..first + 4],
                        &b[first..first + 4]
                    );
                }
            }
        }
        m2.resume();
        wait_until("resync after the power cut", || in_sync(&m2));
        assert_eq!(l0.current_image(), l1.current_image(), "seed {seed}: legs equal after the resync");
        m2.shutdown();
    }
}
