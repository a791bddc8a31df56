//! Small shared pieces: randomness, free ports, log tails, users, folders.

use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

/// The loopback address every server listens on.
pub(crate) const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A random 64-bit number.
///
/// `RandomState` is seeded from the operating system's random source, which is good enough for
/// test passwords, tokens and port picks, and needs no extra dependency.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = SystemTime::now().duration_since(UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    h.finish()
}

/// A random alphanumeric string of `len` characters (URL-safe, shell-safe).
pub(crate) fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut r = random_u64();
        for _ in 0..10 {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[(r % ALPHABET.len() as u64) as usize]));
            r /= ALPHABET.len() as u64;
        }
    }
    out
}

/// Lowest port handed out. Below the Linux ephemeral range (32768-60999) so that the
/// kernel's own picks for outgoing connections never take a port we reserved.
const PORT_MIN: u16 = 15_000;
/// Highest port handed out (exclusive).
const PORT_MAX: u16 = 32_700;

/// A loopback port reserved for this process.
///
/// Picking a port by binding port 0 and closing it is racy across processes: two test binaries
/// can be handed the same port. The harness instead picks a random port in
/// `15000..32700` and takes an exclusive `flock` on `$TMPDIR/distlock-harness-ports/<port>.lock`
/// for as long as the server lives (a restart reuses it). Other harness processes skip locked
/// ports; the kernel drops the lock if the process dies, so nothing goes stale. The port must
/// also be bindable right now. A foreign process can still take the port between the check and
/// the server's bind: servers that fail to bind are retried with new ports.
#[derive(Debug)]
pub(crate) struct PortLease {
    port: u16,
    _lock: File,
}

impl PortLease {
    pub(crate) fn port(&self) -> u16 {
        self.port
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("distlock-harness-ports")
}

/// Reserves one free loopback port.
pub(crate) fn reserve_port() -> Result<PortLease> {
    let dir = lock_dir();
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    // Let other users' test runs share the folder; ignore failures (it may not be ours).
    let _ = fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777));
    const ATTEMPTS: u32 = 200;
    for _ in 0..ATTEMPTS {
        let span = u64::from(PORT_MAX - PORT_MIN);
        let port = PORT_MIN + (random_u64() % span) as u16;
        let path = dir.join(format!("{port}.lock"));
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(SocketAddr::from((LOCALHOST, port))).is_err() {
            continue;
        }
        return Ok(PortLease { port, _lock: file });
    }
    Err(Error::NoFreePort { attempts: ATTEMPTS })
}

/// Reserves `n` distinct free loopback ports.
pub(crate) fn reserve_ports(n: usize) -> Result<Vec<PortLease>> {
    (0..n).map(|_| reserve_port()).collect()
}

/// The last `lines` lines of a log file (at most 64 KiB are read), or a note why not.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    let tail = all[from..].join("\n");
    if tail.is_empty() {
        format!("(log {} is empty)", path.display())
    } else {
        tail
    }
}

/// Whether this process runs as root (uid 0), read from `/proc/self/status`.
pub(crate) fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A local user: name, uid, gid.
#[derive(Debug, Clone)]
pub(crate) struct UserIds {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Looks a user up in `/etc/passwd`.
pub(crate) fn lookup_user(name: &str) -> Option<UserIds> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut parts = line.split(':');
        let user = parts.next()?;
        if user != name {
            return None;
        }
        let _pw = parts.next()?;
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        Some(UserIds {
            name: user.to_string(),
            uid,
            gid,
        })
    })
}

/// Recursively hands `path` to `user` (std's safe `chown`).
pub(crate) fn chown_tree(path: &Path, user: &UserIds) -> Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .ctx(|| format!("chown {} to {}", path.display(), user.name))?;
    if path.is_dir() && !path.is_symlink() {
        for entry in fs::read_dir(path).ctx(|| format!("reading {}", path.display()))? {
            let entry = entry.ctx(|| format!("reading {}", path.display()))?;
            chown_tree(&entry.path(), user)?;
        }
    }
    Ok(())
}

/// Creates a unique temporary folder `distlock-<kind>-XXXXXX` under the system temp dir.
pub(crate) fn temp_dir(kind: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("distlock-{kind}-"))
        .tempdir()
        .ctx(|| format!("creating a temporary folder for {kind}"))
}

/// Writes a file, with context on error.
pub(crate) fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    fs::write(path, contents).ctx(|| format!("writing {}", path.display()))
}

/// Sets a file's Unix permission bits.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .ctx(|| format!("chmod {mode:o} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_alphanumeric_and_distinct() {
        let a = random_token(24);
        let b = random_token(24);
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn reserved_ports_are_distinct_and_in_range() {
        let leases = reserve_ports(20).expect("ports");
        let mut ports: Vec<u16> = leases.iter().map(PortLease::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 20);
        assert!(ports.iter().all(|p| (PORT_MIN..PORT_MAX).contains(p)));
    }
}
