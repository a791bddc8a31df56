//! Project automation for distlock, run as `cargo xtask <command>`.
//!
//! * `install`: installs the test servers (Redis, PostgreSQL 15, etcd 3.5, Consul 1.8.7) and
//!   the protobuf tools the etcd client needs to build. A no-op when all is in place. See
//!   `server_harness::install` for where everything comes from.
//! * `test`: `install`, then every check CI runs, in order: `cargo test --workspace
//!   --all-targets` (unit, integration tests and examples, plus one quick pass of every
//!   bench so they can't rot), `cargo test --workspace --doc`, `cargo clippy --workspace
//!   --all-targets -- -D warnings`, `cargo fmt --all --check`, `cargo doc --workspace
//!   --no-deps` with `RUSTDOCFLAGS=-D warnings`. Every step runs even if an earlier one failed,
//!   then a summary names the failed steps and the exit code is non-zero.
//! * `bench [--quick]`: `install`, then `cargo bench -p benches` (criterion's `--quick` mode
//!   with `--quick`), then the report step.
//! * `servers up | down | status`: one long-lived server of each kind for trying things by
//!   hand. `up` prints their URLs and records them in `.servers/run/servers.tsv`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use server_harness::{
    ConsulServer, EtcdServer, PostgresServer, RedisServer, install, process_group_alive,
    signal_process_group, workspace_root,
};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  install              install the test servers (Redis, PostgreSQL 15, etcd 3.5, Consul 1.8.7)
  test                 install, then run tests, clippy, fmt and doc checks over the workspace
  bench [--quick]      install, then run the benches (crate `benches`)
  servers up           start one server of each kind in the background and print their URLs
  servers down         stop them and remove their folders
  servers status       tell which of them are alive";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["install"] => run_install().map(|_| ()),
        ["test"] => run_test(),
        ["bench"] => run_bench(false),
        ["bench", "--quick"] => run_bench(true),
        ["servers", "up"] => servers_up(),
        ["servers", "down"] => servers_down(),
        ["servers", "status"] => servers_status(),
        [] | ["help"] | ["--help"] | ["-h"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("unknown command: {}\n\n{USAGE}", args.join(" "));
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn root() -> AnyResult<PathBuf> {
    workspace_root().ok_or_else(|| "cannot find the workspace root".into())
}

fn run_install() -> AnyResult<install::InstallReport> {
    println!("xtask: installing test servers (cargo xtask install)");
    let report = install::install()?;
    println!("{report}");
    Ok(report)
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if let Ok(root) = root() {
        cmd.current_dir(root);
    }
    cmd
}

struct Step {
    name: &'static str,
    cmd: Command,
}

fn step(name: &'static str, args: &[&str]) -> Step {
    let mut cmd = cargo();
    cmd.args(args);
    Step { name, cmd }
}

fn run_test() -> AnyResult<()> {
    run_install()?;
    let mut doc = step("cargo doc", &["doc", "--workspace", "--no-deps"]);
    doc.cmd.env("RUSTDOCFLAGS", "-D warnings");
    let steps = vec![
        step(
            "cargo test",
            &["test", "--workspace", "--all-targets", "--no-fail-fast"],
        ),
        step("cargo test --doc", &["test", "--workspace", "--doc"]),
        step(
            "cargo clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        step("cargo fmt", &["fmt", "--all", "--check"]),
        doc,
    ];
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for mut s in steps {
        println!("\nxtask: === {} ===", s.name);
        let started = Instant::now();
        let ok = match s.cmd.status() {
            Ok(st) => st.success(),
            Err(e) => {
                eprintln!("xtask: could not run {}: {e}", s.name);
                false
            }
        };
        let secs = started.elapsed().as_secs_f64();
        summary.push(format!(
            "  {:<18} {:>7.1} s  {}",
            s.name,
            secs,
            if ok { "ok" } else { "FAILED" }
        ));
        if !ok {
            eprintln!("xtask: step `{}` FAILED", s.name);
            failed.push(s.name);
        }
    }
    println!("\nxtask: summary\n{}", summary.join("\n"));
    if failed.is_empty() {
        println!("xtask: all steps passed");
        Ok(())
    } else {
        Err(format!("failed steps: {}", failed.join(", ")).into())
    }
}

fn run_bench(quick: bool) -> AnyResult<()> {
    let root = root()?;
    if !root.join("crates/benches/Cargo.toml").is_file() {
        return Err(
            "there is no benches crate yet (expected crates/benches/Cargo.toml, \
                    package `benches`); nothing to run"
                .into(),
        );
    }
    run_install()?;
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "benches"]);
    if quick {
        cmd.args(["--", "--quick"]);
    }
    println!("xtask: running {cmd:?}");
    let status = cmd.status()?;
    if !status.success() {
        return Err(format!("cargo bench failed ({status})").into());
    }
    bench_report(&root)
}

