//! A group's lineage: the generations of its history, and how two sites' histories
//! relate (DRBD decides with generation identifiers; this is the same idea, kept small).
//!
//! The group's writes form one history numbered by the history sequence `H` (the
//! "origin seq" of the log's entries): the first primary numbers its writes 1, 2, 3...;
//! a site promoted to primary (switchover or takeover) goes on from the `H` it had
//! received, under a new generation. A generation is named by its number and a random
//! nonce (two sites that both take over from generation 4 make two different
//! generations 5), and starts at an `H`: writes `H >= start` are that generation's.
//!
//! Each site keeps the newest [`MAX_GENERATIONS`] generations it has been part of. Two
//! sites compare them at every handshake ([`relate`]):
//! - same current generation: nothing to decide;
//! - the peer's lineage contains our current generation and goes on from it: the peer
//!   is newer. Our writes from the peer's next generation's start on never reached it:
//!   they are the regions to copy back (fast failback);
//! - ours contains the peer's current generation and goes on: the peer is stale;
//! - both went on from a common generation in different ways: split brain, never merged
//!   automatically;
//! - nothing in common: another group's history (or too old to tell).
//!
//! Byte layout of one [`GenRecord`] (24 bytes, little-endian): generation u64 at 0, nonce
//! u64 at 8, start u64 at 16. A lineage is a count (u8 on the wire, u16 in the
//! superblock) then the records, oldest first.

use serde::Serialize;

/// Generations a site remembers (older ones drop off the front).
pub const MAX_GENERATIONS: usize = 8;

/// Bytes of one encoded [`GenRecord`].
pub const GEN_RECORD_LEN: usize = 24;

/// One generation of the group's history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct GenRecord {
    /// Grows by one with every promotion (1 for a new group).
    pub generation: u64,
    /// Random, chosen by the site that started the generation (0 for generation 1 of a
    /// log made before lineages existed).
    pub nonce: u64,
    /// The first history seq of this generation's writes.
    pub start: u64,
}

impl GenRecord {
    pub fn same(&self, o: &GenRecord) -> bool {
        self.generation == o.generation && self.nonce == o.nonce
    }

    pub fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.generation.to_le_bytes());
        out[8..16].copy_from_slice(&self.nonce.to_le_bytes());
        out[16..24].copy_from_slice(&self.start.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> GenRecord {
        let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        GenRecord { generation: u(0), nonce: u(8), start: u(16) }
    }
}

/// The newest generations of a site's history, oldest first; never empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lineage {
    len: u8,
    records: [GenRecord; MAX_GENERATIONS],
}

impl Serialize for Lineage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.records().serialize(s)
    }
}

impl Lineage {
    /// A new group's lineage: generation 1 with `nonce`, starting at seq 1.
    pub fn first(nonce: u64) -> Lineage {
        Lineage::from_records(&[GenRecord { generation: 1, nonce, start: 1 }]).expect("one record")
    }

    /// From records, oldest first: they must be 1..=[`MAX_GENERATIONS`] long (more are cut
    /// from the front), with growing generations and starts that never go back.
    pub fn from_records(r: &[GenRecord]) -> Result<Lineage, String> {
        if r.is_empty() {
            return Err("a lineage has at least one generation".into());
        }
        let r = &r[r.len().saturating_sub(MAX_GENERATIONS)..];
        for w in r.windows(2) {
            if w[1].generation <= w[0].generation || w[1].start < w[0].start {
                return Err(format!(
                    "generation {} (from seq {}) follows generation {} (from seq {}): generations and starts must grow",
                    w[1].generation, w[1].start, w[0].generation, w[0].start
                ));
            }
        }
        if r.iter().any(|g| g.generation == 0 || g.start == 0) {
            return Err("generations and starts begin at 1".into());
        }
        let mut records = [GenRecord::default(); MAX_GENERATIONS];
        records[..r.len()].copy_from_slice(r);
        Ok(Lineage { len: r.len() as u8, records })
    }

    pub fn records(&self) -> &[GenRecord] {
        &self.records[..self.len as usize]
    }

    pub fn current(&self) -> GenRecord {
        self.records[self.len as usize - 1]
    }

