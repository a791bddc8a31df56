//! Child processes: spawn in their own process group, watch, signal, kill.
//!
//! # What is guaranteed about cleanup
//!
//! * Every server runs in a process group of its own (`setpgid` through std's safe
//!   [`CommandExt::process_group`]). Stopping it sends `SIGKILL` to the whole group, so helper
//!   processes (PostgreSQL's backends) die with it.
//! * Dropping the handle (also while a test panics and unwinds) kills the group, reaps it, and
//!   the owning server then removes its temporary folder.
//! * If the test process itself dies without unwinding (`SIGKILL`, `abort`, Ctrl-C), a tiny
//!   watcher (`sh`, in its own process group so Ctrl-C does not reach it) notices that the pipe
//!   from the test process closed, kills the server's group and removes its folder. The watcher
//!   only fails to act if it is itself killed, e.g. by `kill -9 -1` or an OOM kill.
//! * Servers started by `cargo xtask servers up` are detached on purpose: no watcher.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use crate::error::{Error, IoContext, Result};
use crate::util::{UserIds, log_tail};

/// How to (re)start one server process.
#[derive(Debug, Clone)]
pub(crate) struct ProcSpec {
    /// Human name for messages, e.g. `redis-server (/tmp/distlock-redis-abc)`.
    pub(crate) name: String,
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    /// Stdout and stderr are appended here.
    pub(crate) log: PathBuf,
    /// Run as this user (needed for PostgreSQL when we are root).
    pub(crate) user: Option<UserIds>,
    /// Folder the watcher removes if the test process dies.
    pub(crate) cleanup_dir: Option<PathBuf>,
}

/// A running process group plus its watcher.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    watcher: Option<(Child, ChildStdin)>,
    killed: bool,
}

impl Proc {
    /// Spawns the process in a new process group and arms a watcher for it.
    pub(crate) fn spawn(spec: &ProcSpec) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .ctx(|| format!("opening log {}", spec.log.display()))?;
        if let Some(user) = &spec.user {
            let _ = std::os::unix::fs::chown(&spec.log, Some(user.uid), Some(user.gid));
        }
        let log2 = log
            .try_clone()
            .ctx(|| format!("opening log {}", spec.log.display()))?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        if let Some(user) = &spec.user {
            cmd.uid(user.uid).gid(user.gid);
        }
        let child = cmd
            .spawn()
            .ctx(|| format!("starting {} ({})", spec.name, spec.program.display()))?;
        let mut proc = Proc {
            child,
            watcher: None,
            killed: false,
        };
        proc.watcher = spawn_watcher(proc.pid(), spec.cleanup_dir.as_deref()).ok();
        Ok(proc)
    }

    /// The process id (also the process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the process has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown status: {e}")),
        }
    }

    /// Sends a signal to the whole process group with the `kill` command.
    pub(crate) fn signal_group(&self, signal: &str) -> Result<()> {
        signal_group(self.pid(), signal)
    }

    /// SIGKILLs the group, reaps the leader and disarms the watcher.
    pub(crate) fn kill(mut self) {
        self.kill_in_place();
    }

    fn kill_in_place(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return;
        }
        let _ = signal_group(self.pid(), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The group's other members (PostgreSQL backends) were killed too; wait until they are
        // gone so a restart can reuse ports and shared memory.
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_alive(self.pid()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some((mut w, _stdin)) = self.watcher.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// Forgets the process without killing it: used to leave servers running on purpose.
    pub(crate) fn detach(mut self) -> u32 {
        if let Some((mut w, _stdin)) = self.watcher.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let pid = self.pid();
        std::mem::forget(self);
        pid
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_in_place();
    }
}

/// Sends `signal` (a name like `KILL`, `STOP`, `CONT`, or `0`) to process group `pgid`.
pub(crate) fn signal_group(pgid: u32, signal: &str) -> Result<()> {
    let out = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdin(Stdio::null())
        .output()
        .ctx(|| "running `kill`".to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("kill -{signal} -- -{pgid}"),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether any process of group `pgid` is alive (zombies of reaped children do not count).
pub(crate) fn group_alive(pgid: u32) -> bool {
    // `kill -0` also succeeds for zombies; look at /proc to skip them.
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return signal_group(pgid, "0").is_ok();
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name "(...)": state ppid pgrp ...
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let _ppid = fields.next();
        let pgrp = fields.next().and_then(|s| s.parse::<u32>().ok());
        if pgrp == Some(pgid) && state != Some("Z") && state != Some("X") {
            return true;
        }
    }
    false
}

/// Starts `sh` waiting on a pipe from us; when the pipe closes (we died), it kills the group
/// and removes the folder.
fn spawn_watcher(pgid: u32, dir: Option<&Path>) -> Result<(Child, ChildStdin)> {
    let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(
            // POSIX sh (dash) `kill` knows no `--`; `-9 -PGID` is portable.
            r#"read _ignored; kill -9 -"$1" 2>/dev/null; sleep 0.2; kill -9 -"$1" 2>/dev/null; if [ -n "$2" ]; then rm -rf -- "$2"; fi"#,
        )
        .arg("distlock-harness-watcher")
        .arg(pgid.to_string())
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ctx(|| "starting the watcher process (sh)".to_string())?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| Error::io("watcher stdin", std::io::Error::other("no pipe")))?;
    Ok((child, stdin))
}

/// Runs a helper command to completion, capturing its output; non-zero exit is an error.
pub(crate) fn run_command(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("running {shown}"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            output: text.trim().to_string(),
        })
    }
}

/// Polls `probe` until it returns `Ok(true)`, the process exits, or `timeout` passes.
pub(crate) fn wait_ready(
    proc: &mut Proc,
    spec: &ProcSpec,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if probe() {
            return Ok(());
        }
        if let Some(status) = proc.exited() {
            return Err(Error::Exited {
                server: spec.name.clone(),
                status,
                log_tail: log_tail(&spec.log, 30),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::StartTimeout {
                server: spec.name.clone(),
                timeout,
                log_tail: log_tail(&spec.log, 30),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The direct children of process `ppid`, read from /proc (empty where
/// /proc is missing).
pub(crate) fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesised command name: state, then the parent's pid.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(ppid) {
            out.push(pid);
        }
    }
    out
}
