//! Redis: `SET key token NX PX ttl` and a compare-and-delete script.

use async_trait::async_trait;
use lock_core::BoxError;
use redis::aio::ConnectionManager;

use crate::targets::RawLock;

const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// The raw Redis baseline.
pub struct RawRedis {
    conn: ConnectionManager,
    release: redis::Script,
}

impl RawRedis {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        Ok(RawRedis {
            conn: ConnectionManager::new(client).await?,
            release: redis::Script::new(RELEASE),
        })
    }

    async fn set_nx(&self, key: &str, token: &str) -> Result<bool, BoxError> {
        let mut conn = self.conn.clone();
        let ok: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut conn)
            .await?;
        Ok(ok.is_some())
    }
}

#[async_trait]
impl RawLock for RawRedis {
    fn name(&self) -> String {
        "redis-raw".into()
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let token = super::token();
        if !self.set_nx(key, &token).await? {
            return Err("busy".into());
        }
        let mut conn = self.conn.clone();
        let deleted: i64 = self
            .release
            .key(key)
            .arg(&token)
            .invoke_async(&mut conn)
            .await?;
        if deleted != 1 {
            return Err("release found another owner".into());
        }
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        self.set_nx(key, &super::token()).await.map(|_| ())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        if self.set_nx(key, &super::token()).await? {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}

/// The raw Redlock baseline: `SET NX PX` on every master in parallel, a
/// majority wins, then compare-and-delete on every master.
pub struct RawRedlock {
    masters: Vec<RawRedis>,
}

impl RawRedlock {
    /// Connects to every master.
    pub async fn connect(urls: &[String]) -> Result<Self, BoxError> {
        let mut masters = Vec::new();
        for url in urls {
            masters.push(RawRedis::connect(url).await?);
        }
        Ok(RawRedlock { masters })
    }

    async fn acquire(&self, key: &str, token: &str) -> Result<usize, BoxError> {
        let votes =
            futures::future::join_all(self.masters.iter().map(|m| m.set_nx(key, token))).await;
        Ok(votes.into_iter().filter(|v| matches!(v, Ok(true))).count())
    }

    fn quorum(&self) -> usize {
        self.masters.len() / 2 + 1
    }
}

#[async_trait]
impl RawLock for RawRedlock {
    fn name(&self) -> String {
        format!("redlock-{}-raw", self.masters.len())
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let token = super::token();
        if self.acquire(key, &token).await? < self.quorum() {
            return Err("no quorum".into());
        }
        let released = futures::future::join_all(self.masters.iter().map(|m| async {
            let mut conn = m.conn.clone();
            let n: Result<i64, _> = m.release.key(key).arg(&token).invoke_async(&mut conn).await;
            n
        }))
        .await;
        if released.into_iter().filter(|r| matches!(r, Ok(1))).count() < self.quorum() {
            return Err("release found another owner".into());
        }
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        self.acquire(key, &super::token()).await.map(|_| ())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        if self.acquire(key, &super::token()).await? >= self.quorum() {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}
