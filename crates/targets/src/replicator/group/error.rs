//! Errors of the replication group: typed, keeping their cause, naming what is wrong.

use std::io;

use rustix::io::Errno;

use crate::replicator::log::LogError;

/// An SLINK number (0: the local devices).
pub use dmrep_formats::replog::SlinkNr;
/// A device number of the group (pairs an LD with its RDs).
pub type DevNr = u32;
/// A log entry's sequence number.
pub type Seq = u64;

/// What went wrong in a group, or why an operator's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The replication log failed: writes are refused until the group is restarted.
    #[error("replication log: {0}")]
    Log(#[source] LogError),
    /// Persisting the SLINKs' cursors failed: shipping stops (the crash-replay order
    /// rule needs them durable) and writes are refused.
    #[error("persisting slink cursors: {0}")]
    Cursors(#[source] LogError),
    /// Reading an entry back from the log for an SLINK failed.
    #[error("reading entry {seq} back from the replication log for slink {slink}: {source}")]
    LogRead {
        slink: SlinkNr,
        seq: Seq,
        #[source]
        source: LogError,
    },
    /// A dirty log could not be made durable.
    #[error("dirty log of slink {slink}: {source}")]
    DirtyLog {
        slink: SlinkNr,
        #[source]
        source: io::Error,
    },
    #[error("no slink {0} in this group")]
    NoSlink(SlinkNr),
    #[error("slink {0} already exists in this group")]
    SlinkExists(SlinkNr),
    #[error(
        "slink {0}: a synchronous slink takes no fall-behind threshold; clear them first (slink {0} fallbehind none)"
    )]
    SyncWithThresholds(SlinkNr),
    #[error("slink {0} is synchronous: fall-behind thresholds apply to asynchronous slinks")]
    ThresholdsOnSync(SlinkNr),
    #[error("slink 0 (the local devices) cannot be {0}")]
    Slink0(&'static str),
    #[error("statistics: expected on|off|reset, found {0:?}")]
    Statistics(String),
    #[error("starting the group's threads: {0}")]
    Threads(#[source] io::Error),
    #[error("the group is shut down")]
    Shutdown,
    /// A role command (switchover, takeover, resolve) refused or failed.
    #[error("{0}")]
    Role(String),
}

impl GroupError {
    /// The errno a write refused because of this error fails with.
    pub fn errno(&self) -> Errno {
        match self {
            GroupError::Shutdown => Errno::SHUTDOWN,
            _ => Errno::IO,
        }
    }
}

/// An I/O error carrying `e` as its errno.
pub fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}
