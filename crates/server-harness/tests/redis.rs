//! Redis: starts, answers, restarts empty on the same port, pauses, TLS + ACL.

use std::time::{Duration, Instant};

use server_harness::probe::redis_command;
use server_harness::{RedisServer, Server};

const T: Duration = Duration::from_secs(2);

#[test]
fn plain_redis_answers_and_restart_keeps_port_but_not_data() {
    let redis = RedisServer::start().expect("start redis");
    let addr = redis.addr();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    assert_eq!(redis_command(addr, &["PING"], T).unwrap(), "+PONG");
    assert_eq!(redis_command(addr, &["SET", "k", "v"], T).unwrap(), "+OK");
    assert_eq!(redis_command(addr, &["EXISTS", "k"], T).unwrap(), ":1");

    redis.stop().unwrap();
    assert!(!redis.is_running());
    assert!(
        redis_command(addr, &["PING"], T).is_err(),
        "stopped server answered"
    );

    redis.restart().unwrap();
    assert_eq!(redis.addr(), addr);
    assert_eq!(redis_command(addr, &["PING"], T).unwrap(), "+PONG");
    assert_eq!(
        redis_command(addr, &["EXISTS", "k"], T).unwrap(),
        ":0",
        "no persistence: a restart must keep nothing"
    );
}

#[test]
fn pause_makes_clients_time_out_and_resume_recovers() {
    let redis = RedisServer::start().expect("start redis");
    redis.pause().unwrap();
    let started = Instant::now();
    let err = redis_command(redis.addr(), &["PING"], Duration::from_millis(300));
    assert!(err.is_err(), "paused server answered: {err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    redis.resume().unwrap();
    assert_eq!(redis_command(redis.addr(), &["PING"], T).unwrap(), "+PONG");
}

#[test]
fn many_masters_are_independent() {
    let masters = RedisServer::start_many(3).expect("start masters");
    let mut ports: Vec<u16> = masters.iter().map(RedisServer::port).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    redis_command(masters[0].addr(), &["SET", "only-here", "1"], T).unwrap();
    assert_eq!(
        redis_command(masters[1].addr(), &["EXISTS", "only-here"], T).unwrap(),
        ":0"
    );
}

#[test]
fn secure_redis_has_tls_and_acl() {
    let redis = RedisServer::start_secure().expect("start secure redis");
    let tls = redis.tls().expect("tls files");
    assert!(tls.ca_cert.is_file());
    assert!(tls.ca_pem.contains("BEGIN CERTIFICATE"));
    let password = redis.password().expect("password");
    assert_eq!(redis.username(), Some("distlock"));
    assert_eq!(
        redis.url(),
        format!("rediss://distlock:{password}@127.0.0.1:{}/", redis.port())
    );
    // Plain RESP on the TLS port is not understood: the server closes or answers garbage.
    let plain = redis_command(redis.addr(), &["PING"], Duration::from_millis(500));
    assert!(
        !matches!(plain.as_deref(), Ok("+PONG")),
        "TLS port answered plaintext"
    );
    // A real TLS + AUTH exchange with the Debian client, when it is there.
    let cli = std::path::Path::new("/usr/bin/redis-cli");
    if cli.exists() {
        let out = std::process::Command::new(cli)
            .args(["--tls", "--cacert"])
            .arg(&tls.ca_cert)
            .args(["-h", "127.0.0.1", "-p", &redis.port().to_string()])
            .args([
                "--user",
                "distlock",
                "--pass",
                password,
                "--no-auth-warning",
                "PING",
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "PONG",
            "{out:?}"
        );
        let anon = std::process::Command::new(cli)
            .args(["--tls", "--cacert"])
            .arg(&tls.ca_cert)
            .args(["-h", "127.0.0.1", "-p", &redis.port().to_string(), "PING"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&anon.stdout).to_string()
            + &String::from_utf8_lossy(&anon.stderr);
        assert!(
            text.contains("NOAUTH") || text.contains("NOPERM"),
            "default user must be off: {text}"
        );
    }
}

#[test]
fn drop_kills_the_server_and_removes_the_folder() {
    let redis = RedisServer::start().expect("start redis");
    let pid = redis.pid().unwrap();
    let dir = redis.dir().to_path_buf();
    drop(redis);
    assert!(!server_harness::process_group_alive(pid));
    assert!(!dir.exists());
}
