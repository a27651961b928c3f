//! Measurements: what a client process reports, and the table.

use std::collections::HashMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::workload::{Transport, Workload, ALL, TRANSPORTS};

/// A latency histogram in nanoseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Nanoseconds on the system-wide monotonic clock (comparable across
/// processes, unlike `Instant`).
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What one client process measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Median operation latency (0 if not measured).
    pub median_ns: u64,
    /// 99th percentile latency.
    pub p99_ns: u64,
    /// Operations done.
    pub ops: u64,
    /// Payload bytes moved (for GB/s).
    pub bytes: u64,
    /// Monotonic start and end of the measured phase.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
}

impl Sample {
    /// From a histogram and counters.
    pub fn new(hist: Option<&Histogram<u64>>, ops: u64, bytes: u64, start_ns: u64, end_ns: u64) -> Self {
        let (median_ns, p99_ns) =
            hist.map_or((0, 0), |h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99)));
        Self { median_ns, p99_ns, ops, bytes, start_ns, end_ns }
    }

    /// The line a client process prints for its parent.
    pub fn to_line(&self) -> String {
        format!(
            "RESULT median_ns={} p99_ns={} ops={} bytes={} start_ns={} end_ns={}",
            self.median_ns, self.p99_ns, self.ops, self.bytes, self.start_ns, self.end_ns
        )
    }

    /// Parses [`to_line`](Self::to_line) output.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("RESULT ")?;
        let mut m = HashMap::new();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            m.insert(k, v.parse::<u64>().ok()?);
        }
        Some(Self {
            median_ns: *m.get("median_ns")?,
            p99_ns: *m.get("p99_ns")?,
            ops: *m.get("ops")?,
            bytes: *m.get("bytes")?,
            start_ns: *m.get("start_ns")?,
            end_ns: *m.get("end_ns")?,
        })
    }
}

/// One cell of the table: a workload on a transport.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The workload.
    pub workload: Workload,
    /// The transport.
    pub transport: Transport,
    /// Median latency per operation, ns (0: not applicable).
    pub median_ns: u64,
    /// p99 latency, ns.
    pub p99_ns: u64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Payload GB/s (0: not applicable).
    pub gbps: f64,
    /// What was measured, for floors ("cache-line ping-pong", …).
    pub note: String,
}

impl Outcome {
    /// Combines the samples of the clients of one run.
    pub fn from_samples(workload: Workload, transport: Transport, samples: &[Sample], note: &str) -> Self {
        let start = samples.iter().map(|s| s.start_ns).min().unwrap_or(0);
        let end = samples.iter().map(|s| s.end_ns).max().unwrap_or(0);
        let secs = (end.saturating_sub(start)) as f64 / 1e9;
        let ops: u64 = samples.iter().map(|s| s.ops).sum();
        let bytes: u64 = samples.iter().map(|s| s.bytes).sum();
        let mut medians: Vec<u64> = samples.iter().map(|s| s.median_ns).collect();
        medians.sort_unstable();
        Self {
            workload,
            transport,
            median_ns: medians.get(medians.len() / 2).copied().unwrap_or(0),
            p99_ns: samples.iter().map(|s| s.p99_ns).max().unwrap_or(0),
            ops_per_s: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
            gbps: if secs > 0.0 && bytes > 0 { bytes as f64 / secs / 1e9 } else { 0.0 },
            note: note.to_owned(),
        }
    }

    /// The one-line form scripts rely on.
    pub fn line(&self) -> String {
        format!(
            "workload={} transport={} median_ns={} p99_ns={} ops_per_s={:.0} gbps={:.3}",
            self.workload, self.transport, self.median_ns, self.p99_ns, self.ops_per_s, self.gbps
        )
    }

    /// As JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "workload": self.workload.name(),
            "transport": self.transport.name(),
            "median_ns": self.median_ns,
            "p99_ns": self.p99_ns,
            "ops_per_s": self.ops_per_s,
            "gbps": self.gbps,
            "note": self.note,
        })
    }
}

/// The headline figure of a workload: latency for round-trip workloads,
/// bandwidth for bulk ones, rate for the rest. Returns (value, lower is better).
fn headline(o: &Outcome) -> Option<(f64, bool)> {
    match o.workload {
        Workload::Rr64 | Workload::Rr64Sleep | Workload::Rr64Spin | Workload::Rr64Async => {
            (o.median_ns > 0).then_some((o.median_ns as f64, true))
        }
        Workload::Ev4k | Workload::Rr1m => (o.gbps > 0.0).then_some((o.gbps, false)),
        _ => (o.ops_per_s > 0.0).then_some((o.ops_per_s, false)),
    }
}

/// How many times better `a` is than `b` on the headline figure.
fn ratio(a: &Outcome, b: &Outcome) -> Option<f64> {
    let (x, lower_better) = headline(a)?;
    let (y, _) = headline(b)?;
    Some(if lower_better { y / x } else { x / y })
}

/// The comparison table: workload × transport, with the ratios
/// coroipc/floor and coroipc/uds (>1: coroipc is better; for the floor,
/// 1.0 would be as fast as physics allows).
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<11} {:<8} {:>10} {:>10} {:>14} {:>8}   {:>13} {:>11}  note",
        "workload", "transport", "median_ns", "p99_ns", "ops/s", "GB/s", "coroipc/floor", "coroipc/uds"
    );
    for w in ALL {
        let get = |t: Transport| outcomes.iter().find(|o| o.workload == w && o.transport == t);
        let (ours, uds, floor) = (get(Transport::Coroipc), get(Transport::Uds), get(Transport::Floor));
        for t in TRANSPORTS {
            let Some(o) = get(t) else { continue };
            let (rf, ru) = if t == Transport::Coroipc {
                let rf = floor.and_then(|f| ours.and_then(|c| ratio(c, f)));
                let ru = uds.and_then(|u| ours.and_then(|c| ratio(c, u)));
                (rf.map_or("-".into(), |r| format!("{r:.2}x")), ru.map_or("-".into(), |r| format!("{r:.1}x")))
            } else {
                (String::new(), String::new())
            };
            let _ = writeln!(
                s,
                "{:<11} {:<8} {:>10} {:>10} {:>14.0} {:>8.3}   {:>13} {:>11}  {}",
                w.name(),
                t.name(),
                o.median_ns,
                o.p99_ns,
                o.ops_per_s,
                o.gbps,
                rf,
                ru,
                o.note
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_line_round_trips() {
        let s = Sample { median_ns: 1, p99_ns: 2, ops: 3, bytes: 4, start_ns: 5, end_ns: 6 };
        assert_eq!(Sample::parse(&s.to_line()), Some(s));
        assert_eq!(Sample::parse("RESULT median_ns=x"), None);
    }

    #[test]
    fn ratios_favour_lower_latency_and_higher_rates() {
        let mk = |t, w, median_ns, ops_per_s| Outcome {
            workload: w,
            transport: t,
            median_ns,
            p99_ns: 0,
            ops_per_s,
            gbps: 0.0,
            note: String::new(),
        };
        let c = mk(Transport::Coroipc, Workload::Rr64, 500, 0.0);
        let u = mk(Transport::Uds, Workload::Rr64, 10_000, 0.0);
        assert_eq!(ratio(&c, &u), Some(20.0));
        let c = mk(Transport::Coroipc, Workload::Ev64, 0, 2e7);
        let u = mk(Transport::Uds, Workload::Ev64, 0, 1e6);
        assert_eq!(ratio(&c, &u), Some(20.0));
        assert!(table(&[c, u]).contains("20.0x"));
    }
}
