//! The base-tree cache: finished bootstrap trees kept under `<cache_dir>/trees/`,
//! keyed by everything that decides their content, so a later build with the same
//! inputs starts from a copy instead of bootstrapping.
//!
//! * Key inputs: the verified InRelease digest, the resolved package list (names,
//!   versions, SHA256s), architecture, mirror, suite, components, variant,
//!   include/exclude, `--foreign`, the private-users base and our own version.
//! * An entry is `trees/<digest>/` with `rootfs/` and `manifest.json`; it is built as
//!   `trees/.<digest>.tmp-PID` and renamed, under an exclusive lock of
//!   `trees/.lock`; readers hold the lock shared, so a prune never deletes a tree
//!   that is being copied. Two builds with one key both succeed: the second store
//!   finds the entry there and drops its copy.
//! * Each entry records a fingerprint of its tree (paths, types, modes, owners,
//!   sizes, link targets, ctimes); a tree changed after it was stored no longer
//!   matches and is removed and rebuilt.
//! * A miss names the inputs that differ from the most recently used entry.
//! * `last_used` orders entries for the size limit (least recently used go first).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format of the entries; bump when the layout or key derivation changes.
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("tree cache {path}: {step}: {source}")]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tree cache: copying {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Box<crate::image::ImageError>,
    },
    #[error("option --cache: expected auto, refresh or off, got {0:?}")]
    BadMode(String),
    #[error("option --cache-limit: {0:?} is not a size like 500M, 10G or 0 (no limit)")]
    BadLimit(String),
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// How a build uses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Use a matching entry; store a new one after a bootstrap.
    #[default]
    Auto,
    /// Ignore an existing entry, bootstrap, and replace it.
    Refresh,
    /// Neither read nor write.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = CacheError;
    fn from_str(s: &str) -> Result<Mode, CacheError> {
        match s {
            "auto" => Ok(Mode::Auto),
            "refresh" => Ok(Mode::Refresh),
            "off" | "no" | "false" => Ok(Mode::Off),
            other => Err(CacheError::BadMode(other.into())),
        }
    }
}

/// Parses `500M`, `10G`, `1T`, `123` (bytes); `0` means no limit.
pub fn parse_size(s: &str) -> Result<u64, CacheError> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(CacheError::BadLimit(s.into())),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| *n >= 0.0)
        .map(|n| (n * mul as f64) as u64)
        .ok_or_else(|| CacheError::BadLimit(s.into()))
}

/// The inputs that decide a tree's content.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Key {
    /// Named scalar inputs (release digest, arch, options, ...), sorted.
    pub inputs: BTreeMap<String, String>,
    /// `name version sha256` per package, sorted.
    pub packages: Vec<String>,
}

impl Key {
    /// The entry name: SHA256 of every input.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("format {FORMAT}\n"));
        for (k, v) in &self.inputs {
            h.update(format!("{k}={v}\n"));
        }
        for p in &self.packages {
            h.update(format!("pkg {p}\n"));
        }
        hex::encode(h.finalize())
    }

    /// Human-readable differences from `old` (why `self` missed an entry made from `old`).
    pub fn differences(&self, old: &Key) -> Vec<String> {
        let mut out = Vec::new();
        let names: std::collections::BTreeSet<&String> =
            self.inputs.keys().chain(old.inputs.keys()).collect();
        for n in names {
            let (a, b) = (old.inputs.get(n), self.inputs.get(n));
            if a != b {
                let show = |v: Option<&String>| match v {
                    Some(v) if !v.is_empty() => v.clone(),
                    _ => "(none)".to_string(),
                };
                out.push(format!("{n}: {} → {}", show(a), show(b)));
            }
        }
        if self.packages != old.packages {
            let name = |l: &String| l.split(' ').next().unwrap_or("").to_string();
            let old_map: BTreeMap<String, &String> =
                old.packages.iter().map(|l| (name(l), l)).collect();
            let new_map: BTreeMap<String, &String> =
                self.packages.iter().map(|l| (name(l), l)).collect();
            let mut changes = Vec::new();
            for (n, l) in &new_map {
                match old_map.get(n) {
                    None => changes.push(format!("+{n}")),
                    Some(o) if o != l => {
                        let ver = |s: &str| s.split(' ').nth(1).unwrap_or("").to_string();
                        changes.push(format!("{n} {} → {}", ver(o), ver(l)));
                    }
                    _ => {}
                }
            }
            for n in old_map.keys().filter(|n| !new_map.contains_key(*n)) {
                changes.push(format!("-{n}"));
            }
            let shown = changes.len().min(8);
            let more = if changes.len() > shown {
                format!(" (+{} more)", changes.len() - shown)
            } else {
                String::new()
            };
            out.push(format!("packages: {}{more}", changes[..shown].join(", ")));
        }
        out
    }
}

