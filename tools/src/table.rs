//! Text tables for `fepctl`'s views: every column as wide as its widest
//! cell, so that columns line up whatever the names' lengths; numbers
//! right-aligned under their headers, text left-aligned.

/// How a column's cells sit in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table's columns (header and alignment), then its rows.
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
    indent: usize,
}

impl Table {
    /// A table with these columns; the last one is not padded (a free-text
    /// tail such as a share bar or a list).
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Table {
            columns: columns.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            rows: Vec::new(),
            indent: 0,
        }
    }

    /// Every line starts with `n` spaces.
    pub fn indent(mut self, n: usize) -> Self {
        self.indent = n;
        self
    }

    /// Adds a row: one cell per column (missing cells are empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The header line and the rows, each ending in a newline.
    pub fn render(&self) -> String {
        let width = |c: usize| {
            let cells = self
                .rows
                .iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()));
            cells.fold(self.columns[c].0.chars().count(), usize::max)
        };
        let widths: Vec<usize> = (0..self.columns.len()).map(width).collect();
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut out = " ".repeat(self.indent);
            for (c, cell) in cells.enumerate().take(self.columns.len()) {
                if c > 0 {
                    out.push_str("  ");
                }
                let pad = widths[c].saturating_sub(cell.chars().count());
                let last = c + 1 == self.columns.len();
                match self.columns[c].1 {
                    Align::Right => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(cell);
                    }
                    Align::Left => {
                        out.push_str(cell);
                        if !last {
                            out.push_str(&" ".repeat(pad));
                        }
                    }
                }
            }
            out.truncate(out.trim_end().len());
            out.push('\n');
            out
        };
        let mut out = line(&mut self.columns.iter().map(|(h, _)| h.as_str()));
        for row in &self.rows {
            let mut cells = (0..self.columns.len()).map(|c| row.get(c).map_or("", String::as_str));
            out += &line(&mut cells);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell_and_numbers_sit_under_their_headers() {
        let mut t = Table::new(&[
            ("NODE", Align::Left),
            ("ROUTES", Align::Right),
            ("STATE", Align::Left),
        ])
        .indent(2);
        t.row(vec!["be1".into(), "7".into(), "up".into()]);
        t.row(vec![
            "a-node-with-a-long-name".into(),
            "1234567".into(),
            "draining".into(),
        ]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "  NODE                      ROUTES  STATE",
                "  be1                            7  up",
                "  a-node-with-a-long-name  1234567  draining",
            ]
        );
        // Every number ends where its header ends.
        let end = lines[0].find("ROUTES").unwrap() + "ROUTES".len();
        for l in &lines[1..] {
            let digits_end = l[..end].trim_end().len();
            assert_eq!(digits_end, end, "{l:?}");
        }
    }

    #[test]
    fn a_missing_cell_is_empty_and_no_line_ends_in_spaces() {
        let mut t = Table::new(&[("A", Align::Left), ("B", Align::Left)]);
        t.row(vec!["x".into()]);
        assert_eq!(t.render(), "A  B\nx\n");
    }
}
