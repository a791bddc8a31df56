//! Advisory mode: session-level advisory locks, one connection per held lock.
//!
//! PostgreSQL's lock manager does the work: `pg_try_advisory_lock` for a
//! try, `pg_advisory_lock` to wait in the server's own queue (first come,
//! first served, handed over the moment the holder unlocks, no
//! notification round trip). The lock belongs to the session, so the
//! connection that took it is kept out of the pool, pinned to the lease
//! (`Lease::with_handle`), until release. Cost: one server connection
//! (a backend process) per held *and* per waiting lock.
//!
//! # Lock ids and collisions
//!
//! An advisory lock is named by a 64-bit number. We use a 64-bit hash of
//! the table name and the full key ([`lock_id`]); two different keys
//! collide with probability about n²/2⁶⁵ for n keys held at once (about
//! 3·10⁻⁸ for a million). A collision is safe: the two keys merely exclude
//! each other (false contention), never two holders of one key. It is
//! detected: the holder advertises a second, independent 64-bit hash
//! ([`key_tag`]) and its fencing token in its session's `application_name`
//! (`dl:<tag>:<token>`, no write, no extra round trip), and
//! [`inspect`](lock_core::Backend::inspect) compares tags and logs a
//! warning naming both when they differ. The same goes for an unrelated
//! application's `pg_advisory_lock(n)` on the same number.
//!
//! # Expiry and loss
//!
//! The server never expires an advisory lock; the session keeps it until it
//! unlocks or ends. To keep distlock's lease semantics (an abandoned lease
//! frees the lock after its TTL), each held lock has a small timer task that
//! unlocks it when the TTL passes without an extension. An extension checks
//! in `pg_locks` that this session still holds the lock. A dead connection
//! means the server has already freed the lock: the loss signal fires at
//! the next check (renewal runs every third of the TTL), not before. That
//! window is what fencing tokens are for.
//!
//! # Cancellation
//!
//! A waiter blocked in `pg_advisory_lock` holds a place in the server's
//! queue. Closing its socket would not remove it (a backend waiting for a
//! lock does not read its socket), so on cancellation or deadline we call
//! `pg_cancel_backend(pid)` from the shared pool, wait for the blocked
//! statement to end, and close that connection. If the grant raced the
//! cancel, the lease is returned and the client releases it.

use std::sync::Arc;
use std::time::Duration;

use lock_core::{
    AcquireRequest, Attempt, Backoff, CancellationToken, Error, FencingToken, Key, Lease, LockInfo,
    LossReason, LossSignal, Result, deadline, not_held,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Row};
use tokio::sync::{Mutex, watch};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use crate::backend::{PostgresBackend, pool_attempt};
use crate::config::PostgresConfig;
use crate::error::{is_connection_error, pg_error, timed_out};

/// The advisory lock id of a stored key (prefix + key) for a table
/// (`schema.table`): FNV-1a 64 (offset basis 0xcbf29ce484222325, prime
/// 0x100000001b3) over the table name's bytes, one 0xFF byte (never part of
/// UTF-8, so the split is unambiguous) and the key's UTF-8 bytes, then the
/// SplitMix64 finalizer (`x ^= x >> 30; x *= 0xbf58476d1ce4e5b9;
/// x ^= x >> 27; x *= 0x94d049bb133111eb; x ^= x >> 31`), read as a
/// two's-complement `i64`. Stable across versions and platforms, so
/// programs in other languages can take or watch the same lock.
///
/// ```
/// let a = lock_postgres::advisory_lock_id("public.distlock_leases", "order-42");
/// assert_eq!(a, lock_postgres::advisory_lock_id("public.distlock_leases", "order-42"));
/// assert_ne!(a, lock_postgres::advisory_lock_id("public.distlock_leases", "order-43"));
/// ```
pub fn lock_id(table: &str, key: &str) -> i64 {
    i64::from_ne_bytes(hash(0, table, key).to_ne_bytes())
}

/// The second, independent hash that detects collisions of [`lock_id`].
pub(crate) fn key_tag(table: &str, key: &str) -> u64 {
    hash(0x9E37_79B9_7F4A_7C15, table, key)
}

fn hash(seed: u64, table: &str, key: &str) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325 ^ seed;
    for part in [table.as_bytes(), &[0xFF], key.as_bytes()] {
        for b in part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    }
    // SplitMix64's finalizer: FNV's low bits mix poorly on their own.
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// Added to an advisory lease's TTL before our timer unlocks it (within the
/// declared `expiry_grace`).
const EXPIRY_SLACK: Duration = Duration::from_millis(10);

