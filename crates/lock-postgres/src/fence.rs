//! Protecting writes in the same database with the fencing token.
//!
//! A lock alone does not make a write safe: the holder can stall after
//! checking its lease and write after someone else took over. The protected
//! resource has to refuse writes carrying an older token. When the resource
//! lives in PostgreSQL, do it in the same transaction as the write.
//!
//! # Pattern 1: a token column on your own row
//!
//! Keep the highest token that wrote a row in the row itself, and make every
//! write conditional on it:
//!
//! ```sql
//! ALTER TABLE accounts ADD COLUMN fence bigint NOT NULL DEFAULT 0;
//!
//! UPDATE accounts SET balance = $1, fence = $2   -- $2 = our fencing token
//!  WHERE id = $3 AND fence <= $2;                 -- 0 rows: a newer holder wrote
//! ```
//!
//! `<=` lets one holder write several times; an older holder's write
//! changes nothing, and the affected-row count tells you so.
//!
//! # Pattern 2: [`fence()`] for any resource name
//!
//! When the write spans several rows or tables, call [`fence()`] first in the
//! same transaction. It records the highest token per resource name in
//! `<table>_fences` (created with the lease table) and answers whether ours
//! is still the highest. The row lock it takes is held until your
//! transaction ends, so an older holder cannot slip in between the check
//! and your writes.
//!
//! ```no_run
//! # async fn demo(backend: lock_postgres::PostgresBackend, token: lock_core::FencingToken)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! let mut tx = backend.pool().begin().await?;
//! if lock_postgres::fence(&backend, &mut tx, "orders/42", token).await? {
//!     sqlx::query("UPDATE orders SET state = 'paid' WHERE id = 42").execute(&mut *tx).await?;
//!     tx.commit().await?;
//! } else {
//!     tx.rollback().await?; // a newer holder has written: our lock is stale
//! }
//! # Ok(()) }
//! ```

use lock_core::{FencingToken, Result};
use sqlx::PgConnection;

use crate::backend::{PostgresBackend, q};
use crate::error::pg_error;

/// Records `token` for `resource` unless a higher token was recorded, and
/// answers whether ours is the highest (equal counts: the same holder may
/// write again). Run it inside the transaction that does the write.
pub async fn fence(
    backend: &PostgresBackend,
    conn: &mut PgConnection,
    resource: &str,
    token: FencingToken,
) -> Result<bool> {
    let value = i64::try_from(token.get()).unwrap_or(i64::MAX);
    let row = sqlx::query(q(&backend.inner.sql.fence))
        .bind(resource)
        .bind(value)
        .fetch_optional(conn)
        .await
        .map_err(|e| pg_error(e, "checking a fencing token"))?;
    Ok(row.is_some())
}
