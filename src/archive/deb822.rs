//! A small, zero-copy reader for deb822 control data (Release, Packages, `.sources`).
//!
//! Paragraphs are separated by blank lines; a field is `Name: value`, continued on
//! following lines that start with a space or tab. Lines starting with `#` are
//! comments (allowed in `.sources` files, never present in archive indices).
//! Field names compare case-insensitively, as dpkg and apt do.

/// One paragraph: the fields in file order, borrowing from the input text.
#[derive(Debug, Clone, Default)]
pub struct Paragraph<'a> {
    fields: Vec<(&'a str, &'a str)>,
}

impl<'a> Paragraph<'a> {
    /// The raw value of a field (continuation lines included, with their newlines),
    /// trimmed of surrounding whitespace.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    pub fn fields(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.fields.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Iterates over the paragraphs of `text`.
pub fn paragraphs(text: &str) -> Paragraphs<'_> {
    Paragraphs { rest: text }
}

/// Iterator returned by [`paragraphs`]. Also yields the raw text of each paragraph
/// through [`Paragraphs::next_raw`], which the dpkg `available` file reuses.
pub struct Paragraphs<'a> {
    rest: &'a str,
}

impl<'a> Paragraphs<'a> {
    /// The next paragraph together with its exact source text (without the
    /// separating blank line).
    pub fn next_raw(&mut self) -> Option<(Paragraph<'a>, &'a str)> {
        loop {
            // Skip blank lines between paragraphs.
            let trimmed = self.rest.trim_start_matches(['\n', '\r']);
            if trimmed.is_empty() {
                self.rest = trimmed;
                return None;
            }
            let start = trimmed;
            let mut para = Paragraph::default();
            let mut pos = 0usize;
            let bytes = start.as_bytes();
            let mut cur: Option<(usize, usize, usize)> = None; // (name_start, name_end, value_start)
            let mut end = start.len();
            let mut value_end = 0usize;
            while pos < bytes.len() {
                let line_end = memchr_nl(bytes, pos);
                let line = &start[pos..line_end];
                let next = if line_end < bytes.len() {
                    line_end + 1
                } else {
                    line_end
                };
                if line.trim_end_matches('\r').is_empty() {
                    end = pos;
                    self.rest = &start[next..];
                    break;
                }
                let first = bytes[pos];
                if first == b' ' || first == b'\t' {
                    // Continuation of the current field.
                    value_end = line_end;
                } else if first == b'#' {
                    // Comment line.
                } else {
                    if let Some((ns, ne, vs)) = cur.take() {
                        para.fields
                            .push((&start[ns..ne], start[vs..value_end.max(vs)].trim()));
                    }
                    if let Some(colon) = line.find(':') {
                        cur = Some((pos, pos + colon, pos + colon + 1));
                        value_end = line_end;
                    }
                }
                pos = next;
                if pos >= bytes.len() {
                    end = bytes.len();
                    self.rest = "";
                }
            }
            if let Some((ns, ne, vs)) = cur.take() {
                para.fields
                    .push((&start[ns..ne], start[vs..value_end.max(vs)].trim()));
            }
            if para.is_empty() {
                continue;
            }
            return Some((para, start[..end].trim_end_matches(['\n', '\r'])));
        }
    }
}

impl<'a> Iterator for Paragraphs<'a> {
    type Item = Paragraph<'a>;
    fn next(&mut self) -> Option<Paragraph<'a>> {
        self.next_raw().map(|(p, _)| p)
    }
}

fn memchr_nl(bytes: &[u8], from: usize) -> usize {
    bytes[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| from + i)
}

/// Splits a multi-line field value into its non-empty, trimmed lines
/// (used for `SHA256:` in Release and `Conffiles:`).
pub fn lines(value: &str) -> impl Iterator<Item = &str> {
    value.lines().map(str::trim).filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_continuations_and_paragraphs() {
        let text = "Package: a\nVersion: 1\nDescription: short\n long line\n .\n more\n\n\n\
                    # comment\nPackage: b\nDepends: x,\n y\n";
        let mut it = paragraphs(text);
        let (a, raw) = it.next_raw().unwrap();
        assert_eq!(a.get("package"), Some("a"));
        assert_eq!(a.get("Description"), Some("short\n long line\n .\n more"));
        assert!(raw.starts_with("Package: a") && raw.ends_with(" more"));
        let b = it.next().unwrap();
        assert_eq!(b.get("Package"), Some("b"));
        assert_eq!(b.get("Depends"), Some("x,\n y"));
        assert!(it.next().is_none());
    }

    #[test]
    fn empty_value_and_crlf() {
        let text = "A:\r\n b\r\nC: d\r\n\r\nE: f";
        let ps: Vec<_> = paragraphs(text).collect();
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].get("A"), Some("b"));
        assert_eq!(ps[0].get("C"), Some("d"));
        assert_eq!(ps[1].get("E"), Some("f"));
    }
}
