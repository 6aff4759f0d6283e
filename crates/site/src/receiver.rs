//! The site receiver at a secondary: `dmrep daemon --site-listen ADDR`.
//!
//! Each connection: mutual TLS (the peer's certificate names its site), then the peer's
//! `hello` is checked before anything else is accepted: the group must exist here and be
//! a secondary; the peer's certificate must name a site the group's table names as a
//! peer, and the hello must claim that same site; it must be a primary of the same group
//! (UUID; a new secondary is bound to the UUID of its first primary) and of a generation
//! not older than ours; every device it ships must exist here, large enough. A refusal
//! is sent as `refused` with the reason and logged in the same words.
//!
//! Then entries are appended to this site's own log through the group, with their
//! origin (the primary's seq and time), and acknowledged once durable there; the group's
//! SLINK 0 applies them to the devices in order, so a crash here at any instant recovers
//! to a prefix state without the primary. Entries this site already has (an ack lost in
//! a reconnect) are skipped. Resync regions are written straight to the devices after
//! every logged entry is applied; `rejoin` records where the copy stands.
//!
//! A newer connection for a group replaces an older one (the old one is usually a dead
//! link the primary gave up on).

use std::collections::BTreeMap;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dmrep_core::{Completion, IoSink, Op, Request};
use dmrep_formats::lineage::{relate, Relation};
use dmrep_formats::replog::SiteRole;
use dmrep_formats::site::{
    self, Ack, Compression, DeviceInfo, EntryBatch, Goodbye, Heartbeat, Hello, Message, Promoted, RefuseCode, Refused,
    Region, ResyncAck, Role, VerifyReply, Welcome, WireKind,
};
use dmrep_targets::replicator::group::{Group, GroupError};
use dmrep_targets::replicator::log::Origin;
use dmrep_targets::replicator::target::SiteGroup;
use parking_lot::{Condvar, Mutex};

use crate::board::{Board, Boards};
use crate::frames;
use crate::tls::{SiteTls, TlsReader, TlsWriter};

/// How long a TLS handshake and the hello may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A primary that sends nothing (not even heartbeats, which come every third of its
/// link timeout) for this long is gone: the connection is closed. Above the largest
/// link timeout a table would sensibly use.
const SILENCE: Duration = Duration::from_secs(90);

/// Most site connections served at once (handshakes included): a flood of connections
/// (a scan, a misconfigured peer in a loop) costs a bounded number of threads; each group
/// needs one, and a handshake ends within [`HANDSHAKE_TIMEOUT`].
const MAX_CONNECTIONS: usize = 64;

/// Finds the group a hello names.
pub type Lookup = Arc<dyn Fn(&str) -> Option<SiteGroup> + Send + Sync>;

/// Which connection is the current one of each group.
#[derive(Default)]
struct Sessions {
    current: Mutex<BTreeMap<String, u64>>,
    next: std::sync::atomic::AtomicU64,
}

