//! Tests: an NBD server on a temporary Unix socket over devices backed by an in-test
//! memory target, driven by real clients (`clients`) and by a scripted raw-socket
//! client (`raw`).

mod clients;
mod raw;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use dmrep_core::device::LiveTable;
use dmrep_core::{Completion, DeviceRegistry, MappedDevice, Op, Request, Target};
use dmrep_formats::table::{SegmentSpec, TableSpec};
use parking_lot::Mutex;

use crate::{NbdConfig, NbdServer};

/// How writes complete.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// On the submitting thread, at once.
    Sync,
    /// On a separate thread, in shuffled order, after small random delays.
    Delayed,
    /// Reads too complete on the delaying thread.
    DelayedAll,
    /// On the submitting thread, after a short busy delay (a slow synchronous device).
    SlowSync,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub writes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub zeroes_no_trim: AtomicU64,
    pub zeroes_may_trim: AtomicU64,
    /// Delayed writes completed after a write submitted later than them.
    pub out_of_order: AtomicU64,
}

struct MemInner {
    data: Mutex<Vec<u8>>,
    counters: Counters,
}

impl MemInner {
    fn apply(&self, req: &mut Request) -> io::Result<()> {
        let off = req.offset as usize;
        let len = req.len as usize;
        let mut d = self.data.lock();
        match off.checked_add(len) {
            Some(end) if end <= d.len() => {}
            _ => return Err(io::Error::from_raw_os_error(22)),
        }
        match req.op {
            Op::Read => req.buf.copy_from_slice(&d[off..off + len]),
            Op::Write { fua } => {
                d[off..off + len].copy_from_slice(&req.buf);
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                if fua {
                    self.counters.fua_writes.fetch_add(1, Ordering::Relaxed);
                }
            }
            Op::Flush => {
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
            }
            Op::Discard => {
                d[off..off + len].fill(0);
                self.counters.discards.fetch_add(1, Ordering::Relaxed);
            }
            Op::WriteZeroes { may_trim, .. } => {
                d[off..off + len].fill(0);
                let c = if may_trim { &self.counters.zeroes_may_trim } else { &self.counters.zeroes_no_trim };
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// A `Vec<u8>` behind a mutex, as a target.
pub(crate) struct MemTarget {
    inner: Arc<MemInner>,
    delayer: Mutex<Option<Sender<(u64, Request, Completion)>>>,
    delay_reads: bool,
    slow: bool,
    seq: AtomicU64,
    /// Threads that called `submit`.
    pub(crate) submitters: Mutex<std::collections::HashSet<std::thread::ThreadId>>,
}

impl MemTarget {
    pub(crate) fn new(size: usize, mode: Mode) -> Arc<Self> {
        let inner = Arc::new(MemInner { data: Mutex::new(vec![0u8; size]), counters: Counters::default() });
        let delayer = matches!(mode, Mode::Delayed | Mode::DelayedAll).then(|| {
            let (tx, rx) = crossbeam_channel::unbounded();
            let i = inner.clone();
            std::thread::spawn(move || delay_thread(i, rx));
            tx
        });
        Arc::new(MemTarget {
            inner,
            delayer: Mutex::new(delayer),
            delay_reads: mode == Mode::DelayedAll,
            slow: mode == Mode::SlowSync,
            seq: AtomicU64::new(0),
            submitters: Mutex::new(Default::default()),
        })
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub(crate) fn data(&self, off: usize, len: usize) -> Vec<u8> {
        self.inner.data.lock()[off..off + len].to_vec()
    }
}

/// Completes delayed writes in shuffled batches, from its own thread.
fn delay_thread(inner: Arc<MemInner>, rx: Receiver<(u64, Request, Completion)>) {
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut max_done = 0u64;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(63));
        for i in (1..batch.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            batch.swap(i, j);
        }
        for (seq, mut req, done) in batch {
            // Simulated device latency (this is the target, not a test waiting).
            std::thread::sleep(Duration::from_micros(next() % 300));
            if seq < max_done && matches!(req.op, Op::Write { .. }) {
                inner.counters.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            max_done = max_done.max(seq);
            let res = inner.apply(&mut req);
            done.complete(req, res);
        }
    }
}

impl Target for MemTarget {
    fn type_name(&self) -> &'static str {
        "memtest"
    }

    fn submit(&self, mut req: Request, done: Completion) {
        self.submitters.lock().insert(std::thread::current().id());
        if self.slow {
            // Simulated device latency (this is the target, not a test waiting).
            std::thread::sleep(Duration::from_micros(200));
        }
        if matches!(req.op, Op::Write { .. }) || (self.delay_reads && req.op == Op::Read) {
            if let Some(tx) = self.delayer.lock().as_ref() {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
                if let Err(e) = tx.send((seq, req, done)) {
                    let (_, req, done) = e.into_inner();
                    done.complete(req, Err(io::Error::from_raw_os_error(5)));
                }
                return;
            }
        }
        let res = self.inner.apply(&mut req);
        done.complete(req, res);
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn shutdown(&self) {
        self.delayer.lock().take();
    }
}

/// A server on a temporary Unix socket with memory-backed devices.
pub(crate) struct Fixture {
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub registry: Arc<DeviceRegistry>,
    pub server: Arc<NbdServer>,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        Self::with_config(NbdConfig::default())
    }

    pub(crate) fn with_config(cfg: NbdConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let registry = Arc::new(DeviceRegistry::new());
        let server = NbdServer::new(registry.clone(), cfg);
        server.listen_unix(&path).unwrap();
        Fixture { _dir: dir, path, registry, server }
    }

    /// Add a device named `name` of `size` bytes made of one memory target per entry of
    /// `segments` (sizes in bytes, multiples of 512).
    pub(crate) fn add_device(
        &self,
        name: &str,
        segments: &[usize],
        mode: Mode,
    ) -> (Arc<MappedDevice>, Vec<Arc<MemTarget>>) {
        let dev = self.registry.insert(name, None).unwrap();
        let mut specs = Vec::new();
        let mut targets = Vec::new();
        let mut start = 0u64;
        for &size in segments {
            let t = MemTarget::new(size, mode);
            specs.push(SegmentSpec {
                start,
                len: size as u64 / 512,
                target: "memtest".into(),
                args: Vec::new(),
                line: 0,
            });
            start += size as u64 / 512;
            targets.push(t);
        }
        let dyn_targets: Vec<Arc<dyn Target>> = targets.iter().map(|t| t.clone() as Arc<dyn Target>).collect();
        dev.load(LiveTable::new(TableSpec { segments: specs }, dyn_targets));
        dev.resume(dmrep_core::device::SUSPEND_TIMEOUT).unwrap();
        (dev, targets)
    }

    pub(crate) fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.path.display())
    }

    /// Wait until no connection is left (clients gone and cleaned up).
    pub(crate) fn wait_idle(&self) {
        wait_until("all NBD connections to close", || self.server.connections() == 0);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
        for d in self.registry.list() {
            d.shutdown();
        }
    }
}

/// Wait for `cond`, polling, for at most 20 s.
pub(crate) fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The path of an installed client tool, or `None` (after a notice) to skip a test.
pub(crate) fn tool(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    eprintln!("NOTICE: {name} is not installed; skipping this test");
    None
}

#[test]
fn shutdown_closes_everything_and_removes_the_socket() {
    let f = Fixture::new();
    f.add_device("d0", &[1 << 20], Mode::Sync);
    let tcp = f.server.listen_tcp("127.0.0.1:0").unwrap();
    assert_ne!(tcp.port(), 0);
    let mut c = raw::Client::connect(&f.path);
    c.go("d0", false);
    let tc = std::net::TcpStream::connect(tcp).unwrap();
    wait_until("two connections", || f.server.connections() == 2);
    assert_eq!(f.registry.get("d0").unwrap().open_count(), 1);
    f.server.shutdown();
    assert_eq!(f.server.connections(), 0);
    assert!(!f.path.exists(), "socket file removed");
    assert_eq!(f.registry.get("d0").unwrap().open_count(), 0);
    c.expect_closed();
    drop(tc);
    assert!(f.server.listen_tcp("127.0.0.1:0").is_err());
}

#[test]
fn listen_unix_replaces_stale_socket_but_not_live_one_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Arc::new(DeviceRegistry::new());
    let path = dir.path().join("s");
    // A stale socket: bound, then its listener dropped.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let a = NbdServer::new(registry.clone(), NbdConfig::default());
    a.listen_unix(&path).unwrap();
    let b = NbdServer::new(registry.clone(), NbdConfig::default());
    let e = b.listen_unix(&path).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    let file = dir.path().join("f");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(b.listen_unix(&file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    a.shutdown();
    b.shutdown();
}

/// A target over a file (positional I/O on the calling thread), like `nbdkit file`;
/// for benchmarks only (the real `linear` target lives in the targets crate).
struct FileTarget(dmrep_core::FileBackend);

impl Target for FileTarget {
    fn type_name(&self) -> &'static str {
        "filetest"
    }

    fn submit(&self, mut req: Request, done: Completion) {
        use dmrep_core::BlockBackend;
        let b = &self.0;
        let res = match req.op {
            Op::Read => b.read_at(&mut req.buf, req.offset),
            Op::Write { fua } => b.write_at(&req.buf, req.offset).and_then(|()| if fua { b.sync() } else { Ok(()) }),
            Op::Flush => b.sync(),
            Op::Discard => b.discard(req.offset, req.len),
            Op::WriteZeroes { may_trim, .. } => b.write_zeroes(req.offset, req.len, may_trim),
        };
        done.complete(req, res);
    }
}

/// Not a test: serves a device named `mem` on `$DMREP_BENCH_SOCKET` for
/// `$DMREP_BENCH_SECS` seconds, for side-by-side runs of fio against nbdkit. The device
/// is 1 GiB of memory, or the file `$DMREP_BENCH_FILE` if set:
/// `cargo test --release -p dmrep-frontend -- --ignored serve_for_benchmark --nocapture`.
#[test]
#[ignore]
fn serve_for_benchmark() {
    let env = |k: &str| std::env::var(k).ok();
    let path = PathBuf::from(env("DMREP_BENCH_SOCKET").unwrap_or_else(|| "/tmp/dmrep-bench.sock".into()));
    let secs: u64 = env("DMREP_BENCH_SECS").and_then(|s| s.parse().ok()).unwrap_or(60);
    let registry = Arc::new(DeviceRegistry::new());
    let server = NbdServer::new(registry.clone(), NbdConfig::default());
    server.listen_unix(&path).unwrap();
    let f = Fixture { _dir: tempfile::tempdir().unwrap(), path, registry, server };
    match env("DMREP_BENCH_FILE") {
        None => {
            f.add_device("mem", &[1 << 30], Mode::Sync);
        }
        Some(file) => {
            let backend = dmrep_core::FileBackend::open(Path::new(&file)).unwrap();
            use dmrep_core::BlockBackend;
            let sectors = backend.size() / 512;
            let dev = f.registry.insert("mem", None).unwrap();
            let spec = SegmentSpec { start: 0, len: sectors, target: "filetest".into(), args: Vec::new(), line: 0 };
            let t: Arc<dyn Target> = Arc::new(FileTarget(backend));
            dev.load(LiveTable::new(TableSpec { segments: vec![spec] }, vec![t]));
            dev.resume(dmrep_core::device::SUSPEND_TIMEOUT).unwrap();
        }
    }
    eprintln!("serving {} for {secs} s", f.uri("mem"));
    std::thread::sleep(Duration::from_secs(secs));
}
