//! Errors on one line, for the binaries' edges.

/// An error and its causes joined with `: `, without repeating a cause that
/// the text before it already quotes (many errors embed their source).
pub fn one_line<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut out = String::new();
    for cause in chain {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Plain(#[source] std::io::Error);

    fn chain<'a>(
        e: &'a (dyn std::error::Error + 'static),
    ) -> Vec<&'a (dyn std::error::Error + 'static)> {
        std::iter::successors(Some(e), |e| e.source()).collect()
    }

    #[test]
    fn quoted_causes_are_not_repeated() {
        let q = Quoting(std::io::Error::other("inner"));
        assert_eq!(one_line(chain(&q)), "outer: inner");
        let p = Plain(std::io::Error::other("inner"));
        assert_eq!(one_line(chain(&p)), "outer: inner");
    }
}
