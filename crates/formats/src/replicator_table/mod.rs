//! The replicator targets' parameters: pure data, no I/O.
//!
//! Parses the argument tokens of a table line (the tokens after the target keyword,
//! i.e. [`SegmentSpec::args`](crate::table::SegmentSpec::args)) into plain specs that
//! the targets are then built from.
//!
//! # `replicator`: the paper's one-line form
//!
//! ```text
//! <replog_type> <#replog_params> <replog_params>...
//! { <slink_type> <#slink_params> <slink_params>...
//!   <#dev_params> <dev_nr> <dev_path>
//!   <dlog_type> <#dlog_params> <dlog_params>... }...
//! ```
//!
//! One entry per (SLINK, device) pair: an SLINK that carries several devices is
//! repeated, and its repetitions must agree on type, policy and fall-behind.
//!
//! # `replicator`: the two-target form's control device
//!
//! ```text
//! <replog_type> <#replog_params> <replog_params>...
//! { <slink_type> <#slink_params> <slink_params>... }...
//! ```
//!
//! **Form detection**: the token after the *first* SLINK entry's parameters decides
//! the form of the whole table. A decimal number there is `#dev_params`: the one-line
//! form, where every entry carries a device. The end of the parameters or an SLINK
//! type keyword (`local`, `blockdev`, `net`, `s3`) there means the control form,
//! where no entry carries one. Mixing the two is an error that says which form the
//! table was read as. A spec of the control form has no [`ReplicatorSpec::devices`].
//!
//! # `replicator-dev`
//!
//! ```text
//! <control_dev> <dev_nr> { <slink_nr> 1 <dev_path> <dlog_type> <#dlog_params> <dlog_params>... }...
//! ```
//!
//! # Parameters
//!
//! - Replication log types `default` and its alias `ringbuffer` (both read as
//!   [`LogKind::Default`]): `<path> <start_sector> [auto|open|create [<size_sectors>]]`.
//!   Without a mode the log must exist (`open`, as in the original). A size is only
//!   meaningful with `auto` or `create`.
//! - SLINK types `local` (alias `blockdev`), `net`, `s3`. SLINK params:
//!   `<slink_nr> [<policy> [<fallbehind>...]]`, slink_nr below [`MAX_SLINKS`] (the
//!   replication log's limit: one constant for the grammar and the log).
//!   For `net` and `s3` any further parameters are kept, uninterpreted, as transport
//!   parameters (for `local` they are an error, except the option `resync_snapshot`
//!   after the fall-behind thresholds: see [`SlinkSpec::resync_snapshot`]).
//! - Policy: `synchronous` or `asynchronous`, or any prefix of either of at least 4
//!   characters (`sync`, `async`), optionally combined with `stall` by `+`
//!   (`asynchronous+stall`). Without a policy an SLINK is synchronous: nothing is
//!   acknowledged before it is safe at every site unless the table says so.
//! - Fall-behind (asynchronous SLINKs only): `ios=N` (log entries), `size=N[k|m|g|t]`
//!   (no suffix: 512-byte sectors; suffixes are binary: k = KiB, m = MiB, ...),
//!   `timeout=N[ms|s|m|h]` (no suffix: milliseconds), or the two-token forms
//!   `ios N`, `size N[...]`, `timeout N[...]`. Values are at least 1; each kind at
//!   most once.
//! - Dirty logs: `-` or `nolog` with 0 params (SLINK 0 only, and required there);
//!   `core <#> <region_sectors> [sync|nosync]`;
//!   `disk <#> <path> <region_sectors> [sync|nosync]`. `sync` (the default) means the
//!   RD starts fully out of sync; `nosync` trusts it is already equal. The region
//!   size is a power of two of at least [`MIN_REGION_SECTORS`] and the same on all
//!   RDs of one device.
//!
//! # Validation
//!
//! SLINK 0 must exist; every device has its LD on SLINK 0 with no dirty log and each
//! RD on an SLINK > 0 has one; a (slink, dev_nr) pair appears at most once; every
//! `#params` count must match the tokens that follow.
//!
//! # Canonical form
//!
//! [`ReplicatorSpec::to_args`] / `Display` render a spec as tokens that parse back to
//! the same spec: the parser sorts SLINKs by number, devices by dev_nr and replicas
//! by slink_nr; the renderer writes the one-line form SLINK by SLINK (each SLINK's
//! entries in dev_nr order), spelling out every default (policy, open mode, `sync`).
//! Sizes are written with the largest unit that divides them exactly. This holds for
//! every spec the parser produces; for a spec built in code, run
//! [`ReplicatorSpec::validate`] first (paths and transport parameters must also be
//! valid table tokens, and transport parameters must not look like a fall-behind).

use std::collections::BTreeMap;
use std::fmt;

/// SLINK numbers are `0..MAX_SLINKS`: the replication log's limit (its per-entry SLINK
/// bitmap has that many bits), checked here so a table the log cannot hold is refused
/// when it is parsed, not after the log was created.
pub use crate::replog::{SlinkNr, MAX_SLINKS};

/// What an SLINK number field accepts, for error messages.
fn slink_nr_expected() -> String {
    format!("an SLINK number below {MAX_SLINKS} (0..={})", MAX_SLINKS - 1)
}

/// Whether `nr` is a valid SLINK number.
fn slink_nr_ok(nr: u64) -> bool {
    nr < MAX_SLINKS as u64
}

/// Smallest dirty-log region, in sectors (4 KiB): one log data slot, so a region
/// is never smaller than the unit the log copies.
pub const MIN_REGION_SECTORS: u64 = 8;

/// What the policy field accepts, for error messages.
const POLICY_EXPECTED: &str = "synchronous|asynchronous[+stall]";
/// What a fall-behind threshold looks like, for error messages.
/// The SLINK option that snapshots its devices before a resync (see [`SlinkSpec`]).
pub const RESYNC_SNAPSHOT: &str = "resync_snapshot";

const FALLBEHIND_EXPECTED: &str = "ios=N|size=N[k|m|g|t]|timeout=N[ms|s|m|h]";
/// SLINK type keywords (also how the control form's entries are recognised).
const SLINK_TYPES: &str = "local|blockdev|net|s3";

// ---------------------------------------------------------------------------
// Specs
// ---------------------------------------------------------------------------

/// A `replicator` table line: the replication log, the SLINKs and, in the one-line
/// form, the devices. `devices` is empty for the two-target form's control device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicatorSpec {
    pub log: LogSpec,
    /// Sorted by `nr`, unique.
    pub slinks: Vec<SlinkSpec>,
    /// Sorted by `dev_nr`, unique; empty in the control (two-target) form.
    pub devices: Vec<DeviceSpec>,
}

/// The replication log's backing store.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogSpec {
    pub kind: LogKind,
    pub path: String,
    /// Where the log starts on its backing store, in sectors.
    pub start_sector: u64,
    pub open_mode: OpenMode,
    /// Size to create the log with, in sectors (`auto`/`create` only).
    pub size_sectors: Option<u64>,
    /// `role=primary|secondary` (last parameter): the site's role when the log is
    /// created. An existing log keeps the role it has (only a switchover or takeover
    /// changes it). `None`: primary.
    #[serde(default)]
    pub role: Option<crate::replog::SiteRole>,
}

