//! Choosing the package set of a bootstrap, the way debootstrap does.
//!
//! * seeds: every `Priority: required` package and every `Essential: yes` one;
//!   the variant's base (`minbase`: apt, `buildd`: apt + build-essential,
//!   `default`: every `Priority: important` package); `ca-certificates` for an
//!   `https://` mirror; `--include` adds to the base, `--exclude` removes from
//!   the seeds *before* resolution (a dependency can bring it back);
//! * bookworm adds `usr-is-merged` to the required set, and every suite after
//!   bullseye never follows a dependency on `usrmerge` (debootstrap's
//!   `EXCLUDE_DEPENDENCY`): the tree is merged by the unpacker instead;
//! * the closure follows `Pre-Depends` and `Depends` (never Recommends). For an
//!   or-group it takes the first alternative that a real package satisfies
//!   (version constraints included), else the first one a `Provides` satisfies
//!   (debootstrap drops such virtual edges; taking a provider only ever adds what
//!   the edge needs).
//!
//! The result is split like debootstrap's: `required` (the closure of the required
//! seeds) and `base` (the rest).

pub mod relation;

use std::collections::{BTreeSet, HashSet};

use crate::archive::packages::{PackageIndex, Pkg};

/// A debootstrap variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Variant {
    #[default]
    Minbase,
    Buildd,
    /// debootstrap's default variant (`-`): required + important.
    Default,
}

impl std::str::FromStr for Variant {
    type Err = ResolveError;
    fn from_str(s: &str) -> Result<Variant, ResolveError> {
        match s {
            "minbase" => Ok(Variant::Minbase),
            "buildd" => Ok(Variant::Buildd),
            "default" | "-" | "important" => Ok(Variant::Default),
            other => Err(ResolveError::UnknownVariant(other.to_string())),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Minbase => "minbase",
            Variant::Buildd => "buildd",
            Variant::Default => "default",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown variant {0:?} (expected minbase, buildd or default)")]
    UnknownVariant(String),
    #[error("package {package} named by {origin} is not in the archive index")]
    UnknownPackage {
        package: String,
        origin: &'static str,
    },
    #[error("the archive index has no Priority: required package: is this a Debian-like archive?")]
    NoRequired,
}

/// What to resolve.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub variant: Variant,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// The suite's codename from its Release file (`bookworm`, `trixie`, ...).
    pub codename: String,
    pub https_mirror: bool,
    /// The target architecture; dependencies qualified with another one are ignored.
    pub arch: String,
}

/// A resolved package set: stanza ids into the index.
#[derive(Debug, Clone)]
pub struct Resolution {
    pub required: Vec<u32>,
    pub base: Vec<u32>,
    /// Dependencies nothing in the archive satisfies (`pkg: dep`), as warnings.
    pub unsatisfied: Vec<String>,
}

impl Resolution {
    /// Every chosen stanza, required first, each list sorted by package name.
    pub fn all(&self) -> impl Iterator<Item = u32> + '_ {
        self.required.iter().chain(self.base.iter()).copied()
    }

