//! Sessions: one etcd lease per client and TTL, shared by all its locks.
//!
//! etcd attaches keys to leases, and a lease stays alive while somebody
//! sends keep-alives for it. Granting a lease per lock would cost a round
//! trip per acquire and a keep-alive per lock per period; instead every lock
//! (and every waiter key) of one client with the same TTL hangs on one lease,
//! like etcd's own `concurrency.Session`. Holding 10,000 locks then costs one
//! keep-alive stream and one keep-alive per renewal round.
//!
//! # Validity
//! A lock is certainly ours until its lease can expire on the server. The
//! server keeps a lease alive for its TTL after it *receives* a keep-alive,
//! which is after we *sent* it; so the lease is alive at least until
//! `sent + ttl`, measured on our clock (minus the drift margin of
//! [`lock_core::deadline`]). Every lock's deadline is computed from the send
//! time of the last keep-alive that the server confirmed, never from when an
//! answer arrived: a grant answered late (a slow network, a paused process:
//! the situations behind Jepsen's etcd 3.4.3 finding that lease-based locks
//! alone do not give mutual exclusion) comes with a deadline that is already
//! short or past, and a grant whose deadline has passed is confirmed with a
//! fresh keep-alive or given up.
//!
//! # Per-lock expiry on a shared lease
//! A shared lease outlives each single lock. A lock that is not renewed (the
//! guard has `auto_renew(false)`, or hit `max_hold`) must still be freed when
//! its own TTL runs out, so this task deletes such a key (conditionally, on
//! its create revision) at its deadline. The server-side lease covers the
//! case where our whole process dies. To keep that bound tight, the task only
//! sends keep-alives on its own while the session holds no lock or has
//! waiters; otherwise the renewer's batched [`extend`](crate::EtcdBackend)
//! calls keep the lease alive, so it ends about when the renewed locks' own
//! deadlines do.
//!
//! # Loss
//! A keep-alive answered with TTL 0, or a request failing with "lease not
//! found", means the lease is gone and with it every key on it: every lock of
//! the session is reported lost at once through its loss signal.
//!
//! # Retirement
//! A session without locks, waiters or acquires in progress for ten TTLs
//! (at least five minutes) revokes its lease and ends, so that a client
//! that used many TTLs does not keep a lease per TTL for ever. The decision
//! and every acquire's claim on the session are taken under one lock, so a
//! lease is never revoked under a grant.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, Txn, TxnOp};
use lock_core::{Error, LossReason, LossSignal, Result, deadline};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::BACKEND;
use crate::errors::map;

/// One lease and the locks hanging on it.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: i64,
    /// The TTL the server granted (whole seconds).
    pub(crate) lease_ttl: Duration,
    /// The lease id in hex: the last path segment of our waiter keys, as in
    /// etcd's `concurrency.Mutex`.
    pub(crate) hex: String,
    state: Mutex<State>,
    cmd: mpsc::UnboundedSender<Cmd>,
    dead: CancellationToken,
}

