//! Backend-specific tests against real PostgreSQL 15 servers started by the
//! harness: SCRAM + TLS, bad input, schema checks, the fencing helper, and
//! server restarts with held and waited-for locks in both modes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{
    AcquireRequest, Attempt, Backend, Error, FencingToken, Key, LockClient, LockOptions, Wait,
};
use lock_postgres::{Mode, PostgresBackend, PostgresConfig, SslMode, TableName, fence};
use server_harness::PostgresServer;
use sqlx::Row;
use tokio::time::{Instant, sleep, timeout};

fn key(name: &str) -> Key {
    Key::new(format!("{name}-{:016x}", rand_u64())).unwrap()
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// Collects everything `tracing` prints while a test runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_tls_work_and_the_password_never_shows() {
    let server = tokio::task::block_in_place(PostgresServer::start_secure).expect("secure server");
    let password = server.password().unwrap().to_string();
    let url = server.url();
    assert!(url.contains("sslmode=verify-full"));

    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Right password, TLS verified against the harness CA.
    let config = PostgresConfig::from_url(&url).unwrap();
    assert_eq!(config.ssl_mode, SslMode::VerifyFull);
    for text in [format!("{config:?}"), config.redacted_url()] {
        assert!(!text.contains(&password), "{text}");
    }
    let backend = PostgresBackend::connect(config).await.unwrap();
    assert!(!format!("{backend:?}").contains(&password));
    let ssl: bool = sqlx::query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(backend.pool())
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the connection does not use TLS");
    let method: String = sqlx::query("SHOW password_encryption")
        .fetch_one(backend.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(method, "scram-sha-256");
    let locks = LockClient::new(backend);
    let g = locks.lock(key("tls")).await.unwrap();
    let owner = g.lease().owner().to_hex();
    g.release().await.unwrap();

    // Wrong password: Error::Auth, quickly, without the attempted password.
    let wrong = url.replacen(&password, "not-the-password-xyz", 1);
    let start = Instant::now();
    let err = PostgresBackend::connect_url(&wrong).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    for text in [err.to_string(), format!("{err:?}"), source_chain(&err)] {
        assert!(!text.contains("not-the-password-xyz"), "{text}");
        assert!(!text.contains(&password), "{text}");
        assert!(!text.contains(&owner), "{text}");
    }

    // TLS required by the client but the CA does not match: refused, typed.
    let bad_ca = url.replace(
        &server.tls().unwrap().ca_cert.display().to_string(),
        &server.tls().unwrap().client_cert.display().to_string(),
    );
    let err = PostgresBackend::connect_url(&bad_ca).await.unwrap_err();
    assert!(
        matches!(err, Error::Auth { .. } | Error::Connection { .. }),
        "{err:?}"
    );

    let logged = logs.text();
    assert!(
        logged.contains("connected"),
        "no connect event was logged: {logged}"
    );
    assert!(!logged.contains(&password), "the password was logged");
    assert!(
        !logged.contains("not-the-password-xyz"),
        "a password was logged"
    );
    assert!(!logged.contains(&owner), "an owner token was logged");
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&format!("{s} / {s:?}\n"));
        cur = s.source();
    }
    out
}

#[tokio::test]
async fn server_down_is_a_quick_connection_error() {
    // A port nobody listens on: take one from the OS and close it again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!(
        "postgres://postgres:pw@127.0.0.1:{port}/postgres?distlock_connect_timeout=1s&sslmode=disable"
    );
    let start = Instant::now();
    let err = PostgresBackend::connect_url(&url).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert!(!err.to_string().contains(":pw@"));
}

