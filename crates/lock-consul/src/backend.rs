//! The [`Backend`] implementation: one session per client, locks as KV
//! entries acquired by that session, blocking queries to wake waiters.
//!
//! # Why the client keeps a table of its own locks
//!
//! Consul lets a session acquire a key it already holds (the `lock` succeeds
//! again and only bumps the entry's ModifyIndex). With one session shared by
//! every lock of a client, two guards of the same client on the same key
//! would both "get" it. So the client keeps a claim per key it holds or is
//! acquiring, and answers "held" locally while a live claim exists.
//!
//! # Why the client deletes its own expired entries
//!
//! A Consul lock lives as long as its session, and the session is renewed
//! for all of the client's locks at once. A lock whose lease is not renewed
//! (`auto_renew(false)`, or a lease abandoned by its user) would therefore
//! stay taken for as long as the client lives. Each lease has a timer in the
//! client: when the lease's TTL passes without an extension, the client
//! deletes the entry (conditional on the acquire's ModifyIndex), keeping the
//! TTL's promise to the other contenders. If the whole client dies, the
//! session TTL (up to twice it, plus the lock-delay) frees the lock instead.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use lock_core::{
    AcquireRequest, Attempt, Backend, Backoff, CancellationToken, Capabilities, Error, Fencing,
    FencingToken, Key, Lease, LockInfo, LossReason, LossSignal, OwnerToken, Result, Subscription,
    Support, WakeHub, deadline, not_held,
};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use crate::BACKEND;
use crate::api::{Api, Entry, Failure, MAX_TXN_OPS, TxnOp, TxnOutcome};
use crate::config::ConsulConfig;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section in this module is a few assignments; a panic
    // cannot leave the data half-updated, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A distlock backend over Consul's sessions and KV store.
///
/// Cheap to clone: clones share the session, the HTTP connections and the
/// watches (they are the same client). Open it with
/// [`ConsulBackend::connect`], which creates the session and so checks the
/// address, TLS and token at once.
#[derive(Clone)]
pub struct ConsulBackend {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    id: u64,
    cfg: ConsulConfig,
    api: Arc<Api>,
    caps: Capabilities,
    hub: Arc<WakeHub>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The current session, for the keep-alive task and for `Drop`.
    current: Mutex<Option<Arc<Session>>>,
    claims: Mutex<HashMap<Key, Claim>>,
    watchers: Mutex<HashSet<Key>>,
}

/// One Consul session with its local validity deadline.
struct Session {
    id: String,
    /// Until when the session is certainly alive on the server: the last
    /// successful create/renew's send time plus its TTL, minus the margin.
    valid_until: Mutex<Instant>,
    dead: CancellationToken,
    leases: Mutex<HashMap<u64, Weak<LeaseState>>>,
}

impl Session {
    fn valid_until(&self) -> Instant {
        *locked(&self.valid_until)
    }

    fn renewed(&self, until: Instant) {
        let mut v = locked(&self.valid_until);
        if until > *v {
            *v = until;
        }
    }

    fn usable(&self) -> bool {
        !self.dead.is_cancelled() && Instant::now() < self.valid_until()
    }
}

/// What the backend knows about one of its grants.
pub(crate) struct LeaseState {
    backend_id: u64,
    id: u64,
    key: Key,
    entry: String,
    /// The ModifyIndex of the acquiring write: the fencing token, and the
    /// CAS index of every later conditional operation.
    index: u64,
    session: Arc<Session>,
    /// When the lease's own TTL runs out (last grant/extension send time +
    /// TTL − margin); the client frees the entry then.
    expires_at: Mutex<Instant>,
    loss: LossSignal,
    /// Cancelled once the entry is known not to be ours any more.
    done: CancellationToken,
}

/// The lease handle type stored in [`Lease::with_handle`].
struct Handle(Arc<LeaseState>);

enum Claim {
    /// An acquire (or the cleanup of one whose outcome is unknown) runs.
    Pending(u64),
    Held(Arc<LeaseState>),
}

impl Claim {
    fn active(&self, now: Instant) -> bool {
        match self {
            Claim::Pending(_) => true,
            Claim::Held(s) => {
                !s.done.is_cancelled() && !s.loss.is_triggered() && now < *locked(&s.expires_at)
            }
        }
    }

    fn expires_in(&self, now: Instant) -> Option<Duration> {
        match self {
            Claim::Pending(_) => None,
            Claim::Held(s) => Some(locked(&s.expires_at).saturating_duration_since(now)),
        }
    }

