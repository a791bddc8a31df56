//! Helpers shared by the cases: unique keys, TTL choices, and the fenced
//! register that checks mutual exclusion.

use std::sync::Mutex;
use std::time::Duration;

use lock_core::{Capabilities, FencingToken, Key};
use tokio::time::Instant;

/// A key no other case (or earlier run) uses: `conformance-<case>-<random>`.
pub(crate) fn unique_key(case: &str) -> Key {
    let n: u64 = rand::random();
    let name = format!("conformance-{case}-{n:016x}");
    Key::new(&name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A short TTL the backend honours: at least 500 ms, at least its minimum.
pub(crate) fn short_ttl(caps: &Capabilities) -> Duration {
    Duration::from_millis(500)
        .max(caps.min_ttl)
        .min(caps.max_ttl)
}

/// A TTL long enough that expiry never explains a case's outcome.
pub(crate) fn long_ttl(caps: &Capabilities) -> Duration {
    Duration::from_secs(60).max(caps.min_ttl).min(caps.max_ttl)
}

/// How long until a lease of `ttl` granted now is surely gone from the store.
pub(crate) fn expiry_bound(caps: &Capabilities, ttl: Duration) -> Duration {
    ttl + caps.expiry_grace + Duration::from_millis(500)
}

/// One critical section as the fenced register saw it.
#[derive(Clone, Copy, Debug)]
pub struct Section {
    /// The fencing token the writer presented.
    pub token: FencingToken,
    /// When the section began (after the grant).
    pub enter: Instant,
    /// When it ended (before the release was sent).
    pub exit: Instant,
}

/// A stand-in for the resource a lock protects: it records every critical
/// section, so a case can check that no two overlapped and that tokens rose
/// in grant order.
#[derive(Debug, Default)]
pub struct FencedRegister {
    sections: Mutex<Vec<Section>>,
}

impl FencedRegister {
    /// Records one section.
    pub fn record(&self, section: Section) {
        self.sections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(section);
    }

    /// Panics if two sections overlap or tokens do not strictly increase in
    /// the order the sections ran. Returns how many sections there were.
    pub fn check(&self) -> usize {
        let mut sections = self
            .sections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        sections.sort_by_key(|s| s.enter);
        for pair in sections.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                b.enter >= a.exit,
                "two holders at once: section with token {} began {:?} before the one with token {} ended",
                b.token,
                a.exit - b.enter,
                a.token
            );
            assert!(
                b.token > a.token,
                "fencing token went from {} to {} between consecutive holders",
                a.token,
                b.token
            );
        }
        sections.len()
    }
}
