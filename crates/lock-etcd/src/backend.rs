//! The [`Backend`] implementation: etcd's `concurrency.Mutex` protocol.
//!
//! A lock named `K` is the key range `<prefix><K escaped>/`. Each contender
//! puts one key `<range><lease id in hex>` attached to its session's lease;
//! etcd gives every key a cluster-wide create revision, and the key with the
//! lowest create revision in the range holds the lock. That makes the queue
//! FIFO, makes the holder's create revision a fencing token (no later grant
//! can have a lower one), and is exactly what `etcdctl lock` does, so both
//! meet in one queue.
//!
//! Cost: an uncontended acquire is one transaction (put our key if absent,
//! read the lowest key); a release is one conditional delete. A waiter reads
//! its predecessor and watches that key's deletion on the client's shared
//! watch stream, starting at the revision it read, so no deletion can slip
//! between the read and the watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};
use lock_core::{
    AcquireRequest, Attempt, Backend, Backoff, Capabilities, Error, Fencing, FencingToken, Key,
    Lease, LockInfo, LossReason, Result, Subscription, Support, WakeHub, jitter, not_held,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::BACKEND;
use crate::config::EtcdConfig;
use crate::errors::{call, is_lease_not_found, map, txn_raw};
use crate::session::{GateTidy, Session, UseGuard, delete_own, ttl_secs, valid_until};
use crate::watch::Watches;

/// The most operations etcd accepts in one transaction by default
/// (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// distlock's etcd backend. Cheap to clone; clones share the connection,
/// the sessions (leases) and the watch stream.
///
/// See the [crate docs](crate) for the protocol, guarantees and URL format.
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    cfg: EtcdConfig,
    caps: Capabilities,
    sessions: tokio::sync::Mutex<HashMap<i64, Arc<Session>>>,
    watches: Watches,
    hub: Arc<WakeHub>,
}

/// What a lease carries for us.
#[derive(Debug)]
pub(crate) struct LockHandle {
    /// The session whose lease the key hangs on (changes when an extend
    /// beyond the lease's TTL moves the key to a longer lease).
    session: std::sync::Mutex<Arc<Session>>,
    pub(crate) path: String,
    pub(crate) rev: i64,
}

