//! Latency histograms: ACT's 65 power-of-two buckets (for ACT-compatible reports) and an HDR
//! histogram beside them (for p50/p99/p99.9/max).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Buckets of an ACT histogram: bucket 0 = [0, 1) unit, bucket k = [2^(k-1), 2^k) units.
pub const ACT_BUCKETS: usize = 65;

/// Largest latency the HDR histograms hold (one hour, in nanoseconds); larger values saturate.
pub const HDR_MAX_NS: u64 = 3_600_000_000_000;

/// Unit of an ACT histogram's buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scale {
    Milliseconds,
    Microseconds,
}

impl Scale {
    pub fn ns_per_unit(self) -> u64 {
        match self {
            Scale::Milliseconds => 1_000_000,
            Scale::Microseconds => 1_000,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scale::Milliseconds => "ms",
            Scale::Microseconds => "us",
        }
    }
}

/// ACT's bucket of a latency: the value is truncated to whole units, then bucket = index of
/// its most significant bit plus one (0 stays in bucket 0).
pub fn act_bucket(ns: u64, scale: Scale) -> usize {
    let units = ns / scale.ns_per_unit();
    (64 - units.leading_zeros()) as usize
}

/// A cumulative ACT histogram, updated from any thread.
pub struct ActHist {
    counts: [AtomicU64; ACT_BUCKETS],
    scale: Scale,
}

impl ActHist {
    pub fn new(scale: Scale) -> ActHist {
        ActHist { counts: std::array::from_fn(|_| AtomicU64::new(0)), scale }
    }

    pub fn insert_ns(&self, ns: u64) {
        self.counts[act_bucket(ns, self.scale)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> [u64; ACT_BUCKETS] {
        std::array::from_fn(|i| self.counts[i].load(Relaxed))
    }
}

/// Append ACT's dump of one histogram to `out`, byte for byte as act_storage prints it:
/// `<name> (<total> total)`, then the non-empty buckets as ` (BB: CCCCCCCCCC)`, four per line.
pub fn act_dump(name: &str, counts: &[u64; ACT_BUCKETS], out: &mut String) {
    use std::fmt::Write;
    let total: u64 = counts.iter().sum();
    let _ = writeln!(out, "{name} ({total} total)");
    let mut line = String::new();
    let mut k = 0u32;
    for (b, &c) in counts.iter().enumerate() {
        if c == 0 {
            continue;
        }
        let _ = write!(line, " ({b:02}: {c:010})");
        if k & 3 == 3 {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        k += 1;
    }
    if !line.is_empty() {
        out.push_str(&line);
        out.push('\n');
    }
}

/// Percentage of operations at or above 2^i units for each i in `0..n` — act_latency.py's
/// columns: (total − Σ buckets 0..=i) / total × 100.
pub fn pct_over(counts: &[u64; ACT_BUCKETS], n: usize) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    let mut below = 0u64;
    (0..n)
        .map(|i| {
            below += counts[i];
            if total == 0 {
                0.0
            } else {
                (total - below) as f64 * 100.0 / total as f64
            }
        })
        .collect()
}

/// A new HDR histogram of nanoseconds, 3 significant digits, up to [`HDR_MAX_NS`].
pub fn new_hdr() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HDR_MAX_NS, 3).expect("valid HDR bounds")
}

/// One kind of operation: its ACT histogram and its HDR histogram.
pub struct OpHist {
    pub act: ActHist,
    pub hdr: Mutex<Histogram<u64>>,
}

impl OpHist {
    pub fn new(scale: Scale) -> OpHist {
        OpHist { act: ActHist::new(scale), hdr: Mutex::new(new_hdr()) }
    }

    pub fn record_ns(&self, ns: u64) {
        self.act.insert_ns(ns);
        self.hdr.lock().expect("hdr lock").saturating_record(ns.clamp(1, HDR_MAX_NS));
    }

    /// Merge a thread-local HDR histogram (threads that record at high rates keep their own).
    pub fn merge_hdr(&self, h: &Histogram<u64>) {
        let _ = self.hdr.lock().expect("hdr lock").add(h);
    }
}

/// p50, p99, p99.9 and max of an HDR histogram of nanoseconds, in microseconds.
pub fn hdr_summary_us(h: &Histogram<u64>) -> [f64; 4] {
    if h.is_empty() {
        return [0.0; 4];
    }
    [
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_act() {
        let ms = Scale::Milliseconds;
        assert_eq!(act_bucket(0, ms), 0);
        assert_eq!(act_bucket(999_999, ms), 0);
        assert_eq!(act_bucket(1_000_000, ms), 1);
        assert_eq!(act_bucket(1_999_999, ms), 1);
        assert_eq!(act_bucket(2_000_000, ms), 2);
        assert_eq!(act_bucket(3_999_999, ms), 2);
        assert_eq!(act_bucket(4_000_000, ms), 3);
        assert!(act_bucket(u64::MAX, Scale::Microseconds) < ACT_BUCKETS);
        assert_eq!(act_bucket(1_000, Scale::Microseconds), 1);
    }

    #[test]
    fn dump_layout_is_acts() {
        let mut c = [0u64; ACT_BUCKETS];
        c[0] = 118765;
        c[1] = 690;
        c[2] = 399;
        c[3] = 127;
        c[4] = 17;
        let mut s = String::new();
        act_dump("reads", &c, &mut s);
        assert_eq!(
            s,
            "reads (119998 total)\n (00: 0000118765) (01: 0000000690) (02: 0000000399) (03: 0000000127)\n (04: 0000000017)\n"
        );
        let mut s = String::new();
        act_dump("x", &[0; ACT_BUCKETS], &mut s);
        assert_eq!(s, "x (0 total)\n");
        let p = pct_over(&c, 3);
        assert!((p[0] - 1233.0 * 100.0 / 119998.0).abs() < 1e-9);
    }
}
