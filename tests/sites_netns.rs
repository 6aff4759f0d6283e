//! A real network partition between two sites: the secondary daemon (`tokyo`) runs in a
//! network namespace of its own, joined to the root namespace (where the primary `paris`
//! runs) by a veth pair with addresses from a private /30. The link is cut by the kernel,
//! not by a proxy: no RST, no FIN, packets just stop.
//!
//! - `ip link set <veth> down` on the root side: the primary's SLINK 1 is found down
//!   within a few seconds (its `timeout=1s`), the log absorbs the writes (its
//!   `outstanding_ios` grows), the application's writes never fail; once the link is up
//!   again the secondary catches up from the log, equal bytes, no region copied;
//! - the same with nftables dropping the site port inside the namespace (only where
//!   `nft` is installed: it is optional, its absence skips that test with the reason);
//! - no application write waits for the partition, even while the group's status is
//!   queried all along (as monitoring does): a status query that waited for the link's
//!   exchange under the group's lock stalled every write for up to the SLINK's timeout.
//!
//! While the root side of the veth is down, its connected route is gone: an `unreachable`
//! route for the /30 (added with the namespace, removed with it) keeps the primary's
//! reconnection attempts on this machine instead of following the default route out.
//!
//! Needs root and a kernel that allows network namespaces and veth; where they do not
//! work the tests print `SKIP: <why>` and pass, even under `DMREP_REQUIRE_TOOLS=1` (a
//! refusal of the kernel or of the sandbox is not a missing tool), but a missing `ip`
//! (or `qemu-io`) fails there, as for every tool.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;

use common::sites::*;
use common::*;

const DEV_SECTORS: u64 = 65536;
/// The secondary's site port, inside its namespace (which has nothing else listening).
const SITE_PORT: u16 = 7400;
/// Metric of the guard route (see the module doc): tells ours apart from others.
const GUARD_METRIC: &str = "4213";

fn ip(args: &[&str]) -> Output {
    run_timeout(Command::new("ip").args(args), Duration::from_secs(20))
}

fn ip_ok(args: &[&str]) {
    let o = ip(args);
    assert!(o.status.success(), "ip {}: {}", args.join(" "), show(&o));
}

fn stderr_line(o: &Output) -> String {
    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if e.is_empty() {
        format!("{}", o.status)
    } else {
        e
    }
}

fn euid() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("Uid:"))?;
    l.split_whitespace().nth(2)?.parse().ok()
}

/// A network namespace with a veth pair to the root namespace: `root_ip` on the root
/// side (`veth`), `ns_ip` on the namespace side. Dropping it deletes the veth (both
/// ends), the namespace and the guard route, also when the test panics.
struct Netns {
    name: String,
    veth: String,
    root_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    /// The /30, once its guard route is in place.
    guard: Option<String>,
}

