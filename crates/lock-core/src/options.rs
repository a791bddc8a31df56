//! How to take a lock: lease length, how long to wait, renewal, fairness.
//!
//! Options are plain data with a builder and a text form (`ttl=30s,wait=5s`)
//! for URLs and command lines. They are checked against the backend's
//! [`Capabilities`](crate::Capabilities) when a lock is requested, so a TTL a
//! store cannot honour is an error before anything is sent.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;

use crate::capabilities::Capabilities;
use crate::error::{Error, Result};

/// How long `lock` may wait for a busy key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Do not wait: one attempt.
    No,
    /// Wait up to this long.
    For(Duration),
    /// Wait until this instant.
    Until(Instant),
    /// Wait as long as it takes.
    Forever,
}

impl Wait {
    /// The deadline this wait implies, counted from `start`.
    pub fn deadline(self, start: Instant) -> Option<Instant> {
        match self {
            Wait::No => Some(start),
            Wait::For(d) => Some(start.checked_add(d).unwrap_or_else(far_future)),
            Wait::Until(t) => Some(t),
            Wait::Forever => None,
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

/// Options for one lock request.
///
/// ```
/// use std::time::Duration;
/// use lock_core::{LockOptions, Wait};
///
/// let opts = LockOptions::new()
///     .ttl(Duration::from_secs(10))
///     .wait(Wait::For(Duration::from_secs(2)))
///     .max_hold(Duration::from_secs(60));
/// assert_eq!(opts, "ttl=10s,wait=2s,max_hold=1m".parse()?);
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockOptions {
    /// Lease length. Default 30 s.
    pub ttl: Duration,
    /// How long to wait for a busy key. Default [`Wait::Forever`].
    pub wait: Wait,
    /// Renew the lease in the background while the guard lives. Default on.
    pub auto_renew: bool,
    /// Stop renewing after this long, so a stuck holder cannot keep the lock
    /// for ever. Default none.
    pub max_hold: Option<Duration>,
    /// First come, first served (backends with FIFO support only). Default
    /// off.
    pub fair: bool,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            ttl: Duration::from_secs(30),
            wait: Wait::Forever,
            auto_renew: true,
            max_hold: None,
            fair: false,
        }
    }
}

impl LockOptions {
    /// The defaults: 30 s TTL, wait forever, auto-renew on, no max hold, not
    /// fair.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the lease length.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets how long to wait.
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Turns background renewal on or off.
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.auto_renew = on;
        self
    }

    /// Sets the maximum hold time.
    pub fn max_hold(mut self, max: Duration) -> Self {
        self.max_hold = Some(max);
        self
    }

    /// Turns fair (FIFO) mode on or off.
    pub fn fair(mut self, on: bool) -> Self {
        self.fair = on;
        self
    }

    /// Checks the options against a backend's limits.
    pub fn validate(&self, caps: &Capabilities) -> Result<()> {
        check_ttl(self.ttl, caps)?;
        if self.max_hold.is_some_and(|max| max.is_zero()) {
            return Err(Error::invalid_options("max_hold must be greater than zero"));
        }
        if self.fair && !caps.fifo.is_supported() {
            return Err(Error::Unsupported {
                backend: caps.backend,
                what: format!("fair (FIFO) mode: {}", caps.fifo.reason().unwrap_or("")),
            });
        }
        Ok(())
    }
}

/// Checks a TTL against a backend's limits.
pub(crate) fn check_ttl(ttl: Duration, caps: &Capabilities) -> Result<()> {
    if ttl < caps.min_ttl || ttl > caps.max_ttl || ttl.is_zero() {
        return Err(Error::invalid_options(format!(
            "ttl {} is outside {}'s range {} to {}",
            humantime::format_duration(ttl),
            caps.backend,
            humantime::format_duration(caps.min_ttl),
            humantime::format_duration(caps.max_ttl),
        )));
    }
    Ok(())
}

/// The text form: comma- or `&`-separated `name=value` pairs.
///
/// | name | value | example |
/// |---|---|---|
/// | `ttl` | a duration | `ttl=30s` |
/// | `wait` | `no`, `forever` or a duration | `wait=500ms` |
/// | `auto_renew` | `true` / `false` | `auto_renew=false` |
/// | `max_hold` | a duration or `none` | `max_hold=10m` |
/// | `fair` | `true` / `false` | `fair=true` |
///
/// Durations use humantime (`250ms`, `10s`, `1m 30s`). Unknown names,
/// repeated names and bad values are errors.
impl FromStr for LockOptions {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let pairs = s
            .split([',', '&'])
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').ok_or(p));
        let mut opts = LockOptions::default();
        let mut seen: Vec<&str> = Vec::new();
        for pair in pairs {
            let (name, value) = pair
                .map_err(|p| Error::invalid_options(format!("expected name=value, got {p:?}")))?;
            let (name, value) = (name.trim(), value.trim());
            if seen.contains(&name) {
                return Err(Error::invalid_options(format!("{name} is given twice")));
            }
            seen.push(name);
            opts.set(name, value)?;
        }
        Ok(opts)
    }
}

