//! Criterion: uncontended acquire+release cycle and `try_lock` on a held key,
//! for every backend and every store's raw baseline, in one run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use benches::report::{LatencySamples, read_json, write_json};
use benches::stats::summarize;
use benches::{Targets, report_dir};
use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
use futures::future::BoxFuture;

type Samples = Arc<Mutex<BTreeMap<String, Vec<Duration>>>>;

/// One timed operation; it panics if the store misbehaves (a held key
/// granted, a free key refused), which stops the benchmark loudly.
type Op = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Benches `op` as `group/id`, timing each call on its own so the report can
/// give a p99 next to criterion's median.
fn bench(
    group: &mut BenchmarkGroup<'_, WallTime>,
    group_name: &str,
    rt: &tokio::runtime::Runtime,
    samples: &Samples,
    id: &str,
    op: Op,
) {
    let key = format!("{group_name}/{id}");
    group.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (op, samples, key) = (op.clone(), samples.clone(), key.clone());
            async move {
                let mut total = Duration::ZERO;
                let mut taken = Vec::with_capacity(iters as usize);
                for _ in 0..iters {
                    let start = Instant::now();
                    op().await;
                    let d = start.elapsed();
                    taken.push(d);
                    total += d;
                }
                if let Ok(mut s) = samples.lock() {
                    s.entry(key).or_default().extend(taken);
                }
                total
            }
        })
    });
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

    const CYCLE: &str = "uncontended";
    let mut group = c.benchmark_group(CYCLE);
    for t in &targets.list {
        let client = rt.block_on(t.client()).expect("client");
        let key = format!("bench-cycle-{}-{:08x}", t.name, rand::random::<u32>());
        let op: Op = Arc::new(move || {
            let (client, key) = (client.clone(), key.clone());
            Box::pin(async move {
                let guard = client
                    .try_lock(key.as_str())
                    .await
                    .expect("acquire")
                    .expect("free");
                guard.release().await.expect("release");
            })
        });
        bench(&mut group, CYCLE, &rt, &samples, &t.name, op);
        if let Some(raw) = t.raw.clone() {
            let key = format!("bench-rawcycle-{}-{:08x}", t.name, rand::random::<u32>());
            let name = raw.name();
            let op: Op = Arc::new(move || {
                let (raw, key) = (raw.clone(), key.clone());
                Box::pin(async move { raw.cycle(&key).await.expect("raw cycle") })
            });
            bench(&mut group, CYCLE, &rt, &samples, &name, op);
        }
    }
    group.finish();

    const HELD: &str = "try_lock_held";
    let mut group = c.benchmark_group(HELD);
    for t in &targets.list {
        let holder = rt.block_on(t.client()).expect("client");
        let other = rt.block_on(t.client()).expect("client");
        let key = format!("bench-held-{}-{:08x}", t.name, rand::random::<u32>());
        let guard = rt
            .block_on(holder.try_lock(key.as_str()))
            .expect("hold")
            .expect("free");
        let op: Op = Arc::new(move || {
            let (other, key) = (other.clone(), key.clone());
            Box::pin(async move {
                let got = other.try_lock(key.as_str()).await.expect("try_lock");
                assert!(got.is_none(), "a held key was granted");
            })
        });
        bench(&mut group, HELD, &rt, &samples, &t.name, op);
        if let Some(raw) = t.raw.clone() {
            let key = format!("bench-rawheld-{}-{:08x}", t.name, rand::random::<u32>());
            rt.block_on(raw.hold(&key)).expect("raw hold");
            let name = raw.name();
            let op: Op = Arc::new(move || {
                let (raw, key) = (raw.clone(), key.clone());
                Box::pin(async move { raw.try_held(&key).await.expect("raw try") })
            });
            bench(&mut group, HELD, &rt, &samples, &name, op);
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