/// What `manifest.json` of an entry records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub digest: String,
    pub key: Key,
    pub created: u64,
    pub last_used: u64,
    pub bytes: u64,
    pub entries: u64,
    pub fingerprint: String,
    /// Our version that built it.
    pub builder: String,
}

/// One cached tree.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Entry {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
}

/// The outcome of a lookup.
#[derive(Debug)]
pub enum Lookup {
    Hit(Entry),
    /// No usable entry; the reason is for the user (which input changed, or that
    /// the entry was corrupted and removed).
    Miss(String),
}

/// The cache under `<cache_dir>/trees`.
pub struct TreeCache {
    root: PathBuf,
    /// Total size limit in bytes; 0 = none.
    pub limit: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A held `flock` on the cache's lock file.
pub struct Lock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl TreeCache {
    pub fn new(cache_dir: &Path, limit: u64) -> TreeCache {
        TreeCache {
            root: cache_dir.join("trees"),
            limit,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self, exclusive: bool) -> Result<Lock, CacheError> {
        std::fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        let p = self.root.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io("open lock", &p))?;
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(f, arg)
            .map(Lock)
            .map_err(|(_, e)| CacheError::Io {
                step: "lock",
                path: p,
                source: e.into(),
            })
    }

    /// Every entry with a readable manifest, most recently used first.
    pub fn entries(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| {
                let dir = e.path();
                let m = std::fs::read(dir.join("manifest.json")).ok()?;
                let manifest: Manifest = serde_json::from_slice(&m).ok()?;
                Some(Entry { dir, manifest })
            })
            .collect();
        v.sort_by(|a, b| b.manifest.last_used.cmp(&a.manifest.last_used));
        v
    }

