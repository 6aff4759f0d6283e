//! Remote sites over the network (`net` SLINKs, the site receiver, mutual TLS): two or
//! three real daemons on loopback, with certificates made by `dmrep pki`, and the fault
//! proxy between them where the network must fail.
//!
//! - a secondary follows its primary: equal bytes once lag is 0, its status names the
//!   primary and its lag, its exports refuse writes;
//! - kill -9 of the secondary while the primary writes: its devices are prefix states;
//!   it restarts, recovers and keeps following, with no region copied;
//! - a link cut (connections reset) and a black hole longer than the link timeout: the
//!   SLINK goes down, the log absorbs the writes, shipping resumes where the secondary
//!   is, no full copy;
//! - a synchronous SLINK acknowledges a write only once it is durable at the secondary;
//! - security: a certificate from another CA, a site the group does not name, another
//!   group of the same name: refused before any byte reaches the secondary's devices;
//!   garbage on the site port does not hurt the daemon.

mod common;
#[path = "common/nbd_client.rs"]
mod nbd_client;
#[path = "common/wof.rs"]
mod wof;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::sites::*;
use common::*;
use dmrep_faultproxy::FaultProxy;
use wof::*;

const DEV_SECTORS: u64 = 65536;
const NBLOCKS: u64 = 2048;

impl Site {
    /// Group `g` of `ndev` devices: this site's devices on SLINK 0, the peer on SLINK 1.
    fn table(
        &self,
        ndev: u32,
        secondary: bool,
        peer: &str,
        peer_addr: SocketAddr,
        policy: &str,
        extra: &str,
    ) -> String {
        for n in 0..ndev {
            if !self.dev(n).exists() {
                self.d.make_file(&format!("dev{n}"), DEV_SECTORS * 512);
            }
        }
        let log = self.d.dir().join("replog");
        let role = if secondary { " role=secondary" } else { "" };
        let nlog = if secondary { 5 } else { 4 };
        let mut t = format!("0 {DEV_SECTORS} replicator default {nlog} {} 0 auto 65536{role}", log.display());
        let net_params: Vec<String> = ["1", policy, &peer_addr.to_string(), &format!("site={peer}")]
            .iter()
            .map(|s| s.to_string())
            .chain(extra.split_whitespace().map(String::from))
            .collect();
        for n in 0..ndev {
            t += &format!(" local 2 0 async 2 {n} {} - 0", self.dev(n).display());
            t += &format!(" net {} {} 2 {n} {n} core 2 2048 nosync", net_params.len(), net_params.join(" "));
        }
        t
    }

    fn status(&self) -> serde_json::Value {
        group_status(&self.d, "g")
    }

    fn site_status(&self) -> serde_json::Value {
        self.status()["site"].clone()
    }

    /// SLINK `nr`'s status at this (primary) site.
    fn slink(&self, nr: u64) -> serde_json::Value {
        slink_of(&self.status(), nr)
    }
}

/// Primary `paris` and secondary `tokyo` of group `g` (`ndev` devices), the primary
/// reaching the secondary at `via` (the secondary's listener, or a proxy in front).
fn pair(pki: &Path, ndev: u32, policy: &str, extra: &str, via: Option<SocketAddr>) -> (Site, Site) {
    let b = Site::start("tokyo", pki);
    let a = Site::start("paris", pki);
    b.d.create("g", &b.table(ndev, true, "paris", a.listen, "async", ""));
    a.d.create("g", &a.table(ndev, false, "tokyo", via.unwrap_or(b.listen), policy, extra));
    (a, b)
}

/// The write-order workload's seed: `WOF_SEED`, or a random one (printed to replay).
fn wof_seed() -> u64 {
    let seed = std::env::var("WOF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (WOF_SEED)");
    seed
}

/// The write-order workload on the primary's two devices.
fn writer_cfg(a: &Site) -> WriterCfg {
    WriterCfg {
        socket: a.d.nbd.clone(),
        exports: vec!["g-0".into(), "g-1".into()],
        q: 8,
        stall: Duration::from_secs(60),
    }
}

