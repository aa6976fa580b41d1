//! Key → partition lookup at 3, 64 and 4,096 partitions.
//!
//! Run: `cargo bench --bench routing`. The lookup is hash (XXH3-64) plus a
//! binary search over range starts, so cost should grow with log2(P) only.
#![allow(clippy::unwrap_used)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shardgate::topology::{PartitionDoc, ShardMap, TopologyDoc, key_position};
use std::hint::black_box;

fn map_with(partitions: u32) -> ShardMap {
    let span = (1u64 << 32) / u64::from(partitions);
    let docs = (0..partitions)
        .map(|i| {
            let start = span * u64::from(i);
            let end = if i == partitions - 1 {
                u64::from(u32::MAX)
            } else {
                start + span - 1
            };
            PartitionDoc {
                partition_index: i,
                primary_node_ip: format!("10.{}.{}.1:8080", i / 256, i % 256),
                replica_node_ips: vec![format!("10.{}.{}.2:8080", i / 256, i % 256)],
                hash_range_start: format!("{start:08x}"),
                hash_range_end: format!("{end:08x}"),
            }
        })
        .collect();
    ShardMap::from_doc(&TopologyDoc {
        cluster_epoch: 1,
        master_node_id: "bench".into(),
        partition_count: partitions,
        partitions: docs,
    })
    .unwrap()
}

fn lookup(c: &mut Criterion) {
    // Keys shaped like real ones ("user:<id>"), enough to defeat branch prediction.
    let keys: Vec<String> = (0..1024u64)
        .map(|i| format!("user:{}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();

    let mut hash = c.benchmark_group("hash");
    hash.throughput(Throughput::Elements(keys.len() as u64));
    hash.bench_function("xxh3_high32", |b| {
        b.iter(|| {
            for k in &keys {
                black_box(key_position(black_box(k.as_bytes())));
            }
        });
    });
    hash.finish();

    let mut group = c.benchmark_group("key_to_partition");
    group.throughput(Throughput::Elements(keys.len() as u64));
    for partitions in [3u32, 64, 4096] {
        let map = map_with(partitions);
        group.bench_with_input(BenchmarkId::from_parameter(partitions), &map, |b, map| {
            b.iter(|| {
                for k in &keys {
                    black_box(map.partition_for_key(black_box(k.as_bytes())).index);
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
