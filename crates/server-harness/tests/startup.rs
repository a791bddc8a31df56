//! Start-up times, one server after another (the crate docs quote them).
//!
//! The two tests run in parallel with each other; run with `--test-threads=1 --nocapture`
//! to measure.

use std::time::{Duration, Instant};

use server_harness::{ConsulServer, EtcdServer, PostgresServer, RedisServer};

#[test]
fn four_single_servers_start_within_ten_seconds() {
    let all = Instant::now();
    let t = Instant::now();
    let redis = RedisServer::start().expect("redis");
    let redis_t = t.elapsed();
    let t = Instant::now();
    let pg = PostgresServer::start().expect("postgres");
    let pg_t = t.elapsed();
    let t = Instant::now();
    let etcd = EtcdServer::start().expect("etcd");
    let etcd_t = t.elapsed();
    let t = Instant::now();
    let consul = ConsulServer::start().expect("consul");
    let consul_t = t.elapsed();
    let total = all.elapsed();
    println!(
        "start-up: redis {redis_t:?}, postgres {pg_t:?}, etcd {etcd_t:?}, consul {consul_t:?}; total {total:?}"
    );
    assert!(total < Duration::from_secs(10), "start-up took {total:?}");
    drop((redis, pg, etcd, consul));
}

#[test]
fn three_member_clusters_start_within_thirty_seconds() {
    let t = Instant::now();
    let etcd = EtcdServer::start_cluster(3).expect("etcd cluster");
    let etcd_t = t.elapsed();
    drop(etcd);
    let t = Instant::now();
    let consul = ConsulServer::start_cluster(3).expect("consul cluster");
    let consul_t = t.elapsed();
    drop(consul);
    println!("start-up: etcd 3 members {etcd_t:?}, consul 3 servers {consul_t:?}");
    assert!(etcd_t + consul_t < Duration::from_secs(30));
}
