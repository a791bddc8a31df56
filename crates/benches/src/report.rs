//! The report users read: `target/distlock-report/report.md` plus SVG charts.
//!
//! Numbers come from two places, both written in the same `cargo xtask bench`
//! run: criterion's estimates for the latency benches
//! (`target/criterion/<group>/<id>/new/estimates.json`) with per-operation
//! samples the bench saved beside them for the p99, and the scenario results
//! (`target/distlock-report/scenarios.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::scenarios::{Hammer, Handoff, ManyHeld, ManyKeys};
use crate::stats::Summary;

type BoxError = lock_core::BoxError;

/// Per-operation latency samples the latency bench saved, by
/// `group/id` (for example `uncontended/redis`).
pub type LatencySamples = BTreeMap<String, Summary>;

/// Results of the scenarios bench.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScenarioResults {
    /// Handoff per target.
    pub handoff: BTreeMap<String, Handoff>,
    /// Hammer runs per target.
    pub hammer: BTreeMap<String, Vec<Hammer>>,
    /// Many keys per target.
    pub many_keys: BTreeMap<String, ManyKeys>,
    /// Many held locks per target.
    pub many_held: BTreeMap<String, ManyHeld>,
    /// Targets whose scenario failed, with the error.
    pub failures: BTreeMap<String, String>,
    /// Whether this was a `--quick` run.
    pub quick: bool,
}

