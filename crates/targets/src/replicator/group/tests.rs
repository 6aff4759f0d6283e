//! Deterministic tests of the group's state machine: no threads, no timers. A harness
//! plays the threads' part (does the I/O each [`Io`] asks for, feeds the result back),
//! so a test chooses every interleaving, including operator commands in the middle of
//! an append or an apply.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_core::fault::{Fault, IoOp, MemBackend, Trigger};
use dmrep_core::{Completion, IoSink, Op, Request};
use parking_lot::Mutex;

use super::machine::{Control, Effects, Event, Io, Machine};
use super::{DevNr, SlinkNr, SlinkSetup};
use crate::replicator::dirty::core::CoreLog;
use crate::replicator::dirty::DirtyLog;
use crate::replicator::fallbehind::{InForce, Policy, Thresholds};
use crate::replicator::log::RingLog;
use crate::replicator::slink::local::LocalSlink;
use crate::replicator::slink::{ApplyEntry, SlinkHandler};

const DEV: u64 = 1 << 20;
const REGION: u64 = 64 << 10;
const ASYNC: Policy = Policy::ASYNCHRONOUS;
const SYNC: Policy = Policy::SYNCHRONOUS;

/// Replies by tag.
#[derive(Default)]
struct Replies(Mutex<BTreeMap<u64, io::Result<()>>>);

impl IoSink for Replies {
    fn complete(&self, req: Request, result: io::Result<()>) {
        assert!(self.0.lock().insert(req.tag, result).is_none(), "request {} answered twice", req.tag);
    }
}

impl Replies {
    fn ok(&self, tag: u64) -> bool {
        self.0.lock().get(&tag).is_some_and(|r| r.is_ok())
    }
    fn errno(&self, tag: u64) -> Option<i32> {
        self.0.lock().get(&tag).and_then(|r| r.as_ref().err().and_then(|e| e.raw_os_error()))
    }
    fn answered(&self, tag: u64) -> bool {
        self.0.lock().contains_key(&tag)
    }
}

struct Harness {
    m: Machine,
    log: Arc<RingLog>,
    log_dev: Arc<MemBackend>,
    /// Devices by (slink, dev).
    devs: BTreeMap<(SlinkNr, DevNr), Arc<MemBackend>>,
    handlers: BTreeMap<SlinkNr, Arc<LocalSlink>>,
    replies: Arc<Replies>,
    tag: u64,
    now: Instant,
    /// The SLINK whose copier ran last (whose cursor an effect persists).
    last_copier: SlinkNr,
    /// Every entry appended, in log order: (seq, dev, offset, len, fill byte).
    history: Vec<(u64, DevNr, u64, u32, u8)>,
}

fn handler_with(
    devs: &mut BTreeMap<(SlinkNr, DevNr), Arc<MemBackend>>,
    nr: SlinkNr,
    dev_nrs: &[DevNr],
) -> Arc<LocalSlink> {
    let h = Arc::new(LocalSlink::new());
    for d in dev_nrs {
        let mem = Arc::new(MemBackend::named(&format!("s{nr}d{d}"), DEV));
        let path = format!("mem:{nr}:{d}");
        h.override_path(&path, mem.clone());
        h.attach(*d, &path, DEV).unwrap();
        devs.insert((nr, *d), mem);
    }
    h
}

impl Harness {
    /// A group with SLINK 0 and the given RD SLINKs (`(nr, policy, thresholds)`), all over
    /// `dev_nrs`, a `core` dirty log for every RD; a log of `log_bytes`.
    fn new(dev_nrs: &[DevNr], rds: &[(SlinkNr, Policy, Thresholds)], log_bytes: u64) -> Harness {
        let log_dev = Arc::new(MemBackend::new(log_bytes));
        let log = Arc::new(RingLog::create(log_dev.clone(), 0, log_bytes).unwrap());
        let mut devs = BTreeMap::new();
        let mut handlers = BTreeMap::new();
        let mut setups = Vec::new();
        for (nr, policy, thresholds) in std::iter::once(&(0, ASYNC, Thresholds::default())).chain(rds) {
            let h = handler_with(&mut devs, *nr, dev_nrs);
            handlers.insert(*nr, h.clone());
            setups.push(SlinkSetup { nr: *nr, handler: h, policy: *policy, thresholds: *thresholds });
        }
        let now = Instant::now();
        let m = Machine::new("t", log.clone(), true, false, setups, now).unwrap();
        let mut h = Harness {
            m,
            log,
            log_dev,
            devs,
            handlers,
            replies: Arc::default(),
            tag: 0,
            now,
            last_copier: 0,
            history: Vec::new(),
        };
        for (nr, _, _) in rds {
            for d in dev_nrs {
                h.attach_dirty(*nr, *d, false);
            }
        }
        h
    }

