//! Lease mode: one row per key in the lease table.
//!
//! Every operation is one statement and one round trip, decided by the
//! database's clock (`clock_timestamp()`), so the clients' clocks never
//! matter: acquire (insert or take over an expired row, minting the fencing
//! token from the sequence), extend and release (conditional on the owner
//! token), and inspect. Release notifies waiters in the same statement.

use std::collections::HashSet;
use std::time::Duration;

use lock_core::{
    AcquireRequest, Attempt, FencingToken, Key, Lease, LockInfo, Result, Subscription, deadline,
    not_held,
};
use sqlx::Row;
use tokio::time::Instant;

use crate::backend::{PostgresBackend, q};
use crate::listener::Listener;

/// Microseconds in `d`, for the `interval` arithmetic in SQL.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A remaining time in microseconds from the server, as a duration
/// (negative: already past).
pub(crate) fn left(us: Option<i64>) -> Option<Duration> {
    us.map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0)))
}

fn token(v: i64) -> FencingToken {
    FencingToken::new(u64::try_from(v).unwrap_or(0))
}

impl PostgresBackend {
    pub(crate) async fn lease_try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        let key = self.full_key(&req.key);
        let owner = req.owner.as_bytes().as_slice();
        let ttl = micros(req.ttl);
        let sql = &self.inner.sql.acquire;
        let sent_at = Instant::now();
        let row = self
            .run("acquiring a lease", |_| {
                sqlx::query(q(sql))
                    .bind(key.as_str())
                    .bind(owner)
                    .bind(ttl)
                    .fetch_optional(&self.inner.pool)
            })
            .await?;
        let Some(row) = row else {
            // No row at all: a concurrent grant committed after our snapshot.
            return Ok(Attempt::Held { expires_in: None });
        };
        let fencing: Option<i64> = row.try_get(0).map_err(decode)?;
        match fencing {
            Some(f) => Ok(Attempt::Granted(Lease::new(
                req.key.clone(),
                req.owner,
                token(f),
                req.ttl,
                deadline(sent_at, req.ttl),
            ))),
            None => {
                let us: Option<i64> = row.try_get(1).map_err(decode)?;
                Ok(Attempt::Held {
                    expires_in: left(us),
                })
            }
        }
    }

    pub(crate) async fn lease_extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        let key = self.full_key(lease.key());
        let owner = lease.owner().as_bytes().as_slice();
        let sql = &self.inner.sql.extend;
        let sent_at = Instant::now();
        let row = self
            .run("extending a lease", |_| {
                sqlx::query(q(sql))
                    .bind(key.as_str())
                    .bind(owner)
                    .bind(micros(ttl))
                    .fetch_optional(&self.inner.pool)
            })
            .await?;
        match row {
            Some(_) => Ok(deadline(sent_at, ttl)),
            None => Err(not_held(lease.key())),
        }
    }

    /// One `UPDATE ... FROM unnest(...)` for every due lease.
    pub(crate) async fn lease_extend_batch(
        &self,
        leases: &[Lease],
        ttl: Duration,
    ) -> Vec<Result<Instant>> {
        if leases.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = leases.iter().map(|l| self.full_key(l.key())).collect();
        let owners: Vec<Vec<u8>> = leases
            .iter()
            .map(|l| l.owner().as_bytes().to_vec())
            .collect();
        let sql = &self.inner.sql.extend_batch;
        let sent_at = Instant::now();
        let rows = self
            .run("renewing leases", |_| {
                sqlx::query(q(sql))
                    .bind(&keys)
                    .bind(&owners)
                    .bind(micros(ttl))
                    .fetch_all(&self.inner.pool)
            })
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // The same failure for each lease; `Error` is not `Clone`.
                let (text, retryable) = (e.to_string(), e.is_retryable());
                return leases
                    .iter()
                    .map(|_| {
                        Err(if retryable {
                            lock_core::Error::connection(
                                crate::BACKEND,
                                "renewing leases",
                                text.clone(),
                            )
                        } else {
                            lock_core::Error::backend(
                                crate::BACKEND,
                                "renewing leases",
                                text.clone(),
                            )
                        })
                    })
                    .collect();
            }
        };
        let mut renewed: HashSet<(String, Vec<u8>)> = HashSet::with_capacity(rows.len());
        for row in rows {
            if let (Ok(k), Ok(o)) = (row.try_get::<String, _>(0), row.try_get::<Vec<u8>, _>(1)) {
                renewed.insert((k, o));
            }
        }
        keys.into_iter()
            .zip(owners)
            .zip(leases)
            .map(|(pair, lease)| {
                if renewed.contains(&pair) {
                    Ok(deadline(sent_at, ttl))
                } else {
                    Err(not_held(lease.key()))
                }
            })
            .collect()
    }

    pub(crate) async fn lease_release(&self, lease: &Lease) -> Result<bool> {
        let key = self.full_key(lease.key());
        let owner = lease.owner().as_bytes().as_slice();
        let (first, retry) = (&self.inner.sql.release, &self.inner.sql.release_retry);
        let channel = self.inner.sql.channel.as_str();
        let rows = self
            .run("releasing a lease", |n| {
                sqlx::query(q(if n == 0 { first } else { retry }))
                    .bind(key.as_str())
                    .bind(owner)
                    .bind(channel)
                    .fetch_all(&self.inner.pool)
            })
            .await?;
        Ok(!rows.is_empty())
    }

    pub(crate) async fn lease_inspect(&self, key: &Key) -> Result<LockInfo> {
        let full = self.full_key(key);
        let sql = &self.inner.sql.inspect;
        let row = self
            .run("inspecting a lease", |_| {
                sqlx::query(q(sql))
                    .bind(full.as_str())
                    .fetch_optional(&self.inner.pool)
            })
            .await?;
        Ok(match row {
            None => LockInfo::free().with_waiters(None),
            Some(row) => {
                let f: i64 = row.try_get(0).map_err(decode)?;
                let us: Option<i64> = row.try_get(1).map_err(decode)?;
                LockInfo::held(Some(token(f)), left(us))
            }
        })
    }

    pub(crate) async fn lease_subscribe(&self, key: &Key) -> Result<Subscription> {
        // No need to wait for the listener to be connected: every time it
        // (re)connects it wakes all subscribers to re-check, so a release
        // that happened before `LISTEN` took effect is found by that
        // re-check. The hub is keyed by the key without the prefix; the
        // listener strips it.
        let sub = self.inner.hub.subscribe(key);
        let mut slot = self
            .inner
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(Listener::start(self));
        }
        Ok(sub)
    }
}

fn decode(e: sqlx::Error) -> lock_core::Error {
    lock_core::Error::backend(crate::BACKEND, "reading the answer", e)
}
