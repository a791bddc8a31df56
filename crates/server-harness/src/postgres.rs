//! PostgreSQL 15 servers: plain (trust) and password (SCRAM-SHA-256) + TLS.
//!
//! `initdb` and `postgres` refuse to run as root. When the test process is root, the harness
//! runs them as the `postgres` user (created by Debian's package), or, if that user does not
//! exist, as a system user `distlock-pg` that it creates with `useradd`. The temporary folder
//! is handed to that user (a root-owned 0700 folder in `/tmp` would lock it out).
//!
//! Clients talk over TCP on `127.0.0.1`; the Unix socket lives in the server's folder and is
//! only for humans (`psql -h <dir>/socket`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::binaries::Binary;
use crate::error::{Error, Result};
use crate::managed::{Managed, ProbeCtx, Server, retry_on_port_clash};
use crate::probe;
use crate::process::{ProcSpec, run_command};
use crate::tls::{self, TlsFiles};
use crate::util::{
    LOCALHOST, PortLease, UserIds, chown_tree, lookup_user, random_token, reserve_port,
    running_as_root, temp_dir, write_file,
};

/// The superuser the harness creates.
const SUPERUSER: &str = "postgres";
/// The database every URL points at.
const DATABASE: &str = "postgres";

/// How to start a PostgreSQL server. `Default`: trust authentication, no TLS, `fsync=on`.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// SCRAM-SHA-256 password authentication for TCP connections plus `ssl=on` with a fresh
    /// CA (the URL then asks for `sslmode=verify-full`).
    pub secure: bool,
    /// Keep `fsync` on (the default, so benches measure real commit costs). Turn it off for
    /// faster tests that don't care.
    pub fsync: bool,
    /// Extra `-c name=value` settings, e.g. `("max_connections", "200")`.
    pub settings: Vec<(String, String)>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            secure: false,
            fsync: true,
            settings: Vec::new(),
        }
    }
}

impl PostgresConfig {
    /// Password (SCRAM-SHA-256) + TLS.
    pub fn secure() -> Self {
        PostgresConfig {
            secure: true,
            ..PostgresConfig::default()
        }
    }
}

/// A PostgreSQL 15 server on a free loopback port, in its own temporary folder.
///
/// The data folder survives [`Server::stop`] / [`Server::restart`] (after a `SIGKILL`
/// PostgreSQL runs crash recovery, so committed data is kept). Dropping the value kills the
/// server and removes its folder.
#[derive(Debug)]
pub struct PostgresServer {
    managed: Managed,
    port: u16,
    password: Option<String>,
    tls: Option<TlsFiles>,
    bin_dir: PathBuf,
    _lease: PortLease,
    dir: tempfile::TempDir,
}

/// Returns the unprivileged user to run PostgreSQL as when we are root, creating one if needed.
fn postgres_user() -> Result<Option<UserIds>> {
    if !running_as_root() {
        return Ok(None);
    }
    if let Some(u) = lookup_user("postgres") {
        return Ok(Some(u));
    }
    const FALLBACK: &str = "distlock-pg";
    if let Some(u) = lookup_user(FALLBACK) {
        return Ok(Some(u));
    }
    // Racing test processes may both try; a second `useradd` fails with "already exists".
    let _ = run_command(Command::new("useradd").args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        FALLBACK,
    ]));
    lookup_user(FALLBACK)
        .map(Some)
        .ok_or_else(|| Error::InvalidArgument(format!("could not create the user {FALLBACK}")))
}

impl PostgresServer {
    /// Starts a plain server: `postgres://postgres@127.0.0.1:PORT/postgres`, trust auth.
    pub fn start() -> Result<Self> {
        Self::start_with(PostgresConfig::default())
    }

    /// Starts a password + TLS server (see [`PostgresConfig::secure`]).
    pub fn start_secure() -> Result<Self> {
        Self::start_with(PostgresConfig::secure())
    }

    /// Starts a server configured by `config`.
    pub fn start_with(config: PostgresConfig) -> Result<Self> {
        let bin_dir = Binary::PostgresBinDir.locate()?;
        let user = postgres_user()?;
        retry_on_port_clash(|| Self::try_start(&bin_dir, user.as_ref(), &config))
    }

