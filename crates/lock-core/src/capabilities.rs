//! What a backend can do, stated as data.
//!
//! Stores differ: Consul sessions last at least 10 s, etcd rounds leases up
//! to 2 s, Redis cannot keep a fencing counter across a restart without
//! persistence. Instead of special-casing backend names, the client and the
//! conformance suite read [`Capabilities`]. Every "no" carries its reason, so
//! a gated conformance case can say why it did not run.

use std::time::Duration;

/// Whether a feature is there, and if not, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    /// Supported.
    Yes,
    /// Not supported, with the reason.
    No(&'static str),
}

impl Support {
    /// Whether it is supported.
    pub fn is_supported(self) -> bool {
        matches!(self, Support::Yes)
    }

    /// The reason it is not.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Support::Yes => None,
            Support::No(why) => Some(why),
        }
    }
}

/// How far fencing tokens can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fencing {
    /// Strictly increasing per key across every grant, expiry and server
    /// restart.
    Strict,
    /// Strictly increasing while the server keeps running; the text says what
    /// happens on restart or failover.
    UntilRestart(&'static str),
    /// Increasing in the normal case only; the text says when it can fail.
    BestEffort(&'static str),
}

/// A backend's features and limits.
///
/// Built with [`Capabilities::new`] and the setters, because the struct is
/// `#[non_exhaustive]`:
///
/// ```
/// use std::time::Duration;
/// use lock_core::{Capabilities, Support};
/// let caps = Capabilities::new("mystore")
///     .ttl_range(Duration::from_secs(1), Duration::from_secs(3600))
///     .fifo(Support::No("the store has no queue"));
/// assert!(!caps.fifo.is_supported());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The backend's name, as used in errors and traces.
    pub backend: &'static str,
    /// Shortest TTL the store honours.
    pub min_ttl: Duration,
    /// Longest TTL the store honours.
    pub max_ttl: Duration,
    /// How much later than the TTL an abandoned lock may really be freed
    /// (timer granularity, Consul's up to 2×TTL session life, lock-delay).
    /// Waiters may wait this much longer; holders are unaffected.
    pub expiry_grace: Duration,
    /// How far fencing tokens can be trusted.
    pub fencing: Fencing,
    /// Waiters are woken by the store (pub/sub, watch, blocking query,
    /// LISTEN) rather than by re-checking.
    pub push_wakeup: Support,
    /// Fair (first come, first served) mode.
    pub fifo: Support,
    /// Leases survive a restart of the server (given its usual persistence
    /// settings).
    pub survives_restart: Support,
    /// Many leases are renewed with one request (or one shared session).
    pub batch_renewal: Support,
    /// Without a push, how often a waiter re-checks a busy key at most.
    pub recheck_interval: Duration,
}

impl Capabilities {
    /// Capabilities of a backend called `backend`, with conservative
    /// defaults: TTL 1 ms to 24 h, no grace, strict fencing, no push, no
    /// FIFO, no restart survival, no batch renewal, re-check every second.
    pub fn new(backend: &'static str) -> Self {
        Capabilities {
            backend,
            min_ttl: Duration::from_millis(1),
            max_ttl: Duration::from_secs(86_400),
            expiry_grace: Duration::ZERO,
            fencing: Fencing::Strict,
            push_wakeup: Support::No("not declared"),
            fifo: Support::No("not declared"),
            survives_restart: Support::No("not declared"),
            batch_renewal: Support::No("not declared"),
            recheck_interval: Duration::from_secs(1),
        }
    }

    /// Sets the TTL range.
    pub fn ttl_range(mut self, min: Duration, max: Duration) -> Self {
        self.min_ttl = min;
        self.max_ttl = max;
        self
    }

    /// Sets the expiry grace.
    pub fn expiry_grace(mut self, grace: Duration) -> Self {
        self.expiry_grace = grace;
        self
    }

    /// Sets the fencing guarantee.
    pub fn fencing(mut self, fencing: Fencing) -> Self {
        self.fencing = fencing;
        self
    }

    /// Sets push wake-up support.
    pub fn push_wakeup(mut self, s: Support) -> Self {
        self.push_wakeup = s;
        self
    }

    /// Sets FIFO support.
    pub fn fifo(mut self, s: Support) -> Self {
        self.fifo = s;
        self
    }

    /// Sets restart survival.
    pub fn survives_restart(mut self, s: Support) -> Self {
        self.survives_restart = s;
        self
    }

    /// Sets batch renewal support.
    pub fn batch_renewal(mut self, s: Support) -> Self {
        self.batch_renewal = s;
        self
    }

    /// Sets the fallback re-check interval.
    pub fn recheck_interval(mut self, every: Duration) -> Self {
        self.recheck_interval = every;
        self
    }
}