    fn id(&self) -> u64 {
        match self {
            Claim::Pending(id) => *id,
            Claim::Held(s) => s.id,
        }
    }
}

/// The value we store in a lock entry: who holds it. The owner token lets a
/// client recognise its own entry after an acquire whose answer was lost.
fn entry_value(owner: &OwnerToken) -> Vec<u8> {
    format!(r#"{{"distlock":1,"owner":"{}"}}"#, owner.to_hex()).into_bytes()
}

/// Deletes `entry` only if its ModifyIndex is still `index`. The
/// `check-index` is needed because Consul's `delete-cas` succeeds on a key
/// that does not exist.
fn delete_ops(entry: &str, index: u64) -> [TxnOp; 2] {
    [
        TxnOp::CheckIndex {
            key: entry.to_string(),
            index,
        },
        TxnOp::DeleteCas {
            key: entry.to_string(),
            index,
        },
    ]
}

fn entry_owner(entry: &Entry) -> Option<OwnerToken> {
    let value: serde_json::Value = serde_json::from_slice(entry.value.as_deref()?).ok()?;
    OwnerToken::from_hex(value.get("owner")?.as_str()?)
}

impl ConsulBackend {
    /// Connects: checks the configuration, creates the client's session
    /// (one request) and starts its keep-alive task.
    ///
    /// Errors: [`Error::Config`] for a bad CA file, [`Error::Connection`]
    /// when the agent cannot be reached within the timeouts,
    /// [`Error::Auth`] when the token is refused.
    pub async fn connect(cfg: ConsulConfig) -> Result<Self> {
        let api = Arc::new(Api::new(&cfg)?);
        let caps = capabilities(&cfg);
        let backend = ConsulBackend {
            shared: Arc::new(Shared {
                id: next_id(),
                cfg,
                api,
                caps,
                hub: WakeHub::new(),
                session: tokio::sync::Mutex::new(None),
                current: Mutex::new(None),
                claims: Mutex::new(HashMap::new()),
                watchers: Mutex::new(HashSet::new()),
            }),
        };
        backend.shared.session().await?;
        tokio::spawn(keepalive(Arc::downgrade(&backend.shared)));
        tokio::spawn(session_watch(Arc::downgrade(&backend.shared)));
        Ok(backend)
    }

    /// Parses `url` (see the [crate docs](crate#url)) and connects.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(url.parse()?).await
    }

    /// The configuration.
    pub fn config(&self) -> &ConsulConfig {
        &self.shared.cfg
    }

    fn own_state(&self, lease: &Lease) -> Option<Arc<LeaseState>> {
        lease
            .handle::<Handle>()
            .map(|h| Arc::clone(&h.0))
            .filter(|s| s.backend_id == self.shared.id)
    }

    fn check_ttl(&self, ttl: Duration) -> Result<()> {
        let caps = &self.shared.caps;
        if ttl < caps.min_ttl || ttl > caps.max_ttl {
            return Err(Error::invalid_options(format!(
                "ttl {} is outside consul's range {} to {}",
                humantime::format_duration(ttl),
                humantime::format_duration(caps.min_ttl),
                humantime::format_duration(caps.max_ttl),
            )));
        }
        Ok(())
    }
}

impl fmt::Debug for ConsulBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulBackend")
            .field("config", &self.shared.cfg)
            .finish_non_exhaustive()
    }
}

/// The capabilities a configuration gives.
pub(crate) fn capabilities(cfg: &ConsulConfig) -> Capabilities {
    Capabilities::new(BACKEND)
        .ttl_range(cfg.min_lock_ttl(), crate::MAX_SESSION_TTL)
        // A dead client's session is invalidated up to 2×TTL after its last
        // renewal (which may be just before its lease's end), then the
        // lock-delay blocks the key; 500 ms covers the server's timer, the
        // Raft commit and the blocking query.
        .expiry_grace(cfg.session_ttl * 2 + cfg.lock_delay + Duration::from_millis(500))
        .fencing(Fencing::Strict)
        .push_wakeup(Support::Yes)
        .fifo(Support::No(
            "Consul KV locks have no queue: waiters race when the key is freed",
        ))
        // A persistent server keeps sessions, entries and its Raft index,
        // and a new leader restarts every session's TTL timer; the lease
        // survives if the server is back within the session TTL.
        .survives_restart(Support::Yes)
        .batch_renewal(Support::Yes)
        .recheck_interval(Duration::from_secs(1))
}

