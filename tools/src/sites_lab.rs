//! Several sites on one machine: a wide-area segment (a bridge in its own
//! namespace), a client on it, and per site a gateway running fep with one
//! back end behind it. Each site's fep answers DNS for `www.example.test`
//! and serves the name's VIP; the sites check and tell each other.
//!
//! ```text
//!  client 10.9.0.2 (+ 203.0.113.20) ─┐
//!  s1 gateway 10.9.0.11 ─────────────┤ bridge (namespace "wan")
//!  s2 gateway 10.9.0.12 ─────────────┤
//!  …                                 ┘
//!  site k: VIP 10.9.k.100 (the last site 203.0.113.100, Pacific Rim),
//!          gateway 10.(30+k).0.1 ── back end 10.(30+k).0.11
//! ```
//!
//! Every address is inside the lab's namespaces; all of it goes when the
//! lab is dropped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;

use anyhow::Context;

use crate::lab::{spawn_testsrv, veth, veth_to, FepProcess};
use crate::netns::Netns;

/// The name every site serves.
pub const NAME: &str = "www.example.test";
pub const ZONE: &str = "example.test";
/// The client's own address, and its second one in the Pacific Rim
/// (TEST-NET-3, first octet 203).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
pub const CLIENT_PACIFIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The port of the exchange on each gateway.
pub const EXCHANGE_PORT: u16 = 7400;
/// The back ends' HTTP origin (fep's HTTP-mode service on VIP:80 goes there).
pub const ORIGIN_PORT: u16 = 8080;
/// Region of the last site, as in document 002's Table VI.
pub const PACIFIC_RIM: &str = "apnic-pacific-rim";

/// Site `k` (0-based): `s1`, `s2`, …
pub fn site_name(k: usize) -> String {
    format!("s{}", k + 1)
}

/// Gateway `k`'s address on the wide-area segment.
pub fn gateway(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 9, 0, 11 + k as u8)
}

/// Site `k`'s VIP; the last of `sites` is in the Pacific Rim.
pub fn vip(k: usize, sites: usize) -> Ipv4Addr {
    match k + 1 == sites {
        true => Ipv4Addr::new(203, 0, 113, 100),
        false => Ipv4Addr::new(10, 9, k as u8 + 1, 100),
    }
}

fn backend(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 30 + k as u8, 0, 11)
}

pub struct SitesLab {
    pub wan: Netns,
    pub client: Netns,
    pub gateways: Vec<Netns>,
    pub backends: Vec<Netns>,
    dir: PathBuf,
    children: Vec<Child>,
    feps: Vec<Option<FepProcess>>,
}

impl SitesLab {
    /// Builds `sites` sites' namespaces and links, `tag` in their names.
    pub fn new(tag: &str, sites: usize) -> anyhow::Result<SitesLab> {
        let (prefix, dir) = crate::lab::prepare(tag)?;
        let mut lab = SitesLab {
            wan: Netns::create(&format!("{prefix}-wan"))?,
            client: Netns::create(&format!("{prefix}-cl"))?,
            gateways: Vec::new(),
            backends: Vec::new(),
            dir,
            children: Vec::new(),
            feps: Vec::new(),
        };
        for k in 0..sites {
            lab.gateways
                .push(Netns::create(&format!("{prefix}-g{}", k + 1))?);
            lab.backends
                .push(Netns::create(&format!("{prefix}-b{}", k + 1))?);
            lab.feps.push(None);
        }
        lab.wire_up().context("wiring the sites lab")?;
        Ok(lab)
    }

