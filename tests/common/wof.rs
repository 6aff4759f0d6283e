//! Write-order fidelity (DESIGN.md section 4, invariants 1-3): a workload of dependent
//! writes across every device of a replication group, with its full history, and a
//! checker that decides whether a set of device images is the group's state after some
//! prefix of that history.
//!
//! # The workload
//!
//! [`run_segment`] writes over NBD to every device of the group (one connection each),
//! 4 KiB writes to random blocks among the first `nblocks` of a random device, up to `q`
//! in flight in total. Each write gets a global sequence number when it is issued and
//! writes a *stamp* (see [`encode_stamp`]) naming itself: magic, seq, device, block, a
//! fill derived from seq, and a crc32 over the block. The writer never issues a write to
//! a block that already has one in flight (or one whose fate is unknown), so the writes
//! to one block are totally ordered by causality and a block's stamps only grow.
//!
//! # The history
//!
//! For every write: (seq, dev, block, P) where P is the *completion watermark* when it
//! was issued: the largest s such that every write with seq <= s had completed. A write
//! completes when it is acknowledged. A write in flight when the daemon is killed stays
//! "issued, not acknowledged" forever; after the restart its fate is read from the
//! restarted primary (through NBD, so read-your-writes from the log counts) and
//! recorded: [`Outcome::Recovered`] (the recovered log has it) or [`Outcome::Lost`] (it
//! does not, and then it must never appear anywhere). Either way it is then *settled*,
//! and settled writes count as completed for the watermark of later writes: a write
//! issued after the restart really was issued after that fate was decided. (Without
//! this, the watermark would stop at the first write in flight at the first kill and
//! every later check would be vacuous.)
//!
//! # The checker
//!
//! An image set is valid iff it is the state after a prefix of some order the primary
//! could have used, i.e. a linear extension of "completed before issued". Let V be the
//! visible stamps and W = max P(v) over v in V: every write with seq <= W completed
//! before some visible write was issued, so it is in the prefix. Then every block must
//! show at least L(b, W), the last non-lost write to b with seq <= W (its writes are
//! ordered, so "at least" is by seq). A visible [`Outcome::Lost`] write is divergence
//! (invariant 3); a stamp with a bad checksum, or naming another device/block, or a
//! write the history does not have, is corruption. [`check_acked`] adds that every
//! acknowledged (or recovered) write is visible or overwritten (invariant 1).
//!
//! While the workload runs, an image changes under the reader, so one read is no
//! consistent cut; [`check_live`] reads everything twice and checks the second read
//! against the watermark of the first (see there). A block read torn while being written
//! is re-read a few times before it is called corruption.
//!
//! Declare from a test file with `#[path = "common/wof.rs"] mod wof;` after
//! `#[path = "common/nbd_client.rs"] mod nbd_client;`.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::nbd_client::NbdClient;

/// Size of one block (and of every write).
pub const BLOCK: usize = 4096;
/// First 8 bytes of every stamp.
pub const MAGIC: &[u8; 8] = b"WOFSTAMP";

// ---------------------------------------------------------------------------------
// Stamps

fn crc_table() -> &'static [u32; 256] {
    static T: OnceLock<[u32; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    })
}

