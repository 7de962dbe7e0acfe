//! What this site knows of every site: its own checks of each site's VIPs,
//! the last state each other site sent, and its own VIPs' room. The one
//! owner of those facts; the plans the answers read are derived from it.

use std::time::{Duration, Instant};

use fep_shared::sites::{NameState, SiteRtt, SiteState, VipState};
use fep_shared::SitesConfig;

use super::handoff::Matrix;
use super::plan::{NamePlan, SiteSlot};
use super::regions::{RegionId, Regions};

/// Names with this many sites or fewer weigh sites by the connections they
/// have left, not by the hand-off table (document 002).
const FEW_SITES: usize = 3;

/// One check target as this site measures it.
#[derive(Debug, Clone, Copy, Default)]
struct Check {
    /// Time-weighted average of the successful checks' times.
    avg_ms: Option<f64>,
    /// Consecutive failures.
    fails: u32,
    /// Whether any check finished yet: until one does a site counts as up,
    /// so a start does not answer "nobody" for the first interval.
    checked: bool,
}

#[derive(Debug, Clone)]
struct Report {
    state: SiteState,
    at: Instant,
}

#[derive(Debug)]
pub struct SiteTable {
    me: usize,
    names: Vec<String>,
    sites: Vec<String>,
    site_regions: Vec<Option<RegionId>>,
    /// Per name, the indexes of its sites in `sites`, in config order.
    name_sites: Vec<Vec<usize>>,
    name_vips: Vec<Vec<Vec<std::net::IpAddr>>>,
    ohw: Vec<Vec<u32>>,
    regions: Regions,
    check_fails: u32,
    rtt_weight: f64,
    report_max_age: Duration,
    /// `[name][slot]`: this site's checks, slot as in `name_sites`.
    checks: Vec<Vec<Check>>,
    /// Per site, the last state it sent.
    reports: Vec<Option<Report>>,
    /// Per name, this site's own VIPs.
    local: Vec<Vec<VipState>>,
}

impl SiteTable {
    pub fn new(cfg: &SitesConfig) -> SiteTable {
        let sites: Vec<String> = cfg.sites.iter().map(|s| s.name.clone()).collect();
        let index = |name: &str| sites.iter().position(|s| s == name).unwrap_or(0);
        let mut regions = Regions::new(&cfg.regions);
        let site_regions = cfg
            .sites
            .iter()
            .map(|s| s.region.as_deref().map(|r| regions.intern(r)))
            .collect();
        SiteTable {
            me: index(&cfg.me),
            names: cfg.names.iter().map(|n| n.name.clone()).collect(),
            name_sites: cfg
                .names
                .iter()
                .map(|n| n.sites.iter().map(|at| index(&at.site)).collect())
                .collect(),
            name_vips: cfg
                .names
                .iter()
                .map(|n| n.sites.iter().map(|at| at.vips.clone()).collect())
                .collect(),
            ohw: cfg.names.iter().map(|n| n.ohw.clone()).collect(),
            checks: cfg
                .names
                .iter()
                .map(|n| vec![Check::default(); n.sites.len()])
                .collect(),
            reports: vec![None; sites.len()],
            local: vec![Vec::new(); cfg.names.len()],
            sites,
            site_regions,
            regions,
            check_fails: cfg.check_fails,
            rtt_weight: f64::from(cfg.rtt_weight_percent) / 100.0,
            report_max_age: Duration::from_millis(cfg.report_max_age_ms),
        }
    }

    pub fn regions(&self) -> &Regions {
        &self.regions
    }

    fn up(&self, check: &Check) -> bool {
        !check.checked || check.fails < self.check_fails
    }

    /// Records one check of `name`'s slot `slot` (its time, or a failure);
    /// returns whether the site went up or down.
    pub fn record_check(&mut self, name: usize, slot: usize, took: Option<Duration>) -> bool {
        let (fails, weight) = (self.check_fails, self.rtt_weight);
        let Some(check) = self.checks.get_mut(name).and_then(|c| c.get_mut(slot)) else {
            return false;
        };
        let was_up = !check.checked || check.fails < fails;
        match took {
            Some(t) => {
                let ms = t.as_secs_f64() * 1000.0;
                check.avg_ms = Some(match check.avg_ms {
                    Some(avg) => avg + weight * (ms - avg),
                    None => ms,
                });
                check.fails = 0;
            }
            None => check.fails = check.fails.saturating_add(1),
        }
        check.checked = true;
        was_up != (check.fails < fails)
    }

    /// This site's own VIPs of `name`; returns whether their room changed.
    pub fn set_local(&mut self, name: usize, vips: Vec<VipState>) -> bool {
        let Some(local) = self.local.get_mut(name) else {
            return false;
        };
        let room = |v: &[VipState]| v.iter().any(|s| s.room);
        let changed = room(local) != room(&vips) && !local.is_empty();
        *local = vips;
        changed
    }

    /// Takes `site`'s update, whole.
    pub fn accept(&mut self, site: usize, state: SiteState, now: Instant) {
        if site != self.me {
            if let Some(r) = self.reports.get_mut(site) {
                *r = Some(Report { state, at: now });
            }
        }
    }

