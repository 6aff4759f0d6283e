//! Site links. An SLINK handler moves log entries to one site's devices; the group
//! decides *which* entries and *when* (in log order, one epoch at a time), the handler
//! only *how*. One implementation per transport: [`local`] (files and block devices,
//! alias `blockdev`); `net` and `s3` plug in here without touching the log.

pub mod local;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use dmrep_core::{Claim, TargetError};
use parking_lot::RwLock;

use super::log::{EntryKind, RingLog};
use dmrep_formats::lineage::Lineage;
use dmrep_formats::site::Region;

/// What a link learned at its site that the group must act on (taken by the group with
/// [`SlinkHandler::take_news`] after each probe and failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkNews {
    /// A newer generation of the group exists there: this site must stop taking writes.
    Fenced(String),
    /// The site there accepted writes as primary from the same parent generation as
    /// this one (`Some`: what was found): never merged automatically; reported until it
    /// is resolved (`None`: the site follows this one now).
    SplitBrain(Option<String>),
    /// The site's copy is not what this SLINK's cursor says: its entries after history
    /// seq `after` are not this site's history (a failed-back old primary, a discarded
    /// split brain), or it lacks entries the log no longer holds. Copy `regions` (and,
    /// with `full`, every region), plus what the SLINK still holds after `after`.
    Resync { after: u64, regions: Vec<Region>, full: bool, why: String },
}

/// What a transport needs to build an SLINK handler of a group.
pub struct LinkSetup<'a> {
    /// The group's name (its control device).
    pub group: &'a str,
    pub slink: u16,
    /// The transport's parameters from the table (after the policy and thresholds).
    pub params: &'a [String],
    /// The group's log: its site state (role, group uuid, lineage) and what it holds.
    pub log: Arc<RingLog>,
    /// Bytes of each device of the group.
    pub dev_bytes: u64,
}

/// A transport other than `local`, registered by the program that runs groups (the
/// daemon registers `net`): one new file plus one registry line per transport.
pub trait Transport: Send + Sync {
    /// Check the parameters and build the handler (it connects later, on its own).
    fn create(&self, setup: LinkSetup<'_>) -> Result<Arc<dyn SlinkHandler>, TargetError>;
}

static TRANSPORTS: RwLock<BTreeMap<&'static str, Arc<dyn Transport>>> = RwLock::new(BTreeMap::new());

/// Make transport `name` (the table keyword) available.
pub fn register_transport(name: &'static str, t: Arc<dyn Transport>) {
    TRANSPORTS.write().insert(name, t);
}

/// The transport registered as `name`.
pub fn transport(name: &str) -> Option<Arc<dyn Transport>> {
    TRANSPORTS.read().get(name).cloned()
}

/// One entry to apply: where, what, and its data (empty unless `kind` is `Write`).
#[derive(Debug, Clone, Copy)]
pub struct ApplyEntry<'a> {
    /// The entry's seq in the primary's history (0 for resync data, which is outside
    /// write order).
    pub seq: u64,
    /// Its epoch (0 for resync data).
    pub epoch: u64,
    /// When the primary appended it, microseconds since the Unix epoch (0: unknown).
    pub time_us: u64,
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
    /// returning. A local apply is one epoch: its entries were concurrent writes, so the
    /// handler may reorder or parallelise them; the next epoch comes only after this one
    /// is durable. A handler that [keeps a log](SlinkHandler::keeps_log) may be given
    /// several epochs at once, in log order: overlapping entries must then land in the
    /// given order (a later one wins).
    fn apply(&self, entries: &[ApplyEntry<'_>]) -> io::Result<()>;

    /// Whether the site keeps what it receives in a log of its own, from which it
    /// recovers to a prefix state by itself (a remote dmrep site). Such an SLINK, like
    /// SLINK 0, may be given several epochs in one apply.
    fn keeps_log(&self) -> bool {
        false
    }

    /// Send entries to the site (`last`: the group's seq they end at) and say up to which
    /// of the group's seqs everything shipped so far is durable there. A site that keeps
    /// its own log may keep a batch in flight (pipelining: the link carries one batch
    /// while the previous one is acknowledged); the group then asks [`SlinkHandler::collect`]
    /// when it has nothing more to send. Default: [`SlinkHandler::apply`], all durable.
    fn ship(&self, entries: &[ApplyEntry<'_>], last: u64) -> io::Result<u64> {
        self.apply(entries).map(|()| last)
    }

    /// Wait until everything shipped is durable at the site; up to which of the group's
    /// seqs it is. Only called after a [`SlinkHandler::ship`] left a batch in flight.
    fn collect(&self) -> io::Result<u64> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "this transport keeps nothing in flight"))
    }

    /// Copy `data` to device `dev_nr` at `offset`, durably, outside write order (resync
    /// and initial copy). Default: one apply.
    fn copy_region(&self, dev_nr: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.apply(&[ApplyEntry {
            seq: 0,
            epoch: 0,
            time_us: 0,
            dev_nr,
            offset,
            len: data.len() as u32,
            kind: EntryKind::Write,
            data,
        }])
    }

    /// The SLINK rejoins ordered mode at `seq` after a resync: its copy equals the
    /// primary's state at `seq`, and entries after it follow. Default: nothing to do.
    fn rejoined(&self, _seq: u64) -> io::Result<()> {
        Ok(())
    }

    /// Read from device `dev_nr` of this site (LD reads; resync source).
    fn read(&self, dev_nr: u32, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Check whether the site answers (after a failure). Default: try a read of
    /// every attached device's first sector.
    fn probe(&self) -> io::Result<()>;

    /// Why the transport knows the site is unreachable now, without being asked to do
    /// anything (a network link found dead by its heartbeat). Checked every tick, so an
    /// idle SLINK shows down as soon as its link is. Default: never.
    fn known_down(&self) -> Option<String> {
        None
    }

    /// The transport's own status (shown under the SLINK's `link`); none by default.
    fn link_status(&self) -> Option<serde_json::Value> {
        None
    }

    /// Human-readable description of where the site's devices are.
    fn describe(&self) -> String;

    /// Where device `dev_nr` of this site is (a path, a URL), if attached.
    fn device_path(&self, _dev_nr: u32) -> Option<String> {
        None
    }

    /// The site this SLINK reaches, when it is another dmrep site of the group (the
    /// role commands and the receiver pair sites with SLINKs by it). Default: none.
    fn peer_site(&self) -> Option<String> {
        None
    }

    /// Planned switchover: the site (which has every entry) becomes the primary of the
    /// new generation that `lineage` ends with; its answer, once durable there, is the
    /// lineage as it recorded it. Default: this transport cannot.
    fn hand_over(&self, _lineage: Lineage) -> io::Result<Lineage> {
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("a {} slink cannot take over the group", self.kind())))
    }

    /// The crc32c of `len` bytes at `offset` of device `dev_nr` at this site (online
    /// verify). Default: read them here; a remote site computes it where the data is.
    fn checksum(&self, dev_nr: u32, offset: u64, len: u64) -> io::Result<u32> {
        let mut buf = vec![0u8; len as usize];
        self.read(dev_nr, offset, &mut buf)?;
        Ok(crc32c::crc32c(&buf))
    }

    /// What the link learned that the group must act on, once. Default: nothing.
    fn take_news(&self) -> Option<LinkNews> {
        None
    }

    /// After a switchover's promotion got no answer: whether the site is the primary of
    /// a newer generation now (`Ok(true)`), still follows this one (`Ok(false)`), or
    /// cannot be asked (an error). Default: cannot be asked.
    fn peer_promoted(&self) -> io::Result<bool> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "not a site link"))
    }
}
