//! Machine image operations: importing a root filesystem from a tarball, a raw disk image, a
//! directory or a URL; cloning a tree (reflinks where possible); exporting a tree as a
//! directory or a (compressed) tarball.
//!
//! All functions block. New trees are built in a staging directory beside the destination and
//! renamed into place only on success ([`crate::bootstrap::Staging`]), so a failure never leaves
//! a half tree at the destination. Tar extraction goes through [`crate::unpack::extract_tar`]:
//! the same descriptor-relative, escape-refusing extraction used for packages.

mod clone;
mod export;
mod raw;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use clone::{clone_tree, CloneReport};
pub use export::{export, export_format, ExportFormat, ExportReport};

use crate::bootstrap::{BootstrapError, Staging};
use crate::fetch::FetchError;
use crate::unpack::UnpackError;

/// Errors of the image operations; every variant names the file, URL or option at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Neither the name nor the first bytes tell what `subject` is.
    #[error("{subject}: unknown image format (expected a directory, .tar, .tar.zst, .tar.xz, .tar.gz, .raw or .img)")]
    UnknownFormat { subject: String },
    /// The export path's suffix names no supported format.
    #[error("export path {}: unknown format (expected a directory name or .tar, .tar.zst, .tar.xz, .tar.gz)", path.display())]
    UnknownExportFormat { path: PathBuf },
    /// The destination exists; image operations never replace a tree.
    #[error("destination {} already exists", path.display())]
    DestExists { path: PathBuf },
    /// A source that must be a directory is not one.
    #[error("source {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// An I/O error while doing `step` on `path`.
    #[error("{}: {step}: {source}", path.display())]
    Io {
        path: PathBuf,
        step: String,
        #[source]
        source: io::Error,
    },
    /// A tar entry was refused or could not be written.
    #[error("{file}: entry {entry}: {msg}")]
    Entry {
        file: String,
        entry: String,
        msg: String,
    },
    /// Extracting `file` failed outside any single entry.
    #[error("{file}: {source}")]
    Extract {
        file: String,
        #[source]
        source: Box<UnpackError>,
    },
    /// Downloading `url` failed (the fetch error names the URL too).
    #[error("download: {source}")]
    Fetch {
        url: String,
        #[source]
        source: Box<FetchError>,
    },
    /// The published SHA256 of `url` does not match the download.
    #[error("download {url}: SHA256 mismatch (published {expected} in {sums_url}, got {actual})")]
    Checksum {
        url: String,
        sums_url: String,
        expected: String,
        actual: String,
    },
    /// Creating or committing the staging directory for `path` failed.
    #[error("staging for {}: {source}", path.display())]
    Staging {
        path: PathBuf,
        #[source]
        source: Box<BootstrapError>,
    },
    /// A raw disk image cannot be attached, mounted or read.
    #[error("raw image {}: {msg}", path.display())]
    Raw { path: PathBuf, msg: String },
}

pub(crate) fn io_err(path: &Path, step: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    let step = step.into();
    move |source| ImageError::Io { path, step, source }
}

/// What [`import`] can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    Tar,
    TarZst,
    TarXz,
    TarGz,
    /// A raw filesystem image (ext4, btrfs, xfs, ...) or a partitioned disk image.
    Raw,
    /// A directory tree.
    Dir,
}

/// The part of a path or URL that carries the file name (no query or fragment).
fn name_part(path_or_url: &str) -> &str {
    let s = if path_or_url.contains("://") {
        path_or_url.split(['?', '#']).next().unwrap_or(path_or_url)
    } else {
        path_or_url
    };
    s.trim_end_matches('/')
}

fn format_from_suffix(name: &str) -> Option<ImportFormat> {
    let n = name.to_ascii_lowercase();
    let ends = |s: &[&str]| s.iter().any(|x| n.ends_with(x));
    Some(if ends(&[".tar.zst", ".tzst", ".tar.zstd"]) {
        ImportFormat::TarZst
    } else if ends(&[".tar.xz", ".txz"]) {
        ImportFormat::TarXz
    } else if ends(&[".tar.gz", ".tgz"]) {
        ImportFormat::TarGz
    } else if ends(&[".tar"]) {
        ImportFormat::Tar
    } else if ends(&[".raw", ".img"]) {
        ImportFormat::Raw
    } else {
        return None;
    })
}

/// Bytes [`detect_format`] looks at when it reads a file itself (enough for btrfs's
/// superblock at 64 KiB).
const MAGIC_LEN: usize = 0x10040 + 8;

