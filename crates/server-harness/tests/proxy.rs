//! The fault-injecting proxy in front of a real Redis: delay, blackhole, heal, cut.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use server_harness::probe::redis_command;
use server_harness::{RedisServer, TcpProxy};

fn ping_on(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

#[test]
fn proxy_forwards_and_delays() {
    let redis = RedisServer::start().expect("redis");
    let proxy = TcpProxy::start(redis.addr()).expect("proxy");
    assert_eq!(proxy.upstream(), redis.addr());
    let t = Duration::from_secs(2);
    assert_eq!(redis_command(proxy.addr(), &["PING"], t).unwrap(), "+PONG");

    proxy.set_delay(Duration::from_millis(150));
    let started = Instant::now();
    assert_eq!(redis_command(proxy.addr(), &["PING"], t).unwrap(), "+PONG");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "round trip took only {took:?}"
    );
    proxy.set_delay(Duration::ZERO);
    let started = Instant::now();
    assert_eq!(redis_command(proxy.addr(), &["PING"], t).unwrap(), "+PONG");
    assert!(started.elapsed() < Duration::from_millis(150));
}

#[test]
fn blackhole_times_out_and_heal_delivers() {
    let redis = RedisServer::start().expect("redis");
    let proxy = TcpProxy::start(redis.addr()).expect("proxy");
    let mut conn = TcpStream::connect(proxy.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert_eq!(ping_on(&mut conn).unwrap(), "+PONG");

    proxy.blackhole();
    assert!(proxy.is_blackholed());
    let err = ping_on(&mut conn).expect_err("blackholed connection answered");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{err:?}"
    );
    // New connections are accepted but get nothing either.
    let fresh = redis_command(proxy.addr(), &["PING"], Duration::from_millis(300));
    assert!(
        fresh.is_err(),
        "new connection answered during blackhole: {fresh:?}"
    );

    proxy.heal();
    // The held PING is delivered on heal; its answer arrives late.
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "+PONG");
    assert_eq!(
        redis_command(proxy.addr(), &["PING"], Duration::from_secs(2)).unwrap(),
        "+PONG"
    );
}

#[test]
fn cut_closes_current_connections_only() {
    let redis = RedisServer::start().expect("redis");
    let proxy = TcpProxy::start(redis.addr()).expect("proxy");
    let mut conn = TcpStream::connect(proxy.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(ping_on(&mut conn).unwrap(), "+PONG");
    assert_eq!(proxy.open_connections(), 1);

    proxy.cut();
    assert!(ping_on(&mut conn).is_err(), "cut connection still works");
    assert_eq!(
        redis_command(proxy.addr(), &["PING"], Duration::from_secs(2)).unwrap(),
        "+PONG"
    );
    assert!(proxy.accepted_connections() >= 2);
}
