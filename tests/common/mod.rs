//! Test harness: a real `dmrep daemon` in a private temporary directory, the CLI that
//! talks to it, and helpers to drive real NBD clients with deadlines.
//!
//! Every test gets its own directory (control socket, NBD socket, state directory,
//! backing files, daemon log), so tests run in parallel. Nothing sleeps to wait for
//! work: waits poll a condition until a deadline.

#![allow(dead_code)]

pub mod sites;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_dmrep");

/// Deadline for one external command (a client, a CLI call) unless told otherwise.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Poll `cond` every few milliseconds until it holds or `timeout` passes. Returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether an executable named `tool` is on PATH (or is an existing path).
pub fn have(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).exists();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].iter().map(PathBuf::from))
        .any(|d| is_executable(&d.join(tool)))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// A test, or a part of one, cannot run here because of `why` (a missing tool, no root,
/// no FUSE). Prints `SKIP: <why>` and returns, so the caller skips; but with
/// `DMREP_REQUIRE_TOOLS=1` (set by `scripts/test`, so in CI) it fails the test
/// instead: there a skip would silently hide a test that never ran. Every skip goes
/// through here.
pub fn skip(why: &str) {
    if std::env::var_os("DMREP_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
        panic!("cannot run: {why} (DMREP_REQUIRE_TOOLS=1: missing tools fail, not skip)");
    }
    eprintln!("SKIP: {why}");
}

/// Whether `tool` is installed, for a part of a test that needs it; when it is not,
/// [`skip`] says so (and fails under `DMREP_REQUIRE_TOOLS=1`).
pub fn have_or_skip(tool: &str) -> bool {
    if have(tool) {
        return true;
    }
    skip(&format!("the checks that need {tool} ({tool} not installed)"));
    false
}

/// Return early from the test (printing `SKIP: <tool> not installed`) unless every
/// tool is installed; see [`skip`] (with `DMREP_REQUIRE_TOOLS=1` a missing tool fails).
#[macro_export]
macro_rules! require {
    ($($tool:expr),+ $(,)?) => {
        for t in [$($tool),+] {
            if !$crate::common::have(t) {
                $crate::common::skip(&format!("{t} not installed"));
                return;
            }
        }
    };
}

/// Run a command to completion, killing it (and failing the test) after `timeout`.
/// Stdin is closed unless the caller set it.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || read_all(out));
    let t_err = std::thread::spawn(move || read_all(err));
    let mut status = None;
    if !wait_until(timeout, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    }) {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = t_out.join().unwrap();
        let stderr = t_err.join().unwrap();
        panic!(
            "{desc} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Output { status: status.unwrap(), stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.read_to_end(&mut v);
    v
}

/// Run with the default deadline.
pub fn run(cmd: &mut Command) -> Output {
    run_timeout(cmd, CMD_TIMEOUT)
}

/// Describe an output for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run and require exit 0; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = run(cmd);
    assert!(o.status.success(), "{desc} failed: {}", show(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `nbdsh` needs Debian's python: run it with /usr/bin first on PATH.
pub fn nbdsh() -> Command {
    let mut c = Command::new("nbdsh");
    c.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c
}

/// `qemu-io -f raw` on `uri` with one `-c` per command. Exit 0 and no failure text.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    let o = qemu_io(uri, cmds);
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} on {uri}: {}",
        show(&o)
    );
    text
}

pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run(&mut c)
}

/// Random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

/// A file of `len` bytes of `byte`.
pub fn fill_file(path: &Path, byte: u8, len: usize) {
    std::fs::write(path, vec![byte; len]).unwrap();
}

/// Read `len` bytes at `off` of a file.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `dmrep daemon` under test.
pub struct Daemon {
    dir: tempfile::TempDir,
    pub control: PathBuf,
    pub nbd: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    /// `--nbd-listen` address, if started with TCP.
    pub tcp: Option<String>,
    /// More daemon options (a site's name, TLS files, listen address).
    pub extra: Vec<String>,
    /// A command the daemon runs under, before `BIN` (e.g. `ip netns exec NS` to run it
    /// in a network namespace); empty: the daemon is started directly. It must exec the
    /// daemon (not fork it): the harness signals the process it started.
    pub wrap: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Start a daemon in a fresh directory and wait until it answers.
    pub fn start() -> Daemon {
        Self::start_opts(false)
    }

