//! Follow the sun: the primary moves between sites (planned switchover), a secondary
//! takes over after a disaster, the old primary fails back copying only the regions that
//! differ, a split brain is found and resolved, a stale primary is refused everywhere.
//! Three real daemons on loopback, with mutual TLS, and fault proxies where the network
//! must fail.
//!
//! Every net SLINK's dirty log has 1 MiB regions (`core 2 2048`), so the bytes a resync
//! copies are counted in whole MiB against the regions the test wrote.

mod common;
#[path = "common/nbd_client.rs"]
mod nbd_client;
#[path = "common/wof.rs"]
mod wof;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::sites::*;
use common::*;
use dmrep_faultproxy::FaultProxy;
use wof::*;

const DEV_SECTORS: u64 = 65536;
const NBLOCKS: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A proxy on the link from one site to another (indexes into the sites).
type Proxied = ((usize, usize), FaultProxy);

impl Site {
    /// Group `g` of 2 devices: this site's on SLINK 0, then one net SLINK per peer
    /// (numbered from 1 in the order given), reached at the address given.
    fn create(&self, secondary: bool, peers: &[(&str, SocketAddr)], policy: &str) {
        for n in 0..2 {
            self.d.make_file(&format!("dev{n}"), DEV_SECTORS * 512);
        }
        let log = self.d.dir().join("replog");
        let role = if secondary { " role=secondary" } else { "" };
        let nlog = if secondary { 5 } else { 4 };
        let mut t = format!("0 {DEV_SECTORS} replicator default {nlog} {} 0 auto 65536{role}", log.display());
        for n in 0..2 {
            t += &format!(" local 2 0 async 2 {n} {} - 0", self.dev(n).display());
            for (i, (site, addr)) in peers.iter().enumerate() {
                t += &format!(" net 5 {} {policy} {addr} site={site} timeout=1s 2 {n} {n} core 2 2048 nosync", i + 1);
            }
        }
        self.d.create("g", &t);
    }

    fn status(&self) -> Value {
        group_status(&self.d, "g")
    }

    fn role(&self) -> Value {
        self.d.json(&["role", "g"])
    }

    /// This site's SLINK to `site`.
    fn slink_to(&self, site: &str) -> Value {
        self.status()["slinks"].as_array().unwrap().iter().find(|s| s["link"]["site"] == site).cloned().unwrap()
    }

    fn is_primary(&self) -> bool {
        self.role()["role"] == "primary"
    }

    fn writer(&self) -> WriterCfg {
        WriterCfg {
            socket: self.d.nbd.clone(),
            exports: vec!["g-0".into(), "g-1".into()],
            q: 8,
            stall: Duration::from_secs(60),
        }
    }

    /// The devices as files, once everything the log holds is applied to them.
    fn settled_stamps(&self) -> Stamps {
        let ok = wait_until(Duration::from_secs(30), || {
            let s = self.status();
            let zero =
                s["slinks"].as_array().unwrap().iter().find(|x| x["slink"] == 0).unwrap()["outstanding_ios"] == 0;
            zero && s["site"]["applied"] == s["site"]["received"]
        });
        assert!(ok, "{} never applied its log: {}", self.name, self.status());
        scan(&mut FileImages::open(&[self.dev(0), self.dev(1)]).unwrap(), NBLOCKS, 0).unwrap()
    }

    fn bytes_copied_total(&self) -> u64 {
        self.status()["slinks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sync"]["bytes_copied"].as_u64().unwrap_or(0))
            .sum()
    }
}

fn wof_seed() -> u64 {
    let seed = std::env::var("WOF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (WOF_SEED)");
    seed
}

/// Three sites of group `g`, `primary` first; every site names the two others.
/// `via(from, to)`: the address `from` reaches `to` at (a proxy, or its listener).
fn three(pki: &Path, names: [&str; 3], via: impl Fn(usize, usize, SocketAddr) -> SocketAddr) -> Vec<Site> {
    let sites: Vec<Site> = names.iter().map(|n| Site::start(n, pki)).collect();
    for i in (0..3).rev() {
        let peers: Vec<(&str, SocketAddr)> =
            (0..3).filter(|j| *j != i).map(|j| (names[j], via(i, j, sites[j].listen))).collect();
        sites[i].create(i != 0, &peers, "async");
    }
    sites
}

