//! Redis servers: plain, several independent masters (for Redlock), TLS + ACL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::binaries::Binary;
use crate::error::Result;
use crate::managed::{Managed, ProbeCtx, Server, retry_on_port_clash};
use crate::probe;
use crate::process::ProcSpec;
use crate::tls::{self, TlsFiles};
use crate::util::{LOCALHOST, PortLease, random_token, reserve_port, temp_dir, write_file};

/// How to start a Redis server. `Default` is a plain server without persistence.
#[derive(Debug, Clone, Default)]
pub struct RedisConfig {
    /// Serve TLS only (`tls-port`, `port 0`) with a fresh CA; clients need not present a
    /// certificate.
    pub tls: bool,
    /// Disable the `default` user and create user [`RedisServer::username`] with a random
    /// password and every permission.
    pub acl: bool,
    /// Extra `redis.conf` lines, e.g. `"maxmemory 10mb"`.
    pub extra_config: Vec<String>,
}

impl RedisConfig {
    /// TLS plus an ACL user: what a production deployment looks like.
    pub fn secure() -> Self {
        RedisConfig {
            tls: true,
            acl: true,
            extra_config: Vec::new(),
        }
    }
}

/// A `redis-server` process on a free loopback port, in its own temporary folder.
///
/// Persistence is off (`save ""`, `appendonly no`): [`Server::restart`] brings back an empty
/// server on the same port, like a Redis that lost its memory. Dropping the value kills the
/// server and removes its folder.
#[derive(Debug)]
pub struct RedisServer {
    managed: Managed,
    port: u16,
    tls: Option<TlsFiles>,
    password: Option<String>,
    _lease: PortLease,
    // Dropped last: the folder is removed after the process is dead.
    dir: tempfile::TempDir,
}

/// The ACL user created when [`RedisConfig::acl`] is set.
const ACL_USER: &str = "distlock";

impl RedisServer {
    /// Starts a plain Redis (no TLS, no password).
    pub fn start() -> Result<Self> {
        Self::start_with(RedisConfig::default())
    }

    /// Starts a Redis with TLS and an ACL user (see [`RedisConfig::secure`]).
    pub fn start_secure() -> Result<Self> {
        Self::start_with(RedisConfig::secure())
    }

    /// Starts `n` independent plain masters (for Redlock tests).
    pub fn start_many(n: usize) -> Result<Vec<Self>> {
        (0..n).map(|_| Self::start()).collect()
    }

    /// Starts a Redis configured by `config`.
    pub fn start_with(config: RedisConfig) -> Result<Self> {
        let binary = Binary::RedisServer.locate()?;
        retry_on_port_clash(|| Self::try_start(&binary, &config))
    }

    fn try_start(binary: &Path, config: &RedisConfig) -> Result<Self> {
        let dir = temp_dir("redis")?;
        let lease = reserve_port()?;
        let port = lease.port();
        let tls = if config.tls {
            Some(tls::generate(dir.path())?)
        } else {
            None
        };
        let password = config.acl.then(|| random_token(24));
        let mut conf = vec![
            "bind 127.0.0.1".to_string(),
            "protected-mode no".to_string(),
            "daemonize no".to_string(),
            "save \"\"".to_string(),
            "appendonly no".to_string(),
            format!("dir {}", dir.path().display()),
            "logfile \"\"".to_string(),
        ];
        match &tls {
            Some(t) => conf.extend([
                "port 0".to_string(),
                format!("tls-port {port}"),
                format!("tls-cert-file {}", t.server_cert.display()),
                format!("tls-key-file {}", t.server_key.display()),
                format!("tls-ca-cert-file {}", t.ca_cert.display()),
                "tls-auth-clients no".to_string(),
            ]),
            None => conf.push(format!("port {port}")),
        }
        if let Some(pw) = &password {
            conf.push("user default off".to_string());
            conf.push(format!("user {ACL_USER} on >{pw} ~* &* +@all"));
        }
        conf.extend(config.extra_config.iter().cloned());
        let conf_path = dir.path().join("redis.conf");
        write_file(&conf_path, conf.join("\n") + "\n")?;

        let spec = ProcSpec {
            name: format!(
                "redis-server on 127.0.0.1:{port} ({})",
                dir.path().display()
            ),
            program: binary.to_path_buf(),
            args: vec![conf_path.display().to_string()],
            env: Vec::new(),
            log: dir.path().join("redis.log"),
            user: None,
            cleanup_dir: Some(dir.path().to_path_buf()),
        };
        let addr = SocketAddr::from((LOCALHOST, port));
        let is_tls = tls.is_some();
        let probe = Arc::new(move |ctx: &ProbeCtx| {
            if is_tls {
                // std has no TLS: the port accepts and the log says the listeners are up.
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && ctx
                        .log_since_start()
                        .contains("Ready to accept connections")
            } else {
                probe::redis_ping(addr)
            }
        });
        let managed = Managed::new(spec, probe, Duration::from_secs(20));
        managed.start()?;
        Ok(RedisServer {
            managed,
            port,
            tls,
            password,
            _lease: lease,
            dir,
        })
    }

    /// The listening address (`127.0.0.1:port`; the TLS port if TLS is on).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((LOCALHOST, self.port))
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL: `redis://127.0.0.1:PORT/`, or with TLS and ACL
    /// `rediss://distlock:PASSWORD@127.0.0.1:PORT/`. The client must trust
    /// [`TlsFiles::ca_cert`] for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(pw) => format!("{scheme}://{ACL_USER}:{pw}@127.0.0.1:{}/", self.port),
            None => format!("{scheme}://127.0.0.1:{}/", self.port),
        }
    }

    /// The ACL user name (`distlock`) if ACL is on.
    pub fn username(&self) -> Option<&str> {
        self.password.as_ref().map(|_| ACL_USER)
    }

    /// The ACL user's password if ACL is on.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Certificate paths if TLS is on.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The server's temporary folder (config, log, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.managed.log_path().to_path_buf()
    }

    /// The process id (= process group id) while running.
    pub fn pid(&self) -> Option<u32> {
        self.managed.pid()
    }

    /// Leaves the server running after this value is dropped and keeps its folder; returns the
    /// process group id and the folder. For `cargo xtask servers up`.
    pub fn detach(self) -> (Option<u32>, PathBuf) {
        let pgid = self.managed.detach();
        let RedisServer { dir, .. } = self;
        (pgid, dir.keep())
    }
}

impl Server for RedisServer {
    fn describe(&self) -> String {
        self.managed.describe()
    }
    fn stop(&self) -> Result<()> {
        self.managed.stop()
    }
    fn restart(&self) -> Result<()> {
        self.managed.restart()
    }
    fn pause(&self) -> Result<()> {
        self.managed.pause()
    }
    fn resume(&self) -> Result<()> {
        self.managed.resume()
    }
    fn is_running(&self) -> bool {
        self.managed.is_running()
    }
    fn log_tail(&self, lines: usize) -> String {
        self.managed.log_tail(lines)
    }
}
