//! etcd 3.5: a single member or an N-member cluster, optionally TLS + user/password.
//!
//! Every member also listens on a plain-HTTP metrics port, which the harness uses to probe
//! `/health` and to find the leader (`etcd_server_is_leader 1` in `/metrics`) without a TLS
//! client or auth token. Peers talk plain HTTP to each other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::binaries::Binary;
use crate::error::{Error, Result};
use crate::managed::{Managed, ProbeCtx, Server, retry_on_port_clash};
use crate::probe;
use crate::process::{ProcSpec, run_command};
use crate::tls::{self, TlsFiles};
use crate::util::{LOCALHOST, PortLease, random_token, reserve_ports, temp_dir};

/// How to start etcd. `Default`: one member, plain HTTP, no auth.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Number of members (1 or more; 3 for a real quorum).
    pub members: usize,
    /// Serve clients over TLS (fresh CA) and enable auth with user `root` and a random
    /// password.
    pub secure: bool,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            members: 1,
            secure: false,
        }
    }
}

/// One etcd member: its ports and its own fault controls.
#[derive(Debug)]
pub struct EtcdMember {
    managed: Managed,
    name: String,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    scheme: &'static str,
    data_dir: PathBuf,
    _leases: Vec<PortLease>,
}

impl EtcdMember {
    /// The member's name (`m0`, `m1`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its client URL, `http://127.0.0.1:PORT` or `https://...` when secure.
    pub fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }

    /// Its client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((LOCALHOST, self.client_port))
    }

    /// Its peer URL (plain HTTP).
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Its plain-HTTP metrics address (serves `/health` and `/metrics`, never TLS).
    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from((LOCALHOST, self.metrics_port))
    }

    /// Its data folder.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this member currently believes it is the leader (from `/metrics`).
    pub fn is_leader(&self) -> bool {
        probe::http_get(self.metrics_addr(), "/metrics")
            .map(|r| {
                r.body
                    .lines()
                    .any(|l| l.trim() == "etcd_server_is_leader 1")
            })
            .unwrap_or(false)
    }

    /// The process id (= process group id) while running.
    pub fn pid(&self) -> Option<u32> {
        self.managed.pid()
    }
}

impl Server for EtcdMember {
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

/// An etcd 3.5 cluster (one member by default) in one temporary folder.
///
/// Data survives [`Server::restart`] (same data folders and ports): keys and leases are kept.
/// The [`Server`] methods act on every member; use [`EtcdServer::member`] for one.
/// Dropping the value kills every member and removes the folder.
#[derive(Debug)]
pub struct EtcdServer {
    members: Vec<EtcdMember>,
    tls: Option<TlsFiles>,
    password: Option<String>,
    etcdctl: PathBuf,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts a single plain member.
    pub fn start() -> Result<Self> {
        Self::start_with(EtcdConfig::default())
    }

    /// Starts a plain cluster of `members` members and waits until it has a leader.
    pub fn start_cluster(members: usize) -> Result<Self> {
        Self::start_with(EtcdConfig {
            members,
            secure: false,
        })
    }

    /// Starts a single member with TLS and auth (user `root`, random password).
    pub fn start_secure() -> Result<Self> {
        Self::start_with(EtcdConfig {
            members: 1,
            secure: true,
        })
    }

    /// Starts etcd configured by `config`.
    pub fn start_with(config: EtcdConfig) -> Result<Self> {
        if config.members == 0 {
            return Err(Error::InvalidArgument(
                "an etcd cluster needs at least one member".into(),
            ));
        }
        let etcd = Binary::Etcd.locate()?;
        let etcdctl = if config.secure {
            Binary::Etcdctl.locate()?
        } else {
            // Only needed for interop tests; fall back to a plausible path for the accessor.
            Binary::Etcdctl
                .locate()
                .unwrap_or_else(|_| etcd.with_file_name("etcdctl"))
        };
        retry_on_port_clash(|| Self::try_start(&etcd, &etcdctl, &config))
    }

