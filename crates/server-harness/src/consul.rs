//! Consul 1.8.7: a dev agent, an N-server cluster, and an ACL + TLS agent.
//!
//! # What the test agents assume
//!
//! * `session_ttl_min = "1s"` (Consul's default minimum is 10 s) so tests can use short
//!   session TTLs. Consul still applies its own 2x grace before invalidating a session.
//! * The default session lock-delay stays 15 s: tests must create sessions with
//!   `LockDelay: 0s` themselves if they want an immediate hand-over.
//! * `performance.raft_multiplier = 1` (tight Raft timing, as recommended for production
//!   hardware) so clusters elect a leader quickly.
//! * DNS and gRPC are off (`-dns-port -1`, `-grpc-port -1`); HTTP, serf and server RPC ports
//!   are free loopback ports.
//! * A `-dev` agent keeps its state in memory: after [`Server::restart`] it comes back empty
//!   (on the same port). Use [`ConsulConfig::persistent`] (a one-server `-server
//!   -bootstrap-expect 1` agent with a data folder) or a cluster when state must survive.
//! * The secure agent has ACLs on with `default_policy = "deny"`; its master token (also used
//!   as the agent token) is [`ConsulServer::token`]. It serves HTTPS on [`ConsulServer::url`]
//!   and keeps plain HTTP on [`ConsulServer::http_addr`] for the harness's probes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::binaries::Binary;
use crate::error::{Error, Result};
use crate::managed::{Managed, ProbeCtx, Server, retry_on_port_clash};
use crate::probe;
use crate::process::ProcSpec;
use crate::tls::{self, TlsFiles};
use crate::util::{LOCALHOST, PortLease, reserve_ports, temp_dir, write_file};

/// How to start Consul. `Default`: one `-dev` agent, plain HTTP, no ACLs.
#[derive(Debug, Clone)]
pub struct ConsulConfig {
    /// Number of servers. 1 = a single agent; more = `-server -bootstrap-expect N`.
    pub servers: usize,
    /// For a single agent: a real server with a data folder instead of `-dev`, so state
    /// survives a restart. Clusters always persist.
    pub persistent: bool,
    /// ACLs (default deny, random master token) and HTTPS with a fresh CA.
    pub secure: bool,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            servers: 1,
            persistent: false,
            secure: false,
        }
    }
}

/// One Consul agent (server) of a [`ConsulServer`].
#[derive(Debug)]
pub struct ConsulMember {
    managed: Managed,
    node: String,
    http_port: u16,
    https_port: Option<u16>,
    serf_lan_port: u16,
    server_port: u16,
    _leases: Vec<PortLease>,
}

impl ConsulMember {
    /// The node name (`s0`, `s1`, ...).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The plain-HTTP API address.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((LOCALHOST, self.http_port))
    }

    /// The API URL: `https://127.0.0.1:PORT` when secure, else `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match self.https_port {
            Some(p) => format!("https://127.0.0.1:{p}"),
            None => format!("http://127.0.0.1:{}", self.http_port),
        }
    }

    /// The serf LAN port.
    pub fn serf_lan_port(&self) -> u16 {
        self.serf_lan_port
    }

    /// The server RPC port (what `/v1/status/leader` reports).
    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// The leader as this agent sees it (`127.0.0.1:PORT`), or `None` if there is none.
    pub fn leader_addr(&self) -> Option<String> {
        let r = probe::http_get(self.http_addr(), "/v1/status/leader")?;
        let leader = r.body.trim().trim_matches('"').to_string();
        (r.status == 200 && !leader.is_empty()).then_some(leader)
    }

    /// The process id (= process group id) while running.
    pub fn pid(&self) -> Option<u32> {
        self.managed.pid()
    }
}

impl Server for ConsulMember {
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

/// A Consul agent or cluster in one temporary folder. See the module docs for its settings.
///
/// The [`Server`] methods act on every agent; use [`ConsulServer::member`] for one.
/// Dropping the value kills every agent and removes the folder.
#[derive(Debug)]
pub struct ConsulServer {
    members: Vec<ConsulMember>,
    token: Option<String>,
    tls: Option<TlsFiles>,
    dir: tempfile::TempDir,
}

impl ConsulServer {
    /// Starts a plain `-dev` agent and waits for it to elect itself.
    pub fn start() -> Result<Self> {
        Self::start_with(ConsulConfig::default())
    }