impl LockOptions {
    /// Sets one option from its text form (see the [`FromStr`] impl).
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        match name {
            "ttl" => self.ttl = parse_duration(name, value)?,
            "wait" => {
                self.wait = match value {
                    "no" | "none" | "0" => Wait::No,
                    "forever" => Wait::Forever,
                    _ => Wait::For(parse_duration(name, value)?),
                }
            }
            "auto_renew" => self.auto_renew = parse_bool(name, value)?,
            "max_hold" => {
                self.max_hold = match value {
                    "none" => None,
                    _ => Some(parse_duration(name, value)?),
                }
            }
            "fair" => self.fair = parse_bool(name, value)?,
            _ => {
                return Err(Error::invalid_options(format!(
                    "unknown option {name:?} (known: ttl, wait, auto_renew, max_hold, fair)"
                )));
            }
        }
        Ok(())
    }
}

fn parse_duration(name: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value)
        .map_err(|e| Error::invalid_options(format!("{name}: {value:?} is not a duration ({e})")))
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "on" | "1" | "yes" => Ok(true),
        "false" | "off" | "0" | "no" => Ok(false),
        _ => Err(Error::invalid_options(format!(
            "{name}: {value:?} is not true or false"
        ))),
    }
}

impl fmt::Display for LockOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ttl={}", humantime::format_duration(self.ttl))?;
        match self.wait {
            Wait::No => f.write_str(",wait=no")?,
            Wait::Forever => f.write_str(",wait=forever")?,
            Wait::For(d) => write!(f, ",wait={}", humantime::format_duration(d))?,
            Wait::Until(t) => write!(
                f,
                ",wait={}",
                humantime::format_duration(t.saturating_duration_since(Instant::now()))
            )?,
        }
        write!(f, ",auto_renew={}", self.auto_renew)?;
        if let Some(m) = self.max_hold {
            write!(f, ",max_hold={}", humantime::format_duration(m))?;
        }
        write!(f, ",fair={}", self.fair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::Support;
    use proptest::prelude::*;

    #[test]
    fn parses_every_option() {
        let o: LockOptions = "ttl=1m, wait=forever, auto_renew=off, max_hold=2h, fair=true"
            .parse()
            .unwrap();
        assert_eq!(o.ttl, Duration::from_secs(60));
        assert_eq!(o.wait, Wait::Forever);
        assert!(!o.auto_renew);
        assert_eq!(o.max_hold, Some(Duration::from_secs(7200)));
        assert!(o.fair);
        assert_eq!("wait=no".parse::<LockOptions>().unwrap().wait, Wait::No);
        assert_eq!("".parse::<LockOptions>().unwrap(), LockOptions::default());
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "ttl",
            "ttl=ten",
            "colour=red",
            "ttl=1s,ttl=2s",
            "fair=maybe",
            "wait=-1s",
        ] {
            let err = bad.parse::<LockOptions>().unwrap_err();
            assert!(matches!(err, Error::InvalidOptions { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn validates_against_capabilities() {
        let caps = Capabilities::new("test")
            .ttl_range(Duration::from_secs(1), Duration::from_secs(10))
            .fifo(Support::No("no queue"));
        assert!(
            LockOptions::new()
                .ttl(Duration::from_secs(5))
                .validate(&caps)
                .is_ok()
        );
        for ttl in [
            Duration::ZERO,
            Duration::from_millis(999),
            Duration::from_secs(11),
        ] {
            let err = LockOptions::new().ttl(ttl).validate(&caps).unwrap_err();
            assert!(matches!(err, Error::InvalidOptions { .. }));
        }
        let err = LockOptions::new()
            .ttl(Duration::from_secs(5))
            .fair(true)
            .validate(&caps);
        assert!(matches!(err, Err(Error::Unsupported { .. })));
    }

    proptest! {
        #[test]
        fn display_round_trips(ttl_ms in 1u64..10_000_000, wait_ms in proptest::option::of(0u64..1_000_000),
                               renew: bool, hold in proptest::option::of(1u64..1_000_000), fair: bool) {
            let mut o = LockOptions::new().ttl(Duration::from_millis(ttl_ms)).auto_renew(renew).fair(fair);
            o.wait = match wait_ms { None => Wait::Forever, Some(0) => Wait::No, Some(ms) => Wait::For(Duration::from_millis(ms)) };
            if let Some(h) = hold { o = o.max_hold(Duration::from_millis(h)); }
            let back: LockOptions = o.to_string().parse().unwrap();
            prop_assert_eq!(back, o);
        }
    }
}
