//! The handle to a held lock.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::Key;
use crate::client::Inner;
use crate::error::{Error, Result};
use crate::lease::{FencingToken, Lease, LossReason};
use crate::options::check_ttl;
use crate::renew::{Cmd, Held};

/// A held lock. Release it with [`LockGuard::release`]; watch for its loss
/// with [`LockGuard::lost`].
///
/// # Dropping
/// `Drop` never blocks. It schedules a best-effort release on the current
/// tokio runtime and returns at once; if there is no runtime, or the release
/// fails, the lease runs out by itself after its TTL. Call
/// [`release`](LockGuard::release) to know that the lock was given back.
///
/// # Loss
/// A lease can be lost while you hold the guard: renewal failed until the
/// validity deadline passed, the store reported the key as no longer ours,
/// the maximum hold time was reached, or the backend's session died.
/// [`lost`](LockGuard::lost) completes at that moment. When the lease runs
/// out, that is *before* the store could give the lock to anyone else (the
/// deadline keeps a [safety margin](crate::safety_margin)). One case is
/// beyond any client's reach: a store that forgets leases when it restarts
/// (see [`Capabilities::survives_restart`](crate::Capabilities)) can grant
/// the lock again before the old holder's next renewal finds out. That is
/// why you stop touching the protected resource when `lost` fires *and*
/// always pass the [fencing token](LockGuard::fencing_token) along with
/// your writes: the token still orders the two holders.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    pub(crate) client: Arc<Inner>,
    pub(crate) held: Arc<Held>,
    pub(crate) key: Key,
    pub(crate) fencing: FencingToken,
}

impl LockGuard {
    /// The lock's name.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The fencing token of this grant: strictly greater than every earlier
    /// grant's token for this key.
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing
    }

    /// Until when the lease is certainly ours (monotonic clock). Moves
    /// forward with each renewal.
    pub fn valid_until(&self) -> Instant {
        self.held.valid_until()
    }

    /// A snapshot of the lease.
    pub fn lease(&self) -> Lease {
        self.held.lease().clone()
    }

    /// Whether the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.held.loss.is_triggered() || Instant::now() >= self.valid_until()
    }

    /// Completes when the lease is lost, with the reason. Never completes
    /// while the lock is held.
    ///
    /// ```
    /// # async fn demo(guard: lock_core::LockGuard) {
    /// tokio::select! {
    ///     reason = guard.lost() => eprintln!("stopping: {reason}"),
    ///     _ = do_the_work(guard.fencing_token()) => {}
    /// }
    /// # }
    /// # async fn do_the_work(_: lock_core::FencingToken) {}
    /// ```
    pub async fn lost(&self) -> crate::LossReason {
        self.held.loss.wait().await
    }

    /// A token cancelled when the lease is lost, for handing to tasks that
    /// should stop with it.
    pub fn lost_token(&self) -> CancellationToken {
        self.held.loss.token()
    }

    /// Extends the lease to `ttl` from now.
    ///
    /// Errors: [`Error::InvalidOptions`] for a TTL outside the backend's
    /// range, [`Error::LockLost`] if the lease is no longer ours (nothing is
    /// changed on the store).
    pub async fn extend(&self, ttl: Duration) -> Result<()> {
        check_ttl(ttl, self.client.backend.capabilities())?;
        if let Some(reason) = self.loss_reason() {
            return Err(self.lost_error(reason));
        }
        let lease = self.lease();
        let span = info_span!("extend", key = %self.key, fencing = %self.fencing, ?ttl);
        match self
            .client
            .backend
            .extend(&lease, ttl)
            .instrument(span)
            .await
        {
            Ok(valid_until) => {
                self.held.set_validity(ttl, valid_until);
                self.client.renewer.notify(Cmd::Reschedule(self.held.id));
                Ok(())
            }
            Err(Error::LockLost { reason, .. }) => {
                self.held.lose(reason.clone());
                Err(self.lost_error(reason))
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the lock back.
    ///
    /// `Ok(())` means we still held it and it is now free.
    /// [`Error::LockLost`] means it was lost before (it expired, or someone
    /// else holds it now): the work done under it may not have been
    /// exclusive. Other errors mean the store could not be asked; the lease
    /// then runs out by itself.
    pub async fn release(self) -> Result<()> {
        self.held.done.store(true, Ordering::Release);
        self.client.renewer.notify(Cmd::Untrack(self.held.id));
        let lease = self.lease();
        let earlier_loss = self.loss_reason();
        let span = info_span!("release", key = %self.key, fencing = %self.fencing);
        // Even a lease we consider lost is released on the store: if the
        // store still has it, the next holder gets it sooner.
        let released = self.client.backend.release(&lease).instrument(span).await;
        match (earlier_loss, released) {
            (Some(reason), _) => Err(self.lost_error(reason)),
            (None, Ok(true)) => Ok(()),
            (None, Ok(false)) => Err(self.lost_error(LossReason::NotHeld)),
            (None, Err(e)) => Err(e),
        }
    }

    fn loss_reason(&self) -> Option<LossReason> {
        if let Some(reason) = self.held.loss.reason() {
            return Some(reason);
        }
        (Instant::now() >= self.valid_until()).then_some(LossReason::Expired)
    }

    fn lost_error(&self, reason: LossReason) -> Error {
        Error::LockLost {
            key: self.key.to_string(),
            reason,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.held.done.swap(true, Ordering::AcqRel) {
            return;
        }
        self.client.renewer.notify(Cmd::Untrack(self.held.id));
        if self.held.loss.is_triggered() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            debug!(key = %self.key, "guard dropped outside a runtime; the lease will expire");
            return;
        };
        let backend = Arc::clone(&self.client.backend);
        let lease = self.lease();
        let span = info_span!("release", key = %self.key, fencing = %self.fencing, on_drop = true);
        runtime.spawn(
            async move {
                match backend.release(&lease).await {
                    Ok(held) => debug!(held, "released on drop"),
                    Err(e) => debug!(error = %e, "release on drop failed; the lease will expire"),
                }
            }
            .instrument(span),
        );
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("fencing", &self.fencing)
            .field(
                "valid_for",
                &self.valid_until().saturating_duration_since(Instant::now()),
            )
            .field("lost", &self.held.loss.is_triggered())
            .finish()
    }
}