    /// Same, also serving NBD on a loopback TCP port.
    pub fn start_with_tcp() -> Daemon {
        Self::start_opts(true)
    }

    /// Start a daemon with more options, given a function of its directory.
    pub fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Daemon {
        Self::start_wrapped(Vec::new(), extra)
    }

    /// Same, the daemon run under `wrap` (see [`Daemon::wrap`]): `BIN` and its
    /// arguments follow it on the command line.
    pub fn start_wrapped(wrap: Vec<String>, extra: impl FnOnce(&Path) -> Vec<String>) -> Daemon {
        let mut d = Self::unstarted(false);
        d.wrap = wrap;
        d.extra = extra(d.dir.path());
        d.spawn();
        d
    }

    fn start_opts(tcp: bool) -> Daemon {
        let mut d = Self::unstarted(tcp);
        d.spawn();
        d
    }

    fn unstarted(tcp: bool) -> Daemon {
        // Short path: Unix socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new().prefix("dmrep-t").tempdir_in("/tmp").unwrap();
        let p = dir.path().to_path_buf();
        let d = Daemon {
            control: p.join("control.sock"),
            nbd: p.join("nbd.sock"),
            state: p.join("state"),
            log: p.join("daemon.log"),
            tcp: tcp.then(|| format!("127.0.0.1:{}", free_port())),
            dir,
            extra: Vec::new(),
            wrap: Vec::new(),
            child: None,
        };
        d
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = match self.wrap.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("--control")
            .arg(&self.control)
            .arg("daemon")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--nbd-unix")
            .arg(&self.nbd);
        if let Some(a) = &self.tcp {
            cmd.args(["--nbd-listen", a]);
        }
        cmd.args(&self.extra);
        cmd.env("DMREP_LOG", std::env::var("DMREP_LOG").unwrap_or_else(|_| "debug".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start dmrep daemon"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Duration::from_secs(30);
        let mut exited = None;
        let ready = wait_until(deadline, || {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                exited = Some(st);
                return true;
            }
            self.control.exists() && self.cli(&["version"]).status.success()
        });
        if let Some(st) = exited {
            self.child = None;
            panic!("daemon exited during start-up with {st}\n{}", self.log_text());
        }
        assert!(ready, "daemon not ready within {deadline:?}\n{}", self.log_text());
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A CLI command against this daemon.
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--control").arg(&self.control).args(args).stdin(Stdio::null());
        c
    }

    /// Run the CLI.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(&mut self.cli_cmd(args))
    }

