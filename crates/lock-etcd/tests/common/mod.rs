//! Servers and factories shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use conformance::{Factory, Faults};
use lock_core::{Backend, async_trait};
use lock_etcd::{EtcdBackend, EtcdConfig};
use server_harness::{EtcdServer, Server, TcpProxy};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One etcd server behind a TCP proxy (so connections can be cut), owned
/// by one test: fault cases restart or freeze it without disturbing others.
#[derive(Clone)]
pub struct Etcd {
    pub server: Arc<EtcdServer>,
    pub proxy: Arc<TcpProxy>,
}

impl Etcd {
    /// Starts a fresh single-member server (about a second).
    pub async fn start() -> Self {
        init_tracing();
        tokio::task::spawn_blocking(|| {
            let server = EtcdServer::start().expect("start etcd (run `cargo xtask install`)");
            let proxy = TcpProxy::start(server.members()[0].client_addr()).expect("start proxy");
            Etcd {
                server: Arc::new(server),
                proxy: Arc::new(proxy),
            }
        })
        .await
        .expect("start etcd")
    }

    /// The config of a client going through the proxy.
    pub fn config(&self) -> EtcdConfig {
        EtcdConfig::builder()
            .endpoint(self.proxy.addr().to_string())
            .connect_timeout(Duration::from_secs(3))
            .request_timeout(Duration::from_secs(3))
            .build()
            .expect("config")
    }

    async fn blocking(
        &self,
        op: fn(&EtcdServer) -> server_harness::Result<()>,
    ) -> Result<(), String> {
        let server = Arc::clone(&self.server);
        tokio::task::spawn_blocking(move || op(&server).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }
}

#[async_trait]
impl Factory for Etcd {
    async fn backend(&self) -> lock_core::Result<Arc<dyn Backend>> {
        Ok(Arc::new(EtcdBackend::connect(self.config()).await?))
    }

    fn faults(&self) -> Option<Arc<dyn Faults>> {
        Some(Arc::new(self.clone()))
    }
}

#[async_trait]
impl Faults for Etcd {
    async fn restart(&self) -> Result<(), String> {
        self.blocking(|s| s.restart()).await
    }

    async fn pause(&self) -> Result<(), String> {
        self.blocking(|s| s.pause()).await
    }

    async fn resume(&self) -> Result<(), String> {
        self.blocking(|s| s.resume()).await
    }

    async fn cut_connections(&self) -> Result<(), String> {
        self.proxy.cut();
        Ok(())
    }
}