/// A primary that must be refused writes; its refusal must be logged at the secondary
/// (`secondary_says`) and reach it as its SLINK's last error (`peer_hears`).
fn assert_refused(peer: &Site, secondary: &Site, secondary_says: &str, peer_hears: &str) {
    qemu_io_ok(&peer.d.uri("g-0"), &["write -P 0x42 0 64k"]);
    assert!(
        wait_until(Duration::from_secs(20), || secondary.d.log_text().contains(secondary_says)),
        "{} not refused with \"{secondary_says}\" at the secondary:\n{}",
        peer.name,
        secondary.d.log_text()
    );
    assert!(
        wait_until(Duration::from_secs(20), || peer.slink(1)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(peer_hears))),
        "the refused {} is not told \"{peer_hears}\": {}",
        peer.name,
        peer.slink(1)
    );
}

fn hash(p: &Path) -> u32 {
    crc32(&std::fs::read(p).unwrap())
}

/// Wait until the primary has shipped everything and the secondary applied it.
fn wait_caught_up(a: &Site, b: &Site, timeout: Duration) {
    let ok = wait_until(timeout, || {
        let s = a.slink(1);
        let last = a.status()["log"]["next_seq"].as_u64().unwrap() - 1;
        // (Every SLINK of the primary: its own LD files are compared too.)
        let all_applied = a.status()["slinks"].as_array().unwrap().iter().all(|s| s["outstanding_ios"] == 0);
        all_applied && s["sync"]["ordered"] == true && b.site_status()["applied"].as_u64() == Some(last) && {
            let l = b.site_status();
            l["lag_entries"] == 0
        }
    });
    assert!(
        ok,
        "secondary not caught up within {timeout:?}:\nprimary slink 1: {}\nsecondary: {}",
        a.slink(1),
        b.site_status()
    );
}

fn assert_same(a: &Site, b: &Site, ndev: u32) {
    for n in 0..ndev {
        let (x, y) = (std::fs::read(a.dev(n)).unwrap(), std::fs::read(b.dev(n)).unwrap());
        if x != y {
            let blocks: Vec<usize> =
                (0..x.len() / 4096).filter(|i| x[i * 4096..(i + 1) * 4096] != y[i * 4096..(i + 1) * 4096]).collect();
            let first = blocks[0];
            panic!(
                "device {n} differs between {} and {}: {} blocks of 4 KiB, first {:?}; block {first}: {:02x?} vs {:02x?}\n{} status: {}\n{} status: {}",
                a.name,
                b.name,
                blocks.len(),
                &blocks[..blocks.len().min(10)],
                &x[first * 4096..first * 4096 + 24],
                &y[first * 4096..first * 4096 + 24],
                a.name,
                a.status(),
                b.name,
                b.status()
            );
        }
    }
}

#[test]
fn secondary_follows_its_primary_and_refuses_writes() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let (a, b) = pair(pki.path(), 2, "async", "compress=lz4", None);
    let data = random_bytes(3 << 20);
    let src = a.d.dir().join("data");
    std::fs::write(&src, &data).unwrap();
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 0x5a 0 1M", "write -P 0x11 8M 64k"]);
    run_ok(
        Command::new("qemu-img")
            .args(["dd", "-f", "raw", "-O", "raw", "bs=1M", "count=3"])
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", a.d.uri("g-1"))),
    );
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 2);
    assert_eq!(read_at(&b.dev(1), 0, data.len()), data, "device 1 at the secondary");

    let s = b.site_status();
    assert_eq!(s["role"], "secondary");
    assert_eq!(s["primary"], "paris", "{s}");
    assert!(s["received"].as_u64().unwrap() > 0 && s["received"] == s["applied"], "{s}");
    assert_eq!(s["lag_seconds"].as_f64(), Some(0.0), "{s}");
    assert!(!s["group_uuid"].as_str().unwrap().is_empty(), "bound to the primary's group: {s}");
    assert_eq!(a.site_status()["group_uuid"], s["group_uuid"]);
    // The compressed link shipped fewer bytes than it carried (patterned data).
    let link = a.slink(1)["link"].clone();
    let (raw, wire) = (link["bytes_raw"].as_u64().unwrap(), link["bytes_wire"].as_u64().unwrap());
    assert!(raw >= 4 << 20 && wire < raw, "lz4 on patterned data: {link}");
    assert_eq!(link["connected"], true, "{link}");
    assert_eq!(a.slink(1)["accessible"], true);
    assert_eq!(a.slink(1)["sync"]["bytes_copied"], 0, "no region copied");

    // The secondary's exports are read-only (NBD says so) and take no writes.
    if have("nbdinfo") {
        let info = run_ok(Command::new("nbdinfo").arg("--json").arg(b.d.uri("g-0")));
        assert!(info.contains("\"is_read_only\": true"), "{info}");
    }
    let o = qemu_io(&b.d.uri("g-0"), &["write -P 0x66 0 4k"]);
    let out = show(&o);
    assert!(!o.status.success() || out.contains("failed"), "a write at the secondary must fail: {out}");
    assert_eq!(read_at(&b.dev(0), 0, 1), vec![0x5a], "the refused write changed nothing");
    // And the text status says who it follows.
    let text = b.d.cli_ok(&["status", "g"]);
    assert!(text.contains("secondary") && text.contains("paris"), "{text}");
}

