//! The `net` SLINK handler at a primary: ships the group's log to a remote dmrep site.
//!
//! The group hands this handler batches of entries (several epochs at once: the remote
//! site keeps them in a log of its own, from which it recovers to a prefix state by
//! itself, see [`SlinkHandler::keeps_log`]). `apply` sends one `entries` frame and waits
//! for the `ack` saying the secondary's log holds them durably; then the group moves this
//! SLINK's cursor. So the application's write, for a synchronous SLINK, is acknowledged
//! only once it is durable at the remote site.
//!
//! Connecting is the group's `probe`: TCP, mutual TLS (the peer must present the
//! certificate of the site the table names), then `hello`/`welcome`. The welcome says
//! what the secondary has durably received; entries up to it are not sent again, so a
//! reconnect resumes where the secondary is, with no full copy. The hello carries this
//! site's lineage (see `dmrep_formats::lineage`): a secondary of an older generation
//! adopts it; one whose history went further than ours (an old primary failing back, a
//! discarded split brain) lists the regions it wrote past the common point, and the
//! group copies those back (with what it wrote since) instead of shipping in order. A
//! secondary that lacks entries this log no longer holds (its log was recreated, or it
//! fell further behind than a standby log kept) gets a full resync, with a warning.
//!
//! Refusals that concern the group, not the link, reach it as news: a site of a newer
//! generation fences this one; a split brain is reported. At a secondary the handler
//! stands by: it connects to nobody.
//!
//! A link that answers nothing for the SLINK's `timeout` is down: `apply` fails, the
//! group marks the SLINK inaccessible and probes (reconnects) with backoff, and its
//! log-full and dirty-log machinery takes over as for any SLINK. While idle, a heartbeat
//! every third of the timeout keeps the link checked and tells the secondary the newest
//! seq here (its lag).

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use dmrep_core::{Claim, TargetError};
use dmrep_formats::lineage::{relate, Lineage, Relation};
use dmrep_formats::replicator_table::net::{Compress, NetParams};
use dmrep_formats::replog::SiteRole;
use dmrep_formats::site::{
    self, Compression, DeviceInfo, EntryBatch, Heartbeat, Hello, Message, Peers, Promote, RefuseCode, Region, Rejoin,
    ResyncData, Role, VerifyRequest, WireEntry, WireKind,
};
use dmrep_targets::replicator::log::{EntryKind, RingLog};
use dmrep_targets::replicator::slink::{ApplyEntry, LinkNews, LinkSetup, SlinkHandler, Transport};

use crate::board::{Board, Boards};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::frames;
use crate::rate::TokenBucket;
use crate::tls::{SiteTls, TlsReader, TlsWriter};

/// Builds `net` SLINK handlers for this daemon's site.
pub struct NetTransport {
    tls: Arc<SiteTls>,
    boards: Arc<Boards>,
}

impl NetTransport {
    /// `boards`: shared with this daemon's receiver (what each site has received).
    pub fn new(tls: Arc<SiteTls>, boards: Arc<Boards>) -> NetTransport {
        NetTransport { tls, boards }
    }
}

/// How often, at most, a primary tells a secondary where the other sites are.
const PEERS_EVERY: Duration = Duration::from_millis(200);

