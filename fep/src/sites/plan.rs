//! What a name answers now: per site its addresses, whether it may take
//! new clients and its hand-off weight; and the order of one answer.
//!
//! The first address rotates over the eligible sites (up, with room, weight
//! above 0) in proportion to their weights, by smooth weighted round robin,
//! so consecutive answers interleave rather than run in blocks. A query from
//! a region with an eligible site rotates over that region's sites only.
//! The other sites that are up and have room follow, by weight, then index.

use std::net::IpAddr;

use super::regions::RegionId;

/// One site as a name's answers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteSlot {
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub region: Option<RegionId>,
    /// This site's health checks reach it.
    pub up: bool,
    /// It takes new clients (not every back end at its limit, one healthy).
    pub room: bool,
    /// Its hand-off total (or its remaining-connection ratio in ‰ where a
    /// name has three sites or fewer).
    pub weight: u64,
}

impl SiteSlot {
    fn serves(&self, v6: bool) -> bool {
        self.vips.iter().any(|a| a.is_ipv6() == v6)
    }

    fn eligible(&self, v6: bool) -> bool {
        self.up && self.room && self.weight > 0 && self.serves(v6)
    }
}

/// A name's sites, in the order of `[[sites.name.at]]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamePlan {
    sites: Vec<SiteSlot>,
    /// Site indexes by weight, heaviest first (ties by index): the order of
    /// an answer after its first site, computed once per plan.
    by_weight: Vec<usize>,
}

/// The smooth weighted round robin's running state for one name (nginx's
/// algorithm): each pick adds every candidate's weight to its credit and
/// takes the most credited, which then pays the candidates' total.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    credit: Vec<i64>,
}