/// Wait until `primary` has shipped everything to every other site, which applied it.
fn wait_converged(primary: &Site, others: &[&Site], timeout: Duration) {
    let ok = wait_until(timeout, || {
        let p = primary.status();
        let last = p["site"]["received"].as_u64().unwrap();
        // (SLINK 0 and those to the sites named: a dead site's SLINK may lag.)
        let shipped = p["slinks"].as_array().unwrap().iter().all(|s| {
            let ours = s["slink"] == 0 || others.iter().any(|o| s["link"]["site"] == o.name.as_str());
            !ours || (s["outstanding_ios"] == 0 && s["sync"]["ordered"] == true)
        });
        shipped
            && others.iter().all(|o| {
                let s = o.status()["site"].clone();
                s["applied"].as_u64() == Some(last) && s["received"].as_u64() == Some(last)
            })
    });
    assert!(
        ok,
        "not converged within {timeout:?}: primary {}: {}\n{}",
        primary.name,
        primary.status(),
        others.iter().map(|o| format!("{}: {}", o.name, o.status()["site"])).collect::<Vec<_>>().join("\n")
    );
}

fn assert_same(a: &Site, b: &Site) {
    for n in 0..2 {
        let (x, y) = (std::fs::read(a.dev(n)).unwrap(), std::fs::read(b.dev(n)).unwrap());
        let differ = (0..x.len() / 4096).filter(|i| x[i * 4096..(i + 1) * 4096] != y[i * 4096..(i + 1) * 4096]).count();
        assert_eq!(differ, 0, "device {n}: {differ} blocks of 4 KiB differ between {} and {}", a.name, b.name);
    }
}

/// Tries `takeover` at `s` until the old primary counts as gone (or `deadline`).
fn takeover(s: &Site, deadline: Duration) -> Value {
    let mut last = String::new();
    let ok = wait_until(deadline, || {
        let o = s.d.cli(&["takeover", "g", "--json"]);
        if o.status.success() {
            last = String::from_utf8_lossy(&o.stdout).to_string();
            true
        } else {
            last = show(&o);
            false
        }
    });
    assert!(ok, "takeover at {} refused: {last}", s.name);
    serde_json::from_str(&last).unwrap()
}

#[test]
fn rotation_around_three_sites_under_writes_loses_nothing_and_copies_nothing() {
    let seed = wof_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let pki = pki(&["paris", "tokyo", "osaka"]);
    let sites = three(pki.path(), ["paris", "tokyo", "osaka"], |_, _, a| a);
    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let mut held = Vec::new();
    for (step, (from, to)) in [(0usize, 1usize), (1, 2), (2, 0)].into_iter().enumerate() {
        let (a, b) = (&sites[from], &sites[to]);
        let writer = BackgroundWriter::start(hist.clone(), a.writer(), rng.clone());
        let before = b.status()["site"]["received"].as_u64().unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || b.status()["site"]["received"].as_u64().unwrap() > before + 300),
            "step {step}: {} receives nothing from {}",
            b.name,
            a.name
        );
        // The switchover under the running writer.
        let out = a.d.cli_ok(&["switchover", "g", "--to", &b.name, "--json"]);
        let (res, r) = writer.stop_and_join();
        rng = r;
        let res = res.unwrap_or_else(|e| panic!("step {step} (seed {seed}): {e}"));
        let v: Value = serde_json::from_str(&out).unwrap();
        held.push(v["held_ms"].as_f64().unwrap());
        assert_eq!(v["generation"], step as u64 + 2, "{v}");
        assert!(b.is_primary() && !a.is_primary(), "step {step}: {} {}", a.role(), b.role());
        assert!(res.acked > 0, "{res:?}");
        // The new primary holds every acknowledged write; writes refused at the old one
        // (after the switch) were never applied anywhere.
        let mut h = hist.lock().unwrap();
        let st = b.settled_stamps();
        settle_pending(&mut h, &st).unwrap_or_else(|e| panic!("step {step} (seed {seed}): {e}"));
        check_acked(&h, &st).unwrap_or_else(|e| panic!("step {step} (seed {seed}): acknowledged write lost: {e}"));
        for o in sites.iter().filter(|s| s.name != b.name) {
            check_prefix(&h, &o.settled_stamps())
                .unwrap_or_else(|e| panic!("step {step} (seed {seed}): {} not a prefix state: {e}", o.name));
        }
    }
    let p = &sites[0];
    wait_converged(p, &[&sites[1], &sites[2]], Duration::from_secs(60));
    assert_same(p, &sites[1]);
    assert_same(p, &sites[2]);
    for s in &sites {
        assert_eq!(s.bytes_copied_total(), 0, "{} copied regions: {}", s.name, s.status());
        assert_eq!(s.role()["generation"], 4);
    }
    eprintln!("writes held per switchover (ms): {held:?}");
}