#[derive(Debug)]
struct State {
    /// Send time of the newest keep-alive (or the grant) the server
    /// confirmed.
    last_ok_sent: Instant,
    /// Our keys on this lease, by etcd key.
    locks: HashMap<String, Entry>,
    /// One permit per etcd key: a client has one waiter key per lock name
    /// and lease, so two tasks of this client wanting the same lock take
    /// turns here before joining etcd's queue.
    gates: HashMap<String, Arc<Semaphore>>,
    waiters: usize,
    /// Acquires and extends in progress.
    users: usize,
    loss_reason: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Entry {
    /// Create revision (= fencing token); 0 when unknown (a put whose
    /// answer was lost).
    rev: i64,
    loss: Option<LossSignal>,
    /// When the lock's own TTL runs out; `None` once it only waits for
    /// its key to be deleted.
    expires_at: Option<Instant>,
    _permit: OwnedSemaphorePermit,
}

enum Cmd {
    Refresh {
        threshold: Instant,
        reply: oneshot::Sender<Result<Instant>>,
    },
    Kick,
}

/// Removes an unused gate when an acquire attempt ends (declared before
/// the gate and its permit, so it runs after they are dropped).
pub(crate) struct GateTidy(pub(crate) Arc<Session>, pub(crate) String);

impl Drop for GateTidy {
    fn drop(&mut self) {
        self.0.tidy_gate(&self.1);
    }
}

/// Keeps a session from being retired while an operation uses it.
#[derive(Debug)]
pub(crate) struct UseGuard(Arc<Session>);

impl UseGuard {
    /// The session.
    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for UseGuard {
    fn drop(&mut self) {
        self.0.state().users -= 1;
    }
}

/// Decrements the waiter count when a wait ends.
pub(crate) struct WaiterMark(Arc<Session>);

impl Drop for WaiterMark {
    fn drop(&mut self) {
        self.0.state().waiters -= 1;
    }
}

impl Session {
    /// Grants a lease of `ttl` (rounded up to whole seconds) and starts its
    /// keep-alive task.
    pub(crate) async fn grant(
        client: &Client,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Arc<Session>> {
        let secs = ttl_secs(ttl);
        let until = Instant::now() + timeout;
        let (sent, resp) = loop {
            let sent = Instant::now();
            let mut lease = client.lease_client();
            match tokio::time::timeout_at(until, lease.grant(secs, None)).await {
                Ok(Ok(r)) => break (sent, r),
                // Routed to a member that is down: it never arrived.
                Ok(Err(e)) if crate::errors::not_sent(&e) && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => return Err(map("granting a lease", e)),
                Err(_) => return Err(crate::errors::timed_out("granting a lease", timeout)),
            }
        };
        if resp.id() == 0 || resp.ttl() <= 0 {
            return Err(Error::backend(
                BACKEND,
                "granting a lease",
                format!("unexpected answer: id {} ttl {}", resp.id(), resp.ttl()),
            ));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            id: resp.id(),
            lease_ttl: Duration::from_secs(u64::try_from(resp.ttl()).unwrap_or(1)),
            hex: format!("{:x}", resp.id()),
            state: Mutex::new(State {
                last_ok_sent: sent,
                locks: HashMap::new(),
                gates: HashMap::new(),
                waiters: 0,
                users: 0,
                loss_reason: None,
            }),
            cmd: tx,
            dead: CancellationToken::new(),
        });
        info!(lease = %session.hex, ttl = ?session.lease_ttl, "etcd lease granted");
        let task = KeepAlive {
            session: Arc::downgrade(&session),
            client: client.clone(),
            id: session.id,
            lease_ttl: session.lease_ttl,
            timeout,
            stream: None,
            inflight: VecDeque::new(),
            pending: Vec::new(),
            last_sent: sent,
            dead: session.dead.clone(),
            idle_since: None,
        };
        tokio::spawn(task.run(rx));
        Ok(session)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update below is a few assignments that cannot panic half-way.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the lease is known to be gone.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.is_cancelled()
    }

    /// Completes when the lease is known to be gone.
    pub(crate) async fn died(&self) {
        self.dead.cancelled().await;
    }

    /// Why the lease is gone.
    pub(crate) fn loss_reason(&self) -> LossReason {
        LossReason::SessionLost(
            self.state()
                .loss_reason
                .clone()
                .unwrap_or_else(|| format!("etcd lease {} is gone", self.hex)),
        )
    }

    /// The lease is gone: every lock on it is lost.
    pub(crate) fn mark_dead(&self, why: String) {
        let locks: Vec<Entry> = {
            let mut st = self.state();
            if st.loss_reason.is_none() {
                st.loss_reason = Some(why.clone());
            }
            st.locks.drain().map(|(_, e)| e).collect()
        };
        if !self.dead.is_cancelled() {
            warn!(lease = %self.hex, reason = %why, locks = locks.len(), "etcd lease lost");
        }
        self.dead.cancel();
        let reason = LossReason::SessionLost(why);
        for e in locks {
            if let Some(loss) = e.loss {
                loss.trigger(reason.clone());
            }
        }
    }