    fn attach_dirty(&mut self, nr: SlinkNr, dev: DevNr, initial: bool) {
        let log: Arc<dyn DirtyLog> = Arc::new(CoreLog::new(DEV, REGION));
        let c = Control::AttachDirty { slink: nr, dev, log, dev_bytes: DEV, initial_dirty: initial };
        let fx = self.m.control(self.now, c).unwrap();
        self.finish(fx);
    }

    fn control(&mut self, c: Control) {
        let fx = self.m.control(self.now, c).unwrap();
        self.finish(fx);
    }

    /// Send replies, flush logs, and do any I/O asked (as the thread that asked would).
    fn finish(&mut self, fx: Effects) {
        let Effects { replies, io, cursor, flush, .. } = fx;
        for (req, done, r) in replies {
            done.complete(req, r);
        }
        for l in flush {
            l.flush().unwrap();
        }
        if let Some(seq) = cursor {
            // The committer's part, inline.
            let nr = self.last_copier;
            if self.log.cursor(nr).is_some_and(|c| seq >= c) {
                self.log.set_cursors(&[(nr, seq)]).unwrap();
            }
            self.event(Event::CursorsPersisted { slinks: vec![nr], took: Duration::ZERO });
        }
        if let Some(io) = io {
            self.run(io);
        }
    }

    fn event(&mut self, ev: Event) {
        let fx = self.m.apply(self.now, ev);
        self.finish(fx);
    }

    fn run(&mut self, io: Io) {
        let ev = self.io_result(io);
        self.event(ev);
    }

    /// Do one piece of I/O; the event that reports it.
    fn io_result(&mut self, io: Io) -> Event {
        match io {
            Io::Append(batch) => {
                let entries = batch.entries();
                let result = self.log.append(&entries);
                if let Ok(metas) = &result {
                    for (m, e) in metas.iter().zip(&entries) {
                        self.history.push((m.seq, m.dev_nr, m.offset, m.len, e.data.first().copied().unwrap_or(0)));
                    }
                }
                drop(entries);
                Event::Appended { batch, took: Duration::ZERO, result }
            }
            Io::FlushDirty(logs) => Event::DirtyFlushed { result: logs.iter().try_for_each(|l| l.flush()) },
            Io::Leave { slink, logs } => {
                let result = logs
                    .iter()
                    .try_for_each(|l| l.flush())
                    .map_err(|source| super::GroupError::DirtyLog { slink, source })
                    .and_then(|()| self.log.unregister_slink(slink).map_err(super::GroupError::Log));
                Event::Left { slink, result }
            }
            Io::Reorder { slink } => Event::Reordered { slink, result: self.log.register_slink(slink) },
            Io::Apply(w) => {
                self.last_copier = w.slink;
                let h = self.handlers[&w.slink].clone();
                let mut owned = Vec::new();
                for (m, c) in &w.entries {
                    let mut v = vec![0u8; m.len as usize];
                    match c {
                        Some(c) => v.copy_from_slice(c.bytes()),
                        None if m.kind == crate::replicator::log::EntryKind::Write => {
                            if let Err(error) = self.log.read_data(m, &mut v) {
                                return Event::LogReadFailed { slink: w.slink, seq: m.seq, error };
                            }
                        }
                        None => v.clear(),
                    }
                    owned.push(v);
                }
                let entries: Vec<ApplyEntry<'_>> = w
                    .entries
                    .iter()
                    .zip(&owned)
                    .map(|((m, _), v)| ApplyEntry {
                        seq: m.seq,
                        epoch: m.epoch,
                        time_us: m.origin_time_us,
                        dev_nr: m.dev_nr,
                        offset: m.offset,
                        len: m.len,
                        kind: m.kind,
                        data: v,
                    })
                    .collect();
                let result = if entries.is_empty() { Ok(()) } else { h.apply(&entries) };
                let result = result.map(|()| w.last);
                Event::Applied { slink: w.slink, era: w.era, last: w.last, took: Duration::ZERO, result }
            }
            Io::Resync(w) => {
                let h = self.handlers[&w.slink].clone();
                let mut buf = vec![0u8; w.len as usize];
                let result = self.read(w.dev, w.offset, &mut buf).and_then(|()| {
                    h.apply(&[ApplyEntry {
                        seq: 0,
                        epoch: 0,
                        time_us: 0,
                        dev_nr: w.dev,
                        offset: w.offset,
                        len: w.len as u32,
                        kind: crate::replicator::log::EntryKind::Write,
                        data: &buf,
                    }])
                });
                Event::Resynced { work: w, result }
            }
            Io::Probe { slink } => Event::Probed { slink, result: self.handlers[&slink].probe() },
            Io::Collect { .. } => unreachable!("local handlers keep nothing in flight"),
        }
    }

