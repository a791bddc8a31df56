//! etcd-specific behaviour against real servers started by the harness:
//! `etcdctl lock` interoperability, TLS with authentication, bad input,
//! request counts, lease loss and batched renewal.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::Etcd;
use lock_core::{Backend, Error, LockClient, LockOptions, LossReason, Wait};
use lock_etcd::{EtcdBackend, EtcdConfig};
use server_harness::EtcdServer;
use tokio::time::{Instant, sleep, timeout};

fn plain_config(server: &EtcdServer, prefix: &str) -> EtcdConfig {
    EtcdConfig::builder()
        .endpoint(server.members()[0].client_addr().to_string())
        .prefix(prefix)
        .build()
        .unwrap()
}

async fn client(cfg: EtcdConfig) -> (EtcdBackend, LockClient) {
    let b = EtcdBackend::connect(cfg).await.unwrap();
    (b.clone(), LockClient::new(b))
}

/// Runs `etcdctl lock NAME -- sh -c 'echo "$ETCD_LOCK_KEY $ETCD_LOCK_REV"; <then>'`
/// and returns the child plus a channel of its stdout lines.
fn etcdctl_lock(
    server: &EtcdServer,
    name: &str,
    then: &str,
) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut cmd = server.etcdctl_command();
    cmd.args([
        "lock",
        name,
        "--",
        "sh",
        "-c",
        &format!("echo \"$ETCD_LOCK_KEY $ETCD_LOCK_REV\"; {then}"),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("run etcdctl");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// `(key, revision)` from the line printed while `etcdctl lock` holds.
fn parse_held(line: &str) -> (String, u64) {
    let (key, rev) = line.split_once(' ').expect("key and revision");
    (key.to_string(), rev.trim().parse().expect("revision"))
}

/// While `etcdctl lock NAME` holds, distlock (prefix "") waits for it; then
/// gets the lock with a higher fencing token than etcdctl's key revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distlock_waits_for_etcdctl_lock() {
    let etcd = Etcd::start().await;
    let server = &etcd.server;
    let (_, locks) = client(plain_config(server, "")).await;
    let (mut child, mut lines) = etcdctl_lock(server, "interop-a", "sleep 1.5");
    let held = timeout(Duration::from_secs(10), lines.recv())
        .await
        .expect("etcdctl never got the lock")
        .expect("etcdctl output");
    let held_at = Instant::now();
    let (key, rev) = parse_held(&held);
    assert!(key.starts_with("interop-a/"), "etcdctl key {key}");
    assert!(
        locks.try_lock("interop-a").await.unwrap().is_none(),
        "distlock got a lock etcdctl holds"
    );
    let guard = locks
        .lock_with(
            "interop-a",
            &LockOptions::new().wait(Wait::For(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    assert!(
        held_at.elapsed() >= Duration::from_millis(1400),
        "distlock got the lock {:?} after etcdctl took it",
        held_at.elapsed()
    );
    assert!(guard.fencing_token().get() > rev);
    assert!(
        lock_etcd::lock_key(&guard.lease())
            .unwrap()
            .starts_with("interop-a/")
    );
    guard.release().await.unwrap();
    let _ = child.wait();
}

/// While distlock holds (default prefix), `etcdctl lock distlock/NAME`
/// waits; after the release it gets the lock, with a higher revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_lock_waits_for_distlock() {
    let etcd = Etcd::start().await;
    let server = &etcd.server;
    let (_, locks) = client(plain_config(server, lock_etcd::DEFAULT_PREFIX)).await;
    let guard = locks.lock("interop-b").await.unwrap();
    let token = guard.fencing_token().get();
    let (mut child, mut lines) = etcdctl_lock(server, "distlock/interop-b", "true");
    assert!(
        timeout(Duration::from_millis(1500), lines.recv())
            .await
            .is_err(),
        "etcdctl got a lock distlock holds"
    );
    let released_at = Instant::now();
    guard.release().await.unwrap();
    let line = timeout(Duration::from_secs(10), lines.recv())
        .await
        .expect("etcdctl never got the lock after the release")
        .expect("etcdctl output");
    let took = released_at.elapsed();
    let (key, rev) = parse_held(&line);
    assert!(key.starts_with("distlock/interop-b/"), "{key}");
    assert!(
        rev > token,
        "etcdctl queued after our grant, so its key is newer"
    );
    assert!(took < Duration::from_secs(2), "etcdctl took {took:?}");
    assert!(child.wait().unwrap().success());
    // And the lock is free again for us, with a token above both.
    let again = locks.try_lock("interop-b").await.unwrap().expect("free");
    assert!(again.fencing_token().get() > rev);
    again.release().await.unwrap();
}

/// TLS plus user/password against a server started with both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_auth() {
    common::init_tracing();
    let server = tokio::task::spawn_blocking(|| EtcdServer::start_secure().expect("secure etcd"))
        .await
        .unwrap();
    let (user, pass) = server.credentials().expect("credentials");
    let ca = server.tls().expect("tls").ca_cert.display().to_string();
    let port = server.members()[0].client_addr().port();
    let url = format!("etcds://{user}:{pass}@127.0.0.1:{port}?ca_file={ca}&connect_timeout=3s");

    let backend = EtcdBackend::connect_url(&url).await.unwrap();
    for shown in [format!("{backend:?}"), backend.config().to_string()] {
        assert!(!shown.contains(pass), "password shown: {shown}");
    }
    let locks = LockClient::new(backend);
    let g = locks.lock("secure").await.unwrap();
    assert!(locks.try_lock("secure").await.unwrap().is_none());
    g.release().await.unwrap();

    // Wrong password: Error::Auth, quickly, without the password in it.
    let bad = format!("etcds://{user}:wrong-{pass}@127.0.0.1:{port}?ca_file={ca}");
    let start = Instant::now();
    let err = EtcdBackend::connect_url(&bad).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let text = format!("{err} {err:?}");
    assert!(!text.contains(pass), "{text}");

    // No credentials at all: refused too.
    let anon = format!("etcds://127.0.0.1:{port}?ca_file={ca}");
    let err = EtcdBackend::connect_url(&anon).await.unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "no credentials: {err:?}");

    // Plain HTTP/2 against a TLS port, and TLS without the CA: no connection.
    for url in [
        format!("etcd://{user}:{pass}@127.0.0.1:{port}?connect_timeout=1s"),
        format!("etcds://{user}:{pass}@127.0.0.1:{port}?connect_timeout=1s"),
    ] {
        let err = EtcdBackend::connect_url(&url).await.unwrap_err();
        assert!(
            matches!(err, Error::Connection { .. } | Error::Auth { .. }),
            "{err:?}"
        );
        assert!(!format!("{err} {err:?}").contains(pass));
    }
    // An unreadable CA file is a configuration error.
    let err = EtcdBackend::connect_url(&format!(
        "etcds://{user}:{pass}@127.0.0.1:{port}?ca_file=/nonexistent/ca.pem"
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
}

/// A server that is down gives Error::Connection within the connect
/// timeout; bad URLs give Error::Config without any network access.
#[tokio::test]
async fn bad_input_gives_typed_errors_quickly() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = EtcdBackend::connect_url(&format!("etcd://127.0.0.1:{port}?connect_timeout=500ms"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    for bad in [
        "etcd://127.0.0.1:2379?conect_timeout=1s",
        "etcd://127.0.0.1",
        "redis://127.0.0.1:2379",
        "etcd://127.0.0.1:2379/path",
        "etcd://127.0.0.1:2379?request_timeout=fast",
    ] {
        let err = EtcdBackend::connect_url(bad).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{bad}: {err:?}");
    }
}

/// Sums etcd's `grpc_server_started_total` for one method.
fn started(server: &EtcdServer, method: &str) -> u64 {
    let resp = server_harness::probe::http_request(
        server.members()[0].metrics_addr(),
        "GET",
        "/metrics",
        &[],
        None,
        Duration::from_secs(5),
    )
    .expect("metrics");
    let tag = format!("grpc_method=\"{method}\"");
    resp.body
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total") && l.contains(&tag))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// An uncontended acquire + release is two transactions and no lease grant
/// (counted by the server), and prints the median cycle time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_cycle_is_two_round_trips() {
    let etcd = Etcd::start().await;
    let server = &etcd.server;
    let (_, locks) = client(plain_config(server, "")).await;
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(30))
        .wait(Wait::No);
    // Warm up: the first lock grants the session's lease.
    locks
        .lock_with("cycle", &opts)
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let (txn0, grant0, range0) = (
        started(server, "Txn"),
        started(server, "LeaseGrant"),
        started(server, "Range"),
    );
    let n = 200;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let g = locks.lock_with("cycle", &opts).await.unwrap();
        g.release().await.unwrap();
        times.push(start.elapsed());
    }
    let txns = started(server, "Txn") - txn0;
    assert_eq!(txns, 2 * n as u64, "transactions for {n} cycles");
    assert_eq!(started(server, "LeaseGrant"), grant0, "a lease was granted");
    assert_eq!(started(server, "Range"), range0, "extra reads");
    times.sort();
    eprintln!(
        "etcd acquire+release: median {:?}, p90 {:?} over {n} cycles",
        times[n / 2],
        times[n * 9 / 10]
    );
}

/// Many locks on one client share one lease: renewing all of them is one
/// keep-alive plus one read per 128 locks, not one request per lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_of_many_locks_is_batched() {
    let etcd = Etcd::start().await;
    let server = &etcd.server;
    let (backend, locks) = client(plain_config(server, "")).await;
    // Long enough that taking 300 locks on a loaded machine stays well
    // within the TTL.
    let ttl = Duration::from_secs(20);
    let opts = LockOptions::new().ttl(ttl).wait(Wait::No).auto_renew(false);
    let mut guards = Vec::new();
    for i in 0..300 {
        guards.push(locks.lock_with(format!("many-{i}"), &opts).await.unwrap());
    }
    let leases: Vec<_> = guards.iter().map(|g| g.lease()).collect();
    let (txn0, grant0) = (started(server, "Txn"), started(server, "LeaseGrant"));
    let ka0 = started(server, "LeaseKeepAlive");
    let start = Instant::now();
    let results = backend.extend_batch(&leases, ttl).await;
    eprintln!("extend_batch of 300 locks took {:?}", start.elapsed());
    for r in &results {
        let until = r.as_ref().expect("renewed");
        assert!(*until > Instant::now() + ttl - Duration::from_secs(2));
    }
    // 300 keys in chunks of 128: three reads; no grant; at most one new
    // keep-alive stream (the stream may have been open already).
    assert_eq!(started(server, "Txn") - txn0, 3);
    assert_eq!(started(server, "LeaseGrant"), grant0);
    assert!(started(server, "LeaseKeepAlive") - ka0 <= 1);
    for g in guards {
        g.release().await.unwrap();
    }
}

/// When the shared lease is revoked behind our back, every lock on it
/// reports the loss through `lost()`, and the client recovers with a new
/// lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_reported_for_every_lock() {
    let etcd = Etcd::start().await;
    let server = Arc::clone(&etcd.server);
    let (backend, locks) = client(plain_config(&server, "")).await;
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(2))
        .wait(Wait::No);
    let a = locks.lock_with("revoke-a", &opts).await.unwrap();
    let b = locks.lock_with("revoke-b", &opts).await.unwrap();
    let key = lock_etcd::lock_key(&a.lease()).unwrap().to_string();
    let lease_hex = key.rsplit('/').next().unwrap().to_string();
    let status = tokio::task::spawn_blocking(move || {
        server
            .etcdctl_command()
            .args(["lease", "revoke", &lease_hex])
            .status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success());
    for g in [&a, &b] {
        let reason = timeout(Duration::from_secs(3), g.lost())
            .await
            .expect("loss not reported");
        assert!(
            matches!(reason, LossReason::SessionLost(_) | LossReason::NotHeld),
            "{reason}"
        );
    }
    // The keys are gone with the lease: others (and we) can lock again.
    let (_, other) = client(plain_config(&etcd.server, "")).await;
    other
        .try_lock("revoke-a")
        .await
        .unwrap()
        .expect("free after the revoke")
        .release()
        .await
        .unwrap();
    let again = locks
        .try_lock_with("revoke-b", &opts)
        .await
        .unwrap()
        .expect("new lease");
    assert!(again.fencing_token() > b.fencing_token());
    again.release().await.unwrap();
    assert!(matches!(a.release().await, Err(Error::LockLost { .. })));
    drop(backend);
}

