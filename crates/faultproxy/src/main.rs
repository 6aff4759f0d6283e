//! `dmrep-faultproxy`: the [`dmrep_faultproxy::FaultProxy`] as a process, with a
//! control socket. See the library's documentation for what each fault imitates.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use dmrep_faultproxy::{Direction, FaultProxy};

/// TCP fault proxy: forwards each connection accepted on --listen to --target, adding
/// delay, rate limits and faults set by flags and through the control socket.
#[derive(Parser, Debug)]
#[command(name = "dmrep-faultproxy", version)]
struct Args {
    /// Address to listen on (port 0: any; the bound address is printed as `listening ADDR`).
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward each connection to.
    #[arg(long)]
    target: SocketAddr,
    /// Unix socket taking one command per line: delay MS, rate BYTES_PER_S|off, drop,
    /// blackhole on|off, stall up|down on|off, refuse on|off, stats, quit.
    #[arg(long)]
    control: Option<PathBuf>,
    /// One-way delay added to each direction, in milliseconds.
    #[arg(long, value_name = "MS")]
    delay_ms: Option<u64>,
    /// Cap on each direction, in bytes per second, shared by all connections.
    #[arg(long, value_name = "BYTES_PER_S")]
    rate: Option<u64>,
    /// Hold one direction from the start (up: client to target, down: target to client).
    #[arg(long, value_name = "up|down")]
    stall: Vec<Direction>,
    /// Start blackholed.
    #[arg(long)]
    blackhole: bool,
    /// Start refusing connections.
    #[arg(long)]
    refuse: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let proxy =
        Arc::new(FaultProxy::start(args.listen, args.target).with_context(|| format!("listen on {}", args.listen))?);
    if let Some(ms) = args.delay_ms {
        proxy.set_delay(Duration::from_millis(ms));
    }
    if args.rate.is_some() {
        proxy.set_rate(args.rate);
    }
    for dir in args.stall {
        proxy.stall(dir, true);
    }
    proxy.blackhole(args.blackhole);
    proxy.refuse(args.refuse);

    let (quit_tx, quit_rx) = mpsc::channel::<()>();
    if let Some(path) = &args.control {
        let listener = bind_control(path)?;
        let proxy = proxy.clone();
        thread::Builder::new().name("control".into()).spawn(move || {
            for stream in listener.incoming().flatten() {
                let proxy = proxy.clone();
                let quit = quit_tx.clone();
                let _ = thread::Builder::new().name("control-conn".into()).spawn(move || serve(&proxy, stream, &quit));
            }
        })?;
    }

    // Bound, and the control socket is ready: tell whoever started us.
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {}", proxy.addr())?;
    out.flush()?;
    drop(out);

    // Without a control socket, nothing sends `quit`: run until killed.
    let _ = quit_rx.recv();
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Binds the control socket, replacing a stale one (nothing answering on it).
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("control socket {} is in use", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("bind control socket {}", path.display()))
}

/// Answers one control connection, line by line.
fn serve(proxy: &FaultProxy, stream: UnixStream, quit: &mpsc::Sender<()>) {
    let Ok(mut out) = stream.try_clone() else { return };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let (answer, is_quit) = proxy.execute_line(&line);
        if writeln!(out, "{answer}").and_then(|_| out.flush()).is_err() {
            return;
        }
        if is_quit {
            let _ = quit.send(());
            return;
        }
    }
}
