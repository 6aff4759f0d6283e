//! Per-device I/O counters and latency histograms (what `/metrics` exports): a few
//! relaxed atomic adds per request, no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::target::Op;

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`); the last bucket
/// (`+Inf`) is implied. From 50 µs (a page-cache read) to 2.5 s (a stalled site).
pub const LATENCY_BOUNDS: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5];

/// A latency histogram: counts per bucket (not cumulative) and the sum.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// Cumulative counts per bound (the last is `+Inf`, the total), and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let cum = self.buckets.iter().map(|b| {
            acc += b.load(Relaxed);
            acc
        });
        (cum.collect(), self.sum_ns.load(Relaxed) as f64 / 1e9)
    }
}

/// One device's counters since it was created.
#[derive(Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub errors: AtomicU64,
    pub read_latency: Histogram,
    pub write_latency: Histogram,
}

/// What kind of request a latency belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
}

impl Kind {
    pub(crate) fn of(op: Op) -> Kind {
        match op {
            Op::Read => Kind::Read,
            Op::Flush => Kind::Flush,
            _ => Kind::Write,
        }
    }
}

impl IoStats {
    /// A request of `kind` and `bytes` completed after `took`.
    pub(crate) fn record(&self, kind: Kind, bytes: u64, took: Duration, ok: bool) {
        if !ok {
            self.errors.fetch_add(1, Relaxed);
        }
        match kind {
            Kind::Read => {
                self.reads.fetch_add(1, Relaxed);
                self.read_bytes.fetch_add(bytes, Relaxed);
                self.read_latency.record(took);
            }
            Kind::Write => {
                self.writes.fetch_add(1, Relaxed);
                self.write_bytes.fetch_add(bytes, Relaxed);
                self.write_latency.record(took);
            }
            Kind::Flush => {
                self.flushes.fetch_add(1, Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.record(Duration::from_micros(40));
        h.record(Duration::from_micros(700));
        h.record(Duration::from_secs(5));
        let (cum, sum) = h.snapshot();
        assert_eq!(cum.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!((cum[0], cum[3], cum[4], cum[13], cum[14]), (1, 1, 2, 2, 3));
        assert!((sum - 5.00074).abs() < 1e-6, "{sum}");
    }
}