/// Tasks of one client competing for one lock take turns, and an
/// `ownership_compare` transaction applies only while the lock is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ownership_compare_guards_etcd_writes() {
    let etcd = Etcd::start().await;
    let (backend, locks) = client(plain_config(&etcd.server, "")).await;
    let g = locks.lock("guarded").await.unwrap();
    let lease = g.lease();
    let write = |value: &'static str| {
        let cmp = lock_etcd::ownership_compare(&lease).unwrap();
        let mut c = backend.client();
        async move {
            c.txn(lock_etcd::etcd_client::Txn::new().when([cmp]).and_then([
                lock_etcd::etcd_client::TxnOp::put("guarded-data", value, None),
            ]))
            .await
            .unwrap()
            .succeeded()
        }
    };
    assert!(write("first").await);
    g.release().await.unwrap();
    let g2 = locks.lock("guarded").await.unwrap();
    assert!(
        !write("stale").await,
        "a write with a released lock applied"
    );
    let mut c = backend.client();
    let got = c.get("guarded-data", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"first");
    g2.release().await.unwrap();
}

/// Subscriptions fire when the lock is released (push, not polling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_fires_on_release() {
    let etcd = Etcd::start().await;
    let (_, a) = client(plain_config(&etcd.server, "")).await;
    let b = EtcdBackend::connect(plain_config(&etcd.server, ""))
        .await
        .unwrap();
    let key = lock_core::Key::new("sub").unwrap();
    let g = a.lock(&key).await.unwrap();
    let mut sub = b.subscribe(&key).await.unwrap();
    g.release().await.unwrap();
    timeout(Duration::from_secs(2), sub.changed())
        .await
        .expect("no wake-up after the release");
    sleep(Duration::from_millis(10)).await;
}

