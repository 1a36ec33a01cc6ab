//! Exporting a tree as a directory ([`super::clone_tree`]) or a tarball: entries sorted by
//! name, numeric owners only, xattrs as PAX `SCHILY.xattr.*` records, hard links as links,
//! device nodes and FIFOs; written to a temporary file beside the destination and renamed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{io_err, ImageError};

/// What [`export`] writes, from the export path's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A copy of the tree (any path without a tarball suffix).
    Dir,
    Tar,
    /// zstd level 3.
    TarZst,
    /// xz level 6.
    TarXz,
    /// gzip level 6.
    TarGz,
}

/// The format for the export path `to`: `.tar`, `.tar.zst`/`.tzst`, `.tar.xz`/`.txz`,
/// `.tar.gz`/`.tgz`, or a directory for a name without a dot-suffix. Other suffixes that
/// look like archives (`.zip`, `.tar.bz2`, ...) are refused.
pub fn export_format(to: &Path) -> Result<ExportFormat, ImageError> {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ends = |s: &[&str]| s.iter().any(|x| name.ends_with(x));
    Ok(if ends(&[".tar.zst", ".tzst", ".tar.zstd"]) {
        ExportFormat::TarZst
    } else if ends(&[".tar.xz", ".txz"]) {
        ExportFormat::TarXz
    } else if ends(&[".tar.gz", ".tgz"]) {
        ExportFormat::TarGz
    } else if ends(&[".tar"]) {
        ExportFormat::Tar
    } else if ends(&[
        ".zip", ".bz2", ".tbz", ".tbz2", ".lz4", ".lzma", ".7z", ".zst", ".xz", ".gz", ".raw",
        ".img", ".qcow2",
    ]) || name.is_empty()
    {
        return Err(ImageError::UnknownExportFormat {
            path: to.to_path_buf(),
        });
    } else {
        ExportFormat::Dir
    })
}

/// What [`export`] did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub path: PathBuf,
    pub format: ExportFormat,
    pub entries: u64,
    /// Uncompressed bytes (the tar stream; file content for a directory copy).
    pub bytes_in: u64,
    /// Bytes written to the destination.
    pub bytes_out: u64,
}

impl ExportReport {
    /// `bytes_in / bytes_out`.
    pub fn ratio(&self) -> f64 {
        self.bytes_in as f64 / self.bytes_out.max(1) as f64
    }
}

/// Exports the tree `src` to `to` (which must not exist) in the format its suffix names.
/// `progress` is called with the uncompressed bytes written so far.
pub fn export(src: &Path, to: &Path, progress: &dyn Fn(u64)) -> Result<ExportReport, ImageError> {
    let format = export_format(to)?;
    let md = src.symlink_metadata().map_err(io_err(src, "stat"))?;
    if !md.is_dir() {
        return Err(ImageError::NotADirectory {
            path: src.to_path_buf(),
        });
    }
    if to.symlink_metadata().is_ok() {
        return Err(ImageError::DestExists {
            path: to.to_path_buf(),
        });
    }
    if format == ExportFormat::Dir {
        let c = super::clone_tree(src, to)?;
        progress(c.bytes);
        return Ok(ExportReport {
            path: to.to_path_buf(),
            format,
            entries: c.dirs + c.files + c.symlinks + c.hardlinks + c.special + 1,
            bytes_in: c.bytes,
            bytes_out: c.bytes,
        });
    }
    let name = to
        .file_name()
        .expect("export_format checked")
        .to_string_lossy();
    let tmp = to.with_file_name(format!(".{name}.export-{}", std::process::id()));
    let guard = super::TempFile(tmp.clone());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(&tmp, "create"))?;
    let out = Counter {
        inner: io::BufWriter::with_capacity(1 << 20, file),
        n: 0,
        progress: None,
        last: 0,
    };
    let w = |e| io_err(&tmp, "write")(e);
    let enc = match format {
        ExportFormat::Tar => Enc::Plain(out),
        ExportFormat::TarZst => Enc::Zst(crate::image::zstd_encoder(out).map_err(w)?),
        ExportFormat::TarXz => Enc::Xz(liblzma::write::XzEncoder::new(out, 6)),
        ExportFormat::TarGz => Enc::Gz(flate2::write::GzEncoder::new(
            out,
            flate2::Compression::new(6),
        )),
        ExportFormat::Dir => unreachable!(),
    };
    let counted = Counter {
        inner: enc,
        n: 0,
        progress: Some(progress),
        last: 0,
    };
    let mut builder = tar::Builder::new(counted);
    let entries = write_tree(&mut builder, src)?;
    let counted = builder.into_inner().map_err(w)?;
    let bytes_in = counted.n;
    progress(bytes_in);
    let out = counted.inner.finish().map_err(w)?;
    let bytes_out = out.n;
    let file = out.inner.into_inner().map_err(|e| w(e.into_error()))?;
    file.sync_all().map_err(w)?;
    drop(file);
    std::fs::rename(&tmp, to).map_err(io_err(to, "rename"))?;
    std::mem::forget(guard);
    Ok(ExportReport {
        path: to.to_path_buf(),
        format,
        entries,
        bytes_in,
        bytes_out,
    })
}

