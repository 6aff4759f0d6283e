//! Model-based property test: random appends, cursor moves, failed operations and power
//! cuts against a plain in-memory model of what the log must hold.
//!
//! After every recovery the log must hold exactly the acknowledged entries from some
//! seq at or before the first one an SLINK still needs, with identical metadata and data,
//! followed by nothing, or by the batch that was in flight at the crash, whole. Cursors
//! come back as acknowledged (an in-flight cursor update: old or new). Between crashes,
//! every entry still needed must read back intact (no allocation overwrote it).

use std::sync::Arc;

use proptest::prelude::*;

use dmrep_core::fault::{CrashMode, Fault, IoOp, MemBackend, Trigger};
use dmrep_core::BlockBackend;
use dmrep_formats::replog::RING_OFFSET;

use super::*;

const LOG: u64 = 1 << 20;
const SLINKS: [u16; 3] = [0, 1, 5];

#[derive(Clone, Debug)]
struct Spec {
    kind: EntryKind,
    len: u32,
    /// Bit i: SLINKS[i] needs the entry.
    mask: u8,
}

#[derive(Clone, Copy, Debug)]
enum Crash {
    Drop,
    Random(u64),
    KeepAll,
}

impl Crash {
    fn mode(self) -> CrashMode {
        match self {
            Crash::Drop => CrashMode::DropAllUnsynced,
            Crash::Random(s) => CrashMode::KeepRandomSubset(s),
            Crash::KeepAll => CrashMode::KeepAll,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<Spec>),
    /// The write or the sync of the append fails; no crash; then an explicit sync.
    AppendFails {
        specs: Vec<Spec>,
        fail_sync: bool,
    },
    /// The append's sync fails, then the power goes.
    AppendInFlight(Vec<Spec>, Crash),
    /// Move SLINKS[i]'s cursor part of the way to the last seq.
    SetCursor(usize, u16),
    /// Same, but the superblock write or sync fails; no crash.
    SetCursorFails(usize, u16, bool),
    /// Same, but the superblock sync fails, then the power goes.
    SetCursorInFlight(usize, u16, Crash),
    Crash(Crash),
}

/// An entry as the model knows it.
#[derive(Clone, Debug)]
struct Want {
    id: u64,
    kind: EntryKind,
    len: u32,
    slinks: SlinkSet,
}

impl Want {
    fn data(&self) -> Vec<u8> {
        if self.kind == EntryKind::Write {
            pattern(self.id, self.len as usize)
        } else {
            Vec::new()
        }
    }
}

/// Distinct data per entry id, generated 8 bytes at a time (debug builds are slow).
fn pattern(id: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len.next_multiple_of(8)];
    let seed = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, c) in v.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(seed ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)).to_le_bytes());
    }
    v.truncate(len);
    v
}

struct Model {
    /// Acknowledged entries; seq = index + 1.
    acked: Vec<Want>,
    cursors: [u64; 3],
    /// Cursor updates that failed: their superblock may still become durable (a later
    /// sync), until a successful superblock write replaces it.
    maybe_cursors: [Vec<u64>; 3],
    next_id: u64,
}

impl Model {
    fn next_seq(&self) -> u64 {
        self.acked.len() as u64 + 1
    }

    /// The first seq some SLINK still needs (next_seq if none).
    fn first_needed(&self) -> u64 {
        self.acked
            .iter()
            .zip(1u64..)
            .find(|(w, seq)| SLINKS.iter().zip(self.cursors).any(|(&s, c)| w.slinks.contains(s) && c < *seq))
            .map_or(self.next_seq(), |(_, seq)| seq)
    }

    fn wants(&mut self, specs: &[Spec]) -> Vec<Want> {
        specs
            .iter()
            .map(|sp| {
                self.next_id += 1;
                let slinks = SlinkSet::from_slinks((0..3).filter(|i| sp.mask & (1 << i) != 0).map(|i| SLINKS[i]));
                Want { id: self.next_id, kind: sp.kind, len: sp.len, slinks }
            })
            .collect()
    }
}

fn append(log: &RingLog, wants: &[Want]) -> Result<Vec<EntryMeta>, LogError> {
    let data: Vec<Vec<u8>> = wants.iter().map(Want::data).collect();
    let batch: Vec<NewEntry<'_>> = wants
        .iter()
        .zip(&data)
        .map(|(w, d)| NewEntry {
            dev_nr: (w.id % 3) as u32,
            offset: w.id * 4096,
            kind: w.kind,
            len: w.len,
            data: d,
            slinks: w.slinks,
            origin: None,
        })
        .collect();
    log.append(&batch)
}

fn record_bytes(w: &Want) -> u64 {
    let data = if w.kind == EntryKind::Write { w.len as u64 } else { 0 };
    512 + data.div_ceil(512) * 512
}

