//! Where a batch goes in the ring. Pure arithmetic on ring offsets, no I/O.
//!
//! The live part of the ring runs from the head to the tail, possibly wrapping:
//!
//! ```text
//! tail ahead of head:  [ free (zone B) | head .. live .. tail | free (zone A) ]
//! wrapped:             [ live .. tail | free (zone B) | head .. live .. ]
//! ```
//!
//! Records go at the tail, each contiguous. A record that does not fit in zone A (before
//! the ring end) makes the batch wrap: a wrap record is put at the tail (the rest of zone
//! A is wasted) and the record goes to the ring start, in zone B, which ends at the head.

use dmrep_formats::replog::ENTRY_HEADER_SIZE;

/// Ring bytes of a wrap record.
const WRAP_LEN: u64 = ENTRY_HEADER_SIZE as u64;

/// The head and tail of the ring, as the placement sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingState {
    pub ring_len: u64,
    pub head_pos: u64,
    pub tail_pos: u64,
    /// No live records: head == tail means empty, not full.
    pub empty: bool,
}

impl RingState {
    /// Ring bytes in use from head to tail (wrap waste included).
    pub fn used(&self) -> u64 {
        if self.empty {
            0
        } else if self.tail_pos > self.head_pos {
            self.tail_pos - self.head_pos
        } else {
            self.ring_len - self.head_pos + self.tail_pos
        }
    }

    pub fn free(&self) -> u64 {
        self.ring_len - self.used()
    }
}

/// Where each record of a batch goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    /// Ring offset of each record, in batch order.
    pub positions: Vec<u64>,
    /// `(ring offset of the wrap record, index of the first record after it)` when the
    /// batch wraps with a wrap record. A batch that reaches the ring end exactly wraps
    /// without one (recovery goes on at the ring start when it reaches the end).
    pub wrap: Option<(u64, usize)>,
    /// Index of the first record placed at the ring start (a second write run), if any.
    pub second_run: Option<usize>,
    /// The tail after the batch (normalised: never `ring_len`).
    pub new_tail: u64,
}

/// Places records of the given sizes (multiples of 512) at the tail, or `None` when they
/// do not fit in the free space as it lies.
pub(crate) fn place(st: &RingState, sizes: &[u64]) -> Option<Placement> {
    let ring_len = st.ring_len;
    let mut pos = st.tail_pos;
    // In zone A the limit is the ring end; in zone B, the head.
    let mut in_zone_a = st.empty || st.tail_pos > st.head_pos;
    // Whether this batch went back to the ring start (its records then form two runs).
    let mut jumped = false;
    let mut positions = Vec::with_capacity(sizes.len());
    let mut wrap = None;
    let mut second_run = None;
    for (i, &n) in sizes.iter().enumerate() {
        if in_zone_a && pos + n > ring_len {
            // Does not fit before the end: wrap record at the tail, go to the start.
            debug_assert!(ring_len - pos >= WRAP_LEN);
            wrap = Some((pos, i));
            pos = 0;
            in_zone_a = false;
            jumped = true;
        }
        if in_zone_a {
            positions.push(pos);
            pos += n;
            if pos == ring_len {
                pos = 0;
                in_zone_a = false;
                jumped = true;
            }
        } else {
            if pos + n > st.head_pos {
                return None;
            }
            if jumped && second_run.is_none() {
                second_run = Some(i);
            }
            positions.push(pos);
            pos += n;
        }
    }
    Some(Placement { positions, wrap, second_run, new_tail: pos })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(head: u64, tail: u64, empty: bool) -> RingState {
        RingState { ring_len: 10_240, head_pos: head, tail_pos: tail, empty }
    }

    #[test]
    fn fits_before_the_end() {
        let p = place(&st(0, 0, true), &[1024, 512]).unwrap();
        assert_eq!(p.positions, vec![0, 1024]);
        assert_eq!((p.wrap, p.second_run, p.new_tail), (None, None, 1536));
    }

    #[test]
    fn wraps_with_a_marker() {
        // Head at 4096, tail at 9216: 1024 left before the end.
        let p = place(&st(4096, 9216, false), &[512, 1024]).unwrap();
        assert_eq!(p.positions, vec![9216, 0]);
        assert_eq!((p.wrap, p.second_run, p.new_tail), (Some((9728, 1)), Some(1), 1024));
        // Zone B ends at the head.
        assert!(place(&st(4096, 9216, false), &[512, 4096]).unwrap().new_tail == 4096);
        assert!(place(&st(4096, 9216, false), &[512, 4608]).is_none());
    }

    #[test]
    fn reaching_the_end_exactly_wraps_without_marker() {
        let p = place(&st(2048, 9216, false), &[1024, 512]).unwrap();
        assert_eq!(p.positions, vec![9216, 0]);
        assert_eq!((p.wrap, p.second_run, p.new_tail), (None, Some(1), 512));
        let full = place(&st(2048, 9216, false), &[1024]).unwrap();
        let after = RingState { tail_pos: full.new_tail, ..st(2048, 0, false) };
        assert_eq!(after.used(), 10_240 - 2048);
    }

    #[test]
    fn wrapped_state_only_uses_the_gap() {
        assert_eq!(place(&st(8192, 1024, false), &[7168]).unwrap().new_tail, 8192);
        assert!(place(&st(8192, 1024, false), &[7680]).is_none());
        // Full ring: head == tail, not empty.
        assert!(place(&st(4096, 4096, false), &[512]).is_none());
        assert_eq!(st(4096, 4096, false).used(), 10_240);
        assert_eq!(st(4096, 4096, true).used(), 0);
    }

    #[test]
    fn empty_ring_mid_way_cannot_hold_a_record_bigger_than_either_side() {
        // Empty at 5120: 5120 on each side; a 6144-byte record fits nowhere contiguous.
        assert!(place(&st(5120, 5120, true), &[6144]).is_none());
        assert_eq!(place(&st(5120, 5120, true), &[5120, 5120]).unwrap().new_tail, 5120);
    }
}