/// A writer counting bytes, optionally reporting them.
struct Counter<'a, W> {
    inner: W,
    n: u64,
    progress: Option<&'a dyn Fn(u64)>,
    last: u64,
}

impl<W: Write> Write for Counter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        if let Some(p) = self.progress {
            if self.n - self.last >= 1 << 20 {
                self.last = self.n;
                p(self.n);
            }
        }
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Enc<W: Write> {
    Plain(W),
    Zst(zstd::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
    Gz(flate2::write::GzEncoder<W>),
}

impl<W: Write> Enc<W> {
    fn finish(self) -> io::Result<W> {
        let mut w = match self {
            Enc::Plain(w) => w,
            Enc::Zst(e) => e.finish()?,
            Enc::Xz(e) => e.finish()?,
            Enc::Gz(e) => e.finish()?,
        };
        w.flush()?;
        Ok(w)
    }
}

impl<W: Write> Write for Enc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Enc::Plain(w) => w.write(buf),
            Enc::Zst(w) => w.write(buf),
            Enc::Xz(w) => w.write(buf),
            Enc::Gz(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Enc::Plain(w) => w.flush(),
            Enc::Zst(w) => w.flush(),
            Enc::Xz(w) => w.flush(),
            Enc::Gz(w) => w.flush(),
        }
    }
}

/// Appends `src` as `./` and its content sorted by name; returns the entry count.
fn write_tree<W: Write>(b: &mut tar::Builder<W>, src: &Path) -> Result<u64, ImageError> {
    let root_dev = src.symlink_metadata().map_err(io_err(src, "stat"))?.dev();
    let mut seen: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut n = 0;
    let walk = walkdir::WalkDir::new(src)
        .same_file_system(true)
        .follow_links(false)
        .sort_by_file_name();
    for e in walk {
        let e = e.map_err(|e| {
            let p = e.path().unwrap_or(src).to_path_buf();
            io_err(&p, "walking the tree")(e.into())
        })?;
        let path = e.path();
        let md = e
            .metadata()
            .map_err(|err| io_err(path, "stat")(err.into()))?;
        let ft = md.file_type();
        if e.depth() > 0 && md.dev() != root_dev && !ft.is_dir() {
            continue;
        }
        let rel = path.strip_prefix(src).expect("below src");
        let name: PathBuf = if e.depth() == 0 {
            PathBuf::from("./")
        } else {
            rel.to_path_buf()
        };
        let werr = |err: io::Error| ImageError::Io {
            path: path.to_path_buf(),
            step: "adding to the tarball".into(),
            source: err,
        };
        let mut h = tar::Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(md.uid() as u64);
        h.set_gid(md.gid() as u64);
        h.set_mtime(md.mtime().max(0) as u64);
        h.set_size(0);
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = seen.get(&(md.dev(), md.ino())) {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, &name, first).map_err(werr)?;
                n += 1;
                continue;
            }
            seen.insert((md.dev(), md.ino()), name.clone());
        }
        if !ft.is_symlink() {
            let xattrs = read_xattrs(path)?;
            if !xattrs.is_empty() {
                let keys: Vec<(String, &[u8])> = xattrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                    .collect();
                b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                    .map_err(werr)?;
            }
        }
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, &name, io::empty()).map_err(werr)?;
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(md.len());
            let f = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err(path, "open"))?;
            b.append_data(&mut h, &name, io::Read::take(f, md.len()))
                .map_err(werr)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path).map_err(io_err(path, "readlink"))?;
            h.set_entry_type(tar::EntryType::Symlink);
            b.append_link(&mut h, &name, &target).map_err(werr)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            let rdev = md.rdev();
            h.set_device_major(libc::major(rdev)).map_err(werr)?;
            h.set_device_minor(libc::minor(rdev)).map_err(werr)?;
            b.append_data(&mut h, &name, io::empty()).map_err(werr)?;
        } else {
            // Sockets have no tar form; they are recreated by whoever listens.
            tracing::debug!("{}: socket not exported", path.display());
            continue;
        }
        n += 1;
    }
    Ok(n)
}

fn read_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path, "listing xattrs")(e)),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(v) = xattr::get(path, &name).map_err(io_err(path, "reading an xattr"))? {
            out.push((name.to_string_lossy().into_owned(), v));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_suffix() {
        let f = |s: &str| export_format(Path::new(s));
        assert_eq!(f("/x/out.tar").unwrap(), ExportFormat::Tar);
        assert_eq!(f("/x/out.tar.zst").unwrap(), ExportFormat::TarZst);
        assert_eq!(f("/x/out.TXZ").unwrap(), ExportFormat::TarXz);
        assert_eq!(f("/x/out.tgz").unwrap(), ExportFormat::TarGz);
        assert_eq!(f("/x/rootfs").unwrap(), ExportFormat::Dir);
        let e = f("/x/out.tar.bz2").unwrap_err().to_string();
        assert!(e.contains("/x/out.tar.bz2"), "{e}");
    }
}
