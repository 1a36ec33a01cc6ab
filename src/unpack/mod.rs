//! `.deb` reading and safe extraction into a target root filesystem.
//!
//! This module owns everything between a downloaded `.deb` file and files on disk: the ar
//! container, `debian-binary`, the control members (kept in memory for the dpkg database), the
//! streaming decompression of `data.tar.{,gz,xz,zst,bz2,lzma}` and the extraction itself
//! (modes, numeric owners, mtimes, links, device nodes, FIFOs, SCHILY xattrs, conffiles as
//! `.dpkg-new`, merged-/usr rewriting). No external `dpkg-deb` or `tar` binary is used.
//!
//! Safety: every path is resolved component by component from a directory file descriptor of
//! the target, interpreting symlinks with the target as root (like `dpkg --root`); entries that
//! would leave the target are refused, and the final component is never followed.

mod deb;
mod extract;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub use extract::MERGED_USR_DIRS;

/// Errors of reading or extracting a `.deb`; every variant names the package and the file.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An I/O error while doing `step` on the `.deb`.
    #[error("package {package} ({}): {step}: {source}", deb.display())]
    Io {
        package: String,
        deb: PathBuf,
        step: String,
        #[source]
        source: std::io::Error,
    },
    /// The `.deb` is not a valid Debian binary package.
    #[error("package {package} ({}): {msg}", deb.display())]
    Format {
        package: String,
        deb: PathBuf,
        msg: String,
    },
    /// An entry of `data.tar` was refused (unsafe path, unsupported type, collision).
    #[error("package {package} ({}): entry {entry} {msg}", deb.display())]
    Entry {
        package: String,
        deb: PathBuf,
        entry: String,
        msg: String,
    },
    /// An I/O error while extracting one entry.
    #[error("package {package} ({}): entry {entry}: {step}: {source}", deb.display())]
    EntryIo {
        package: String,
        deb: PathBuf,
        entry: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The final merged-/usr step (moving `/<dir>` into `/usr/<dir>` and linking it) failed.
    #[error("merged-/usr: {path}: {msg}")]
    MergedUsr { path: PathBuf, msg: String },
    /// The target directory cannot be opened.
    #[error("target {}: {source}", path.display())]
    Target {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Placing the live copy of an extracted conffile failed ([`place_conffiles`]).
    #[error("package {package}: conffile {path}: {step}: {source}")]
    Conffile {
        package: String,
        path: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A worker thread panicked while extracting `package`.
    #[error("package {package}: extraction worker panicked")]
    Panic { package: String },
}

/// The package and file an error is about.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub package: String,
    pub deb: PathBuf,
}

impl Ctx {
    pub(crate) fn io(&self, step: String, source: std::io::Error) -> UnpackError {
        UnpackError::Io {
            package: self.package.clone(),
            deb: self.deb.clone(),
            step,
            source,
        }
    }
    pub(crate) fn format(&self, msg: String) -> UnpackError {
        UnpackError::Format {
            package: self.package.clone(),
            deb: self.deb.clone(),
            msg,
        }
    }
    pub(crate) fn entry(&self, entry: &str, msg: impl Into<String>) -> UnpackError {
        UnpackError::Entry {
            package: self.package.clone(),
            deb: self.deb.clone(),
            entry: entry.to_string(),
            msg: msg.into(),
        }
    }
    pub(crate) fn entry_io(
        &self,
        entry: &str,
        step: &'static str,
        source: impl Into<std::io::Error>,
    ) -> UnpackError {
        UnpackError::EntryIo {
            package: self.package.clone(),
            deb: self.deb.clone(),
            entry: entry.to_string(),
            step,
            source: source.into(),
        }
    }
}

/// Whether `/bin`, `/sbin`, `/lib*` are merged into `/usr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergedUsr {
    /// Extract paths as they are in the archive.
    No,
    /// Write `bin sbin lib lib32 lib64 libx32 libo32` entries under `usr/`, then link
    /// `/<dir> -> usr/<dir>` (the layout debootstrap produces for bookworm and later).
    #[default]
    Yes,
}

