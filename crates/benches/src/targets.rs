//! The backends under test, the servers behind them, and each store's raw
//! baseline.

use std::any::Any;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::future::BoxFuture;
use lock_core::{Backend, BoxError, LockClient, memory::MemoryBackend};
use server_harness::{ConsulServer, EtcdServer, PostgresServer, RedisServer};

use crate::raw::consul::RawConsul;
use crate::raw::etcd::RawEtcd;
use crate::raw::postgres::{RawPgAdvisory, RawPgLease};
use crate::raw::redis::{RawRedis, RawRedlock};

/// Opens a new client (own connections) of one backend.
pub type BackendFactory =
    Arc<dyn Fn() -> BoxFuture<'static, lock_core::Result<Arc<dyn Backend>>> + Send + Sync>;

/// One backend configuration under test.
#[derive(Clone)]
pub struct Target {
    /// Name in the report, such as `redis` or `postgres-advisory`.
    pub name: String,
    /// The raw baseline of the same store, if there is one.
    pub raw: Option<Arc<dyn RawLock>>,
    /// The URL a separate process can open the same store with.
    pub url: String,
    factory: BackendFactory,
}

impl Target {
    /// A target named `name` whose clients come from `factory`.
    pub fn new(name: impl Into<String>, url: impl Into<String>, factory: BackendFactory) -> Self {
        Target {
            name: name.into(),
            raw: None,
            url: url.into(),
            factory,
        }
    }

    /// A target for the store at `url`, opened through the `distlock` facade.
    pub fn from_url(name: impl Into<String>, url: impl Into<String>) -> Self {
        let url = url.into();
        let factory = url_factory(url.clone());
        Target::new(name, url, factory)
    }

    /// Sets the raw baseline.
    pub fn with_raw(mut self, raw: Arc<dyn RawLock>) -> Self {
        self.raw = Some(raw);
        self
    }

    /// A new backend client.
    pub async fn backend(&self) -> lock_core::Result<Arc<dyn Backend>> {
        (self.factory)().await
    }

    /// A new lock client.
    pub async fn client(&self) -> lock_core::Result<LockClient> {
        Ok(LockClient::from_arc(self.backend().await?))
    }
}

/// The minimal correct protocol of one store, written with the same client
/// crate as the backend and nothing around it: the floor a backend's cost is
/// compared with.
#[async_trait]
pub trait RawLock: Send + Sync {
    /// The baseline's name in the report, such as `redis-raw`.
    fn name(&self) -> String;
    /// Acquire `key` and release it again; an error if it was not free.
    async fn cycle(&self, key: &str) -> Result<(), BoxError>;
    /// Take `key` and keep it (for measuring a "no").
    async fn hold(&self, key: &str) -> Result<(), BoxError>;
    /// One acquire attempt on a key held by someone else; an error if it
    /// was granted.
    async fn try_held(&self, key: &str) -> Result<(), BoxError>;
}

/// The raw baseline of the in-memory store: a set behind a mutex.
#[derive(Default)]
pub struct RawMemory {
    held: Mutex<HashSet<String>>,
}

#[async_trait]
impl RawLock for RawMemory {
    fn name(&self) -> String {
        "memory-raw".into()
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let mut held = self.held.lock().map_err(|_| "poisoned")?;
        if !held.insert(key.to_owned()) {
            return Err("busy".into());
        }
        held.remove(key);
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        self.held
            .lock()
            .map_err(|_| "poisoned")?
            .insert(key.to_owned());
        Ok(())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        let mut held = self.held.lock().map_err(|_| "poisoned")?;
        if held.insert(key.to_owned()) {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}

/// Every target, with the servers they need kept alive.
pub struct Targets {
    /// The targets, in report order.
    pub list: Vec<Target>,
    _servers: Vec<Box<dyn Any>>,
}

fn url_factory(url: String) -> BackendFactory {
    Arc::new(move || {
        let url = url.clone();
        Box::pin(async move { distlock::backend(&url).await })
    })
}

impl Targets {
    /// Starts the servers and builds every target whose name contains
    /// `filter` (all when `None`).
    pub fn start(rt: &tokio::runtime::Runtime, filter: Option<&str>) -> Result<Targets, BoxError> {
        let wanted = |name: &str| filter.is_none_or(|f| name.contains(f));
        let mut servers: Vec<Box<dyn Any>> = Vec::new();
        let mut list = Vec::new();
        if wanted("memory") {
            let store = MemoryBackend::new();
            let factory: BackendFactory = Arc::new(move || {
                let store = store.clone();
                Box::pin(async move { Ok(Arc::new(store) as Arc<dyn Backend>) })
            });
            list.push(
                Target::new("memory", "memory://", factory)
                    .with_raw(Arc::new(RawMemory::default())),
            );
        }
        if wanted("redis") {
            let server = RedisServer::start()?;
            let url = server.url();
            let raw = rt.block_on(RawRedis::connect(&url))?;
            list.push(Target::from_url("redis", url).with_raw(Arc::new(raw)));
            servers.push(Box::new(server));
        }
        if wanted("redlock") {
            let masters = RedisServer::start_many(3)?;
            let hosts: Vec<String> = masters.iter().map(|m| m.addr().to_string()).collect();
            let url = format!("redlock://{}", hosts.join(","));
            let urls: Vec<String> = masters.iter().map(|m| m.url()).collect();
            let raw = rt.block_on(RawRedlock::connect(&urls))?;
            list.push(Target::from_url("redlock-3", url).with_raw(Arc::new(raw)));
            servers.push(Box::new(masters));
        }
        if wanted("etcd") {
            let server = EtcdServer::start()?;
            let http = server.url();
            let raw = rt.block_on(RawEtcd::connect(&http))?;
            let url = http.replace("http://", "etcd://");
            list.push(Target::from_url("etcd", url).with_raw(Arc::new(raw)));
            servers.push(Box::new(server));
        }
        if wanted("consul") {
            let server = ConsulServer::start()?;
            let http = server.url();
            let raw = rt.block_on(RawConsul::connect(&http))?;
            // The harness's agents accept sessions from 1 s (`session_ttl_min`);
            // 2 s sessions make the shortest lock TTL 4 s instead of 30 s, and
            // no lock-delay, as in the conformance suite.
            let url = format!(
                "{}?session_ttl=2s&session_ttl_min=1s&lock_delay=0s",
                http.replace("http://", "consul://")
            );
            list.push(Target::from_url("consul", url).with_raw(Arc::new(raw)));
            servers.push(Box::new(server));
        }
        if wanted("postgres") {
            let server = PostgresServer::start()?;
            let url = server.url();
            let sep = if url.contains('?') { '&' } else { '?' };
            if wanted("postgres-lease") {
                let raw = rt.block_on(RawPgLease::connect(&url))?;
                list.push(Target::from_url("postgres-lease", url.clone()).with_raw(Arc::new(raw)));
            }
            if wanted("postgres-advisory") {
                let raw = rt.block_on(RawPgAdvisory::connect(&url))?;
                let advisory = format!("{url}{sep}distlock_mode=advisory");
                list.push(Target::from_url("postgres-advisory", advisory).with_raw(Arc::new(raw)));
            }
            servers.push(Box::new(server));
        }
        Ok(Targets {
            list,
            _servers: servers,
        })
    }
}
