//! Helpers for tests with remote sites (`tests/sites.rs`, `tests/sites_netns.rs`):
//! certificates made by `dmrep pki`, and a group's status read from a daemon.

use std::process::Command;

use super::{run_ok, Daemon, BIN};

/// `dmrep pki init` and one certificate per site, in a directory of its own.
pub fn pki(sites: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("dmrep-pki").tempdir_in("/tmp").unwrap();
    let d = dir.path().to_str().unwrap();
    run_ok(Command::new(BIN).args(["pki", "init", d]));
    for s in sites {
        run_ok(Command::new(BIN).args(["pki", "issue", d, s]));
    }
    dir
}

/// The status (`--json`, the replicator segment's detail) of group `name` at `d`.
pub fn group_status(d: &Daemon, name: &str) -> serde_json::Value {
    d.json(&["status", name])[0]["segments"][0]["detail"].clone()
}

/// SLINK `nr`'s status in a group status.
pub fn slink_of(status: &serde_json::Value, nr: u64) -> serde_json::Value {
    status["slinks"].as_array().unwrap().iter().find(|s| s["slink"] == nr).cloned().unwrap()
}

/// A daemon that is site `name`: its site name, the TLS files `dmrep pki` made in `pki`,
/// and a site listener on a free loopback port (returned).
pub fn site_daemon(name: &str, pki: &std::path::Path) -> (Daemon, std::net::SocketAddr) {
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
    (site_daemon_at(name, pki, listen, Vec::new()), listen)
}

/// Site `name` listening on `listen`, started under `wrap` (`ip netns exec NS`, or nothing).
pub fn site_daemon_at(name: &str, pki: &std::path::Path, listen: std::net::SocketAddr, wrap: Vec<String>) -> Daemon {
    let (n, p) = (name.to_string(), pki.to_path_buf());
    Daemon::start_wrapped(wrap, move |_| {
        vec![
            "--site-name".into(),
            n,
            "--tls-dir".into(),
            p.display().to_string(),
            "--site-listen".into(),
            listen.to_string(),
        ]
    })
}

/// A site of a test: its daemon, name and site listener. Each test file adds what it
/// needs (tables, status views) in an `impl Site` of its own.
pub struct Site {
    pub d: Daemon,
    pub name: String,
    pub listen: std::net::SocketAddr,
}

impl Site {
    pub fn start(name: &str, pki: &std::path::Path) -> Site {
        let (d, listen) = site_daemon(name, pki);
        Site { d, name: name.to_string(), listen }
    }

    /// The site's device file `dev<n>` (in its daemon's directory).
    pub fn dev(&self, n: u32) -> std::path::PathBuf {
        self.d.dir().join(format!("dev{n}"))
    }
}
