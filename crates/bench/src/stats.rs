//! Percentiles of a sample, in milliseconds.

use serde::Serialize;

/// Summary of a set of durations, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Nearest-rank percentile of a sorted, non-empty sample.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Summarises `samples` (milliseconds); `None` when there are none.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
    Some(Summary {
        count: sorted.len(),
        mean_ms: round3(mean),
        p50_ms: round3(percentile(&sorted, 50.0)),
        p90_ms: round3(percentile(&sorted, 90.0)),
        p99_ms: round3(percentile(&sorted, 99.0)),
        max_ms: round3(sorted[sorted.len() - 1]),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = summarize(&samples).unwrap();
        assert_eq!(
            (s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(s.mean_ms, 50.5);
        let one = summarize(&[3.0]).unwrap();
        assert_eq!((one.p50_ms, one.p99_ms), (3.0, 3.0));
        assert!(summarize(&[]).is_none());
    }
}
