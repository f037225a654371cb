//! Results of a workload: medians per side, ratios, and their rendering as a table or JSON.

/// How a metric's values are printed.
#[derive(Clone, Copy)]
pub enum Unit {
    /// A byte count, printed in KiB/MiB.
    Bytes,
    /// A plain number.
    Count,
    /// Microseconds.
    Micros,
    /// CPU seconds per gigabyte (10^9 bytes).
    SecsPerGb,
    /// Gigabytes (10^9 bytes) per second.
    GbPerSec,
}

/// One metric of a workload: the median of each side over its rounds.
pub struct Metric {
    /// Machine name, used as the JSON key (e.g. `cpu_us_per_request`).
    pub key: &'static str,
    /// Human label for the table.
    pub label: &'static str,
    /// How to print the values.
    pub unit: Unit,
    /// Median on ringpool's side.
    pub ringpool: f64,
    /// Median on the baseline's side.
    pub baseline: f64,
}

/// Which way a metric is better, as the report says for every row.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Better {
    /// Lower is better (CPU per unit of work, latency, memory).
    Lower,
    /// Higher is better (throughput, rates).
    Higher,
    /// A count of what happened in the window (requests, connections served): shown, but not
    /// compared as a ratio, since the two sides need not have run the same amount of work.
    NotCompared,
}

impl Better {
    /// The words the table, JSON and HTML use.
    pub fn words(self) -> &'static str {
        match self {
            Better::Lower => "lower is better",
            Better::Higher => "higher is better",
            Better::NotCompared => "a count, not compared",
        }
    }
}

impl Metric {
    /// Which way this metric is better, from its unit (and, for plain numbers, its key: a rate
    /// `*_per_sec` or `iops` is higher-better; any other plain number is a count).
    pub fn better(&self) -> Better {
        match self.unit {
            Unit::SecsPerGb | Unit::Micros | Unit::Bytes => Better::Lower,
            Unit::GbPerSec => Better::Higher,
            Unit::Count if self.key.contains("per_sec") || self.key == "iops" => Better::Higher,
            Unit::Count => Better::NotCompared,
        }
    }

    /// The ratio as reported: `None` for a count (not compared) or a zero baseline (the
    /// baseline did nothing: no ratio can be formed).
    pub fn reported_ratio(&self) -> Option<f64> {
        let r = self.ratio();
        (self.better() != Better::NotCompared && r.is_finite()).then_some(r)
    }

    /// ringpool / baseline (NaN when the baseline is zero).
    pub fn ratio(&self) -> f64 {
        if self.baseline == 0.0 {
            f64::NAN
        } else {
            self.ringpool / self.baseline
        }
    }
}

/// What one workload measured.
pub struct WorkloadReport {
    /// The workload's name.
    pub name: &'static str,
    /// What the baseline is, in a few words.
    pub baseline: &'static str,
    /// Whether every byte echoed back matched on both sides in every round.
    pub verified: bool,
    /// Rounds per side.
    pub rounds: usize,
    /// The medians.
    pub metrics: Vec<Metric>,
    /// Per-round raw values, kept for `--json`.
    pub raw_rounds: Vec<serde_json::Value>,
    /// Anything worth knowing (e.g. a server that had to be killed).
    pub notes: Vec<String>,
}

/// The median (mean of the middle two for an even count); NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints the reports as one table per workload.
pub fn print_table(reports: &[WorkloadReport]) {
    for r in reports {
        let mut rows = vec![[
            "workload".to_string(),
            "metric".to_string(),
            "ringpool".to_string(),
            "baseline".to_string(),
            "ratio".to_string(),
            "better".to_string(),
        ]];
        for m in &r.metrics {
            rows.push([
                r.name.to_string(),
                m.label.to_string(),
                format_value(m.ringpool, m.unit),
                format_value(m.baseline, m.unit),
                match m.reported_ratio() {
                    Some(r) => format!("{r:.3}x"),
                    None if m.better() == Better::NotCompared => "-".to_string(),
                    None => "none (baseline 0)".to_string(),
                },
                m.better().words().to_string(),
            ]);
        }
        print_rows(&rows);
        println!("bytes verified: {}", if r.verified { "yes" } else { "no" });
        println!(
            "baseline: {}; medians of {} round(s) per side, ratio = ringpool / baseline",
            r.baseline, r.rounds
        );
        for note in &r.notes {
            println!("note: {note}");
        }
        println!();
    }
}

fn print_rows(rows: &[[String; 6]]) {
    let mut widths = [0usize; 6];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(col, (cell, w))| {
                if col < 2 || col == 5 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            println!("{}", rule.join("-|-"));
        }
    }
}

/// `v` printed in `unit` (e.g. `1.234 GB/s`), as in the table.
pub fn format_value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Bytes if v >= 1024.0 * 1024.0 => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Bytes => format!("{:.1} KiB", v / 1024.0),
        Unit::Count => format!("{v:.0}"),
        Unit::Micros => format!("{v:.2} µs"),
        Unit::SecsPerGb => format!("{v:.4} s/GB"),
        Unit::GbPerSec => format!("{v:.3} GB/s"),
    }
}

/// The reports as JSON: `{"workloads": [{name, verified, metrics: {key: {ringpool, baseline,
/// ratio}}, ...}]}`. A NaN ratio becomes `null`.
pub fn to_json(reports: &[WorkloadReport]) -> serde_json::Value {
    let workloads: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let metrics: serde_json::Map<String, serde_json::Value> = r
                .metrics
                .iter()
                .map(|m| {
                    let v = serde_json::json!({
                        "ringpool": m.ringpool,
                        "baseline": m.baseline,
                        "ratio": m.reported_ratio(),
                        "better": m.better().words(),
                    });
                    (m.key.to_string(), v)
                })
                .collect();
            serde_json::json!({
                "name": r.name,
                "baseline": r.baseline,
                "verified": r.verified,
                "rounds": r.rounds,
                "metrics": metrics,
                "raw_rounds": r.raw_rounds,
                "notes": r.notes,
            })
        })
        .collect();
    serde_json::json!({ "workloads": workloads })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn ratio_is_ringpool_over_baseline() {
        let m = Metric {
            key: "k",
            label: "k",
            unit: Unit::Count,
            ringpool: 1.0,
            baseline: 4.0,
        };
        assert_eq!(m.ratio(), 0.25);
    }

    fn metric(key: &'static str, unit: Unit) -> Metric {
        Metric {
            key,
            label: key,
            unit,
            ringpool: 2.0,
            baseline: 4.0,
        }
    }

    #[test]
    fn every_metric_says_which_way_is_better_and_counts_get_no_ratio() {
        assert_eq!(
            metric("cpu_s_per_gb", Unit::SecsPerGb).better(),
            Better::Lower
        );
        assert_eq!(
            metric("cpu_us_per_request", Unit::Micros).better(),
            Better::Lower
        );
        assert_eq!(metric("rss_bytes", Unit::Bytes).better(), Better::Lower);
        assert_eq!(
            metric("gb_per_sec", Unit::GbPerSec).better(),
            Better::Higher
        );
        assert_eq!(
            metric("requests_per_sec", Unit::Count).better(),
            Better::Higher
        );
        assert_eq!(metric("iops", Unit::Count).better(), Better::Higher);
        let count = metric("connections", Unit::Count);
        assert_eq!(count.better(), Better::NotCompared);
        assert_eq!(count.reported_ratio(), None);
        assert_eq!(metric("iops", Unit::Count).reported_ratio(), Some(0.5));
    }
}