/// paris is cut off (both ways, through proxies); tokyo takes over and osaka follows it;
/// paris, healed one way, is refused as stale by both and fenced; healed both ways, it
/// fails back, copying exactly the regions written on either side since the split.
#[test]
fn partition_takeover_stale_primary_refused_then_failback_copies_only_what_differs() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo", "osaka"]);
    // Proxies in front of every link that touches paris: [from][to].
    let proxies: Arc<Mutex<Vec<Proxied>>> = Arc::default();
    let p2 = proxies.clone();
    let sites = three(pki.path(), ["paris", "tokyo", "osaka"], move |from, to, addr| {
        if from == 0 || to == 0 {
            let p = FaultProxy::start("127.0.0.1:0".parse().unwrap(), addr).unwrap();
            let a = p.addr();
            p2.lock().unwrap().push(((from, to), p));
            a
        } else {
            addr
        }
    });
    let (paris, tokyo, osaka) = (&sites[0], &sites[1], &sites[2]);
    let cut = |from: usize, to: usize, on: bool| {
        for ((f, t), p) in proxies.lock().unwrap().iter() {
            if (*f, *t) == (from, to) {
                p.blackhole(on);
                p.refuse(on);
            }
        }
    };
    qemu_io_ok(&paris.d.uri("g-0"), &["write -P 1 0 1M"]);
    wait_converged(paris, &[tokyo, osaka], Duration::from_secs(30));
    for (f, t) in [(0, 1), (0, 2), (1, 0), (2, 0)] {
        cut(f, t, true);
    }
    // paris goes on alone (asynchronous SLINKs): three regions nobody else gets.
    for (off, pat) in [(2, 2), (5, 3), (9, 4)] {
        qemu_io_ok(&paris.d.uri("g-0"), &[&format!("write -P {pat} {}M 64k", off)]);
    }
    let t = takeover(tokyo, Duration::from_secs(30));
    assert_eq!(t["generation"], 2, "{t}");
    let common = t["start"].as_u64().unwrap() - 1;
    // The new primary takes writes; osaka follows it from the log (nothing copied).
    for (off, pat) in [(12, 5), (14, 6)] {
        qemu_io_ok(&tokyo.d.uri("g-0"), &[&format!("write -P {pat} {}M 64k", off)]);
    }
    assert!(
        wait_until(Duration::from_secs(30), || read_at(&osaka.dev(0), 14 * MIB, 1) == vec![6]),
        "osaka does not follow tokyo: {}",
        osaka.status()["site"]
    );
    assert_eq!(osaka.role()["generation"], 2);
    assert_eq!(tokyo.slink_to("osaka")["sync"]["bytes_copied"], 0);

    // paris reaches the others again (not the other way): refused as stale by both,
    // fenced; nothing of its own reaches them.
    cut(0, 1, false);
    cut(0, 2, false);
    assert!(
        wait_until(Duration::from_secs(30), || !paris.role()["fenced"].is_null()),
        "paris not fenced: {}",
        paris.role()
    );
    for s in [tokyo, osaka] {
        assert!(
            wait_until(Duration::from_secs(20), || s.d.log_text().contains("it was replaced")),
            "{} does not refuse the stale primary",
            s.name
        );
    }
    let o = qemu_io(&paris.d.uri("g-0"), &["write -P 7 20M 4k"]);
    assert!(!o.status.success() || show(&o).contains("failed"), "a fenced primary took a write: {}", show(&o));
    assert!(paris.d.log_text().contains("fenced"), "the daemon log says why");
    let e = paris.d.cli_err(&["takeover", "g"]);
    assert!(e.contains("fenced primary") && e.contains("--force"), "{e}");
    for s in [tokyo, osaka] {
        for off in [2, 5, 9, 20] {
            assert_ne!(read_at(&s.dev(0), off * MIB, 1)[0], 7, "{}", s.name);
        }
        assert_eq!(read_at(&s.dev(0), 2 * MIB, 1), vec![0], "paris's write reached {}", s.name);
    }

    // Fully healed: tokyo reaches paris, which follows it and gets back exactly the five
    // 1 MiB regions written on either side since the split.
    cut(1, 0, false);
    cut(2, 0, false);
    assert!(
        wait_until(Duration::from_secs(30), || paris.role()["role"] == "secondary"),
        "paris does not fail back: {}",
        paris.role()
    );
    wait_converged(tokyo, &[paris, osaka], Duration::from_secs(60));
    assert_same(tokyo, paris);
    assert_same(tokyo, osaka);
    let copied = tokyo.slink_to("paris")["sync"]["bytes_copied"].as_u64().unwrap();
    assert_eq!(copied, 5 * MIB, "exactly the regions written since the split: {}", tokyo.slink_to("paris"));
    assert_eq!(paris.role()["inconsistent"], false);
    assert_eq!(paris.role()["generation"], 2);
    assert_eq!(read_at(&paris.dev(0), 2 * MIB, 1), vec![0], "paris's own writes since the split are gone");
    assert_eq!(read_at(&paris.dev(0), 12 * MIB, 1), vec![5]);
    assert!(paris.d.log_text().contains("discarded"), "{}", paris.d.log_text());
    eprintln!("failback: common history up to seq {common}, {copied} bytes copied");
}

