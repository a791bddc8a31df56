//! Real servers on demand for distlock's tests and benches.
//!
//! Every backend is tested against the real server, not a mock: a lock is only as good as
//! the server behaviour it relies on (TTL rounding, lease survival across restarts, session
//! lock-delay, fsync cost). This crate starts Redis, PostgreSQL 15, etcd 3.5 and Consul 1.8.7
//! as child processes on free loopback ports in unique temporary folders, waits until each
//! really answers its protocol, and gives tests the controls that fault injection needs:
//! kill, restart on the same ports and data, pause/resume, and a TCP proxy that delays,
//! partitions or cuts connections.
//!
//! # Quick start
//!
//! ```no_run
//! use server_harness::{RedisServer, Server, TcpProxy};
//!
//! # fn main() -> server_harness::Result<()> {
//! let redis = RedisServer::start()?;              // plain, no persistence
//! let proxy = TcpProxy::start(redis.addr())?;     // clients connect to proxy.addr()
//! proxy.blackhole();                              // partition: requests time out
//! proxy.heal();
//! redis.restart()?;                               // same port, empty data
//! # Ok(()) }
//! ```
//!
//! | type | constructors | URL (`url()`) | credentials / TLS |
//! |---|---|---|---|
//! | [`RedisServer`] | `start`, `start_secure`, `start_many(n)`, `start_with(RedisConfig)` | `redis://127.0.0.1:P/`, secure `rediss://distlock:PW@127.0.0.1:P/` | `username()`, `password()`, `tls()` |
//! | [`PostgresServer`] | `start`, `start_secure`, `start_with(PostgresConfig)` | `postgres://postgres@127.0.0.1:P/postgres`, secure adds `:PW` and `?sslmode=verify-full&sslrootcert=CA` | `user()`, `password()`, `tls()`, `psql(sql)` |
//! | [`EtcdServer`] | `start`, `start_cluster(n)`, `start_secure`, `start_with(EtcdConfig)` | `http://127.0.0.1:P` (`https` when secure); `endpoints()` | `credentials()` = `("root", PW)`, `tls()`, `etcdctl_command()` |
//! | [`ConsulServer`] | `start` (`-dev`), `start_cluster(n)`, `start_secure`, `start_with(ConsulConfig)` | `http://127.0.0.1:P` (`https` when secure); `urls()` | `token()` (ACL master), `tls()` |
//! | [`TcpProxy`] | `start(upstream)` | `addr()` | — |
//!
//! # Using it from async (tokio) tests
//!
//! The API is synchronous (blocking), so it works the same from `#[test]`, criterion and
//! xtask. In a `#[tokio::test]`, starting a server before the first `.await` is fine. Fault
//! controls called while tasks run should not block the runtime thread: wrap the server in an
//! `Arc` and call them via `tokio::task::spawn_blocking`, or use
//! `#[tokio::test(flavor = "multi_thread")]` and `tokio::task::block_in_place`:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use server_harness::{PostgresServer, Server};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pg = Arc::new(PostgresServer::start()?);
//! let pg2 = pg.clone();
//! tokio::task::spawn_blocking(move || pg2.restart()).await??;
//! # Ok(()) }
//! ```
//!
//! # Binaries
//!
//! Nothing is downloaded at test time. `cargo xtask install` (see [`install`]) puts the
//! binaries in place; the harness then finds them in this order (first match wins):
//!
//! 1. the override variable, which must then be valid: `DISTLOCK_REDIS_SERVER`,
//!    `DISTLOCK_ETCD`, `DISTLOCK_ETCDCTL`, `DISTLOCK_CONSUL` (files) and
//!    `DISTLOCK_PG_BIN_DIR` (a folder with `initdb` and `postgres`);
//! 2. the project's `.servers/` folder (`<workspace root>/.servers/usr/bin/...`, or
//!    `DISTLOCK_SERVERS_DIR`), where `cargo xtask install` unpacks etcd and Consul;
//! 3. for PostgreSQL, `/usr/lib/postgresql/15/bin`; for the others, `PATH`;
//! 4. for PostgreSQL, the folder of `initdb` on `PATH`; for the others, `/usr/bin`.
//!
//! A binary that is missing is an [`Error::BinaryNotFound`] naming the binary, the variable
//! and `cargo xtask install`: a test fails loudly, it is never skipped. See [`Binary`].
//!
//! # Isolation and cleanup
//!
//! * **Ports**: random ports in 15000–32699 (below Linux's ephemeral range), each held by
//!   an exclusive `flock` on `$TMPDIR/distlock-harness-ports/<port>.lock` for the server's
//!   lifetime, so parallel tests and parallel test binaries never pick the same port. The
//!   lock dies with the process. If some unrelated program grabs a port between the check and
//!   the bind, the whole start is retried with new ports (up to 3 times).
//! * **Folders**: each server gets `$TMPDIR/distlock-<kind>-XXXXXX` (tempfile), removed on drop.
//! * **Processes**: each server runs in its own process group; stop = `SIGKILL` to the group.
//!   Dropping a server (also during a panic) kills and reaps it. A small `sh` watcher per
//!   process kills the group and removes the folder if the test process dies without
//!   unwinding (`SIGKILL`, abort, Ctrl-C). No `unsafe`, no `prctl`.
//! * **Root**: PostgreSQL refuses to run as root; when the tests run as root the harness runs
//!   it as the `postgres` user (or creates a `distlock-pg` system user).
//!
//! # Start-up times
//!
//! Measured on the 2-core development machine (debug build, warm page cache, started one
//! after another, until each answers its protocol probe), three runs:
//!
//! | server | start-up |
//! |---|---|
//! | Redis | 20–45 ms |
//! | PostgreSQL (`initdb --no-sync` + start) | 0.9–1.5 s |
//! | etcd, one member (until `/health` is true, i.e. it has elected itself) | 0.2–0.8 s |
//! | Consul `-dev` (until it has a leader and its node is registered) | 0.13–0.19 s |
//! | **all four** | **1.9–2.1 s** |
//! | etcd, 3 members | 0.3–2.3 s |
//! | Consul, 3 servers (`raft_multiplier = 1`) | 1.2–1.7 s |
//!
//! `cargo test -p server-harness --test startup -- --nocapture --test-threads=1` measures
//! them on your machine (and fails if the four take 10 s or more).
//!
//! # Versions and servers' own limits
//!
//! Consul's assumptions (session TTL minimum lowered to 1 s, default lock-delay still 15 s,
//! `-dev` agents restart empty) are listed in [`consul`]. etcd rounds a 1 s lease up to 2 s.
//! Redis runs without persistence, so a restart loses every key. PostgreSQL keeps
//! `fsync=on` unless [`PostgresConfig::fsync`] is turned off.

pub mod binaries;
pub mod consul;
mod error;
pub mod etcd;
pub mod install;
mod managed;
pub mod postgres;
pub mod probe;
mod process;
pub mod proxy;
pub mod redis;
mod tls;
mod util;

pub use binaries::{Binary, servers_dir, workspace_root};
pub use consul::{ConsulConfig, ConsulMember, ConsulServer};
pub use error::{Error, Result};
pub use etcd::{EtcdConfig, EtcdMember, EtcdServer};
pub use managed::Server;
pub use postgres::{PostgresConfig, PostgresServer};
pub use proxy::TcpProxy;
pub use redis::{RedisConfig, RedisServer};
pub use tls::TlsFiles;

/// Sends a signal to a process group with the `kill` command (`KILL`, `STOP`, `CONT`, `0`).
///
/// For tools that manage detached servers (`cargo xtask servers down`).
pub fn signal_process_group(pgid: u32, signal: &str) -> Result<()> {
    process::signal_group(pgid, signal)
}

/// Whether any live (non-zombie) process belongs to process group `pgid`.
pub fn process_group_alive(pgid: u32) -> bool {
    process::group_alive(pgid)
}
