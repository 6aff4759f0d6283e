//! Write-order fidelity of a replication group under `kill -9` (DESIGN.md section 4,
//! invariants 1-3).
//!
//! First, tests of the checker itself (tests/common/wof.rs): hand-built images that
//! break write order, lose an acknowledged write, hold a lost write or a corrupt block
//! are rejected, valid prefixes are accepted, and the same over many simulated
//! histories. Then the crash test: two devices as one group (the paper's third example)
//! written through NBD by a workload of dependent writes, the daemon killed at random
//! moments, and every copy checked to be a prefix state of the write history.
//!
//! Environment: `WOF_SEED` (reproduce a run's random choices), `WOF_KILLS` (number of
//! kill points at most, default 60; beyond 20 only while the first 45 s last).

mod common;
#[path = "common/nbd_client.rs"]
mod nbd_client;
#[path = "common/wof.rs"]
mod wof;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::*;
use wof::*;

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------
// The checker: it must be able to fail.

/// A history built by hand: `ops` is a list of `Issue(dev, block)` / `Ack(seq)`.
enum Op {
    Issue(u32, u64),
    Ack(u64),
}

fn history(ops: &[Op]) -> History {
    let mut h = History::new(2, 16);
    h.begin_segment();
    for op in ops {
        match *op {
            Op::Issue(d, b) => {
                h.issue(d, b);
            }
            Op::Ack(s) => h.ack(s),
        }
    }
    h
}

/// Images holding exactly the writes `seqs` (applied in that order).
fn image(h: &History, seqs: &[u64]) -> Stamps {
    let mut m = MemImages::new(h.ndev, h.nblocks);
    for &s in seqs {
        m.apply(h.get(s).unwrap());
    }
    scan(&mut m, h.nblocks, 0).expect("hand-built images decode")
}

fn rejected(r: Result<PrefixReport, String>, word: &str) -> String {
    match r {
        Ok(rep) => panic!("the checker accepted an invalid state: {rep:?}"),
        Err(e) => {
            assert!(e.contains(word), "rejected, but not for {word:?}: {e}");
            e
        }
    }
}

#[test]
fn checker_rejects_a_write_visible_without_an_earlier_completed_one() {
    use Op::*;
    // 1: dev 0 block 5, completed; then 2: dev 1 block 7, issued after 1 completed.
    let h = history(&[Issue(0, 5), Ack(1), Issue(1, 7), Ack(2)]);
    assert_eq!(h.get(2).unwrap().p, 1);
    // Valid prefixes: nothing, {1}, {1, 2}.
    for seqs in [&[][..], &[1], &[1, 2]] {
        check_prefix(&h, &image(&h, seqs)).unwrap_or_else(|e| panic!("prefix {seqs:?} rejected: {e}"));
    }
    // 2 without 1, across devices of the group.
    let e = rejected(check_prefix(&h, &image(&h, &[2])), "ORDER VIOLATION");
    assert!(e.contains("dev 0 block 5: expected at least write 1, found nothing"), "{e}");
}

#[test]
fn checker_accepts_concurrent_writes_in_either_order() {
    use Op::*;
    // 1 and 2 both in flight together: neither completed before the other was issued.
    let h = history(&[Issue(0, 1), Issue(1, 2), Ack(2), Ack(1), Issue(0, 3)]);
    for seqs in [&[1][..], &[2], &[1, 2], &[2, 1], &[1, 2, 3]] {
        check_prefix(&h, &image(&h, seqs)).unwrap_or_else(|e| panic!("{seqs:?} rejected: {e}"));
    }
    // 3 was issued after both completed.
    rejected(check_prefix(&h, &image(&h, &[2, 3])), "expected at least write 1");
    rejected(check_prefix(&h, &image(&h, &[1, 3])), "expected at least write 2");
}