/// Passwords never reach logs: every trace event (ours and the client
/// libraries', at TRACE level) during a connect with the right and a wrong
/// password, a lock and a release is captured and searched.
#[tokio::test(flavor = "current_thread")]
async fn secrets_never_reach_traces() {
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let server = tokio::task::spawn_blocking(|| EtcdServer::start_secure().expect("secure etcd"))
        .await
        .unwrap();
    let (user, pass) = server.credentials().expect("credentials");
    let ca = server.tls().expect("tls").ca_cert.display().to_string();
    let port = server.members()[0].client_addr().port();
    let url = format!("etcds://{user}:{pass}@127.0.0.1:{port}?ca_file={ca}");
    let bad = format!("etcds://{user}:{pass}x@127.0.0.1:{port}?ca_file={ca}");
    let _guard = tracing::subscriber::set_default(subscriber);
    let locks = LockClient::new(EtcdBackend::connect_url(&url).await.unwrap());
    let g = locks.lock("traced").await.unwrap();
    g.release().await.unwrap();
    let err = EtcdBackend::connect_url(&bad).await.unwrap_err();
    tracing::error!(error = %err, debug = ?err, "wrong password");
    drop(_guard);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).to_string();
    assert!(text.contains("wrong password"), "nothing was captured");
    assert!(!text.contains(pass), "a password reached the traces");
}