fn format_from_magic(b: &[u8]) -> Option<ImportFormat> {
    let at = |off: usize, m: &[u8]| b.len() >= off + m.len() && &b[off..off + m.len()] == m;
    if at(0, &[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(ImportFormat::TarZst)
    } else if at(0, &[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(ImportFormat::TarXz)
    } else if at(0, &[0x1f, 0x8b]) {
        Some(ImportFormat::TarGz)
    } else if at(257, b"ustar") {
        Some(ImportFormat::Tar)
    } else if at(512, b"EFI PART")
        || at(0x438, &[0x53, 0xef])
        || at(0x10040, b"_BHRfS_M")
        || at(0, b"XFSB")
        || at(510, &[0x55, 0xaa])
    {
        Some(ImportFormat::Raw)
    } else {
        None
    }
}

/// The format of `path_or_url`: a local directory is [`ImportFormat::Dir`]; otherwise the
/// suffix (`.tar`, `.tar.zst`/`.tzst`, `.tar.xz`/`.txz`, `.tar.gz`/`.tgz`, `.raw`/`.img`)
/// decides, else the magic bytes of `first_bytes` (or, for a local file and `None`, of the
/// file's first bytes).
pub fn detect_format(
    path_or_url: &str,
    first_bytes: Option<&[u8]>,
) -> Result<ImportFormat, ImageError> {
    let unknown = || ImageError::UnknownFormat {
        subject: path_or_url.to_string(),
    };
    let local = local_path(path_or_url);
    if let Some(p) = &local {
        if p.is_dir() {
            return Ok(ImportFormat::Dir);
        }
    }
    if let Some(f) = format_from_suffix(name_part(path_or_url)) {
        return Ok(f);
    }
    match (first_bytes, &local) {
        (Some(b), _) => format_from_magic(b).ok_or_else(unknown),
        (None, Some(p)) => {
            let head = read_head(p)?;
            format_from_magic(&head).ok_or_else(unknown)
        }
        (None, None) => Err(unknown()),
    }
}

fn read_head(p: &Path) -> Result<Vec<u8>, ImageError> {
    let f = std::fs::File::open(p).map_err(io_err(p, "open"))?;
    let mut head = Vec::with_capacity(MAGIC_LEN);
    f.take(MAGIC_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io_err(p, "read"))?;
    Ok(head)
}

/// The local path of a plain path or `file://` URL; `None` for other URLs.
fn local_path(source: &str) -> Option<PathBuf> {
    if let Some(p) = crate::fetch::file_path(source) {
        return Some(p);
    }
    (!source.contains("://")).then(|| PathBuf::from(source))
}

/// What [`import`] did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub dest: PathBuf,
    pub format: ImportFormat,
    /// Bytes downloaded (URL sources only).
    pub downloaded: Option<u64>,
    /// Whether a published `.sha256` / `SHA256SUMS` checked the download.
    pub sha256_verified: bool,
    /// Bytes of the source read (compressed size for tarballs).
    pub bytes_read: u64,
    /// Bytes of regular-file content written.
    pub bytes_written: u64,
    /// The single top-level directory that was unwrapped, if any.
    pub unwrapped: Option<String>,
}

/// Removes a file when dropped.
struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_dest(dest: &Path) -> Result<(), ImageError> {
    if dest.symlink_metadata().is_ok() {
        return Err(ImageError::DestExists {
            path: dest.to_path_buf(),
        });
    }
    Ok(())
}

pub(crate) fn new_staging(dest: &Path) -> Result<Staging, ImageError> {
    check_dest(dest)?;
    Staging::new(dest, false).map_err(|source| ImageError::Staging {
        path: dest.to_path_buf(),
        source: Box::new(source),
    })
}

pub(crate) fn commit(staging: Staging, dest: &Path) -> Result<PathBuf, ImageError> {
    // Staging::commit would replace a tree that appeared meanwhile; we never do.
    check_dest(dest)?;
    staging.commit().map_err(|source| ImageError::Staging {
        path: dest.to_path_buf(),
        source: Box::new(source),
    })
}

/// Imports `source` (a local path, `file://` URL or `http(s)://` URL) as a new tree at `dest`,
/// which must not exist. `progress` is called with the bytes of the source read so far.
///
/// Tarballs are extracted keeping owners, modes, links, device nodes, FIFOs and xattrs;
/// entries escaping the tree are refused. A tarball whose entries all sit under one
/// top-level directory containing `etc/` and `usr/` is unwrapped. Raw images are mounted
/// read-only through a loop device and copied; directories are cloned ([`clone_tree`]).
pub fn import(
    source: &str,
    dest: &Path,
    progress: &dyn Fn(u64),
) -> Result<ImportReport, ImageError> {
    check_dest(dest)?;
    let mut downloaded = None;
    let mut sha256_verified = false;
    let (local, _tmp) = match local_path(source) {
        Some(p) => (p, None),
        None => {
            let tmp = download_temp_name(dest);
            let guard = TempFile(tmp.clone());
            let (n, verified) = download(source, &tmp)?;
            downloaded = Some(n);
            sha256_verified = verified;
            progress(n);
            (tmp, Some(guard))
        }
    };
    let format = if local.is_dir() {
        ImportFormat::Dir
    } else {
        match format_from_suffix(name_part(source)) {
            Some(f) => f,
            None => {
                let head = read_head(&local)?;
                format_from_magic(&head).ok_or_else(|| ImageError::UnknownFormat {
                    subject: source.to_string(),
                })?
            }
        }
    };
    let mut report = ImportReport {
        dest: dest.to_path_buf(),
        format,
        downloaded,
        sha256_verified,
        bytes_read: 0,
        bytes_written: 0,
        unwrapped: None,
    };
    match format {
        ImportFormat::Dir => {
            let c = clone_tree(&local, dest)?;
            report.bytes_read = c.bytes;
            report.bytes_written = c.bytes;
            progress(c.bytes);
        }
        ImportFormat::Raw => {
            let c = raw::import_raw(&local, dest)?;
            report.bytes_read = c.bytes;
            report.bytes_written = c.bytes;
            progress(c.bytes);
        }
        _ => {
            let staging = new_staging(dest)?;
            let (read, written, root) =
                extract_tarball(&local, source, format, staging.path(), progress)?;
            report.bytes_read = read;
            report.bytes_written = written;
            report.unwrapped = unwrap_single_top(staging.path())?;
            if let (None, Some(m)) = (&report.unwrapped, root) {
                apply_root_meta(staging.path(), m)?;
            }
            commit(staging, dest)?;
        }
    }
    Ok(report)
}

/// A reader counting the bytes that went through it and reporting them.
struct Counting<'a, R> {
    inner: R,
    n: u64,
    progress: &'a dyn Fn(u64),
    last: u64,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        if self.n - self.last >= 1 << 20 || k == 0 {
            self.last = self.n;
            (self.progress)(self.n);
        }
        Ok(k)
    }
}