#[test]
fn checker_rejects_an_overwrite_that_went_missing() {
    use Op::*;
    // Block 4 of dev 0 written by 1 then 2 (each completed); then 3 on dev 1.
    let h = history(&[Issue(0, 4), Ack(1), Issue(0, 4), Ack(2), Issue(1, 9), Ack(3)]);
    check_prefix(&h, &image(&h, &[1])).unwrap();
    check_prefix(&h, &image(&h, &[1, 2, 3])).unwrap();
    let e = rejected(check_prefix(&h, &image(&h, &[1, 3])), "ORDER VIOLATION");
    assert!(e.contains("dev 0 block 4: expected at least write 2, found write 1"), "{e}");
}

#[test]
fn checker_flags_missing_acknowledged_writes() {
    use Op::*;
    let h = history(&[Issue(0, 4), Issue(1, 4), Ack(2)]);
    // 1 never acknowledged: its absence is fine; 2 acknowledged: must be there.
    assert_eq!(check_acked(&h, &image(&h, &[2])), Ok(1));
    let e = check_acked(&h, &image(&h, &[1])).unwrap_err();
    assert!(e.contains("ACKNOWLEDGED WRITE MISSING: dev 1 block 4"), "{e}");
}

#[test]
fn checker_flags_corruption_and_lost_writes() {
    use Op::*;
    let mut h = history(&[Issue(0, 3), Issue(1, 3), Ack(2)]);
    // A bit flip.
    let mut m = MemImages::new(2, 16);
    m.apply(h.get(1).unwrap());
    m.devs[0][3 * BLOCK + 100] ^= 1;
    let e = scan(&mut m, 16, 0).unwrap_err();
    assert!(e.contains("CORRUPTION: dev 0 block 3") && e.contains("checksum"), "{e}");
    // A stamp at the wrong place (a misdirected write).
    let mut m = MemImages::new(2, 16);
    m.set(0, 4, &encode_stamp(1, 0, 3));
    let e = scan(&mut m, 16, 0).unwrap_err();
    assert!(e.contains("CORRUPTION: dev 0 block 4") && e.contains("names dev 0 block 3"), "{e}");
    // Garbage.
    let mut m = MemImages::new(2, 16);
    m.set(1, 0, &[0xa5; BLOCK]);
    assert!(scan(&mut m, 16, 2).unwrap_err().contains("CORRUPTION: dev 1 block 0"));
    // A stamp the history does not have.
    let mut m = MemImages::new(2, 16);
    m.set(1, 2, &encode_stamp(99, 1, 2));
    let st = scan(&mut m, 16, 0).unwrap();
    rejected(check_prefix(&h, &st), "does not have");
    // A write in flight at a kill that the restarted primary does not have must never
    // show up anywhere.
    let primary = image(&h, &[2]);
    assert_eq!(settle_pending(&mut h, &primary), Ok((0, 1)));
    assert_eq!(h.get(1).unwrap().outcome, Outcome::Lost);
    rejected(check_prefix(&h, &image(&h, &[1, 2])), "DIVERGENCE");
    check_prefix(&h, &image(&h, &[2])).unwrap();
    // Settled writes count as completed for later writes.
    h.issue(1, 5);
    assert_eq!(h.get(3).unwrap().p, 2);
}

#[test]
fn history_round_trips_through_json() {
    use Op::*;
    let mut h = history(&[Issue(0, 3), Issue(1, 3), Ack(2), Issue(0, 7)]);
    h.end_segment("connection lost");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.json");
    h.save(&p).unwrap();
    assert_eq!(History::load(&p).unwrap(), h);
}

