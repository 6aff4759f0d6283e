//! `dmrep daemon`: the process that plays the kernel's part.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dmrep_control::daemon::Daemon;
use dmrep_control::server::{clear_stale_socket, prepare_socket_dir, ControlServer};
use dmrep_control::store::Store;
use dmrep_frontend::{NbdConfig, NbdServer};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{info, warn};

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Where the daemon records its devices' tables, to bring them back after a restart.
    #[arg(long, value_name = "DIR", default_value = dmrep_control::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Serve NBD on this Unix socket.
    #[arg(long, value_name = "PATH", default_value = dmrep_control::DEFAULT_NBD_UNIX)]
    pub nbd_unix: PathBuf,
    /// Also serve NBD on this TCP address (e.g. 127.0.0.1:10809). Off by default: bind
    /// to anything but loopback only on a trusted network, NBD has no authentication here.
    #[arg(long, value_name = "ADDR:PORT")]
    pub nbd_listen: Option<String>,
    /// Worker threads per NBD connection (requests in parallel on one connection).
    #[arg(long, default_value_t = NbdConfig::default().workers_per_conn)]
    pub nbd_workers: usize,
    /// This daemon's site name (what its TLS certificate names). Needed for `net` site
    /// links and for --site-listen.
    #[arg(long, value_name = "NAME")]
    pub site_name: Option<String>,
    /// Directory made by `dmrep pki`: takes ca.crt, <site-name>.crt and <site-name>.key
    /// from it (instead of --tls-ca, --tls-cert, --tls-key).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub tls_dir: Option<PathBuf>,
    /// The sites' CA certificate: peers must present a certificate it issued.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This site's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This site's private key.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Receive replication from primaries on this TCP address (mutual TLS; e.g.
    /// 0.0.0.0:7800). Makes this daemon a site that secondaries of groups live on.
    #[arg(long, value_name = "ADDR:PORT", requires = "site_name")]
    pub site_listen: Option<String>,
    /// Serve Prometheus metrics (`GET /metrics`, text format) on this TCP address, e.g.
    /// 127.0.0.1:9780. Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
}

