//! Markers: points in a group's history that a site acts on.
//!
//! A marker is one entry of the group's log (record kind 5, see
//! [`dmrep_formats::replog::RecordKind::Marker`]) that changes no device. It is appended
//! after every write queued before it, so the writes before it in the log are exactly
//! the writes acknowledged before it was asked for, plus some that were in flight: a
//! prefix of the group's history across all its devices. It travels like any entry: to
//! each SLINK in ordered mode, over the network to secondary sites, into their logs.
//!
//! The site a marker names acts when its copier reaches it: everything before the marker
//! is durable on that site's devices and nothing after it has been applied. The copier
//! then calls the group's [`MarkerHook`] (the daemon's: it snapshots every device of the
//! group there) and goes on applying. A group-consistent snapshot is the one use today.
//!
//! The description is JSON (at most [`MAX_MARKER_DATA`] bytes), version 1:
//! `{"v":1,"action":"snapshot","name":"NAME","slink":N,"site":SITE|null}`:
//! - `site` null: the primary's own SLINK `slink` acts (0: its LDs; a local SLINK: its
//!   RDs). Secondary sites ignore the marker.
//! - `site` a name: SLINK 0 of that site acts (its devices), when it is a secondary and
//!   its name is `site` (the hook knows the site's name). Others ignore it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dmrep_formats::replog::MAX_MARKER_DATA;
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

/// The description's format version.
pub const MARKER_VERSION: u32 = 1;

/// What a site does at a marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkerAction {
    /// Snapshot every device of the group at the site (a group-consistent snapshot).
    Snapshot,
}

/// A marker's description (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub v: u32,
    pub action: MarkerAction,
    /// The operator's name for what the marker makes (the snapshot's name).
    pub name: String,
    /// The SLINK that acts at the primary (`site` null), or 0.
    pub slink: u16,
    /// The secondary site that acts, if not the primary.
    pub site: Option<String>,
}

impl Marker {
    pub fn snapshot(name: &str, slink: u16, site: Option<String>) -> Marker {
        Marker { v: MARKER_VERSION, action: MarkerAction::Snapshot, name: name.to_string(), slink, site }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker serialises")
    }

    pub fn decode(b: &[u8]) -> Result<Marker, String> {
        if b.len() > MAX_MARKER_DATA as usize {
            return Err(format!("marker of {} bytes (at most {MAX_MARKER_DATA})", b.len()));
        }
        let m: Marker = serde_json::from_slice(b).map_err(|e| format!("marker description: {e}"))?;
        if m.v != MARKER_VERSION {
            return Err(format!("marker version {} (this build reads {MARKER_VERSION})", m.v));
        }
        Ok(m)
    }

    /// Whether SLINK `slink`'s copier of a site that is `secondary` acts on it (a named
    /// site also checks its name, in the hook).
    pub fn acts_at(&self, slink: u16, secondary: bool) -> bool {
        match &self.site {
            None => !secondary && self.slink == slink,
            Some(_) => secondary && slink == 0,
        }
    }
}

/// A snapshot name usable in a device name and a path: 1 to 64 of `A-Z a-z 0-9 _ + -`,
/// not starting with `-`.
pub fn check_snapshot_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("snapshot name {name:?}: 1 to 64 of A-Z a-z 0-9 _ + - (not starting with -)"))
    }
}

/// Where a marker was reached: what the hook needs to act.
#[derive(Debug, Clone)]
pub struct MarkerReached {
    pub group: String,
    pub marker: Marker,
    /// The SLINK whose copier reached it.
    pub slink: u16,
    /// The marker's seq in the group's history (the primary's seq).
    pub seq: u64,
    /// When the primary appended it, microseconds since the Unix epoch.
    pub time_us: u64,
    /// The devices of that SLINK: dev_nr and where it is (a path).
    pub devices: Vec<(u32, String)>,
}