    /// Retires the session if nothing uses it (no lock, no waiter, no
    /// acquire in progress), atomically with respect to
    /// [`Session::try_use`]; true if it did.
    fn try_retire(&self) -> bool {
        let mut st = self.state();
        if !st.locks.is_empty() || st.waiters > 0 || st.users > 0 {
            return false;
        }
        if st.loss_reason.is_none() {
            st.loss_reason = Some(format!("etcd lease {} was retired while idle", self.hex));
        }
        // Cancelled under the state lock: a concurrent `try_use` either ran
        // before (and we did not retire) or sees the session dead.
        self.dead.cancel();
        true
    }

    /// Marks the session as in use by an acquire or extend, so that it is
    /// not retired under it; `None` if it is dead already.
    pub(crate) fn try_use(self: &Arc<Self>) -> Option<UseGuard> {
        let mut st = self.state();
        if self.dead.is_cancelled() {
            return None;
        }
        st.users += 1;
        Some(UseGuard(Arc::clone(self)))
    }

    /// The gate of one etcd key.
    pub(crate) fn gate(&self, path: &str) -> Arc<Semaphore> {
        Arc::clone(
            self.state()
                .gates
                .entry(path.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(1))),
        )
    }

    /// Drops the gate of `path` if nobody uses it any more.
    pub(crate) fn tidy_gate(&self, path: &str) {
        let mut st = self.state();
        if let Some(g) = st.gates.get(path)
            && Arc::strong_count(g) == 1
            && g.available_permits() == 1
            && !st.locks.contains_key(path)
        {
            st.gates.remove(path);
        }
    }

    /// Counts a waiter (waiters keep the lease alive on their own).
    pub(crate) fn waiting(self: &Arc<Self>) -> WaiterMark {
        self.state().waiters += 1;
        let _ = self.cmd.send(Cmd::Kick);
        WaiterMark(Arc::clone(self))
    }

    /// The validity deadline of a lock of `ttl` granted by a request sent at
    /// `sent_at`: bounded by the lock's TTL and by the lease's last
    /// confirmed keep-alive.
    pub(crate) fn validity(&self, sent_at: Instant, ttl: Duration) -> Instant {
        let last = self.state().last_ok_sent;
        valid_until(sent_at, ttl).min(valid_until(last, self.lease_ttl))
    }

    /// Records a held lock (its permit is released when the entry goes).
    pub(crate) fn register(
        &self,
        path: String,
        rev: i64,
        loss: LossSignal,
        expires_at: Instant,
        permit: OwnedSemaphorePermit,
    ) {
        self.state().locks.insert(
            path,
            Entry {
                rev,
                loss: Some(loss),
                expires_at: Some(expires_at),
                _permit: permit,
            },
        );
        let _ = self.cmd.send(Cmd::Kick);
    }

    /// Hands a key whose deletion failed to the background task, which
    /// retries until it is gone (or the lease is).
    pub(crate) fn cleanup_later(&self, path: String, rev: i64, permit: OwnedSemaphorePermit) {
        if self.is_dead() {
            return;
        }
        self.state().locks.insert(
            path,
            Entry {
                rev,
                loss: None,
                expires_at: None,
                _permit: permit,
            },
        );
        let _ = self.cmd.send(Cmd::Kick);
    }

    /// Marks a held lock's deletion as pending (after a failed release).
    pub(crate) fn release_failed(&self, path: &str) {
        if let Some(e) = self.state().locks.get_mut(path) {
            e.expires_at = None;
            e.loss = None;
        }
        let _ = self.cmd.send(Cmd::Kick);
    }

    /// Takes a held lock's entry out (to move it to another session).
    pub(crate) fn take_entry(&self, path: &str, rev: i64) -> Option<Entry> {
        let mut st = self.state();
        match st.locks.get(path) {
            Some(e) if e.rev == rev && e.expires_at.is_some() => st.locks.remove(path),
            _ => None,
        }
    }

    /// Takes over a lock entry moved from another session.
    pub(crate) fn adopt(&self, path: String, entry: Entry) {
        self.state().locks.insert(path, entry);
        let _ = self.cmd.send(Cmd::Kick);
    }

    /// Forgets a lock (released, or known not to be ours).
    pub(crate) fn forget(&self, path: &str, rev: i64) {
        {
            let mut st = self.state();
            if st.locks.get(path).is_some_and(|e| e.rev == rev) {
                st.locks.remove(path);
            }
        }
        self.tidy_gate(path);
    }

