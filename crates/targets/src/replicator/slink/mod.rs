//! Site links. An SLINK handler moves log entries to one site's devices; the group
//! decides *which* entries and *when* (in log order, one epoch at a time), the handler
//! only *how*. One implementation per transport: [`local`] (files and block devices,
//! alias `blockdev`); `net` and `s3` plug in here without touching the log.

pub mod local;

use std::io;

use dmrep_core::{Claim, TargetError};

use super::log::EntryKind;

/// One entry to apply: where, what, and its data (empty unless `kind` is `Write`).
#[derive(Debug, Clone, Copy)]
pub struct ApplyEntry<'a> {
    pub dev_nr: u32,
    pub offset: u64,
    pub len: u32,
    pub kind: EntryKind,
    pub data: &'a [u8],
}

/// A transport to one site.
pub trait SlinkHandler: Send + Sync {
    /// The table keyword of the transport.
    fn kind(&self) -> &'static str;

    /// Attach device `dev_nr` of this site, given by the table's device parameter, and
    /// check it can hold `need_bytes`.
    fn attach(&self, dev_nr: u32, device: &str, need_bytes: u64) -> Result<(), TargetError>;

    /// Keep `claim` (DESIGN 4.9: the bytes attached device `dev_nr` occupies) as long as
    /// the device is in use: until it is detached and no I/O to it is in flight.
    fn keep_claim(&self, dev_nr: u32, claim: Claim);

    /// Attach device `dev_nr`, which is missing now (a restart found its file gone): its
    /// I/O fails, so the SLINK is down, and probes look for it again.
    fn attach_missing(&self, dev_nr: u32, device: &str, need_bytes: u64);

    /// Detach device `dev_nr` (its replicator-dev went away).
    fn detach(&self, dev_nr: u32);

    /// Whether device `dev_nr` is attached.
    fn has_device(&self, dev_nr: u32) -> bool;

    /// The attached devices.
    fn devices(&self) -> Vec<u32>;

    /// Apply entries, in the given order, and make them durable at the site before
    /// returning. An RD's apply is one epoch: its entries were concurrent writes, so the
    /// handler may reorder or parallelise them; the next epoch comes only after this one
    /// is durable. SLINK 0 (the LDs) may be given several epochs at once, in log order:
    /// entries that overlap must then land in the given order (a later one wins).
    fn apply(&self, entries: &[ApplyEntry<'_>]) -> io::Result<()>;

    /// Read from device `dev_nr` of this site (LD reads; resync source).
    fn read(&self, dev_nr: u32, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Check whether the site answers (after a failure). Default: try a read of
    /// every attached device's first sector.
    fn probe(&self) -> io::Result<()>;

    /// Human-readable description of where the site's devices are.
    fn describe(&self) -> String;

    /// Where device `dev_nr` of this site is (a path, a URL), if attached.
    fn device_path(&self, _dev_nr: u32) -> Option<String> {
        None
    }
}