/// How long to wait for a cancelled lock wait to end before cancelling again.
const CANCEL_RETRY: Duration = Duration::from_millis(100);

/// Advisory-mode state of one client.
pub(crate) struct Advisory {
    shared: Arc<Shared>,
}

struct Shared {
    /// Connections for held and waited-for locks.
    pool: PgPool,
    namespace: String,
    app_name: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    try_lock: Arc<str>,
    lock: Arc<str>,
    unlock: Arc<str>,
    check: Arc<str>,
    inspect: Arc<str>,
}

/// The connection holding one advisory lock, pinned to its lease.
struct Hold {
    shared: Arc<Shared>,
    key: Key,
    lock_id: i64,
    conn: Mutex<Option<PoolConnection<Postgres>>>,
    /// When our own timer unlocks the lock; `None` once it is gone.
    expiry: watch::Sender<Option<Instant>>,
    loss: LossSignal,
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Never hand a connection that may still hold a session lock back
        // to the pool.
        if let Some(mut conn) = self.conn.get_mut().take() {
            conn.close_on_drop();
        }
    }
}

impl Hold {
    /// Takes the connection out and marks the lock gone.
    fn end(&self, conn: &mut Option<PoolConnection<Postgres>>) -> Option<PoolConnection<Postgres>> {
        self.expiry.send_replace(None);
        conn.take()
    }

    /// Unlocks on `conn` and returns it to the pool, or closes it (which
    /// frees the lock too) when anything is off.
    async fn unlock(&self, mut conn: PoolConnection<Postgres>) -> Result<bool> {
        let r = tokio::time::timeout(
            self.shared.request_timeout,
            sqlx::query(AssertSqlSafe(Arc::clone(&self.shared.unlock)))
                .bind(self.lock_id)
                .bind(self.shared.app_name.as_str())
                .fetch_one(&mut *conn),
        )
        .await;
        match r {
            Ok(Ok(row)) => {
                let unlocked: bool = row.try_get(0).unwrap_or(false);
                if !unlocked {
                    conn.close_on_drop();
                }
                Ok(unlocked)
            }
            Ok(Err(e)) if is_connection_error(&e) => {
                // The session is gone, and with it the lock: not ours.
                conn.close_on_drop();
                debug!(key = %self.key, error = %e, "advisory unlock: connection already gone");
                Ok(false)
            }
            Ok(Err(e)) => {
                conn.close_on_drop();
                Err(pg_error(e, "releasing an advisory lock"))
            }
            Err(_) => {
                conn.close_on_drop();
                Err(timed_out(
                    "releasing an advisory lock",
                    self.shared.request_timeout,
                ))
            }
        }
    }

