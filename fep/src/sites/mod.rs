//! Several sites serving the same names: this site's checks of every
//! site's VIPs, the state the sites exchange, the hand-off plans built from
//! both, and the DNS answers and redirects that follow them.
//!
//! Apart from the data path: the checks and the exchange run on the control
//! plane's runtime, the DNS server on threads of its own; they meet in
//! [`Sites`], whose plans are swapped whole and read without a lock (each
//! name's rotation and last answer sit under a small lock of their own).

pub mod checks;
pub mod dns;
pub mod dns_fast;
pub mod dns_server;
pub mod exchange;
pub mod handoff;
pub mod plan;
pub mod regions;
pub mod state;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use fep_shared::api::{SiteNameView, SiteSlotView, SitesView};
use fep_shared::protocol::{Key, ProtocolError};
use fep_shared::sites::VipState;
use fep_shared::{SitesConfig, WhenAllDown};

use self::dns::{Class, Lookup, Reply, Zone};
use self::plan::{NamePlan, Outcome, Rotation};
use self::regions::Regions;
use self::state::SiteTable;
use crate::transfer_table::{ServiceId, TransferTable};
use crate::wire::ip_from_addr;

/// Why an exchange connection was refused besides a bad frame (whose
/// kinds are [`ProtocolError::KINDS`]), as counted.
pub const SITE_REJECTS: [&str; 4] = ["unknown_site", "wrong_address", "auth_timeout", "busy"];
const REJECTS: usize = ProtocolError::KINDS.len() + SITE_REJECTS.len();

fn reject_kinds() -> impl Iterator<Item = &'static str> {
    ProtocolError::KINDS.into_iter().chain(SITE_REJECTS)
}

/// Counters of the DNS server, the exchange and the redirects.
#[derive(Debug, Default)]
pub struct SiteStats {
    answers: [AtomicU64; Class::ALL.len()],
    pub dropped: AtomicU64,
    pub updates_sent: AtomicU64,
    pub triggered_sent: AtomicU64,
    pub updates_received: AtomicU64,
    rejected: [AtomicU64; REJECTS],
    pub redirects: AtomicU64,
    /// Full, but the client had followed `redirect_hops` redirects already.
    pub redirects_refused: AtomicU64,
}