/// The primary dies (kill -9) with a synchronous SLINK: the secondary takes over with
/// every acknowledged write (a prefix state); the old primary restarts, is fenced by
/// the newer generation and fails back without a full copy.
#[test]
fn kill9_takeover_keeps_every_acknowledged_write_and_the_old_primary_fails_back() {
    let seed = wof_seed();
    let rng = StdRng::seed_from_u64(seed);
    let pki = pki(&["paris", "tokyo"]);
    let mut paris = Site::start("paris", pki.path());
    let tokyo = Site::start("tokyo", pki.path());
    tokyo.create(true, &[("paris", paris.listen)], "async");
    paris.create(false, &[("tokyo", tokyo.listen)], "sync");
    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let writer = BackgroundWriter::start(hist.clone(), paris.writer(), rng);
    assert!(wait_until(Duration::from_secs(30), || tokyo.status()["site"]["received"].as_u64().unwrap() > 500));
    paris.d.kill9();
    let (res, rng) = writer.join();
    assert!(res.unwrap().broken);
    let t = takeover(&tokyo, Duration::from_secs(20));
    eprintln!("takeover: {t}");
    // Writes whose fate the kill left open (the old primary may have logged them).
    let open_at_kill: Vec<(u32, u64)> = {
        let mut h = hist.lock().unwrap();
        let st = tokyo.settled_stamps();
        check_prefix(&h, &st).unwrap_or_else(|e| panic!("seed {seed}: the new primary is not a prefix state: {e}"));
        check_acked(&h, &st).unwrap_or_else(|e| panic!("seed {seed}: synchronous SLINK lost a write: {e}"));
        let open = h.pending().iter().map(|s| h.get(*s).map(|w| (w.dev, w.block)).unwrap()).collect();
        settle_pending(&mut h, &st).unwrap();
        open
    };
    let first_after = hist.lock().unwrap().issued() as u64;
    let writer = BackgroundWriter::start(hist.clone(), tokyo.writer(), rng);
    std::thread::sleep(Duration::from_millis(500));
    paris.d.restart();
    assert!(
        wait_until(Duration::from_secs(30), || paris.role()["role"] == "secondary"),
        "the old primary does not follow the new one: {}",
        paris.role()
    );
    let (res, _) = writer.stop_and_join();
    let res = res.unwrap();
    assert!(res.errors.is_empty() && !res.broken, "{res:?}");
    wait_converged(&tokyo, &[&paris], Duration::from_secs(60));
    assert_same(&tokyo, &paris);
    let h = hist.lock().unwrap().clone();
    check_acked(&h, &paris.settled_stamps()).unwrap();
    // What differs: regions the new primary wrote since the takeover, and those of the
    // writes the old one may have logged without the new one getting them.
    let region = |dev: u32, block: u64| (dev, block * 4096 / MIB);
    let mut differ: std::collections::BTreeSet<(u32, u64)> =
        h.writes.iter().filter(|w| w.seq > first_after).map(|w| region(w.dev, w.block)).collect();
    differ.extend(open_at_kill.iter().map(|(d, b)| region(*d, *b)));
    let copied = tokyo.slink_to("paris")["sync"]["bytes_copied"].as_u64().unwrap();
    assert!(
        copied <= differ.len() as u64 * MIB,
        "failback copies only regions that differ: {copied} bytes for {} regions",
        differ.len()
    );
    eprintln!("failback after kill -9: {copied} bytes copied for {} regions written since", differ.len());
}

