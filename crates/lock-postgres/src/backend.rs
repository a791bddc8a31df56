//! [`PostgresBackend`]: connection set-up, schema, and the dispatch to the
//! two modes.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{
    AcquireRequest, Attempt, Backend, CancellationToken, Capabilities, Fencing, Key, Lease,
    LockInfo, Result, Subscription, Support, WakeHub, async_trait,
};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::BACKEND;
use crate::advisory::Advisory;
use crate::config::{Mode, PostgresConfig};
use crate::error::{is_connection_error, pg_error, timed_out};
use crate::listener::Listener;

/// A distlock backend on PostgreSQL, in [lease](Mode::Lease) or
/// [advisory](Mode::Advisory) mode.
///
/// Cheap to clone; clones share the pools, the listener and the wake-up hub
/// (like one process). [`PostgresBackend::connect`] again for an independent
/// client.
#[derive(Clone)]
pub struct PostgresBackend {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: PostgresConfig,
    pub(crate) caps: Capabilities,
    pub(crate) pool: PgPool,
    pub(crate) sql: Sql,
    pub(crate) hub: Arc<WakeHub>,
    /// The shared `LISTEN` connection (lease mode), started on first wait.
    pub(crate) listener: Mutex<Option<Listener>>,
    pub(crate) advisory: Option<Advisory>,
    /// Stops the background tasks when the last clone is dropped.
    pub(crate) shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The statements, built once from the configured table name (which
/// [`TableName`](crate::TableName) restricts to plain identifiers, so
/// pasting it into SQL is safe).
pub(crate) struct Sql {
    pub(crate) channel: String,
    pub(crate) acquire: Arc<str>,
    pub(crate) extend: Arc<str>,
    pub(crate) extend_batch: Arc<str>,
    pub(crate) release: Arc<str>,
    pub(crate) release_retry: Arc<str>,
    pub(crate) inspect: Arc<str>,
    pub(crate) fence: Arc<str>,
}

impl Sql {
    fn new(config: &PostgresConfig) -> Self {
        let t = config.table.qualified();
        let s = config.table.sequence();
        let f = config.table.fences();
        // Remaining lease time in microseconds; released rows hold
        // '-infinity', which cannot be subtracted.
        let left = "CASE WHEN expires_at <= clock_timestamp() THEN 0::int8 \
                    ELSE (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000000)::int8 END";
        Sql {
            channel: channel_name(&t),
            // One statement: insert, or take over a row whose lease ran out
            // (by the database clock). `l.fencing < EXCLUDED.fencing` keeps
            // tokens strictly increasing per key even if a statement that
            // drew an older sequence value reaches the row late. The same
            // owner may take its own row again: a retry after a lost answer
            // then succeeds (with a fresh token) instead of waiting out its
            // own lease. When not granted, the second branch reports the
            // holder's remaining time from the same round trip.
            acquire: format!(
                "WITH granted AS ( \
                   INSERT INTO {t} AS l (key, owner, fencing, expires_at) \
                   VALUES ($1, $2, nextval('{s}'), clock_timestamp() + $3::int8 * interval '1 microsecond') \
                   ON CONFLICT (key) DO UPDATE \
                     SET owner = EXCLUDED.owner, fencing = EXCLUDED.fencing, expires_at = EXCLUDED.expires_at \
                     WHERE (l.expires_at <= clock_timestamp() OR l.owner = EXCLUDED.owner) \
                       AND l.fencing < EXCLUDED.fencing \
                   RETURNING l.fencing) \
                 SELECT fencing, NULL::int8 AS left_us FROM granted \
                 UNION ALL \
                 SELECT NULL::int8, {left} FROM {t} WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM granted)"
            )
            .into(),
            extend: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + $3::int8 * interval '1 microsecond' \
                 WHERE key = $1 AND owner = $2 AND expires_at > clock_timestamp() RETURNING fencing"
            )
            .into(),
            extend_batch: format!(
                "UPDATE {t} AS l SET expires_at = clock_timestamp() + $3::int8 * interval '1 microsecond' \
                 FROM unnest($1::text[], $2::bytea[]) AS b(key, owner) \
                 WHERE l.key = b.key AND l.owner = b.owner AND l.expires_at > clock_timestamp() \
                 RETURNING l.key, l.owner"
            )
            .into(),
            // Released rows are kept (expiry -infinity) rather than deleted,
            // so the row keeps the key's last fencing token; the notification
            // is sent by the same statement and delivered at its commit.
            release: format!(
                "WITH r AS (UPDATE {t} SET expires_at = '-infinity' \
                   WHERE key = $1 AND owner = $2 AND expires_at > clock_timestamp() RETURNING key) \
                 SELECT pg_notify($3, key) FROM r"
            )
            .into(),
            // After a broken connection we cannot know whether the first
            // attempt committed; a row we already released still has our
            // owner token and expiry -infinity.
            release_retry: format!(
                "WITH r AS (UPDATE {t} SET expires_at = '-infinity' \
                   WHERE key = $1 AND owner = $2 \
                     AND (expires_at > clock_timestamp() OR expires_at = '-infinity') RETURNING key) \
                 SELECT pg_notify($3, key) FROM r"
            )
            .into(),
            inspect: format!(
                "SELECT fencing, {left} FROM {t} WHERE key = $1 AND expires_at > clock_timestamp()"
            )
            .into(),
            fence: format!(
                "INSERT INTO {f} AS x (resource, token) VALUES ($1, $2) \
                 ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token \
                   WHERE x.token <= EXCLUDED.token \
                 RETURNING token"
            )
            .into(),
        }
    }
}

/// How long one pool checkout may try to connect. sqlx backs off up to a
/// fifth of this between connection attempts, so a short attempt (retried
/// by [`PostgresBackend::run`] up to the connect timeout) notices a
/// restarted server sooner than one long attempt would.
pub(crate) fn pool_attempt(connect_timeout: Duration) -> Duration {
    (connect_timeout / 4)
        .max(Duration::from_millis(250))
        .min(connect_timeout)
}

/// The `LISTEN/NOTIFY` channel of a table: `distlock:<schema.table>`, or,
/// when that would pass PostgreSQL's 63-byte identifier limit (names are
/// up to 40 + 40 bytes), `distlock:<64-bit hash of schema.table in hex>`.
pub(crate) fn channel_name(qualified: &str) -> String {
    let plain = format!("distlock:{qualified}");
    if plain.len() <= 63 {
        plain
    } else {
        format!("distlock:{:016x}", crate::advisory::key_tag(qualified, ""))
    }
}

pub(crate) fn q(sql: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    AssertSqlSafe(Arc::clone(sql))
}

fn capabilities(config: &PostgresConfig) -> Capabilities {
    let caps = Capabilities::new(BACKEND)
        // Whole milliseconds are plenty; below 10 ms a lease would expire
        // within a couple of round trips.
        .ttl_range(Duration::from_millis(10), Duration::from_secs(86_400 * 365))
        .recheck_interval(config.recheck_interval);
    match config.mode {
        Mode::Lease => caps
            // Expiry is checked when someone asks, by the database clock:
            // no timer granularity beyond the statement's own latency.
            .expiry_grace(Duration::from_millis(20))
            .fencing(Fencing::Strict)
            .push_wakeup(Support::Yes)
            .fifo(Support::No(
                "lease mode wakes every waiter on release and the first to commit wins; use advisory mode for a fair queue",
            ))
            .survives_restart(Support::Yes)
            .batch_renewal(Support::Yes),
        Mode::Advisory => caps
            // The holder's own timer unlocks an abandoned lock; allow for
            // its scheduling and the unlock round trip.
            .expiry_grace(Duration::from_millis(50))
            .fencing(Fencing::Strict)
            .push_wakeup(Support::Yes)
            .fifo(Support::Yes)
            .survives_restart(Support::No(
                "advisory locks belong to the session; a restart or a dropped connection ends it (reported through lost())",
            ))
            .batch_renewal(Support::No(
                "each advisory lock lives on its own connection; renewal checks run concurrently, one small statement per held lock",
            )),
    }
}

impl PostgresBackend {
    /// Connects, checks (or creates) the table and sequence, and returns the
    /// backend. Fails fast with [`Error::Connection`](lock_core::Error),
    /// [`Error::Auth`](lock_core::Error) or [`Error::Config`](lock_core::Error).
    pub async fn connect(config: PostgresConfig) -> Result<Self> {
        config.validate()?;
        let opts = config.connect_options_with(Some(config.request_timeout));
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .min_connections(0)
            .acquire_timeout(pool_attempt(config.connect_timeout))
            // Testing idle connections before use would cost a round trip
            // per statement; broken ones are retried instead (see `run`).
            .test_before_acquire(false)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(opts);
        let advisory = match config.mode {
            Mode::Advisory => Some(Advisory::new(&config)),
            Mode::Lease => None,
        };
        let inner = Inner {
            caps: capabilities(&config),
            sql: Sql::new(&config),
            pool,
            hub: WakeHub::new(),
            listener: Mutex::new(None),
            advisory,
            shutdown: CancellationToken::new(),
            config,
        };
        let backend = PostgresBackend {
            inner: Arc::new(inner),
        };
        backend.prepare_schema().await?;
        info!(
            url = %backend.inner.config.redacted_url(),
            mode = %backend.inner.config.mode,
            "connected"
        );
        Ok(backend)
    }