impl Shared {
    /// The current session, creating one if there is none (or it died).
    async fn session(self: &Arc<Self>) -> Result<Arc<Session>> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref()
            && s.usable()
        {
            return Ok(Arc::clone(s));
        }
        let ttl = self.cfg.session_ttl;
        let sent = Instant::now();
        // Shown by `consul session list`: which process holds what.
        let name = format!("distlock (pid {}, client {})", std::process::id(), self.id);
        let id = self
            .api
            .create_session(&name, ttl, self.cfg.lock_delay, self.cfg.behavior)
            .await
            .map_err(|f| f.into_error("creating the session"))?;
        info!(session = %id, ?ttl, "consul session created");
        let s = Arc::new(Session {
            id,
            valid_until: Mutex::new(deadline(sent, ttl)),
            dead: CancellationToken::new(),
            leases: Mutex::new(HashMap::new()),
        });
        *slot = Some(Arc::clone(&s));
        *locked(&self.current) = Some(Arc::clone(&s));
        Ok(s)
    }

    /// Every lease of `session` is lost. With `destroy`, the session is
    /// also destroyed on the server (we gave it up, the server may not have),
    /// so its entries are freed without waiting for its TTL.
    fn session_lost(self: &Arc<Self>, session: &Arc<Session>, why: &str, destroy: bool) {
        if session.dead.is_cancelled() {
            return;
        }
        session.dead.cancel();
        warn!(session = %session.id, reason = why, "consul session lost; its locks are lost");
        {
            let mut cur = locked(&self.current);
            if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
                *cur = None;
            }
        }
        let leases: Vec<Arc<LeaseState>> = locked(&session.leases)
            .drain()
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        for state in leases {
            state.loss.trigger(LossReason::SessionLost(why.to_string()));
            self.finish(&state);
        }
        if destroy {
            let weak = Arc::downgrade(self);
            let id = session.id.clone();
            let give_up = Instant::now() + self.cfg.session_ttl * 2;
            tokio::spawn(async move {
                let mut backoff = Backoff::default();
                while Instant::now() < give_up {
                    let Some(shared) = weak.upgrade() else { return };
                    match shared.api.destroy_session(&id).await {
                        Ok(()) | Err(Failure::NotFound) => return,
                        Err(e) => debug!(error = ?e, "destroying an abandoned session failed"),
                    }
                    drop(shared);
                    sleep(backoff.next_delay()).await;
                }
            });
        }
    }

    /// The entry is no longer ours: stop its timer, drop its claim, and
    /// let this client's waiters look.
    fn finish(&self, state: &LeaseState) {
        state.done.cancel();
        locked(&state.session.leases).remove(&state.id);
        {
            let mut claims = locked(&self.claims);
            if claims.get(&state.key).is_some_and(|c| c.id() == state.id) {
                claims.remove(&state.key);
            }
        }
        self.hub.notify(&state.key);
    }

    fn drop_claim(&self, key: &Key, id: u64) {
        let mut claims = locked(&self.claims);
        if claims.get(key).is_some_and(|c| c.id() == id) {
            claims.remove(key);
        }
        drop(claims);
        self.hub.notify(key);
    }

    /// One acquire attempt under a pending claim.
    async fn acquire_claimed(
        self: &Arc<Self>,
        req: &AcquireRequest,
        claim: u64,
    ) -> Result<Attempt> {
        let entry = self.cfg.entry_key(&req.key);
        for _ in 0..2 {
            let session = match self.session().await {
                Ok(s) => s,
                Err(e) => {
                    self.drop_claim(&req.key, claim);
                    return Err(e);
                }
            };
            let op = TxnOp::Lock {
                key: entry.clone(),
                value: entry_value(&req.owner),
                session: session.id.clone(),
            };
            let sent = Instant::now();
            let outcome = self.api.txn(std::slice::from_ref(&op), false).await;
            match outcome {
                Ok(TxnOutcome::Committed(entries)) => {
                    let Some(index) = entries
                        .first()
                        .and_then(|e| e.as_ref())
                        .map(|e| e.modify_index)
                    else {
                        // Granted but unreadable: treat like an unknown outcome.
                        self.cleanup_later(req, claim, session);
                        return Err(Error::backend(
                            BACKEND,
                            "acquiring",
                            "the lock transaction returned no entry",
                        ));
                    };
                    return Ok(Attempt::Granted(
                        self.grant(req, claim, session, entry, index, sent),
                    ));
                }
                Ok(TxnOutcome::RolledBack(errors)) => {
                    let what = errors.first().map(|e| e.1.as_str()).unwrap_or("");
                    if what.contains("invalid session") {
                        self.session_lost(&session, "Consul no longer knows the session", false);
                        continue;
                    }
                    self.drop_claim(&req.key, claim);
                    if what.contains("already held") {
                        return Ok(Attempt::Held { expires_in: None });
                    }
                    if what.contains("lock delay") {
                        debug!(key = %req.key, "lock-delay in effect");
                        return Ok(Attempt::Held { expires_in: None });
                    }
                    if what.contains("ermission denied") || what.contains("ACL") {
                        return Err(Failure::Auth(what.to_string()).into_error("acquiring"));
                    }
                    return Err(Error::backend(
                        BACKEND,
                        "acquiring",
                        format!("lock transaction failed: {what}"),
                    ));
                }
                Err(f) if f.outcome_unknown() => {
                    self.cleanup_later(req, claim, session);
                    return Err(f.into_error("acquiring"));
                }
                Err(f) => {
                    self.drop_claim(&req.key, claim);
                    return Err(f.into_error("acquiring"));
                }
            }
        }
        self.drop_claim(&req.key, claim);
        Err(Error::backend(
            BACKEND,
            "acquiring",
            "Consul rejected two sessions in a row as invalid",
        ))
    }

    fn grant(
        self: &Arc<Self>,
        req: &AcquireRequest,
        claim: u64,
        session: Arc<Session>,
        entry: String,
        index: u64,
        sent: Instant,
    ) -> Lease {
        // The lease's own deadline. The session bounds it too, but through
        // the loss signal: if the session cannot be renewed, the keep-alive
        // task fires every lease's loss at the session's deadline.
        // Our validity ends at `deadline` (TTL minus the safety margin); the
        // entry itself is freed by our timer at the full TTL, so `lost()`
        // always fires before anyone else can have it.
        let valid_until = deadline(sent, req.ttl);
        let expires_at = sent + req.ttl;
        let state = Arc::new(LeaseState {
            backend_id: self.id,
            id: claim,
            key: req.key.clone(),
            entry,
            index,
            session: Arc::clone(&session),
            expires_at: Mutex::new(expires_at),
            loss: LossSignal::new(),
            done: CancellationToken::new(),
        });
        locked(&session.leases).insert(state.id, Arc::downgrade(&state));
        locked(&self.claims).insert(req.key.clone(), Claim::Held(Arc::clone(&state)));
        if session.dead.is_cancelled() {
            // The session died while we were acquiring.
            state
                .loss
                .trigger(LossReason::SessionLost("the session was lost".into()));
            self.finish(&state);
        }
        tokio::spawn(expiry_timer(Arc::downgrade(self), Arc::clone(&state)));
        debug!(key = %req.key, fencing = index, "acquired");
        Lease::new(
            req.key.clone(),
            req.owner,
            FencingToken::new(index),
            req.ttl,
            valid_until,
        )
        .with_loss_signal(state.loss.clone())
        .with_handle(Arc::new(Handle(state)))
    }

    /// An acquire whose answer was lost may have locked the key for our
    /// session. Find out and undo it, holding the claim meanwhile so no
    /// other acquire of this client races the cleanup.
    fn cleanup_later(self: &Arc<Self>, req: &AcquireRequest, claim: u64, session: Arc<Session>) {
        let weak = Arc::downgrade(self);
        let key = req.key.clone();
        let owner = req.owner;
        let entry = self.cfg.entry_key(&key);
        // After this long the claim is given up, so this client may try the
        // key again (a new grant writes a new owner, which the cleanup will
        // not touch); the cleanup itself goes on while the session lives.
        let release_claim_at = Instant::now() + self.cfg.session_ttl * 2;
        tokio::spawn(async move {
            let mut backoff = Backoff::default();
            let mut claim_held = true;
            loop {
                let Some(shared) = weak.upgrade() else { return };
                if session.dead.is_cancelled() {
                    break;
                }
                if claim_held && Instant::now() >= release_claim_at {
                    shared.drop_claim(&key, claim);
                    claim_held = false;
                }
                match shared.api.read(&entry, true, None).await {
                    Ok((Some(e), _))
                        if e.session.as_deref() == Some(session.id.as_str())
                            && entry_owner(&e) == Some(owner) =>
                    {
                        match shared
                            .api
                            .txn(&delete_ops(&entry, e.modify_index), false)
                            .await
                        {
                            Ok(_) => {
                                debug!(key = %key, "undid an acquire whose answer was lost");
                                break;
                            }
                            Err(f) => debug!(error = ?f, "cleanup delete failed; retrying"),
                        }
                    }
                    Ok(_) => break,
                    Err(f) => debug!(error = ?f, "cleanup read failed; retrying"),
                }
                drop(shared);
                sleep(backoff.next_delay()).await;
            }
            if claim_held && let Some(shared) = weak.upgrade() {
                shared.drop_claim(&key, claim);
            }
        });
    }

    /// Extends leases of this backend: one renewal per session and one
    /// consistent check transaction per 64 leases, all sent at once.
    async fn extend_own(
        self: &Arc<Self>,
        states: &[Arc<LeaseState>],
        ttl: Duration,
    ) -> Vec<Result<Instant>> {
        let sent = Instant::now();
        let mut sessions: Vec<Arc<Session>> = Vec::new();
        for s in states {
            if !sessions.iter().any(|x| Arc::ptr_eq(x, &s.session)) {
                sessions.push(Arc::clone(&s.session));
            }
        }
        let renewals = futures::future::join_all(
            sessions
                .iter()
                .map(|s| async move { (Arc::clone(s), self.api.renew_session(&s.id).await) }),
        );
        let checks = futures::future::join_all(states.chunks(MAX_TXN_OPS).map(|chunk| {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|s| TxnOp::CheckIndex {
                    key: s.entry.clone(),
                    index: s.index,
                })
                .collect();
            async move { self.api.txn(&ops, true).await }
        }));
        let (renewals, checks) = tokio::join!(renewals, checks);
        let mut session_result: Vec<(Arc<Session>, std::result::Result<(), Error>)> = Vec::new();
        for (s, r) in renewals {
            let r = match r {
                Ok(true) => {
                    s.renewed(deadline(sent, self.cfg.session_ttl));
                    Ok(())
                }
                Ok(false) if self.api.session_gone(&s.id).await => Err(Error::LockLost {
                    key: String::new(),
                    reason: LossReason::SessionLost("Consul no longer knows the session".into()),
                }),
                Ok(false) => Err(Error::connection(
                    BACKEND,
                    "renewing the session",
                    "the server did not know the session but a consistent read found it",
                )),
                Err(f) => Err(f.into_error("renewing the session")),
            };
            session_result.push((s, r));
        }
        let mut out = Vec::with_capacity(states.len());
        for (chunk, check) in states.chunks(MAX_TXN_OPS).zip(checks) {
            let failed: Option<Vec<usize>> = match &check {
                Ok(TxnOutcome::Committed(_)) => Some(Vec::new()),
                Ok(TxnOutcome::RolledBack(errs)) => Some(errs.iter().map(|e| e.0).collect()),
                Err(_) => None,
            };
            for (i, state) in chunk.iter().enumerate() {
                let session_ok = session_result
                    .iter()
                    .find(|(s, _)| Arc::ptr_eq(s, &state.session))
                    .map(|(_, r)| r);
                let result = match (session_ok, &failed, &check) {
                    (Some(Err(Error::LockLost { reason, .. })), _, _) => Err(Error::LockLost {
                        key: state.key.to_string(),
                        reason: reason.clone(),
                    }),
                    (_, Some(failed), _) if failed.contains(&i) => Err(not_held(&state.key)),
                    (Some(Err(e)), _, _) => Err(Error::connection(
                        BACKEND,
                        "renewing the session",
                        e.to_string(),
                    )),
                    (_, None, Err(_)) => Err(Error::connection(
                        BACKEND,
                        "checking the lock entries",
                        "the check transaction failed",
                    )),
                    _ if state.done.is_cancelled() => Err(not_held(&state.key)),
                    // Our expiry timer fired while the renewal was under way:
                    // the entry is being freed, the loss already reported.
                    _ if state.loss.is_triggered() => Err(Error::LockLost {
                        key: state.key.to_string(),
                        reason: state.loss.reason().unwrap_or(LossReason::Expired),
                    }),
                    _ => {
                        *locked(&state.expires_at) = sent + ttl;
                        Ok(deadline(sent, ttl))
                    }
                };
                out.push(result);
            }
        }
        // Apply losses after computing the answers.
        for (s, r) in &session_result {
            if matches!(r, Err(Error::LockLost { .. })) {
                self.session_lost(s, "Consul no longer knows the session", false);
            }
        }
        for (state, r) in states.iter().zip(&out) {
            if let Err(Error::LockLost { reason, .. }) = r {
                state.loss.trigger(reason.clone());
                self.finish(state);
            }
        }
        out
    }
}

