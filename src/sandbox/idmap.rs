//! User-namespace id ranges: the `0 -> BASE` mapping, its `/proc/PID/{uid,gid}_map`
//! text, and `--private-users=pick` (choose a free-looking base for a tree).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Ids inside a user namespace that map to the host: inside id `i` (for `i < count`)
/// is host id `host_base + i`. Uids and gids use the same map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_base: u32,
    pub count: u32,
}

/// The usual range size: one full 16-bit id space, as systemd-nspawn uses.
pub const RANGE: u32 = 0x10000;
/// Lowest base `pick` hands out (above the host's own 16-bit ids).
pub const PICK_MIN: u32 = 0x0001_0000;
/// Highest base `pick` hands out (the range systemd-nspawn picks from ends here too).
pub const PICK_MAX: u32 = 0x6FFF_0000;

impl IdMap {
    /// The 65536-id map at `host_base`.
    pub fn new(host_base: u32) -> Self {
        IdMap {
            host_base,
            count: RANGE,
        }
    }

    /// The line written to `/proc/PID/uid_map` and `gid_map`.
    pub fn proc_map_text(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }

    /// Host id for an inside id, if the inside id is in the range.
    pub fn to_host(&self, inside: u32) -> Option<u32> {
        (inside < self.count).then(|| self.host_base.checked_add(inside))?
    }

    /// Whether a host id lies in the mapped range.
    pub fn contains_host(&self, host: u32) -> bool {
        host >= self.host_base && host - self.host_base < self.count
    }

    /// Checks that the range neither wraps nor overlaps the host's ids `0..count`
    /// (a shift into an overlapping range could not be told apart from an unshifted tree).
    pub fn validate(&self) -> Result<(), String> {
        if self.count == 0 {
            return Err("id range is empty".into());
        }
        if self.host_base.checked_add(self.count - 1).is_none() {
            return Err(format!(
                "id range {}+{} exceeds 32 bits",
                self.host_base, self.count
            ));
        }
        if self.host_base < self.count {
            return Err(format!(
                "id base {} overlaps the unshifted ids 0..{}",
                self.host_base, self.count
            ));
        }
        Ok(())
    }
}

/// The `--private-users=` setting of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrivateUsers {
    /// No user namespace: the tree is owned by host ids 0..65535.
    #[default]
    No,
    /// A user namespace mapping 0..65535 to `BASE..BASE+65535`.
    Base(u32),
    /// Like `Base`, with a base chosen from the tree's path (or its current owner).
    Pick,
}

impl PrivateUsers {
    /// Parses `no`/`false`, `pick`, or a decimal base.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "no" | "false" | "0" => Ok(PrivateUsers::No),
            "pick" => Ok(PrivateUsers::Pick),
            _ => s
                .parse::<u32>()
                .map(PrivateUsers::Base)
                .map_err(|_| format!("private-users: expected no, pick or a base uid, got {s:?}")),
        }
    }

    /// The map to use for the tree at `root` (None for `No`). For `Pick`, a tree that is
    /// already owned by an aligned shifted base keeps that base; otherwise the base is
    /// derived from the path and moved past ranges that the host's passwd/group use.
    pub fn resolve(&self, root: &Path) -> Option<IdMap> {
        match *self {
            PrivateUsers::No => None,
            PrivateUsers::Base(b) => Some(IdMap::new(b)),
            PrivateUsers::Pick => {
                use std::os::unix::fs::MetadataExt;
                if let Ok(md) = std::fs::symlink_metadata(root) {
                    let uid = md.uid();
                    if uid >= PICK_MIN && uid % RANGE == 0 && uid <= PICK_MAX {
                        return Some(IdMap::new(uid));
                    }
                }
                let used = host_ids(&["/etc/passwd", "/etc/group"]);
                Some(IdMap::new(pick_base(root, &used)))
            }
        }
    }
}