/// A simulated primary: writes issued with up to `q` in flight, each appended to the
/// "log" at some random moment after its issue and acknowledged at some random moment
/// after that. The log order is a legal order; every prefix of it is a valid state.
fn simulate(rng: &mut StdRng, n: u64, q: usize) -> (History, Vec<u64>) {
    let mut h = History::new(2, 8); // few blocks: many overwrites
    h.begin_segment();
    let mut issued_not_logged: Vec<u64> = Vec::new();
    let mut logged_not_acked: Vec<u64> = Vec::new();
    let mut order = Vec::new();
    let busy = |h: &History, d, b| {
        h.writes.iter().any(|w: &WriteRec| w.dev == d && w.block == b && w.outcome == Outcome::Pending)
    };
    while (h.issued() as u64) < n || !issued_not_logged.is_empty() || !logged_not_acked.is_empty() {
        let in_flight = issued_not_logged.len() + logged_not_acked.len();
        match rng.random_range(0..3) {
            0 if in_flight < q && (h.issued() as u64) < n => {
                let (d, b) = (rng.random_range(0..2), rng.random_range(0..8));
                if !busy(&h, d, b) {
                    issued_not_logged.push(h.issue(d, b).seq);
                }
            }
            1 if !issued_not_logged.is_empty() => {
                let s = issued_not_logged.swap_remove(rng.random_range(0..issued_not_logged.len()));
                order.push(s);
                logged_not_acked.push(s);
            }
            2 if !logged_not_acked.is_empty() => {
                let s = logged_not_acked.swap_remove(rng.random_range(0..logged_not_acked.len()));
                h.ack(s);
            }
            _ => {}
        }
    }
    (h, order)
}

#[test]
fn checker_accepts_every_prefix_and_rejects_mutilated_prefixes_of_simulated_histories() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut rejected_count = 0;
    for _ in 0..40 {
        let (h, order) = simulate(&mut rng, 200, 6);
        // The state after each prefix of the log order (stamps kept directly; the
        // images of the full order are decoded at the end as a cross-check).
        let mut st = image(&h, &[]);
        let mut stamps = vec![st.clone()];
        let idx = |dev: u32, block: u64| (dev as u64 * 8 + block) as usize;
        for (k, &s) in order.iter().enumerate() {
            let w = h.get(s).unwrap();
            st.seq[idx(w.dev, w.block)] = s;
            let rep = check_prefix(&h, &st).unwrap_or_else(|e| panic!("prefix of {} writes rejected: {e}", k + 1));
            // Mutilate: put back the previous content of a block whose current write is
            // required by a visible write of another block.
            let witness_block = {
                let w = st.seq.iter().copied().filter(|&s| s != 0).max_by_key(|&s| (h.get(s).unwrap().p, s));
                w.map(|s| (h.get(s).unwrap().dev, h.get(s).unwrap().block))
            };
            for dev in 0..2u32 {
                for block in 0..8u64 {
                    let cur = st.at(dev, block);
                    if cur == 0 || cur > rep.w || Some((dev, block)) == witness_block {
                        continue;
                    }
                    let prev = order[..k].iter().rev().copied().find(|&s| {
                        let w = h.get(s).unwrap();
                        w.dev == dev && w.block == block && s != cur
                    });
                    let mut bad = st.clone();
                    bad.seq[idx(dev, block)] = prev.unwrap_or(0);
                    rejected(check_prefix(&h, &bad), "ORDER VIOLATION");
                    rejected_count += 1;
                }
            }
            stamps.push(st.clone());
        }
        assert_eq!(&image(&h, &order), stamps.last().unwrap());
        // Live checks: any earlier read, then any later read, passes.
        for _ in 0..20 {
            let a = rng.random_range(0..stamps.len());
            let b = rng.random_range(a..stamps.len());
            check_live(&h, &stamps[a], &stamps[b]).unwrap_or_else(|e| panic!("live {a}..{b}: {e}"));
        }
        // Every acknowledged write is in the complete state.
        check_acked(&h, stamps.last().unwrap()).unwrap();
    }
    assert!(rejected_count > 1000, "only {rejected_count} mutilations tried");
    eprintln!("{rejected_count} mutilated prefix states rejected");
}

#[test]
fn live_check_rejects_a_persistent_violation() {
    use Op::*;
    let h = history(&[Issue(0, 5), Ack(1), Issue(1, 7), Ack(2)]);
    let lo = image(&h, &[2]);
    let hi = image(&h, &[2]);
    rejected(check_live(&h, &lo, &hi), "ORDER VIOLATION (live)");
    check_live(&h, &image(&h, &[1]), &image(&h, &[1, 2])).unwrap();
    // A second read older than the first: the image went backwards.
    rejected(check_live(&h, &image(&h, &[1, 2]), &image(&h, &[1])), "GOING BACKWARDS");
}