#[test]
fn secondary_kill9_recovers_to_a_prefix_and_keeps_following_without_a_copy() {
    let seed = wof_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let pki = pki(&["paris", "tokyo"]);
    let (a, mut b) = pair(pki.path(), 2, "async", "timeout=2s", None);
    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let cfg = writer_cfg(&a);
    let writer = BackgroundWriter::start(hist.clone(), cfg, rng.clone());
    let bdevs = [b.dev(0), b.dev(1)];
    for k in 0..4 {
        let before = b.site_status()["received"].as_u64().unwrap_or(0);
        assert!(
            wait_until(Duration::from_secs(30), || b.site_status()["received"].as_u64().unwrap_or(0) > before + 50),
            "kill {k}: the secondary receives nothing: {}",
            b.site_status()
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(20..300)));
        b.d.kill9();
        // As the dead secondary left them: a prefix state of the primary's history.
        let st = scan(&mut FileImages::open(&bdevs).unwrap(), NBLOCKS, 0).unwrap();
        let h = hist.lock().unwrap().clone();
        if let Err(e) = check_prefix(&h, &st) {
            panic!("kill {k}: secondary devices are not a prefix state (seed {seed}): {e}");
        }
        b.d.restart();
    }
    let (res, _) = writer.stop_and_join();
    let res = res.unwrap();
    assert!(res.errors.is_empty() && !res.broken, "the primary's writes never failed: {res:?}");
    wait_caught_up(&a, &b, Duration::from_secs(60));
    assert_same(&a, &b, 2);
    let h = hist.lock().unwrap().clone();
    check_acked(&h, &scan(&mut FileImages::open(&bdevs).unwrap(), NBLOCKS, 0).unwrap()).unwrap();
    assert_eq!(a.slink(1)["sync"]["bytes_copied"], 0, "no region was copied: shipping resumed from the log");
    assert_eq!(a.slink(1)["sync"]["ordered"], true);
}

#[test]
fn link_cut_and_black_hole_are_absorbed_by_the_log_without_a_full_copy() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let b = Site::start("tokyo", pki.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), b.listen).unwrap();
    let a = Site::start("paris", pki.path());
    b.d.create("g", &b.table(1, true, "paris", a.listen, "async", ""));
    a.d.create("g", &a.table(1, false, "tokyo", proxy.addr(), "async", "timeout=1s"));
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 1 0 1M"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));

    // Cut: every connection reset; writes go on, the log holds them.
    proxy.drop_connections();
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 2 1M 1M"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 1);

    // Black hole longer than the link timeout: the SLINK goes down, then heals.
    proxy.blackhole(true);
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 3 2M 1M"]);
    assert!(
        wait_until(Duration::from_secs(20), || a.slink(1)["accessible"] == false),
        "a silent link is not found down: {}",
        a.slink(1)
    );
    assert!(a.slink(1)["outstanding_ios"].as_u64().unwrap() > 0, "the log holds what the site lacks");
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 4 3M 1M"]);
    proxy.blackhole(false);
    wait_caught_up(&a, &b, Duration::from_secs(60));
    assert_same(&a, &b, 1);
    assert_eq!(a.slink(1)["sync"]["bytes_copied"], 0, "no region copied after the outage");
    let log = a.d.log_text();
    assert!(log.contains("site link down"), "the outage is logged");

    // An idle link that goes silent is found down by its heartbeat, without a write.
    proxy.blackhole(true);
    assert!(
        wait_until(Duration::from_secs(20), || a.slink(1)["accessible"] == false),
        "an idle silent link is not found down: {}",
        a.slink(1)
    );
    proxy.blackhole(false);
    assert!(wait_until(Duration::from_secs(30), || a.slink(1)["accessible"] == true), "{}", a.slink(1));
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 5 4M 64k"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 1);
}