    pub fn generation(&self) -> u64 {
        self.current().generation
    }

    /// This lineage with a new generation (number + 1, `nonce`) starting at `start`.
    pub fn promoted(&self, nonce: u64, start: u64) -> Lineage {
        let cur = self.current();
        let mut r = self.records().to_vec();
        r.push(GenRecord { generation: cur.generation + 1, nonce, start: start.max(cur.start) });
        Lineage::from_records(&r).expect("a promotion keeps the order")
    }

    fn position(&self, g: &GenRecord) -> Option<usize> {
        self.records().iter().position(|r| r.same(g))
    }
}

/// How a peer's history relates to ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// The same current generation.
    Same,
    /// The peer went on from our current generation: ours ends before history seq
    /// `common + 1` in its history. Our writes after `common` never reached it.
    PeerNewer { common: u64 },
    /// We went on from the peer's current generation: it is stale.
    PeerOlder,
    /// Both went on from a common generation differently; the histories agree up to
    /// `common`.
    SplitBrain { common: u64 },
    /// No generation in common (another history, or one too old to compare).
    Unrelated,
}

/// How `peer`'s history relates to `mine`.
pub fn relate(mine: &Lineage, peer: &Lineage) -> Relation {
    if mine.current().same(&peer.current()) {
        return Relation::Same;
    }
    // The newest generation both know.
    let Some((pi, mi)) =
        peer.records().iter().enumerate().rev().find_map(|(pi, g)| mine.position(g).map(|mi| (pi, mi)))
    else {
        return Relation::Unrelated;
    };
    let mine_last = mi + 1 == mine.len as usize;
    let peer_last = pi + 1 == peer.len as usize;
    // Where each side's history left the common generation.
    let next_start = |l: &Lineage, i: usize| l.records()[i + 1].start;
    match (mine_last, peer_last) {
        (true, true) => Relation::Same,
        (true, false) => Relation::PeerNewer { common: next_start(peer, pi) - 1 },
        (false, true) => Relation::PeerOlder,
        (false, false) => Relation::SplitBrain { common: next_start(peer, pi).min(next_start(mine, mi)) - 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(generation: u64, nonce: u64, start: u64) -> GenRecord {
        GenRecord { generation, nonce, start }
    }

    #[test]
    fn relations() {
        let a = Lineage::first(11);
        assert_eq!(relate(&a, &a), Relation::Same);
        // B took over from generation 1 after receiving up to 90.
        let b = a.promoted(22, 91);
        assert_eq!(relate(&a, &b), Relation::PeerNewer { common: 90 });
        assert_eq!(relate(&b, &a), Relation::PeerOlder);
        // C took over from generation 1 too, at 80: split brain, common up to 80.
        let c = a.promoted(33, 81);
        assert_eq!(relate(&b, &c), Relation::SplitBrain { common: 80 });
        assert_eq!(relate(&c, &b), Relation::SplitBrain { common: 80 });
        // Two switchovers later, the old primary is still an ancestor.
        let d = b.promoted(44, 200).promoted(55, 300);
        assert_eq!(relate(&a, &d), Relation::PeerNewer { common: 90 });
        assert_eq!(relate(&b, &d), Relation::PeerNewer { common: 199 });
        assert_eq!(relate(&c, &d), Relation::SplitBrain { common: 80 });
        assert_eq!(relate(&Lineage::first(99), &d), Relation::Unrelated);
    }

    #[test]
    fn lineages_keep_the_newest_and_check_order() {
        let mut l = Lineage::first(1);
        for i in 0..20 {
            l = l.promoted(i, 10 * (i + 1));
        }
        assert_eq!(l.records().len(), MAX_GENERATIONS);
        assert_eq!(l.generation(), 21);
        assert!(Lineage::from_records(&[g(2, 0, 5), g(2, 1, 6)]).is_err());
        assert!(Lineage::from_records(&[g(1, 0, 5), g(2, 1, 4)]).is_err());
        assert!(Lineage::from_records(&[]).is_err());
        let mut b = [0u8; 24];
        g(3, 4, 5).encode(&mut b);
        assert_eq!(GenRecord::decode(&b), g(3, 4, 5));
    }
}