impl LockHandle {
    fn session(&self) -> Arc<Session> {
        Arc::clone(&self.session.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn set_session(&self, s: Arc<Session>) {
        *self.session.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }
}

/// When a lock whose own TTL ran out is deleted by its client: at the
/// server-side deadline (`valid_until` plus the drift margin) plus a little
/// slack, so that it is never gone before `lost()` fired.
fn sweep_at(valid_until: Instant, ttl: Duration) -> Instant {
    valid_until + lock_core::safety_margin(ttl) + Duration::from_millis(100)
}

/// The answer of the enqueue transaction.
struct Enqueued {
    my_rev: i64,
    owner_rev: i64,
    sent_at: Instant,
}

enum Check {
    /// Our key is gone (its lease expired, or somebody deleted it).
    Vanished,
    /// Nobody is before us.
    First,
    /// Wait for this key, watching from this revision on.
    Behind(Vec<u8>, i64),
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl EtcdBackend {
    /// Connects and checks that the cluster answers (and accepts our
    /// credentials) within the connect timeout.
    ///
    /// Errors: [`Error::Config`] for unusable settings (such as an unreadable
    /// CA file), [`Error::Auth`] for refused credentials,
    /// [`Error::Connection`] when no endpoint answers in time.
    pub async fn connect(cfg: EtcdConfig) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), cfg.request_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from the leader must fail our requests and
            // streams rather than serve stale state or hang.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some((user, pass)) = &cfg.user {
            opts = opts.with_user(user.clone(), pass.clone());
        }
        if let Some(tls) = &cfg.tls {
            opts = opts.with_tls(tls_options(tls)?);
        }
        let urls = cfg.urls();
        let client = match tokio::time::timeout(
            cfg.connect_timeout,
            Client::connect(urls, Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(map("connecting", e)),
            Err(_) => {
                return Err(Error::connection(
                    BACKEND,
                    "connecting",
                    format!("no endpoint answered within {:?}", cfg.connect_timeout),
                ));
            }
        };
        // The channel connects lazily: one read proves the cluster answers
        // and lets us read our namespace.
        let mut kv = client.kv_client();
        call(
            "checking the connection",
            cfg.connect_timeout,
            kv.get(
                cfg.prefix.clone(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        )
        .await?;
        debug!(endpoints = ?cfg.endpoints, prefix = %cfg.prefix, "connected to etcd");
        let caps = Capabilities::new(BACKEND)
            // etcd's minimum lease TTL with default election settings is
            // 2 s (a 1 s lease is granted as 2 s), and leases are whole
            // seconds.
            .ttl_range(Duration::from_secs(2), Duration::from_secs(7 * 86_400))
            // A TTL that is not whole seconds is rounded up (< 1 s), and
            // the server checks for expired leases every 500 ms.
            .expiry_grace(Duration::from_millis(1500))
            .fencing(Fencing::Strict)
            .push_wakeup(Support::Yes)
            .fifo(Support::Yes)
            .survives_restart(Support::Yes)
            .batch_renewal(Support::Yes)
            .recheck_interval(cfg.recheck_interval);
        let watches = Watches::start(client.watch_client(), cfg.request_timeout);
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                client,
                cfg,
                caps,
                sessions: tokio::sync::Mutex::new(HashMap::new()),
                watches,
                hub: WakeHub::new(),
            }),
        })
    }

    /// Parses `url` (see the [crate docs](crate#url)) and connects.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(EtcdConfig::from_url(url)?).await
    }

    /// The configuration.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.cfg
    }

    /// The underlying etcd client, for running your own transactions with
    /// [`ownership_compare`](crate::ownership_compare).
    pub fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// The etcd key range of a lock: `<prefix><key escaped>/`. Waiter keys
    /// are this plus the lease id in hex, as with `etcdctl lock`.
    pub fn lock_prefix(&self, key: &Key) -> String {
        format!("{}{}/", self.inner.cfg.prefix, key.escaped())
    }

    fn timeout(&self) -> Duration {
        self.inner.cfg.request_timeout
    }

    /// The live session for `ttl` (granting a lease if there is none),
    /// marked in use so that it is not retired while the caller works.
    async fn session(&self, ttl: Duration) -> Result<UseGuard> {
        let secs = ttl_secs(ttl);
        let mut sessions = self.inner.sessions.lock().await;
        sessions.retain(|_, s| !s.is_dead());
        if let Some(used) = sessions.get(&secs).and_then(|s| s.try_use()) {
            return Ok(used);
        }
        let s = Session::grant(&self.inner.client, ttl, self.timeout()).await?;
        sessions.insert(secs, Arc::clone(&s));
        s.try_use().ok_or_else(|| {
            Error::connection(BACKEND, "granting a lease", "the new lease died at once")
        })
    }

    /// One transaction: put our key if absent and read the owner. Like
    /// `concurrency.Mutex.tryAcquire`.
    async fn enqueue(&self, session: &Session, prefix: &str, path: &str) -> Result<Enqueued> {
        let owner = || {
            TxnOp::get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
        };
        let txn = Txn::new()
            .when([Compare::create_revision(path, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(path, "", Some(PutOptions::new().with_lease(session.id))),
                owner(),
            ])
            .or_else([TxnOp::get(path, None), owner()]);
        let sent_at = Instant::now();
        let resp = match txn_raw(&self.inner.client, self.timeout(), txn).await {
            Ok(r) => r,
            Err(Some(e)) if is_lease_not_found(&e) => {
                session.mark_dead(format!(
                    "etcd lease {} not found when queueing (it expired)",
                    session.hex
                ));
                return Err(Error::LockLost {
                    key: path.to_string(),
                    reason: session.loss_reason(),
                });
            }
            Err(Some(e)) => return Err(map("acquiring", e)),
            Err(None) => return Err(crate::errors::timed_out("acquiring", self.timeout())),
        };
        let ops = resp.op_responses();
        let first_kv_rev = |i: usize| match ops.get(i) {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.create_revision()),
            _ => None,
        };
        let my_rev = if resp.succeeded() {
            header_rev(&resp)?
        } else {
            // Our key exists already: a deletion we could not confirm
            // earlier. Never reuse it (its revision may have been handed
            // out as a token); delete it and let the caller retry.
            let rev = first_kv_rev(0).unwrap_or(0);
            warn!(key = %path, "found a stale waiter key of ours; deleting it");
            delete_own(&self.inner.client, path, rev, session.id, self.timeout())
                .await
                .map_err(|e| map("deleting a stale waiter key", e))?;
            return Err(Error::connection(
                BACKEND,
                "acquiring",
                "a stale waiter key was removed; retry",
            ));
        };
        let owner_rev = first_kv_rev(1).unwrap_or(my_rev);
        Ok(Enqueued {
            my_rev,
            owner_rev,
            sent_at,
        })
    }

    /// Reads our predecessor (the newest key created before ours) and
    /// whether our key still exists, in one consistent read.
    async fn check(&self, prefix: &str, path: &str, my_rev: i64) -> Result<Check> {
        let txn = Txn::new().and_then([
            TxnOp::get(
                prefix,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_max_create_revision(my_rev - 1)
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_limit(1)
                        .with_keys_only(),
                ),
            ),
            TxnOp::get(path, Some(GetOptions::new().with_keys_only())),
        ]);
        let resp = crate::errors::txn(
            "waiting for the lock",
            &self.inner.client,
            self.timeout(),
            txn,
        )
        .await?;
        let rev = header_rev(&resp)?;
        let ops = resp.op_responses();
        let mine = matches!(ops.get(1), Some(TxnOpResponse::Get(g))
            if g.kvs().first().is_some_and(|kv| kv.create_revision() == my_rev));
        if !mine {
            return Ok(Check::Vanished);
        }
        Ok(match ops.first() {
            Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
                Some(kv) => Check::Behind(kv.key().to_vec(), rev + 1),
                None => Check::First,
            },
            _ => Check::First,
        })
    }

    /// Builds the lease for a grant whose deciding request was sent at
    /// `sent_at`, and registers it with the session.
    async fn grant(
        &self,
        req: &AcquireRequest,
        session: &Arc<Session>,
        path: String,
        rev: i64,
        sent_at: Instant,
        permit: OwnedSemaphorePermit,
    ) -> Result<Lease> {
        let mut valid_until = session.validity(sent_at, req.ttl);
        if valid_until <= Instant::now() {
            // The lease's last confirmed keep-alive is too old to vouch for
            // this grant (a slow answer, or a long wait): confirm it now.
            match session.refresh(Instant::now(), self.timeout()).await {
                Ok(_) => valid_until = session.validity(sent_at, req.ttl),
                Err(e) => {
                    self.abandon(session, &path, rev, permit).await;
                    return Err(e);
                }
            }
            if valid_until <= Instant::now() {
                self.abandon(session, &path, rev, permit).await;
                return Err(Error::connection(
                    BACKEND,
                    "acquiring",
                    "the grant arrived after its TTL had passed",
                ));
            }
        }
        let token = u64::try_from(rev).map_err(|_| {
            Error::backend(BACKEND, "acquiring", format!("negative revision {rev}"))
        })?;
        let lease = Lease::new(
            req.key.clone(),
            req.owner,
            FencingToken::new(token),
            req.ttl,
            valid_until,
        )
        .with_handle(Arc::new(LockHandle {
            session: std::sync::Mutex::new(Arc::clone(session)),
            path: path.clone(),
            rev,
        }));
        session.register(
            path,
            rev,
            lease.loss_signal().clone(),
            sweep_at(valid_until, req.ttl),
            permit,
        );
        Ok(lease)
    }

    /// Deletes our waiter key (giving up a place in the queue); if that
    /// fails, the session retries in the background and keeps the gate.
    async fn abandon(&self, session: &Session, path: &str, rev: i64, permit: OwnedSemaphorePermit) {
        if session.is_dead() {
            return;
        }
        match delete_own(&self.inner.client, path, rev, session.id, self.timeout()).await {
            Ok(()) => drop(permit),
            Err(e) => {
                debug!(key = %path, error = %e, "removing the waiter key failed; retrying in the background");
                session.cleanup_later(path.to_string(), rev, permit);
            }
        }
    }

    async fn acquire_inner(
        &self,
        req: &AcquireRequest,
        until: Option<Instant>,
        cancel: &CancellationToken,
        wait: bool,
    ) -> Result<Option<Lease>> {
        let prefix = self.lock_prefix(&req.key);
        let mut backoff = Backoff::default();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let until_or_far = until.unwrap_or(far);
        // Sleeps for a retry; false when the wait is over.
        let pause = |d: Duration| async move {
            let wake = (Instant::now() + d).min(until_or_far);
            tokio::select! {
                _ = cancel.cancelled() => false,
                _ = sleep_until(wake) => Instant::now() < until_or_far,
            }
        };
        'outer: loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            let session = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(None),
                s = self.session(req.ttl) => s,
            };
            let used = match session {
                Ok(s) => s,
                Err(e) if wait && e.is_retryable() => {
                    warn!(error = %e, "granting a lease failed; retrying");
                    if pause(backoff.next_delay()).await {
                        continue;
                    }
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let session = Arc::clone(used.session());
            let path = format!("{prefix}{}", session.hex);
            let _tidy = GateTidy(Arc::clone(&session), path.clone());
            let gate = session.gate(&path);
            let _mark = wait.then(|| session.waiting());
            let permit = if wait {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(None),
                    _ = sleep_until(until_or_far) => return Ok(None),
                    _ = session.died() => continue 'outer,
                    p = gate.acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => continue 'outer,
                    },
                }
            } else {
                match gate.try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => return Ok(None),
                }
            };
            let q = match self.enqueue(&session, &prefix, &path).await {
                Ok(q) => q,
                Err(Error::LockLost { .. }) => continue 'outer,
                Err(e) => {
                    // The put may have happened: make sure the key goes.
                    session.cleanup_later(path, 0, permit);
                    if wait && e.is_retryable() {
                        warn!(error = %e, "acquire attempt failed; retrying");
                        if pause(backoff.next_delay()).await {
                            continue 'outer;
                        }
                        return Ok(None);
                    }
                    return Err(e);
                }
            };
            if q.owner_rev == q.my_rev {
                return self
                    .grant(req, &session, path, q.my_rev, q.sent_at, permit)
                    .await
                    .map(Some);
            }
            if !wait {
                // Like Mutex.TryLock: leave the queue at once.
                self.abandon(&session, &path, q.my_rev, permit).await;
                return Ok(None);
            }
            debug!(key = %req.key, rev = q.my_rev, "queued behind {}", q.owner_rev);
            loop {
                let sent_at = Instant::now();
                let watch = match self.check(&prefix, &path, q.my_rev).await {
                    Ok(Check::First) => {
                        return self
                            .grant(req, &session, path, q.my_rev, sent_at, permit)
                            .await
                            .map(Some);
                    }
                    Ok(Check::Vanished) => {
                        debug!(key = %req.key, "our waiter key vanished; queueing again");
                        drop(permit);
                        continue 'outer;
                    }
                    Ok(Check::Behind(pred, from_rev)) => {
                        backoff = Backoff::default();
                        Some(self.inner.watches.once(pred, from_rev))
                    }
                    Err(e) if e.is_retryable() => {
                        warn!(error = %e, "checking the queue failed; retrying");
                        None
                    }
                    Err(e) => {
                        self.abandon(&session, &path, q.my_rev, permit).await;
                        return Err(e);
                    }
                };
                let wake = match watch {
                    Some(_) => Instant::now() + jitter(self.inner.cfg.recheck_interval),
                    None => Instant::now() + backoff.next_delay(),
                };
                let mut watch = watch;
                let fired = async {
                    match watch.as_mut() {
                        Some(w) => w.fired().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {
                        self.abandon(&session, &path, q.my_rev, permit).await;
                        return Ok(None);
                    }
                    _ = sleep_until(until_or_far) => {
                        self.abandon(&session, &path, q.my_rev, permit).await;
                        return Ok(None);
                    }
                    _ = session.died() => {
                        drop(permit);
                        continue 'outer;
                    }
                    _ = fired => {}
                    _ = sleep_until(wake) => {}
                }
            }
        }
    }

    /// Extends a lock beyond its lease's TTL: re-attaches its key to the
    /// session of the longer TTL (a put keeps the key's create revision, so
    /// the fencing token and the queue position stay), conditional on the
    /// key still being ours.
    async fn move_lock(
        &self,
        lease: &Lease,
        h: &LockHandle,
        old: &Arc<Session>,
        ttl: Duration,
    ) -> Result<Instant> {
        let used = self.session(ttl).await?;
        let new = used.session();
        let txn = Txn::new()
            .when([Compare::create_revision(
                h.path.clone(),
                CompareOp::Equal,
                h.rev,
            )])
            .and_then([TxnOp::put(
                h.path.clone(),
                "",
                Some(PutOptions::new().with_lease(new.id)),
            )]);
        let sent_at = Instant::now();
        let resp = match txn_raw(&self.inner.client, self.timeout(), txn).await {
            Ok(r) => r,
            Err(Some(e)) if is_lease_not_found(&e) => {
                new.mark_dead(format!("etcd lease {} not found", new.hex));
                return Err(Error::connection(BACKEND, "extending", e));
            }
            Err(Some(e)) => return Err(map("extending", e)),
            Err(None) => return Err(crate::errors::timed_out("extending", self.timeout())),
        };
        if !resp.succeeded() {
            old.forget(&h.path, h.rev);
            return Err(not_held(lease.key()));
        }
        let Some(entry) = old.take_entry(&h.path, h.rev) else {
            return Err(not_held(lease.key()));
        };
        new.adopt(h.path.clone(), entry);
        h.set_session(Arc::clone(new));
        let valid = new.validity(sent_at, ttl);
        new.extend_expiry(&h.path, h.rev, sweep_at(valid, ttl));
        debug!(key = %lease.key(), lease = %new.hex, "lock moved to a longer lease");
        Ok(valid)
    }

    /// Renews the leases of one session: one keep-alive, plus one read of
    /// all their keys (in chunks of [`MAX_TXN_OPS`]), sent concurrently.
    async fn extend_session(
        &self,
        session: &Arc<Session>,
        items: &[(usize, &Lease, &LockHandle)],
        ttl: Duration,
        out: &mut [Option<Result<Instant>>],
    ) {
        let window = (session.lease_ttl / 10).min(Duration::from_secs(1));
        let threshold = Instant::now()
            .checked_sub(window)
            .unwrap_or_else(Instant::now);
        let keepalive = session.refresh(threshold, self.timeout());
        let reads = futures::future::join_all(items.chunks(MAX_TXN_OPS).map(|chunk| {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(_, _, h)| {
                    TxnOp::get(h.path.clone(), Some(GetOptions::new().with_keys_only()))
                })
                .collect();
            let client = &self.inner.client;
            let timeout = self.timeout();
            async move {
                crate::errors::txn("renewing", client, timeout, Txn::new().and_then(ops)).await
            }
        }));
        let (ka, reads) = tokio::join!(keepalive, reads);
        let revs: Vec<Result<Option<i64>>> = items
            .chunks(MAX_TXN_OPS)
            .zip(reads)
            .flat_map(|(chunk, r)| -> Vec<Result<Option<i64>>> {
                match r {
                    Ok(resp) => {
                        let ops = resp.op_responses();
                        (0..chunk.len())
                            .map(|i| match ops.get(i) {
                                Some(TxnOpResponse::Get(g)) => {
                                    Ok(g.kvs().first().map(|kv| kv.create_revision()))
                                }
                                _ => Ok(None),
                            })
                            .collect()
                    }
                    Err(e) => (0..chunk.len())
                        .map(|_| Err(Error::connection(BACKEND, "renewing", e.to_string())))
                        .collect(),
                }
            })
            .collect();
        for ((i, lease, h), rev) in items.iter().zip(revs) {
            let result = match (&ka, rev) {
                (Err(Error::LockLost { reason, .. }), _) => Err(Error::LockLost {
                    key: lease.key().to_string(),
                    reason: reason.clone(),
                }),
                (_, Ok(r)) if r != Some(h.rev) => {
                    session.forget(&h.path, h.rev);
                    Err(not_held(lease.key()))
                }
                (Err(e), _) => Err(Error::connection(
                    BACKEND,
                    "renewing the lease",
                    e.to_string(),
                )),
                (_, Err(e)) => Err(e),
                (Ok(sent), Ok(_)) => {
                    let valid = valid_until(*sent, ttl).min(valid_until(*sent, session.lease_ttl));
                    if session.extend_expiry(&h.path, h.rev, sweep_at(valid, ttl)) {
                        Ok(valid)
                    } else {
                        Err(not_held(lease.key()))
                    }
                }
            };
            out[*i] = Some(result);
        }
    }
}

