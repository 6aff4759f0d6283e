//! R6: the cursor committer used to count a ticket as done when nothing was persisted
//! (a failed superblock write), letting a copier apply epoch e+1 before the cursor of
//! epoch e-1 was durable; a crash then replayed old epochs over newer ones. Here the log
//! device's syncs start failing in the middle of a dependent write workload, the power
//! is cut, the group is recovered and replays: every site must hold a prefix state of
//! the acknowledged history, before and after the replay.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_core::fault::{CrashMode, Fault, IoOp, MemBackend, Trigger};
use dmrep_core::{BlockBackend, Completion, IoSink, Op, Request};
use dmrep_targets::replicator::fallbehind::{Policy, Thresholds};
use dmrep_targets::replicator::group::{Group, SlinkSetup};
use dmrep_targets::replicator::log::RingLog;
use dmrep_targets::replicator::slink::local::LocalSlink;
use dmrep_targets::replicator::slink::SlinkHandler;
use parking_lot::{Condvar, Mutex};

const DEV: u64 = 1 << 20;
const BLOCKS: u64 = 16;
const LOG: u64 = 8 << 20;

#[derive(Default)]
struct Acks {
    done: Mutex<BTreeMap<u64, bool>>,
    cv: Condvar,
}

impl IoSink for Acks {
    fn complete(&self, req: Request, r: io::Result<()>) {
        self.done.lock().insert(req.tag, r.is_ok());
        self.cv.notify_all();
    }
}

impl Acks {
    fn wait(&self, tag: u64) -> bool {
        let mut d = self.done.lock();
        let end = Instant::now() + Duration::from_secs(20);
        while !d.contains_key(&tag) {
            assert!(!self.cv.wait_until(&mut d, end).timed_out(), "write {tag} got no reply");
        }
        d[&tag]
    }
}

struct Site {
    handler: Arc<LocalSlink>,
    dev: Arc<MemBackend>,
}

fn site(name: &str, dev: Arc<MemBackend>) -> Site {
    let h = Arc::new(LocalSlink::new());
    h.override_path(name, dev.clone());
    h.attach(0, name, DEV).unwrap();
    Site { handler: h, dev }
}

fn start(log: RingLog, recovery: bool, s0: &Site, s1: &Site) -> Arc<Group> {
    let async_ = Policy::ASYNCHRONOUS;
    let setups = [s0, s1]
        .iter()
        .enumerate()
        .map(|(nr, s)| SlinkSetup {
            nr: nr as u16,
            handler: s.handler.clone() as Arc<dyn SlinkHandler>,
            policy: async_,
            thresholds: Thresholds::default(),
        })
        .collect();
    let report = recovery.then(|| dmrep_targets::replicator::log::RecoveryReport {
        entries: 0,
        first_seq: 0,
        next_seq: 0,
        bytes: 0,
        incarnation: 0,
        truncated: None,
        slinks_ahead: Vec::new(),
    });
    Group::start("t", log, "mem".into(), report, setups).unwrap()
}

/// Write `i` puts value `i` in every byte of block `i % BLOCKS`; the state after the
/// first `k` writes is what a prefix looks like.
fn state_after(k: u64) -> Vec<u64> {
    let mut s = vec![0; BLOCKS as usize];
    for i in 1..=k {
        s[(i % BLOCKS) as usize] = i;
    }
    s
}

fn image_state(img: &[u8]) -> Vec<u64> {
    (0..BLOCKS as usize).map(|b| u64::from_le_bytes(img[b * 4096..b * 4096 + 8].try_into().unwrap())).collect()
}

/// The prefix length `k` (at least `min_k`) whose state the image holds, if any.
fn prefix_of(img: &[u8], issued: u64, min_k: u64) -> Option<u64> {
    let st = image_state(img);
    (min_k..=issued).find(|k| state_after(*k) == st)
}

