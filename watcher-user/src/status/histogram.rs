//! A histogram of durations with fixed buckets, as Prometheus counts them: each observation
//! falls in the first bucket whose upper bound is at least its value, and the buckets are
//! shown cumulative (`le`), ending with `+Inf`.
//!
//! Plain data carried in the snapshot: the daemon observes, the metrics endpoint renders.
//! Counts are kept per bucket and summed up only for rendering, so a snapshot from a peer
//! with other buckets still reads consistently.

use serde::{Deserialize, Serialize};

/// Upper bounds, in seconds, of the buckets of rsync run durations: from a batch of a few
/// files on a local disk (tens of milliseconds) to a whole-tree run of a large tree over a
/// slow link (hours).
pub const RUN_SECONDS_BOUNDS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    14400.0,
];

/// Observations counted in buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending; the last bucket, without a bound, is implied.
    pub bounds: Vec<f64>,
    /// Observations per bucket (not cumulative): one more entry than `bounds`.
    pub counts: Vec<u64>,
    /// Sum of the observed values.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram with buckets up to each of `bounds` (ascending) and one above.
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Counts `value` in the first bucket whose bound is at least `value`.
    pub fn observe(&mut self, value: f64) {
        self.counts.resize(self.bounds.len() + 1, 0);
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.counts[bucket] += 1;
        self.sum += value;
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(le, observations at most le)` per bucket, ending with `(+Inf, count)`.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let mut out: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .enumerate()
            .map(|(i, &bound)| {
                total += self.counts.get(i).copied().unwrap_or(0);
                (bound, total)
            })
            .collect();
        out.push((f64::INFINITY, self.count()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_fall_in_the_first_bucket_that_holds_them() {
        // (observed values, cumulative counts for bounds 1, 2, 5 and +Inf)
        let table: &[(&[f64], [u64; 4])] = &[
            (&[], [0, 0, 0, 0]),
            (&[0.0], [1, 1, 1, 1]),
            // A value equal to a bound is in that bound's bucket (`le`).
            (&[1.0], [1, 1, 1, 1]),
            (&[1.000_001], [0, 1, 1, 1]),
            (&[2.0, 4.9], [0, 1, 2, 2]),
            (&[5.0, 5.1, 1e9], [0, 0, 1, 3]),
            (&[0.5, 1.5, 3.0, 7.0], [1, 2, 3, 4]),
            (&[f64::INFINITY], [0, 0, 0, 1]),
        ];
        for (values, want) in table {
            let mut h = Histogram::new(&[1.0, 2.0, 5.0]);
            for &v in *values {
                h.observe(v);
            }
            let got: Vec<u64> = h.cumulative().iter().map(|&(_, n)| n).collect();
            assert_eq!(got, want, "{values:?}");
            let les: Vec<f64> = h.cumulative().iter().map(|&(le, _)| le).collect();
            assert_eq!(les, [1.0, 2.0, 5.0, f64::INFINITY]);
            assert_eq!(h.count(), values.len() as u64);
            assert_eq!(h.sum, values.iter().sum::<f64>(), "{values:?}");
        }
    }

    #[test]
    fn run_seconds_bounds_ascend() {
        assert!(RUN_SECONDS_BOUNDS.windows(2).all(|w| w[0] < w[1]));
        let h = Histogram::new(&RUN_SECONDS_BOUNDS);
        assert_eq!(h.cumulative().len(), RUN_SECONDS_BOUNDS.len() + 1);
    }

    #[test]
    fn a_histogram_from_a_peer_reads_consistently() {
        // Default (no buckets): everything is in +Inf.
        let mut h = Histogram::default();
        h.observe(3.0);
        assert_eq!(h.cumulative(), [(f64::INFINITY, 1)]);
        // Fewer counts than buckets (a peer that sent less): missing counts are 0.
        let h = Histogram {
            bounds: vec![1.0, 2.0],
            counts: vec![4],
            sum: 2.0,
        };
        assert_eq!(h.cumulative(), [(1.0, 4), (2.0, 4), (f64::INFINITY, 4)]);
        let json = serde_json::to_string(&Histogram::new(&[0.5])).unwrap();
        let back: Histogram = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Histogram::new(&[0.5]));
    }
}
