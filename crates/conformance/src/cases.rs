//! The conformance cases. Each is a plain `async fn` that panics when the
//! backend breaks the contract; [`suite!`](crate::suite) runs them all.
//!
//! Cases use their own random keys, so they can run in parallel against one
//! server. Timing checks are loose sanity bounds (a wake-up must not look
//! like polling), never benchmarks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use lock_core::{
    AcquireRequest, Attempt, Backend, Error, FencingToken, Key, Lease, LockClient, LockOptions,
    LossReason, OwnerToken, Wait,
};
use tokio::time::{Instant, sleep, timeout};

use crate::support::{Section, expiry_bound, long_ttl, short_ttl, unique_key};
use crate::{Factory, FencedRegister};

async fn client(f: &dyn Factory) -> LockClient {
    LockClient::from_arc(backend(f).await)
}

async fn backend(f: &dyn Factory) -> Arc<dyn Backend> {
    match f.backend().await {
        Ok(b) => b,
        Err(e) => panic!("the factory could not open a client (is the server running?): {e}"),
    }
}

fn skip(case: &str, reason: &str) {
    eprintln!("SKIPPED {case}: {reason}");
}

/// Options with a TTL and a wait limit, auto-renew on.
fn opts(ttl: Duration, wait: Wait) -> LockOptions {
    LockOptions::new().ttl(ttl).wait(wait)
}

/// Takes `key` through the backend alone: no guard, no renewal, as a
/// process that died right after acquiring would leave it.
async fn abandon(b: &dyn Backend, key: &Key, ttl: Duration) -> Lease {
    match b
        .try_acquire(&AcquireRequest::new(key.clone(), ttl))
        .await
        .unwrap()
    {
        Attempt::Granted(lease) => lease,
        Attempt::Held { .. } => panic!("{key} should have been free"),
    }
}

async fn holder_token(c: &LockClient, key: &Key) -> Option<FencingToken> {
    let info = c.inspect(key).await.unwrap();
    if info.held { info.fencing_token } else { None }
}

/// Acquire, release, and acquire again; the key is free at the end.
pub async fn acquire_release_reacquire(f: &dyn Factory) {
    let c = client(f).await;
    let key = unique_key("arr");
    let g = c
        .try_lock(&key)
        .await
        .unwrap()
        .expect("a fresh key is free");
    assert_eq!(g.key(), &key);
    g.release().await.unwrap();
    let g = c
        .try_lock(&key)
        .await
        .unwrap()
        .expect("a released key is free");
    g.release().await.unwrap();
    assert!(!c.inspect(&key).await.unwrap().held);
}

/// `try_lock` on a held key is `Ok(None)`, not an error, and changes nothing.
pub async fn try_lock_on_held_key_returns_none(f: &dyn Factory) {
    let c = client(f).await;
    let key = unique_key("held");
    let g = c.lock(&key).await.unwrap();
    assert!(c.try_lock(&key).await.unwrap().is_none());
    assert!(c.try_lock(&key).await.unwrap().is_none());
    assert_eq!(holder_token(&c, &key).await, Some(g.fencing_token()));
    g.release().await.unwrap();
}

/// A second, independent client cannot take a lock the first one holds.
pub async fn second_client_is_excluded(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let key = unique_key("excl");
    let g = a.lock(&key).await.unwrap();
    assert!(b.try_lock(&key).await.unwrap().is_none());
    g.release().await.unwrap();
    let g = b.try_lock(&key).await.unwrap().expect("free after release");
    assert!(a.try_lock(&key).await.unwrap().is_none());
    g.release().await.unwrap();
}

/// A waiter is woken by the store when the holder releases: it gets the
/// lock well before the re-check interval would have found it (a loose
/// bound, to catch polling), or within the re-check interval for backends
/// without push.
pub async fn waiter_wakes_promptly_on_release(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("wake");
    let g = a
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No))
        .await
        .unwrap();
    let k = key.clone();
    let waiter = tokio::spawn(async move {
        let got = b
            .lock_with(
                &k,
                &opts(long_ttl(&caps), Wait::For(Duration::from_secs(30))),
            )
            .await;
        (Instant::now(), got)
    });
    sleep(Duration::from_millis(300)).await; // let the waiter subscribe and try once
    let released_at = Instant::now();
    g.release().await.unwrap();
    let (got_at, got) = waiter.await.unwrap();
    got.unwrap().release().await.unwrap();
    let caps = a.capabilities();
    let bound = if caps.push_wakeup.is_supported() {
        (caps.recheck_interval / 2).min(Duration::from_millis(500))
    } else {
        caps.recheck_interval * 3 / 2
    };
    let took = got_at - released_at;
    assert!(
        took < bound,
        "the waiter took {took:?} after the release (bound {bound:?})"
    );
}

