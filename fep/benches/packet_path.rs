//! The per-packet core on one core: parse → route lookup → rewrite →
//! checksum, on a hit with 1 k, 1 M and 10 M routes; new-route insertion
//! (miss → choose → insert); and one expiry pass of the control plane (a
//! bounded window of the table), idle and evicting under pressure.
//! `cargo bench -p fep`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use etherparse::PacketBuilder;
use fep::testing::CONFIG;
use fep::{Dispatcher, Verdict, Worker};
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
                d.routes().remove_where(&d.table(), |_, _| true);
                left -= n as u64;
            }
            total
        })
    });
    group.finish();
}

fn expiry(c: &mut Criterion) {
    let mut group = c.benchmark_group("expiry_pass");
    // 1 M routes in 4 M slots: a pass reads one window (2^20 slots) and
    // removes nothing; its cost does not grow with the table.
    let mut filled: Option<(Dispatcher, Worker, Vec<Vec<u8>>)> = None;
    group.bench_function("window_of_1m_routes_nothing_due", |b| {
        let (d, _, _) = filled.get_or_insert_with(|| fill(1_000_000));
        b.iter(|| black_box(d.expire(1)))
    });
    drop(filled);
    // A table of 100 k at 96 % full of unconfirmed routes: a pass evicts
    // down to 90 % (6,000 routes through the bounded heap); refilled
    // (untimed) between passes.
    let d = dispatcher(100_000);
    let mut worker = Worker::new(Default::default());
    let mut next = 0u32;
    group.bench_function("evict_6k_of_100k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                while d.routes().len() < 96_000 {
                    d.process(&mut segment(next, true), 0, &mut worker);
                    next = next.wrapping_add(1);
                }
                let start = Instant::now();
                black_box(d.expire(1));
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = hit, insert, expiry
}
criterion_main!(benches);