fn check_entry(log: &RingLog, e: &EntryMeta, w: &Want) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        (e.dev_nr, e.offset, e.kind, e.len, e.slinks),
        ((w.id % 3) as u32, w.id * 4096, w.kind, w.len, w.slinks)
    );
    let want = w.data();
    let mut buf = vec![0u8; want.len()];
    log.read_data(e, &mut buf).map_err(|err| TestCaseError::fail(format!("read seq {}: {err}", e.seq)))?;
    prop_assert!(buf == want, "data of seq {} differs", e.seq);
    Ok(())
}

/// Between crashes: every entry still needed is live and intact.
fn check_live(log: &RingLog, model: &Model) -> Result<(), TestCaseError> {
    let first = model.first_needed();
    let live = log.entries_from(first, usize::MAX);
    prop_assert_eq!(live.len() as u64, model.next_seq() - first);
    for (e, seq) in live.iter().zip(first..) {
        prop_assert_eq!(e.seq, seq);
        check_entry(log, e, &model.acked[(seq - 1) as usize])?;
    }
    Ok(())
}

/// Power cut, reopen, compare with the model.
fn crash_and_check(
    m: &MemBackend,
    b: &Arc<dyn BlockBackend>,
    crash: Crash,
    model: &mut Model,
    in_flight: Option<Vec<Want>>,
    cursor_in_flight: Option<(usize, u64)>,
) -> Result<RingLog, TestCaseError> {
    m.faults().clear_all();
    m.crash(crash.mode());
    let (log, report) = RingLog::open(b.clone(), 0).map_err(|e| TestCaseError::fail(format!("open: {e}")))?;
    prop_assert!(report.slinks_ahead.is_empty(), "{:?}", report.slinks_ahead);
    for (i, &s) in SLINKS.iter().enumerate() {
        let got = log.cursor(s);
        let in_flight = cursor_in_flight.filter(|&(j, _)| j == i).map(|(_, c)| c);
        match got {
            Some(c) if in_flight == Some(c) || model.maybe_cursors[i].contains(&c) => model.cursors[i] = c,
            _ => prop_assert_eq!(got, Some(model.cursors[i]), "cursor of SLINK {}", s),
        }
    }
    model.maybe_cursors = Default::default();
    let rec = log.entries_from(0, usize::MAX);
    for w in rec.windows(2) {
        prop_assert_eq!(w[1].seq, w[0].seq + 1);
    }
    let first = rec.first().map_or(report.next_seq, |e| e.seq);
    prop_assert!(
        first <= model.first_needed(),
        "lost needed entries: log starts at {} but {} is needed",
        first,
        model.first_needed()
    );
    let acked_tail = &model.acked[(first - 1) as usize..];
    prop_assert!(
        rec.len() >= acked_tail.len(),
        "lost acknowledged entries: {} recovered, {} acked",
        rec.len(),
        acked_tail.len()
    );
    for (e, w) in rec.iter().zip(acked_tail) {
        check_entry(&log, e, w)?;
    }
    let extra = &rec[acked_tail.len()..];
    if !extra.is_empty() {
        let batch = in_flight.ok_or_else(|| TestCaseError::fail(format!("{} entries nobody appended", extra.len())))?;
        prop_assert_eq!(extra.len(), batch.len(), "in-flight batch survived partially");
        for (e, w) in extra.iter().zip(&batch) {
            check_entry(&log, e, w)?;
        }
        model.acked.extend(batch);
    }
    prop_assert_eq!(report.next_seq, model.next_seq());
    prop_assert_eq!(log.stats().next_seq, model.next_seq());
    Ok(log)
}

fn spec() -> impl Strategy<Value = Spec> {
    // Sizes from a few fixed values half of the time, so that a new entry often lands
    // exactly where an older one of the same size was (the stale-entry cases).
    let len = prop_oneof![0u32..150_000, proptest::sample::select(vec![0u32, 512, 4096, 65_536, 100_000])];
    (0u8..10, len, 0u8..8).prop_map(|(k, len, mask)| Spec {
        kind: match k {
            0 => EntryKind::WriteZeroes,
            1 => EntryKind::Discard,
            _ => EntryKind::Write,
        },
        len,
        mask,
    })
}

fn crash() -> impl Strategy<Value = Crash> {
    prop_oneof![Just(Crash::Drop), any::<u64>().prop_map(Crash::Random), Just(Crash::KeepAll)]
}

