//! Consul: dev agent, persistent agent, 3-server cluster, ACL + TLS agent.

use std::time::Duration;

use server_harness::probe::http_request;
use server_harness::{ConsulConfig, ConsulServer, Server};

const T: Duration = Duration::from_secs(5);

fn put(addr: std::net::SocketAddr, token: Option<&str>, key: &str, value: &str) -> u16 {
    let headers: Vec<(&str, &str)> = token.map(|t| ("X-Consul-Token", t)).into_iter().collect();
    http_request(
        addr,
        "PUT",
        &format!("/v1/kv/{key}"),
        &headers,
        Some(value),
        T,
    )
    .expect("put")
    .status
}

fn get_raw(addr: std::net::SocketAddr, token: Option<&str>, key: &str) -> (u16, String) {
    let headers: Vec<(&str, &str)> = token.map(|t| ("X-Consul-Token", t)).into_iter().collect();
    let r =
        http_request(addr, "GET", &format!("/v1/kv/{key}?raw"), &headers, None, T).expect("get");
    (r.status, r.body)
}

#[test]
fn dev_agent_answers_allows_short_ttl_and_restarts_empty() {
    let consul = ConsulServer::start().expect("start consul");
    let addr = consul.http_addr();
    assert_eq!(consul.url(), format!("http://{addr}"));
    assert_eq!(put(addr, None, "k", "v"), 200);
    assert_eq!(get_raw(addr, None, "k"), (200, "v".to_string()));

    // session_ttl_min is lowered to 1s for test agents.
    let r = http_request(
        addr,
        "PUT",
        "/v1/session/create",
        &[],
        Some(r#"{"TTL":"1s","LockDelay":"0s"}"#),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "short TTL refused: {}", r.body);

    consul.pause().unwrap();
    let paused = http_request(
        addr,
        "GET",
        "/v1/kv/k?raw",
        &[],
        None,
        Duration::from_millis(300),
    );
    assert!(paused.is_err(), "paused agent answered: {paused:?}");
    consul.resume().unwrap();
    assert_eq!(get_raw(addr, None, "k").0, 200);

    consul.restart().unwrap();
    assert_eq!(consul.http_addr(), addr);
    assert_eq!(
        get_raw(addr, None, "k").0,
        404,
        "a -dev agent restarts empty"
    );
}

#[test]
fn persistent_agent_keeps_data_across_restart() {
    let consul = ConsulServer::start_with(ConsulConfig {
        persistent: true,
        ..ConsulConfig::default()
    })
    .expect("start consul");
    let addr = consul.http_addr();
    assert_eq!(put(addr, None, "k", "kept"), 200);
    consul.stop().unwrap();
    consul.restart().unwrap();
    assert_eq!(get_raw(addr, None, "k"), (200, "kept".to_string()));
}

#[test]
fn three_server_cluster_elects_and_survives_leader_loss() {
    let consul = ConsulServer::start_cluster(3).expect("start cluster");
    let leader = consul.leader(T).expect("leader");
    let follower = (leader + 1) % 3;
    let faddr = consul.member(follower).unwrap().http_addr();
    assert_eq!(put(faddr, None, "k", "v"), 200);
    consul.member(leader).unwrap().stop().unwrap();
    let new_leader = consul.leader(Duration::from_secs(20)).expect("new leader");
    assert_ne!(new_leader, leader);
    assert_eq!(get_raw(faddr, None, "k"), (200, "v".to_string()));
    consul.member(leader).unwrap().restart().unwrap();
}

#[test]
fn secure_agent_enforces_acl_and_serves_https() {
    let consul = ConsulServer::start_secure().expect("start secure consul");
    let token = consul.token().expect("token");
    assert!(consul.url().starts_with("https://127.0.0.1:"));
    let addr = consul.http_addr();
    assert_eq!(
        put(addr, None, "k", "v"),
        403,
        "anonymous write must be denied"
    );
    assert_eq!(put(addr, Some(token), "k", "v"), 200);
    assert_eq!(get_raw(addr, Some(token), "k"), (200, "v".to_string()));
    // A real TLS handshake on the HTTPS port, with curl when it is there.
    let curl = std::path::Path::new("/usr/bin/curl");
    if curl.exists() {
        let out = std::process::Command::new(curl)
            .args(["-sS", "--cacert"])
            .arg(&consul.tls().unwrap().ca_cert)
            .args(["-H", &format!("X-Consul-Token: {token}")])
            .arg(format!("{}/v1/kv/k?raw", consul.url()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v", "{out:?}");
    }
}
