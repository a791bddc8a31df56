//! [`RedisBackend`]: the `lock-core` backend over one Redis server or over
//! Redlock masters.
//!
//! Both modes run the same scripts; a single server is simply the case
//! "1 node, quorum 1". In Redlock mode every request goes to all masters at
//! once, each with a short deadline, and the answers are counted: a lock is
//! granted when a majority granted it *and* time is left on it after
//! subtracting the time the round took and the clock-drift allowance (the
//! algorithm of the Redis documentation). A round that fell short is undone
//! on every master (a request that timed out may still have landed).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesUnordered;
use lock_core::{
    AcquireRequest, Attempt, Backend, Backoff, CancellationToken, Capabilities, Error, Fencing,
    FencingToken, Key, Lease, LockInfo, OwnerToken, Result, Subscription, Support, async_trait,
    deadline, jitter, not_held, wait_loop,
};
use redis::{Script, ScriptInvocation, Value};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

use crate::BACKEND;
use crate::config::{Mode, RedisConfig};
use crate::node::Node;
use crate::pubsub::{Subscriber, Wakeups};
use crate::scripts::{ACQUIRE_SCRIPT, EXTEND_SCRIPT, INSPECT_SCRIPT, LEAVE_SCRIPT, RELEASE_SCRIPT};

/// How long a fair waiter's queue entry lives without a refresh. A waiter
/// refreshes it on every re-check (at most every 1.2 × the re-check
/// interval), so only a dead waiter's entry runs out; until then it holds up
/// the queue.
const FAIR_ENTRY_TTL: Duration = Duration::from_secs(3);
/// The fallback re-check when no wake-up arrives.
const RECHECK: Duration = Duration::from_millis(500);
/// Redlock: the longest random pause before retrying a split vote.
const REDLOCK_RETRY_MAX: Duration = Duration::from_millis(50);

/// A distlock backend on Redis: one server, or Redlock over independent
/// masters. Cheap to clone; clones share connections.
///
/// ```no_run
/// use lock_core::LockClient;
/// use lock_redis::RedisBackend;
///
/// # #[tokio::main] async fn main() -> lock_core::Result<()> {
/// let backend = RedisBackend::connect_url("redis://127.0.0.1:6379/?prefix=billing:").await?;
/// let locks = LockClient::new(backend);
/// let guard = locks.lock("invoice-17").await?;
/// // ... pass guard.fencing_token() to every write ...
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: RedisConfig,
    nodes: Vec<Node>,
    /// One per node; dropping them ends the subscriber tasks.
    subscribers: Vec<Subscriber>,
    quorum: usize,
    caps: Capabilities,
    wakeups: Arc<Wakeups>,
}

/// The Redis names of one lock (see [`scripts`](crate::scripts)).
struct Names {
    lock: String,
    fence: String,
    q: String,
    qt: String,
    channel: String,
}

impl Names {
    fn new(prefix: &str, key: &Key) -> Self {
        // `escaped()` percent-encodes '{', '}' and ':', so the hash tag is
        // exactly the key and no two keys share a name.
        let base = format!("{prefix}{{{}}}", key.escaped());
        Names {
            fence: format!("{base}:fence"),
            q: format!("{base}:q"),
            qt: format!("{base}:qt"),
            channel: format!("{base}:rel"),
            lock: base,
        }
    }
}

/// What one node answered to an acquire.
enum Reply {
    Granted(u64),
    Held(i64),
}

/// Whole milliseconds, rounded up (the server then keeps a lease at least as
/// long as we count on it).
fn ceil_ms(d: Duration) -> u128 {
    d.as_nanos().div_ceil(1_000_000)
}

fn bad_reply(what: &str, v: &Value) -> Error {
    Error::backend(
        BACKEND,
        what.to_string(),
        format!("unexpected script answer {v:?}"),
    )
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Nil => Some(String::new()),
        _ => None,
    }
}

fn parse_acquire(v: &Value) -> Result<Reply> {
    if let Value::Array(items) = v
        && let [flag, x] = items.as_slice()
    {
        match (as_i64(flag), as_i64(x)) {
            (Some(1), Some(tok)) if tok > 0 => return Ok(Reply::Granted(tok as u64)),
            (Some(0), Some(pttl)) => return Ok(Reply::Held(pttl)),
            _ => {}
        }
    }
    Err(bad_reply("acquiring", v))
}

