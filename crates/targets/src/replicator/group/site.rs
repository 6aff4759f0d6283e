//! What a site link's far end needs of a group: the site's role and group identity, what
//! a secondary has received and applied, writes of resync data, and what status shows
//! of the primary a secondary follows.

use std::io;
use std::time::{Duration, Instant, SystemTime};

use dmrep_formats::replog::{SiteRole, SiteState};
use serde::Serialize;
use tracing::info;

use super::{unix_ms, Group, GroupError};

/// What a secondary knows of the primary it follows (kept by its receiver).
#[derive(Debug, Clone, Default)]
pub struct Following {
    /// The primary's site name and address, while connected.
    pub primary: Option<(String, String)>,
    pub connected_since: Option<SystemTime>,
    /// When the primary last sent anything.
    pub last_heard: Option<SystemTime>,
    /// The newest seq the primary said it has.
    pub primary_last_seq: u64,
    /// Since when this site has been behind the primary's newest seq (None: caught up).
    pub behind_since: Option<SystemTime>,
    /// The last reason a connection ended or was refused.
    pub last_error: Option<String>,
}

/// What status shows of the site's part in its group.
#[derive(Debug, Clone, Serialize)]
pub struct SiteStatus {
    pub role: SiteRole,
    /// Empty while a new secondary waits for its primary's first handshake.
    pub group_uuid: String,
    pub generation: u64,
    /// Highest of the primary's seqs durable here.
    pub received: u64,
    /// Highest of the primary's seqs applied to this site's devices (those before it that
    /// concern this site are all applied).
    pub applied: u64,
    /// At a secondary: the primary it follows, when connected.
    pub primary: Option<String>,
    pub primary_addr: Option<String>,
    pub connected_since_ms: Option<u64>,
    pub last_heard_ms: Option<u64>,
    /// The primary's newest seq, as it last said.
    pub primary_last_seq: u64,
    /// Entries behind the primary: not yet received (by seq distance) plus received and
    /// not yet applied.
    pub lag_entries: u64,
    /// Bytes received and not yet applied.
    pub lag_bytes: u64,
    /// Age of the oldest write of the primary not yet applied here (0 when caught up);
    /// it keeps growing while the link is down.
    pub lag_seconds: f64,
    pub last_error: Option<String>,
    /// The generations of the group's history this site knows.
    pub lineage: dmrep_formats::lineage::Lineage,
    /// Why application writes are refused (a newer generation exists).
    pub fenced: Option<String>,
    /// Another site accepted writes as primary from the same parent generation.
    pub split_brain: Option<String>,
    /// The devices are being copied outside write order (not a prefix state).
    pub inconsistent: bool,
    /// `dmrep resolve --discard-local` ran: the next primary's history replaces this site's.
    pub discard_local: bool,
}

impl Group {
    /// The site's role and group identity.
    pub fn site(&self) -> SiteState {
        self.inner.log.site()
    }

    /// Change the site's role or group identity, durably.
    pub fn set_site(&self, change: impl FnOnce(&mut SiteState)) -> Result<(), GroupError> {
        // The superblock write happens outside the machine's lock (no I/O under it); the
        // machine learns the role once it is durable.
        let before = self.inner.log.site();
        self.inner.log.set_site(change).map_err(GroupError::Log)?;
        let now = self.inner.log.site();
        if (now.role, now.generation()) != (before.role, before.generation()) {
            info!(group = %self.inner.name, from = before.role.name(), to = now.role.name(),
                generation = now.generation(), "site role or generation changed");
            self.inner.control(super::machine::Control::SetRole(now.role == SiteRole::Secondary))?;
        }
        Ok(())
    }

    /// Highest of the primary's seqs durable in this site's log.
    pub fn received(&self) -> u64 {
        self.inner.log.received()
    }

    /// This site has every write of the primary up to `seq` (a resync made its devices
    /// equal to the primary at `seq`): received moves there, durably.
    pub fn set_received(&self, seq: u64) -> Result<(), GroupError> {
        self.inner.log.set_received(seq).map_err(GroupError::Log)
    }

    /// Highest of the primary's seqs applied to the devices here.
    pub fn applied_origin(&self) -> u64 {
        let first_unapplied = self.inner.m.lock().slinks.get(&0).and_then(|rt| rt.first_outstanding());
        match first_unapplied.and_then(|s| self.inner.log.entries_from(s, 1).pop()) {
            Some(e) if e.seq == first_unapplied.unwrap_or_default() => e.origin_seq.saturating_sub(1),
            _ => self.received(),
        }
    }

    /// Wait until every entry in the log is on the devices here (at most `timeout`).
    pub fn wait_applied(&self, timeout: Duration) -> io::Result<()> {
        let until = Instant::now() + timeout;
        loop {
            let left = self.outstanding(0).unwrap_or(0);
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{left} entries still not applied to the devices after {timeout:?}"),
                ));
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Write resync data straight to device `dev`, durably, outside write order: first
    /// every logged entry is applied (an older entry must never land on newer data).
    pub fn write_resync(&self, dev: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.wait_applied(Duration::from_secs(60))?;
        let h = self.handler(0).ok_or_else(|| io::Error::other("group has no local devices"))?;
        h.copy_region(dev, offset, data)
    }

    /// Record what the receiver knows of the primary.
    pub fn update_following(&self, f: impl FnOnce(&mut Following)) {
        f(&mut self.following.lock());
    }

    /// The site part of status.
    pub fn site_status(&self) -> SiteStatus {
        let site = self.site();
        let received = self.received();
        let applied = self.applied_origin();
        let f = self.following.lock().clone();
        let now = SystemTime::now();
        // One look at SLINK 0 (what is received and not yet on the devices).
        let (unapplied, unapplied_bytes, first_unapplied) = {
            let m = self.inner.m.lock();
            m.slinks.get(&0).map_or((0, 0, None), |rt| {
                let l = rt.lag(Instant::now());
                (l.ios, l.bytes, rt.first_outstanding())
            })
        };
        let not_received = f.primary_last_seq.saturating_sub(received);
        let oldest_unapplied_us =
            first_unapplied.and_then(|s| self.inner.log.entries_from(s, 1).pop()).map(|e| e.origin_time_us);
        let now_us = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let mut lag_seconds = 0.0f64;
        if let Some(t) = oldest_unapplied_us.filter(|t| *t > 0) {
            lag_seconds = now_us.saturating_sub(t) as f64 / 1e6;
        }
        if not_received > 0 {
            if let Some(b) = f.behind_since {
                lag_seconds = lag_seconds.max(now.duration_since(b).unwrap_or_default().as_secs_f64());
            }
        }
        SiteStatus {
            role: site.role,
            group_uuid: if site.group_uuid == [0; 16] {
                String::new()
            } else {
                uuid::Uuid::from_bytes(site.group_uuid).to_string()
            },
            generation: site.generation(),
            received,
            applied,
            primary: f.primary.as_ref().map(|p| p.0.clone()),
            primary_addr: f.primary.as_ref().map(|p| p.1.clone()),
            connected_since_ms: f.connected_since.map(unix_ms),
            last_heard_ms: f.last_heard.map(unix_ms),
            primary_last_seq: f.primary_last_seq,
            lag_entries: not_received + unapplied,
            lag_bytes: unapplied_bytes,
            lag_seconds,
            last_error: f.last_error,
            lineage: site.lineage,
            fenced: self.fenced(),
            split_brain: self.split_brain(),
            inconsistent: site.inconsistent,
            discard_local: site.discard_local,
        }
    }
}