#[test]
fn synchronous_slink_acknowledges_only_what_the_secondary_holds() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let (mut a, b) = pair(pki.path(), 1, "sync", "", None);
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 0x77 0 256k"]);
    // The primary dies right after the acknowledgement: the secondary has the write.
    a.d.kill9();
    assert!(
        wait_until(Duration::from_secs(20), || read_at(&b.dev(0), 0, 256 << 10).iter().all(|&x| x == 0x77)),
        "an acknowledged synchronous write is not at the secondary: {}",
        b.site_status()
    );
}

#[test]
fn peers_that_are_not_the_groups_primary_are_refused() {
    let pki = pki(&["paris", "tokyo", "osaka"]);
    let other_ca = pki_other();
    let (a, b) = pair(pki.path(), 1, "async", "", None);
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 9 0 64k"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    let before = hash(&b.dev(0));

    // A site the group does not name (valid certificate from the same CA).
    let c = Site::start("osaka", pki.path());
    c.d.create("g", &c.table(1, false, "tokyo", b.listen, "async", ""));
    assert_refused(&c, &b, "site 'osaka' is not a peer of group g", "not a peer");
    // Another group of the same name: the same site names, another CA. (The stranger
    // refuses our certificate first; each side says so in words.)
    let d = Site::start("paris", other_ca.path());
    d.d.create("g", &d.table(1, false, "tokyo", b.listen, "async", ""));
    assert_refused(&d, &b, "does not trust our certificate", "not issued by our CA");
    // Nothing reached the secondary's device; it still follows its own primary.
    assert_eq!(hash(&b.dev(0)), before, "a refused peer wrote to the secondary's device");
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 10 64k 64k"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 1);

    // A second primary of the same name with its own group (another UUID), same CA.
    let e = Site::start("paris", pki.path());
    e.d.create("g", &e.table(1, false, "tokyo", b.listen, "async", ""));
    assert_refused(&e, &b, "another group of the same name", "another group of the same name");
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 1);
}

/// A CA of its own (a stranger's), with a certificate for `paris`.
fn pki_other() -> tempfile::TempDir {
    pki(&["paris"])
}

#[test]
fn garbage_on_the_site_port_does_not_hurt_the_daemon() {
    let pki = pki(&["paris", "tokyo"]);
    let (a, mut b) = pair(pki.path(), 1, "async", "", None);
    // Plain bytes where a TLS handshake belongs; a truncated and an oversized "frame".
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0x16, 3, 1, 0xff, 0xff][..], &[0u8; 70000][..]] {
        let mut s = std::net::TcpStream::connect(b.listen).unwrap();
        let _ = s.write_all(junk);
        drop(s);
    }
    // TLS with a valid peer certificate, then garbage frames.
    if have("openssl") {
        let dir = pki.path();
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &b.listen.to_string()])
            .arg("-cert")
            .arg(dir.join("paris.crt"))
            .arg("-key")
            .arg(dir.join("paris.key"))
            .arg("-CAfile")
            .arg(dir.join("ca.crt"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut frame = b"DMRS".to_vec();
        frame.extend_from_slice(&[1, 0, 4, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f]);
        frame.extend_from_slice(&[0u8; 64]);
        let _ = child.stdin.take().unwrap().write_all(&frame);
        let _ = child.wait();
    }
    // A flood of idle connections (more than the listener serves at once) costs a
    // bounded number of threads and goes away with them.
    let idle: Vec<std::net::TcpStream> = (0..80).map(|_| std::net::TcpStream::connect(b.listen).unwrap()).collect();
    assert!(wait_until(Duration::from_secs(10), || b.d.log_text().contains("connections already open")));
    drop(idle);
    assert!(b.d.alive(), "the secondary daemon died");
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 5 0 64k"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 1);
}

