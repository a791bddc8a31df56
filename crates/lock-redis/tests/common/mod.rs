//! Servers and factories shared by the integration tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use conformance::{Factory, Faults};
use lock_core::{Backend, async_trait};
use lock_redis::{NodeAddr, RedisBackend, RedisConfig};
use server_harness::{RedisServer, Server};

/// A config naming `servers` (one: single mode; more: Redlock).
pub fn config_for(servers: &[RedisServer]) -> RedisConfig {
    let nodes: Vec<NodeAddr> = servers
        .iter()
        .map(|s| NodeAddr::new("127.0.0.1", s.port()))
        .collect();
    match nodes.as_slice() {
        [one] => RedisConfig::single(one.host.clone(), one.port),
        _ => RedisConfig::redlock(nodes),
    }
}

/// Redis servers of one test, with fault control over all of them at once.
pub struct Servers(pub Arc<Vec<RedisServer>>);

impl Servers {
    /// `n` fresh servers without persistence.
    pub fn start(n: usize) -> Self {
        Servers(Arc::new(
            RedisServer::start_many(n).expect("start redis-server"),
        ))
    }

    pub fn config(&self) -> RedisConfig {
        config_for(&self.0)
    }

    async fn each(&self, op: fn(&RedisServer) -> Result<(), String>) -> Result<(), String> {
        let servers = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || {
            for s in servers.iter() {
                op(s)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[async_trait]
impl Factory for Servers {
    async fn backend(&self) -> lock_core::Result<Arc<dyn Backend>> {
        Ok(Arc::new(RedisBackend::connect(self.config()).await?))
    }

    fn faults(&self) -> Option<Arc<dyn Faults>> {
        Some(Arc::new(Servers(Arc::clone(&self.0))))
    }
}

#[async_trait]
impl Faults for Servers {
    async fn restart(&self) -> Result<(), String> {
        self.each(|s| s.restart().map_err(|e| e.to_string())).await
    }

    async fn pause(&self) -> Result<(), String> {
        self.each(|s| s.pause().map_err(|e| e.to_string())).await
    }

    async fn resume(&self) -> Result<(), String> {
        self.each(|s| s.resume().map_err(|e| e.to_string())).await
    }

    /// `CLIENT KILL` of every command and pub/sub connection (the admin
    /// connection itself is spared by the server's default `SKIPME yes`).
    async fn cut_connections(&self) -> Result<(), String> {
        self.each(|s| {
            let kill = || -> redis::RedisResult<()> {
                let mut con = redis::Client::open(s.url())?.get_connection()?;
                for kind in ["normal", "pubsub"] {
                    redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg(kind)
                        .query::<i64>(&mut con)?;
                }
                Ok(())
            };
            kill().map_err(|e| e.to_string())
        })
        .await
    }
}
