//! Group-consistent snapshots at a site: the group puts a marker into its log, and the
//! site it names snapshots every device when its copier reaches it (see
//! [`crate::replicator::marker`]).

use std::sync::Arc;
use std::time::Duration;

use dmrep_core::device::WaitSink;
use dmrep_core::Completion;
use serde::Serialize;

use tracing::{info, warn};

use super::machine::Event;
use super::{Group, GroupError, Inner, Seq, SlinkNr};
use crate::replicator::marker::{resync_snapshot_name, Marker, MarkerHook, MarkerOutcome, MarkerReached};

/// Where a snapshot marker was placed.
#[derive(Debug, Clone, Serialize)]
pub struct MarkerPlaced {
    pub name: String,
    /// Its seq in the group's history: the snapshot holds every write before it.
    pub seq: Seq,
    pub slink: SlinkNr,
    /// The secondary site that takes the snapshot (none: this site, SLINK `slink`).
    pub site: Option<String>,
}

impl Group {
    /// Ask for a group-consistent snapshot named `name` of SLINK `slink`'s devices (0: the
    /// LDs here; a local SLINK: its RDs; a site link: that site's devices). Returns once
    /// the marker is durable in the log; the site takes the snapshot when it has applied
    /// everything before it (see [`Group::marker_outcome`]).
    pub fn snapshot_marker(&self, name: &str, slink: SlinkNr) -> Result<MarkerPlaced, GroupError> {
        let refuse = |why: String| Err(GroupError::Role(format!("snapshot {name}: {why}")));
        if let Err(why) = crate::replicator::marker::check_snapshot_name(name) {
            return Err(GroupError::Role(why));
        }
        let (site, ordered) = {
            let m = self.inner.m.lock();
            if m.secondary {
                return refuse("this site is a secondary: ask the primary, naming this site's slink".into());
            }
            let Some(rt) = m.slinks.get(&slink) else { return Err(GroupError::NoSlink(slink)) };
            let site = match (slink, rt.handler.kind()) {
                (0, _) | (_, "local") => None,
                (_, kind) => match rt.handler.peer_site() {
                    Some(s) => Some(s),
                    None => return refuse(format!("slink {slink} ({kind}) reaches no dmrep site")),
                },
            };
            (site, rt.ordered && !rt.leaving())
        };
        if !ordered {
            return refuse(format!(
                "slink {slink} is not in ordered mode (resyncing or out of sync): its devices are not a \
                 prefix state of the group; ask again once it has caught up"
            ));
        }
        let marker = match &site {
            Some(s) => Marker::snapshot(name, 0, Some(s.clone())),
            None => Marker::snapshot(name, slink, None),
        };
        self.inner.markers.forget(name);
        let sink = Arc::new(WaitSink::default());
        let done = Completion::new(sink.clone(), 0);
        let _ = self.inner.event(Event::Mark { description: marker.encode(), done, origin: None });
        let (req, result) = sink.wait();
        result.map_err(|e| GroupError::Role(format!("snapshot {name}: the marker was not logged: {e}")))?;
        Ok(MarkerPlaced { name: name.to_string(), seq: req.offset, slink, site })
    }

    /// What this site did at the marker named `name`, once its copier reached it.
    pub fn marker_outcome(&self, name: &str) -> Option<MarkerOutcome> {
        self.inner.markers.get(name)
    }

    /// Wait (at most `timeout`) for this site's outcome of the marker named `name`.
    pub fn wait_marker(&self, name: &str, timeout: Duration) -> Option<MarkerOutcome> {
        self.inner.markers.wait(name, timeout)
    }

    /// Use `hook` for the markers this site reaches and its resync snapshots.
    pub fn set_marker_hook(&self, hook: Arc<dyn MarkerHook>) {
        *self.inner.hook.lock() = Some(hook);
        self.inner.hook_set.notify_all();
    }

    /// Snapshot SLINK `nr`'s devices before a resync overwrites them (`resync_snapshot`).
    /// A resync snapshot left from before a restart is kept while the SLINK is resyncing
    /// (it is the consistent copy), dropped if the SLINK is in sync.
    pub fn set_resync_snapshot(&self, nr: SlinkNr, on: bool) {
        {
            let mut rs = self.inner.resync_snapshots.lock();
            if on {
                rs.0.insert(nr);
            } else {
                rs.0.remove(&nr);
            }
        }
        let Some(hook) = self.inner.hook.lock().clone() else { return };
        let name = resync_snapshot_name(nr);
        if !hook.exists(&self.inner.name, &name) {
            return;
        }
        let in_sync = self.inner.m.lock().slinks.get(&nr).is_some_and(|rt| rt.ordered);
        let secondary_in_resync = nr == 0 && self.site().inconsistent;
        if in_sync && !secondary_in_resync {
            hook.drop_snapshot(&self.inner.name, &name);
        } else {
            self.inner.resync_snapshots.lock().1.insert(nr);
        }
    }

    /// A resync is about to overwrite SLINK `nr`'s devices (at a secondary: SLINK 0, by
    /// its primary's resync): take its resync snapshot first, if it is to have one.
    pub fn resync_begins(&self, nr: SlinkNr) {
        self.inner.resync_begins(nr);
    }

    /// SLINK `nr`'s devices are a prefix state again: drop its resync snapshot.
    pub fn resync_ended(&self, nr: SlinkNr) {
        self.inner.resync_ended(nr);
    }
}

impl Inner {
    pub(super) fn resync_begins(&self, nr: SlinkNr) {
        {
            let rs = self.resync_snapshots.lock();
            if !rs.0.contains(&nr) || rs.1.contains(&nr) {
                return;
            }
        }
        let name = resync_snapshot_name(nr);
        let Some(hook) = self.hook.lock().clone() else {
            warn!(group = %self.name, slink = nr, "no resync snapshot: this program takes no snapshots");
            return;
        };
        if !hook.exists(&self.name, &name) {
            let Some(handler) = self.handler(nr) else { return };
            let devices = crate::replicator::marker::device_paths(&*handler);
            let seq = self.log.cursor(nr).unwrap_or(0);
            let at = MarkerReached {
                group: self.name.clone(),
                marker: Marker::snapshot(&name, nr, None),
                slink: nr,
                seq,
                time_us: 0,
                devices,
            };
            match hook.reached(&at) {
                MarkerOutcome::Done(what) => info!(group = %self.name, slink = nr, "resync snapshot: {what}"),
                other => {
                    // The resync goes on: a copy that is not consistent for a while is
                    // what a resync without the option does.
                    warn!(group = %self.name, slink = nr, "resync snapshot not taken: {other:?}");
                    return;
                }
            }
        }
        self.resync_snapshots.lock().1.insert(nr);
    }

    pub(super) fn resync_ended(&self, nr: SlinkNr) {
        if !self.resync_snapshots.lock().1.remove(&nr) {
            return;
        }
        if let Some(hook) = self.hook.lock().clone() {
            hook.drop_snapshot(&self.name, &resync_snapshot_name(nr));
        }
    }
}
