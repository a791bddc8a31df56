//! The small trait a store implements.
//!
//! A backend provides a handful of primitives: one attempt to acquire,
//! extend, release, inspect, and the store's way to wake waiters. Waiting
//! with deadlines, cancellation, retries with jittered backoff, guards,
//! renewal and tracing are written once, in the [client](crate::LockClient).
//!
//! The contract every backend keeps is on [`Backend`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, warn};

use crate::Key;
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::lease::{Lease, LockInfo, LossReason, OwnerToken};
use crate::wake::Subscription;

/// One acquire request, as the client hands it to a backend.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AcquireRequest {
    /// The lock.
    pub key: Key,
    /// The owner token the grant must carry.
    pub owner: OwnerToken,
    /// Lease length, already checked against the capabilities.
    pub ttl: Duration,
    /// Fair mode (only sent when the capabilities claim FIFO).
    pub fair: bool,
}

impl AcquireRequest {
    /// A request with a fresh owner token.
    pub fn new(key: Key, ttl: Duration) -> Self {
        AcquireRequest {
            key,
            owner: OwnerToken::generate(),
            ttl,
            fair: false,
        }
    }

    /// Sets fair mode.
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }
}

/// The outcome of one acquire attempt.
#[derive(Debug)]
pub enum Attempt {
    /// The lock is ours.
    Granted(Lease),
    /// Somebody else holds it (or, in fair mode, waits before us).
    Held {
        /// Time left on the holder's lease, when the store tells: a waiter
        /// re-checks then even if no wake-up arrives.
        expires_in: Option<Duration>,
    },
}

impl Attempt {
    /// The lease, if granted.
    pub fn granted(self) -> Option<Lease> {
        match self {
            Attempt::Granted(lease) => Some(lease),
            Attempt::Held { .. } => None,
        }
    }
}

/// A lock store. Object-safe: the client holds an `Arc<dyn Backend>`.
///
/// [`MemoryBackend`](crate::memory::MemoryBackend) is a complete example.
///
/// # Contract
/// - `try_acquire` is one atomic request: it grants the lock with a fresh
///   lease and a fencing token, or reports the key as held. Contention is not
///   an error.
/// - `extend` and `release` are conditional on the lease's
///   [`OwnerToken`](crate::OwnerToken): a lease that is not ours changes
///   nothing (`extend` returns [`Error::LockLost`], `release` returns
///   `Ok(false)`).
/// - The client never drops a backend future half-way on purpose: it runs
///   every acquire in its own task and tells it to stop through the
///   `cancel` token. A backend that queues waiters (etcd keys, a Redis FIFO
///   list, PostgreSQL's advisory queue) removes its queue entry before
///   [`Backend::acquire`] returns, on every path.
/// - Backends never panic on input and map every failure into
///   [`Error`] with their name and what they were doing.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// What this backend supports, and its limits.
    fn capabilities(&self) -> &Capabilities;

    /// One atomic attempt: grant with a new fencing token, or report held.
    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt>;

    /// Starts listening for releases of `key`; returns once the store will
    /// deliver them. Stores without push return [`Subscription::never`].
    async fn subscribe(&self, key: &Key) -> Result<Subscription>;

    /// Waits for the lock until `deadline` (`None`: for ever) or until
    /// `cancel` fires; `Ok(None)` when it did not get it.
    ///
    /// The default is [`wait_loop`]: subscribe, try, sleep until a wake-up,
    /// the holder's expiry or the re-check interval, repeat. Backends with a
    /// server-side queue override it (and must leave no queue entry behind).
    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        wait_loop(self, req, deadline, cancel).await
    }

    /// Extends our lease to `ttl` from now; returns the new validity
    /// deadline. [`Error::LockLost`] if the lease is not ours any more.
    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant>;

    /// Extends many leases at once, answering in the same order. Backends
    /// that can batch (one pipeline, one statement, one shared session)
    /// override this; the default extends one by one.
    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            out.push(self.extend(lease, ttl).await);
        }
        out
    }

    /// Releases our lease. `Ok(true)` if it was ours and is now free,
    /// `Ok(false)` if it was not ours (nothing changed).
    async fn release(&self, lease: &Lease) -> Result<bool>;

    /// What the store knows about `key`.
    async fn inspect(&self, key: &Key) -> Result<LockInfo>;
}

/// The error for "this lease is not ours any more".
pub fn not_held(key: &Key) -> Error {
    Error::LockLost {
        key: key.to_string(),
        reason: LossReason::NotHeld,
    }
}

/// The shared waiting algorithm behind [`Backend::acquire`].
///
/// Tries once; if the key is held, subscribes (so no release is missed),
/// then loops: try; if held, sleep until a wake-up, the holder's expiry, the
/// (jittered) re-check interval or the deadline, whichever is first. Retryable errors back off
/// with jitter and are retried until the deadline; others end the wait.
pub async fn wait_loop<B: Backend + ?Sized>(
    backend: &B,
    req: &AcquireRequest,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<Option<Lease>> {
    let caps = backend.capabilities();
    // The first attempt goes out before subscribing, so an uncontended
    // `lock` costs the one round trip of `try_lock`. Only a held key needs a
    // subscription, and then the key is tried once more right away: a
    // release between the first attempt and the subscription would
    // otherwise be missed.
    match backend.try_acquire(req).await {
        Ok(Attempt::Granted(lease)) => return Ok(Some(lease)),
        Ok(Attempt::Held { .. }) => {}
        Err(e) if e.is_retryable() => warn!(error = %e, "acquire attempt failed; retrying"),
        Err(e) => return Err(e),
    }
    let mut sub: Option<Subscription> = None;
    let mut backoff = Backoff::default();
    loop {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        if sub.is_none() {
            match backend.subscribe(&req.key).await {
                Ok(s) => sub = Some(s),
                Err(e) if e.is_retryable() => warn!(error = %e, "subscribe failed; re-checking"),
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        let mut wake = now + jitter(caps.recheck_interval);
        match backend.try_acquire(req).await {
            Ok(Attempt::Granted(lease)) => return Ok(Some(lease)),
            Ok(Attempt::Held { expires_in }) => {
                backoff = Backoff::default();
                if let Some(left) = expires_in {
                    wake = wake.min(now + left + Duration::from_millis(1));
                }
            }
            Err(e) if e.is_retryable() => {
                let pause = backoff.next_delay();
                warn!(error = %e, retry_in = ?pause, "acquire attempt failed; retrying");
                wake = Instant::now() + pause;
                sub = None;
            }
            Err(e) => return Err(e),
        }
        if let Some(deadline) = deadline {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            wake = wake.min(deadline);
        }
        let span = debug_span!("wait", key = %req.key, until = ?wake.saturating_duration_since(Instant::now()));
        let woken = async {
            match sub.as_mut() {
                Some(s) => s.changed().await,
                None => std::future::pending().await,
            }
        };
        let cancelled = async {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => true,
                _ = woken => {
                    debug!("woken by the store");
                    false
                }
                _ = sleep_until(wake) => {
                    debug!("re-checking");
                    false
                }
            }
        }
        .instrument(span)
        .await;
        if cancelled {
            return Ok(None);
        }
    }
}

/// Multiplies `d` by a random factor in 0.8..1.2.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// Exponential backoff with full jitter: 10 ms doubling up to 1 s.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let cap = Duration::from_millis(10)
            .saturating_mul(1 << self.attempt.min(7))
            .min(Duration::from_secs(1));
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(0.5 + 0.5 * rand::random::<f64>())
    }
}