    fn try_start(etcd: &Path, etcdctl: &Path, config: &EtcdConfig) -> Result<Self> {
        let dir = temp_dir("etcd")?;
        let tls = if config.secure {
            Some(tls::generate(dir.path())?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut leases = Vec::new();
        for _ in 0..config.members {
            leases.push(reserve_ports(3)?);
        }
        let initial_cluster = leases
            .iter()
            .enumerate()
            .map(|(i, l)| format!("m{i}=http://127.0.0.1:{}", l[1].port()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("distlock-{}", random_token(8));
        let mut members = Vec::new();
        for (i, l) in leases.into_iter().enumerate() {
            let (client_port, peer_port, metrics_port) = (l[0].port(), l[1].port(), l[2].port());
            let name = format!("m{i}");
            let data_dir = dir.path().join(&name);
            let client_url = format!("{scheme}://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let mut args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data_dir.display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".to_string(),
                format!("--initial-cluster-token={token}"),
                "--logger=zap".to_string(),
                "--log-outputs=stderr".to_string(),
            ];
            if let Some(t) = &tls {
                args.extend([
                    format!("--cert-file={}", t.server_cert.display()),
                    format!("--key-file={}", t.server_key.display()),
                ]);
            }
            let spec = ProcSpec {
                name: format!(
                    "etcd member {name} on 127.0.0.1:{client_port} ({})",
                    dir.path().display()
                ),
                program: etcd.to_path_buf(),
                args,
                env: Vec::new(),
                log: dir.path().join(format!("{name}.log")),
                user: None,
                cleanup_dir: Some(dir.path().to_path_buf()),
            };
            let metrics = SocketAddr::from((LOCALHOST, metrics_port));
            let probe = Arc::new(move |_: &ProbeCtx| {
                probe::http_get(metrics, "/health")
                    .map(|r| r.status == 200 && r.body.contains("\"health\":\"true\""))
                    .unwrap_or(false)
            });
            members.push(EtcdMember {
                managed: Managed::new(spec, probe, Duration::from_secs(30)),
                name,
                client_port,
                peer_port,
                metrics_port,
                scheme,
                data_dir,
                _leases: l,
            });
        }
        // Members of a new cluster wait for each other: spawn all, then wait for each.
        let ctxs: Vec<ProbeCtx> = members.iter().map(|m| m.managed.probe_ctx()).collect();
        for m in &members {
            m.managed.spawn()?;
        }
        for (m, ctx) in members.iter().zip(&ctxs) {
            m.managed.wait_ready_from(ctx)?;
        }
        let mut server = EtcdServer {
            members,
            tls,
            password: None,
            etcdctl: etcdctl.to_path_buf(),
            dir,
        };
        if config.secure {
            let password = random_token(24);
            server.etcdctl_run(&["user", "add", "root", "--new-user-password", &password])?;
            server.etcdctl_run(&["user", "grant-role", "root", "root"])?;
            server.etcdctl_run(&["auth", "enable"])?;
            server.password = Some(password);
        }
        Ok(server)
    }

    fn etcdctl_run(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.etcdctl_command();
        cmd.args(args);
        run_command(&mut cmd)
    }

    /// The members, in order `m0`, `m1`, ...
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// Member `i`. Errors if out of range.
    pub fn member(&self, i: usize) -> Result<&EtcdMember> {
        self.members.get(i).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "etcd member {i} does not exist ({} members)",
                self.members.len()
            ))
        })
    }

    /// The first member's client URL (`http://127.0.0.1:PORT`, or `https://` when secure).
    pub fn url(&self) -> String {
        self.members[0].client_url()
    }

    /// Every member's client URL, for clients that take a list of endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::client_url).collect()
    }

    /// The index of the current leader, waiting up to `timeout` for one to be elected.
    pub fn leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .members
                .iter()
                .position(|m| m.managed.is_running() && m.is_leader())
            {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                return Err(Error::Protocol {
                    server: format!("etcd ({})", self.dir.path().display()),
                    detail: format!("no leader within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `("root", password)` when secure.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.password.as_deref().map(|p| ("root", p))
    }

    /// Certificate paths when secure.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The `etcdctl` binary (3.5) for interop tests.
    pub fn etcdctl(&self) -> &Path {
        &self.etcdctl
    }

    /// An `etcdctl` command with `--endpoints` set to every member, plus `--cacert` and
    /// `--user` when secure. Add the subcommand and run it.
    pub fn etcdctl_command(&self) -> Command {
        let mut cmd = Command::new(&self.etcdctl);
        cmd.arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg("--command-timeout=10s");
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca_cert.display()));
        }
        if let Some((u, p)) = self.credentials() {
            cmd.arg(format!("--user={u}:{p}"));
        }
        cmd
    }

    /// The cluster's temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves every member running after this value is dropped and keeps the folder; returns
    /// the process group ids and the folder. For `cargo xtask servers up`.
    pub fn detach(self) -> (Vec<u32>, PathBuf) {
        let pgids = self
            .members
            .iter()
            .filter_map(|m| m.managed.detach())
            .collect();
        let EtcdServer { dir, .. } = self;
        (pgids, dir.keep())
    }
}

impl Server for EtcdServer {
    fn describe(&self) -> String {
        format!(
            "etcd ({} members, {})",
            self.members.len(),
            self.dir.path().display()
        )
    }
    fn stop(&self) -> Result<()> {
        self.members.iter().try_for_each(Server::stop)
    }
    fn restart(&self) -> Result<()> {
        self.stop()?;
        let ctxs: Vec<ProbeCtx> = self.members.iter().map(|m| m.managed.probe_ctx()).collect();
        for m in &self.members {
            m.managed.spawn()?;
        }
        for (m, ctx) in self.members.iter().zip(&ctxs) {
            m.managed.wait_ready_from(ctx)?;
        }
        Ok(())
    }
    fn pause(&self) -> Result<()> {
        self.members.iter().try_for_each(Server::pause)
    }
    fn resume(&self) -> Result<()> {
        self.members.iter().try_for_each(Server::resume)
    }
    fn is_running(&self) -> bool {
        self.members.iter().all(Server::is_running)
    }
    fn log_tail(&self, lines: usize) -> String {
        self.members
            .iter()
            .map(|m| format!("== {} ==\n{}", m.name, m.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