impl Netns {
    /// The namespace, or why this machine cannot make one (not root, the kernel or the
    /// sandbox refuses namespaces or veth).
    fn create() -> Result<Netns, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("dmrep-t-{pid}-{n}");
        // At most 15 bytes: pid_max is at most 4194304 (7 digits).
        let veth = format!("dmt{pid}-{n}");
        let o = ip(&["netns", "add", &name]);
        if !o.status.success() {
            let root = match euid() {
                Some(0) => String::new(),
                Some(u) => format!("not root (euid {u}): "),
                None => String::new(),
            };
            return Err(format!("{root}`ip netns add {name}` failed: {}", stderr_line(&o)));
        }
        let mut ns = Netns { name, veth, root_ip: Ipv4Addr::UNSPECIFIED, ns_ip: Ipv4Addr::UNSPECIFIED, guard: None };
        // Does the namespace work at all (a sandbox may let it be made, not entered)?
        let o = ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        if !o.status.success() {
            return Err(format!("cannot enter network namespace {}: {}", ns.name, stderr_line(&o)));
        }
        let o = ip(&["link", "add", &ns.veth, "type", "veth", "peer", "name", "site0", "netns", &ns.name]);
        if !o.status.success() {
            return Err(format!("cannot make a veth pair into {}: {}", ns.name, stderr_line(&o)));
        }
        // A /30 nobody here uses, with its guard route.
        let mut rng = rand::rng();
        for _ in 0..50 {
            let (c, d) = (rng.random_range(0..=255u8), rng.random_range(0..64u8) * 4);
            let net = format!("10.213.{c}.{d}/30");
            let used = ip(&["-4", "-o", "addr", "show", "to", &net]);
            if !used.status.success() || !used.stdout.is_empty() {
                continue;
            }
            if ip(&["route", "add", "unreachable", &net, "metric", GUARD_METRIC]).status.success() {
                ns.guard = Some(net);
                ns.root_ip = Ipv4Addr::new(10, 213, c, d + 1);
                ns.ns_ip = Ipv4Addr::new(10, 213, c, d + 2);
                break;
            }
        }
        assert!(ns.guard.is_some(), "no free /30 in 10.213.0.0/16 for the veth pair");
        ip_ok(&["addr", "add", &format!("{}/30", ns.root_ip), "dev", &ns.veth]);
        ip_ok(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.ns_ip), "dev", "site0"]);
        ip_ok(&["link", "set", &ns.veth, "up"]);
        ip_ok(&["-n", &ns.name, "link", "set", "site0", "up"]);
        eprintln!("namespace {} (veth {}: {} <-> {})", ns.name, ns.veth, ns.root_ip, ns.ns_ip);
        Ok(ns)
    }

    /// The command prefix that runs a program in the namespace.
    fn exec(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].iter().map(|s| s.to_string()).collect()
    }

    fn in_ns(&self, prog: &str, args: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]).args(args);
        run_timeout(&mut c, Duration::from_secs(20))
    }

    fn in_ns_ok(&self, prog: &str, args: &[&str]) {
        let o = self.in_ns(prog, args);
        assert!(o.status.success(), "in {}: {prog} {}: {}", self.name, args.join(" "), show(&o));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace would take it along too, but
        // only once its last process is gone.
        let _ = ip(&["link", "del", &self.veth]);
        let o = ip(&["netns", "del", &self.name]);
        if !o.status.success() {
            eprintln!("cleanup: ip netns del {}: {}", self.name, stderr_line(&o));
        }
        if let Some(net) = &self.guard {
            let o = ip(&["route", "del", "unreachable", net, "metric", GUARD_METRIC]);
            if !o.status.success() {
                eprintln!("cleanup: ip route del unreachable {net}: {}", stderr_line(&o));
            }
        }
    }
}

/// How the link is cut.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Cut {
    /// `ip link set <root side of the veth> down`.
    LinkDown,
    /// nftables in the namespace drops every packet to and from the site port.
    Nft,
}

impl Netns {
    fn nft_table(&self) -> String {
        format!("dmrep_t{}", std::process::id())
    }

    fn cut(&self, how: Cut) {
        match how {
            Cut::LinkDown => ip_ok(&["link", "set", &self.veth, "down"]),
            Cut::Nft => {
                // In the namespace: it goes with the namespace whatever happens.
                let t = self.nft_table();
                self.in_ns_ok("nft", &["add", "table", "inet", &t]);
                for (chain, hook, dir) in [("dmrep_in", "input", "dport"), ("dmrep_out", "output", "sport")] {
                    self.in_ns_ok(
                        "nft",
                        &[&format!(
                            "add chain inet {t} {chain} {{ type filter hook {hook} priority 0; policy accept; }}"
                        )],
                    );
                    self.in_ns_ok("nft", &[&format!("add rule inet {t} {chain} tcp {dir} {SITE_PORT} drop")]);
                }
            }
        }
    }

