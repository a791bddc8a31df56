//! # lock-etcd: distlock's etcd backend
//!
//! etcd is the store to pick when correctness matters most: writes are
//! linearizable (Raft), keys hang on leases that die with their client, and
//! every write gets a cluster-wide revision number. This backend implements
//! the lock protocol of etcd's own `concurrency.Mutex` (the one behind
//! `etcdctl lock`), so distlock clients and `etcdctl lock` queue for the same
//! locks, and it uses the holder key's create revision as the
//! [fencing token](lock_core::FencingToken).
//!
//! ```no_run
//! use lock_core::LockClient;
//! use lock_etcd::EtcdBackend;
//!
//! # #[tokio::main] async fn main() -> lock_core::Result<()> {
//! let backend = EtcdBackend::connect_url("etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379").await?;
//! let locks = LockClient::new(backend.clone());
//!
//! let guard = locks.lock("order-42").await?;
//! // Protect an etcd write with the lock itself: the transaction only
//! // applies while our lock key still exists with our revision.
//! let cmp = lock_etcd::ownership_compare(&guard.lease()).expect("an etcd lease");
//! let txn = lock_etcd::etcd_client::Txn::new()
//!     .when([cmp])
//!     .and_then([lock_etcd::etcd_client::TxnOp::put("orders/42/state", "shipped", None)]);
//! let applied = backend.client().txn(txn).await.map_err(|e| {
//!     lock_core::Error::backend("etcd", "writing", e)
//! })?.succeeded();
//! // Elsewhere, pass guard.fencing_token() to any other store you write to.
//! guard.release().await?;
//! # let _ = applied; Ok(()) }
//! ```
//!
//! ## How a lock works
//!
//! A lock named `K` is the key range `<prefix><K escaped>/` (see
//! [`Key::escaped`](lock_core::Key::escaped): unreserved characters stay as
//! they are, others are percent-encoded). To take it, a client puts
//! `<range><lease id in hex>` with its lease, in one transaction that also
//! reads the range's oldest key. The key with the lowest create revision
//! holds the lock; the others wait, each for the deletion of the key just
//! before its own, so the queue is first-come first-served and a release
//! wakes exactly one waiter.
//!
//! - **Acquire**, uncontended: one round trip. No lease is granted per
//!   acquire: each client keeps one lease per TTL (its *session*) shared by
//!   all its locks.
//! - **Release**: one transaction deleting our key only if its create
//!   revision is still ours.
//! - **Renewal**: the client's renewer batches due locks into one
//!   [`extend_batch`](lock_core::Backend::extend_batch); for each session
//!   that is one keep-alive on the lease plus one read confirming the keys
//!   still exist (128 keys per transaction), sent together.
//! - **Waiting**: one shared watch stream per client; each waiter's watch
//!   starts at the revision it read, so no deletion is missed, and any watch
//!   trouble (compaction, broken stream) makes the waiter read again. A
//!   fallback re-check runs every `recheck_interval` (default 5 s).
//! - **try_lock** on a busy lock puts its key and deletes it again at once,
//!   like `Mutex.TryLock` (two round trips).
//! - A cancelled or timed-out wait deletes its waiter key; if that delete
//!   fails, the session keeps retrying it in the background (the shared
//!   lease is never revoked for it).
//!
//! ## Guarantees, and their limits
//!
//! - **Fencing** ([`Fencing::Strict`](lock_core::Fencing::Strict)): a grant's
//!   token is its key's create revision. Revisions increase with every write
//!   in the cluster and survive restarts and leader changes, and a later
//!   holder's key is always newer than every earlier holder's, so tokens
//!   strictly increase per lock. As Jepsen's analysis of etcd 3.4.3 showed,
//!   a lease-based lock alone cannot guarantee mutual exclusion (a holder
//!   may pause past its lease): pass the token to the resource you protect,
//!   or, for writes to etcd itself, add [`ownership_compare`] to the write's
//!   transaction.
//! - **Validity**: a lease's deadline is computed from the *send* time of the
//!   last keep-alive the server confirmed (or of the grant), minus a drift
//!   margin ([`lock_core::safety_margin`]); a slow answer shortens it rather
//!   than extends it. This assumes our monotonic clock and the leader's run
//!   at about the same rate (not synchronised wall clocks).
//! - **Lease loss**: a keep-alive answered "not found" (the lease expired
//!   while we were cut off, or was revoked) fires the
//!   [`lost()`](lock_core::LockGuard::lost) signal of every lock on it.
//! - **Failover**: etcd keeps leases across leader changes, so holders keep
//!   their locks; requests fail with
//!   [`Error::Connection`](lock_core::Error::Connection) while there is no
//!   leader, and the client retries (requests routed to a dead member are
//!   resent, streams reopen, waiters' watches resume from the revision they
//!   read). The new leader restarts every lease's full TTL plus an election
//!   timeout (etcd 3.5 does not checkpoint remaining TTLs by default), so a
//!   lock *abandoned by a crashed client* just before a failover may be freed
//!   up to one TTL plus one election timeout later than usual; the declared
//!   expiry grace does not cover that case. Holders are unaffected: their
//!   deadlines only ever shrink.
//! - **Restart**: leases, keys and revisions are persisted; a lock whose
//!   lease survived a restart is still held and renewable.
//! - **Per-lock TTL on a shared lease**: a lock that is not renewed is deleted
//!   by its own client when its TTL runs out. If the client process dies, the
//!   lease frees its keys one lease TTL after the last keep-alive; with a mix
//!   of renewed and unrenewed locks (or waiters) on one client, an unrenewed
//!   lock of a dead client may survive up to one extra TTL.
//! - A client takes one lock name at most once per session at a time: its
//!   tasks competing for the same lock take turns locally, then join etcd's
//!   queue.
//!
//! ## Capabilities
//!
//! TTL 2 s to 7 days (etcd's minimum lease TTL is 2 s; leases are whole
//! seconds, so a fractional TTL gets a lease rounded up, while the lock's
//! deadline still uses the TTL asked for). Expiry grace 1.5 s. Strict
//! fencing, push wake-ups, FIFO, restart survival, batched renewal: all yes.
//! [Extending](lock_core::LockGuard::extend) a lock beyond the TTL of its
//! lease moves its key to the client's session of the longer TTL (one more
//! transaction; the put keeps the key's create revision, so the fencing
//! token and the queue position stay).
//!
//! ## URL
//!
//! ```text
//! etcd://[user:password@]host:port[,host2:port2...][/][?param=value&...]
//! etcds://...                                   (TLS)
//! ```
//!
//! User and password are percent-decoded. Parameters (an unknown one is an
//! error):
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `prefix` | `distlock/` | namespace put before every lock's range; empty to meet `etcdctl lock NAME` on key `NAME` |
//! | `connect_timeout` | `5s` | connecting and the first check (also bounds how fast an unreachable server is reported) |
//! | `request_timeout` | `5s` | each request |
//! | `recheck_interval` | `5s` | fallback re-check of a waiter without a watch event |
//! | `ca_file` | — | PEM CA for the server certificate (`etcds` only; needed, since no system roots are loaded) |
//! | `cert_file`, `key_file` | — | PEM client certificate and key for mutual TLS (`etcds` only, together) |
//! | `domain` | host | name to verify the server certificate against (`etcds` only) |
//!
//! Durations use [humantime](https://docs.rs/humantime) (`500ms`, `2s`,
//! `1m`). `Debug`, `Display`, errors and logs never show the password.
//!
//! ## Interoperability with `etcdctl lock`
//!
//! `etcdctl lock NAME` queues under `NAME/`. With `prefix=` (empty), the
//! distlock key `NAME` uses the same range whenever `NAME` consists of
//! `A–Z a–z 0–9 - _ . ~` only; with the default prefix, use
//! `etcdctl lock distlock/NAME`.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod backend;
mod config;
mod errors;
mod session;
mod watch;

