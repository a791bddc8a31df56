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
