//! Consul-specific behaviour against real agents started by the harness:
//! ACL + TLS, typed errors for bad input, secrets, sessions shared by a
//! client's locks, interoperability with `consul lock`, and a 3-server
//! cluster losing its leader.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Env, config, run_blocking, shared};
use lock_consul::{ConsulBackend, ConsulConfig};
use lock_core::{Backend, Error, LockClient, LockOptions, LossReason, Wait};
use server_harness::{Binary, ConsulServer, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep, timeout};

fn key(name: &str) -> String {
    format!("{name}-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

async fn client_at(addr: SocketAddr) -> LockClient {
    LockClient::new(ConsulBackend::connect(config(addr)).await.unwrap())
}

fn secure_config(server: &ConsulServer, token: &str) -> ConsulConfig {
    let tls = server.tls().unwrap();
    let url = format!(
        "consuls://{}?token={token}&ca_file={}&session_ttl_min=1s&session_ttl=2s&lock_delay=0s&request_timeout=2s&prefix=secure",
        server.url().trim_start_matches("https://"),
        tls.ca_cert.display(),
    );
    url.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_and_tls_work_and_a_wrong_token_is_an_auth_error() {
    let server = Arc::new(run_blocking(|| ConsulServer::start_secure().unwrap()));
    let token = server.token().unwrap().to_string();

    // The right token over TLS: a full lock cycle.
    let cfg = secure_config(&server, &token);
    let backend = ConsulBackend::connect(cfg.clone()).await.unwrap();
    let debug = format!("{backend:?} {cfg:?} {cfg}");
    assert!(!debug.contains(&token), "token shown: {debug}");
    let locks = LockClient::new(backend);
    let k = key("acl");
    let g = locks
        .lock_with(&k, &LockOptions::new().ttl(Duration::from_secs(4)))
        .await
        .unwrap();
    assert!(locks.inspect(&k).await.unwrap().held);
    assert!(
        locks
            .try_lock_with(&k, &LockOptions::new().ttl(Duration::from_secs(4)))
            .await
            .unwrap()
            .is_none()
    );
    g.release().await.unwrap();

    // With a client certificate too (the agent accepts but does not require
    // one); a key that does not parse is a configuration error.
    let tls = server.tls().unwrap();
    let with_cert: ConsulConfig = format!(
        "{cfg}&cert_file={}&key_file={}",
        tls.client_cert.display(),
        tls.client_key.display()
    )
    .replace("token=***", &format!("token={token}"))
    .parse()
    .unwrap();
    let mtls = LockClient::new(ConsulBackend::connect(with_cert).await.unwrap());
    mtls.lock_with(&k, &LockOptions::new().ttl(Duration::from_secs(4)))
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    let bad_key: ConsulConfig = format!(
        "{cfg}&cert_file={}&key_file={}",
        tls.client_cert.display(),
        tls.ca_cert.display()
    )
    .replace("token=***", &format!("token={token}"))
    .parse()
    .unwrap();
    let err = ConsulBackend::connect(bad_key).await.unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");

    // A wrong token, and no token at all (default deny): Error::Auth, fast.
    let wrong = "00000000-1111-2222-3333-444444444444";
    for cfg in [
        secure_config(&server, wrong),
        format!(
            "consuls://{}?ca_file={}&session_ttl_min=1s&session_ttl=1s",
            server.url().trim_start_matches("https://"),
            server.tls().unwrap().ca_cert.display()
        )
        .parse()
        .unwrap(),
    ] {
        let start = Instant::now();
        let err = ConsulBackend::connect(cfg).await.unwrap_err();
        assert!(matches!(err, Error::Auth { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(start.elapsed() < Duration::from_secs(2));
        let text = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
        assert!(!text.contains(wrong) && !text.contains(&token), "{text}");
    }

    // TLS without trusting the test CA: the server is not accepted.
    let untrusted: ConsulConfig = format!(
        "consuls://{}?token={token}&session_ttl_min=1s&session_ttl=1s&connect_timeout=1s",
        server.url().trim_start_matches("https://")
    )
    .parse()
    .unwrap();
    let err = ConsulBackend::connect(untrusted).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_connection_error_within_the_timeouts() {
    // A port nobody listens on: refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = ConsulBackend::connect_url(&format!(
        "consul://127.0.0.1:{port}?session_ttl_min=1s&session_ttl=1s"
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    // A server that accepts but never answers: the request timeout.
    let env = shared();
    let proxy = server_harness::TcpProxy::start(env.server.http_addr()).unwrap();
    proxy.blackhole();
    let start = Instant::now();
    let cfg: ConsulConfig = format!(
        "consul://{}?session_ttl_min=1s&session_ttl=1s&connect_timeout=500ms&request_timeout=500ms",
        proxy.addr()
    )
    .parse()
    .unwrap();
    let err = ConsulBackend::connect(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    proxy.heal();
}

#[tokio::test]
async fn bad_configuration_is_a_config_error_before_anything_is_sent() {
    for url in [
        "http://127.0.0.1:8500",
        "consul://127.0.0.1:8500?tokn=x",
        "consul://127.0.0.1:8500?session_ttl=1s",
        "consul://127.0.0.1:8500?prefix=a//b",
        "consul://127.0.0.1:8500?lock_delay=5m",
        "not a url",
        "consuls://127.0.0.1:8501?ca_file=/nonexistent/ca.pem",
    ] {
        let err = ConsulBackend::connect_url(url).await.unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{url}: {err:?}");
    }
    let not_pem = tempfile_with(b"not a certificate");
    let err = ConsulBackend::connect_url(&format!(
        "consuls://127.0.0.1:8501?ca_file={}",
        not_pem.display()
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err:?}");
    let _ = std::fs::remove_file(not_pem);
}

fn tempfile_with(bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("lock-consul-{:016x}.pem", rand_u64()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

/// A writer that keeps everything traced, to search it for secrets.
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

#[test]
fn traces_never_show_the_token() {
    let server = ConsulServer::start_secure().unwrap();
    let token = server.token().unwrap().to_string();
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let locks = LockClient::new(
                ConsulBackend::connect(secure_config(&server, &token))
                    .await
                    .unwrap(),
            );
            let k = key("trace");
            let g = locks
                .lock_with(&k, &LockOptions::new().ttl(Duration::from_secs(4)))
                .await
                .unwrap();
            g.release().await.unwrap();
            let wrong = secure_config(&server, "ffffffff-1111-2222-3333-444444444444");
            let _ = ConsulBackend::connect(wrong).await;
        });
    });
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(text.contains("consul"), "nothing was traced");
    assert!(!text.contains(&token), "the token appears in the traces");
    assert!(
        !text.contains("ffffffff-1111"),
        "a token appears in the traces"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_of_one_client_exclude_each_other_despite_the_shared_session() {
    let locks = client_at(shared().proxy.addr()).await;
    let k = key("same-client");
    let opts = LockOptions::new().ttl(Duration::from_secs(4));
    let first = locks.try_lock_with(&k, &opts).await.unwrap().unwrap();
    // Consul would let our session take the key again; the client must not.
    assert!(locks.try_lock_with(&k, &opts).await.unwrap().is_none());
    let waiter = {
        let locks = locks.clone();
        let k = k.clone();
        let opts = opts.clone().wait(Wait::For(Duration::from_secs(5)));
        tokio::spawn(async move { locks.lock_with(&k, &opts).await })
    };
    sleep(Duration::from_millis(200)).await;
    let t1 = first.fencing_token();
    let released = Instant::now();
    first.release().await.unwrap();
    let second = waiter.await.unwrap().unwrap();
    assert!(
        released.elapsed() < Duration::from_millis(500),
        "{:?}",
        released.elapsed()
    );
    assert!(second.fencing_token() > t1);
    // The first guard's late release (same session) must not free it.
    second.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_session_fires_lost_on_every_guard() {
    let env = Arc::new(run_blocking(|| Env::start(false)));
    let locks = client_at(env.proxy.addr()).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let guards = vec![
        locks.lock_with(key("inval-a"), &opts).await.unwrap(),
        locks.lock_with(key("inval-b"), &opts).await.unwrap(),
    ];
    // An operator destroys every session.
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1", env.server.http_addr());
    let body = http
        .get(format!("{base}/session/list"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert!(!list.is_empty());
    for s in &list {
        // Only the TTL may invalidate our sessions: no health checks.
        assert_eq!(s["NodeChecks"], serde_json::json!([]), "{s}");
        assert!(s["ServiceChecks"].is_null(), "{s}");
        assert_eq!(s["TTL"], "2000ms", "{s}");
        assert_eq!(s["LockDelay"], 0, "{s}");
        assert_eq!(s["Behavior"], "release", "{s}");
    }
    for s in list {
        let id = s["ID"].as_str().unwrap();
        http.put(format!("{base}/session/destroy/{id}"))
            .send()
            .await
            .unwrap();
    }
    for g in &guards {
        // The session's blocking query sees it at once.
        let reason = timeout(Duration::from_millis(250), g.lost())
            .await
            .expect("lost() never fired");
        assert!(
            matches!(reason, LossReason::SessionLost(_) | LossReason::NotHeld),
            "{reason}"
        );
    }
    // The client gets a new session by itself.
    let again = locks.lock_with(key("inval-c"), &opts).await.unwrap();
    again.release().await.unwrap();
}

fn consul_lock(addr: SocketAddr, prefix: &str, command: &str) -> std::process::Child {
    std::process::Command::new(Binary::Consul.locate().unwrap())
        .arg("lock")
        .arg(format!("-http-addr={addr}"))
        .arg(prefix)
        .arg(command)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excludes_and_is_excluded_by_the_consul_lock_command() {
    let env = shared();
    let locks = client_at(env.proxy.addr()).await;
    let k = key("interop");
    // Our test prefix is "distlock-test": `consul lock distlock-test/<key>`
    // uses the same entry.
    let prefix = format!("distlock-test/{k}");
    let marker = std::env::temp_dir().join(format!("lock-consul-{k}"));
    let opts = LockOptions::new().ttl(Duration::from_secs(4));

    // 1. distlock holds: `consul lock` waits until we release.
    let g = locks.lock_with(&k, &opts).await.unwrap();
    let t1 = g.fencing_token();
    let mut child = consul_lock(
        env.server.http_addr(),
        &prefix,
        &format!("touch {}", marker.display()),
    );
    sleep(Duration::from_millis(1500)).await;
    assert!(
        !marker.exists(),
        "consul lock ran while distlock held the lock"
    );
    g.release().await.unwrap();
    let status = run_blocking(|| child.wait()).unwrap();
    assert!(status.success());
    assert!(marker.exists(), "consul lock never got the lock");
    std::fs::remove_file(&marker).unwrap();

    // 2. `consul lock` holds: distlock waits until its command ends.
    let mut child = consul_lock(env.server.http_addr(), &prefix, "sleep 2");
    let held_by_cli = async {
        loop {
            if locks.inspect(&k).await.unwrap().held {
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
    };
    timeout(Duration::from_secs(5), held_by_cli)
        .await
        .expect("consul lock never took it");
    assert!(locks.try_lock_with(&k, &opts).await.unwrap().is_none());
    let start = Instant::now();
    let g = locks
        .lock_with(&k, &opts.clone().wait(Wait::For(Duration::from_secs(10))))
        .await
        .unwrap();
    assert!(start.elapsed() > Duration::from_millis(500));
    assert!(run_blocking(|| child.wait()).unwrap().success());
    assert!(g.fencing_token() > t1);
    g.release().await.unwrap();
}

/// A TCP proxy that counts HTTP requests (request lines) from the client,
/// except session watches.
async fn counting_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut dr, mut dw) = down.split();
                let (mut ur, mut uw) = up.split();
                let to_server = async {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        let n = match dr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        // Every request line, except the session watch's
                        // blocking queries (woken by any session change on
                        // the shared agent, so not ours to count).
                        let requests = chunk.windows(10).filter(|w| w == b"HTTP/1.1\r\n").count();
                        let watches = chunk
                            .windows(21)
                            .filter(|w| w == b"GET /v1/session/info/")
                            .count();
                        c.fetch_add(requests.saturating_sub(watches), Ordering::SeqCst);
                        if uw.write_all(chunk).await.is_err() {
                            return;
                        }
                    }
                };
                let to_client = tokio::io::copy(&mut ur, &mut dw);
                tokio::select! { _ = to_server => {}, _ = to_client => {} }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_acquire_and_release_take_two_requests() {
    let (addr, count) = counting_proxy(shared().server.http_addr()).await;
    // A long session TTL keeps the keep-alive quiet while we count.
    let cfg = ConsulConfig::builder()
        .address(addr.to_string())
        .prefix("distlock-test")
        .session_ttl_min(Duration::from_secs(1))
        .session_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let locks = LockClient::new(ConsulBackend::connect(cfg).await.unwrap());
    let opts = LockOptions::new().ttl(Duration::from_secs(60));
    let k = key("rtt");
    let rounds = 50;
    let before = count.load(Ordering::SeqCst);
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..rounds {
        let start = Instant::now();
        let g = locks.try_lock_with(&k, &opts).await.unwrap().unwrap();
        if let Some(prev) = last {
            assert!(g.fencing_token() > prev);
        }
        last = Some(g.fencing_token());
        g.release().await.unwrap();
        times.push(start.elapsed());
    }
    let requests = count.load(Ordering::SeqCst) - before;
    assert_eq!(
        requests,
        2 * rounds,
        "requests for {rounds} acquire+release cycles"
    );
    times.sort();
    eprintln!(
        "uncontended acquire+release through a proxy: median {:?}, p90 {:?}",
        times[rounds / 2],
        times[rounds * 9 / 10]
    );
    // The same without the proxy, for the record.
    let direct = client_at(shared().server.http_addr()).await;
    let opts = LockOptions::new().ttl(Duration::from_secs(4));
    let mut times = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let g = direct.try_lock_with(&k, &opts).await.unwrap().unwrap();
        g.release().await.unwrap();
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!(
        "uncontended acquire+release, direct: median {:?}, p90 {:?}",
        times[rounds / 2],
        times[rounds * 9 / 10]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_woken_by_the_blocking_query_within_milliseconds() {
    let addr = shared().proxy.addr();
    let (a, b) = (client_at(addr).await, client_at(addr).await);
    let k = key("handoff");
    let opts = LockOptions::new().ttl(Duration::from_secs(10));
    let mut handoffs = Vec::new();
    for _ in 0..5 {
        let g = a.lock_with(&k, &opts).await.unwrap();
        let waiter = {
            let b = b.clone();
            let k = k.clone();
            let opts = opts.clone().wait(Wait::For(Duration::from_secs(5)));
            tokio::spawn(async move {
                let g = b.lock_with(&k, &opts).await.unwrap();
                let at = Instant::now();
                g.release().await.unwrap();
                at
            })
        };
        sleep(Duration::from_millis(300)).await;
        let released = Instant::now();
        g.release().await.unwrap();
        let got = waiter.await.unwrap();
        handoffs.push(got - released);
    }
    handoffs.sort();
    eprintln!("handoff to a waiting client: median {:?}", handoffs[2]);
    assert!(handoffs[2] < Duration::from_millis(200), "{handoffs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leader_loss_keeps_mutual_exclusion_and_waiters_continue() {
    let cluster = Arc::new(run_blocking(|| ConsulServer::start_cluster(3).unwrap()));
    let leader = run_blocking(|| cluster.leader(Duration::from_secs(20))).unwrap();
    let follower = (leader + 1) % 3;
    let addr = cluster.member(follower).unwrap().http_addr();
    let cfg = || {
        ConsulConfig::builder()
            .address(addr.to_string())
            .prefix("cluster")
            .session_ttl_min(Duration::from_secs(1))
            .session_ttl(Duration::from_secs(2))
            .lock_delay(Duration::ZERO)
            .connect_timeout(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(2))
            .wait(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let k = key("cluster");
    let in_section = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let after_election = Arc::new(AtomicUsize::new(0));
    let elected = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let locks = LockClient::new(ConsulBackend::connect(cfg()).await.unwrap());
        let (k, in_section, tokens, after, elected) = (
            k.clone(),
            Arc::clone(&in_section),
            Arc::clone(&tokens),
            Arc::clone(&after_election),
            Arc::clone(&elected),
        );
        workers.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .ttl(Duration::from_secs(4))
                .wait(Wait::For(Duration::from_secs(1)));
            let end = Instant::now() + Duration::from_secs(14);
            while Instant::now() < end {
                let g = match locks.lock_with(&k, &opts).await {
                    Ok(g) => g,
                    Err(e) => {
                        assert!(e.is_retryable(), "{e}");
                        continue;
                    }
                };
                if g.is_lost() {
                    continue;
                }
                assert!(
                    !in_section.swap(true, Ordering::SeqCst),
                    "two holders at once"
                );
                tokens.lock().unwrap().push(g.fencing_token());
                tokio::select! {
                    _ = g.lost() => {}
                    _ = sleep(Duration::from_millis(150)) => {}
                }
                in_section.store(false, Ordering::SeqCst);
                if elected.load(Ordering::SeqCst) {
                    after.fetch_add(1, Ordering::SeqCst);
                }
                let _ = g.release().await;
            }
        }));
    }
    sleep(Duration::from_secs(2)).await;
    let c = Arc::clone(&cluster);
    tokio::task::spawn_blocking(move || c.member(leader).unwrap().stop())
        .await
        .unwrap()
        .unwrap();
    let c = Arc::clone(&cluster);
    let new_leader = tokio::task::spawn_blocking(move || c.leader(Duration::from_secs(20)))
        .await
        .unwrap()
        .unwrap();
    assert_ne!(new_leader, leader);
    elected.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let tokens = tokens.lock().unwrap().clone();
    assert!(
        tokens.windows(2).all(|w| w[1] > w[0]),
        "fencing tokens did not increase: {tokens:?}"
    );
    let after = after_election.load(Ordering::SeqCst);
    eprintln!(
        "cluster: {} sections in total, {after} after the new election",
        tokens.len()
    );
    assert!(after >= 3, "waiters made no progress after the election");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_locks_are_renewed_in_batches() {
    let (addr, count) = counting_proxy(shared().server.http_addr()).await;
    let cfg = ConsulConfig::builder()
        .address(addr.to_string())
        .prefix("distlock-test")
        .session_ttl_min(Duration::from_secs(1))
        .session_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let backend: Arc<dyn Backend> = Arc::new(ConsulBackend::connect(cfg).await.unwrap());
    let locks = LockClient::from_arc(backend);
    let opts = LockOptions::new().ttl(Duration::from_secs(60));
    let mut guards = Vec::new();
    for i in 0..100 {
        guards.push(
            locks
                .try_lock_with(key(&format!("batch{i}")), &opts)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let before = count.load(Ordering::SeqCst);
    // Extending all of them the way the renewer does: one batch.
    let leases: Vec<_> = guards.iter().map(|g| g.lease()).collect();
    let results = locks
        .backend()
        .extend_batch(&leases, Duration::from_secs(60))
        .await;
    assert!(results.iter().all(|r| r.is_ok()));
    let requests = count.load(Ordering::SeqCst) - before;
    // One session renewal plus one check per 64 entries.
    assert_eq!(requests, 1 + 2);
    for g in guards {
        g.release().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_whose_answer_is_lost_is_undone() {
    let env = shared();
    let slow = server_harness::TcpProxy::start(env.server.http_addr()).unwrap();
    // A long session: only the cleanup, not the session's end, can free
    // the key within this test.
    let cfg = ConsulConfig::builder()
        .address(slow.addr().to_string())
        .prefix("distlock-test")
        .session_ttl_min(Duration::from_secs(1))
        .session_ttl(Duration::from_secs(20))
        .lock_delay(Duration::ZERO)
        .request_timeout(Duration::from_millis(800))
        .build()
        .unwrap();
    let a = LockClient::new(ConsulBackend::connect(cfg).await.unwrap());
    let b = client_at(env.proxy.addr()).await;
    let k = key("lost-answer");
    let opts = LockOptions::new().ttl(Duration::from_secs(60));
    // The request reaches Consul after 500 ms and is applied; the answer
    // would come back after 1 s, past the 800 ms timeout.
    slow.set_delay(Duration::from_millis(500));
    let err = a.try_lock_with(&k, &opts).await.unwrap_err();
    assert!(matches!(err, Error::Connection { .. }), "{err:?}");
    assert!(
        b.inspect(&k).await.unwrap().held,
        "the acquire was not applied"
    );
    slow.set_delay(Duration::ZERO);
    let start = Instant::now();
    let g = b
        .lock_with(&k, &opts.clone().wait(Wait::For(Duration::from_secs(10))))
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "freed only after {:?}",
        start.elapsed()
    );
    g.release().await.unwrap();
    // And the client that lost the answer can take the key again.
    let again = a
        .lock_with(&k, &opts.clone().wait(Wait::For(Duration::from_secs(5))))
        .await
        .unwrap();
    again.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_delay_holds_the_key_after_a_session_is_invalidated() {
    let env = Arc::new(run_blocking(|| Env::start(false)));
    let delayed = ConsulConfig::builder()
        .address(env.proxy.addr().to_string())
        .prefix("distlock-test")
        .session_ttl_min(Duration::from_secs(1))
        .session_ttl(Duration::from_secs(6))
        .lock_delay(Duration::from_secs(4))
        .build()
        .unwrap();
    let a = LockClient::new(ConsulBackend::connect(delayed).await.unwrap());
    let b = client_at(env.proxy.addr()).await;
    let k = key("lock-delay");
    let opts = LockOptions::new().ttl(Duration::from_secs(20));
    let g = a.lock_with(&k, &opts).await.unwrap();
    // An operator invalidates a's session (b's has no lock-delay and holds
    // nothing, so destroying it too changes nothing here).
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1", env.server.http_addr());
    let body = http
        .get(format!("{base}/session/list"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let invalidated = Instant::now();
    for s in list.iter().filter(|s| s["LockDelay"].as_u64() != Some(0)) {
        let id = s["ID"].as_str().unwrap();
        http.put(format!("{base}/session/destroy/{id}"))
            .send()
            .await
            .unwrap();
    }
    // The session's blocking query finds out at once, well within the
    // lock-delay.
    let reason = timeout(Duration::from_millis(500), g.lost())
        .await
        .expect("lost() never fired");
    assert!(
        matches!(reason, LossReason::SessionLost(_) | LossReason::NotHeld),
        "{reason}"
    );
    let told = invalidated.elapsed();
    let next = b
        .lock_with(&k, &opts.clone().wait(Wait::For(Duration::from_secs(10))))
        .await
        .unwrap();
    let waited = invalidated.elapsed();
    assert!(
        told < waited,
        "the old holder was told only after the next grant"
    );
    assert!(
        waited >= Duration::from_millis(3900),
        "lock-delay not honoured: {waited:?}"
    );
    assert!(waited < Duration::from_secs(7), "waited {waited:?}");
    assert!(next.fencing_token() > g.fencing_token());
    next.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_key_write_is_an_auth_error_on_acquire() {
    let server = Arc::new(run_blocking(|| ConsulServer::start_secure().unwrap()));
    let master = server.token().unwrap().to_string();
    // A token that may create sessions but not write keys, made through
    // the plain-HTTP port the harness keeps open.
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1", server.http_addr());
    let put = |path: &str, body: serde_json::Value| {
        http.put(format!("{base}/{path}"))
            .header("X-Consul-Token", &master)
            .body(body.to_string())
            .send()
    };
    let r = put(
        "acl/policy",
        serde_json::json!({
            "Name": "sessions-only",
            "Rules": "session_prefix \"\" { policy = \"write\" }\nkey_prefix \"\" { policy = \"read\" }",
        }),
    )
    .await
    .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let r = put(
        "acl/token",
        serde_json::json!({ "Policies": [{ "Name": "sessions-only" }] }),
    )
    .await
    .unwrap();
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let limited = body["SecretID"].as_str().unwrap().to_string();

    let locks = LockClient::new(
        ConsulBackend::connect(secure_config(&server, &limited))
            .await
            .unwrap(),
    );
    let k = key("no-write");
    let err = locks
        .try_lock_with(&k, &LockOptions::new().ttl(Duration::from_secs(4)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Auth { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains(&limited));
    // Nothing was written, and reading is allowed.
    assert!(!locks.inspect(&k).await.unwrap().held);
}