    /// Finds the entry for `key`, checks its fingerprint, and copies its tree to
    /// `dest` (which must not exist). A corrupted entry is removed (a miss).
    pub fn restore(&self, key: &Key, dest: &Path) -> Result<Lookup, CacheError> {
        let digest = key.digest();
        let dir = self.root.join(&digest);
        let lock = self.lock(false)?;
        let manifest: Option<Manifest> = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|m| serde_json::from_slice(&m).ok());
        let Some(mut manifest) = manifest else {
            let entries = self.entries();
            drop(lock);
            let reason = match entries.first() {
                None => "the cache is empty".to_string(),
                Some(e) => {
                    let d = key.differences(&e.manifest.key);
                    if d.is_empty() {
                        "no entry for these inputs".into()
                    } else {
                        format!("changed since the last cached tree: {}", d.join("; "))
                    }
                }
            };
            return Ok(Lookup::Miss(reason));
        };
        let rootfs = dir.join("rootfs");
        let (fp, _, _) = fingerprint(&rootfs)?;
        if fp != manifest.fingerprint {
            drop(lock);
            let _l = self.lock(true)?;
            let _ = crate::bootstrap::remove_tree(&dir);
            return Ok(Lookup::Miss(format!(
                "cached tree {digest} was modified after it was stored (fingerprint mismatch); removed, rebuilding"
            )));
        }
        crate::image::clone_tree(&rootfs, dest).map_err(|source| CacheError::Copy {
            from: rootfs.clone(),
            to: dest.to_path_buf(),
            source: Box::new(source),
        })?;
        manifest.last_used = now();
        let _ = write_manifest(&dir, &manifest);
        Ok(Lookup::Hit(Entry { dir, manifest }))
    }

    /// Stores a copy of `tree` under `key` (replacing an entry with that key when
    /// `replace`), then applies the size limit. Returns the entry.
    pub fn store(&self, key: &Key, tree: &Path, replace: bool) -> Result<Entry, CacheError> {
        let digest = key.digest();
        let dir = self.root.join(&digest);
        std::fs::create_dir_all(&self.root).map_err(io("create", &self.root))?;
        // Copy outside the lock (it takes the time), publish under it.
        let tmp = self.root.join(format!(".{digest}.tmp-{}", unique()));
        let _ = crate::bootstrap::remove_tree(&tmp);
        std::fs::create_dir(&tmp).map_err(io("create", &tmp))?;
        let rootfs = tmp.join("rootfs");
        let copied = crate::image::clone_tree(tree, &rootfs).map_err(|source| CacheError::Copy {
            from: tree.to_path_buf(),
            to: rootfs.clone(),
            source: Box::new(source),
        });
        if let Err(e) = copied {
            let _ = crate::bootstrap::remove_tree(&tmp);
            return Err(e);
        }
        let (fingerprint, bytes, entries) = fingerprint(&rootfs)?;
        let t = now();
        let manifest = Manifest {
            format: FORMAT,
            digest: digest.clone(),
            key: key.clone(),
            created: t,
            last_used: t,
            bytes,
            entries,
            fingerprint,
            builder: env!("CARGO_PKG_VERSION").into(),
        };
        write_manifest(&tmp, &manifest)?;
        let lock = self.lock(true)?;
        if dir.exists() {
            if replace {
                let old = self.root.join(format!(".{digest}.old-{}", unique()));
                std::fs::rename(&dir, &old).map_err(io("rename", &dir))?;
                std::fs::rename(&tmp, &dir).map_err(io("rename", &tmp))?;
                let _ = crate::bootstrap::remove_tree(&old);
            } else {
                // Another build stored the same key first: keep theirs.
                let _ = crate::bootstrap::remove_tree(&tmp);
            }
        } else {
            std::fs::rename(&tmp, &dir).map_err(io("rename", &tmp))?;
        }
        drop(lock);
        self.enforce_limit(Some(&digest))?;
        let manifest = std::fs::read(dir.join("manifest.json"))
            .ok()
            .and_then(|m| serde_json::from_slice(&m).ok())
            .unwrap_or(manifest);
        Ok(Entry { dir, manifest })
    }

    /// Removes least recently used entries until the total is within the limit;
    /// `keep` is never removed. Returns the removed entries.
    pub fn enforce_limit(&self, keep: Option<&str>) -> Result<Vec<Entry>, CacheError> {
        if self.limit == 0 {
            return Ok(vec![]);
        }
        self.prune_to(self.limit, keep)
    }

    /// Removes least recently used entries until at most `max_bytes` remain.
    pub fn prune_to(&self, max_bytes: u64, keep: Option<&str>) -> Result<Vec<Entry>, CacheError> {
        let _lock = self.lock(true)?;
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.manifest.bytes).sum();
        let mut removed = Vec::new();
        while total > max_bytes {
            let Some(pos) = entries
                .iter()
                .rposition(|e| Some(e.manifest.digest.as_str()) != keep)
            else {
                break;
            };
            let e = entries.remove(pos);
            crate::bootstrap::remove_tree(&e.dir).map_err(io("remove", &e.dir))?;
            total -= e.manifest.bytes;
            removed.push(e);
        }
        // Leftovers of interrupted stores.
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = n
                .rsplit_once(".tmp-")
                .or_else(|| n.rsplit_once(".old-"))
                .and_then(|(_, p)| p.split('-').next()?.parse::<i32>().ok())
            {
                if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                    let _ = crate::bootstrap::remove_tree(&e.path());
                }
            }
        }
        Ok(removed)
    }
}

/// `PID-N`, unique within this process (several builds may share one).
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), CacheError> {
    let p = dir.join("manifest.json");
    let tmp = dir.join(".manifest.json.tmp");
    let data = serde_json::to_vec_pretty(m).expect("manifest serialises");
    std::fs::write(&tmp, data).map_err(io("write", &tmp))?;
    std::fs::rename(&tmp, &p).map_err(io("rename", &p))
}