    fn wire_up(&self) -> anyhow::Result<()> {
        let wan = &self.wan;
        wan.ip(&["link", "add", "br0", "type", "bridge"])?;
        wan.ip(&["link", "set", "br0", "up"])?;
        let n = self.gateways.len();
        let mut members: Vec<(&Netns, Ipv4Addr)> = vec![(&self.client, CLIENT)];
        members.extend(
            self.gateways
                .iter()
                .enumerate()
                .map(|(k, g)| (g, gateway(k))),
        );
        for (i, (ns, addr)) in members.iter().enumerate() {
            let port = format!("p{i}");
            veth_to(wan, &port, ns, "wan0")?;
            wan.ip(&["link", "set", &port, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "wan0"])?;
            ns.ip(&["link", "set", "wan0", "up"])?;
        }
        let cl = &self.client;
        cl.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_PACIFIC}/32"),
            "dev",
            "wan0",
        ])?;
        for (k, g) in self.gateways.iter().enumerate() {
            // Every site's VIP through its gateway, from the client and the
            // other gateways; the client's Pacific address on the segment.
            let to_vip = |ns: &Netns| {
                ns.ip(&[
                    "route",
                    "add",
                    &format!("{}/32", vip(k, n)),
                    "via",
                    &gateway(k).to_string(),
                ])
            };
            to_vip(cl)?;
            for (j, other) in self.gateways.iter().enumerate() {
                if j != k {
                    to_vip(other)?;
                }
            }
            g.ip(&[
                "route",
                "add",
                &format!("{CLIENT_PACIFIC}/32"),
                "dev",
                "wan0",
            ])?;
            let be = &self.backends[k];
            veth(g, "be", be)?;
            g.ip(&["addr", "add", &format!("10.{}.0.1/24", 30 + k), "dev", "be"])?;
            g.ip(&["link", "set", "be", "up"])?;
            be.ip(&["addr", "add", &format!("{}/24", backend(k)), "dev", "eth0"])?;
            be.ip(&["link", "set", "eth0", "up"])?;
            be.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("10.{}.0.1", 30 + k),
            ])?;
        }
        Ok(())
    }

    pub fn sites(&self) -> usize {
        self.gateways.len()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Site `k`'s admin socket.
    pub fn control_socket(&self, k: usize) -> PathBuf {
        self.dir.join(format!("{}.sock", site_name(k)))
    }

    /// Starts the HTTP origin on every site's back end, answering
    /// `delays_ms[k]` late at site `k` (how far away it is), as node `be-sK`.
    pub fn start_origins(&mut self, testsrv: &Path, delays_ms: &[u64]) -> anyhow::Result<()> {
        for k in 0..self.sites() {
            let name = format!("be-{}", site_name(k));
            let args = [
                "--name".to_string(),
                name.clone(),
                "--http".to_string(),
                ORIGIN_PORT.to_string(),
                "--delay-ms".to_string(),
                delays_ms.get(k).copied().unwrap_or(0).to_string(),
                "--echo".to_string(),
                "7000".to_string(),
            ];
            let child = spawn_testsrv(&self.backends[k], &name, testsrv, &args)?;
            self.children.push(child);
        }
        Ok(())
    }

    /// Site `k`'s fep config: an HTTP-mode service `web` on VIP:80 (its
    /// `[service.http]` keys `http`), a TCP-mode `echo` on VIP:7000, and
    /// the `[sites]` table every site shares (`sites` holds extra keys of
    /// `[sites]`, `name` extra keys of the name).
    pub fn fep_config(
        &self,
        k: usize,
        http: &str,
        sites: &str,
        name: &str,
    ) -> anyhow::Result<String> {
        let n = self.sites();
        let key = self.dir.join("sites.key");
        if !key.exists() {
            std::fs::write(&key, fep_shared::protocol::Key::generate_hex())?;
        }
        let site = site_name(k);
        let mut s = format!(
            "tun = \"fep0\"\nworkers = 1\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\
             metrics_listen = \"127.0.0.1:9100\"\n\n\
             [[node]]\nname = \"be-{site}\"\naddress = \"{}\"\n\n\
             [[service]]\nname = \"web\"\nvip = \"{v}\"\nport = 80\nprotocol = \"tcp\"\nmode = \"http\"\n\
             backend = [{{ node = \"be-{site}\", port = {ORIGIN_PORT}, ratio = 1 }}]\n\
             [service.http]\n{http}\n\n\
             [[service]]\nname = \"echo\"\nvip = \"{v}\"\nport = 7000\nprotocol = \"tcp\"\n\
             backend = [{{ node = \"be-{site}\", ratio = 1 }}]\n\n",
            self.control_socket(k).display(),
            self.dir.join(format!("{site}-state")).display(),
            backend(k),
            v = vip(k, n),
        );
        // Every site's DNS server is one of the zone's name servers.
        let ns: Vec<String> = (0..n).map(|j| format!("\"ns{}.{ZONE}\"", j + 1)).collect();
        let glue: Vec<String> = (0..n)
            .map(|j| format!("\"ns{}.{ZONE}\" = [\"{}\"]", j + 1, gateway(j)))
            .collect();
        s += &format!(
            "[sites]\nme = \"{site}\"\nkey_file = \"{}\"\nlisten = \"{}:{EXCHANGE_PORT}\"\n\
             check_interval_ms = 300\ncheck_timeout_ms = 500\ncheck_fails = 2\nupdate_interval_ms = 1000\n{sites}\n\
             [sites.dns]\nlisten = [\"{}:53\"]\nzone = \"{ZONE}\"\nns = [{}]\nns_addresses = {{ {} }}\n\n",
            key.display(),
            gateway(k),
            gateway(k),
            ns.join(", "),
            glue.join(", "),
        );
        for j in 0..n {
            let region = match j + 1 == n {
                true => format!("region = \"{PACIFIC_RIM}\"\n"),
                false => String::new(),
            };
            s += &format!(
                "[[sites.site]]\nname = \"{}\"\nexchange = \"{}:{EXCHANGE_PORT}\"\n{region}\n",
                site_name(j),
                gateway(j)
            );
        }
        s += TABLE_VI;
        s.push('\n');
        s += &format!("[[sites.name]]\nname = \"{NAME}\"\nport = 80\n{name}\n");
        for j in 0..n {
            s += &format!(
                "[[sites.name.at]]\nsite = \"{}\"\nvips = [\"{}\"]\n",
                site_name(j),
                vip(j, n)
            );
        }
        Ok(s)
    }

    /// Starts site `k`'s fep with `config` and waits until it serves.
    pub fn start_fep(&mut self, k: usize, fep: &Path, config: &str) -> anyhow::Result<()> {
        let mut p = FepProcess::spawn(
            &self.gateways[k],
            &self.dir,
            &site_name(k),
            fep,
            config,
            &[],
        )?;
        p.wait_serving()?;
        self.feps[k] = Some(p);
        Ok(())
    }

    /// Kills site `k`'s fep at once (SIGKILL): the site is gone.
    pub fn kill_fep(&mut self, k: usize) {
        if let Some(p) = self.feps[k].take() {
            p.signal(libc::SIGKILL);
            drop(p);
        }
    }

    /// Stops site `k`'s fep with SIGTERM and waits for it to exit.
    pub fn stop_fep(&mut self, k: usize) -> anyhow::Result<std::process::ExitStatus> {
        let mut p = self.feps[k].take().context("fep is not running")?;
        p.stop()
    }

    pub fn fep_log(&self, k: usize) -> String {
        self.feps[k].as_ref().map(|p| p.log()).unwrap_or_default()
    }
}

/// Document 002's Table VI (first octet → region) as `[[sites.region]]`
/// entries: the example the project ships.
pub const TABLE_VI: &str = include_str!("../../deploy/regions-table-vi.toml");

impl Drop for SitesLab {
    fn drop(&mut self) {
        for p in self.feps.iter_mut() {
            p.take();
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