    /// The application's view of a device (the group's read path).
    fn read(&self, dev: DevNr, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.handlers[&0].read(dev, offset, buf)?;
        for e in self.m.overlay.overlapping(dev, offset, buf.len() as u64) {
            let mut data = vec![0u8; e.len as usize];
            if e.kind == crate::replicator::log::EntryKind::Write {
                self.log.read_data(&e, &mut data).unwrap();
            }
            let s = e.offset.max(offset);
            let t = (e.offset + e.len as u64).min(offset + buf.len() as u64);
            buf[(s - offset) as usize..(t - offset) as usize]
                .copy_from_slice(&data[(s - e.offset) as usize..(t - e.offset) as usize]);
        }
        Ok(())
    }

    fn write(&mut self, dev: DevNr, offset: u64, byte: u8, len: usize) -> u64 {
        self.tag += 1;
        let req = Request::new(Op::Write { fua: false }, offset, len as u64, vec![byte; len], self.tag);
        let done = Completion::new(self.replies.clone(), self.tag);
        self.event(Event::Submit { dev_nr: dev, req, done, origin: None });
        self.tag
    }

    /// The appender takes one step (None: nothing to do); returns its I/O, not done.
    fn appender_io(&mut self) -> Option<Io> {
        let fx = self.m.apply(self.now, Event::AppenderReady);
        let Effects { replies, io, .. } = fx;
        for (req, done, r) in replies {
            done.complete(req, r);
        }
        io
    }

    /// Run the appender until it has nothing to do.
    fn append_all(&mut self) {
        while let Some(io) = self.appender_io() {
            self.run(io);
        }
    }

    fn copier_io(&mut self, nr: SlinkNr) -> Option<Io> {
        let fx = self.m.apply(self.now, Event::CopierReady { slink: nr });
        assert!(fx.replies.is_empty());
        fx.io
    }

    /// Run SLINK `nr`'s copier until it has nothing to do.
    fn copy_all(&mut self, nr: SlinkNr) {
        for _ in 0..10_000 {
            match self.copier_io(nr) {
                Some(io) => self.run(io),
                None => return,
            }
        }
        panic!("copier {nr} never idles");
    }

    /// Everyone works until nothing moves.
    fn settle(&mut self) {
        for _ in 0..100 {
            self.append_all();
            let nrs: Vec<SlinkNr> = self.m.slinks.keys().copied().collect();
            for nr in nrs {
                self.copy_all(nr);
            }
            if self.appender_io_peek_idle() {
                return;
            }
        }
    }

    fn appender_io_peek_idle(&mut self) -> bool {
        match self.appender_io() {
            None => true,
            Some(io) => {
                self.run(io);
                false
            }
        }
    }

    fn image(&self, nr: SlinkNr, dev: DevNr) -> Vec<u8> {
        self.devs[&(nr, dev)].current_image()
    }

