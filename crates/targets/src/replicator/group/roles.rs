//! Follow the sun: a site's role for its group changes (planned switchover, takeover,
//! failback, split-brain resolution), and what each change must keep true.
//!
//! - The role and lineage are persisted in the log's superblock before the machine
//!   acts on them ([`Group::set_site`]), so a crash at any point restarts the site in the
//!   role it last made durable.
//! - A switchover holds the application's writes, drains the log to the target until
//!   it has every entry, has it persist its promotion, and only then becomes a secondary
//!   of it: writes never land on two primaries of one generation. Any failure before the
//!   target answers rolls back with the writes released.
//! - A takeover promotes a secondary with what it has durably received and applied: a
//!   prefix of the old primary's acknowledged history (DESIGN invariant 2).
//! - A site whose history after some point is replaced (an old primary failing back, a
//!   split brain resolved with `--discard-local`) reports the regions it wrote after
//!   that point so that the new primary copies exactly those back ([`Group::discard_history`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dmrep_formats::lineage::Lineage;
use dmrep_formats::replog::SiteRole;
use dmrep_formats::site::{Region, MAX_REGIONS};
use serde::Serialize;
use tracing::{info, warn};

use super::machine::Control;
use super::{Group, GroupError, SlinkNr};
use crate::replicator::slink::{LinkNews, SlinkHandler};

/// What a planned switchover did.
#[derive(Debug, Clone, Serialize)]
pub struct Switchover {
    /// The new primary.
    pub to: String,
    pub generation: u64,
    /// History seq the new generation starts at.
    pub start: u64,
    /// How long the application's writes were held.
    pub held_ms: f64,
    /// Of which draining the log to the new primary.
    pub drain_ms: f64,
    /// Sites other than the new primary that had every entry at the switch (they follow
    /// it with nothing to copy), and those that did not (they catch up from its log).
    pub drained: Vec<String>,
    pub behind: Vec<String>,
}

/// What a takeover did.
#[derive(Debug, Clone, Serialize)]
pub struct Takeover {
    pub generation: u64,
    /// History seq the new generation starts at (one past what this site had received).
    pub start: u64,
    /// The old primary's newest seq as last heard here (0 when never heard).
    pub primary_last_seq: u64,
    /// Entries the old primary announced that this site never received: a lower bound of
    /// what is lost (it may have written more after it was last heard).
    pub lost_entries: u64,
    /// How long the takeover took (applying what was received included).
    pub took_ms: f64,
}

/// A site's role and its peers, for `dmrep role`.
#[derive(Debug, Clone, Serialize)]
pub struct RoleInfo {
    pub role: SiteRole,
    pub generation: u64,
    pub lineage: Lineage,
    pub fenced: Option<String>,
    pub split_brain: Option<String>,
    pub inconsistent: bool,
    pub discard_local: bool,
    pub received: u64,
    pub applied: u64,
    pub peers: Vec<PeerInfo>,
}

/// One other site of the group, as this site sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    pub slink: SlinkNr,
    pub site: String,
    /// Its role as far as this site knows: the primary this secondary follows, or the
    /// secondaries of this primary.
    pub role: &'static str,
    pub connected: bool,
    pub standby: bool,
    pub last_error: Option<String>,
}

/// A primary heard from within this long counts as alive for `takeover` (heartbeats
/// come every third of the link timeout: 3.3 s with the default 10 s).
const PRIMARY_ALIVE: Duration = Duration::from_secs(5);

fn err(s: impl Into<String>) -> GroupError {
    GroupError::Role(s.into())
}

impl Group {
    /// The SLINK that reaches `site` (another dmrep site of the group).
    pub fn slink_of_site(&self, site: &str) -> Option<SlinkNr> {
        let m = self.inner.m.lock();
        m.slinks.iter().find(|(_, rt)| rt.handler.peer_site().as_deref() == Some(site)).map(|(nr, _)| *nr)
    }

    /// Why application writes are refused (a newer generation exists), if they are.
    pub fn fenced(&self) -> Option<String> {
        self.inner.m.lock().fenced.clone()
    }

    /// Refuse application writes from now on: a newer generation exists.
    pub fn fence(&self, why: String) {
        let _ = self.inner.control(Control::Fence(why));
    }

    /// A split brain was found with another site (`Some`), or resolved (`None`).
    pub fn set_split_brain(&self, found: Option<String>) {
        let _ = self.inner.control(Control::SplitBrain(found));
    }