/// Frees the entry when the lease's TTL passes without an extension.
async fn expiry_timer(weak: Weak<Shared>, state: Arc<LeaseState>) {
    loop {
        let at = *locked(&state.expires_at);
        tokio::select! {
            _ = state.done.cancelled() => return,
            _ = sleep_until(at) => {}
        }
        if *locked(&state.expires_at) <= Instant::now() {
            break;
        }
    }
    state.loss.trigger(LossReason::Expired);
    debug!(key = %state.key, "lease ran out without renewal; freeing the entry");
    let mut backoff = Backoff::default();
    loop {
        if state.done.is_cancelled() {
            return;
        }
        let Some(shared) = weak.upgrade() else { return };
        match shared
            .api
            .txn(&delete_ops(&state.entry, state.index), false)
            .await
        {
            Ok(_) => {
                shared.finish(&state);
                return;
            }
            Err(f) => {
                if state.session.dead.is_cancelled() {
                    // The session is gone or being destroyed: that frees it.
                    shared.finish(&state);
                    return;
                }
                debug!(error = ?f, key = %state.key, "freeing an expired entry failed; retrying");
            }
        }
        drop(shared);
        tokio::select! {
            _ = state.done.cancelled() => return,
            _ = sleep(backoff.next_delay()) => {}
        }
    }
}

