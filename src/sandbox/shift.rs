//! Ownership shift of a tree into a user-namespace id range (what
//! `systemd-nspawn --private-users-ownership=chown` does, but keeping file
//! capabilities): every inode once, setuid/setgid bits and `security.capability`
//! restored after `lchown` clears them, POSIX ACL ids shifted as well.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{IdMap, SandboxError};

const XATTR_CAPS: &str = "security.capability";
const XATTR_ACLS: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];

const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_REVISION_1: u32 = 0x0100_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_FLAGS_MASK: u32 = !VFS_CAP_REVISION_MASK;
const XATTR_CAPS_SZ_1: usize = 12;
const XATTR_CAPS_SZ_2: usize = 20;
const XATTR_CAPS_SZ_3: usize = 24;

const ACL_XATTR_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

/// What `shift_tree` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ShiftReport {
    /// Inodes whose owner was changed.
    pub shifted: u64,
    /// Inodes already owned inside the target range (left alone; makes the shift restartable).
    pub already_shifted: u64,
    /// Extra names of hardlinked inodes that were seen before (not shifted again).
    pub hardlinks_skipped: u64,
    /// Files whose setuid/setgid bits were re-applied after `lchown`.
    pub setid_restored: u64,
    /// `security.capability` xattrs rewritten for the namespace.
    pub caps_rewritten: u64,
    /// POSIX ACL xattrs whose user/group ids were shifted.
    pub acls_shifted: u64,
}

/// Shifts the ownership of every inode under `root` (not crossing into other file
/// systems) from ids `0..map.count` to `map.host_base..`. Ids already inside the target
/// range are kept, so an interrupted shift can be run again. Hardlinked inodes are
/// shifted once (tracked by `(dev, ino)` when `nlink > 1`).
pub fn shift_tree(root: &Path, map: &IdMap) -> Result<ShiftReport, SandboxError> {
    map.validate().map_err(|detail| SandboxError::IdRange {
        detail,
        path: root.to_path_buf(),
    })?;
    let mut report = ShiftReport::default();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .same_file_system(true);
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            shift_err("walk", &path, e.into())
        })?;
        let path = entry.path();
        let md = std::fs::symlink_metadata(path).map_err(|e| shift_err("lstat", path, e))?;
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            report.hardlinks_skipped += 1;
            continue;
        }
        let uid = shift_id(map, md.uid(), path)?;
        let gid = shift_id(map, md.gid(), path)?;
        if uid == md.uid() && gid == md.gid() {
            report.already_shifted += 1;
            continue;
        }
        let is_link = md.file_type().is_symlink();
        let caps = if md.is_file() {
            read_xattr(path, XATTR_CAPS)?
        } else {
            None
        };
        let mut acls = Vec::new();
        if !is_link {
            for name in XATTR_ACLS {
                if let Some(v) = read_xattr(path, name)? {
                    acls.push((name, v));
                }
            }
        }
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| shift_err("lchown", path, e))?;
        report.shifted += 1;
        let mode = md.mode() & 0o7777;
        if !is_link && mode & 0o6000 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| shift_err("chmod", path, e))?;
            report.setid_restored += 1;
        }
        if let Some(cap) = caps {
            let new = rewrite_cap_xattr(&cap, map).map_err(|detail| SandboxError::Shift {
                step: "parse security.capability of",
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidData, detail),
            })?;
            xattr::set(path, XATTR_CAPS, &new)
                .map_err(|e| shift_err("set security.capability on", path, e))?;
            report.caps_rewritten += 1;
        }
        for (name, value) in acls {
            if let Some(new) = shift_acl_xattr(&value, map) {
                xattr::set(path, name, &new).map_err(|e| shift_err("set ACL on", path, e))?;
                report.acls_shifted += 1;
            }
        }
    }
    Ok(report)
}

fn shift_err(step: &'static str, path: &Path, source: io::Error) -> SandboxError {
    SandboxError::Shift {
        step,
        path: path.to_path_buf(),
        source,
    }
}

fn read_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>, SandboxError> {
    match xattr::get(path, name) {
        Ok(v) => Ok(v),
        // File systems without xattr support have nothing to preserve.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(shift_err("read xattr of", path, e)),
    }
}

fn shift_id(map: &IdMap, id: u32, path: &Path) -> Result<u32, SandboxError> {
    if map.contains_host(id) {
        return Ok(id);
    }
    map.to_host(id).ok_or_else(|| SandboxError::UnmappableId {
        path: PathBuf::from(path),
        id,
        map: *map,
    })
}