/// Replication log types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LogKind {
    /// The ring buffer log: `default` in the paper, `ringbuffer` in the original.
    Default,
}

impl LogKind {
    /// Canonical keyword.
    pub fn name(self) -> &'static str {
        match self {
            LogKind::Default => "default",
        }
    }
}

/// How the replication log is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum OpenMode {
    /// Open a valid log, or create one if there is none.
    Auto,
    /// The log must exist.
    Open,
    /// Create (initialise) a new log.
    Create,
}

impl OpenMode {
    pub fn name(self) -> &'static str {
        match self {
            OpenMode::Auto => "auto",
            OpenMode::Open => "open",
            OpenMode::Create => "create",
        }
    }
}

/// One site link.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlinkSpec {
    pub nr: SlinkNr,
    pub kind: SlinkKind,
    pub policy: Policy,
    pub fallbehind: FallBehind,
    /// `resync_snapshot` (local SLINKs, SLINK 0 included): before a resync overwrites this
    /// SLINK's devices (out of write order), they are snapshotted, so that a
    /// write-order-consistent copy exists until the resync ends; then it is dropped.
    #[serde(default)]
    pub resync_snapshot: bool,
}

/// SLINK transports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SlinkKind {
    /// Device paths reachable here (files or block devices): `local`, alias `blockdev`.
    Local,
    /// A remote dmrep site over TCP with mutual TLS; parameters not yet interpreted.
    Net { params: Vec<String> },
    /// An object store; parameters not yet interpreted.
    S3 { params: Vec<String> },
}

impl SlinkKind {
    /// Canonical keyword.
    pub fn name(&self) -> &'static str {
        match self {
            SlinkKind::Local => "local",
            SlinkKind::Net { .. } => "net",
            SlinkKind::S3 { .. } => "s3",
        }
    }

    /// The transport parameters (empty for `local`).
    pub fn params(&self) -> &[String] {
        match self {
            SlinkKind::Local => &[],
            SlinkKind::Net { params } | SlinkKind::S3 { params } => params,
        }
    }
}

/// Replication mode of an SLINK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Synchronous,
    Asynchronous,
}

/// An SLINK's policy: its mode, and whether writes stall (rather than the SLINK
/// leaving ordered mode) when the log is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    pub mode: Mode,
    pub stall: bool,
}

impl Policy {
    pub const SYNCHRONOUS: Policy = Policy { mode: Mode::Synchronous, stall: false };
    pub const ASYNCHRONOUS: Policy = Policy { mode: Mode::Asynchronous, stall: false };

    /// Whether writes wait for the SLINK by policy.
    pub fn is_synchronous(&self) -> bool {
        self.mode == Mode::Synchronous
    }
}

impl Default for Policy {
    /// Synchronous, no stall: the safe choice when the table names no policy.
    fn default() -> Self {
        Policy { mode: Mode::Synchronous, stall: false }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.mode {
            Mode::Synchronous => "synchronous",
            Mode::Asynchronous => "asynchronous",
        })?;
        if self.stall {
            f.write_str("+stall")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Policy {
    type Err = ReplicatorTableError;

    /// Parses a policy word (also for `slink message <nr> policy <p>`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_policy(s).ok_or_else(|| unknown("slink", "policy", s, POLICY_EXPECTED))
    }
}

/// Fall-behind thresholds of an asynchronous SLINK; `None` means no threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct FallBehind {
    /// Outstanding log entries.
    pub ios: Option<u64>,
    /// Outstanding data, in bytes (always a multiple of 512 when parsed).
    pub size_bytes: Option<u64>,
    /// Age of the oldest outstanding entry, in milliseconds.
    pub timeout_ms: Option<u64>,
}

impl FallBehind {
    pub fn is_empty(&self) -> bool {
        self.ios.is_none() && self.size_bytes.is_none() && self.timeout_ms.is_none()
    }

    /// Canonical tokens: `ios=N size=N<unit> timeout=N<unit>`, present ones only.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(n) = self.ios {
            out.push(format!("ios={n}"));
        }
        if let Some(b) = self.size_bytes {
            out.push(format!("size={}", render_size(b)));
        }
        if let Some(ms) = self.timeout_ms {
            out.push(format!("timeout={}", render_timeout(ms)));
        }
        out
    }

    /// Parses threshold tokens (`ios=N`, `size N`, ...) into `self`, e.g. for
    /// `slink message <nr> fallbehind <type>=<value>`. Each kind at most once.
    pub fn parse_into<S: AsRef<str>>(&mut self, tokens: &[S]) -> Result<(), ReplicatorTableError> {
        let mut seen = FallBehind::default();
        let mut i = 0;
        while i < tokens.len() {
            i += parse_threshold("slink", tokens, i, &mut seen)?;
        }
        if let Some(v) = seen.ios {
            self.ios = Some(v);
        }
        if let Some(v) = seen.size_bytes {
            self.size_bytes = Some(v);
        }
        if let Some(v) = seen.timeout_ms {
            self.timeout_ms = Some(v);
        }
        Ok(())
    }
}

/// One device of the group with its copies: its LD on SLINK 0 and its RDs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSpec {
    pub dev_nr: u32,
    /// Sorted by `slink_nr`, unique.
    pub replicas: Vec<ReplicaSpec>,
}

/// One copy of a device on one SLINK (the LD when `slink_nr` is 0).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaSpec {
    pub slink_nr: SlinkNr,
    pub path: String,
    pub dirty_log: DirtyLogSpec,
}

/// A replica's dirty log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DirtyLogSpec {
    /// `-` / `nolog`: the LD's (SLINK 0 never leaves ordered mode).
    None,
    /// In memory.
    Core { region_sectors: u64, sync: bool },
    /// Persistent, in a file or device.
    Disk { path: String, region_sectors: u64, sync: bool },
}

impl DirtyLogSpec {
    pub fn region_sectors(&self) -> Option<u64> {
        match self {
            DirtyLogSpec::None => None,
            DirtyLogSpec::Core { region_sectors, .. } | DirtyLogSpec::Disk { region_sectors, .. } => {
                Some(*region_sectors)
            }
        }
    }

    /// The type keyword (`-` for none).
    pub fn name(&self) -> &'static str {
        match self {
            DirtyLogSpec::None => "-",
            DirtyLogSpec::Core { .. } => "core",
            DirtyLogSpec::Disk { .. } => "disk",
        }
    }

    /// Canonical tokens: `<type> <#params> <params>...`.
    pub fn to_args(&self) -> Vec<String> {
        let flag = |sync: bool| if sync { "sync" } else { "nosync" }.to_string();
        match self {
            DirtyLogSpec::None => vec!["-".into(), "0".into()],
            DirtyLogSpec::Core { region_sectors, sync } => {
                vec!["core".into(), "2".into(), region_sectors.to_string(), flag(*sync)]
            }
            DirtyLogSpec::Disk { path, region_sectors, sync } => {
                vec!["disk".into(), "3".into(), path.clone(), region_sectors.to_string(), flag(*sync)]
            }
        }
    }
}