/// `Wait::Forever` waits as long as it takes, and gets the lock on release.
pub async fn wait_forever_waits_until_release(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("forever");
    let g = a
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No))
        .await
        .unwrap();
    let k = key.clone();
    let ttl = long_ttl(&caps);
    let waiter = tokio::spawn(async move { b.lock_with(&k, &opts(ttl, Wait::Forever)).await });
    sleep(Duration::from_millis(700)).await;
    assert!(!waiter.is_finished(), "the waiter got a held lock");
    g.release().await.unwrap();
    let got = timeout(Duration::from_secs(10), waiter)
        .await
        .expect("waiter never woke");
    got.unwrap().unwrap().release().await.unwrap();
}

/// A wait limit on a held key ends in [`Error::Timeout`] after about the
/// limit, and the error is retryable.
pub async fn wait_timeout_returns_timeout_error(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("timeout");
    let g = a
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No))
        .await
        .unwrap();
    let limit = Duration::from_millis(400);
    let start = Instant::now();
    let err = b
        .lock_with(&key, &opts(long_ttl(&caps), Wait::For(limit)))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(err, Error::Timeout { .. }),
        "expected a timeout, got {err}"
    );
    assert!(err.is_retryable());
    assert!(took >= limit, "gave up after {took:?}, before the limit");
    assert!(
        took < limit + Duration::from_secs(3),
        "gave up only after {took:?}"
    );
    let err = b
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { .. }),
        "Wait::No on a held key: {err}"
    );
    g.release().await.unwrap();
}

async fn timed_out_waiter_leaves_nothing(f: &dyn Factory, fair: bool) {
    let (a, b, c) = (client(f).await, client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key(if fair { "fairleak" } else { "leak" });
    let g = a
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No).fair(fair))
        .await
        .unwrap();
    let waiting = opts(long_ttl(&caps), Wait::For(Duration::from_millis(300))).fair(fair);
    for _ in 0..3 {
        let err = b.lock_with(&key, &waiting).await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
    }
    g.release().await.unwrap();
    // Nobody waits any more, so a fair try gets the lock at once.
    let got = c
        .try_lock_with(&key, &opts(long_ttl(&caps), Wait::No).fair(fair))
        .await
        .unwrap();
    let got = got.expect("a timed-out waiter left something behind that blocks the key");
    let info = c.inspect(&key).await.unwrap();
    assert!(
        matches!(info.waiters, None | Some(0)),
        "waiters left behind: {info:?}"
    );
    got.release().await.unwrap();
}

/// A waiter that times out leaves no lock and no queue entry behind.
pub async fn wait_timeout_leaves_nothing_behind(f: &dyn Factory) {
    timed_out_waiter_leaves_nothing(f, false).await;
}

