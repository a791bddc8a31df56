//! Missing binaries give the documented error; a killed test process leaves nothing behind.
//!
//! Both run a copy of this test binary as a child process: the environment of the test
//! process itself must not change (and `set_var` is `unsafe` in edition 2024).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use server_harness::{ConsulServer, Error, PostgresServer, RedisServer, Server};

const CHILD: &str = "SERVER_HARNESS_TEST_CHILD";

fn rerun(test: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, test);
    cmd
}

fn is_child(test: &str) -> bool {
    std::env::var(CHILD).is_ok_and(|v| v == test)
}

#[test]
fn bad_override_variable_is_a_clear_error() {
    const NAME: &str = "bad_override_variable_is_a_clear_error";
    if !is_child(NAME) {
        let out = rerun(NAME)
            .env("DISTLOCK_REDIS_SERVER", "/nonexistent/redis-server")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        return;
    }
    let err = RedisServer::start().expect_err("must fail");
    assert!(matches!(err, Error::BadOverride { .. }), "{err:?}");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("DISTLOCK_REDIS_SERVER"), "{text}");
    assert!(text.contains("/nonexistent/redis-server"), "{text}");
    assert!(text.contains("cargo xtask install"), "{text}");
}

#[test]
fn binary_missing_everywhere_is_a_clear_error() {
    const NAME: &str = "binary_missing_everywhere_is_a_clear_error";
    if !is_child(NAME) {
        let out = rerun(NAME)
            .env("DISTLOCK_SERVERS_DIR", "/nonexistent-servers")
            .env("PATH", "/nonexistent-bin:/bin")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        return;
    }
    if std::path::Path::new("/usr/bin/consul").exists() {
        return; // installed system-wide: nothing is missing here
    }
    let err = ConsulServer::start().expect_err("must fail");
    assert!(matches!(err, Error::BinaryNotFound { .. }), "{err:?}");
    let text = err.to_string();
    println!("{text}");
    assert!(text.contains("`consul`"), "{text}");
    assert!(text.contains("DISTLOCK_CONSUL"), "{text}");
    assert!(text.contains("cargo xtask install"), "{text}");
}

#[test]
fn sigkilled_test_process_leaves_no_server_or_folder() {
    const NAME: &str = "sigkilled_test_process_leaves_no_server_or_folder";
    if is_child(NAME) {
        let redis = RedisServer::start().expect("redis");
        let pg = PostgresServer::start().expect("postgres");
        println!(
            "READY {} {} {} {}",
            redis.pid().unwrap(),
            redis.dir().display(),
            pg.pid().unwrap(),
            pg.dir().display()
        );
        std::thread::sleep(Duration::from_secs(60));
        panic!("the parent should have killed us");
    }
    let mut child = rerun(NAME).stdout(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.find("READY ").map(|i| l[i..].to_string()))
        .expect("child reported its servers");
    let parts: Vec<&str> = line.split_whitespace().collect();
    let pids: Vec<u32> = vec![parts[1].parse().unwrap(), parts[3].parse().unwrap()];
    let dirs: Vec<PathBuf> = vec![parts[2].into(), parts[4].into()];
    assert!(pids.iter().all(|p| server_harness::process_group_alive(*p)));

    child.kill().unwrap(); // SIGKILL: no unwinding, no Drop
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (pids.iter().any(|p| server_harness::process_group_alive(*p))
        || dirs.iter().any(|d| d.exists()))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &pids {
        assert!(
            !server_harness::process_group_alive(*p),
            "server group {p} survived"
        );
    }
    for d in &dirs {
        assert!(!d.exists(), "folder {} survived", d.display());
    }
}

#[test]
fn panicking_test_still_cleans_up() {
    let mut info = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let redis = RedisServer::start().expect("redis");
        info = Some((redis.pid().unwrap(), redis.dir().to_path_buf()));
        assert!(redis.is_running());
        panic!("test failure inside a server's scope");
    }));
    assert!(result.is_err());
    let (pid, dir) = info.unwrap();
    assert!(!server_harness::process_group_alive(pid));
    assert!(!dir.exists());
}
