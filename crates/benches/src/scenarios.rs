//! The contended scenarios: handoff, throughput and fairness, many keys,
//! holding many locks. Each returns plain numbers for the report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{LockClient, LockOptions, Wait};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

use crate::counting::Counting;
use crate::stats::{Summary, summarize};
use crate::targets::Target;

type BoxError = lock_core::BoxError;

/// A fresh key per run, so runs never see each other's leftovers.
fn key(name: &str) -> String {
    format!("bench-{name}-{:08x}", rand::random::<u32>())
}

fn ttl_for(target: &LockClient, wanted: Duration) -> Duration {
    let caps = target.capabilities();
    wanted.clamp(caps.min_ttl, caps.max_ttl)
}

/// Handoff: time from a holder's release call to the next holder's acquire
/// returning.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Handoff {
    /// Latency of the handoffs where the next holder was already waiting.
    pub latency: Summary,
}

/// `workers` workers on one key, each holding `hold` then thinking `think`,
/// for `run` time.
pub async fn handoff(
    target: &Target,
    workers: usize,
    hold: Duration,
    think: Duration,
    run: Duration,
) -> Result<Handoff, BoxError> {
    let key = key("handoff");
    // (time of the last release call, and of the grant before it)
    let last_release: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop_at = Instant::now() + run;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let client = target.client().await?;
        let ttl = ttl_for(&client, Duration::from_secs(30));
        let opts = LockOptions::new()
            .ttl(ttl)
            .wait(Wait::For(Duration::from_secs(60)));
        let (key, last_release, samples) = (key.clone(), last_release.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let asked = Instant::now();
                let guard = client.lock_with(key.as_str(), &opts).await?;
                let got = Instant::now();
                if let Some(released) = *last_release.lock().map_err(|_| "poisoned")? {
                    // Only handoffs where we were already waiting at the release.
                    if released >= asked {
                        samples.lock().map_err(|_| "poisoned")?.push(got - released);
                    }
                }
                sleep(hold).await;
                *last_release.lock().map_err(|_| "poisoned")? = Some(Instant::now());
                guard.release().await?;
                sleep(think).await;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let samples = samples.lock().map_err(|_| "poisoned")?.clone();
    Ok(Handoff {
        latency: summarize(&samples),
    })
}

/// Throughput and fairness of workers hammering one key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Hammer {
    /// Workers.
    pub workers: usize,
    /// Fair mode.
    pub fair: bool,
    /// Acquisitions per second, all workers together.
    pub per_second: f64,
    /// Share of acquisitions that went to a different worker than the last.
    pub changed_hands: f64,
    /// Fewest acquisitions of one worker divided by the most.
    pub min_max_ratio: f64,
    /// Acquisitions in all.
    pub total: u64,
}

/// `workers` workers (on `clients` clients) take and release one key as fast
/// as they can for `run`.
pub async fn hammer(
    target: &Target,
    workers: usize,
    clients: usize,
    fair: bool,
    run: Duration,
) -> Result<Hammer, BoxError> {
    let key = key("hammer");
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
    let last = Arc::new(AtomicU64::new(u64::MAX));
    let changed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut pool = Vec::new();
    for _ in 0..clients.max(1) {
        pool.push(target.client().await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = pool[w % pool.len()].clone();
        let ttl = ttl_for(&client, Duration::from_secs(30));
        let opts = LockOptions::new()
            .ttl(ttl)
            .fair(fair)
            .wait(Wait::For(Duration::from_secs(30)));
        let (key, counts, last, changed, stop) = (
            key.clone(),
            counts.clone(),
            last.clone(),
            changed.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let guard = match client.lock_with(key.as_str(), &opts).await {
                    Ok(g) => g,
                    Err(lock_core::Error::Timeout { .. }) if stop.load(Ordering::Relaxed) => break,
                    Err(e) => return Err::<(), BoxError>(e.into()),
                };
                counts[w].fetch_add(1, Ordering::Relaxed);
                if last.swap(w as u64, Ordering::Relaxed) != w as u64 {
                    changed.fetch_add(1, Ordering::Relaxed);
                }
                guard.release().await?;
            }
            Ok(())
        }));
    }
    sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    for t in tasks {
        t.await??;
    }
    let per: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let total: u64 = per.iter().sum();
    let (min, max) = (
        per.iter().min().copied().unwrap_or(0),
        per.iter().max().copied().unwrap_or(0),
    );
    Ok(Hammer {
        workers,
        fair,
        per_second: total as f64 / elapsed.as_secs_f64(),
        changed_hands: if total == 0 {
            0.0
        } else {
            changed.load(Ordering::Relaxed) as f64 / total as f64
        },
        min_max_ratio: if max == 0 {
            0.0
        } else {
            min as f64 / max as f64
        },
        total,
    })
}