/// A lock whose holder vanished is free again after its TTL (plus the
/// backend's declared expiry grace), and not before.
pub async fn abandoned_lock_expires(f: &dyn Factory) {
    let (a, b) = (backend(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("expire");
    let ttl = short_ttl(&caps);
    let start = Instant::now();
    abandon(a.as_ref(), &key, ttl).await;
    assert!(
        b.try_lock(&key).await.unwrap().is_none(),
        "held right after the grant"
    );
    let bound = expiry_bound(&caps, ttl);
    let got = b
        .lock_with(&key, &opts(long_ttl(&caps), Wait::For(bound * 2)))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= ttl.mul_f64(0.9),
        "freed after {took:?}, before the TTL {ttl:?}"
    );
    assert!(
        took <= bound + Duration::from_secs(1),
        "freed only after {took:?}"
    );
    got.release().await.unwrap();
}

/// A waiter does not need a release: it gets the lock when the holder's
/// lease runs out.
pub async fn waiter_acquires_after_holder_expires(f: &dyn Factory) {
    let (a, b) = (backend(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("expwait");
    let ttl = short_ttl(&caps);
    let old = abandon(a.as_ref(), &key, ttl).await;
    let bound = expiry_bound(&caps, ttl) * 2;
    let g = b
        .lock_with(&key, &opts(long_ttl(&caps), Wait::For(bound)))
        .await
        .unwrap();
    assert!(g.fencing_token() > old.fencing_token());
    g.release().await.unwrap();
}

/// `extend` pushes the lease out: the lock is still held after its first
/// TTL has passed.
pub async fn extend_keeps_the_lock(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("extend");
    let ttl = short_ttl(&caps);
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).auto_renew(false))
        .await
        .unwrap();
    let first_deadline = g.valid_until();
    sleep(ttl / 3).await;
    g.extend(ttl * 3).await.unwrap();
    assert!(g.valid_until() > first_deadline);
    sleep(expiry_bound(&caps, ttl)).await;
    assert!(!g.is_lost());
    assert!(
        b.try_lock(&key).await.unwrap().is_none(),
        "the extended lock was free"
    );
    g.release().await.unwrap();
}

/// With auto-renew the lock outlives many TTLs, and `lost()` does not fire.
pub async fn auto_renew_keeps_the_lock(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("renew");
    let ttl = short_ttl(&caps);
    let g = a.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    let held_for = ttl * 3 + caps.expiry_grace;
    tokio::select! {
        reason = g.lost() => panic!("lost while auto-renewing: {reason}"),
        _ = sleep(held_for) => {}
    }
    assert!(
        b.try_lock(&key).await.unwrap().is_none(),
        "a renewed lock was free"
    );
    g.release().await.unwrap();
}

fn forged(lease: &Lease) -> Lease {
    Lease::new(
        lease.key().clone(),
        OwnerToken::generate(),
        lease.fencing_token(),
        lease.ttl(),
        lease.valid_until(),
    )
}

/// Releasing with someone else's key but a wrong owner token answers
/// "not ours" and leaves the lock with its holder.
pub async fn release_by_non_owner_changes_nothing(f: &dyn Factory) {
    let (a, b) = (client(f).await, backend(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("nonowner");
    let g = a
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No))
        .await
        .unwrap();
    assert!(
        !b.release(&forged(&g.lease())).await.unwrap(),
        "a stranger released our lock"
    );
    assert_eq!(holder_token(&a, &key).await, Some(g.fencing_token()));
    g.release().await.unwrap();
}

/// Extending with a wrong owner token is [`Error::LockLost`] and changes
/// nothing.
pub async fn extend_by_non_owner_changes_nothing(f: &dyn Factory) {
    let (a, b) = (client(f).await, backend(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("nonownext");
    let ttl = short_ttl(&caps);
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).auto_renew(false))
        .await
        .unwrap();
    let err = b
        .extend(&forged(&g.lease()), long_ttl(&caps))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    assert_eq!(holder_token(&a, &key).await, Some(g.fencing_token()));
    // The stranger's extension must not have pushed our lease out: abandoned
    // now, it still ends after about one TTL, not the stranger's long one.
    std::mem::forget(g);
    let c = client(f).await;
    let bound = expiry_bound(&caps, ttl) * 2;
    let got = c
        .lock_with(&key, &opts(long_ttl(&caps), Wait::For(bound)))
        .await;
    got.expect("a stranger's extend pushed our lease out")
        .release()
        .await
        .unwrap();
}

/// Releasing the same lease twice: the second answer is "not held".
pub async fn double_release_reports_not_held(f: &dyn Factory) {
    let b = backend(f).await;
    let key = unique_key("double");
    let lease = abandon(b.as_ref(), &key, long_ttl(b.capabilities())).await;
    assert!(b.release(&lease).await.unwrap());
    assert!(!b.release(&lease).await.unwrap(), "released twice");
    assert!(!b.inspect(&key).await.unwrap().held);
}

/// A guard whose lease ran out and went to someone else cannot release the
/// new holder's lock: `release` is [`Error::LockLost`].
pub async fn release_after_expiry_reports_lost(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("relexp");
    let ttl = short_ttl(&caps);
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).auto_renew(false))
        .await
        .unwrap();
    let bound = expiry_bound(&caps, ttl) * 2;
    let next = b
        .lock_with(&key, &opts(long_ttl(&caps), Wait::For(bound)))
        .await
        .unwrap();
    let err = g.release().await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    assert_eq!(holder_token(&b, &key).await, Some(next.fencing_token()));
    next.release().await.unwrap();
}

/// `extend` after the lease was lost is [`Error::LockLost`] and does not
/// touch the new holder's lease.
pub async fn extend_after_loss_is_lock_lost(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("extlost");
    let ttl = short_ttl(&caps);
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).auto_renew(false))
        .await
        .unwrap();
    let bound = expiry_bound(&caps, ttl) * 2;
    let next = b
        .lock_with(&key, &opts(long_ttl(&caps), Wait::For(bound)))
        .await
        .unwrap();
    let err = g.extend(ttl).await.unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    assert!(g.is_lost());
    assert_eq!(holder_token(&b, &key).await, Some(next.fencing_token()));
    next.release().await.unwrap();
}

/// Fencing tokens strictly increase from holder to holder, across clients.
pub async fn fencing_increases_across_holders(f: &dyn Factory) {
    let clients = [client(f).await, client(f).await, client(f).await];
    let key = unique_key("fence");
    let mut last: Option<FencingToken> = None;
    for i in 0..9 {
        let g = clients[i % 3].lock(&key).await.unwrap();
        if let Some(prev) = last {
            assert!(
                g.fencing_token() > prev,
                "token {} after {prev}",
                g.fencing_token()
            );
        }
        last = Some(g.fencing_token());
        g.release().await.unwrap();
    }
}