    pub fn site_index(&self, name: &str) -> Option<usize> {
        self.sites.iter().position(|s| s == name)
    }

    /// What this site sends the others.
    pub fn own_state(&self, reason: &str) -> SiteState {
        let names = (0..self.names.len())
            .map(|n| NameState {
                name: self.names[n].clone(),
                rtt_ms: self.name_sites[n]
                    .iter()
                    .zip(&self.checks[n])
                    .map(|(&site, check)| SiteRtt {
                        site: self.sites[site].clone(),
                        ms: self.measured(check),
                    })
                    .collect(),
                vips: self.local[n].clone(),
            })
            .collect();
        SiteState {
            reason: reason.to_string(),
            names,
        }
    }

    fn measured(&self, check: &Check) -> Option<u32> {
        match self.up(check) {
            true => check
                .avg_ms
                .map(|ms| ms.round().clamp(0.0, f64::from(u32::MAX)) as u32),
            false => None,
        }
    }

    /// A fresh report's entry for `name` from `site`.
    fn report(&self, site: usize, name: &str, now: Instant) -> Option<&NameState> {
        let r = self.reports.get(site)?.as_ref()?;
        if now.saturating_duration_since(r.at) > self.report_max_age {
            return None;
        }
        r.state.names.iter().find(|n| n.name == name)
    }

    /// The VIPs `site` has for `name`: this site's own, or what it reported.
    fn vips_of(&self, n: usize, site: usize, now: Instant) -> Option<&[VipState]> {
        match site == self.me {
            true => Some(&self.local[n])
                .filter(|v| !v.is_empty())
                .map(|v| v.as_slice()),
            false => self
                .report(site, &self.names[n], now)
                .map(|r| r.vips.as_slice()),
        }
    }

    /// Every name's plan as of `now`.
    pub fn plans(&self, now: Instant) -> Vec<NamePlan> {
        (0..self.names.len()).map(|n| self.plan(n, now)).collect()
    }

    fn plan(&self, n: usize, now: Instant) -> NamePlan {
        let slots = &self.name_sites[n];
        let weights: Vec<u64> = match slots.len() > FEW_SITES {
            true => self
                .matrix(n, now)
                .totals(&self.ohw[n])
                .into_iter()
                .map(u64::from)
                .collect(),
            false => slots
                .iter()
                .map(|&site| remaining_permille(self.vips_of(n, site, now)))
                .collect(),
        };
        NamePlan::new(
            slots
                .iter()
                .enumerate()
                .map(|(slot, &site)| SiteSlot {
                    name: self.sites[site].clone(),
                    vips: self.name_vips[n][slot].clone(),
                    region: self.site_regions[site],
                    // Reached by the checks, and a back end behind it (its
                    // listener may answer a check with a redirect).
                    up: self.up(&self.checks[n][slot])
                        && self
                            .vips_of(n, site, now)
                            .is_none_or(|v| v.iter().any(|s| s.healthy)),
                    // Unknown (no fresh report): assume room; its own checks
                    // still say whether it is up.
                    room: self
                        .vips_of(n, site, now)
                        .is_none_or(|v| v.iter().any(|s| s.room)),
                    weight: weights[slot],
                })
                .collect(),
        )
    }

    /// `name`'s response-time matrix over its sites (slot indexes): this
    /// site's column from its own checks, the others from their reports.
    fn matrix(&self, n: usize, now: Instant) -> Matrix {
        let slots = &self.name_sites[n];
        let mut m = Matrix::new(slots.len());
        for (tester_slot, &tester) in slots.iter().enumerate() {
            for (tested_slot, &tested) in slots.iter().enumerate() {
                let ms = match tester == self.me {
                    true => self.measured(&self.checks[n][tested_slot]),
                    false => self.report(tester, &self.names[n], now).and_then(|r| {
                        r.rtt_ms
                            .iter()
                            .find(|e| e.site == self.sites[tested])
                            .and_then(|e| e.ms)
                    }),
                };
                m.set(tested_slot, tester_slot, ms);
            }
        }
        m
    }
}

