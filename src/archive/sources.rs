//! Defaults from the host's APT configuration: which mirror, suite, components and
//! keyring a bootstrap uses when the user names none.
//!
//! Reads deb822 `*.sources` files and one-line `sources.list` / `*.list` files. The
//! first `deb` entry whose suite is a plain release (no `-updates`, `-security`,
//! `-backports`, ... suffix) wins. No mirror host name is ever built in.

use std::path::{Path, PathBuf};

use super::deb822;

/// One `deb` source as APT sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub signed_by: Option<PathBuf>,
    /// The file the entry came from, for messages.
    pub origin: PathBuf,
}

/// What a bootstrap takes from the host when options are not given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDefaults {
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
    pub keyring: Option<PathBuf>,
    pub origin: PathBuf,
}

/// Reads every `deb` entry under an APT configuration root (normally `/`).
pub fn read_sources(root: &Path) -> Vec<AptSource> {
    let mut out = Vec::new();
    let list = root.join("etc/apt/sources.list");
    if let Ok(text) = std::fs::read_to_string(&list) {
        out.extend(parse_one_line(&text, &list));
    }
    let dir = root.join("etc/apt/sources.list.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => out.extend(parse_deb822(&text, &f)),
            Some("list") => out.extend(parse_one_line(&text, &f)),
            _ => {}
        }
    }
    out
}

/// Parses deb822 `.sources` text.
pub fn parse_deb822(text: &str, origin: &Path) -> Vec<AptSource> {
    let mut out = Vec::new();
    for p in deb822::paragraphs(text) {
        if p.get("Enabled")
            .is_some_and(|v| v.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        let types = p.get("Types").unwrap_or("");
        if !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let words = |name| -> Vec<String> {
            p.get(name)
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        // Signed-By may hold a path or an inline key block; only a path is usable here.
        let signed_by = p
            .get("Signed-By")
            .map(str::trim)
            .filter(|v| v.starts_with('/') && !v.contains('\n'))
            .map(PathBuf::from);
        for uri in words("URIs") {
            out.push(AptSource {
                uri,
                suites: words("Suites"),
                components: words("Components"),
                signed_by: signed_by.clone(),
                origin: origin.to_path_buf(),
            });
        }
    }
    out
}

/// Parses one-line `deb [opts] uri suite comp...` text.
pub fn parse_one_line(text: &str, origin: &Path) -> Vec<AptSource> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut signed_by = None;
        if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { continue };
            for opt in r[..end].split_whitespace() {
                if let Some(v) = opt.strip_prefix("signed-by=") {
                    if v.starts_with('/') {
                        signed_by = Some(PathBuf::from(v));
                    }
                }
            }
            rest = r[end + 1..].trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(AptSource {
            uri: uri.to_string(),
            suites: vec![suite.to_string()],
            components: words.map(str::to_string).collect(),
            signed_by,
            origin: origin.to_path_buf(),
        });
    }
    out
}

fn is_plain_release(suite: &str) -> bool {
    !suite.contains('-') && !suite.contains('/')
}

/// Picks the defaults from a list of sources: the first `deb` entry with a plain
/// release suite. The keyring is the entry's `Signed-By`, else the distribution's
/// archive keyring under `root` if one exists.
pub fn pick_defaults(sources: &[AptSource], root: &Path) -> Option<HostDefaults> {
    let (src, suite) = sources.iter().find_map(|s| {
        s.suites
            .iter()
            .find(|x| is_plain_release(x))
            .map(|suite| (s, suite.clone()))
    })?;
    let keyring = src.signed_by.clone().or_else(|| {
        [
            "usr/share/keyrings/debian-archive-keyring.gpg",
            "usr/share/keyrings/ubuntu-archive-keyring.gpg",
        ]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
    });
    Some(HostDefaults {
        mirror: src.uri.trim_end_matches('/').to_string(),
        suite,
        components: if src.components.is_empty() {
            vec!["main".into()]
        } else {
            src.components.clone()
        },
        keyring,
        origin: src.origin.clone(),
    })
}

/// The host defaults read from `/`.
pub fn host_defaults() -> Option<HostDefaults> {
    let root = Path::new("/");
    pick_defaults(&read_sources(root), root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_pick_plain_suite() {
        let text = "Types: deb deb-src\nURIs: http://mirror.example/debian/\n\
                    Suites: bookworm-updates bookworm\nComponents: main contrib\n\
                    Signed-By: /usr/share/keyrings/x.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        let s = parse_deb822(text, Path::new("/etc/apt/sources.list.d/debian.sources"));
        assert_eq!(s.len(), 2);
        let d = pick_defaults(&s, Path::new("/nonexistent")).unwrap();
        assert_eq!(d.mirror, "http://mirror.example/debian");
        assert_eq!(d.suite, "bookworm");
        assert_eq!(d.components, vec!["main", "contrib"]);
        assert_eq!(d.keyring, Some(PathBuf::from("/usr/share/keyrings/x.gpg")));
    }

    #[test]
    fn one_line_with_options_and_comments() {
        let text = "# comment\ndeb-src http://a.example/debian trixie main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://a.example/debian trixie main non-free # x\n";
        let s = parse_one_line(text, Path::new("sources.list"));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].suites, vec!["trixie"]);
        assert_eq!(s[0].components, vec!["main", "non-free"]);
        assert_eq!(s[0].signed_by, Some(PathBuf::from("/k.gpg")));
    }

    #[test]
    fn disabled_and_missing() {
        let text =
            "Enabled: no\nTypes: deb\nURIs: http://a.example/d\nSuites: sid\nComponents: main\n";
        let s = parse_deb822(text, Path::new("x.sources"));
        assert!(s.is_empty());
        assert!(pick_defaults(&s, Path::new("/")).is_none());
    }

    #[test]
    fn reads_a_config_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc/apt/sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("etc/apt/sources.list.d/a.sources"),
            "Types: deb\nURIs: file:///srv/repo\nSuites: stable\nComponents: main\n",
        )
        .unwrap();
        let d = pick_defaults(&read_sources(dir.path()), dir.path()).unwrap();
        assert_eq!(d.mirror, "file:///srv/repo");
        assert_eq!(d.keyring, None);
    }
}
