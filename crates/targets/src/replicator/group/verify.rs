//! Online verify (`dmrep verify GROUP --slink N`): compares the application's view of
//! every device (the LD and the log) with a site's copy region by region, by checksum
//! (a remote site computes its own: no data crosses the link), while writes go on.
//!
//! For each region: note the log's last seq `T`, checksum the application's view, wait
//! until the SLINK has every entry up to `T`, checksum the site's copy. They must be
//! equal unless a write touched the region after `T` (the machine records the regions
//! written while a verify runs): such a region is checked again later, never reported as
//! a false mismatch. A region still busy after a few tries is reported as skipped.
//! With `fix`, the mismatching regions become dirty and the SLINK's resync copies them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use super::machine::Control;
use super::{DevNr, Group, GroupError, SlinkNr};
use dmrep_formats::site::Region;

/// Bytes compared at a time.
pub const VERIFY_REGION: u64 = 1 << 20;

/// Tries per region that writes keep touching.
const TRIES: u32 = 4;

/// What a verify did so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyStatus {
    pub slink: SlinkNr,
    pub running: bool,
    pub fix: bool,
    pub rate_limit: Option<u64>,
    pub regions: u64,
    pub regions_done: u64,
    pub bytes_done: u64,
    pub started_ms: u64,
    pub elapsed_s: f64,
    pub eta_s: Option<f64>,
    /// Regions that differ (device, offset, length).
    pub mismatches: Vec<Region>,
    /// Regions writes kept touching (not compared).
    pub skipped: Vec<Region>,
    /// Why it stopped early.
    pub error: Option<String>,
}

fn err(s: String) -> GroupError {
    GroupError::Role(s)
}

impl Group {
    /// Start verifying SLINK `nr` in the background (at most `rate` bytes per second of
    /// each side read; 0: unlimited); `fix`: mark mismatching regions dirty.
    pub fn verify_start(self: &Arc<Self>, nr: SlinkNr, dev_bytes: u64, rate: u64, fix: bool) -> Result<(), GroupError> {
        if nr == 0 {
            return Err(GroupError::Slink0("verified (it is the reference)"));
        }
        let h = self.handler(nr).ok_or(GroupError::NoSlink(nr))?;
        {
            let m = self.inner.m.lock();
            let rt = &m.slinks[&nr];
            if rt.standby {
                return Err(err(format!("slink {nr} stands by (this site is a secondary): verify at the primary")));
            }
            if !rt.ordered || rt.leaving() {
                return Err(err(format!("slink {nr} is being resynchronised: verify once it is in sync")));
            }
        }
        let devices: Vec<DevNr> = self.device_numbers().into_iter().filter(|d| h.has_device(*d)).collect();
        let mut v = self.verify.lock();
        if v.as_ref().is_some_and(|s| s.running) {
            return Err(err(format!("a verify of slink {} is running already", v.as_ref().map_or(0, |s| s.slink))));
        }
        let per_dev = dev_bytes.div_ceil(VERIFY_REGION);
        *v = Some(VerifyStatus {
            slink: nr,
            running: true,
            fix,
            rate_limit: (rate > 0).then_some(rate),
            regions: per_dev * devices.len() as u64,
            started_ms: super::unix_ms(std::time::SystemTime::now()),
            ..Default::default()
        });
        drop(v);
        self.inner.m.lock().verify_watch = Some(Default::default());
        let g = self.clone();
        std::thread::Builder::new()
            .name(format!("{}-verify{nr}", self.name()))
            .spawn(move || {
                let r = g.verify_run(nr, &devices, dev_bytes, rate, fix);
                g.inner.m.lock().verify_watch = None;
                let mut v = g.verify.lock();
                if let Some(s) = v.as_mut() {
                    s.running = false;
                    if let Err(e) = r {
                        warn!(group = %g.name(), slink = nr, "verify stopped: {e}");
                        s.error = Some(e);
                    } else {
                        info!(group = %g.name(), slink = nr, mismatches = s.mismatches.len(), skipped = s.skipped.len(),
                            "verify complete");
                    }
                }
            })
            .map_err(GroupError::Threads)?;
        Ok(())
    }