    /// The application's view of every device equals SLINK `nr`'s copy.
    fn assert_copy_equal(&self, nr: SlinkNr) {
        for ((s, d), _) in self.devs.iter().filter(|((s, _), _)| *s == 0) {
            let _ = s;
            let mut app = vec![0u8; DEV as usize];
            self.read(*d, 0, &mut app).unwrap();
            assert!(self.image(nr, *d) == app, "slink {nr} device {d} differs from the application's view");
        }
    }

    fn ordered(&self, nr: SlinkNr) -> bool {
        self.m.slinks[&nr].ordered && !self.m.slinks[&nr].leaving()
    }
}

mod proptests;
mod roles;

/// R2: a `sync` dirty log attached (a new replicator-dev) while another device's batch
/// is being appended: the batch, planned with SLINK 1 ordered, lands after SLINK 1 left
/// ordered mode. Its entries must become dirty regions of SLINK 1 (not be lost), and
/// the copy must end equal.
#[test]
fn r2_batch_in_flight_when_slink_leaves_ordered_mode() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.write(0, 0, 1, 4096);
    h.settle();
    assert!(h.ordered(1));
    // A write of device 0 is planned (SLINK 1 ordered) ...
    let t = h.write(0, 3 * REGION, 7, 4096);
    let io = h.appender_io().expect("a batch");
    assert!(matches!(io, Io::Append(_)));
    // ... and meanwhile device 1 joins with a `sync` dirty log on SLINK 1.
    let ld1 = Arc::new(MemBackend::named("s0d1", DEV));
    h.handlers[&0].override_path("mem:0:1", ld1.clone());
    h.handlers[&0].attach(1, "mem:0:1", DEV).unwrap();
    h.devs.insert((0, 1), ld1);
    let rd1 = Arc::new(MemBackend::named("s1d1", DEV));
    h.handlers[&1].override_path("mem:1:1", rd1.clone());
    h.handlers[&1].attach(1, "mem:1:1", DEV).unwrap();
    h.devs.insert((1, 1), rd1);
    h.attach_dirty(1, 1, true);
    assert!(!h.ordered(1), "a sync dirty log takes SLINK 1 out of ordered mode");
    // The append lands now.
    h.run(io);
    assert!(h.replies.ok(t));
    let dirty0 = h.m.dirty[&(1, 0)].0.clone();
    assert!(dirty0.is_dirty(3), "the in-flight write is a dirty region of SLINK 1");
    h.settle();
    assert!(h.ordered(1), "resync done: SLINK 1 back in ordered mode");
    h.assert_copy_equal(1);
}

/// R1: an SLINK added to a live group joins with its dirty logs; it becomes ordered
/// only after its initial copy; an SLINK added to a group without devices is ordered at
/// once and needs nothing.
#[test]
fn r1_added_slink_joins_with_its_dirty_logs() {
    let mut h = Harness::new(&[0], &[], 8 << 20);
    for i in 0..10 {
        h.write(0, i * REGION, i as u8 + 1, 8192);
    }
    h.settle();
    let hd = handler_with(&mut h.devs, 2, &[0]);
    h.handlers.insert(2, hd.clone());
    let log: Arc<dyn DirtyLog> = Arc::new(CoreLog::new(DEV, REGION));
    h.control(Control::AddSlink(
        SlinkSetup { nr: 2, handler: hd, policy: ASYNC, thresholds: Thresholds::default() },
        vec![(0, log, DEV, true)],
    ));
    assert!(!h.ordered(2));
    // Writes while it copies.
    for i in 0..5 {
        h.write(0, i * REGION + 4096, 0x40 + i as u8, 4096);
    }
    h.settle();
    assert!(h.ordered(2));
    h.assert_copy_equal(2);
    // And it follows in order from now on.
    h.write(0, 0, 0x99, 4096);
    h.settle();
    h.assert_copy_equal(2);
}