    /// The sorted package names (what `--print-debs` prints).
    pub fn names<'a>(&self, index: &'a PackageIndex) -> Vec<&'a str> {
        let mut v: Vec<&str> = self.all().map(|id| index.get(id).name()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

const OLD_SUITES: &[&str] = &[
    "etch", "lenny", "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye",
];

fn is_old_suite(codename: &str) -> bool {
    OLD_SUITES.iter().any(|s| codename.starts_with(s))
}

/// Resolves `req` against `index`.
pub fn resolve(index: &PackageIndex, req: &Request) -> Result<Resolution, ResolveError> {
    let mut required: Vec<String> = Vec::new();
    let mut base: Vec<String> = Vec::new();
    for p in index.iter() {
        if p.priority() == "required" || p.essential() {
            required.push(p.name().to_string());
        } else if req.variant == Variant::Default && p.priority() == "important" {
            base.push(p.name().to_string());
        }
    }
    if required.is_empty() {
        return Err(ResolveError::NoRequired);
    }
    match req.variant {
        Variant::Minbase => base.push("apt".into()),
        Variant::Buildd => base.extend(["apt".into(), "build-essential".into()]),
        Variant::Default => {}
    }
    if req.https_mirror {
        base.push("ca-certificates".into());
    }
    let mut never: HashSet<&str> = HashSet::new();
    if !is_old_suite(&req.codename) {
        never.insert("usrmerge");
        if req.codename == "bookworm" {
            required.push("usr-is-merged".into());
        }
    }
    for inc in &req.include {
        if index.candidate(inc).is_none() {
            return Err(ResolveError::UnknownPackage {
                package: inc.clone(),
                origin: "--include",
            });
        }
        base.push(inc.clone());
    }
    let excluded: HashSet<&str> = req.exclude.iter().map(String::as_str).collect();
    required.retain(|n| !excluded.contains(n.as_str()));
    base.retain(|n| !excluded.contains(n.as_str()));

    let mut r = Resolver {
        index,
        arch: &req.arch,
        never,
        chosen: HashSet::new(),
        order: Vec::new(),
        unsatisfied: BTreeSet::new(),
    };
    for n in &required {
        if let Some(p) = index.candidate(n) {
            r.add(p);
        }
    }
    r.close();
    let required_ids: HashSet<u32> = r.order.iter().copied().collect();
    for n in &base {
        match index.candidate(n) {
            Some(p) => r.add(p),
            None => {
                // apt is always in a Debian archive; a missing variant seed is worth a warning.
                r.unsatisfied
                    .insert(format!("(variant {}): {n}", req.variant));
            }
        }
    }
    r.close();
    let by_name = |a: &u32, b: &u32| index.get(*a).name().cmp(index.get(*b).name());
    let mut req_ids: Vec<u32> = required_ids.iter().copied().collect();
    req_ids.sort_by(by_name);
    let mut base_ids: Vec<u32> = r
        .order
        .iter()
        .copied()
        .filter(|id| !required_ids.contains(id))
        .collect();
    base_ids.sort_by(by_name);
    Ok(Resolution {
        required: req_ids,
        base: base_ids,
        unsatisfied: r.unsatisfied.into_iter().collect(),
    })
}

struct Resolver<'a> {
    index: &'a PackageIndex,
    arch: &'a str,
    never: HashSet<&'a str>,
    /// Chosen package names (one stanza per name).
    chosen: HashSet<&'a str>,
    order: Vec<u32>,
    unsatisfied: BTreeSet<String>,
}

impl<'a> Resolver<'a> {
    fn add(&mut self, p: Pkg<'a>) {
        if self.chosen.insert(p.name()) {
            self.order.push(p.id);
        }
    }

    /// Follows dependencies of everything chosen so far until nothing new appears.
    fn close(&mut self) {
        let mut i = 0;
        while i < self.order.len() {
            let p = self.index.get(self.order[i]);
            i += 1;
            for field in [p.pre_depends(), p.depends()] {
                for group in relation::parse(field) {
                    match self.pick(&group) {
                        Some(dep) => self.add(dep),
                        None => {
                            let text: Vec<String> = group
                                .iter()
                                .map(|a| match a.constraint {
                                    Some((op, v)) => format!("{} ({} {v})", a.name, op.as_str()),
                                    None => a.name.to_string(),
                                })
                                .collect();
                            if group
                                .iter()
                                .any(|a| self.arch_ok(a) && !self.never.contains(a.name))
                            {
                                self.unsatisfied.insert(format!(
                                    "{}: {}",
                                    p.name(),
                                    text.join(" | ")
                                ));
                            }
                        }
                    }
                }
            }
        }
    }

    fn arch_ok(&self, a: &relation::Atom<'_>) -> bool {
        match a.arch {
            None | Some("any") | Some("native") => true,
            Some(x) => x == self.arch,
        }
    }

