//! Dependency fields (`Depends`, `Pre-Depends`, `Provides`) as deb-control(5) writes them.

use crate::archive::version::Op;

/// One alternative of a relation: `name[:arch] [(op version)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atom<'a> {
    pub name: &'a str,
    /// `any`, `native` or an architecture name.
    pub arch: Option<&'a str>,
    pub constraint: Option<(Op, &'a str)>,
}

/// Parses a comma-separated list of `|`-separated alternatives. Malformed atoms
/// (which never appear in archive indices) are skipped.
pub fn parse(field: &str) -> Vec<Vec<Atom<'_>>> {
    field
        .split(',')
        .map(|group| group.split('|').filter_map(parse_atom).collect::<Vec<_>>())
        .filter(|g| !g.is_empty())
        .collect()
}

/// Parses one atom.
pub fn parse_atom(s: &str) -> Option<Atom<'_>> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (head, constraint) = match s.find('(') {
        Some(i) => {
            let inner = s[i + 1..].trim_end().strip_suffix(')')?.trim();
            let opend = inner
                .find(|c: char| !matches!(c, '<' | '>' | '='))
                .unwrap_or(inner.len());
            let op = Op::parse(&inner[..opend])?;
            (s[..i].trim(), Some((op, inner[opend..].trim())))
        }
        None => (s, None),
    };
    // Build-profile and architecture restrictions only occur in source packages.
    let head = head.split(['[', '<']).next()?.trim();
    let (name, arch) = match head.split_once(':') {
        Some((n, a)) => (n, Some(a)),
        None => (head, None),
    };
    if name.is_empty() {
        return None;
    }
    Some(Atom {
        name,
        arch,
        constraint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_versions_and_qualifiers() {
        let r = parse(
            "libc6 (>= 2.34), gpgv | gpgv2 | gpgv1, perl:any, debconf (>= 0.5) | debconf-2.0",
        );
        assert_eq!(r.len(), 4);
        assert_eq!(r[0][0].name, "libc6");
        assert_eq!(r[0][0].constraint, Some((Op::Ge, "2.34")));
        assert_eq!(r[1].len(), 3);
        assert_eq!(r[2][0].arch, Some("any"));
        assert_eq!(r[3][1].name, "debconf-2.0");
        let p = parse("apt-transport-https (= 2.6.1)");
        assert_eq!(p[0][0].constraint, Some((Op::Eq, "2.6.1")));
        assert!(parse("").is_empty());
        assert_eq!(parse("a (<< 1~)")[0][0].constraint, Some((Op::Lt, "1~")));
        assert_eq!(parse("a(>>2)")[0][0].constraint, Some((Op::Gt, "2")));
    }
}
