//! Replication policy and fall-behind accounting of one SLINK. Pure logic: the group
//! feeds it numbers, it answers "must new writes wait for this SLINK?".
//!
//! An asynchronous SLINK may lag by at most `ios` entries, `bytes` bytes and `timeout`
//! age of its oldest outstanding entry. At or over any threshold it is *forced
//! synchronous*: the writes appended while forced wait for it, and the group admits no
//! new entries that would take it past its `ios`/`bytes` bounds. Back under every
//! threshold, asynchronous mode returns.

use std::time::Duration;

use serde::Serialize;

/// Policy set in the table or by message: the table grammar's own type.
pub use dmrep_formats::replicator_table::Policy;

/// Fall-behind thresholds (None: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Thresholds {
    pub ios: Option<u64>,
    pub bytes: Option<u64>,
    #[serde(serialize_with = "ser_ms")]
    pub timeout: Option<Duration>,
}

fn ser_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

impl Thresholds {
    pub fn is_empty(&self) -> bool {
        self.ios.is_none() && self.bytes.is_none() && self.timeout.is_none()
    }
}

/// How far behind an SLINK is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Lag {
    pub ios: u64,
    pub bytes: u64,
    #[serde(serialize_with = "ser_ms")]
    pub oldest_age: Option<Duration>,
}

/// The mode in force for an SLINK now (its policy's mode, or forced synchronous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InForce {
    /// Synchronous by policy.
    Synchronous,
    Asynchronous,
    /// Asynchronous by policy, over a fall-behind threshold.
    ForcedSynchronous,
}

impl InForce {
    /// Whether writes must wait for this SLINK.
    pub fn waits(self) -> bool {
        !matches!(self, InForce::Asynchronous)
    }

    /// One letter for the dmsetup-style status: S sync, A async, F forced sync.
    pub fn letter(self) -> char {
        match self {
            InForce::Synchronous => 'S',
            InForce::Asynchronous => 'A',
            InForce::ForcedSynchronous => 'F',
        }
    }
}

/// Whether `lag` is at or over any threshold.
pub fn over(t: &Thresholds, lag: &Lag) -> bool {
    t.ios.is_some_and(|l| lag.ios >= l)
        || t.bytes.is_some_and(|l| lag.bytes >= l)
        || t.timeout.is_some_and(|l| lag.oldest_age.is_some_and(|a| a >= l))
}

/// The mode for `policy` at `lag`, without hysteresis.
pub fn mode(policy: &Policy, t: &Thresholds, lag: &Lag) -> InForce {
    if policy.is_synchronous() {
        InForce::Synchronous
    } else if over(t, lag) {
        InForce::ForcedSynchronous
    } else {
        InForce::Asynchronous
    }
}

/// Share of each threshold a forced-synchronous SLINK must get back under before it is
/// asynchronous again: without it, an SLINK at its bound under a steady load switches on
/// every batch (thousands of switches a second at queue depth 32).
pub const RELEASE_NUM: u64 = 3;
pub const RELEASE_DEN: u64 = 4;

/// Shortest time an SLINK stays forced synchronous once it got there: with a lag that
/// hovers at the bound, the share alone still allows a switch every few batches (over a
/// hundred a second at queue depth 32); this bounds it to a few a second, at the cost of
/// writes waiting for an SLINK that is already under its bound for at most this long.
pub const MIN_FORCED: Duration = Duration::from_millis(200);

/// The mode for `policy` at `lag`, from mode `current` (in force for `held`): forced
/// synchronous starts at a threshold and ends only under [`RELEASE_NUM`]/[`RELEASE_DEN`]
/// of every threshold, and not before [`MIN_FORCED`].
pub fn next_mode(policy: &Policy, t: &Thresholds, lag: &Lag, current: InForce, held: Duration) -> InForce {
    let m = mode(policy, t, lag);
    if m == InForce::Asynchronous && current == InForce::ForcedSynchronous {
        if held < MIN_FORCED {
            return InForce::ForcedSynchronous;
        }
        let release = Thresholds {
            ios: t.ios.map(|l| (l * RELEASE_NUM / RELEASE_DEN).max(1)),
            bytes: t.bytes.map(|l| (l * RELEASE_NUM / RELEASE_DEN).max(1)),
            timeout: t.timeout.map(|l| l * RELEASE_NUM as u32 / RELEASE_DEN as u32),
        };
        if over(&release, lag) {
            return InForce::ForcedSynchronous;
        }
    }
    m
}

