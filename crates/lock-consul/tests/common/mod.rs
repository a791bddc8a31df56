//! Servers and configurations shared by the integration tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use lock_consul::ConsulConfig;
use server_harness::{ConsulConfig as ServerConfig, ConsulServer, TcpProxy};

/// A Consul server with a fault-injecting proxy in front of it.
pub struct Env {
    pub server: ConsulServer,
    pub proxy: TcpProxy,
}

impl Env {
    /// Starts a one-server Consul; `persistent` keeps its Raft data (and so
    /// its index) across restarts.
    // The harness's config is #[non_exhaustive], so no struct literal.
    #[allow(clippy::field_reassign_with_default)]
    pub fn start(persistent: bool) -> Env {
        let mut cfg = ServerConfig::default();
        cfg.persistent = persistent;
        let server =
            ConsulServer::start_with(cfg).expect("start consul (run `cargo xtask install`)");
        let proxy = TcpProxy::start(server.http_addr()).expect("start proxy");
        Env { server, proxy }
    }
}

static SHARED: OnceLock<Env> = OnceLock::new();

/// The test binary's shared `-dev` agent (started on first use).
pub fn shared() -> &'static Env {
    SHARED.get_or_init(|| run_blocking(|| Env::start(false)))
}

/// Runs blocking harness code from inside a test runtime.
pub fn run_blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Test settings: the harness's agents accept 1 s sessions
/// (`session_ttl_min = "1s"`). Sessions of 2 s (locks of 4 s and more) and
/// no lock-delay keep the expiry cases fast; 1 s sessions proved too tight
/// on a loaded 2-core machine (a renewal must land within the TTL).
pub fn config(addr: SocketAddr) -> ConsulConfig {
    config_with_session(addr, Duration::from_secs(2))
}

/// [`config`] with another session TTL.
pub fn config_with_session(addr: SocketAddr, session_ttl: Duration) -> ConsulConfig {
    ConsulConfig::builder()
        .address(addr.to_string())
        .prefix("distlock-test")
        .session_ttl_min(Duration::from_secs(1))
        .session_ttl(session_ttl)
        .lock_delay(Duration::ZERO)
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(2))
        .wait(Duration::from_secs(10))
        .build()
        .expect("valid test config")
}
