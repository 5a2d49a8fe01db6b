//! Latency histograms with bounded memory: millions of requests, fixed-size buckets, deterministic percentiles.

use serde::Serialize;

/// Relative width of a bucket: percentiles are exact to about this fraction.
const RESOLUTION: f64 = 0.01;
/// Smallest value kept apart (ms); smaller ones share the first bucket.
const FLOOR_MS: f64 = 1e-3;
/// Buckets from 1 us to about 100 days.
const BUCKETS: usize = 3000;

/// Log-bucketed histogram of milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: f64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS], total: 0, sum: 0.0 }
    }
}

impl Histogram {
    pub fn record(&mut self, ms: f64) {
        let ms = ms.max(0.0);
        let bucket = if ms <= FLOOR_MS { 0 } else { ((ms / FLOOR_MS).ln() / RESOLUTION.ln_1p()).ceil() as usize };
        self.counts[bucket.min(BUCKETS - 1)] += 1;
        self.total += 1;
        self.sum += ms;
    }

    /// The value below which a fraction `q` of the records lie (the upper edge of its bucket); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(FLOOR_MS * (1.0 + RESOLUTION).powi(bucket as i32));
            }
        }
        None
    }

    pub fn summary(&self) -> Latency {
        Latency {
            count: self.total,
            mean_ms: (self.total > 0).then(|| self.sum / self.total as f64),
            p50_ms: self.quantile(0.5),
            p99_ms: self.quantile(0.99),
        }
    }

    pub fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0);
        self.total = 0;
        self.sum = 0.0;
    }
}

/// A latency distribution's summary (to about 1%). Empty: no values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Mean, ms.
    pub mean_ms: Option<f64>,
    /// Median, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
}

/// What requests did, counted by the attention workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    pub arrived: u64,
    pub completed: u64,
    pub failed: u64,
    pub rejected: u64,
    pub output_tokens: u64,
    pub prefill_tokens: u64,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    /// Output tokens of the current time-series point.
    pub point_output_tokens: u64,
    /// First-token times of the current time-series point.
    pub point_ttft: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut h = Histogram::default();
        for i in 1..=1000 {
            h.record(i as f64);
        }
        let p50 = h.quantile(0.5).expect("values");
        let p99 = h.quantile(0.99).expect("values");
        assert!((p50 / 500.0 - 1.0).abs() < 0.011, "{p50}");
        assert!((p99 / 990.0 - 1.0).abs() < 0.011, "{p99}");
        assert_eq!(Histogram::default().quantile(0.5), None);
        h.record(0.0);
        h.record(1e12);
        assert_eq!(h.summary().count, 1002);
    }
}
