//! The contended scenarios, then the report.
//!
//! Under `cargo bench` it runs every scenario for every backend (`--quick`:
//! shorter). Under `cargo test --benches` (no `--bench` flag) it runs a tiny
//! smoke version against the in-memory backend only, so CI keeps it working
//! without spending minutes.

use std::time::Duration;

use benches::report::{LatencySamples, ScenarioResults, read_json, write_json, write_report};
use benches::scenarios::{hammer, handoff, many_held, many_keys};
use benches::{Targets, report_dir, target_dir};

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d %H:%M %Z")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}; {date}; servers on loopback, started by server-harness")
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let quick = benches::quick_mode() || !bench_mode;
    let filter = if bench_mode {
        std::env::var("DISTLOCK_BENCH_FILTER").ok()
    } else {
        Some("memory".into())
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let targets =
        Targets::start(&rt, filter.as_deref()).expect("starting the servers for the benches");
    let scale = |full: u64, short: u64| Duration::from_millis(if quick { short } else { full });
    let smoke = !bench_mode;
    let (handoff_run, hammer_run, keys_run) = if smoke {
        (scale(0, 300), scale(0, 200), scale(0, 200))
    } else {
        (scale(6000, 1500), scale(3000, 800), scale(3000, 800))
    };
    let held_locks = if smoke {
        200
    } else if quick {
        1000
    } else {
        10_000
    };
    let held_periods = if quick { 1 } else { 3 };

    let mut results = ScenarioResults {
        quick,
        ..Default::default()
    };
    let per_target =
        handoff_run + hammer_run * 4 + keys_run + Duration::from_secs(2) * held_periods;
    let total = per_target * targets.list.len() as u32;
    let started = std::time::Instant::now();
    for (i, t) in targets.list.iter().enumerate() {
        let left = total.saturating_sub(started.elapsed());
        eprintln!(
            "[{}/{}] scenarios on {} (about {} s left)",
            i + 1,
            targets.list.len(),
            t.name,
            left.as_secs()
        );
        let run = async {
            eprintln!("  handoff: 8 workers, hold 5 ms, think 20 ms");
            let h = handoff(
                t,
                8,
                Duration::from_millis(5),
                Duration::from_millis(20),
                handoff_run,
            )
            .await?;
            results.handoff.insert(t.name.clone(), h);
            let mut runs = Vec::new();
            let fifo = t.client().await?.capabilities().fifo.is_supported();
            for fair in [false, true] {
                if fair && !fifo {
                    continue;
                }
                for workers in [8, 32] {
                    eprintln!(
                        "  hammer: {workers} workers, {}",
                        if fair { "fair" } else { "default" }
                    );
                    runs.push(hammer(t, workers, 4, fair, hammer_run).await?);
                }
            }
            results.hammer.insert(t.name.clone(), runs);
            eprintln!("  many keys: 32 workers over 1,000 keys");
            results
                .many_keys
                .insert(t.name.clone(), many_keys(t, 32, 1000, keys_run).await?);
            eprintln!("  holding {held_locks} locks for {held_periods} TTL periods");
            let held = many_held(t, held_locks, Duration::from_secs(2), held_periods).await?;
            results.many_held.insert(t.name.clone(), held);
            Ok::<(), lock_core::BoxError>(())
        };
        if let Err(e) = rt.block_on(run) {
            eprintln!("  FAILED: {e}");
            results.failures.insert(t.name.clone(), e.to_string());
        }
    }
    let dir = report_dir();
    if let Err(e) = write_json(&dir.join("scenarios.json"), &results) {
        eprintln!("could not save scenario results: {e}");
    }
    let names: Vec<(String, Option<String>)> = targets
        .list
        .iter()
        .map(|t| (t.name.clone(), t.raw.as_ref().map(|r| r.name())))
        .collect();
    let samples: LatencySamples = read_json(&dir.join("latency-samples.json"));
    match write_report(
        &names,
        &target_dir().join("criterion"),
        &samples,
        &results,
        &machine(),
        &dir,
    ) {
        Ok(path) => eprintln!("report: {}", path.display()),
        Err(e) => eprintln!("could not write the report: {e}"),
    }
    if smoke && !results.failures.is_empty() {
        std::process::exit(1);
    }
}
