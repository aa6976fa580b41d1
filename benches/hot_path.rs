//! What resilience and metrics add to one proxied request, in nanoseconds.
//!
//! Each benchmark performs exactly the bookkeeping `proxy::service` does for a
//! successful request, with the shipped defaults: the retry-budget deposit,
//! the breaker permit and its success, the peak-EWMA latency update (resilience);
//! the request counter, the duration histogram and the attempt counter
//! (metrics). Divide by the CPU per request from `benches/compare.py`
//! (about 20 µs on the reference machine) for the share of the hot path.
//!
//! Run: `cargo bench --bench hot_path`.
#![allow(clippy::unwrap_used)]

use criterion::{Criterion, criterion_group, criterion_main};
use shardgate::resilience::{Backoff, Breaker, BreakerConfig, BudgetConfig, Jitter, RetryBudget};
use shardgate::routing::{PartitionMetrics, RequestClass, ServedBy};
use shardgate::telemetry::{Metrics, names};
use shardgate::upstream::PeakEwma;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

fn resilience(c: &mut Criterion) {
    let budget = RetryBudget::new(BudgetConfig {
        ratio: 0.2,
        window: Duration::from_secs(10),
        min_per_second: 10,
    });
    let breaker = Breaker::new(
        BreakerConfig {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
            cool_down: Backoff {
                base: Duration::from_secs(5),
                max: Duration::from_secs(60),
                jitter: Jitter::Full,
            },
            half_open_probes: 3,
        },
        Box::new(()),
    );
    let latency = PeakEwma::new(Duration::from_millis(1));
    c.bench_function("per_request/resilience", |b| {
        b.iter(|| {
            let started = Instant::now();
            budget.deposit(started);
            let permit = black_box(breaker.try_acquire()).unwrap();
            let answered = Instant::now();
            latency.observe(answered - started, answered);
            permit.success(answered);
        });
    });
}

fn metrics(c: &mut Criterion) {
    let registry = Arc::new(Metrics::new());
    let partition = PartitionMetrics::new(registry.clone(), "0");
    let attempts = registry.counter(
        names::UPSTREAM_ATTEMPTS,
        &[("upstream", "127.0.0.1:8080"), ("outcome", "ok")],
    );
    c.bench_function("per_request/metrics", |b| {
        b.iter(|| {
            attempts.increment(1);
            partition.request(
                RequestClass::Read,
                black_box(200),
                ServedBy::Primary,
                black_box(0.000_2),
            );
        });
    });
}

criterion_group!(benches, resilience, metrics);
criterion_main!(benches);
