//! The bench's HTML report: one self-contained file (inline CSS, inline SVG, no script, nothing
//! fetched), written after every run.
//!
//! The page starts with the machine (kernel, CPUs, date) and the command, then gives each
//! workload its table (metric, ringpool, baseline, ratio), a bar chart of the ratios with a line
//! at 1.0×, whether every byte verified, what the baseline is, and the workload's notes.
//!
//! The chart is a horizontal bar per metric on a linear scale from 0 to a round number at or
//! above both the largest ratio and 1.0, so that the 1.0× line is always on the plot:
//!
//! ```text
//!                 0×        1.0×        2.0×    3.0×
//!  label_width -> |          |           |       |  <- label_width + PLOT_WIDTH
//!  metric A       ########### | 1.05×
//!  metric B       ####       |  0.42×
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::report::{
    format_value, missing_values, ratio_cell, verdict, Better, Metric, Outcome, WorkloadReport,
};
use super::BenchResult;

/// The report's file name, in `target/` or the current directory.
pub const FILE_NAME: &str = "ringpool-bench.html";

/// Where the report goes without `--html`: `target/ringpool-bench.html` when the current
/// directory has a `target/` (a cargo workspace), else `ringpool-bench.html` here.
pub fn default_path() -> PathBuf {
    let target = Path::new("target");
    if target.is_dir() {
        target.join(FILE_NAME)
    } else {
        PathBuf::from(FILE_NAME)
    }
}

/// Fails at once, naming `path`, when the report could not be written there: checked before
/// the run, so that a mistyped or unwritable `--html` does not cost a whole run. A file this
/// check creates is removed again.
pub fn check_writable(path: &Path) -> BenchResult<()> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| {
            format!(
                "--html {}: the report cannot be written there: {e}",
                path.display()
            )
        })?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Renders the reports and writes them to `path`; returns the path written, made absolute
