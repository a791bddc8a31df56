//! A 3-member etcd cluster losing its leader while locks are held and
//! contenders wait: never two holders, waiters continue once a new leader is
//! elected, and holders whose lease survived keep their locks.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use conformance::{FencedRegister, Section};
use lock_core::{LockClient, LockOptions, Wait};
use lock_etcd::{EtcdBackend, EtcdConfig};
use server_harness::{EtcdServer, Server};
use tokio::time::{Instant, sleep, timeout};

async fn client(server: &EtcdServer) -> LockClient {
    let mut b = EtcdConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .request_timeout(Duration::from_secs(2))
        .recheck_interval(Duration::from_secs(2));
    for m in server.members() {
        b = b.endpoint(m.client_addr().to_string());
    }
    LockClient::new(EtcdBackend::connect(b.build().unwrap()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_keeps_mutual_exclusion_and_leases() {
    common::init_tracing();
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| EtcdServer::start_cluster(3).expect("3-member cluster"))
            .await
            .unwrap(),
    );
    let clients = [
        client(&cluster).await,
        client(&cluster).await,
        client(&cluster).await,
    ];
    let ttl = Duration::from_secs(5);
    let hold = LockOptions::new().ttl(ttl).wait(Wait::No);

    // Locks held across the failover, and waiters queued behind them.
    let mut held = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        held.push(c.lock_with(format!("held-{i}"), &hold).await.unwrap());
    }
    let mut waiters = Vec::new();
    for i in 0..3 {
        let c = clients[(i + 1) % 3].clone();
        waiters.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .ttl(ttl)
                .wait(Wait::For(Duration::from_secs(60)));
            let g = c.lock_with(format!("held-{i}"), &opts).await;
            (Instant::now(), g)
        }));
    }

    // Contenders take one key over and over through the failover.
    let register = Arc::new(FencedRegister::default());
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut contenders = Vec::new();
    for t in 0..6 {
        let c = clients[t % 3].clone();
        let (register, stop, rounds) = (
            Arc::clone(&register),
            Arc::clone(&stop),
            Arc::clone(&rounds),
        );
        contenders.push(tokio::spawn(async move {
            let opts = LockOptions::new()
                .ttl(ttl)
                .wait(Wait::For(Duration::from_secs(5)));
            while !stop.load(Ordering::Relaxed) {
                // Errors and timeouts are expected while there is no leader.
                let Ok(g) = c.lock_with("contended", &opts).await else {
                    continue;
                };
                let enter = Instant::now();
                sleep(Duration::from_millis(5)).await;
                let exit = Instant::now();
                // Count the section only if the lease was certainly ours
                // for all of it (the guarantee a lease lock gives).
                if !g.is_lost() && g.valid_until() > exit {
                    register.record(Section {
                        token: g.fencing_token(),
                        enter,
                        exit,
                    });
                }
                rounds.fetch_add(1, Ordering::Relaxed);
                let _ = g.release().await;
            }
        }));
    }
    sleep(Duration::from_secs(1)).await;
    let before = rounds.load(Ordering::Relaxed);
    assert!(before > 0, "no contender got the lock before the failover");

    // Kill the leader.
    let c2 = Arc::clone(&cluster);
    let old_leader = tokio::task::spawn_blocking(move || {
        let leader = c2.leader(Duration::from_secs(10)).expect("a leader");
        c2.member(leader).unwrap().stop().expect("kill the leader");
        leader
    })
    .await
    .unwrap();
    let killed_at = Instant::now();
    let c2 = Arc::clone(&cluster);
    let new_leader = tokio::task::spawn_blocking(move || c2.leader(Duration::from_secs(15)))
        .await
        .unwrap()
        .expect("a new leader");
    assert_ne!(new_leader, old_leader);
    eprintln!("new leader after {:?}", killed_at.elapsed());

    // Holders keep their locks through the failover (their lease survived):
    // no loss during two TTLs, and the waiters are still waiting.
    tokio::select! {
        reason = futures::future::select_all(held.iter().map(|g| Box::pin(g.lost()))) => {
            panic!("a holder lost its lock in the failover: {}", reason.0)
        }
        _ = sleep(ttl * 2) => {}
    }
    for w in &waiters {
        assert!(!w.is_finished(), "a waiter got a lock that is held");
    }
    let after = rounds.load(Ordering::Relaxed);
    assert!(
        after > before,
        "contenders made no progress after the failover"
    );

    // Releasing now hands every lock to its waiter.
    let released_at = Instant::now();
    for g in held {
        g.release().await.unwrap();
    }
    for w in waiters {
        let (got_at, g) = timeout(Duration::from_secs(20), w)
            .await
            .expect("waiter stuck")
            .unwrap();
        let g = g.expect("waiter failed");
        eprintln!(
            "waiter got its lock {:?} after the release",
            got_at - released_at
        );
        g.release().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for c in contenders {
        timeout(Duration::from_secs(20), c)
            .await
            .expect("contender stuck")
            .unwrap();
    }
    let sections = register.check();
    eprintln!("{sections} critical sections, none overlapping, tokens increasing");
    assert!(sections > 10);
}