/// CRC-32 (IEEE 802.3, the one of zlib).
pub fn crc32(data: &[u8]) -> u32 {
    let t = crc_table();
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn fill_word(state: &mut u64) -> u64 {
    // xorshift64*
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

fn fill(seq: u64, out: &mut [u8]) {
    let mut s = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for ch in out.chunks_mut(8) {
        let w = fill_word(&mut s).to_le_bytes();
        ch.copy_from_slice(&w[..ch.len()]);
    }
}

/// The block written by write `seq` to block `block` of device `dev`:
/// `[0,8)` magic, `[8,16)` seq, `[16,20)` dev, `[20,24)` zero, `[24,32)` block (all
/// little-endian), `[32,4092)` fill derived from seq, `[4092,4096)` crc32 of `[0,4092)`.
pub fn encode_stamp(seq: u64, dev: u32, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..20].copy_from_slice(&dev.to_le_bytes());
    b[24..32].copy_from_slice(&block.to_le_bytes());
    fill(seq, &mut b[32..BLOCK - 4]);
    let c = crc32(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&c.to_le_bytes());
    b
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// All zero: never written.
    Zero,
    /// A stamp that checks out (checksum, fill, names this device and block).
    Stamp(u64),
    /// Anything else, with why.
    Bad(String),
}

/// Decode the block read at (`dev`, `block`).
pub fn decode_stamp(b: &[u8], dev: u32, block: u64) -> Decoded {
    assert_eq!(b.len(), BLOCK);
    if b.iter().all(|&x| x == 0) {
        return Decoded::Zero;
    }
    if &b[0..8] != MAGIC {
        return Decoded::Bad(format!("no stamp magic (first bytes {:02x?})", &b[0..16]));
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
    let sdev = u32::from_le_bytes(b[16..20].try_into().unwrap());
    let sblock = u64::from_le_bytes(b[24..32].try_into().unwrap());
    let want = u32::from_le_bytes(b[BLOCK - 4..].try_into().unwrap());
    let got = crc32(&b[..BLOCK - 4]);
    if want != got {
        return Decoded::Bad(format!(
            "checksum mismatch (stamp says seq {seq} dev {sdev} block {sblock}; crc {got:#010x}, stored {want:#010x})"
        ));
    }
    if sdev != dev || sblock != block {
        return Decoded::Bad(format!("stamp of write {seq} names dev {sdev} block {sblock}"));
    }
    let mut f = vec![0u8; BLOCK - 36];
    fill(seq, &mut f);
    if f[..] != b[32..BLOCK - 4] {
        return Decoded::Bad(format!("stamp of write {seq}: fill pattern is not that of seq {seq}"));
    }
    if seq == 0 {
        return Decoded::Bad("stamp with seq 0".into());
    }
    Decoded::Stamp(seq)
}

// ---------------------------------------------------------------------------------
// History

/// What became of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Issued, not acknowledged, fate unknown (in flight, or in flight at a kill and not
    /// yet settled, or answered with an error).
    Pending,
    /// Acknowledged to the writer.
    Acked,
    /// Never acknowledged (in flight at a kill); the restarted primary has it.
    Recovered,
    /// Never acknowledged (in flight at a kill); the restarted primary does not have it.
    Lost,
}

impl Outcome {
    /// Completed, for the watermark.
    pub fn settled(self) -> bool {
        self != Outcome::Pending
    }
    /// The primary has it: it must reach every copy.
    pub fn durable(self) -> bool {
        matches!(self, Outcome::Acked | Outcome::Recovered)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRec {
    pub seq: u64,
    pub dev: u32,
    pub block: u64,
    /// Completion watermark when issued.
    pub p: u64,
    pub outcome: Outcome,
    /// Index of the segment that issued it.
    pub segment: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// First seq it issued; the segment issued `first_seq..end_seq`.
    pub first_seq: u64,
    pub end_seq: u64,
    /// How it ended ("stopped", "connection lost: ...").
    pub ended: String,
}

/// The whole history of a workload, across daemon kills.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    pub ndev: u32,
    pub nblocks: u64,
    /// `writes[i].seq == i + 1`.
    pub writes: Vec<WriteRec>,
    pub segments: Vec<Segment>,
    /// Every write with seq <= watermark is settled.
    pub watermark: u64,
}

impl History {
    pub fn new(ndev: u32, nblocks: u64) -> History {
        History { ndev, nblocks, writes: Vec::new(), segments: Vec::new(), watermark: 0 }
    }

    pub fn get(&self, seq: u64) -> Option<&WriteRec> {
        if seq == 0 {
            return None;
        }
        self.writes.get(seq as usize - 1)
    }

    /// Start a segment; returns its index.
    pub fn begin_segment(&mut self) -> u32 {
        let s = self.writes.len() as u64 + 1;
        self.segments.push(Segment { first_seq: s, end_seq: s, ended: "running".into() });
        self.segments.len() as u32 - 1
    }

    pub fn end_segment(&mut self, how: &str) {
        let end = self.writes.len() as u64 + 1;
        let s = self.segments.last_mut().expect("a segment");
        s.end_seq = end;
        s.ended = how.to_string();
    }

    /// Record a new write; returns it (seq and P assigned).
    pub fn issue(&mut self, dev: u32, block: u64) -> WriteRec {
        assert!(dev < self.ndev && block < self.nblocks);
        let w = WriteRec {
            seq: self.writes.len() as u64 + 1,
            dev,
            block,
            p: self.watermark,
            outcome: Outcome::Pending,
            segment: self.segments.len().saturating_sub(1) as u32,
        };
        self.writes.push(w.clone());
        w
    }

    fn advance(&mut self) {
        while (self.watermark as usize) < self.writes.len() && self.writes[self.watermark as usize].outcome.settled() {
            self.watermark += 1;
        }
    }

    pub fn ack(&mut self, seq: u64) {
        let w = &mut self.writes[seq as usize - 1];
        assert_eq!(w.outcome, Outcome::Pending, "write {seq} acknowledged twice");
        w.outcome = Outcome::Acked;
        self.advance();
    }

    /// Settle a write that was in flight at a kill.
    pub fn settle(&mut self, seq: u64, present: bool) {
        let w = &mut self.writes[seq as usize - 1];
        assert_eq!(w.outcome, Outcome::Pending, "write {seq} settled twice");
        w.outcome = if present { Outcome::Recovered } else { Outcome::Lost };
        self.advance();
    }

    pub fn pending(&self) -> Vec<u64> {
        self.writes.iter().filter(|w| w.outcome == Outcome::Pending).map(|w| w.seq).collect()
    }

    pub fn count(&self, o: Outcome) -> usize {
        self.writes.iter().filter(|w| w.outcome == o).count()
    }

    pub fn issued(&self) -> usize {
        self.writes.len()
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, path)
    }

    pub fn load(path: &Path) -> io::Result<History> {
        let h: History = serde_json::from_slice(&std::fs::read(path)?).map_err(io::Error::other)?;
        for (i, w) in h.writes.iter().enumerate() {
            if w.seq != i as u64 + 1 {
                return Err(io::Error::other(format!("history: write #{i} has seq {}", w.seq)));
            }
        }
        Ok(h)
    }

    /// Describe one write for messages.
    pub fn describe(&self, seq: u64) -> String {
        match self.get(seq) {
            None if seq == 0 => "nothing (never written)".into(),
            None => format!("write {seq} (not in the history)"),
            Some(w) => format!("write {} (dev {} block {}, P={}, {:?})", w.seq, w.dev, w.block, w.p, w.outcome),
        }
    }

    /// Seqs of the writes to each block, ascending: index dev * nblocks + block.
    fn per_block(&self) -> Vec<Vec<u64>> {
        let mut v = vec![Vec::new(); (self.ndev as u64 * self.nblocks) as usize];
        for w in &self.writes {
            v[(w.dev as u64 * self.nblocks + w.block) as usize].push(w.seq);
        }
        v
    }
}

// ---------------------------------------------------------------------------------
// Images

/// Something holding the blocks of every device of the group at one site.
pub trait Images {
    fn ndev(&self) -> u32;
    /// Read `n` blocks from block `first` of device `dev`.
    fn read_blocks(&mut self, dev: u32, first: u64, n: u64) -> io::Result<Vec<u8>>;
}

/// Image files (one per device, in dev_nr order).
pub struct FileImages {
    pub paths: Vec<PathBuf>,
    files: Vec<File>,
}

impl FileImages {
    pub fn open(paths: &[PathBuf]) -> io::Result<FileImages> {
        let files = paths.iter().map(File::open).collect::<io::Result<Vec<_>>>()?;
        Ok(FileImages { paths: paths.to_vec(), files })
    }
}

impl Images for FileImages {
    fn ndev(&self) -> u32 {
        self.files.len() as u32
    }
    fn read_blocks(&mut self, dev: u32, first: u64, n: u64) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; n as usize * BLOCK];
        self.files[dev as usize].read_exact_at(&mut v, first * BLOCK as u64)?;
        Ok(v)
    }
}

