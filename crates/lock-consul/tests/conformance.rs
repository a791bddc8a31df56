//! The shared conformance suite against a real Consul agent started by the
//! harness. Fault cases (restart, pause, cut) each get their own persistent
//! server behind a proxy (started when the case asks for fault control), so
//! they disturb no other case.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::{Env, config, config_with_session, run_blocking, shared};
use conformance::{Factory, Faults};
use lock_consul::ConsulBackend;
use lock_core::{Backend, Result};
use server_harness::Server;

struct ConsulFactory {
    own: OnceLock<Arc<Env>>,
}

#[lock_core::async_trait]
impl Factory for ConsulFactory {
    async fn backend(&self) -> Result<Arc<dyn Backend>> {
        let cfg = match self.own.get() {
            // Fault cases: sessions of 4 s outlast a server restart (1-2 s),
            // so leases survive it as the capabilities declare.
            Some(env) => config_with_session(env.proxy.addr(), Duration::from_secs(4)),
            None => config(shared().proxy.addr()),
        };
        Ok(Arc::new(ConsulBackend::connect(cfg).await?))
    }

    fn faults(&self) -> Option<Arc<dyn Faults>> {
        let env = self
            .own
            .get_or_init(|| Arc::new(run_blocking(|| Env::start(true))));
        Some(Arc::new(EnvFaults(Arc::clone(env))))
    }
}

struct EnvFaults(Arc<Env>);

impl EnvFaults {
    async fn blocking(
        &self,
        f: impl FnOnce(&Env) -> server_harness::Result<()> + Send + 'static,
    ) -> std::result::Result<(), String> {
        let env = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&env))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

#[lock_core::async_trait]
impl Faults for EnvFaults {
    async fn restart(&self) -> std::result::Result<(), String> {
        let start = std::time::Instant::now();
        let r = self.blocking(|e| e.server.restart()).await;
        eprintln!("consul restart took {:?}", start.elapsed());
        r
    }
    async fn pause(&self) -> std::result::Result<(), String> {
        self.blocking(|e| e.server.pause()).await
    }
    async fn resume(&self) -> std::result::Result<(), String> {
        self.blocking(|e| e.server.resume()).await
    }
    async fn cut_connections(&self) -> std::result::Result<(), String> {
        self.0.proxy.cut();
        Ok(())
    }
}

async fn factory() -> ConsulFactory {
    ConsulFactory {
        own: OnceLock::new(),
    }
}

conformance::suite!(factory);
