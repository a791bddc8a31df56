//! The contended scenarios, then the report.
//!
//! Under `cargo bench` it runs every scenario for every backend (`--quick`:
//! shorter). Under `cargo test --benches` (no `--bench` flag) it runs a tiny
//! smoke version against the in-memory backend only, so CI keeps it working
//! without spending minutes.

use std::time::Duration;

use benches::report::{LatencySamples, ScenarioResults, read_json, write_json, write_report};
use benches::scenarios::{hammer, handoff, many_held, many_held_here, many_keys};
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

/// `--many-held-child URL LOCKS TTL_MS PERIODS`: measure holding many locks
/// in this (fresh) process and print the result as one JSON line.
fn many_held_child(args: &[String]) -> ! {
    let parsed = (|| -> Option<(String, usize, u64, u32)> {
        Some((
            args.first()?.clone(),
            args.get(1)?.parse().ok()?,
            args.get(2)?.parse().ok()?,
            args.get(3)?.parse().ok()?,
        ))
    })();
    let Some((url, locks, ttl_ms, periods)) = parsed else {
        eprintln!("usage: --many-held-child URL LOCKS TTL_MS PERIODS");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt
        .block_on(many_held_here(
            &url,
            locks,
            Duration::from_millis(ttl_ms),
            periods,
        ))
        .map_err(|e| e.to_string());
    println!("{}", serde_json::to_string(&result).unwrap_or_default());
    std::process::exit(0);
}

/// TTL of the locks held in the "holding many locks" scenario (clamped to
/// each backend's minimum): renewal traffic scales with 1/TTL.
const HELD_TTL: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--many-held-child") {
        many_held_child(&args[2..]);
    }
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
    let started = std::time::Instant::now();
    let n = targets.list.len();
    for (i, t) in targets.list.iter().enumerate() {
        let left = if i == 0 {
            "estimating".to_owned()
        } else {
            let per = started.elapsed() / i as u32;
            format!("about {} s left", (per * (n - i) as u32).as_secs())
        };
        eprintln!("[{}/{n}] scenarios on {} ({left})", i + 1, t.name);
        let mut failed: Vec<(String, String)> = Vec::new();
        let mut fail = |scenario: &str, e: lock_core::BoxError| {
            eprintln!("  {scenario} FAILED: {e}");
            failed.push((format!("{}: {scenario}", t.name), e.to_string()));
        };
        eprintln!("  handoff: 8 workers, hold 5 ms, think 20 ms");
        match rt.block_on(handoff(
            t,
            8,
            Duration::from_millis(5),
            Duration::from_millis(20),
            handoff_run,
        )) {
            Ok(h) => {
                results.handoff.insert(t.name.clone(), h);
            }
            Err(e) => fail("handoff", e),
        }
        let fifo = rt
            .block_on(t.client())
            .map(|c| c.capabilities().fifo.is_supported())
            .unwrap_or(false);
        let mut runs = Vec::new();
        for fair in [false, true] {
            if fair && !fifo {
                continue;
            }
            for workers in [8, 32] {
                let mode = if fair { "fair" } else { "default" };
                eprintln!("  hammer: {workers} workers, {mode}");
                match rt.block_on(hammer(t, workers, 4, fair, hammer_run)) {
                    Ok(r) => runs.push(r),
                    Err(e) => fail(&format!("hammer {workers} {mode}"), e),
                }
            }
        }
        results.hammer.insert(t.name.clone(), runs);
        eprintln!("  many keys: 32 workers over 1,000 keys");
        match rt.block_on(many_keys(t, 32, 1000, keys_run)) {
            Ok(r) => {
                results.many_keys.insert(t.name.clone(), r);
            }
            Err(e) => fail("many keys", e),
        }
        eprintln!(
            "  holding {held_locks} locks for {held_periods} TTL periods (in a fresh process)"
        );
        match many_held(
            t,
            held_locks,
            if quick {
                Duration::from_secs(2)
            } else {
                HELD_TTL
            },
            held_periods,
        ) {
            Ok(r) => {
                results.many_held.insert(t.name.clone(), r);
            }
            Err(e) => fail("many held", e),
        }
        results.failures.extend(failed);
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