impl Rotation {
    /// Picks among the sites `candidate` admits, by `weight`; `None` when
    /// no candidate has a weight.
    fn pick(
        &mut self,
        sites: &[SiteSlot],
        candidate: impl Fn(usize, &SiteSlot) -> bool,
        weight: impl Fn(&SiteSlot) -> u64,
    ) -> Option<usize> {
        self.credit.resize(sites.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, site) in sites.iter().enumerate() {
            if !candidate(i, site) {
                continue;
            }
            let w = weight(site).min(1 << 32) as i64;
            if w == 0 {
                continue;
            }
            self.credit[i] += w;
            total += w;
            if best.is_none_or(|b| self.credit[i] > self.credit[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.credit[b] -= total;
        Some(b)
    }
}

/// Why an answer holds the sites it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A site was handed off by weight.
    HandedOff,
    /// Only sites without a weight, or full ones, were up: they are
    /// answered, so a client can still reach one.
    Fallback,
    /// No site is up.
    AllDown,
}

impl NamePlan {
    pub fn new(sites: Vec<SiteSlot>) -> NamePlan {
        let mut by_weight: Vec<usize> = (0..sites.len()).collect();
        by_weight.sort_by_key(|&i| (std::cmp::Reverse(sites[i].weight), i));
        NamePlan { sites, by_weight }
    }

    pub fn sites(&self) -> &[SiteSlot] {
        &self.sites
    }

    /// The answer's sites into `order` (cleared first), first the one
    /// handed off, for a query of family `v6` from `region`; site `skip`
    /// (a redirect's own site) counts as down.
    pub fn order(
        &self,
        rotation: &mut Rotation,
        v6: bool,
        region: Option<RegionId>,
        skip: Option<usize>,
        order: &mut Vec<usize>,
    ) -> Outcome {
        order.clear();
        let sites = self.sites.iter().enumerate();
        let up = |i: usize, s: &SiteSlot| s.up && Some(i) != skip;
        let eligible = |i: usize, s: &SiteSlot| up(i, s) && s.eligible(v6);
        let near = |s: &SiteSlot| region.is_some() && s.region == region;
        let first = match sites.clone().any(|(i, s)| eligible(i, s) && near(s)) {
            true => rotation.pick(&self.sites, |i, s| eligible(i, s) && near(s), |s| s.weight),
            false => rotation.pick(&self.sites, eligible, |s| s.weight),
        };
        let (first, outcome) = match first {
            Some(f) => (f, Outcome::HandedOff),
            None => {
                // A site with a weight is never passed over for one without;
                // with none, any site that is up, full or not, rather than
                // nothing.
                let open = |i: usize, s: &SiteSlot| up(i, s) && s.serves(v6);
                let room = sites.clone().any(|(i, s)| open(i, s) && s.room);
                match rotation.pick(&self.sites, |i, s| open(i, s) && (s.room || !room), |_| 1) {
                    Some(f) => (f, Outcome::Fallback),
                    None => return Outcome::AllDown,
                }
            }
        };
        let picked = self.sites[first].room;
        order.push(first);
        order.extend(self.by_weight.iter().copied().filter(|&i| {
            let s = &self.sites[i];
            i != first && up(i, s) && s.serves(v6) && (s.room || !picked)
        }));
        outcome
    }

    /// Appends the addresses of `sites` of family `v6` to `out`, in order.
    pub fn addresses(&self, sites: &[usize], v6: bool, out: &mut Vec<IpAddr>) {
        out.extend(
            sites
                .iter()
                .flat_map(|&i| self.sites[i].vips.iter())
                .filter(|a| a.is_ipv6() == v6),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_order(
        plan: &NamePlan,
        r: &mut Rotation,
        v6: bool,
        region: Option<RegionId>,
    ) -> (Vec<usize>, Outcome) {
        let mut out = Vec::new();
        let outcome = plan.order(r, v6, region, None, &mut out);
        (out, outcome)
    }

    fn addrs(plan: &NamePlan, sites: &[usize], v6: bool) -> Vec<IpAddr> {
        let mut out = Vec::new();
        plan.addresses(sites, v6, &mut out);
        out
    }

    fn slot(name: &str, vip: &str, weight: u64) -> SiteSlot {
        SiteSlot {
            name: name.into(),
            vips: vec![vip.parse().unwrap()],
            region: None,
            up: true,
            room: true,
            weight,
        }
    }

    /// Table V's weights: A 11, B 12, C 0, D 6, E 10, F 3.
    fn table_v() -> NamePlan {
        let w = [11, 12, 0, 6, 10, 3];
        NamePlan::new(
            (0..6)
                .map(|i| {
                    slot(
                        &format!("{}", (b'A' + i as u8) as char),
                        &format!("10.0.0.{i}"),
                        w[i],
                    )
                })
                .collect(),
        )
    }

    fn firsts(plan: &NamePlan, n: usize, region: Option<RegionId>) -> Vec<usize> {
        let mut r = Rotation::default();
        let mut count = vec![0; plan.sites.len()];
        for _ in 0..n {
            let (order, _) = answer_order(plan, &mut r, false, region);
            count[order[0]] += 1;
        }
        count
    }

    #[test]
    fn golden_table_v_first_answers_follow_the_shares_and_c_is_never_first() {
        // 42 picks are one whole cycle of the weights: exact shares.
        let plan = table_v();
        assert_eq!(firsts(&plan, 42 * 10, None), [110, 120, 0, 60, 100, 30]);
        let (order, outcome) = answer_order(&plan, &mut Rotation::default(), false, None);
        assert_eq!(outcome, Outcome::HandedOff);
        // C is healthy: it follows, last, behind every site with a weight.
        assert_eq!(*order.last().unwrap(), 2);
        assert_eq!(order.len(), 6);
    }

    #[test]
    fn consecutive_answers_interleave() {
        let plan = NamePlan::new(vec![slot("a", "10.0.0.1", 2), slot("b", "10.0.0.2", 1)]);
        let mut r = Rotation::default();
        let seq: Vec<usize> = (0..6)
            .map(|_| answer_order(&plan, &mut r, false, None).0[0])
            .collect();
        assert_eq!(seq, [0, 1, 0, 0, 1, 0]);
    }

    #[test]
    fn down_and_full_sites_are_skipped_and_left_out() {
        let mut plan = table_v();
        plan.sites[1].up = false;
        plan.sites[4].room = false;
        let counts = firsts(&plan, 200, None);
        assert_eq!((counts[1], counts[4], counts[2]), (0, 0, 0));
        let (order, _) = answer_order(&plan, &mut Rotation::default(), false, None);
        assert!(!order.contains(&1) && !order.contains(&4), "{order:?}");
    }

    #[test]
    fn a_query_from_a_region_with_a_site_gets_that_site_first() {
        let mut plan = table_v();
        plan.sites[5].region = Some(3);
        assert_eq!(firsts(&plan, 50, Some(3))[5], 50);
        // That site down: the others, by weight.
        plan.sites[5].up = false;
        assert_eq!(firsts(&plan, 39, Some(3)), [11, 12, 0, 6, 10, 0]);
    }

    #[test]
    fn with_no_weighted_site_up_the_healthy_ones_are_answered_and_with_none_nothing() {
        let mut plan = table_v();
        for i in [0, 1, 3, 4, 5] {
            plan.sites[i].up = false;
        }
        let (order, outcome) = answer_order(&plan, &mut Rotation::default(), false, None);
        assert_eq!((order, outcome), (vec![2], Outcome::Fallback));
        plan.sites[2].up = false;
        let (order, outcome) = answer_order(&plan, &mut Rotation::default(), false, None);
        assert_eq!((order.len(), outcome), (0, Outcome::AllDown));
    }

    #[test]
    fn every_site_full_answers_the_full_ones_and_families_are_kept_apart() {
        let mut plan = NamePlan::new(vec![slot("a", "10.0.0.1", 1), slot("b", "fd00::2", 1)]);
        plan.sites[0].room = false;
        let (order, outcome) = answer_order(&plan, &mut Rotation::default(), false, None);
        assert_eq!((order.clone(), outcome), (vec![0], Outcome::Fallback));
        assert_eq!(
            addrs(&plan, &order, false),
            ["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let (order, _) = answer_order(&plan, &mut Rotation::default(), true, None);
        assert_eq!(
            addrs(&plan, &order, true),
            ["fd00::2".parse::<IpAddr>().unwrap()]
        );
    }
}