    /// The timer that frees an abandoned lock when its TTL passes.
    async fn expire_when_due(self: Arc<Self>) {
        let mut rx = self.expiry.subscribe();
        loop {
            let Some(at) = *rx.borrow_and_update() else {
                return;
            };
            tokio::select! {
                _ = sleep_until(at) => {
                    let mut slot = self.conn.lock().await;
                    if *self.expiry.borrow() != Some(at) {
                        continue; // extended or released meanwhile
                    }
                    if let Some(conn) = self.end(&mut slot) {
                        debug!(key = %self.key, "advisory lease ran out; unlocking");
                        self.loss.trigger(LossReason::Expired);
                        let _ = self.unlock(conn).await;
                    }
                    return;
                }
                changed = rx.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Matches the `pg_locks` row of advisory lock `$1` (a bigint lock is
/// stored as classid = high 32 bits, objid = low 32 bits, objsubid = 1).
fn oid_filter(a: &str) -> String {
    format!(
        "{a}locktype = 'advisory' AND {a}objsubid = 1 \
         AND {a}classid = (($1::int8 >> 32) & 4294967295)::oid \
         AND {a}objid = ($1::int8 & 4294967295)::oid"
    )
}

enum Blocked {
    Granted(i64),
    Stopped,
    Failed(sqlx::Error),
}

impl Advisory {
    pub(crate) fn new(config: &PostgresConfig) -> Self {
        let s = config.table.sequence();
        // Lock waits are bounded by our own deadline and cancel, not by
        // statement_timeout, which would also throw away the queue place.
        let opts = config.connect_options_with(None);
        let pool = PgPoolOptions::new()
            .max_connections(config.advisory_pool_size)
            .min_connections(0)
            .acquire_timeout(pool_attempt(config.connect_timeout))
            .test_before_acquire(false)
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(opts);
        let f = oid_filter("");
        let fl = oid_filter("l.");
        let shared = Shared {
            pool,
            namespace: config.table.qualified(),
            app_name: config.application_name.clone(),
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
            try_lock: format!(
                "SELECT pid, t, CASE WHEN t IS NOT NULL THEN set_config('application_name', $2 || t::text, false) END \
                 FROM (SELECT pg_backend_pid() AS pid, \
                         CASE WHEN pg_try_advisory_lock($1) THEN nextval('{s}') END AS t OFFSET 0) s"
            )
            .into(),
            lock: format!(
                "SELECT t, set_config('application_name', $2 || t::text, false) \
                 FROM (SELECT nextval('{s}') AS t FROM (SELECT pg_advisory_lock($1) OFFSET 0) l OFFSET 0) s"
            )
            .into(),
            unlock: "SELECT pg_advisory_unlock($1), set_config('application_name', $2, false)".into(),
            check: format!(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND granted AND {f})"
            )
            .into(),
            inspect: format!(
                "SELECT l.granted, a.application_name FROM pg_locks l \
                 LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND {fl}"
            )
            .into(),
        };
        Advisory {
            shared: Arc::new(shared),
        }
    }

    fn ids(&self, b: &PostgresBackend, key: &Key) -> (i64, String) {
        let full = b.full_key(key);
        let id = lock_id(&self.shared.namespace, &full);
        let tag = key_tag(&self.shared.namespace, &full);
        (id, format!("dl:{tag:016x}:"))
    }

    /// A connection for one lock, waiting up to the connect timeout in
    /// short pool attempts (see `pool_attempt`).
    async fn checkout(&self) -> Result<PoolConnection<Postgres>> {
        let start = Instant::now();
        let attempt = pool_attempt(self.shared.connect_timeout);
        loop {
            match self.shared.pool.acquire().await {
                Ok(conn) => return Ok(conn),
                Err(sqlx::Error::PoolTimedOut)
                    if start.elapsed() + attempt <= self.shared.connect_timeout => {}
                Err(e) => return Err(pg_error(e, "opening a connection for an advisory lock")),
            }
        }
    }

    /// One `pg_try_advisory_lock` on a pooled connection; `Ok(Err(conn))`
    /// hands the connection back when the key is busy, with the backend pid.
    async fn try_on(
        &self,
        conn: &mut PoolConnection<Postgres>,
        id: i64,
        name: &str,
    ) -> std::result::Result<(i32, Option<i64>), sqlx::Error> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.shared.try_lock)))
            .bind(id)
            .bind(name)
            .fetch_one(&mut **conn)
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Checks out a connection and tries once, retrying on a fresh
    /// connection when a pooled one turns out broken (after a restart).
    async fn try_once(
        &self,
        id: i64,
        name: &str,
    ) -> Result<(PoolConnection<Postgres>, i32, Option<i64>, Instant)> {
        let mut attempts = self.shared.pool.num_idle() + 1;
        loop {
            // Validity counts from before the checkout: the caller's TTL
            // starts when it asked, not when a connection was free.
            let sent_at = Instant::now();
            let mut conn = self.checkout().await?;
            let r = tokio::time::timeout(
                self.shared.request_timeout,
                self.try_on(&mut conn, id, name),
            )
            .await;
            match r {
                Ok(Ok((pid, t))) => return Ok((conn, pid, t, sent_at)),
                Ok(Err(e)) => {
                    conn.close_on_drop();
                    attempts = attempts.saturating_sub(1);
                    if !is_connection_error(&e) || attempts == 0 {
                        return Err(pg_error(e, "trying an advisory lock"));
                    }
                    debug!(error = %e, "advisory try on a broken connection; retrying");
                }
                Err(_) => {
                    // The answer may still come and grant the lock on that
                    // session: closing the connection frees it.
                    conn.close_on_drop();
                    return Err(timed_out(
                        "trying an advisory lock",
                        self.shared.request_timeout,
                    ));
                }
            }
        }
    }

    fn grant(
        &self,
        req: &AcquireRequest,
        conn: PoolConnection<Postgres>,
        id: i64,
        token: i64,
        base: Instant,
    ) -> Lease {
        let lease = Lease::new(
            req.key.clone(),
            req.owner,
            FencingToken::new(u64::try_from(token).unwrap_or(0)),
            req.ttl,
            deadline(base, req.ttl),
        );
        // Our timer stands in for server-side expiry: count from when the
        // grant was known (it happened between send and answer), plus a
        // little slack for this task's scheduling, so the lock is never freed
        // before the holder's `valid_until`, however the answer was delayed.
        let (expiry, _) = watch::channel(Some(Instant::now() + req.ttl + EXPIRY_SLACK));
        let hold = Arc::new(Hold {
            shared: Arc::clone(&self.shared),
            key: req.key.clone(),
            lock_id: id,
            conn: Mutex::new(Some(conn)),
            expiry,
            loss: lease.loss_signal().clone(),
        });
        tokio::spawn(Arc::clone(&hold).expire_when_due());
        lease.with_handle(hold)
    }

    pub(crate) async fn try_acquire(
        &self,
        b: &PostgresBackend,
        req: &AcquireRequest,
    ) -> Result<Attempt> {
        let (id, name) = self.ids(b, &req.key);
        let (conn, _pid, token, sent_at) = self.try_once(id, &name).await?;
        Ok(match token {
            Some(t) => Attempt::Granted(self.grant(req, conn, id, t, sent_at)),
            None => Attempt::Held { expires_in: None },
        })
    }

    /// Waits in the server's queue (`pg_advisory_lock`) until granted, the
    /// deadline, or `cancel`; leaves no queue entry behind.
    pub(crate) async fn acquire(
        &self,
        b: &PostgresBackend,
        req: &AcquireRequest,
        until: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        let (id, name) = self.ids(b, &req.key);
        let mut backoff = Backoff::default();
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let tried = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(None),
                r = self.try_once(id, &name) => r,
            };
            let (mut conn, pid) = match tried {
                Ok((conn, _, Some(t), sent_at)) => {
                    return Ok(Some(self.grant(req, conn, id, t, sent_at)));
                }
                Ok((conn, pid, None, _)) => (conn, pid),
                Err(e) if e.is_retryable() => {
                    let pause = backoff.next_delay();
                    warn!(error = %e, retry_in = ?pause, "advisory acquire failed; retrying");
                    let wake =
                        until.map_or(Instant::now() + pause, |u| u.min(Instant::now() + pause));
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(None),
                        _ = sleep_until(wake) => {}
                    }
                    if until.is_some_and(|u| Instant::now() >= u) {
                        return Ok(None);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(None);
            }
            let outcome = {
                let fut = sqlx::query(AssertSqlSafe(Arc::clone(&self.shared.lock)))
                    .bind(id)
                    .bind(name.as_str())
                    .fetch_one(&mut *conn);
                tokio::pin!(fut);
                let stop = async {
                    match until {
                        Some(u) => sleep_until(u).await,
                        None => std::future::pending().await,
                    }
                };
                // `biased`: poll the statement first, so it is on its way
                // before we look at cancel and deadline.
                let first = tokio::select! {
                    biased;
                    r = &mut fut => Some(r),
                    _ = cancel.cancelled() => None,
                    _ = stop => None,
                };
                let stopped = first.is_none();
                let r = match first {
                    Some(r) => Some(r),
                    None => {
                        // Leave the queue: cancel the blocked statement from
                        // another connection and wait for it to end. A cancel
                        // that reaches the session before the statement does
                        // is ignored by the server, so repeat it.
                        let give_up = Instant::now() + self.shared.request_timeout;
                        let mut r = None;
                        while r.is_none() && Instant::now() < give_up {
                            cancel_backend(b, pid).await;
                            r = tokio::time::timeout(CANCEL_RETRY, &mut fut).await.ok();
                        }
                        r
                    }
                };
                match r {
                    Some(Ok(row)) => match row.try_get::<i64, _>(0) {
                        Ok(t) => Blocked::Granted(t),
                        Err(e) => Blocked::Failed(e),
                    },
                    Some(Err(e)) if stopped => {
                        debug!(error = %e, "advisory wait cancelled");
                        Blocked::Stopped
                    }
                    Some(Err(e)) => Blocked::Failed(e),
                    None => Blocked::Stopped,
                }
            };
            match outcome {
                Blocked::Granted(t) => {
                    return Ok(Some(self.grant(req, conn, id, t, Instant::now())));
                }
                Blocked::Stopped => {
                    // Whatever state the session is in, it goes.
                    conn.close_on_drop();
                    return Ok(None);
                }
                Blocked::Failed(e) => {
                    conn.close_on_drop();
                    let e = pg_error(e, "waiting for an advisory lock");
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    let pause = backoff.next_delay();
                    warn!(error = %e, retry_in = ?pause, "advisory wait failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(None),
                        _ = sleep_until(Instant::now() + pause) => {}
                    }
                }
            }
        }
    }