// ---------------------------------------------------------------------------------
// The crash test.

/// Blocks written on each device (the first 8 MiB).
const NBLOCKS: u64 = 2048;
/// Kill points at least.
const MIN_KILLS: usize = 20;
/// Time after which no kill point beyond [`MIN_KILLS`] is started.
const KILL_BUDGET: Duration = Duration::from_secs(45);
const DEV_SECTORS: u64 = 65536;

fn group_table(dir: &std::path::Path) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    format!(
        "0 {DEV_SECTORS} replicator \\\n  default 4 {} 0 auto 65536 \\\n  local 2 0 asynchronous \\\n  2 0 {} \\\n  - 0 \\\n  \
         local 2 0 asynchronous \\\n  2 1 {} \\\n  - 0 \\\n  local 3 1 asynchronous ios=100 \\\n  2 0 {} \\\n  \
         core 2 2048 nosync \\\n  local 3 1 asynchronous ios=100 \\\n  2 1 {} \\\n  core 2 2048 nosync\n",
        p("replog"),
        p("lvol0"),
        p("lvol1"),
        p("sdc"),
        p("sdd")
    )
}

fn slinks_outstanding(d: &Daemon) -> Vec<(u64, u64)> {
    let v = d.json(&["status", "r0"]);
    let s = v[0]["segments"][0]["detail"]["slinks"]
        .as_array()
        .unwrap_or_else(|| panic!("no slinks in status r0 --json: {v}"))
        .clone();
    s.iter().map(|s| (s["slink"].as_u64().unwrap(), s["outstanding_ios"].as_u64().unwrap())).collect()
}

fn file_hash(p: &std::path::Path) -> (u64, u32) {
    let b = std::fs::read(p).unwrap();
    (b.len() as u64, crc32(&b))
}

struct Run {
    hist: Arc<Mutex<History>>,
    hist_path: PathBuf,
    seed: u64,
}

impl Run {
    /// Fail the test with `msg`, keeping the history for a post-mortem.
    fn fail(&self, msg: String) -> ! {
        let keep = PathBuf::from(format!("/tmp/wof-failed-{}-{}.json", std::process::id(), self.seed));
        if let Ok(h) = self.hist.lock() {
            let _ = h.save(&keep);
        }
        panic!("{msg}\n(seed {}: rerun with WOF_SEED={}; history kept in {})", self.seed, self.seed, keep.display());
    }

    fn ok<T>(&self, r: Result<T, String>, what: &str) -> T {
        match r {
            Ok(v) => v,
            Err(e) => self.fail(format!("{what}: {e}")),
        }
    }

    fn check_files(&self, what: &str, paths: &[PathBuf]) -> (Stamps, PrefixReport) {
        let mut imgs = FileImages::open(paths).unwrap();
        let st = self.ok(scan(&mut imgs, NBLOCKS, 0), what);
        let r = check_prefix(&self.hist.lock().unwrap(), &st);
        (st.clone(), self.ok(r, what))
    }

    /// Two reads of the RD files while the writer runs.
    fn check_live_files(&self, paths: &[PathBuf]) -> PrefixReport {
        let mut imgs = FileImages::open(paths).unwrap();
        let lo = self.ok(scan(&mut imgs, NBLOCKS, 20), "live RD read 1");
        let hi = self.ok(scan(&mut imgs, NBLOCKS, 20), "live RD read 2");
        let h = self.hist.lock().unwrap().clone();
        self.ok(check_live(&h, &lo, &hi), "RDs while writing")
    }
}

