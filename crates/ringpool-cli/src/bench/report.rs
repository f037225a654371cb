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

/// Where a target comes from: the issue that set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    /// The issue's number (`issues show N`).
    pub issue: u32,
    /// What the issue is about, in a few words.
    pub about: &'static str,
}

impl Source {
    /// `issue 7 (registered buffers and the proxy)`.
    pub fn words(self) -> String {
        format!("issue {} ({})", self.issue, self.about)
    }
}

/// The foundation issue: buffer groups and the idle-heavy echo.
pub const FOUNDATION: Source = Source {
    issue: 2,
    about: "buffer groups, the idle-heavy echo",
};
/// Zero-copy send with one completion.
pub const ZERO_COPY_SEND: Source = Source {
    issue: 3,
    about: "zero-copy send",
};
/// Leased buffers and `ringpool fanout`.
pub const LEASES: Source = Source {
    issue: 4,
    about: "leased buffers, fanout",
};
/// Kernel-page (pipe-backed) leases: `fanout --lease pages`.
pub const PAGE_LEASES: Source = Source {
    issue: 16,
    about: "kernel-page leases",
};
/// Registered buffers and `ringpool proxy`.
pub const REGISTERED: Source = Source {
    issue: 7,
    about: "registered buffers, the proxy",
};
/// The performance push: ahead of the best peer on every workload.
pub const PERFORMANCE: Source = Source {
    issue: 19,
    about: "performance: ahead of the best peer",
};

/// The bound a target holds a ratio to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// The ratio must be at most this.
    AtMost(f64),
    /// The ratio must be at least this.
    AtLeast(f64),
}

impl Bound {
    fn holds(self, value: f64) -> bool {
        match self {
            Bound::AtMost(b) => value <= b,
            Bound::AtLeast(b) => value >= b,
        }
    }

    /// `at most 0.55x`.
    pub fn words(self) -> String {
        match self {
            Bound::AtMost(b) => format!("at most {b:?}x"),
            Bound::AtLeast(b) => format!("at least {b:?}x"),
        }
    }
}

/// How a target fared in this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The ratio is within the bound.
    Met,
    /// The ratio is outside the bound.
    NotMet,
    /// The run produced no ratio (a side had no figure; the notes say why).
    NoFigure,
}

impl Outcome {
    /// `met`, `NOT met`, `no figure`.
    pub fn words(self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::NotMet => "NOT met",
            Outcome::NoFigure => "no figure",
        }
    }
}

/// A bound on one of a workload's ratios, and the issue that set it.
pub struct Target {
    /// What the ratio compares, in words (`4 KiB x 1: proxy CPU per GB, ringpool / tokio`).
    pub what: String,
    /// The ratio measured in this run (NaN when there is none).
    pub value: f64,
    /// The bound it is held to.
    pub bound: Bound,
    /// Where the target comes from.
    pub source: Source,
}

impl Target {
    /// A target on the ratio of the metric `key` of `metrics` (NaN when no such metric).
    pub fn on(metrics: &[Metric], key: &str, bound: Bound, source: Source) -> Target {
        let m = metrics.iter().find(|m| m.key == key);
        Target {
            what: m.map_or_else(|| key.to_string(), |m| m.label.to_string()),
            value: m.map_or(f64::NAN, Metric::ratio),
            bound,
            source,
        }
    }

    /// The same target, its ratio described as `what`.
    pub fn named(mut self, what: impl Into<String>) -> Target {
        self.what = what.into();
        self
    }

    /// Whether the ratio is within the bound, or there is no ratio.
    pub fn outcome(&self) -> Outcome {
        if !self.value.is_finite() {
            Outcome::NoFigure
        } else if self.bound.holds(self.value) {
            Outcome::Met
        } else {
            Outcome::NotMet
        }
    }

    /// One line: `what 0.687x, target at most 0.55x: NOT met (issue 7 (...))`.
    pub fn line(&self) -> String {
        let value = if self.value.is_finite() {
            format!("{:.3}x", self.value)
        } else {
            "no figure".to_string()
        };
        format!(
            "{} {value}, target {}: {} (from {})",
            self.what,
            self.bound.words(),
            self.outcome().words(),
            self.source.words()
        )
    }
}

/// The run's targets counted by outcome: `(met, not met, no figure)`.
pub fn tally(reports: &[WorkloadReport]) -> (usize, usize, usize) {
    let mut t = (0, 0, 0);
    for target in reports.iter().flat_map(|r| &r.targets) {
        match target.outcome() {
            Outcome::Met => t.0 += 1,
            Outcome::NotMet => t.1 += 1,
            Outcome::NoFigure => t.2 += 1,
        }
    }
    t
}