/// Renews the current session every third of its TTL. If it cannot be
/// renewed before its local deadline, every lease on it is lost at that
/// deadline (before Consul could invalidate it), and the session is
/// destroyed as soon as the server can be reached.
async fn keepalive(weak: Weak<Shared>) {
    let mut backoff = Backoff::default();
    let (api, ttl) = match weak.upgrade() {
        Some(s) => (Arc::clone(&s.api), s.cfg.session_ttl),
        None => return,
    };
    let period = ttl / 3;
    let mut next = Instant::now() + period;
    loop {
        let current = match weak.upgrade() {
            Some(shared) => locked(&shared.current).clone(),
            None => return,
        };
        let Some(session) = current.filter(|s| !s.dead.is_cancelled()) else {
            // No live session: the next acquire creates one.
            sleep(period).await;
            next = Instant::now();
            continue;
        };
        let lost_at = session.valid_until();
        let renew = async {
            sleep_until(next).await;
            let sent = Instant::now();
            // A renewal that hangs is abandoned after a period, so that
            // two more can be tried before the session's deadline.
            let answer = match tokio::time::timeout(period, api.renew_session(&session.id)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Decode("the renewal timed out".into())),
            };
            (sent, answer)
        };
        let outcome = tokio::select! {
            r = renew => Some(r),
            _ = sleep_until(lost_at) => None,
            _ = session.dead.cancelled() => continue,
        };
        let Some(shared) = weak.upgrade() else { return };
        match outcome {
            Some((sent, Ok(true))) => {
                session.renewed(deadline(sent, ttl));
                backoff = Backoff::default();
                next = sent + period;
            }
            Some((_, Ok(false))) if api.session_gone(&session.id).await => {
                shared.session_lost(&session, "Consul invalidated the session", false);
            }
            Some((_, Ok(false))) => {
                // A leader that has not applied its log yet: try again soon.
                debug!("session renewal answered 'not found' but the session exists");
                next = Instant::now() + backoff.next_delay().min(period / 4);
            }
            Some((_, Err(f))) => {
                let retry = backoff.next_delay().min(period / 4);
                debug!(error = ?f, ?retry, "session renewal failed; retrying");
                next = Instant::now() + retry;
            }
            None => {
                if session.valid_until() <= Instant::now() {
                    shared.session_lost(
                        &session,
                        "the session could not be renewed within its TTL",
                        true,
                    );
                }
            }
        }
    }
}