/// Remaining connections over capacity, in ‰; 1000 where no limit is known.
fn remaining_permille(vips: Option<&[VipState]>) -> u64 {
    let (mut left, mut cap) = (0u64, 0u64);
    for v in vips.unwrap_or(&[]) {
        if let (Some(r), Some(c)) = (v.remaining, v.capacity) {
            left += r;
            cap += c;
        }
    }
    match cap {
        0 => 1000,
        _ => left * 1000 / cap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(sites: &[&str]) -> SitesConfig {
        let mut text = String::from(
            "me = \"a\"\nkey_file = \"/k\"\nlisten = \"10.0.0.1:1\"\ncheck_fails = 2\n",
        );
        for (i, s) in sites.iter().enumerate() {
            text.push_str(&format!(
                "[[site]]\nname = \"{s}\"\nexchange = \"10.0.0.{}:1\"\n",
                i + 1
            ));
        }
        text.push_str("[[name]]\nname = \"www.example.test\"\nport = 80\nohw = [4, 2, 1]\n");
        for (i, s) in sites.iter().enumerate() {
            text.push_str(&format!(
                "[[name.at]]\nsite = \"{s}\"\nvips = [\"10.9.0.{}\"]\n",
                i + 1
            ));
        }
        toml::from_str(&text).unwrap()
    }

    fn report(t: &SiteTable, rtts: &[(&str, Option<u32>)], room: Option<bool>) -> SiteState {
        let mut own = t.own_state("test");
        own.names[0].rtt_ms = rtts
            .iter()
            .map(|(s, ms)| SiteRtt {
                site: s.to_string(),
                ms: *ms,
            })
            .collect();
        own.names[0].vips = room
            .map(|room| VipState {
                vip: "10.9.0.9".parse().unwrap(),
                remaining: Some(if room { 50 } else { 0 }),
                capacity: Some(100),
                healthy: true,
                room,
            })
            .into_iter()
            .collect();
        own
    }

    #[test]
    fn four_sites_weigh_by_the_matrix_built_from_own_checks_and_reports() {
        let mut t = SiteTable::new(&config(&["a", "b", "c", "d"]));
        let now = Instant::now();
        for (slot, ms) in [(1, 10), (2, 20), (3, 30)] {
            t.record_check(0, slot, Some(Duration::from_millis(ms)));
        }
        // b, c, d all rank a first.
        for (site, rtts) in [
            (1, [("a", Some(1)), ("c", Some(5)), ("d", Some(9))]),
            (2, [("a", Some(1)), ("b", Some(5)), ("d", Some(9))]),
            (3, [("a", Some(1)), ("b", Some(5)), ("c", Some(9))]),
        ] {
            let state = report(&t, &rtts, None);
            t.accept(site, state, now);
        }
        let plan = &t.plans(now)[0];
        let w: Vec<u64> = plan.sites().iter().map(|s| s.weight).collect();
        // a: rank 1 ×3 = 12; b: rank 1 (from a) + rank 2 ×2 = 4 + 4 = 8;
        // c: rank 2 (a) + rank 2 (b) + rank 3 (d) = 2 + 2 + 1 = 5; d: rank 3 ×3 = 3.
        assert_eq!(w, [12, 8, 5, 3]);
    }

    #[test]
    fn a_site_is_down_after_the_configured_failures_and_up_after_one_success() {
        let mut t = SiteTable::new(&config(&["a", "b"]));
        let now = Instant::now();
        assert!(t.plans(now)[0].sites()[1].up, "unchecked counts as up");
        assert!(!t.record_check(0, 1, None));
        assert!(
            t.record_check(0, 1, None),
            "the second failure turns it down"
        );
        assert!(!t.plans(now)[0].sites()[1].up);
        assert_eq!(t.own_state("x").names[0].rtt_ms[1].ms, None);
        assert!(t.record_check(0, 1, Some(Duration::from_millis(3))));
        assert_eq!(t.own_state("x").names[0].rtt_ms[1].ms, Some(3));
    }

    #[test]
    fn few_sites_weigh_by_remaining_connections_and_full_reports_count_until_stale() {
        let mut t = SiteTable::new(&config(&["a", "b"]));
        let now = Instant::now();
        t.set_local(
            0,
            vec![VipState {
                vip: "10.9.0.1".parse().unwrap(),
                remaining: Some(25),
                capacity: Some(100),
                healthy: true,
                room: true,
            }],
        );
        let full = report(&t, &[], Some(false));
        t.accept(1, full, now);
        let plan = &t.plans(now)[0];
        assert_eq!((plan.sites()[0].weight, plan.sites()[1].weight), (250, 0));
        assert!(!plan.sites()[1].room);
        let later = now + Duration::from_secs(60);
        assert!(
            t.plans(later)[0].sites()[1].room,
            "a stale report is not trusted"
        );
    }

    #[test]
    fn a_site_without_a_healthy_back_end_is_down_whatever_its_checks_say() {
        let mut t = SiteTable::new(&config(&["a", "b"]));
        let now = Instant::now();
        let sick = VipState {
            vip: "10.9.0.1".parse().unwrap(),
            remaining: None,
            capacity: None,
            healthy: false,
            room: false,
        };
        t.set_local(0, vec![sick.clone()]);
        let mut state = report(&t, &[], None);
        state.names[0].vips = vec![sick];
        t.record_check(0, 1, Some(Duration::from_millis(2)));
        t.accept(1, state, now);
        let plan = &t.plans(now)[0];
        assert!(!plan.sites()[0].up && !plan.sites()[1].up, "{plan:?}");
    }

    #[test]
    fn the_average_moves_by_the_configured_weight() {
        let mut t = SiteTable::new(&config(&["a", "b"]));
        t.record_check(0, 1, Some(Duration::from_millis(100)));
        t.record_check(0, 1, Some(Duration::from_millis(200)));
        // 100 + 0.3 × (200 − 100)
        assert_eq!(t.own_state("x").names[0].rtt_ms[1].ms, Some(130));
    }
}
