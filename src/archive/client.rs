//! Fetching a suite: `InRelease` (or `Release` + `Release.gpg`), verified, and
//! the `Packages` indices it vouches for, checked by SHA256 (by-hash URLs where
//! the archive offers them). Verified files are kept under `<cache>/lists/` so a
//! later run can work offline and skip unchanged indices.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::packages::{IndexError, PackageIndex};
use super::release::{format_rfc2822, IndexEntry, Release, ReleaseError};
use super::verify::{Keyring, VerifyError};
use crate::fetch::{self, Expected, FetchError, Fetcher};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{url}: {source}")]
    Release {
        url: String,
        #[source]
        source: ReleaseError,
    },
    #[error("{url} describes suite {found:?}, not the requested {wanted:?}")]
    WrongSuite {
        url: String,
        wanted: String,
        found: String,
    },
    #[error("{url} expired at {valid_until} (Valid-Until); the mirror is stale or the clock is wrong (--ignore-valid-until overrides)")]
    Expired { url: String, valid_until: String },
    #[error("component {component:?} is not in suite {suite} (it has: {available})")]
    MissingComponent {
        component: String,
        suite: String,
        available: String,
    },
    #[error("architecture {arch:?} is not in suite {suite} (it has: {available})")]
    MissingArch {
        arch: String,
        suite: String,
        available: String,
    },
    #[error(
        "suite {suite}: the Release file lists no Packages index for {component}/binary-{arch}"
    )]
    MissingIndex {
        suite: String,
        component: String,
        arch: String,
    },
    #[error("{url}: cannot decompress: {reason}")]
    Decompress { url: String, reason: String },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to fetch and check a suite.
#[derive(Debug, Clone)]
pub struct SuiteRequest {
    pub mirror: String,
    pub suite: String,
    pub components: Vec<String>,
    pub arch: String,
    pub ignore_valid_until: bool,
    /// Use only `<cache>/lists` (no network).
    pub offline: bool,
    /// The time signatures and `Valid-Until` are checked against.
    pub now: SystemTime,
}

/// A verified suite.
#[derive(Debug, Clone)]
pub struct Suite {
    pub release: Release,
    /// The verified Release text.
    pub release_text: String,
    /// Who signed it.
    pub signer: String,
    /// SHA256 of the signed InRelease/Release as fetched (a cache key input).
    pub release_sha256: String,
}

impl Suite {
    /// The codename (bookworm, trixie, ...), falling back to the suite name.
    pub fn codename<'a>(&'a self, requested: &'a str) -> &'a str {
        self.release.codename.as_deref().unwrap_or(requested)
    }
}

