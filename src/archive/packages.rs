//! The `Packages` index: every binary package stanza of the chosen components,
//! parsed once into compact records that point back into the index text.

use std::collections::HashMap;
use std::ops::Range;

use super::deb822;

/// A span of the index text.
type Span = Range<u32>;

/// One binary package stanza.
#[derive(Debug, Clone)]
pub struct Stanza {
    raw: Span,
    package: Span,
    version: Span,
    architecture: Span,
    priority: Span,
    multi_arch: Span,
    depends: Span,
    pre_depends: Span,
    provides: Span,
    filename: Span,
    sha256: Span,
    pub size: u64,
    pub essential: bool,
}

/// All stanzas of one or more `Packages` files.
#[derive(Debug, Default)]
pub struct PackageIndex {
    text: String,
    stanzas: Vec<Stanza>,
    by_name: HashMap<Box<str>, Vec<u32>>,
    providers: HashMap<Box<str>, Vec<u32>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{source_name}: stanza {index} has no {field} field")]
    MissingField {
        source_name: String,
        index: usize,
        field: &'static str,
    },
    #[error("{source_name}: package {package}: bad Size {value:?}")]
    BadSize {
        source_name: String,
        package: String,
        value: String,
    },
    #[error("index text exceeds 4 GiB")]
    TooLarge,
}

/// A reference to a stanza with accessors for its fields.
#[derive(Clone, Copy)]
pub struct Pkg<'a> {
    index: &'a PackageIndex,
    pub id: u32,
}

impl<'a> Pkg<'a> {
    fn s(&self, span: &Span) -> &'a str {
        &self.index.text[span.start as usize..span.end as usize]
    }
    fn st(&self) -> &'a Stanza {
        &self.index.stanzas[self.id as usize]
    }
    pub fn name(&self) -> &'a str {
        self.s(&self.st().package)
    }
    pub fn version(&self) -> &'a str {
        self.s(&self.st().version)
    }
    pub fn architecture(&self) -> &'a str {
        self.s(&self.st().architecture)
    }
    pub fn priority(&self) -> &'a str {
        self.s(&self.st().priority)
    }
    pub fn multi_arch(&self) -> &'a str {
        self.s(&self.st().multi_arch)
    }
    pub fn depends(&self) -> &'a str {
        self.s(&self.st().depends)
    }
    pub fn pre_depends(&self) -> &'a str {
        self.s(&self.st().pre_depends)
    }
    pub fn provides(&self) -> &'a str {
        self.s(&self.st().provides)
    }
    pub fn filename(&self) -> &'a str {
        self.s(&self.st().filename)
    }
    pub fn sha256(&self) -> &'a str {
        self.s(&self.st().sha256)
    }
    pub fn size(&self) -> u64 {
        self.st().size
    }
    pub fn essential(&self) -> bool {
        self.st().essential
    }
    /// The stanza exactly as it appears in the index.
    pub fn raw(&self) -> &'a str {
        self.s(&self.st().raw)
    }
}

impl std::fmt::Debug for Pkg<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.name(),
            self.version(),
            self.architecture()
        )
    }
}

