//! Criterion: uncontended acquire+release cycle and `try_lock` on a held key,
//! for every backend and every store's raw baseline, in one run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use benches::report::{LatencySamples, read_json, write_json};
use benches::stats::summarize;
use benches::{Targets, report_dir};
use criterion::Criterion;

type Samples = Arc<Mutex<BTreeMap<String, Vec<Duration>>>>;

fn record(samples: &Samples, id: &str, d: Duration) {
    if let Ok(mut s) = samples.lock() {
        s.entry(id.to_owned()).or_default().push(d);
    }
}

fn main() {
    let quick = benches::quick_mode();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let filter = std::env::var("DISTLOCK_BENCH_FILTER").ok();
    let targets =
        Targets::start(&rt, filter.as_deref()).expect("starting the servers for the benches");
    let mut c = Criterion::default()
        .sample_size(if quick { 10 } else { 30 })
        .warm_up_time(Duration::from_millis(if quick { 200 } else { 1000 }))
        .measurement_time(Duration::from_millis(if quick { 600 } else { 3000 }))
        .configure_from_args();
    let samples: Samples = Arc::default();

    let mut group = c.benchmark_group("uncontended");
    for t in &targets.list {
        let client = rt.block_on(t.client()).expect("client");
        let key = format!("bench-cycle-{}-{:08x}", t.name, rand::random::<u32>());
        let (s, id) = (samples.clone(), format!("uncontended/{}", t.name));
        group.bench_function(&t.name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (client, key, s, id) = (client.clone(), key.clone(), s.clone(), id.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let guard = client
                            .try_lock(key.as_str())
                            .await
                            .expect("acquire")
                            .expect("free");
                        guard.release().await.expect("release");
                        let d = start.elapsed();
                        record(&s, &id, d);
                        total += d;
                    }
                    total
                }
            })
        });
        if let Some(raw) = &t.raw {
            let (s, id) = (samples.clone(), format!("uncontended/{}", raw.name()));
            let key = format!("bench-rawcycle-{}-{:08x}", t.name, rand::random::<u32>());
            group.bench_function(raw.name(), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (raw, key, s, id) = (raw.clone(), key.clone(), s.clone(), id.clone());
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            raw.cycle(&key).await.expect("raw cycle");
                            let d = start.elapsed();
                            record(&s, &id, d);
                            total += d;
                        }
                        total
                    }
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("try_lock_held");
    for t in &targets.list {
        let holder = rt.block_on(t.client()).expect("client");
        let other = rt.block_on(t.client()).expect("client");
        let key = format!("bench-held-{}-{:08x}", t.name, rand::random::<u32>());
        let guard = rt
            .block_on(holder.try_lock(key.as_str()))
            .expect("hold")
            .expect("free");
        let (s, id) = (samples.clone(), format!("try_lock_held/{}", t.name));
        group.bench_function(&t.name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (other, key, s, id) = (other.clone(), key.clone(), s.clone(), id.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let got = other.try_lock(key.as_str()).await.expect("try_lock");
                        assert!(got.is_none(), "a held key was granted");
                        let d = start.elapsed();
                        record(&s, &id, d);
                        total += d;
                    }
                    total
                }
            })
        });
        if let Some(raw) = &t.raw {
            let key = format!("bench-rawheld-{}-{:08x}", t.name, rand::random::<u32>());
            rt.block_on(raw.hold(&key)).expect("raw hold");
            let (s, id) = (samples.clone(), format!("try_lock_held/{}", raw.name()));
            group.bench_function(raw.name(), |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (raw, key, s, id) = (raw.clone(), key.clone(), s.clone(), id.clone());
                    async move {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let start = Instant::now();
                            raw.try_held(&key).await.expect("raw try");
                            let d = start.elapsed();
                            record(&s, &id, d);
                            total += d;
                        }
                        total
                    }
                })
            });
        }
        rt.block_on(guard.release()).expect("release");
    }
    group.finish();
    c.final_summary();

    let path = report_dir().join("latency-samples.json");
    let mut saved: LatencySamples = read_json(&path);
    if let Ok(s) = samples.lock() {
        for (id, v) in s.iter() {
            saved.insert(id.clone(), summarize(v));
        }
    }
    if let Err(e) = write_json(&path, &saved) {
        eprintln!("could not save latency samples: {e}");
    }
}