/// Throughput over many keys.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ManyKeys {
    /// Acquisitions per second.
    pub per_second: f64,
}

/// `workers` workers over `keys` keys, chosen at random, for `run`.
pub async fn many_keys(
    target: &Target,
    workers: usize,
    keys: usize,
    run: Duration,
) -> Result<ManyKeys, BoxError> {
    let base = key("many");
    let total = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + run;
    let mut pool = Vec::new();
    for _ in 0..4 {
        pool.push(target.client().await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = pool[w % pool.len()].clone();
        let ttl = ttl_for(&client, Duration::from_secs(30));
        let opts = LockOptions::new()
            .ttl(ttl)
            .wait(Wait::For(Duration::from_secs(30)));
        let (base, total) = (base.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let k = format!("{base}-{}", rand::random::<u32>() as usize % keys);
                let guard = client.lock_with(k.as_str(), &opts).await?;
                total.fetch_add(1, Ordering::Relaxed);
                guard.release().await?;
            }
            Ok::<(), BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(ManyKeys {
        per_second: total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
    })
}

/// The cost of holding many locks with auto-renew.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ManyHeld {
    /// Locks held.
    pub locks: usize,
    /// TTL used.
    pub ttl_ms: u64,
    /// Renewal calls (batches) per second while holding.
    pub renew_calls_per_second: f64,
    /// Leases renewed per second.
    pub leases_renewed_per_second: f64,
    /// Client CPU while holding, as a share of one core.
    pub cpu_share: f64,
    /// Resident memory growth per held lock, in bytes.
    pub bytes_per_lock: f64,
    /// Whether every lock was still held at the end.
    pub all_held: bool,
}

/// One client takes `locks` locks with auto-renew and holds them for
/// `periods` TTLs, in a fresh child process (this benchmark binary run with
/// `--many-held-child`), so its memory and CPU figures are its own.
pub fn many_held(
    target: &Target,
    locks: usize,
    ttl: Duration,
    periods: u32,
) -> Result<ManyHeld, BoxError> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["--many-held-child", &target.url])
        .args([
            locks.to_string(),
            ttl.as_millis().to_string(),
            periods.to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("the measuring process failed ({})", out.status).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .ok_or("the measuring process printed nothing")?;
    let result: Result<ManyHeld, String> = serde_json::from_str(line)?;
    Ok(result?)
}

/// The measurement behind [`many_held`], in this process: open the store at
/// `url`, take `locks` locks, hold them for `periods` TTLs.
pub async fn many_held_here(
    url: &str,
    locks: usize,
    ttl: Duration,
    periods: u32,
) -> Result<ManyHeld, BoxError> {
    let counting = Counting::new(distlock::backend(url).await?);
    let client = LockClient::from_arc(counting.clone());
    let ttl = ttl_for(&client, ttl);
    let opts = LockOptions::new()
        .ttl(ttl)
        .wait(Wait::For(Duration::from_secs(3)));
    let base = key("held");
    // Warm up the client (connections, sessions, tasks) before the baseline.
    client
        .lock_with(format!("{base}-warm"), &opts)
        .await?
        .release()
        .await?;
    let rss_before = rss_bytes();
    let mut guards = Vec::with_capacity(locks);
    // Acquire in waves so the server is not flooded.
    for wave in (0..locks).collect::<Vec<_>>().chunks(64) {
        let got = futures::future::join_all(
            wave.iter()
                .map(|i| client.lock_with(format!("{base}-{i}"), &opts)),
        )
        .await;
        for g in got {
            let held = guards.len();
            guards.push(g.map_err(|e| format!("after {held} locks: {e}"))?);
        }
    }
    let rss_after = rss_bytes();
    let (b0, l0) = counting.counts();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    sleep(ttl * periods).await;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let (b1, l1) = counting.counts();
    let all_held = guards.iter().all(|g| !g.is_lost());
    for wave in guards.chunks(256) {
        let _ = futures::future::join_all(wave.iter().map(|g| async {
            let _ = client.backend().release(&g.lease()).await;
        }))
        .await;
    }
    drop(guards);
    Ok(ManyHeld {
        locks,
        ttl_ms: ttl.as_millis() as u64,
        renew_calls_per_second: (b1 - b0) as f64 / elapsed,
        leases_renewed_per_second: (l1 - l0) as f64 / elapsed,
        cpu_share: cpu / elapsed,
        bytes_per_lock: rss_after.saturating_sub(rss_before) as f64 / locks as f64,
        all_held,
    })
}

/// Resident set size of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) used by this process so far, in seconds (Linux;
/// clock ticks of 1/100 s).
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let Some(rest) = stat.rsplit(')').next() else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}