impl SiteStats {
    pub fn count(&self, reply: Reply) {
        match reply {
            Reply::Answered(class) => {
                let i = Class::ALL.iter().position(|c| *c == class).unwrap_or(0);
                self.answers[i].fetch_add(1, Ordering::Relaxed);
            }
            Reply::Dropped => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn answers(&self) -> impl Iterator<Item = (Class, u64)> + '_ {
        Class::ALL
            .iter()
            .zip(&self.answers)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
    }

    pub fn reject(&self, kind: &str) {
        if let Some(i) = reject_kinds().position(|k| k == kind) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn rejected(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        reject_kinds()
            .zip(&self.rejected)
            .map(|(k, n)| (k, n.load(Ordering::Relaxed)))
    }
}

/// The plans the answers read, swapped whole after every change.
#[derive(Debug, Default)]
struct Live {
    plans: Vec<NamePlan>,
    regions: Regions,
}

/// A name's answers over time: its rotation, and per family the last list
/// that had a site up (for `when_all_down = "last_healthy"`).
#[derive(Debug, Default)]
struct NameRun {
    rotation: Rotation,
    last: [Vec<IpAddr>; 2],
    /// Scratch for one answer's site order, kept to save an allocation.
    order: Vec<usize>,
}

pub struct Sites {
    cfg: Arc<SitesConfig>,
    key: Key,
    table: Mutex<SiteTable>,
    live: ArcSwap<Live>,
    runs: Vec<Mutex<NameRun>>,
    zone: Option<Zone>,
    pub stats: SiteStats,
    /// Bumped for a triggered update: every sender wakes and sends.
    trigger: tokio::sync::watch::Sender<String>,
}

impl Sites {
    /// The sites of `cfg`, whose exchange is authenticated with `key`.
    pub fn new(cfg: &SitesConfig, key: Key) -> anyhow::Result<Sites> {
        let zone = match &cfg.dns {
            Some(dns) => Some(Zone::new(dns, &cfg.names).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let table = SiteTable::new(cfg);
        let live = Live {
            plans: table.plans(Instant::now()),
            regions: table.regions().clone(),
        };
        Ok(Sites {
            cfg: Arc::new(cfg.clone()),
            key,
            runs: cfg.names.iter().map(|_| Mutex::default()).collect(),
            table: Mutex::new(table),
            live: ArcSwap::from_pointee(live),
            zone,
            stats: SiteStats::default(),
            trigger: tokio::sync::watch::channel(String::new()).0,
        })
    }

    pub fn key(&self) -> &Key {
        &self.key
    }

    pub fn config(&self) -> &SitesConfig {
        &self.cfg
    }

    pub fn zone(&self) -> Option<&Zone> {
        self.zone.as_ref()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SiteTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the facts under the table's lock, then publishes new plans;
    /// `f` returns the reason for a triggered update, if one is due.
    pub fn change(&self, f: impl FnOnce(&mut SiteTable) -> Option<String>) {
        let mut table = self.table();
        let reason = f(&mut table);
        let plans = table.plans(Instant::now());
        drop(table);
        let regions = self.live.load().regions.clone();
        self.live.store(Arc::new(Live { plans, regions }));
        if let Some(reason) = reason {
            tracing::info!("sites: {reason}; telling the other sites now");
            self.trigger.send_replace(reason);
        }
    }

    /// The state this site sends.
    pub fn own_state(&self, reason: &str) -> fep_shared::sites::SiteState {
        self.table().own_state(reason)
    }

    pub fn triggers(&self) -> tokio::sync::watch::Receiver<String> {
        self.trigger.subscribe()
    }

    /// This site's own VIPs per name, from `vip_state` (which tells, for a
    /// VIP and port, the local services' room).
    pub fn refresh_local(&self, vip_state: impl Fn(IpAddr, u16) -> VipState) {
        let me = self.cfg.me.clone();
        self.change(|table| {
            let mut reason = None;
            for (n, name) in self.cfg.names.iter().enumerate() {
                let Some(at) = name.sites.iter().find(|s| s.site == me) else {
                    continue;
                };
                let vips: Vec<VipState> =
                    at.vips.iter().map(|&v| vip_state(v, name.port)).collect();
                let room = vips.iter().any(|v| v.room);
                if table.set_local(n, vips) {
                    reason = Some(match room {
                        true => format!("'{}' has room again here", name.name),
                        false => format!("'{}' has no room left here", name.name),
                    });
                }
            }
            reason
        });
    }

    /// Where to send a new client of the full local VIP `vip`:`port`: the
    /// next site chosen as for DNS, other than this one.
    pub fn redirect_target(&self, vip: IpAddr, port: u16, client: IpAddr) -> Option<IpAddr> {
        let live = self.live.load();
        let me = &self.cfg.me;
        let n = self.cfg.names.iter().position(|name| {
            name.port == port
                && name
                    .sites
                    .iter()
                    .any(|s| &s.site == me && s.vips.contains(&vip))
        })?;
        let plan = &live.plans[n];
        let skip = plan.sites().iter().position(|s| &s.name == me);
        let mut run = self.runs[n].lock().unwrap_or_else(|e| e.into_inner());
        let NameRun {
            rotation, order, ..
        } = &mut *run;
        let region = live.regions.lookup(client);
        if plan.order(rotation, vip.is_ipv6(), region, skip, order) == Outcome::AllDown {
            return None;
        }
        let mut addrs = Vec::new();
        plan.addresses(order, vip.is_ipv6(), &mut addrs);
        addrs.first().copied()
    }

    /// What `fepctl sites` shows.
    pub fn view(&self) -> SitesView {
        let live = self.live.load();
        let names = self
            .cfg
            .names
            .iter()
            .zip(&live.plans)
            .map(|(name, plan)| {
                let weights: Vec<u64> = plan.sites().iter().map(|s| s.weight).collect();
                SiteNameView {
                    name: name.name.clone(),
                    sites: plan
                        .sites()
                        .iter()
                        .zip(handoff::percent(&weights))
                        .map(|(s, share)| SiteSlotView {
                            site: s.name.clone(),
                            vips: s.vips.clone(),
                            up: s.up,
                            room: s.room,
                            weight: s.weight,
                            share_percent: share,
                        })
                        .collect(),
                }
            })
            .collect();
        SitesView {
            me: self.cfg.me.clone(),
            names,
        }
    }
}

/// The room of this site's services on `vip`:`port`: healthy (a back end
/// with a ratio above 0) and below its connection limit; `open` tells an
/// HTTP-mode service's client connections.
pub fn vip_state(
    table: &TransferTable,
    vip: IpAddr,
    port: u16,
    open: impl Fn(ServiceId) -> Option<u64>,
) -> VipState {
    let mut state = VipState {
        vip,
        remaining: None,
        capacity: None,
        healthy: false,
        room: false,
    };
    let serving = table.services().iter().enumerate().filter(|(_, svc)| {
        !svc.removed && svc.is_tcp() && svc.port == port && ip_from_addr(&svc.vip) == vip
    });
    for (slot, svc) in serving {
        let healthy = svc.backends.iter().any(|b| !b.removed && b.ratio() > 0);
        state.healthy |= healthy;
        let (used, cap) = match &svc.http {
            Some(http) => (
                open(slot as ServiceId).unwrap_or(0),
                Some(http.max_connections as u64),
            ),
            None => (
                svc.backends.iter().map(|b| u64::from(b.routes())).sum(),
                svc.max_connections().map(u64::from),
            ),
        };
        if let Some(cap) = cap {
            let left = cap.saturating_sub(used);
            state.remaining = Some(state.remaining.unwrap_or(0) + left);
            state.capacity = Some(state.capacity.unwrap_or(0) + cap);
            state.room = healthy && left > 0;
        } else {
            state.room = healthy;
        }
    }
    state
}

impl Lookup for Sites {
    fn addresses(&self, name: usize, v6: bool, client: IpAddr, out: &mut Vec<IpAddr>) {
        let live = self.live.load();
        let (Some(plan), Some(run), Some(cfg)) = (
            live.plans.get(name),
            self.runs.get(name),
            self.cfg.names.get(name),
        ) else {
            return;
        };
        let region = live.regions.lookup(client);
        let mut run = run.lock().unwrap_or_else(|e| e.into_inner());
        let NameRun {
            rotation,
            last,
            order,
        } = &mut *run;
        let last = &mut last[usize::from(v6)];
        match plan.order(rotation, v6, region, None, order) {
            Outcome::AllDown => {
                if cfg.when_all_down == WhenAllDown::LastHealthy {
                    out.extend_from_slice(last);
                }
            }
            _ => {
                let from = out.len();
                plan.addresses(order, v6, out);
                last.clear();
                last.extend_from_slice(&out[from..]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sites `a` (this one) and `b` for `www.example.test`, answering
    /// `policy` when no site is up.
    fn sites(policy: &str) -> Sites {
        let text = format!(
            "me = \"a\"\nkey_file = \"/unused\"\nlisten = \"10.0.0.1:1\"\ncheck_fails = 1\n\
             [dns]\nlisten = [\"10.0.0.1:53\"]\nzone = \"example.test\"\nns = [\"ns.example.test\"]\n\
             [[site]]\nname = \"a\"\nexchange = \"10.0.0.1:1\"\n\
             [[site]]\nname = \"b\"\nexchange = \"10.0.0.2:1\"\n\
             [[name]]\nname = \"www.example.test\"\nport = 80\nwhen_all_down = \"{policy}\"\n\
             [[name.at]]\nsite = \"a\"\nvips = [\"10.9.1.100\"]\n\
             [[name.at]]\nsite = \"b\"\nvips = [\"10.9.2.100\"]\n"
        );
        let key = Key::from_hex(&"ab".repeat(32)).unwrap();
        Sites::new(&toml::from_str(&text).unwrap(), key).unwrap()
    }

    fn vip(healthy: bool) -> VipState {
        VipState {
            vip: "10.9.1.100".parse().unwrap(),
            remaining: None,
            capacity: None,
            healthy,
            room: healthy,
        }
    }

    fn answer(s: &Sites) -> Vec<String> {
        let client = "192.0.2.1".parse().unwrap();
        let mut out = Vec::new();
        s.addresses(0, false, client, &mut out);
        out.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn with_every_site_down_the_last_healthy_list_or_nothing_is_answered() {
        for (policy, want) in [("last_healthy", vec!["10.9.2.100"]), ("empty", vec![])] {
            let s = sites(policy);
            s.refresh_local(|_, _| vip(false));
            assert_eq!(answer(&s), ["10.9.2.100"], "only b is up");
            s.change(|t| {
                t.record_check(0, 1, None);
                None
            });
            assert_eq!(answer(&s), want, "{policy}");
            // b back: answered again; a healthy again: both.
            s.change(|t| {
                t.record_check(0, 1, Some(Duration::from_millis(1)));
                None
            });
            s.refresh_local(|_, _| vip(true));
            assert_eq!(answer(&s).len(), 2, "{policy}");
        }
    }

    #[test]
    fn a_redirect_goes_to_another_site_never_this_one() {
        let s = sites("empty");
        s.refresh_local(|_, _| vip(true));
        let client = "192.0.2.1".parse().unwrap();
        let local: IpAddr = "10.9.1.100".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(
                s.redirect_target(local, 80, client),
                Some("10.9.2.100".parse().unwrap())
            );
        }
        assert_eq!(
            s.redirect_target(local, 81, client),
            None,
            "another port is not the name's"
        );
        s.change(|t| {
            t.record_check(0, 1, None);
            None
        });
        assert_eq!(s.redirect_target(local, 80, client), None, "b is down");
    }

    #[test]
    fn a_local_room_change_triggers_an_update_and_a_steady_one_does_not() {
        let s = sites("empty");
        let mut triggers = s.triggers();
        s.refresh_local(|_, _| vip(true));
        assert!(
            !triggers.has_changed().unwrap(),
            "the first reading is no change"
        );
        s.refresh_local(|_, _| vip(true));
        assert!(!triggers.has_changed().unwrap());
        s.refresh_local(|_, _| vip(false));
        assert!(triggers.has_changed().unwrap());
        assert!(triggers.borrow_and_update().contains("no room left"));
    }
}