/// R1 (the reported wedge): an SLINK that missed writes of a device it had no dirty log
/// for never joins ordered mode until that device's dirty log is attached, and then
/// starts all dirty.
#[test]
fn r1_slink_without_device_does_not_join_ordered_mode() {
    let mut h = Harness::new(&[0], &[], 8 << 20);
    let hd = Arc::new(LocalSlink::new());
    h.handlers.insert(2, hd.clone());
    h.control(Control::AddSlink(
        SlinkSetup { nr: 2, handler: hd.clone(), policy: ASYNC, thresholds: Thresholds::default() },
        vec![],
    ));
    let t = h.write(0, 0, 5, 4096);
    h.settle();
    assert!(h.replies.ok(t), "writes go on (no log error)");
    assert!(h.m.log_error.is_none());
    assert!(!h.ordered(2), "no device for device 0: not ordered");
    assert_eq!(h.m.slinks[&2].lag(h.now).ios, 0, "nothing queued for it");
    // The device arrives with a `nosync` dirty log: it missed writes, so it is copied.
    let rd = Arc::new(MemBackend::named("s2d0", DEV));
    hd.override_path("mem:2:0", rd.clone());
    hd.attach(0, "mem:2:0", DEV).unwrap();
    h.devs.insert((2, 0), rd);
    h.attach_dirty(2, 0, false);
    h.settle();
    assert!(h.ordered(2));
    h.assert_copy_equal(2);
}

/// R3: a device removed while SLINK 1 is paused with a backlog of its entries: on
/// resume SLINK 1 skips them and goes on; SLINK 0 still writes them to the LD, then
/// lets the LD go.
#[test]
fn r3_removed_device_does_not_stop_its_slinks() {
    let mut h = Harness::new(&[0, 1], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.control(Control::Pause { slink: 1, paused: true });
    for i in 0..4 {
        h.write(1, i * 4096, 9, 4096);
        h.write(0, i * 4096, 8, 4096);
    }
    h.append_all();
    assert!(h.m.slinks[&1].lag(h.now).ios >= 8);
    h.control(Control::RemoveDevice(1));
    assert!(h.handlers[&0].has_device(1), "the LD stays until its entries are applied");
    assert!(!h.handlers[&1].has_device(1));
    h.control(Control::Pause { slink: 1, paused: false });
    h.settle();
    assert_eq!(h.m.slinks[&1].lag(h.now).ios, 0, "SLINK 1 is not stuck on the removed device");
    assert!(!h.handlers[&0].has_device(1), "LD detached once drained");
    assert_eq!(&h.image(0, 1)[..4096], &[9u8; 4096][..], "acknowledged writes reached the LD");
    assert_eq!(&h.image(1, 0)[..4096], &[8u8; 4096][..]);
    // The device comes back under the same number with a `nosync` dirty log: its RD
    // missed the skipped writes, so it is copied in full anyway.
    h.handlers[&0].attach(1, "mem:0:1", DEV).unwrap();
    h.handlers[&1].attach(1, "mem:1:1", DEV).unwrap();
    h.attach_dirty(1, 1, false);
    h.settle();
    assert!(h.ordered(1));
    h.assert_copy_equal(1);
}

/// R5: an entry that cannot be read back from the log is a log error (writes refused),
/// not a site outage (the SLINK stays accessible and does not flap).
#[test]
fn r5_log_read_failure_is_a_log_error() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.write(0, 0, 1, 4096);
    h.append_all();
    h.m.cache.clear(); // force a read back
    h.log_dev.faults().fail(IoOp::Read, Fault::Eio, Trigger::Always);
    h.copy_all(1);
    assert!(h.m.log_error.is_some());
    assert!(h.m.slinks[&1].accessible(), "not reported as a site outage");
    let t = h.write(0, 0, 2, 4096);
    assert_eq!(h.replies.errno(t), Some(rustix::io::Errno::IO.raw_os_error()));
}

