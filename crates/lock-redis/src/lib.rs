//! # lock-redis: distlock on Redis
//!
//! A [`Backend`](lock_core::Backend) for [`lock_core::LockClient`] on one
//! Redis server, or on several independent masters with the **Redlock**
//! algorithm. Use it through `LockClient` like any other backend:
//!
//! ```no_run
//! use std::time::Duration;
//! use lock_core::{LockClient, LockOptions, Wait};
//! use lock_redis::RedisBackend;
//!
//! # #[tokio::main] async fn main() -> lock_core::Result<()> {
//! let backend = RedisBackend::connect_url("redis://127.0.0.1:6379/?prefix=billing:").await?;
//! let locks = LockClient::new(backend);
//! let opts = LockOptions::new()
//!     .ttl(Duration::from_secs(10))
//!     .wait(Wait::For(Duration::from_secs(5)));
//! let guard = locks.lock_with("invoice-17", &opts).await?;
//! tokio::select! {
//!     reason = guard.lost() => eprintln!("lock lost: {reason}"),
//!     _ = write_invoice(17, guard.fencing_token().get()) => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! # async fn write_invoice(_: u32, _: u64) {}
//! ```
//!
//! ## URLs
//!
//! ```text
//! redis://[[user]:password@]host[:port][/db][?param=value&...]
//! rediss://...                                      TLS
//! redlock://[[user]:password@]h1:p1,h2:p2,h3:p3[/db][?...]
//! redlocks://...                                    Redlock over TLS
//! ```
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `prefix` | prefix of every key and channel (no `{` `}`) | `distlock:` |
//! | `connect_timeout` | one connection attempt | `2s` |
//! | `response_timeout` | one request | `500ms` |
//! | `ca_file` | PEM CA bundle to trust (TLS only) | system roots |
//! | `fence_retention` | how long a key's fencing counter is kept (`forever` allowed) | `7days` |
//!
//! Unknown or repeated parameters are [`Error::Config`](lock_core::Error).
//! The same settings have a builder: [`RedisConfig`]. Passwords never
//! appear in `Debug`, `Display`, errors or traces.
//!
//! ## Protocol
//!
//! Acquire, extend and release are each **one Lua script call** (atomic on
//! the server; see [`scripts`]): acquire checks the key, mints the fencing
//! token and sets the lease with `PX`; extend and release act only if the
//! stored owner token (128 random bits per grant) is ours. An uncontended
//! lock/unlock cycle is two round trips. Scripts are sent with `EVALSHA` and
//! loaded on `NOSCRIPT`. The lease's validity deadline is counted on our
//! monotonic clock from when the acquire was *sent*, minus 1 % + 2 ms for
//! clock drift.
//!
//! **Waiting** needs no polling: a release publishes on the key's channel,
//! and each client keeps **one** dedicated pub/sub connection per server for
//! all of its waiters (the command connection never carries anything
//! blocking). A waiter re-checks at the holder's expiry and every 500 ms
//! anyway, and after the pub/sub connection reconnects every waiter is woken,
//! since releases published meanwhile are lost.
//!
//! **Fair mode** (`LockOptions::fair`, single server only) keeps a FIFO
//! queue per key on the server (a sorted set ordered by arrival, and one of
//! per-waiter deadlines). A free key goes to the first in line, plain
//! `try_lock` callers included; a release wakes only that first waiter. A
//! waiter that gives up (timeout, cancellation) removes its entry; one that
//! dies leaves an entry that expires 3 s after its last refresh, holding up
//! the queue until then.
//!
//! **Renewal** of many leases is one pipeline per server per round.
//!
//! **Loss**: a lease the server no longer has (expired, taken, or forgotten
//! by a restart) is reported by the next renewal, and `lost()` fires; if
//! renewals fail, `lost()` fires at the validity deadline, before the server
//! could give the key to anyone else.
//!
//! ## Fencing tokens
//!
//! `token = max(last token of this key + 1, server TIME in µs)`, minted
//! inside the acquire script. The counter makes tokens strictly increase
//! even for grants within one µs or after the server clock stepped back; the
//! clock makes them keep increasing after a restart of a Redis that keeps
//! nothing on disk, where a plain counter would start again from 1 (tested
//! with a real restart). A token could only go backwards if the server's
//! wall clock stepped back by more than the time between two grants *and*
//! the counter was lost (restart without persistence, or no grant for
//! `fence_retention`). Hence [`Fencing::Strict`](lock_core::Fencing) for a
//! single server, under that clock assumption.
//!
//! **Failover** (Sentinel, managed Redis, cluster): replication is
//! asynchronous, so a replica promoted before it received a grant can grant
//! the same key again while the first holder still believes it holds it:
//! *mutual exclusion is lost*, and no lock on a replicated Redis can prevent
//! that. Fencing still holds if the new primary's clock is not behind the old
//! one's by more than the time between the two grants, because tokens come
//! from the clock. Protect writes with the token.
//!
//! ## Redlock
//!
//! `redlock://h1,h2,h3` (or [`RedisConfig::redlock`]) runs the algorithm of
//! the Redis documentation over N independent masters (no replication
//! between them): the acquire script goes to all masters at once, each with
//! a deadline of min(response timeout, TTL/5, at least 10 ms); the lock is
//! granted when a majority (N/2+1) granted it and
//! `validity = TTL − elapsed − drift` is still positive, where drift is
//! 1 % of the TTL + 2 ms. Otherwise the attempt is undone on **every** master
//! (a timed-out request may have landed) and retried after a random pause of
//! up to 50 ms. Extend needs a majority too; release goes to all masters. If
//! fewer than a majority answer, the error says so (`2 of 5 Redis masters
//! answered, Redlock needs 3`); it is a retryable `Error::Connection`.
//!
//! **Fencing is best-effort in Redlock mode**, and the capabilities say so.
//! There is no single place that orders grants: each master mints its own
//! token from its own counter and clock, and a grant's token is the highest
//! among the masters of its majority. Two majorities always share a master,
//! but that master's counter orders only the grants *it* saw: the previous
//! grant's token may have come from another master whose clock is ahead, so
//! the next grant's token can be lower. To narrow this, extend and release
//! raise every master's counter to the lease's token, so after the previous
//! holder renewed or released on a master the next majority shares, tokens
//! are ordered; they stay unordered when a lease simply expired without a
//! renewal and the masters' clocks disagree by more than the time between
//! the grants. Restarting a master without persistence also weakens the
//! majority argument (Redis's documentation asks to delay such restarts by
//! the maximum TTL). This is Martin Kleppmann's objection to Redlock; if you
//! need strict fencing, use a single server (or a consensus store).
//!
//! ## Capabilities
//!
//! | | single (`redis`) | Redlock (`redis-redlock`) |
//! |---|---|---|
//! | TTL | 10 ms – 365 days | same |
//! | expiry grace | 20 ms | 20 ms |
//! | fencing | Strict (server clock assumption above) | BestEffort |
//! | push wake-up | yes (pub/sub) | yes (pub/sub on every master) |
//! | FIFO | yes | no |
//! | leases survive a restart | no (in-memory) | no |
//! | batch renewal | yes (pipeline) | yes (pipeline per master) |
//!
//! ## Redis Cluster
//!
//! All keys of one lock (`P{key}`, `P{key}:fence`, `P{key}:q`, `P{key}:qt`)
//! share the hash tag `{key}` (the key percent-encoded, so it never contains
//! braces), so every script touches one slot. What was tested: that key
//! layout (a unit test) and every behaviour against standalone Redis 7.0
//! servers. Not tested: a real Redis Cluster. This crate connects to the one
//! node it is given and does not follow `MOVED` redirects, so today it runs
//! against standalone servers; the key layout is ready for a cluster-aware
//! connection.
//!
//! ## TLS and ACL
//!
//! `rediss://user:password@host:port/?ca_file=/path/ca.pem` (tested against
//! a TLS-only redis-server with an ACL user and the default user disabled).
//! TLS uses rustls; the crate installs the *ring* crypto provider once if the
//! application has not installed one.
//!
//! ## Requirements
//!
//! Redis 5.0 or later (scripts that call `TIME` before writing rely on
//! effect replication, the default since 5.0). Tested with 7.0.15.

#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod backend;
mod config;
mod node;
mod pubsub;
pub mod scripts;

pub use backend::RedisBackend;
pub use config::{DEFAULT_PREFIX, Mode, NodeAddr, RedisConfig};

/// The backend name used in errors.
pub(crate) const BACKEND: &str = "redis";