/// Devices read through NBD (what a client sees).
pub struct NbdImages {
    pub clients: Vec<NbdClient>,
}

impl NbdImages {
    pub fn connect(socket: &Path, exports: &[String], timeout: Duration) -> io::Result<NbdImages> {
        let clients =
            exports.iter().map(|e| NbdClient::connect_retry(socket, e, timeout)).collect::<io::Result<Vec<_>>>()?;
        Ok(NbdImages { clients })
    }
    pub fn close(self) {
        for c in self.clients {
            c.disconnect();
        }
    }
}

impl Images for NbdImages {
    fn ndev(&self) -> u32 {
        self.clients.len() as u32
    }
    fn read_blocks(&mut self, dev: u32, first: u64, n: u64) -> io::Result<Vec<u8>> {
        self.clients[dev as usize].pread(first * BLOCK as u64, (n as usize * BLOCK) as u32)
    }
}

/// Images in memory (for tests of the checker, and for tampering with real images).
#[derive(Clone)]
pub struct MemImages {
    pub devs: Vec<Vec<u8>>,
}

impl MemImages {
    pub fn new(ndev: u32, nblocks: u64) -> MemImages {
        MemImages { devs: vec![vec![0u8; nblocks as usize * BLOCK]; ndev as usize] }
    }
    /// Put the stamp of `w` in its block.
    pub fn apply(&mut self, w: &WriteRec) {
        let o = w.block as usize * BLOCK;
        self.devs[w.dev as usize][o..o + BLOCK].copy_from_slice(&encode_stamp(w.seq, w.dev, w.block));
    }
    pub fn set(&mut self, dev: u32, block: u64, data: &[u8]) {
        let o = block as usize * BLOCK;
        self.devs[dev as usize][o..o + BLOCK].copy_from_slice(data);
    }
    pub fn from_images(src: &mut dyn Images, nblocks: u64) -> io::Result<MemImages> {
        let mut devs = Vec::new();
        for d in 0..src.ndev() {
            devs.push(src.read_blocks(d, 0, nblocks)?);
        }
        Ok(MemImages { devs })
    }
}