/// R5, with a corrupt entry: an entry whose data no longer matches its crc when it is
/// read back from the log (no longer cached) is a log error, not a site outage, and its
/// bytes never reach the site.
#[test]
fn r5_corrupt_entry_read_back_is_a_log_error() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.write(0, 0, 0x61, 4096);
    h.append_all();
    h.copy_all(0);
    h.m.cache.clear();
    let e = h.log.entries_from(0, 16).pop().expect("the entry");
    // Flip a byte of its data on the log device (ring at byte 8192, data after the
    // 512-byte header).
    let at = dmrep_formats::replog::RING_OFFSET + e.ring_pos() + 512 + 100;
    h.log_dev.poke(at, &[0x66]);
    h.copy_all(1);
    let err = h.m.log_error.as_ref().expect("a log error").to_string();
    assert!(err.contains("reading entry") && err.contains("slink 1"), "{err}");
    assert!(h.m.slinks[&1].accessible());
    assert_eq!(h.image(1, 0)[100], 0, "the corrupt bytes never reached the RD");
}

/// R8: shutdown with an append in flight: every request gets a reply.
#[test]
fn r8_shutdown_with_an_append_in_flight_answers_everyone() {
    let mut h = Harness::new(&[0], &[(1, SYNC, Thresholds::default())], 8 << 20);
    let a = h.write(0, 0, 1, 4096);
    h.append_all();
    let b = h.write(0, 4096, 2, 4096);
    let io = h.appender_io().unwrap();
    let c = h.write(0, 8192, 3, 4096);
    h.control(Control::Shutdown);
    h.run(io);
    for t in [a, b, c] {
        assert!(h.replies.answered(t), "request {t} got no reply");
        assert_eq!(h.replies.errno(t), Some(rustix::io::Errno::SHUTDOWN.raw_os_error()));
    }
}

/// R10: a batch of many small entries fits the ring (entry headers counted).
#[test]
fn r10_batch_planner_counts_entry_headers() {
    let log_bytes = 2 << 20; // the smallest usable log
    let mut h = Harness::new(&[0], &[], log_bytes);
    let mut tags = Vec::new();
    for i in 0..3000u64 {
        h.tag += 1;
        let req = Request::new(Op::Discard, (i % 256) * 4096, 4096, Vec::new(), h.tag);
        let done = Completion::new(h.replies.clone(), h.tag);
        h.event(Event::Submit { dev_nr: 0, req, done, origin: None });
        tags.push(h.tag);
    }
    h.settle();
    assert!(h.m.log_error.is_none(), "{:?}", h.m.log_error);
    assert!(tags.iter().all(|t| h.replies.ok(*t)));
}

/// R12: a paused asynchronous SLINK over its threshold does not throttle writes, and
/// its mode in force is asynchronous, not forced synchronous.
#[test]
fn r12_status_shows_the_mode_in_force() {
    let t = Thresholds { ios: Some(4), ..Default::default() };
    let mut h = Harness::new(&[0], &[(1, ASYNC, t)], 8 << 20);
    h.control(Control::Pause { slink: 1, paused: true });
    for i in 0..10 {
        let tag = h.write(0, i * 4096, 1, 4096);
        h.append_all();
        h.copy_all(0);
        assert!(h.replies.ok(tag), "write {i} waits for a paused asynchronous slink");
    }
    assert_eq!(h.m.slinks[&1].mode, InForce::Asynchronous);
    h.control(Control::Pause { slink: 1, paused: false });
    h.append_all();
    assert_eq!(h.m.slinks[&1].mode, InForce::ForcedSynchronous, "resumed and over its threshold");
}

/// Issue 8: a write waiting for a synchronous SLINK that is paused is released when the
/// SLINK's policy becomes asynchronous.
#[test]
fn policy_change_releases_waiting_writes() {
    let mut h = Harness::new(&[0], &[(1, SYNC, Thresholds::default())], 8 << 20);
    h.control(Control::Pause { slink: 1, paused: true });
    let t = h.write(0, 0, 1, 4096);
    h.append_all();
    h.copy_all(0);
    assert!(!h.replies.answered(t), "waits for synchronous slink 1");
    h.control(Control::SetPolicy { slink: 1, policy: ASYNC, thresholds: None });
    assert!(h.replies.ok(t));
}

