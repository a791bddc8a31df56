//! Redis-specific behaviour against real servers started by the harness:
//! fencing across a restart without persistence, Redlock quorum, TLS with an
//! ACL user, and bad input.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Servers;
use lock_core::{Backend, Error, Key, LockClient, LockOptions, Wait};
use lock_redis::{RedisBackend, RedisConfig};
use server_harness::{RedisServer, Server};
use tokio::time::{Instant, timeout};

fn key(name: &str) -> Key {
    Key::new(format!("{name}-{:016x}", rand::random::<u64>())).unwrap()
}

fn admin(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn server_time_us(server: &RedisServer) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query(&mut admin(server)).unwrap();
    s * 1_000_000 + us
}

/// Locks `key`, retrying while the client notices a restart (the first
/// command on a connection the server closed fails once).
async fn lock_retrying(c: &LockClient, key: &Key) -> lock_core::LockGuard {
    let start = Instant::now();
    loop {
        match c.try_lock(key).await {
            Ok(Some(g)) => return g,
            Ok(None) => panic!("{key} is held after a restart"),
            Err(e) if e.is_retryable() && start.elapsed() < Duration::from_secs(10) => {}
            Err(e) => panic!("no lock after restart: {e}"),
        }
    }
}

/// A Redis that keeps nothing on disk forgets the fencing counter on
/// restart; tokens still go up because they are never below the server's
/// clock in µs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_survives_restart_without_persistence() {
    let servers = Servers::start(1);
    let server = &servers.0[0];
    let c = LockClient::new(RedisBackend::connect(servers.config()).await.unwrap());
    let k = key("restart-fencing");
    let before = server_time_us(server);
    let g = c.lock(&k).await.unwrap();
    let t1 = g.fencing_token().get();
    assert!(
        t1 >= before,
        "token {t1} is below the server clock {before}"
    );
    g.release().await.unwrap();
    let fence = format!("distlock:{{{}}}:fence", k.escaped());
    let kept: Option<String> = redis::cmd("GET")
        .arg(&fence)
        .query(&mut admin(server))
        .unwrap();
    assert_eq!(kept, Some(t1.to_string()));

    tokio::task::block_in_place(|| server.restart()).unwrap();
    let dbsize: i64 = redis::cmd("DBSIZE").query(&mut admin(server)).unwrap();
    assert_eq!(
        dbsize, 0,
        "the restarted server should have forgotten everything"
    );

    let g = lock_retrying(&c, &k).await;
    let t2 = g.fencing_token().get();
    assert!(
        t2 > t1,
        "fencing went backwards after a restart: {t2} <= {t1}"
    );
    g.release().await.unwrap();
}

/// The counter keeps tokens rising even when grants come faster than the
/// clock's µs, and across many keys at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_strictly_under_load() {
    let servers = Servers::start(1);
    let c = LockClient::new(RedisBackend::connect(servers.config()).await.unwrap());
    let k = key("rapid");
    let mut last = 0;
    let start = Instant::now();
    for _ in 0..200 {
        let g = c.try_lock(&k).await.unwrap().unwrap();
        assert!(g.fencing_token().get() > last);
        last = g.fencing_token().get();
        g.release().await.unwrap();
    }
    eprintln!("try_lock + release: {:?} per cycle", start.elapsed() / 200);
}

/// Redlock over 5 masters: with 2 stopped it still grants, extends and
/// releases; with 3 stopped it fails fast with an error that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_needs_a_majority() {
    let servers = Servers::start(5);
    let backend = RedisBackend::connect(servers.config()).await.unwrap();
    assert_eq!(backend.capabilities().backend, "redis-redlock");
    let c = LockClient::new(backend);
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(5))
        .wait(Wait::No);
    let k = key("quorum");
    let g = c.try_lock_with(&k, &opts).await.unwrap().unwrap();
    g.release().await.unwrap();

    for s in &servers.0[..2] {
        tokio::task::block_in_place(|| s.stop()).unwrap();
    }
    let t1 = {
        let g = c
            .try_lock_with(&k, &opts)
            .await
            .unwrap()
            .expect("3 of 5 must grant");
        assert!(
            c.try_lock_with(&k, &opts).await.unwrap().is_none(),
            "held by a majority"
        );
        g.extend(Duration::from_secs(5)).await.unwrap();
        let info = c.inspect(&k).await.unwrap();
        assert!(info.held);
        assert_eq!(info.fencing_token, Some(g.fencing_token()));
        let t = g.fencing_token();
        g.release().await.unwrap();
        t
    };

    tokio::task::block_in_place(|| servers.0[2].stop()).unwrap();
    let start = Instant::now();
    let err = c.try_lock_with(&k, &opts).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("2 of 5") && msg.contains("needs 3"),
        "unclear error: {msg}"
    );
    assert!(err.is_retryable());

    // A master comes back (empty): a majority again, and tokens still rise.
    tokio::task::block_in_place(|| servers.0[0].restart()).unwrap();
    let start = Instant::now();
    let g = loop {
        match c.try_lock_with(&k, &opts).await {
            Ok(Some(g)) => break g,
            Ok(None) => panic!("nobody holds {k}"),
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
            }
            Err(e) => panic!("no majority after the restart: {e}"),
        }
    };
    assert!(g.fencing_token() > t1);
    g.release().await.unwrap();
}