    /// The split brain found, if any.
    pub fn split_brain(&self) -> Option<String> {
        self.inner.m.lock().split_brain.clone()
    }

    /// What a link learned (taken after its copier's work): fencing, a resync its site
    /// needs.
    pub(super) fn link_news(inner: &super::Inner, nr: SlinkNr, news: LinkNews) {
        let r = match news {
            LinkNews::Fenced(why) => inner.control(Control::Fence(why)),
            LinkNews::SplitBrain(found) => inner.control(Control::SplitBrain(found)),
            LinkNews::Resync { after, regions, full, why } => {
                inner.control(Control::SiteResync { slink: nr, after, regions, full, why })
            }
        };
        if let Err(e) = r {
            warn!(group = %inner.name, slink = nr, "acting on what the link learned failed: {e}");
        }
    }

    /// A primary's session is being admitted at this site: until the guard drops, no
    /// promotion can happen; the number (in the guard) names this session: a promotion
    /// asked in an older session is refused ([`Group::promote_by`]), because the primary
    /// that asked may have concluded from this newer session that it did not happen.
    /// The same lock as [`Group::admission`], without starting a new session: held while
    /// a received batch is appended, and while a new session becomes the current one, so
    /// that a session replaced meanwhile never appends after its successor began.
    pub fn receiving(&self) -> parking_lot::MutexGuard<'_, u64> {
        self.roles.lock()
    }

    pub fn admission(&self) -> parking_lot::MutexGuard<'_, u64> {
        let mut g = self.roles.lock();
        *g += 1;
        g
    }

    /// Planned switchover, at the target: become the primary of `lineage`'s newest
    /// generation, asked in session `session` (see [`Group::admission`]). Every entry
    /// must be here (received up to where the new generation starts); applying them to
    /// the devices goes on afterwards, in order, as at any primary.
    pub fn promote_by(&self, session: u64, lineage: Lineage) -> Result<(), GroupError> {
        let g = self.roles.lock();
        if *g != session {
            return Err(err("promotion refused: a newer connection from the primary arrived since it was asked"));
        }
        let here = self.site();
        let received = self.received();
        match dmrep_formats::lineage::relate(&here.lineage, &lineage) {
            dmrep_formats::lineage::Relation::PeerNewer { common } if common == received => {}
            r => {
                return Err(err(format!(
                    "promotion refused: the new generation must follow ours right after seq {received} ({r:?})"
                )))
            }
        }
        if here.role != SiteRole::Secondary || here.inconsistent {
            return Err(err("promotion refused: this site is not a consistent secondary"));
        }
        self.set_site(|s| {
            s.role = SiteRole::Primary;
            s.lineage = lineage;
        })?;
        drop(g);
        Ok(())
    }

    /// The site of SLINK `nr` was just heard from (it connected here): if the SLINK is
    /// down, try it now rather than at the end of its backoff (a returning old primary
    /// fails back at once).
    pub fn probe_now(&self, nr: SlinkNr) {
        let _ = self.inner.control(Control::ProbeNow(nr));
    }

    /// At a secondary: the site of standby SLINK `nr` has received the group's history
    /// through `h`: the log keeps only what it lacks.
    pub fn standby_peer_at(&self, nr: SlinkNr, h: u64) {
        let from = {
            let m = self.inner.m.lock();
            match m.slinks.get(&nr) {
                Some(rt) if rt.standby && rt.ordered => rt.durable + 1,
                Some(rt) if rt.standby && !rt.leaving() && h >= self.received() => {
                    // Out of ordered mode (this log overflowed while the site was away),
                    // but the site has caught up with everything this site has: its dirty
                    // regions are moot. (Entries arrive here only from the receiver that
                    // calls this: none can slip in between.)
                    drop(m);
                    self.standby_caught_up(nr);
                    return;
                }
                _ => return,
            }
        };
        let mut through = None;
        let mut at = from;
        'scan: loop {
            let metas = self.inner.log.entries_from(at, 4096);
            let Some(end) = metas.last().map(|m| m.seq) else { break };
            for m in metas {
                if m.origin_seq > h {
                    break 'scan;
                }
                through = Some(m.seq);
            }
            at = end + 1;
        }
        let Some(through) = through else { return };
        let fx = self.inner.m.lock().control(Instant::now(), Control::StandbyAcked { slink: nr, through });
        if let Some(seq) = fx.ok().and_then(|fx| self.inner.carry_out(fx).1) {
            self.inner.cursors.submit(nr, seq);
        }
    }

    /// After [`Group::discard_history`], once this site follows the new primary (on
    /// SLINK `towards`): the regions it must get back are kept as that SLINK's dirty
    /// regions (durable with a `disk` dirty log; after a crash with a `core` one, every
    /// region), so that they are reported again at every handshake until the primary's
    /// resync ends ([`Group::diverged_delivered`]): a welcome lost with the connection
    /// must not lose them.
    pub fn hold_diverged(&self, towards: SlinkNr, common: u64, regions: &[Region]) -> Result<(), GroupError> {
        if regions.is_empty() {
            return Ok(());
        }
        self.inner.control(Control::SiteResync {
            slink: towards,
            after: common,
            regions: regions.to_vec(),
            full: false,
            why: "regions this site wrote past the common history, until the primary copies them back".into(),
        })
    }

    /// The regions this site still waits to get back from the primary on SLINK `towards`
    /// (see [`Group::hold_diverged`]).
    pub fn pending_diverged(&self, towards: SlinkNr) -> Vec<Region> {
        let held = self.inner.m.lock().slinks.get(&towards).is_some_and(|rt| rt.standby && !rt.ordered);
        if !held {
            return Vec::new();
        }
        self.regions_after(u64::MAX, Some(towards))
    }

    /// The primary on SLINK `towards` made this site's devices equal to its own (a resync
    /// ended): the regions held for it are moot.
    pub fn diverged_delivered(&self, towards: SlinkNr) {
        let held =
            self.inner.m.lock().slinks.get(&towards).is_some_and(|rt| rt.standby && !rt.ordered && !rt.leaving());
        if held {
            self.standby_caught_up(towards);
        }
    }

    /// A standby SLINK out of ordered mode whose site has everything this site has:
    /// ordered again at the log's tail, its dirty regions cleared.
    fn standby_caught_up(&self, nr: SlinkNr) {
        let done = self
            .clear_dirty(nr)
            .map_err(|e| e.to_string())
            .and_then(|()| self.inner.log.register_slink(nr).map_err(|e| e.to_string()));
        match done {
            Ok(()) => {
                self.inner.m.lock().reordered_clean(Instant::now(), &[nr]);
                info!(group = %self.inner.name, slink = nr, "standby slink's site caught up: ordered again, nothing to copy");
            }
            Err(e) => warn!(group = %self.inner.name, slink = nr, "standby slink stays out of ordered mode: {e}"),
        }
    }

    /// Every dirty region of SLINK `nr` is moot: cleared, durably (before the SLINK is
    /// registered in the log again, so a crash never finds it ordered with stale marks).
    fn clear_dirty(&self, nr: SlinkNr) -> std::io::Result<()> {
        let logs = self.inner.m.lock().clear_dirty(nr);
        logs.iter().try_for_each(|l| l.flush())
    }

    /// Regions of the entries the log holds past history seq `after`, and the dirty
    /// regions of SLINK `towards` (what this site wrote that the site there lacks).
    fn regions_after(&self, after: u64, towards: Option<SlinkNr>) -> Vec<Region> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let metas = self.inner.log.entries_from(at, 4096);
            let Some(end) = metas.last().map(|m| m.seq) else { break };
            out.extend(metas.iter().filter(|m| m.origin_seq > after && m.len > 0).map(|m| Region {
                dev_nr: m.dev_nr,
                offset: m.offset,
                len: m.len as u64,
            }));
            at = end + 1;
        }
        if let Some(nr) = towards {
            let logs: Vec<_> = {
                let m = self.inner.m.lock();
                m.dirty.range((nr, 0)..=(nr, u32::MAX)).map(|((_, d), (l, _))| (*d, l.clone())).collect()
            };
            for (dev_nr, l) in logs {
                let rb = l.region_bytes();
                let mut r = 0;
                while let Some(d) = l.next_dirty(r) {
                    out.push(Region { dev_nr, offset: d * rb, len: rb });
                    r = d + 1;
                }
            }
        }
        coalesce(out)
    }

    /// This site's history after `common` is another history than the group's (it is
    /// an old primary failing back, or lost a split brain): every entry is applied to the
    /// devices here, then forgotten, and the log's history starts over at `common`. The
    /// regions written after `common` (and those SLINK `towards`, the new primary, had
    /// dirty) are returned: the new primary copies them back. Application writes must be
    /// refused already (fenced or secondary).
    pub fn discard_history(&self, common: u64, towards: Option<SlinkNr>) -> Result<Vec<Region>, GroupError> {
        self.wait_applied(Duration::from_secs(60))
            .map_err(|e| err(format!("applying the log before discarding: {e}")))?;
        let regions = self.regions_after(common, towards);
        let (_, unordered) = self.inner.m.lock().discard_outstanding()?;
        let log = &self.inner.log;
        for nr in &unordered {
            self.clear_dirty(*nr).map_err(|source| GroupError::DirtyLog { slink: *nr, source })?;
            log.register_slink(*nr).map_err(GroupError::Log)?;
        }
        log.cursors_to_tail().map_err(GroupError::Log)?;
        self.inner.m.lock().reordered_clean(Instant::now(), &unordered);
        log.rebase_origin(common).map_err(GroupError::Log)?;
        let bytes: u64 = regions.iter().map(|r| r.len).sum();
        warn!(group = %self.inner.name, common, regions = regions.len(), bytes,
            "this site's writes after the common history are discarded: the primary copies those regions back");
        Ok(regions)
    }

    /// Planned switchover to `to` (a secondary this primary ships to): hold writes, drain
    /// the log to it (at most `timeout`), have it persist its promotion, then follow it.
    pub fn switchover(&self, to: &str, timeout: Duration) -> Result<Switchover, GroupError> {
        let site = self.site();
        if site.role != SiteRole::Primary {
            return Err(err(format!("group {} is a secondary here: run the switchover at its primary", self.name())));
        }
        if let Some(why) = self.fenced() {
            return Err(err(format!("group {} is fenced here ({why}): it cannot hand over", self.name())));
        }
        let nr = self
            .slink_of_site(to)
            .ok_or_else(|| err(format!("no slink of group {} reaches a site named {to}", self.name())))?;
        let h = self.handler(nr).ok_or(GroupError::NoSlink(nr))?;
        {
            let m = self.inner.m.lock();
            let rt = &m.slinks[&nr];
            if !rt.ordered || rt.leaving() {
                return Err(err(format!("site {to} is being resynchronised (slink {nr}): wait until it is in sync")));
            }
            if !rt.accessible() {
                return Err(err(format!(
                    "site {to} is not reachable (slink {nr}: {})",
                    rt.last_error().unwrap_or("down")
                )));
            }
        }
        let t0 = Instant::now();
        self.freeze();
        let release = |e: GroupError| {
            self.thaw();
            warn!(group = %self.name(), to, "switchover abandoned, writes released: {e}");
            e
        };
        // Drain: the target must have every entry. (Not the other sites: the new primary
        // keeps what they lack in its log and ships it to them. Not this site's own
        // devices either: as a secondary it goes on applying its log in order.)
        let until = t0 + timeout;
        loop {
            let target_left = self.inner.m.lock().slinks[&nr].lag(Instant::now()).ios;
            if target_left == 0 {
                break;
            }
            if Instant::now() >= until {
                return Err(release(err(format!(
                    "site {to} still lacks {target_left} entries after {timeout:?}: nothing changed"
                ))));
            }
            self.kick();
            std::thread::sleep(Duration::from_micros(200));
        }
        let drain = t0.elapsed();
        let (drained, behind) = {
            let m = self.inner.m.lock();
            let mut d = Vec::new();
            let mut b = Vec::new();
            for (n, rt) in m.slinks.iter().filter(|(n, _)| **n != nr && **n != 0) {
                if let Some(s) = rt.handler.peer_site() {
                    if rt.ordered && rt.first_outstanding().is_none() && rt.accessible() {
                        d.push(s);
                    } else {
                        b.push(format!("{s} (slink {n})"));
                    }
                }
            }
            (d, b)
        };
        let start = self.received() + 1;
        let next = site.lineage.promoted(crate::replicator::log::rand_nonce(), start);
        match h.hand_over(next) {
            Ok(l) if l == next => {}
            Ok(l) => {
                return Err(release(err(format!(
                    "site {to} answered the promotion with generation {} instead of {}",
                    l.generation(),
                    next.generation()
                ))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotConnected => {
                return Err(release(err(format!("site {to} was not told to take over: {e}"))))
            }
            Err(e) => {
                // The promotion went out and no answer came: the site may have made it
                // durable. Writes stay held until we know; never two primaries.
                warn!(group = %self.name(), to, "switchover: no answer to the promotion ({e}); asking the site");
                if !self.promotion_outcome(&*h, to, until.max(Instant::now() + timeout))? {
                    return Err(release(err(format!("site {to} did not take over: {e}"))));
                }
                if self.site().role == SiteRole::Secondary {
                    // The new primary reached this site first and made it follow.
                    self.thaw();
                    return Ok(Switchover {
                        to: to.to_string(),
                        generation: self.site().generation(),
                        start,
                        held_ms: t0.elapsed().as_secs_f64() * 1e3,
                        drain_ms: drain.as_secs_f64() * 1e3,
                        drained,
                        behind,
                    });
                }
            }
        }
        // The new primary has it durably: from now on this site follows it.
        let demoted = self.set_site(|s| {
            s.role = SiteRole::Secondary;
            s.lineage = next;
        });
        self.thaw();
        if let Err(e) = demoted {
            // The new primary runs; this site could not record it: it must not take
            // writes in the old generation. Fenced until restarted (its log still says
            // primary of the old generation, which every site now refuses).
            self.fence(format!("switched over to {to} but recording it here failed: {e}"));
            return Err(e);
        }
        let held = t0.elapsed();
        info!(group = %self.name(), to, generation = next.generation(), start, held = ?held, "switchover complete: following the new primary");
        Ok(Switchover {
            to: to.to_string(),
            generation: next.generation(),
            start,
            held_ms: held.as_secs_f64() * 1e3,
            drain_ms: drain.as_secs_f64() * 1e3,
            drained,
            behind,
        })
    }

    /// After a promotion without answer: ask `to` until `until` whether it took over.
    /// `Ok(true)`: it did (this site must follow); `Ok(false)`: it did not (roll back).
    /// No answer by then: this site stays fenced (writes refused) with the reason, since
    /// the other may be primary; it follows it as soon as it connects.
    fn promotion_outcome(&self, h: &dyn SlinkHandler, to: &str, until: Instant) -> Result<bool, GroupError> {
        loop {
            if self.site().role == SiteRole::Secondary {
                return Ok(true);
            }
            match h.peer_promoted() {
                Ok(p) => return Ok(p),
                Err(e) if Instant::now() >= until => {
                    let why = format!(
                        "switchover to {to}: the promotion got no answer and {to} cannot be asked ({e}); it may be \
                         the primary now: writes stay refused here until it connects (then this site follows it)"
                    );
                    self.fence(why.clone());
                    self.thaw();
                    return Err(err(why));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Takeover at a secondary whose primary is gone: apply every entry received, then
    /// become the primary of a new generation. Refused while the primary is connected
    /// or the devices are mid-resync, unless `force`.
    pub fn takeover(&self, force: bool) -> Result<Takeover, GroupError> {
        let site = self.site();
        // A fenced primary (a switchover whose outcome it could not learn) may take a new
        // generation by force: if the other site did promote itself, the two are then a
        // split brain, found and reported at the next handshake, never merged.
        let fenced_primary = site.role == SiteRole::Primary && self.fenced().is_some();
        if site.role != SiteRole::Secondary && !(fenced_primary && force) {
            return Err(err(if fenced_primary {
                format!(
                    "group {} is a fenced primary here ({}): --force takes a new generation (a split brain if \
                     the other site took one too)",
                    self.name(),
                    self.fenced().unwrap_or_default()
                )
            } else {
                format!("group {} is already the primary here", self.name())
            }));
        }
        let f = self.following.lock().clone();
        // A primary heard from lately is alive (it sends at least every third of its link
        // timeout); one silent for longer is taken as gone even if its connection stays.
        let heard = f.last_heard.and_then(|t| t.elapsed().ok()).is_some_and(|d| d < PRIMARY_ALIVE);
        if let (Some((p, _)), true, false) = (&f.primary, heard, force) {
            return Err(err(format!(
                "primary {p} is connected and answering: a planned switchover at the primary loses nothing \
                 (dmrep switchover {} --to <this site>); --force takes over anyway",
                self.name()
            )));
        }
        if site.inconsistent && !force {
            return Err(err(format!(
                "the devices of group {} are being resynchronised: not a write-order consistent copy; \
                 --force takes over anyway",
                self.name()
            )));
        }
        let t0 = Instant::now();
        // (What was received is durable here; the devices get it in order, before any
        // new write, as at any primary: no need to wait for them.)
        let _g = self.roles.lock();
        let start = self.received() + 1;
        let next = site.lineage.promoted(crate::replicator::log::rand_nonce(), start);
        self.set_site(|s| {
            s.role = SiteRole::Primary;
            s.lineage = next;
            s.discard_local = false;
        })?;
        let lost = f.primary_last_seq.saturating_sub(start - 1);
        warn!(group = %self.name(), generation = next.generation(), start, lost_entries = lost,
            "took over as primary: the old primary is fenced when it returns");
        Ok(Takeover {
            generation: next.generation(),
            start,
            primary_last_seq: f.primary_last_seq,
            lost_entries: lost,
            took_ms: t0.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Split brain resolved against this site: it becomes a secondary whose writes since
    /// the split are discarded when the winning primary next connects (only the regions
    /// either side wrote since then are copied).
    pub fn resolve_discard_local(&self) -> Result<(), GroupError> {
        if self.site().role == SiteRole::Secondary && !self.site().discard_local && self.split_brain().is_none() {
            return Err(err(format!(
                "group {} is a secondary here and no split brain was found: nothing to resolve",
                self.name()
            )));
        }
        self.set_site(|s| {
            s.role = SiteRole::Secondary;
            s.discard_local = true;
        })?;
        warn!(group = %self.name(), "split brain resolved against this site: its writes since the split will be \
            replaced by the primary's");
        Ok(())
    }

    /// This site's role, lineage and peers.
    pub fn role_info(&self) -> RoleInfo {
        let site = self.site();
        let f = self.following.lock().clone();
        let peers = {
            let m = self.inner.m.lock();
            m.slinks
                .iter()
                .filter_map(|(nr, rt)| {
                    let s = rt.handler.peer_site()?;
                    let following = f.primary.as_ref().is_some_and(|p| p.0 == s);
                    Some(PeerInfo {
                        slink: *nr,
                        role: match site.role {
                            SiteRole::Primary => "secondary",
                            SiteRole::Secondary if following => "primary",
                            SiteRole::Secondary => "unknown",
                        },
                        connected: if rt.standby { following } else { rt.accessible() },
                        standby: rt.standby,
                        last_error: rt.last_error().map(str::to_string),
                        site: s,
                    })
                })
                .collect()
        };
        RoleInfo {
            role: site.role,
            generation: site.generation(),
            lineage: site.lineage,
            fenced: self.fenced(),
            split_brain: self.split_brain(),
            inconsistent: site.inconsistent,
            discard_local: site.discard_local,
            received: self.received(),
            applied: self.applied_origin(),
            peers,
        }
    }
}

/// Sorted, overlapping and adjacent regions merged; at most [`MAX_REGIONS`] (rounded out
/// to coarser boundaries until they fit: a few more bytes copied, never fewer).
pub fn coalesce(mut v: Vec<Region>) -> Vec<Region> {
    let mut grain = 0u32;
    loop {
        let g = 1u64 << grain;
        let mut by: BTreeMap<(u32, u64), u64> = BTreeMap::new();
        for r in &v {
            let start = r.offset / g * g;
            let end = (r.offset + r.len).div_ceil(g) * g;
            let e = by.entry((r.dev_nr, start)).or_insert(end);
            *e = (*e).max(end);
        }
        let mut out: Vec<Region> = Vec::new();
        for ((dev_nr, start), end) in by {
            match out.last_mut() {
                Some(l) if l.dev_nr == dev_nr && l.offset + l.len >= start => {
                    l.len = l.len.max(end - l.offset);
                }
                _ => out.push(Region { dev_nr, offset: start, len: end - start }),
            }
        }
        if out.len() <= MAX_REGIONS || grain >= 40 {
            return out;
        }
        v = out;
        grain = grain.max(16) + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_coalesce() {
        let r = |dev_nr, offset, len| Region { dev_nr, offset, len };
        let v = vec![r(0, 4096, 4096), r(0, 0, 4096), r(1, 0, 512), r(0, 100_000, 10), r(0, 6000, 4096)];
        assert_eq!(coalesce(v), vec![r(0, 0, 10096), r(0, 100_000, 10), r(1, 0, 512)]);
        let many: Vec<Region> = (0..200_000u64).map(|i| r(0, i * 8192, 512)).collect();
        let c = coalesce(many);
        assert!(c.len() <= MAX_REGIONS);
        let covered = |o: u64| c.iter().any(|x| x.offset <= o && o + 512 <= x.offset + x.len);
        assert!((0..200_000u64).all(|i| covered(i * 8192)), "every region still covered");
    }
}