/// Deterministic base for a path: FNV-1a of the path bytes, reduced to a multiple of
/// 65536 in `PICK_MIN..=PICK_MAX`; probes upwards (wrapping) past ranges containing
/// any id of `used`.
pub fn pick_base(path: &Path, used: &[u32]) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let slots = u64::from((PICK_MAX - PICK_MIN) / RANGE + 1);
    let first = h % slots;
    for i in 0..slots.min(4096) {
        let slot = (first + i) % slots;
        let base = PICK_MIN + (slot as u32) * RANGE;
        let map = IdMap::new(base);
        if !used.iter().any(|&id| map.contains_host(id)) {
            return base;
        }
    }
    PICK_MIN + (first as u32) * RANGE
}

/// Numeric ids (field 3) from passwd/group style files; unreadable files are skipped.
fn host_ids(files: &[&str]) -> Vec<u32> {
    let mut ids = Vec::new();
    for f in files {
        if let Ok(text) = std::fs::read_to_string(f) {
            ids.extend(
                text.lines()
                    .filter_map(|l| l.split(':').nth(2))
                    .filter_map(|s| s.parse::<u32>().ok()),
            );
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_text_and_lookup() {
        let m = IdMap::new(100_000);
        assert_eq!(m.proc_map_text(), "0 100000 65536\n");
        assert_eq!(m.to_host(0), Some(100_000));
        assert_eq!(m.to_host(65_535), Some(165_535));
        assert_eq!(m.to_host(65_536), None);
        assert!(m.contains_host(100_000) && m.contains_host(165_535));
        assert!(!m.contains_host(99_999) && !m.contains_host(165_536));
        assert!(m.validate().is_ok());
        assert!(IdMap::new(1000).validate().is_err());
        assert!(IdMap::new(u32::MAX - 10).validate().is_err());
        assert!(IdMap {
            host_base: 200_000,
            count: 0
        }
        .validate()
        .is_err());
    }

    #[test]
    fn parse_private_users() {
        assert_eq!(PrivateUsers::parse("no"), Ok(PrivateUsers::No));
        assert_eq!(PrivateUsers::parse("pick"), Ok(PrivateUsers::Pick));
        assert_eq!(
            PrivateUsers::parse("1048576"),
            Ok(PrivateUsers::Base(1_048_576))
        );
        assert!(PrivateUsers::parse("lots").is_err());
    }

    #[test]
    fn pick_is_aligned_in_range_and_deterministic() {
        for p in ["/var/tmp/a", "/var/tmp/b", "/", "/srv/machines/web-01"] {
            let b = pick_base(Path::new(p), &[]);
            assert_eq!(b % RANGE, 0, "{p}");
            assert!((PICK_MIN..=PICK_MAX).contains(&b), "{p}: {b}");
            assert_eq!(b, pick_base(Path::new(p), &[]));
        }
        assert_ne!(
            pick_base(Path::new("/var/tmp/a"), &[]),
            pick_base(Path::new("/var/tmp/b"), &[])
        );
    }

    #[test]
    fn pick_skips_used_ranges() {
        let p = Path::new("/var/tmp/x");
        let b = pick_base(p, &[]);
        let b2 = pick_base(p, &[b + 5]);
        assert_ne!(b, b2);
        assert_eq!(b2 % RANGE, 0);
        assert!(!IdMap::new(b2).contains_host(b + 5));
    }

    #[test]
    fn pick_keeps_the_base_a_tree_already_has() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        if std::fs::metadata(dir.path()).unwrap().uid() != 0 {
            eprintln!("SKIP: needs root to chown");
            return;
        }
        std::os::unix::fs::lchown(dir.path(), Some(0x20_0000), Some(0x20_0000)).unwrap();
        assert_eq!(
            PrivateUsers::Pick.resolve(dir.path()),
            Some(IdMap::new(0x20_0000))
        );
        assert_eq!(PrivateUsers::No.resolve(dir.path()), None);
    }
}