impl Images for MemImages {
    fn ndev(&self) -> u32 {
        self.devs.len() as u32
    }
    fn read_blocks(&mut self, dev: u32, first: u64, n: u64) -> io::Result<Vec<u8>> {
        let o = first as usize * BLOCK;
        Ok(self.devs[dev as usize][o..o + n as usize * BLOCK].to_vec())
    }
}

/// The stamp seq of every block: index dev * nblocks + block (0: never written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamps {
    pub nblocks: u64,
    pub seq: Vec<u64>,
}

impl Stamps {
    pub fn at(&self, dev: u32, block: u64) -> u64 {
        self.seq[(dev as u64 * self.nblocks + block) as usize]
    }
    pub fn visible(&self) -> usize {
        self.seq.iter().filter(|&&s| s != 0).count()
    }
}

/// Read every block's stamp. `torn_retries`: re-read a bad block that many times (a
/// few ms apart) before calling it corruption (for images being written meanwhile).
pub fn scan(src: &mut dyn Images, nblocks: u64, torn_retries: u32) -> Result<Stamps, String> {
    const CHUNK: u64 = 256;
    let mut seq = Vec::with_capacity((src.ndev() as u64 * nblocks) as usize);
    for dev in 0..src.ndev() {
        let mut first = 0;
        while first < nblocks {
            let n = CHUNK.min(nblocks - first);
            let buf = src.read_blocks(dev, first, n).map_err(|e| format!("reading dev {dev} block {first}: {e}"))?;
            for i in 0..n {
                let block = first + i;
                let mut d = decode_stamp(&buf[i as usize * BLOCK..(i as usize + 1) * BLOCK], dev, block);
                let mut tries = 0;
                while matches!(d, Decoded::Bad(_)) && tries < torn_retries {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(5));
                    let b = src
                        .read_blocks(dev, block, 1)
                        .map_err(|e| format!("re-reading dev {dev} block {block}: {e}"))?;
                    d = decode_stamp(&b, dev, block);
                }
                match d {
                    Decoded::Zero => seq.push(0),
                    Decoded::Stamp(s) => seq.push(s),
                    Decoded::Bad(why) => {
                        return Err(format!(
                            "CORRUPTION: dev {dev} block {block}: {why}{}",
                            if torn_retries > 0 {
                                format!(" (still after {torn_retries} re-reads)")
                            } else {
                                String::new()
                            }
                        ))
                    }
                }
            }
            first += n;
        }
    }
    Ok(Stamps { nblocks, seq })
}

