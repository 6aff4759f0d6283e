//! `dmrep demo`: the main job on a built-in default.
//!
//! Creates backing files in a directory of its own, starts a daemon in this process,
//! creates a striped device over two files, prints the NBD URI and commands to try,
//! and serves until Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use dmrep_formats::control::{Request, Response};

use crate::run_daemon::{self, DaemonArgs};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Directory for the demo's files and sockets.
    #[arg(long, default_value = "dmrep-demo")]
    pub dir: PathBuf,
    /// Size of each backing file in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// Also serve NBD on this TCP address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub nbd_listen: String,
    /// Set up, print, and exit instead of serving until Ctrl-C (for scripted checks).
    #[arg(long)]
    pub no_wait: bool,
}

pub fn run(args: DemoArgs) -> Result<()> {
    run_daemon::init_logging();
    let dir = std::path::absolute(&args.dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bytes = args.size_mib << 20;
    let files: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("disk{i}.img"))).collect();
    for f in &files {
        let file = std::fs::OpenOptions::new().create(true).write(true).truncate(false).open(f)?;
        if file.metadata()?.len() < bytes {
            file.set_len(bytes)?;
        }
    }
    let control = dir.join("control.sock");
    let daemon_args = DaemonArgs {
        state_dir: dir.join("state"),
        nbd_unix: dir.join("nbd.sock"),
        nbd_listen: Some(args.nbd_listen.clone()),
        nbd_workers: 16,
    };
    // A fresh start each time: the demo's own devices, not a restored set.
    let _ = std::fs::remove_dir_all(&daemon_args.state_dir);
    let running = run_daemon::start(&daemon_args, Some(control.clone()))?;
    let sectors = (bytes >> 9) * 2;
    let table = format!("0 {sectors} striped 2 128 {} 0 {} 0\n", files[0].display(), files[1].display());
    match running.daemon.handle(Request::Create { name: "demo0".into(), table: table.clone(), uuid: None }) {
        Response::Ok => {}
        Response::Error { message } => anyhow::bail!("creating demo0: {message}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
    let sock = daemon_args.nbd_unix.display();
    let tcp = running.tcp.map(|a| a.to_string()).unwrap_or_default();
    println!("dmrep demo: device demo0 striped over two {} MiB files in {}", args.size_mib, dir.display());
    println!();
    println!("  table:    {}", table.trim());
    println!("  NBD URIs: nbd+unix:///demo0?socket={sock}");
    println!("            nbd://{tcp}/demo0");
    println!();
    println!("Try, in another shell:");
    println!("  export DMREP_CONTROL={}", control.display());
    println!("  dmrep ls; dmrep status demo0; dmrep info demo0 --json; dmrep table demo0");
    println!("  nbdinfo 'nbd+unix:///demo0?socket={sock}'");
    println!("  qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' 'nbd+unix:///demo0?socket={sock}'");
    println!("  fio --name=t --ioengine=nbd --uri='nbd+unix:///demo0?socket={sock}' --rw=randwrite --bs=4k --size=32M --verify=crc32c");
    println!();
    if args.no_wait {
        running.stop();
        return Ok(());
    }
    println!("Serving until Ctrl-C.");
    run_daemon::wait_for_signal()?;
    running.stop();
    Ok(())
}
