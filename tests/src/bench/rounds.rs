//! Repeated measurements summarised as a median and a range: the benchmark's
//! cost rows run several rounds (in alternating order) so a row's figure is not
//! the luck of one moment on a shared machine.

/// Median, smallest and largest of a row's samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// None without samples. The median of an even count is the mean of the middle two.
    pub fn of(samples: &[f64]) -> Option<Spread> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: s[0],
            max: s[n - 1],
        })
    }

    /// `73.1 (70.2-75.0)`, with a sign when `signed`.
    pub fn cell(&self, signed: bool) -> String {
        if signed {
            format!("{:+.1} ({:+.1}..{:+.1})", self.median, self.min, self.max)
        } else {
            format!("{:.1} ({:.1}-{:.1})", self.median, self.min, self.max)
        }
    }
}

/// The order of round `round` over `items`: as given in even rounds, reversed in odd
/// ones, so no row always runs first (cold) or last (after the others warmed up).
pub fn alternating<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    let mut v = items.to_vec();
    if round % 2 == 1 {
        v.reverse();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of(&[1.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(s.cell(false), "2.0 (1.0-3.0)");
        assert_eq!(s.cell(true), "+2.0 (+1.0..+3.0)");
    }

    #[test]
    fn rounds_alternate() {
        assert_eq!(alternating(&[1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(alternating(&[1, 2, 3], 1), vec![3, 2, 1]);
    }
}
