//! Test helpers: external tools (skip or fail when missing), waits with deadlines, a
//! temporary PKI with a few sites, and a loopback listener.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::pki;
use crate::tls::{SiteTls, TlsError, TlsStream};

/// Deadline for anything in a test that should take well under a second.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Timeout given to connect and accept in tests.
pub const HANDSHAKE: Duration = Duration::from_secs(20);

/// Poll `cond` every few milliseconds until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `tool` is an executable on PATH.
pub fn have(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .any(|d| std::fs::metadata(d.join(tool)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A test cannot run here because of `why`: print `SKIP: <why>` so the caller returns;
/// but with `DMREP_REQUIRE_TOOLS=1` (as in CI, where the tools are installed) fail
/// instead, so a missing tool never hides a test that did not run.
pub fn skip(why: &str) {
    if std::env::var_os("DMREP_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
        panic!("cannot run: {why} (DMREP_REQUIRE_TOOLS=1: missing tools fail, not skip)");
    }
    eprintln!("SKIP: {why}");
}

/// Return from the test (see [`skip`]) unless every tool named is installed.
macro_rules! require {
    ($($tool:expr),+ $(,)?) => {
        for t in [$($tool),+] {
            if !$crate::testutil::have(t) {
                $crate::testutil::skip(&format!("{t} not installed"));
                return;
            }
        }
    };
}
pub(crate) use require;

/// Run a command to completion with stdin closed, killing it (and failing the test)
/// after `timeout`.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut status = None;
    let done = wait_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
    }
    let output = Output {
        status: status.unwrap_or_else(|| child.wait().unwrap()),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    assert!(
        done,
        "{desc} did not finish in {timeout:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A temporary PKI directory with its CA.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path()).unwrap();
        TestPki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Issue `site`'s certificate and load it.
    pub fn site(&self, site: &str) -> SiteTls {
        pki::issue(self.path(), site).unwrap();
        SiteTls::load(&pki::site_files(self.path(), site), site).unwrap()
    }
}

/// A loopback listener whose connections one thread hands, one by one, to `handle`;
/// the results come back on the receiver.
pub fn serve<T: Send + 'static>(handle: impl Fn(TcpStream) -> T + Send + 'static) -> (String, mpsc::Receiver<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            if tx.send(handle(tcp)).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// What `SiteTls::accept` returns.
pub type Accepted = Result<(TlsStream, String), TlsError>;

/// A loopback listener that runs `SiteTls::accept` on each connection.
pub fn accept_loop(server: SiteTls) -> (String, mpsc::Receiver<Accepted>) {
    serve(move |tcp| server.accept(tcp, HANDSHAKE))
}
