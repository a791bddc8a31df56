//! etcd: single member, 3-member cluster with leader and per-member restart, TLS + auth.

use std::time::Duration;

use server_harness::probe::http_request;
use server_harness::{EtcdServer, Server};

const T: Duration = Duration::from_secs(5);

fn put(addr: std::net::SocketAddr, key_b64: &str, value_b64: &str) -> u16 {
    let body = format!(r#"{{"key":"{key_b64}","value":"{value_b64}"}}"#);
    http_request(addr, "POST", "/v3/kv/put", &[], Some(&body), T)
        .expect("put")
        .status
}

fn get(addr: std::net::SocketAddr, key_b64: &str) -> String {
    let body = format!(r#"{{"key":"{key_b64}"}}"#);
    http_request(addr, "POST", "/v3/kv/range", &[], Some(&body), T)
        .expect("range")
        .body
}

#[test]
fn single_member_keeps_keys_across_restart_and_pauses() {
    let etcd = EtcdServer::start().expect("start etcd");
    let m = etcd.member(0).unwrap();
    assert_eq!(
        etcd.url(),
        format!("http://127.0.0.1:{}", m.client_addr().port())
    );
    // key "k" = "aw==", value "v" = "dg=="
    assert_eq!(put(m.client_addr(), "aw==", "dg=="), 200);
    assert!(get(m.client_addr(), "aw==").contains(r#""value":"dg==""#));

    etcd.stop().unwrap();
    assert!(http_request(m.client_addr(), "POST", "/v3/kv/range", &[], Some("{}"), T).is_err());
    etcd.restart().unwrap();
    assert!(
        get(m.client_addr(), "aw==").contains(r#""value":"dg==""#),
        "key lost across restart"
    );

    etcd.pause().unwrap();
    let r = http_request(
        m.client_addr(),
        "POST",
        "/v3/kv/range",
        &[],
        Some(r#"{"key":"aw=="}"#),
        Duration::from_millis(300),
    );
    assert!(r.is_err(), "paused etcd answered: {r:?}");
    etcd.resume().unwrap();
    assert!(get(m.client_addr(), "aw==").contains("dg=="));
}

#[test]
fn three_member_cluster_survives_leader_loss() {
    let etcd = EtcdServer::start_cluster(3).expect("start cluster");
    assert_eq!(etcd.endpoints().len(), 3);
    let leader = etcd.leader(T).expect("leader");
    let follower = (leader + 1) % 3;
    let faddr = etcd.member(follower).unwrap().client_addr();
    assert_eq!(put(faddr, "aw==", "dg=="), 200);

    etcd.member(leader).unwrap().stop().unwrap();
    let new_leader = etcd.leader(Duration::from_secs(15)).expect("new leader");
    assert_ne!(new_leader, leader);
    assert!(get(faddr, "aw==").contains("dg=="));

    etcd.member(leader).unwrap().restart().unwrap();
    let back = etcd.member(leader).unwrap().client_addr();
    assert!(
        get(back, "aw==").contains("dg=="),
        "restarted member lost the key"
    );
}

#[test]
fn secure_etcd_requires_tls_and_password() {
    let etcd = EtcdServer::start_secure().expect("start secure etcd");
    assert!(etcd.url().starts_with("https://127.0.0.1:"));
    let (user, _password) = etcd.credentials().expect("credentials");
    assert_eq!(user, "root");
    assert!(etcd.tls().unwrap().ca_cert.is_file());

    let out = etcd
        .etcdctl_command()
        .args(["put", "greeting", "hello"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = etcd
        .etcdctl_command()
        .args(["get", "greeting", "--print-value-only"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");

    // Same endpoint and CA but no user: auth is enforced.
    let out = std::process::Command::new(etcd.etcdctl())
        .arg(format!("--endpoints={}", etcd.url()))
        .arg(format!(
            "--cacert={}",
            etcd.tls().unwrap().ca_cert.display()
        ))
        .args(["get", "greeting"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "anonymous read succeeded: {out:?}");

    etcd.restart().unwrap();
    let out = etcd
        .etcdctl_command()
        .args(["get", "greeting", "--print-value-only"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
}
