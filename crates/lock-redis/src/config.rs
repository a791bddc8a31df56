//! Typed configuration, built in code or parsed from a URL.
//!
//! Two modes share one config type: a **single** Redis server (`redis://`,
//! `rediss://`) and **Redlock** over independent masters (`redlock://`,
//! `redlocks://`). The URL form exists so that a service can take its lock
//! store from one environment variable; every query parameter is documented
//! on [`RedisConfig::from_url`] and an unknown one is an error, so a typo
//! never silently falls back to a default.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lock_core::{Error, Result};

use crate::BACKEND;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "distlock:";

/// One Redis server: host and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl NodeAddr {
    /// A server address.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        NodeAddr {
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Single server or Redlock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One Redis server (a primary; see the crate docs on failover).
    Single,
    /// Redlock over N independent masters (N = 3, 5, ... odd is best):
    /// a lock is held when a majority granted it.
    Redlock,
}

/// How to reach Redis and how to name the lock keys.
///
/// ```
/// use std::time::Duration;
/// use lock_redis::RedisConfig;
///
/// let cfg = RedisConfig::single("127.0.0.1", 6379)
///     .credentials("app", "s3cret")
///     .prefix("billing:")
///     .connect_timeout(Duration::from_secs(1));
/// assert!(!format!("{cfg:?}").contains("s3cret"));
///
/// let same: RedisConfig = "redis://app:s3cret@127.0.0.1:6379/0?prefix=billing:&connect_timeout=1s".parse()?;
/// assert_eq!(cfg, same);
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub(crate) mode: Mode,
    pub(crate) nodes: Vec<NodeAddr>,
    pub(crate) tls: bool,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) db: i64,
    pub(crate) prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) fence_retention: Option<Duration>,
}

impl RedisConfig {
    fn with(mode: Mode, nodes: Vec<NodeAddr>) -> Self {
        RedisConfig {
            mode,
            nodes,
            tls: false,
            ca_file: None,
            username: None,
            password: None,
            db: 0,
            prefix: DEFAULT_PREFIX.to_string(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_millis(500),
            fence_retention: Some(Duration::from_secs(7 * 86_400)),
        }
    }

    /// One Redis server.
    pub fn single(host: impl Into<String>, port: u16) -> Self {
        Self::with(Mode::Single, vec![NodeAddr::new(host, port)])
    }

    /// Redlock over independent masters (at least 3 for any fault tolerance).
    pub fn redlock(nodes: impl IntoIterator<Item = NodeAddr>) -> Self {
        Self::with(Mode::Redlock, nodes.into_iter().collect())
    }

    /// Use TLS (`rediss://`); the server certificate is checked against the
    /// system's roots, or against [`ca_file`](Self::ca_file) if set.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Trust this PEM file's certificates (instead of the system roots).
    /// Turns TLS on.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self.tls = true;
        self
    }

    /// ACL user and password (`AUTH user pass`).
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.username = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// Password for the `default` user (`AUTH pass`).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.username = None;
        self.password = Some(password.into());
        self
    }

    /// Database number (default 0).
    pub fn db(mut self, db: i64) -> Self {
        self.db = db;
        self
    }

    /// Prefix of every key and channel this backend uses (default
    /// `distlock:`). Must not contain `{` or `}`, which would break the hash
    /// tag that keeps one lock's keys in one cluster slot.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one connection attempt may take (default 2 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// How long one request may wait for its answer (default 500 ms). In
    /// Redlock mode the per-master timeout is also kept small against the
    /// TTL (a fifth of it, at least 10 ms).
    pub fn response_timeout(mut self, d: Duration) -> Self {
        self.response_timeout = d;
        self
    }

    /// How long the per-key fencing counter is kept after the last grant
    /// (default 7 days; `None`: for ever). See the crate docs: the counter
    /// only guards against the server clock stepping back by up to this
    /// much; without it tokens still come from the server's clock.
    pub fn fence_retention(mut self, d: Option<Duration>) -> Self {
        self.fence_retention = d;
        self
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The servers.
    pub fn nodes(&self) -> &[NodeAddr] {
        &self.nodes
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Checks the settings for consistency.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::config(BACKEND, m));
        if self.nodes.is_empty() {
            return bad("no Redis server given".into());
        }
        if self.mode == Mode::Single && self.nodes.len() != 1 {
            return bad(
                "a single-server config takes exactly one host (use redlock:// for several)".into(),
            );
        }
        if self.mode == Mode::Redlock && self.nodes.len() < 2 {
            return bad("Redlock needs at least 2 masters (3 or 5 to tolerate failures)".into());
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if n.host.is_empty() {
                return bad(format!("server {} has an empty host", i + 1));
            }
            if n.port == 0 {
                return bad(format!("server {n} has port 0"));
            }
            if self.nodes[..i].contains(n) {
                return bad(format!("server {n} is listed twice"));
            }
        }
        if self.prefix.contains(['{', '}']) {
            return bad(format!(
                "prefix {:?} must not contain '{{' or '}}' (they would change the cluster hash tag)",
                self.prefix
            ));
        }
        if self.prefix.chars().any(char::is_control) {
            return bad("prefix must not contain control characters".into());
        }
        if self.db < 0 {
            return bad(format!("database number {} is negative", self.db));
        }
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return bad("timeouts must be greater than zero".into());
        }
        if self
            .fence_retention
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return bad("fence_retention must be at least 1s (or none)".into());
        }
        if self.ca_file.is_some() && !self.tls {
            return bad("ca_file needs TLS (rediss:// or redlocks://)".into());
        }
        if self.username.is_some() && self.password.is_none() {
            return bad("a user name needs a password".into());
        }
        Ok(())
    }

    /// Parses a URL.
    ///
    /// ```text
    /// redis://[[user]:password@]host[:port][/db][?param=value&...]
    /// rediss://...                                  (TLS)
    /// redlock://[[user]:password@]host1:port1,host2:port2,host3:port3[/db][?...]
    /// redlocks://...                                (Redlock over TLS)
    /// ```
    ///
    /// The port defaults to 6379. User and password are percent-decoded and
    /// apply to every master. Query parameters:
    ///
    /// | parameter | value | default |
    /// |---|---|---|
    /// | `prefix` | key and channel prefix, no `{` `}` | `distlock:` |
    /// | `connect_timeout` | duration (`250ms`, `2s`) | `2s` |
    /// | `response_timeout` | duration | `500ms` |
    /// | `ca_file` | path of a PEM CA bundle to trust (TLS only) | system roots |
    /// | `fence_retention` | duration, or `forever` | `7days` |
    ///
    /// Unknown parameters, repeated parameters and bad values are
    /// [`Error::Config`].
    pub fn from_url(url: &str) -> Result<Self> {
        parse_url(url)
    }
}

