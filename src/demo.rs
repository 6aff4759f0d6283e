//! `dmrep demo`: the main job on a built-in default.
//!
//! Creates backing files in a directory of its own, a CA and two site certificates
//! (`paris`, `tokyo`), and starts two daemons on loopback: the secondary site `tokyo`
//! (a child process with its own log and devices, receiving over mutual TLS) and the
//! primary `paris` in this process. The primary's group uses the paper's one-line table:
//! two LDs, a replication log, two site links with `local` replicas (SLINK 1
//! synchronous, SLINK 2 asynchronous with a fall-behind threshold) and a `net` site link
//! to `tokyo` (SLINK 3, asynchronous). Prints the NBD URIs and commands to try, then
//! shows the group's status live (SLINK modes, lag, log use) until Ctrl-C, which stops
//! both daemons.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use dmrep_formats::control::{Request, Response};

use crate::run_daemon::{self, DaemonArgs};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for the demo's files and sockets.
    #[arg(long, default_value = "dmrep-demo")]
    pub dir: PathBuf,
    /// Size of each device in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// Size of the replication log in MiB.
    #[arg(long, default_value_t = 64)]
    pub log_mib: u64,
    /// Fall-behind threshold of the asynchronous SLINK 2, in entries.
    #[arg(long, default_value_t = 1000)]
    pub ios: u64,
    /// Also serve NBD on this TCP address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub nbd_listen: String,
    /// Set up, print, and exit instead of serving until Ctrl-C (for scripted checks).
    #[arg(long)]
    pub no_wait: bool,
}

fn sized_file(path: &Path, bytes: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(path)?;
    if f.metadata()?.len() < bytes {
        f.set_len(bytes).with_context(|| format!("sizing {}", path.display()))?;
    }
    Ok(())
}

/// The demo's table: the paper's one-line form, two devices, four SLINKs (the last one a
/// remote site over the network).
fn table(dir: &Path, sectors: u64, log_sectors: u64, ios: u64, tokyo: &str) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    let mut t = format!("0 {sectors} replicator \\\n  default 4 {} 0 auto {log_sectors} \\\n", p("replog"));
    for d in 0..2 {
        t += &format!("  local 2 0 asynchronous \\\n    2 {d} {} \\\n    - 0 \\\n", p(&format!("ld{d}.img")));
    }
    for d in 0..2 {
        t += &format!(
            "  local 2 1 synchronous \\\n    2 {d} {} \\\n    core 2 2048 nosync \\\n",
            p(&format!("site1-rd{d}.img"))
        );
    }
    for d in 0..2 {
        t += &format!(
            "  local 3 2 asynchronous ios={ios} \\\n    2 {d} {} \\\n    core 2 2048 nosync \\\n",
            p(&format!("site2-rd{d}.img")),
        );
    }
    for d in 0..2 {
        t += &format!(
            "  net 4 3 asynchronous {tokyo} site=tokyo \\\n    2 {d} {d} \\\n    core 2 2048 nosync{}\n",
            if d == 0 { " \\" } else { "" }
        );
    }
    t
}

/// The secondary site's table: its own log and devices, the primary as its peer.
fn tokyo_table(dir: &Path, sectors: u64, log_sectors: u64, paris: &str) -> String {
    let p = |n: &str| dir.join(n).display().to_string();
    let mut t = format!("0 {sectors} replicator default 5 {} 0 auto {log_sectors} role=secondary", p("replog"));
    for d in 0..2 {
        t += &format!(" local 2 0 asynchronous 2 {d} {} - 0", p(&format!("ld{d}.img")));
        t += &format!(" net 4 1 asynchronous {paris} site=paris 2 {d} {d} core 2 2048 nosync");
    }
    t
}

/// The secondary daemon, stopped (SIGTERM, then waited for) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&self.0), rustix::process::Signal::TERM);
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A CA and the two sites' certificates in `pki` (kept from an earlier run).
fn make_pki(pki: &Path) -> Result<()> {
    if !pki.join("ca.crt").exists() {
        dmrep_site::pki::init(pki)?;
    }
    for site in ["paris", "tokyo"] {
        if !pki.join(format!("{site}.crt")).exists() {
            dmrep_site::pki::issue(pki, site)?;
        }
    }
    Ok(())
}

