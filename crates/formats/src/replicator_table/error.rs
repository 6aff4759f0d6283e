//! Why replicator parameters were rejected.

use crate::replog::SlinkNr;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why replicator parameters were rejected. Every message names where (`replication
/// log`, `slink 1`, `slink 1 device 0`, ...) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicatorTableError {
    /// A parameter is missing or malformed, or a count does not match.
    #[error("{context}: {field}: expected {expected}, found {found}{}", note_suffix(.note))]
    Invalid {
        context: String,
        field: String,
        expected: String,
        /// The offending token, quoted, or a phrase such as `end of parameters`.
        found: String,
        note: Option<String>,
    },
    /// A keyword that is not one of the known ones.
    #[error("{context}: unknown {what} {found:?} (expected {expected})")]
    Unknown { context: String, what: &'static str, found: String, expected: &'static str },
    #[error("no slink 0: the site link of the local devices (slink 0) must be defined")]
    MissingSlink0,
    #[error(
        "slink 0 device {dev_nr}: a local device takes no dirty log (\"-\" or \"nolog\"), \
         found {found:?}"
    )]
    LocalDirtyLog { dev_nr: u32, found: &'static str },
    #[error(
        "slink {slink} device {dev_nr}: a remote device needs a dirty log (core or disk), \
         found \"-\""
    )]
    MissingDirtyLog { slink: SlinkNr, dev_nr: u32 },
    #[error("device {dev_nr}: no local device on slink 0 (every dev_nr needs its LD on slink 0)")]
    NoLocalDevice { dev_nr: u32 },
    #[error("slink {slink} device {dev_nr}: defined twice")]
    DuplicateReplica { slink: SlinkNr, dev_nr: u32 },
    #[error("device {dev_nr}: defined twice")]
    DuplicateDevice { dev_nr: u32 },
    #[error("slink {slink}: defined twice")]
    DuplicateSlink { slink: SlinkNr },
    #[error("slink {slink} device {dev_nr}: slink {slink} is not defined")]
    UndefinedSlink { slink: SlinkNr, dev_nr: u32 },
    #[error(
        "slink {slink}: carries no device (in the one-line form every SLINK is given \
         with the devices it carries)"
    )]
    SlinkWithoutDevice { slink: SlinkNr },
    #[error(
        "device {dev_nr}: slink {slink}: region size {found} sectors differs from \
         {expected} sectors on slink {first_slink} (all remote devices of one device \
         need the same region size)"
    )]
    RegionSizeMismatch { dev_nr: u32, slink: SlinkNr, found: u64, first_slink: SlinkNr, expected: u64 },
    #[error(
        "slink {slink}: its entries disagree on {what}: {first:?}, then {found:?} (every \
         entry of one SLINK must repeat the same type, policy and fall-behind)"
    )]
    SlinkConflict { slink: SlinkNr, what: &'static str, first: String, found: String },
    #[error(
        "slink {slink}: a synchronous SLINK takes no fall-behind threshold, found {found:?} \
         (make it asynchronous)"
    )]
    SyncWithFallBehind { slink: SlinkNr, found: String },
}

pub(super) fn note_suffix(note: &Option<String>) -> String {
    note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
}

pub(super) fn invalid(
    context: impl Into<String>,
    field: impl Into<String>,
    expected: impl Into<String>,
    found: Option<&str>,
) -> ReplicatorTableError {
    ReplicatorTableError::Invalid {
        context: context.into(),
        field: field.into(),
        expected: expected.into(),
        found: match found {
            Some(t) => format!("{t:?}"),
            None => "end of parameters".into(),
        },
        note: None,
    }
}

pub(super) fn with_note(e: ReplicatorTableError, n: impl Into<String>) -> ReplicatorTableError {
    match e {
        ReplicatorTableError::Invalid { context, field, expected, found, .. } => {
            ReplicatorTableError::Invalid { context, field, expected, found, note: Some(n.into()) }
        }
        other => other,
    }
}

pub(super) fn unknown(
    context: impl Into<String>,
    what: &'static str,
    found: &str,
    expected: &'static str,
) -> ReplicatorTableError {
    ReplicatorTableError::Unknown { context: context.into(), what, found: found.to_string(), expected }
}
