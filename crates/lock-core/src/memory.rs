//! The in-memory backend: distlock's reference semantics, and the example to
//! copy when writing a backend.
//!
//! It keeps locks in a `HashMap` behind a mutex, measures time on tokio's
//! clock (so tests can pause time), mints fencing tokens from one counter,
//! wakes waiters through a [`WakeHub`], and supports fair mode with a FIFO
//! queue per key. Clones share the same store, like several clients of one
//! server.
//!
//! It protects tasks of one process only. Use it for tests and for
//! single-process programs; use a networked backend across processes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::Key;
use crate::backend::{AcquireRequest, Attempt, Backend, jitter, not_held, wait_loop};
use crate::capabilities::{Capabilities, Fencing, Support};
use crate::error::Result;
use crate::lease::{FencingToken, Lease, LockInfo, OwnerToken, deadline};
use crate::wake::{Subscription, WakeHub};

/// A lock store in this process's memory.
///
/// ```
/// use lock_core::{LockClient, memory::MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> lock_core::Result<()> {
/// let store = MemoryBackend::new();
/// let (a, b) = (LockClient::new(store.clone()), LockClient::new(store));
/// let guard = a.lock("job-7").await?;
/// assert!(b.try_lock("job-7").await?.is_none());
/// drop(guard);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    hub: Arc<WakeHub>,
    caps: Capabilities,
}

#[derive(Debug, Default)]
struct State {
    locks: HashMap<Key, Slot>,
    /// One counter for every key: tokens then increase per key too, and a
    /// key that is removed and re-created never restarts from zero.
    last_token: u64,
    next_ticket: u64,
}

#[derive(Debug, Default)]
struct Slot {
    holder: Option<Holder>,
    /// Fair-mode waiters, first come first served.
    queue: VecDeque<u64>,
}

#[derive(Debug)]
struct Holder {
    owner: OwnerToken,
    fencing: u64,
    expires_at: Instant,
}

impl Slot {
    /// The holder, if its lease has not run out.
    fn live_holder(&mut self, now: Instant) -> Option<&Holder> {
        if self.holder.as_ref().is_some_and(|h| h.expires_at <= now) {
            self.holder = None;
        }
        self.holder.as_ref()
    }