fn extract_tarball(
    local: &Path,
    label: &str,
    format: ImportFormat,
    into: &Path,
    progress: &dyn Fn(u64),
) -> Result<(u64, u64, Option<RootMeta>), ImageError> {
    let file = std::fs::File::open(local).map_err(io_err(local, "open"))?;
    let mut counting = Counting {
        inner: io::BufReader::with_capacity(256 * 1024, file),
        n: 0,
        progress,
        last: 0,
    };
    let read_err = |source: io::Error| ImageError::Io {
        path: PathBuf::from(label),
        step: "decompressing".into(),
        source,
    };
    let mut reader: Box<dyn Read + '_> = match format {
        ImportFormat::Tar => Box::new(&mut counting),
        ImportFormat::TarZst => {
            Box::new(zstd::stream::read::Decoder::new(&mut counting).map_err(read_err)?)
        }
        ImportFormat::TarXz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(&mut counting)),
        ImportFormat::TarGz => Box::new(flate2::read::MultiGzDecoder::new(&mut counting)),
        ImportFormat::Raw | ImportFormat::Dir => unreachable!("not a tarball"),
    };
    let mut head = Head {
        inner: &mut reader,
        buf: Vec::with_capacity(512),
    };
    let written =
        crate::unpack::extract_tar(into, local, &mut head).map_err(|e| unpack_err(label, e))?;
    let root = root_meta(&head.buf);
    // The end-of-archive marker may come before a truncated or corrupt compressed stream ends.
    io::copy(&mut reader, &mut io::sink()).map_err(read_err)?;
    drop(reader);
    Ok((counting.n, written, root))
}

/// A reader keeping a copy of the first 512 bytes (the first tar header).
struct Head<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: Read> Read for Head<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(out)?;
        let want = (512 - self.buf.len()).min(k);
        self.buf.extend_from_slice(&out[..want]);
        Ok(k)
    }
}

/// Owner, mode and mtime of the tree's root.
#[derive(Debug, Clone, Copy)]
struct RootMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