/// A `replicator-dev` table line: one replicated device of a group whose control
/// device (`replicator`) is named `control`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicatorDevSpec {
    pub control: String,
    pub dev_nr: u32,
    /// Sorted by `slink_nr`, unique; the LD (slink 0) is always there.
    pub replicas: Vec<ReplicaSpec>,
}

mod error;
pub mod net;
mod parse;
mod validate;

pub use error::*;
pub use parse::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::parse_table;
    use crate::table::tests::{paper_2, PAPER_1, PAPER_3};
    use proptest::prelude::*;

    fn toks(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn rep(s: &str) -> Result<ReplicatorSpec, ReplicatorTableError> {
        parse_replicator(&toks(s))
    }

    fn rep_err(s: &str) -> ReplicatorTableError {
        rep(s).expect_err("should not parse")
    }

    fn dev(s: &str) -> Result<ReplicatorDevSpec, ReplicatorTableError> {
        parse_replicator_dev(&toks(s))
    }

    /// The arguments of a table's only segment, which must be a replicator.
    fn table_args(text: &str) -> Vec<String> {
        let t = parse_table(text).unwrap();
        assert_eq!(t.segments.len(), 1);
        assert_eq!(t.segments[0].target, "replicator");
        t.segments[0].args.clone()
    }

    fn asynchronous() -> Policy {
        Policy { mode: Mode::Asynchronous, stall: false }
    }

    fn local(nr: SlinkNr, policy: Policy, ios: Option<u64>) -> SlinkSpec {
        SlinkSpec {
            nr,
            kind: SlinkKind::Local,
            policy,
            fallbehind: FallBehind { ios, ..FallBehind::default() },
            resync_snapshot: false,
        }
    }

    fn ld(path: &str) -> ReplicaSpec {
        ReplicaSpec { slink_nr: 0, path: path.into(), dirty_log: DirtyLogSpec::None }
    }

    fn rd(slink_nr: SlinkNr, path: &str, region_sectors: u64, sync: bool) -> ReplicaSpec {
        ReplicaSpec { slink_nr, path: path.into(), dirty_log: DirtyLogSpec::Core { region_sectors, sync } }
    }

    fn paper_log() -> LogSpec {
        LogSpec {
            kind: LogKind::Default,
            path: "/dev/vg00/replog".into(),
            start_sector: 0,
            open_mode: OpenMode::Auto,
            size_sectors: Some(2097152),
            role: None,
        }
    }

    fn assert_round_trip(spec: &ReplicatorSpec) {
        let again = parse_replicator(&spec.to_args()).unwrap();
        assert_eq!(&again, spec);
        // And through a table line.
        let t = parse_table(&format!("0 100 replicator {spec}\n")).unwrap();
        assert_eq!(&parse_replicator(&t.segments[0].args).unwrap(), spec);
    }

    #[test]
    fn paper_example_1() {
        let spec = parse_replicator(&table_args(PAPER_1)).unwrap();
        let want = ReplicatorSpec {
            log: paper_log(),
            slinks: vec![local(0, asynchronous(), None), local(1, asynchronous(), Some(100))],
            devices: vec![DeviceSpec {
                dev_nr: 0,
                replicas: vec![ld("/dev/vg00/lvol0"), rd(1, "/dev/sdz", 2048, false)],
            }],
        };
        assert_eq!(spec, want);
        assert!(!spec.is_control_form());
        assert_eq!(
            spec.to_string(),
            "default 4 /dev/vg00/replog 0 auto 2097152 \
             local 2 0 asynchronous 2 0 /dev/vg00/lvol0 - 0 \
             local 3 1 asynchronous ios=100 2 0 /dev/sdz core 2 2048 nosync"
        );
        assert_round_trip(&spec);
    }

    #[test]
    fn resync_snapshot_option() {
        let t = "0 8 replicator default 4 /l 0 auto 2097152 local 3 0 async resync_snapshot 2 0 /a - 0 \
                 local 4 1 async ios=9 resync_snapshot 2 0 /b core 2 2048 nosync";
        let spec = parse_replicator(&table_args(t)).unwrap();
        assert!(spec.slink(0).unwrap().resync_snapshot && spec.slink(1).unwrap().resync_snapshot);
        assert!(spec.to_string().contains("local 4 1 asynchronous ios=9 resync_snapshot 2 0 /b"), "{spec}");
        assert_round_trip(&spec);
        // Only on local SLINKs; anything else after it is still an error.
        let net = "0 8 replicator default 3 /l 0 auto local 2 0 async 2 0 /a - 0 net 4 1 async resync_snapshot 1.2.3.4:5 2 0 0 core 1 2048";
        let e = parse_replicator(&table_args(net)).unwrap_err().to_string();
        assert!(e.contains("resync_snapshot") && e.contains("SLINK 0"), "{e}");
        let bad = "0 8 replicator default 3 /l 0 auto local 3 0 async resync_snapshot bogus 2 0 /a - 0";
        assert!(parse_replicator(&table_args(bad)).is_err());
    }

    #[test]
    fn paper_example_2() {
        let spec = parse_replicator(&table_args(&paper_2())).unwrap();
        assert_eq!(spec.slinks.len(), 3);
        assert_eq!(spec.slink(2), Some(&local(2, asynchronous(), Some(100))));
        assert_eq!(
            spec.devices[0].replicas,
            vec![ld("/dev/vg00/lvol0"), rd(1, "/dev/sdz", 2048, false), rd(2, "/dev/sdw", 2048, false)]
        );
        assert_round_trip(&spec);
    }

    #[test]
    fn paper_example_3() {
        let spec = parse_replicator(&table_args(PAPER_3)).unwrap();
        let want = ReplicatorSpec {
            log: paper_log(),
            slinks: vec![local(0, asynchronous(), None), local(1, asynchronous(), Some(100))],
            devices: vec![
                DeviceSpec { dev_nr: 0, replicas: vec![ld("/dev/vg00/lvol0"), rd(1, "/dev/sdc", 2048, false)] },
                DeviceSpec { dev_nr: 1, replicas: vec![ld("/dev/vg00/lvol1"), rd(1, "/dev/sdd", 2048, false)] },
            ],
        };
        assert_eq!(spec, want);
        assert_eq!(spec.device(1).unwrap().replicas[1].path, "/dev/sdd");
        assert_round_trip(&spec);
    }

    #[test]
    fn entry_order_does_not_matter() {
        let a = rep("default 2 /l 0 local 3 1 async ios=1 2 0 /r core 1 8 \
                     local 2 0 async 2 0 /d - 0")
        .unwrap();
        let b = rep("default 2 /l 0 local 2 0 async 2 0 /d - 0 \
                     local 3 1 async ios=1 2 0 /r core 1 8")
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.slinks[0].nr, 0);
    }

    #[test]
    fn two_target_control_form() {
        let spec = rep("ringbuffer 3 /log 8 open blockdev 2 0 synchronous \
                        blockdev 4 1 async+stall size 1m blockdev 3 2 asyn timeout=2s")
        .unwrap();
        assert!(spec.is_control_form());
        assert_eq!(
            spec.log,
            LogSpec {
                kind: LogKind::Default,
                path: "/log".into(),
                start_sector: 8,
                open_mode: OpenMode::Open,
                size_sectors: None,
                role: None,
            }
        );
        assert_eq!(spec.slinks.len(), 3);
        assert_eq!(spec.slinks[0].policy, Policy::default());
        assert_eq!(spec.slinks[1].policy, Policy { mode: Mode::Asynchronous, stall: true });
        assert_eq!(spec.slinks[1].fallbehind.size_bytes, Some(1 << 20));
        assert_eq!(spec.slinks[2].fallbehind.timeout_ms, Some(2000));
        assert_eq!(
            spec.to_string(),
            "default 3 /log 8 open local 2 0 synchronous \
             local 3 1 asynchronous+stall size=1m local 3 2 asynchronous timeout=2s"
        );
        assert_round_trip(&spec);
        // SLINK 0 only.
        let spec = rep("default 2 /log 0 local 1 0").unwrap();
        assert_eq!(spec.slinks, vec![local(0, Policy::default(), None)]);
        assert_round_trip(&spec);
        // A repeated SLINK must agree here too.
        rep("default 2 /log 0 local 1 0 local 1 0").unwrap();
        assert!(matches!(
            rep_err("default 2 /log 0 local 1 0 local 2 0 async"),
            ReplicatorTableError::SlinkConflict { slink: 0, what: "policy", .. }
        ));
        // Control form still needs SLINK 0.
        assert_eq!(rep_err("default 2 /log 0 local 2 1 async"), ReplicatorTableError::MissingSlink0);
    }

    #[test]
    fn mixed_forms_are_errors() {
        // The first entry has no devices: control form.
        let e = rep_err("default 2 /l 0 local 1 0 local 2 1 async 2 0 /r core 1 8");
        assert!(e.to_string().contains("two-target"), "{e}");
        assert!(matches!(e, ReplicatorTableError::Invalid { ref field, .. } if field == "slink_type"));
        // The first entry has a device: one-line form.
        let e = rep_err("default 2 /l 0 local 1 0 2 0 /d - 0 local 2 1 async");
        assert!(e.to_string().contains("one-line form"), "{e}");
        let e = rep_err("default 2 /l 0 local 1 0 2 0 /d - 0 local 2 1 async local 1 0");
        assert!(matches!(e, ReplicatorTableError::Invalid { ref field, .. } if field == "#dev_params"), "{e}");
    }

    #[test]
    fn replicator_dev() {
        let d = dev("grp 3 1 1 /dev/b core 2 1024 nosync 0 1 /dev/a nolog 0 \
                     2 1 /dev/c disk 3 /dl 1024 sync")
        .unwrap();
        assert_eq!(
            d,
            ReplicatorDevSpec {
                control: "grp".into(),
                dev_nr: 3,
                replicas: vec![
                    ld("/dev/a"),
                    rd(1, "/dev/b", 1024, false),
                    ReplicaSpec {
                        slink_nr: 2,
                        path: "/dev/c".into(),
                        dirty_log: DirtyLogSpec::Disk { path: "/dl".into(), region_sectors: 1024, sync: true },
                    },
                ],
            }
        );
        assert_eq!(d.to_string(), "grp 3 0 1 /dev/a - 0 1 1 /dev/b core 2 1024 nosync 2 1 /dev/c disk 3 /dl 1024 sync");
        assert_eq!(parse_replicator_dev(&d.to_args()).unwrap(), d);
        assert_eq!(dev("grp 0 0 1 /a - 0").unwrap().replicas, vec![ld("/a")]);
    }

    #[test]
    fn replicator_dev_errors() {
        let cases: &[(&str, &str)] = &[
            ("", "replicator-dev: control_dev: expected the name of the replicator control device, found end of parameters"),
            ("grp", "replicator-dev: dev_nr: expected a device number 0..=4294967295, found end of parameters"),
            ("grp x", "replicator-dev: dev_nr: expected a device number 0..=4294967295, found \"x\""),
            ("grp 0", "device 0: slink_nr: expected a device entry (<slink_nr> 1 <dev_path> <dlog_type> <#dlog_params> ...), slink 0 at least, found end of parameters"),
            ("grp 0 1 1 /b core 1 8", "device 0: no local device on slink 0 (every dev_nr needs its LD on slink 0)"),
            ("grp 0 0 2 /a /b - 0", "slink 0 device 0: #dev_params: expected 1 (<dev_path>), found \"2\""),
            ("grp 0 0 1 /a - 0 0 1 /a - 0", "slink 0 device 0: defined twice"),
            ("grp 0 0 1 /a core 1 8", "slink 0 device 0: a local device takes no dirty log (\"-\" or \"nolog\"), found \"core\""),
            ("grp 0 0 1 /a - 0 1 1 /b - 0", "slink 1 device 0: a remote device needs a dirty log (core or disk), found \"-\""),
            ("grp 0 0 1 /a - 0 1 1 /b core 1 8 2 1 /c core 1 16", "device 0: slink 2: region size 16 sectors differs from 8 sectors on slink 1 (all remote devices of one device need the same region size)"),
            ("grp 0 2049 1 /a - 0", "device 0: slink_nr: expected an SLINK number below 2048 (0..=2047), found \"2049\""),
            ("grp 0 0 1 /a - 1 x", "slink 0 device 0: #dlog_params: expected 0, found \"1\""),
            ("grp 0 0 1 /a -", "slink 0 device 0: #dlog_params: expected 0, found end of parameters"),
        ];
        for (args, msg) in cases {
            assert_eq!(dev(args).unwrap_err().to_string(), *msg, "{args}");
        }
    }

    #[test]
    fn log_params() {
        let log = |s: &str| rep(&format!("{s} local 1 0")).map(|r| r.log);
        assert_eq!(log("default 2 /l 7").unwrap().open_mode, OpenMode::Open);
        let l = log("ringbuffer 4 /l 7 create 100").unwrap();
        assert_eq!((l.kind, l.open_mode, l.size_sectors), (LogKind::Default, OpenMode::Create, Some(100)));
        assert_eq!(log("default 3 /l 0 auto").unwrap().size_sectors, None);
        let l = log("default 5 /l 0 auto 100 role=secondary").unwrap();
        assert_eq!((l.size_sectors, l.role), (Some(100), Some(crate::replog::SiteRole::Secondary)));
        assert_eq!(log("default 3 /l 0 role=primary").unwrap().role, Some(crate::replog::SiteRole::Primary));
        assert_eq!(
            log("default 3 /l 0 role=boss").unwrap_err().to_string(),
            "replication log: unknown role \"boss\" (expected primary|secondary)"
        );
        let cases: &[(&str, &str)] = &[
            ("fancy 2 /l 0", "replication log: unknown replication log type \"fancy\" (expected default|ringbuffer)"),
            ("default 1 /l", "replication log: #replog_params: expected 2 to 5 (<path> <start_sector> [auto|open|create [<size_sectors>]] [role=primary|secondary]), found \"1\""),
            ("default 9 /l 0", "replication log: #replog_params: expected a count of at most 5 (the parameters left), found \"9\" (#replog_params 9 counts more parameters than there are)"),
            ("default x /l 0", "replication log: #replog_params: expected 2 to 5 (<path> <start_sector> [auto|open|create [<size_sectors>]] [role=primary|secondary]), found \"x\""),
            ("default 2 /l -1", "replication log: start_sector: expected a sector number, found \"-1\""),
            ("default 3 /l 0 maybe", "replication log: unknown open mode \"maybe\" (expected auto|open|create)"),
            ("default 4 /l 0 open 10", "replication log: size_sectors: expected no size after \"open\", found \"10\" (an existing log's size is read from it; give a size with auto or create)"),
            ("default 4 /l 0 auto 0", "replication log: size_sectors: expected a size in sectors >= 1, found \"0\""),
        ];
        for (args, msg) in cases {
            assert_eq!(log(args).unwrap_err().to_string(), *msg, "{args}");
        }
        assert_eq!(
            rep_err("").to_string(),
            "replication log: replog_type: expected a replication log type (default|ringbuffer), \
             found end of parameters"
        );
        assert_eq!(
            rep_err("default 2 /l 0").to_string(),
            "replicator: slink_type: expected an SLINK entry (local|blockdev|net|s3) after the \
             replication log, found end of parameters (slink 0 at least)"
        );
    }

    #[test]
    fn policies() {
        let p = |s: &str| s.parse::<Policy>();
        let sync = Policy::default();
        let a = asynchronous();
        let a_stall = Policy { mode: Mode::Asynchronous, stall: true };
        let s_stall = Policy { mode: Mode::Synchronous, stall: true };
        for (w, want) in [
            ("synchronous", sync),
            ("sync", sync),
            ("synch", sync),
            ("asynchronous", a),
            ("async", a),
            ("asyn", a),
            ("asynchron", a),
            ("asynchronous+stall", a_stall),
            ("stall+async", a_stall),
            ("sync+stall", s_stall),
        ] {
            assert_eq!(p(w).unwrap(), want, "{w}");
        }
        for w in [
            "",
            "syn",
            "as",
            "stall",
            "async+sync",
            "async+stall+stall",
            "asynchronus",
            "Async",
            "async+",
            "+async",
            "async+stal",
            "synchronously",
        ] {
            assert!(p(w).is_err(), "{w}");
        }
        assert_eq!(a_stall.to_string(), "asynchronous+stall");
        assert_eq!(
            rep_err("default 2 /l 0 local 2 0 async 2 0 /d - 0 local 2 1 asynchronus 2 0 /r core 1 8").to_string(),
            "slink 1: unknown policy \"asynchronus\" (expected synchronous|asynchronous[+stall])"
        );
        // No policy: synchronous.
        let spec = rep("default 2 /l 0 local 1 0 2 0 /d - 0").unwrap();
        assert_eq!(spec.slinks[0].policy, sync);
    }

    fn fb(s: &str) -> Result<FallBehind, ReplicatorTableError> {
        let mut f = FallBehind::default();
        f.parse_into(&toks(s)).map(|()| f)
    }

    #[test]
    fn fallbehind_values_and_units() {
        let size = |s: &str| fb(s).unwrap().size_bytes.unwrap();
        assert_eq!(size("size=2"), 1024);
        assert_eq!(size("size=1k"), 1024);
        assert_eq!(size("size=3K"), 3 << 10);
        assert_eq!(size("size=1m"), 1 << 20);
        assert_eq!(size("size=5g"), 5 << 30);
        assert_eq!(size("size=2t"), 2 << 40);
        assert_eq!(size("size 7m"), 7 << 20);
        let timeout = |s: &str| fb(s).unwrap().timeout_ms.unwrap();
        assert_eq!(timeout("timeout=5"), 5);
        assert_eq!(timeout("timeout=5ms"), 5);
        assert_eq!(timeout("timeout=5s"), 5000);
        assert_eq!(timeout("timeout=2m"), 120_000);
        assert_eq!(timeout("timeout=1h"), 3_600_000);
        assert_eq!(timeout("timeout 30s"), 30_000);
        assert_eq!(fb("ios=100").unwrap().ios, Some(100));
        assert_eq!(fb("ios 100").unwrap().ios, Some(100));
        let all = fb("ios 1 size=1k timeout=1500").unwrap();
        assert_eq!(all.to_args(), ["ios=1", "size=1k", "timeout=1500ms"]);
        assert_eq!(fb("size=3 timeout=60000").unwrap().to_args(), ["size=3", "timeout=1m"]);
        for bad in [
            "ios=0",
            "ios=",
            "ios",
            "ios=x",
            "size=0k",
            "size=1p",
            "size=k",
            "size=99999999999t",
            "size=36028797018963968",
            "timeout=1d",
            "timeout=0",
            "timeout=-1s",
            "bogus=1",
            "ios=1 ios=2",
            "ios=1 ios 2",
            "size=1k size=1m",
        ] {
            assert!(fb(bad).is_err(), "{bad}");
        }
        assert_eq!(
            fb("ios=1 ios=2").unwrap_err().to_string(),
            "slink: fall-behind: expected ios at most once, found \"ios=2\" (ios given twice)"
        );
        assert_eq!(
            fb("size 1p").unwrap_err().to_string(),
            "slink: fall-behind: expected size=N[k|m|g|t] with N >= 1 (no suffix: sectors), found \"size 1p\""
        );
    }

    #[test]
    fn fallbehind_in_tables() {
        let spec = rep("default 2 /l 0 local 2 0 async 2 0 /d - 0 \
                        local 7 1 async ios 10 size=1g timeout 5s 2 0 /r core 1 8")
        .unwrap();
        assert_eq!(
            spec.slinks[1].fallbehind,
            FallBehind { ios: Some(10), size_bytes: Some(1 << 30), timeout_ms: Some(5000) }
        );
        assert_round_trip(&spec);
        assert_eq!(
            rep_err("default 2 /l 0 local 2 0 async 2 0 /d - 0 local 3 1 sync ios=100 2 0 /r core 1 8").to_string(),
            "slink 1: a synchronous SLINK takes no fall-behind threshold, found \"ios=100\" \
             (make it asynchronous)"
        );
        // Without a policy an SLINK is synchronous, so a threshold alone is refused too.
        assert!(matches!(
            rep_err("default 2 /l 0 local 2 0 ios=1 2 0 /d - 0"),
            ReplicatorTableError::SyncWithFallBehind { slink: 0, .. }
        ));
        assert_eq!(
            rep_err("default 2 /l 0 local 3 0 async ios=1x 2 0 /d - 0").to_string(),
            "slink 0: fall-behind: expected ios=N with N >= 1, found \"ios=1x\""
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 3 0 async foo 2 0 /d - 0").to_string(),
            "slink 0: unknown fall-behind threshold \"foo\" (expected ios=N|size=N[k|m|g|t]|timeout=N[ms|s|m|h])"
        );
    }

    #[test]
    fn slink_types_and_numbers() {
        let spec = rep("default 2 /l 0 blockdev 2 0 async 2 0 /d - 0 \
                        net 4 1 async ios=5 host=site-b:7800 2 0 /r core 1 8 \
                        s3 2 2 bucket=x 2 0 /o core 1 8")
        .unwrap();
        assert_eq!(spec.slinks[0].kind, SlinkKind::Local);
        assert_eq!(spec.slinks[1].kind, SlinkKind::Net { params: vec!["host=site-b:7800".into()] });
        assert_eq!(spec.slinks[1].fallbehind.ios, Some(5));
        assert_eq!(spec.slinks[2].kind, SlinkKind::S3 { params: vec!["bucket=x".into()] });
        assert_eq!(spec.slinks[2].policy, Policy::default());
        assert_round_trip(&spec);

        let cases: &[(&str, &str)] = &[
            ("tcp 1 0 2 0 /d - 0", "slink entry 1: unknown SLINK type \"tcp\" (expected local|blockdev|net|s3)"),
            ("local 0 2 0 /d - 0", "slink entry 1: slink_nr: expected an SLINK number below 2048 (0..=2047), found end of parameters"),
            ("local 1 2049 2 0 /d - 0", "slink entry 1: slink_nr: expected an SLINK number below 2048 (0..=2047), found \"2049\""),
            ("local 1 x 2 0 /d - 0", "slink entry 1: slink_nr: expected an SLINK number below 2048 (0..=2047), found \"x\""),
            ("local 4 0 async ios=1 extra 2 0 /d - 0", "slink 0: unknown fall-behind threshold \"extra\" (expected ios=N|size=N[k|m|g|t]|timeout=N[ms|s|m|h])"),
            ("local 9 0", "slink entry 1: #slink_params: expected a count of at most 1 (the parameters left), found \"9\" (#slink_params 9 counts more parameters than there are)"),
            ("local", "slink entry 1: #slink_params: expected a parameter count (<slink_nr> [<policy> [<fallbehind>...]]), found end of parameters"),
        ];
        for (args, msg) in cases {
            assert_eq!(rep_err(&format!("default 2 /l 0 {args}")).to_string(), *msg, "{args}");
        }
    }

    #[test]
    fn count_mismatches() {
        // #slink_params too small: the policy is read as #dev_params.
        let e = rep_err("default 2 /l 0 local 1 0 async 2 0 /d - 0");
        assert_eq!(
            e.to_string(),
            "slink 0: #dev_params: expected a device parameter count (one-line form) or the next \
             SLINK entry (local|blockdev|net|s3; two-target form), found \"async\" (does the \
             #slink_params count cover all the SLINK's parameters?)"
        );
        // #slink_params too large eats #dev_params.
        let e = rep_err("default 2 /l 0 local 3 0 async 2 0 /d - 0");
        assert!(matches!(e, ReplicatorTableError::Unknown { what: "fall-behind threshold", .. }), "{e}");
        // #dev_params.
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 3 0 /d x - 0").to_string(),
            "slink 0: #dev_params: expected 2 (<dev_nr> <dev_path>), found \"3\""
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 0").to_string(),
            "slink 0: #dev_params: expected a count of at most 1 (the parameters left), found \"2\" \
             (#dev_params 2 counts more parameters than there are)"
        );
        // #dlog_params.
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 0 /d - 0 local 2 1 async 2 0 /r core 3 8 nosync").to_string(),
            "slink 1 device 0: #dlog_params: expected a count of at most 2 (the parameters left), \
             found \"3\" (#dlog_params 3 counts more parameters than there are)"
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 0 /d - 0 local 2 1 async 2 0 /r core 1 8 nosync").to_string(),
            "slink entry 3: unknown SLINK type \"nosync\" (expected local|blockdev|net|s3)"
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 0 /d - 0 local 2 1 async 2 0 /r core 3 8 nosync x").to_string(),
            "slink 1 device 0: #dlog_params: expected 1 or 2 (<region_sectors> [sync|nosync]), found \"3\""
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 0 /d - 0 local 2 1 async 2 0 /r disk 1 8").to_string(),
            "slink 1 device 0: #dlog_params: expected 2 or 3 (<path> <region_sectors> [sync|nosync]), found \"1\""
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 0 /d nolog 1 x").to_string(),
            "slink 0 device 0: #dlog_params: expected 0, found \"1\""
        );
    }

    const LD: &str = "default 2 /l 0 local 2 0 async 2 0 /d - 0";

    #[test]
    fn dirty_logs() {
        let d = |s: &str| {
            rep(&format!("{LD} local 2 1 async 2 0 /r {s}")).map(|r| r.devices[0].replicas[1].dirty_log.clone())
        };
        assert_eq!(d("core 1 8").unwrap(), DirtyLogSpec::Core { region_sectors: 8, sync: true });
        assert_eq!(d("core 2 1024 sync").unwrap(), DirtyLogSpec::Core { region_sectors: 1024, sync: true });
        assert_eq!(
            d("disk 3 /dl 16 nosync").unwrap(),
            DirtyLogSpec::Disk { path: "/dl".into(), region_sectors: 16, sync: false }
        );
        assert_eq!(
            d("disk 2 /dl 16").unwrap(),
            DirtyLogSpec::Disk { path: "/dl".into(), region_sectors: 16, sync: true }
        );
        let cases: &[(&str, &str)] = &[
            ("core 1 4", "slink 1 device 0: region_sectors: expected a power of two >= 8 (sectors), found \"4\""),
            ("core 1 24", "slink 1 device 0: region_sectors: expected a power of two >= 8 (sectors), found \"24\""),
            ("core 1 0", "slink 1 device 0: region_sectors: expected a power of two >= 8 (sectors), found \"0\""),
            ("core 2 8 maybe", "slink 1 device 0: unknown dirty log flag \"maybe\" (expected sync|nosync)"),
            ("mirror 0", "slink 1 device 0: unknown dirty log type \"mirror\" (expected -|nolog|core|disk)"),
            ("- 0", "slink 1 device 0: a remote device needs a dirty log (core or disk), found \"-\""),
            ("nolog 0", "slink 1 device 0: a remote device needs a dirty log (core or disk), found \"-\""),
            ("", "slink 1 device 0: dlog_type: expected a dirty log type (-|nolog|core|disk), found end of parameters"),
        ];
        for (args, msg) in cases {
            assert_eq!(d(args).unwrap_err().to_string(), *msg, "{args}");
        }
        // SLINK 0 with a dirty log.
        assert_eq!(
            rep_err("default 2 /l 0 local 2 0 async 2 0 /d core 1 8").to_string(),
            "slink 0 device 0: a local device takes no dirty log (\"-\" or \"nolog\"), found \"core\""
        );
        assert_eq!(
            rep_err("default 2 /l 0 local 2 0 async 2 0 /d disk 2 /x 8"),
            ReplicatorTableError::LocalDirtyLog { dev_nr: 0, found: "disk" }
        );
        // nolog is an alias of -.
        let spec = rep("default 2 /l 0 local 2 0 async 2 0 /d nolog 0").unwrap();
        assert_eq!(spec.devices[0].replicas[0].dirty_log, DirtyLogSpec::None);
    }

    #[test]
    fn group_rules() {
        assert_eq!(rep_err("default 2 /l 0 local 2 1 async 2 0 /r core 1 8"), ReplicatorTableError::MissingSlink0);
        assert_eq!(
            rep_err("default 2 /l 0 local 2 1 async 2 0 /r core 1 8").to_string(),
            "no slink 0: the site link of the local devices (slink 0) must be defined"
        );
        assert_eq!(
            rep_err(&format!("{LD} local 2 1 async 2 1 /r core 1 8")).to_string(),
            "device 1: no local device on slink 0 (every dev_nr needs its LD on slink 0)"
        );
        assert_eq!(
            rep_err(&format!("{LD} local 2 1 async 2 0 /r core 1 8 local 2 1 async 2 0 /s core 1 8")).to_string(),
            "slink 1 device 0: defined twice"
        );
        assert_eq!(
            rep_err(&format!("{LD} local 2 0 async 2 0 /e - 0")),
            ReplicatorTableError::DuplicateReplica { slink: 0, dev_nr: 0 }
        );
        assert_eq!(
            rep_err(&format!("{LD} local 2 1 async 2 0 /r core 1 8 local 2 2 async 2 0 /s core 1 16")).to_string(),
            "device 0: slink 2: region size 16 sectors differs from 8 sectors on slink 1 (all \
             remote devices of one device need the same region size)"
        );
        // Region sizes may differ between devices.
        rep(&format!(
            "{LD} local 2 0 async 2 1 /e - 0 local 2 1 async 2 0 /r core 1 8 \
                      local 2 1 async 2 1 /s core 1 16"
        ))
        .unwrap();
        assert_eq!(
            rep_err(&format!("{LD} local 2 1 async 2 0 /r core 1 8 local 3 1 async ios=1 2 1 /s core 1 8")).to_string(),
            "slink 1: its entries disagree on fall-behind: \"\", then \"ios=1\" (every entry of one \
             SLINK must repeat the same type, policy and fall-behind)"
        );
        assert!(matches!(
            rep_err(&format!("{LD} local 2 1 async 2 0 /r core 1 8 net 2 1 async 2 1 /s core 1 8")),
            ReplicatorTableError::SlinkConflict { slink: 1, what: "type", .. }
        ));
        assert!(matches!(
            rep_err(&format!("{LD} net 3 1 async a=1 2 0 /r core 1 8 net 3 1 async a=2 2 1 /s core 1 8")),
            ReplicatorTableError::SlinkConflict { slink: 1, what: "transport parameters", .. }
        ));
        // Aliases agree with their canonical names.
        rep(&format!(
            "{LD} local 2 1 async 2 0 /r core 1 8 blockdev 2 1 asynchronous 2 1 /s core 1 8 \
                      blockdev 2 0 asyn 2 1 /e - 0"
        ))
        .unwrap();
        assert_eq!(
            rep_err("default 2 /l 0 local 1 0 2 x /d - 0").to_string(),
            "slink 0: dev_nr: expected a device number 0..=4294967295, found \"x\""
        );
    }

    #[test]
    fn slink_numbers_stop_below_the_logs_limit() {
        // R11: the grammar and the replication log share one limit (replog::MAX_SLINKS),
        // so SLINK 2048 is refused by the parser, not after the log was created.
        let line = |nr: u32| format!("default 2 /l 0 local 2 0 async 2 0 /l0 - 0 local 2 {nr} async 2 0 /r core 1 8");
        let spec = rep(&line(2047)).unwrap();
        assert_eq!(spec.slinks[1].nr, 2047);
        assert_round_trip(&spec);
        assert_eq!(
            rep_err(&line(2048)).to_string(),
            "slink entry 2: slink_nr: expected an SLINK number below 2048 (0..=2047), found \"2048\""
        );
        // The same for the device-entry form and for specs built in code.
        assert!(dev("grp 0 0 1 /a - 0 2048 1 /b core 1 8").unwrap_err().to_string().contains("below 2048"));
        let mut s = spec.clone();
        s.slinks[1].nr = MAX_SLINKS as SlinkNr;
        s.devices[0].replicas[1].slink_nr = MAX_SLINKS as SlinkNr;
        assert!(s.validate().unwrap_err().to_string().contains("below 2048"));
    }

    #[test]
    fn validate_code_built_specs() {
        let good = parse_replicator(&table_args(PAPER_3)).unwrap();
        good.validate().unwrap();
        let mut s = good.clone();
        s.slinks.push(local(5, asynchronous(), None));
        assert_eq!(s.validate(), Err(ReplicatorTableError::SlinkWithoutDevice { slink: 5 }));
        let mut s = good.clone();
        s.slinks.push(local(1, asynchronous(), None));
        assert_eq!(s.validate(), Err(ReplicatorTableError::DuplicateSlink { slink: 1 }));
        let mut s = good.clone();
        s.devices.push(s.devices[0].clone());
        assert_eq!(s.validate(), Err(ReplicatorTableError::DuplicateDevice { dev_nr: 0 }));
        let mut s = good.clone();
        s.devices[0].replicas.push(rd(7, "/x", 2048, true));
        assert_eq!(s.validate(), Err(ReplicatorTableError::UndefinedSlink { slink: 7, dev_nr: 0 }));
        let mut s = good.clone();
        s.slinks[1].kind = SlinkKind::Net { params: vec!["ios".into()] };
        let e = s.validate().unwrap_err();
        assert!(matches!(e, ReplicatorTableError::Invalid { ref field, .. } if field == "transport parameter"), "{e}");
        s.slinks[1].kind = SlinkKind::Net { params: vec!["a=b".into(), "".into()] };
        assert!(s.validate().is_err());
        let mut s = good;
        s.slinks[0].fallbehind.ios = Some(1);
        s.slinks[0].policy = Policy::default();
        assert!(matches!(s.validate(), Err(ReplicatorTableError::SyncWithFallBehind { slink: 0, .. })));
    }

    // Property tests.

    fn arb_path() -> impl Strategy<Value = String> {
        "/[a-z0-9._-]{1,8}(/[a-z0-9_]{1,6}){0,2}"
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (any::<bool>(), any::<bool>())
            .prop_map(|(a, stall)| Policy { mode: if a { Mode::Asynchronous } else { Mode::Synchronous }, stall })
    }

    fn arb_fallbehind() -> impl Strategy<Value = FallBehind> {
        (
            prop::option::of(1u64..1_000_000),
            prop::option::of(prop_oneof![
                (1u64..100_000).prop_map(|n| n * 512),
                (1u64..1000).prop_map(|n| n << 30),
                Just(1u64 << 40),
            ]),
            prop::option::of(prop_oneof![1u64..10_000_000, (1u64..100).prop_map(|h| h * 3_600_000)]),
        )
            .prop_map(|(ios, size_bytes, timeout_ms)| FallBehind { ios, size_bytes, timeout_ms })
    }

    fn arb_transport() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec("[a-z]{1,6}=[a-z0-9:.]{0,8}", 0..3).prop_filter("threshold-like", |v| {
            !v.iter().any(|t| ["ios=", "size=", "timeout="].iter().any(|p| t.starts_with(p)))
        })
    }

    fn arb_slink_body() -> impl Strategy<Value = (SlinkKind, Policy, FallBehind)> {
        (prop_oneof![Just(0u8), Just(1u8), Just(2u8)], arb_transport(), arb_policy(), arb_fallbehind()).prop_map(
            |(k, params, policy, fb)| {
                let kind = match k {
                    0 => SlinkKind::Local,
                    1 => SlinkKind::Net { params },
                    _ => SlinkKind::S3 { params },
                };
                let fb = if policy.mode == Mode::Synchronous { FallBehind::default() } else { fb };
                (kind, policy, fb)
            },
        )
    }

    fn arb_log() -> impl Strategy<Value = LogSpec> {
        (arb_path(), any::<u64>(), 0u8..3, prop::option::of(1u64..u64::MAX), 0u8..3).prop_map(
            |(path, start_sector, m, size, r)| {
                let open_mode = [OpenMode::Auto, OpenMode::Open, OpenMode::Create][m as usize];
                LogSpec {
                    kind: LogKind::Default,
                    path,
                    start_sector,
                    open_mode,
                    size_sectors: if open_mode == OpenMode::Open { None } else { size },
                    role: [None, Some(crate::replog::SiteRole::Primary), Some(crate::replog::SiteRole::Secondary)]
                        [r as usize],
                }
            },
        )
    }

    /// Valid specs in either form, already in canonical (sorted) order.
    fn arb_spec() -> impl Strategy<Value = ReplicatorSpec> {
        (
            arb_log(),
            prop::collection::btree_set(1..MAX_SLINKS as SlinkNr, 0..4),
            prop::collection::vec(arb_slink_body(), 5),
            any::<bool>(),
            prop::collection::btree_set(any::<u32>(), 1..4),
            prop::collection::vec(prop::collection::vec(any::<bool>(), 4), 4),
            prop::collection::vec((arb_path(), any::<bool>(), arb_path(), any::<bool>()), 20),
            prop::collection::vec(3u32..24, 4),
        )
            .prop_map(|(log, remote, bodies, control, dev_nrs, masks, dlogs, regions)| {
                let nrs: Vec<SlinkNr> = std::iter::once(0).chain(remote).collect();
                let slinks: Vec<SlinkSpec> = nrs
                    .iter()
                    .zip(bodies)
                    .map(|(&nr, (kind, policy, fallbehind))| SlinkSpec {
                        nr,
                        kind,
                        policy,
                        fallbehind,
                        resync_snapshot: false,
                    })
                    .collect();
                let mut devices = Vec::new();
                if !control {
                    let mut used = vec![false; nrs.len()];
                    for (d, &dev_nr) in dev_nrs.iter().enumerate() {
                        let region_sectors = 1u64 << regions[d];
                        let mut replicas = Vec::new();
                        for (s, &nr) in nrs.iter().enumerate() {
                            let last = d == dev_nrs.len() - 1;
                            if !(s == 0 || masks[d][s - 1] || (last && !used[s])) {
                                continue;
                            }
                            used[s] = true;
                            let (path, disk, dl_path, sync) = dlogs[d * 5 + s].clone();
                            let dirty_log = match (nr, disk) {
                                (0, _) => DirtyLogSpec::None,
                                (_, false) => DirtyLogSpec::Core { region_sectors, sync },
                                (_, true) => DirtyLogSpec::Disk { path: dl_path, region_sectors, sync },
                            };
                            replicas.push(ReplicaSpec { slink_nr: nr, path, dirty_log });
                        }
                        devices.push(DeviceSpec { dev_nr, replicas });
                    }
                }
                ReplicatorSpec { log, slinks, devices }
            })
    }

    fn arb_dev_spec() -> impl Strategy<Value = ReplicatorDevSpec> {
        (
            "[a-z0-9_-]{1,10}",
            any::<u32>(),
            prop::collection::btree_set(1..MAX_SLINKS as SlinkNr, 0..4),
            prop::collection::vec((arb_path(), any::<bool>(), arb_path(), any::<bool>()), 5),
            3u32..24,
        )
            .prop_map(|(control, dev_nr, remote, dlogs, region)| {
                let replicas = std::iter::once(0)
                    .chain(remote)
                    .zip(dlogs)
                    .map(|(nr, (path, disk, dl_path, sync))| {
                        let region_sectors = 1u64 << region;
                        let dirty_log = match (nr, disk) {
                            (0, _) => DirtyLogSpec::None,
                            (_, false) => DirtyLogSpec::Core { region_sectors, sync },
                            (_, true) => DirtyLogSpec::Disk { path: dl_path, region_sectors, sync },
                        };
                        ReplicaSpec { slink_nr: nr, path, dirty_log }
                    })
                    .collect();
                ReplicatorDevSpec { control, dev_nr, replicas }
            })
    }

    /// Tokens that look like replicator parameters, to reach deep error paths.
    fn arb_tokens() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(
            prop_oneof![
                "[0-9]{1,3}",
                Just("0".to_string()),
                Just("1".to_string()),
                Just("2".to_string()),
                prop::sample::select(vec![
                    "default",
                    "ringbuffer",
                    "local",
                    "blockdev",
                    "net",
                    "s3",
                    "auto",
                    "open",
                    "create",
                    "async",
                    "sync",
                    "asynchronous+stall",
                    "ios",
                    "size",
                    "timeout",
                    "ios=1",
                    "size=1k",
                    "timeout=1s",
                    "-",
                    "nolog",
                    "core",
                    "disk",
                    "nosync",
                    "/dev/x",
                    "18446744073709551616",
                    "",
                ])
                .prop_map(String::from),
                "\\PC{0,6}",
            ],
            0..40,
        )
    }

    proptest! {
        #[test]
        fn spec_round_trip(spec in arb_spec()) {
            prop_assert_eq!(spec.validate(), Ok(()));
            let args = spec.to_args();
            prop_assert_eq!(parse_replicator(&args).unwrap(), spec.clone());
            // Through a table line as well.
            let t = parse_table(&format!("0 8 replicator {spec}")).unwrap();
            prop_assert_eq!(parse_replicator(&t.segments[0].args).unwrap(), spec);
        }

        #[test]
        fn dev_spec_round_trip(spec in arb_dev_spec()) {
            prop_assert_eq!(spec.validate(), Ok(()));
            prop_assert_eq!(parse_replicator_dev(&spec.to_args()).unwrap(), spec.clone());
            let t = parse_table(&format!("0 8 replicator-dev {spec}")).unwrap();
            prop_assert_eq!(parse_replicator_dev(&t.segments[0].args).unwrap(), spec);
        }

        #[test]
        fn garbage_never_panics(tokens in arb_tokens()) {
            if let Ok(spec) = parse_replicator(&tokens) {
                prop_assert_eq!(parse_replicator(&spec.to_args()).unwrap(), spec);
            }
            if let Ok(spec) = parse_replicator_dev(&tokens) {
                prop_assert_eq!(parse_replicator_dev(&spec.to_args()).unwrap(), spec);
            }
        }

        #[test]
        fn mutated_specs_never_panic(spec in arb_spec(), at in any::<prop::sample::Index>(),
                                     tok in "\\PC{0,6}", delete in any::<bool>()) {
            let mut args = spec.to_args();
            let i = at.index(args.len());
            if delete { args.remove(i); } else { args[i] = tok; }
            if let Ok(spec) = parse_replicator(&args) {
                prop_assert_eq!(parse_replicator(&spec.to_args()).unwrap(), spec);
            }
        }
    }
}