/// The hand-off from a release to a waiting client goes through the watch:
/// prints the median over 20 hand-offs and checks it is far below the
/// fallback re-check interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_is_pushed() {
    let etcd = Etcd::start().await;
    let (_, a) = client(plain_config(&etcd.server, "")).await;
    let (_, b) = client(plain_config(&etcd.server, "")).await;
    let mut times = Vec::new();
    for _ in 0..20 {
        let g = a.lock("handoff").await.unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move {
            let g = b2.lock("handoff").await.unwrap();
            let at = Instant::now();
            g.release().await.unwrap();
            at
        });
        sleep(Duration::from_millis(50)).await;
        let released = Instant::now();
        g.release().await.unwrap();
        times.push(waiter.await.unwrap() - released);
    }
    times.sort();
    eprintln!(
        "etcd hand-off (release sent -> waiter holds): median {:?}, max {:?}",
        times[10], times[19]
    );
    assert!(times[10] < Duration::from_millis(500));
}

/// A wait that times out removes its waiter key but leaves the client's
/// shared lease alone: the client's other locks stay held and renewable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_wait_keeps_the_shared_lease() {
    let etcd = Etcd::start().await;
    let (_, a) = client(plain_config(&etcd.server, "")).await;
    let (_, b) = client(plain_config(&etcd.server, "")).await;
    let ttl = Duration::from_secs(2);
    let opts = LockOptions::new().ttl(ttl).wait(Wait::No);
    let kept = a.lock_with("kept", &opts).await.unwrap();
    let busy = b.lock_with("busy", &opts).await.unwrap();
    for _ in 0..3 {
        let err = a
            .lock_with(
                "busy",
                &opts.clone().wait(Wait::For(Duration::from_millis(300))),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    }
    assert_eq!(a.inspect("busy").await.unwrap().waiters, Some(0));
    tokio::select! {
        reason = kept.lost() => panic!("the shared lease went with the waiter: {reason}"),
        _ = sleep(ttl * 2) => {}
    }
    assert!(b.try_lock("kept").await.unwrap().is_none());
    kept.release().await.unwrap();
    busy.release().await.unwrap();
}