/// One `.deb` to unpack.
#[derive(Debug, Clone)]
pub struct DebInput {
    pub package: String,
    pub path: PathBuf,
}

/// Options of [`unpack_one`] / [`unpack_all`].
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    pub merged_usr: MergedUsr,
    /// Parallel workers of [`unpack_all`]; 0 means the number of available cores.
    pub jobs: usize,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            merged_usr: MergedUsr::Yes,
            jobs: 0,
        }
    }
}

/// One member of `control.tar` other than `control`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMember {
    pub name: String,
    /// Permission bits from the tar header.
    pub mode: u32,
    pub data: Vec<u8>,
}

/// The control members of a package: the `control` paragraph and every other member
/// (`md5sums`, `conffiles`, maintainer scripts, `triggers`, `shlibs`, ... in archive order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlMembers {
    pub control: String,
    pub members: Vec<ControlMember>,
}

impl ControlMembers {
    /// The member called `name` (e.g. `"md5sums"`).
    pub fn member(&self, name: &str) -> Option<&ControlMember> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The value of a simple control field (first line only, trimmed), case-insensitively.
    pub fn field(&self, name: &str) -> Option<&str> {
        control_field(&self.control, name)
    }

    /// Paths listed in `conffiles` (absolute), without `remove-on-upgrade` lines.
    pub fn conffiles(&self) -> Vec<String> {
        let Some(m) = self.member("conffiles") else {
            return Vec::new();
        };
        String::from_utf8_lossy(&m.data)
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                if l.is_empty() {
                    return None;
                }
                let mut words = l.split_whitespace();
                let first = words.next()?;
                if first.starts_with('/') {
                    Some(first.to_string())
                } else {
                    // A flagged line: "remove-on-upgrade /path" (not shipped in data.tar).
                    None
                }
            })
            .collect()
    }
}

/// First-line value of `name` in a control paragraph.
pub(crate) fn control_field<'a>(stanza: &'a str, name: &str) -> Option<&'a str> {
    stanza.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if line.starts_with([' ', '\t']) || !k.eq_ignore_ascii_case(name) {
            return None;
        }
        Some(v.trim())
    })
}

/// What [`unpack_one`] did for one package.
#[derive(Debug, Clone)]
pub struct UnpackedPackage {
    pub package: String,
    pub architecture: String,
    pub multi_arch_same: bool,
    pub control: ControlMembers,
    /// dpkg `.list` form: `/.`, `/usr`, `/usr/bin/foo` ... in archive order (original archive
    /// paths, before any merged-/usr rewrite).
    pub paths: Vec<String>,
    /// Shipped conffiles, absolute (e.g. `/etc/foo.conf`), in `conffiles` order; they were
    /// written as `<path>.dpkg-new`.
    pub conffiles: Vec<String>,
    /// Uncompressed bytes of regular files written.
    pub data_bytes: u64,
}