fn header_rev(resp: &TxnResponse) -> Result<i64> {
    resp.header()
        .map(|h| h.revision())
        .ok_or_else(|| Error::backend(BACKEND, "acquiring", "answer without a header"))
}

fn tls_options(tls: &crate::config::TlsConfig) -> Result<etcd_client::TlsOptions> {
    let read = |p: &std::path::Path, what: &str| {
        std::fs::read(p).map_err(|e| {
            Error::config(
                BACKEND,
                format!("cannot read the {what} {}: {e}", p.display()),
            )
        })
    };
    let mut opts = etcd_client::TlsOptions::new();
    if let Some(ca) = &tls.ca_file {
        opts = opts.ca_certificate(etcd_client::Certificate::from_pem(read(ca, "CA file")?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        opts = opts.identity(etcd_client::Identity::from_pem(
            read(cert, "client certificate")?,
            read(key, "client key")?,
        ));
    }
    if let Some(d) = &tls.domain {
        opts = opts.domain_name(d.clone());
    }
    Ok(opts)
}

#[async_trait]
impl Backend for EtcdBackend {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        let cancel = CancellationToken::new();
        Ok(match self.acquire_inner(req, None, &cancel, false).await? {
            Some(lease) => Attempt::Granted(lease),
            None => Attempt::Held { expires_in: None },
        })
    }

    async fn subscribe(&self, key: &Key) -> Result<Subscription> {
        let sub = self.inner.hub.subscribe(key);
        self.inner
            .watches
            .hub(
                self.lock_prefix(key).into_bytes(),
                key.clone(),
                Arc::clone(&self.inner.hub),
                self.timeout(),
            )
            .await;
        Ok(sub)
    }

    async fn acquire(
        &self,
        req: &AcquireRequest,
        until: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        self.acquire_inner(req, until, cancel, true).await
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<Instant> {
        self.extend_batch(std::slice::from_ref(lease), ttl)
            .await
            .pop()
            .unwrap_or_else(|| Err(not_held(lease.key())))
    }

    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        let mut out: Vec<Option<Result<Instant>>> = (0..leases.len()).map(|_| None).collect();
        let mut groups: Vec<(Arc<Session>, Vec<(usize, &Lease, &LockHandle)>)> = Vec::new();
        for (i, lease) in leases.iter().enumerate() {
            let Some(h) = lease.handle::<LockHandle>() else {
                out[i] = Some(Err(not_held(lease.key())));
                continue;
            };
            let session = h.session();
            if session.is_dead() {
                out[i] = Some(Err(Error::LockLost {
                    key: lease.key().to_string(),
                    reason: session.loss_reason(),
                }));
                continue;
            }
            if !session.holds(&h.path, h.rev) {
                out[i] = Some(Err(not_held(lease.key())));
                continue;
            }
            if ttl > session.lease_ttl {
                out[i] = Some(self.move_lock(lease, h, &session, ttl).await);
                continue;
            }
            match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &session)) {
                Some((_, v)) => v.push((i, lease, h)),
                None => groups.push((session, vec![(i, lease, h)])),
            }
        }
        for (session, items) in &groups {
            self.extend_session(session, items, ttl, &mut out).await;
        }
        out.into_iter()
            .zip(leases)
            .map(|(r, l)| r.unwrap_or_else(|| Err(not_held(l.key()))))
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let Some(h) = lease.handle::<LockHandle>() else {
            return Ok(false);
        };
        let session = h.session();
        if session.is_dead() {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                h.path.clone(),
                CompareOp::Equal,
                h.rev,
            )])
            .and_then([TxnOp::delete(h.path.clone(), None)]);
        match crate::errors::txn("releasing", &self.inner.client, self.timeout(), txn).await {
            Ok(resp) => {
                session.forget(&h.path, h.rev);
                if !resp.succeeded() {
                    lease.loss_signal().trigger(LossReason::NotHeld);
                }
                Ok(resp.succeeded())
            }
            Err(e) => {
                session.release_failed(&h.path);
                Err(e)
            }
        }
    }

    async fn inspect(&self, key: &Key) -> Result<LockInfo> {
        let prefix = self.lock_prefix(key);
        let txn = Txn::new().and_then([
            TxnOp::get(
                prefix.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1)
                        .with_keys_only(),
                ),
            ),
            TxnOp::get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ]);
        let resp =
            crate::errors::txn("inspecting", &self.inner.client, self.timeout(), txn).await?;
        let ops = resp.op_responses();
        let owner = match ops.first() {
            Some(TxnOpResponse::Get(g)) => {
                g.kvs().first().map(|kv| (kv.create_revision(), kv.lease()))
            }
            _ => None,
        };
        let count = match ops.get(1) {
            Some(TxnOpResponse::Get(g)) => usize::try_from(g.count()).unwrap_or(0),
            _ => 0,
        };
        let Some((rev, lease_id)) = owner else {
            return Ok(LockInfo::free());
        };
        let mut expires_in = None;
        if lease_id != 0 {
            let mut lc = self.inner.client.lease_client();
            if let Ok(r) = call(
                "inspecting",
                self.timeout(),
                lc.time_to_live(lease_id, None),
            )
            .await
                && r.ttl() > 0
            {
                expires_in = Some(Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0)));
            }
        }
        Ok(LockInfo::held(
            Some(FencingToken::new(u64::try_from(rev).unwrap_or(0))),
            expires_in,
        )
        .with_waiters(Some(count.saturating_sub(1))))
    }
}