/// Accept site connections on `listener` until `stop` is set (checked every 200 ms).
/// `boards` is shared with this daemon's `net` transport: where each site of a group
/// stands, as the primary says.
pub fn serve(
    listener: TcpListener,
    tls: Arc<SiteTls>,
    lookup: Lookup,
    boards: Arc<Boards>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let sessions = Arc::new(Sessions::default());
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, addr)) => {
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(%addr, "site connection refused: {MAX_CONNECTIONS} connections already open");
                    continue;
                }
                let (tls, lookup, sessions, mine) = (tls.clone(), lookup.clone(), sessions.clone(), active.clone());
                let boards = boards.clone();
                let spawned = std::thread::Builder::new().name(format!("site-{addr}")).spawn(move || {
                    match tcp.set_nonblocking(false) {
                        Ok(()) => connection(tcp, &tls, &lookup, &sessions, &boards),
                        Err(e) => tracing::warn!(%addr, "site connection: {e}"),
                    }
                    mine.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(%addr, "site connection dropped: cannot start its thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => {
                tracing::warn!("site listener: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(())
}

fn connection(tcp: TcpStream, tls: &SiteTls, lookup: &Lookup, sessions: &Sessions, boards: &Boards) {
    let addr = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let (stream, peer) = match tls.accept(tcp, HANDSHAKE_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%addr, "site connection refused: {e}");
            return;
        }
    };
    let (w, mut r) = stream.split();
    if r.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).is_err() {
        return;
    }
    let hello = match frames::read(&mut r) {
        Ok((Message::Hello(h), _)) => h,
        Ok((m, _)) => {
            refuse(&w, &addr, RefuseCode::Internal, format!("expected hello, got {}", m.kind()));
            return;
        }
        Err(e) => {
            tracing::warn!(%addr, site = %peer, "site connection: no hello: {e}");
            return;
        }
    };
    let Admitted { sg, version, diverged, session } = match admit(&hello, &peer, lookup) {
        Ok(x) => x,
        Err((code, reason)) => {
            refuse(&w, &addr, code, reason);
            return;
        }
    };
    let group = sg.group;
    let board = boards.of(&hello.group_name);
    let id = sessions.next.fetch_add(1, Ordering::Relaxed);
    {
        // Not while an older session's batch is being appended (see `receive`).
        let _g = group.receiving();
        sessions.current.lock().insert(hello.group_name.clone(), id);
    }
    let site = group.site();
    let devices = group.device_numbers().into_iter().map(|d| DeviceInfo { dev_nr: d, bytes: sg.dev_bytes }).collect();
    let welcome = Message::Welcome(Welcome {
        proto: version,
        features: hello.features & site::KNOWN_FEATURES,
        site: tls.site().to_string(),
        role: Role::Secondary,
        lineage: site.lineage,
        group_uuid: site.group_uuid,
        received: group.received(),
        applied: group.applied_origin(),
        devices,
        diverged,
    });
    if frames::send(&w, &welcome, Compression::None).is_err() {
        return;
    }
    tracing::info!(group = %hello.group_name, primary = %peer, %addr, received = group.received(), "following primary");
    group.update_following(|f| {
        f.primary = Some((peer.clone(), addr.clone()));
        f.connected_since = Some(SystemTime::now());
        f.last_heard = Some(SystemTime::now());
        f.last_error = None;
    });
    let link = Link { group: &group, dev_bytes: sg.dev_bytes, primary: &peer, board: &board, session };
    let end = follow(&link, &w, &mut r, || sessions.current.lock().get(&hello.group_name) == Some(&id));
    tracing::info!(group = %hello.group_name, primary = %peer, "primary link ended: {end}");
    if sessions.current.lock().get(&hello.group_name) == Some(&id) {
        group.update_following(|f| {
            f.primary = None;
            f.connected_since = None;
            f.last_error = Some(end.clone());
        });
    }
    let _ = frames::send(&w, &Message::Goodbye(Goodbye { reason: truncate(end, 1000) }), Compression::None);
    w.shutdown();
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn refuse(w: &TlsWriter, addr: &str, code: RefuseCode, reason: String) {
    tracing::warn!(%addr, site = %w.peer_site(), %code, "site connection refused: {reason}");
    let msg = Message::Refused(Refused { code, reason: truncate(reason, 1000) });
    let _ = frames::send(w, &msg, Compression::None);
    let _ = w.flush();
    w.shutdown();
}

/// A hello admitted: the group, the protocol version, and the regions this site wrote
/// past the history it now shares with the primary (copied back by the primary).
struct Admitted {
    sg: SiteGroup,
    version: u16,
    diverged: Vec<Region>,
    /// The session's number at the group (promotions asked in it are checked by it).
    session: u64,
}

/// Check a hello against this site and settle the two histories: a primary of an older
/// generation is refused; one of a newer generation fences this site if it is a primary
/// and makes it follow (its writes past the common history discarded and reported); a
/// split brain is refused and reported unless the operator chose to discard this side.
fn admit(hello: &Hello, peer: &str, lookup: &Lookup) -> Result<Admitted, (RefuseCode, String)> {
    let version = site::negotiate(site::PROTO_MIN, site::PROTO_MAX, hello.proto_min, hello.proto_max).ok_or((
        RefuseCode::BadVersion,
        format!(
            "protocol versions {}..{} offered, this site speaks {}..{}",
            hello.proto_min,
            hello.proto_max,
            site::PROTO_MIN,
            site::PROTO_MAX
        ),
    ))?;
    let name = &hello.group_name;
    let sg = lookup(name).ok_or((RefuseCode::UnknownGroup, format!("no group named {name} runs at this site")))?;
    let group = &sg.group;
    if hello.site != peer {
        return Err((
            RefuseCode::WrongSite,
            format!("the peer claims to be site '{}' but its certificate is for site '{peer}'", hello.site),
        ));
    }
    let towards = group.slink_of_site(peer).ok_or_else(|| {
        (RefuseCode::WrongSite, format!("site '{peer}' is not a peer of group {name} here (no slink names it)"))
    })?;
    // The site is back: if this site ships to it, try now (an old primary that returns
    // is made to follow at once, not at the end of a backoff).
    group.probe_now(towards);
    if hello.role != Role::Primary {
        return Err((
            RefuseCode::NotSecondary,
            format!("site '{peer}' connects as a {}, not as the primary", hello.role),
        ));
    }
    let here = group.site();
    let new_secondary = here.group_uuid == [0; 16];
    if !new_secondary && here.group_uuid != hello.group_uuid {
        return Err((
            RefuseCode::WrongGroupUuid,
            format!(
                "group {name} here is {}, the peer's is {}: another group of the same name",
                uuid_text(&here.group_uuid),
                uuid_text(&hello.group_uuid)
            ),
        ));
    }
    let ours = group.device_numbers();
    for d in &hello.devices {
        if !ours.contains(&d.dev_nr) {
            return Err((
                RefuseCode::DeviceMismatch,
                format!("device {} of group {name} does not exist here", d.dev_nr),
            ));
        }
        if d.bytes > sg.dev_bytes {
            return Err((
                RefuseCode::DeviceMismatch,
                format!("device {} is {} bytes at the primary, only {} here", d.dev_nr, d.bytes, sg.dev_bytes),
            ));
        }
    }
    let internal = |e: GroupError| (RefuseCode::Internal, format!("group {name}: {e}"));
    // The role decision and a promotion never interleave.
    let admission = group.admission();
    let session = *admission;
    let here = group.site();
    let primary_here = here.role == SiteRole::Primary;
    // Where our history leaves the primary's (None: it does not).
    let common = match (new_secondary, relate(&here.lineage, &hello.lineage)) {
        (true, _) => None,
        (false, Relation::Same) if primary_here => {
            return Err((
                RefuseCode::NotSecondary,
                format!(
                    "group {name} is the primary of the same generation here: two primaries cannot feed each other"
                ),
            ))
        }
        (false, Relation::Same) => None,
        (false, Relation::PeerOlder) => {
            return Err((
                RefuseCode::StaleGeneration,
                format!(
                    "site '{peer}' is a primary of generation {}, but this site {} generation {}: it was replaced",
                    hello.lineage.generation(),
                    if primary_here { "is the primary of" } else { "follows" },
                    here.generation()
                ),
            ))
        }
        (false, Relation::PeerNewer { common }) => Some(common),
        (false, Relation::SplitBrain { common }) if here.discard_local => Some(common),
        (false, Relation::SplitBrain { common }) => {
            let why = format!(
                "site '{peer}' accepted writes as the primary of generation {} while this site {} generation {}; \
                 both went on from the history up to seq {common}",
                hello.lineage.generation(),
                if primary_here { "is the primary of" } else { "follows" },
                here.generation()
            );
            group.set_split_brain(Some(why.clone()));
            return Err((RefuseCode::SplitBrain, why));
        }
        (false, Relation::Unrelated) => {
            return Err((
                RefuseCode::WrongGroupUuid,
                format!("site '{peer}' and this site have no generation of group {name} in common"),
            ))
        }
    };
    let mut diverged = Vec::new();
    if let Some(common) = common {
        if primary_here {
            group.fence(format!("site '{peer}' is the primary of generation {}", hello.lineage.generation()));
        }
        if group.received() > common || here.discard_local {
            diverged = group.discard_history(common, Some(towards)).map_err(internal)?;
        }
    }
    if common.is_none() {
        // A handshake after one whose welcome was lost: what this site still waits for.
        diverged = group.pending_diverged(towards);
    }
    if new_secondary || common.is_some() {
        let inconsistent = here.inconsistent || !diverged.is_empty();
        group
            .set_site(|s| {
                s.role = SiteRole::Secondary;
                s.group_uuid = hello.group_uuid;
                s.lineage = hello.lineage;
                s.inconsistent = inconsistent;
                s.discard_local = false;
            })
            .map_err(internal)?;
        group.set_split_brain(None);
        if let Some(common) = common {
            group.hold_diverged(towards, common, &diverged).map_err(internal)?;
        }
        tracing::info!(group = %name, uuid = %uuid_text(&hello.group_uuid), generation = hello.lineage.generation(),
            primary = %peer, diverged = diverged.len(), "following the primary's lineage");
    }
    drop(admission);
    Ok(Admitted { sg, version, diverged, session })
}

fn uuid_text(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).to_string()
}

