//! # lock-postgres: distlock on PostgreSQL
//!
//! Many teams already run PostgreSQL and would rather not add another store
//! for locks. This backend gives distlock's [`Backend`](lock_core::Backend)
//! two ways, chosen per client:
//!
//! | | **lease mode** (default) | **advisory mode** (opt-in) |
//! |---|---|---|
//! | primitive | a row per key in a lease table | `pg_advisory_lock` on a 64-bit hash of the key |
//! | acquire + release | 2 statements, 2 commits with fsync | 2 statements, no writes |
//! | fencing token | from a sequence, strictly increasing, survives restarts | the same sequence |
//! | expiry | by the **database's** clock, checked in the statement | our own timer unlocks an abandoned lock after its TTL |
//! | waiting | `LISTEN/NOTIFY` on one shared connection per client | the server's lock queue (fair) |
//! | survives a server restart | yes (the row is on disk) | no: reported through `lost()` |
//! | connections | a small shared pool + one listener | + **one connection per held or waited-for lock** |
//! | fair (FIFO) | no | yes |
//!
//! Measured on the 2-core development machine (`examples/measure.rs`,
//! release build, fsync on, loopback, medians of 2000 cycles and 200
//! handoffs, four runs; the machine was shared and loaded, so treat them
//! as upper bounds): advisory cycle 0.29–0.40 ms, release-to-waiter
//! handoff 0.32–0.55 ms; lease cycle 0.96–1.12 ms (2.9 ms in one run under
//! heavy load), handoff 1.7–1.9 ms
//! (`NOTIFY` delivery plus the waiter's fsynced commit). The two fsynced
//! commits dominate the lease cycle: the same two statements in `pgbench`
//! cost the same with or without the `pg_notify`. On an idle machine the
//! shared notes measured 0.16 ms (advisory) and 0.65 ms (lease table) for
//! the bare statements.
//!
//! ## Example
//!
//! ```no_run
//! use lock_core::LockClient;
//! use lock_postgres::PostgresBackend;
//!
//! # #[tokio::main] async fn main() -> lock_core::Result<()> {
//! let backend = PostgresBackend::connect_url(
//!     "postgres://app:secret@db.internal:5432/app?sslmode=verify-full&sslrootcert=/etc/ca.pem",
//! )
//! .await?;
//! let locks = LockClient::new(backend);
//! let guard = locks.lock("order-42").await?;
//! let token = guard.fencing_token(); // pass to every protected write (see `fence`)
//! // ... work ...
//! guard.release().await?;
//! # let _ = token; Ok(()) }
//! ```
//!
//! ## URL
//!
//! `postgres://USER:PASSWORD@HOST:PORT/DATABASE?PARAMS` (`postgresql://`
//! too). User, password and database are percent-decoded. Unix sockets are
//! not supported. Parameters, all optional; **any other parameter is an
//! [`Error::Config`](lock_core::Error)** (a misspelt `sslmode` must never
//! silently mean "no TLS"):
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `sslmode` | libpq's: `disable`, `allow`, `prefer`, `require`, `verify-ca`, `verify-full` | `prefer` |
//! | `sslrootcert` | libpq's: CA certificate (PEM file) | system roots |
//! | `sslcert`, `sslkey` | libpq's: client certificate and key (PEM files) | none |
//! | `application_name` | libpq's | `distlock` |
//! | `connect_timeout` | libpq's, whole seconds | 5 |
//! | `distlock_mode` | `lease` or `advisory` | `lease` |
//! | `distlock_table` | `schema.table` of the lease table (also names the sequence `<table>_fencing` and the fence table `<table>_fences`); lower-case identifiers | `public.distlock_leases` |
//! | `distlock_prefix` | namespace put before every key | empty |
//! | `distlock_create` | create schema, table and sequence when missing | `true` |
//! | `distlock_pool_size` | shared pool connections | 8 |
//! | `distlock_advisory_pool_size` | advisory mode: connections for held and waiting locks | 64 |
//! | `distlock_connect_timeout` | e.g. `500ms`, `5s` (overrides `connect_timeout`) | 5s |
//! | `distlock_request_timeout` | per statement; also sent as `statement_timeout` | 5s |
//! | `distlock_recheck_interval` | fallback re-check of a busy key | 2s |
//!
//! libpq parameters not listed (`host`, `port`, `dbname`, `user`,
//! `password`, `options`, `target_session_attrs`, ...) are rejected: put
//! them in the URL's parts. As with libpq, `PGPASSWORD` and the other `PG*`
//! environment variables fill in what the URL leaves open. The password
//! never appears in `Debug`, `Display`, logs or errors
//! ([`PostgresConfig::redacted_url`]). The same settings exist on
//! [`PostgresConfig::builder`].
//!
//! Every connection sets `synchronous_commit=on` (see fencing below) and
//! `statement_timeout` to the request timeout.
//!
//! ## Migration (lease mode)
//!
//! The backend creates what it needs when missing (`distlock_create=true`,
//! needs `CREATE` on the schema; for a role without it, create the objects
//! once with another role and set `distlock_create=false`). With
//! `distlock_create=false` the backend checks that the table and sequence
//! exist and refuses to start otherwise. To create them yourself, for a table
//! `app.locks`:
//!
//! ```sql
//! CREATE TABLE app.locks (
//!     key        text PRIMARY KEY,          -- prefix + key
//!     owner      bytea NOT NULL,            -- 16 random bytes per grant
//!     fencing    bigint NOT NULL,           -- last token granted for this key
//!     expires_at timestamptz NOT NULL       -- by the database clock; '-infinity' = released
//! ) WITH (fillfactor = 70);
//! CREATE SEQUENCE app.locks_fencing AS bigint MINVALUE 1 NO CYCLE CACHE 1;
//! CREATE TABLE app.locks_fences (resource text PRIMARY KEY, token bigint NOT NULL);
//! ```
//!
//! Advisory mode only needs the sequence (and the fence table for
//! [`fence()`]). Released rows stay (with their last token) so a key's token
//! never depends on a deleted row; a key that is never used again leaves
//! one small row. Delete rows that expired long ago if you have many
//! one-off keys: `DELETE FROM app.locks WHERE expires_at < now() - interval '1 day'`.
//!
//! ## Lease mode: statements
//!
//! * **acquire**: `INSERT ... VALUES (key, owner, nextval(seq), clock_timestamp() + ttl)
//!   ON CONFLICT (key) DO UPDATE ... WHERE (expired OR same owner) AND old token < new token
//!   RETURNING fencing`, in a CTE that, when not granted, also returns the
//!   holder's remaining time (one round trip either way).
//! * **release**: `UPDATE ... SET expires_at = '-infinity' WHERE key AND owner AND
//!   not expired`, with `pg_notify` of the key in the same statement.
//! * **extend**: the same condition; renewal of many leases is one
//!   `UPDATE ... FROM unnest($keys, $owners)`.
//! * a broken pooled connection (after a restart) is retried on another one
//!   (the pool's per-use health check, which costs a round trip, is off);
//!   while the server is unreachable, statements keep trying for the
//!   connect timeout, then fail with a retryable
//!   [`Error::Connection`](lock_core::Error).
//!
//! ## Lease mode: waiting
//!
//! A waiter subscribes to the client's [`WakeHub`](lock_core::WakeHub) and
//! tries; the client's one `LISTEN` connection (started with the first
//! wait, on channel `distlock:<schema.table>`, or a hash of the name when
//! that passes 63 bytes) turns each release's
//! notification into a wake-up. Every client listening on a table hears
//! every release on it (a few dozen bytes each); the hub drops those
//! nobody waits for. Notifications sent while the listener reconnects are
//! lost, so after every (re)connect it wakes every waiter to re-check. A
//! waiter also re-checks when the holder's lease runs out (the acquire
//! statement reports the remaining time by the database clock) and at
//! least every `recheck_interval`. Lease mode is not fair: every waiter is
//! woken, and the first statement to commit wins.
//!
//! ## Guarantees and limits
//!
//! * **Fencing**: tokens come from one sequence with `CACHE 1` (checked at
//!   connect: with a cache each session hands out its own block of values,
//!   out of time order). `nextval` is WAL-logged (32 values ahead) and a
//!   grant only counts once its commit is flushed, which flushes the
//!   sequence's WAL record before it; `synchronous_commit=on` is forced per
//!   connection so that holds whatever the server's default. After a crash
//!   the sequence resumes past every value handed out. Tokens therefore
//!   increase strictly per key across holders, expiry and restarts, but
//!   with gaps (every contended attempt draws a value).
//! * **Clocks**: lease expiry uses only the database server's clock, never
//!   the clients'. The server's wall clock must not jump (use NTP slewing);
//!   a forward jump ends leases early. Clients measure their own validity
//!   on their monotonic clock from when the request was sent, minus a
//!   safety margin, so `lost()` fires before the server expires the lease.
//! * **Failover and replicas**: connect to the primary only. With
//!   asynchronous streaming replication, a failover can lose recently
//!   committed grants *and* sequence values: two holders and repeated
//!   tokens become possible. Use synchronous replication
//!   (`synchronous_standby_names`, `synchronous_commit=on` on the primary)
//!   if locks must survive a failover; advisory locks never survive one.
//! * **Advisory mode**: each held lock pins a connection (a server process)
//!   until release; size `max_connections` for your peak number of held
//!   *and waiting* locks. When all `distlock_advisory_pool_size`
//!   connections are in use, a `try_lock` waits up to the connect timeout
//!   for one and then fails with a retryable `Error::Connection`; a waiting
//!   `lock` keeps retrying until its deadline.
//!   Keys are hashed to 64-bit lock ids; a collision
//!   makes two keys exclude each other (never two holders of one key) and is
//!   detected by [`inspect`](lock_core::Backend::inspect) (see
//!   [`advisory_lock_id`]). A killed connection frees the lock on the server
//!   at once; the holder learns it at its next renewal check (every third of
//!   the TTL), so rely on fencing tokens, as always. A holder whose process
//!   freezes keeps the lock as long as its TCP connection lives (our expiry
//!   timer is in the holder's process). While a lock is held, its
//!   connection's `application_name` is `dl:<key hash>:<fencing token>`
//!   (that is how `inspect` finds the holder's token without a write); it
//!   is set back on release.
//! * **Cancellation** (advisory mode): a waiter that gives up (deadline or
//!   dropped future) cancels its blocked `pg_advisory_lock` with
//!   `pg_cancel_backend` from the shared pool, repeating until the statement
//!   ends, then closes that connection: no queue entry stays behind.
//! * Keys are stored as prefix + key (up to 512 + 256 bytes of text).
//!
//! ## Capabilities
//!
//! | | lease | advisory |
//! |---|---|---|
//! | TTL | 10 ms – 1 year | 10 ms – 1 year |
//! | fencing | strict | strict |
//! | push wake-up | yes (`LISTEN/NOTIFY`) | yes (server queue) |
//! | FIFO | no: every waiter is woken, first commit wins | yes |
//! | survives restart | yes | no |
//! | batch renewal | yes (one statement) | no: one check per connection, concurrently |

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod advisory;
mod backend;
mod config;
mod error;
pub mod fence;
mod lease;
mod listener;

pub use advisory::lock_id as advisory_lock_id;
pub use backend::PostgresBackend;
pub use config::{
    DISTLOCK_PARAMS, LIBPQ_PARAMS, Mode, PostgresConfig, PostgresConfigBuilder, Secret, SslMode,
    TableName,
};
pub use fence::fence;

/// The backend's name in errors, traces and capabilities.
pub const BACKEND: &str = "postgres";
