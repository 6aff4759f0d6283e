//! What status shows of a group: read from the machine under its lock, never changed.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::machine::Machine;
use super::{unix_ms, DevNr, Group, GroupStatus, SlinkNr, SlinkStatus};

/// What status shows of an SLINK's synchronisation.
#[derive(Debug, Clone, Serialize)]
pub struct ResyncStatus {
    /// In ordered (log) mode: the RDs are write-order consistent.
    pub ordered: bool,
    /// `ordered`, `out_of_sync` (dirty regions, resync waiting for the SLINK) or `resyncing`.
    pub state: &'static str,
    pub reason: Option<String>,
    pub since_ms: Option<u64>,
    pub dirty_regions: u64,
    /// Bytes the dirty regions cover: what the resync has left to copy.
    pub remaining_bytes: u64,
    pub regions: u64,
    pub regions_done: u64,
    pub bytes_copied: u64,
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
    pub rate_limit: Option<u64>,
}

fn resync_status(m: &Machine, nr: SlinkNr) -> ResyncStatus {
    let rt = &m.slinks[&nr];
    let (mut dirty, mut regions, mut region_bytes, mut remaining) = (0, 0, 0, 0);
    for (log, _) in m.dirty.range((nr, 0)..=(nr, DevNr::MAX)).map(|(_, v)| v) {
        dirty += log.dirty_count();
        regions += log.regions();
        region_bytes = log.region_bytes();
        remaining += log.dirty_count() * log.region_bytes();
    }
    let r = &rt.resync;
    // A rate only while a resync runs (after it, elapsed time would only dilute it).
    let rate = match r.started {
        Some(t) if !rt.ordered && t.elapsed() > Duration::from_millis(100) => {
            (r.bytes_copied as f64 / t.elapsed().as_secs_f64()) as u64
        }
        _ => 0,
    };
    // An SLINK that is leaving ordered mode is out of sync already.
    let ordered = rt.ordered && !rt.leaving();
    let state = if ordered {
        "ordered"
    } else if rt.accessible() && !rt.paused {
        "resyncing"
    } else {
        "out_of_sync"
    };
    ResyncStatus {
        ordered,
        state,
        reason: r.reason.clone(),
        since_ms: r.since.map(unix_ms),
        dirty_regions: dirty,
        remaining_bytes: remaining,
        regions,
        regions_done: r.regions_done,
        bytes_copied: r.bytes_copied,
        rate_bytes_per_s: rate,
        eta_s: (rate > 0 && dirty > 0).then(|| dirty * region_bytes / rate),
        rate_limit: r.rate_limit,
    }
}

impl Group {
    /// Everything status shows.
    pub fn status(&self) -> GroupStatus {
        let now = Instant::now();
        let m = self.inner.m.lock();
        let slinks = m
            .slinks
            .iter()
            .map(|(nr, rt)| {
                let lag = rt.lag(now);
                SlinkStatus {
                    slink: *nr,
                    kind: rt.handler.kind(),
                    devices: rt.handler.describe(),
                    policy: rt.policy,
                    thresholds: rt.thresholds,
                    mode: rt.mode,
                    mode_since: unix_ms(rt.mode_since),
                    mode_switches: rt.mode_switches,
                    outstanding_ios: lag.ios,
                    outstanding_bytes: lag.bytes,
                    oldest_outstanding_ms: lag.oldest_age.map(|a| a.as_millis() as u64),
                    applied_seq: rt.durable,
                    accessible: rt.accessible(),
                    down_since: rt.down_since().map(unix_ms),
                    last_error: rt.last_error().map(str::to_string),
                    waiting_for_device: rt.waiting_for_device,
                    shipping: (*nr == 0 || m.shipping) && !rt.paused,
                    paused: rt.paused,
                    sync: resync_status(&m, *nr),
                    applied_entries: rt.applied_entries,
                    applied_bytes: rt.applied_bytes,
                    applies: rt.applies,
                    apply_us: rt.apply_us,
                    cursor_us: rt.cursor_us,
                    link: rt.handler.link_status(),
                }
            })
            .collect();
        GroupStatus {
            group: self.inner.name.clone(),
            log_path: self.inner.log_path.clone(),
            log: self.inner.log.stats(),
            queued_writes: m.queued(),
            awaiting_writes: m.awaiting(),
            writes_held: m.frozen,
            pending_on_ld: m.overlay.len(),
            slinks,
            statistics: m.stats.enabled.then(|| m.stats.clone()),
            log_error: m.log_error.as_ref().map(|e| e.to_string()),
            recovery: self.inner.recovery.as_ref().map(|r| format!("{r:?}")),
            resync_snapshots: self
                .inner
                .resync_snapshots
                .lock()
                .1
                .iter()
                .map(|nr| crate::replicator::marker::resync_snapshot_name(*nr))
                .collect(),
            site: {
                drop(m);
                self.site_status()
            },
        }
    }

    /// Entries (ios) still outstanding for SLINK `nr`.
    pub fn outstanding(&self, nr: SlinkNr) -> Option<u64> {
        self.inner.m.lock().slinks.get(&nr).map(|rt| rt.lag(Instant::now()).ios)
    }

    /// Dirty and total regions of device `dev` on SLINK `nr`.
    pub fn device_regions(&self, nr: SlinkNr, dev: DevNr) -> Option<(u64, u64)> {
        self.inner.m.lock().dirty.get(&(nr, dev)).map(|(l, _)| (l.dirty_count(), l.regions()))
    }

    /// The kind of the dirty log of device `dev` on SLINK `nr` (`core`, `disk`).
    pub fn dirty_log_kind(&self, nr: SlinkNr, dev: DevNr) -> Option<&'static str> {
        self.inner.m.lock().dirty.get(&(nr, dev)).map(|(l, _)| l.kind())
    }

    /// Whether SLINK `nr` is in ordered mode (its RDs write-order consistent).
    pub fn is_ordered(&self, nr: SlinkNr) -> bool {
        self.inner.m.lock().slinks.get(&nr).is_some_and(|rt| rt.ordered && !rt.leaving())
    }
}