// ---------------------------------------------------------------------------------
// Checks

/// What a successful prefix check found.
#[derive(Debug, Clone)]
pub struct PrefixReport {
    /// Blocks holding a stamp.
    pub visible: usize,
    /// W: every write with seq <= W is (visible or overwritten) in the image.
    pub w: u64,
    /// The highest visible seq.
    pub max_visible: u64,
}

/// Every visible stamp must be a write of the history to that very block, and not lost.
fn check_visible(h: &History, st: &Stamps) -> Result<(), String> {
    for dev in 0..h.ndev {
        for block in 0..h.nblocks {
            let s = st.at(dev, block);
            if s == 0 {
                continue;
            }
            match h.get(s) {
                None => {
                    return Err(format!(
                        "CORRUPTION: dev {dev} block {block} holds write {s}, which the history does not have ({} writes issued)",
                        h.writes.len()
                    ))
                }
                Some(w) if w.dev != dev || w.block != block => {
                    return Err(format!("CORRUPTION: dev {dev} block {block} holds {} (another block)", h.describe(s)))
                }
                Some(w) if w.outcome == Outcome::Lost => {
                    return Err(format!(
                        "DIVERGENCE: dev {dev} block {block} holds {}: it was in flight at a kill and the restarted primary does not have it",
                        h.describe(s)
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// W of an image and the visible write that sets it.
fn watermark(h: &History, st: &Stamps) -> (u64, u64) {
    let mut w = 0;
    let mut witness = 0;
    for &s in &st.seq {
        if let Some(r) = h.get(s) {
            if r.p > w {
                w = r.p;
                witness = s;
            }
        }
    }
    (w, witness)
}

/// Every block of `check` must hold at least the last non-lost write with seq <= `w`.
fn check_required(h: &History, check: &Stamps, w: u64, witness: u64, what: &str) -> Result<(), String> {
    let per_block = h.per_block();
    let mut first = None;
    let mut count = 0usize;
    for dev in 0..h.ndev {
        for block in 0..h.nblocks {
            let writes = &per_block[(dev as u64 * h.nblocks + block) as usize];
            let need =
                writes.iter().rev().copied().find(|&s| s <= w && h.writes[s as usize - 1].outcome != Outcome::Lost);
            let need = need.unwrap_or(0);
            let found = check.at(dev, block);
            if found < need {
                count += 1;
                if first.is_none() {
                    first = Some((dev, block, need, found));
                }
            }
        }
    }
    match first {
        None => Ok(()),
        Some((dev, block, need, found)) => Err(format!(
            "ORDER VIOLATION{what}: dev {dev} block {block}: expected at least write {need}, found {}.\n  \
             required: {}\n  because {} is visible and was issued after every write <= {w} had completed\n  \
             ({count} block(s) violate it)",
            if found == 0 { "nothing (never written)".to_string() } else { format!("write {found}") },
            h.describe(need),
            h.describe(witness),
        )),
    }
}

/// Is `st` the group state after some prefix of the history?
pub fn check_prefix(h: &History, st: &Stamps) -> Result<PrefixReport, String> {
    check_visible(h, st)?;
    let (w, witness) = watermark(h, st);
    check_required(h, st, w, witness, "")?;
    Ok(PrefixReport { visible: st.visible(), w, max_visible: st.seq.iter().copied().max().unwrap_or(0) })
}

/// Does `st` hold every acknowledged (or recovered) write, or something newer on its block?
pub fn check_acked(h: &History, st: &Stamps) -> Result<usize, String> {
    let mut n = 0;
    for w in &h.writes {
        if !w.outcome.durable() {
            continue;
        }
        n += 1;
        let found = st.at(w.dev, w.block);
        if found < w.seq {
            return Err(format!(
                "ACKNOWLEDGED WRITE MISSING: dev {} block {}: {} is not there, found {}",
                w.dev,
                w.block,
                h.describe(w.seq),
                if found == 0 { "nothing (never written)".to_string() } else { h.describe(found) }
            ));
        }
    }
    Ok(n)
}

/// Check an image that changes while it is read (a site being written), from two full
/// reads `lo` then `hi`. Each block's stamp only grows over time (the writes to a block
/// are ordered and a site applies them in log order), so for the site's state S at the
/// moment between the two reads: lo <= S <= hi block by block, and W(S) >= W(lo). If S
/// is a prefix state, every block of S holds at least L(b, W(S)) >= L(b, W(lo)), so
/// hi must too. A failure of that is a violation that was present at that moment.
pub fn check_live(h: &History, lo: &Stamps, hi: &Stamps) -> Result<PrefixReport, String> {
    check_visible(h, lo)?;
    check_visible(h, hi)?;
    for (i, (&a, &b)) in lo.seq.iter().zip(&hi.seq).enumerate() {
        if b < a {
            let (dev, block) = (i as u64 / h.nblocks, i as u64 % h.nblocks);
            return Err(format!(
                "GOING BACKWARDS: dev {dev} block {block} held write {a} and later write {b} ({} then {})",
                h.describe(a),
                h.describe(b)
            ));
        }
    }
    let (w, witness) = watermark(h, lo);
    check_required(h, hi, w, witness, " (live)")?;
    Ok(PrefixReport { visible: hi.visible(), w, max_visible: hi.seq.iter().copied().max().unwrap_or(0) })
}

/// After a restart: the restarted primary's view (`st`, read through NBD) settles every
/// pending write: present if its block holds it, absent if it holds an older write.
/// Returns (recovered, lost).
pub fn settle_pending(h: &mut History, st: &Stamps) -> Result<(usize, usize), String> {
    let (mut rec, mut lost) = (0, 0);
    for seq in h.pending() {
        let w = h.get(seq).unwrap().clone();
        let found = st.at(w.dev, w.block);
        if found == seq {
            h.settle(seq, true);
            rec += 1;
        } else if found < seq {
            h.settle(seq, false);
            lost += 1;
        } else {
            return Err(format!(
                "dev {} block {} holds {} while {} was the newest write issued to it",
                w.dev,
                w.block,
                h.describe(found),
                h.describe(seq)
            ));
        }
    }
    Ok((rec, lost))
}

// ---------------------------------------------------------------------------------
// The writer

/// What a segment did.
#[derive(Debug, Clone)]
pub struct SegmentResult {
    pub issued: u64,
    pub acked: u64,
    /// Writes answered with an NBD error (left pending).
    pub errors: Vec<String>,
    /// Why it ended.
    pub ended: String,
    /// The connection broke (daemon gone).
    pub broken: bool,
}

enum Event {
    Reply { seq: u64, error: u32 },
    Closed { dev: u32, why: String },
}

/// Writer settings.
#[derive(Clone)]
pub struct WriterCfg {
    pub socket: PathBuf,
    /// One export per device, in dev_nr order.
    pub exports: Vec<String>,
    /// Writes in flight in total.
    pub q: usize,
    /// Fail (return an error) when no reply comes for this long with writes in flight.
    pub stall: Duration,
}

/// Run the workload until `stop` is set (then wait for the writes in flight, and end
/// cleanly) or the connections break (writes in flight stay pending). Appends to the
/// shared history as it goes, in one new segment. Returns an error for a stall or a
/// protocol failure (not for a broken connection: that is what a kill looks like).
pub fn run_segment(
    hist: &Arc<Mutex<History>>,
    cfg: &WriterCfg,
    rng: &mut StdRng,
    stop: &AtomicBool,
) -> Result<SegmentResult, String> {
    let (ndev, nblocks, mut busy) = {
        let mut h = hist.lock().unwrap();
        h.begin_segment();
        // Blocks with a write of unknown fate are not written again (their writes
        // would not be ordered after it).
        let busy: HashSet<(u32, u64)> =
            h.writes.iter().filter(|w| w.outcome == Outcome::Pending).map(|w| (w.dev, w.block)).collect();
        (h.ndev, h.nblocks, busy)
    };
    assert_eq!(cfg.exports.len() as u32, ndev);
    let mut senders = Vec::new();
    let (tx, rx) = mpsc::channel::<Event>();
    let mut readers = Vec::new();
    for (dev, e) in cfg.exports.iter().enumerate() {
        let c = match NbdClient::connect_retry(&cfg.socket, e, Duration::from_secs(30)) {
            Ok(c) => c,
            Err(err) => {
                hist.lock().unwrap().end_segment("could not connect");
                return Err(format!("connecting to export {e}: {err}"));
            }
        };
        let (s, mut r) = c.split();
        senders.push(s);
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || loop {
            match r.recv() {
                Ok(rep) => {
                    if tx.send(Event::Reply { seq: rep.handle, error: rep.error }).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Event::Closed { dev: dev as u32, why: e.to_string() });
                    return;
                }
            }
        }));
    }
    drop(tx);

    let mut in_flight: HashMap<u64, (u32, u64)> = HashMap::new();
    let mut res = SegmentResult { issued: 0, acked: 0, errors: Vec::new(), ended: String::new(), broken: false };
    let outcome: Result<(), String> = 'run: loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && in_flight.is_empty() {
            res.ended = "stopped".into();
            break Ok(());
        }
        while !stopping && !res.broken && in_flight.len() < cfg.q {
            let (dev, block) = loop {
                let k = (rng.random_range(0..ndev), rng.random_range(0..nblocks));
                if !busy.contains(&k) {
                    break k;
                }
            };
            let w = hist.lock().unwrap().issue(dev, block);
            busy.insert((dev, block));
            in_flight.insert(w.seq, (dev, block));
            res.issued += 1;
            let data = encode_stamp(w.seq, dev, block);
            if let Err(e) = senders[dev as usize].write(w.seq, block * BLOCK as u64, &data) {
                res.broken = true;
                res.ended = format!("connection lost (sending write {}: {e})", w.seq);
            }
        }
        if res.broken {
            break Ok(());
        }
        match rx.recv_timeout(cfg.stall) {
            Ok(Event::Reply { seq, error }) => {
                let Some(k) = in_flight.remove(&seq) else {
                    break 'run Err(format!("reply for write {seq}, which is not in flight"));
                };
                if error == 0 {
                    hist.lock().unwrap().ack(seq);
                    res.acked += 1;
                    busy.remove(&k);
                } else {
                    // Fate unknown: leave it pending, its block busy.
                    res.errors.push(format!("write {seq} (dev {} block {}): NBD error {error}", k.0, k.1));
                }
            }
            Ok(Event::Closed { dev, why }) => {
                res.broken = true;
                res.ended = format!("connection lost (dev {dev}: {why})");
                break Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!(
                    "STALL: no reply for {:?} with {} write(s) in flight (lowest seq {:?})",
                    cfg.stall,
                    in_flight.len(),
                    in_flight.keys().min()
                ));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                res.broken = true;
                res.ended = "connection lost".into();
                break Ok(());
            }
        }
    };
    if !res.broken {
        for s in senders.iter_mut() {
            let _ = s.disconnect();
        }
    }
    for s in &senders {
        s.shutdown();
    }
    for r in readers {
        let _ = r.join();
    }
    // Replies that arrived before the readers stopped still count.
    hist.lock().unwrap().end_segment(&res.ended);
    outcome.map(|_| res)
}

/// A writer running in its own thread until stopped or broken.
pub struct BackgroundWriter {
    pub stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Result<SegmentResult, String>, StdRng)>,
    pub started: Instant,
}

impl BackgroundWriter {
    pub fn start(hist: Arc<Mutex<History>>, cfg: WriterCfg, mut rng: StdRng) -> BackgroundWriter {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let r = run_segment(&hist, &cfg, &mut rng, &s);
            (r, rng)
        });
        BackgroundWriter { stop, handle, started: Instant::now() }
    }

    /// Wait for it to end (after a kill, or after [`BackgroundWriter::stop`]).
    pub fn join(self) -> (Result<SegmentResult, String>, StdRng) {
        self.handle.join().expect("writer thread panicked")
    }

    /// Ask it to stop cleanly and wait.
    pub fn stop_and_join(self) -> (Result<SegmentResult, String>, StdRng) {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }
}
