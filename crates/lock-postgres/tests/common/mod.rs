//! Shared test support: one PostgreSQL server per test binary (started by
//! the harness on first use), plus dedicated servers for fault tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lock_core::Backend;
use lock_postgres::{Mode, PostgresBackend, PostgresConfig};
use server_harness::{PostgresConfig as HarnessConfig, PostgresServer, Server};

/// Many clients of many parallel cases share the server.
fn harness_config() -> HarnessConfig {
    let mut c = HarnessConfig::default();
    c.settings.push(("max_connections".into(), "400".into()));
    c
}

/// Starts a server outside the async runtime's worker (it blocks ~1 s).
pub fn start_server() -> PostgresServer {
    let start =
        || PostgresServer::start_with(harness_config()).expect("start PostgreSQL with the harness");
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(start)
        }
        _ => start(),
    }
}

/// The server shared by every case of this test binary.
pub fn shared() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(start_server)
}

/// A config for `server` in `mode` with small pools, so that many clients of
/// parallel cases fit in `max_connections`.
pub fn config(server: &PostgresServer, mode: Mode) -> PostgresConfig {
    let mut c = PostgresConfig::from_url(&server.url()).unwrap();
    c.mode = mode;
    c.pool_size = 4;
    c.advisory_pool_size = 24;
    c.request_timeout = Duration::from_secs(3);
    c.connect_timeout = Duration::from_secs(3);
    c
}

/// Opens clients of one server; a fault case gets its own server.
pub struct PgFactory {
    pub mode: Mode,
    pub own: OnceLock<Arc<PostgresServer>>,
}

impl PgFactory {
    pub fn new(mode: Mode) -> Self {
        PgFactory {
            mode,
            own: OnceLock::new(),
        }
    }

    fn server(&self) -> &PostgresServer {
        match self.own.get() {
            Some(s) => s,
            None => shared(),
        }
    }
}

#[lock_core::async_trait]
impl conformance::Factory for PgFactory {
    async fn backend(&self) -> lock_core::Result<Arc<dyn Backend>> {
        let b = PostgresBackend::connect(config(self.server(), self.mode)).await?;
        Ok(Arc::new(b))
    }

    /// Fault cases restart or freeze the server: they get one of their own,
    /// so the other cases running in parallel are not disturbed.
    fn faults(&self) -> Option<Arc<dyn conformance::Faults>> {
        let server = self.own.get_or_init(|| Arc::new(start_server()));
        Some(Arc::new(PgFaults(Arc::clone(server))))
    }
}

/// Fault control over a harness server.
pub struct PgFaults(pub Arc<PostgresServer>);

async fn blocking(
    server: &Arc<PostgresServer>,
    f: impl FnOnce(&PostgresServer) -> server_harness::Result<()> + Send + 'static,
) -> Result<(), String> {
    let s = Arc::clone(server);
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

#[lock_core::async_trait]
impl conformance::Faults for PgFaults {
    async fn restart(&self) -> Result<(), String> {
        blocking(&self.0, restart_all).await
    }
    async fn pause(&self) -> Result<(), String> {
        blocking(&self.0, |s| {
            s.pause()?;
            signal_children(s, "STOP");
            Ok(())
        })
        .await
    }
    async fn resume(&self) -> Result<(), String> {
        blocking(&self.0, |s| {
            signal_children(s, "CONT");
            s.resume()
        })
        .await
    }
    async fn cut_connections(&self) -> Result<(), String> {
        blocking(&self.0, |s| {
            s.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            )
            .map(|_| ())
        })
        .await
    }
}

/// Kills the postmaster *and* its children (a crash of the whole server),
/// then starts it again on the same data. The harness's kill reaches only
/// the postmaster (see [`signal_children`]); orphaned backends would keep
/// answering on open connections for a moment, which no real crash does.
pub fn restart_all(server: &PostgresServer) -> server_harness::Result<()> {
    let children = children(server);
    server.stop()?;
    for pid in children {
        let _ = server_harness::signal_process_group(pid, "KILL");
    }
    server.restart()
}

/// PostgreSQL's child processes (backends, checkpointer, ...) each call
/// `setsid()`, so the harness's process-group signal reaches only the
/// postmaster: existing connections would keep working through a "pause".
/// Signal every child of the postmaster as well.
fn signal_children(server: &PostgresServer, signal: &str) {
    for pid in children(server) {
        let _ = server_harness::signal_process_group(pid, signal);
    }
}

/// The postmaster's child processes, from /proc.
fn children(server: &PostgresServer) -> Vec<u32> {
    let Some(postmaster) = server.pid() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which is in parentheses): state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            out.push(pid);
        }
    }
    out
}
