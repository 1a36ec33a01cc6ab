//! Copying a tree: reflinks (`FICLONE`) per file where the filesystem can, else a parallel
//! copy (`copy_file_range` through `std::io::copy`); owners, modes (set-id bits included),
//! symlinks, hard links, xattrs (`security.capability` included), device nodes, FIFOs and
//! mtimes are kept. Mount points below the source are created empty, never descended into.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::{io_err, ImageError};

/// `_IOW(0x94, 9, int)`: share the extents of another file.
const FICLONE: libc::c_ulong = 0x4004_9409;
/// Copy threads.
const JOBS: usize = 2;

/// What [`clone_tree`] did.
#[derive(Debug, Clone, Default)]
pub struct CloneReport {
    pub dirs: u64,
    pub files: u64,
    /// Regular files whose data was shared with a reflink instead of copied.
    pub reflinked: u64,
    pub symlinks: u64,
    /// Extra names of multiply linked files, recreated as hard links.
    pub hardlinks: u64,
    /// Device nodes, FIFOs and sockets.
    pub special: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// Directories on another filesystem, created empty.
    pub mount_points_skipped: u64,
}

/// Copies the tree `src` to `dest` (which must not exist), building it beside `dest` and
/// renaming it into place on success.
pub fn clone_tree(src: &Path, dest: &Path) -> Result<CloneReport, ImageError> {
    let md = src.symlink_metadata().map_err(io_err(src, "stat"))?;
    if !md.is_dir() {
        return Err(ImageError::NotADirectory {
            path: src.to_path_buf(),
        });
    }
    let staging = super::new_staging(dest)?;
    let report = copy_into(src, staging.path())?;
    super::commit(staging, dest)?;
    Ok(report)
}

/// Copies the content and metadata of the directory `src` into the existing empty
/// directory `to`.
pub(crate) fn copy_into(src: &Path, to: &Path) -> Result<CloneReport, ImageError> {
    let root_md = src.symlink_metadata().map_err(io_err(src, "stat"))?;
    let root_dev = root_md.dev();
    let mut report = CloneReport::default();
    let mut dirs: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
    let mut files: Vec<(PathBuf, std::fs::Metadata)> = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();

    let walk = walkdir::WalkDir::new(src)
        .same_file_system(true)
        .follow_links(false);
    for e in walk {
        let e = e.map_err(|e| {
            let p = e.path().unwrap_or(src).to_path_buf();
            io_err(&p, "walking the tree")(e.into())
        })?;
        let rel = e.path().strip_prefix(src).expect("below src").to_path_buf();
        let md = e
            .metadata()
            .map_err(|err| io_err(e.path(), "stat")(err.into()))?;
        let dst = to.join(&rel);
        if e.depth() == 0 {
            dirs.push((rel, md));
            continue;
        }
        let ft = md.file_type();
        if md.dev() != root_dev {
            if ft.is_dir() {
                // A mount point: walkdir does not descend; keep the empty directory.
                report.mount_points_skipped += 1;
                std::fs::create_dir(&dst).map_err(io_err(&dst, "mkdir"))?;
                dirs.push((rel, md));
            }
            continue;
        }
        if ft.is_dir() {
            std::fs::create_dir(&dst).map_err(io_err(&dst, "mkdir"))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(&dst, "chmod"))?;
            report.dirs += 1;
            dirs.push((rel, md));
        } else if ft.is_symlink() {
            let target = std::fs::read_link(e.path()).map_err(io_err(e.path(), "readlink"))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io_err(&dst, "symlink"))?;
            std::os::unix::fs::lchown(&dst, Some(md.uid()), Some(md.gid()))
                .map_err(io_err(&dst, "chown"))?;
            filetime::set_symlink_file_times(
                &dst,
                filetime::FileTime::from_last_access_time(&md),
                filetime::FileTime::from_last_modification_time(&md),
            )
            .map_err(io_err(&dst, "set times"))?;
            report.symlinks += 1;
        } else {
            if md.nlink() > 1 {
                if let Some(first) = seen.get(&(md.dev(), md.ino())) {
                    links.push((rel, first.clone()));
                    continue;
                }
                seen.insert((md.dev(), md.ino()), rel.clone());
            }
            if ft.is_file() {
                report.bytes += md.len();
                files.push((rel, md));
            } else {
                make_node(&dst, &md)?;
                copy_xattrs(e.path(), &dst)?;
                set_meta(&dst, &md)?;
                report.special += 1;
            }
        }
    }

    // Regular files, in parallel.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let reflinked = AtomicU64::new(0);
    let first_error: Mutex<Option<ImageError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..JOBS.min(files.len().max(1)) {
            s.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let Some((rel, md)) = files.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    match copy_file(&src.join(rel), &to.join(rel), md) {
                        Ok(r) => {
                            if r {
                                reflinked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().expect("lock").get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().expect("lock") {
        return Err(e);
    }
    report.files = files.len() as u64;
    report.reflinked = reflinked.into_inner();

    for (rel, first) in &links {
        let dst = to.join(rel);
        std::fs::hard_link(to.join(first), &dst).map_err(io_err(&dst, "link"))?;
        report.hardlinks += 1;
    }
    // Directories last (deepest first): their mtimes changed while they were filled.
    for (rel, md) in dirs.iter().rev() {
        let dst = to.join(rel);
        copy_xattrs(&src.join(rel), &dst)?;
        set_meta(&dst, md)?;
    }
    Ok(report)
}

fn make_node(dst: &Path, md: &std::fs::Metadata) -> Result<(), ImageError> {
    use nix::sys::stat::{mknod, Mode, SFlag};
    let kind = SFlag::from_bits_truncate(md.mode()) & SFlag::S_IFMT;
    mknod(dst, kind, Mode::from_bits_truncate(0o600), md.rdev() as _)
        .map_err(|e| io_err(dst, "mknod")(e.into()))
}

/// Owner, then mode (chown clears set-id bits), then times (a final symlink is not followed).
fn set_meta(dst: &Path, md: &std::fs::Metadata) -> Result<(), ImageError> {
    std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid())).map_err(io_err(dst, "chown"))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(io_err(dst, "chmod"))?;
    filetime::set_symlink_file_times(
        dst,
        filetime::FileTime::from_last_access_time(md),
        filetime::FileTime::from_last_modification_time(md),
    )
    .map_err(io_err(dst, "set times"))
}

/// Copies every xattr of `src` to `dst` (neither followed if a symlink).
fn copy_xattrs(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let names = match xattr::list(src) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(io_err(src, "listing xattrs")(e)),
    };
    for name in names {
        let Some(v) = xattr::get(src, &name).map_err(io_err(src, "reading an xattr"))? else {
            continue;
        };
        set_xattr(dst, &name, &v, |n, v| xattr::set(dst, n, v))?;
    }
    Ok(())
}

