//! The replication link's rate, as the adaptive codec needs it: how fast
//! the link and the backup behind it take checkpoints' bytes once the
//! encoder has handed them over.
//!
//! Each checkpoint is encoded whole, then handed to the stream; its service
//! runs from then (or from the previous ack, if it queued behind that
//! epoch) to its ack. One checkpoint's service alone can mislead: acks
//! arrive in bursts when the backup commits epochs whose bytes were already
//! in its socket buffer, and such an epoch's service is its commit, not its
//! transfer (which the epoch before it was charged for). So a sample spans
//! the last [`SPAN`] acked checkpoints: their bytes over the sum of their
//! services, that is, over the time the link was busy with them (sampled
//! once they carry at least [`MIN_SAMPLE_BYTES`]). Time the link sat idle
//! waiting for the encoder is in no service, so a slow compressor does not
//! make the link look slow. The rate is the
//! maximum of the last [`WINDOW`] samples, as BBR estimates a bottleneck: a
//! delivery is slowed by other things (a busy backup, a small epoch's round
//! trip), never sped up past the link.

use std::collections::VecDeque;
use std::time::Instant;

use understudy_checkpoint::epoch::SenderState;
use understudy_proto::CodecStatus;

/// Checkpoints one sample spans.
pub const SPAN: usize = 4;
/// A sample needs at least these many bytes in its span.
pub const MIN_SAMPLE_BYTES: u64 = 1 << 20;
/// Samples the maximum is taken over.
pub const WINDOW: usize = 16;

/// The link rate estimate and the checkpoints it waits to hear about.
#[derive(Debug, Default)]
pub struct LinkRate {
    /// (epoch, when its chunks were handed to the stream, wire bytes).
    shipping: VecDeque<(u64, Instant, u64)>,
    /// The last acked checkpoints: (service time, wire bytes).
    span: VecDeque<(std::time::Duration, u64)>,
    samples: VecDeque<f64>,
    last_ack: Option<Instant>,
}

impl LinkRate {
    /// A checkpoint of `bytes` handed to the stream `at`.
    pub fn shipped(&mut self, epoch: u64, at: Instant, bytes: u64) {
        self.shipping.push_back((epoch, at, bytes));
    }

    /// `epoch` (and every one before it) acked `at`.
    pub fn acked(&mut self, epoch: u64, at: Instant) {
        while let Some(&(e, sent, bytes)) = self.shipping.front() {
            if e > epoch {
                break;
            }
            self.shipping.pop_front();
            let start = self.last_ack.map_or(sent, |last| last.max(sent));
            if self.span.len() == SPAN {
                self.span.pop_front();
            }
            self.span
                .push_back((at.saturating_duration_since(start), bytes));
            let bytes: u64 = self.span.iter().map(|&(_, b)| b).sum();
            let took: f64 = self.span.iter().map(|(t, _)| t.as_secs_f64()).sum();
            if bytes >= MIN_SAMPLE_BYTES && took > 0.0 {
                if self.samples.len() == WINDOW {
                    self.samples.pop_front();
                }
                self.samples.push_back(bytes as f64 / took);
            }
        }
        self.last_ack = Some(at);
    }

    /// The estimate in bytes per second; None before the first sample.
    pub fn rate(&self) -> Option<f64> {
        self.samples.iter().copied().reduce(f64::max)
    }

    /// A new session: checkpoints in flight will never be acked; the rate
    /// measured so far still describes the link.
    pub fn new_session(&mut self) {
        self.shipping.clear();
        self.span.clear();
        self.last_ack = None;
    }
}

/// The adaptive codec's last decision, as status and metrics show it
/// (None: not adaptive, or nothing decided yet).
pub(crate) fn codec_status(sender: &SenderState) -> Option<CodecStatus> {
    sender.adaptive().map(|r| CodecStatus {
        compressing: r.compressing,
        link_bytes_per_second: r.link_rate.unwrap_or_default(),
        compress_bytes_per_second: r.compress_rate,
        saved_share: r.saved_share,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_rate_spans_several_checkpoints_and_keeps_the_best_recent_sample() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = LinkRate::default();
        assert_eq!(r.rate(), None);
        // 10 MB in 10 ms: 1 GB/s.
        r.shipped(1, ms(0), 10_000_000);
        r.acked(1, ms(10));
        assert_eq!(r.rate(), Some(1e9));
        // Queued behind epoch 1 until its ack at 10 ms: counted from there;
        // the span is both: 20 MB in 20 ms.
        r.shipped(2, ms(5), 10_000_000);
        r.acked(2, ms(20));
        assert_eq!(r.rate(), Some(1e9));
        // A burst of acks (epoch 3's bytes arrived while 2 committed): its
        // own service is 10 µs, but the span says 30 MB in 20.01 ms.
        r.shipped(3, ms(6), 10_000_000);
        r.acked(3, ms(20) + Duration::from_micros(10));
        let rate = r.rate().unwrap();
        assert!(rate < 1.6e9, "a burst of acks is not a fast link: {rate}");
        // Idle time between an ack and the next handover (the encoder was
        // busy) is not the link's: 1.2 MB served in 2 ms, with 100 ms
        // between the two checkpoints.
        let mut gaps = LinkRate::default();
        gaps.shipped(1, ms(0), 600_000);
        gaps.acked(1, ms(1));
        assert_eq!(gaps.rate(), None, "600 kB alone is no sample");
        gaps.shipped(2, ms(101), 600_000);
        gaps.acked(2, ms(102));
        assert_eq!(gaps.rate(), Some(6e8));
        // Small checkpoints alone never make a sample.
        let mut small = LinkRate::default();
        small.shipped(1, ms(0), 4096);
        small.acked(1, ms(1));
        assert_eq!(small.rate(), None);
        // A slow stretch does not lower the maximum until it leaves the window.
        for e in 4..4 + (WINDOW + SPAN) as u64 {
            r.shipped(e, ms(e * 100), 1_000_000);
            r.acked(e, ms(e * 100 + 10));
        }
        let slow = r.rate().unwrap();
        assert!(slow < 1.1e8, "{slow}");
        // A new session forgets what is in flight.
        r.shipped(99, ms(9000), 100_000_000);
        r.new_session();
        r.acked(99, ms(9001));
        assert_eq!(r.rate(), Some(slow));
    }
}