    /// Starts `servers` plain servers that join each other and waits for a leader.
    pub fn start_cluster(servers: usize) -> Result<Self> {
        Self::start_with(ConsulConfig {
            servers,
            ..ConsulConfig::default()
        })
    }

    /// Starts a `-dev` agent with ACLs (default deny) and HTTPS.
    pub fn start_secure() -> Result<Self> {
        Self::start_with(ConsulConfig {
            secure: true,
            ..ConsulConfig::default()
        })
    }

    /// Starts Consul configured by `config`.
    pub fn start_with(config: ConsulConfig) -> Result<Self> {
        if config.servers == 0 {
            return Err(Error::InvalidArgument(
                "a Consul cluster needs at least one server".into(),
            ));
        }
        let binary = Binary::Consul.locate()?;
        retry_on_port_clash(|| Self::try_start(&binary, &config))
    }

    fn try_start(binary: &Path, config: &ConsulConfig) -> Result<Self> {
        let dir = temp_dir("consul")?;
        let tls = if config.secure {
            Some(tls::generate(dir.path())?)
        } else {
            None
        };
        let token = config.secure.then(uuid_like_token);
        let n = config.servers;
        let ports_each = if config.secure { 5 } else { 4 };
        let mut leases = Vec::new();
        for _ in 0..n {
            leases.push(reserve_ports(ports_each)?);
        }
        let serf_ports: Vec<u16> = leases.iter().map(|l| l[1].port()).collect();
        let mut members = Vec::new();
        for (i, l) in leases.into_iter().enumerate() {
            let node = format!("s{i}");
            let http_port = l[0].port();
            let serf_lan_port = l[1].port();
            let serf_wan_port = l[2].port();
            let server_port = l[3].port();
            let https_port = config.secure.then(|| l[4].port());

            let mut conf = serde_json::json!({
                "session_ttl_min": "1s",
                "disable_update_check": true,
                "performance": { "raft_multiplier": 1 },
                "log_level": "INFO",
            });
            if let (Some(t), Some(tok), Some(https)) = (&tls, &token, https_port) {
                conf["acl"] = serde_json::json!({
                    "enabled": true,
                    "default_policy": "deny",
                    "down_policy": "extend-cache",
                    "tokens": { "master": tok, "agent": tok },
                });
                conf["primary_datacenter"] = serde_json::json!("dc1");
                conf["ports"] = serde_json::json!({ "https": https });
                conf["cert_file"] = serde_json::json!(t.server_cert.display().to_string());
                conf["key_file"] = serde_json::json!(t.server_key.display().to_string());
                conf["ca_file"] = serde_json::json!(t.ca_cert.display().to_string());
                conf["verify_incoming"] = serde_json::json!(false);
                conf["verify_outgoing"] = serde_json::json!(false);
            }
            let conf_path = dir.path().join(format!("{node}.json"));
            write_file(&conf_path, conf.to_string())?;
            let data_dir = dir.path().join(&node);
            let mut args = vec![
                "agent".to_string(),
                format!("-node={node}"),
                "-bind=127.0.0.1".to_string(),
                "-client=127.0.0.1".to_string(),
                format!("-http-port={http_port}"),
                "-dns-port=-1".to_string(),
                "-grpc-port=-1".to_string(),
                format!("-serf-lan-port={serf_lan_port}"),
                format!("-serf-wan-port={serf_wan_port}"),
                format!("-server-port={server_port}"),
                format!("-config-file={}", conf_path.display()),
            ];
            if n == 1 && !config.persistent {
                args.push("-dev".to_string());
            } else {
                args.extend([
                    "-server".to_string(),
                    format!("-bootstrap-expect={n}"),
                    format!("-data-dir={}", data_dir.display()),
                ]);
                for (j, p) in serf_ports.iter().enumerate() {
                    if j != i {
                        args.push(format!("-retry-join=127.0.0.1:{p}"));
                    }
                }
                if n > 1 {
                    args.push("-retry-interval=1s".to_string());
                }
            }
            let spec = ProcSpec {
                name: format!(
                    "consul agent {node} on 127.0.0.1:{http_port} ({})",
                    dir.path().display()
                ),
                program: binary.to_path_buf(),
                args,
                env: Vec::new(),
                log: dir.path().join(format!("{node}.log")),
                user: None,
                cleanup_dir: Some(dir.path().to_path_buf()),
            };
            let http = SocketAddr::from((LOCALHOST, http_port));
            let probe_token = token.clone();
            let probe_node = node.clone();
            let probe = Arc::new(move |_: &ProbeCtx| {
                consul_ready(http, &probe_node, probe_token.as_deref())
            });
            members.push(ConsulMember {
                managed: Managed::new(spec, probe, Duration::from_secs(45)),
                node,
                http_port,
                https_port,
                serf_lan_port,
                server_port,
                _leases: l,
            });
        }
        let ctxs: Vec<ProbeCtx> = members.iter().map(|m| m.managed.probe_ctx()).collect();
        for m in &members {
            m.managed.spawn()?;
        }
        for (m, ctx) in members.iter().zip(&ctxs) {
            m.managed.wait_ready_from(ctx)?;
        }
        Ok(ConsulServer {
            members,
            token,
            tls,
            dir,
        })
    }

