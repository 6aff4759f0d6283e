//! dmrep control plane: the daemon's state and the control socket.
//!
//! - [`daemon`]: owns the device registry, builds tables into targets, answers
//!   control requests; the one place device state changes.
//! - [`store`]: the state directory: the tables loaded, so a restarted daemon brings
//!   its devices back.
//! - [`server`]: the control socket (Unix, mode 0600) speaking
//!   [`dmrep_formats::control`].
//! - [`client`]: the CLI's side of the same socket.
//! - [`snapshots`]: group-consistent snapshots taken at this site.

pub mod client;
pub mod daemon;
pub mod metrics;
pub mod server;
pub mod snapshots;
pub mod store;

use std::path::PathBuf;

/// Where the CLI and the daemon look for the control socket when neither `--control`
/// nor `$DMREP_CONTROL` says otherwise.
pub const DEFAULT_CONTROL: &str = "/run/dmrep/control.sock";

/// The daemon's default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/dmrep";

/// The daemon's default NBD Unix socket.
pub const DEFAULT_NBD_UNIX: &str = "/run/dmrep/nbd.sock";

/// The control socket path: `explicit`, else `$DMREP_CONTROL`, else [`DEFAULT_CONTROL`].
pub fn control_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("DMREP_CONTROL").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL))
}
