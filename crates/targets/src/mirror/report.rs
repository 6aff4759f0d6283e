//! What the mirror tells: its status (dm-mirror's line, and JSON) and its messages.
//!
//! Status line (legs split off are left out):
//! `<#legs> <dev>... <in-sync regions>/<regions> 1 <health chars> <#log status> <log type> [<log dev> <A|D>]`
//! with a health letter per leg: `A` alive, `D` a write failed, `R` a read failed,
//! `S` a resync copy onto it failed, `F` a flush failed.
//!
//! Messages: `leg N recover` (a dropped leg comes back: the regions written while it was
//! away are copied onto it), `split N` (leg N leaves the mirror as an independent copy
//! of its contents at that moment).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmrep_core::{TargetError, TargetStatus};
use serde_json::json;

use super::state::{FailKind, Health};
use super::{LogDev, Shared, T};

/// How long `split` waits for the writes in flight to end.
const SPLIT_DRAIN: Duration = Duration::from_secs(30);

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Alive => "alive",
        Health::Failed(FailKind::Write) => "dead",
        Health::Failed(FailKind::Read) => "read-failed",
        Health::Failed(FailKind::Sync) => "sync-failed",
        Health::Failed(FailKind::Flush) => "flush-failed",
        Health::Split => "split",
    }
}

impl Shared {
    pub(crate) fn status(&self) -> TargetStatus {
        let st = self.state.lock();
        let in_sync = st.in_sync_regions();
        let members: Vec<usize> = (0..self.legs.len()).filter(|&i| st.legs[i].health != Health::Split).collect();
        let letters: String = members.iter().map(|&i| st.legs[i].letter()).collect();
        let log_dev = self.log_dev.lock();
        let log_letter = if st.log_failed { 'D' } else { 'A' };
        let (log_line, log_path) = match &*log_dev {
            LogDev::Core => ("1 core".to_string(), None),
            LogDev::Disk { path, .. } => (format!("3 disk {path} {log_letter}"), Some(path.clone())),
        };
        let devs: Vec<&str> = members.iter().map(|&i| self.legs[i].path.as_str()).collect();
        let line = format!("{} {} {in_sync}/{} 1 {letters} {log_line}", members.len(), devs.join(" "), st.regions);
        let legs: Vec<_> = st
            .legs
            .iter()
            .enumerate()
            .map(|(i, l)| {
                json!({
                    "leg": i,
                    "device": self.legs[i].path,
                    "offset_bytes": self.legs[i].offset,
                    "health": health_name(l.health),
                    "status_char": l.letter().to_string(),
                    "regions_to_copy": if l.health == Health::Split { 0 } else { l.stale.count() },
                    "errors": l.errors,
                    "last_error": l.last_error,
                    "resync_blocked": l.resync_blocked,
                })
            })
            .collect();
        let dirty = self.log.lock().as_ref().map(|l| l.dirty_count());
        let json = json!({
            "legs": legs,
            "health": letters,
            "handle_errors": self.handle_errors,
            "region_bytes": self.region_bytes,
            "regions": st.regions,
            "in_sync_regions": in_sync,
            "in_sync": in_sync == st.regions,
            "sync_percent": if st.regions == 0 { 100.0 } else { in_sync as f64 * 100.0 / st.regions as f64 },
            "resync": {
                "active": st.recovering.is_some() || st.resync_pending(),
                "regions_copied": st.regions_copied,
                "bytes_copied": st.bytes_copied,
            },
            "log": {
                "type": self.spec.log.kind(),
                "device": log_path,
                "params": self.spec.log.params(),
                "marked_regions": dirty,
                "failed": st.log_failed,
            },
        });
        TargetStatus::new(line, json)
    }