/// Rewrites a `security.capability` value for a tree shifted by `map`: v1/v2 (which
/// the kernel honours only for the initial namespace's root) become v3 with
/// `rootid = host_base`; a v3 whose rootid is an unshifted id `r` gets `host_base + r`;
/// a v3 already rooted inside the range is kept.
pub fn rewrite_cap_xattr(value: &[u8], map: &IdMap) -> Result<Vec<u8>, String> {
    if value.len() < 4 {
        return Err(format!("{} bytes is too short", value.len()));
    }
    let le = |i: usize| u32::from_le_bytes([value[i], value[i + 1], value[i + 2], value[i + 3]]);
    let magic = le(0);
    let flags = magic & VFS_CAP_FLAGS_MASK;
    let (data, rootid): (Vec<u32>, u32) = match (magic & VFS_CAP_REVISION_MASK, value.len()) {
        (VFS_CAP_REVISION_1, XATTR_CAPS_SZ_1) => (vec![le(4), le(8), 0, 0], map.host_base),
        (VFS_CAP_REVISION_2, XATTR_CAPS_SZ_2) => {
            (vec![le(4), le(8), le(12), le(16)], map.host_base)
        }
        (VFS_CAP_REVISION_3, XATTR_CAPS_SZ_3) => {
            let r = le(20);
            let root = if map.contains_host(r) {
                r
            } else {
                map.to_host(r)
                    .ok_or_else(|| format!("v3 rootid {r} is outside the id range"))?
            };
            (vec![le(4), le(8), le(12), le(16)], root)
        }
        (rev, len) => return Err(format!("revision {:#x} with {len} bytes", rev >> 24)),
    };
    let mut out = Vec::with_capacity(XATTR_CAPS_SZ_3);
    out.extend_from_slice(&(VFS_CAP_REVISION_3 | flags).to_le_bytes());
    for d in data {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&rootid.to_le_bytes());
    Ok(out)
}

/// Shifts the named user/group ids of a POSIX ACL xattr (`posix_acl_xattr` layout:
/// version u32, then entries of tag u16, perm u16, id u32). Returns None when the
/// value is malformed or nothing changes.
pub fn shift_acl_xattr(value: &[u8], map: &IdMap) -> Option<Vec<u8>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) {
        return None;
    }
    if u32::from_le_bytes(value[0..4].try_into().ok()?) != ACL_XATTR_VERSION {
        return None;
    }
    let mut out = value.to_vec();
    let mut changed = false;
    for chunk in out[4..].chunks_exact_mut(8) {
        let tag = u16::from_le_bytes([chunk[0], chunk[1]]);
        if tag != ACL_USER && tag != ACL_GROUP {
            continue;
        }
        let id = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        if map.contains_host(id) {
            continue;
        }
        let new = map.to_host(id)?;
        chunk[4..8].copy_from_slice(&new.to_le_bytes());
        changed = true;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(permitted: u32, effective: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let magic = VFS_CAP_REVISION_2 | u32::from(effective);
        for w in [magic, permitted, 0, 0, 0] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    #[test]
    fn cap_v2_becomes_v3_rooted_at_base() {
        let map = IdMap::new(100_000);
        // cap_net_raw (13), effective
        let out = rewrite_cap_xattr(&v2(1 << 13, true), &map).unwrap();
        assert_eq!(out.len(), XATTR_CAPS_SZ_3);
        assert_eq!(
            u32::from_le_bytes(out[0..4].try_into().unwrap()),
            VFS_CAP_REVISION_3 | 1
        );
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), 1 << 13);
        assert_eq!(u32::from_le_bytes(out[20..24].try_into().unwrap()), 100_000);
    }

    #[test]
    fn cap_v3_rootid_shifted_once() {
        let map = IdMap::new(100_000);
        let once = rewrite_cap_xattr(&v2(1 << 13, false), &map).unwrap();
        let twice = rewrite_cap_xattr(&once, &map).unwrap();
        assert_eq!(once, twice, "already rooted in range: unchanged");
        let mut r5 = once.clone();
        r5[20..24].copy_from_slice(&5u32.to_le_bytes());
        let out = rewrite_cap_xattr(&r5, &map).unwrap();
        assert_eq!(u32::from_le_bytes(out[20..24].try_into().unwrap()), 100_005);
        let mut far = once;
        far[20..24].copy_from_slice(&7_000_000u32.to_le_bytes());
        assert!(rewrite_cap_xattr(&far, &map).is_err());
    }

    #[test]
    fn cap_v1_and_garbage() {
        let map = IdMap::new(0x10000);
        let mut v1 = Vec::new();
        for w in [VFS_CAP_REVISION_1, 0xff, 0] {
            v1.extend_from_slice(&w.to_le_bytes());
        }
        let out = rewrite_cap_xattr(&v1, &map).unwrap();
        assert_eq!(out.len(), 24);
        assert_eq!(u32::from_le_bytes(out[4..8].try_into().unwrap()), 0xff);
        assert!(rewrite_cap_xattr(&[1, 2], &map).is_err());
        assert!(rewrite_cap_xattr(&v2(1, false)[..16], &map).is_err());
    }

    #[test]
    fn acl_ids_shift() {
        let map = IdMap::new(100_000);
        let mut v = ACL_XATTR_VERSION.to_le_bytes().to_vec();
        for (tag, id) in [(0x01u16, u32::MAX), (ACL_USER, 1000), (ACL_GROUP, 100_050)] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&7u16.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let out = shift_acl_xattr(&v, &map).unwrap();
        assert_eq!(
            u32::from_le_bytes(out[4 + 8 + 4..4 + 16].try_into().unwrap()),
            101_000
        );
        assert_eq!(&out[4..12], &v[4..12], "USER_OBJ untouched");
        assert_eq!(&out[20..28], &v[20..28], "already in range");
        assert!(shift_acl_xattr(&out, &map).is_none());
        assert!(shift_acl_xattr(&[2, 0, 0], &map).is_none());
    }
}