#[test]
fn initial_copy_then_an_outage_beyond_the_log_copies_only_dirty_regions() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let b = Site::start("tokyo", pki.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), b.listen).unwrap();
    let a = Site::start("paris", pki.path());
    // The primary's device holds data before the group exists: a `sync` dirty log means
    // an initial copy of every region.
    let data = random_bytes((DEV_SECTORS * 512) as usize);
    a.d.make_file("dev0", DEV_SECTORS * 512);
    std::fs::write(a.dev(0), &data).unwrap();
    b.d.create("g", &b.table(1, true, "paris", a.listen, "async", ""));
    // A 4 MiB log: an outage of a few MiB of writes overflows it.
    let t = a.table(1, false, "tokyo", proxy.addr(), "async", "timeout=1s");
    let t = t.replace("auto 65536", "auto 8192").replace("core 2 2048 nosync", "core 2 128 sync");
    a.d.create("g", &t);
    wait_caught_up(&a, &b, Duration::from_secs(60));
    let s = a.slink(1);
    assert_eq!(s["sync"]["ordered"], true, "{s}");
    assert_eq!(s["sync"]["bytes_copied"].as_u64(), Some(DEV_SECTORS * 512), "initial copy of every region: {s}");
    assert_same(&a, &b, 1);

    // An outage longer than the log holds: the SLINK leaves ordered mode (dirty regions).
    proxy.blackhole(true);
    for i in 0..6u64 {
        // 1 MiB at 0, 4 MiB, 8 MiB, ... (64 KiB regions): 6 MiB, 96 regions dirty.
        qemu_io_ok(&a.d.uri("g-0"), &[&format!("write -P {} {}M 1M", 0x30 + i, i * 4)]);
    }
    assert!(
        wait_until(Duration::from_secs(30), || a.slink(1)["sync"]["ordered"] == false),
        "the log overflowed but the SLINK stayed ordered: {}",
        a.slink(1)
    );
    proxy.blackhole(false);
    wait_caught_up(&a, &b, Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(30), || a.slink(1)["sync"]["ordered"] == true), "{}", a.slink(1));
    let s = a.slink(1);
    let copied = s["sync"]["bytes_copied"].as_u64().unwrap();
    assert!(
        copied <= 6 << 20,
        "after the outage only the written regions are copied (at most 6 MiB), copied {copied}: {s}"
    );
    assert!(copied > 0, "{s}");
    assert_same(&a, &b, 1);
    // And ordered shipping goes on after the rejoin.
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 0x7e 100k 4k"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 1);
}

#[test]
fn two_remote_sites_each_at_its_own_pace() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo", "osaka"]);
    let b = Site::start("tokyo", pki.path());
    let c = Site::start("osaka", pki.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), c.listen).unwrap();
    let a = Site::start("paris", pki.path());
    b.d.create("g", &b.table(1, true, "paris", a.listen, "async", ""));
    c.d.create("g", &c.table(1, true, "paris", a.listen, "async", ""));
    // SLINK 1 synchronous to tokyo, SLINK 2 asynchronous to osaka (through the proxy).
    let t = a.table(1, false, "tokyo", b.listen, "sync", "");
    let osaka = format!(" net 5 2 async {} site=osaka timeout=1s 2 0 0 core 2 2048 nosync", proxy.addr());
    a.d.create("g", &(t + &osaka));
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 1 0 1M"]);
    assert!(wait_until(Duration::from_secs(30), || a.slink(2)["outstanding_ios"] == 0));
    // osaka goes silent: writes go on at tokyo's pace, osaka's share waits in the log.
    proxy.blackhole(true);
    for i in 0..8 {
        qemu_io_ok(&a.d.uri("g-0"), &[&format!("write -P {} {}k 64k", 2 + i, 1024 + i * 64)]);
    }
    assert_eq!(a.slink(1)["outstanding_ios"], 0, "the synchronous site has every acknowledged write");
    assert_eq!(read_at(&b.dev(0), 1024 << 10, 1), vec![2]);
    assert!(a.slink(2)["outstanding_ios"].as_u64().unwrap() > 0, "osaka lags: {}", a.slink(2));
    proxy.blackhole(false);
    assert!(
        wait_until(Duration::from_secs(60), || a.slink(2)["outstanding_ios"] == 0),
        "osaka never caught up: {}",
        a.slink(2)
    );
    assert!(wait_until(Duration::from_secs(30), || c.site_status()["lag_entries"] == 0));
    assert_eq!(hash(&a.dev(0)), hash(&b.dev(0)));
    assert_eq!(hash(&a.dev(0)), hash(&c.dev(0)));
    assert_eq!(a.slink(2)["sync"]["bytes_copied"], 0);
}

