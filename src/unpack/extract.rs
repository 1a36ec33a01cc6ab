//! Extraction of a `data.tar` stream into the target, relative to directory file descriptors.
//!
//! Every parent directory is reached with `openat(O_DIRECTORY|O_NOFOLLOW)` one component at a
//! time; symlinks met on the way are read and interpreted with the target as root, and a
//! resolution that climbs above it is refused. The final component is always created or
//! replaced with `*at` calls that do not follow it.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, fstatat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use super::{ControlMembers, Ctx, UnpackError};

/// Top-level directories that merged-/usr moves under `usr/`.
pub const MERGED_USR_DIRS: [&str; 7] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32", "libo32"];

/// Symlink hops allowed while resolving one path (Linux uses 40).
const MAX_HOPS: usize = 40;
/// Cached directory descriptors per package before the cache is emptied.
const CACHE_MAX: usize = 256;

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

pub(crate) fn open_target(target: &Path) -> Result<OwnedFd, UnpackError> {
    let err = |source: io::Error| UnpackError::Target {
        path: target.to_path_buf(),
        source,
    };
    let fd = nix::fcntl::open(
        target,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    Ok(fd)
}

/// What one package's extraction produced.
pub(crate) struct Extracted {
    pub paths: Vec<String>,
    pub conffiles: Vec<String>,
    pub data_bytes: u64,
    /// Top-level merged-/usr directories this package wrote into (or linked).
    pub merged_dirs: BTreeSet<&'static str>,
}

/// A resolved directory: its descriptor and its real path below the target (no symlinks).
#[derive(Clone)]
struct Dir {
    fd: Rc<OwnedFd>,
    real: Vec<String>,
}

pub(crate) struct Extractor<'a> {
    ctx: &'a Ctx,
    root: Rc<OwnedFd>,
    merged_usr: bool,
    conffiles_wanted: Vec<String>,
    conffile_set: HashSet<String>,
    cache: HashMap<String, Dir>,
    buf: &'a mut Vec<u8>,
    dir_times: Vec<(String, u64)>,
    paths: Vec<String>,
    shipped_conffiles: HashSet<String>,
    data_bytes: u64,
    merged_dirs: BTreeSet<&'static str>,
}

/// Entry kinds we extract.
enum Kind {
    Dir,
    File,
    Symlink,
    Hardlink,
    Node(SFlag),
}

impl<'a> Extractor<'a> {
    pub(crate) fn new(
        ctx: &'a Ctx,
        root: &OwnedFd,
        merged_usr: super::MergedUsr,
        control: &ControlMembers,
        buf: &'a mut Vec<u8>,
    ) -> Result<Self, UnpackError> {
        let root = root
            .try_clone()
            .map_err(|e| ctx.io("duplicating the target descriptor".into(), e))?;
        if buf.len() < super::deb::BUF {
            buf.resize(super::deb::BUF, 0);
        }
        let conffiles_wanted = control.conffiles();
        let conffile_set = conffiles_wanted.iter().cloned().collect();
        Ok(Extractor {
            ctx,
            root: Rc::new(root),
            merged_usr: merged_usr == super::MergedUsr::Yes,
            conffiles_wanted,
            conffile_set,
            cache: HashMap::new(),
            buf,
            dir_times: Vec::new(),
            paths: Vec::new(),
            shipped_conffiles: HashSet::new(),
            data_bytes: 0,
            merged_dirs: BTreeSet::new(),
        })
    }

