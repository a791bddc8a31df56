//! What users call: `try_lock`, `lock`, `lock_with`.

use std::fmt;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::backend::{AcquireRequest, Backend};
use crate::capabilities::Capabilities;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::IntoKey;
use crate::lease::{Lease, LockInfo, OwnerToken};
use crate::options::{LockOptions, Wait};
use crate::renew::{Cmd, Held, Renewer};

/// A lock client over one backend. Cheap to clone; clones share the
/// backend's connections and one renewal task.
///
/// ```
/// use lock_core::{LockClient, memory::MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> lock_core::Result<()> {
/// let client = LockClient::new(MemoryBackend::new());
/// let guard = client.lock("order-42").await?;
/// // ... process order 42, passing guard.fencing_token() to every write ...
/// assert!(client.try_lock("order-42").await?.is_none());
/// guard.release().await?;
/// assert!(client.try_lock("order-42").await?.is_some());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockClient {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) renewer: Renewer,
    defaults: LockOptions,
}

impl LockClient {
    /// A client over `backend` with [`LockOptions::default`].
    pub fn new(backend: impl Backend) -> Self {
        Self::from_arc(Arc::new(backend))
    }

    /// A client over a shared backend.
    pub fn from_arc(backend: Arc<dyn Backend>) -> Self {
        LockClient {
            inner: Arc::new(Inner {
                backend,
                renewer: Renewer::default(),
                defaults: LockOptions::default(),
            }),
        }
    }

    /// Uses `defaults` for [`lock`](Self::lock) and
    /// [`try_lock`](Self::try_lock).
    pub fn with_options(self, defaults: LockOptions) -> Self {
        LockClient {
            inner: Arc::new(Inner {
                backend: Arc::clone(&self.inner.backend),
                renewer: Renewer::default(),
                defaults,
            }),
        }
    }

    /// The default options.
    pub fn options(&self) -> &LockOptions {
        &self.inner.defaults
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The backend's capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        self.inner.backend.capabilities()
    }

    /// One attempt with the default options: `Ok(None)` if someone else
    /// holds the lock.
    pub async fn try_lock(&self, key: impl IntoKey) -> Result<Option<LockGuard>> {
        let opts = self.inner.defaults.clone().wait(Wait::No);
        self.acquire(key, &opts).await
    }

    /// One attempt with `opts` (its `wait` is ignored).
    pub async fn try_lock_with(
        &self,
        key: impl IntoKey,
        opts: &LockOptions,
    ) -> Result<Option<LockGuard>> {
        self.acquire(key, &opts.clone().wait(Wait::No)).await
    }

    /// Waits for the lock as the default options say (by default, for ever).
    pub async fn lock(&self, key: impl IntoKey) -> Result<LockGuard> {
        let opts = self.inner.defaults.clone();
        self.lock_with(key, &opts).await
    }

    /// Waits for the lock as `opts` say.
    ///
    /// [`Error::Timeout`] when the wait limit passes (immediately for
    /// [`Wait::No`] on a busy key). Dropping the returned future cancels the
    /// wait and leaves nothing behind on the store: if the grant raced the
    /// cancellation, the lock is released again.
    pub async fn lock_with(&self, key: impl IntoKey, opts: &LockOptions) -> Result<LockGuard> {
        let key = key.into_key()?;
        let start = Instant::now();
        match self.acquire(&key, opts).await? {
            Some(guard) => Ok(guard),
            None => Err(Error::Timeout {
                key: key.to_string(),
                waited: start.elapsed(),
            }),
        }
    }

    /// What the store knows about `key`.
    pub async fn inspect(&self, key: impl IntoKey) -> Result<LockInfo> {
        let key = key.into_key()?;
        self.inner.backend.inspect(&key).await
    }

    async fn acquire(&self, key: impl IntoKey, opts: &LockOptions) -> Result<Option<LockGuard>> {
        let key = key.into_key()?;
        let backend = &self.inner.backend;
        opts.validate(backend.capabilities())?;
        let req = AcquireRequest {
            key: key.clone(),
            owner: OwnerToken::generate(),
            ttl: opts.ttl,
            fair: opts.fair,
        };
        let deadline = opts.wait.deadline(Instant::now());
        let span = info_span!(
            "acquire",
            backend = backend.capabilities().backend,
            key = %key,
            ttl = ?opts.ttl,
            wait = ?opts.wait,
            fencing = tracing::field::Empty,
        );
        let lease = run_cancel_safe(Arc::clone(backend), req, opts.wait, deadline)
            .instrument(span.clone())
            .await?;
        let Some(lease) = lease else {
            debug!(parent: &span, "not acquired");
            return Ok(None);
        };
        span.record("fencing", lease.fencing_token().get());
        debug!(parent: &span, "acquired");
        Ok(Some(self.guard(lease, opts)))
    }

    fn guard(&self, lease: Lease, opts: &LockOptions) -> LockGuard {
        let key = lease.key().clone();
        let fencing = lease.fencing_token();
        let held = Arc::new(Held::new(lease, opts.auto_renew, opts.max_hold));
        self.inner
            .renewer
            .send(&self.inner.backend, Cmd::Track(Arc::clone(&held)));
        LockGuard {
            client: Arc::clone(&self.inner),
            held,
            key,
            fencing,
        }
    }
}

/// Runs the acquire in its own task so that dropping the caller's future
/// cannot cut a request in half: the task is told to stop, and a grant that
/// arrives anyway is released.
async fn run_cancel_safe(
    backend: Arc<dyn Backend>,
    req: AcquireRequest,
    wait: Wait,
    deadline: Option<Instant>,
) -> Result<Option<Lease>> {
    let cancel = CancellationToken::new();
    let _stop_on_drop = cancel.clone().drop_guard();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(
        async move {
            let result = if wait == Wait::No {
                backend.try_acquire(&req).await.map(|a| a.granted())
            } else {
                backend.acquire(&req, deadline, &cancel).await
            };
            if let Err(Ok(Some(lease))) = tx.send(result) {
                debug!("acquire was cancelled after the grant; releasing");
                if let Err(e) = backend.release(&lease).await {
                    debug!(error = %e, "release after cancelled acquire failed; the lease will expire");
                }
            }
        }
        .in_current_span(),
    );
    rx.await.map_err(|_| {
        Error::backend(
            "distlock",
            "acquiring",
            "the acquire task ended without an answer",
        )
    })?
}

impl fmt::Debug for LockClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockClient")
            .field("backend", &self.inner.backend)
            .field("defaults", &self.inner.defaults)
            .finish()
    }
}