    /// Whether `path` with `rev` is still registered as held.
    pub(crate) fn holds(&self, path: &str, rev: i64) -> bool {
        self.state()
            .locks
            .get(path)
            .is_some_and(|e| e.rev == rev && e.expires_at.is_some())
    }

    /// Moves a held lock's own expiry (after a renewal); false if the lock
    /// is no longer registered as held (it ran out or was released).
    pub(crate) fn extend_expiry(&self, path: &str, rev: i64, at: Instant) -> bool {
        match self.state().locks.get_mut(path) {
            Some(e) if e.rev == rev && e.expires_at.is_some() => {
                e.expires_at = Some(at);
                true
            }
            _ => false,
        }
    }

    /// One keep-alive for the whole lease; returns the send time of a
    /// confirmed keep-alive sent no earlier than `threshold`.
    pub(crate) async fn refresh(&self, threshold: Instant, timeout: Duration) -> Result<Instant> {
        if self.is_dead() {
            return Err(Error::LockLost {
                key: self.hex.clone(),
                reason: self.loss_reason(),
            });
        }
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Refresh { threshold, reply })
            .map_err(|_| gone("renewing the lease"))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(gone("renewing the lease")),
            Err(_) => Err(crate::errors::timed_out("renewing the lease", timeout)),
        }
    }
}

fn gone(ctx: &str) -> Error {
    Error::connection(BACKEND, ctx, "the keep-alive task stopped")
}

/// [`lock_core::deadline`] minus a scheduling allowance (1% of the TTL, at
/// most 50 ms): `lost()` must fire, and the holder's task must get to run,
/// before the server can expire the lease, also on a loaded machine.
pub(crate) fn valid_until(sent_at: Instant, ttl: Duration) -> Instant {
    let d = deadline(sent_at, ttl);
    d.checked_sub((ttl / 100).min(Duration::from_millis(50)))
        .unwrap_or(d)
        .max(sent_at)
}

/// The lease TTL for a lock TTL: whole seconds, rounded up.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// The background task of one session: keep-alive stream, per-lock expiry
/// and retried deletions.
struct KeepAlive {
    session: Weak<Session>,
    client: Client,
    id: i64,
    lease_ttl: Duration,
    timeout: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// Send times of keep-alives awaiting an answer (answers come in order).
    inflight: VecDeque<Instant>,
    pending: Vec<(Instant, oneshot::Sender<Result<Instant>>)>,
    last_sent: Instant,
    dead: CancellationToken,
    idle_since: Option<Instant>,
}

/// How long a session without locks or waiters lives on: ten TTLs, at
/// least five minutes.
fn idle_retirement(lease_ttl: Duration) -> Duration {
    (lease_ttl * 10).max(Duration::from_secs(300))
}