#[test]
fn group_keeps_write_order_on_every_copy_across_kill9() {
    let t0 = Instant::now();
    let seed: u64 = std::env::var("WOF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    // At least MIN_KILLS kill points; more (up to `max_kills`) while the time budget
    // lasts: bugs with a narrow crash window are caught by the number of kills.
    let max_kills: usize = std::env::var("WOF_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(60).max(MIN_KILLS);
    eprintln!(
        "write-order fidelity crash test: seed {seed} (WOF_SEED), {MIN_KILLS}..{max_kills} kill points (WOF_KILLS), \
         more than {MIN_KILLS} only within {KILL_BUDGET:?}"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let mut d = Daemon::start();
    let dir = d.dir().to_path_buf();
    for f in ["lvol0", "lvol1", "sdc", "sdd"] {
        d.make_file(f, DEV_SECTORS * 512);
    }
    d.make_file("replog", 33 * MIB);
    let table = dir.join("r0.table");
    std::fs::write(&table, group_table(&dir)).unwrap();
    d.cli_ok(&["create", "r0", table.to_str().unwrap()]);

    let lds: Vec<PathBuf> = ["lvol0", "lvol1"].iter().map(|f| dir.join(f)).collect();
    let rds: Vec<PathBuf> = ["sdc", "sdd"].iter().map(|f| dir.join(f)).collect();
    let run = Run { hist: Arc::new(Mutex::new(History::new(2, NBLOCKS))), hist_path: dir.join("history.json"), seed };
    let cfg = WriterCfg {
        socket: d.nbd.clone(),
        exports: vec!["r0-0".into(), "r0-1".into()],
        q: 8,
        stall: Duration::from_secs(60),
    };

    let (mut file_checks, mut live_checks, mut nbd_checks) = (0, 0, 0);
    let (mut recovered, mut lost) = (0, 0);
    let mut max_rd_lag = 0u64;
    let mut kills = 0;
    while kills < MIN_KILLS || (kills < max_kills && t0.elapsed() < KILL_BUDGET) {
        let k = kills;
        kills += 1;
        let writer = BackgroundWriter::start(run.hist.clone(), cfg.clone(), rng.clone());
        rng = StdRng::seed_from_u64(rng.random());
        // Let the writer get going (connect, first writes) before the clock runs.
        let before = run.hist.lock().unwrap().issued();
        if !wait_until(Duration::from_secs(30), || run.hist.lock().unwrap().issued() > before) {
            run.fail(format!("kill point {k}: the writer issued nothing within 30 s"));
        }
        if k % 4 == 2 {
            let issued = run.hist.lock().unwrap().issued() as u64;
            let rep = run.check_live_files(&rds);
            live_checks += 1;
            max_rd_lag = max_rd_lag.max(issued.saturating_sub(rep.w));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..=500)));
        d.kill9();
        let (res, _) = writer.join();
        let res = run.ok(res, &format!("writer before kill point {k}"));
        assert!(res.broken, "kill point {k}: the writer did not notice the kill: {res:?}");
        assert!(res.errors.is_empty(), "kill point {k}: writes failed while the daemon was up: {:?}", res.errors);

        // Every copy, as left by the dead daemon, is a prefix state.
        let (rd_st, rd) = run.check_files(&format!("RDs (sdc, sdd) after kill point {k}"), &rds);
        let (ld_st, _ld) = run.check_files(&format!("LDs (lvol0, lvol1) after kill point {k}"), &lds);
        file_checks += 2;

        d.restart();
        // What a client of the restarted primary sees: every acknowledged write, and a
        // prefix state; it settles the writes that were in flight at the kill.
        let mut nbd = NbdImages::connect(&d.nbd, &cfg.exports, Duration::from_secs(30))
            .unwrap_or_else(|e| run.fail(format!("after restart {k}: exports do not come back: {e}")));
        let st = run.ok(scan(&mut nbd, NBLOCKS, 0), &format!("LDs through NBD after restart {k}"));
        nbd.close();
        {
            let mut h = run.hist.lock().unwrap();
            let acked = check_acked(&h, &st);
            drop(h);
            run.ok(acked, &format!("LDs through NBD after restart {k}"));
            h = run.hist.lock().unwrap();
            let settled = settle_pending(&mut h, &st);
            drop(h);
            let (r, l) = run.ok(settled, &format!("settling writes in flight at kill point {k}"));
            recovered += r;
            lost += l;
            let h = run.hist.lock().unwrap().clone();
            run.ok(check_prefix(&h, &st), &format!("LDs through NBD after restart {k}"));
            // Now that their fate is known: no copy held a write the primary dropped.
            run.ok(check_prefix(&h, &rd_st), &format!("RDs after kill point {k} (settled)"));
            run.ok(check_prefix(&h, &ld_st), &format!("LD files after kill point {k} (settled)"));
            nbd_checks += 1;
            // The history survives the kill: now and then, save it and carry on from
            // the saved copy.
            if k % 5 == 4 {
                h.save(&run.hist_path).unwrap();
                let back = History::load(&run.hist_path).unwrap();
                assert_eq!(back, h, "history JSON round trip");
                *run.hist.lock().unwrap() = back;
            }
        }
        eprintln!(
            "kill {k:2}: +{} writes ({} acked), RD W={} visible={}, settled {r}/{l} (t={:.1}s)",
            res.issued,
            res.acked,
            rd.w,
            rd.visible,
            t0.elapsed().as_secs_f64(),
            r = recovered,
            l = lost
        );
    }

    // Final segment: write, check the RDs live, stop cleanly.
    let writer = BackgroundWriter::start(run.hist.clone(), cfg.clone(), rng.clone());
    let before = run.hist.lock().unwrap().issued();
    assert!(wait_until(Duration::from_secs(30), || run.hist.lock().unwrap().issued() > before + 500));
    run.check_live_files(&rds);
    live_checks += 1;
    let (res, _) = writer.stop_and_join();
    let res = run.ok(res, "final writer");
    assert!(!res.broken && res.errors.is_empty(), "final segment: {res:?}");

    // Every SLINK catches up; then each site holds exactly the same bytes.
    let deadline = Duration::from_secs(60);
    if !wait_until(deadline, || slinks_outstanding(&d).iter().all(|&(_, o)| o == 0)) {
        run.fail(format!("SLINKs still have outstanding entries after {deadline:?}: {:?}", slinks_outstanding(&d)));
    }
    assert_eq!(slinks_outstanding(&d).len(), 2, "two SLINKs");
    let h = run.hist.lock().unwrap().clone();
    assert!(h.pending().is_empty(), "writes of unknown fate at the end: {:?}", h.pending());
    for (what, paths) in [("final LDs", &lds), ("final RDs", &rds)] {
        let (st, _) = run.check_files(what, paths);
        run.ok(check_acked(&h, &st), what);
        file_checks += 1;
    }
    for (l, r) in lds.iter().zip(&rds) {
        let (hl, hr) = (file_hash(l), file_hash(r));
        if hl != hr {
            run.fail(format!("{} {hl:?} and {} {hr:?} differ after the SLINK caught up", l.display(), r.display()));
        }
    }
    // The checker is not blind on these real images: put an old block back.
    let mut m = MemImages::from_images(&mut FileImages::open(&rds).unwrap(), NBLOCKS).unwrap();
    let st = scan(&mut m, NBLOCKS, 0).unwrap();
    let last = h.writes.iter().rev().find(|w| w.outcome == Outcome::Acked).unwrap();
    // The newest acknowledged write's block, and a block it depends on (written earlier).
    let dep = h.writes[..last.p as usize]
        .iter()
        .rev()
        .find(|w| (w.dev, w.block) != (last.dev, last.block) && st.at(w.dev, w.block) == w.seq && w.seq <= last.p)
        .expect("a dependency");
    m.set(dep.dev, dep.block, &[0; BLOCK]);
    let e = check_prefix(&h, &scan(&mut m, NBLOCKS, 0).unwrap()).unwrap_err();
    assert!(e.contains("ORDER VIOLATION"), "{e}");

    eprintln!(
        "write-order fidelity: {kills} kill points; {} writes issued, {} acknowledged, {} in flight at a kill \
         ({recovered} recovered, {lost} lost); checks: {file_checks} on image files after kills/at the end, \
         {nbd_checks} through NBD after restarts, {live_checks} live on the RDs; RDs seen live at most {max_rd_lag} writes behind the writes issued when the read began; {:.1}s",
        h.issued(),
        h.count(Outcome::Acked),
        recovered + lost,
        t0.elapsed().as_secs_f64()
    );
    let _ = res;
}