/// The overall verdict, one line: `verdict: 9 of 14 targets met; 5 not met`.
pub fn verdict(reports: &[WorkloadReport]) -> String {
    let (met, not_met, none) = tally(reports);
    let total = met + not_met + none;
    if total == 0 {
        return "verdict: no workload run here has a target".to_string();
    }
    let mut s = format!("verdict: {met} of {total} targets met");
    if not_met > 0 {
        s.push_str(&format!("; {not_met} NOT met"));
    }
    if none > 0 {
        s.push_str(&format!("; {none} without a figure (see the notes)"));
    }
    let single = reports
        .iter()
        .any(|r| !r.targets.is_empty() && r.rounds <= 1);
    if single {
        s.push_str(" (some from a single round per side, as --quick runs: indicative only)");
    }
    s
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
    /// The bounds this workload's ratios are held to, each with the issue that set it.
    pub targets: Vec<Target>,
    /// Anything worth knowing (e.g. a server that had to be killed).
    pub notes: Vec<String>,
    /// The internal names behind the words of the table and notes (option values, opcodes,
    /// kernel terms), for readers who want to find them in the code.
    pub details: Vec<String>,
}

/// The median (mean of the middle two for an even count) of the values that are figures: a
/// NaN stands for a round that produced none (its run failed or its bytes did not verify) and
/// is left out. NaN when no value is a figure.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Why a metric has no value on a side, for every side that has none: the mechanism, in words.
pub fn missing_values(r: &WorkloadReport) -> Vec<String> {
    let mut lines = Vec::new();
    for m in &r.metrics {
        for (side, v) in [("ringpool", m.ringpool), ("baseline", m.baseline)] {
            if v.is_nan() {
                lines.push(format!(
                    "{}: no {side} value: none of the {side} side's {} round(s) produced this \
                     figure (a round gives none when its run failed, its bytes did not verify, \
                     or its server printed no statistics; the notes say which), so the row \
                     has no ratio",
                    m.label, r.rounds
                ));
            }
        }
    }
    lines
}

/// Prints the verdict, then the reports as one table per workload.
pub fn print_table(reports: &[WorkloadReport]) {
    println!("{}", verdict(reports));
    for outcome in [Outcome::NotMet, Outcome::NoFigure, Outcome::Met] {
        for r in reports {
            for t in r.targets.iter().filter(|t| t.outcome() == outcome) {
                println!("  {}: {}", r.name, t.line());
            }
        }
    }
    println!();
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
                ratio_cell(m),
                m.better().words().to_string(),
            ]);
        }
        print_rows(&rows);
        println!("bytes verified: {}", if r.verified { "yes" } else { "no" });
        println!(
            "baseline: {}; medians of {} round(s) per side, ratio = ringpool / baseline",
            r.baseline, r.rounds
        );
        for t in &r.targets {
            println!("target: {}", t.line());
        }
        for line in missing_values(r) {
            println!("no value: {line}");
        }
        for note in &r.notes {
            println!("note: {note}");
        }
        for d in &r.details {
            println!("details: {d}");
        }
        println!();
    }
}

/// The ratio column: the ratio, `-` for a count, or why there is none.
pub fn ratio_cell(m: &Metric) -> String {
    match m.reported_ratio() {
        Some(r) => format!("{r:.3}x"),
        None if m.better() == Better::NotCompared => "-".to_string(),
        None if m.ringpool.is_nan() || m.baseline.is_nan() => "none (no value)".to_string(),
        None => "none (baseline 0)".to_string(),
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

/// `v` printed in `unit` (e.g. `1.234 GB/s`), as in the table; `no value` for NaN.
pub fn format_value(v: f64, unit: Unit) -> String {
    if v.is_nan() {
        return "no value".to_string();
    }
    match unit {
        Unit::Bytes if v >= 1024.0 * 1024.0 => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Bytes => format!("{:.1} KiB", v / 1024.0),
        Unit::Count => format!("{v:.0}"),
        Unit::Micros => format!("{v:.2} µs"),
        Unit::SecsPerGb => format!("{v:.4} s/GB"),
        Unit::GbPerSec => format!("{v:.3} GB/s"),
    }
}

/// The reports as JSON: `{"verdict": {...}, "workloads": [{name, verified, metrics: {key:
/// {ringpool, baseline, ratio, better}}, targets, ...}]}`. A NaN becomes `null`.
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
            let targets: Vec<serde_json::Value> = r.targets.iter().map(target_json).collect();
            serde_json::json!({
                "name": r.name,
                "baseline": r.baseline,
                "verified": r.verified,
                "rounds": r.rounds,
                "metrics": metrics,
                "raw_rounds": r.raw_rounds,
                "targets": targets,
                "missing_values": missing_values(r),
                "notes": r.notes,
                "details": r.details,
            })
        })
        .collect();
    let (met, not_met, no_figure) = tally(reports);
    serde_json::json!({
        "verdict": {
            "summary": verdict(reports),
            "met": met,
            "not_met": not_met,
            "no_figure": no_figure,
        },
        "workloads": workloads,
    })
}