fn expires_in(pttl: i64) -> Option<Duration> {
    (pttl > 0).then(|| Duration::from_millis(pttl as u64))
}

/// `owner hex:token` as stored in the lock key.
fn parse_value(v: &str) -> Option<(&str, u64)> {
    let (owner, tok) = v.split_once(':')?;
    Some((owner, tok.parse().ok()?))
}

impl RedisBackend {
    /// Connects to the server(s) of `cfg`.
    ///
    /// Fails fast: [`Error::Config`] for an invalid config,
    /// [`Error::Auth`] for refused credentials, [`Error::Connection`] when
    /// the server (in Redlock mode: a majority of masters) does not answer
    /// within the connect and response timeouts.
    pub async fn connect(cfg: RedisConfig) -> Result<Self> {
        cfg.validate()?;
        let nodes = cfg
            .nodes
            .iter()
            .map(|a| Node::new(&cfg, a))
            .collect::<Result<Vec<_>>>()?;
        let quorum = nodes.len() / 2 + 1;
        let limit = cfg.connect_timeout + cfg.response_timeout;
        let pings = join_all(nodes.iter().map(|n| n.ping(limit))).await;
        let up = pings.iter().filter(|p| p.is_ok()).count();
        if up < quorum {
            let mut errors = pings.into_iter().filter_map(|p| p.err());
            let first = errors.next();
            return Err(match (cfg.mode, first) {
                (Mode::Single, Some(e)) => e,
                (_, first) => quorum_error(
                    format!(
                        "connecting: {up} of {} Redis masters answered, Redlock needs {quorum}",
                        nodes.len()
                    ),
                    first,
                ),
            });
        }
        for (n, p) in nodes.iter().zip(&pings) {
            if let Err(e) = p {
                warn!(server = %n.addr, error = %e, "Redlock master unreachable; continuing with a majority");
            }
        }
        let caps = capabilities(cfg.mode);
        let wakeups = Arc::new(Wakeups::default());
        let subscribers = nodes
            .iter()
            .map(|n| {
                Subscriber::spawn(
                    n.client.clone(),
                    n.addr.clone(),
                    Arc::downgrade(&wakeups),
                    cfg.connect_timeout,
                    cfg.response_timeout,
                )
            })
            .collect();
        debug!(config = %cfg, "connected");
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                cfg,
                nodes,
                subscribers,
                quorum,
                caps,
                wakeups,
            }),
        })
    }

    /// Parses `url` (see [`RedisConfig::from_url`]) and connects.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(RedisConfig::from_url(url)?).await
    }

    /// The configuration in use.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.cfg
    }

    fn names(&self, key: &Key) -> Names {
        Names::new(&self.inner.cfg.prefix, key)
    }

    fn is_redlock(&self) -> bool {
        self.inner.cfg.mode == Mode::Redlock
    }

    fn retention_ms(&self) -> u128 {
        self.inner.cfg.fence_retention.map_or(0, ceil_ms)
    }

    /// Per-master deadline in Redlock mode: small against the TTL, so a dead
    /// master cannot eat the lease's validity. `None` (the response timeout
    /// alone) for a single server.
    fn node_limit(&self, ttl: Duration) -> Option<Duration> {
        self.is_redlock().then(|| {
            self.inner
                .cfg
                .response_timeout
                .min((ttl / 5).max(Duration::from_millis(10)))
        })
    }

    /// The token a Redlock extend/release raises each master's counter to.
    fn raise_arg(&self, lease: &Lease) -> String {
        if self.is_redlock() {
            lease.fencing_token().get().to_string()
        } else {
            String::new()
        }
    }

    /// Runs one script call on every node at once.
    async fn on_all<'a, F>(
        &self,
        limit: Option<Duration>,
        what: &str,
        build: F,
    ) -> Vec<Result<Value>>
    where
        F: Fn() -> ScriptInvocation<'a>,
    {
        let invs: Vec<ScriptInvocation<'a>> = self.inner.nodes.iter().map(|_| build()).collect();
        join_all(
            self.inner
                .nodes
                .iter()
                .zip(&invs)
                .map(|(n, inv)| n.eval(inv, limit, what)),
        )
        .await
    }

    fn acquire_invocation<'a>(
        &self,
        n: &'a Names,
        req: &AcquireRequest,
        waiter: &str,
    ) -> ScriptInvocation<'a> {
        let mut inv = ACQUIRE_SCRIPT.prepare_invoke();
        inv.key(&n.lock)
            .key(&n.fence)
            .key(&n.q)
            .key(&n.qt)
            .arg(req.owner.to_hex())
            .arg(ceil_ms(req.ttl).to_string())
            .arg(self.retention_ms().to_string())
            .arg(waiter)
            .arg(ceil_ms(FAIR_ENTRY_TTL).to_string());
        inv
    }

    /// One acquire round; `waiter` is the fair waiter's id ("" if not fair).
    async fn attempt(&self, req: &AcquireRequest, waiter: &str) -> Result<Attempt> {
        let n = self.names(&req.key);
        let sent_at = Instant::now();
        let limit = self.node_limit(req.ttl);
        let answers = self
            .on_all(limit, "acquiring", || {
                self.acquire_invocation(&n, req, waiter)
            })
            .await;
        let total = answers.len();
        let quorum = self.inner.quorum;
        let mut tokens = Vec::new();
        let mut held = Vec::new();
        let mut errors = Vec::new();
        for a in answers {
            match a.and_then(|v| parse_acquire(&v)) {
                Ok(Reply::Granted(t)) => tokens.push(t),
                Ok(Reply::Held(pttl)) => held.push(pttl),
                Err(e) => errors.push(e),
            }
        }
        let valid_until = deadline(sent_at, req.ttl);
        if tokens.len() >= quorum && Instant::now() < valid_until {
            // Single server: its token. Redlock: the highest of the
            // majority's tokens (why this is best-effort: crate docs).
            let token = tokens.iter().copied().max().unwrap_or_default();
            return Ok(Attempt::Granted(Lease::new(
                req.key.clone(),
                req.owner,
                FencingToken::new(token),
                req.ttl,
                valid_until,
            )));
        }
        if total == 1
            && let Some(e) = errors.pop()
        {
            return Err(e);
        }
        if !tokens.is_empty() || !errors.is_empty() {
            // Undo a partial grant everywhere (a timed-out request may have
            // been granted after all). No publish: nobody should rush in on a
            // lock that was never really taken.
            let lease = Lease::new(
                req.key.clone(),
                req.owner,
                FencingToken::new(0),
                req.ttl,
                sent_at,
            );
            if let Err(e) = self.release_on_all(&lease, false).await {
                debug!(error = %e, "undoing a partial Redlock grant failed; it will expire");
            }
        }
        if held.len() > total - quorum {
            let left = held.iter().copied().filter(|p| *p > 0).min();
            return Ok(Attempt::Held {
                expires_in: left.and_then(expires_in),
            });
        }
        if errors.len() > total - quorum {
            return Err(quorum_error(
                format!(
                    "acquiring {:?}: {} of {total} Redis masters answered, Redlock needs {quorum}",
                    req.key.as_str(),
                    total - errors.len()
                ),
                errors.into_iter().next(),
            ));
        }
        // A split vote (or the round took too long): retry after a random
        // pause, so that competing clients do not collide again.
        let pause = REDLOCK_RETRY_MAX.mul_f64(rand::random::<f64>());
        Ok(Attempt::Held {
            expires_in: Some(pause),
        })
    }

    async fn release_on_all(&self, lease: &Lease, publish: bool) -> Result<bool> {
        let n = self.names(lease.key());
        let owner = lease.owner().to_hex();
        let raise = self.raise_arg(lease);
        let retention = self.retention_ms().to_string();
        let flag = if publish { "1" } else { "0" };
        let answers = self
            .on_all(self.node_limit(lease.ttl()), "releasing", || {
                let mut inv = RELEASE_SCRIPT.prepare_invoke();
                inv.key(&n.lock)
                    .key(&n.fence)
                    .key(&n.q)
                    .arg(&owner)
                    .arg(&n.channel)
                    .arg(&raise)
                    .arg(&retention)
                    .arg(flag);
                inv
            })
            .await;
        self.tally(answers, "releasing", lease.key())
            .map(|t| t.ok >= self.inner.quorum)
            .or_else(|e| match e {
                Error::LockLost { .. } => Ok(false),
                e => Err(e),
            })
    }

    /// Counts 1/0 answers: `ok` if a majority said 1; [`Error::LockLost`] if
    /// so many said 0 that no majority can say 1; otherwise the error that
    /// kept the majority from answering.
    fn tally(&self, answers: Vec<Result<Value>>, what: &str, key: &Key) -> Result<Tally> {
        let total = answers.len();
        let quorum = self.inner.quorum;
        let mut t = Tally { ok: 0 };
        let mut not_ours = 0;
        let mut errors = Vec::new();
        for a in answers {
            match a {
                Ok(v) => match as_i64(&v) {
                    Some(1) => t.ok += 1,
                    Some(0) => not_ours += 1,
                    _ => errors.push(bad_reply(what, &v)),
                },
                Err(e) => errors.push(e),
            }
        }
        if t.ok >= quorum {
            return Ok(t);
        }
        if not_ours > total - quorum {
            return Err(not_held(key));
        }
        if total == 1
            && let Some(e) = errors.pop()
        {
            return Err(e);
        }
        Err(quorum_error(
            format!(
                "{what} {:?}: {} of {total} Redis masters confirmed, Redlock needs {quorum}",
                key.as_str(),
                t.ok
            ),
            errors.into_iter().next(),
        ))
    }

    fn extend_invocation<'a>(
        &self,
        n: &'a Names,
        lease: &Lease,
        ttl: Duration,
    ) -> ScriptInvocation<'a> {
        let mut inv = EXTEND_SCRIPT.prepare_invoke();
        inv.key(&n.lock)
            .key(&n.fence)
            .arg(lease.owner().to_hex())
            .arg(ceil_ms(ttl).to_string())
            .arg(self.raise_arg(lease))
            .arg(self.retention_ms().to_string());
        inv
    }

    /// Fair mode: queue up on the server and wait to be first.
    async fn acquire_fair(
        &self,
        req: &AcquireRequest,
        until: Option<Instant>,
        cancel: &CancellationToken,
    ) -> Result<Option<Lease>> {
        if self.is_redlock() {
            return Err(Error::Unsupported {
                backend: self.inner.caps.backend,
                what: "fair (FIFO) mode in Redlock mode".into(),
            });
        }
        // The waiter id is published on the channel, so it must not be the
        // owner token (which authorises release).
        let waiter = OwnerToken::generate().to_hex();
        let woken = self.inner.wakeups.add_fair(&waiter);
        // Keeps the key's channel subscribed while we wait.
        let _sub = self.subscribe(&req.key).await?;
        let mut backoff = Backoff::default();
        let outcome = loop {
            if cancel.is_cancelled() {
                break Ok(None);
            }
            let now = Instant::now();
            let mut wake = now + jitter(RECHECK);
            match self.attempt(req, &waiter).await {
                Ok(Attempt::Granted(lease)) => break Ok(Some(lease)),
                Ok(Attempt::Held { expires_in }) => {
                    backoff = Backoff::default();
                    if let Some(left) = expires_in {
                        wake = wake.min(now + left + Duration::from_millis(1));
                    }
                }
                Err(e) if e.is_retryable() => {
                    let pause = backoff.next_delay();
                    warn!(error = %e, retry_in = ?pause, "fair acquire attempt failed; retrying");
                    wake = Instant::now() + pause;
                }
                Err(e) => break Err(e),
            }
            if let Some(until) = until {
                if Instant::now() >= until {
                    break Ok(None);
                }
                wake = wake.min(until);
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(None),
                _ = woken.notified() => debug!(key = %req.key, "woken: first in line"),
                _ = sleep_until(wake) => {}
            }
        };
        self.inner.wakeups.remove_fair(&waiter);
        if !matches!(outcome, Ok(Some(_))) {
            self.leave_queue(&req.key, &waiter).await;
        }
        outcome
    }

    /// Removes a fair waiter's entry (best effort: it expires otherwise).
    async fn leave_queue(&self, key: &Key, waiter: &str) {
        let n = self.names(key);
        let mut inv = LEAVE_SCRIPT.prepare_invoke();
        inv.key(&n.lock)
            .key(&n.q)
            .key(&n.qt)
            .arg(waiter)
            .arg(&n.channel);
        for node in &self.inner.nodes {
            if let Err(e) = node.eval(&inv, None, "leaving the fair queue").await {
                debug!(error = %e, "could not leave the fair queue; the entry will expire");
            }
        }
    }
}