/// Two secondaries both take over while cut from each other (the primary is dead): a
/// split brain, reported at both and never merged; both keep serving; `resolve
/// --discard-local` at one makes it follow the other, copying only the regions either
/// wrote since the split.
#[test]
fn split_brain_is_reported_never_merged_and_resolved_by_one_command() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo", "osaka"]);
    let proxies: Arc<Mutex<Vec<FaultProxy>>> = Arc::default();
    let p2 = proxies.clone();
    let mut sites = three(pki.path(), ["paris", "tokyo", "osaka"], move |from, to, addr| {
        if from != 0 && to != 0 {
            let p = FaultProxy::start("127.0.0.1:0".parse().unwrap(), addr).unwrap();
            let a = p.addr();
            p2.lock().unwrap().push(p);
            a
        } else {
            addr
        }
    });
    let cut = |on: bool| {
        for p in proxies.lock().unwrap().iter() {
            p.blackhole(on);
            p.refuse(on);
        }
    };
    qemu_io_ok(&sites[0].d.uri("g-0"), &["write -P 1 0 1M"]);
    wait_converged(&sites[0], &[&sites[1], &sites[2]], Duration::from_secs(30));
    sites[0].d.kill9();
    cut(true);
    let (tokyo, osaka) = (&sites[1], &sites[2]);
    takeover(tokyo, Duration::from_secs(20));
    takeover(osaka, Duration::from_secs(20));
    qemu_io_ok(&tokyo.d.uri("g-0"), &["write -P 2 3M 64k"]);
    qemu_io_ok(&osaka.d.uri("g-0"), &["write -P 3 6M 64k", "write -P 3 7M 64k"]);
    cut(false);
    for s in [tokyo, osaka] {
        assert!(
            wait_until(Duration::from_secs(30), || !s.role()["split_brain"].is_null()),
            "{} does not report the split brain: {}",
            s.name,
            s.role()
        );
        assert!(s.d.log_text().contains("SPLIT BRAIN"), "{}", s.name);
    }
    // Both keep serving as they were: nothing merged.
    qemu_io_ok(&tokyo.d.uri("g-0"), &["write -P 4 4M 64k"]);
    qemu_io_ok(&osaka.d.uri("g-0"), &["write -P 5 8M 64k"]);
    assert_eq!(read_at(&tokyo.dev(0), 6 * MIB, 1), vec![0]);
    assert_eq!(read_at(&osaka.dev(0), 3 * MIB, 1), vec![0]);
    assert!(tokyo.is_primary() && osaka.is_primary());
    let text = tokyo.d.cli_ok(&["role", "g"]);
    assert!(text.contains("SPLIT BRAIN") && text.contains("--discard-local"), "{text}");

    osaka.d.cli_ok(&["resolve", "g", "--discard-local"]);
    assert!(
        wait_until(Duration::from_secs(60), || osaka.role()["role"] == "secondary"
            && osaka.role()["discard_local"] == false
            && tokyo.role()["split_brain"].is_null()),
        "not resolved: tokyo {} osaka {}",
        tokyo.role(),
        osaka.role()
    );
    wait_converged(tokyo, &[osaka], Duration::from_secs(60));
    assert_same(tokyo, osaka);
    let copied = tokyo.slink_to("osaka")["sync"]["bytes_copied"].as_u64().unwrap();
    assert_eq!(copied, 5 * MIB, "the five regions written on either side since the split");
    assert_eq!(read_at(&osaka.dev(0), 6 * MIB, 1), vec![0], "osaka's writes since the split are discarded");
    assert_eq!(read_at(&osaka.dev(0), 4 * MIB, 1), vec![4]);
    sites[0].d.restart();
    let paris = &sites[0];
    assert!(
        wait_until(Duration::from_secs(30), || paris.role()["role"] == "secondary"),
        "the dead primary, back, follows tokyo: {}",
        paris.role()
    );
    wait_converged(&sites[1], &[&sites[0], &sites[2]], Duration::from_secs(60));
    assert_same(&sites[1], &sites[0]);
}