    pub(crate) fn run(&mut self, tar: &mut dyn Read) -> Result<(), UnpackError> {
        let mut archive = tar::Archive::new(tar);
        let ctx = self.ctx;
        let entries = archive
            .entries()
            .map_err(|e| ctx.io("reading data.tar".into(), e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| ctx.io("reading data.tar".into(), e))?;
            self.entry(&mut entry)?;
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<Extracted, UnpackError> {
        // Directory mtimes last, since creating their children changed them.
        let times = std::mem::take(&mut self.dir_times);
        for (path, mtime) in times.iter().rev() {
            let comps: Vec<&str> = path.split('/').collect();
            let (name, parent) = comps.split_last().expect("non-empty path");
            let dir = self.resolve(parent, false, path)?;
            let t = TimeSpec::new(*mtime as i64, 0);
            match utimensat(&*dir.fd, *name, &t, &t, UtimensatFlags::NoFollowSymlink) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(self.ctx.entry_io(path, "setting the mtime", e)),
            }
        }
        let conffiles = self
            .conffiles_wanted
            .iter()
            .filter(|c| self.shipped_conffiles.contains(*c))
            .cloned()
            .collect();
        Ok(Extracted {
            paths: self.paths,
            conffiles,
            data_bytes: self.data_bytes,
            merged_dirs: self.merged_dirs,
        })
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let ctx = self.ctx;
        let raw = entry.path_bytes().into_owned();
        let Ok(name) = std::str::from_utf8(&raw) else {
            return Err(ctx.entry(
                &String::from_utf8_lossy(&raw),
                "has a name that is not UTF-8",
            ));
        };
        let hdr = entry.header();
        let et = hdr.entry_type();
        let kind = match et {
            tar::EntryType::Regular | tar::EntryType::Continuous => Kind::File,
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Link => Kind::Hardlink,
            tar::EntryType::Char => Kind::Node(SFlag::S_IFCHR),
            tar::EntryType::Block => Kind::Node(SFlag::S_IFBLK),
            tar::EntryType::Fifo => Kind::Node(SFlag::S_IFIFO),
            tar::EntryType::XGlobalHeader => return Ok(()),
            other => {
                return Err(ctx.entry(name, format!("has unsupported tar type {other:?}")));
            }
        };
        let comps = normalize(name).ok_or_else(|| ctx.entry(name, "escapes the target"))?;
        // dpkg's .list form of the original archive path.
        let list_path = if comps.is_empty() {
            "/.".to_string()
        } else {
            let mut s = String::with_capacity(name.len() + 1);
            for c in &comps {
                s.push('/');
                s.push_str(c);
            }
            s
        };
        let mode = hdr
            .mode()
            .map_err(|e| ctx.entry_io(name, "reading the header", e))?
            & 0o7777;
        let uid = hdr
            .uid()
            .map_err(|e| ctx.entry_io(name, "reading the header", e))? as u32;
        let gid = hdr
            .gid()
            .map_err(|e| ctx.entry_io(name, "reading the header", e))? as u32;
        let mtime = hdr.mtime().unwrap_or(0);
        let dev = match kind {
            Kind::Node(_) => {
                let major = hdr.device_major().ok().flatten().unwrap_or(0);
                let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
                nix::sys::stat::makedev(major as u64, minor as u64)
            }
            _ => 0,
        };
        let link: Option<Vec<u8>> = entry.link_name_bytes().map(|l| l.into_owned());
        let xattrs =
            read_xattrs(entry).map_err(|e| ctx.entry_io(name, "reading PAX headers", e))?;

        self.paths.push(list_path.clone());
        if comps.is_empty() {
            // The root entry "./": the target exists; leave its metadata alone.
            return Ok(());
        }

        // merged-/usr: rewrite bin/..., lib/..., and accept "<dir> -> usr/<dir>" symlinks.
        let mut fs_comps: Vec<&str> = comps.clone();
        if self.merged_usr {
            if let Some(top) = MERGED_USR_DIRS.iter().find(|d| **d == comps[0]) {
                self.merged_dirs.insert(top);
                let is_top_link = comps.len() == 1 && matches!(kind, Kind::Symlink);
                if is_top_link {
                    let l = link.as_deref().unwrap_or_default();
                    let want = format!("usr/{top}");
                    let ok = l == want.as_bytes()
                        || l == format!("/{want}").as_bytes()
                        || l == format!("./{want}").as_bytes();
                    if !ok {
                        return Err(ctx.entry(
                            name,
                            format!("is a symlink that conflicts with merged-/usr (must point at {want})"),
                        ));
                    }
                } else {
                    fs_comps.insert(0, "usr");
                }
            }
        }
        let fs_path = fs_comps.join("/");
        let (last, parent) = fs_comps.split_last().expect("non-empty");
        let last = *last;

        match kind {
            Kind::Dir => {
                self.make_dir(name, &fs_path, parent, last, mode, uid, gid, mtime, &xattrs)
            }
            Kind::File => {
                let conffile = self.conffile_set.contains(&list_path);
                let dir = self.resolve(parent, true, name)?;
                let fname = if conffile {
                    format!("{last}.dpkg-new")
                } else {
                    last.to_string()
                };
                let file = self.create_file(name, &dir, &fname)?;
                let n = self.write_file(name, entry, &file)?;
                self.data_bytes += n;
                if conffile {
                    self.shipped_conffiles.insert(list_path);
                }
                fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                    .map_err(|e| ctx.entry_io(name, "chown", e))?;
                fchmod(&file, Mode::from_bits_retain(mode))
                    .map_err(|e| ctx.entry_io(name, "chmod", e))?;
                for (k, v) in &xattrs {
                    set_xattr_file(&file, k, v)
                        .map_err(|e| ctx.entry_io(name, "setting an xattr", e))?;
                }
                let t = TimeSpec::new(mtime as i64, 0);
                futimens(&file, &t, &t).map_err(|e| ctx.entry_io(name, "setting the mtime", e))?;
                Ok(())
            }
            Kind::Symlink => {
                let Some(target) = link else {
                    return Err(ctx.entry(name, "is a symlink without a target"));
                };
                let dir = self.resolve(parent, true, name)?;
                let target = OsStr::from_bytes(&target);
                loop {
                    match symlinkat(target, &*dir.fd, last) {
                        Ok(()) => break,
                        Err(Errno::EEXIST) => {
                            if !self.remove_non_dir(name, &dir, last)? {
                                // An existing directory (or directory symlink) is kept.
                                return Ok(());
                            }
                        }
                        Err(e) => return Err(ctx.entry_io(name, "creating the symlink", e)),
                    }
                }
                fchownat(
                    &*dir.fd,
                    last,
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ctx.entry_io(name, "chown", e))?;
                let t = TimeSpec::new(mtime as i64, 0);
                utimensat(&*dir.fd, last, &t, &t, UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| ctx.entry_io(name, "setting the mtime", e))?;
                Ok(())
            }
            Kind::Hardlink => {
                let Some(target) = link else {
                    return Err(ctx.entry(name, "is a hard link without a target"));
                };
                let target = String::from_utf8_lossy(&target).into_owned();
                let tcomps = normalize(&target)
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| {
                        ctx.entry(
                            name,
                            format!("is a hard link to {target}, which escapes the target"),
                        )
                    })?;
                let tlist: String = tcomps.iter().flat_map(|c| ["/", c]).collect();
                let mut tfs: Vec<&str> = tcomps.clone();
                if self.merged_usr && MERGED_USR_DIRS.contains(&tfs[0]) && tfs.len() > 1 {
                    tfs.insert(0, "usr");
                }
                let (tlast, tparent) = tfs.split_last().expect("non-empty");
                let tname = if self.conffile_set.contains(&tlist) {
                    format!("{tlast}.dpkg-new")
                } else {
                    tlast.to_string()
                };
                let tdir = self.resolve(tparent, false, name)?;
                let dir = self.resolve(parent, true, name)?;
                loop {
                    match linkat(&*tdir.fd, tname.as_str(), &*dir.fd, last, AtFlags::empty()) {
                        Ok(()) => break,
                        Err(Errno::EEXIST) => {
                            if !self.remove_non_dir(name, &dir, last)? {
                                return Err(ctx.entry(name, "is a hard link over a directory"));
                            }
                        }
                        Err(e) => return Err(ctx.entry_io(name, "creating the hard link", e)),
                    }
                }
                Ok(())
            }
            Kind::Node(kind) => {
                let dir = self.resolve(parent, true, name)?;
                loop {
                    match mknodat(&*dir.fd, last, kind, Mode::from_bits_retain(0o600), dev) {
                        Ok(()) => break,
                        Err(Errno::EEXIST) => {
                            if !self.remove_non_dir(name, &dir, last)? {
                                return Err(ctx.entry(name, "is a special file over a directory"));
                            }
                        }
                        Err(e) => return Err(ctx.entry_io(name, "mknod", e)),
                    }
                }
                fchownat(
                    &*dir.fd,
                    last,
                    Some(Uid::from_raw(uid)),
                    Some(Gid::from_raw(gid)),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| ctx.entry_io(name, "chown", e))?;
                // Just created by mknodat above, so the name is not a symlink.
                fchmodat(
                    &*dir.fd,
                    last,
                    Mode::from_bits_retain(mode),
                    FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| ctx.entry_io(name, "chmod", e))?;
                for (k, v) in &xattrs {
                    set_xattr_at(&dir.fd, last, k, v)
                        .map_err(|e| ctx.entry_io(name, "setting an xattr", e))?;
                }
                let t = TimeSpec::new(mtime as i64, 0);
                utimensat(&*dir.fd, last, &t, &t, UtimensatFlags::NoFollowSymlink)
                    .map_err(|e| ctx.entry_io(name, "setting the mtime", e))?;
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn make_dir(
        &mut self,
        name: &str,
        fs_path: &str,
        parent: &[&str],
        last: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: u64,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), UnpackError> {
        let ctx = self.ctx;
        let dir = self.resolve(parent, true, name)?;
        let fd = loop {
            match mkdirat(&*dir.fd, last, Mode::from_bits_retain(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(ctx.entry_io(name, "mkdir", e)),
            }
            match openat(&*dir.fd, last, dir_flags(), Mode::empty()) {
                Ok(fd) => break fd,
                Err(Errno::ENOENT) => continue,
                Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                    // A symlink to a directory is kept (dpkg semantics); anything else that is
                    // not a directory is replaced.
                    if self.is_symlink(&dir, last) {
                        let all: Vec<&str> = fs_path.split('/').collect();
                        self.resolve(&all, true, name)?;
                        return Ok(());
                    }
                    if !self.remove_non_dir(name, &dir, last)? {
                        continue;
                    }
                }
                Err(e) => return Err(ctx.entry_io(name, "opening the directory", e)),
            }
        };
        fchown(&fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| ctx.entry_io(name, "chown", e))?;
        fchmod(&fd, Mode::from_bits_retain(mode)).map_err(|e| ctx.entry_io(name, "chmod", e))?;
        for (k, v) in xattrs {
            set_xattr_at(&dir.fd, last, k, v)
                .map_err(|e| ctx.entry_io(name, "setting an xattr", e))?;
        }
        self.dir_times.push((fs_path.to_string(), mtime));
        let mut real = dir.real.clone();
        real.push(last.to_string());
        self.cache_put(
            fs_path.to_string(),
            Dir {
                fd: Rc::new(fd),
                real,
            },
        );
        Ok(())
    }

    fn is_symlink(&self, dir: &Dir, name: &str) -> bool {
        fstatat(&*dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
            .unwrap_or(false)
    }

    /// Removes `name` in `dir` unless it is a directory. Returns false for a directory.
    fn remove_non_dir(&mut self, entry: &str, dir: &Dir, name: &str) -> Result<bool, UnpackError> {
        match unlinkat(&*dir.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {
                // Cached resolutions may have gone through a symlink that was just removed.
                self.cache.clear();
                Ok(true)
            }
            Err(Errno::EISDIR) | Err(Errno::EPERM) => {
                let st = fstatat(&*dir.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| self.ctx.entry_io(entry, "stat", e))?;
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                    Ok(false)
                } else {
                    Err(self
                        .ctx
                        .entry_io(entry, "removing the old file", Errno::EPERM))
                }
            }
            Err(e) => Err(self.ctx.entry_io(entry, "removing the old file", e)),
        }
    }

    fn create_file(&mut self, entry: &str, dir: &Dir, name: &str) -> Result<File, UnpackError> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        loop {
            match openat(&*dir.fd, name, flags, Mode::from_bits_retain(0o600)) {
                Ok(fd) => return Ok(File::from(fd)),
                Err(Errno::EEXIST) => {
                    if !self.remove_non_dir(entry, dir, name)? {
                        return Err(self
                            .ctx
                            .entry(entry, "is a file over an existing directory"));
                    }
                }
                Err(e) => return Err(self.ctx.entry_io(entry, "creating the file", e)),
            }
        }
    }

    fn write_file<R: Read>(
        &mut self,
        entry_name: &str,
        entry: &mut tar::Entry<'_, R>,
        mut file: &File,
    ) -> Result<u64, UnpackError> {
        let mut total = 0u64;
        loop {
            let n = match entry.read(&mut self.buf[..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.ctx.entry_io(entry_name, "reading data.tar", e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| self.ctx.entry_io(entry_name, "writing", e))?;
            total += n as u64;
        }
        if total != entry.size() {
            return Err(self.ctx.entry_io(
                entry_name,
                "reading data.tar",
                io::Error::new(io::ErrorKind::UnexpectedEof, "truncated entry"),
            ));
        }
        Ok(total)
    }

    fn cache_put(&mut self, key: String, dir: Dir) {
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(key, dir);
    }

    /// Opens the directory at `comps` (relative to the target), following symlinks with the
    /// target as root. Missing components are created (mode 0755) when `create` is set.
    fn resolve(&mut self, comps: &[&str], create: bool, entry: &str) -> Result<Dir, UnpackError> {
        if comps.is_empty() {
            return Ok(Dir {
                fd: self.root.clone(),
                real: Vec::new(),
            });
        }
        let key = comps.join("/");
        if let Some(d) = self.cache.get(&key) {
            return Ok(d.clone());
        }
        // Start from the longest cached prefix.
        let mut start = 0;
        let mut cur = Dir {
            fd: self.root.clone(),
            real: Vec::new(),
        };
        for k in (1..comps.len()).rev() {
            if let Some(d) = self.cache.get(&comps[..k].join("/")) {
                cur = d.clone();
                start = k;
                break;
            }
        }
        let mut queue: VecDeque<String> = comps[start..].iter().map(|s| s.to_string()).collect();
        let mut hops = 0;
        let ctx = self.ctx;
        while let Some(c) = queue.pop_front() {
            if c.is_empty() || c == "." {
                continue;
            }
            if c == ".." {
                if cur.real.pop().is_none() {
                    return Err(ctx.entry(
                        entry,
                        "escapes the target (a symlink in its path climbs above the root)",
                    ));
                }
                cur.fd = Rc::new(self.reopen(&cur.real, entry)?);
                continue;
            }
            match openat(&*cur.fd, c.as_str(), dir_flags(), Mode::empty()) {
                Ok(fd) => {
                    cur.real.push(c);
                    cur.fd = Rc::new(fd);
                }
                Err(Errno::ENOENT) if create => {
                    match mkdirat(&*cur.fd, c.as_str(), Mode::from_bits_retain(0o755)) {
                        Ok(()) => {
                            // Do not depend on the umask.
                            let _ = fchmodat(
                                &*cur.fd,
                                c.as_str(),
                                Mode::from_bits_retain(0o755),
                                FchmodatFlags::FollowSymlink,
                            );
                        }
                        Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(ctx.entry_io(entry, "creating a parent directory", e))
                        }
                    }
                    queue.push_front(c);
                }
                Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                    let st = fstatat(&*cur.fd, c.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                        .map_err(|e| ctx.entry_io(entry, "stat of a parent", e))?;
                    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFLNK {
                        return Err(ctx.entry(
                            entry,
                            format!("has a parent component {c:?} that is not a directory"),
                        ));
                    }
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(ctx.entry(entry, "has too many levels of symbolic links"));
                    }
                    let t = nix::fcntl::readlinkat(&*cur.fd, c.as_str())
                        .map_err(|e| ctx.entry_io(entry, "readlink of a parent", e))?;
                    let t = t.as_bytes();
                    if t.starts_with(b"/") {
                        cur = Dir {
                            fd: self.root.clone(),
                            real: Vec::new(),
                        };
                    }
                    let parts = String::from_utf8_lossy(t);
                    for p in parts.split('/').rev() {
                        queue.push_front(p.to_string());
                    }
                }
                Err(Errno::ENOENT) => {
                    return Err(ctx.entry_io(
                        entry,
                        "opening a parent directory",
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{} does not exist", comps.join("/")),
                        ),
                    ))
                }
                Err(e) => return Err(ctx.entry_io(entry, "opening a parent directory", e)),
            }
        }
        self.cache_put(key, cur.clone());
        Ok(cur)
    }

    /// Opens a real (symlink-free) path below the target.
    fn reopen(&self, real: &[String], entry: &str) -> Result<OwnedFd, UnpackError> {
        let mut fd = self
            .root
            .try_clone()
            .map_err(|e| self.ctx.entry_io(entry, "dup", e))?;
        for c in real {
            fd = openat(&fd, c.as_str(), dir_flags(), Mode::empty())
                .map_err(|e| self.ctx.entry_io(entry, "opening a parent directory", e))?;
        }
        Ok(fd)
    }
}

/// Splits an archive path into components: strips `./` and trailing `/`; `None` when it is
/// absolute or contains `..`.
fn normalize(path: &str) -> Option<Vec<&str>> {
    if path.starts_with('/') {
        return None;
    }
    let mut out = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// `SCHILY.xattr.*` PAX records of an entry.
fn read_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    ext.value_bytes().to_vec(),
                ));
            }
        }
    }
    Ok(out)
}