    fn heal(&self, how: Cut) {
        match how {
            Cut::LinkDown => ip_ok(&["link", "set", &self.veth, "up"]),
            Cut::Nft => self.in_ns_ok("nft", &["delete", "table", "inet", &self.nft_table()]),
        }
    }
}

/// A site: a daemon with a site name, TLS files and a site listener.
struct Site {
    d: Daemon,
    listen: SocketAddr,
}

impl Site {
    /// Started under `wrap` (`ip netns exec NS`, or nothing), listening on `listen`.
    fn start(name: &str, pki: &Path, listen: SocketAddr, wrap: Vec<String>) -> Site {
        Site { d: site_daemon_at(name, pki, listen, wrap), listen }
    }

    fn dev(&self) -> PathBuf {
        self.d.dir().join("dev0")
    }

    /// Group `g` of one device: this site's device on SLINK 0, the peer on SLINK 1.
    fn create(&self, secondary: bool, peer: &str, peer_addr: SocketAddr, extra: &str) {
        self.d.make_file("dev0", DEV_SECTORS * 512);
        let log = self.d.dir().join("replog");
        let role = if secondary { " role=secondary" } else { "" };
        let nlog = if secondary { 5 } else { 4 };
        let mut net = vec!["1".to_string(), "async".into(), peer_addr.to_string(), format!("site={peer}")];
        net.extend(extra.split_whitespace().map(String::from));
        let table = format!(
            "0 {DEV_SECTORS} replicator default {nlog} {} 0 auto 65536{role} local 2 0 async 2 0 {} - 0 \
             net {} {} 2 0 0 core 2 2048 nosync",
            log.display(),
            self.dev().display(),
            net.len(),
            net.join(" ")
        );
        self.d.create("g", &table);
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

    /// The daemon's log lines about the site link.
    fn link_log(&self) -> String {
        self.d.log_text().lines().filter(|l| l.contains("site link")).collect::<Vec<_>>().join("\n")
    }
}

/// Wait until the primary has shipped everything, the secondary applied it, and the
/// primary's own device has it too.
fn wait_caught_up(a: &Site, b: &Site, timeout: Duration) {
    let ok = wait_until(timeout, || {
        let s = a.status();
        let last = s["log"]["next_seq"].as_u64().unwrap() - 1;
        let l = b.site_status();
        s["slinks"].as_array().unwrap().iter().all(|s| s["outstanding_ios"] == 0)
            && l["applied"].as_u64() == Some(last)
            && l["lag_entries"] == 0
    });
    assert!(
        ok,
        "secondary not caught up within {timeout:?}:\nprimary slink 1: {}\nsecondary: {}\nprimary's link log:\n{}",
        a.slink(1),
        b.site_status(),
        a.link_log()
    );
}

/// What the application saw.
#[derive(Debug, Default)]
struct WriterReport {
    writes: u64,
    failures: Vec<String>,
    /// Every write: when it started, how long it took.
    times: Vec<(Instant, Duration)>,
}

impl WriterReport {
    /// The writes that were in flight at some time in `from..to`.
    fn during(&self, from: Instant, to: Instant) -> impl Iterator<Item = &(Instant, Duration)> {
        self.times.iter().filter(move |(t, d)| *t < to && *t + *d > from)
    }