/// Reads a JSON file written by an earlier step.
pub fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> T {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

/// Writes `value` as JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), BoxError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// criterion's median estimate for `group/id`, in microseconds.
pub fn criterion_median_us(criterion_dir: &Path, group: &str, id: &str) -> Option<f64> {
    let path = criterion_dir
        .join(group)
        .join(id)
        .join("new")
        .join("estimates.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    Some(json.get("median")?.get("point_estimate")?.as_f64()? / 1000.0)
}

/// The notification floors measured on the project's machine (FACTS.md), in
/// microseconds, keyed by target name prefix.
const NOTIFY_FLOOR_US: &[(&str, f64)] = &[
    ("redis", 440.0),
    ("redlock", 440.0),
    ("postgres-advisory", 260.0),
    ("postgres", 1200.0),
    ("etcd", 2100.0),
    ("consul", 2700.0),
];

fn floor_for(target: &str) -> Option<f64> {
    NOTIFY_FLOOR_US
        .iter()
        .find(|(p, _)| target.starts_with(p))
        .map(|(_, f)| *f)
}

fn fmt_us(us: Option<f64>) -> String {
    match us {
        None => "–".into(),
        Some(us) if us >= 1000.0 => format!("{:.2} ms", us / 1000.0),
        Some(us) => format!("{us:.1} µs"),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

/// One target's latency numbers.
#[derive(Clone, Debug, Default)]
struct Latency {
    cycle: Option<f64>,
    cycle_p99: Option<f64>,
    raw_cycle: Option<f64>,
    no: Option<f64>,
    raw_no: Option<f64>,
}

/// Writes `report.md` and the charts into `out`; returns the report's path.
pub fn write_report(
    targets: &[(String, Option<String>)],
    criterion_dir: &Path,
    samples: &LatencySamples,
    results: &ScenarioResults,
    machine: &str,
    out: &Path,
) -> Result<PathBuf, BoxError> {
    std::fs::create_dir_all(out)?;
    let mut lat: BTreeMap<&str, Latency> = BTreeMap::new();
    for (name, raw) in targets {
        let raw = raw.as_deref();
        let l = Latency {
            cycle: criterion_median_us(criterion_dir, "uncontended", name),
            cycle_p99: samples
                .get(&format!("uncontended/{name}"))
                .map(|s| s.p99_us),
            raw_cycle: raw.and_then(|r| criterion_median_us(criterion_dir, "uncontended", r)),
            no: criterion_median_us(criterion_dir, "try_lock_held", name),
            raw_no: raw.and_then(|r| criterion_median_us(criterion_dir, "try_lock_held", r)),
        };
        lat.insert(name, l);
    }
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);

    let mut md = String::new();
    let _ = writeln!(md, "# distlock benchmark report\n");
    let _ = writeln!(md, "Machine: {machine}\n");
    if results.quick {
        let _ = writeln!(
            md,
            "**Quick run** (`--quick`): a smoke check, not numbers to compare.\n"
        );
    }
    let _ = writeln!(
        md,
        "Absolute numbers differ per machine; the ratios to each store's raw baseline, measured in \
         the same run, are what carry over. Latencies are medians unless marked p99.\n"
    );
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(
        md,
        "| backend | cycle | cycle p99 | vs raw | try_lock (held) | vs raw | handoff | handoff p99 | \
         8 workers acq/s | fair 8w min/max | 1,000 keys acq/s | 10k held: renew calls/s | CPU | bytes/lock |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (name, _) in targets {
        let l = lat.get(name.as_str()).cloned().unwrap_or_default();
        let h = results.handoff.get(name);
        let hammer = results.hammer.get(name);
        let find = |w: usize, fair: bool| {
            hammer
                .and_then(|v| v.iter().find(|x| x.workers == w && x.fair == fair))
                .cloned()
        };
        let fair8 = find(8, true);
        let held = results.many_held.get(name);
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt_us(l.cycle),
            fmt_us(l.cycle_p99),
            fmt_ratio(ratio(l.cycle, l.raw_cycle)),
            fmt_us(l.no),
            fmt_ratio(ratio(l.no, l.raw_no)),
            fmt_us(h.map(|h| h.latency.median_us)),
            fmt_us(h.map(|h| h.latency.p99_us)),
            find(8, false).map_or("–".into(), |x| format!("{:.0}", x.per_second)),
            fair8.map_or("–".into(), |x| format!("{:.2}", x.min_max_ratio)),
            results
                .many_keys
                .get(name)
                .map_or("–".into(), |x| format!("{:.0}", x.per_second)),
            held.map_or("–".into(), |x| format!("{:.1}", x.renew_calls_per_second)),
            held.map_or("–".into(), |x| format!("{:.1}%", x.cpu_share * 100.0)),
            held.map_or("–".into(), |x| format!("{:.0}", x.bytes_per_lock)),
        );
    }

    let _ = writeln!(md, "\n## Raw baselines\n");
    let _ = writeln!(md, "| baseline | cycle | try_lock (held) |\n|---|---|---|");
    let mut seen = Vec::new();
    for (_, raw) in targets {
        if let Some(raw) = raw {
            if seen.contains(raw) {
                continue;
            }
            seen.push(raw.clone());
            let _ = writeln!(
                md,
                "| {raw} | {} | {} |",
                fmt_us(criterion_median_us(criterion_dir, "uncontended", raw)),
                fmt_us(criterion_median_us(criterion_dir, "try_lock_held", raw)),
            );
        }
    }

    let _ = writeln!(md, "\n## Contended throughput and fairness\n");
    let _ = writeln!(
        md,
        "| backend | workers | mode | acq/s | changed hands | per-worker min/max |\n|---|---|---|---|---|---|"
    );
    for (name, runs) in &results.hammer {
        for r in runs {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {:.0} | {:.0}% | {:.2} |",
                r.workers,
                if r.fair { "fair" } else { "default" },
                r.per_second,
                r.changed_hands * 100.0,
                r.min_max_ratio
            );
        }
    }

    let _ = writeln!(md, "\n## Holding 10,000 locks with auto-renew\n");
    let _ = writeln!(
        md,
        "| backend | locks | TTL | renewal calls/s | leases renewed/s | client CPU (of one core) | client memory per lock | all still held |\n|---|---|---|---|---|---|---|---|"
    );
    for (name, h) in &results.many_held {
        let _ = writeln!(
            md,
            "| {name} | {} | {} ms | {:.1} | {:.0} | {:.1}% | {:.0} B | {} |",
            h.locks,
            h.ttl_ms,
            h.renew_calls_per_second,
            h.leases_renewed_per_second,
            h.cpu_share * 100.0,
            h.bytes_per_lock,
            if h.all_held { "yes" } else { "NO" }
        );
    }

    let _ = writeln!(md, "\n## Targets\n");
    for (name, _) in targets {
        let l = lat.get(name.as_str()).cloned().unwrap_or_default();
        let mut notes = Vec::new();
        match ratio(l.cycle, l.raw_cycle) {
            Some(r) if r <= 1.10 => notes.push(format!("cycle {r:.2}× raw: met (≤ 1.10×)")),
            Some(r) => notes.push(format!("cycle {r:.2}× raw: **missed** (≤ 1.10×)")),
            None => notes.push("cycle ratio: not measured".into()),
        }
        if let (Some(h), Some(floor)) = (results.handoff.get(name), floor_for(name)) {
            let r = h.latency.median_us / floor;
            let tail = h.latency.p99_us / h.latency.median_us.max(f64::MIN_POSITIVE);
            notes.push(format!(
                "handoff median {r:.2}× the store's notification floor ({}): {}; p99 {tail:.1}× median: {}",
                fmt_us(Some(floor)),
                if r <= 1.2 { "met" } else { "**missed**" },
                if tail <= 3.0 { "met" } else { "**missed**" },
            ));
        }
        if let Some(f) = results
            .hammer
            .get(name)
            .and_then(|v| v.iter().find(|x| x.fair))
        {
            let ok = f.min_max_ratio >= 0.8 && f.changed_hands >= 0.9;
            notes.push(format!(
                "fair mode ({} workers): min/max {:.2}, {:.0}% changed hands: {}",
                f.workers,
                f.min_max_ratio,
                f.changed_hands * 100.0,
                if ok { "met" } else { "**missed**" }
            ));
        }
        if let Some(h) = results.many_held.get(name) {
            let ok = h.cpu_share < 0.05 && h.bytes_per_lock < 2048.0 && h.all_held;
            notes.push(format!(
                "10k held: CPU {:.1}%, {:.0} B/lock: {}",
                h.cpu_share * 100.0,
                h.bytes_per_lock,
                if ok { "met" } else { "**missed**" }
            ));
        }
        let _ = writeln!(md, "- **{name}**: {}", notes.join("; "));
    }
    if !results.failures.is_empty() {
        let _ = writeln!(md, "\n## Failures\n");
        for (name, err) in &results.failures {
            let _ = writeln!(md, "- {name}: {err}");
        }
    }

    let _ = writeln!(md, "\n## Charts\n");
    let _ = writeln!(
        md,
        "![cycle latency](latency.svg)\n\n![handoff](handoff.svg)\n\n![throughput](throughput.svg)\n"
    );
    let _ = writeln!(
        md,
        "criterion's own reports: [target/criterion/report/index.html](../criterion/report/index.html)"
    );

    let bars: Vec<(String, f64)> = targets
        .iter()
        .flat_map(|(name, raw)| {
            let l = lat.get(name.as_str()).cloned().unwrap_or_default();
            let mut v = vec![];
            if let Some(c) = l.cycle {
                v.push((name.clone(), c));
            }
            if let (Some(raw), Some(c)) = (raw, l.raw_cycle)
                && !v.iter().any(|(n, _)| n == raw)
            {
                v.push((raw.clone(), c));
            }
            v
        })
        .collect();
    bar_chart(
        &out.join("latency.svg"),
        "acquire+release cycle, median (µs)",
        &bars,
    )?;
    let handoff: Vec<(String, f64)> = results
        .handoff
        .iter()
        .map(|(n, h)| (n.clone(), h.latency.median_us))
        .collect();
    bar_chart(
        &out.join("handoff.svg"),
        "handoff latency, median (µs)",
        &handoff,
    )?;
    throughput_chart(&out.join("throughput.svg"), &results.hammer)?;

    let path = out.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

fn bar_chart(path: &Path, title: &str, bars: &[(String, f64)]) -> Result<(), BoxError> {
    let root =
        SVGBackend::new(path, (900, 120 + 40 * bars.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = bars.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(160)
        .build_cartesian_2d(0.0..max, 0..bars.len().max(1))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len().max(1))
        .y_label_formatter(&|i| bars.get(*i).map(|(n, _)| n.clone()).unwrap_or_default())
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        let color = Palette99::pick(i).filled();
        Rectangle::new([(0.0, i), (*v, i + 1)], color)
    }))?;
    root.present()?;
    Ok(())
}

fn throughput_chart(path: &Path, hammer: &BTreeMap<String, Vec<Hammer>>) -> Result<(), BoxError> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = hammer
        .values()
        .flatten()
        .map(|h| h.per_second)
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "contended throughput vs workers (acquisitions/s, default mode)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u32..40u32, 0.0..max)?;
    chart.configure_mesh().x_desc("workers").draw()?;
    for (i, (name, runs)) in hammer.iter().enumerate() {
        let mut pts: Vec<(u32, f64)> = runs
            .iter()
            .filter(|r| !r.fair)
            .map(|r| (r.workers as u32, r.per_second))
            .collect();
        pts.sort_by_key(|p| p.0);
        let color = Palette99::pick(i);
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