    /// The agents, in order `s0`, `s1`, ...
    pub fn members(&self) -> &[ConsulMember] {
        &self.members
    }

    /// Agent `i`. Errors if out of range.
    pub fn member(&self, i: usize) -> Result<&ConsulMember> {
        self.members.get(i).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "Consul server {i} does not exist ({} servers)",
                self.members.len()
            ))
        })
    }

    /// The first agent's API URL (`http://127.0.0.1:PORT`, or `https://` when secure).
    pub fn url(&self) -> String {
        self.members[0].url()
    }

    /// The first agent's plain-HTTP address (also open on the secure agent).
    pub fn http_addr(&self) -> SocketAddr {
        self.members[0].http_addr()
    }

    /// Every agent's API URL.
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(ConsulMember::url).collect()
    }

    /// The ACL master token (secure agent only). Send it as `X-Consul-Token`.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Certificate paths (secure agent only).
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The index of the current leader, waiting up to `timeout` for one to be elected.
    pub fn leader(&self, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            for m in self.members.iter().filter(|m| m.managed.is_running()) {
                if let Some(addr) = m.leader_addr()
                    && let Some(i) = self
                        .members
                        .iter()
                        .position(|x| addr == format!("127.0.0.1:{}", x.server_port))
                    && self.members[i].managed.is_running()
                {
                    return Ok(i);
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Protocol {
                    server: format!("consul ({})", self.dir.path().display()),
                    detail: format!("no leader within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The cluster's temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves every agent running after this value is dropped and keeps the folder; returns
    /// the process group ids and the folder. For `cargo xtask servers up`.
    pub fn detach(self) -> (Vec<u32>, PathBuf) {
        let pgids = self
            .members
            .iter()
            .filter_map(|m| m.managed.detach())
            .collect();
        let ConsulServer { dir, .. } = self;
        (pgids, dir.keep())
    }
}

/// A token in Consul's UUID format, from the harness's random source.
fn uuid_like_token() -> String {
    let hex: String = (0..2)
        .map(|_| format!("{:016x}", crate::util::random_u64()))
        .collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// Ready = a leader is known, and this agent's node is registered with a passing
/// `serfHealth` check (before that, creating a session fails with "Missing node
/// registration"). With ACLs, the master token must already resolve for that query.
fn consul_ready(http: SocketAddr, node: &str, token: Option<&str>) -> bool {
    let Some(r) = probe::http_get(http, "/v1/status/leader") else {
        return false;
    };
    let leader = r.body.trim().trim_matches('"');
    if r.status != 200 || leader.is_empty() {
        return false;
    }
    let headers: Vec<(&str, &str)> = token.map(|t| ("X-Consul-Token", t)).into_iter().collect();
    probe::http_request(
        http,
        "GET",
        &format!("/v1/health/node/{node}"),
        &headers,
        None,
        Duration::from_millis(500),
    )
    .ok()
    .and_then(|r| {
        let checks: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        let ok = r.status == 200
            && checks
                .as_array()?
                .iter()
                .any(|c| c["CheckID"] == "serfHealth" && c["Status"] == "passing");
        Some(ok)
    })
    .unwrap_or(false)
}

impl Server for ConsulServer {
    fn describe(&self) -> String {
        format!(
            "consul ({} servers, {})",
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
            .map(|m| format!("== {} ==\n{}", m.node, m.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_looks_like_a_uuid() {
        let t = super::uuid_like_token();
        let parts: Vec<usize> = t.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{t}");
    }
}