/// Watches the current session with a blocking query, so that a session
/// invalidated by Consul (an operator's `consul session destroy`, say) is
/// reported through every lease's `lost()` within milliseconds rather than
/// at the next renewal.
async fn session_watch(weak: Weak<Shared>) {
    let mut index = 0u64;
    let mut watched = String::new();
    let mut backoff = Backoff::default();
    loop {
        let (api, wait, current) = match weak.upgrade() {
            Some(shared) => (
                Arc::clone(&shared.api),
                shared.cfg.wait,
                locked(&shared.current).clone(),
            ),
            None => return,
        };
        let Some(session) = current.filter(|s| !s.dead.is_cancelled()) else {
            sleep(Duration::from_millis(500)).await;
            continue;
        };
        if watched != session.id {
            watched = session.id.clone();
            index = 0;
        }
        let result = tokio::select! {
            r = api.session_exists(&session.id, false, Some((index, wait))) => r,
            _ = session.dead.cancelled() => continue,
        };
        match result {
            Ok((true, new_index)) => {
                backoff = Backoff::default();
                index = if new_index < index {
                    0
                } else {
                    new_index.max(1)
                };
            }
            Ok((false, _)) if api.session_gone(&session.id).await => {
                if let Some(shared) = weak.upgrade() {
                    shared.session_lost(&session, "Consul invalidated the session", false);
                }
            }
            Ok((false, _)) => {
                // A stale answer (a new leader still applying its log).
                sleep(backoff.next_delay()).await;
                index = 0;
            }
            Err(f) => {
                let pause = backoff.next_delay();
                debug!(error = ?f, ?pause, "session watch failed; retrying");
                sleep(pause).await;
                index = 0;
            }
        }
    }
}