fn set_xattr(
    dst: &Path,
    name: &std::ffi::OsStr,
    value: &[u8],
    set: impl FnOnce(&std::ffi::OsStr, &[u8]) -> std::io::Result<()>,
) -> Result<(), ImageError> {
    match set(name, value) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            tracing::warn!(
                "{}: xattr {} not supported by the destination filesystem; skipped",
                dst.display(),
                name.to_string_lossy()
            );
            Ok(())
        }
        r => r.map_err(io_err(
            dst,
            format!("setting xattr {}", name.to_string_lossy()),
        )),
    }
}

/// Copies one regular file with its metadata; true when its data was reflinked.
fn copy_file(src: &Path, dst: &Path, md: &std::fs::Metadata) -> Result<bool, ImageError> {
    let mut input = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)
        .map_err(io_err(src, "open"))?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(io_err(dst, "create"))?;
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both descriptors
    // are open for the duration of the call and nothing else is passed.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, input.as_raw_fd()) };
    let reflinked = rc == 0;
    if !reflinked {
        std::io::copy(&mut input, &mut out).map_err(io_err(dst, "copy"))?;
    }
    std::os::unix::fs::fchown(&out, Some(md.uid()), Some(md.gid()))
        .map_err(io_err(dst, "chown"))?;
    out.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(io_err(dst, "chmod"))?;
    // After chown, which drops security.capability.
    copy_file_xattrs(&input, src, &out, dst)?;
    let times = std::fs::FileTimes::new()
        .set_accessed(md.accessed().unwrap_or(std::time::UNIX_EPOCH))
        .set_modified(md.modified().unwrap_or(std::time::UNIX_EPOCH));
    out.set_times(times).map_err(io_err(dst, "set times"))?;
    Ok(reflinked)
}

fn copy_file_xattrs(input: &File, src: &Path, out: &File, dst: &Path) -> Result<(), ImageError> {
    use xattr::FileExt;
    let names = match input.list_xattr() {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(io_err(src, "listing xattrs")(e)),
    };
    for name in names {
        let Some(v) = input
            .get_xattr(&name)
            .map_err(io_err(src, "reading an xattr"))?
        else {
            continue;
        };
        set_xattr(dst, &name, &v, |n, v| out.set_xattr(n, v))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_refuses_existing_dest_and_non_dir() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("a")).unwrap();
        std::fs::create_dir(t.path().join("b")).unwrap();
        let e = clone_tree(&t.path().join("a"), &t.path().join("b")).unwrap_err();
        assert!(matches!(e, ImageError::DestExists { .. }), "{e}");
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let e = clone_tree(&t.path().join("f"), &t.path().join("c")).unwrap_err();
        assert!(matches!(e, ImageError::NotADirectory { .. }), "{e}");
    }
}