/// The devices of an SLINK as a hook is told them: dev_nr and where it is.
pub(crate) fn device_paths(handler: &dyn crate::replicator::slink::SlinkHandler) -> Vec<(u32, String)> {
    handler.devices().into_iter().map(|d| (d, handler.device_path(d).unwrap_or_default())).collect()
}

/// What the hook did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum MarkerOutcome {
    /// Done: what was made (e.g. the snapshot devices).
    Done(String),
    /// Not for this site (another site's name): nothing done.
    NotHere,
    /// It failed; replication went on.
    Failed(String),
}

/// Acts on markers; the daemon's snapshots the devices. Called on the SLINK's copier
/// thread, which applies nothing meanwhile: keep it short, and never wait for the group.
pub trait MarkerHook: Send + Sync {
    fn reached(&self, at: &MarkerReached) -> MarkerOutcome;

    /// Whether this site has snapshot `name` of `group` (a resync snapshot kept across a
    /// restart). Default: no.
    fn exists(&self, _group: &str, _name: &str) -> bool {
        false
    }

    /// Drop snapshot `name` of `group` (a resync snapshot once the resync ended), in the
    /// background: never waits for the group. Default: nothing.
    fn drop_snapshot(&self, _group: &str, _name: &str) {}
}

/// The name of SLINK `slink`'s resync snapshot (its devices before a resync began).
pub fn resync_snapshot_name(slink: u16) -> String {
    format!("resync-{slink}")
}

/// Where a program publishes its hook in the device registry (`DeviceRegistry::publish`;
/// not a device name): a replicator control device gives it to its group.
pub const HOOK_KEY: &str = "/marker-hook";

/// The published hook (see [`HOOK_KEY`]).
pub struct HookSlot(pub Arc<dyn MarkerHook>);

/// Outcomes of the markers this site's copiers reached, by name (the newest few).
#[derive(Default)]
pub(crate) struct Outcomes {
    done: Mutex<BTreeMap<String, MarkerOutcome>>,
    cv: Condvar,
}

/// How many outcomes are kept.
const KEEP: usize = 256;

impl Outcomes {
    pub(crate) fn record(&self, name: &str, o: MarkerOutcome) {
        let mut d = self.done.lock();
        if d.len() >= KEEP {
            if let Some(k) = d.keys().next().cloned() {
                d.remove(&k);
            }
        }
        d.insert(name.to_string(), o);
        self.cv.notify_all();
    }

    pub(crate) fn get(&self, name: &str) -> Option<MarkerOutcome> {
        self.done.lock().get(name).cloned()
    }

    /// Forget `name` (a new marker of that name is on its way).
    pub(crate) fn forget(&self, name: &str) {
        self.done.lock().remove(name);
    }

    /// Wait (at most `timeout`) for the outcome of `name`.
    pub(crate) fn wait(&self, name: &str, timeout: Duration) -> Option<MarkerOutcome> {
        let until = std::time::Instant::now() + timeout;
        let mut d = self.done.lock();
        loop {
            if let Some(o) = d.get(name) {
                return Some(o.clone());
            }
            if self.cv.wait_until(&mut d, until).timed_out() {
                return d.get(name).cloned();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_refusals() {
        let m = Marker::snapshot("nightly", 2, None);
        assert_eq!(Marker::decode(&m.encode()).unwrap(), m);
        let mut bad = m.clone();
        bad.v = 9;
        assert!(Marker::decode(&bad.encode()).unwrap_err().contains("version 9"));
        assert!(Marker::decode(b"{").is_err());
        assert!(Marker::decode(&vec![b' '; MAX_MARKER_DATA as usize + 1]).unwrap_err().contains("bytes"));
    }

    #[test]
    fn who_acts() {
        let local = Marker::snapshot("a", 2, None);
        assert!(local.acts_at(2, false));
        assert!(!local.acts_at(0, false) && !local.acts_at(2, true) && !local.acts_at(0, true));
        let remote = Marker::snapshot("b", 0, Some("tokyo".into()));
        assert!(remote.acts_at(0, true));
        assert!(!remote.acts_at(0, false) && !remote.acts_at(1, true));
    }
}
