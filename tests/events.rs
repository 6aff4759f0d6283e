//! `dmrep events`: the daemon's state, then every change, one line each. A reader
//! follows a primary through a group's creation, a link cut, dirty mode (the log full),
//! the resync after the link is back, and the removal: every expected line, in order.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::sites::*;
use common::*;
use dmrep_faultproxy::FaultProxy;

/// `dmrep events` (or with `args`) running against `d`, its lines collected.
struct Reader {
    _child: KillOnDrop,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Reader {
    fn start(d: &Daemon, args: &[&str]) -> Reader {
        let mut cmd = d.cli_cmd(&[&["events"], args].concat());
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                l.lock().unwrap().push(line);
            }
        });
        Reader { _child: KillOnDrop(child), lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Wait until the lines hold `expected` in this order (each a set of words one line
    /// must contain), after the line index `from`; the index after the last match.
    fn expect(&self, from: usize, expected: &[&[&str]], timeout: Duration) -> usize {
        let mut at = from;
        let mut found = 0;
        let ok = wait_until(timeout, || {
            let lines = self.lines();
            while found < expected.len() {
                match lines[at..].iter().position(|l| expected[found].iter().all(|w| l.contains(w))) {
                    Some(i) => {
                        at += i + 1;
                        found += 1;
                    }
                    None => return false,
                }
            }
            true
        });
        assert!(
            ok,
            "missing, in order: {:?} (found the first {found})\nevents:\n{}",
            expected,
            self.lines()[from..].join("\n")
        );
        at
    }
}

#[test]
fn events_follow_create_link_cut_dirty_mode_resync_and_removal_in_order() {
    require!("qemu-io");
    let pki = pki(&["paris", "tokyo"]);
    let (tokyo, tokyo_at) = site_daemon("tokyo", pki.path());
    let (paris, paris_at) = site_daemon("paris", pki.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), tokyo_at).unwrap();
    let table = |d: &Daemon, secondary: bool, peer: &str, addr: SocketAddr| {
        let dev = d.make_file_s("dev0", 32 << 20);
        let log = d.dir().join("replog");
        let (n, role) = if secondary { (5, " role=secondary") } else { (4, "") };
        format!(
            "0 65536 replicator default {n} {} 0 auto 16384{role} local 2 0 async 2 0 {dev} - 0 \
             net 5 1 async {addr} site={peer} timeout=1s 2 0 0 core 2 2048 nosync",
            log.display()
        )
    };
    tokyo.create("g", &table(&tokyo, true, "paris", paris_at));
    let r = Reader::start(&paris, &[]);
    let at = r.expect(0, &[&["exists -"]], Duration::from_secs(10));
    paris.create("g", &table(&paris, false, "tokyo", proxy.addr()));
    let at = r.expect(
        at,
        &[
            &["create device", "name:g "],
            &["create device", "name:g-0"],
            &["change slink", "group:g", "slink:1", "up:true"],
        ],
        Duration::from_secs(20),
    );
    qemu_io_ok(&paris.uri("g-0"), &["write -P 1 0 1M"]);

    // The link is cut: down, with the reason; writes fill the 8 MiB log: dirty mode.
    proxy.blackhole(true);
    proxy.refuse(true);
    let at = r.expect(at, &[&["change slink", "group:g", "slink:1", "up:false", "reason:"]], Duration::from_secs(20));
    qemu_io_ok(&paris.uri("g-0"), &["write -P 2 0 12M"]);
    let at =
        r.expect(at, &[&["change slink", "slink:1", "mode:dirty", "replication log full"]], Duration::from_secs(20));
    // The state as a new reader sees it.
    let now = paris.cli_ok(&["events", "--now"]);
    assert!(now.lines().any(|l| l.starts_with("exists slink") && l.contains("mode:dirty")), "{now}");
    assert!(now.lines().any(|l| l.starts_with("exists site") && l.contains("role:primary")), "{now}");
    assert_eq!(now.lines().last(), Some("exists -"), "{now}");
    let json = paris.cli_ok(&["events", "--now", "--json"]);
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["action"], "exists");

    // Back: up, the resync starts and ends.
    proxy.blackhole(false);
    proxy.refuse(false);
    let at = r.expect(
        at,
        &[
            &["change slink", "slink:1", "up:true"],
            &["change slink", "slink:1", "resync:start"],
            &["change slink", "slink:1", "resync:end", "bytes_copied:"],
        ],
        Duration::from_secs(60),
    );
    paris.cli_ok(&["remove", "g"]);
    r.expect(at, &[&["destroy device", "name:g-0"], &["destroy device", "name:g"]], Duration::from_secs(10));
}
