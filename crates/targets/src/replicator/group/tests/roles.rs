//! Follow the sun, at the state machine: standby SLINKs at a secondary, fencing, a
//! demotion's queued writes, a resync a site asks for, a history discarded.

use super::*;
use crate::replicator::log::Origin;

impl Harness {
    /// A write received from the primary with history seq `h` (at a secondary).
    fn received(&mut self, dev: DevNr, offset: u64, byte: u8, len: usize, h: u64) -> u64 {
        self.tag += 1;
        let req = Request::new(Op::Write { fua: false }, offset, len as u64, vec![byte; len], self.tag);
        let done = Completion::new(self.replies.clone(), self.tag);
        self.event(Event::Submit { dev_nr: dev, req, done, origin: Some(Origin { seq: h, time_us: 1 }) });
        self.tag
    }

    fn outstanding(&self, nr: SlinkNr) -> u64 {
        self.m.slinks[&nr].lag(self.now).ios
    }

    fn dirty_regions(&self, nr: SlinkNr) -> u64 {
        self.m.dirty.iter().filter(|((s, _), _)| *s == nr).map(|(_, (l, _))| l.dirty_count()).sum()
    }
}

/// At a secondary, an SLINK to another dmrep site stands by: a synchronous one does not
/// hold the received writes, ships nothing, and keeps its entries in the log until the
/// primary says its site has them; then the log lets them go.
#[test]
fn standby_slinks_keep_what_their_site_lacks_and_never_hold_writes() {
    let mut h = Harness::new(&[0], &[(1, SYNC, Thresholds::default()), (2, ASYNC, Thresholds::default())], 8 << 20);
    h.handlers[&1].pretend_keeps_log();
    h.control(Control::SetRole(true));
    assert!(h.m.slinks[&1].standby && !h.m.slinks[&2].standby, "only the remote site's SLINK stands by");
    let a = h.received(0, 0, 1, 4096, 10);
    let b = h.received(0, 2 * REGION, 2, 4096, 11);
    h.settle();
    assert!(h.replies.ok(a) && h.replies.ok(b), "a standby synchronous SLINK holds nothing");
    assert!(h.copier_io(1).is_none(), "a standby SLINK ships nothing");
    assert_eq!(h.outstanding(1), 2, "its entries stay in the log");
    assert_eq!(h.outstanding(2), 0);
    h.assert_copy_equal(2);
    // The primary says the site has history seq 10: the first entry goes.
    let first = h.log.entries_from(0, 8)[0].seq;
    h.last_copier = 1;
    h.control(Control::StandbyAcked { slink: 1, through: first });
    assert_eq!(h.outstanding(1), 1);
    assert_eq!(h.log.cursor(1), Some(first), "the cursor moved: the log frees the entry");
    // Promoted: the SLINK ships what its site still lacks.
    h.control(Control::SetRole(false));
    assert!(!h.m.slinks[&1].standby);
    h.event(Event::Probed { slink: 1, result: Ok(()) });
    h.settle();
    assert_eq!(h.outstanding(1), 0);
    assert_eq!(h.image(1, 0)[2 * REGION as usize], 2, "the entry its site lacked was shipped");
    assert_eq!(h.image(1, 0)[0], 0, "the one it had was not");
}

/// A fenced primary refuses application writes (EPERM); one demoted to secondary answers
/// the writes it had queued with EROFS, never appending them.
#[test]
fn fenced_and_demoted_sites_refuse_application_writes() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.control(Control::Fence("site b is the primary of generation 2".into()));
    let a = h.write(0, 0, 1, 4096);
    assert_eq!(h.replies.errno(a), Some(rustix::io::Errno::PERM.raw_os_error()));
    h.control(Control::SetRole(false));
    assert!(h.m.fenced.is_none(), "a promotion lifts the fence");
    h.control(Control::Freeze(true));
    let b = h.write(0, 0, 2, 4096);
    h.settle();
    assert!(!h.replies.answered(b), "held by the switchover");
    h.control(Control::SetRole(true));
    assert_eq!(h.replies.errno(b), Some(rustix::io::Errno::ROFS.raw_os_error()), "the held write is refused");
    h.control(Control::Freeze(false));
    h.settle();
    assert!(h.log.entries_from(0, 8).is_empty(), "nothing was appended");
    // A write held (queued) when the fence comes is refused too, never appended.
    h.control(Control::SetRole(false));
    h.control(Control::Freeze(true));
    let c = h.write(0, 0, 3, 4096);
    h.control(Control::Fence("site b is the primary of generation 3".into()));
    assert_eq!(h.replies.errno(c), Some(rustix::io::Errno::PERM.raw_os_error()));
    h.control(Control::Freeze(false));
    h.settle();
    assert!(h.log.entries_from(0, 8).is_empty(), "nothing was appended");
}

/// A site whose history went past ours (an old primary failing back): the entries it
/// has (up to the common point) are dropped, the rest of what the SLINK holds and the
/// regions it reports become dirty, and the resync copies exactly those.
#[test]
fn a_site_resync_copies_its_regions_and_what_the_slink_holds_past_the_common_point() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    for (i, region) in [0u64, 1, 4, 7].into_iter().enumerate() {
        h.write(0, region * REGION, i as u8 + 1, 4096);
        h.append_all();
    }
    h.copy_all(0);
    assert_eq!(h.outstanding(1), 4, "the site got none of them");
    let after = h.log.entries_from(0, 8)[1].origin_seq;
    let reported = vec![dmrep_formats::site::Region { dev_nr: 0, offset: 10 * REGION + 7, len: 100 }];
    h.control(Control::SiteResync { slink: 1, after, regions: reported, full: false, why: "test".into() });
    assert!(!h.ordered(1));
    assert_eq!(h.dirty_regions(1), 3, "regions 4 and 7 (past the common point) and 10 (reported)");
    h.settle();
    assert!(h.ordered(1));
    assert_eq!(h.m.slinks[&1].resync.regions_done, 3);
    assert_eq!(h.image(1, 0)[0], 0, "what the site had is not copied");
    assert_eq!(h.image(1, 0)[4 * REGION as usize], 3);
}

/// Discarding a history: refused while the local devices still lack entries; then every
/// SLINK forgets what it held (and its dirty regions), at the log's tail.
#[test]
fn discarding_a_history_forgets_every_slinks_entries_and_dirty_regions() {
    let mut h = Harness::new(&[0], &[(1, ASYNC, Thresholds::default())], 8 << 20);
    h.write(0, 0, 1, 4096);
    h.append_all();
    assert!(h.m.discard_outstanding().is_err(), "SLINK 0 has not applied the entry");
    h.copy_all(0);
    h.control(Control::Invalidate(1));
    assert!(h.dirty_regions(1) > 0);
    let (tail, unordered) = h.m.discard_outstanding().unwrap();
    assert_eq!(tail, 1);
    assert_eq!(unordered, vec![1], "SLINK 1 was out of ordered mode");
    assert_eq!(h.outstanding(1), 0);
    assert_eq!(h.dirty_regions(1), 0);
}