impl DaemonArgs {
    /// The site's TLS files, if configured.
    fn tls_files(&self) -> Option<dmrep_site::tls::TlsFiles> {
        let site = self.site_name.as_deref()?;
        if let Some(dir) = &self.tls_dir {
            return Some(dmrep_site::pki::site_files(dir, site));
        }
        Some(dmrep_site::tls::TlsFiles {
            ca: self.tls_ca.clone()?,
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

/// A running daemon: stopped by [`Running::stop`].
pub struct Running {
    pub daemon: Arc<Daemon>,
    pub nbd: Arc<NbdServer>,
    pub control: ControlServer,
    pub tcp: Option<std::net::SocketAddr>,
    site_stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Running {
    pub fn stop(self) {
        info!("shutting down");
        self.site_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.control.stop();
        // Devices first: their held requests end, so the NBD connections can drain.
        self.daemon.shutdown();
        self.nbd.shutdown();
    }
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DMREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Start a daemon in this process.
pub fn start(args: &DaemonArgs, control: Option<PathBuf>) -> Result<Running> {
    let control_path = dmrep_control::control_path(control);
    // Site links first: restored tables may have net SLINKs.
    let boards = Arc::new(dmrep_site::board::Boards::default());
    let tls = match args.tls_files() {
        Some(files) => {
            let site = args.site_name.as_deref().unwrap_or_default();
            let tls = dmrep_site::tls::SiteTls::load(&files, site).context("site TLS")?;
            dmrep_targets::replicator::slink::register_transport(
                "net",
                Arc::new(dmrep_site::net::NetTransport::new(Arc::new(tls.clone()), boards.clone())),
            );
            Some(Arc::new(tls))
        }
        None if args.site_listen.is_some() || args.site_name.is_some() => {
            anyhow::bail!("a site needs TLS files: --tls-dir DIR, or --tls-ca, --tls-cert and --tls-key")
        }
        None => None,
    };
    let store = Store::open(&args.state_dir)?;
    let daemon = Daemon::new(store, dmrep_targets::registry());
    daemon.enable_snapshots(&args.state_dir, args.site_name.clone());
    let (n, errors) = daemon.restore()?;
    if n > 0 || !errors.is_empty() {
        info!(restored = n, failed = errors.len(), "devices restored from {}", args.state_dir.display());
    }
    for e in &errors {
        warn!("not restored: {e}");
    }
    let nbd = NbdServer::new(
        daemon.devices().clone(),
        NbdConfig { workers_per_conn: args.nbd_workers.max(1), ..NbdConfig::default() },
    );
    // A start that fails from here on undoes what it did: no socket file (NBD or
    // control) is left behind, and the restored devices stop cleanly.
    let (tcp, control) = match listen(args, &nbd, &daemon, &control_path) {
        Ok(l) => l,
        Err(e) => {
            nbd.shutdown();
            daemon.shutdown();
            return Err(e);
        }
    };
    let site_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let site = match (&args.site_listen, tls) {
        (Some(addr), Some(tls)) => {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("site listen address {addr}"));
            let l = match l {
                Ok(l) => l,
                Err(e) => {
                    control.stop();
                    nbd.shutdown();
                    daemon.shutdown();
                    return Err(e);
                }
            };
            let bound = l.local_addr().ok();
            let devices = daemon.devices().clone();
            let lookup: dmrep_site::receiver::Lookup =
                Arc::new(move |name: &str| dmrep_targets::replicator::target::site_group(&devices, name));
            let stop = site_stop.clone();
            std::thread::Builder::new().name("site-listen".into()).spawn(move || {
                if let Err(e) = dmrep_site::receiver::serve(l, tls, lookup, boards, stop) {
                    warn!("site listener stopped: {e}");
                }
            })?;
            bound
        }
        _ => None,
    };
    let metrics = match &args.metrics_listen {
        Some(addr) => {
            let l = match std::net::TcpListener::bind(addr).with_context(|| format!("metrics listen address {addr}")) {
                Ok(l) => l,
                Err(e) => {
                    site_stop.store(true, std::sync::atomic::Ordering::SeqCst);
                    control.stop();
                    nbd.shutdown();
                    daemon.shutdown();
                    return Err(e);
                }
            };
            let bound = l.local_addr().ok();
            let (d, stop) = (daemon.clone(), site_stop.clone());
            std::thread::Builder::new().name("metrics-listen".into()).spawn(move || {
                if let Err(e) = dmrep_control::metrics::serve(l, d, stop) {
                    warn!("metrics listener stopped: {e}");
                }
            })?;
            bound
        }
        None => None,
    };
    info!(
        control = %control_path.display(),
        nbd_unix = %args.nbd_unix.display(),
        nbd_tcp = ?tcp,
        site = ?args.site_name,
        site_listen = ?site,
        metrics = ?metrics,
        "dmrep daemon ready"
    );
    Ok(Running { daemon, nbd, control, tcp, site_stop })
}

/// Open the NBD listeners and the control socket. On error the caller shuts `nbd`
/// down, which removes the NBD socket file if it is still ours.
fn listen(
    args: &DaemonArgs,
    nbd: &Arc<NbdServer>,
    daemon: &Arc<Daemon>,
    control_path: &std::path::Path,
) -> Result<(Option<std::net::SocketAddr>, ControlServer)> {
    let nbd_sock = || format!("NBD socket {}", args.nbd_unix.display());
    prepare_socket_dir(&args.nbd_unix).with_context(nbd_sock)?;
    clear_stale_socket(&args.nbd_unix).with_context(nbd_sock)?;
    nbd.listen_unix(&args.nbd_unix).with_context(nbd_sock)?;
    let tcp = match &args.nbd_listen {
        Some(a) => Some(nbd.listen_tcp(a).with_context(|| format!("NBD listen address {a}"))?),
        None => None,
    };
    let control = ControlServer::start(daemon.clone(), control_path)
        .with_context(|| format!("control socket {}", control_path.display()))?;
    Ok((tcp, control))
}

/// Block until SIGTERM or SIGINT.
pub fn wait_for_signal() -> Result<i32> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    Ok(signals.forever().next().unwrap_or(SIGTERM))
}

pub fn run(args: DaemonArgs, control: Option<PathBuf>) -> Result<()> {
    init_logging();
    let running = start(&args, control)?;
    let sig = wait_for_signal()?;
    info!(signal = sig, "signal received");
    running.stop();
    Ok(())
}
