//! Markdown tables padded to column width, so they read well in a terminal too.

/// A table with a header row.
#[derive(Clone, Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Columns whose cells are right-aligned (numbers).
    right: Vec<bool>,
}

impl Table {
    /// Columns named in `header`; a name starting with `>` is right-aligned (the `>` is
    /// not shown).
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header
                .iter()
                .map(|h| h.trim_start_matches('>').to_string())
                .collect(),
            right: header.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        let mut r: Vec<String> = cells.into_iter().map(Into::into).collect();
        r.resize(self.header.len(), String::new());
        self.rows.push(r);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let width: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([self.header[i].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let cell = |i: usize, s: &str| {
            let pad = width[i] - s.chars().count();
            if self.right[i] {
                format!("{}{s}", " ".repeat(pad))
            } else {
                format!("{s}{}", " ".repeat(pad))
            }
        };
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        let mut out = line((0..n).map(|i| cell(i, &self.header[i])).collect());
        out += &line(
            (0..n)
                .map(|i| {
                    if self.right[i] {
                        format!("{}:", "-".repeat(width[i] - 1))
                    } else {
                        "-".repeat(width[i])
                    }
                })
                .collect(),
        );
        for r in &self.rows {
            out += &line((0..n).map(|i| cell(i, &r[i].replace('|', "\\|"))).collect());
        }
        out
    }
}

/// `1234567` as `1 234 567`: big counts are read at a glance.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A percentage with enough digits to tell 0 from "a few".
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    let p = part as f64 * 100.0 / whole as f64;
    if part == 0 {
        "0%".into()
    } else if p < 0.01 {
        format!("{p:.4}%")
    } else if p < 1.0 {
        format!("{p:.3}%")
    } else {
        format!("{p:.1}%")
    }
}

/// A duration in milliseconds, one decimal.
pub fn ms(d: std::time::Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_markdown() {
        let mut t = Table::new(&["what", ">count"]);
        t.row(["a", "1"]).row(["longer", "12345"]);
        assert_eq!(
            t.render(),
            "| what   | count |\n| ------ | ----: |\n| a      |     1 |\n| longer | 12345 |\n"
        );
        assert_eq!(thousands(1234567), "1 234 567");
        assert_eq!(thousands(999), "999");
        assert_eq!(percent(0, 10), "0%");
        assert_eq!(percent(1, 3), "33.3%");
        assert_eq!(percent(1, 1000), "0.100%");
        assert_eq!(percent(1, 0), "-");
    }
}
