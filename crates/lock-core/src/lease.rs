//! What a successful acquire returns, and how its loss is signalled.
//!
//! A [`Lease`] is a promise with an end: the store will not give the lock to
//! anyone else before [`Lease::valid_until`]. That deadline is measured on the
//! local monotonic clock from when the acquire request was *sent* (not when
//! the answer came back), minus a safety margin for clock drift between us and
//! the server ([`safety_margin`]). So when `valid_until` has not passed, the
//! lease is still ours even if the answer was slow.
//!
//! A lease alone cannot make a critical section safe: a process can pause (GC,
//! swap, a stopped VM) after checking the deadline and before writing. That is
//! why every grant carries a [`FencingToken`]: the resource being protected
//! rejects writes carrying a token lower than one it has already seen (see
//! Martin Kleppmann, "How to do distributed locking").

use std::any::Any;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Key;

/// A number that strictly increases with every grant of the same key.
///
/// Give it to the resource you protect and have it reject any write whose
/// token is lower than the highest it has seen. Tokens increase across
/// holders, across lease expiry and (where the backend's
/// [capabilities](crate::Capabilities::fencing) say so) across server
/// restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a token minted by a backend.
    pub const fn new(value: u64) -> Self {
        FencingToken(value)
    }

    /// The token's value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// 128 random bits that identify one grant; only its holder knows them.
///
/// Release and extend are conditional on this token, so a client can never
/// release a lock it does not hold. It is drawn from the operating system's
/// random source and is never printed: `Debug` shows `OwnerToken(…)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken([u8; 16]);

impl OwnerToken {
    /// Draws a fresh token from the OS random source.
    ///
    /// # Panics
    /// Only if the operating system has no random source at all, which no
    /// supported platform lacks; continuing with guessable tokens would be
    /// unsafe.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        #[allow(clippy::expect_used)]
        getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
        OwnerToken(bytes)
    }

    /// Rebuilds a token from its bytes (for backends reading it back).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        OwnerToken(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Lower-case hex, 32 characters: the form backends store.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the 32-character hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(OwnerToken(bytes))
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnerToken(…)")
    }
}

/// Why a lease was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossReason {
    /// The validity deadline passed without a successful renewal.
    Expired,
    /// The store says another owner (or nobody) holds the key now.
    NotHeld,
    /// The maximum hold time was reached, so renewal stopped.
    MaxHoldReached,
    /// The backend learned that the lease's session died (etcd lease revoked,
    /// Consul session invalidated, PostgreSQL connection closed, ...).
    SessionLost(String),
    /// The lease was released.
    Released,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::Expired => f.write_str("the lease expired without a successful renewal"),
            LossReason::NotHeld => f.write_str("the store no longer has this lease"),
            LossReason::MaxHoldReached => f.write_str("the maximum hold time was reached"),
            LossReason::SessionLost(why) => write!(f, "the backend session was lost: {why}"),
            LossReason::Released => f.write_str("the lease was released"),
        }
    }
}

/// A one-shot "this lease is lost" signal, shared by the guard, the renewer
/// and the backend.
///
/// Backends that learn of a loss themselves (a dead session or connection)
/// keep a clone and call [`LossSignal::trigger`]. The first reason wins.
#[derive(Clone, Debug, Default)]
pub struct LossSignal {
    token: CancellationToken,
    reason: Arc<OnceLock<LossReason>>,
}

impl LossSignal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal with `reason` (ignored if it already fired).
    pub fn trigger(&self, reason: LossReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Whether it fired.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The reason, once it fired.
    pub fn reason(&self) -> Option<LossReason> {
        self.reason.get().cloned()
    }

    /// Completes when the signal fires, with the reason.
    pub async fn wait(&self) -> LossReason {
        self.token.cancelled().await;
        self.reason().unwrap_or(LossReason::NotHeld)
    }

    /// A token cancelled when the signal fires, for `select!` or for handing
    /// to code that takes a [`CancellationToken`].
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }
}

/// A grant of a lock: key, owner, fencing token and validity deadline.
///
/// Backends create leases with [`Lease::new`]; users get them from a
/// [`LockGuard`](crate::LockGuard). `Debug` never shows the owner token.
#[derive(Clone)]
pub struct Lease {
    key: Key,
    owner: OwnerToken,
    fencing: FencingToken,
    ttl: Duration,
    valid_until: Instant,
    loss: LossSignal,
    handle: Option<Arc<dyn Any + Send + Sync>>,
}

impl Lease {
    /// A lease granted for `ttl`, valid on our side until `valid_until`
    /// (usually [`deadline`]`(sent_at, ttl)`).
    pub fn new(
        key: Key,
        owner: OwnerToken,
        fencing: FencingToken,
        ttl: Duration,
        valid_until: Instant,
    ) -> Self {
        Lease {
            key,
            owner,
            fencing,
            ttl,
            valid_until,
            loss: LossSignal::new(),
            handle: None,
        }
    }