fn xattr_result(r: io::Result<()>, name: &str) -> io::Result<()> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
            tracing::warn!("xattr {name} not supported by the target filesystem; skipped");
            Ok(())
        }
        other => other,
    }
}

fn set_xattr_file(file: &File, name: &str, value: &[u8]) -> io::Result<()> {
    use xattr::FileExt;
    xattr_result(file.set_xattr(name, value), name)
}

/// Sets an xattr on `name` inside `dir` without following a final symlink.
fn set_xattr_at(dir: &OwnedFd, name: &str, key: &str, value: &[u8]) -> io::Result<()> {
    let path = format!("/proc/self/fd/{}/{}", dir.as_fd().as_raw_fd(), name);
    xattr_result(xattr::set(path, key, value), key)
}

/// Moves each `<dir>` of `dirs` into `usr/<dir>` and links `<dir> -> usr/<dir>`.
pub(crate) fn merge_usr(target: &Path, dirs: &[&str]) -> Result<(), UnpackError> {
    for d in dirs {
        let top = target.join(d);
        let usr = target.join("usr").join(d);
        let want = format!("usr/{d}");
        let err = |msg: String| UnpackError::MergedUsr {
            path: top.clone(),
            msg,
        };
        match std::fs::symlink_metadata(&top) {
            Ok(m) if m.file_type().is_symlink() => {
                let l = std::fs::read_link(&top).map_err(|e| err(e.to_string()))?;
                let l = l.to_string_lossy();
                if l != want && l != format!("/{want}") {
                    return Err(err(format!("is a symlink to {l}, not {want}")));
                }
                continue;
            }
            Ok(m) if m.is_dir() => {
                std::fs::create_dir_all(&usr).map_err(|e| err(e.to_string()))?;
                merge_tree(&top, &usr).map_err(err)?;
                std::fs::remove_dir(&top).map_err(|e| err(format!("rmdir: {e}")))?;
            }
            Ok(_) => return Err(err("exists and is not a directory".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !usr.is_dir() {
                    continue;
                }
            }
            Err(e) => return Err(err(e.to_string())),
        }
        std::os::unix::fs::symlink(&want, &top).map_err(|e| err(format!("symlink: {e}")))?;
    }
    Ok(())
}

/// Moves the content of `from` into `to`, merging directories.
fn merge_tree(from: &Path, to: &Path) -> Result<(), String> {
    let rd = std::fs::read_dir(from).map_err(|e| format!("{}: {e}", from.display()))?;
    for ent in rd {
        let ent = ent.map_err(|e| format!("{}: {e}", from.display()))?;
        let src = ent.path();
        let dst = to.join(ent.file_name());
        match std::fs::symlink_metadata(&dst) {
            Err(_) => std::fs::rename(&src, &dst).map_err(|e| format!("{}: {e}", src.display()))?,
            Ok(dm) => {
                let sm = std::fs::symlink_metadata(&src).map_err(|e| e.to_string())?;
                if sm.is_dir() && dm.is_dir() {
                    merge_tree(&src, &dst)?;
                    std::fs::remove_dir(&src).map_err(|e| format!("{}: {e}", src.display()))?;
                } else {
                    return Err(format!("{} collides with {}", src.display(), dst.display()));
                }
            }
        }
    }
    Ok(())
}
