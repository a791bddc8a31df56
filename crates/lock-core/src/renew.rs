//! One renewal task per client, for all of its held locks.
//!
//! Holding 10,000 locks must not cost 10,000 timers or 10,000 requests per
//! period. The renewer keeps every held lease in one deadline-ordered queue,
//! wakes at the earliest due time, and renews everything due soon in one
//! [`Backend::extend_batch`] call per TTL (one pipeline or statement for
//! backends that batch). It also fires each guard's loss signal the moment
//! the validity deadline passes without a successful renewal, so `lost()`
//! completes before the store could grant the lock to someone else.
//!
//! Renewal never re-acquires: the first definite "not held" ends it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{Instrument, debug, info_span, warn};

use crate::backend::{Backend, Backoff};
use crate::error::{Error, Result};
use crate::lease::{Lease, LossReason, LossSignal};

/// State shared by a guard and the renewer.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) id: u64,
    lease: Mutex<Lease>,
    pub(crate) auto_renew: bool,
    pub(crate) renew_ttl: Duration,
    pub(crate) hold_until: Option<Instant>,
    pub(crate) loss: LossSignal,
    pub(crate) done: AtomicBool,
    /// Renewal was cut short by the maximum hold time.
    capped: AtomicBool,
    /// When the current validity was granted (acquire, renewal or extend).
    granted_at: Mutex<Instant>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How far ahead of its due time a renewal may join a batch.
const MAX_PULL_FORWARD: Duration = Duration::from_secs(5);

impl Held {
    pub(crate) fn new(lease: Lease, auto_renew: bool, max_hold: Option<Duration>) -> Self {
        Held {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            renew_ttl: lease.ttl(),
            loss: lease.loss_signal().clone(),
            hold_until: max_hold.map(|m| Instant::now() + m),
            lease: Mutex::new(lease),
            auto_renew,
            done: AtomicBool::new(false),
            capped: AtomicBool::new(false),
            granted_at: Mutex::new(Instant::now()),
        }
    }

    pub(crate) fn lease(&self) -> MutexGuard<'_, Lease> {
        // Updates are single assignments; a poisoned lock still holds a
        // consistent lease.
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn valid_until(&self) -> Instant {
        self.lease().valid_until()
    }

    /// Records a successful renewal or extension.
    pub(crate) fn set_validity(&self, ttl: Duration, valid_until: Instant) {
        self.lease().set_validity(ttl, valid_until);
        *self.granted_at.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// When to renew: a third of the way through the validity the backend
    /// granted (not the TTL asked for, so a backend that bounds validity by a
    /// shared session is renewed at the right pace).
    fn renew_at(&self) -> Instant {
        let granted = *self.granted_at.lock().unwrap_or_else(|e| e.into_inner());
        let valid_until = self.valid_until();
        granted + valid_until.saturating_duration_since(granted) / 3
    }

    /// Fires the loss signal once, with a trace event.
    pub(crate) fn lose(&self, reason: LossReason) {
        if !self.loss.is_triggered() {
            let lease = self.lease();
            warn!(key = %lease.key(), fencing = %lease.fencing_token(), %reason, "lock lost");
            drop(lease);
            self.loss.trigger(reason);
        }
    }

    /// The TTL the next renewal may ask for: the configured TTL, cut so the
    /// lease never outlives the maximum hold time. `None`: stop renewing.
    fn next_ttl(&self, now: Instant, min_ttl: Duration) -> Option<Duration> {
        let ttl = match self.hold_until {
            None => self.renew_ttl,
            Some(until) => self.renew_ttl.min(until.saturating_duration_since(now)),
        };
        if ttl < self.renew_ttl {
            self.capped.store(true, Ordering::Relaxed);
        }
        (ttl >= min_ttl && !ttl.is_zero()).then_some(ttl)
    }
}

pub(crate) enum Cmd {
    Track(Arc<Held>),
    Untrack(u64),
    Reschedule(u64),
    Renewed(u64, Result<Instant>),
}

/// Handle to a client's renewal task (started on first use, restarted if
/// its runtime went away).
#[derive(Debug, Default)]
pub(crate) struct Renewer {
    tx: Mutex<Option<mpsc::UnboundedSender<Cmd>>>,
}

impl Renewer {
    pub(crate) fn send(&self, backend: &Arc<dyn Backend>, cmd: Cmd) {
        let mut slot = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let cmd = match slot.as_ref() {
            Some(tx) => match tx.send(cmd) {
                Ok(()) => return,
                // The task's runtime is gone: start a new task below.
                Err(mpsc::error::SendError(cmd)) => cmd,
            },
            None => cmd,
        };
        Self::start(&mut slot, backend, cmd);
    }

    /// Sends only if the task runs (for commands that are moot otherwise).
    pub(crate) fn notify(&self, cmd: Cmd) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(cmd);
        }
    }

    fn start(slot: &mut Option<mpsc::UnboundedSender<Cmd>>, backend: &Arc<dyn Backend>, cmd: Cmd) {
        // Without a runtime there is nothing to renew with; the lease simply
        // runs out. Guards are only made inside a runtime, so this is rare.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            *slot = None;
            return;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            backend: Arc::clone(backend),
            entries: HashMap::new(),
            queue: BTreeSet::new(),
            tx: tx.downgrade(),
        };
        handle.spawn(task.run(rx));
        let _ = tx.send(cmd);
        *slot = Some(tx);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Due {
    Renew,
    Expire,
}

