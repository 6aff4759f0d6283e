//! Markers: a group-consistent snapshot is taken at exactly a prefix of the group's
//! history, across all its devices, at the LDs (SLINK 0) and at a local SLINK's RDs, while
//! writes go on. Driven at the group level with in-memory devices; the hook captures the
//! devices' contents at the moment it is called (as the daemon's snapshot would).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmrep_core::device::WaitSink;
use dmrep_core::fault::MemBackend;
use dmrep_core::{BlockBackend, Completion, Op, Request};
use dmrep_targets::replicator::fallbehind::{Policy, Thresholds};
use dmrep_targets::replicator::group::{Group, SlinkSetup};
use dmrep_targets::replicator::log::RingLog;
use dmrep_targets::replicator::marker::{MarkerHook, MarkerOutcome, MarkerReached};
use dmrep_targets::replicator::slink::local::LocalSlink;
use dmrep_targets::replicator::slink::SlinkHandler;
use parking_lot::Mutex;

const DEV: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const DEVS: u32 = 2;

/// Captures the devices of the SLINK that reached the marker.
struct Capture {
    /// By slink: the backends the test can read.
    backends: BTreeMap<u16, Vec<Arc<MemBackend>>>,
    got: Mutex<BTreeMap<String, Captured>>,
}

/// The slink that reached a marker, its seq, and its devices' images then.
type Captured = (u16, u64, Vec<Vec<u8>>);

impl MarkerHook for Capture {
    fn reached(&self, at: &MarkerReached) -> MarkerOutcome {
        assert_eq!(at.devices.len(), DEVS as usize, "the hook is told every device");
        let images = self.backends[&at.slink].iter().map(|b| b.current_image()).collect();
        self.got.lock().insert(at.marker.name.clone(), (at.slink, at.seq, images));
        MarkerOutcome::Done(format!("captured {} devices", at.devices.len()))
    }
}

fn slink(name: &str, delay: Option<Duration>) -> (Arc<LocalSlink>, Vec<Arc<MemBackend>>) {
    let h = Arc::new(LocalSlink::new());
    let mut mems = Vec::new();
    for d in 0..DEVS {
        let m = Arc::new(MemBackend::new(DEV));
        m.faults().set_write_delay(delay);
        let path = format!("{name}{d}");
        h.override_path(&path, m.clone());
        h.attach(d, &path, DEV).unwrap();
        mems.push(m);
    }
    (h, mems)
}

/// Write `i` stamps block `i % blocks` of device `i % DEVS` with its number.
fn write_of(i: u64) -> (u32, u64, Vec<u8>) {
    let dev = (i % DEVS as u64) as u32;
    let block = (i * 7919) % (DEV / BLOCK);
    let mut data = vec![0u8; BLOCK as usize];
    for c in data.chunks_mut(8) {
        c.copy_from_slice(&i.to_le_bytes());
    }
    (dev, block * BLOCK, data)
}

/// The devices' contents after writes `1..=k`.
fn model(k: u64) -> Vec<Vec<u8>> {
    let mut imgs = vec![vec![0u8; DEV as usize]; DEVS as usize];
    for i in 1..=k {
        let (d, off, data) = write_of(i);
        imgs[d as usize][off as usize..(off + BLOCK) as usize].copy_from_slice(&data);
    }
    imgs
}

/// The newest write an image holds.
fn newest(imgs: &[Vec<u8>]) -> u64 {
    imgs.iter().flat_map(|img| img.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()))).max().unwrap_or(0)
}

#[test]
fn snapshot_markers_capture_a_prefix_of_the_history_across_devices() {
    let log_dev: Arc<dyn BlockBackend> = Arc::new(MemBackend::new(32 << 20));
    let log = RingLog::create(log_dev, 0, 32 << 20).unwrap();
    let (s0, lds) = slink("ld", None);
    let (s1, rds) = slink("rd", Some(Duration::from_micros(300)));
    let setups = vec![
        SlinkSetup {
            nr: 0,
            handler: s0 as Arc<dyn SlinkHandler>,
            policy: Policy::ASYNCHRONOUS,
            thresholds: Thresholds::default(),
        },
        SlinkSetup {
            nr: 1,
            handler: s1 as Arc<dyn SlinkHandler>,
            policy: Policy::ASYNCHRONOUS,
            thresholds: Thresholds::default(),
        },
    ];
    let group = Group::start("snap", log, "mem".into(), None, setups).unwrap();
    let capture = Arc::new(Capture { backends: BTreeMap::from([(0, lds), (1, rds)]), got: Mutex::default() });
    group.set_marker_hook(capture.clone());

    // One writer, one write at a time: write i is acknowledged before i+1 is submitted.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (g, acked, stop) = (group.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) || i < 400 {
                i += 1;
                let (dev, off, data) = write_of(i);
                let sink = Arc::new(WaitSink::default());
                g.submit_write(
                    dev,
                    Request::new(Op::Write { fua: false }, off, BLOCK, data, i),
                    Completion::new(sink.clone(), i),
                );
                sink.wait().1.expect("write");
                acked.store(i, Ordering::SeqCst);
            }
            i
        })
    };

    let mut checks = Vec::new();
    for round in 0..6u32 {
        while acked.load(Ordering::SeqCst) < 50 * (round as u64 + 1) {
            std::thread::yield_now();
        }
        let nr = (round % 2) as u16;
        let name = format!("s{round}");
        let before = acked.load(Ordering::SeqCst);
        let placed = group.snapshot_marker(&name, nr).unwrap();
        let after = acked.load(Ordering::SeqCst) + 1; // at most one write in flight
        assert_eq!(placed.site, None);
        let outcome = group.wait_marker(&name, Duration::from_secs(20)).expect("the marker is reached");
        assert!(matches!(outcome, MarkerOutcome::Done(_)), "{outcome:?}");
        checks.push((name, nr, before, after, placed.seq));
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    let got = capture.got.lock();
    for (name, nr, before, after, seq) in checks {
        let (slink, hook_seq, imgs) = &got[&name];
        assert_eq!((*slink, *hook_seq), (nr, seq), "{name}: reached by the slink it names, at its seq");
        let k = newest(imgs);
        assert!(
            before <= k && k <= after,
            "{name}: holds writes 1..={k}, acknowledged before it: {before}, after: {after}"
        );
        assert!(*imgs == model(k), "{name} (slink {nr}): not the state after exactly writes 1..={k}");
    }
    // A marker on a slink that does not exist, or at a secondary, is refused by name.
    assert!(group.snapshot_marker("x", 7).unwrap_err().to_string().contains("7"));
    group.shutdown();
}