    fn try_start(bin_dir: &Path, user: Option<&UserIds>, config: &PostgresConfig) -> Result<Self> {
        let dir = temp_dir("postgres")?;
        let lease = reserve_port()?;
        let port = lease.port();
        let root = dir.path();
        let data = root.join("data");
        let sock = root.join("socket");
        std::fs::create_dir(&sock)
            .map_err(|e| Error::io(format!("mkdir {}", sock.display()), e))?;
        let tls = if config.secure {
            Some(tls::generate(root)?)
        } else {
            None
        };
        let password = config.secure.then(|| random_token(24));
        let pwfile = root.join("pwfile");
        if let Some(pw) = &password {
            write_file(&pwfile, format!("{pw}\n"))?;
        }
        if let Some(u) = user {
            chown_tree(root, u)?;
        }

        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--no-locale", "-E", "UTF8", "--no-sync"])
            .arg("--auth-local=trust")
            .arg(if config.secure {
                "--auth-host=scram-sha-256"
            } else {
                "--auth-host=trust"
            })
            .current_dir(root)
            .env("LC_ALL", "C");
        if password.is_some() {
            initdb.arg(format!("--pwfile={}", pwfile.display()));
        }
        if let Some(u) = user {
            std::os::unix::process::CommandExt::uid(&mut initdb, u.uid);
            std::os::unix::process::CommandExt::gid(&mut initdb, u.gid);
        }
        run_command(&mut initdb)?;
        let _ = std::fs::remove_file(&pwfile);

        let mut args = vec![
            "-D".to_string(),
            data.display().to_string(),
            "-h".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            port.to_string(),
            "-k".to_string(),
            sock.display().to_string(),
        ];
        let mut settings: Vec<(String, String)> = vec![
            (
                "fsync".into(),
                if config.fsync { "on" } else { "off" }.into(),
            ),
            ("password_encryption".into(), "scram-sha-256".into()),
            ("logging_collector".into(), "off".into()),
            ("shared_buffers".into(), "32MB".into()),
        ];
        if let Some(t) = &tls {
            settings.extend([
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), t.server_cert.display().to_string()),
                ("ssl_key_file".into(), t.server_key.display().to_string()),
                ("ssl_ca_file".into(), t.ca_cert.display().to_string()),
            ]);
        }
        settings.extend(config.settings.iter().cloned());
        for (k, v) in settings {
            args.push("-c".to_string());
            args.push(format!("{k}={v}"));
        }
        let spec = ProcSpec {
            name: format!("postgres on 127.0.0.1:{port} ({})", root.display()),
            program: bin_dir.join("postgres"),
            args,
            env: vec![("LC_ALL".into(), "C".into())],
            log: root.join("postgres.log"),
            user: user.cloned(),
            cleanup_dir: Some(root.to_path_buf()),
        };
        let addr = SocketAddr::from((LOCALHOST, port));
        let probe = Arc::new(move |_: &ProbeCtx| probe::postgres_ready(addr, SUPERUSER, DATABASE));
        let managed = Managed::new(spec, probe, Duration::from_secs(30));
        managed.start()?;
        Ok(PostgresServer {
            managed,
            port,
            password,
            tls,
            bin_dir: bin_dir.to_path_buf(),
            _lease: lease,
            dir,
        })
    }

    /// The listening address (`127.0.0.1:port`).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((LOCALHOST, self.port))
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL.
    ///
    /// Plain: `postgres://postgres@127.0.0.1:PORT/postgres`.
    /// Secure: `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres?sslmode=verify-full&sslrootcert=<dir>/ca.pem`
    /// (sqlx and libpq both understand these parameters).
    pub fn url(&self) -> String {
        match (&self.password, &self.tls) {
            (Some(pw), Some(t)) => format!(
                "postgres://{SUPERUSER}:{pw}@127.0.0.1:{}/{DATABASE}?sslmode=verify-full&sslrootcert={}",
                self.port,
                t.ca_cert.display()
            ),
            (Some(pw), None) => {
                format!(
                    "postgres://{SUPERUSER}:{pw}@127.0.0.1:{}/{DATABASE}",
                    self.port
                )
            }
            _ => format!("postgres://{SUPERUSER}@127.0.0.1:{}/{DATABASE}", self.port),
        }
    }

    /// The superuser's name (`postgres`).
    pub fn user(&self) -> &str {
        SUPERUSER
    }

    /// The superuser's password (secure variant only).
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The database name (`postgres`).
    pub fn database(&self) -> &str {
        DATABASE
    }

    /// Certificate paths (secure variant only).
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The PostgreSQL binary folder in use (has `psql`, `pg_isready`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Runs one SQL command with this server's `psql` over TCP and returns its unaligned,
    /// tuples-only output (`psql -XAtq -c SQL`). Handy in tests that must not depend on a
    /// client crate.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut cmd = Command::new(self.bin_dir.join("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-d")
            .arg(self.url())
            .arg("-c")
            .arg(sql);
        run_command(&mut cmd).map(|s| s.trim().to_string())
    }

    /// The server's temporary folder (data in `data/`, socket in `socket/`, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id (= process group id) while running.
    pub fn pid(&self) -> Option<u32> {
        self.managed.pid()
    }

    /// Leaves the server running after this value is dropped and keeps its folder; returns the
    /// process group id and the folder. For `cargo xtask servers up`.
    pub fn detach(self) -> (Option<u32>, PathBuf) {
        let pgid = self.managed.detach();
        let PostgresServer { dir, .. } = self;
        (pgid, dir.keep())
    }
}

/// PostgreSQL's child processes (backends, checkpointer, walwriter, ...)
/// each call `setsid()`, so a signal to the postmaster's process group does
/// not reach them: a "paused" server would go on answering on open
/// connections, and after a kill its orphaned backends would answer for a
/// moment. The fault controls therefore signal every child as well.
impl PostgresServer {
    fn children(&self) -> Vec<u32> {
        self.pid()
            .map(crate::process::children_of)
            .unwrap_or_default()
    }

    fn signal_children(children: &[u32], signal: &str) {
        for pid in children {
            let _ = crate::process::signal_group(*pid, signal);
        }
    }
}

impl Server for PostgresServer {
    fn describe(&self) -> String {
        self.managed.describe()
    }
    fn stop(&self) -> Result<()> {
        let children = self.children();
        self.managed.stop()?;
        Self::signal_children(&children, "KILL");
        Ok(())
    }
    fn restart(&self) -> Result<()> {
        self.stop()?;
        self.managed.restart()
    }
    fn pause(&self) -> Result<()> {
        self.managed.pause()?;
        Self::signal_children(&self.children(), "STOP");
        Ok(())
    }
    fn resume(&self) -> Result<()> {
        Self::signal_children(&self.children(), "CONT");
        self.managed.resume()
    }
    fn is_running(&self) -> bool {
        self.managed.is_running()
    }
    fn log_tail(&self, lines: usize) -> String {
        self.managed.log_tail(lines)
    }
}
