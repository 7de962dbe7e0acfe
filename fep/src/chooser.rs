//! Choosing the back end for a new route.
//!
//! The schedulers are deterministic and skip back ends whose ratio is 0.
//! Ratios are read at every choice, so a ratio change steers the very next
//! new route; existing routes are never touched here.

use std::sync::Mutex;

use fep_shared::Scheduler;

/// What the chooser reads of a back end at each choice. The transfer table's
/// back ends implement it; the chooser knows nothing else of them.
pub(crate) trait Candidate {
    /// The effective ratio; 0 is never chosen.
    fn ratio(&self) -> u32;
    /// Routes assigned to it, open or closing.
    fn routes(&self) -> u32;
    /// The load the agent reported, in the service's load metric.
    fn load(&self) -> f64;
    /// Breaks ties between back ends the scheduler ranks equal: the higher
    /// wins (HTTP mode: idle pooled connections), then table order.
    fn preference(&self) -> u32 {
        0
    }
}

impl<C: Candidate> Candidate for &C {
    fn ratio(&self) -> u32 {
        (*self).ratio()
    }
    fn routes(&self) -> u32 {
        (*self).routes()
    }
    fn load(&self) -> f64 {
        (*self).load()
    }
    fn preference(&self) -> u32 {
        (*self).preference()
    }
}

#[derive(Debug)]
pub(crate) enum Chooser {
    /// Smooth weighted round robin; the state is each back end's current weight.
    Ratio(Mutex<Vec<i64>>),
    /// Lowest (routes ÷ ratio), ties by table order; no state of its own.
    LeastRoutes,
    /// Lowest (reported load ÷ ratio), ties by table order.
    Load,
}

impl Chooser {
    pub(crate) fn new(scheduler: Scheduler, backends: usize) -> Self {
        match scheduler {
            Scheduler::Ratio => Chooser::Ratio(Mutex::new(vec![0; backends])),
            Scheduler::LeastRoutes => Chooser::LeastRoutes,
            Scheduler::Load => Chooser::Load,
        }
    }

    pub(crate) fn scheduler(&self) -> Scheduler {
        match self {
            Chooser::Ratio(_) => Scheduler::Ratio,
            Chooser::LeastRoutes => Scheduler::LeastRoutes,
            Chooser::Load => Scheduler::Load,
        }
    }

    /// Index of the chosen back end among `backends` (one per back-end
    /// slot, in order), `None` if every ratio is 0.
    pub(crate) fn choose<C: Candidate>(
        &self,
        backends: impl IntoIterator<Item = C>,
    ) -> Option<usize> {
        self.pick(backends, true)
    }

    /// The back end [`Chooser::choose`] would return now, leaving the
    /// round robin where it is (`fepctl explain`).
    pub(crate) fn peek<C: Candidate>(
        &self,
        backends: impl IntoIterator<Item = C>,
    ) -> Option<usize> {
        self.pick(backends, false)
    }

    fn pick<C: Candidate>(
        &self,
        backends: impl IntoIterator<Item = C>,
        take: bool,
    ) -> Option<usize> {
        let backends = backends.into_iter();
        match self {
            Chooser::Ratio(current) => {
                let mut current = current.lock().unwrap_or_else(|e| e.into_inner());
                let mut copy;
                let weights: &mut [i64] = if take {
                    &mut current
                } else {
                    copy = current.clone();
                    &mut copy
                };
                let slots = weights.len();
                smooth_weighted(
                    weights,
                    backends.take(slots).map(|b| (b.ratio(), b.preference())),
                )
            }
            Chooser::LeastRoutes => {
                least_routes(backends.map(|b| (b.routes(), b.ratio(), b.preference())))
            }
            Chooser::Load => least_load(backends.map(|b| (b.load(), b.ratio(), b.preference()))),
        }
    }
}