/// The metadata of a leading `./` directory entry (the extractor leaves the root alone).
fn root_meta(first: &[u8]) -> Option<RootMeta> {
    if first.len() < 512 {
        return None;
    }
    let h = tar::Header::from_byte_slice(&first[..512]);
    let path = h.path_bytes();
    if h.entry_type() != tar::EntryType::Directory || !matches!(&*path, b"./" | b".") {
        return None;
    }
    Some(RootMeta {
        mode: h.mode().ok()? & 0o7777,
        uid: h.uid().ok()? as u32,
        gid: h.gid().ok()? as u32,
        mtime: h.mtime().ok()? as i64,
    })
}

fn apply_root_meta(root: &Path, m: RootMeta) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(root, Some(m.uid), Some(m.gid)).map_err(io_err(root, "chown"))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(m.mode))
        .map_err(io_err(root, "chmod"))?;
    filetime::set_file_mtime(root, filetime::FileTime::from_unix_time(m.mtime, 0))
        .map_err(io_err(root, "set mtime"))
}

fn unpack_err(file: &str, e: UnpackError) -> ImageError {
    match e {
        UnpackError::Entry { entry, msg, .. } => ImageError::Entry {
            file: file.to_string(),
            entry,
            msg,
        },
        UnpackError::EntryIo {
            entry,
            step,
            source,
            ..
        } => ImageError::Entry {
            file: file.to_string(),
            entry,
            msg: format!("{step}: {source}"),
        },
        UnpackError::Io { step, source, .. } => ImageError::Io {
            path: PathBuf::from(file),
            step: step.replace("data.tar", "the tar stream"),
            source,
        },
        other => ImageError::Extract {
            file: file.to_string(),
            source: Box::new(other),
        },
    }
}

/// Like `machinectl import-tar`: when the tree's only entry is a directory that holds
/// `etc/` and `usr/`, its content becomes the tree. Returns the unwrapped name.
fn unwrap_single_top(root: &Path) -> Result<Option<String>, ImageError> {
    let entries: Vec<_> = std::fs::read_dir(root)
        .map_err(io_err(root, "read_dir"))?
        .collect::<Result<_, _>>()
        .map_err(io_err(root, "read_dir"))?;
    let [only] = entries.as_slice() else {
        return Ok(None);
    };
    let top = only.path();
    let md = top.symlink_metadata().map_err(io_err(&top, "stat"))?;
    if !md.is_dir() || !top.join("etc").is_dir() || !top.join("usr").is_dir() {
        return Ok(None);
    }
    let name = only.file_name().to_string_lossy().into_owned();
    // Out of the way first: a child may share the top directory's name.
    let moved = root.join(format!(".unwrap-{}", std::process::id()));
    std::fs::rename(&top, &moved).map_err(io_err(&top, "rename"))?;
    for e in std::fs::read_dir(&moved).map_err(io_err(&moved, "read_dir"))? {
        let e = e.map_err(io_err(&moved, "read_dir"))?;
        let to = root.join(e.file_name());
        std::fs::rename(e.path(), &to).map_err(io_err(&to, "rename"))?;
    }
    std::fs::remove_dir(&moved).map_err(io_err(&moved, "rmdir"))?;
    // The root takes the top directory's owner, mode and mtime.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::os::unix::fs::chown(root, Some(md.uid()), Some(md.gid()))
        .map_err(io_err(root, "chown"))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(md.mode() & 0o7777))
        .map_err(io_err(root, "chmod"))?;
    let t = filetime::FileTime::from_last_modification_time(&md);
    filetime::set_file_mtime(root, t).map_err(io_err(root, "set mtime"))?;
    Ok(Some(name))
}

/// A zstd level-3 encoder using every core (compression dominates a `.tar.zst` export).
pub fn zstd_encoder<W: std::io::Write>(out: W) -> std::io::Result<zstd::Encoder<'static, W>> {
    let mut e = zstd::Encoder::new(out, 3)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    if threads > 1 {
        e.multithread(threads)?;
    }
    Ok(e)
}

fn download_temp_name(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    dest.with_file_name(format!(".{name}.download-{}", std::process::id()))
}