/// Completions of the writes of one received batch.
#[derive(Default)]
struct Batch {
    state: Mutex<(usize, Option<String>)>,
    cv: Condvar,
}

impl IoSink for Batch {
    fn complete(&self, _req: Request, result: io::Result<()>) {
        let mut s = self.state.lock();
        s.0 -= 1;
        if let Err(e) = result {
            s.1.get_or_insert(e.to_string());
        }
        self.cv.notify_all();
    }
}

/// Whether `len` bytes at `offset` of device `dev_nr` exist here. What the primary sends
/// reaches the devices without the range checks of the NBD path: checked here, so that a
/// wrong peer can neither write past a device's end nor to a device this site lacks.
fn check_range(devices: &[u32], dev_bytes: u64, dev_nr: u32, offset: u64, len: u64) -> Result<(), String> {
    if !devices.contains(&dev_nr) {
        return Err(format!("device {dev_nr} does not exist here"));
    }
    if offset.checked_add(len).is_none_or(|end| end > dev_bytes) {
        return Err(format!("{len} bytes at {offset} are beyond device {dev_nr}'s {dev_bytes} bytes"));
    }
    Ok(())
}

/// Append a batch to the group's log; what it has received after. A batch with an
/// entry out of range is refused whole, before anything of it is appended.
fn receive(group: &Group, dev_bytes: u64, batch: EntryBatch, current: &dyn Fn() -> bool) -> Result<u64, String> {
    // One session appends at a time, and only the current one: after a switchover an
    // old primary's last batch and the new primary's first (which may repeat its seqs)
    // must not interleave, and what is here is read under the same lock.
    let _g = group.receiving();
    if !current() {
        return Err("a newer connection from a primary replaced this one".into());
    }
    let received = group.received();
    let sink = Arc::new(Batch::default());
    let fresh: Vec<_> = batch.entries.into_iter().filter(|e| e.seq > received).collect();
    let devices = group.device_numbers();
    for e in fresh.iter().filter(|e| e.kind != WireKind::Marker) {
        check_range(&devices, dev_bytes, e.dev_nr, e.offset, e.len as u64)
            .map_err(|why| format!("entry {} refused: {why}", e.seq))?;
    }
    sink.state.lock().0 = fresh.len();
    for (i, e) in fresh.into_iter().enumerate() {
        let origin = Origin { seq: e.seq, time_us: e.origin_time_us };
        let done = Completion::new(sink.clone(), i as u64);
        let op = match e.kind {
            WireKind::Write => Op::Write { fua: false },
            WireKind::WriteZeroes => Op::WriteZeroes { may_trim: false, fua: false },
            WireKind::Discard => Op::Discard,
            WireKind::Marker => {
                group.submit_received_marker(e.data, done, origin);
                continue;
            }
        };
        let req = Request::new(op, e.offset, e.len as u64, e.data, i as u64);
        group.submit_received(e.dev_nr, req, done, origin);
    }
    let mut s = sink.state.lock();
    while s.0 > 0 {
        sink.cv.wait(&mut s);
    }
    match s.1.take() {
        Some(e) => Err(format!("appending received entries failed: {e}")),
        None => Ok(group.received()),
    }
}

