//! Model-checked random workload: writes, write-zeroes and discards of any size and
//! offset (partial chunks included) to the origin and to two snapshots of different chunk
//! sizes, snapshots taken mid-way, stores reopened. After every step, each snapshot reads
//! as the origin did when it was taken plus its own writes, and the origin reads as all
//! origin writes.

use proptest::prelude::*;

use super::*;

const SIZE: u64 = 48 * KIB;

#[derive(Clone, Debug)]
enum Step {
    /// Write `len` bytes of `byte` at `off` to the origin (0) or a snapshot (1, 2).
    Write { to: usize, off: u64, len: u64, byte: u8 },
    /// Zeroes (write-zeroes on a snapshot; discard or write-zeroes on the origin).
    Zero { to: usize, off: u64, len: u64 },
    /// Take snapshot 2 now (if not taken yet).
    TakeSecond,
    /// Close and reopen the persistent store of snapshot 1 (a clean restart).
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(12 * KIB)));
    prop_oneof![
        6 => (0usize..3, range.clone(), any::<u8>()).prop_map(|(to, (off, len), byte)| Step::Write { to, off, len, byte }),
        1 => (0usize..3, range).prop_map(|(to, (off, len))| Step::Zero { to, off, len }),
        1 => Just(Step::TakeSecond),
        1 => Just(Step::Reopen),
    ]
}

fn apply(model: &mut [u8], off: u64, len: u64, byte: u8) {
    model[off as usize..(off + len) as usize].fill(byte);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn snapshots_read_the_origin_at_snapshot_time_plus_their_writes(
        chunk1 in proptest::sample::select(vec![512u64, 4096, 16384]),
        chunk2 in proptest::sample::select(vec![1024u64, 8192]),
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        let (om, img) = patterned(SIZE);
        let origin = CowOrigin::new(om.clone());
        let cow1 = Arc::new(MemBackend::named("cow1", 4 * SIZE));
        let cow2 = Arc::new(MemBackend::named("cow2", 4 * SIZE));
        let mut snaps = [Some(Snapshot::open(&origin, cow1.clone(), "cow1", chunk1, true).unwrap()), None];
        let mut models = [img.clone(), img.clone(), Vec::new()];
        for st in steps {
            if let Step::Write { to, .. } | Step::Zero { to, .. } = st {
                if to > 0 && snaps[to - 1].is_none() {
                    continue;
                }
            }
            match st {
                Step::Write { to, off, len, byte } => {
                    let data = vec![byte; len as usize];
                    match to {
                        0 => origin.write_at(&data, off).unwrap(),
                        _ => snaps[to - 1].as_ref().unwrap().write_at(Some(&data), off, len).unwrap(),
                    }
                    apply(&mut models[to], off, len, byte);
                }
                Step::Zero { to, off, len } => {
                    match to {
                        0 if off % 2 == 0 => origin.discard(off, len).unwrap(),
                        0 => origin.write_zeroes(off, len, false).unwrap(),
                        _ => snaps[to - 1].as_ref().unwrap().write_at(None, off, len).unwrap(),
                    }
                    apply(&mut models[to], off, len, 0);
                }
                Step::TakeSecond => {
                    if snaps[1].is_none() {
                        snaps[1] = Some(Snapshot::open(&origin, cow2.clone(), "cow2", chunk2, false).unwrap());
                        models[2] = models[0].clone();
                    }
                }
                Step::Reopen => {
                    let s = snaps[0].take().unwrap();
                    s.sync().unwrap();
                    drop(s);
                    snaps[0] = Some(Snapshot::open(&origin, cow1.clone(), "cow1", chunk1, true).unwrap());
                }
            }
            prop_assert!(read(&*om, 0, SIZE) == models[0], "origin differs from its model");
            for (i, s) in snaps.iter().enumerate() {
                if let Some(s) = s {
                    prop_assert!(s.is_valid());
                    prop_assert!(snap_read(s, 0, SIZE).unwrap() == models[i + 1], "snapshot {} differs", i + 1);
                }
            }
        }
        // Reads at odd offsets and lengths agree too.
        let s = snaps[0].as_ref().unwrap();
        for (off, len) in [(1u64, 1u64), (511, 2), (4095, 4099), (SIZE - 3, 3)] {
            prop_assert_eq!(snap_read(s, off, len).unwrap(), models[1][off as usize..(off + len) as usize].to_vec());
        }
    }
}
