//! The `mirror` table, parsed into plain data before anything is opened.
//!
//! ```text
//! mirror <log type> <#log params> <log params...> <#legs> {<dev> <offset>}... [<#features> <features...>]
//!   core <#=1|2> <region_sectors> [sync|nosync]
//!   disk <#=2|3> <log_dev> <region_sectors> [sync|nosync]
//!   features: handle_errors
//! ```

use dmrep_core::TargetError;

use crate::params::number;

const T: &str = "mirror";

/// Most legs in one mirror (dm-mirror's limit too: one source and eight destinations
/// per kcopyd copy is where the kernel stops; more legs would be a typo, not a layout).
pub const MAX_LEGS: usize = 8;

/// Smallest region: 8 sectors = 4 KiB, the page size; smaller regions only make the
/// bitmap bigger and the resync slower. Regions are powers of two so a region index is
/// a shift.
pub const MIN_REGION_SECTORS: u64 = 8;

/// `sync`, `nosync` or neither in the log parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Not given: `core` starts every non-primary leg out of sync; a `disk` log is
    /// trusted (a fresh one starts all out of sync).
    Default,
    /// Copy everything from the primary leg (for `disk`: when the log is formatted now).
    Sync,
    /// Trust that the legs are equal (for `disk`: when the log is formatted now).
    NoSync,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSpec {
    Core { region_sectors: u64, sync: SyncMode },
    Disk { path: String, region_sectors: u64, sync: SyncMode },
}

impl LogSpec {
    pub fn region_sectors(&self) -> u64 {
        match self {
            LogSpec::Core { region_sectors, .. } | LogSpec::Disk { region_sectors, .. } => *region_sectors,
        }
    }

    pub fn sync(&self) -> SyncMode {
        match self {
            LogSpec::Core { sync, .. } | LogSpec::Disk { sync, .. } => *sync,
        }
    }

    /// The log's parameters as the table gives them (for the status line).
    pub fn params(&self) -> Vec<String> {
        let mut p = match self {
            LogSpec::Core { region_sectors, .. } => vec![region_sectors.to_string()],
            LogSpec::Disk { path, region_sectors, .. } => vec![path.clone(), region_sectors.to_string()],
        };
        match self.sync() {
            SyncMode::Default => {}
            SyncMode::Sync => p.push("sync".into()),
            SyncMode::NoSync => p.push("nosync".into()),
        }
        p
    }

