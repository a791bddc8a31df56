//! The shared conformance suite against a real etcd 3.5 started by the
//! harness. Each case gets its own server (about a second to start), so the
//! fault cases (restart, freeze, cut connections) cannot disturb others.

mod common;

async fn factory() -> common::Etcd {
    common::Etcd::start().await
}

conformance::suite!(factory);
