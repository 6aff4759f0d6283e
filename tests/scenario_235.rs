//! The paper's scenario 2.3.5: a primary keeps a synchronous local mirror of its group
//! (a `local` SLINK, synchronous) and replicates asynchronously to a remote site over a
//! slow link. Under the write-order workload, `kill -9` of the primary: the local mirror
//! holds every acknowledged write and is a prefix state; the remote site, behind, is a
//! prefix state too; after the restart everything converges.

mod common;
#[path = "common/nbd_client.rs"]
mod nbd_client;
#[path = "common/wof.rs"]
mod wof;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::sites::*;
use common::*;
use dmrep_faultproxy::FaultProxy;
use wof::*;

const DEV_SECTORS: u64 = 65536;
const NBLOCKS: u64 = 4096;

impl Site {
    /// Group `g` of two devices: its own on SLINK 0; at the primary also a synchronous
    /// local mirror (SLINK 1, files `mirror<n>`) and the remote site on SLINK 2; at the
    /// secondary the primary on SLINK 2.
    fn create_235(&self, secondary: bool, peer: (&str, std::net::SocketAddr)) {
        let log = self.d.make_file("replog", 256 << 20);
        let (n, role) = if secondary { (5, " role=secondary") } else { (4, "") };
        let mut t = format!("0 {DEV_SECTORS} replicator default {n} {} 0 auto 65536{role}", log.display());
        for d in 0..2 {
            self.d.make_file(&format!("dev{d}"), DEV_SECTORS * 512);
            t += &format!(" local 2 0 async 2 {d} {} - 0", self.dev(d).display());
            if !secondary {
                let m = self.d.make_file_s(&format!("mirror{d}"), DEV_SECTORS * 512);
                t += &format!(" local 2 1 sync 2 {d} {m} core 2 2048 nosync");
            }
            t += &format!(" net 5 2 async {} site={} timeout=10s 2 {d} {d} core 2 2048 nosync", peer.1, peer.0);
        }
        self.d.create("g", &t);
    }

    fn mirrors(&self) -> Vec<PathBuf> {
        (0..2).map(|d| self.d.path(&format!("mirror{d}"))).collect()
    }
}

#[test]
fn sync_local_mirror_plus_async_remote_site_keep_their_promises_across_kill9() {
    let seed = std::env::var("WOF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (WOF_SEED)");
    let pki = pki(&["paris", "tokyo"]);
    let mut paris = Site::start("paris", pki.path());
    let tokyo = Site::start("tokyo", pki.path());
    // The remote link: 20 ms each way and 2 MiB/s, so the remote site falls behind.
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), tokyo.listen).unwrap();
    proxy.set_delay(Duration::from_millis(20));
    proxy.set_rate(Some(4 << 20));
    tokyo.create_235(true, ("paris", paris.listen));
    paris.create_235(false, ("tokyo", proxy.addr()));

    let hist = Arc::new(Mutex::new(History::new(2, NBLOCKS)));
    let cfg = WriterCfg {
        socket: paris.d.path("nbd.sock"),
        exports: vec!["g-0".into(), "g-1".into()],
        q: 8,
        stall: Duration::from_secs(60),
    };
    let writer = BackgroundWriter::start(hist.clone(), cfg, StdRng::seed_from_u64(seed));
    let busy = wait_until(Duration::from_secs(60), || {
        let st = group_status(&paris.d, "g");
        slink_of(&st, 1)["applied_entries"].as_u64().unwrap_or(0) > 2000
            && slink_of(&st, 2)["outstanding_ios"].as_u64().unwrap_or(0) > 0
            && group_status(&tokyo.d, "g")["site"]["applied"].as_u64().unwrap_or(0) > 200
    });
    assert!(busy, "the workload runs and the remote site lags: {}", group_status(&paris.d, "g"));
    let ordered = slink_of(&group_status(&paris.d, "g"), 2)["sync"]["ordered"] == true;
    paris.d.kill9();
    assert!(ordered, "the remote SLINK was in ordered mode at the kill (its log did not fill)");
    let (res, _) = writer.join();
    assert!(res.unwrap().broken, "the kill broke the writer's connections");

    let h = hist.lock().unwrap().clone();
    // The synchronous local mirror, as the kill left it: every acknowledged write, in order.
    let mirror = scan(&mut FileImages::open(&paris.mirrors()).unwrap(), NBLOCKS, 0).unwrap();
    check_prefix(&h, &mirror).unwrap_or_else(|e| panic!("seed {seed}: the local mirror is not a prefix state: {e}"));
    let acked = check_acked(&h, &mirror).unwrap_or_else(|e| panic!("seed {seed}: the local mirror lost a write: {e}"));
    // The remote site, behind: a prefix state of the same history.
    let settled = wait_until(Duration::from_secs(30), || {
        let s = group_status(&tokyo.d, "g")["site"].clone();
        s["applied"] == s["received"]
    });
    assert!(settled, "tokyo applies what it received");
    let remote = scan(&mut FileImages::open(&[tokyo.dev(0), tokyo.dev(1)]).unwrap(), NBLOCKS, 0).unwrap();
    let r = check_prefix(&h, &remote).unwrap_or_else(|e| panic!("seed {seed}: tokyo is not a prefix state: {e}"));
    assert!(r.visible > 0, "tokyo had writes when the primary died");
    eprintln!("local mirror: {acked} acknowledged writes, all there; tokyo: a prefix state ({r:?})");

    // The primary comes back; the remote link heals; every copy converges.
    proxy.set_rate(None);
    proxy.set_delay(Duration::ZERO);
    paris.d.restart();
    let converged = wait_until(Duration::from_secs(60), || {
        let st = group_status(&paris.d, "g");
        st["slinks"].as_array().unwrap().iter().all(|s| s["outstanding_ios"] == 0 && s["sync"]["ordered"] == true)
            && group_status(&tokyo.d, "g")["site"]["applied"] == st["site"]["received"]
    });
    assert!(converged, "{}", group_status(&paris.d, "g"));
    for d in 0..2 {
        let ld = std::fs::read(paris.dev(d)).unwrap();
        assert!(ld == std::fs::read(&paris.mirrors()[d as usize]).unwrap(), "mirror {d} equals the LD");
        assert!(ld == std::fs::read(tokyo.dev(d)).unwrap(), "tokyo's device {d} equals the LD");
    }
}