/// Issue 8 / invariant 5: when the log is full and SLINK 0 holds its oldest entries, a
/// healthy replica is not expelled: writes wait for SLINK 0. When the replica holds the
/// log (paused), it leaves, and the copy ends equal after the resync.
#[test]
fn log_full_expels_only_the_holder() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 2 << 20);
    // SLINK 0 slow (not run), SLINK 1 keeps up.
    let mut tags = Vec::new();
    for i in 0..64 {
        tags.push(h.write(0, (i % 16) * 65536, i as u8, 65536));
        h.append_all();
        h.copy_all(1);
    }
    assert!(h.ordered(1), "a healthy replica stays in ordered mode when SLINK 0 holds the log");
    assert!(h.m.stats.log_full_waits > 0, "the log did fill");
    h.settle();
    assert!(tags.iter().all(|t| h.replies.ok(*t)));
    // Now SLINK 1 is the holder (paused): it leaves, writes go on.
    h.control(Control::Pause { slink: 1, paused: true });
    for i in 0..64 {
        tags.push(h.write(0, (i % 16) * 65536, 0x80 | i as u8, 65536));
        h.append_all();
        h.copy_all(0);
    }
    assert!(!h.m.slinks[&1].ordered, "the paused holder left ordered mode");
    assert!(tags.iter().all(|t| h.replies.ok(*t)));
    h.control(Control::Pause { slink: 1, paused: false });
    h.settle();
    assert!(h.ordered(1));
    h.assert_copy_equal(1);
}

/// A dirty-log flush failure fails the writes it held, with EIO, and refuses later ones.
#[test]
fn dirty_flush_failure_fails_the_writes() {
    struct Failing(CoreLog);
    impl DirtyLog for Failing {
        fn region_bytes(&self) -> u64 {
            self.0.region_bytes()
        }
        fn regions(&self) -> u64 {
            self.0.regions()
        }
        fn mark_range(&self, o: u64, l: u64) {
            self.0.mark_range(o, l)
        }
        fn mark_all(&self) {
            self.0.mark_all()
        }
        fn clear(&self, r: u64) {
            self.0.clear(r)
        }
        fn flush(&self) -> io::Result<()> {
            Err(rustix::io::Errno::IO.into())
        }
        fn is_dirty(&self, r: u64) -> bool {
            self.0.is_dirty(r)
        }
        fn next_dirty(&self, f: u64) -> Option<u64> {
            self.0.next_dirty(f)
        }
        fn dirty_count(&self) -> u64 {
            self.0.dirty_count()
        }
        fn kind(&self) -> &'static str {
            "disk"
        }
    }
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 2 << 20);
    let log: Arc<dyn DirtyLog> = Arc::new(Failing(CoreLog::new(DEV, REGION)));
    h.m.dirty.insert((1, 0), (log, DEV));
    // SLINK 1 paused holds the log; when it fills, SLINK 1 leaves ordered mode, and the
    // flush of its dirty regions fails.
    h.control(Control::Pause { slink: 1, paused: true });
    let mut tags = Vec::new();
    for i in 0..64 {
        tags.push(h.write(0, (i % 16) * 65536, 1, 65536));
        h.append_all();
        h.copy_all(0);
        if h.m.log_error.is_some() {
            break;
        }
    }
    assert!(h.m.log_error.is_some(), "the log filled and the leave failed");
    assert!(tags.iter().all(|t| h.replies.answered(*t)), "every write got a reply");
    let t = h.write(0, 0, 2, 4096);
    assert_eq!(h.replies.errno(t), Some(rustix::io::Errno::IO.raw_os_error()));
}

/// `slink <nr> invalidate`: every region of the site is copied again, out of ordered
/// mode until it ends; SLINK 0 refuses.
#[test]
fn invalidate_copies_every_region_again() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.write(0, 0, 3, 4096);
    h.settle();
    // The RD drifts (someone wrote to it behind our back): invalidate repairs it.
    h.devs[&(1, 0)].poke(5 * REGION, &[0xee; 512]);
    h.control(Control::Invalidate(1));
    assert!(!h.ordered(1));
    h.settle();
    assert!(h.ordered(1));
    let regions = DEV / REGION;
    assert_eq!(h.m.slinks[&1].resync.regions_done, regions, "every region copied once");
    h.assert_copy_equal(1);
    assert!(h.m.control(h.now, Control::Invalidate(0)).is_err());
}