/// Watches one key with blocking queries while this client has waiters on
/// it, and wakes them on every change.
async fn watch(weak: Weak<Shared>, key: Key) {
    let mut index = 0u64;
    let mut first = true;
    let mut backoff = Backoff::default();
    loop {
        let Some(shared) = weak.upgrade() else { return };
        {
            let mut w = locked(&shared.watchers);
            if !shared.hub.is_watched(&key) {
                w.remove(&key);
                return;
            }
        }
        let entry = shared.cfg.entry_key(&key);
        let wait = shared.cfg.wait;
        let hub = Arc::clone(&shared.hub);
        let api = Arc::clone(&shared.api);
        // Hold no strong reference while blocking: the backend may go away.
        drop(shared);
        let query = api.read(&entry, false, Some((index, wait)));
        let unwatched = async {
            loop {
                sleep(Duration::from_millis(500)).await;
                if !hub.is_watched(&key) {
                    return;
                }
            }
        };
        let result = tokio::select! {
            r = query => Some(r),
            _ = unwatched => None,
        };
        let Some(result) = result else { continue };
        match result {
            Ok((e, new_index)) => {
                backoff = Backoff::default();
                let free = e.as_ref().is_none_or(|e| e.session.is_none());
                if (first && free) || (!first && new_index != index) {
                    hub.notify(&key);
                }
                first = false;
                // Consul: an index that goes backwards means a reset.
                index = if new_index < index {
                    0
                } else {
                    new_index.max(1)
                };
            }
            Err(f) => {
                // Something may have changed unseen: let the waiters re-check.
                hub.notify(&key);
                let pause = backoff.next_delay();
                debug!(error = ?f, key = %key, ?pause, "blocking query failed; retrying");
                sleep(pause).await;
                index = 0;
                first = true;
            }
        }
    }
}

#[async_trait]
impl Backend for ConsulBackend {
    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        self.check_ttl(req.ttl)?;
        let claim = next_id();
        {
            let now = Instant::now();
            let mut claims = locked(&self.shared.claims);
            if let Some(c) = claims.get(&req.key)
                && c.active(now)
            {
                return Ok(Attempt::Held {
                    expires_in: c.expires_in(now),
                });
            }
            claims.insert(req.key.clone(), Claim::Pending(claim));
        }
        self.shared.acquire_claimed(req, claim).await
    }

    async fn subscribe(&self, key: &Key) -> Result<Subscription> {
        let sub = self.shared.hub.subscribe(key);
        let mut w = locked(&self.shared.watchers);
        if w.insert(key.clone()) {
            tokio::spawn(watch(Arc::downgrade(&self.shared), key.clone()));
        }
        Ok(sub)
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        self.extend_batch(std::slice::from_ref(lease), ttl)
            .await
            .pop()
            .unwrap_or_else(|| Err(not_held(lease.key())))
    }

    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        if let Err(e) = self.check_ttl(ttl) {
            return leases
                .iter()
                .map(|_| Err(Error::invalid_options(e.to_string())))
                .collect();
        }
        let mut out: Vec<Option<Result<Instant>>> = Vec::with_capacity(leases.len());
        let mut own: Vec<(usize, Arc<LeaseState>)> = Vec::new();
        for (i, lease) in leases.iter().enumerate() {
            match self.own_state(lease) {
                Some(s) if s.done.is_cancelled() || s.session.dead.is_cancelled() => {
                    out.push(Some(Err(not_held(lease.key()))))
                }
                Some(s) => {
                    own.push((i, s));
                    out.push(None);
                }
                None => out.push(Some(self.extend_foreign(lease).await)),
            }
        }
        if !own.is_empty() {
            let states: Vec<Arc<LeaseState>> = own.iter().map(|(_, s)| Arc::clone(s)).collect();
            let results = self.shared.extend_own(&states, ttl).await;
            for ((i, _), r) in own.into_iter().zip(results) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(r);
                }
            }
        }
        out.into_iter()
            .zip(leases)
            .map(|(r, l)| r.unwrap_or_else(|| Err(not_held(l.key()))))
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        if let Some(state) = self.own_state(lease) {
            let ops = delete_ops(&state.entry, state.index);
            return match self.shared.api.txn(&ops, false).await {
                Ok(TxnOutcome::Committed(_)) => {
                    self.shared.finish(&state);
                    Ok(true)
                }
                Ok(TxnOutcome::RolledBack(_)) => {
                    self.shared.finish(&state);
                    Ok(false)
                }
                Err(f) => Err(f.into_error("releasing")),
            };
        }
        // A lease from another client: only its owner token proves it.
        let entry_key = self.shared.cfg.entry_key(lease.key());
        let (entry, _) = self
            .shared
            .api
            .read(&entry_key, true, None)
            .await
            .map_err(|f| f.into_error("reading the lock entry"))?;
        let Some(entry) = entry else { return Ok(false) };
        if entry.session.is_none()
            || entry.modify_index != lease.fencing_token().get()
            || entry_owner(&entry) != Some(*lease.owner())
        {
            return Ok(false);
        }
        match self
            .shared
            .api
            .txn(&delete_ops(&entry_key, entry.modify_index), false)
            .await
        {
            Ok(TxnOutcome::Committed(_)) => Ok(true),
            Ok(TxnOutcome::RolledBack(_)) => Ok(false),
            Err(f) => Err(f.into_error("releasing")),
        }
    }

    async fn inspect(&self, key: &Key) -> Result<LockInfo> {
        let (entry, _) = self
            .shared
            .api
            .read(&self.shared.cfg.entry_key(key), true, None)
            .await
            .map_err(|f| f.into_error("reading the lock entry"))?;
        Ok(match entry {
            Some(e) if e.session.is_some() => {
                let now = Instant::now();
                let expires_in = match locked(&self.shared.claims).get(key) {
                    Some(Claim::Held(s)) if s.index == e.modify_index => {
                        Some(locked(&s.expires_at).saturating_duration_since(now))
                    }
                    _ => None,
                };
                LockInfo::held(Some(FencingToken::new(e.modify_index)), expires_in)
            }
            _ => LockInfo::free().with_waiters(None),
        })
    }
}