/// A package name for errors when only the file is known (`foo_1.0_amd64.deb` → `foo`).
fn package_from_path(deb: &Path) -> String {
    deb.file_name()
        .map(|n| n.to_string_lossy())
        .and_then(|n| n.split('_').next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Reads only the control members of `deb`.
pub fn read_control(deb: &Path) -> Result<ControlMembers, UnpackError> {
    let ctx = Ctx {
        package: package_from_path(deb),
        deb: deb.to_path_buf(),
    };
    deb::read_deb(&ctx, deb, None)
}

/// Extracts one package into `target`. With [`MergedUsr::Yes`] the caller must call
/// [`finish_merged_usr`] after the last package ([`unpack_all`] does).
pub fn unpack_one(
    target: &Path,
    input: &DebInput,
    opts: &UnpackOptions,
) -> Result<UnpackedPackage, UnpackError> {
    let root = extract::open_target(target)?;
    unpack_with_root(&root, input, opts, &mut Vec::new()).map(|(p, _)| p)
}

fn unpack_with_root(
    root: &std::os::fd::OwnedFd,
    input: &DebInput,
    opts: &UnpackOptions,
    buf: &mut Vec<u8>,
) -> Result<(UnpackedPackage, BTreeSet<&'static str>), UnpackError> {
    let ctx = Ctx {
        package: input.package.clone(),
        deb: input.path.clone(),
    };
    let mut result = None;
    let mut on_data = |tar: &mut dyn std::io::Read, control: &ControlMembers| {
        let mut x = extract::Extractor::new(&ctx, root, opts.merged_usr, control, buf)?;
        x.run(tar)?;
        result = Some(x.finish()?);
        Ok(())
    };
    let control = deb::read_deb(&ctx, &input.path, Some(&mut on_data))?;
    let out = result.expect("read_deb calls the data callback or fails");
    let architecture = control.field("Architecture").unwrap_or("").to_string();
    let multi_arch_same = control
        .field("Multi-Arch")
        .is_some_and(|v| v.eq_ignore_ascii_case("same"));
    let pkg = UnpackedPackage {
        package: input.package.clone(),
        architecture,
        multi_arch_same,
        paths: out.paths,
        conffiles: out.conffiles,
        data_bytes: out.data_bytes,
        control,
    };
    Ok((pkg, out.merged_dirs))
}

/// Extracts `inputs` in parallel (`opts.jobs` workers) and returns the results in input order.
/// With [`MergedUsr::Yes`] it finally links each top-level directory that was used.
/// On an error, no new package is started and the first error is returned.
pub fn unpack_all(
    target: &Path,
    inputs: &[DebInput],
    opts: &UnpackOptions,
    progress: &(dyn Fn(&UnpackedPackage) + Sync),
) -> Result<Vec<UnpackedPackage>, UnpackError> {
    let root = extract::open_target(target)?;
    let jobs = match opts.jobs {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
    .clamp(1, inputs.len().max(1));

    // Largest first, so one big package does not finish last on its own.
    let mut order: Vec<usize> = (0..inputs.len()).collect();
    let sizes: Vec<u64> = inputs
        .iter()
        .map(|i| std::fs::metadata(&i.path).map_or(0, |m| m.len()))
        .collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));

    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<UnpackedPackage>>> = Mutex::new(vec![None; inputs.len()]);
    let first_error: Mutex<Option<UnpackError>> = Mutex::new(None);
    let used: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let mut buf = Vec::new();
                while !failed.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let input = &inputs[i];
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        unpack_with_root(&root, input, opts, &mut buf)
                    }))
                    .unwrap_or_else(|_| {
                        Err(UnpackError::Panic {
                            package: input.package.clone(),
                        })
                    });
                    match r {
                        Ok((pkg, dirs)) => {
                            progress(&pkg);
                            used.lock().expect("lock").extend(dirs);
                            results.lock().expect("lock")[i] = Some(pkg);
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
    if opts.merged_usr == MergedUsr::Yes {
        let used = used.into_inner().expect("lock");
        let dirs: Vec<&str> = used.into_iter().collect();
        extract::merge_usr(target, &dirs)?;
    }
    Ok(results
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|p| p.expect("every package was unpacked"))
        .collect())
}

/// Extracts a plain tar stream (not a `.deb`) into the existing directory `target`, with the
/// safety and metadata rules of package data (owners, modes, links, device nodes, FIFOs,
/// SCHILY xattrs; entries escaping the target refused) but no merged-/usr rewrite and no
/// conffiles. `label` names the archive in errors. Returns the bytes of regular files written.
pub fn extract_tar(
    target: &Path,
    label: &Path,
    tar: &mut dyn std::io::Read,
) -> Result<u64, UnpackError> {
    let root = extract::open_target(target)?;
    let ctx = Ctx {
        package: "(tar)".into(),
        deb: label.to_path_buf(),
    };
    let control = ControlMembers {
        control: String::new(),
        members: Vec::new(),
    };
    let mut buf = Vec::new();
    let mut x = extract::Extractor::new(&ctx, &root, MergedUsr::No, &control, &mut buf)?;
    x.run(tar)?;
    Ok(x.finish()?.data_bytes)
}