/// A suspended control device holds every device's writes: nothing new goes into the
/// log until it is resumed; a batch already with the appender settles first.
#[test]
fn frozen_group_appends_nothing_until_thawed() {
    let mut h = Harness::new(&[0, 1], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    let a = h.write(0, 0, 1, 4096);
    let io = h.appender_io().expect("a batch");
    h.control(Control::Freeze(true));
    assert!(h.m.appending, "the batch in flight is not settled yet");
    h.run(io);
    assert!(!h.m.appending && h.replies.ok(a), "the batch in flight settles");
    let b = h.write(1, 0, 2, 4096);
    h.settle();
    assert!(!h.replies.answered(b), "held while frozen");
    assert_eq!(h.m.queued(), 1);
    h.control(Control::Freeze(false));
    h.settle();
    assert!(h.replies.ok(b));
}

/// An SLINK whose site keeps its own log takes every epoch the log holds in one apply,
/// in log order (a later write of the same block wins); SLINK 0 and a local RD get one
/// epoch per apply, each durable before the next.
#[test]
fn a_site_with_its_own_log_takes_many_epochs_at_once_local_copies_one_per_apply() {
    let mut h = Harness::new(&[0, 1], &[(1, ASYNC, Thresholds::default()), (2, ASYNC, Thresholds::default())], 8 << 20);
    h.handlers[&2].pretend_keeps_log();
    // Three epochs (one group commit each); the third overwrites the first's block.
    h.write(0, 0, 1, 4096);
    h.append_all();
    h.write(1, 8192, 2, 4096);
    h.append_all();
    h.write(0, 0, 3, 4096);
    h.append_all();
    let epochs: std::collections::BTreeSet<u64> = h.log.entries_from(1, 16).iter().map(|m| m.epoch).collect();
    assert_eq!(epochs.len(), 3, "three group commits, three epochs");
    let Some(Io::Apply(w)) = h.copier_io(2) else { panic!("SLINK 2 has work") };
    assert_eq!(w.entries.len(), 3, "SLINK 2 takes the three epochs together");
    h.last_copier = 2;
    h.run(Io::Apply(w));
    assert_eq!(h.image(2, 0)[0], 3, "the later write of block 0 wins");
    assert_eq!(h.image(2, 1)[8192], 2);
    for nr in [0, 1] {
        for expect in 1..=3 {
            let Some(Io::Apply(w)) = h.copier_io(nr) else { panic!("SLINK {nr} has work") };
            assert_eq!(w.entries.len(), 1, "SLINK {nr} takes one epoch");
            assert_eq!(w.last, expect);
            h.last_copier = nr;
            h.run(Io::Apply(w));
        }
        assert!(h.copier_io(nr).is_none());
    }
    h.assert_copy_equal(1);
    h.assert_copy_equal(2);
}

/// A write appended after the resync found nothing left to copy, but before the SLINK
/// rejoined ordered mode: its region is dirty again, so the resync must go on (it used to
/// stop for good, the SLINK stuck out of ordered mode with one dirty region).
#[test]
fn a_write_landing_after_the_resync_finished_is_copied_too() {
    let mut h = Harness::new(&[0], &[], 8 << 20);
    let hd = handler_with(&mut h.devs, 1, &[0]);
    h.handlers.insert(1, hd.clone());
    let log: Arc<dyn DirtyLog> = Arc::new(CoreLog::new(DEV, REGION));
    h.control(Control::AddSlink(
        SlinkSetup { nr: 1, handler: hd, policy: ASYNC, thresholds: Thresholds::default() },
        vec![(0, log, DEV, true)],
    ));
    assert!(!h.ordered(1));
    // A write is planned (its batch in the appender's hands) ...
    h.write(0, 5 * REGION, 0x77, 4096);
    let io = h.appender_io().expect("a batch");
    assert!(matches!(io, Io::Append(_)));
    // ... the resync copies every region and finds nothing left ...
    h.copy_all(1);
    // ... then the batch lands: region 5 is dirty again.
    h.run(io);
    h.settle();
    assert!(h.ordered(1), "the SLINK is stuck out of ordered mode");
    h.assert_copy_equal(1);
}