struct Tally {
    ok: usize,
}

/// A Redlock "not enough masters" error, typed after the first master's
/// failure (credentials stay [`Error::Auth`]; anything else is a retryable
/// [`Error::Connection`]).
fn quorum_error(context: String, first: Option<Error>) -> Error {
    match first {
        Some(e @ Error::Auth { .. }) => Error::auth(BACKEND, context, e),
        Some(e) => Error::connection(BACKEND, context, e),
        None => Error::connection(BACKEND, context, "no master answered"),
    }
}

/// The capabilities of each mode (see the crate docs for the reasoning).
fn capabilities(mode: Mode) -> Capabilities {
    let caps = Capabilities::new(match mode {
        Mode::Single => "redis",
        Mode::Redlock => "redis-redlock",
    })
    .ttl_range(Duration::from_millis(10), Duration::from_secs(86_400 * 365))
    // Redis expires keys by milliseconds and our scripts read the key, so an
    // expired lease is free the moment anyone asks; the grace covers the ms
    // rounding and, in Redlock mode, masters granting a few ms apart.
    .expiry_grace(Duration::from_millis(20))
    .push_wakeup(Support::Yes)
    .survives_restart(Support::No(
        "Redis keeps leases in memory; a restart without AOF (appendfsync always) forgets them",
    ))
    .batch_renewal(Support::Yes)
    .recheck_interval(RECHECK);
    match mode {
        Mode::Single => caps.fencing(Fencing::Strict).fifo(Support::Yes),
        Mode::Redlock => caps
            .fencing(Fencing::BestEffort(
                "each master mints its own token from its counter and clock; a grant's token is \
                 the highest among its majority, which is above the previous grant's only if a \
                 master they share saw it, or the masters' clocks agree better than the time \
                 between the two grants",
            ))
            .fifo(Support::No(
                "a FIFO queue would have to be replicated consistently across the masters, which \
                 Redlock does not do",
            )),
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    async fn try_acquire(&self, req: &AcquireRequest) -> Result<Attempt> {
        self.attempt(req, "").await
    }

    async fn subscribe(&self, key: &Key) -> Result<Subscription> {
        let sub = self.inner.wakeups.hub.subscribe(key);
        let channel = self.names(key).channel;
        let limit = self.inner.cfg.response_timeout * 2;
        // Wait for a majority of servers to confirm: every release reaches a
        // majority too, and two majorities share a server, so the wake-up
        // cannot be missed. Stragglers finish subscribing in the background.
        let mut pending: FuturesUnordered<_> = self
            .inner
            .subscribers
            .iter()
            .map(|s| s.ensure(&channel, key, limit))
            .collect();
        let mut confirmed = 0;
        while confirmed < self.inner.quorum {
            match pending.next().await {
                Some(true) => confirmed += 1,
                Some(false) => {}
                None => break,
            }
        }
        if confirmed < self.inner.quorum {
            // Not an error: subscribers subscribe when they reconnect and
            // then wake every waiter; until then the re-check covers us.
            debug!(key = %key, confirmed, "subscription not confirmed by a majority yet");
        }
        Ok(sub)
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
        let n = self.names(lease.key());
        let sent_at = Instant::now();
        let answers = self
            .on_all(self.node_limit(ttl), "extending", || {
                self.extend_invocation(&n, lease, ttl)
            })
            .await;
        self.tally(answers, "extending", lease.key())?;
        Ok(deadline(sent_at, ttl))
    }

    async fn extend_batch(&self, leases: &[Lease], ttl: Duration) -> Vec<Result<Instant>> {
        if leases.is_empty() {
            return Vec::new();
        }
        let names: Vec<Names> = leases.iter().map(|l| self.names(l.key())).collect();
        let invs: Vec<ScriptInvocation<'_>> = names
            .iter()
            .zip(leases)
            .map(|(n, l)| self.extend_invocation(n, l, ttl))
            .collect();
        let sent_at = Instant::now();
        let limit = self.node_limit(ttl);
        let script: &Script = &EXTEND_SCRIPT;
        // One pipeline per master, all masters at once.
        let per_node = join_all(
            self.inner
                .nodes
                .iter()
                .map(|node| node.eval_many(script, &invs, limit, "renewing")),
        )
        .await;
        (0..leases.len())
            .map(|i| {
                let answers = per_node
                    .iter()
                    .map(|r| match r {
                        Ok(values) => values
                            .get(i)
                            .cloned()
                            .ok_or_else(|| bad_reply("renewing", &Value::Nil)),
                        Err(e) => Err(clone_err(e)),
                    })
                    .collect();
                self.tally(answers, "renewing", leases[i].key())
                    .map(|_| deadline(sent_at, ttl))
            })
            .collect()
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        self.release_on_all(lease, true).await
    }

    async fn inspect(&self, key: &Key) -> Result<LockInfo> {
        let n = self.names(key);
        let answers = self
            .on_all(None, "inspecting", || {
                let mut inv = INSPECT_SCRIPT.prepare_invoke();
                inv.key(&n.lock).key(&n.qt);
                inv
            })
            .await;
        let total = answers.len();
        let quorum = self.inner.quorum;
        // (owner, token, pttl) per answering node, and queued waiters.
        let mut holders: Vec<(String, u64, i64)> = Vec::new();
        let mut waiters = 0usize;
        let mut answered = 0;
        let mut first_err = None;
        for a in answers {
            let v = match a {
                Ok(v) => v,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            let Value::Array(items) = &v else {
                return Err(bad_reply("inspecting", &v));
            };
            let [value, pttl, queued] = items.as_slice() else {
                return Err(bad_reply("inspecting", &v));
            };
            let (Some(value), Some(pttl), Some(queued)) =
                (as_string(value), as_i64(pttl), as_i64(queued))
            else {
                return Err(bad_reply("inspecting", &v));
            };
            answered += 1;
            waiters = waiters.max(usize::try_from(queued).unwrap_or(0));
            if let Some((owner, token)) = parse_value(&value) {
                holders.push((owner.to_string(), token, pttl));
            }
        }
        if answered < quorum {
            return Err(match (total, first_err) {
                (1, Some(e)) => e,
                (_, first) => quorum_error(
                    format!(
                        "inspecting: {answered} of {total} Redis masters answered, Redlock needs {quorum}"
                    ),
                    first,
                ),
            });
        }
        for (owner, _, _) in &holders {
            let mine: Vec<&(String, u64, i64)> =
                holders.iter().filter(|(o, _, _)| o == owner).collect();
            if mine.len() >= quorum {
                let token = mine.iter().map(|(_, t, _)| *t).max().unwrap_or_default();
                let left = mine.iter().map(|(_, _, p)| *p).min().unwrap_or(-1);
                return Ok(
                    LockInfo::held(Some(FencingToken::new(token)), expires_in(left))
                        .with_waiters(Some(waiters)),
                );
            }
        }
        Ok(LockInfo::free().with_waiters(Some(waiters)))
    }
}

/// `Error` is not `Clone`; a batch failure is reported to every lease in it.
fn clone_err(e: &Error) -> Error {
    match e {
        Error::Auth { context, .. } => Error::auth(BACKEND, context.clone(), e.to_string()),
        Error::Connection { context, .. } => {
            Error::connection(BACKEND, context.clone(), e.to_string())
        }
        Error::LockLost { key, reason } => Error::LockLost {
            key: key.clone(),
            reason: reason.clone(),
        },
        other => Error::backend(BACKEND, "renewing", other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_one_hash_tag_and_never_collide() {
        let a = Names::new("p:", &Key::new("a}:fence").unwrap());
        let b = Names::new("p:", &Key::new("a").unwrap());
        assert_eq!(b.lock, "p:{a}");
        assert_eq!(b.fence, "p:{a}:fence");
        assert_ne!(a.lock, b.fence);
        for name in [&a.lock, &a.fence, &a.q, &a.qt] {
            let tag = &name[name.find('{').unwrap() + 1..name.find('}').unwrap()];
            assert_eq!(tag, "a%7D%3Afence");
        }
    }

    #[test]
    fn parses_script_answers() {
        let granted = Value::Array(vec![
            Value::Int(1),
            Value::BulkString(b"1732890000123456".to_vec()),
        ]);
        assert!(matches!(
            parse_acquire(&granted),
            Ok(Reply::Granted(1_732_890_000_123_456))
        ));
        let held = Value::Array(vec![Value::Int(0), Value::Int(1500)]);
        assert!(matches!(parse_acquire(&held), Ok(Reply::Held(1500))));
        assert!(parse_acquire(&Value::Int(1)).is_err());
        assert_eq!(parse_value("abc:42"), Some(("abc", 42)));
        assert_eq!(parse_value("abc"), None);
        assert_eq!(ceil_ms(Duration::from_micros(10_001)), 11);
    }
}
