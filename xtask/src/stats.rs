//! The little statistics the stress loop and the benchmark print: min,
//! median and max of a set of samples, and plain-text tables.

use std::fmt::Write;

/// Min, median and max of a non-empty set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// How many samples.
    pub count: usize,
    /// The smallest sample.
    pub min: f64,
    /// The middle sample, or the mean of the two middle ones for an even
    /// count.
    pub median: f64,
    /// The largest sample.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`; `None` when there are none (or any is NaN,
    /// which has no place in an order).
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() || samples.iter().any(|x| x.is_nan()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Self {
            count: sorted.len(),
            min: sorted[0],
            median,
            max: sorted[sorted.len() - 1],
        })
    }

    /// The spread of whole-number samples (microseconds, say).
    pub fn of_u64(samples: &[u64]) -> Option<Self> {
        let samples: Vec<f64> = samples.iter().map(|&x| x as f64).collect();
        Self::of(&samples)
    }
}

/// A number for a table: whole numbers bare, others with one decimal.
pub fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// Renders rows as a plain-text table: the first column left-aligned, the
/// others right-aligned, two spaces between columns, each line indented by
/// two spaces. Short rows are padded with empty cells.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(" ");
        for (column, width) in widths.iter().enumerate() {
            let cell = row.get(column).map(String::as_str).unwrap_or("");
            if column == 0 {
                let _ = write!(line, " {cell:<width$}");
            } else {
                let _ = write!(line, "  {cell:>width$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_counts_take_the_middle_sample() {
        let spread = Spread::of_u64(&[9, 1, 5]).unwrap();
        assert_eq!(
            spread,
            Spread {
                count: 3,
                min: 1.0,
                median: 5.0,
                max: 9.0
            }
        );
    }

    #[test]
    fn even_counts_average_the_two_middle_samples() {
        let spread = Spread::of_u64(&[4, 1, 10, 7]).unwrap();
        assert_eq!((spread.min, spread.median, spread.max), (1.0, 5.5, 10.0));
    }

    #[test]
    fn one_sample_is_min_median_and_max() {
        let spread = Spread::of(&[2.5]).unwrap();
        assert_eq!((spread.min, spread.median, spread.max), (2.5, 2.5, 2.5));
    }

    #[test]
    fn no_samples_or_nan_give_no_spread() {
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn numbers_show_a_decimal_only_when_they_have_one() {
        assert_eq!(number(4861.0), "4861");
        assert_eq!(number(4100.5), "4100.5");
        assert_eq!(number(0.04), "0.0");
    }

    #[test]
    fn tables_align_their_columns() {
        let rows = vec![
            vec!["".to_owned(), "min".to_owned(), "median".to_owned()],
            vec!["hv".to_owned(), "12".to_owned(), "4100.5".to_owned()],
            vec!["Linux".to_owned(), "6288000".to_owned()],
        ];
        assert_eq!(
            table(&rows),
            "             min  median\n\
             \x20 hv          12  4100.5\n\
             \x20 Linux  6288000\n"
        );
    }
}