/// Among running back ends (ratio above 0; a stopped or down
/// node has ratio 0), the smallest load ÷ ratio wins; on ties the higher
/// preference, then the first.
fn least_load(candidates: impl Iterator<Item = (f64, u32, u32)>) -> Option<usize> {
    let mut best: Option<(usize, f64, u32)> = None;
    for (i, (load, ratio, pref)) in candidates.enumerate() {
        if ratio == 0 {
            continue;
        }
        let per_ratio = load / f64::from(ratio);
        if best.is_none_or(|(_, b, bp)| per_ratio < b || (per_ratio == b && pref > bp)) {
            best = Some((i, per_ratio, pref));
        }
    }
    best.map(|(i, _, _)| i)
}

/// nginx's smooth weighted round robin: every back end gains its weight, the
/// largest current weight wins (on ties the higher preference, then the
/// first) and pays back the total. Over any window of Σweights choices each
/// back end is picked exactly `weight` times, interleaved rather than in runs.
fn smooth_weighted(
    current: &mut [i64],
    weights: impl Iterator<Item = (u32, u32)>,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<(usize, u32)> = None;
    for (i, (w, pref)) in weights.enumerate() {
        let w = i64::from(w);
        if w == 0 {
            current[i] = 0;
            continue;
        }
        current[i] += w;
        total += w;
        if best.is_none_or(|(b, bp)| {
            current[i] > current[b] || (current[i] == current[b] && pref > bp)
        }) {
            best = Some((i, pref));
        }
    }
    let (b, _) = best?;
    current[b] -= total;
    Some(b)
}