impl Transport for NetTransport {
    fn create(&self, setup: LinkSetup<'_>) -> Result<Arc<dyn SlinkHandler>, TargetError> {
        let params = NetParams::parse(setup.slink, setup.params)
            .map_err(|e| TargetError::params("replicator", e.to_string()))?;
        if params.site == self.tls.site() {
            return Err(TargetError::params(
                "replicator",
                format!("slink {}: site={} is this daemon's own site", setup.slink, params.site),
            ));
        }
        let link = Arc::new(NetSlink {
            group: setup.group.to_string(),
            slink: setup.slink,
            bucket: params.rate.map(|r| Mutex::new(TokenBucket::new(r))),
            params,
            tls: self.tls.clone(),
            log: setup.log,
            dev_bytes: setup.dev_bytes,
            devs: RwLock::new(BTreeSet::new()),
            conn: Mutex::new(None),
            stats: Mutex::new(LinkStats::default()),
            board: self.boards.of(setup.group),
            news: Mutex::new(News::default()),
            peers_sent: Mutex::new(None),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
        });
        let weak = Arc::downgrade(&link);
        std::thread::Builder::new()
            .name(format!("{}-slink{}-hb", setup.group, setup.slink))
            .spawn(move || heartbeats(weak))
            .map_err(|e| TargetError::params("replicator", format!("cannot start the heartbeat thread: {e}")))?;
        Ok(link)
    }
}

/// Counters of one link (status, metrics).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkStats {
    /// Data bytes of entries and resync regions shipped.
    pub bytes_raw: u64,
    /// Bytes on the wire (frames, after compression).
    pub bytes_wire: u64,
    pub connects: u64,
    pub last_error: Option<String>,
    /// Round trip of the last acknowledged batch, microseconds.
    pub last_rtt_us: u64,
}

struct Conn {
    w: TlsWriter,
    r: TlsReader,
    /// What the secondary has durably received (its acks).
    received: u64,
    /// Batches sent and not yet acknowledged: the last seq they carry, the group's last
    /// seq for them (entries not for this site may follow), when they were sent.
    pending: std::collections::VecDeque<(u64, u64, Instant)>,
    /// The group's seq up to which everything shipped is acknowledged.
    durable: u64,
    compression: Compression,
    last_used: Instant,
}

/// What the link learned for the group, in order (see [`LinkNews`]).
#[derive(Default)]
struct News {
    queue: Vec<LinkNews>,
    /// A resync the site needs is queued: nothing ships in order until the group took it.
    hold: bool,
    /// A split brain was reported (a later good connection says it is over).
    split_brain: bool,
}