    fn is_empty(&self) -> bool {
        self.holder.is_none() && self.queue.is_empty()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        let caps = Capabilities::new("memory")
            .ttl_range(Duration::from_millis(1), Duration::from_secs(86_400 * 365))
            .expiry_grace(Duration::from_millis(5))
            .fencing(Fencing::Strict)
            .push_wakeup(Support::Yes)
            .fifo(Support::Yes)
            .survives_restart(Support::No("the store lives in this process's memory"))
            .batch_renewal(Support::Yes)
            .recheck_interval(Duration::from_secs(1));
        MemoryBackend {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                hub: WakeHub::new(),
                caps,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section below leaves the state consistent before it
        // can panic, so a poisoned lock is still usable.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Grants `req` if the key is free and, when `ticket` is given, the
    /// ticket is first in the queue. Otherwise reports how long the holder
    /// has left.
    fn attempt(&self, req: &AcquireRequest, ticket: Option<u64>) -> Attempt {
        let sent_at = Instant::now();
        let mut state = self.state();
        let state = &mut *state;
        let slot = state.locks.entry(req.key.clone()).or_default();
        if let Some(holder) = slot.live_holder(sent_at) {
            let expires_in = holder.expires_at.saturating_duration_since(sent_at);
            return Attempt::Held {
                expires_in: Some(expires_in),
            };
        }
        // No barging: a free key with queued fair waiters goes to the first.
        if slot.queue.front().copied() != ticket && !slot.queue.is_empty() {
            return Attempt::Held { expires_in: None };
        }
        if ticket.is_some() {
            slot.queue.pop_front();
        }
        state.last_token += 1;
        slot.holder = Some(Holder {
            owner: req.owner,
            fencing: state.last_token,
            expires_at: sent_at + req.ttl,
        });
        Attempt::Granted(Lease::new(
            req.key.clone(),
            req.owner,
            FencingToken::new(state.last_token),
            req.ttl,
            deadline(sent_at, req.ttl),
        ))
    }

    fn extend_one(
        state: &mut State,
        lease: &Lease,
        ttl: Duration,
        now: Instant,
    ) -> Result<Instant> {
        let holder = state
            .locks
            .get_mut(lease.key())
            .and_then(|slot| slot.live_holder(now).is_some().then_some(slot))
            .and_then(|slot| slot.holder.as_mut())
            .filter(|h| h.owner == *lease.owner())
            .ok_or_else(|| not_held(lease.key()))?;
        holder.expires_at = now + ttl;
        Ok(deadline(now, ttl))
    }

    /// Fair mode: join the queue, wait to be first and for the key to be
    /// free, and leave the queue on every way out.
    async fn acquire_fair(
        &self,
        req: &AcquireRequest,
        until: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        let mut sub = self.shared.hub.subscribe(&req.key);
        let ticket = {
            let mut state = self.state();
            state.next_ticket += 1;
            let ticket = state.next_ticket;
            state
                .locks
                .entry(req.key.clone())
                .or_default()
                .queue
                .push_back(ticket);
            ticket
        };
        let outcome = loop {
            let now = Instant::now();
            let mut wake = now + jitter(self.shared.caps.recheck_interval);
            match self.attempt(req, Some(ticket)) {
                Attempt::Granted(lease) => break Some(lease),
                Attempt::Held { expires_in } => {
                    if let Some(left) = expires_in {
                        wake = wake.min(now + left);
                    }
                }
            }
            if let Some(until) = until {
                if now >= until {
                    break None;
                }
                wake = wake.min(until);
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break None,
                _ = sub.changed() => {}
                _ = sleep_until(wake) => {}
            }
        };
        if outcome.is_none() {
            let mut state = self.state();
            if let Some(slot) = state.locks.get_mut(&req.key) {
                slot.queue.retain(|t| *t != ticket);
                if slot.is_empty() {
                    state.locks.remove(&req.key);
                }
            }
            drop(state);
            // We may have been first: let the next in line look.
            self.shared.hub.notify(&req.key);
        }
        Ok(outcome)
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        Ok(self.attempt(req, None))
    }

    async fn subscribe(&self, key: &Key) -> Result<Subscription> {
        Ok(self.shared.hub.subscribe(key))
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        until: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        if req.fair {
            self.acquire_fair(req, until, cancel).await
        } else {
            wait_loop(self, req, until, cancel).await
        }
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        Self::extend_one(&mut self.state(), lease, ttl, Instant::now())
    }

    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        let now = Instant::now();
        let mut state = self.state();
        leases
            .iter()
            .map(|l| Self::extend_one(&mut state, l, ttl, now))
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(slot) = state.locks.get_mut(lease.key()) else {
            return Ok(false);
        };
        let ours = slot
            .live_holder(now)
            .is_some_and(|h| h.owner == *lease.owner());
        if ours {
            slot.holder = None;
            if slot.is_empty() {
                state.locks.remove(lease.key());
            }
            drop(state);
            self.shared.hub.notify(lease.key());
        }
        Ok(ours)
    }

    async fn inspect(&self, key: &Key) -> Result<LockInfo> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(slot) = state.locks.get_mut(key) else {
            return Ok(LockInfo::free());
        };
        let waiters = Some(slot.queue.len());
        Ok(match slot.live_holder(now) {
            Some(h) => LockInfo::held(
                Some(FencingToken::new(h.fencing)),
                Some(h.expires_at.saturating_duration_since(now)),
            ),
            None => LockInfo::free(),
        }
        .with_waiters(waiters))
    }
}