#[test]
fn primary_kill9_recovers_its_log_and_ships_the_rest() {
    let seed = wof_seed();
    let rng = StdRng::seed_from_u64(seed);
    let pki = pki(&["paris", "tokyo"]);
    let (mut a, b) = pair(pki.path(), 2, "async", "timeout=2s", None);
    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let cfg = writer_cfg(&a);
    let writer = BackgroundWriter::start(hist.clone(), cfg, rng);
    assert!(wait_until(Duration::from_secs(30), || b.site_status()["received"].as_u64().unwrap_or(0) > 300));
    a.d.kill9();
    let (res, _) = writer.join();
    assert!(res.unwrap().broken, "the writer saw the kill");
    // The secondary, whatever it has, is a prefix state of what the primary was sent
    // (once it has applied what it received: its files are read, not its exports).
    assert!(wait_until(Duration::from_secs(30), || {
        let s = b.site_status();
        s["applied"] == s["received"]
    }));
    let bdevs = [b.dev(0), b.dev(1)];
    let h = hist.lock().unwrap().clone();
    check_prefix(&h, &scan(&mut FileImages::open(&bdevs).unwrap(), NBLOCKS, 0).unwrap()).unwrap();
    a.d.restart();
    wait_caught_up(&a, &b, Duration::from_secs(60));
    assert_same(&a, &b, 2);
    check_acked(&h, &scan(&mut FileImages::open(&bdevs).unwrap(), NBLOCKS, 0).unwrap()).unwrap();
    assert_eq!(a.slink(1)["sync"]["bytes_copied"], 0, "no region copied after the primary's restart");
}

#[test]
fn delay_slows_synchronous_writes_by_the_round_trip_and_asynchronous_ones_not_at_all() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let b = Site::start("tokyo", pki.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), b.listen).unwrap();
    let a = Site::start("paris", pki.path());
    b.d.create("g", &b.table(2, true, "paris", a.listen, "async", ""));
    // Device 0 synchronous, device 1 ... the same group: the policy is per SLINK, so two
    // groups would be needed for two policies; one synchronous group is enough here.
    a.d.create("g", &a.table(2, false, "tokyo", proxy.addr(), "sync", "timeout=5s"));
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 1 0 4k"]);
    proxy.set_delay(Duration::from_millis(20));
    // A synchronous write waits for the secondary's ack: at least one round trip (40 ms).
    let t0 = std::time::Instant::now();
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 2 0 4k"]);
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(40), "a synchronous write took {took:?} over a 40 ms round trip");
    assert_eq!(read_at(&b.dev(0), 0, 1), vec![2], "acknowledged, so at the secondary");
    // Asynchronous: switch the SLINK's policy live; with the link stalled entirely, writes
    // still complete (the log holds them) and reach the secondary once it flows again.
    a.d.cli_ok(&["message", "g", "0", "slink", "1", "policy", "asynchronous"]);
    proxy.stall(dmrep_faultproxy::Direction::Up, true);
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 3 4k 4k", "write -P 4 8k 4k"]);
    assert!(a.slink(1)["outstanding_ios"].as_u64().unwrap() >= 1, "{}", a.slink(1));
    proxy.stall(dmrep_faultproxy::Direction::Up, false);
    proxy.set_delay(Duration::ZERO);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_same(&a, &b, 2);
}

/// Threads and open files of a process.
fn resources(pid: u32) -> (usize, usize) {
    let n = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (n(format!("/proc/{pid}/task")), n(format!("/proc/{pid}/fd")))
}

