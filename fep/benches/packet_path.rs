//! The per-packet core on one core: parse → route lookup → rewrite →
//! checksum, on a hit with 1 k, 1 M and 10 M routes; and new-route insertion
//! (miss → choose → insert). `cargo bench -p fep`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use fep::dispatcher::Worker;
use fep::testing::CONFIG;
use fep::{Dispatcher, Verdict};
use fep_shared::FepConfig;

fn dispatcher(max_routes: usize) -> Dispatcher {
    let services = &CONFIG[CONFIG.find("[[node]]").expect("nodes")..];
    Dispatcher::new(&FepConfig::parse(&format!("max_routes = {max_routes}\n{services}")).unwrap())
}

/// A client segment: client `n` spread over 10.x.y.z and source ports.
fn segment(n: u32, syn: bool) -> Vec<u8> {
    let ip = (0x0a00_0000u32 | (n >> 8)).to_be_bytes();
    let port = 1024 + (n & 0xff) as u16;
    let b = PacketBuilder::ipv4(ip, [10, 0, 0, 100], 64).tcp(port, 80, 1, 1000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 64]).unwrap();
    out
}

/// A dispatcher with `routes` routes, its worker, and packets of 1024
/// routes spread over the table, to replay in turn.
fn fill(routes: u32) -> (Dispatcher, Worker, Vec<Vec<u8>>) {
    let d = dispatcher(routes as usize * 2);
    let mut worker = Worker::new(Default::default());
    for n in 0..routes {
        assert!(matches!(
            d.process(&mut segment(n, true), 0, &mut worker),
            Verdict::Forward(_)
        ));
    }
    let templates = (0..1024)
        .map(|i| segment(i * (routes / 1024).max(1), false))
        .collect();
    (d, worker, templates)
}

fn hit(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit");
    group.throughput(Throughput::Elements(1));
    for routes in [1_000u32, 1_000_000, 10_000_000] {
        // Filled on first use (criterion calls the routine once per sample),
        // so a filter that skips this size skips the fill.
        let mut filled: Option<(Dispatcher, Worker, Vec<Vec<u8>>)> = None;
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(routes), &routes, |b, _| {
            let (d, worker, templates) = filled.get_or_insert_with(|| fill(routes));
            let mut buf = vec![0u8; templates[0].len()];
            b.iter(|| {
                buf.copy_from_slice(&templates[i & 1023]);
                i += 1;
                black_box(d.process(black_box(&mut buf), 1, worker))
            })
        });
    }
    group.finish();
}

fn insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("new_route");
    group.throughput(Throughput::Elements(1));
    let packets: Vec<Vec<u8>> = (0..100_000).map(|n| segment(n, true)).collect();
    // One dispatcher, emptied (untimed) between batches of new clients: the
    // steady state of a running fep, whose route table is sized once.
    let d = dispatcher(200_000);
    let mut worker = Worker::new(Default::default());
    group.bench_function("miss_choose_insert", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(packets.len() as u64) as usize;
                let mut bufs: Vec<Vec<u8>> = packets[..n].to_vec();
                let start = Instant::now();
                for buf in &mut bufs {
                    black_box(d.process(buf, 0, &mut worker));
                }
                total += start.elapsed();
                d.remove_routes(|_, _| true);
                left -= n as u64;
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = hit, insert
}
criterion_main!(benches);