impl ConsulBackend {
    /// Extending a lease this client did not grant: only its owner can, and
    /// only through the client that holds its session.
    async fn extend_foreign(&self, lease: &Lease) -> Result<Instant> {
        let (entry, _) = self
            .shared
            .api
            .read(&self.shared.cfg.entry_key(lease.key()), true, None)
            .await
            .map_err(|f| f.into_error("reading the lock entry"))?;
        match entry {
            Some(e)
                if e.session.is_some()
                    && e.modify_index == lease.fencing_token().get()
                    && entry_owner(&e) == Some(*lease.owner()) =>
            {
                Err(Error::Unsupported {
                    backend: BACKEND,
                    what:
                        "extending a lease through another client than the one holding its session"
                            .into(),
                })
            }
            _ => Err(not_held(lease.key())),
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // No guard can exist any more (guards keep the client alive), so
        // the session holds nothing we still use: destroy it now rather
        // than leaving it to its TTL.
        let Some(session) = locked(&self.current).take() else {
            return;
        };
        // Stops the session watch and the keep-alive at once.
        session.dead.cancel();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let api = Arc::clone(&self.api);
        rt.spawn(async move {
            if let Err(e) = api.destroy_session(&session.id).await {
                debug!(error = ?e, "destroying the session on drop failed; it will expire");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_value_round_trips_the_owner() {
        let owner = OwnerToken::generate();
        let entry = Entry {
            session: Some("s".into()),
            modify_index: 7,
            value: Some(entry_value(&owner)),
        };
        assert_eq!(entry_owner(&entry), Some(owner));
        let foreign = Entry {
            value: Some(b"hello".to_vec()),
            ..entry.clone()
        };
        assert_eq!(entry_owner(&foreign), None);
        let empty = Entry {
            value: None,
            ..entry
        };
        assert_eq!(entry_owner(&empty), None);
    }

    #[test]
    fn capabilities_follow_the_configuration() {
        let cfg: ConsulConfig = "consul://h?session_ttl_min=1s&session_ttl=2s&lock_delay=3s"
            .parse()
            .unwrap();
        let caps = capabilities(&cfg);
        assert_eq!(caps.min_ttl, Duration::from_secs(4));
        assert_eq!(caps.expiry_grace, Duration::from_millis(7500));
        assert!(!caps.fifo.is_supported());
        assert!(caps.push_wakeup.is_supported());
    }
}
