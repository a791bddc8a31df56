//! PostgreSQL: starts, answers SQL, data survives a kill + restart, pause, secure variant.

use std::time::Duration;

use server_harness::{PostgresServer, Server};

#[test]
fn postgres_answers_and_keeps_data_across_restart() {
    let pg = PostgresServer::start().expect("start postgres");
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .unwrap();
    assert_eq!(pg.psql("SHOW fsync").unwrap(), "on");

    let port = pg.port();
    pg.stop().unwrap();
    assert!(pg.psql("SELECT 1").is_err());
    pg.restart().unwrap();
    assert_eq!(pg.port(), port);
    assert_eq!(pg.psql("SELECT x FROM t").unwrap(), "42");
}

#[test]
fn paused_postgres_times_out_then_recovers() {
    let pg = PostgresServer::start().expect("start postgres");
    pg.pause().unwrap();
    let mut cmd = std::process::Command::new(pg.bin_dir().join("pg_isready"));
    cmd.args(["-h", "127.0.0.1", "-p", &pg.port().to_string(), "-t", "1"]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "paused server looked ready: {out:?}");
    pg.resume().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if cmd.output().unwrap().status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery after resume"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(pg.psql("SELECT 1").unwrap(), "1");
}

#[test]
fn secure_postgres_needs_password_and_speaks_tls() {
    let pg = PostgresServer::start_secure().expect("start secure postgres");
    let password = pg.password().expect("password").to_string();
    let tls = pg.tls().expect("tls");
    assert!(pg.url().contains(&format!(":{password}@")));
    assert!(pg.url().contains("sslmode=verify-full"));
    // psql with the full URL verifies the certificate against our CA and uses SCRAM.
    assert_eq!(
        pg.psql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .unwrap(),
        "t"
    );
    assert_eq!(
        pg.psql("SHOW password_encryption").unwrap(),
        "scram-sha-256"
    );
    // Without the password, TCP connections are refused.
    let out = std::process::Command::new(pg.bin_dir().join("psql"))
        .arg("-X")
        .arg("-w")
        .arg(format!(
            "postgres://postgres:wrong@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg.port(),
            tls.ca_cert.display()
        ))
        .args(["-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("password authentication failed"), "{err}");
}

/// PostgreSQL's backends run in their own sessions (`setsid`); pausing must
/// freeze a connection that is already open too, not only new ones.
#[test]
fn pause_freezes_open_connections() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::sync::mpsc;

    let pg = PostgresServer::start().expect("start postgres");
    let mut psql = std::process::Command::new(pg.bin_dir().join("psql"))
        .args(["-X", "-A", "-t", "-q", &pg.url()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = BufReader::new(psql.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    writeln!(stdin, "SELECT 1;").unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "1");

    pg.pause().unwrap();
    writeln!(stdin, "SELECT 2;").unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(700)).is_err(),
        "an open connection answered while the server was paused"
    );
    pg.resume().unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "2");
    drop(stdin);
    let _ = psql.wait();
}