/// kill -9 of either side at random moments of a switchover under writes: afterwards
/// exactly one primary, the other follows it, and no acknowledged write is lost.
#[test]
fn crash_during_switchover_leaves_one_primary_and_loses_no_acknowledged_write() {
    let seed = wof_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let pki = pki(&["paris", "tokyo"]);
    let mut sites = [Site::start("paris", pki.path()), Site::start("tokyo", pki.path())];
    sites[1].create(true, &[("paris", sites[0].listen)], "async");
    sites[0].create(false, &[("tokyo", sites[1].listen)], "sync");
    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let mut primary = 0;
    for round in 0..6 {
        let other = 1 - primary;
        let writer = BackgroundWriter::start(hist.clone(), sites[primary].writer(), rng.clone());
        let before = sites[other].status()["site"]["received"].as_u64().unwrap();
        assert!(wait_until(Duration::from_secs(30), || sites[other].status()["site"]["received"].as_u64().unwrap()
            > before + 200));
        let to = sites[other].name.clone();
        let mut cmd = sites[primary].d.cli_cmd(&["switchover", "g", "--to", &to, "--timeout", "10"]);
        let child = KillOnDrop(cmd.spawn().unwrap());
        std::thread::sleep(Duration::from_micros(rng.random_range(0..40_000)));
        let victim = rng.random_range(0..2usize);
        eprintln!("round {round}: switchover {} -> {to}, kill -9 of {}", sites[primary].name, sites[victim].name);
        sites[victim].d.kill9();
        drop(child);
        // Back at once (a synchronous SLINK holds the writes while its site is away).
        sites[victim].d.restart();
        let (res, r) = writer.stop_and_join();
        rng = r;
        res.unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        // Exactly one primary, unfenced; the other follows it.
        let mut who = None;
        let ok = wait_until(Duration::from_secs(60), || {
            let roles: Vec<Value> = sites.iter().map(|s| s.role()).collect();
            let prim: Vec<usize> =
                (0..2).filter(|i| roles[*i]["role"] == "primary" && roles[*i]["fenced"].is_null()).collect();
            let sec = roles.iter().filter(|r| r["role"] == "secondary").count();
            if prim.len() == 1 && sec == 1 && roles[0]["generation"] == roles[1]["generation"] {
                who = Some(prim[0]);
                true
            } else {
                false
            }
        });
        assert!(ok, "round {round} (seed {seed}): not exactly one primary: {} / {}", sites[0].role(), sites[1].role());
        primary = who.unwrap();
        let p = &sites[primary];
        wait_converged(p, &[&sites[1 - primary]], Duration::from_secs(60));
        let mut h = hist.lock().unwrap();
        let st = p.settled_stamps();
        settle_pending(&mut h, &st).unwrap_or_else(|e| panic!("round {round} (seed {seed}): {e}"));
        check_acked(&h, &st).unwrap_or_else(|e| panic!("round {round} (seed {seed}): acknowledged write lost: {e}"));
        assert_same(p, &sites[1 - primary]);
    }
}