impl KeepAlive {
    /// Gives the lease back (best effort) and ends the task.
    async fn retire(&mut self) {
        self.dead.cancel();
        self.stream = None;
        let mut lease = self.client.lease_client();
        match tokio::time::timeout(self.timeout, lease.revoke(self.id)).await {
            Ok(Ok(_)) => debug!(lease = %format!("{:x}", self.id), "idle etcd lease revoked"),
            _ => debug!("revoking the idle lease failed; it expires by itself"),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Refresh { threshold, reply }) => {
                        self.pending.push((threshold, reply));
                        if self.inflight.back().is_none_or(|s| *s < threshold) {
                            self.send().await;
                        }
                    }
                    Some(Cmd::Kick) => {}
                    None => break,
                },
                msg = next_message(&mut self.stream) => match msg {
                    Ok(Some(resp)) => self.answer(resp.ttl()),
                    Ok(None) => self.broken("the server closed the keep-alive stream"),
                    Err(e) => self.broken(&e.to_string()),
                },
                _ = sleep_until(wake) => self.tick().await,
            }
            if self.dead.is_cancelled() {
                return;
            }
        }
        // The client is gone and no lock holds the session any more: give
        // the lease back rather than letting it linger for a TTL.
        self.retire().await;
    }

    fn keepalive_period(&self) -> Duration {
        (self.lease_ttl / 6).max(Duration::from_millis(200))
    }

    /// When `tick` next has something to do. It must never lie in the past
    /// for something `tick` will not do, or the task spins.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + self.keepalive_period();
        let mut sends_itself = true;
        if let Some(s) = self.session.upgrade() {
            let st = s.state();
            let mut held = false;
            for e in st.locks.values() {
                match e.expires_at {
                    Some(at) => {
                        held = true;
                        wake = wake.min(at);
                    }
                    None => wake = wake.min(now + Duration::from_millis(500)),
                }
            }
            // `tick` sends keep-alives only for an idle session or one with
            // waiters; held locks are kept alive by their renewals.
            sends_itself = !held || st.waiters > 0;
        }
        match self.inflight.front() {
            // An answer is awaited: `tick` only checks it for a timeout.
            Some(sent) => wake = wake.min(*sent + self.timeout),
            None if sends_itself => wake = wake.min(self.last_sent + self.keepalive_period()),
            None => {}
        }
        wake
    }

    async fn send(&mut self) {
        if self.stream.is_none() {
            // Opening the stream sends one keep-alive and waits for its
            // answer (etcd-client does both).
            let start = Instant::now();
            self.last_sent = start;
            let mut lease = self.client.lease_client();
            match tokio::time::timeout(self.timeout, lease.keep_alive(self.id)).await {
                Ok(Ok((keeper, stream))) => {
                    self.stream = Some((keeper, stream));
                    self.confirmed(start);
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(msg)))
                    if msg.contains("lease not found") =>
                {
                    self.lease_gone();
                }
                Ok(Err(e)) if crate::errors::is_lease_not_found(&e) => self.lease_gone(),
                Ok(Err(e)) => {
                    let e = map("opening the keep-alive stream", e);
                    self.fail_pending(&e);
                }
                Err(_) => {
                    let e = crate::errors::timed_out("opening the keep-alive stream", self.timeout);
                    self.fail_pending(&e);
                }
            }
            return;
        }
        let Some((keeper, _)) = &mut self.stream else {
            return;
        };
        let now = Instant::now();
        match keeper.keep_alive().await {
            Ok(()) => {
                self.inflight.push_back(now);
                self.last_sent = now;
            }
            Err(e) => self.broken(&e.to_string()),
        }
    }

    fn answer(&mut self, ttl: i64) {
        let Some(sent) = self.inflight.pop_front() else {
            return;
        };
        if ttl <= 0 {
            self.lease_gone();
        } else {
            self.confirmed(sent);
        }
    }

    fn lease_gone(&mut self) {
        let why = format!(
            "etcd lease {:x} expired or was revoked (keep-alive found no lease)",
            self.id
        );
        if let Some(s) = self.session.upgrade() {
            s.mark_dead(why.clone());
        }
        self.dead.cancel();
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(Error::LockLost {
                key: format!("{:x}", self.id),
                reason: LossReason::SessionLost(why.clone()),
            }));
        }
    }

    /// The server confirmed a keep-alive sent at `sent`.
    fn confirmed(&mut self, sent: Instant) {
        if let Some(s) = self.session.upgrade() {
            let mut st = s.state();
            if sent > st.last_ok_sent {
                st.last_ok_sent = sent;
            }
        }
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].0 <= sent {
                let (_, reply) = self.pending.swap_remove(i);
                let _ = reply.send(Ok(sent));
            } else {
                i += 1;
            }
        }
    }

    fn broken(&mut self, why: &str) {
        debug!(
            error = why,
            "etcd keep-alive stream broke; it reopens on next use"
        );
        self.stream = None;
        self.inflight.clear();
        let err = Error::connection(BACKEND, "renewing the lease", why.to_string());
        self.fail_pending(&err);
    }

    fn fail_pending(&mut self, e: &Error) {
        for (_, reply) in self.pending.drain(..) {
            let _ = reply.send(Err(Error::connection(
                BACKEND,
                "renewing the lease",
                e.to_string(),
            )));
        }
    }

    async fn tick(&mut self) {
        let Some(session) = self.session.upgrade() else {
            return;
        };
        let now = Instant::now();
        // Locks whose own TTL ran out and keys waiting for deletion.
        let due: Vec<(String, i64, Option<LossSignal>)> = {
            let mut st = session.state();
            let mut due = Vec::new();
            for (path, e) in st.locks.iter_mut() {
                match e.expires_at {
                    Some(at) if at <= now => {
                        e.expires_at = None;
                        due.push((path.clone(), e.rev, e.loss.take()));
                    }
                    None => due.push((path.clone(), e.rev, None)),
                    Some(_) => {}
                }
            }
            due
        };
        for (path, rev, loss) in due {
            if let Some(loss) = loss {
                debug!(key = %path, "lock TTL ran out without renewal; deleting its key");
                loss.trigger(LossReason::Expired);
            }
            match delete_own(&self.client, &path, rev, self.id, self.timeout).await {
                Ok(()) => session.forget(&path, rev),
                Err(e) => {
                    debug!(key = %path, error = %e, "deleting a key failed; will retry");
                    break;
                }
            }
        }
        // Idle or waiting sessions keep their lease alive themselves.
        let (held, waiters, empty) = {
            let st = session.state();
            (
                st.locks.values().any(|e| e.expires_at.is_some()),
                st.waiters,
                st.locks.is_empty() && st.waiters == 0 && st.users == 0,
            )
        };
        // A session unused for long is retired (its lease revoked), so that
        // a client that used many different TTLs does not keep a lease and
        // keep-alives per TTL for ever. The next lock of that TTL grants a
        // new lease.
        let now = Instant::now();
        if !empty {
            self.idle_since = None;
        } else if let Some(since) = self.idle_since {
            if now >= since + idle_retirement(self.lease_ttl) && session.try_retire() {
                drop(session);
                self.retire().await;
                return;
            }
        } else {
            self.idle_since = Some(now);
        }
        drop(session);
        let due = Instant::now() >= self.last_sent + self.keepalive_period();
        if due && (!held || waiters > 0) && self.inflight.is_empty() {
            self.send().await;
        }
        if self
            .inflight
            .front()
            .is_some_and(|sent| Instant::now() >= *sent + self.timeout)
        {
            // A keep-alive unanswered for a whole request timeout: the
            // stream is stuck (a frozen member); open a new one next time.
            self.broken("keep-alive answers are overdue");
        }
    }
}