    /// Parses `url` (see the [crate docs](crate)) and connects.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(PostgresConfig::from_url(url)?).await
    }

    /// The configuration (its `Debug` hides the password).
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The shared connection pool, for running your own statements (for
    /// example [`fence()`](crate::fence()) in a transaction).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The key as stored: prefix + key.
    pub(crate) fn full_key(&self, key: &Key) -> String {
        format!("{}{}", self.inner.config.prefix, key.as_str())
    }

    /// Lease mode: whether the shared `LISTEN` connection is subscribed right
    /// now (it starts with the first wait and reconnects by itself). For
    /// health checks; waiting works without it, by re-checking.
    pub fn is_listening(&self) -> bool {
        let slot = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        slot.as_ref().is_some_and(|l| *l.listening.borrow())
    }

    /// The `LISTEN/NOTIFY` channel of this table.
    pub fn channel(&self) -> &str {
        &self.inner.sql.channel
    }

    async fn prepare_schema(&self) -> Result<()> {
        let c = &self.inner.config;
        let (schema, table) = (c.table.schema(), c.table.table());
        let mut statements = vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                   key text PRIMARY KEY, \
                   owner bytea NOT NULL, \
                   fencing bigint NOT NULL, \
                   expires_at timestamptz NOT NULL) WITH (fillfactor = 70)",
                t = c.table.qualified()
            ),
            format!(
                "CREATE SEQUENCE IF NOT EXISTS {} AS bigint MINVALUE 1 NO CYCLE CACHE 1",
                c.table.sequence()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (resource text PRIMARY KEY, token bigint NOT NULL)",
                c.table.fences()
            ),
        ];
        if schema != "public" {
            statements.insert(0, format!("CREATE SCHEMA IF NOT EXISTS {schema}"));
        }
        let ctx = "preparing the lease table";
        if c.create_schema {
            let work = |_| async {
                let mut tx = self.inner.pool.begin().await?;
                // Concurrent first starts would race on the catalog
                // ("duplicate key ... pg_type"); serialize them.
                sqlx::query("SELECT pg_advisory_xact_lock(7306086361911412021)")
                    .execute(&mut *tx)
                    .await?;
                for s in &statements {
                    sqlx::query(AssertSqlSafe(s.as_str()))
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            };
            self.run(ctx, work).await?;
        }
        // Fencing is only strict with an uncached sequence: with CACHE n each
        // session hands out its own block of values, out of time order.
        let seq = format!("{table}_fencing");
        let row = self
            .run(ctx, |_| {
                sqlx::query(
                    "SELECT cache_size, \
                       (SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = $3) \
                     FROM pg_sequences WHERE schemaname = $1 AND sequencename = $2",
                )
                .bind(schema)
                .bind(&seq)
                .bind(table)
                .fetch_optional(&self.inner.pool)
            })
            .await?;
        let Some(row) = row else {
            return Err(lock_core::Error::config(
                BACKEND,
                format!(
                    "the sequence {schema}.{seq} does not exist; create it (see the crate docs' migration) or turn distlock_create on"
                ),
            ));
        };
        let cache: i64 = row.try_get(0).map_err(|e| pg_error(e, ctx))?;
        let tables: i64 = row.try_get(1).map_err(|e| pg_error(e, ctx))?;
        if cache != 1 {
            return Err(lock_core::Error::config(
                BACKEND,
                format!(
                    "the sequence {schema}.{seq} has CACHE {cache}; fencing tokens need CACHE 1 (ALTER SEQUENCE {schema}.{seq} CACHE 1)"
                ),
            ));
        }
        if tables == 0 && c.mode == Mode::Lease {
            return Err(lock_core::Error::config(
                BACKEND,
                format!(
                    "the table {} does not exist; create it (see the crate docs' migration) or turn distlock_create on",
                    c.table
                ),
            ));
        }
        Ok(())
    }

    /// Runs `fut` with the request timeout, mapping errors.
    pub(crate) async fn timed<T>(
        &self,
        ctx: &str,
        fut: impl Future<Output = std::result::Result<T, sqlx::Error>>,
    ) -> Result<T> {
        let limit = self.inner.config.request_timeout + self.inner.config.connect_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(pg_error(e, ctx)),
            Err(_) => Err(timed_out(ctx, limit)),
        }
    }

    /// Runs a statement on the shared pool, retrying on another connection
    /// when the one used turned out to be broken (after a server restart
    /// every idle connection is; the pool drops each on its first failure).
    /// `make` builds the statement for attempt n (0-based).
    pub(crate) async fn run<T, F, Fut>(&self, ctx: &str, mut make: F) -> Result<T>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = std::result::Result<T, sqlx::Error>>,
    {
        let config = &self.inner.config;
        // Broken pooled connections are dropped one per failure: allow one
        // attempt per pooled connection plus a fresh one.
        let attempts = config.pool_size as usize + 1;
        let start = Instant::now();
        let limit = config.request_timeout + config.connect_timeout;
        let mut n = 0;
        let mut broken = 0;
        loop {
            let left = limit.saturating_sub(start.elapsed());
            let e = match tokio::time::timeout(left, make(n)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => return Err(timed_out(ctx, limit)),
            };
            let retry = if matches!(e, sqlx::Error::PoolTimedOut) {
                // No connection within one (short) pool attempt: the server
                // may be restarting. Keep trying for the connect timeout, so
                // we notice its return within a pool attempt's backoff.
                start.elapsed() + pool_attempt(config.connect_timeout) <= config.connect_timeout
            } else if is_connection_error(&e) {
                broken += 1;
                broken < attempts
            } else {
                false
            };
            if !retry || start.elapsed() >= limit {
                return Err(pg_error(e, ctx));
            }
            debug!(error = %e, attempt = n, "{ctx}: connection failed; retrying");
            n += 1;
        }
    }

    fn advisory(&self) -> Option<&Advisory> {
        self.inner.advisory.as_ref()
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("url", &self.inner.config.redacted_url())
            .field("mode", &self.inner.config.mode)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Backend for PostgresBackend {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        match self.advisory() {
            Some(a) => a.try_acquire(self, req).await,
            None => self.lease_try_acquire(req).await,
        }
    }

    async fn subscribe(&self, key: &Key) -> Result<Subscription> {
        match self.advisory() {
            // Advisory waiters wait in the server's queue, not on a hub.
            Some(_) => Ok(Subscription::never()),
            None => self.lease_subscribe(key).await,
        }
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        match self.advisory() {
            Some(a) => a.acquire(self, req, deadline, cancel).await,
            None => lock_core::wait_loop(self, req, deadline, cancel).await,
        }
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        match self.advisory() {
            Some(a) => a.extend(lease, ttl).await,
            None => self.lease_extend(lease, ttl).await,
        }
    }

    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        match self.advisory() {
            Some(a) => a.extend_batch(leases, ttl).await,
            None => self.lease_extend_batch(leases, ttl).await,
        }
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        match self.advisory() {
            Some(a) => a.release(lease).await,
            None => self.lease_release(lease).await,
        }
    }

    async fn inspect(&self, key: &Key) -> Result<LockInfo> {
        match self.advisory() {
            Some(a) => a.inspect(self, key).await,
            None => self.lease_inspect(key).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_fit_postgres_identifiers() {
        assert_eq!(
            channel_name("public.distlock_leases"),
            "distlock:public.distlock_leases"
        );
        let long = format!("{}.{}", "s".repeat(40), "t".repeat(40));
        let c = channel_name(&long);
        assert!(c.len() <= 63 && c.starts_with("distlock:"), "{c}");
        assert_ne!(
            c,
            channel_name(&format!("{}.{}", "s".repeat(40), "u".repeat(40)))
        );
    }
}