/// One primary's session, as `follow` serves it.
struct Link<'a> {
    group: &'a Group,
    dev_bytes: u64,
    /// The primary's site name.
    primary: &'a str,
    board: &'a Board,
    session: u64,
}

impl Link<'_> {
    /// The primary has everything this site received; the other sites are where the
    /// primary says: the standby SLINKs keep only what their sites lack.
    fn positions(&self, positions: &[(String, u64)]) {
        for (site, h) in positions {
            self.board.set(site, *h);
            if let Some(nr) = self.group.slink_of_site(site) {
                self.group.standby_peer_at(nr, *h);
            }
        }
    }

    /// The devices are (or are no longer) being copied outside write order.
    fn set_inconsistent(&self, on: bool) -> Result<(), String> {
        if self.group.site().inconsistent == on {
            return Ok(());
        }
        self.group.set_site(|s| s.inconsistent = on).map_err(|e| format!("recording the resync state: {e}"))
    }

    /// Planned switchover: this site has every entry; it becomes the primary of the new
    /// generation the lineage ends with, durably, before it answers.
    fn promote(&self, lineage: dmrep_formats::lineage::Lineage) -> Result<Message, String> {
        self.group.promote_by(self.session, lineage).map_err(|e| e.to_string())?;
        tracing::info!(group = %self.group.name(), generation = lineage.generation(), from = %self.primary,
            "promoted to primary by a planned switchover");
        Ok(Message::Promoted(Promoted { lineage }))
    }
}