    /// The slowest of them.
    fn slowest(&self, from: Instant, to: Instant) -> Duration {
        self.during(from, to).map(|(_, d)| *d).max().unwrap_or_default()
    }
}

/// Writes the application starts at most this often.
const WRITE_EVERY: Duration = Duration::from_millis(10);

/// The application: one `qemu-io` 16 KiB write after another on the primary's export,
/// each a pattern of its own over the first 16 MiB, until stopped. At most one write
/// every [`WRITE_EVERY`]: at most 1.6 MB/s, so a partition of several seconds stays far
/// from filling the 32 MiB log (which would end ordered shipping and copy regions: not
/// what these tests look at).
struct Writer {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: JoinHandle<WriterReport>,
}

impl Writer {
    fn start(uri: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let handle = std::thread::spawn(move || {
            let mut r = WriterReport::default();
            let mut k: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                k += 1;
                let cmd = format!("write -P {} {} 16k", k % 255 + 1, (k % 1024) * 16384);
                let t = Instant::now();
                let o = qemu_io(&uri, &[&cmd]);
                r.times.push((t, t.elapsed()));
                let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
                if !o.status.success() || text.contains("failed") || text.contains("error") {
                    r.failures.push(format!("{cmd}: {}", show(&o)));
                }
                r.writes += 1;
                c.fetch_add(1, Ordering::Relaxed);
                // Pacing (a rate limit), not a wait for work.
                std::thread::sleep(WRITE_EVERY.saturating_sub(t.elapsed()));
            }
            r
        });
        Writer { stop, count, handle }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn stop(self) -> WriterReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer thread panicked")
    }
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// How long the link stays cut at least (the primary meanwhile probes and fails).
const HOLD: Duration = Duration::from_secs(3);

/// The scenario: the link cut `how`, the SLINK's `timeout` (`1s`); with `max_stall`,
/// no application write may take longer than that while the link is cut.
fn partition_is_absorbed_by_the_log_and_heals_without_a_full_copy(
    how: Cut,
    timeout: &str,
    max_stall: Option<Duration>,
) {
    require!("ip", "qemu-io");
    if how == Cut::Nft && !have("nft") {
        // Optional tool, never installed for this: not a failure under DMREP_REQUIRE_TOOLS.
        eprintln!("SKIP: the nftables partition (nft not installed; the link-down partition covers the rest)");
        return;
    }
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(why) => {
            // Not a missing tool (so not `skip`): the kernel or the sandbox says no.
            eprintln!("SKIP: network namespaces do not work here: {why}");
            return;
        }
    };
    let pki = pki(&["paris", "tokyo"]);
    let b = Site::start("tokyo", pki.path(), SocketAddr::new(ns.ns_ip.into(), SITE_PORT), ns.exec());
    let a = Site::start("paris", pki.path(), SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port()), Vec::new());
    b.create(true, "paris", a.listen, "");
    a.create(false, "tokyo", b.listen, &format!("timeout={timeout}"));
    qemu_io_ok(&a.d.uri("g-0"), &["write -P 0xa5 0 1M"]);
    wait_caught_up(&a, &b, Duration::from_secs(30));
    assert_eq!(a.slink(1)["accessible"], true, "{}", a.slink(1));

    let w = Writer::start(a.d.uri("g-0"));
    let t_start = Instant::now();
    assert!(wait_until(Duration::from_secs(30), || w.count() >= 10), "the writer does not get going");
    let shipped = u(&b.site_status()["received"]);
    assert!(shipped > 1, "nothing shipped while linked: {}", b.site_status());

    // Cut.
    ns.cut(how);
    let t_cut = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || a.slink(1)["accessible"] == false),
        "SLINK 1 not found down within 10 s of the cut ({how:?}): {}\nprimary's link log:\n{}",
        a.slink(1),
        a.link_log()
    );
    let found_down = t_cut.elapsed();
    // Nothing passes the cut: what the secondary has stays as it is while it lasts.
    let received = u(&b.site_status()["received"]);
    let (o1, n1) = (u(&a.slink(1)["outstanding_ios"]), w.count());
    assert!(
        wait_until(HOLD + Duration::from_secs(30), || t_cut.elapsed() >= HOLD
            && u(&a.slink(1)["outstanding_ios"]) > o1 + 20
            && w.count() > n1 + 20),
        "the log does not absorb the writes while the link is down (outstanding {o1}, writes {n1} when found \
         down): {}\nwrites now {}",
        a.slink(1),
        w.count()
    );
    let during = a.slink(1);
    assert_eq!(during["accessible"], false, "SLINK 1 back during the partition: {during}");
    assert_eq!(during["link"]["connected"], false, "connected through the cut: {during}");
    assert_eq!(u(&b.site_status()["received"]), received, "the secondary received entries through the cut");
    let used = a.status()["log"]["used_bytes"].clone();

    // Heal.
    ns.heal(how);
    let t_heal = Instant::now();
    let cut_for = t_cut.elapsed();
    assert!(
        wait_until(Duration::from_secs(60), || a.slink(1)["accessible"] == true),
        "SLINK 1 not back within 60 s of the heal ({how:?}): {}\nprimary's link log:\n{}",
        a.slink(1),
        a.link_log()
    );
    let back = t_heal.elapsed();
    // Keep writing a little across the reconnection.
    let n2 = w.count();
    assert!(wait_until(Duration::from_secs(30), || w.count() >= n2 + 10), "the writer stalls after the heal");
    let report = w.stop();
    assert!(
        report.failures.is_empty(),
        "{} of {} application writes failed:\n{}",
        report.failures.len(),
        report.writes,
        report.failures.join("\n")
    );
    wait_caught_up(&a, &b, Duration::from_secs(60));
    let caught_up = t_heal.elapsed();
    assert_same(&a.dev(), &b.dev());
    let s1 = a.slink(1);
    assert!(u(&s1["link"]["connects"]) > u(&during["link"]["connects"]), "no reconnection counted: {s1}");
    assert_eq!(s1["sync"]["bytes_copied"], 0, "a region was copied after the partition: {s1}");
    assert_eq!(s1["sync"]["ordered"], true, "{s1}");
    let log = a.link_log();
    assert!(log.contains("site link down"), "the outage is not logged:\n{log}");
    let (before, cut) = (report.slowest(t_start, t_cut - Duration::from_millis(100)), report.slowest(t_cut, t_heal));
    eprintln!(
        "{how:?}: found down {found_down:?} after the cut; cut for {cut_for:?}: {} entries outstanding, {used} bytes \
         of log used; back {back:?} after the heal, caught up {caught_up:?} after it; {} application writes, none \
         failed, the slowest {before:?} before the cut, {cut:?} while cut, {:?} after\nprimary's link log:\n{log}",
        during["outstanding_ios"],
        report.writes,
        report.slowest(t_heal, Instant::now()),
    );
    if let Some(max) = max_stall {
        let slow: Vec<String> = report
            .during(t_cut, t_heal)
            .filter(|(_, d)| *d > max)
            .map(|(t, d)| match t.checked_duration_since(t_cut) {
                Some(a) => format!("{d:?}, started {a:?} after the cut"),
                None => format!("{d:?}, started {:?} before the cut", t_cut - *t),
            })
            .collect();
        assert!(
            slow.is_empty(),
            "application writes stalled by the partition (more than {max:?}):\n{}",
            slow.join("\n")
        );
    }
}

/// The two devices hold the same bytes; else where they first differ.
fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "{} and {} differ in size", a.display(), b.display());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("paris's and tokyo's devices differ first at byte {i} ({:#x} and {:#x})", x[i], y[i]);
    }
}

#[test]
fn link_down_partition_is_absorbed_by_the_log_and_heals_without_a_full_copy() {
    partition_is_absorbed_by_the_log_and_heals_without_a_full_copy(Cut::LinkDown, "1s", None);
}

#[test]
fn nftables_partition_is_absorbed_by_the_log_and_heals_without_a_full_copy() {
    partition_is_absorbed_by_the_log_and_heals_without_a_full_copy(Cut::Nft, "1s", None);
}

/// An asynchronous SLINK's partition must not slow the application, even while someone
/// watches the group's status (as monitoring does, and as these tests do).
#[test]
fn status_queries_during_a_partition_do_not_stall_the_application() {
    partition_is_absorbed_by_the_log_and_heals_without_a_full_copy(Cut::LinkDown, "3s", Some(Duration::from_secs(1)));
}
