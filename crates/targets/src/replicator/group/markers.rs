//! Group-consistent snapshots at a site: the group puts a marker into its log, and the
//! site it names snapshots every device when its copier reaches it (see
//! [`crate::replicator::marker`]).

use std::sync::Arc;
use std::time::Duration;

use dmrep_core::device::WaitSink;
use dmrep_core::Completion;
use serde::Serialize;

use super::machine::Event;
use super::{Group, GroupError, Seq, SlinkNr};
use crate::replicator::marker::{Marker, MarkerHook, MarkerOutcome};

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

    /// Use `hook` for the markers this site reaches (instead of the program's default).
    pub fn set_marker_hook(&self, hook: Arc<dyn MarkerHook>) {
        *self.inner.hook.write() = Some(hook);
    }
}