fn target_json(t: &Target) -> serde_json::Value {
    let (kind, bound) = match t.bound {
        Bound::AtMost(b) => ("at_most", b),
        Bound::AtLeast(b) => ("at_least", b),
    };
    serde_json::json!({
        "what": t.what,
        "ratio": t.value.is_finite().then_some(t.value),
        kind: bound,
        "outcome": t.outcome().words(),
        "source_issue": t.source.issue,
        "source": t.source.words(),
    })
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

    fn workload(metrics: Vec<Metric>, targets: Vec<Target>) -> WorkloadReport {
        WorkloadReport {
            name: "w",
            baseline: "b",
            verified: true,
            rounds: 3,
            metrics,
            raw_rounds: Vec::new(),
            targets,
            notes: Vec::new(),
            details: Vec::new(),
        }
    }

    #[test]
    fn a_round_without_a_figure_is_left_out_of_the_median() {
        assert_eq!(median(&[3.0, f64::NAN, 1.0]), 2.0);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(median(&[f64::NAN, f64::NAN]).is_nan());
    }

    #[test]
    fn a_missing_value_says_why_and_the_row_has_no_ratio() {
        let mut m = metric("cpu_s_per_gb", Unit::SecsPerGb);
        m.baseline = f64::NAN;
        assert_eq!(format_value(m.baseline, m.unit), "no value");
        assert_eq!(ratio_cell(&m), "none (no value)");
        let r = workload(vec![m, metric("gb_per_sec", Unit::GbPerSec)], Vec::new());
        let lines = missing_values(&r);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with(
            "cpu_s_per_gb: no baseline value: none of the baseline side's 3 round(s)"
        ));
        assert!(lines[0].contains("its run failed, its bytes did not verify"));
    }

    #[test]
    fn targets_are_met_missed_or_without_a_figure() {
        let metrics = vec![
            metric("cpu", Unit::SecsPerGb),
            metric("rate", Unit::GbPerSec),
        ];
        // Both ratios are 0.5.
        let met = Target::on(&metrics, "cpu", Bound::AtMost(0.55), REGISTERED);
        let missed = Target::on(&metrics, "rate", Bound::AtLeast(1.0), PERFORMANCE);
        let absent = Target::on(&metrics, "nope", Bound::AtMost(1.0), FOUNDATION);
        assert_eq!(met.outcome(), Outcome::Met);
        assert_eq!(missed.outcome(), Outcome::NotMet);
        assert_eq!(absent.outcome(), Outcome::NoFigure);
        assert_eq!(
            met.line(),
            "cpu 0.500x, target at most 0.55x: met (from issue 7 (registered buffers, the proxy))"
        );
        assert!(missed
            .line()
            .contains("target at least 1.0x: NOT met (from issue 19"));
        let reports = [workload(metrics, vec![met, missed, absent])];
        assert_eq!(tally(&reports), (1, 1, 1));
        assert_eq!(
            verdict(&reports),
            "verdict: 1 of 3 targets met; 1 NOT met; 1 without a figure (see the notes)"
        );
        let json = to_json(&reports);
        assert_eq!(json["verdict"]["met"], 1);
        assert_eq!(json["workloads"][0]["targets"][1]["outcome"], "NOT met");
        assert_eq!(json["workloads"][0]["targets"][1]["at_least"], 1.0);
        assert!(json["workloads"][0]["targets"][2]["ratio"].is_null());
    }

    #[test]
    fn a_verdict_from_single_rounds_says_it_is_indicative() {
        let metrics = vec![metric("cpu", Unit::SecsPerGb)];
        let target = Target::on(&metrics, "cpu", Bound::AtMost(1.0), REGISTERED);
        let mut r = workload(metrics, vec![target]);
        assert!(!verdict(std::slice::from_ref(&r)).contains("indicative"));
        r.rounds = 1;
        assert_eq!(
            verdict(&[r]),
            "verdict: 1 of 1 targets met (some from a single round per side, as --quick runs: \
             indicative only)"
        );
    }

    #[test]
    fn a_run_without_targets_says_so() {
        assert_eq!(
            verdict(&[workload(Vec::new(), Vec::new())]),
            "verdict: no workload run here has a target"
        );
    }
}
