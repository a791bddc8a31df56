//! # lock-core: distlock's lock model and client
//!
//! Services on many machines must not process the same order, payment or job
//! at once. They take a lock on a name in a shared store; others wait; the
//! holder releases it, and if the holder dies its lease runs out. This crate
//! is the part every store shares: the model ([`Key`], [`Lease`],
//! [`FencingToken`], [`LockOptions`], [`Error`]), the small [`Backend`] trait
//! a store implements, the [`LockClient`] with its [`LockGuard`]s and
//! background renewal, and [`memory::MemoryBackend`], the reference backend.
//!
//! ## Taking a lock
//!
//! ```
//! use lock_core::{LockClient, memory::MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> lock_core::Result<()> {
//! let locks = LockClient::new(MemoryBackend::new());
//!
//! let guard = locks.lock("order-42").await?;          // waits while someone else holds it
//! let token = guard.fencing_token();                  // pass this to every protected write
//! // ... do the work ...
//! guard.release().await?;                             // Ok(()) = we still held it
//! # let _ = token; Ok(()) }
//! ```
//!
//! `try_lock` does not wait, and contention is not an error:
//!
//! ```
//! # use lock_core::{LockClient, memory::MemoryBackend};
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> lock_core::Result<()> {
//! # let locks = LockClient::new(MemoryBackend::new());
//! let held = locks.lock("job-7").await?;
//! assert!(locks.try_lock("job-7").await?.is_none());
//! # drop(held); Ok(()) }
//! ```
//!
//! ## Leases, renewal and loss
//!
//! Every lock is a lease with a TTL. While the guard lives, the client renews
//! it in the background (one task per client, batching renewals). The lease
//! can still be lost, for example when the store is unreachable for longer
//! than the TTL: [`LockGuard::lost`] completes *before* the store could give
//! the lock to someone else, so work can stop in time.
//!
//! ```
//! use std::time::Duration;
//! use lock_core::{LockClient, LockOptions, Wait, memory::MemoryBackend};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> lock_core::Result<()> {
//! # let locks = LockClient::new(MemoryBackend::new());
//! let opts = LockOptions::new()
//!     .ttl(Duration::from_millis(50))
//!     .auto_renew(false)                              // let it run out
//!     .wait(Wait::For(Duration::from_secs(5)));
//! let guard = locks.lock_with("report", &opts).await?;
//! let reason = guard.lost().await;                    // fires at the validity deadline
//! println!("lost: {reason}");
//! # Ok(()) }
//! ```
//!
//! ## Fencing tokens
//!
//! A lease alone cannot make a critical section safe: a process can pause
//! after checking its lease and write after it ran out. Each grant carries a
//! [`FencingToken`] that strictly increases per key; the protected resource
//! keeps the highest token it has seen and rejects writes with a lower one.
//!
//! ```
//! # use lock_core::{LockClient, memory::MemoryBackend};
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> lock_core::Result<()> {
//! # let locks = LockClient::new(MemoryBackend::new());
//! let first = locks.lock("account-1").await?;
//! let t1 = first.fencing_token();
//! first.release().await?;
//! let second = locks.lock("account-1").await?;
//! assert!(second.fencing_token() > t1);
//! # Ok(()) }
//! ```
//!
//! ## Errors
//!
//! One [`Error`] enum for every backend. Invalid keys and options are caught
//! before anything is sent:
//!
//! ```
//! # use lock_core::{LockClient, Error, memory::MemoryBackend};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # let locks = LockClient::new(MemoryBackend::new());
//! let err = locks.try_lock("").await.unwrap_err();
//! assert!(matches!(err, Error::InvalidKey { .. }));
//! assert!(!err.is_retryable());
//! # }
//! ```
//!
//! ## Writing a backend
//!
//! Implement [`Backend`]: one atomic `try_acquire` that mints a fencing token,
//! owner-checked `extend` and `release`, `inspect`, and `subscribe` fed by
//! the store's push mechanism through a [`WakeHub`]. State what the store can
//! do in [`Capabilities`]. Then run the `conformance` crate's suite against a
//! real server. [`memory`] is the example to copy.

#![cfg_attr(
    not(test),
    warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod backend;
mod capabilities;
mod client;
mod error;
mod guard;
mod key;
mod lease;
pub mod memory;
mod options;
mod renew;
mod wake;

pub use backend::{AcquireRequest, Attempt, Backend, Backoff, jitter, not_held, wait_loop};
pub use capabilities::{Capabilities, Fencing, Support};
pub use client::LockClient;
pub use error::{BoxError, Error, Result};
pub use guard::LockGuard;
pub use key::{IntoKey, Key, MAX_KEY_LEN};
pub use lease::{
    FencingToken, Lease, LockInfo, LossReason, LossSignal, OwnerToken, deadline, safety_margin,
};
pub use options::{LockOptions, Wait};
pub use wake::{Subscription, WakeHub};

/// Re-exported so backends and users name the same versions.
pub use async_trait::async_trait;
pub use tokio_util::sync::CancellationToken;
