//! Per-SLINK state: policy, positions, backlog, mode in force, link, resync.

use super::*;

/// The link to a site: reachable or not, and when to probe.
pub(super) struct Link {
    pub(super) accessible: bool,
    pub(super) down_since: Option<SystemTime>,
    pub(super) last_error: Option<String>,
    pub(super) next_probe: Instant,
    pub(super) backoff: Duration,
    /// Real work succeeded since the last failure (backoff resets only then, so a site
    /// that answers probes but fails I/O is not reported as flapping).
    pub(super) healthy: bool,
}

/// Per-SLINK resync bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct ResyncState {
    /// No dirty region left: the appender may return the SLINK to ordered mode.
    pub done: bool,
    pub reason: Option<String>,
    pub since: Option<SystemTime>,
    pub regions_done: u64,
    pub bytes_copied: u64,
    pub started: Option<Instant>,
    /// Bytes per second; None: unlimited.
    pub rate_limit: Option<u64>,
    /// Where the pass is: the next region to look at (device, region). Passes go
    /// through the devices in order, so a region rewritten behind the pass waits for
    /// the next pass instead of being copied again and again.
    pub(super) cursor: (DevNr, u64),
}

pub(crate) struct SlinkRt {
    pub handler: Arc<dyn SlinkHandler>,
    pub policy: Policy,
    pub thresholds: Thresholds,
    /// Last entry handed to the site.
    pub shipped: Seq,
    /// Last entry durable at the site (the cursor to persist).
    pub durable: Seq,
    /// Entries it still needs: (seq, bytes, appended at).
    pub(super) outstanding: VecDeque<(Seq, u64, Instant)>,
    pub(super) out_bytes: u64,
    /// The mode in force (what status shows).
    pub mode: InForce,
    pub mode_since: SystemTime,
    /// When the mode in force last changed (for the forced-synchronous dwell time).
    pub(super) mode_at: Instant,
    pub mode_switches: u64,
    /// Mode changes not logged (rate limit), and when one was last logged.
    pub(super) mode_unlogged: u64,
    pub(super) mode_logged: Option<Instant>,
    pub(super) link: Link,
    pub waiting_for_device: Option<DevNr>,
    /// Operator pause (`slink <nr> pause`): entries queue in the log, nothing ships.
    pub paused: bool,
    /// At a secondary, an SLINK to another dmrep site: ships nothing, never throttles;
    /// its entries stay in the log until its site has them (see `machine::roles`).
    pub standby: bool,
    /// In ordered (log) mode. Off: its RDs are out of sync; new writes mark dirty
    /// regions and the resync copies them.
    pub ordered: bool,
    /// Leaving ordered mode: dirty logs being flushed and the log cursor dropped.
    pub(super) leaving: bool,
    /// Bumped on every ordered/dirty transition: work handed out before is void.
    pub(super) era: u64,
    pub resync: ResyncState,
    pub applied_entries: u64,
    pub applied_bytes: u64,
    /// Epoch slices applied, and time spent applying them and persisting the cursor (µs).
    pub applies: u64,
    pub apply_us: u64,
    pub cursor_us: u64,
}

/// The mode's name in events (as in status JSON).
fn mode_name(m: InForce) -> &'static str {
    match m {
        InForce::Synchronous => "synchronous",
        InForce::Asynchronous => "asynchronous",
        InForce::ForcedSynchronous => "forced_synchronous",
    }
}

/// Longest quiet time between two logged mode changes of one SLINK.
const MODE_LOG_EVERY: Duration = Duration::from_secs(1);

impl SlinkRt {
    pub(super) fn new(s: SlinkSetup, ordered: bool, durable: Seq, now: Instant) -> Self {
        SlinkRt {
            mode: fallbehind::mode(&s.policy, &s.thresholds, &Lag::default()),
            handler: s.handler,
            policy: s.policy,
            thresholds: s.thresholds,
            shipped: durable,
            durable,
            outstanding: VecDeque::new(),
            out_bytes: 0,
            mode_since: SystemTime::now(),
            mode_at: now,
            mode_switches: 0,
            mode_unlogged: 0,
            mode_logged: None,
            link: Link {
                accessible: true,
                down_since: None,
                last_error: None,
                next_probe: now,
                backoff: PROBE_MIN,
                healthy: true,
            },
            waiting_for_device: None,
            paused: false,
            standby: false,
            ordered,
            leaving: false,
            era: 0,
            resync: ResyncState::default(),
            applied_entries: 0,
            applied_bytes: 0,
            applies: 0,
            apply_us: 0,
            cursor_us: 0,
        }
    }

    /// Whether writes may wait for this SLINK: it is in ordered mode and either
    /// synchronous by policy (then an outage stalls writes: DESIGN invariant 1) or
    /// reachable and not paused (an unreachable or paused asynchronous SLINK does not
    /// throttle: its entries wait in the log, and it leaves ordered mode if it holds the
    /// log when the log fills).
    pub(super) fn throttles(&self) -> bool {
        !self.standby
            && self.ordered
            && !self.leaving
            && (self.policy.is_synchronous() || (self.link.accessible && !self.paused))
    }

    pub fn lag(&self, now: Instant) -> Lag {
        Lag {
            ios: self.outstanding.len() as u64,
            bytes: self.out_bytes,
            oldest_age: self.outstanding.front().map(|o| now.saturating_duration_since(o.2)),
        }
    }

    /// Seq of the oldest entry the SLINK has not applied.
    pub fn first_outstanding(&self) -> Option<u64> {
        self.outstanding.front().map(|o| o.0)
    }

    /// Probe at once (its site was heard from), with the shortest backoff.
    pub(super) fn probe_now(&mut self, now: Instant) {
        self.link.next_probe = now;
        self.link.backoff = PROBE_MIN;
    }

    /// Leaving ordered mode (out of sync already).
    pub fn leaving(&self) -> bool {
        self.leaving
    }
    pub fn accessible(&self) -> bool {
        self.link.accessible
    }
    pub fn down_since(&self) -> Option<SystemTime> {
        self.link.down_since
    }
    pub fn last_error(&self) -> Option<&str> {
        self.link.last_error.as_deref()
    }

    /// Whether the SLINK's writes must wait for it now.
    pub(super) fn makes_writes_wait(&self) -> bool {
        self.throttles() && self.mode.waits()
    }

    /// Recompute the mode in force: a down or paused asynchronous SLINK does not
    /// throttle, so it is shown (and treated) as asynchronous whatever its lag.
    pub(super) fn update_mode(&mut self, group: &str, nr: SlinkNr, now: Instant) {
        let m = if self.policy.is_synchronous() || self.throttles() {
            let held = now.saturating_duration_since(self.mode_at);
            fallbehind::next_mode(&self.policy, &self.thresholds, &self.lag(now), self.mode, held)
        } else {
            InForce::Asynchronous
        };
        if m == self.mode {
            return;
        }
        let from = std::mem::replace(&mut self.mode, m);
        super::slink_event(group, nr, &[("mode", mode_name(m).into()), ("from", mode_name(from).into())]);
        self.mode_since = SystemTime::now();
        self.mode_at = now;
        self.mode_switches += 1;
        if self.mode_logged.is_none_or(|t| now.saturating_duration_since(t) >= MODE_LOG_EVERY) {
            info!(group, slink = nr, ?from, to = ?m, lag = ?self.lag(now), unlogged = self.mode_unlogged, "slink mode changed");
            self.mode_logged = Some(now);
            self.mode_unlogged = 0;
        } else {
            self.mode_unlogged += 1;
        }
    }
}