/// Downloads `url` to `to` with [`crate::fetch::Fetcher`] (retries, length check). A
/// `<url>.sha256` or a `SHA256SUMS` beside the file, when published, is checked too.
/// Returns the size and whether a checksum was verified.
fn download(url: &str, to: &Path) -> Result<(u64, bool), ImageError> {
    let fetch_err = |source| ImageError::Fetch {
        url: url.to_string(),
        source: Box::new(source),
    };
    // Our own runtime on our own thread: callers may be inside a tokio runtime.
    // The body streams to a temporary file beside `to` (images may be large).
    let tmp = crate::fetch::temp_name(to);
    let guard = TempFile(tmp.clone());
    let ((size, actual), sums) = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| fetch_err(FetchError::Client(e.to_string())))?;
            rt.block_on(async {
                let f = crate::fetch::Fetcher::new(&[url], Default::default())
                    .await
                    .map_err(fetch_err)?;
                let got = f.get_to_file(url, &tmp, None).await.map_err(fetch_err)?;
                let sums = published_sha256(&f, url).await;
                Ok::<_, ImageError>((got, sums))
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(fetch_err(FetchError::Client(
                "download thread panicked".into(),
            )))
        })
    })?;
    let mut verified = false;
    if let Some((sums_url, expected)) = sums {
        if !actual.eq_ignore_ascii_case(&expected) {
            return Err(ImageError::Checksum {
                url: url.to_string(),
                sums_url,
                expected,
                actual,
            });
        }
        verified = true;
    }
    std::fs::rename(&tmp, to).map_err(io_err(to, "rename"))?;
    drop(guard);
    Ok((size, verified))
}

/// The SHA256 published for `url` in `<url>.sha256` or `SHA256SUMS` beside it.
async fn published_sha256(f: &crate::fetch::Fetcher, url: &str) -> Option<(String, String)> {
    let base = name_part(url);
    let file = base.rsplit('/').next()?.to_string();
    let dir = &base[..base.len() - file.len()];
    for sums_url in [format!("{base}.sha256"), format!("{dir}SHA256SUMS")] {
        let Ok(body) = f.get(&sums_url).await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body);
        for line in text.lines() {
            let mut w = line.split_whitespace();
            let (Some(hash), name) = (w.next(), w.next()) else {
                continue;
            };
            let name_ok = match name {
                None => sums_url.ends_with(".sha256"),
                Some(n) => n.trim_start_matches('*') == file,
            };
            if name_ok && hash.len() == 64 && hash.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Some((sums_url, hash.to_ascii_lowercase()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        let d = |s: &str| detect_format(s, Some(b"")).unwrap();
        assert_eq!(d("a.tar"), ImportFormat::Tar);
        assert_eq!(d("http://h/x/a.tar.zst?x=1"), ImportFormat::TarZst);
        assert_eq!(d("a.TZST"), ImportFormat::TarZst);
        assert_eq!(d("a.tar.xz"), ImportFormat::TarXz);
        assert_eq!(d("a.tgz"), ImportFormat::TarGz);
        assert_eq!(d("file:///x/disk.raw"), ImportFormat::Raw);
        assert_eq!(d("disk.img"), ImportFormat::Raw);
        assert_eq!(d("/"), ImportFormat::Dir);
    }

    #[test]
    fn magic() {
        let d = |b: &[u8]| detect_format("http://h/blob", Some(b));
        assert_eq!(
            d(&[0x28, 0xb5, 0x2f, 0xfd, 0]).unwrap(),
            ImportFormat::TarZst
        );
        assert_eq!(d(b"\xfd7zXZ\0..").unwrap(), ImportFormat::TarXz);
        assert_eq!(d(&[0x1f, 0x8b, 8]).unwrap(), ImportFormat::TarGz);
        let mut t = vec![0u8; 512];
        t[257..262].copy_from_slice(b"ustar");
        assert_eq!(d(&t).unwrap(), ImportFormat::Tar);
        let mut e = vec![0u8; 2048];
        e[0x438] = 0x53;
        e[0x439] = 0xef;
        assert_eq!(d(&e).unwrap(), ImportFormat::Raw);
        let err = d(b"hello").unwrap_err().to_string();
        assert!(err.contains("http://h/blob"), "{err}");
        assert!(detect_format("http://h/blob", None).is_err());
    }

    #[test]
    fn unwrap_only_rootfs_like() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path().join("r");
        std::fs::create_dir_all(r.join("top/etc")).unwrap();
        assert_eq!(unwrap_single_top(&r).unwrap(), None);
        std::fs::create_dir_all(r.join("top/usr/top")).unwrap();
        assert_eq!(unwrap_single_top(&r).unwrap().as_deref(), Some("top"));
        assert!(r.join("etc").is_dir() && r.join("usr/top").is_dir());
        assert!(!r.join("top").exists());
    }
}