    /// Run the CLI, require exit 0, return stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.status.success(), "dmrep {args:?} failed: {}", show(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run the CLI, require failure with exactly one `dmrep: ...` line on stderr;
    /// return that line.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        check_one_line_error(&format!("dmrep {args:?}"), &o)
    }

    /// `create NAME --table TABLE`.
    pub fn create(&self, name: &str, table: &str) {
        self.cli_ok(&["create", name, "--table", table]);
    }

    /// `--json` output of the CLI, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("dmrep {a:?}: not JSON ({e}):\n{out}"))
    }

    /// `info NAME --json` of one device.
    pub fn info(&self, name: &str) -> serde_json::Value {
        let v = self.json(&["info", name]);
        let arr = v.as_array().unwrap_or_else(|| panic!("info --json is not an array: {v}"));
        assert_eq!(arr.len(), 1, "info {name}: {v}");
        arr[0].clone()
    }

    /// Names listed by `ls --json`.
    pub fn names(&self) -> Vec<String> {
        let v = self.json(&["ls"]);
        v.as_array()
            .unwrap_or_else(|| panic!("ls --json is not an array: {v}"))
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn open_count(&self, name: &str) -> u64 {
        self.info(name)["open_count"].as_u64().unwrap()
    }

    /// NBD URI of a device (Unix socket).
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.nbd.display())
    }

    /// NBD URI of a device over TCP (started with [`Daemon::start_with_tcp`]).
    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.tcp.as_ref().expect("started with TCP"))
    }

    /// A path in the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse backing file of `size` bytes in the test directory; returns its path.
    pub fn make_file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    /// A backing file, as a string for tables.
    pub fn make_file_s(&self, name: &str, size: u64) -> String {
        self.make_file(name, size).to_str().unwrap().to_string()
    }

    /// SIGKILL the daemon and reap it.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("daemon running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM the daemon; it must exit 0 within the deadline.
    pub fn terminate(&mut self) {
        let st = self.terminate_status();
        assert!(st.success(), "daemon exited with {st} after SIGTERM\n{}", self.log_text());
    }

    /// SIGTERM the daemon and return its exit status.
    pub fn terminate_status(&mut self) -> ExitStatus {
        let pid = self.pid().to_string();
        run_ok(Command::new("kill").args(["-TERM", &pid]));
        let mut c = self.child.take().unwrap();
        let mut st = None;
        let deadline = Duration::from_secs(30);
        if !wait_until(deadline, || {
            st = c.try_wait().unwrap();
            st.is_some()
        }) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("daemon did not exit within {deadline:?} of SIGTERM\n{}", self.log_text());
        }
        st.unwrap()
    }

    /// Start the daemon again on the same directories (after terminate or kill9).
    pub fn restart(&mut self) {
        if self.alive() {
            self.terminate();
        }
        self.child = None;
        // Mark the restart in the log, to read it more easily on failure.
        let mut f = OpenOptions::new().append(true).open(&self.log).unwrap();
        writeln!(f, "===== test harness: restarting daemon =====").unwrap();
        self.spawn();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== daemon log ({}) =====\n{}\n===== end of daemon log =====",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Check a failed command: non-zero exit, exactly one non-empty stderr line starting
/// with `dmrep: `. Returns the line.
pub fn check_one_line_error(desc: &str, o: &Output) -> String {
    assert!(!o.status.success(), "{desc} should have failed: {}", show(o));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{desc}: expected a one-line error, got: {}", show(o));
    assert!(lines[0].starts_with("dmrep: "), "{desc}: error should start with `dmrep: `: {}", show(o));
    lines[0].to_string()
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl KillOnDrop {
    /// Wait for exit within `timeout`; None if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = None;
        wait_until(timeout, || {
            st = self.0.try_wait().unwrap();
            st.is_some()
        });
        st
    }
}

/// An `nbdsh` connected to `uri` that runs `before`, prints `READY`, then waits for a
/// line on stdin and runs `after` (Python; `h` is the handle). While it waits, the
/// export stays open.
pub struct HoldingClient {
    pub child: KillOnDrop,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
}

impl HoldingClient {
    pub fn start(uri: &str, before: &str, after: &str) -> HoldingClient {
        let script = format!(
            "import sys\n{before}\nprint('READY', flush=True)\nsys.stdin.readline()\n{after}\nsys.stdout.flush()\n"
        );
        let child = nbdsh()
            .args(["-u", uri, "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nbdsh");
        let mut child = KillOnDrop(child);
        let stdin = child.0.stdin.take();
        let stdout = child.0.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let c = HoldingClient { child, stdin, lines };
        match c.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => assert_eq!(l.trim(), "READY", "nbdsh on {uri} printed {l:?} instead of READY"),
            Err(e) => panic!("nbdsh on {uri} did not get ready: {e}"),
        }
        c
    }

    /// Let the client go on (run `after`), wait for it and return what it printed then.
    pub fn finish(mut self) -> (ExitStatus, String) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"go\n");
        }
        let st = self.child.wait_timeout(CMD_TIMEOUT).expect("nbdsh did not finish in time");
        let mut out = String::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            out.push_str(&l);
            out.push('\n');
        }
        (st, out)
    }
}
pub mod block;
pub mod faulty;

/// A paper-form group `r0` over 16 MiB devices: an LD and one synchronous RD on SLINK 1,
/// with SLINK 1 paused: what a down synchronous SLINK does to writes (they wait for it).
/// Returns the LD's and the RD's paths.
pub fn group_with_paused_sync_slink(d: &Daemon) -> (String, String) {
    let ld = d.make_file_s("ld", 16 << 20);
    let rd = d.make_file_s("rd", 16 << 20);
    let log = d.make_file_s("replog", 8 << 20);
    d.create(
        "r0",
        &format!(
            "0 32768 replicator default 4 {log} 0 auto 16384 local 2 0 asynchronous 2 0 {ld} - 0 \
             local 2 1 synchronous 2 0 {rd} core 2 2048 nosync"
        ),
    );
    d.cli_ok(&["message", "r0", "0", "slink", "1", "pause"]);
    (ld, rd)
}