#[test]
fn a_flapping_link_loses_nothing_leaks_nothing_and_converges() {
    // FLAP_SECS: how long the link flaps (default 8; the minute: FLAP_SECS=60).
    let secs: u64 = std::env::var("FLAP_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let seed = wof_seed();
    eprintln!("flapping for {secs} s (FLAP_SECS)");
    let mut rng = StdRng::seed_from_u64(seed);
    let pki = pki(&["paris", "tokyo"]);
    let b = Site::start("tokyo", pki.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), b.listen).unwrap();
    let a = Site::start("paris", pki.path());
    b.d.create("g", &b.table(2, true, "paris", a.listen, "async", ""));
    a.d.create("g", &a.table(2, false, "tokyo", proxy.addr(), "async", "timeout=1s"));
    // (Beyond the blocks the write-order checker reads: it wants its stamps there.)
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 1 16M 64k"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    let (threads0, fds0) = (resources(a.d.pid()), resources(b.d.pid()));

    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let cfg = writer_cfg(&a);
    let writer = BackgroundWriter::start(hist.clone(), cfg, rng.clone());
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let mut flaps = 0;
    while std::time::Instant::now() < until {
        match rng.random_range(0..3) {
            0 => proxy.drop_connections(),
            1 => {
                proxy.blackhole(true);
                std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
                proxy.blackhole(false);
            }
            _ => proxy.refuse(rng.random_bool(0.5)),
        }
        flaps += 1;
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
    }
    proxy.refuse(false);
    let (res, _) = writer.stop_and_join();
    let res = res.unwrap();
    assert!(res.errors.is_empty() && !res.broken, "the primary's writes never failed: {res:?}");
    wait_caught_up(&a, &b, Duration::from_secs(60));
    assert_same(&a, &b, 2);
    let h = hist.lock().unwrap().clone();
    check_acked(&h, &scan(&mut FileImages::open(&[b.dev(0), b.dev(1)]).unwrap(), NBLOCKS, 0).unwrap()).unwrap();
    // (An outage the log cannot hold while the writer runs flat out ends in a resync of
    // the regions written meanwhile: allowed, and over once caught up.)
    let copied = a.slink(1)["sync"]["bytes_copied"].as_u64().unwrap();
    // No thread or file left behind by the outages (a little slack for NBD workers).
    let (threads1, fds1) = (resources(a.d.pid()), resources(b.d.pid()));
    eprintln!(
        "{flaps} flaps, {copied} bytes resynced; primary threads/fds {threads0:?} -> {threads1:?}, secondary {fds0:?} -> {fds1:?}"
    );
    assert!(
        threads1.0 <= threads0.0 + 4 && threads1.1 <= threads0.1 + 4,
        "primary leaks: {threads0:?} -> {threads1:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let r = resources(b.d.pid());
            r.0 <= fds0.0 + 4 && r.1 <= fds0.1 + 4
        }),
        "secondary leaks: {fds0:?} -> {:?}",
        resources(b.d.pid())
    );
}

#[test]
fn a_rate_capped_link_ships_no_faster_than_its_cap() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let (a, b) = pair(pki.path(), 1, "async", "rate=1m", None);
    let t0 = std::time::Instant::now();
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 6 0 4M"]);
    wait_caught_up(&a, &b, Duration::from_secs(60));
    let took = t0.elapsed();
    // 4 MiB at 1 MiB/s, less the first burst (64 KiB): at least ~3.9 s.
    assert!(took >= Duration::from_millis(3500), "4 MiB crossed a 1 MiB/s link in {took:?}");
    assert_same(&a, &b, 1);
    assert_eq!(a.slink(1)["link"]["rate_limit"], 1 << 20);
}

#[test]
fn a_wrong_address_shows_before_the_first_write() {
    let pki = pki(&["paris", "tokyo"]);
    let a = Site::start("paris", pki.path());
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    a.d.create("g", &a.table(1, false, "tokyo", nowhere, "async", "timeout=1s"));
    assert!(
        wait_until(Duration::from_secs(20), || a.slink(1)["accessible"] == false
            && a.slink(1)["last_error"].as_str().is_some_and(|e| e.contains("cannot connect"))),
        "a net SLINK to nowhere looks healthy: {}",
        a.slink(1)
    );
    assert!(a.d.cli_ok(&["status", "g"]).contains("1:A,0,0,0ms,down"), "{}", a.d.cli_ok(&["status", "g"]));
}