/// Start the secondary site `tokyo` as a child process and create its group.
fn start_tokyo(dir: &Path, bytes: u64, log_mib: u64, listen: &str, paris: &str) -> Result<Child> {
    let tdir = dir.join("tokyo");
    std::fs::create_dir_all(&tdir)?;
    for name in ["ld0.img", "ld1.img"] {
        sized_file(&tdir.join(name), bytes)?;
    }
    sized_file(&tdir.join("replog"), log_mib << 20)?;
    let _ = std::fs::remove_dir_all(tdir.join("state"));
    // A fresh secondary each time, like the primary's fresh group.
    let _ = std::fs::remove_file(tdir.join("replog"));
    sized_file(&tdir.join("replog"), log_mib << 20)?;
    let exe = std::env::current_exe()?;
    let control = tdir.join("control.sock");
    let log = std::fs::File::create(tdir.join("daemon.log"))?;
    let child = Child(
        std::process::Command::new(&exe)
            .arg("--control")
            .arg(&control)
            .arg("daemon")
            .arg("--state-dir")
            .arg(tdir.join("state"))
            .arg("--nbd-unix")
            .arg(tdir.join("nbd.sock"))
            .args(["--site-name", "tokyo", "--site-listen", listen, "--tls-dir"])
            .arg(dir.join("pki"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the secondary site's daemon")?,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !control.exists() {
        if std::time::Instant::now() > deadline {
            bail!("the secondary site's daemon did not start (see {})", tdir.join("daemon.log").display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let table = tokyo_table(&tdir, bytes >> 9, (log_mib << 20) >> 9, paris);
    let out = std::process::Command::new(&exe)
        .arg("--control")
        .arg(&control)
        .args(["create", "r0", "--table", &table])
        .output()?;
    if !out.status.success() {
        bail!("creating the secondary's group: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(child)
}

pub fn run(args: DemoArgs) -> Result<()> {
    run_daemon::init_logging();
    let dir = std::path::absolute(&args.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = args.size_mib << 20;
    for name in ["ld0.img", "ld1.img", "site1-rd0.img", "site1-rd1.img", "site2-rd0.img", "site2-rd1.img"] {
        sized_file(&dir.join(name), bytes)?;
    }
    sized_file(&dir.join("replog"), args.log_mib << 20)?;
    make_pki(&dir.join("pki"))?;
    let (paris, tokyo) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
    let _tokyo_daemon = start_tokyo(&dir, bytes, args.log_mib, &tokyo, &paris)?;
    let control = dir.join("control.sock");
    let daemon_args = DaemonArgs {
        state_dir: dir.join("state"),
        nbd_unix: dir.join("nbd.sock"),
        nbd_listen: Some(args.nbd_listen.clone()),
        nbd_workers: 16,
        site_name: Some("paris".into()),
        tls_dir: Some(dir.join("pki")),
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        site_listen: Some(paris.clone()),
        metrics_listen: None,
    };
    // A fresh start each time: the demo's own devices, not a restored set.
    let _ = std::fs::remove_dir_all(&daemon_args.state_dir);
    let running = run_daemon::start(&daemon_args, Some(control.clone()))?;
    let table = table(&dir, bytes >> 9, (args.log_mib << 20) >> 9, args.ios, &tokyo);
    match running.daemon.handle(Request::Create {
        name: "r0".into(),
        table: table.clone(),
        uuid: None,
        read_only: false,
    }) {
        Response::Ok => {}
        Response::Error { message } => {
            running.stop();
            bail!("creating the replicated group r0: {message}")
        }
        other => bail!("unexpected answer {other:?}"),
    }
    let sock = daemon_args.nbd_unix.display();
    let tcp = running.tcp.map(|a| a.to_string()).unwrap_or_default();
    println!("dmrep demo: replicated group r0 in {}", dir.display());
    println!("  two devices (r0-0, r0-1, {} MiB each) replicated as one write-ordered group to", args.size_mib);
    println!("  site 1 (SLINK 1, synchronous) and site 2 (SLINK 2, asynchronous, ios={}), local,", args.ios);
    println!("  and to the remote site tokyo (SLINK 3, asynchronous, mutual TLS over TCP {tokyo}, its own");
    println!("  daemon: {}), through a {} MiB replication log. Table:", dir.join("tokyo").display(), args.log_mib);
    println!();
    for l in table.lines() {
        println!("    {l}");
    }
    println!();
    println!("  NBD URIs: nbd+unix:///r0-0?socket={sock}   nbd://{tcp}/r0-0");
    println!("            nbd+unix:///r0-1?socket={sock}   nbd://{tcp}/r0-1");
    println!();
    println!("Try, in another shell:");
    println!("  export DMREP_CONTROL={}", control.display());
    println!("  dmrep ls; dmrep status; dmrep status r0 --json; dmrep table r0");
    println!("  qemu-io -f raw -c 'write -P 0x5a 0 8M' 'nbd+unix:///r0-0?socket={sock}'");
    println!("  fio --name=t --ioengine=nbd --uri='nbd+unix:///r0-1?socket={sock}' --rw=randwrite --bs=4k --size=32M --iodepth=16 --verify=crc32c");
    println!("  dmrep message r0 0 slink 2 pause   # site 2 falls behind, then is forced synchronous at its threshold");
    println!("  dmrep message r0 0 slink 2 resume  # it catches up in order");
    println!("  cmp {} {}   # once caught up", dir.join("ld0.img").display(), dir.join("site2-rd0.img").display());
    println!(
        "  dmrep --control {} status r0   # the secondary site: the primary it follows, received, applied, lag",
        dir.join("tokyo/control.sock").display()
    );
    println!("  cmp {} {}", dir.join("ld0.img").display(), dir.join("tokyo/ld0.img").display());
    println!("  dmrep role r0                       # this site's role, generation and peers");
    println!("  dmrep switchover r0 --to tokyo      # follow the sun: tokyo becomes the primary, nothing copied");
    println!("  dmrep --control {} switchover r0 --to paris   # and back", dir.join("tokyo/control.sock").display());
    println!("  dmrep snapshot create r0 first --slink 2   # site 2's devices, together, at one point of the history");
    println!("  dmrep snapshot ls; qemu-io -f raw -c 'read 0 1M' 'nbd+unix:///r0.first.0?socket={sock}'");
    println!();
    if args.no_wait {
        running.stop();
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    println!("Serving until Ctrl-C. Live status of r0 (mode S sync, A async, F forced sync; lag; log use):");
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    while !stop.load(Ordering::SeqCst) {
        let line = status_line(&running.daemon);
        if tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
        } else if line != last {
            println!("{line}");
        }
        last = line;
        for _ in 0..10 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if tty {
        println!();
    }
    running.stop();
    Ok(())
}

/// One line: each SLINK's mode and lag, and the log's use.
fn status_line(daemon: &dmrep_control::daemon::Daemon) -> String {
    let Response::Statuses { devices } = daemon.handle(Request::Status { name: Some("r0".into()) }) else {
        return "status unavailable".into();
    };
    let Some(d) = devices.first().and_then(|d| d.segments.first()).map(|s| &s.detail) else {
        return "status unavailable".into();
    };
    let mut out = String::new();
    if let Some(slinks) = d["slinks"].as_array() {
        for s in slinks {
            let mode = match s["mode"].as_str().unwrap_or("") {
                "synchronous" => "S",
                "asynchronous" => "A",
                "forced_synchronous" => "F",
                _ => "?",
            };
            out += &format!(
                "slink{} {mode}{} lag {} ios/{} KiB/{} ms  ",
                s["slink"],
                if s["accessible"].as_bool() == Some(false) { " DOWN" } else { "" },
                s["outstanding_ios"],
                s["outstanding_bytes"].as_u64().unwrap_or(0) / 1024,
                s["oldest_outstanding_ms"].as_u64().unwrap_or(0)
            );
        }
    }
    let used = d["log"]["used_bytes"].as_u64().unwrap_or(0);
    let size = d["log"]["ring_len"].as_u64().unwrap_or(1).max(1);
    out += &format!("| log {:.1}% used, next seq {}", used as f64 * 100.0 / size as f64, d["log"]["next_seq"]);
    out
}
