//! `distlock`: run a command under a distributed lock.
//!
//! ```text
//! distlock --url redis://127.0.0.1:6379 run order-42 -- ./process-order 42
//! DISTLOCK_URL=etcd://10.0.0.5:2379 distlock run --wait 10s nightly-report -- make report
//! distlock --url postgres://... inspect order-42
//! ```
//!
//! The command runs only while the lock is held. It gets `DISTLOCK_KEY` and
//! `DISTLOCK_FENCING_TOKEN` in its environment, to pass the token to the
//! resources it writes. If the lock is lost while it runs, the command gets
//! SIGTERM, then SIGKILL after `--kill-grace`.
//!
//! Exit codes: the command's own code when all went well; 75 when the lock
//! was not acquired (busy with `--wait no`, or the wait ran out); 76 when the
//! lock was lost while the command ran; 69 when the store is unreachable;
//! 78 for a bad URL or option; 70 for other failures.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use distlock::{Error, LockOptions, Wait};
use tokio::process::Command;

#[derive(Parser)]
#[command(
    name = "distlock",
    version,
    about = "Run a command under a distributed lock"
)]
struct Cli {
    /// The lock store, e.g. redis://host:6379, etcd://host:2379, consul://host:8500,
    /// postgres://user@host/db. Prefer the environment variable for URLs with passwords.
    #[arg(long, env = "DISTLOCK_URL", hide_env_values = true)]
    url: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Take the lock, run the command, release the lock.
    Run {
        /// The lock's name.
        key: String,
        /// Lease length; renewed in the background while the command runs.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How long to wait for a busy lock: `forever`, `no`, or a duration.
        #[arg(long, default_value = "forever")]
        wait: String,
        /// First come, first served (backends that support it).
        #[arg(long)]
        fair: bool,
        /// Stop renewing after this long; the command is then terminated.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_hold: Option<Duration>,
        /// Time between SIGTERM and SIGKILL when the lock is lost.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        kill_grace: Duration,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Show whether a lock is held, its fencing token and time left.
    Inspect {
        /// The lock's name.
        key: String,
    },
}

const NOT_ACQUIRED: u8 = 75;
const LOST: u8 = 76;
const UNAVAILABLE: u8 = 69;
const CONFIG: u8 = 78;
const SOFTWARE: u8 = 70;

fn exit_for(e: &Error) -> u8 {
    match e {
        Error::Timeout { .. } => NOT_ACQUIRED,
        Error::LockLost { .. } => LOST,
        Error::Connection { .. } => UNAVAILABLE,
        Error::Config { .. } | Error::InvalidKey { .. } | Error::InvalidOptions { .. } => CONFIG,
        Error::Unsupported { .. } | Error::Auth { .. } => CONFIG,
        _ => SOFTWARE,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISTLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("distlock: {e}");
            ExitCode::from(exit_for(&e))
        }
    }
}

fn parse_wait(s: &str) -> distlock::Result<Wait> {
    Ok(match s {
        "forever" => Wait::Forever,
        "no" | "0" => Wait::No,
        d => Wait::For(humantime::parse_duration(d).map_err(|e| {
            Error::invalid_options(format!(
                "--wait: {d:?} is not forever, no or a duration ({e})"
            ))
        })?),
    })
}

async fn run(cli: Cli) -> distlock::Result<u8> {
    let locks = distlock::connect(&cli.url).await?;
    match cli.command {
        Cmd::Inspect { key } => {
            let info = locks.inspect(key.as_str()).await?;
            match (info.held, info.fencing_token, info.expires_in) {
                (false, ..) => println!("{key}: free"),
                (true, token, left) => println!(
                    "{key}: held, fencing token {}, expires in {}",
                    token.map_or("unknown".into(), |t| t.to_string()),
                    left.map_or("unknown".into(), |d| humantime::format_duration(d)
                        .to_string()),
                ),
            }
            Ok(0)
        }
        Cmd::Run {
            key,
            ttl,
            wait,
            fair,
            max_hold,
            kill_grace,
            command,
        } => {
            let mut opts = LockOptions::new()
                .ttl(ttl)
                .wait(parse_wait(&wait)?)
                .fair(fair);
            if let Some(max) = max_hold {
                opts = opts.max_hold(max);
            }
            let guard = locks.lock_with(key.as_str(), &opts).await?;
            let (program, args) = command
                .split_first()
                .ok_or_else(|| Error::invalid_options("no command given"))?;
            let mut child = Command::new(program)
                .args(args)
                .env("DISTLOCK_KEY", &key)
                .env("DISTLOCK_FENCING_TOKEN", guard.fencing_token().to_string())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| Error::invalid_options(format!("cannot run {program:?}: {e}")))?;
            let status = tokio::select! {
                status = child.wait() => status,
                reason = guard.lost() => {
                    eprintln!("distlock: lock {key:?} lost ({reason}); stopping the command");
                    terminate(&mut child, kill_grace).await;
                    let _ = guard.release().await;
                    return Ok(LOST);
                }
                _ = tokio::signal::ctrl_c() => {
                    terminate(&mut child, kill_grace).await;
                    guard.release().await?;
                    return Ok(130);
                }
            };
            let status = status
                .map_err(|e| Error::invalid_options(format!("waiting for {program:?}: {e}")))?;
            if let Err(e) = guard.release().await {
                eprintln!("distlock: {e}");
                return Ok(exit_for(&e));
            }
            Ok(status
                .code()
                .map_or(SOFTWARE, |c| u8::try_from(c).unwrap_or(SOFTWARE)))
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}
