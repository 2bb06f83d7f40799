//! Plain aligned tables and compact number/duration formats for lbctl.
//!
//! Columns are separated by two spaces; text columns are left-aligned,
//! numeric ones right-aligned. A column with a width cap truncates in the
//! middle (`demo/very-lo…name:http`), so both the namespace and the port stay
//! visible.

use std::fmt::Write as _;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

pub struct Column {
    pub header: &'static str,
    pub align: Align,
    /// Cap on the width in characters; longer cells are truncated.
    pub max: Option<usize>,
}

pub const fn left(header: &'static str) -> Column {
    Column {
        header,
        align: Align::Left,
        max: None,
    }
}

pub const fn right(header: &'static str) -> Column {
    Column {
        header,
        align: Align::Right,
        max: None,
    }
}

pub const fn capped(header: &'static str, max: usize) -> Column {
    Column {
        header,
        align: Align::Left,
        max: Some(max),
    }
}

pub struct Table {
    cols: Vec<Column>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(cols: Vec<Column>) -> Self {
        Table {
            cols,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.cols.len());
        let cells = cells
            .into_iter()
            .zip(&self.cols)
            .map(|(c, col)| match col.max {
                Some(m) => truncate_middle(&c, m),
                None => c,
            })
            .collect();
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let w: Vec<usize> = self
            .cols
            .iter()
            .enumerate()
            .map(|(i, c)| {
                self.rows
                    .iter()
                    .map(|r| width(&r[i]))
                    .chain([width(c.header)])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let headers: Vec<String> = self.cols.iter().map(|c| c.header.to_string()).collect();
        for r in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in r.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = w[i] - width(cell);
                match self.cols[i].align {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

/// Shortens `s` to `max` characters by cutting its middle.
pub fn truncate_middle(s: &str, max: usize) -> String {
    let n = width(s);
    if n <= max || max < 5 {
        return s.to_string();
    }
    let keep = max - 1;
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut out: String = s.chars().take(head).collect();
    out.push('…');
    out.extend(s.chars().skip(n - tail));
    out
}

/// A count: exact below 100,000, then 123.4k, 12.3M, 1.2G.
pub fn count(n: u64) -> String {
    if n < 100_000 {
        return n.to_string();
    }
    let (v, unit) = if n < 1_000_000 {
        (n as f64 / 1e3, "k")
    } else if n < 1_000_000_000 {
        (n as f64 / 1e6, "M")
    } else if n < 1_000_000_000_000 {
        (n as f64 / 1e9, "G")
    } else {
        (n as f64 / 1e12, "T")
    };
    format!("{v:.1}{unit}")
}

/// Bytes: exact below 10 KiB (`812B`), then `12.3KiB`, `4.0MiB`, ...
pub fn bytes(n: u64) -> String {
    if n < 10 * 1024 {
        return format!("{n}B");
    }
    let units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1}{}", units[i])
}

/// A rate per second: one decimal, then k/M/G.
pub fn rate(v: f64) -> String {
    if v < 100_000.0 {
        format!("{v:.1}")
    } else {
        count(v as u64)
    }
}

/// Bytes per second.
pub fn byte_rate(v: f64) -> String {
    format!("{}/s", bytes(v as u64))
}

/// A duration in two units at most: `45s`, `5m12s`, `2h03m`, `3d04h`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600)
    }
}

/// A percentage with two decimals.
pub fn pct(v: f64) -> String {
    format!("{v:.2}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_and_trims() {
        let mut t = Table::new(vec![left("NAME"), right("N"), left("X")]);
        t.row(vec!["a".into(), "1".into(), "".into()]);
        t.row(vec!["long-name".into(), "12345".into(), "z".into()]);
        assert_eq!(
            t.render(),
            "NAME           N  X\n\
             a              1\n\
             long-name  12345  z\n"
        );
    }

    #[test]
    fn caps_in_the_middle() {
        assert_eq!(truncate_middle("abcdefghij", 7), "abc…hij");
        assert_eq!(truncate_middle("abc", 7), "abc");
        let mut t = Table::new(vec![capped("NAME", 9)]);
        t.row(vec!["namespace/service:port".into()]);
        assert_eq!(t.render(), "NAME\nname…port\n");
    }

    #[test]
    fn numbers() {
        assert_eq!(count(99_999), "99999");
        assert_eq!(count(123_456), "123.5k");
        assert_eq!(count(12_345_678), "12.3M");
        assert_eq!(bytes(812), "812B");
        assert_eq!(bytes(10_240), "10.0KiB");
        assert_eq!(bytes(5 << 20), "5.0MiB");
        assert_eq!(rate(12.34), "12.3");
        assert_eq!(pct(33.3333), "33.33%");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::from_secs(45)), "45s");
        assert_eq!(duration(Duration::from_secs(312)), "5m12s");
        assert_eq!(duration(Duration::from_secs(2 * 3600 + 180)), "2h03m");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d04h"
        );
    }
}
