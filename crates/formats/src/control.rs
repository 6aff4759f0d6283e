//! The control protocol between `dmrep` (the CLI) and `dmrep daemon`.
//!
//! Transport: a Unix stream socket (mode 0600). Framing: one JSON object per line
//! (UTF-8, `\n`-terminated), at most [`MAX_FRAME`] bytes. Every request line is a
//! [`RequestFrame`] carrying the protocol version; the daemon answers each with one
//! [`ResponseFrame`] line. A version the daemon does not speak gets
//! [`Response::Error`] naming both versions.
//!
//! Versions (one line per version, what changed):
//! - 1: first version.
//! - 2: `timeout_ms` on suspend and resume (a suspend that cannot drain gives up);
//!   devices in state `unavailable` (recorded, not restored) with a `reason`;
//!   `read_only` on create and in info.
//! - 3: `events` request and answer.
//! - 4: `snapshots` and `snapshot_delete` requests, `snapshots` answer (group-consistent
//!   snapshots).

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest accepted line: a table of a few thousand segments fits in 1 MiB; more is
/// a runaway client.
pub const MAX_FRAME: usize = 1 << 20;

/// One request line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestFrame {
    pub version: u32,
    pub request: Request,
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseFrame {
    pub version: u32,
    pub response: Response,
}

/// Everything the CLI can ask. One enum shared by the daemon and the CLI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and versions.
    Version,
    /// Create a device, load `table` and resume it.
    Create {
        name: String,
        table: String,
        uuid: Option<String>,
        /// Writes fail with EPERM; NBD advertises the export read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// Load `table` as the inactive table of an existing device.
    Load {
        name: String,
        table: String,
    },
    /// Drop the inactive table.
    Clear {
        name: String,
    },
    /// Hold new I/O and wait for in-flight I/O, at most `timeout_ms` (default: the
    /// daemon's); a device that does not drain in time is active again and it is an error.
    Suspend {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Swap in the inactive table (if any; waiting at most `timeout_ms` for in-flight
    /// I/O first) and release held I/O.
    Resume {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    Remove {
        name: String,
        force: bool,
    },
    Rename {
        name: String,
        new_name: String,
    },
    /// Status of one device or, with `None`, of all.
    Status {
        name: Option<String>,
    },
    /// Table of one device or all; `inactive` for the loaded, not yet active one.
    Table {
        name: Option<String>,
        inactive: bool,
    },
    Info {
        name: Option<String>,
    },
    List,
    /// A message to the target of the segment holding `sector`.
    Message {
        name: String,
        sector: u64,
        args: Vec<String>,
    },
    /// The events after seq `after` (waiting up to `wait_ms` for one); with `now`, the
    /// current state as `exists` events first, and events from then on.
    Events {
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        wait_ms: u64,
        #[serde(default)]
        now: bool,
    },
    /// The group-consistent snapshots at this site (of group `group`, or all).
    Snapshots {
        #[serde(default)]
        group: Option<String>,
    },
    /// Remove a group-consistent snapshot: its devices and its COW files.
    SnapshotDelete {
        group: String,
        name: String,
    },
}

/// The daemon's answers (see also [`Request::Snapshots`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Error {
        message: String,
    },
    Version {
        daemon: String,
        protocol: u32,
    },
    Infos {
        devices: Vec<DeviceInfo>,
    },
    Tables {
        tables: Vec<DeviceTable>,
    },
    Statuses {
        devices: Vec<DeviceStatus>,
    },
    /// A target's reply to a message.
    Reply {
        text: String,
    },
    /// Events (JSON objects, see `dmrep_core::events`); `lost`: events the reader missed
    /// (it fell further behind than the daemon keeps); ask after `last` next time.
    Events {
        events: Vec<serde_json::Value>,
        lost: u64,
        last: u64,
    },
    Snapshots {
        snapshots: Vec<GroupSnapshot>,
    },
}

/// A group-consistent snapshot at this site: one snapshot device per device of the
/// group, together the group's state after exactly the writes before seq `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub group: String,
    pub name: String,
    /// Its place in the group's history: every write before this seq, none after.
    pub seq: u64,
    /// When the primary logged the marker, microseconds since the Unix epoch.
    pub time_us: u64,
    /// When this site took it, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The SLINK whose devices it is of (0: this site's own devices).
    pub slink: u16,
    pub devices: Vec<SnapshotDevice>,
}

/// One device of a [`GroupSnapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDevice {
    pub dev_nr: u32,
    /// The mapped device that serves it (over NBD too).
    pub device: String,
    /// The group's device it is a snapshot of.
    pub origin: String,
    /// Its copy-on-write store.
    pub cow: String,
    /// `valid`, `invalid` (its COW store filled up or failed) or `missing` (no device).
    pub state: String,
    /// Bytes of the COW store in use.
    pub used_bytes: u64,
}

/// Device state as dmsetup shows it, plus `Unavailable`: a device the daemon has
/// recorded but could not bring back at start-up (its `reason` says why). It holds no
/// table and serves nothing; `remove` forgets it, `resume` tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Active,
    Suspended,
    Unavailable,
}

/// What `dmrep info` shows of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub uuid: String,
    pub state: DeviceState,
    pub open_count: u32,
    pub segments: usize,
    pub size_bytes: u64,
    pub size_sectors: u64,
    pub live_table: bool,
    pub inactive_table: bool,
    /// Writes are refused (EPERM).
    #[serde(default)]
    pub read_only: bool,
    /// Why an `unavailable` device is not there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A device's table as text (canonical form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTable {
    pub name: String,
    pub table: String,
}

/// Status of one segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentStatus {
    pub start: u64,
    pub len: u64,
    pub target: String,
    /// The dmsetup-style status line of the target.
    pub line: String,
    /// The same facts, structured.
    pub detail: serde_json::Value,
}

/// Status of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub state: DeviceState,
    pub segments: Vec<SegmentStatus>,
    /// Why an `unavailable` device is not there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control frame is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("control protocol version {got} not supported (this side speaks {PROTOCOL_VERSION})")]
    Version { got: u32 },
}

/// Encode one frame as a JSON line.
pub fn encode<T: Serialize>(frame: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(frame).expect("control frames always serialise");
    v.push(b'\n');
    v
}

/// Decode a request line, checking the version.
pub fn decode_request(line: &[u8]) -> Result<Request, FrameError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let v: VersionOnly = serde_json::from_slice(line)?;
    if v.version != PROTOCOL_VERSION {
        return Err(FrameError::Version { got: v.version });
    }
    Ok(serde_json::from_slice::<RequestFrame>(line)?.request)
}

/// Decode a response line, checking the version.
pub fn decode_response(line: &[u8]) -> Result<Response, FrameError> {
    let f: ResponseFrame = serde_json::from_slice(line)?;
    if f.version != PROTOCOL_VERSION {
        return Err(FrameError::Version { got: f.version });
    }
    Ok(f.response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request::Message { name: "r0".into(), sector: 0, args: vec!["stop".into()] };
        let line = encode(&RequestFrame { version: PROTOCOL_VERSION, request: r.clone() });
        assert_eq!(decode_request(&line[..line.len() - 1]).unwrap(), r);
    }

    #[test]
    fn wrong_version_is_named() {
        let e = decode_request(br#"{"version":9,"request":{"op":"list"}}"#).unwrap_err();
        assert!(e.to_string().contains("version 9"));
        assert!(decode_request(b"garbage").is_err());
    }
}
