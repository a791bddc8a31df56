//! The part every server shares: one process with fault controls, and the [`Server`] trait.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::process::{Proc, ProcSpec, wait_ready};
use crate::util::log_tail;

/// Fault controls and introspection common to every server (and every cluster member).
///
/// All methods take `&self` (state is behind a mutex), so a server can be shared in an `Arc`
/// and controlled from another thread. They block: from async code call them through
/// `tokio::task::spawn_blocking`, or on a multi-thread runtime with `block_in_place`.
pub trait Server {
    /// A short description for messages: kind, address and folder.
    fn describe(&self) -> String;
    /// Kills the server with `SIGKILL` (no clean shutdown). Idempotent.
    fn stop(&self) -> Result<()>;
    /// Starts the server again on the same port(s) and data folder and waits until it answers.
    /// Stops it first if it is running (also when paused).
    fn restart(&self) -> Result<()>;
    /// Freezes the server with `SIGSTOP`: connections stay open but nothing is answered.
    fn pause(&self) -> Result<()>;
    /// Thaws a paused server with `SIGCONT`.
    fn resume(&self) -> Result<()>;
    /// Whether the server's process is alive (paused counts as alive).
    fn is_running(&self) -> bool;
    /// The last `lines` lines of the server's log.
    fn log_tail(&self, lines: usize) -> String;
}

/// Tells a readiness probe where this run's log starts (logs are appended across restarts).
#[derive(Debug, Clone)]
pub(crate) struct ProbeCtx {
    pub(crate) log: PathBuf,
    pub(crate) log_start: u64,
}

impl ProbeCtx {
    /// The log text written since this process was spawned.
    pub(crate) fn log_since_start(&self) -> String {
        let Ok(bytes) = std::fs::read(&self.log) else {
            return String::new();
        };
        let start = usize::try_from(self.log_start)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }
}

pub(crate) type Probe = Arc<dyn Fn(&ProbeCtx) -> bool + Send + Sync>;

#[derive(Debug, Default)]
struct State {
    proc: Option<Proc>,
    paused: bool,
}

/// One supervised server process.
pub(crate) struct Managed {
    spec: ProcSpec,
    probe: Probe,
    timeout: Duration,
    state: Mutex<State>,
}

impl std::fmt::Debug for Managed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Managed")
            .field("spec", &self.spec)
            .field("timeout", &self.timeout)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Managed {
    /// Creates the supervisor without starting anything.
    pub(crate) fn new(spec: ProcSpec, probe: Probe, timeout: Duration) -> Self {
        Managed {
            spec,
            probe,
            timeout,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.spec.log
    }

    /// Spawns the process (it must not be running) without waiting for readiness.
    pub(crate) fn spawn(&self) -> Result<()> {
        let mut st = self.lock();
        if let Some(old) = st.proc.take() {
            old.kill();
        }
        st.paused = false;
        st.proc = Some(Proc::spawn(&self.spec)?);
        Ok(())
    }

    fn ctx(&self) -> ProbeCtx {
        ProbeCtx {
            log: self.spec.log.clone(),
            log_start: std::fs::metadata(&self.spec.log)
                .map(|m| m.len())
                .unwrap_or(0),
        }
    }

    /// Spawns and waits until the probe succeeds.
    pub(crate) fn start(&self) -> Result<()> {
        let ctx = self.ctx();
        self.spawn()?;
        self.wait_ready_from(&ctx)
    }

    /// Log position to hand to [`Managed::wait_ready_from`], taken before spawning.
    pub(crate) fn probe_ctx(&self) -> ProbeCtx {
        self.ctx()
    }

    /// Waits until the probe succeeds, the process exits, or the timeout passes.
    pub(crate) fn wait_ready_from(&self, ctx: &ProbeCtx) -> Result<()> {
        let mut st = self.lock();
        let proc = st
            .proc
            .as_mut()
            .ok_or_else(|| Error::NotRunning(self.spec.name.clone()))?;
        let probe = self.probe.clone();
        wait_ready(proc, &self.spec, self.timeout, || probe(ctx))
    }

    /// The process id of the running process (also its process group id).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().proc.as_ref().map(Proc::pid)
    }

    /// Leaves the process running and forgets it; returns its process group id.
    pub(crate) fn detach(&self) -> Option<u32> {
        self.lock().proc.take().map(Proc::detach)
    }
}

impl Server for Managed {
    fn describe(&self) -> String {
        self.spec.name.clone()
    }

    fn stop(&self) -> Result<()> {
        let mut st = self.lock();
        if let Some(p) = st.proc.take() {
            p.kill();
        }
        st.paused = false;
        Ok(())
    }

    fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    fn pause(&self) -> Result<()> {
        let mut st = self.lock();
        let proc = st
            .proc
            .as_ref()
            .ok_or_else(|| Error::NotRunning(self.spec.name.clone()))?;
        proc.signal_group("STOP")?;
        st.paused = true;
        Ok(())
    }

    fn resume(&self) -> Result<()> {
        let mut st = self.lock();
        let proc = st
            .proc
            .as_ref()
            .ok_or_else(|| Error::NotRunning(self.spec.name.clone()))?;
        proc.signal_group("CONT")?;
        st.paused = false;
        Ok(())
    }

    fn is_running(&self) -> bool {
        let mut st = self.lock();
        match st.proc.as_mut() {
            Some(p) => p.exited().is_none(),
            None => false,
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.spec.log, lines)
    }
}

/// Runs `attempt` up to three times while it fails because a port was taken in the meantime
/// (another program bound it between our check and the server's bind).
pub(crate) fn retry_on_port_clash<T>(mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt() {
            Err(e) if tries < 3 && is_port_clash(&e) => continue,
            other => return other,
        }
    }
}

fn is_port_clash(e: &Error) -> bool {
    let tail = match e {
        Error::Exited { log_tail, .. } | Error::StartTimeout { log_tail, .. } => log_tail,
        _ => return false,
    };
    let t = tail.to_ascii_lowercase();
    t.contains("address already in use") || t.contains("could not bind") || t.contains("eaddrinuse")
}