/// where possible so that it can be opened from anywhere.
pub fn write(path: &Path, reports: &[WorkloadReport]) -> BenchResult<PathBuf> {
    let html = render(&About::current(), reports);
    std::fs::write(path, html)
        .map_err(|e| format!("writing the HTML report to {}: {e}", path.display()))?;
    Ok(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
}

/// The machine and the run, for the report's opening line.
pub struct About {
    /// The running kernel's version.
    pub kernel: String,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// When the report was written, in UTC.
    pub date: String,
    /// The command line of the run.
    pub command: String,
}

impl About {
    /// This machine, now, and this process's command line.
    pub fn current() -> About {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let args: Vec<String> = std::env::args().skip(1).collect();
        About {
            kernel: ringpool::Features::get().kernel.to_string(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            date: utc_date(secs),
            command: format!("ringpool {}", args.join(" ")),
        }
    }
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (H. Hinnant's `civil_from_days`), with March as the year's first
    // month so that the leap day comes last.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `s` with the characters HTML gives a meaning to replaced by entities, safe in text and in
/// quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A ratio as the table and the chart print it; `n/a` when there is none (a zero baseline).
fn format_ratio(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{ratio:.3}×")
    } else {
        "n/a".to_string()
    }
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:60em;\
padding:0 1em;color:#1d2330;background:#fff}\
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #d5d9e0}\
.about{color:#4a5263}code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;\
background:#f2f4f7;padding:.1em .3em;border-radius:3px}\
table{border-collapse:collapse;margin:.8em 0}th,td{padding:.25em .8em;border-bottom:1px solid #e3e6eb}\
th{text-align:left;background:#f2f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.yes{color:#17753a;font-weight:600}.no{color:#b42318;font-weight:600}\
svg{max-width:100%;height:auto;display:block;margin:.5em 0}\
svg text{font:12px system-ui,sans-serif;fill:#1d2330}svg .bar{fill:#4a78b5}\
svg .one{stroke:#b42318;stroke-width:1.5}svg .value{paint-order:stroke;stroke:#fff;stroke-width:3px;\
stroke-linejoin:round}svg .grid{stroke:#e3e6eb}svg .tick{fill:#6b7385}\
ul.notes{color:#4a5263}p.details{color:#6b7385;font-size:12px}p.verdict{font-size:1.1em}";

/// The whole page.
pub fn render(about: &About, reports: &[WorkloadReport]) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    h.push_str("<title>ringpool bench</title>\n");
    let _ = writeln!(h, "<style>{STYLE}</style>\n</head>\n<body>");
    h.push_str("<h1>ringpool bench</h1>\n");
    let _ = writeln!(
        h,
        "<p class=\"about\">Linux {} · {} CPU(s) · {} · ringpool {}<br><code>{}</code></p>",
        escape(&about.kernel),
        about.cpus,
        escape(&about.date),
        env!("CARGO_PKG_VERSION"),
        escape(&about.command),
    );
    verdict_section(&mut h, reports);
    h.push_str(
        "<p>Each workload alternates ringpool and its baseline; the values are medians over \
         the rounds, and ratio = ringpool / baseline (below 1.0×, ringpool's value is the \
         smaller one).</p>\n",
    );
    h.push_str("<ul>\n");
    for r in reports {
        let name = escape(r.name);
        let verified = if r.verified { "yes" } else { "no" };
        let _ = writeln!(
            h,
            "<li><a href=\"#{name}\">{name}</a>: bytes verified \
             <span class=\"{verified}\">{verified}</span></li>"
        );
    }
    h.push_str("</ul>\n");
    for r in reports {
        workload(&mut h, r);
    }
    h.push_str("</body>\n</html>\n");
    h
}

/// The overall verdict and every target, those not met first, each with its source.
fn verdict_section(h: &mut String, reports: &[WorkloadReport]) {
    let _ = writeln!(
        h,
        "<p class=\"verdict\"><strong>{}</strong></p>",
        escape(&verdict(reports))
    );
    if reports.iter().all(|r| r.targets.is_empty()) {
        return;
    }
    h.push_str("<table>\n<tr><th>workload</th><th>target</th><th>outcome</th></tr>\n");
    for outcome in [Outcome::NotMet, Outcome::NoFigure, Outcome::Met] {
        for r in reports {
            for t in r.targets.iter().filter(|t| t.outcome() == outcome) {
                let class = if outcome == Outcome::Met { "yes" } else { "no" };
                let _ = writeln!(
                    h,
                    "<tr><td><a href=\"#{name}\">{name}</a></td><td>{}</td>\
                     <td><span class=\"{class}\">{}</span></td></tr>",
                    escape(&t.line()),
                    outcome.words(),
                    name = escape(r.name),
                );
            }
        }
    }
    h.push_str("</table>\n");
}

/// One workload's section.
fn workload(h: &mut String, r: &WorkloadReport) {
    let name = escape(r.name);
    let _ = writeln!(h, "<section id=\"{name}\">\n<h2>{name}</h2>");
    let verified = if r.verified { "yes" } else { "no" };
    let _ = writeln!(
        h,
        "<p>Bytes verified: <span class=\"{verified}\">{verified}</span>. Baseline: {}; \
         medians of {} round(s) per side.</p>",
        escape(r.baseline),
        r.rounds
    );
    if r.metrics.is_empty() {
        h.push_str("<p>No metrics.</p>\n");
    } else {
        metrics_table(h, r);
    }
    notes_list(h, r);
    if !r.details.is_empty() {
        let _ = writeln!(
            h,
            "<p class=\"details\">Details: {}</p>",
            escape(&r.details.join("; "))
        );
    }
    h.push_str("</section>\n");
}

/// A workload's metrics: the table, then the chart of the compared ones.
fn metrics_table(h: &mut String, r: &WorkloadReport) {
    h.push_str("<table>\n<tr><th>metric</th><th>ringpool</th><th>baseline</th>");
    h.push_str("<th>ratio</th><th>better</th></tr>\n");
    for m in &r.metrics {
        let _ = writeln!(
            h,
            "<tr><td title=\"{}\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td>{}</td></tr>",
            escape(m.key),
            escape(m.label),
            escape(&format_value(m.ringpool, m.unit)),
            escape(&format_value(m.baseline, m.unit)),
            match m.reported_ratio() {
                Some(r) => format_ratio(r),
                None => ratio_cell(m),
            },
            m.better().words(),
        );
    }
    h.push_str("</table>\n");
    // Counts are not charted as ratios (the sides need not have done the same work).
    let compared: Vec<&Metric> = r
        .metrics
        .iter()
        .filter(|m| m.better() != Better::NotCompared)
        .collect();
    h.push_str(&Chart::new(&compared).svg(&compared));
}

/// A workload's targets, values it could not produce, and notes, as one list (none if empty).
fn notes_list(h: &mut String, r: &WorkloadReport) {
    let lines = |prefix: &str, items: &[String]| {
        items
            .iter()
            .map(|i| format!("<li>{prefix}{}</li>\n", escape(i)))
            .collect::<String>()
    };
    let targets: Vec<String> = r.targets.iter().map(|t| t.line()).collect();
    let items = lines("Target: ", &targets)
        + &lines("No value: ", &missing_values(r))
        + &lines("", &r.notes);
    if !items.is_empty() {
        let _ = write!(h, "<ul class=\"notes\">\n{items}</ul>\n");
    }
}

/// Estimated width of one character of a 12 px label, on the generous side.
const CHAR_WIDTH: f64 = 7.0;
/// Width of the plot (0× to the scale's end).
const PLOT_WIDTH: f64 = 420.0;
/// Room right of the plot for the ratio printed at a bar's end.
const VALUE_WIDTH: f64 = 70.0;
/// Height of one metric's row.
const ROW_HEIGHT: f64 = 22.0;
/// Height of a bar within its row.
const BAR_HEIGHT: f64 = 14.0;
/// Space above the first row.
const TOP: f64 = 8.0;
/// Space below the last row, for the tick labels.
const AXIS_HEIGHT: f64 = 24.0;
/// At most this many intervals between ticks.
const MAX_TICKS: f64 = 8.0;

/// The layout of one workload's ratio chart.
struct Chart {
    /// Width of the labels' column, left of the plot.
    label_width: f64,
    /// The ratio at the plot's right end.
    max: f64,
    /// Ratio between two ticks.
    step: f64,
    /// Number of metrics (rows).
    rows: usize,
}

impl Chart {
    /// The layout for `metrics`: room for the longest label, a scale that holds every finite
    /// ratio and 1.0.
    fn new(metrics: &[&Metric]) -> Chart {
        let longest = metrics
            .iter()
            .map(|m| m.label.chars().count())
            .max()
            .unwrap_or(0);
        let top = metrics
            .iter()
            .map(|m| m.ratio())
            .filter(|r| r.is_finite())
            .fold(1.0, f64::max);
        // 5% of headroom, so that the largest bar does not touch the end of the scale.
        let (max, step) = scale(top * 1.05);
        Chart {
            label_width: longest as f64 * CHAR_WIDTH + 12.0,
            max,
            step,
            rows: metrics.len(),
        }
    }

    /// The x coordinate of `ratio` (clamped to the scale).
    fn x(&self, ratio: f64) -> f64 {
        self.label_width + ratio.clamp(0.0, self.max) / self.max * PLOT_WIDTH
    }

    /// The top of row `i`'s bar.
    fn bar_y(&self, i: usize) -> f64 {
        TOP + i as f64 * ROW_HEIGHT + (ROW_HEIGHT - BAR_HEIGHT) / 2.0
    }

    /// The bottom of the last row.
    fn plot_bottom(&self) -> f64 {
        TOP + self.rows as f64 * ROW_HEIGHT
    }

    fn width(&self) -> f64 {
        self.label_width + PLOT_WIDTH + VALUE_WIDTH
    }

    fn height(&self) -> f64 {
        self.plot_bottom() + AXIS_HEIGHT
    }

    /// The ratios with a tick: 0, `step`, 2 `step`, ... up to `max`.
    fn ticks(&self) -> Vec<f64> {
        let n = (self.max / self.step).round() as usize;
        (0..=n).map(|k| k as f64 * self.step).collect()
    }

    /// The chart as an inline `<svg>` element (no namespace needed inside HTML).
    fn svg(&self, metrics: &[&Metric]) -> String {
        let mut s = String::new();
        let (w, h) = (self.width(), self.height());
        let _ = writeln!(
            s,
            "<svg width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" role=\"img\" \
             aria-label=\"ratio ringpool / baseline per metric\">"
        );
        let bottom = self.plot_bottom();
        self.grid(&mut s, bottom);
        // Bars and labels, then the 1.0× line over the bars, then the ratios over the line.
        let mut values = String::new();
        for (i, m) in metrics.iter().enumerate() {
            self.bar(&mut s, &mut values, i, m);
        }
        let one = self.x(1.0);
        let _ = writeln!(
            s,
            "<line class=\"one\" x1=\"{one:.1}\" y1=\"{:.1}\" x2=\"{one:.1}\" y2=\"{:.1}\"/>",
            TOP - 4.0,
            bottom + 4.0,
        );
        s.push_str(&values);
        s.push_str("</svg>\n");
        s
    }

    /// The vertical grid lines and their tick labels, down to `bottom`.
    fn grid(&self, s: &mut String, bottom: f64) {
        for t in self.ticks() {
            let x = self.x(t);
            let _ = writeln!(
                s,
                "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{TOP:.1}\" x2=\"{x:.1}\" \
                 y2=\"{bottom:.1}\"/><text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" \
                 text-anchor=\"middle\">{}×</text>",
                bottom + 16.0,
                format_tick(t),
            );
        }
    }

    /// Metric `i`'s label and bar into `s`, its ratio into `values` (drawn last, on top).
    fn bar(&self, s: &mut String, values: &mut String, i: usize, m: &Metric) {
        let y = self.bar_y(i);
        let text_y = y + BAR_HEIGHT - 3.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{text_y:.1}\" text-anchor=\"end\">{}</text>",
            self.label_width - 8.0,
            escape(m.label),
        );
        let ratio = m.ratio();
        let x0 = self.x(0.0);
        if ratio.is_finite() {
            let _ = writeln!(
                s,
                "<rect class=\"bar\" x=\"{x0:.1}\" y=\"{y:.1}\" width=\"{:.1}\" \
                 height=\"{BAR_HEIGHT:.1}\"><title>{}: {}</title></rect>",
                self.x(ratio) - x0,
                escape(m.label),
                format_ratio(ratio),
            );
        }
        let end = if ratio.is_finite() { self.x(ratio) } else { x0 };
        let _ = writeln!(
            values,
            "<text class=\"value\" x=\"{:.1}\" y=\"{text_y:.1}\">{}</text>",
            end + 4.0,
            format_ratio(ratio),
        );
    }
}

/// The end of a scale holding `top` and the step between its ticks: the step is 1, 2 or 5
/// times a power of ten, the largest giving at most [`MAX_TICKS`] intervals; the end is the
/// first multiple of the step at or above `top`.
fn scale(top: f64) -> (f64, f64) {
    // Steps below 1 as a whole number over a power of ten, so that 6 × 0.2 is exactly 1.2.
    let mut exp: i32 = -1;
    loop {
        let (unit, over) = if exp < 0 {
            (1.0, 10f64.powi(-exp))
        } else {
            (10f64.powi(exp), 1.0)
        };
        for m in [1.0, 2.0, 5.0] {
            let step = m * unit / over;
            let n = (top / step).ceil();
            if n <= MAX_TICKS {
                return (n * m * unit / over, step);
            }
        }
        exp += 1;
    }
}

/// A tick's ratio, with no more decimals than it needs (but `1.0`, not `1`, below 10).
fn format_tick(t: f64) -> String {
    let whole = |v: f64| (v - v.round()).abs() < 1e-9;
    if t >= 10.0 && whole(t) {
        format!("{t:.0}")
    } else if whole(t * 10.0) {
        format!("{t:.1}")
    } else {
        format!("{t:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::report::Unit;
    use super::*;

    fn metric(label: &'static str, ringpool: f64, baseline: f64) -> Metric {
        Metric {
            key: label,
            label,
            unit: Unit::Count,
            ringpool,
            baseline,
        }
    }

    fn report(name: &'static str, metrics: Vec<Metric>) -> WorkloadReport {
        WorkloadReport {
            name,
            baseline: "tokio <copy> & \"friends\"",
            verified: true,
            rounds: 1,
            metrics,
            raw_rounds: Vec::new(),
            targets: Vec::new(),
            notes: vec!["a <note> & more".to_string()],
            details: vec!["`Force::NoFixed`".to_string()],
        }
    }

    fn about() -> About {
        About {
            kernel: "6.18.0".to_string(),
            cpus: 2,
            date: utc_date(0),
            command: "ringpool bench --html <x>".to_string(),
        }
    }

    #[test]
    fn escape_replaces_every_special_character() {
        assert_eq!(
            escape(r#"<a href="x">Tom & Jerry's</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; Jerry&#39;s&lt;/a&gt;"
        );
        assert_eq!(escape("plain µs ×"), "plain µs ×");
        assert_eq!(escape("&amp;"), "&amp;amp;");
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc_date(1_709_251_199), "2024-02-29 23:59:59 UTC");
    }

    #[test]
    fn scale_ends_on_a_round_step_above_the_top() {
        assert_eq!(scale(1.05), (1.2, 0.2));
        let (max, step) = scale(2.81 * 1.05);
        assert_eq!(step, 0.5);
        assert!((max - 3.0).abs() < 1e-9, "{max}");
        let (max, step) = scale(105.0);
        assert_eq!(step, 20.0);
        assert!((max - 120.0).abs() < 1e-9, "{max}");
        for top in [0.3, 1.0, 1.7, 9.9, 33.0, 1234.5] {
            let (max, step) = scale(top);
            assert!(
                max >= top && max / step <= MAX_TICKS + 1e-9,
                "{top}: {max} {step}"
            );
        }
    }

    #[test]
    fn bars_are_proportional_and_the_one_line_is_on_the_plot() {
        let metrics = [
            metric("buffer bytes", 0.013, 1.0),
            metric("requests/s", 2.0, 1.0),
            metric("fanout GB/s vs sendfile", 2.81, 1.0),
        ];
        let refs: Vec<&Metric> = metrics.iter().collect();
        let c = Chart::new(&refs);
        // The labels' column holds the longest label.
        assert!(c.label_width >= "fanout GB/s vs sendfile".len() as f64 * CHAR_WIDTH);
        // 0× at the plot's left edge, the scale's end at its right edge.
        assert_eq!(c.x(0.0), c.label_width);
        assert_eq!(c.x(c.max), c.label_width + PLOT_WIDTH);
        // Bar lengths are proportional to the ratios.
        let len = |r: f64| c.x(r) - c.x(0.0);
        assert!((len(2.0) - 2.0 * len(1.0)).abs() < 1e-9);
        // Every bar fits in the plot, the longest with some room to spare.
        assert!(c.max > 2.81);
        assert!(c.x(2.81) < c.label_width + PLOT_WIDTH);
        // The 1.0× line is inside the plot.
        assert!(c.x(1.0) > c.label_width && c.x(1.0) < c.label_width + PLOT_WIDTH);
        // Rows do not overlap and all fit above the axis.
        for i in 0..metrics.len() {
            assert!(c.bar_y(i) >= TOP);
            assert!(c.bar_y(i) + BAR_HEIGHT <= c.plot_bottom());
            if i > 0 {
                assert!(c.bar_y(i) >= c.bar_y(i - 1) + BAR_HEIGHT);
            }
        }
        assert_eq!(c.height(), TOP + 3.0 * ROW_HEIGHT + AXIS_HEIGHT);
        assert_eq!(c.ticks().first(), Some(&0.0));
        assert!((c.ticks().last().unwrap() - c.max).abs() < 1e-9);
    }

    #[test]
    fn ticks_print_few_decimals() {
        assert_eq!(format_tick(0.0), "0.0");
        assert_eq!(format_tick(3.0 * 0.2), "0.6");
        assert_eq!(format_tick(1.0), "1.0");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(40.0), "40");
    }

    #[test]
    fn small_ratios_still_show_the_one_line() {
        let (a, b) = (metric("a", 0.2, 1.0), metric("b", 0.5, 1.0));
        let c = Chart::new(&[&a, &b]);
        assert!(c.max >= 1.0);
        assert!(c.x(1.0) <= c.label_width + PLOT_WIDTH);
    }

    #[test]
    fn svg_has_a_bar_per_finite_ratio_and_escapes_labels() {
        let metrics = [
            metric("a <b>", 1.0, 2.0),
            metric("zero baseline", 1.0, 0.0),
            metric("c", 3.0, 1.0),
        ];
        let refs: Vec<&Metric> = metrics.iter().collect();
        let svg = Chart::new(&refs).svg(&refs);
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"), "{svg}");
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("class=\"one\"").count(), 1, "{svg}");
        assert!(
            svg.contains("a &lt;b&gt;") && !svg.contains("a <b>"),
            "{svg}"
        );
        assert!(svg.contains("0.500×") && svg.contains("3.000×") && svg.contains("n/a"));
    }

    #[test]
    fn page_is_self_contained_and_escaped() {
        let reports = vec![
            report("idle-heavy", vec![metric("buffer bytes", 1.0, 80.0)]),
            report("file", Vec::new()),
        ];
        let html = render(&about(), &reports);
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("Linux 6.18.0 · 2 CPU(s) · 1970-01-01 00:00:00 UTC"));
        assert!(html.contains("<code>ringpool bench --html &lt;x&gt;</code>"));
        assert!(html.contains("<section id=\"idle-heavy\">"));
        assert!(html.contains("<section id=\"file\">"));
        assert!(html.contains("tokio &lt;copy&gt; &amp; &quot;friends&quot;"));
        assert!(html.contains("<li>a &lt;note&gt; &amp; more</li>"));
        assert!(html.contains("Details: `Force::NoFixed`"));
        assert!(html.contains("verdict: no workload run here has a target"));
        assert_eq!(html.matches("<svg ").count(), 1, "no chart without metrics");
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("<script") && !html.contains("<link"));
    }

    #[test]
    fn the_page_opens_with_the_verdict_and_unmet_targets_first() {
        use super::super::report::{Bound, Target, FOUNDATION, PERFORMANCE};
        let rss = Metric {
            unit: Unit::Bytes,
            ..metric("rss", 3.0, f64::NAN)
        };
        let mut r = report("idle-heavy", vec![metric("cpu", 1.0, 2.0), rss]);
        r.targets = vec![
            Target::on(&r.metrics, "cpu", Bound::AtMost(0.75), FOUNDATION),
            Target::on(&r.metrics, "cpu", Bound::AtMost(0.4), PERFORMANCE),
        ];
        let html = render(&about(), &[r]);
        let verdict = html.find("verdict: 1 of 2 targets met; 1 NOT met").unwrap();
        let missed = html
            .find("cpu 0.500x, target at most 0.4x: NOT met")
            .unwrap();
        let met = html.find("cpu 0.500x, target at most 0.75x: met").unwrap();
        let section = html.find("<section id=\"idle-heavy\">").unwrap();
        assert!(verdict < missed && missed < met && met < section, "{html}");
        assert!(html.contains("No value: rss: no baseline value"), "{html}");
        assert!(html.contains("none (no value)"), "{html}");
    }
}
