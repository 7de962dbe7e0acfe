//! The ordered hand-off table: from the response times every site measured
//! to every other, how much of a name's traffic each site gets first.
//!
//! For each tester the other sites are ranked by ascending response time;
//! a site's total is Σ over ranks r of (testers that rank it r) × OHW[r];
//! its share is its total over the sum. A site with total 0 is never handed
//! a client first. Pure: the same matrix gives every site the same table.

/// Response times in ms, `rtt(tested, tester)`; `None` where the tester has
/// no measurement (or sees the tested site down), which leaves the tested
/// site out of that tester's ranking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matrix {
    sites: usize,
    cells: Vec<Option<u32>>,
}

impl Matrix {
    pub fn new(sites: usize) -> Matrix {
        Matrix {
            sites,
            cells: vec![None; sites * sites],
        }
    }

    /// Records what `tester` measured to `tested`; a site does not rank
    /// itself, so the diagonal stays empty.
    pub fn set(&mut self, tested: usize, tester: usize, ms: Option<u32>) {
        if tested != tester && tested < self.sites && tester < self.sites {
            self.cells[tested * self.sites + tester] = ms;
        }
    }

    pub fn get(&self, tested: usize, tester: usize) -> Option<u32> {
        self.cells
            .get(tested * self.sites + tester)
            .copied()
            .flatten()
    }

    /// The sites `tester` measured, fastest first (ties by index).
    pub fn preference(&self, tester: usize) -> Vec<usize> {
        let mut measured: Vec<(u32, usize)> = (0..self.sites)
            .filter_map(|tested| self.get(tested, tester).map(|ms| (ms, tested)))
            .collect();
        measured.sort_unstable();
        measured.into_iter().map(|(_, site)| site).collect()
    }

    /// `counts[site][r]`: how many testers rank `site` at rank `r` (0-based),
    /// for the first `ranks` ranks.
    pub fn rank_counts(&self, ranks: usize) -> Vec<Vec<u32>> {
        let mut counts = vec![vec![0; ranks]; self.sites];
        for tester in 0..self.sites {
            for (rank, site) in self.preference(tester).into_iter().take(ranks).enumerate() {
                counts[site][rank] += 1;
            }
        }
        counts
    }

    /// Each site's total under the ordered hand-off weights `ohw`.
    pub fn totals(&self, ohw: &[u32]) -> Vec<u32> {
        self.rank_counts(ohw.len())
            .iter()
            .map(|counts| counts.iter().zip(ohw).map(|(c, w)| c * w).sum())
            .collect()
    }
}

/// Totals as whole percentages of their sum (all 0 when the sum is).
pub fn percent<T: Copy + Into<u64>>(totals: &[T]) -> Vec<u32> {
    let sum: u64 = totals.iter().map(|&t| t.into()).sum();
    totals
        .iter()
        .map(|&t| match sum {
            0 => 0,
            // Rounded half up.
            _ => ((t.into() * 200 + sum) / (2 * sum)) as u32,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Document 002's Table I: rows are the tested site, columns the tester.
    const TABLE_I: [[u32; 6]; 6] = [
        [0, 3155, 1073, 3439, 113, 641],
        [2925, 0, 1314, 378, 813, 1827],
        [1364, 207, 0, 3869, 995, 3883],
        [197, 2490, 1997, 0, 1190, 339],
        [3702, 1106, 1743, 2344, 0, 468],
        [1759, 1409, 683, 2235, 419, 0],
    ];
    const A: usize = 0;
    const B: usize = 1;
    const C: usize = 2;
    const D: usize = 3;
    const E: usize = 4;
    const F: usize = 5;

    fn table_i() -> Matrix {
        let mut m = Matrix::new(6);
        for (tested, row) in TABLE_I.iter().enumerate() {
            for (tester, &ms) in row.iter().enumerate() {
                m.set(tested, tester, Some(ms));
            }
        }
        m
    }

    #[test]
    fn golden_table_i_preference_lists() {
        let m = table_i();
        assert_eq!(m.preference(A), [D, C, F, B, E]);
        assert_eq!(m.preference(B), [C, E, F, D, A]);
        assert_eq!(m.preference(C), [F, A, B, E, D]);
        assert_eq!(m.preference(D), [B, F, E, A, C]);
        assert_eq!(m.preference(E), [A, F, B, C, D]);
        assert_eq!(m.preference(F), [D, E, A, B, C]);
    }

    #[test]
    fn golden_table_i_rank_counts_totals_and_shares() {
        let m = table_i();
        let counts = m.rank_counts(3);
        let column = |r: usize| counts.iter().map(|c| c[r]).collect::<Vec<_>>();
        assert_eq!(column(0), [1, 1, 1, 2, 0, 1]);
        assert_eq!(column(1), [1, 0, 1, 0, 2, 2]);
        assert_eq!(column(2), [1, 2, 0, 0, 1, 2]);
        let totals = m.totals(&[4, 2, 1, 0, 0, 0]);
        // The document prints D's line as 10 by mistake: 8 is right.
        assert_eq!(totals, [7, 6, 6, 8, 5, 10]);
        assert_eq!(totals.iter().sum::<u32>(), 42);
        assert_eq!(percent(&totals), [17, 14, 14, 19, 12, 24]);
    }

    #[test]
    fn golden_table_v_weights_given_directly() {
        let shares = percent(&[11u32, 12, 0, 6, 10, 3]);
        assert_eq!(shares, [26, 29, 0, 14, 24, 7]);
    }

    #[test]
    fn a_tester_without_a_measurement_leaves_the_site_unranked() {
        let mut m = table_i();
        // A sees D down: A's ranking moves everyone else up a rank.
        m.set(D, A, None);
        assert_eq!(m.preference(A), [C, F, B, E]);
        let totals = m.totals(&[4, 2, 1]);
        assert_eq!(totals[D], 8 - 4);
        // Nothing measured: every total is 0, and so is every share.
        assert_eq!(percent(&Matrix::new(3).totals(&[4, 2, 1])), [0, 0, 0]);
    }

    #[test]
    fn the_diagonal_and_out_of_range_cells_are_ignored() {
        let mut m = Matrix::new(2);
        m.set(0, 0, Some(1));
        m.set(5, 0, Some(1));
        assert_eq!(m.preference(0), Vec::<usize>::new());
    }
}