/// The back end with the lowest routes ÷ ratio (compared by cross
/// multiplication, so no floating point); on ties the higher preference,
/// then the first.
fn least_routes(candidates: impl Iterator<Item = (u32, u32, u32)>) -> Option<usize> {
    let mut best: Option<(usize, u64, u64, u32)> = None;
    for (i, (routes, ratio, pref)) in candidates.enumerate() {
        if ratio == 0 {
            continue;
        }
        let (routes, ratio) = (u64::from(routes), u64::from(ratio));
        let better = |(_, br, bw, bp): (usize, u64, u64, u32)| {
            let (mine, theirs) = (routes * bw, br * ratio);
            mine < theirs || (mine == theirs && pref > bp)
        };
        if best.is_none_or(better) {
            best = Some((i, routes, ratio, pref));
        }
    }
    best.map(|(i, _, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The schedulers with no preference among equals.
    fn sw(current: &mut [i64], weights: impl Iterator<Item = u32>) -> Option<usize> {
        smooth_weighted(current, weights.map(|w| (w, 0)))
    }
    fn lr(candidates: impl Iterator<Item = (u32, u32)>) -> Option<usize> {
        least_routes(candidates.map(|(r, w)| (r, w, 0)))
    }
    fn ll(candidates: impl Iterator<Item = (f64, u32)>) -> Option<usize> {
        least_load(candidates.map(|(l, w)| (l, w, 0)))
    }

    #[test]
    fn ties_go_to_the_higher_preference_then_the_first() {
        assert_eq!(
            least_routes([(1, 1, 0), (1, 1, 5), (1, 1, 5)].into_iter()),
            Some(1)
        );
        assert_eq!(
            least_routes([(0, 1, 0), (1, 1, 9)].into_iter()),
            Some(0),
            "only ties"
        );
        assert_eq!(least_load([(2.0, 1, 1), (2.0, 1, 3)].into_iter()), Some(1));
        let mut current = [0i64; 2];
        assert_eq!(
            smooth_weighted(&mut current, [(1, 0), (1, 4)].into_iter()),
            Some(1)
        );
        assert_eq!(
            smooth_weighted(&mut current, [(1, 0), (1, 4)].into_iter()),
            Some(0),
            "still 1:1"
        );
    }

    /// Runs `n` choices with the given ratios; for least-routes every choice
    /// becomes a live route, as it would for clients that stay connected.
    fn sequence(scheduler: Scheduler, ratios: &[u32], n: usize) -> Vec<usize> {
        let chooser = Chooser::new(scheduler, ratios.len());
        let mut routes = vec![0u32; ratios.len()];
        let mut out = Vec::new();
        for _ in 0..n {
            let pick = match &chooser {
                Chooser::Ratio(cur) => sw(&mut cur.lock().unwrap(), ratios.iter().copied()),
                Chooser::LeastRoutes => lr(routes.iter().copied().zip(ratios.iter().copied())),
                Chooser::Load => unreachable!("the tests drive load separately"),
            }
            .unwrap();
            routes[pick] += 1;
            out.push(pick);
        }
        out
    }

    const BOTH: [Scheduler; 2] = [Scheduler::Ratio, Scheduler::LeastRoutes];

    /// A back end with a fixed ratio, route count and load.
    struct Fixed(u32, u32, f64);

    impl Candidate for Fixed {
        fn ratio(&self) -> u32 {
            self.0
        }
        fn routes(&self) -> u32 {
            self.1
        }
        fn load(&self) -> f64 {
            self.2
        }
    }

    #[test]
    fn a_peek_names_the_next_choice_and_leaves_the_round_robin_where_it_is() {
        for scheduler in [Scheduler::Ratio, Scheduler::LeastRoutes, Scheduler::Load] {
            let c = Chooser::new(scheduler, 2);
            let backends = [Fixed(2, 0, 0.0), Fixed(1, 0, 0.0)];
            let mut seen = Vec::new();
            for _ in 0..6 {
                let next = c.peek(&backends);
                assert_eq!(
                    c.peek(&backends),
                    next,
                    "{scheduler:?}: a peek changes nothing"
                );
                assert_eq!(c.choose(&backends), next, "{scheduler:?}");
                seen.push(next.unwrap());
            }
            if scheduler == Scheduler::Ratio {
                assert_eq!(seen, [0, 1, 0, 0, 1, 0]);
            }
        }
    }

    #[test]
    fn golden_8081_c2_d1_goes_c_d_c_c_d_c() {
        // The golden example: six new clients of 8081 with C:2, D:1.
        const C: usize = 0;
        const D: usize = 1;
        for s in BOTH {
            assert_eq!(sequence(s, &[2, 1], 6), vec![C, D, C, C, D, C], "{s:?}");
        }
    }

    #[test]
    fn golden_one_to_one_alternates() {
        // The golden example: 8080 with A:1, B:1 (and 8082 with E:1, F:1) go A, B, A, B.
        for s in BOTH {
            assert_eq!(sequence(s, &[1, 1], 4), vec![0, 1, 0, 1], "{s:?}");
        }
    }

    #[test]
    fn ratio_zero_is_never_chosen() {
        for s in BOTH {
            assert!(
                sequence(s, &[0, 3, 0, 1], 40)
                    .iter()
                    .all(|&i| i == 1 || i == 3),
                "{s:?}"
            );
        }
    }

    #[test]
    fn all_zero_means_no_backend() {
        assert_eq!(sw(&mut [0, 0], [0u32, 0].into_iter()), None);
        assert_eq!(lr([(0u32, 0u32), (5, 0)].into_iter()), None);
    }

    #[test]
    fn shares_follow_ratios_exactly_over_each_window() {
        // 2:1:1 over 400 choices: exactly 200/100/100 for both schedulers.
        for s in BOTH {
            let seq = sequence(s, &[2, 1, 1], 400);
            let counts = [0, 1, 2].map(|i| seq.iter().filter(|&&p| p == i).count());
            assert_eq!(counts, [200, 100, 100], "{s:?}");
        }
    }

    #[test]
    fn least_load_takes_the_smallest_load_per_ratio_and_skips_ratio_zero() {
        // The load scheduler's golden example; a stopped host reaches the chooser with
        // effective ratio 0 (the golden Fig. 6 through the model and the
        // dispatcher is in control::model's tests).
        assert_eq!(ll([(20.0, 2), (15.0, 1), (0.0, 0)].into_iter()), Some(0));
        // No running server: no choice ("no server available").
        assert_eq!(ll([(20.0, 0), (15.0, 0)].into_iter()), None);
    }

    #[test]
    fn a_back_end_back_from_ratio_zero_is_interleaved_afresh() {
        // 1:2, then b at ratio 0 for one choice, then 1:2 again: b's old
        // weight is forgotten, so the next window interleaves b, a, b.
        let mut current = [0i64; 2];
        let mut picks = Vec::new();
        for weights in [[1, 2], [1, 2], [1, 0], [1, 2], [1, 2], [1, 2]] {
            picks.push(sw(&mut current, weights.into_iter()).unwrap());
        }
        assert_eq!(picks, vec![1, 0, 0, 1, 0, 1]);
    }

    #[test]
    fn equal_load_per_ratio_goes_to_the_first_and_lower_load_wins() {
        assert_eq!(ll([(10.0, 1), (20.0, 2)].into_iter()), Some(0));
        assert_eq!(ll([(10.0, 1), (5.0, 1)].into_iter()), Some(1));
        assert_eq!(ll([(9.0, 3), (4.0, 1)].into_iter()), Some(0));
    }

    /// One service per scheduler, a (ratio 2) and b (ratio 1).
    const SCHEDULERS: &str = r#"
[[node]]
name = "a"
address = "10.0.2.1"
[[node]]
name = "b"
address = "10.0.2.2"
[[service]]
name = "ratio"
vip = "10.0.0.1"
port = 80
protocol = "tcp"
backend = [{ node = "a", ratio = 2 }, { node = "b", ratio = 1 }]
[[service]]
name = "least"
vip = "10.0.0.1"
port = 81
protocol = "tcp"
scheduler = "least-routes"
backend = [{ node = "a", ratio = 2 }, { node = "b", ratio = 1 }]
[[service]]
name = "load"
vip = "10.0.0.1"
port = 82
protocol = "tcp"
scheduler = "load"
backend = [{ node = "a", ratio = 2 }, { node = "b", ratio = 1 }]
"#;

    #[test]
    fn each_service_chooses_with_its_configured_scheduler() {
        use crate::transfer_table::TransferTable;
        let table = TransferTable::from_config(&fep_shared::FepConfig::parse(SCHEDULERS).unwrap());
        let expected = [Scheduler::Ratio, Scheduler::LeastRoutes, Scheduler::Load];
        for (id, s) in expected.into_iter().enumerate() {
            assert_eq!(table.scheduler(id as u16), s);
        }
        let picks = |svc: &crate::transfer_table::Service| -> Vec<u16> {
            (0..6)
                .map(|_| {
                    let b = svc.choose().unwrap();
                    svc.backends[usize::from(b)].route_added();
                    b
                })
                .collect()
        };
        // The golden C:2, D:1 for both route schedulers.
        assert_eq!(picks(table.service(0)), vec![0, 1, 0, 0, 1, 0]);
        assert_eq!(picks(table.service(1)), vec![0, 1, 0, 0, 1, 0]);
        // Load: a at 20 per 2, b at 15 per 1 → a; b dropping to 5 → b.
        let load = table.service(2);
        load.backends[0].set_load(20.0);
        load.backends[1].set_load(15.0);
        assert_eq!(load.choose(), Some(0));
        load.backends[1].set_load(5.0);
        assert_eq!(load.choose(), Some(1));
        load.backends[1].set_ratio(0);
        assert_eq!(load.choose(), Some(0));
        load.backends[0].set_ratio(0);
        assert_eq!(load.choose(), None);
    }

    #[test]
    fn least_routes_steers_live_shares_after_a_ratio_change() {
        // A holds 6 live routes and B 0 (B was at ratio 0); now 1:1 → B gets the
        // next 6 new routes until the shares are even.
        let picks: Vec<usize> = {
            let mut routes = [6u32, 0];
            (0..8)
                .map(|_| {
                    let p = lr(routes.iter().copied().zip([1u32, 1])).unwrap();
                    routes[p] += 1;
                    p
                })
                .collect()
        };
        assert_eq!(picks, vec![1, 1, 1, 1, 1, 1, 0, 1]);
        // 2 routes at ratio 1 against 0 at ratio 4: the larger share of
        // room wins.
        assert_eq!(lr([(2u32, 1u32), (0, 4)].into_iter()), Some(1));
        assert_eq!(lr([(1u32, 1u32), (3, 4)].into_iter()), Some(1));
    }
}