/// A `net` SLINK: one remote site.
pub struct NetSlink {
    group: String,
    slink: u16,
    params: NetParams,
    tls: Arc<SiteTls>,
    log: Arc<RingLog>,
    dev_bytes: u64,
    devs: RwLock<BTreeSet<u32>>,
    /// The connection, while up. Held for a whole request/answer exchange.
    conn: Mutex<Option<Conn>>,
    stats: Mutex<LinkStats>,
    bucket: Option<Mutex<TokenBucket>>,
    /// What each site of the group has received.
    board: Arc<Board>,
    /// What the group must act on (see [`LinkNews`]), and whether shipping must wait for
    /// it (a resync the site needs: nothing ships in order until the group took it).
    news: Mutex<News>,
    /// When the last `peers` frame went out.
    peers_sent: Mutex<Option<Instant>>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl NetSlink {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.params.timeout_ms)
    }

    fn who(&self) -> String {
        format!("site {} at {}", self.params.site, self.params.addr)
    }

    /// Connect and shake hands; the connection, or why not.
    fn connect(&self) -> io::Result<Conn> {
        let stream =
            self.tls.connect(&self.params.addr, &self.params.site, self.timeout()).map_err(|e| other(e.to_string()))?;
        let (w, mut r) = stream.split();
        r.set_read_timeout(Some(self.timeout()))?;
        let site = self.log.site();
        if site.role != SiteRole::Primary {
            return Err(other(format!("group {} is a {} here: it ships nothing", self.group, site.role.name())));
        }
        if site.inconsistent {
            return Err(other(format!(
                "group {} here is being resynchronised itself: not a consistent source",
                self.group
            )));
        }
        let devices: Vec<DeviceInfo> =
            self.devs.read().iter().map(|d| DeviceInfo { dev_nr: *d, bytes: self.dev_bytes }).collect();
        let features = match self.params.compress {
            Compress::None => 0,
            Compress::Zstd => site::features::ZSTD,
            Compress::Lz4 => site::features::LZ4,
        };
        let hello = Message::Hello(Hello {
            proto_min: site::PROTO_MIN,
            proto_max: site::PROTO_MAX,
            features,
            group_name: self.group.clone(),
            group_uuid: site.group_uuid,
            site: self.tls.site().to_string(),
            role: Role::Primary,
            lineage: site.lineage,
            slink: self.slink,
            devices,
        });
        frames::send(&w, &hello, Compression::None)?;
        let welcome = match frames::read(&mut r) {
            Ok((Message::Welcome(w), _)) => w,
            Ok((Message::Refused(f), _)) => {
                let why = format!("{} refused group {}: {} ({})", self.who(), self.group, f.reason, f.code);
                match f.code {
                    RefuseCode::StaleGeneration => self.tell(LinkNews::Fenced(why.clone()), false),
                    RefuseCode::SplitBrain => self.tell(LinkNews::SplitBrain(Some(why.clone())), false),
                    _ => {}
                }
                return Err(other(why));
            }
            Ok((m, _)) => return Err(other(format!("{} answered hello with {}", self.who(), m.kind()))),
            Err(e) => return Err(other(format!("{}: no welcome: {e}", self.who()))),
        };
        if welcome.group_uuid != site.group_uuid {
            return Err(other(format!("{} belongs to another group of the same name", self.who())));
        }
        match relate(&site.lineage, &welcome.lineage) {
            Relation::Same => {}
            Relation::PeerNewer { .. } => {
                let why = format!(
                    "{} follows generation {} of group {}, newer than ours ({}): this site is not its primary any more",
                    self.who(),
                    welcome.lineage.generation(),
                    self.group,
                    site.generation()
                );
                self.tell(LinkNews::Fenced(why.clone()), false);
                return Err(other(why));
            }
            r => {
                return Err(other(format!(
                    "{} answered with a lineage that is not ours ({r:?}): not following this primary",
                    self.who()
                )))
            }
        }
        if std::mem::take(&mut self.news.lock().split_brain) {
            self.tell(LinkNews::SplitBrain(None), false);
        }
        self.check_position(&welcome)?;
        let compression = if welcome.features & site::features::ZSTD != 0 {
            Compression::Zstd
        } else if welcome.features & site::features::LZ4 != 0 {
            Compression::Lz4
        } else {
            Compression::None
        };
        self.stats.lock().connects += 1;
        tracing::info!(group = %self.group, slink = self.slink, peer = %self.params.site, addr = %self.params.addr,
            received = welcome.received, applied = welcome.applied, ?compression, "site link up");
        Ok(Conn {
            w,
            r,
            received: welcome.received,
            pending: Default::default(),
            durable: 0,
            compression,
            last_used: Instant::now(),
        })
    }

    /// Record news for the group; `hold`: nothing ships until the group took it.
    fn tell(&self, news: LinkNews, hold: bool) {
        let mut n = self.news.lock();
        if let LinkNews::SplitBrain(Some(_)) = news {
            n.split_brain = true;
        }
        n.queue.push(news);
        n.hold |= hold;
    }

    /// Where the secondary stands against this log: a history that went past the common
    /// point (diverged regions listed), or a gap this log cannot fill, means a resync.
    fn check_position(&self, w: &site::Welcome) -> io::Result<()> {
        let tail = self.log.received();
        if !w.diverged.is_empty() {
            let bytes: u64 = w.diverged.iter().map(|r| r.len).sum();
            let why = format!(
                "{} replaced its history after seq {} with ours: {} regions ({bytes} bytes) it wrote are copied back",
                self.who(),
                w.received,
                w.diverged.len()
            );
            self.tell(LinkNews::Resync { after: w.received, regions: w.diverged.clone(), full: false, why }, true);
            return Ok(());
        }
        if w.received > tail {
            return Err(other(format!(
                "{} has history seq {} beyond ours ({tail}) in the same generation: refusing to ship",
                self.who(),
                w.received
            )));
        }
        // The first entry this SLINK still needs must follow what the site has.
        let Some(cursor) = self.log.cursor(self.slink) else { return Ok(()) };
        let first = self.log.entries_from(cursor + 1, 1).first().map_or(tail + 1, |e| e.origin_seq);
        if w.received + 1 < first {
            let why = format!(
                "{} has received up to seq {} but this log holds only from seq {first} on: a full resync",
                self.who(),
                w.received
            );
            tracing::warn!(group = %self.group, slink = self.slink, "{why}");
            self.tell(LinkNews::Resync { after: w.received, regions: Vec::new(), full: true, why }, true);
        }
        Ok(())
    }

    /// Tell the secondary where the other sites are, at most every [`PEERS_EVERY`].
    fn send_peers(&self, slot: &mut Option<Conn>) -> io::Result<()> {
        {
            let mut last = self.peers_sent.lock();
            if last.is_some_and(|t| t.elapsed() < PEERS_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let mut positions = self.board.others(&self.params.site);
        positions.truncate(site::MAX_PEERS);
        if positions.is_empty() {
            return Ok(());
        }
        self.send(slot, &Message::Peers(Peers { positions }), 0)
    }

    /// Send `msg` (rate-capped); bytes counted. Errors drop the connection.
    fn send(&self, slot: &mut Option<Conn>, msg: &Message, raw: u64) -> io::Result<()> {
        let Some(c) = slot.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, format!("not connected to {}", self.who())));
        };
        let frame = frames::encode(msg, c.compression);
        let wire = frame.len() as u64;
        if let Some(b) = &self.bucket {
            let wait = b.lock().take(wire);
            std::thread::sleep(wait);
        }
        match c.w.send(frame) {
            Ok(()) => {
                c.last_used = Instant::now();
                let mut s = self.stats.lock();
                s.bytes_raw += raw;
                s.bytes_wire += wire;
                Ok(())
            }
            Err(e) => Err(self.lost(slot, other(format!("{}: {e}", self.who())))),
        }
    }

    /// Read frames until `done` says the awaited one came. Acknowledgements of batches
    /// in flight are taken into account whatever is awaited. Errors drop the connection.
    fn read_until(&self, slot: &mut Option<Conn>, mut done: impl FnMut(&mut Conn, &Message) -> bool) -> io::Result<()> {
        let Some(c) = slot.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::NotConnected, format!("not connected to {}", self.who())));
        };
        let result = loop {
            match frames::read(&mut c.r) {
                Ok((m, _)) => {
                    if let Message::Goodbye(g) = &m {
                        break Err(other(format!("{} closed the link: {}", self.who(), g.reason)));
                    }
                    if let Message::Ack(a) = &m {
                        c.received = c.received.max(a.received);
                        self.board.set(&self.params.site, c.received);
                        while let Some(&(last, upto, t0)) = c.pending.front() {
                            if last > c.received {
                                break;
                            }
                            c.pending.pop_front();
                            c.durable = c.durable.max(upto);
                            self.stats.lock().last_rtt_us = t0.elapsed().as_micros() as u64;
                        }
                    }
                    if done(c, &m) {
                        c.last_used = Instant::now();
                        break Ok(());
                    }
                }
                Err(e) if e.timed_out() => {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("{} answered nothing for {:?}", self.who(), self.timeout()),
                    ))
                }
                Err(e) => break Err(other(format!("{}: {e}", self.who()))),
            }
        };
        result.map_err(|e| self.lost(slot, e))
    }

    /// The connection is lost: say so, drop it (batches in flight with it: the group
    /// ships again from what the site acknowledged).
    fn lost(&self, slot: &mut Option<Conn>, e: io::Error) -> io::Error {
        tracing::warn!(group = %self.group, slink = self.slink, "site link down: {e}");
        self.stats.lock().last_error = Some(e.to_string());
        *slot = None;
        e
    }

    /// Send `msg` and read until `done` says the answer came.
    fn exchange(
        &self,
        slot: &mut Option<Conn>,
        msg: &Message,
        raw: u64,
        done: impl FnMut(&mut Conn, &Message) -> bool,
    ) -> io::Result<()> {
        self.send(slot, msg, raw)?;
        self.read_until(slot, done)
    }

    /// Connect if not connected (a new link, or one the group is about to use after
    /// the last connection ended): the first write does not fail for want of a probe.
    fn ensure(&self, slot: &mut Option<Conn>) -> io::Result<()> {
        if slot.is_none() {
            match self.connect() {
                Ok(c) => {
                    self.board.forget(&self.params.site);
                    self.board.set(&self.params.site, c.received);
                    *slot = Some(c)
                }
                Err(e) => {
                    self.stats.lock().last_error = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        if self.news.lock().hold {
            return Err(other(format!("{} needs a resync first", self.who())));
        }
        Ok(())
    }

    /// Counters of the link.
    pub fn stats(&self) -> LinkStats {
        self.stats.lock().clone()
    }
}

impl Drop for NetSlink {
    fn drop(&mut self) {
        *self.stop.lock() = true;
        self.stop_cv.notify_all();
    }
}

/// While the link is up and idle, a heartbeat every third of the timeout: a dead link is
/// found before the next write needs it, and the secondary learns the newest seq here.
fn heartbeats(link: Weak<NetSlink>) {
    loop {
        let Some(l) = link.upgrade() else { return };
        let every = l.timeout() / 3;
        {
            let mut stop = l.stop.lock();
            if *stop {
                return;
            }
            l.stop_cv.wait_for(&mut stop, every.max(Duration::from_millis(50)));
            if *stop {
                return;
            }
        }
        let mut slot = l.conn.lock();
        let idle = slot.as_ref().is_some_and(|c| c.last_used.elapsed() >= every);
        if !idle {
            continue;
        }
        if l.log.site().role != SiteRole::Primary {
            // Demoted: this link ships nothing any more.
            if let Some(c) = slot.take() {
                c.w.shutdown();
            }
            continue;
        }
        let now_us = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let last = l.log.received();
        let durable = slot.as_ref().map_or(0, |c| c.received);
        let hb = Message::Heartbeat(Heartbeat { time_us: now_us, last_seq: last, durable });
        if l.send_peers(&mut slot).is_ok() {
            let _ = l.exchange(&mut slot, &hb, 0, |_, m| matches!(m, Message::Heartbeat(_)));
        }
    }
}

fn wire_kind(k: EntryKind) -> WireKind {
    match k {
        EntryKind::Write => WireKind::Write,
        EntryKind::WriteZeroes => WireKind::WriteZeroes,
        EntryKind::Discard => WireKind::Discard,
        EntryKind::Marker => WireKind::Marker,
    }
}

impl SlinkHandler for NetSlink {
    fn kind(&self) -> &'static str {
        "net"
    }

    fn attach(&self, dev_nr: u32, device: &str, _need_bytes: u64) -> Result<(), TargetError> {
        if device.parse::<u32>().ok() != Some(dev_nr) {
            return Err(TargetError::params(
                "replicator",
                format!(
                    "slink {}: device {dev_nr}: a net slink names the remote device by its dev_nr, which must be \
                     {dev_nr} (devices pair by dev_nr across sites), found {device:?}",
                    self.slink
                ),
            ));
        }
        self.devs.write().insert(dev_nr);
        Ok(())
    }

    fn keep_claim(&self, _dev_nr: u32, _claim: Claim) {}

    fn attach_missing(&self, dev_nr: u32, _device: &str, _need_bytes: u64) {
        self.devs.write().insert(dev_nr);
    }

    fn detach(&self, dev_nr: u32) {
        self.devs.write().remove(&dev_nr);
    }

    fn has_device(&self, dev_nr: u32) -> bool {
        self.devs.read().contains(&dev_nr)
    }

    fn devices(&self) -> Vec<u32> {
        self.devs.read().iter().copied().collect()
    }

    fn keeps_log(&self) -> bool {
        true
    }

    fn apply(&self, entries: &[ApplyEntry<'_>]) -> io::Result<()> {
        let last = entries.last().map_or(0, |e| e.seq);
        self.ship(entries, last)?;
        self.collect().map(|_| ())
    }

    /// Send the batch; then, with two batches in flight, wait for the older one's
    /// acknowledgement (the link carries one batch while the other is acknowledged).
    fn ship(&self, entries: &[ApplyEntry<'_>], last: u64) -> io::Result<u64> {
        let mut slot = self.conn.lock();
        self.ensure(&mut slot)?;
        let received = slot.as_ref().map_or(0, |c| c.received);
        let fresh: Vec<&ApplyEntry<'_>> = entries.iter().filter(|e| e.seq > received).collect();
        match fresh.last().map(|e| e.seq) {
            None => {
                // The secondary had them all already (an ack lost before a reconnect):
                // durable once the batches before them are.
                let c = slot.as_mut().expect("connected");
                if c.pending.is_empty() {
                    c.durable = c.durable.max(last);
                } else {
                    c.pending.push_back((received, last, Instant::now()));
                }
            }
            Some(fresh_last) => {
                let batch = EntryBatch {
                    entries: fresh
                        .iter()
                        .map(|e| WireEntry {
                            seq: e.seq,
                            epoch: e.epoch,
                            origin_time_us: e.time_us,
                            offset: e.offset,
                            dev_nr: e.dev_nr,
                            kind: wire_kind(e.kind),
                            len: e.len,
                            data: e.data.to_vec(),
                        })
                        .collect(),
                };
                let raw: u64 = fresh.iter().map(|e| e.data.len() as u64).sum();
                self.send(&mut slot, &Message::Entries(batch), raw)?;
                self.send_peers(&mut slot)?;
                slot.as_mut().expect("connected").pending.push_back((fresh_last, last, Instant::now()));
            }
        }
        if slot.as_ref().is_some_and(|c| c.pending.len() > 1) {
            self.read_until(&mut slot, |c, _| c.pending.len() <= 1)?;
        }
        Ok(slot.as_ref().map_or(0, |c| c.durable))
    }

    fn collect(&self) -> io::Result<u64> {
        let mut slot = self.conn.lock();
        if slot.as_ref().is_some_and(|c| !c.pending.is_empty()) {
            self.read_until(&mut slot, |c, _| c.pending.is_empty())?;
        }
        match slot.as_ref() {
            Some(c) => Ok(c.durable),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, format!("not connected to {}", self.who()))),
        }
    }

    fn copy_region(&self, dev_nr: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut slot = self.conn.lock();
        self.ensure(&mut slot)?;
        let msg = Message::ResyncData(ResyncData { dev_nr, offset, data: data.to_vec() });
        self.exchange(
            &mut slot,
            &msg,
            data.len() as u64,
            |_, m| matches!(m, Message::ResyncAck(a) if a.dev_nr == dev_nr && a.offset == offset),
        )
    }

    fn rejoined(&self, seq: u64) -> io::Result<()> {
        let mut slot = self.conn.lock();
        self.ensure(&mut slot)?;
        self.exchange(&mut slot, &Message::Rejoin(Rejoin { seq }), 0, |c, m| {
            let done = matches!(m, Message::Ack(a) if a.received >= seq);
            if done {
                c.durable = c.durable.max(seq);
            }
            done
        })
    }

    fn read(&self, _dev_nr: u32, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "a net slink's devices are read at their site"))
    }

    fn probe(&self) -> io::Result<()> {
        self.ensure(&mut self.conn.lock())
    }

    fn describe(&self) -> String {
        // Never wait for the connection here: status reads this under the group's lock
        // while an exchange may hold the connection for up to the link timeout.
        let up = self.conn.try_lock().is_none_or(|c| c.is_some());
        format!(
            "site {} at {} ({})",
            self.params.site,
            self.params.addr,
            if up { "connected" } else { "not connected" }
        )
    }

    fn known_down(&self) -> Option<String> {
        // (Busy: an exchange is under way, the link is in use.)
        let slot = self.conn.try_lock()?;
        if slot.is_some() {
            return None;
        }
        // A link never tried yet counts as down too: the group probes it (connects) at
        // once, so a wrong address or certificate shows before the first write needs it.
        let s = self.stats.lock();
        match &s.last_error {
            Some(why) => Some(why.clone()),
            None if s.connects == 0 => Some(format!("not connected to {} yet", self.who())),
            None => None,
        }
    }

    fn link_status(&self) -> Option<serde_json::Value> {
        let connected = self.conn.try_lock().is_none_or(|c| c.is_some());
        let mut v = serde_json::to_value(self.stats()).ok()?;
        v["connected"] = connected.into();
        v["site"] = self.params.site.clone().into();
        v["addr"] = self.params.addr.clone().into();
        v["compress"] = self.params.compress.name().into();
        v["rate_limit"] = self.params.rate.into();
        Some(v)
    }

    fn device_path(&self, dev_nr: u32) -> Option<String> {
        self.has_device(dev_nr).then(|| format!("{}:{dev_nr}", self.params.site))
    }

    fn peer_site(&self) -> Option<String> {
        Some(self.params.site.clone())
    }

    fn hand_over(&self, lineage: Lineage) -> io::Result<Lineage> {
        // Errors before the promotion is sent: nothing changed there (NotConnected).
        let not_sent = |e: io::Error| io::Error::new(io::ErrorKind::NotConnected, e.to_string());
        let mut slot = self.conn.lock();
        self.ensure(&mut slot).map_err(not_sent)?;
        if slot.as_ref().is_some_and(|c| !c.pending.is_empty()) {
            self.read_until(&mut slot, |c, _| c.pending.is_empty()).map_err(not_sent)?;
        }
        let mut got = None;
        self.exchange(&mut slot, &Message::Promote(Promote { lineage }), 0, |_, m| match m {
            Message::Promoted(p) => {
                got = Some(p.lineage);
                true
            }
            _ => false,
        })?;
        // The session ends: the new primary connects to this site when it ships.
        if let Some(c) = slot.take() {
            c.w.shutdown();
        }
        got.ok_or_else(|| other(format!("{} did not confirm its promotion", self.who())))
    }

    fn checksum(&self, dev_nr: u32, offset: u64, len: u64) -> io::Result<u32> {
        let region = Region { dev_nr, offset, len };
        let mut slot = self.conn.lock();
        self.ensure(&mut slot)?;
        let mut crc = None;
        self.exchange(&mut slot, &Message::VerifyRequest(VerifyRequest { region }), 0, |_, m| match m {
            Message::VerifyReply(v) if v.region == region => {
                crc = Some(v.crc);
                true
            }
            _ => false,
        })?;
        crc.ok_or_else(|| other(format!("{} sent no checksum", self.who())))
    }

    fn take_news(&self) -> Option<LinkNews> {
        let mut n = self.news.lock();
        if n.queue.is_empty() {
            return None;
        }
        let first = n.queue.remove(0);
        if n.queue.is_empty() {
            n.hold = false;
        }
        Some(first)
    }

    fn peer_promoted(&self) -> io::Result<bool> {
        let mut slot = self.conn.lock();
        *slot = None;
        match self.connect() {
            Ok(c) => {
                *slot = Some(c);
                Ok(false)
            }
            Err(e) => {
                let fenced = self.news.lock().queue.iter().any(|n| matches!(n, LinkNews::Fenced(_)));
                if fenced {
                    Ok(true)
                } else {
                    Err(e)
                }
            }
        }
    }
}