/// All waiters of one client share one watch stream, and all its locks of
/// one TTL share one lease and one keep-alive stream (counted by the
/// server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_share_one_watch_stream_and_one_lease() {
    let etcd = Etcd::start().await;
    let server = &etcd.server;
    let (grant0, watch0, ka0) = (
        started(server, "LeaseGrant"),
        started(server, "Watch"),
        started(server, "LeaseKeepAlive"),
    );
    let (_, a) = client(plain_config(server, "")).await;
    let (_, b) = client(plain_config(server, "")).await;
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(10))
        .wait(Wait::No);
    let n = 40;
    let mut held = Vec::new();
    for i in 0..n {
        held.push(a.lock_with(format!("shared-{i}"), &opts).await.unwrap());
    }
    let mut waiters = Vec::new();
    for i in 0..n {
        let b = b.clone();
        let o = opts.clone().wait(Wait::For(Duration::from_secs(30)));
        waiters.push(tokio::spawn(async move {
            b.lock_with(format!("shared-{i}"), &o).await.unwrap()
        }));
    }
    sleep(Duration::from_millis(500)).await;
    assert!(waiters.iter().all(|w| !w.is_finished()));
    for g in held {
        g.release().await.unwrap();
    }
    for w in waiters {
        timeout(Duration::from_secs(10), w)
            .await
            .expect("waiter stuck")
            .unwrap()
            .release()
            .await
            .unwrap();
    }
    assert_eq!(
        started(server, "LeaseGrant") - grant0,
        2,
        "one lease per client"
    );
    assert!(
        started(server, "Watch") - watch0 <= 1,
        "{} watch streams for {n} waiters",
        started(server, "Watch") - watch0
    );
    assert!(started(server, "LeaseKeepAlive") - ka0 <= 2);
}

/// Extending beyond the TTL the lock was taken with moves its key to a
/// longer lease: same key, same fencing token, still guarding writes, and
/// held past the old lease's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_beyond_the_lease_ttl_keeps_key_and_token() {
    let etcd = Etcd::start().await;
    let (backend, a) = client(plain_config(&etcd.server, "")).await;
    let (_, b) = client(plain_config(&etcd.server, "")).await;
    let opts = LockOptions::new()
        .ttl(Duration::from_secs(2))
        .wait(Wait::No)
        .auto_renew(false);
    let g = a.lock_with("moved", &opts).await.unwrap();
    let (key, token) = (
        lock_etcd::lock_key(&g.lease()).unwrap().to_string(),
        g.fencing_token(),
    );
    g.extend(Duration::from_secs(8)).await.unwrap();
    sleep(Duration::from_secs(3)).await;
    assert!(!g.is_lost());
    assert!(b.try_lock("moved").await.unwrap().is_none());
    assert_eq!(lock_etcd::lock_key(&g.lease()).unwrap(), key);
    assert_eq!(g.fencing_token(), token);
    let cmp = lock_etcd::ownership_compare(&g.lease()).unwrap();
    let ok = backend
        .client()
        .txn(
            lock_etcd::etcd_client::Txn::new()
                .when([cmp])
                .and_then([lock_etcd::etcd_client::TxnOp::put("moved-data", "x", None)]),
        )
        .await
        .unwrap()
        .succeeded();
    assert!(ok);
    assert!(g.release().await.is_ok());
    b.try_lock("moved")
        .await
        .unwrap()
        .expect("free")
        .release()
        .await
        .unwrap();
}
