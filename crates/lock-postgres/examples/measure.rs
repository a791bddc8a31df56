//! Measures uncontended acquire+release cycles and release-to-waiter
//! handoff in both modes against a PostgreSQL started by the harness
//! (fsync on). `cargo run -p lock-postgres --release --example measure`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lock_core::{AcquireRequest, Backend, CancellationToken, Key};
use lock_postgres::{Mode, PostgresBackend, PostgresConfig};
use server_harness::PostgresServer;
use tokio::time::Instant;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let server = PostgresServer::start().expect("start PostgreSQL");
    for mode in [Mode::Advisory, Mode::Lease] {
        let mut config = PostgresConfig::from_url(&server.url()).unwrap();
        config.mode = mode;
        let a = PostgresBackend::connect(config.clone()).await.unwrap();
        let b = PostgresBackend::connect(config).await.unwrap();
        let key = Key::new(format!("measure-{mode}")).unwrap();
        let ttl = Duration::from_secs(30);

        // Uncontended cycle: try_acquire + release, 2 statements.
        let (mut cycles, mut acquires) = (Vec::new(), Vec::new());
        for i in 0..2100 {
            let start = Instant::now();
            let lease = a
                .try_acquire(&AcquireRequest::new(key.clone(), ttl))
                .await
                .unwrap()
                .granted()
                .unwrap();
            let acquired = start.elapsed();
            assert!(a.release(&lease).await.unwrap());
            if i >= 100 {
                cycles.push(start.elapsed());
                acquires.push(acquired);
            }
        }
        println!("{mode}: acquire median {:?}", median(acquires));

        // Handoff: a waiter in `acquire` gets the lock after the release.
        let mut handoffs = Vec::new();
        for _ in 0..200 {
            let held = a
                .try_acquire(&AcquireRequest::new(key.clone(), ttl))
                .await
                .unwrap()
                .granted()
                .unwrap();
            let b2 = b.clone();
            let k = key.clone();
            let waiter = tokio::spawn(async move {
                let req = AcquireRequest::new(k, ttl);
                let lease = b2
                    .acquire(&req, None, &CancellationToken::new())
                    .await
                    .unwrap()
                    .unwrap();
                (Instant::now(), lease)
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            let released = Instant::now();
            assert!(a.release(&held).await.unwrap());
            let (got, lease) = waiter.await.unwrap();
            handoffs.push(got - released);
            assert!(b.release(&lease).await.unwrap());
        }
        println!(
            "{mode}: cycle median {:?} (n={}), handoff median {:?} (n={})",
            median(cycles.clone()),
            cycles.len(),
            median(handoffs.clone()),
            handoffs.len()
        );
    }
}