fn op() -> impl Strategy<Value = Op> {
    let batch = || proptest::collection::vec(spec(), 1..4);
    prop_oneof![
        8 => batch().prop_map(Op::Append),
        5 => (0usize..3, any::<u16>()).prop_map(|(i, f)| Op::SetCursor(i, f)),
        1 => (batch(), any::<bool>()).prop_map(|(specs, fail_sync)| Op::AppendFails { specs, fail_sync }),
        1 => (batch(), crash()).prop_map(|(b, c)| Op::AppendInFlight(b, c)),
        1 => (0usize..3, any::<u16>(), any::<bool>()).prop_map(|(i, f, w)| Op::SetCursorFails(i, f, w)),
        1 => (0usize..3, any::<u16>(), crash()).prop_map(|(i, f, c)| Op::SetCursorInFlight(i, f, c)),
        1 => crash().prop_map(Op::Crash),
    ]
}

/// Where SetCursor(i, frac) moves SLINKS[i]'s cursor.
fn cursor_target(model: &Model, i: usize, frac: u16) -> u64 {
    let (cur, last) = (model.cursors[i], model.next_seq() - 1);
    cur + frac as u64 % (last - cur + 1)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let m = Arc::new(MemBackend::named("model", LOG));
    let b: Arc<dyn BlockBackend> = m.clone();
    let mut log = RingLog::create(b.clone(), 0, LOG).unwrap();
    for s in SLINKS {
        log.register_slink(s).unwrap();
    }
    let ring_len = LOG - RING_OFFSET;
    let mut model = Model { acked: Vec::new(), cursors: [0; 3], maybe_cursors: Default::default(), next_id: 0 };
    for op in ops {
        match op {
            Op::Append(specs) => {
                let wants = model.wants(&specs);
                let nothing_needed = model.first_needed() == model.next_seq();
                match append(&log, &wants) {
                    Ok(metas) => {
                        let seqs: Vec<u64> = metas.iter().map(|e| e.seq).collect();
                        prop_assert_eq!(
                            seqs,
                            (model.next_seq()..model.next_seq() + wants.len() as u64).collect::<Vec<_>>()
                        );
                        model.acked.extend(wants);
                    }
                    Err(LogError::Full { .. }) => {
                        let total: u64 = wants.iter().map(record_bytes).sum();
                        prop_assert!(!(nothing_needed && total <= ring_len), "Full although nothing is needed");
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("append: {e}"))),
                }
                check_live(&log, &model)?;
            }
            Op::AppendFails { specs, fail_sync } => {
                let wants = model.wants(&specs);
                let op = if fail_sync { IoOp::Sync } else { IoOp::Write };
                m.faults().fail(op, Fault::Eio, Trigger::Next(1));
                let r = append(&log, &wants);
                m.faults().clear_all();
                prop_assert!(r.is_err(), "append succeeded through a failing {:?}", op);
                log.sync().map_err(|e| TestCaseError::fail(format!("sync: {e}")))?;
                check_live(&log, &model)?;
            }
            Op::AppendInFlight(specs, c) => {
                let wants = model.wants(&specs);
                m.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Next(1));
                let r = append(&log, &wants);
                prop_assert!(r.is_err());
                drop(log);
                log = crash_and_check(&m, &b, c, &mut model, Some(wants), None)?;
            }
            Op::SetCursor(i, frac) => {
                let target = cursor_target(&model, i, frac);
                log.set_cursors(&[(SLINKS[i], target)]).map_err(|e| TestCaseError::fail(format!("{e}")))?;
                if target != model.cursors[i] {
                    // A superblock was written: it replaced any failed one.
                    model.maybe_cursors = Default::default();
                }
                model.cursors[i] = target;
                check_live(&log, &model)?;
            }
            Op::SetCursorFails(i, frac, fail_write) => {
                let target = cursor_target(&model, i, frac);
                let op = if fail_write { IoOp::Write } else { IoOp::Sync };
                m.faults().fail(op, Fault::Eio, Trigger::Next(1));
                let r = log.set_cursors(&[(SLINKS[i], target)]);
                m.faults().clear_all();
                if r.is_err() {
                    prop_assert_eq!(log.cursor(SLINKS[i]), Some(model.cursors[i]), "failed update installed");
                    model.maybe_cursors[i].push(target);
                } else {
                    prop_assert_eq!(target, model.cursors[i]);
                }
                check_live(&log, &model)?;
            }
            Op::SetCursorInFlight(i, frac, c) => {
                let target = cursor_target(&model, i, frac);
                m.faults().fail(IoOp::Sync, Fault::Eio, Trigger::Next(1));
                let r = log.set_cursors(&[(SLINKS[i], target)]);
                prop_assert!(r.is_err() || target == model.cursors[i]);
                drop(log);
                log = crash_and_check(&m, &b, c, &mut model, None, Some((i, target)))?;
            }
            Op::Crash(c) => {
                drop(log);
                log = crash_and_check(&m, &b, c, &mut model, None, None)?;
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}
