//! `fep-packets`: crafted traffic for testing fep — run it only inside test
//! network namespaces, toward a VIP there.
//!
//! - `fep-packets flood --dst VIP:PORT --count N --seconds S`: SYNs from
//!   random spoofed sources in `--src-net` (random ports), bounded in count
//!   and time; with `--udp K`, UDP flows of K datagrams each instead.
//! - `fep-packets hostile --dst VIP:PORT`: every hostile or unusual packet
//!   class (all 256 TCP flag combinations, bad data offsets, bad checksums,
//!   IPv4 options, TTL 1, unknown protocols, short headers …) once.
//!
//! Packets go out of a raw socket, so the kernel of the sending host and the
//! gateway filter what they always filter (headers with wrong lengths never
//! reach fep); the core's handling of those is unit-tested.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use fep_tools::craft::{self, RawSender, Tcp4};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A SYN flood (or UDP flows) from spoofed sources.
    Flood {
        #[arg(long)]
        dst: SocketAddr,
        /// Spoofed sources: hosts .10 to .250 of this /24.
        #[arg(long, default_value = "10.0.1.0")]
        src_net: Ipv4Addr,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Stop after this many seconds even if `count` is not reached.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Packets per second at most (0: as fast as the host sends).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// UDP flows of this many datagrams each (back to back), not SYNs.
        #[arg(long)]
        udp: Option<u64>,
    },
    /// Every hostile packet class once.
    Hostile {
        /// An IPv4 TCP service.
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value = "10.0.1.2")]
        src: Ipv4Addr,
        /// An IPv6 UDP service, for the IPv6 classes.
        #[arg(long)]
        dst6: Option<SocketAddr>,
        #[arg(long, default_value = "fd00:1::2")]
        src6: std::net::Ipv6Addr,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Flood {
            dst,
            src_net,
            count,
            seconds,
            rate,
            udp,
        } => flood(dst, src_net, count, Duration::from_secs(seconds), rate, udp),
        Cmd::Hostile {
            dst,
            src,
            dst6,
            src6,
        } => hostile(dst, src, dst6.map(|d| (d, src6))),
    }
}

/// xorshift64*: reproducible, fast, good enough to spread sources.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn flood(
    dst: SocketAddr,
    net: Ipv4Addr,
    count: u64,
    limit: Duration,
    rate: u64,
    udp: Option<u64>,
) -> anyhow::Result<()> {
    let IpAddr::V4(_) = dst.ip() else {
        bail!("flood: an IPv4 --dst")
    };
    let sender = RawSender::new(false)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = u32::from(net) & 0xffff_ff00;
    let started = Instant::now();
    let (mut sent, mut failed) = (0u64, 0u64);
    while sent + failed < count && started.elapsed() < limit {
        // Pacing: never ahead of `rate` packets per second.
        if rate > 0 && (sent + failed) % 256 == 0 {
            let due = Duration::from_secs_f64((sent + failed) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let r = rng.next();
        let src = Ipv4Addr::from(base | (10 + (r % 241) as u32));
        let sport = 1024 + ((r >> 16) % 64_000) as u16;
        let (pkt, copies) = match udp {
            Some(k) => (craft::udp4(src, sport, dst, b"flood"), k),
            None => (Tcp4::syn(src, sport, dst).build(), 1),
        };
        for _ in 0..copies {
            match sender.send(&pkt, dst.ip()) {
                Ok(()) => sent += 1,
                // A full socket buffer: the flood outruns the host; count and go on.
                Err(_) => failed += 1,
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let what = if udp.is_some() { "datagrams" } else { "SYNs" };
    println!(
        "sent {sent} {what} ({failed} refused by the local stack) in {secs:.1} s, {:.0}/s",
        sent as f64 / secs
    );
    Ok(())
}

fn hostile(
    dst: SocketAddr,
    src: Ipv4Addr,
    v6: Option<(SocketAddr, std::net::Ipv6Addr)>,
) -> anyhow::Result<()> {
    let mut batches = vec![(
        RawSender::new(false)?,
        dst.ip(),
        craft::hostile_v4(src, dst),
    )];
    if let Some((dst6, src6)) = v6 {
        batches.push((
            RawSender::new(true)?,
            dst6.ip(),
            craft::hostile_v6(src6, dst6),
        ));
    }
    let (mut sent, mut refused) = (0, Vec::new());
    for (sender, to, packets) in batches {
        for (name, pkt) in packets {
            match sender.send(&pkt, to) {
                Ok(()) => sent += 1,
                Err(e) => refused.push(format!("{name}: {e}")),
            }
        }
    }
    println!("sent {sent} hostile packets");
    for r in refused {
        println!("refused by the local stack: {r}");
    }
    Ok(())
}
