//! A token bucket: a link's bandwidth cap, shared by shipping and resync.

use std::time::{Duration, Instant};

/// Burst: 1/20 of a second at the rate (at least 64 KiB), so a cap is smooth at the
/// scale of a round trip and one large frame is never refused outright.
const BURST_DIVISOR: u64 = 20;

/// Bytes per second, with a short burst allowance. A frame larger than the bucket takes
/// its tokens on credit: the sender waits for the debt to be paid.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64) -> TokenBucket {
        let burst = (rate / BURST_DIVISOR).max(64 << 10) as f64;
        TokenBucket { rate: rate.max(1), burst, tokens: burst, at: Instant::now() }
    }

    /// Take `bytes`; how long to wait before sending them.
    pub fn take(&mut self, bytes: u64) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate as f64).min(self.burst);
        self.at = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_in_proportion_to_the_debt() {
        let mut b = TokenBucket::new(1 << 20);
        assert_eq!(b.take(64 << 10), Duration::ZERO, "the burst is free");
        let w = b.take(1 << 20);
        assert!(w > Duration::from_millis(900) && w < Duration::from_millis(1100), "{w:?}");
    }
}