    pub(crate) async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        let Some(hold) = lease.handle::<Hold>() else {
            return Err(not_held(lease.key()));
        };
        let mut slot = hold.conn.lock().await;
        let Some(conn) = slot.as_mut() else {
            return Err(not_held(lease.key()));
        };
        let sent_at = Instant::now();
        let r = tokio::time::timeout(
            self.shared.request_timeout,
            sqlx::query(AssertSqlSafe(Arc::clone(&self.shared.check)))
                .bind(hold.lock_id)
                .fetch_one(&mut **conn),
        )
        .await;
        let why = match r {
            Ok(Ok(row)) => match row.try_get::<bool, _>(0) {
                Ok(true) => {
                    hold.expiry
                        .send_replace(Some(Instant::now() + ttl + EXPIRY_SLACK));
                    return Ok(deadline(sent_at, ttl));
                }
                Ok(false) => LossReason::NotHeld,
                Err(e) => return Err(pg_error(e, "checking an advisory lock")),
            },
            Ok(Err(e)) if is_connection_error(&e) => {
                LossReason::SessionLost(format!("the lock's connection failed: {e}"))
            }
            Ok(Err(e)) => return Err(pg_error(e, "checking an advisory lock")),
            Err(_) => LossReason::SessionLost(format!(
                "the lock's connection did not answer within {:?}",
                self.shared.request_timeout
            )),
        };
        if let Some(mut conn) = hold.end(&mut slot) {
            conn.close_on_drop();
        }
        warn!(key = %lease.key(), reason = %why, "advisory lock lost");
        hold.loss.trigger(why.clone());
        Err(Error::LockLost {
            key: lease.key().to_string(),
            reason: why,
        })
    }

    pub(crate) async fn extend_batch(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> Vec<Result<Instant>> {
        // Each lock has its own connection: check them all at once.
        futures::future::join_all(leases.iter().map(|l| self.extend(l, ttl))).await
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<bool> {
        let Some(hold) = lease.handle::<Hold>() else {
            return Ok(false);
        };
        if hold.key != *lease.key() {
            return Ok(false);
        }
        let mut slot = hold.conn.lock().await;
        let Some(conn) = hold.end(&mut slot) else {
            return Ok(false);
        };
        drop(slot);
        hold.unlock(conn).await
    }

    pub(crate) async fn inspect(&self, b: &PostgresBackend, key: &Key) -> Result<LockInfo> {
        let (id, name) = self.ids(b, key);
        let sql = &self.shared.inspect;
        let rows = b
            .run("inspecting an advisory lock", |_| {
                sqlx::query(AssertSqlSafe(Arc::clone(sql)))
                    .bind(id)
                    .fetch_all(b.pool())
            })
            .await?;
        let mut waiters = 0usize;
        let mut holder: Option<Option<String>> = None;
        for row in rows {
            let granted: bool = row.try_get(0).unwrap_or(false);
            if granted {
                holder = Some(row.try_get::<Option<String>, _>(1).unwrap_or(None));
            } else {
                waiters += 1;
            }
        }
        let Some(app) = holder else {
            return Ok(LockInfo::free().with_waiters(Some(waiters)));
        };
        let app = app.unwrap_or_default();
        let token = app
            .strip_prefix(name.as_str())
            .and_then(|t| t.parse::<u64>().ok())
            .map(FencingToken::new);
        if token.is_none() {
            warn!(
                %key,
                lock_id = id,
                holder = %app,
                "advisory lock id is held by a session that is not this key's distlock holder: a hash collision with another key or application"
            );
        }
        Ok(LockInfo::held(token, None).with_waiters(Some(waiters)))
    }
}

async fn cancel_backend(b: &PostgresBackend, pid: i32) {
    let r = b
        .timed(
            "cancelling an advisory wait",
            sqlx::query("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .execute(b.pool()),
        )
        .await;
    if let Err(e) = r {
        // The connection is closed afterwards anyway; the server drops the
        // queue entry once it notices.
        warn!(error = %e, "could not cancel an advisory wait");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        // Pinned values (checked against an independent Python version of
        // the documented algorithm): other programs compute the same ids.
        let a = lock_id("public.distlock_leases", "order-42");
        assert_eq!(a, -735_970_519_450_328_168);
        assert_eq!(
            key_tag("public.distlock_leases", "order-42"),
            18_008_323_215_190_842_436
        );
        assert_eq!(a, lock_id("public.distlock_leases", "order-42"));
        assert_ne!(a, lock_id("public.distlock_leases", "order-43"));
        assert_ne!(a, lock_id("other.distlock_leases", "order-42"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(lock_id("ab", "c"), lock_id("a", "bc"));
        assert_ne!(key_tag("t", "k") as i64, lock_id("t", "k"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            assert!(seen.insert(lock_id("t", &format!("key-{i}"))));
        }
    }
}
