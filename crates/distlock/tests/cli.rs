//! The `distlock` command on every backend, against real servers.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use server_harness::{ConsulServer, EtcdServer, PostgresServer, RedisServer, Server};

fn distlock(url: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distlock"));
    cmd.env("DISTLOCK_URL", url).env_remove("DISTLOCK_LOG");
    cmd
}

fn run(url: &str, args: &[&str]) -> Output {
    distlock(url).args(args).output().expect("run distlock")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Two runs of a command that fails if another copy is inside: both
/// succeed, so they never overlapped. A third, with `--wait no` while one
/// holds, exits 75 at once. The command sees its fencing token.
fn exclusion(url: &str, dir: &Path) {
    let key = format!("cli-{:08x}", rand_u32());
    let inside = dir.join("inside");
    let script = format!(
        "mkdir {0} || exit 3; echo $DISTLOCK_FENCING_TOKEN >> {1}; sleep 0.4; rmdir {0}",
        inside.display(),
        dir.join("tokens").display()
    );
    let spawn = || {
        distlock(url)
            .args(["run", &key, "--", "sh", "-c", &script])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn distlock")
    };
    let (a, b) = (spawn(), spawn());
    std::thread::sleep(Duration::from_millis(150));
    let busy = run(url, &["run", "--wait", "no", &key, "--", "true"]);
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    assert_eq!(code(&a), 0, "{url}: {}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(code(&b), 0, "{url}: {}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(
        code(&busy),
        75,
        "{url}: {}",
        String::from_utf8_lossy(&busy.stderr)
    );
    let tokens: Vec<u64> = std::fs::read_to_string(dir.join("tokens"))
        .expect("tokens")
        .lines()
        .map(|l| l.trim().parse().expect("a fencing token"))
        .collect();
    assert_eq!(tokens.len(), 2);
    assert!(tokens[1] > tokens[0], "{url}: tokens {tokens:?}");
    // The exit code of the command comes back, and the lock is free after.
    assert_eq!(
        code(&run(
            url,
            &["run", "--wait", "no", &key, "--", "sh", "-c", "exit 7"]
        )),
        7
    );
    let inspect = run(url, &["inspect", &key]);
    assert!(
        String::from_utf8_lossy(&inspect.stdout).contains("free"),
        "{inspect:?}"
    );
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.subsec_nanos() ^ std::process::id()
}

#[test]
fn redis() {
    let server = RedisServer::start().expect("redis");
    let dir = tempfile::tempdir().expect("tmp");
    exclusion(&server.url(), dir.path());
}

#[test]
fn redis_lost_lock_stops_the_command() {
    let server = RedisServer::start().expect("redis");
    let url = server.url();
    let child = distlock(&url)
        .args([
            "run",
            "--ttl",
            "1s",
            "--kill-grace",
            "1s",
            "doomed",
            "--",
            "sleep",
            "30",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(500));
    // Redis keeps nothing across this restart: the lease is gone, the renewer
    // finds out, and the command is stopped.
    server.restart().expect("restart");
    let start = Instant::now();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(code(&out), 76, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn etcd() {
    let server = EtcdServer::start().expect("etcd");
    let dir = tempfile::tempdir().expect("tmp");
    exclusion(&server.url().replace("http://", "etcd://"), dir.path());
}

#[test]
fn consul() {
    let server = ConsulServer::start().expect("consul");
    let dir = tempfile::tempdir().expect("tmp");
    exclusion(&server.url().replace("http://", "consul://"), dir.path());
}

#[test]
fn postgres_both_modes() {
    let server = PostgresServer::start().expect("postgres");
    let url = server.url();
    let sep = if url.contains('?') { '&' } else { '?' };
    let dir = tempfile::tempdir().expect("tmp");
    exclusion(&url, dir.path());
    let dir = tempfile::tempdir().expect("tmp");
    exclusion(&format!("{url}{sep}distlock_mode=advisory"), dir.path());
}

#[test]
fn bad_input_gets_clear_exit_codes() {
    let out = run("carrier-pigeon://coop", &["run", "k", "--", "true"]);
    assert_eq!(code(&out), 78, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));
    let out = run("memory://", &["run", "", "--", "true"]);
    assert_eq!(code(&out), 78, "{out:?}");
    let out = run("memory://", &["run", "--wait", "soon", "k", "--", "true"]);
    assert_eq!(code(&out), 78, "{out:?}");
    // Nothing listens on port 1: unreachable, quickly, and the password is not printed.
    let start = Instant::now();
    let out = run(
        "redis://user:hunter2@127.0.0.1:1/?connect_timeout=1s",
        &["run", "k", "--", "true"],
    );
    assert_eq!(code(&out), 69, "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"));
    assert!(start.elapsed() < Duration::from_secs(10));
}