/// Deletes one of our keys: on its create revision when known, else on our
/// lease (the key carries our lease id, so nobody else writes it).
pub(crate) async fn delete_own(
    client: &Client,
    path: &str,
    rev: i64,
    lease: i64,
    timeout: Duration,
) -> std::result::Result<(), etcd_client::Error> {
    let cmp = if rev > 0 {
        Compare::create_revision(path, CompareOp::Equal, rev)
    } else {
        Compare::lease(path, CompareOp::Equal, lease)
    };
    let txn = Txn::new().when([cmp]).and_then([TxnOp::delete(path, None)]);
    match crate::errors::txn_raw(client, timeout, txn).await {
        Ok(_) => Ok(()),
        Err(Some(e)) => Err(e),
        Err(None) => Err(etcd_client::Error::WatchError(
            "deleting a key timed out".into(),
        )),
    }
}

async fn next_message(
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> std::result::Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error> {
    match stream {
        Some((_, rx)) => rx.message().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttl_rounds_up_to_whole_seconds() {
        assert_eq!(ttl_secs(Duration::from_secs(2)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::MAX), i64::MAX);
    }

    #[test]
    fn validity_counts_from_the_send_time_and_keeps_margins() {
        let sent = Instant::now();
        let ttl = Duration::from_secs(10);
        let v = valid_until(sent, ttl);
        // 1% + 2 ms drift margin, plus 1% (at most 50 ms) scheduling allowance.
        assert_eq!(
            v,
            sent + ttl - Duration::from_millis(102) - Duration::from_millis(50)
        );
        let short = valid_until(sent, Duration::from_secs(2));
        assert_eq!(short, sent + Duration::from_millis(2000 - 22 - 20));
        assert!(valid_until(sent, Duration::from_millis(1)) >= sent);
    }
}
