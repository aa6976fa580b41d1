//! What resilience and metrics add to one proxied request, in nanoseconds.
//!
//! Each benchmark calls the very functions the request path calls for a
//! successful request (`shardgate::proxy::bench`), with the shipped
//! defaults: the retry-budget deposit, the breaker permit and its verdict,
//! the attempt counter and the peak-EWMA latency update (resilience); the
//! request counter and the duration histogram (metrics). Divide by the CPU
//! per request from `benches/compare.py` (about 15 µs on the reference
//! machine) for their share of the hot path.
//!
//! Run: `cargo bench --bench hot_path`.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use shardgate::proxy::bench;
use shardgate::resilience::{Backoff, BreakerConfig, BudgetConfig, Jitter, RetryBudget};
use shardgate::routing::PartitionMetrics;
use shardgate::telemetry::Metrics;
use shardgate::upstream::{PoolSettings, UpstreamFactory, UpstreamSettings};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The shipped `[breaker]` and `[upstream]` defaults.
fn settings() -> UpstreamSettings {
    UpstreamSettings {
        pool: PoolSettings {
            max_idle: 64,
            idle_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
        },
        breaker: BreakerConfig {
            consecutive_failures: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_requests: 20,
            cool_down: Backoff {
                base: Duration::from_secs(5),
                max: Duration::from_secs(60),
                jitter: Jitter::Equal,
            },
            half_open_probes: 3,
        },
        tls: None,
    }
}

fn resilience(c: &mut Criterion) {
    let registry = Arc::new(Metrics::new());
    let upstream = UpstreamFactory::new(settings(), registry)
        .unwrap()
        .make("127.0.0.1:8080".parse().unwrap());
    let budget = RetryBudget::new(BudgetConfig {
        ratio: 0.2,
        window: Duration::from_secs(10),
        min_per_second: 10,
    });
    c.bench_function("per_request/resilience", |b| {
        b.iter(|| {
            let sent = Instant::now();
            bench::resilience(black_box(&upstream), &budget, sent, Instant::now());
        });
    });
}

fn metrics(c: &mut Criterion) {
    let registry = Arc::new(Metrics::new());
    let partition = Arc::new(PartitionMetrics::new(registry.clone(), "0"));
    let unrouted = PartitionMetrics::new(registry, "none");
    c.bench_function("per_request/metrics", |b| {
        b.iter(|| {
            let arrived = Instant::now();
            bench::metrics(black_box(&partition), &unrouted, arrived, Instant::now());
        });
    });
}

criterion_group!(benches, resilience, metrics);
criterion_main!(benches);