    /// The first alternative a real package satisfies, else the first a provider does.
    fn pick(&self, group: &[relation::Atom<'a>]) -> Option<Pkg<'a>> {
        let usable = || {
            group
                .iter()
                .filter(|a| self.arch_ok(a) && !self.never.contains(a.name))
        };
        for a in usable() {
            if let Some(c) = self.index.candidate(a.name) {
                if a.constraint
                    .is_none_or(|(op, v)| op.satisfied(c.version(), v))
                {
                    return Some(c);
                }
            }
        }
        for a in usable() {
            let providers: Vec<Pkg<'a>> = self
                .index
                .providers(a.name)
                .filter(|p| provides_satisfies(p.provides(), a))
                .collect();
            // Prefer a provider already chosen, then an important one, then the first.
            if let Some(p) = providers
                .iter()
                .find(|p| self.chosen.contains(p.name()))
                .or_else(|| {
                    providers
                        .iter()
                        .find(|p| matches!(p.priority(), "required" | "important"))
                })
                .or(providers.first())
            {
                return Some(*p);
            }
        }
        None
    }
}

/// Whether a `Provides:` field satisfies `want` (only versioned provides satisfy
/// versioned dependencies).
fn provides_satisfies(provides: &str, want: &relation::Atom<'_>) -> bool {
    relation::parse(provides)
        .iter()
        .flatten()
        .filter(|p| p.name == want.name)
        .any(|p| match (want.constraint, p.constraint) {
            (None, _) => true,
            (Some((op, v)), Some((crate::archive::version::Op::Eq, have))) => op.satisfied(have, v),
            (Some(_), _) => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(name: &str, extra: &str) -> String {
        format!(
            "Package: {name}\nVersion: 1.0\nArchitecture: amd64\n{extra}Filename: pool/{name}.deb\nSize: 1\nSHA256: 00\n\n"
        )
    }

    fn index() -> PackageIndex {
        let mut t = String::new();
        t += &stanza(
            "base-files",
            "Priority: required\nEssential: yes\nPre-Depends: awk\n",
        );
        t += &stanza("mawk", "Priority: required\nProvides: awk\n");
        t += &stanza(
            "init-system-helpers",
            "Priority: required\nDepends: usrmerge | usr-is-merged, perl-base (>= 0.5)\n",
        );
        t += &stanza("usrmerge", "Priority: optional\nDepends: perl\n");
        t += &stanza("perl", "Priority: optional\n");
        t += &stanza("perl-base", "Priority: required\n");
        t += &stanza("usr-is-merged", "Priority: optional\n");
        t += &stanza(
            "apt",
            "Priority: required\nDepends: gpgv | gpgv2, libfoo:i386, libc6 (>= 1.0~)\n",
        );
        t += &stanza("gpgv", "Priority: optional\n");
        t += &stanza("libc6", "Priority: optional\n");
        t += &stanza(
            "systemd",
            "Priority: important\nDepends: mount, libold (>= 3)\n",
        );
        t += &stanza("libold", "Priority: optional\n");
        t += &stanza("mount", "Priority: required\n");
        t += &stanza("tzdata", "Priority: optional\nDepends: debconf-2.0\n");
        t += &stanza("cdebconf", "Priority: optional\nProvides: debconf-2.0\n");
        t += &stanza("build-essential", "Priority: optional\nDepends: make\n");
        t += &stanza("make", "Priority: optional\n");
        let mut idx = PackageIndex::new();
        idx.add("test", &t).unwrap();
        idx
    }

    fn names(idx: &PackageIndex, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| idx.get(i).name().to_string()).collect()
    }

    fn req(variant: Variant) -> Request {
        Request {
            variant,
            codename: "bookworm".into(),
            arch: "amd64".into(),
            ..Default::default()
        }
    }

    #[test]
    fn minbase_bookworm_takes_usr_is_merged_not_usrmerge() {
        let idx = index();
        let r = resolve(&idx, &req(Variant::Minbase)).unwrap();
        let all = r.names(&idx);
        assert!(all.contains(&"usr-is-merged"));
        assert!(!all.contains(&"usrmerge") && !all.contains(&"perl"));
        assert!(all.contains(&"gpgv") && all.contains(&"libc6"));
        assert!(!all.contains(&"systemd"));
        assert!(
            r.base.is_empty(),
            "apt is required here: {:?}",
            names(&idx, &r.base)
        );
        // A versioned dependency nothing satisfies is reported, not silently accepted.
        assert!(r.unsatisfied.is_empty(), "{:?}", r.unsatisfied);
    }

    #[test]
    fn default_variant_adds_important_and_reports_unsatisfied() {
        let idx = index();
        let r = resolve(&idx, &req(Variant::Default)).unwrap();
        assert_eq!(names(&idx, &r.base), vec!["systemd"]);
        assert_eq!(r.unsatisfied, vec!["systemd: libold (>= 3)".to_string()]);
    }

    #[test]
    fn include_exclude_and_providers() {
        let idx = index();
        let mut q = req(Variant::Buildd);
        q.include = vec!["tzdata".into()];
        q.exclude = vec!["mawk".into()];
        let r = resolve(&idx, &q).unwrap();
        let all = r.names(&idx);
        // Excluded from the seeds, but base-files needs awk: mawk comes back through Provides.
        assert!(all.contains(&"mawk"));
        assert!(all.contains(&"cdebconf") && all.contains(&"make"));
        q.include = vec!["nonexistent".into()];
        let e = resolve(&idx, &q).unwrap_err();
        assert!(e.to_string().contains("nonexistent") && e.to_string().contains("--include"));
    }

    #[test]
    fn variant_parse() {
        assert_eq!("buildd".parse::<Variant>().unwrap(), Variant::Buildd);
        assert!("fat".parse::<Variant>().is_err());
    }
}
