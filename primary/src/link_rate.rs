//! The replication link's rate, as the adaptive codec needs it: how fast
//! the link and the backup behind it take a checkpoint's bytes once the
//! encoder has handed them over.
//!
//! Each checkpoint is encoded whole, then handed to the stream; its
//! delivery time runs from then (or from the previous ack, if it queued
//! behind that epoch) to its ack. The rate is the windowed maximum of recent
//! checkpoints' delivery rates, as BBR estimates a bottleneck: a delivery is
//! slower than the link when something else held it up (a small epoch's
//! round trip, a busy backup), never faster. Small checkpoints measure the
//! round trip, not the rate, and are not sampled.

use std::collections::VecDeque;
use std::time::Instant;

/// Checkpoints smaller than this (wire bytes) are not sampled.
const MIN_SAMPLE_BYTES: u64 = 256 << 10;
/// Samples the maximum is taken over.
const WINDOW: usize = 16;

/// The link rate estimate and the checkpoints it waits to hear about.
#[derive(Debug, Default)]
pub(crate) struct LinkRate {
    /// (epoch, when its chunks were handed to the stream, wire bytes).
    shipping: VecDeque<(u64, Instant, u64)>,
    samples: VecDeque<f64>,
    last_ack: Option<Instant>,
}

impl LinkRate {
    /// A checkpoint of `bytes` handed to the stream `at`.
    pub(crate) fn shipped(&mut self, epoch: u64, at: Instant, bytes: u64) {
        self.shipping.push_back((epoch, at, bytes));
    }

    /// `epoch` (and every one before it) acked `at`.
    pub(crate) fn acked(&mut self, epoch: u64, at: Instant) {
        while let Some(&(e, sent, bytes)) = self.shipping.front() {
            if e > epoch {
                break;
            }
            self.shipping.pop_front();
            if e != epoch || bytes < MIN_SAMPLE_BYTES {
                continue;
            }
            let start = self.last_ack.map_or(sent, |last| last.max(sent));
            let took = at.saturating_duration_since(start).as_secs_f64();
            if took > 0.0 {
                if self.samples.len() == WINDOW {
                    self.samples.pop_front();
                }
                self.samples.push_back(bytes as f64 / took);
            }
        }
        self.last_ack = Some(at);
    }

    /// The estimate in bytes per second; None before the first sample.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.samples.iter().copied().reduce(f64::max)
    }

    /// A new session: checkpoints in flight will never be acked; the rate
    /// measured so far still describes the link.
    pub(crate) fn new_session(&mut self) {
        self.shipping.clear();
        self.last_ack = None;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_rate_is_the_best_recent_delivery_of_a_sizable_checkpoint() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = LinkRate::default();
        assert_eq!(r.rate(), None);
        // 10 MB in 10 ms: 1 GB/s.
        r.shipped(1, ms(0), 10_000_000);
        r.acked(1, ms(10));
        assert_eq!(r.rate(), Some(1e9));
        // Queued behind epoch 1's delivery until its ack at 10 ms: counted
        // from there (2 GB/s), not from its own handover at 5 ms.
        r.shipped(2, ms(5), 10_000_000);
        r.acked(2, ms(15));
        assert_eq!(r.rate(), Some(2e9));
        // A small checkpoint measures the round trip: not sampled.
        r.shipped(3, ms(20), 4096);
        r.acked(3, ms(21));
        assert_eq!(r.rate(), Some(2e9));
        // A slow delivery does not lower the maximum until it leaves the window.
        for e in 4..4 + WINDOW as u64 {
            r.shipped(e, ms(e * 100), 1_000_000);
            r.acked(e, ms(e * 100 + 10));
        }
        assert_eq!(r.rate(), Some(1e8));
        // One ack covers the ones before it; a new session forgets in-flight ones.
        r.shipped(40, ms(4000), 1_000_000);
        r.new_session();
        r.acked(40, ms(4001));
        assert_eq!(r.rate(), Some(1e8));
    }
}