/// Points at the report the scenarios bench wrote.
///
/// `benches/scenarios.rs` writes `target/distlock-report/report.md` and its SVG charts at the
/// end of the run, from its own results and the estimates criterion saved under
/// `target/criterion/` in the same run.
fn bench_report(root: &Path) -> AnyResult<()> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let report = target.join("distlock-report/report.md");
    if !report.is_file() {
        return Err(format!(
            "the benches ran but wrote no report at {}",
            report.display()
        )
        .into());
    }
    println!("xtask: report: {}", report.display());
    println!(
        "xtask: criterion's own reports: {}",
        target.join("criterion/report/index.html").display()
    );
    Ok(())
}

/// One line of `.servers/run/servers.tsv`: kind, process group ids, folder, URL.
struct Running {
    kind: String,
    pgids: Vec<u32>,
    dir: PathBuf,
    url: String,
}

fn state_file() -> AnyResult<PathBuf> {
    let dir = server_harness::servers_dir()
        .ok_or("cannot find the workspace root")?
        .join("run");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join("servers.tsv"))
}

fn read_state() -> AnyResult<Vec<Running>> {
    let path = state_file()?;
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() != 4 {
            return Err(format!("malformed line in {}: {line}", path.display()).into());
        }
        out.push(Running {
            kind: cols[0].to_string(),
            pgids: cols[1].split(',').filter_map(|p| p.parse().ok()).collect(),
            dir: PathBuf::from(cols[2]),
            url: cols[3].to_string(),
        });
    }
    Ok(out)
}

fn write_state(entries: &[Running]) -> AnyResult<()> {
    let text: String = entries
        .iter()
        .map(|r| {
            let pgids: Vec<String> = r.pgids.iter().map(u32::to_string).collect();
            format!(
                "{}\t{}\t{}\t{}\n",
                r.kind,
                pgids.join(","),
                r.dir.display(),
                r.url
            )
        })
        .collect();
    std::fs::write(state_file()?, text)?;
    Ok(())
}

fn servers_up() -> AnyResult<()> {
    let existing = read_state()?;
    if existing
        .iter()
        .any(|r| r.pgids.iter().any(|p| process_group_alive(*p)))
    {
        servers_status()?;
        return Err("servers are already up; run `cargo xtask servers down` first".into());
    }
    run_install()?;
    let started = Instant::now();
    let mut entries = Vec::new();
    // Record each server as soon as it runs, so a later failure still leaves a state file
    // that `servers down` can clean up.
    let redis = RedisServer::start()?;
    let url = redis.url();
    let (pgid, dir) = redis.detach();
    entries.push(Running {
        kind: "redis".into(),
        pgids: pgid.into_iter().collect(),
        dir,
        url,
    });
    write_state(&entries)?;

    let pg = PostgresServer::start()?;
    let url = pg.url();
    let (pgid, dir) = pg.detach();
    entries.push(Running {
        kind: "postgres".into(),
        pgids: pgid.into_iter().collect(),
        dir,
        url,
    });
    write_state(&entries)?;

    let etcd = EtcdServer::start()?;
    let url = etcd.url().replacen("http://", "etcd://", 1);
    let (pgids, dir) = etcd.detach();
    entries.push(Running {
        kind: "etcd".into(),
        pgids,
        dir,
        url,
    });
    write_state(&entries)?;

    let consul = ConsulServer::start()?;
    let url = consul.url().replacen("http://", "consul://", 1);
    let (pgids, dir) = consul.detach();
    entries.push(Running {
        kind: "consul".into(),
        pgids,
        dir,
        url,
    });
    write_state(&entries)?;

    println!(
        "xtask: servers up in {:.1} s (state in {}):",
        started.elapsed().as_secs_f64(),
        state_file()?.display()
    );
    for r in &entries {
        println!("  {:<8} {}", r.kind, r.url);
    }
    println!("stop them with `cargo xtask servers down`");
    Ok(())
}

fn servers_down() -> AnyResult<()> {
    let entries = read_state()?;
    if entries.is_empty() {
        println!("xtask: no servers recorded; nothing to stop");
    }
    for r in &entries {
        for p in &r.pgids {
            let _ = signal_process_group(*p, "KILL");
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while r.pgids.iter().any(|p| process_group_alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Only remove folders the harness made (a corrupted state file must not delete
        // anything else).
        let ours = r
            .dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("distlock-"));
        if ours && r.dir.exists() {
            std::fs::remove_dir_all(&r.dir)?;
        }
        println!("xtask: stopped {} ({})", r.kind, r.url);
    }
    std::fs::remove_file(state_file()?).ok();
    Ok(())
}

fn servers_status() -> AnyResult<()> {
    let entries = read_state()?;
    if entries.is_empty() {
        println!("xtask: no servers recorded (start them with `cargo xtask servers up`)");
        return Ok(());
    }
    for r in &entries {
        let alive = r.pgids.iter().filter(|p| process_group_alive(**p)).count();
        let state = if alive == r.pgids.len() && alive > 0 {
            "up"
        } else if alive == 0 {
            "DOWN"
        } else {
            "PARTLY DOWN"
        };
        println!("  {:<8} {:<12} {}", r.kind, state, r.url);
    }
    Ok(())
}