/// Names files of one mirror + suite under `<cache>/lists`, apt-style.
pub fn lists_prefix(mirror: &str, suite: &str) -> String {
    let m = mirror
        .split_once("://")
        .map_or(mirror, |(_, r)| r)
        .trim_end_matches('/');
    format!("{}_dists_{suite}", m.replace('/', "_"))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ArchiveError> {
    let io = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let tmp = fetch::temp_name(path);
    std::fs::write(&tmp, data).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Fetches and verifies the suite's Release.
pub async fn fetch_suite(
    fetcher: &Fetcher,
    keyring: &Keyring,
    req: &SuiteRequest,
    lists: &Path,
) -> Result<Suite, ArchiveError> {
    let dists = fetch::join(&req.mirror, &format!("dists/{}", req.suite));
    let prefix = lists_prefix(&req.mirror, &req.suite);
    let cached_inrelease = lists.join(format!("{prefix}_InRelease"));
    let cached_release = lists.join(format!("{prefix}_Release"));
    let (url, verified, raw) = if req.offline {
        if let Ok(b) = std::fs::read(&cached_inrelease) {
            let what = cached_inrelease.display().to_string();
            (
                what.clone(),
                keyring.verify_clearsigned(&what, &b, req.now)?,
                b,
            )
        } else if let (Ok(r), Ok(s)) = (
            std::fs::read(&cached_release),
            std::fs::read(lists.join(format!("{prefix}_Release.gpg"))),
        ) {
            let what = cached_release.display().to_string();
            (
                what.clone(),
                keyring.verify_detached(&what, &r, &s, req.now)?,
                r,
            )
        } else {
            return Err(FetchError::NotCached {
                what: format!("the Release of {} {}", req.mirror, req.suite),
                path: cached_inrelease,
            }
            .into());
        }
    } else {
        let inrelease_url = format!("{dists}/InRelease");
        match fetcher.get(&inrelease_url).await {
            Ok(b) => {
                let v = keyring.verify_clearsigned(&inrelease_url, &b, req.now)?;
                write_atomic(&cached_inrelease, &b)?;
                (inrelease_url, v, b)
            }
            Err(FetchError::NotFound { .. }) => {
                let release_url = format!("{dists}/Release");
                let r = fetcher.get(&release_url).await?;
                let s = fetcher.get(&format!("{release_url}.gpg")).await?;
                let v = keyring.verify_detached(&release_url, &r, &s, req.now)?;
                write_atomic(&cached_release, &r)?;
                write_atomic(&lists.join(format!("{prefix}_Release.gpg")), &s)?;
                (release_url, v, r)
            }
            Err(e) => return Err(e.into()),
        }
    };
    let release = Release::parse(&verified.text).map_err(|source| ArchiveError::Release {
        url: url.clone(),
        source,
    })?;
    if !release.matches_suite(&req.suite) {
        return Err(ArchiveError::WrongSuite {
            url,
            wanted: req.suite.clone(),
            found: format!(
                "{} ({})",
                release.suite.as_deref().unwrap_or("?"),
                release.codename.as_deref().unwrap_or("?")
            ),
        });
    }
    if let Some(vu) = release.valid_until {
        if vu < req.now && !req.ignore_valid_until {
            return Err(ArchiveError::Expired {
                url,
                valid_until: format_rfc2822(vu),
            });
        }
    }
    for c in &req.components {
        if !release.components.is_empty()
            && !release
                .components
                .iter()
                .any(|x| x == c || x.ends_with(&format!("/{c}")))
        {
            return Err(ArchiveError::MissingComponent {
                component: c.clone(),
                suite: req.suite.clone(),
                available: release.components.join(" "),
            });
        }
    }
    if !release.architectures.is_empty() && !release.architectures.iter().any(|a| a == &req.arch) {
        return Err(ArchiveError::MissingArch {
            arch: req.arch.clone(),
            suite: req.suite.clone(),
            available: release.architectures.join(" "),
        });
    }
    Ok(Suite {
        release,
        release_text: verified.text,
        signer: verified.signer,
        release_sha256: fetch::sha256_hex(&raw),
    })
}

/// Which index file to fetch for a component: the smallest compressed form the
/// Release lists (xz, then gz, then plain).
fn pick_index<'a>(
    release: &'a Release,
    component: &str,
    arch: &str,
) -> Option<(String, &'a IndexEntry)> {
    ["xz", "gz", ""].iter().find_map(|ext| {
        let path = if ext.is_empty() {
            format!("{component}/binary-{arch}/Packages")
        } else {
            format!("{component}/binary-{arch}/Packages.{ext}")
        };
        release.sha256.get(&path).map(|e| (path, e))
    })
}

/// Fetches (or takes from the cache) and parses every component's Packages index.
pub async fn fetch_packages(
    fetcher: &Fetcher,
    suite: &Suite,
    req: &SuiteRequest,
    lists: &Path,
) -> Result<PackageIndex, ArchiveError> {
    let dists = fetch::join(&req.mirror, &format!("dists/{}", req.suite));
    let prefix = lists_prefix(&req.mirror, &req.suite);
    let mut files = Vec::new();
    for component in &req.components {
        let (path, entry) = pick_index(&suite.release, component, &req.arch).ok_or_else(|| {
            ArchiveError::MissingIndex {
                suite: req.suite.clone(),
                component: component.clone(),
                arch: req.arch.clone(),
            }
        })?;
        let plain_path = format!("{component}/binary-{}/Packages", req.arch);
        let plain_entry = suite.release.sha256.get(&plain_path).cloned();
        let plain_local = lists.join(format!("{prefix}_{}", plain_path.replace('/', "_")));
        let plain_url = format!("{dists}/{plain_path}");
        // A decompressed copy from an earlier run, checked against the Release's
        // entry for the uncompressed file, saves decompressing ~50 MB again.
        if let Some(pe) = &plain_entry {
            if verified_file(&plain_local, pe) {
                files.push((plain_url, plain_local.clone(), None, None));
                continue;
            }
        }
        let local = lists.join(format!("{prefix}_{}", path.replace('/', "_")));
        let expected = Expected {
            sha256: entry.sha256.clone(),
            size: entry.size,
        };
        let url = format!("{dists}/{path}");
        if !verified_file(&local, entry) {
            if req.offline {
                return Err(FetchError::NotCached {
                    what: format!("index {url}"),
                    path: local,
                }
                .into());
            }
            let what = format!("index {path}");
            let mut got = Err(FetchError::NotFound { url: url.clone() });
            if suite.release.acquire_by_hash {
                let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                let by_hash = format!("{dists}/{dir}/by-hash/SHA256/{}", entry.sha256);
                got = fetcher
                    .get_verified(&by_hash, &expected, &local, &what, None)
                    .await;
            }
            if matches!(got, Err(FetchError::NotFound { .. })) {
                got = fetcher
                    .get_verified(&url, &expected, &local, &what, None)
                    .await;
            }
            got?;
        }
        let keep = (local != plain_local).then_some(plain_local);
        files.push((url, local, keep, plain_entry));
    }
    // Decompress in parallel (xz is the slow part), then parse in order.
    let texts = futures::future::try_join_all(files.into_iter().map(|(url, local, keep, pe)| {
        tokio::task::spawn_blocking(move || {
            let (url, text) = decompress_file(&url, &local)?;
            if let Some(plain) = keep {
                if let Some(pe) = &pe {
                    if text.len() as u64 != pe.size || fetch::sha256_hex(text.as_bytes()) != pe.sha256 {
                        return Err(ArchiveError::Decompress {
                            url,
                            reason: "the decompressed index does not match the Release's SHA256 of Packages".into(),
                        });
                    }
                    write_atomic(&plain, text.as_bytes())?;
                }
            }
            Ok((url, text))
        })
    }))
    .await
    .map_err(|e| ArchiveError::Decompress {
        url: "Packages".into(),
        reason: e.to_string(),
    })?;
    let mut index = PackageIndex::new();
    for t in texts {
        let (url, text) = t?;
        index.add(&url, &text)?;
    }
    Ok(index)
}

fn verified_file(path: &Path, entry: &IndexEntry) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == entry.size)
        && fetch::sha256_file(path).is_ok_and(|h| h == entry.sha256)
}

fn decompress_file(url: &str, local: &Path) -> Result<(String, String), ArchiveError> {
    let f = std::fs::File::open(local).map_err(|source| ArchiveError::Io {
        path: local.to_path_buf(),
        source,
    })?;
    let f = std::io::BufReader::with_capacity(1 << 20, f);
    let mut text = String::new();
    let name = local.to_string_lossy();
    let r = if name.ends_with(".xz") {
        liblzma::read::XzDecoder::new(f).read_to_string(&mut text)
    } else if name.ends_with(".gz") {
        flate2::read::MultiGzDecoder::new(f).read_to_string(&mut text)
    } else {
        let mut f = f;
        f.read_to_string(&mut text)
    };
    r.map_err(|e| ArchiveError::Decompress {
        url: url.to_string(),
        reason: e.to_string(),
    })?;
    Ok((url.to_string(), text))
}
