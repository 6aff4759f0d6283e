//! Model-based property test of the group's state machine: random writes to two
//! devices, random interleavings of the appender and the copiers, pauses, freezes and
//! invalidations. After every step, every SLINK in ordered mode holds exactly the
//! group's state after the entries up to its durable position, in log order, on every
//! device at once (write-order fidelity, DESIGN invariant 2); at the end every write has
//! been acknowledged and every copy equals the application's view.

use proptest::prelude::*;

use super::*;

const BLOCKS: u64 = 16;

#[derive(Clone, Debug)]
enum Step {
    Write { dev: DevNr, block: u64 },
    Appender,
    Copier(SlinkNr),
    Pause(SlinkNr, bool),
    Freeze(bool),
    Invalidate,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2u32, 0..BLOCKS).prop_map(|(dev, block)| Step::Write { dev, block }),
        3 => Just(Step::Appender),
        4 => prop::sample::select(vec![0u16, 1, 2]).prop_map(Step::Copier),
        1 => (prop::sample::select(vec![1u16, 2]), any::<bool>()).prop_map(|(n, p)| Step::Pause(n, p)),
        1 => any::<bool>().prop_map(Step::Freeze),
        1 => Just(Step::Invalidate),
    ]
}

/// The group's state (first byte of every block of both devices) after the history's
/// entries up to `through`.
fn state_through(h: &Harness, through: u64) -> BTreeMap<(DevNr, u64), u8> {
    let mut st = BTreeMap::new();
    for (seq, dev, offset, _len, byte) in &h.history {
        if *seq <= through {
            st.insert((*dev, offset / 4096), *byte);
        }
    }
    st
}

fn check_ordered_copies(h: &Harness) -> Result<(), TestCaseError> {
    for (nr, rt) in &h.m.slinks {
        if !rt.ordered || rt.leaving() {
            continue;
        }
        let want = state_through(h, rt.durable);
        for dev in 0..2u32 {
            let img = h.image(*nr, dev);
            for b in 0..BLOCKS {
                let got = img[(b * 4096) as usize];
                let exp = want.get(&(dev, b)).copied().unwrap_or(0);
                prop_assert_eq!(got, exp, "slink {} device {} block {} at durable {}", nr, dev, b, rt.durable);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ordered_copies_are_always_prefix_states(steps in prop::collection::vec(step(), 1..160)) {
        let rds = [(1, ASYNC, Thresholds::default()), (2, SYNC, Thresholds::default())];
        let mut h = Harness::new(&[0, 1], &rds, 8 << 20);
        let mut value = 0u8;
        let mut tags = Vec::new();
        for s in steps {
            match s {
                Step::Write { dev, block } => {
                    value = value % 250 + 1;
                    tags.push(h.write(dev, block * 4096, value, 4096));
                }
                Step::Appender => {
                    if let Some(io) = h.appender_io() {
                        h.run(io);
                    }
                }
                Step::Copier(nr) => {
                    if let Some(io) = h.copier_io(nr) {
                        h.run(io);
                    }
                }
                Step::Pause(nr, p) => h.control(Control::Pause { slink: nr, paused: p }),
                Step::Freeze(f) => h.control(Control::Freeze(f)),
                Step::Invalidate => h.control(Control::Invalidate(1)),
            }
            check_ordered_copies(&h)?;
        }
        // Everything let go: every write answered, every copy the application's view.
        h.control(Control::Freeze(false));
        h.control(Control::Pause { slink: 1, paused: false });
        h.control(Control::Pause { slink: 2, paused: false });
        h.settle();
        check_ordered_copies(&h)?;
        for t in tags {
            prop_assert!(h.replies.ok(t), "write {} not acknowledged", t);
        }
        for nr in [0u16, 1, 2] {
            prop_assert!(h.ordered(nr), "slink {} not ordered at the end", nr);
            h.assert_copy_equal(nr);
        }
    }
}