/// (fingerprint, bytes, entries) of a tree: a SHA256 over every entry's path, type,
/// mode, owner, size, link target and ctime, in sorted order (no content is read).
pub fn fingerprint(root: &Path) -> Result<(String, u64, u64), CacheError> {
    let mut h = Sha256::new();
    let (mut bytes, mut entries) = (0u64, 0u64);
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .same_file_system(true)
        .sort_by_file_name();
    for e in walker {
        let e = e.map_err(|e| CacheError::Io {
            step: "walk",
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        let md = e.metadata().map_err(|err| CacheError::Io {
            step: "stat",
            path: e.path().to_path_buf(),
            source: err.into(),
        })?;
        let rel = e.path().strip_prefix(root).unwrap_or(e.path());
        let link = if md.file_type().is_symlink() {
            std::fs::read_link(e.path())
                .map(|l| l.display().to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        h.update(format!(
            "{}\0{:o}\0{}\0{}\0{}\0{}\0{}.{}\0{link}\n",
            rel.display(),
            md.mode(),
            md.uid(),
            md.gid(),
            md.size(),
            md.rdev(),
            md.ctime(),
            md.ctime_nsec()
        ));
        if md.is_file() {
            bytes += md.size();
        }
        entries += 1;
    }
    Ok((hex::encode(h.finalize()), bytes, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(release: &str, pkgs: &[&str]) -> Key {
        let mut k = Key::default();
        k.inputs.insert("release".into(), release.into());
        k.inputs.insert("arch".into(), "amd64".into());
        k.packages = pkgs.iter().map(|s| s.to_string()).collect();
        k
    }

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("lots").is_err());
        assert_eq!("refresh".parse::<Mode>().unwrap(), Mode::Refresh);
        assert!("sometimes".parse::<Mode>().is_err());
    }

    #[test]
    fn differences_name_inputs_and_packages() {
        let a = key("r1", &["libc6 2.36-9 aa", "mawk 1.3 bb", "old 1 cc"]);
        let mut b = key("r2", &["libc6 2.36-10 dd", "mawk 1.3 bb", "new 1 ee"]);
        b.inputs.insert("private_users".into(), "6553600".into());
        let d = b.differences(&a);
        assert!(d.contains(&"release: r1 → r2".to_string()), "{d:?}");
        assert!(
            d.contains(&"private_users: (none) → 6553600".to_string()),
            "{d:?}"
        );
        let p = d.iter().find(|x| x.starts_with("packages:")).unwrap();
        assert!(
            p.contains("libc6 2.36-9 → 2.36-10") && p.contains("+new") && p.contains("-old"),
            "{p}"
        );
        assert_ne!(a.digest(), b.digest());
        assert_eq!(
            a.digest(),
            key("r1", &["libc6 2.36-9 aa", "mawk 1.3 bb", "old 1 cc"]).digest()
        );
    }

    fn tree(dir: &Path, content: &[u8]) -> PathBuf {
        let t = dir.join(format!("src-{}", String::from_utf8_lossy(content)));
        if t.exists() {
            return t;
        }
        std::fs::create_dir_all(t.join("etc")).unwrap();
        std::fs::write(t.join("etc/file"), content).unwrap();
        std::os::unix::fs::symlink("file", t.join("etc/link")).unwrap();
        t
    }

    #[test]
    fn store_restore_corruption_and_lru() {
        let d = tempfile::tempdir().unwrap();
        let c = TreeCache::new(&d.path().join("cache"), 0);
        let k1 = key("r1", &["a 1 x"]);
        assert!(
            matches!(c.restore(&k1, &d.path().join("o0")).unwrap(), Lookup::Miss(r) if r.contains("empty"))
        );
        c.store(&k1, &tree(d.path(), b"one"), false).unwrap();
        match c.restore(&k1, &d.path().join("o1")).unwrap() {
            Lookup::Hit(e) => assert_eq!(e.manifest.entries, 4),
            Lookup::Miss(r) => panic!("miss: {r}"),
        }
        assert_eq!(std::fs::read(d.path().join("o1/etc/file")).unwrap(), b"one");
        // A different key misses and names what changed.
        let k2 = key("r2", &["a 1 x"]);
        match c.restore(&k2, &d.path().join("o2")).unwrap() {
            Lookup::Miss(r) => assert!(r.contains("release: r1 → r2"), "{r}"),
            Lookup::Hit(_) => panic!("hit for another key"),
        }
        assert!(!d.path().join("o2").exists());
        // Tampering with the cached tree is detected; the entry goes.
        let e = &c.entries()[0];
        std::fs::write(e.rootfs().join("etc/file"), b"evil").unwrap();
        match c.restore(&k1, &d.path().join("o3")).unwrap() {
            Lookup::Miss(r) => assert!(r.contains("modified"), "{r}"),
            Lookup::Hit(_) => panic!("corrupted entry used"),
        }
        assert!(c.entries().is_empty() && !d.path().join("o3").exists());
        // LRU: with room for one tree of this size, storing a second evicts the first.
        let c = TreeCache::new(&d.path().join("cache2"), 5);
        c.store(&k1, &tree(d.path(), b"one"), false).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        c.store(&k2, &tree(d.path(), b"two!"), false).unwrap();
        let left: Vec<String> = c
            .entries()
            .iter()
            .map(|e| e.manifest.digest.clone())
            .collect();
        assert_eq!(left, vec![k2.digest()]);
    }
}
