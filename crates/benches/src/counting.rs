//! A backend wrapper that counts renewal traffic, for the "holding many
//! locks" scenario.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lock_core::{
    AcquireRequest, Attempt, Backend, CancellationToken, Capabilities, Key, Lease, LockInfo,
    Result, Subscription,
};
use tokio::time::Instant;

/// Counts `extend_batch` calls (renewal rounds) and leases renewed.
#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn Backend>,
    /// Renewal calls sent (one batch = one call).
    pub batches: AtomicU64,
    /// Leases renewed.
    pub leases: AtomicU64,
}

impl Counting {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            batches: AtomicU64::new(0),
            leases: AtomicU64::new(0),
        })
    }

    /// (batches, leases) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.leases.load(Ordering::Relaxed),
        )
    }
}

#[async_trait]
impl Backend for Counting {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        self.inner.try_acquire(req).await
    }
    async fn subscribe(&self, key: &Key) -> Result<Subscription> {
        self.inner.subscribe(key).await
    }
    async fn acquire(
        &self,
        req: &AcquireRequest,
        deadline: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        self.inner.acquire(req, deadline, cancel).await
    }
    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.leases.fetch_add(1, Ordering::Relaxed);
        self.inner.extend(lease, ttl).await
    }
    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.leases
            .fetch_add(leases.len() as u64, Ordering::Relaxed);
        self.inner.extend_batch(leases, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.inner.release(lease).await
    }
    async fn inspect(&self, key: &Key) -> Result<LockInfo> {
        self.inner.inspect(key).await
    }
}