    /// Attaches backend-private state (a connection, a session id, the etcd
    /// waiter key), read back with [`Lease::handle`].
    pub fn with_handle(mut self, handle: Arc<dyn Any + Send + Sync>) -> Self {
        self.handle = Some(handle);
        self
    }

    /// Uses `signal` as this lease's loss signal (for backends that keep one
    /// signal per session and share it).
    pub fn with_loss_signal(mut self, signal: LossSignal) -> Self {
        self.loss = signal;
        self
    }

    /// The lock's name.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The owner token (a secret: never log it).
    pub fn owner(&self) -> &OwnerToken {
        &self.owner
    }

    /// The fencing token of this grant.
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing
    }

    /// The TTL the lease was last granted or extended for.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Until when the lease is certainly ours (monotonic clock).
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Whether `valid_until` has passed.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.valid_until
    }

    /// Records a successful extension.
    pub fn set_validity(&mut self, ttl: Duration, valid_until: Instant) {
        self.ttl = ttl;
        self.valid_until = valid_until;
    }

    /// The loss signal of this lease.
    pub fn loss_signal(&self) -> &LossSignal {
        &self.loss
    }

    /// The backend-private state, if it is of type `T`.
    pub fn handle<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.handle.as_deref()?.downcast_ref::<T>()
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("fencing", &self.fencing)
            .field("ttl", &self.ttl)
            .field(
                "valid_for",
                &self.valid_until.saturating_duration_since(Instant::now()),
            )
            .finish_non_exhaustive()
    }
}

/// The clock-drift allowance subtracted from every lease: 1% of the TTL plus
/// 2 ms (the figures of the Redis documentation's Redlock algorithm).
///
/// Our monotonic clock and the server's may run at slightly different rates;
/// over a TTL they can disagree by a small fraction of it. Subtracting this
/// margin makes us give up a lease *before* the server could think it expired.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(lock_core::safety_margin(Duration::from_secs(10)), Duration::from_millis(102));
/// ```
pub fn safety_margin(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// The validity deadline of a lease of `ttl` requested at `sent_at`:
/// `sent_at + ttl - safety_margin(ttl)` (never before `sent_at`).
pub fn deadline(sent_at: Instant, ttl: Duration) -> Instant {
    sent_at + ttl.saturating_sub(safety_margin(ttl))
}

/// What [`Backend::inspect`](crate::Backend::inspect) tells about a key.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockInfo {
    /// Whether somebody holds the key now.
    pub held: bool,
    /// The current holder's fencing token, when held.
    pub fencing_token: Option<FencingToken>,
    /// Time left on the holder's lease, when the store tells.
    pub expires_in: Option<Duration>,
    /// Queued waiters (fair mode or queue-based stores), when the store tells.
    pub waiters: Option<usize>,
}

impl LockInfo {
    /// A free key with no waiters.
    pub fn free() -> Self {
        LockInfo {
            held: false,
            fencing_token: None,
            expires_in: None,
            waiters: Some(0),
        }
    }

    /// A held key.
    pub fn held(fencing_token: Option<FencingToken>, expires_in: Option<Duration>) -> Self {
        LockInfo {
            held: true,
            fencing_token,
            expires_in,
            waiters: None,
        }
    }

    /// Sets the number of queued waiters.
    pub fn with_waiters(mut self, waiters: Option<usize>) -> Self {
        self.waiters = waiters;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_tokens_are_random_and_hidden() {
        let a = OwnerToken::generate();
        let b = OwnerToken::generate();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "OwnerToken(…)");
        assert_eq!(OwnerToken::from_hex(&a.to_hex()), Some(a));
        assert_eq!(OwnerToken::from_hex("zz"), None);
        assert_eq!(OwnerToken::from_hex(&"g".repeat(32)), None);
    }

    #[test]
    fn lease_debug_hides_owner() {
        let owner = OwnerToken::generate();
        let lease = Lease::new(
            Key::new("k").unwrap(),
            owner,
            FencingToken::new(7),
            Duration::from_secs(1),
            Instant::now(),
        );
        let dbg = format!("{lease:?}");
        assert!(!dbg.contains(&owner.to_hex()), "{dbg}");
        assert!(dbg.contains('7'));
    }

    #[tokio::test]
    async fn loss_signal_keeps_first_reason() {
        let s = LossSignal::new();
        s.trigger(LossReason::Expired);
        s.clone().trigger(LossReason::NotHeld);
        assert_eq!(s.wait().await, LossReason::Expired);
    }

    #[test]
    fn deadline_is_before_ttl() {
        let now = Instant::now();
        let ttl = Duration::from_secs(30);
        assert!(deadline(now, ttl) < now + ttl);
        assert_eq!(deadline(now, Duration::from_millis(1)), now);
    }
}
