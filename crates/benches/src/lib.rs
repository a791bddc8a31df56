//! # benches: what each backend costs, measured the same way on your machine
//!
//! Users choose a backend by comparing numbers, and absolute numbers depend on
//! the machine. So every figure here comes with a ratio to a floor measured in
//! the same run: the store's *raw baseline*, the minimal correct protocol
//! written with the same client crate and no framework around it.
//!
//! - `benches/latency.rs` (criterion): the uncontended acquire+release cycle
//!   and a `try_lock` on a held key, per backend and per raw baseline.
//! - `benches/scenarios.rs`: handoff latency, contended throughput and
//!   fairness, many keys, and holding 10,000 locks; it then writes the report
//!   (`target/distlock-report/report.md` and SVG charts).
//!
//! `cargo xtask bench` starts the servers and runs both; `--quick` runs a
//! short smoke version.

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod counting;
pub mod raw;
pub mod report;
pub mod scenarios;
pub mod stats;
pub mod targets;

pub use targets::{RawLock, Target, Targets};

/// Whether `--quick` was passed (a smoke run, not for numbers).
pub fn quick_mode() -> bool {
    std::env::args().any(|a| a == "--quick") || std::env::var_os("DISTLOCK_BENCH_QUICK").is_some()
}

/// Where the report and its data go: `<workspace>/target/distlock-report`.
pub fn report_dir() -> std::path::PathBuf {
    target_dir().join("distlock-report")
}

/// The cargo target folder.
pub fn target_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return dir.into();
    }
    server_harness::workspace_root()
        .unwrap_or_else(|| std::path::PathBuf::from("."))
        .join("target")
}