pub use backend::EtcdBackend;
pub use config::{DEFAULT_PREFIX, EtcdConfig, EtcdConfigBuilder};
/// The etcd client this crate is built on, re-exported so that
/// transactions built with [`ownership_compare`] use the same version.
pub use etcd_client;

use etcd_client::{Compare, CompareOp};
use lock_core::Lease;

/// The backend's name in errors, traces and capabilities.
pub const BACKEND: &str = "etcd";

/// The etcd key that holds `lease`'s lock (`<range><lease id hex>`), or
/// `None` if the lease is not from this backend.
pub fn lock_key(lease: &Lease) -> Option<&str> {
    lease
        .handle::<backend::LockHandle>()
        .map(|h| h.path.as_str())
}

/// A transaction comparison that holds exactly while `lease` still holds its
/// lock: our key exists with the create revision of this grant (which is
/// also the fencing token). Add it to the `when` of an etcd transaction so
/// that the write applies only if we are still the holder; `None` if the
/// lease is not from this backend.
///
/// This is stronger than checking the token yourself: the check and the
/// write are one atomic step on the server.
pub fn ownership_compare(lease: &Lease) -> Option<Compare> {
    lease
        .handle::<backend::LockHandle>()
        .map(|h| Compare::create_revision(h.path.clone(), CompareOp::Equal, h.rev))
}
