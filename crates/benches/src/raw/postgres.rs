//! PostgreSQL: the statements of the backend's two modes, on their own
//! table and sequence.
//!
//! Lease mode: one `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired
//! RETURNING fencing` with the token from a sequence, and a release
//! conditional on the owner that notifies waiters in the same statement.
//! Advisory mode: `pg_try_advisory_lock` with `nextval` for the token, and
//! `pg_advisory_unlock`, on one dedicated connection.

use async_trait::async_trait;
use lock_core::BoxError;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use tokio::sync::Mutex;

use crate::targets::RawLock;

const SETUP: [&str; 2] = [
    "CREATE SEQUENCE IF NOT EXISTS distlock_raw_fencing",
    "CREATE TABLE IF NOT EXISTS distlock_raw_leases (key text PRIMARY KEY, owner text NOT NULL, \
     fencing bigint NOT NULL, expires_at timestamptz NOT NULL)",
];

const ACQUIRE: &str = "INSERT INTO distlock_raw_leases AS l (key, owner, fencing, expires_at) \
     VALUES ($1, $2, nextval('distlock_raw_fencing'), clock_timestamp() + interval '30 seconds') \
     ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, fencing = EXCLUDED.fencing, \
     expires_at = EXCLUDED.expires_at WHERE l.expires_at <= clock_timestamp() RETURNING fencing";

const RELEASE: &str = "WITH r AS (UPDATE distlock_raw_leases SET expires_at = '-infinity' \
     WHERE key = $1 AND owner = $2 AND expires_at > clock_timestamp() RETURNING key) \
     SELECT pg_notify('distlock_raw', key) FROM r";

/// The raw lease-table baseline.
pub struct RawPgLease {
    pool: PgPool,
}

impl RawPgLease {
    /// Connects to `url` and creates the table.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
        for sql in SETUP {
            sqlx::query(sql).execute(&pool).await?;
        }
        Ok(RawPgLease { pool })
    }

    async fn acquire(&self, key: &str, owner: &str) -> Result<bool, BoxError> {
        let row = sqlx::query(ACQUIRE)
            .bind(key)
            .bind(owner)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }
}

#[async_trait]
impl RawLock for RawPgLease {
    fn name(&self) -> String {
        "postgres-lease-raw".into()
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let owner = super::token();
        if !self.acquire(key, &owner).await? {
            return Err("busy".into());
        }
        let released = sqlx::query(RELEASE)
            .bind(key)
            .bind(&owner)
            .fetch_optional(&self.pool)
            .await?;
        if released.is_none() {
            return Err("release found another owner".into());
        }
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        self.acquire(key, &super::token()).await.map(|_| ())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        if self.acquire(key, &super::token()).await? {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}

/// The raw advisory-lock baseline: one connection for cycles, one holding.
pub struct RawPgAdvisory {
    conn: Mutex<PgConnection>,
    holder: Mutex<PgConnection>,
}

impl RawPgAdvisory {
    /// Connects twice to `url`.
    pub async fn connect(url: &str) -> Result<Self, BoxError> {
        let conn = PgConnection::connect(url).await?;
        let mut holder = PgConnection::connect(url).await?;
        sqlx::query(SETUP[0]).execute(&mut holder).await?;
        Ok(RawPgAdvisory {
            conn: Mutex::new(conn),
            holder: Mutex::new(holder),
        })
    }
}

fn lock_id(key: &str) -> i64 {
    // FNV-1a, 64 bits, as a stand-in for the backend's key hash.
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

const TRY: &str =
    "SELECT CASE WHEN pg_try_advisory_lock($1) THEN nextval('distlock_raw_fencing') END";

#[async_trait]
impl RawLock for RawPgAdvisory {
    fn name(&self) -> String {
        "postgres-advisory-raw".into()
    }
    async fn cycle(&self, key: &str) -> Result<(), BoxError> {
        let id = lock_id(key);
        let mut conn = self.conn.lock().await;
        let token: Option<i64> = sqlx::query(TRY)
            .bind(id)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        if token.is_none() {
            return Err("busy".into());
        }
        let unlocked: bool = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        if !unlocked {
            return Err("unlock found no lock".into());
        }
        Ok(())
    }
    async fn hold(&self, key: &str) -> Result<(), BoxError> {
        let mut holder = self.holder.lock().await;
        sqlx::query(TRY)
            .bind(lock_id(key))
            .fetch_one(&mut *holder)
            .await?;
        Ok(())
    }
    async fn try_held(&self, key: &str) -> Result<(), BoxError> {
        let mut conn = self.conn.lock().await;
        let token: Option<i64> = sqlx::query(TRY)
            .bind(lock_id(key))
            .fetch_one(&mut *conn)
            .await?
            .try_get(0)?;
        if token.is_some() {
            return Err("a held key was granted".into());
        }
        Ok(())
    }
}
