//! Fall-behind: an asynchronous SLINK over a slow device is forced synchronous at its
//! threshold, never lags past its `ios` bound, and goes back to asynchronous when it
//! drains. Driven at the group level with in-memory devices (the RD delays writes).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_core::fault::MemBackend;
use dmrep_core::{BlockBackend, Completion, IoSink, Op, Request};
use dmrep_targets::replicator::fallbehind::{InForce, Policy, Thresholds};
use dmrep_targets::replicator::group::{Group, SlinkSetup};
use dmrep_targets::replicator::log::RingLog;
use dmrep_targets::replicator::slink::local::LocalSlink;
use dmrep_targets::replicator::slink::SlinkHandler;

const DEV: u64 = 8 << 20;
const BOUND: u64 = 20;

struct Counter {
    done: AtomicU64,
    failed: AtomicU64,
}

impl IoSink for Counter {
    fn complete(&self, _req: Request, r: io::Result<()>) {
        if r.is_err() {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        self.done.fetch_add(1, Ordering::SeqCst);
    }
}

fn wait_until(deadline: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

/// A group over in-memory devices: an LD on SLINK 0 (asynchronous) and an RD on SLINK 1
/// with `policy` and `thresholds`. Returns the group and both devices.
fn group_with(
    policy: Policy,
    thresholds: Thresholds,
    rd_write_delay: Option<Duration>,
) -> (Arc<Group>, Arc<MemBackend>, Arc<MemBackend>) {
    let log_dev: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(64 << 20));
    let log = RingLog::create(log_dev, 0, 64 << 20).unwrap();
    let ld = Arc::new(MemBackend::new(DEV));
    let rd = Arc::new(MemBackend::new(DEV));
    rd.faults().set_write_delay(rd_write_delay);
    let s0 = Arc::new(LocalSlink::new());
    s0.override_path("ld", ld.clone());
    s0.attach(0, "ld", DEV).unwrap();
    let s1 = Arc::new(LocalSlink::new());
    s1.override_path("rd", rd.clone());
    s1.attach(0, "rd", DEV).unwrap();
    let async_ = Policy::ASYNCHRONOUS;
    let group = Group::start(
        "test",
        log,
        "mem".into(),
        None,
        vec![
            SlinkSetup {
                nr: 0,
                handler: s0 as Arc<dyn SlinkHandler>,
                policy: async_,
                thresholds: Thresholds::default(),
            },
            SlinkSetup { nr: 1, handler: s1 as Arc<dyn SlinkHandler>, policy, thresholds },
        ],
    )
    .unwrap();
    (group, ld, rd)
}

#[test]
fn forced_sync_at_threshold_and_back() {
    let (group, ld, rd) = group_with(
        Policy::ASYNCHRONOUS,
        Thresholds { ios: Some(BOUND), ..Default::default() },
        Some(Duration::from_millis(3)),
    );

    // Watch the lag of SLINK 1 the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(AtomicU64::new(0));
    let forced_seen = Arc::new(AtomicBool::new(false));
    let mon = {
        let (g, stop, max_seen, forced_seen) = (group.clone(), stop.clone(), max_seen.clone(), forced_seen.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                max_seen.fetch_max(g.outstanding(1).unwrap(), Ordering::SeqCst);
                if g.status().slinks[1].mode == InForce::ForcedSynchronous {
                    forced_seen.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    let sink = Arc::new(Counter { done: AtomicU64::new(0), failed: AtomicU64::new(0) });
    let total = 300u64;
    for i in 0..total {
        let block = (i * 7919) % (DEV / 4096);
        let data = vec![(i % 251) as u8; 4096];
        group.submit_write(
            0,
            Request::new(Op::Write { fua: false }, block * 4096, 4096, data, i),
            Completion::new(sink.clone(), i),
        );
        // Keep up to 64 writes in flight, like a client at queue depth 64.
        assert!(wait_until(Duration::from_secs(30), || i + 1 - sink.done.load(Ordering::SeqCst) < 64));
    }
    assert!(
        wait_until(Duration::from_secs(60), || sink.done.load(Ordering::SeqCst) == total),
        "writes did not complete"
    );
    assert_eq!(sink.failed.load(Ordering::SeqCst), 0);
    assert!(wait_until(Duration::from_secs(60), || group.outstanding(1) == Some(0)), "slink 1 did not drain");
    stop.store(true, Ordering::SeqCst);
    mon.join().unwrap();

    let max = max_seen.load(Ordering::SeqCst);
    assert!(max <= BOUND, "slink 1 lagged {max} entries, bound is {BOUND}");
    assert!(forced_seen.load(Ordering::SeqCst), "slink 1 was never forced synchronous");
    // Back under the threshold (after the forced mode's short dwell), asynchronous again.
    assert!(
        wait_until(Duration::from_secs(5), || group.status().slinks[1].mode == InForce::Asynchronous),
        "back under the threshold, asynchronous again"
    );
    let st = group.status();
    assert!(st.slinks[1].mode_switches >= 2, "switched to forced sync and back: {}", st.slinks[1].mode_switches);
    // Both sites hold the same data.
    assert!(wait_until(Duration::from_secs(10), || group.outstanding(0) == Some(0)));
    assert_eq!(ld.current_image(), rd.current_image());
    group.shutdown();
}

#[test]
fn synchronous_slink_has_the_write_at_acknowledgement() {
    let (group, _ld, rd) = group_with(Policy::SYNCHRONOUS, Thresholds::default(), None);
    for i in 0..50u64 {
        let w = Arc::new(dmrep_core::device::WaitSink::default());
        group.submit_write(
            0,
            Request::new(Op::Write { fua: false }, i * 4096, 4096, vec![i as u8 + 1; 4096], i),
            Completion::new(w.clone(), i),
        );
        let (_, r) = w.wait();
        r.unwrap();
        // Acknowledged: durable on the synchronous RD already.
        let img = rd.durable_image();
        assert_eq!(&img[(i * 4096) as usize..(i * 4096 + 4096) as usize], &vec![i as u8 + 1; 4096][..]);
    }
    group.shutdown();
}