impl PackageIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the stanzas of one `Packages` text; `source_name` names it in errors.
    pub fn add(&mut self, source_name: &str, text: &str) -> Result<usize, IndexError> {
        let base = self.text.len();
        if base + text.len() + 2 > u32::MAX as usize {
            return Err(IndexError::TooLarge);
        }
        if !self.text.is_empty() {
            self.text.push_str("\n\n");
        }
        let base = self.text.len();
        self.text.push_str(text);
        let full = &self.text[base..];
        let off = |s: &str| -> Span {
            let start = s.as_ptr() as usize - self.text.as_ptr() as usize;
            start as u32..(start + s.len()) as u32
        };
        let empty: Span = 0..0;
        let mut added = 0;
        let mut it = deb822::paragraphs(full);
        let mut new = Vec::new();
        while let Some((p, raw)) = it.next_raw() {
            let idx = self.stanzas.len() + new.len();
            let mut st = Stanza {
                raw: off(raw),
                package: empty.clone(),
                version: empty.clone(),
                architecture: empty.clone(),
                priority: empty.clone(),
                multi_arch: empty.clone(),
                depends: empty.clone(),
                pre_depends: empty.clone(),
                provides: empty.clone(),
                filename: empty.clone(),
                sha256: empty.clone(),
                size: 0,
                essential: false,
            };
            let mut size = None;
            for (k, v) in p.fields() {
                let slot = match k.len() {
                    4 if k.eq_ignore_ascii_case("Size") => {
                        size = Some(v);
                        continue;
                    }
                    6 if k.eq_ignore_ascii_case("SHA256") => &mut st.sha256,
                    7 if k.eq_ignore_ascii_case("Package") => &mut st.package,
                    7 if k.eq_ignore_ascii_case("Version") => &mut st.version,
                    7 if k.eq_ignore_ascii_case("Depends") => &mut st.depends,
                    8 if k.eq_ignore_ascii_case("Priority") => &mut st.priority,
                    8 if k.eq_ignore_ascii_case("Provides") => &mut st.provides,
                    8 if k.eq_ignore_ascii_case("Filename") => &mut st.filename,
                    9 if k.eq_ignore_ascii_case("Essential") => {
                        st.essential = v.eq_ignore_ascii_case("yes");
                        continue;
                    }
                    9 if k.eq_ignore_ascii_case("Multi-Arch") => &mut st.multi_arch,
                    11 if k.eq_ignore_ascii_case("Pre-Depends") => &mut st.pre_depends,
                    12 if k.eq_ignore_ascii_case("Architecture") => &mut st.architecture,
                    _ => continue,
                };
                *slot = off(v);
            }
            let name_of = |st: &Stanza| {
                self.text[st.package.start as usize..st.package.end as usize].to_string()
            };
            for (span, field) in [
                (&st.package, "Package"),
                (&st.version, "Version"),
                (&st.filename, "Filename"),
            ] {
                if span.is_empty() {
                    return Err(IndexError::MissingField {
                        source_name: source_name.into(),
                        index: idx,
                        field,
                    });
                }
            }
            if let Some(sz) = size {
                st.size = sz.parse().map_err(|_| IndexError::BadSize {
                    source_name: source_name.into(),
                    package: name_of(&st),
                    value: sz.into(),
                })?;
            }
            new.push(st);
            added += 1;
        }
        for st in new {
            let id = self.stanzas.len() as u32;
            let name = &self.text[st.package.start as usize..st.package.end as usize];
            self.by_name.entry(name.into()).or_default().push(id);
            let provides = &self.text[st.provides.start as usize..st.provides.end as usize];
            for p in provides.split(',') {
                let pname = p.split(['(', ':']).next().unwrap_or("").trim();
                if !pname.is_empty() {
                    self.providers.entry(pname.into()).or_default().push(id);
                }
            }
            self.stanzas.push(st);
        }
        Ok(added)
    }

    pub fn len(&self) -> usize {
        self.stanzas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.stanzas.is_empty()
    }

    pub fn get(&self, id: u32) -> Pkg<'_> {
        Pkg { index: self, id }
    }

    pub fn iter(&self) -> impl Iterator<Item = Pkg<'_>> {
        (0..self.stanzas.len() as u32).map(|id| self.get(id))
    }

    /// Every stanza of a real package with this name.
    pub fn by_name(&self, name: &str) -> impl Iterator<Item = Pkg<'_>> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .map(|&id| self.get(id))
    }

    /// Every stanza whose `Provides:` names `name`.
    pub fn providers(&self, name: &str) -> impl Iterator<Item = Pkg<'_>> {
        self.providers
            .get(name)
            .into_iter()
            .flatten()
            .map(|&id| self.get(id))
    }

    /// The candidate for a name: the highest version; among equal versions the
    /// last stanza (debootstrap's rule).
    pub fn candidate(&self, name: &str) -> Option<Pkg<'_>> {
        self.by_name(name).reduce(|best, p| {
            if super::version::compare(p.version(), best.version()).is_lt() {
                best
            } else {
                p
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Package: mawk\nVersion: 1.3.4\nArchitecture: amd64\nPriority: required\n\
Provides: awk\nFilename: pool/main/m/mawk/mawk_1.3.4_amd64.deb\nSize: 100\nSHA256: ab\n\n\
Package: base-files\nEssential: yes\nVersion: 12.4\nArchitecture: amd64\nPre-Depends: awk\n\
Filename: pool/main/b/base-files/base-files_12.4_amd64.deb\nSize: 10\nSHA256: cd\n";

    #[test]
    fn indexes_names_and_provides() {
        let mut idx = PackageIndex::new();
        assert_eq!(idx.add("Packages", TEXT).unwrap(), 2);
        let more = "Package: mawk\nVersion: 1.3.5\nArchitecture: amd64\nFilename: x.deb\nSize: 1\n";
        idx.add("Packages2", more).unwrap();
        let m = idx.candidate("mawk").unwrap();
        assert_eq!(m.version(), "1.3.5");
        let b = idx.candidate("base-files").unwrap();
        assert!(b.essential());
        assert_eq!(b.pre_depends(), "awk");
        assert_eq!(b.size(), 10);
        assert!(b.raw().starts_with("Package: base-files") && b.raw().ends_with("SHA256: cd"));
        assert_eq!(idx.providers("awk").next().unwrap().name(), "mawk");
        assert!(idx.candidate("awk").is_none());
    }

    #[test]
    fn missing_fields_are_named() {
        let mut idx = PackageIndex::new();
        let e = idx
            .add("main/Packages", "Package: x\nVersion: 1\n")
            .unwrap_err();
        assert!(e.to_string().contains("main/Packages") && e.to_string().contains("Filename"));
        let e = idx
            .add("p", "Package: x\nVersion: 1\nFilename: f\nSize: big\n")
            .unwrap_err();
        assert!(e.to_string().contains("package x"), "{e}");
    }
}