/// A grant after an expired lease gets a higher token than the expired one.
pub async fn fencing_increases_across_expiry(f: &dyn Factory) {
    let (a, b) = (backend(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("fenceexp");
    let ttl = short_ttl(&caps);
    let mut last = abandon(a.as_ref(), &key, ttl).await.fencing_token();
    for _ in 0..2 {
        let bound = expiry_bound(&caps, ttl) * 2;
        let g = b
            .lock_with(&key, &opts(ttl, Wait::For(bound)).auto_renew(false))
            .await
            .unwrap();
        assert!(
            g.fencing_token() > last,
            "token {} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        std::mem::forget(g); // abandon it: the next grant follows an expiry
    }
}

/// Tokens increase per key, with grants of many keys interleaved.
pub async fn fencing_increases_per_key_across_many_keys(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let keys: Vec<Key> = (0..12)
        .map(|i| unique_key(&format!("fencemany{i}")))
        .collect();
    let mut last: Vec<Option<FencingToken>> = vec![None; keys.len()];
    for round in 0..3 {
        let c = if round % 2 == 0 { &a } else { &b };
        let guards = join_all(keys.iter().map(|k| c.lock(k))).await;
        for (i, g) in guards.into_iter().enumerate() {
            let g = g.unwrap();
            if let Some(prev) = last[i] {
                assert!(
                    g.fencing_token() > prev,
                    "key {i}: token {} after {prev}",
                    g.fencing_token()
                );
            }
            last[i] = Some(g.fencing_token());
            g.release().await.unwrap();
        }
    }
}

/// Dropping a guard releases the lock soon, long before its TTL.
pub async fn guard_drop_releases(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("drop");
    let ttl = long_ttl(&caps);
    let g = a.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    let start = Instant::now();
    drop(g);
    let got = b
        .lock_with(&key, &opts(ttl, Wait::For(Duration::from_secs(5))))
        .await;
    got.expect("the dropped guard's lock was not released")
        .release()
        .await
        .unwrap();
    assert!(start.elapsed() < ttl / 2);
}

async fn cancelled_waiter_leaves_nothing(f: &dyn Factory, fair: bool) {
    let (a, b, c) = (client(f).await, client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key(if fair { "fcancel" } else { "cancel" });
    let ttl = long_ttl(&caps);
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).fair(fair))
        .await
        .unwrap();
    let forever = opts(ttl, Wait::Forever).fair(fair);
    for _ in 0..3 {
        let waiting = b.lock_with(&key, &forever);
        assert!(timeout(Duration::from_millis(250), waiting).await.is_err());
    }
    sleep(Duration::from_millis(100)).await; // let the cancelled tasks clean up
    g.release().await.unwrap();
    let got = c
        .try_lock_with(&key, &opts(ttl, Wait::No).fair(fair))
        .await
        .unwrap();
    got.expect("a cancelled waiter left something behind")
        .release()
        .await
        .unwrap();
    let info = c.inspect(&key).await.unwrap();
    assert!(!info.held);
    assert!(matches!(info.waiters, None | Some(0)), "{info:?}");
}

/// Dropping a waiting `lock` future leaves no lock and no queue entry.
pub async fn cancelled_acquire_leaks_nothing(f: &dyn Factory) {
    cancelled_waiter_leaves_nothing(f, false).await;
}

/// The same in fair mode, where waiters hold a place in a queue.
pub async fn cancelled_fair_acquire_leaks_nothing(f: &dyn Factory) {
    let caps = backend(f).await.capabilities().clone();
    if let Some(why) = caps.fifo.reason() {
        return skip("cancelled_fair_acquire_leaks_nothing", why);
    }
    cancelled_waiter_leaves_nothing(f, true).await;
    timed_out_waiter_leaves_nothing(f, true).await;
}

/// A waiter cancelled right as the lock is handed to it must not keep the
/// lock: the grant is released again.
pub async fn cancel_racing_grant_releases_it(f: &dyn Factory) {
    let (a, b, c) = (client(f).await, client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let ttl = long_ttl(&caps);
    for round in 0..8u32 {
        let key = unique_key(&format!("race{round}"));
        let g = a.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
        let forever = opts(ttl, Wait::Forever);
        let waiting = b.lock_with(&key, &forever);
        // Vary the cut-off around the moment of the release.
        let cut = Duration::from_millis(150 + u64::from(round) * 3);
        let release = async {
            sleep(Duration::from_millis(150)).await;
            g.release().await.unwrap();
        };
        let (got, ()) = tokio::join!(timeout(cut, waiting), release);
        if let Ok(got) = got {
            got.unwrap().release().await.unwrap();
        }
        let free = c
            .lock_with(&key, &opts(ttl, Wait::For(Duration::from_secs(5))))
            .await;
        free.expect("a cancelled grant kept the lock")
            .release()
            .await
            .unwrap();
    }
}

/// Without renewal, `lost()` fires at the validity deadline, before the
/// store hands the lock to a waiting client: the waiter's grant arrives
/// only after the holder was told.
pub async fn lost_fires_before_expiry_without_renewal(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("lostexp");
    let ttl = short_ttl(&caps);
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).auto_renew(false))
        .await
        .unwrap();
    let granted = Instant::now();
    let k = key.clone();
    let bound = expiry_bound(&caps, ttl) * 2;
    let waiter = tokio::spawn(async move {
        let got = b
            .lock_with(&k, &opts(long_ttl(&caps), Wait::For(bound)))
            .await;
        (Instant::now(), got)
    });
    // lost() fires when this deadline passes (the timer of the renewal task;
    // when the test task sees it may be later on a loaded machine).
    let deadline = g.valid_until();
    // The request was sent before `granted`, so its deadline (counted from
    // the send, minus the safety margin) cannot lie later than this.
    let latest = granted + ttl - lock_core::safety_margin(ttl);
    assert!(
        deadline <= latest,
        "valid {:?} past send + TTL - margin",
        deadline - latest
    );
    let reason = timeout(ttl + Duration::from_secs(1), g.lost())
        .await
        .expect("lost() never fired");
    assert_eq!(reason, LossReason::Expired);
    assert!(g.is_lost());
    assert!(
        Instant::now() >= deadline,
        "lost() fired before the deadline"
    );
    let (granted_at, got) = waiter.await.unwrap();
    let next = got.expect("the waiter never got the expired lock");
    assert!(
        granted_at >= deadline,
        "the store gave the lock away {:?} before our deadline, when lost() fires",
        deadline - granted_at
    );
    assert!(matches!(g.release().await, Err(Error::LockLost { .. })));
    next.release().await.unwrap();
}

/// When the store drops our lease behind our back, the renewer finds out
/// and `lost()` fires.
pub async fn lost_fires_when_lock_is_taken_away(f: &dyn Factory) {
    let (a, b) = (client(f).await, backend(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("lostaway");
    let ttl = short_ttl(&caps);
    let g = a.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    // Another client deletes the lease (it knows the owner token here only
    // because the test hands it over).
    assert!(b.release(&g.lease()).await.unwrap());
    let reason = timeout(ttl * 2, g.lost())
        .await
        .expect("lost() never fired");
    assert!(
        matches!(reason, LossReason::NotHeld | LossReason::SessionLost(_)),
        "unexpected loss reason {reason}"
    );
    assert!(matches!(g.release().await, Err(Error::LockLost { .. })));
}

/// Auto-renew stops at the maximum hold time; the lock is then lost and
/// free for others.
pub async fn max_hold_stops_renewal(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("maxhold");
    let ttl = short_ttl(&caps);
    let max_hold = ttl * 2;
    let start = Instant::now();
    let g = a
        .lock_with(&key, &opts(ttl, Wait::No).max_hold(max_hold))
        .await
        .unwrap();
    let reason = timeout(max_hold + ttl * 2, g.lost())
        .await
        .expect("renewal never stopped");
    assert_eq!(reason, LossReason::MaxHoldReached);
    assert!(
        start.elapsed() >= ttl,
        "gave up after {:?}",
        start.elapsed()
    );
    // It fires at the last capped lease's deadline, which ends at the hold
    // limit counted from the grant; allow for a loaded machine.
    assert!(
        start.elapsed() <= max_hold + Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    let bound = expiry_bound(&caps, ttl) * 2;
    let next = b
        .lock_with(&key, &opts(ttl, Wait::For(bound)))
        .await
        .unwrap();
    next.release().await.unwrap();
}

/// In fair mode waiters get the lock in the order they asked.
pub async fn fifo_order_in_fair_mode(f: &dyn Factory) {
    let holder = client(f).await;
    let caps = holder.capabilities().clone();
    if let Some(why) = caps.fifo.reason() {
        return skip("fifo_order_in_fair_mode", why);
    }
    let key = unique_key("fifo");
    let ttl = long_ttl(&caps);
    let fair = opts(ttl, Wait::For(Duration::from_secs(30))).fair(true);
    let g = holder.lock_with(&key, &fair).await.unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let c = client(f).await;
        let (key, fair, order) = (key.clone(), fair.clone(), Arc::clone(&order));
        tasks.push(tokio::spawn(async move {
            let g = c.lock_with(&key, &fair).await.unwrap();
            order.lock().unwrap().push(i);
            sleep(Duration::from_millis(20)).await;
            g.release().await.unwrap();
        }));
        sleep(Duration::from_millis(150)).await; // make the arrival order certain
    }
    g.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
}

/// Fair mode either works or is refused with [`Error::Unsupported`], as the
/// capabilities say.
pub async fn fair_mode_is_supported_or_typed_error(f: &dyn Factory) {
    let c = client(f).await;
    let caps = c.capabilities().clone();
    let key = unique_key("fairsup");
    let res = c
        .try_lock_with(&key, &opts(long_ttl(&caps), Wait::No).fair(true))
        .await;
    if caps.fifo.is_supported() {
        res.unwrap()
            .expect("fair try_lock on a free key")
            .release()
            .await
            .unwrap();
    } else {
        assert!(matches!(res, Err(Error::Unsupported { .. })), "{res:?}");
        assert!(!c.inspect(&key).await.unwrap().held);
    }
}

/// Locks on different keys never interfere, including names that nest or
/// differ only in case or punctuation.
pub async fn keys_are_independent(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let base = unique_key("indep");
    let names = ["", "/x", "/x/y", ".x", "X", "/", "-1", "/.lock", "*"];
    let keys: Vec<Key> = names
        .iter()
        .map(|n| Key::new(format!("{base}{n}")).unwrap())
        .collect();
    let mut guards = Vec::new();
    for k in &keys {
        guards.push(
            a.try_lock(k)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{k:?} was not free")),
        );
    }
    for k in &keys {
        assert!(
            b.try_lock(k).await.unwrap().is_none(),
            "{k:?} was free while held"
        );
    }
    // Releasing one leaves the others held.
    let first = guards.remove(0);
    first.release().await.unwrap();
    b.try_lock(&keys[0])
        .await
        .unwrap()
        .expect("released key")
        .release()
        .await
        .unwrap();
    for k in &keys[1..] {
        assert!(
            b.try_lock(k).await.unwrap().is_none(),
            "{k:?} was freed by another key"
        );
    }
    for g in guards {
        g.release().await.unwrap();
    }
}

/// Every valid key works: unicode, slashes, spaces, dots, braces, percent
/// signs, and the maximum length in bytes.
pub async fn every_valid_key_round_trips(f: &dyn Factory) {
    let (a, b) = (client(f).await, client(f).await);
    let tag = unique_key("valid");
    let mut names: Vec<String> = [
        "ключ",
        "锁",
        "🔒 emoji",
        "a/b/c",
        "/leading",
        "trailing/",
        "a//b",
        "with space",
        " padded ",
        ".",
        "..",
        "...",
        "%2F",
        "100%",
        "{tag}",
        "}{",
        "a\\b",
        "?q=1&x#frag",
        "*",
        "[x]",
        "'quote\"",
        "+plus",
        "~tilde",
        "é",
        "\u{a0}nbsp",
    ]
    .iter()
    .map(|s| format!("{s}-{tag}"))
    .collect();
    names.extend([".".to_string(), "..".to_string()]);
    names.push(format!("{tag}-{}", "k".repeat(512 - tag.len() - 1)));
    let euro = "€".repeat(170);
    names.push(euro);
    for name in &names {
        let key = Key::new(name).unwrap();
        let g = match a.try_lock(&key).await.unwrap() {
            Some(g) => g,
            // "." and ".." are shared by every run: they may still be held
            // by a concurrent run of this case against the same server.
            None if name.len() <= 2 => continue,
            None => panic!("{name:?} was not free"),
        };
        assert_eq!(g.key().as_str(), name);
        assert!(
            b.try_lock(&key).await.unwrap().is_none(),
            "{name:?}: held but free for others"
        );
        let info = b.inspect(&key).await.unwrap();
        assert!(info.held, "{name:?}: inspect does not see the holder");
        g.release().await.unwrap();
        assert!(
            !b.inspect(&key).await.unwrap().held,
            "{name:?}: still held after release"
        );
    }
}

/// Invalid keys are rejected with [`Error::InvalidKey`] before anything is
/// sent.
pub async fn invalid_keys_are_rejected(f: &dyn Factory) {
    let c = client(f).await;
    let long = "x".repeat(513);
    let long_utf8 = "€".repeat(171);
    for bad in [
        "",
        "a\0b",
        "line\nbreak",
        "tab\t",
        "\u{7f}",
        long.as_str(),
        long_utf8.as_str(),
    ] {
        let err = c.try_lock(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{bad:?}: {err}");
        let err = c.lock(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{bad:?}: {err}");
        assert!(!err.is_retryable());
        assert!(matches!(
            c.inspect(bad).await,
            Err(Error::InvalidKey { .. })
        ));
    }
}

/// TTLs outside the backend's declared range are rejected with
/// [`Error::InvalidOptions`] and take nothing.
pub async fn ttl_outside_limits_is_rejected(f: &dyn Factory) {
    let c = client(f).await;
    let caps = c.capabilities().clone();
    let key = unique_key("badttl");
    let mut bad = vec![Duration::ZERO, caps.max_ttl + Duration::from_secs(1)];
    if caps.min_ttl > Duration::from_millis(1) {
        bad.push(caps.min_ttl - Duration::from_millis(1));
    }
    for ttl in &bad {
        let err = c
            .try_lock_with(&key, &opts(*ttl, Wait::No))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidOptions { .. }),
            "ttl {ttl:?}: {err}"
        );
    }
    assert!(
        !c.inspect(&key).await.unwrap().held,
        "a rejected request took the lock"
    );
    let g = c
        .lock_with(&key, &opts(long_ttl(&caps), Wait::No))
        .await
        .unwrap();
    for ttl in &bad {
        let err = g.extend(*ttl).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidOptions { .. }),
            "extend {ttl:?}: {err}"
        );
    }
    assert!(!g.is_lost());
    g.release().await.unwrap();
}

/// `inspect` shows the holder's fencing token and a remaining time no
/// longer than the TTL, and "free" after release.
pub async fn inspect_reports_the_holder(f: &dyn Factory) {
    let c = client(f).await;
    let caps = c.capabilities().clone();
    let key = unique_key("inspect");
    assert!(!c.inspect(&key).await.unwrap().held);
    let ttl = long_ttl(&caps);
    let g = c.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    let info = c.inspect(&key).await.unwrap();
    assert!(info.held);
    assert_eq!(info.fencing_token, Some(g.fencing_token()));
    if let Some(left) = info.expires_in {
        assert!(
            left <= ttl + caps.expiry_grace,
            "expires in {left:?}, TTL {ttl:?}"
        );
    }
    g.release().await.unwrap();
    assert!(!c.inspect(&key).await.unwrap().held);
}

/// The validity deadline lies in the future and no later than the TTL
/// after the request was sent.
pub async fn valid_until_is_within_the_ttl(f: &dyn Factory) {
    let c = client(f).await;
    let caps = c.capabilities().clone();
    let key = unique_key("validity");
    let ttl = long_ttl(&caps);
    let before = Instant::now();
    let g = c.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    assert!(g.valid_until() > Instant::now());
    assert!(g.valid_until() <= before + ttl, "valid beyond the TTL");
    assert_eq!(g.lease().ttl(), ttl);
    g.release().await.unwrap();
}

/// Eight waiters on one key each get the lock once, one at a time.
pub async fn many_waiters_each_get_the_lock(f: &dyn Factory) {
    let holder = client(f).await;
    let caps = holder.capabilities().clone();
    let key = unique_key("many");
    let g = holder.lock(&key).await.unwrap();
    let register = Arc::new(FencedRegister::default());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client(f).await;
        let (key, register) = (key.clone(), Arc::clone(&register));
        let o = opts(long_ttl(&caps), Wait::For(Duration::from_secs(60)));
        tasks.push(tokio::spawn(async move {
            let g = c.lock_with(&key, &o).await.unwrap();
            let enter = Instant::now();
            sleep(Duration::from_millis(10)).await;
            register.record(Section {
                token: g.fencing_token(),
                enter,
                exit: Instant::now(),
            });
            g.release().await.unwrap();
        }));
    }
    sleep(Duration::from_millis(200)).await;
    g.release().await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(register.check(), 8);
}