/// Completes merged-/usr after [`unpack_one`] calls with [`MergedUsr::Yes`]: for each of
/// [`MERGED_USR_DIRS`] that exists as a real directory (its content is moved into `usr/<dir>`)
/// or whose `usr/<dir>` exists, `/<dir>` becomes the symlink `usr/<dir>`. An existing
/// `<dir> -> usr/<dir>` symlink is kept.
pub fn finish_merged_usr(target: &Path) -> Result<(), UnpackError> {
    extract::merge_usr(target, &MERGED_USR_DIRS)
}

/// Puts a copy of each shipped conffile of `pkgs` at its live path (same content, mode and
/// owner as the extracted `<path>.dpkg-new`) unless something is already there. The
/// `.dpkg-new` file and the `newconffile` status stay as they are, so `dpkg --configure`
/// finds the live file identical to the new one and installs the new one.
///
/// This is the state debootstrap's first stage leaves for its `required` set, whose data
/// it extracts with tar before dpkg runs: every configuration file of that set exists
/// while any maintainer script runs. Scripts depend on it: `passwd`'s postinst runs
/// `pwconv`, which takes the aging fields of the new `/etc/shadow` from `login`'s
/// `/etc/login.defs`, and dpkg keeps `/var/log/dpkg.log` only when its own
/// `/etc/dpkg/dpkg.cfg` is in place.
///
/// Paths are resolved with the target as root (`RESOLVE_IN_ROOT`); only regular files are
/// copied and nothing existing is replaced.
pub fn place_conffiles(target: &Path, pkgs: &[&UnpackedPackage]) -> Result<(), UnpackError> {
    use nix::errno::Errno;
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::Mode;
    use std::os::unix::fs::MetadataExt;

    let root = extract::open_target(target)?;
    let how = |flags: OFlag| {
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    for p in pkgs {
        for c in &p.conffiles {
            let err = |step: &'static str, source: std::io::Error| UnpackError::Conffile {
                package: p.package.clone(),
                path: c.clone(),
                step,
                source,
            };
            let rel = c.trim_start_matches('/');
            match openat2(&root, rel, how(OFlag::O_PATH)) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(err("look up the live path", e.into())),
            }
            let src = match openat2(
                &root,
                format!("{rel}.dpkg-new").as_str(),
                how(OFlag::O_RDONLY),
            ) {
                Ok(fd) => std::fs::File::from(fd),
                // Not shipped as a file (a symlink conffile, ELOOP): nothing to copy.
                Err(Errno::ENOENT | Errno::ELOOP) => continue,
                Err(e) => return Err(err("open the .dpkg-new file", e.into())),
            };
            let md = src
                .metadata()
                .map_err(|e| err("stat the .dpkg-new file", e))?;
            if !md.is_file() {
                continue;
            }
            let dst = openat2(
                &root,
                rel,
                how(OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL)
                    .mode(Mode::from_bits_truncate(0o600)),
            )
            .map_err(|e| err("create", e.into()))?;
            let mut dst = std::fs::File::from(dst);
            std::io::copy(&mut (&src), &mut dst).map_err(|e| err("copy", e))?;
            // Owner first: chown clears set-id bits.
            std::os::unix::fs::fchown(&dst, Some(md.uid()), Some(md.gid()))
                .map_err(|e| err("chown", e))?;
            use std::os::unix::fs::PermissionsExt;
            dst.set_permissions(std::fs::Permissions::from_mode(md.mode() & 0o7777))
                .map_err(|e| err("chmod", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
