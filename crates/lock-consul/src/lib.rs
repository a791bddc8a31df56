//! # lock-consul: distlock over Consul
//!
//! A [`Backend`](lock_core::Backend) for [`lock_core::LockClient`] that keeps
//! locks in Consul's KV store, held by a Consul session. It uses the same
//! entries as `consul lock`, so `consul lock PREFIX/NAME cmd` and distlock on
//! `NAME` exclude each other.
//!
//! ```no_run
//! use std::time::Duration;
//! use lock_consul::ConsulBackend;
//! use lock_core::{LockClient, LockOptions};
//!
//! # #[tokio::main] async fn main() -> lock_core::Result<()> {
//! let backend = ConsulBackend::connect_url(
//!     "consul://127.0.0.1:8500?token=my-acl-token&prefix=myapp/locks",
//! ).await?;
//! let locks = LockClient::new(backend);
//!
//! let guard = locks.lock_with("invoice-17", &LockOptions::new().ttl(Duration::from_secs(30))).await?;
//! let token = guard.fencing_token();     // pass it with every write you protect
//! tokio::select! {
//!     reason = guard.lost() => eprintln!("stop: {reason}"),
//!     _ = async { /* work, sending `token` along */ } => {}
//! }
//! guard.release().await?;
//! # let _ = token; Ok(()) }
//! ```
//!
//! ## URL
//!
//! `consul://HOST[:PORT][?PARAMS]` (plain HTTP; `consul+http://` is the same),
//! `consuls://HOST[:PORT][?PARAMS]` or `consul+https://...` for HTTPS. The
//! port defaults to 8500. The URL has no path and no user information.
//! Every parameter is optional; an unknown or repeated one is an
//! [`Error::Config`](lock_core::Error::Config).
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `token` | none | ACL token, sent as `X-Consul-Token`. Never shown in `Debug`, `Display`, errors or traces. |
//! | `ca_file` | none | PEM file of CA certificates to trust (added to the built-in roots); implies TLS. |
//! | `cert_file`, `key_file` | none | Client certificate and its key (PEM) for agents with `verify_incoming`; implies TLS. |
//! | `prefix` | `distlock` | Where lock entries live: `<prefix>/<key>/.lock`. `/`-separated segments of `A–Z a–z 0–9 - _ . ~`; empty puts entries at the root. |
//! | `session_ttl` | `15s` | TTL of the client's session. Locks need a TTL of at least **twice** this. |
//! | `session_ttl_min` | `10s` | The agents' `session_ttl_min` (Consul's default is 10 s); `session_ttl` may not be lower. |
//! | `lock_delay` | `15s` | The session's lock-delay (0 to 60 s), see below. |
//! | `behavior` | `release` | What Consul does with our entries when our session is invalidated: `release` (keep them unlocked, as `consul lock` does) or `delete`. |
//! | `connect_timeout` | `2s` | TCP + TLS connect timeout. |
//! | `request_timeout` | `5s` | Timeout of every request except blocking queries. |
//! | `wait` | `30s` | How long one blocking query waits on the server (1 s to 10 min). |
//!
//! Durations use humantime (`500ms`, `15s`, `1m`). The same settings are
//! available on [`ConsulConfig::builder`].
//!
//! ## How it works
//!
//! - **One session per client.** [`ConsulBackend::connect`] creates a
//!   session (TTL `session_ttl`, the configured lock-delay and behavior, and
//!   *no health checks*, so only its TTL or an operator can invalidate it).
//!   One task renews it every third of its TTL, and one blocking query on
//!   the session notices at once if Consul invalidates it; every lock of the
//!   client uses it. There is no session per acquire.
//! - **Acquire** is one `/v1/txn` request with a KV `lock` operation on
//!   `<prefix>/<key>/.lock`, carrying the flags `consul lock` uses
//!   (`0x2ddccbc058a50c18`) and the owner token in the value. The
//!   transaction returns the entry, so the grant and its fencing token come
//!   in the same round trip.
//! - **Fencing token**: the entry's `ModifyIndex` after our `lock`, i.e. the
//!   Raft index of the acquiring write. Raft indexes grow cluster-wide, so a
//!   later grant of the same key always has a higher one, also after the
//!   entry was deleted and re-created, and across restarts and leader
//!   changes (Raft keeps its index on disk). `LockIndex` would not do: it
//!   counts acquisitions *of one entry* and starts again at 1 when the entry
//!   is deleted (our release deletes it; `consul lock` deletes it; a session
//!   with `behavior=delete` deletes it).
//! - **Release** is one transaction: `check-index` + `delete-cas` on the
//!   acquire's ModifyIndex. It never acts on the key name alone: two guards
//!   of one client share a session, so "locked by our session" is not enough;
//!   the index identifies the grant. (`check-index` is needed because
//!   Consul's `delete-cas` succeeds on a missing key.)
//! - **Renewal**: the client's renewer hands all due leases to
//!   `extend_batch`, which sends one session renewal and one consistent
//!   `check-index` transaction per 64 leases, concurrently.
//! - **Waiting**: a waiter subscribes, then tries. Per client and key one
//!   blocking query (`?index=..&wait=..`) watches the entry while anyone
//!   waits on it, and wakes every waiter of that key when it changes (about
//!   2–4 ms after a release). After an error it wakes them to re-check and
//!   backs off; waiters also re-check every second (lock-delay ends
//!   silently). Each watched key holds one HTTP/1.1 connection to the agent
//!   while it is watched.
//! - **Same-client exclusion**: Consul lets a session lock a key it already
//!   holds. The client therefore keeps a table of the keys its guards hold
//!   and answers "held" for them itself.
//! - **Lease TTLs** are kept by the client: a lease that is not extended
//!   within its TTL is deleted from Consul by the client (conditionally, on
//!   its ModifyIndex) when the TTL ends, so an unrenewed lock is free for
//!   others after its TTL, as on every distlock backend. If the whole client
//!   dies, the session's TTL frees its locks instead (see the limits).
//! - **Loss**: a lease is reported lost through its guard's `lost()` when
//!   its validity deadline passes without renewal, when the renewal check
//!   finds the entry changed or gone, or when the session is lost: Consul
//!   invalidated it (seen by the session's blocking query, or answered to a
//!   renewal), or it could not be renewed before
//!   its own deadline (then every lease on it fires at that deadline, before
//!   Consul could invalidate it, and the session is destroyed as soon as the
//!   server answers). A new session is created for the next acquire.
//! - **Consistency**: the reads that decide something (the renewal check,
//!   `inspect`, the cleanup after an acquire whose answer was lost, and the
//!   confirmation that a session is gone) use `?consistent`, so a server
//!   that lost leadership, or a new leader that has not applied its log yet,
//!   cannot answer from stale state. (A new leader answers a session renewal
//!   with "not found" until it has caught up; the client only believes it
//!   after a consistent read agrees.) Acquire and release are Raft writes. Blocking queries use the
//!   default mode: they only wake waiters, who then decide with a write.
//!
//! ## Capabilities
//!
//! | capability | value |
//! |---|---|
//! | TTL | `2 × session_ttl` (30 s by default) to 24 h |
//! | expiry grace | `2 × session_ttl + lock_delay + 500 ms` |
//! | fencing | strict (Raft index) |
//! | push wake-up | yes (blocking queries) |
//! | fair (FIFO) | no: Consul KV locks have no queue |
//! | survives restart | yes, within the session TTL (see below) |
//! | batch renewal | yes |
//! | re-check interval | 1 s |
//!
//! ## Guarantees and limits
//!
//! - **Locks need a TTL of at least twice the session TTL.** A client that
//!   dies stops renewing its session; Consul invalidates it only after
//!   *up to twice* its TTL (Consul 1.8 waits 2 × TTL), then applies the
//!   lock-delay. A crashed holder's lock is therefore free at most
//!   `2 × session_ttl + lock_delay` (+ about 500 ms) after it died, which is
//!   what `expiry_grace` states. With lock TTLs of at least
//!   `2 × session_ttl`, that is never more than one lock TTL plus the
//!   lock-delay after the holder's death, as with the other backends. Shorter
//!   session TTLs free crashed holders' locks sooner and cost more renewals
//!   (one request per client every `session_ttl / 3`). Consul refuses
//!   session TTLs below its agents' `session_ttl_min` (10 s unless
//!   configured; the test agents use 1 s).
//! - **Lock-delay (default 15 s, Consul's own default)**: after a session is
//!   invalidated, Consul refuses to lock its keys again for this long. It
//!   protects against a holder that does not know it lost the lock (paused,
//!   partitioned, ignoring `lost()`), at the price of keeping the lock
//!   unavailable for that long after every crash. distlock holders learn of
//!   the loss before Consul could give the lock away (`lost()` fires at the
//!   validity deadline, which is measured from the request's send time minus
//!   a clock-drift margin), and fencing tokens protect the resource from
//!   late writers, so a lock-delay of 0 is reasonable when every writer
//!   checks fencing tokens. A normal release is not delayed. One case needs
//!   the lock-delay: a session destroyed by an operator (`consul session
//!   destroy`) is invalidated at once, without regard to our deadlines. The
//!   client's blocking query on its session tells every guard within
//!   milliseconds (at the latest at the next renewal, within
//!   `session_ttl / 3`, if that query is disconnected); a lock-delay above
//!   that keeps anyone else from locking before the old holder knows.
//! - **Validity and the session**: a lease's
//!   [`valid_until`](lock_core::LockGuard::valid_until) is its own TTL from
//!   the last grant or renewal. Its session, renewed for every lock of the
//!   client together, bounds it as well: if the session cannot be renewed
//!   until its own deadline (`session_ttl` after the last renewal was sent,
//!   minus the margin), every lease on it is reported lost at that moment,
//!   which may be before `valid_until`. So check
//!   [`is_lost`](lock_core::LockGuard::is_lost) or await
//!   [`lost`](lock_core::LockGuard::lost), not `valid_until` alone. (Folding
//!   the session deadline into `valid_until` would make lock-core's renewer,
//!   which schedules by the requested TTL, renew continuously.)
//! - **Clocks**: validity is measured on the local monotonic clock, from
//!   when a request was sent, minus 1% + 2 ms; it assumes the clocks of
//!   client and server do not drift apart by more than that over a TTL. No
//!   wall-clock time is used.
//! - **Failover**: during a leader election Consul answers 500; these are
//!   retryable [`Error::Connection`](lock_core::Error::Connection)s, waiters
//!   keep waiting, and the new leader resets every session's TTL timer, so
//!   sessions survive an election. If an election outlasts the session TTL,
//!   the client declares its session lost (every guard's `lost()` fires)
//!   rather than trusting it. An acquire whose answer was lost (timeout,
//!   500) may have been applied: the client then reads the entry and deletes
//!   it if it holds our owner token, before it tries that key again.
//! - **Restarts**: a persistent server keeps sessions, entries and its Raft
//!   index across a restart, and the new leader restarts every session's TTL
//!   timer, so a lease survives a restart if the server answers again within
//!   the session TTL (and the lease's own deadline); otherwise the loss is
//!   reported through `lost()`. A `-dev` agent keeps nothing: after its
//!   restart every lock is gone and fencing tokens start again from low
//!   values, so do not use one where fencing matters.
//! - **Keys** are [`Key::escaped`](lock_core::Key::escaped): names made of
//!   `A–Z a–z 0–9 - _ . ~` are used as they are (so `consul lock
//!   <prefix>/<name>` matches), others are percent-encoded.
//! - **ACLs**: the token needs `session:write` on the agent's node and
//!   `key:write` on the prefix. A refused token is
//!   [`Error::Auth`](lock_core::Error::Auth).
//! - **One address**: the client talks to one agent (normally the local
//!   client agent, which forwards to the servers). It does not fail over
//!   between addresses itself.
//!
//! ## Implementation note
//!
//! Requests are built with the `consulrs` crate's request types and sent by
//! our own HTTP client with timeouts; `/v1/txn`, which consulrs lacks, is
//! built by hand. All of it lives in one private module, so replacing the
//! unmaintained consulrs is a one-file change.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod api;
mod backend;
mod config;

pub use backend::ConsulBackend;
pub use config::{
    ConsulConfig, ConsulConfigBuilder, DEFAULT_LOCK_DELAY, DEFAULT_PORT, DEFAULT_PREFIX,
    DEFAULT_SESSION_TTL, DEFAULT_SESSION_TTL_MIN, MAX_LOCK_DELAY, MAX_SESSION_TTL, SessionBehavior,
};

/// The backend's name in errors, traces and capabilities.
pub const BACKEND: &str = "consul";
