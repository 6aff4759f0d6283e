//! Power cuts during copy-outs, at every I/O: the origin and the COW device stop taking
//! writes and syncs after the k-th one (every later one fails), then both lose power
//! ([`MemBackend::crash`] keeping a random subset of their unsynced writes, torn at 512
//! bytes). After a restart the persistent snapshot must read exactly as the origin did
//! when it was taken, whatever origin writes reached the disk; and it must go on
//! working, through several such crashes in a row (stale metadata of an earlier open
//! must not be read back).

use std::sync::atomic::{AtomicI64, Ordering};

use dmrep_core::fault::CrashMode;

use super::*;

const SIZE: u64 = 32 * KIB;
/// 512-byte chunks: one metadata block per area, so a 64-chunk origin spans three
/// areas and multi-chunk writes commit across blocks and areas.
const CHUNK: u64 = 512;

/// A back-end that takes `budget` writes/syncs (shared with others), then fails all.
struct Budget {
    inner: Arc<MemBackend>,
    left: Arc<AtomicI64>,
}

impl Budget {
    fn take(&self) -> io::Result<()> {
        if self.left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

impl BlockBackend for Budget {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.take()?;
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.take()?;
        self.inner.sync()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.take()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.take()?;
        self.inner.write_zeroes(offset, len, may_trim)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }
}

/// Opens origin and snapshot over the devices with `left` writes/syncs to go (for the
/// COW device only, with `cow_only`: the origin keeps working after the COW device
/// died, and must then refuse writes the snapshot cannot take).
fn open(
    om: &Arc<MemBackend>,
    cow: &Arc<MemBackend>,
    left: &Arc<AtomicI64>,
    cow_only: bool,
) -> (Arc<CowOrigin>, Arc<Snapshot>) {
    let origin_left = if cow_only { Arc::new(AtomicI64::new(i64::MAX)) } else { left.clone() };
    let origin = CowOrigin::new(Arc::new(Budget { inner: om.clone(), left: origin_left }));
    let c = Arc::new(Budget { inner: cow.clone(), left: left.clone() });
    let s = Snapshot::open(&origin, c, "cow", CHUNK, true).unwrap();
    (origin, s)
}

/// Origin writes of cycle `cycle` of run `seed`: partial chunks, several chunks, some
/// zeroes.
fn workload(origin: &CowOrigin, seed: u64, cycle: u64) {
    let mut rng = Rng(seed * 1000 + cycle);
    for i in 0..10 {
        let off = rng.next() % SIZE;
        let len = 1 + rng.next() % (SIZE - off).min(6 * CHUNK);
        let r = if i % 4 == 3 {
            origin.write_zeroes(off, len, false)
        } else {
            origin.write_at(&vec![(cycle * 16 + i + 1) as u8; len as usize], off)
        };
        // After the "power" is gone, nothing more gets through; the origin, alone,
        // may still take writes (`cow_only`), so the workload goes on.
        let _ = r;
    }
}

#[test]
fn a_power_cut_at_any_io_of_a_copy_out_leaves_the_snapshot_intact() {
    let mut runs = 0;
    for seed in 0..10u64 {
        let cow_only = seed % 2 == 1;
        // How many writes/syncs a cycle takes when nothing fails.
        let total = {
            let (om, _) = patterned(SIZE);
            let cow = Arc::new(MemBackend::named("cow", 8 * SIZE));
            let left = Arc::new(AtomicI64::new(i64::MAX));
            let (origin, _s) = open(&om, &cow, &left, cow_only);
            let before = left.load(Ordering::SeqCst);
            workload(&origin, seed, 0);
            (before - left.load(Ordering::SeqCst)) as u64
        };
        assert!(total > 20, "the workload does I/O ({total})");
        for k in 0..=total {
            let (om, img) = patterned(SIZE);
            let cow = Arc::new(MemBackend::named("cow", 8 * SIZE));
            // Crashes in a row, at different points of each cycle.
            let budgets = [k, (k * 7 + 3) % (total + 1), total - k, (k * 13 + 5) % (total + 1), k / 2, (k + total) / 2];
            for (cycle, budget) in budgets.into_iter().enumerate() {
                let left = Arc::new(AtomicI64::new(i64::MAX));
                let (origin, s) = open(&om, &cow, &left, cow_only);
                left.store(budget as i64, Ordering::SeqCst);
                workload(&origin, seed, cycle as u64);
                drop((origin, s));
                let crash = CrashMode::KeepRandomSubset(seed << 32 | k << 8 | cycle as u64);
                om.crash(crash);
                cow.crash(crash);
                // Restart: the snapshot is valid and reads the origin as it was taken.
                let left = Arc::new(AtomicI64::new(i64::MAX));
                let (_origin, s) = open(&om, &cow, &left, cow_only);
                assert!(s.is_valid(), "seed {seed} k {k} cycle {cycle} cow_only {cow_only}");
                let got = snap_read(&s, 0, SIZE).unwrap();
                if got != img {
                    let bad = (0..SIZE as usize).find(|&i| got[i] != img[i]).unwrap();
                    panic!(
                        "seed {seed} k {k} cycle {cycle} cow_only {cow_only}: snapshot differs at byte {bad} (chunk {}): {:#04x}, want {:#04x}",
                        bad as u64 / CHUNK,
                        got[bad],
                        img[bad]
                    );
                }
                runs += 1;
            }
        }
    }
    assert!(runs > 200, "{runs} crash points");
}

/// Snapshot writes (each synced, as with FUA) interleaved with origin writes, power cut
/// at every I/O: after the restart the snapshot holds every acknowledged write and the
/// origin's old data elsewhere; only the bytes of the write in flight may be old or new.
#[test]
fn a_power_cut_during_snapshot_writes_keeps_every_acknowledged_one() {
    let run = |seed: u64, budget: i64| -> u64 {
        let (om, img) = patterned(SIZE);
        let cow = Arc::new(MemBackend::named("cow", 8 * SIZE));
        let left = Arc::new(AtomicI64::new(i64::MAX));
        let (origin, s) = open(&om, &cow, &left, false);
        left.store(budget, Ordering::SeqCst);
        let start = left.load(Ordering::SeqCst);
        let mut model = img.clone();
        let mut in_flight = None;
        let mut rng = Rng(seed);
        for i in 0..12u64 {
            let off = rng.next() % SIZE;
            let len = 1 + rng.next() % (SIZE - off).min(3 * CHUNK);
            let data = vec![0x80 + i as u8; len as usize];
            if i % 2 == 0 {
                let _ = origin.write_at(&data, off);
            } else if s.write_at(Some(&data), off, len).and_then(|()| s.sync()).is_ok() {
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            } else {
                in_flight = Some((off, data));
                break;
            }
        }
        let used = (start - left.load(Ordering::SeqCst).max(0)) as u64;
        drop((origin, s));
        let crash = CrashMode::KeepRandomSubset(seed << 20 | budget as u64);
        om.crash(crash);
        cow.crash(crash);
        let left = Arc::new(AtomicI64::new(i64::MAX));
        let (_origin, s) = open(&om, &cow, &left, false);
        assert!(s.is_valid());
        let got = snap_read(&s, 0, SIZE).unwrap();
        for i in 0..SIZE as usize {
            let new = in_flight.as_ref().and_then(|(off, d): &(u64, Vec<u8>)| {
                (i as u64).checked_sub(*off).and_then(|j| d.get(j as usize)).copied()
            });
            assert!(
                got[i] == model[i] || Some(got[i]) == new,
                "seed {seed} budget {budget}: byte {i} (chunk {}) is {:#04x}, want {:#04x}",
                i as u64 / CHUNK,
                got[i],
                model[i]
            );
        }
        used
    };
    let mut points = 0;
    for seed in 0..4u64 {
        let total = run(seed, i64::MAX / 2);
        for k in 0..=total {
            run(seed, k as i64);
            points += 1;
        }
    }
    assert!(points > 100, "{points} crash points");
}