/// Serve one primary until the link ends; why it ended.
fn follow(link: &Link<'_>, w: &TlsWriter, r: &mut TlsReader, current: impl Fn() -> bool) -> String {
    let (group, dev_bytes) = (link.group, link.dev_bytes);
    if let Err(e) = r.set_read_timeout(Some(Duration::from_secs(1))) {
        return e.to_string();
    }
    let mut silent = Duration::ZERO;
    loop {
        if !current() {
            return "a newer connection from the primary replaced this one".into();
        }
        if group.site().role != SiteRole::Secondary {
            return "this site is the primary now".into();
        }
        let msg = match frames::read(r) {
            Ok((m, _)) => m,
            Err(e) if e.timed_out() => {
                silent += Duration::from_secs(1);
                if silent >= SILENCE {
                    return format!("the primary sent nothing for {SILENCE:?}");
                }
                continue;
            }
            Err(e) => return e.to_string(),
        };
        silent = Duration::ZERO;
        group.update_following(|f| f.last_heard = Some(SystemTime::now()));
        let reply = match msg {
            Message::Entries(batch) => {
                let last = batch.entries.last().map_or(0, |e| e.seq);
                let received = match receive(group, dev_bytes, batch, &current) {
                    Ok(r) => r,
                    Err(e) => return e,
                };
                link.positions(&[(link.primary.to_string(), received)]);
                group.update_following(|f| {
                    f.primary_last_seq = f.primary_last_seq.max(last);
                    if received >= f.primary_last_seq {
                        f.behind_since = None;
                    }
                });
                Message::Ack(Ack { received, applied: group.applied_origin() })
            }
            Message::Peers(p) => {
                link.positions(&p.positions);
                continue;
            }
            Message::Heartbeat(h) => {
                let received = group.received();
                group.update_following(|f| {
                    f.primary_last_seq = h.last_seq;
                    if h.last_seq > received {
                        f.behind_since.get_or_insert(SystemTime::now());
                    } else {
                        f.behind_since = None;
                    }
                });
                let now_us =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
                Message::Heartbeat(Heartbeat { time_us: now_us, last_seq: received, durable: group.applied_origin() })
            }
            Message::ResyncData(d) => {
                let range = check_range(&group.device_numbers(), dev_bytes, d.dev_nr, d.offset, d.data.len() as u64);
                if let Err(why) = range {
                    return format!("resync data refused: {why}");
                }
                // Before the first write outside write order: the resync snapshot (if
                // SLINK 0 here has `resync_snapshot`) keeps a consistent copy.
                group.resync_begins(0);
                if let Err(e) = link.set_inconsistent(true) {
                    return e;
                }
                if let Err(e) = group.write_resync(d.dev_nr, d.offset, &d.data) {
                    return format!("writing resync data to device {} at {}: {e}", d.dev_nr, d.offset);
                }
                Message::ResyncAck(ResyncAck { dev_nr: d.dev_nr, offset: d.offset, len: d.data.len() as u32 })
            }
            Message::Rejoin(j) => {
                let done = group.wait_applied(Duration::from_secs(60)).map_err(|e| e.to_string()).and_then(|()| {
                    if j.seq > group.received() {
                        group.set_received(j.seq).map_err(|e| e.to_string())
                    } else {
                        Ok(())
                    }
                });
                if let Err(e) = done.and_then(|()| link.set_inconsistent(false)) {
                    return format!("rejoining at seq {}: {e}", j.seq);
                }
                if let Some(nr) = group.slink_of_site(link.primary) {
                    group.diverged_delivered(nr);
                }
                group.resync_ended(0);
                tracing::info!(group = %group.name(), seq = j.seq, "resync from the primary complete: following in order");
                Message::Ack(Ack { received: group.received(), applied: group.applied_origin() })
            }
            Message::VerifyRequest(v) => {
                let g = v.region;
                if let Err(why) = check_range(&group.device_numbers(), dev_bytes, g.dev_nr, g.offset, g.len) {
                    return format!("verify request refused: {why}");
                }
                // The state this site's log leads to (devices plus entries not yet on them).
                let mut buf = vec![0u8; g.len as usize];
                if let Err(e) = group.read(g.dev_nr, g.offset, &mut buf) {
                    return format!("reading device {} at {} to verify it: {e}", g.dev_nr, g.offset);
                }
                Message::VerifyReply(VerifyReply { region: g, crc: crc32c::crc32c(&buf) })
            }
            Message::Promote(p) => {
                let reply = match link.promote(p.lineage) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(group = %group.name(), "{e}");
                        return e;
                    }
                };
                if let Err(e) = frames::send(w, &reply, Compression::None) {
                    return format!("promoted, but the old primary was not told: {e}");
                }
                return "promoted to primary: the old primary follows this site".into();
            }
            Message::Goodbye(g) => return format!("the primary closed the link: {}", g.reason),
            other => return format!("unexpected {} from the primary", other.kind()),
        };
        if let Err(e) = frames::send(w, &reply, Compression::None) {
            return e.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_range;

    #[test]
    fn entries_out_of_range_are_refused() {
        let devs = [0, 2];
        assert!(check_range(&devs, 1 << 20, 0, 0, 1 << 20).is_ok());
        assert!(check_range(&devs, 1 << 20, 2, (1 << 20) - 512, 512).is_ok());
        let e = check_range(&devs, 1 << 20, 1, 0, 512).unwrap_err();
        assert!(e.contains("device 1 does not exist here"), "{e}");
        let e = check_range(&devs, 1 << 20, 0, (1 << 20) - 511, 512).unwrap_err();
        assert!(e.contains("beyond device 0"), "{e}");
        assert!(check_range(&devs, 1 << 20, 0, u64::MAX, 1).is_err(), "overflow");
    }
}