    pub(crate) fn message(self: &Arc<Self>, args: &[String]) -> Result<String, TargetError> {
        let err = |m: String| TargetError::Message { target: T, msg: m };
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let leg_nr = |s: &str| -> Result<usize, TargetError> {
            match s.parse::<usize>() {
                Ok(n) if n < self.legs.len() => Ok(n),
                _ => Err(err(format!("leg: expected 0..{}, found {s:?}", self.legs.len()))),
            }
        };
        self.log();
        match a.as_slice() {
            ["leg", n, "recover"] => self.recover(leg_nr(n)?).map_err(err),
            ["split", n] => self.split(leg_nr(n)?).map_err(err),
            _ => Err(err(format!("unknown message {:?} (expected: leg <N> recover | split <N>)", a.join(" ")))),
        }
    }

    /// `leg N recover`: the leg takes writes again and the worker copies onto it the
    /// regions it lacks.
    fn recover(&self, n: usize) -> Result<String, String> {
        let lacking = {
            let mut st = self.state.lock();
            let regions = st.regions;
            let leg = &mut st.legs[n];
            match leg.health {
                Health::Split => return Err(format!("leg {n} was split off: reload the table to add it back")),
                Health::Failed(FailKind::Flush) => {
                    // A failed flush may have lost any acknowledged write: copy it all.
                    for r in 0..regions {
                        leg.stale.set(r);
                    }
                }
                _ => {}
            }
            let was = leg.health;
            leg.health = Health::Alive;
            leg.error = None;
            leg.resync_blocked = false;
            let lacking = leg.stale.count();
            self.cv.notify_all();
            if was == Health::Alive && lacking == 0 {
                return Ok(format!("leg {n} is alive and in sync"));
            }
            lacking
        };
        tracing::info!(device = %self.device, leg = n, regions = lacking, "mirror: leg recovering");
        self.emit(n, "recovering", format!("{lacking} regions to copy"));
        Ok(format!("leg {n} recovering: {lacking} regions to copy"))
    }

    /// `split N`: hold new writes, wait for those in flight, make leg N durable and take
    /// it out of the mirror. Refused unless the leg holds every region (it would not be
    /// a consistent copy) and another live leg remains.
    fn split(&self, n: usize) -> Result<String, String> {
        {
            let mut st = self.state.lock();
            let leg = &st.legs[n];
            if leg.health == Health::Split {
                return Err(format!("leg {n} is split off already"));
            }
            if !leg.alive() || leg.stale.count() > 0 {
                return Err(format!(
                    "leg {n} is not in sync ({} regions to copy, health {}): it would not be a consistent copy",
                    leg.stale.count(),
                    health_name(leg.health)
                ));
            }
            if !st.legs.iter().enumerate().any(|(i, l)| i != n && l.alive() && l.stale.count() == 0) {
                return Err(format!("no other leg in sync would remain without leg {n}"));
            }
            if st.writes_held {
                return Err("another split is in progress".into());
            }
            st.writes_held = true;
            let deadline = Instant::now() + SPLIT_DRAIN;
            while st.active_writes > 0 || st.recovering.is_some() {
                st.waiters += 1;
                let timed_out = self.cv.wait_until(&mut st, deadline).timed_out();
                st.waiters -= 1;
                if timed_out {
                    st.writes_held = false;
                    self.cv.notify_all();
                    return Err(format!("writes did not drain within {SPLIT_DRAIN:?}"));
                }
            }
        }
        // Writes are held: every acknowledged write is on the leg; make it durable.
        let synced = self.legs[n].dev.sync();
        let mut st = self.state.lock();
        st.writes_held = false;
        self.cv.notify_all();
        if let Err(e) = synced {
            return Err(format!("leg {n}: sync failed: {}", dmrep_core::errors::io_error_text(&e)));
        }
        // Re-check under the lock: a write that failed on it while draining.
        if st.legs[n].stale.count() > 0 {
            return Err(format!("leg {n} failed a write while splitting: not split"));
        }
        st.legs[n].health = Health::Split;
        drop(st);
        self.legs[n].claim.lock().take();
        tracing::info!(device = %self.device, leg = n, path = %self.legs[n].path, "mirror: leg split off");
        self.emit(n, "split", String::new());
        Ok(format!("leg {n} split off: {} is an independent copy", self.legs[n].path))
    }
}
