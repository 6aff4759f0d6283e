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
    let async_ = Policy { synchronous: false, stall: false };
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

#[test]
fn cursor_failure_then_power_cut_leaves_prefix_states() {
    for skip in [3u64, 7, 15] {
        let log_dev = Arc::new(MemBackend::new(LOG));
        let log = RingLog::create(log_dev.clone() as Arc<dyn BlockBackend>, 0, LOG).unwrap();
        let (s0, s1) = (site("ld", Arc::new(MemBackend::new(DEV))), site("rd", Arc::new(MemBackend::new(DEV))));
        let group = start(log, false, &s0, &s1);
        let acks = Arc::new(Acks::default());
        // Syncs of the log fail after a few succeed: appends and cursor commits both.
        log_dev.faults().fail(IoOp::Sync, Fault::Eio, Trigger::After { skip, count: u64::MAX });
        let mut acked = 0;
        let mut issued = 0;
        for i in 1..=200u64 {
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
        assert!(issued > acked, "the fault fired (skip {skip})");
        group.shutdown();
        // Power cut everywhere.
        for d in [&log_dev, &s0.dev, &s1.dev] {
            d.crash(CrashMode::DropAllUnsynced);
            d.faults().clear_all();
        }
        for s in [&s0, &s1] {
            let img = s.dev.durable_image();
            assert!(prefix_of(&img, issued, 0).is_some(), "site not a prefix state after the crash (skip {skip})");
        }
        // Recover and replay: still prefix states, with every acknowledged write.
        let (log, _report) = RingLog::open(log_dev.clone() as Arc<dyn BlockBackend>, 0).unwrap();
        let (r0, r1) = (site("ld", s0.dev.clone()), site("rd", s1.dev.clone()));
        let group = start(log, true, &r0, &r1);
        let end = Instant::now() + Duration::from_secs(20);
        while group.outstanding(0).unwrap() + group.outstanding(1).unwrap() > 0 {
            assert!(Instant::now() < end, "replay did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
        group.shutdown();
        for s in [&r0, &r1] {
            let k = prefix_of(&s.dev.current_image(), issued, acked);
            assert!(
                k.is_some(),
                "after replay a site is not a prefix state holding every acknowledged write (skip {skip})"
            );
        }
    }
}