    pub fn kind(&self) -> &'static str {
        match self {
            LogSpec::Core { .. } => "core",
            LogSpec::Disk { .. } => "disk",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegSpec {
    pub path: String,
    pub offset_sectors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSpec {
    pub log: LogSpec,
    pub legs: Vec<LegSpec>,
    pub handle_errors: bool,
}

fn err(msg: impl Into<String>) -> TargetError {
    TargetError::params(T, msg)
}

fn region(s: &str) -> Result<u64, TargetError> {
    let r = number(T, "region_sectors", s)?;
    if r < MIN_REGION_SECTORS || !r.is_power_of_two() {
        return Err(err(format!("region_sectors: expected a power of two >= {MIN_REGION_SECTORS}, found {r}")));
    }
    Ok(r)
}

fn sync_word(s: Option<&String>) -> Result<SyncMode, TargetError> {
    match s.map(String::as_str) {
        None => Ok(SyncMode::Default),
        Some("sync") => Ok(SyncMode::Sync),
        Some("nosync") => Ok(SyncMode::NoSync),
        Some(o) => Err(err(format!("log: expected sync or nosync, found {o:?}"))),
    }
}

/// Parse the segment's parameters.
pub fn parse(args: &[String]) -> Result<MirrorSpec, TargetError> {
    let usage = "<log type> <#log params> <log params...> <#legs> {<dev> <offset>}... [<#features> <features...>]";
    if args.len() < 2 {
        return Err(err(format!("expected {usage}")));
    }
    let nlog = number(T, "#log params", &args[1])? as usize;
    let lp = args.get(2..2 + nlog).ok_or_else(|| err(format!("{nlog} log parameters announced, fewer given")))?;
    let log = match args[0].as_str() {
        "core" => {
            if !(1..=2).contains(&nlog) {
                return Err(err(format!(
                    "core log: expected 1 or 2 parameters (<region_sectors> [sync|nosync]), found {nlog}"
                )));
            }
            LogSpec::Core { region_sectors: region(&lp[0])?, sync: sync_word(lp.get(1))? }
        }
        "disk" => {
            if !(2..=3).contains(&nlog) {
                return Err(err(format!(
                    "disk log: expected 2 or 3 parameters (<log_dev> <region_sectors> [sync|nosync]), found {nlog}"
                )));
            }
            LogSpec::Disk { path: lp[0].clone(), region_sectors: region(&lp[1])?, sync: sync_word(lp.get(2))? }
        }
        o => return Err(err(format!("unknown log type {o:?} (expected core or disk)"))),
    };
    let rest = &args[2 + nlog..];
    let n = number(T, "#legs", rest.first().ok_or_else(|| err("missing <#legs>"))?)? as usize;
    if n == 0 || n > MAX_LEGS {
        return Err(err(format!("#legs: expected 1..={MAX_LEGS}, found {n}")));
    }
    let legs_args =
        rest.get(1..1 + 2 * n).ok_or_else(|| err(format!("{n} legs announced, fewer <dev> <offset> given")))?;
    let legs = legs_args
        .chunks(2)
        .enumerate()
        .map(|(i, p)| Ok(LegSpec { path: p[0].clone(), offset_sectors: number(T, &format!("leg {i} offset"), &p[1])? }))
        .collect::<Result<Vec<_>, TargetError>>()?;
    let feats = &rest[1 + 2 * n..];
    let mut handle_errors = false;
    if let Some((count, words)) = feats.split_first() {
        let k = number(T, "#features", count)? as usize;
        if k != words.len() {
            return Err(err(format!("{k} features announced, {} given", words.len())));
        }
        for w in words {
            match w.as_str() {
                "handle_errors" => handle_errors = true,
                o => return Err(err(format!("unknown feature {o:?} (known: handle_errors)"))),
            }
        }
    }
    Ok(MirrorSpec { log, legs, handle_errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<MirrorSpec, String> {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>()).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_the_kernel_forms() {
        let s = p("core 1 1024 2 /a 0 /b 8").unwrap();
        assert_eq!(s.log, LogSpec::Core { region_sectors: 1024, sync: SyncMode::Default });
        assert_eq!(s.legs[1], LegSpec { path: "/b".into(), offset_sectors: 8 });
        assert!(!s.handle_errors);
        let s = p("disk 3 /log 2048 nosync 3 /a 0 /b 0 /c 0 1 handle_errors").unwrap();
        assert_eq!(s.log, LogSpec::Disk { path: "/log".into(), region_sectors: 2048, sync: SyncMode::NoSync });
        assert_eq!(s.legs.len(), 3);
        assert!(s.handle_errors);
        assert_eq!(s.log.params(), ["/log", "2048", "nosync"]);
        assert!(p("core 2 1024 sync 2 /a 0 /b 0 0").is_ok());
    }

    #[test]
    fn names_what_is_wrong() {
        let e = |s| p(s).unwrap_err();
        assert!(e("core 1 1000 2 /a 0 /b 0").contains("power of two"));
        assert!(e("core 2 1024 maybe 2 /a 0 /b 0").contains("\"maybe\""));
        assert!(e("ram 1 1024 2 /a 0 /b 0").contains("unknown log type \"ram\""));
        assert!(e("core 3 1024 2 /a 0 /b 0").contains("core log: expected 1 or 2"));
        assert!(e("disk 1 1024 2 /a 0 /b 0").contains("disk log: expected 2 or 3"));
        assert!(e("core 1 1024 3 /a 0 /b 0").contains("3 legs announced"));
        assert!(e("core 1 1024 9 /a 0").contains("#legs"));
        assert!(e("core 1 1024 2 /a 0 /b x").contains("leg 1 offset"));
        assert!(e("core 1 1024 2 /a 0 /b 0 1 keep_log").contains("unknown feature \"keep_log\""));
        assert!(e("core 1 1024 2 /a 0 /b 0 2 handle_errors").contains("2 features announced"));
        assert!(e("core 5").contains("5 log parameters"));
    }
}