/// A frozen master costs each request only the per-master timeout (a fifth
/// of the TTL), not the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_tolerates_a_frozen_master() {
    let servers = Servers::start(3);
    let c = LockClient::new(RedisBackend::connect(servers.config()).await.unwrap());
    tokio::task::block_in_place(|| servers.0[1].pause()).unwrap();
    let opts = LockOptions::new()
        .ttl(Duration::from_millis(500))
        .wait(Wait::No);
    let k = key("frozen");
    let start = Instant::now();
    let g = c
        .try_lock_with(&k, &opts)
        .await
        .unwrap()
        .expect("2 of 3 grant");
    let took = start.elapsed();
    assert!(took < Duration::from_millis(400), "acquire took {took:?}");
    assert!(g.valid_until() > Instant::now());
    g.release().await.unwrap();
    tokio::task::block_in_place(|| servers.0[1].resume()).unwrap();
}

/// TLS with a custom CA and an ACL user, from the URL form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_acl() {
    let server = RedisServer::start_secure().unwrap();
    let ca = server.tls().unwrap().ca_cert.display().to_string();
    let user = server.username().unwrap();
    let pw = server.password().unwrap();
    let port = server.port();
    let url = format!("rediss://{user}:{pw}@127.0.0.1:{port}/?ca_file={ca}&prefix=tls:");
    let backend = RedisBackend::connect_url(&url).await.unwrap();
    let shown = format!("{backend:?} {}", backend.config());
    assert!(!shown.contains(pw), "password shown: {shown}");
    let c = LockClient::new(backend);
    let k = key("tls");
    let g = c.lock(&k).await.unwrap();
    assert!(c.try_lock(&k).await.unwrap().is_none());
    // A waiter on a second client is woken through pub/sub over TLS.
    let c2 = LockClient::new(RedisBackend::connect_url(&url).await.unwrap());
    let k2 = k.clone();
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let g = c2.lock(&k2).await.unwrap();
        let waited = start.elapsed();
        g.release().await.unwrap();
        waited
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.release().await.unwrap();
    let waited = timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(
        waited < Duration::from_millis(450),
        "waiter took {waited:?}"
    );

    // Wrong password: Auth, and the message does not echo it.
    let wrong = format!("rediss://{user}:not-{pw}@127.0.0.1:{port}/?ca_file={ca}");
    let err = RedisBackend::connect_url(&wrong).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(pw));
    // No credentials on an ACL server whose default user is off.
    let anon = format!("rediss://127.0.0.1:{port}/?ca_file={ca}");
    let err = RedisBackend::connect_url(&anon).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    // The system roots do not trust the test CA.
    let untrusted = format!("rediss://{user}:{pw}@127.0.0.1:{port}/?connect_timeout=1s");
    let err = RedisBackend::connect_url(&untrusted).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    // Plain TCP against the TLS port.
    let plain = format!("redis://{user}:{pw}@127.0.0.1:{port}/?connect_timeout=1s");
    let start = Instant::now();
    let err = RedisBackend::connect_url(&plain).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(4));
}

/// Wrong password on a plain server with an ACL user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_auth_error() {
    // `#[non_exhaustive]`: no struct literal from outside the harness.
    #[allow(clippy::field_reassign_with_default)]
    let cfg = {
        let mut cfg = server_harness::RedisConfig::default();
        cfg.acl = true;
        cfg
    };
    let server = RedisServer::start_with(cfg).unwrap();
    let user = server.username().unwrap();
    let pw = server.password().unwrap();
    let good = RedisConfig::single("127.0.0.1", server.port()).credentials(user, pw);
    RedisBackend::connect(good.clone()).await.unwrap();
    let bad = good.credentials(user, "wrong");
    let err = RedisBackend::connect(bad).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

/// A server that is down: a typed, retryable error well within the
/// timeouts, for connect and for requests on a client that was connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_is_a_quick_connection_error() {
    let servers = Servers::start(1);
    let cfg = servers
        .config()
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_millis(300));
    let c = LockClient::new(RedisBackend::connect(cfg.clone()).await.unwrap());
    tokio::task::block_in_place(|| servers.0[0].stop()).unwrap();

    let start = Instant::now();
    let err = RedisBackend::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    for _ in 0..3 {
        let start = Instant::now();
        let err = c.try_lock(key("down")).await.unwrap_err();
        assert!(matches!(err, Error::Connection { .. }), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}

/// Bad URLs and settings are `Error::Config` before anything is sent.
#[tokio::test]
async fn bad_config_is_rejected() {
    for url in [
        "redis//localhost",
        "memcached://localhost:11211",
        "redis://localhost:6379?colour=blue",
        "redis://localhost:6379?prefix=a{b}",
        "redis://localhost:6379/zero",
        "redlock://localhost:1",
        "redis://localhost?ca_file=/nonexistent.pem",
        "rediss://localhost?ca_file=/nonexistent.pem",
    ] {
        let err = RedisBackend::connect_url(url).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{url}: {err:?}");
        assert!(!err.is_retryable());
    }
}

/// Many leases renew in one pipeline; a lease that is no longer ours is
/// reported as lost while the others renew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_renewal_in_one_pipeline() {
    for n in [1, 3] {
        let servers = Servers::start(n);
        let backend = Arc::new(RedisBackend::connect(servers.config()).await.unwrap());
        let ttl = Duration::from_secs(5);
        let mut leases = Vec::new();
        for i in 0..200 {
            let req = lock_core::AcquireRequest::new(key(&format!("batch{i}")), ttl);
            leases.push(backend.try_acquire(&req).await.unwrap().granted().unwrap());
        }
        assert!(backend.release(&leases[7]).await.unwrap());
        let start = Instant::now();
        let results = backend.extend_batch(&leases, ttl).await;
        let took = start.elapsed();
        eprintln!("{n} server(s): renewed 199 leases in {took:?}");
        for (i, r) in results.iter().enumerate() {
            if i == 7 {
                assert!(matches!(r, Err(Error::LockLost { .. })), "{r:?}");
            } else {
                assert!(r.is_ok(), "{i}: {r:?}");
            }
        }
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}