#[tokio::test]
async fn bad_urls_are_config_errors() {
    for (url, needle) in [
        (
            "postgres://u:pw@h/db?sslmod=require",
            "unknown URL parameter",
        ),
        (
            "postgres://u:pw@h/db?target_session_attrs=any",
            "unknown URL parameter",
        ),
        ("postgres://u:pw@h/db?distlock_mode=fast", "distlock_mode"),
        ("postgres://u:pw@h/db?distlock_table=x;drop", "table"),
        (
            "postgres://u:pw@h/db?distlock_request_timeout=soon",
            "distlock_request_timeout",
        ),
        ("redis://u:pw@h/db", "scheme"),
        ("postgres//nothing", "URL"),
    ] {
        let err = PostgresBackend::connect_url(url).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{url}: {err:?}");
        assert!(err.to_string().contains(needle), "{url}: {err}");
        assert!(!err.to_string().contains("pw"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_ttls_change_nothing() {
    let server = common::shared();
    let backend = PostgresBackend::connect(common::config(server, Mode::Lease))
        .await
        .unwrap();
    let locks = LockClient::new(backend.clone());
    let err = locks.try_lock("bad\nkey").await.unwrap_err();
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    let k = key("ttl");
    let err = locks
        .try_lock_with(&k, &LockOptions::new().ttl(Duration::from_millis(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidOptions { .. }), "{err}");
    let rows: i64 = sqlx::query("SELECT count(*) FROM public.distlock_leases WHERE key = $1")
        .bind(k.as_str())
        .fetch_one(backend.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a rejected request wrote a row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_checks_refuse_a_cached_sequence_and_a_missing_table() {
    let server = common::shared();
    let mut config = common::config(server, Mode::Lease);
    config.table = TableName::new("checks", "cached").unwrap();
    let first = PostgresBackend::connect(config.clone()).await.unwrap();
    sqlx::query("ALTER SEQUENCE checks.cached_fencing CACHE 20")
        .execute(first.pool())
        .await
        .unwrap();
    let err = PostgresBackend::connect(config.clone()).await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("CACHE 1"), "{err}");

    let mut missing = common::config(server, Mode::Lease);
    missing.table = TableName::new("checks", "never_created").unwrap();
    missing.create_schema = false;
    let err = PostgresBackend::connect(missing).await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_separate_namespaces() {
    let server = common::shared();
    for mode in [Mode::Lease, Mode::Advisory] {
        let mut a = common::config(server, mode);
        a.prefix = "tenant-a/".into();
        let mut b = common::config(server, mode);
        b.prefix = "tenant-b/".into();
        let a = LockClient::new(PostgresBackend::connect(a).await.unwrap());
        let b = LockClient::new(PostgresBackend::connect(b).await.unwrap());
        let k = key("ns");
        let ga = a.try_lock(&k).await.unwrap().expect("free in a");
        let gb = b
            .try_lock(&k)
            .await
            .unwrap()
            .expect("free in b: prefixes leak");
        assert!(a.try_lock(&k).await.unwrap().is_none());
        ga.release().await.unwrap();
        gb.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_rejects_writes_with_older_tokens() {
    let server = common::shared();
    let backend = PostgresBackend::connect(common::config(server, Mode::Lease))
        .await
        .unwrap();
    let locks = LockClient::new(backend.clone());
    let k = key("fenced");
    let resource = format!("resource-{k}");
    let old = locks.lock(&k).await.unwrap();
    let old_token = old.fencing_token();
    old.release().await.unwrap();
    let new = locks.lock(&k).await.unwrap();
    let new_token = new.fencing_token();
    assert!(new_token > old_token);

    async fn write(b: &PostgresBackend, resource: &str, token: FencingToken) -> bool {
        let mut tx = b.pool().begin().await.unwrap();
        let ok = fence(b, &mut tx, resource, token).await.unwrap();
        if ok {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        ok
    }
    assert!(
        write(&backend, &resource, new_token).await,
        "first write refused"
    );
    assert!(
        write(&backend, &resource, new_token).await,
        "the same holder may write again"
    );
    assert!(
        !write(&backend, &resource, old_token).await,
        "a stale token was accepted"
    );
    // A rolled-back check records nothing.
    let mut tx = backend.pool().begin().await.unwrap();
    let next = FencingToken::new(new_token.get() + 1000);
    assert!(fence(&backend, &mut tx, &resource, next).await.unwrap());
    tx.rollback().await.unwrap();
    assert!(write(&backend, &resource, new_token).await);
    new.release().await.unwrap();

    // The documented single-row pattern.
    let pool = backend.pool();
    sqlx::query("CREATE TABLE IF NOT EXISTS fence_demo (id text PRIMARY KEY, v int, fence bigint NOT NULL DEFAULT 0)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO fence_demo (id, v) VALUES ($1, 0)")
        .bind(&resource)
        .execute(pool)
        .await
        .unwrap();
    let update = |v: i32, t: FencingToken| {
        sqlx::query("UPDATE fence_demo SET v = $1, fence = $2 WHERE id = $3 AND fence <= $2")
            .bind(v)
            .bind(t.get() as i64)
            .bind(resource.clone())
            .execute(pool)
    };
    assert_eq!(update(1, new_token).await.unwrap().rows_affected(), 1);
    assert_eq!(update(2, old_token).await.unwrap().rows_affected(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_lock_ids_collide_safely_with_foreign_locks() {
    // Another application holding the same advisory lock number blocks the
    // key (false contention), and inspect says so instead of inventing a
    // holder's token.
    let server = common::shared();
    let config = common::config(server, Mode::Advisory);
    let backend = PostgresBackend::connect(config.clone()).await.unwrap();
    let k = key("collide");
    let id = lock_postgres::advisory_lock_id(&config.table.qualified(), k.as_str());
    let mut foreign = backend.pool().acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(id)
        .execute(&mut *foreign)
        .await
        .unwrap();
    let attempt = backend
        .try_acquire(&AcquireRequest::new(k.clone(), Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(matches!(attempt, Attempt::Held { .. }));
    let info = backend.inspect(&k).await.unwrap();
    assert!(info.held);
    assert_eq!(info.fencing_token, None);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(id)
        .execute(&mut *foreign)
        .await
        .unwrap();
    let lease = backend
        .try_acquire(&AcquireRequest::new(k.clone(), Duration::from_secs(5)))
        .await
        .unwrap()
        .granted()
        .expect("free after the foreign unlock");
    let info = backend.inspect(&k).await.unwrap();
    assert_eq!(info.fencing_token, Some(lease.fencing_token()));
    assert!(backend.release(&lease).await.unwrap());
}

/// PostgreSQL restarts (SIGKILL + start on the same data) while one client
/// holds a lock and another waits for it.
async fn restart_with_holder_and_waiter(mode: Mode) {
    let server = Arc::new(common::start_server());
    let holder = LockClient::new(
        PostgresBackend::connect(common::config(&server, mode))
            .await
            .unwrap(),
    );
    let waiter_backend = PostgresBackend::connect(common::config(&server, mode))
        .await
        .unwrap();
    let waiter = LockClient::new(waiter_backend.clone());
    let k = key("restart");
    let ttl = Duration::from_secs(3);
    let g = holder
        .lock_with(&k, &LockOptions::new().ttl(ttl).wait(Wait::No))
        .await
        .unwrap();
    let first_token = g.fencing_token();
    let k2 = k.clone();
    let waiting = tokio::spawn(async move {
        let w = waiter
            .lock_with(
                &k2,
                &LockOptions::new()
                    .ttl(ttl)
                    .wait(Wait::For(Duration::from_secs(40))),
            )
            .await;
        (w, Instant::now())
    });
    sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the waiter got a held lock");

    let s = Arc::clone(&server);
    let restart_began = Instant::now();
    tokio::task::spawn_blocking(move || common::restart_all(&s))
        .await
        .unwrap()
        .expect("restart");
    eprintln!("{mode}: the restart took {:?}", restart_began.elapsed());

    match mode {
        Mode::Lease => {
            // The row survived: the holder keeps the lock (renewing through
            // the recovered pool), and the waiter does not get it meanwhile.
            tokio::select! {
                reason = g.lost() => panic!("a surviving lease was reported lost: {reason}"),
                _ = sleep(ttl * 2) => {}
            }
            assert!(
                waiter_backend.is_listening(),
                "the listener did not reconnect"
            );
            assert!(
                !waiting.is_finished(),
                "two holders: the waiter got a lock still held"
            );
            let released_at = Instant::now();
            g.release().await.expect("release after the restart");
            let (w, got_at) = timeout(Duration::from_secs(10), waiting)
                .await
                .unwrap()
                .unwrap();
            let w = w.expect("the waiter never got the lock");
            assert!(w.fencing_token() > first_token, "fencing went backwards");
            // Woken by NOTIFY on the re-established listener, not by a slow poll.
            let handoff = got_at - released_at;
            assert!(handoff < Duration::from_secs(1), "handoff took {handoff:?}");
            w.release().await.unwrap();
        }
        Mode::Advisory => {
            // The session died with the server: the holder is told.
            let reason = timeout(ttl * 2, g.lost()).await.expect("loss not reported");
            let lost_at = Instant::now();
            eprintln!("advisory holder lost after restart: {reason}");
            let (w, got_at) = timeout(Duration::from_secs(30), waiting)
                .await
                .unwrap()
                .unwrap();
            let w = w.expect("the waiter never got the lock");
            assert!(w.fencing_token() > first_token, "fencing went backwards");
            eprintln!(
                "waiter got it {:?} relative to the holder's loss",
                got_at
                    .checked_duration_since(lost_at)
                    .map(|d| format!("+{d:?}"))
                    .unwrap_or_else(|| format!("-{:?}", lost_at - got_at))
            );
            assert!(matches!(g.release().await, Err(Error::LockLost { .. })));
            w.release().await.unwrap();
        }
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_surviving_leases() {
    restart_with_holder_and_waiter(Mode::Lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reports_lost_advisory_locks() {
    restart_with_holder_and_waiter(Mode::Advisory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_survives_restart_under_load() {
    // Tokens keep rising across a crash even for a sequence used heavily
    // (WAL-logged 32 values ahead).
    let server = Arc::new(common::start_server());
    let backend = PostgresBackend::connect(common::config(&server, Mode::Lease))
        .await
        .unwrap();
    let k = key("crash");
    let mut last = 0;
    for _ in 0..50 {
        let lease = backend
            .try_acquire(&AcquireRequest::new(k.clone(), Duration::from_secs(30)))
            .await
            .unwrap()
            .granted()
            .unwrap();
        last = lease.fencing_token().get();
        assert!(backend.release(&lease).await.unwrap());
    }
    let s = Arc::clone(&server);
    tokio::task::spawn_blocking(move || common::restart_all(&s))
        .await
        .unwrap()
        .unwrap();
    let start = Instant::now();
    let lease = loop {
        match backend
            .try_acquire(&AcquireRequest::new(k.clone(), Duration::from_secs(30)))
            .await
        {
            Ok(Attempt::Granted(l)) => break l,
            Ok(Attempt::Held { .. }) => panic!("held after release"),
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                assert!(e.is_retryable(), "{e}");
                sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(
        lease.fencing_token().get() > last,
        "{} after {last}",
        lease.fencing_token()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advisory_waits_leave_no_queue_entry_on_the_server() {
    let server = common::shared();
    let holder_backend = PostgresBackend::connect(common::config(server, Mode::Advisory))
        .await
        .unwrap();
    let holder = LockClient::new(holder_backend.clone());
    let waiter = LockClient::new(
        PostgresBackend::connect(common::config(server, Mode::Advisory))
            .await
            .unwrap(),
    );
    let k = key("queue");
    let g = holder.lock(&k).await.unwrap();
    let waiters = || async { holder_backend.inspect(&k).await.unwrap().waiters };

    // A wait that times out.
    let err = waiter
        .lock_with(
            &k,
            &LockOptions::new().wait(Wait::For(Duration::from_millis(300))),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(
        waiters().await,
        Some(0),
        "a timed-out waiter is still queued"
    );

    // A wait whose future is dropped.
    let w = waiter.clone();
    let k2 = k.clone();
    let task = tokio::spawn(async move { w.lock(&k2).await });
    let start = Instant::now();
    while waiters().await != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the waiter never queued"
        );
        sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let start = Instant::now();
    while waiters().await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a cancelled waiter stayed in the server's queue"
        );
        sleep(Duration::from_millis(20)).await;
    }
    g.release().await.unwrap();
    let again = waiter
        .try_lock(&k)
        .await
        .unwrap()
        .expect("free after release");
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_table_names_work_including_wakeups() {
    let server = common::shared();
    let mut config = common::config(server, Mode::Lease);
    config.table = TableName::new(&"s".repeat(40), &"t".repeat(40)).unwrap();
    let a = LockClient::new(PostgresBackend::connect(config.clone()).await.unwrap());
    let b = LockClient::new(PostgresBackend::connect(config).await.unwrap());
    let k = key("long");
    let g = a.lock(&k).await.unwrap();
    let k2 = k.clone();
    let waiter = tokio::spawn(async move {
        let w = b
            .lock_with(
                &k2,
                &LockOptions::new().wait(Wait::For(Duration::from_secs(10))),
            )
            .await;
        (w, Instant::now())
    });
    sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    g.release().await.unwrap();
    let (w, got) = waiter.await.unwrap();
    w.unwrap().release().await.unwrap();
    // Woken by NOTIFY, not by the 2 s fallback re-check.
    assert!(
        got - released < Duration::from_secs(1),
        "{:?}",
        got - released
    );
}