    /// The current or last verify.
    pub fn verify_status(&self) -> Option<VerifyStatus> {
        let mut v = self.verify.lock().clone()?;
        if v.running {
            let elapsed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_millis() as f64 - v.started_ms as f64)
                / 1e3;
            v.elapsed_s = elapsed;
            if v.regions_done > 0 {
                v.eta_s = Some(elapsed / v.regions_done as f64 * (v.regions - v.regions_done) as f64);
            }
        }
        Some(v)
    }

    fn verify_run(&self, nr: SlinkNr, devices: &[DevNr], dev_bytes: u64, rate: u64, fix: bool) -> Result<(), String> {
        let h = self.handler(nr).ok_or_else(|| format!("slink {nr} is gone"))?;
        let t0 = Instant::now();
        let mut read = 0u64;
        let mut busy: Vec<(DevNr, u64, u32)> = Vec::new();
        let mut queue: std::collections::VecDeque<(DevNr, u64, u32)> =
            devices.iter().flat_map(|d| (0..dev_bytes.div_ceil(VERIFY_REGION)).map(move |r| (*d, r, 0))).collect();
        while let Some((dev, r, tries)) = queue.pop_front() {
            let offset = r * VERIFY_REGION;
            let len = VERIFY_REGION.min(dev_bytes - offset);
            let region = Region { dev_nr: dev, offset, len };
            // Forget earlier writes to this region; T: the log's last entry now.
            self.inner.m.lock().verify_watch.as_mut().map(|w| w.remove(&(dev, r)));
            let t = self.inner.log.stats().next_seq.saturating_sub(1);
            let mut buf = vec![0u8; len as usize];
            self.read(dev, offset, &mut buf).map_err(|e| format!("reading device {dev} at {offset}: {e}"))?;
            let ours = crc32c::crc32c(&buf);
            self.wait_durable(nr, t, Duration::from_secs(60))?;
            let theirs = h
                .checksum(dev, offset, len)
                .map_err(|e| format!("checksumming device {dev} at {offset} at slink {nr}'s site: {e}"))?;
            let touched = self.inner.m.lock().verify_watch.as_ref().is_some_and(|w| w.contains(&(dev, r)));
            read += 2 * len;
            let mut s = self.verify.lock();
            let st = s.as_mut().expect("verify state");
            if ours != theirs && touched {
                if tries + 1 < TRIES {
                    queue.push_back((dev, r, tries + 1));
                    continue;
                }
                busy.push((dev, r, tries));
                st.skipped.push(region);
            } else if ours != theirs {
                warn!(group = %self.name(), slink = nr, dev, offset, len, "verify: region differs");
                st.mismatches.push(region);
            }
            st.regions_done += 1;
            st.bytes_done += len;
            drop(s);
            if rate > 0 {
                let due = Duration::from_secs_f64(read as f64 / 2.0 / rate as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let found = self.verify.lock().as_ref().map(|s| s.mismatches.clone()).unwrap_or_default();
        if fix && !found.is_empty() {
            self.inner
                .control(Control::SiteResync {
                    slink: nr,
                    after: 0,
                    regions: found.clone(),
                    full: false,
                    why: format!("verify found {} regions that differ", found.len()),
                })
                .map_err(|e| format!("marking the mismatching regions dirty: {e}"))?;
        }
        Ok(())
    }

    /// Wait until SLINK `nr` has every entry up to `seq` (its site acknowledged them).
    fn wait_durable(&self, nr: SlinkNr, seq: u64, timeout: Duration) -> Result<(), String> {
        let until = Instant::now() + timeout;
        loop {
            {
                let m = self.inner.m.lock();
                let rt = m.slinks.get(&nr).ok_or_else(|| format!("slink {nr} left the group"))?;
                if !rt.ordered || rt.leaving() {
                    return Err(format!("slink {nr} left ordered mode: verify again once it is in sync"));
                }
                if rt.durable >= seq || rt.first_outstanding().is_none_or(|f| f > seq) {
                    return Ok(());
                }
                if !rt.accessible() {
                    return Err(format!("slink {nr}'s site is unreachable ({})", rt.last_error().unwrap_or("down")));
                }
            }
            if Instant::now() >= until {
                return Err(format!("slink {nr} did not apply entry {seq} within {timeout:?}"));
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