/// Wait until SLINK `nr` stops moving (nothing outstanding, or no progress for a while).
fn wait_quiet(g: &Group, nr: u16) {
    let mut last = (u64::MAX, Instant::now());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let st = g.status();
        let s = st.slinks.iter().find(|s| s.slink == nr).unwrap();
        if s.outstanding_ios == 0 || !s.accessible {
            return;
        }
        if s.applied_seq != last.0 {
            last = (s.applied_seq, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(300) {
            return;
        }
        assert!(Instant::now() < end, "slink {nr} never settles");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn cursor_failure_then_power_cut_leaves_prefix_states() {
    for fail_after in [40u64, 75] {
        let log_dev = Arc::new(MemBackend::new(LOG));
        let log = RingLog::create(log_dev.clone() as Arc<dyn BlockBackend>, 0, LOG).unwrap();
        let (s0, s1) = (site("ld", Arc::new(MemBackend::new(DEV))), site("rd", Arc::new(MemBackend::new(DEV))));
        // Slow sites: the copiers lag behind the log by many epochs.
        s0.dev.faults().set_write_delay(Some(Duration::from_millis(2)));
        s1.dev.faults().set_write_delay(Some(Duration::from_millis(2)));
        let group = start(log, false, &s0, &s1);
        let acks = Arc::new(Acks::default());
        let mut acked = 0;
        let mut issued = 0;
        for i in 1..=150u64 {
            if i == fail_after {
                // From now on the log's syncs fail: appends and cursor commits.
                log_dev.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Always);
            }
            let mut buf = vec![0u8; 4096];
            for c in buf.chunks_mut(8) {
                c.copy_from_slice(&i.to_le_bytes());
            }
            let req = Request::new(Op::Write { fua: false }, (i % BLOCKS) * 4096, 4096, buf, i);
            group.submit_write(0, req, Completion::new(acks.clone(), i));
            issued = i;
            // Dependent writes: each waits for the previous acknowledgement.
            if !acks.wait(i) {
                break;
            }
            acked = i;
        }
        assert!(issued > acked, "the fault fired");
        wait_quiet(&group, 0);
        wait_quiet(&group, 1);
        group.shutdown();
        // Power cut everywhere.
        for d in [&log_dev, &s0.dev, &s1.dev] {
            d.crash(CrashMode::DropAllUnsynced);
            d.faults().clear_all();
            d.faults().set_write_delay(None);
        }
        for s in [&s0, &s1] {
            assert!(
                prefix_of(&s.dev.durable_image(), issued, 0).is_some(),
                "a site is not a prefix state after the crash"
            );
        }
        // Recover; the replay is cut short by a failing device (a crash in the middle of
        // it would leave the same): what a site holds at every step is a prefix state.
        for (round, fail_writes) in [(0, true), (1, false)] {
            let (log, _report) = RingLog::open(log_dev.clone() as Arc<dyn BlockBackend>, 0).unwrap();
            let (r0, r1) = (site("ld", s0.dev.clone()), site("rd", s1.dev.clone()));
            if fail_writes {
                for s in [&r0, &r1] {
                    s.dev.faults().fail(IoOp::Write, Fault::Eio, Trigger::After { skip: 1, count: u64::MAX });
                }
            }
            let group = start(log, true, &r0, &r1);
            wait_quiet(&group, 0);
            wait_quiet(&group, 1);
            group.shutdown();
            for s in [&r0, &r1] {
                s.dev.faults().clear_all();
                let min = if fail_writes { 0 } else { acked };
                assert!(
                    prefix_of(&s.dev.current_image(), issued, min).is_some(),
                    "replay round {round}: a site is not a prefix state (holding every acknowledged write: {})",
                    !fail_writes
                );
            }
        }
    }
}

/// The order rule, exactly: SLINK 1 has three epochs to apply and the first cursor
/// commit fails. It may apply epoch 2 (epoch 0's cursor is trivially durable) but never
/// epoch 3, whose start needs epoch 1's cursor durable. (The committer used to count the
/// failed commit as done, and the copier went on.)
#[test]
fn a_failed_cursor_commit_stops_the_copier_before_the_next_epoch() {
    let log_dev = Arc::new(MemBackend::new(LOG));
    let log = RingLog::create(log_dev.clone() as Arc<dyn BlockBackend>, 0, LOG).unwrap();
    let (s0, s1) = (site("ld", Arc::new(MemBackend::new(DEV))), site("rd", Arc::new(MemBackend::new(DEV))));
    let group = start(log, false, &s0, &s1);
    group.set_paused(1, true).unwrap();
    let acks = Arc::new(Acks::default());
    for i in 1..=3u64 {
        let req = Request::new(Op::Write { fua: false }, i * 4096, 4096, vec![i as u8; 4096], i);
        group.submit_write(0, req, Completion::new(acks.clone(), i));
        assert!(acks.wait(i));
    }
    wait_quiet(&group, 0);
    // SLINK 0's last cursor commit has landed (it would otherwise take the failed sync).
    let end = Instant::now() + Duration::from_secs(10);
    while group.status().log.slinks.iter().find(|s| s.slink == 0).map(|s| s.cursor) != Some(3)
        || log_dev.unsynced_writes() > 0
    {
        assert!(Instant::now() < end, "slink 0's cursor never reached 3");
        std::thread::sleep(Duration::from_millis(5));
    }
    log_dev.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Next(1));
    group.set_paused(1, false).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while group.status().log_error.is_none() {
        assert!(Instant::now() < end, "the failed cursor commit reaches the group");
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_quiet(&group, 1);
    let e = group.status().log_error.unwrap();
    assert!(e.contains("cursors"), "{e}");
    let img = s1.dev.current_image();
    assert_eq!(img[4096], 1, "epoch 1 applied");
    assert_eq!(img[3 * 4096], 0, "epoch 3 applied although epoch 1's cursor never became durable");
    group.shutdown();
}