struct Entry {
    held: Arc<Held>,
    due: Instant,
    kind: Due,
    in_flight: bool,
    backoff: Backoff,
}

struct Task {
    backend: Arc<dyn Backend>,
    entries: HashMap<u64, Entry>,
    queue: BTreeSet<(Instant, u64)>,
    tx: mpsc::WeakUnboundedSender<Cmd>,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let next = self.queue.first().map(|(at, _)| *at);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => return,
                },
                _ = sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    self.tick();
                }
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Track(held) => {
                let id = held.id;
                let entry = Entry {
                    held,
                    due: Instant::now(),
                    kind: Due::Expire,
                    in_flight: false,
                    backoff: Backoff::default(),
                };
                self.entries.insert(id, entry);
                self.schedule(id, None);
            }
            Cmd::Untrack(id) => {
                if let Some(e) = self.entries.remove(&id) {
                    self.queue.remove(&(e.due, id));
                }
            }
            Cmd::Reschedule(id) => self.schedule(id, None),
            Cmd::Renewed(id, result) => {
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                entry.in_flight = false;
                match result {
                    Ok(_) => {
                        entry.backoff = Backoff::default();
                        self.schedule(id, None);
                    }
                    Err(Error::LockLost { reason, .. }) => {
                        entry.held.lose(reason);
                        self.remove(id);
                    }
                    Err(e) => {
                        let retry = entry.backoff.next_delay();
                        warn!(error = %e, retry_in = ?retry, "lease renewal failed; retrying");
                        self.schedule(id, Some(Instant::now() + retry));
                    }
                }
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(e) = self.entries.remove(&id) {
            self.queue.remove(&(e.due, id));
        }
    }

    /// Puts `id` back in the queue at its next event: a renewal a third of
    /// the TTL after the last grant (or `retry_at`), else its expiry.
    fn schedule(&mut self, id: u64, retry_at: Option<Instant>) {
        let min_ttl = self.backend.capabilities().min_ttl;
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        self.queue.remove(&(entry.due, id));
        let held = &entry.held;
        let valid_until = held.valid_until();
        let now = Instant::now();
        let renew = held.auto_renew && !entry.in_flight && held.next_ttl(now, min_ttl).is_some();
        let (due, kind) = if renew {
            let at = retry_at.unwrap_or_else(|| held.renew_at());
            if at < valid_until {
                (at, Due::Renew)
            } else {
                (valid_until, Due::Expire)
            }
        } else {
            (valid_until, Due::Expire)
        };
        entry.due = due;
        entry.kind = kind;
        self.queue.insert((due, id));
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let min_ttl = self.backend.capabilities().min_ttl;
        // Renewals due soon (within a sixth of their TTL, at most
        // MAX_PULL_FORWARD) join this batch: renewing a little early is
        // harmless and keeps the requests per period at a few batches
        // instead of one per lock.
        let horizon = now + MAX_PULL_FORWARD;
        let due: Vec<(Instant, u64)> = self
            .queue
            .iter()
            .copied()
            .take_while(|(at, _)| *at <= horizon)
            .collect();
        let mut batches: HashMap<Duration, Vec<(u64, Lease)>> = HashMap::new();
        for (at, id) in due {
            let Some(entry) = self.entries.get_mut(&id) else {
                self.queue.remove(&(at, id));
                continue;
            };
            let held = Arc::clone(&entry.held);
            if held.done.load(Ordering::Acquire) || held.loss.is_triggered() {
                self.remove(id);
                continue;
            }
            if now >= held.valid_until() {
                let capped = held.capped.load(Ordering::Relaxed);
                held.lose(if capped {
                    LossReason::MaxHoldReached
                } else {
                    LossReason::Expired
                });
                self.remove(id);
                continue;
            }
            let pull_forward = (held.lease().ttl() / 6).min(MAX_PULL_FORWARD);
            if entry.kind == Due::Renew && at <= now + pull_forward {
                if let Some(ttl) = held.next_ttl(now, min_ttl) {
                    entry.in_flight = true;
                    let lease = held.lease().clone();
                    batches.entry(ttl).or_default().push((id, lease));
                }
                self.schedule(id, None);
            } else if at <= now {
                // Stale entry (the lease was extended since): re-file it.
                self.schedule(id, None);
            }
        }
        for (ttl, items) in batches {
            self.spawn_batch(ttl, items);
        }
    }

    fn spawn_batch(&self, ttl: Duration, items: Vec<(u64, Lease)>) {
        let backend = Arc::clone(&self.backend);
        let Some(tx) = self.tx.upgrade() else { return };
        let held: Vec<Arc<Held>> = items
            .iter()
            .filter_map(|(id, _)| self.entries.get(id).map(|e| Arc::clone(&e.held)))
            .collect();
        let span = info_span!(
            "renew",
            backend = backend.capabilities().backend,
            count = items.len(),
            ?ttl
        );
        tokio::spawn(
            async move {
                let (ids, leases): (Vec<u64>, Vec<Lease>) = items.into_iter().unzip();
                let results = backend.extend_batch(&leases, ttl).await;
                debug!(ok = results.iter().filter(|r| r.is_ok()).count(), "renewed");
                for ((id, result), held) in ids.into_iter().zip(results).zip(held) {
                    if let Ok(valid_until) = &result {
                        held.set_validity(ttl, *valid_until);
                    }
                    let _ = tx.send(Cmd::Renewed(id, result));
                }
            }
            .instrument(span),
        );
    }
}