/// How many more entries of the given sizes may be appended without taking an
/// asynchronous SLINK past its `ios`/`bytes` bounds. At least one entry is admitted
/// when nothing is outstanding, so an entry larger than `bytes` cannot wedge the group.
pub fn admit(policy: &Policy, t: &Thresholds, lag: &Lag, sizes: impl Iterator<Item = u64>) -> usize {
    if policy.is_synchronous() {
        return usize::MAX;
    }
    let mut bytes = lag.bytes;
    let mut n = 0usize;
    for s in sizes {
        let ios = lag.ios + n as u64;
        let fits_ios = t.ios.is_none_or(|l| ios < l);
        let fits_bytes = t.bytes.is_none_or(|l| bytes + s <= l);
        if !(fits_ios && (fits_bytes || ios == 0)) {
            break;
        }
        bytes += s;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASYNC: Policy = Policy::ASYNCHRONOUS;

    #[test]
    fn modes() {
        let t = Thresholds { ios: Some(100), ..Default::default() };
        assert_eq!(mode(&ASYNC, &t, &Lag { ios: 99, ..Default::default() }), InForce::Asynchronous);
        assert_eq!(mode(&ASYNC, &t, &Lag { ios: 100, ..Default::default() }), InForce::ForcedSynchronous);
        let sync = Policy::SYNCHRONOUS;
        assert_eq!(mode(&sync, &t, &Lag::default()), InForce::Synchronous);
        let t = Thresholds { timeout: Some(Duration::from_millis(10)), ..Default::default() };
        let lag = Lag { ios: 1, bytes: 1, oldest_age: Some(Duration::from_millis(11)) };
        assert_eq!(mode(&ASYNC, &t, &lag), InForce::ForcedSynchronous);
    }

    #[test]
    fn forced_mode_has_hysteresis() {
        let t = Thresholds { ios: Some(100), ..Default::default() };
        let lag = |ios| Lag { ios, ..Default::default() };
        let long = MIN_FORCED;
        assert_eq!(next_mode(&ASYNC, &t, &lag(100), InForce::Asynchronous, long), InForce::ForcedSynchronous);
        assert_eq!(next_mode(&ASYNC, &t, &lag(99), InForce::ForcedSynchronous, long), InForce::ForcedSynchronous);
        assert_eq!(next_mode(&ASYNC, &t, &lag(75), InForce::ForcedSynchronous, long), InForce::ForcedSynchronous);
        assert_eq!(next_mode(&ASYNC, &t, &lag(74), InForce::ForcedSynchronous, long), InForce::Asynchronous);
        assert_eq!(next_mode(&ASYNC, &t, &lag(99), InForce::Asynchronous, long), InForce::Asynchronous);
        // Not before MIN_FORCED, whatever the lag.
        assert_eq!(
            next_mode(&ASYNC, &t, &lag(0), InForce::ForcedSynchronous, Duration::ZERO),
            InForce::ForcedSynchronous
        );
    }

    #[test]
    fn admission_respects_bounds() {
        let t = Thresholds { ios: Some(3), bytes: Some(10_000), ..Default::default() };
        let lag = Lag { ios: 1, bytes: 4096, oldest_age: None };
        assert_eq!(admit(&ASYNC, &t, &lag, [4096u64, 4096, 4096].into_iter()), 1);
        let lag = Lag::default();
        assert_eq!(admit(&ASYNC, &t, &lag, [4096u64, 4096, 4096].into_iter()), 2);
        // One oversized entry is admitted into an empty lag.
        assert_eq!(admit(&ASYNC, &t, &lag, [1 << 20].into_iter()), 1);
        assert_eq!(admit(&ASYNC, &Thresholds::default(), &lag, [1u64; 50].into_iter()), 50);
    }
}