impl FromStr for RedisConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_url(s)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field("nodes", &self.nodes)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("fence_retention", &self.fence_retention)
            .finish()
    }
}

/// The URL form, with the password replaced by `***`.
impl fmt::Display for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match (self.mode, self.tls) {
            (Mode::Single, false) => "redis",
            (Mode::Single, true) => "rediss",
            (Mode::Redlock, false) => "redlock",
            (Mode::Redlock, true) => "redlocks",
        };
        write!(f, "{scheme}://")?;
        match (&self.username, &self.password) {
            (Some(u), _) => write!(f, "{u}:***@")?,
            (None, Some(_)) => f.write_str(":***@")?,
            (None, None) => {}
        }
        let hosts: Vec<String> = self.nodes.iter().map(ToString::to_string).collect();
        write!(f, "{}/{}?prefix={}", hosts.join(","), self.db, self.prefix)
    }
}

fn parse_url(input: &str) -> Result<RedisConfig> {
    let bad = |m: String| Error::config(BACKEND, m);
    let (scheme, rest) = input
        .split_once("://")
        .ok_or_else(|| bad("expected a URL such as redis://host:6379".into()))?;
    let (mode, tls) = match scheme.to_ascii_lowercase().as_str() {
        "redis" => (Mode::Single, false),
        "rediss" => (Mode::Single, true),
        "redlock" => (Mode::Redlock, false),
        "redlocks" => (Mode::Redlock, true),
        other => {
            return Err(bad(format!(
                "unknown scheme {other:?} (expected redis, rediss, redlock or redlocks)"
            )));
        }
    };
    // The authority ends at the first '/', '?' or '#'; user info ends at its
    // last '@' (a password may contain '@' only percent-encoded, but be kind).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    if hosts.is_empty() {
        return Err(bad("the URL names no host".into()));
    }
    let host_list: Vec<&str> = hosts.split(',').collect();
    if mode == Mode::Single && host_list.len() > 1 {
        return Err(bad(
            "redis:// takes one host; use redlock://h1:p1,h2:p2,h3:p3 for Redlock".into(),
        ));
    }
    // Each host and the rest of the URL are parsed by the `url` crate, so
    // percent-decoding, IPv6 brackets and ports follow the URL standard.
    let mut nodes = Vec::with_capacity(host_list.len());
    for h in &host_list {
        let u = url::Url::parse(&format!("redis://{h}"))
            .map_err(|e| bad(format!("bad host {h:?}: {e}")))?;
        if u.path() != "" && u.path() != "/" {
            return Err(bad(format!("bad host {h:?}")));
        }
        let host = match u.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(other) => other.to_string(),
            None => return Err(bad(format!("bad host {h:?}"))),
        };
        nodes.push(NodeAddr::new(host, u.port().unwrap_or(6379)));
    }
    let first = host_list.first().copied().unwrap_or_default();
    let with_user = match userinfo {
        Some(ui) => format!("redis://{ui}@{first}{tail}"),
        None => format!("redis://{first}{tail}"),
    };
    let u = url::Url::parse(&with_user).map_err(|e| bad(format!("bad URL: {e}")))?;
    let mut cfg = RedisConfig::with(mode, nodes);
    cfg.tls = tls;
    let decode = |s: &str| -> Result<String> {
        url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .ok_or_else(|| bad("bad percent-encoding in user info".into()))
    };
    if !u.username().is_empty() {
        cfg.username = Some(decode(u.username())?);
    }
    if let Some(pw) = u.password() {
        cfg.password = Some(decode(pw)?);
    }
    if u.fragment().is_some() {
        return Err(bad("a URL fragment (#...) is not allowed".into()));
    }
    match u.path().trim_matches('/') {
        "" => {}
        db => {
            cfg.db = db
                .parse()
                .map_err(|_| bad(format!("database {db:?} is not a number")))?;
        }
    }
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in u.query_pairs() {
        if seen.iter().any(|s| *s == name) {
            return Err(bad(format!("query parameter {name:?} is given twice")));
        }
        seen.push(name.to_string());
        let duration = |v: &str| {
            humantime::parse_duration(v)
                .map_err(|e| bad(format!("{name}: {v:?} is not a duration ({e})")))
        };
        match name.as_ref() {
            "prefix" => cfg.prefix = value.into_owned(),
            "connect_timeout" => cfg.connect_timeout = duration(&value)?,
            "response_timeout" => cfg.response_timeout = duration(&value)?,
            "ca_file" => cfg.ca_file = Some(PathBuf::from(value.as_ref())),
            "fence_retention" => {
                cfg.fence_retention = match value.as_ref() {
                    "forever" | "none" => None,
                    v => Some(duration(v)?),
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown query parameter {name:?} (known: prefix, connect_timeout, \
                     response_timeout, ca_file, fence_retention)"
                )));
            }
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single() {
        let c: RedisConfig = "redis://127.0.0.1:7000".parse().unwrap();
        assert_eq!(c.mode, Mode::Single);
        assert_eq!(c.nodes, vec![NodeAddr::new("127.0.0.1", 7000)]);
        assert!(!c.tls && c.password.is_none() && c.db == 0);
        assert_eq!(c.prefix, DEFAULT_PREFIX);

        let c: RedisConfig = "rediss://u%40x:p%2Fw+d@example.com/3?prefix=p:&connect_timeout=250ms&response_timeout=1s&ca_file=/ca.pem&fence_retention=forever"
            .parse()
            .unwrap();
        assert!(c.tls);
        assert_eq!(c.nodes, vec![NodeAddr::new("example.com", 6379)]);
        assert_eq!(c.username.as_deref(), Some("u@x"));
        assert_eq!(c.password.as_deref(), Some("p/w+d"));
        assert_eq!(c.db, 3);
        assert_eq!(c.prefix, "p:");
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.response_timeout, Duration::from_secs(1));
        assert_eq!(c.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(c.fence_retention, None);

        let c: RedisConfig = "redis://:pw@[::1]:7001/".parse().unwrap();
        assert_eq!(c.nodes, vec![NodeAddr::new("::1", 7001)]);
        assert_eq!(c.username, None);
        assert_eq!(c.password.as_deref(), Some("pw"));
    }

    #[test]
    fn parses_redlock() {
        let c: RedisConfig = "redlock://a:1,b:2,[::1]:3?prefix=x:".parse().unwrap();
        assert_eq!(c.mode, Mode::Redlock);
        assert_eq!(
            c.nodes,
            vec![
                NodeAddr::new("a", 1),
                NodeAddr::new("b", 2),
                NodeAddr::new("::1", 3)
            ]
        );
        let c: RedisConfig = "redlocks://u:p@a:1,b:2,c:3/1".parse().unwrap();
        assert!(c.tls);
        assert_eq!(c.db, 1);
        assert_eq!(c.username.as_deref(), Some("u"));
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "",
            "localhost:6379",
            "http://localhost",
            "redis://",
            "redis://h:notaport",
            "redis://h:99999",
            "redis://h:0",
            "redis://a:1,b:2",
            "redlock://a:1",
            "redlock://a:1,a:1,b:2",
            "redlock://a:1,,b:2",
            "redis://h/notadb",
            "redis://h/-1",
            "redis://h?colour=red",
            "redis://h?prefix=a&prefix=b",
            "redis://h?prefix={x}",
            "redis://h?connect_timeout=soon",
            "redis://h?connect_timeout=0s",
            "redis://h?ca_file=/x.pem",
            "redis://h?fence_retention=1ms",
            "redis://h#frag",
            "redis://user@h",
        ] {
            let err = bad.parse::<RedisConfig>().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_never_printed() {
        let c: RedisConfig = "rediss://app:hunter2@h:1?prefix=p:".parse().unwrap();
        for shown in [format!("{c:?}"), c.to_string()] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
        assert_eq!(c.to_string(), "rediss://app:***@h:1/0?prefix=p:");
        let err = "redis://app:hunter2@h?colour=red"
            .parse::<RedisConfig>()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn builder_equals_url() {
        let built = RedisConfig::redlock([NodeAddr::new("a", 1), NodeAddr::new("b", 2)])
            .password("pw")
            .fence_retention(None);
        let parsed: RedisConfig = "redlock://:pw@a:1,b:2?fence_retention=forever"
            .parse()
            .unwrap();
        assert_eq!(built, parsed);
    }
}
