//! The token bucket behind `rate`: one per direction, shared by every connection
//! forwarding in that direction, as one bottleneck link would be.

use std::time::{Duration, Instant};

/// The largest burst the bucket lets through at once, whatever the rate.
pub const MAX_BURST: u64 = 64 * 1024;

/// What a writer may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Grant {
    /// Write this many bytes (at least 1, at most what was asked).
    Bytes(usize),
    /// Nothing yet: try again after this long, or (`None`, rate 0) only when woken.
    Wait(Option<Duration>),
}

/// Tokens are bytes; they accrue at `rate` per second up to the burst.
#[derive(Debug)]
pub struct Bucket {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// An unlimited bucket.
    pub fn new() -> Self {
        Bucket { rate: None, tokens: 0.0, last: Instant::now() }
    }

    /// The burst at `rate`: rate/50 (20 ms worth), between 1 byte and [`MAX_BURST`].
    pub fn burst(rate: u64) -> u64 {
        (rate / 50).clamp(1, MAX_BURST)
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// A new rate (`None`: unlimited) starts with a full burst.
    pub fn set_rate(&mut self, rate: Option<u64>, now: Instant) {
        self.rate = rate;
        self.tokens = rate.map_or(0.0, |r| Self::burst(r) as f64);
        self.last = now;
    }

    /// Asks to write `want` (> 0) bytes at `now`.
    ///
    /// A writer is granted bytes once at least half a burst (or all it wants, if less)
    /// has accrued, then everything accrued up to what it wants: waking late costs no
    /// throughput as long as the lateness is under half a burst's time.
    pub fn take(&mut self, want: usize, now: Instant) -> Grant {
        let Some(rate) = self.rate else { return Grant::Bytes(want) };
        if rate == 0 {
            return Grant::Wait(None);
        }
        let burst = Self::burst(rate) as f64;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(burst);
        self.last = self.last.max(now);
        let need = (want as f64).min((burst / 2.0).max(1.0));
        if self.tokens >= need {
            let n = (self.tokens.floor() as usize).clamp(1, want);
            self.tokens -= n as f64;
            Grant::Bytes(n)
        } else {
            Grant::Wait(Some(Duration::from_secs_f64((need - self.tokens) / rate as f64)))
        }
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_grants_everything() {
        let mut b = Bucket::new();
        assert_eq!(b.take(1 << 20, Instant::now()), Grant::Bytes(1 << 20));
    }

    #[test]
    fn burst_bounds() {
        assert_eq!(Bucket::burst(10), 1);
        assert_eq!(Bucket::burst(50_000), 1000);
        assert_eq!(Bucket::burst(1 << 30), MAX_BURST);
    }

    #[test]
    fn rate_zero_waits_until_woken() {
        let mut b = Bucket::new();
        b.set_rate(Some(0), Instant::now());
        assert_eq!(b.take(10, Instant::now()), Grant::Wait(None));
    }

    #[test]
    fn grants_follow_the_rate() {
        // 1 MB/s: burst 20000 bytes. Simulate a writer with a virtual clock.
        let t0 = Instant::now();
        let mut b = Bucket::new();
        b.set_rate(Some(1_000_000), t0);
        let mut now = t0;
        let mut sent = 0usize;
        while sent < 3_000_000 {
            match b.take(65536, now) {
                Grant::Bytes(n) => sent += n,
                Grant::Wait(Some(d)) => now += d,
                Grant::Wait(None) => unreachable!(),
            }
        }
        let secs = (now - t0).as_secs_f64();
        // 3 MB at 1 MB/s, less the first burst.
        assert!((2.9..3.1).contains(&secs), "{secs}");
    }

    #[test]
    fn small_asks_are_granted_whole() {
        let t0 = Instant::now();
        let mut b = Bucket::new();
        b.set_rate(Some(100), t0);
        // Burst is 2 bytes; asking for 1 is granted at once.
        assert_eq!(b.take(1, t0), Grant::Bytes(1));
        assert_eq!(b.take(1, t0), Grant::Bytes(1));
        match b.take(1, t0) {
            Grant::Wait(Some(d)) => assert!(d <= Duration::from_millis(11), "{d:?}"),
            g => panic!("{g:?}"),
        }
    }
}