/// 32 tasks on 4 clients take one key over and over; a fenced register
/// records every critical section. No two sections overlap, and tokens rise
/// in the order the sections ran.
pub async fn concurrent_critical_sections_never_overlap(f: &dyn Factory) {
    let clients: Vec<LockClient> = join_all((0..4).map(|_| client(f))).await;
    let caps = clients[0].capabilities().clone();
    let key = unique_key("register");
    let register = Arc::new(FencedRegister::default());
    let per_task = 4;
    let mut tasks = Vec::new();
    for t in 0..32 {
        let c = clients[t % clients.len()].clone();
        let (key, register) = (key.clone(), Arc::clone(&register));
        let o = opts(long_ttl(&caps), Wait::For(Duration::from_secs(120)));
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_task {
                let g = c.lock_with(&key, &o).await.unwrap();
                let enter = Instant::now();
                tokio::task::yield_now().await;
                register.record(Section {
                    token: g.fencing_token(),
                    enter,
                    exit: Instant::now(),
                });
                g.release().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(register.check(), 32 * per_task);
}

async fn retry_lock(
    c: &LockClient,
    key: &Key,
    ttl: Duration,
    within: Duration,
) -> lock_core::LockGuard {
    let start = Instant::now();
    loop {
        match c
            .lock_with(key, &opts(ttl, Wait::For(Duration::from_secs(2))))
            .await
        {
            Ok(g) => return g,
            Err(e) if start.elapsed() < within => eprintln!("retrying after: {e}"),
            Err(e) => panic!("no lock {within:?} after the fault: {e}"),
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// After the server restarts, the same client works again by itself.
pub async fn recovers_after_server_restart(f: &dyn Factory) {
    let Some(faults) = f.faults() else {
        return skip(
            "recovers_after_server_restart",
            "the factory provides no fault control",
        );
    };
    let c = client(f).await;
    let caps = c.capabilities().clone();
    let key = unique_key("restart");
    c.lock(&key).await.unwrap().release().await.unwrap();
    faults.restart().await.expect("restart");
    let g = retry_lock(&c, &key, long_ttl(&caps), Duration::from_secs(30)).await;
    g.release().await.unwrap();
}

/// A lease held across a restart either survives (backends that keep leases
/// on disk: still ours, nobody else gets it) or its loss is reported through
/// `lost()`, as the capabilities declare. Never silently kept.
pub async fn lease_survives_restart_or_loss_is_reported(f: &dyn Factory) {
    let Some(faults) = f.faults() else {
        return skip(
            "lease_survives_restart_or_loss_is_reported",
            "no fault control",
        );
    };
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("survive");
    // Long enough that a restart on a loaded machine (seconds) fits well
    // inside one lease: a lease that should survive must not run out.
    let ttl = Duration::from_secs(6).max(caps.min_ttl).min(caps.max_ttl);
    let g = a.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    faults.restart().await.expect("restart");
    if caps.survives_restart.is_supported() {
        tokio::select! {
            reason = g.lost() => panic!("a lease that should survive a restart was lost: {reason}"),
            _ = sleep(ttl * 2) => {}
        }
        let other = b.lock_with(&key, &opts(ttl, Wait::No)).await;
        assert!(
            matches!(
                other,
                Err(Error::Timeout { .. }) | Err(Error::Connection { .. })
            ),
            "{other:?}"
        );
        g.release().await.unwrap();
    } else {
        let reason = timeout(ttl * 3, g.lost())
            .await
            .expect("loss after restart not reported");
        eprintln!("lost after restart: {reason}");
        let next = retry_lock(&b, &key, ttl, Duration::from_secs(30)).await;
        assert!(
            next.fencing_token() > g.fencing_token(),
            "fencing went backwards after a restart"
        );
        next.release().await.unwrap();
    }
}

/// A server frozen for longer than the TTL: the holder's `lost()` fires by
/// its validity deadline, and the client works again after the thaw.
pub async fn pause_longer_than_ttl_reports_loss(f: &dyn Factory) {
    let Some(faults) = f.faults() else {
        return skip("pause_longer_than_ttl_reports_loss", "no fault control");
    };
    let c = client(f).await;
    let caps = c.capabilities().clone();
    let key = unique_key("pause");
    let ttl = short_ttl(&caps)
        .max(Duration::from_secs(1))
        .min(caps.max_ttl);
    let g = c.lock_with(&key, &opts(ttl, Wait::No)).await.unwrap();
    faults.pause().await.expect("pause");
    let deadline = g.valid_until();
    let lost = timeout(ttl * 2, g.lost()).await;
    let fired_at = Instant::now();
    faults.resume().await.expect("resume");
    let reason = lost.expect("lost() did not fire while the server was frozen");
    assert!(
        fired_at <= deadline + Duration::from_millis(100),
        "lost() fired late"
    );
    eprintln!("lost while paused: {reason}");
    let next = retry_lock(&c, &key, ttl, Duration::from_secs(30)).await;
    next.release().await.unwrap();
}

/// After every connection is cut, the client reconnects by itself and
/// waiters still get woken.
pub async fn recovers_after_connections_are_cut(f: &dyn Factory) {
    let Some(faults) = f.faults() else {
        return skip("recovers_after_connections_are_cut", "no fault control");
    };
    let (a, b) = (client(f).await, client(f).await);
    let caps = a.capabilities().clone();
    let key = unique_key("cut");
    let ttl = long_ttl(&caps);
    a.lock(&key).await.unwrap().release().await.unwrap();
    b.lock(&key).await.unwrap().release().await.unwrap();
    faults.cut_connections().await.expect("cut");
    let g = retry_lock(&a, &key, ttl, Duration::from_secs(30)).await;
    let k = key.clone();
    let waiter = tokio::spawn(async move {
        retry_lock(&b, &k, ttl, Duration::from_secs(30))
            .await
            .release()
            .await
    });
    sleep(Duration::from_millis(300)).await;
    g.release().await.unwrap();
    timeout(Duration::from_secs(30), waiter)
        .await
        .expect("waiter stuck")
        .unwrap()
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use lock_core::Capabilities;

    #[test]
    fn caps_helpers_respect_limits() {
        let caps =
            Capabilities::new("t").ttl_range(Duration::from_secs(2), Duration::from_secs(30));
        assert_eq!(short_ttl(&caps), Duration::from_secs(2));
        assert_eq!(long_ttl(&caps), Duration::from_secs(30));
    }
}
