//! The calls into [`crate::image`] (import, clone, export), with their reports
//! turned into the lines the builder prints.

use std::path::Path;

use crate::image;

/// Imports `source` (file, directory or http(s) URL) into `dest`.
pub fn import(source: &str, dest: &Path, progress: &dyn Fn(u64)) -> Result<String, String> {
    let r = image::import(source, dest, progress).map_err(|e| format!("import: {e}"))?;
    Ok(format!(
        "imported {source} ({:?}, {:.1} MiB read{}{})",
        r.format,
        r.bytes_read as f64 / 1048576.0,
        r.downloaded
            .map(|d| format!(", {:.1} MiB downloaded", d as f64 / 1048576.0))
            .unwrap_or_default(),
        if r.sha256_verified {
            ", SHA256 verified"
        } else {
            ""
        }
    ))
}

/// Copies the tree `src` to `dest`.
pub fn clone_tree(src: &Path, dest: &Path) -> Result<String, String> {
    let r = image::clone_tree(src, dest).map_err(|e| format!("clone: {e}"))?;
    Ok(format!(
        "cloned {}: {} files ({} reflinked), {} directories, {:.1} MiB",
        src.display(),
        r.files,
        r.reflinked,
        r.dirs,
        r.bytes as f64 / 1048576.0
    ))
}

/// Exports the tree `src` to `to` (format from the suffix); returns the files
/// written and a summary line.
pub fn export(
    src: &Path,
    to: &Path,
    progress: &dyn Fn(u64),
) -> Result<(Vec<String>, String), String> {
    let r = image::export(src, to, progress).map_err(|e| format!("export: {e}"))?;
    Ok((
        vec![r.path.display().to_string()],
        format!(
            "exported {:?} to {}: {} entries, {:.1} MiB in, {:.1} MiB out",
            r.format,
            r.path.display(),
            r.entries,
            r.bytes_in as f64 / 1048576.0,
            r.bytes_out as f64 / 1048576.0
        ),
    ))
}

/// Exports a tree owned by the id range at `base` as a tarball with canonical
/// owners (root = 0): GNU tar runs inside the tree, in a user namespace mapping
/// 0.. to `base..`, and its stream is compressed here. Returns None when that
/// is not possible (directory export, or no tar in the tree): the caller then
/// exports the tree as it is.
pub fn export_unshifted(
    src: &Path,
    to: &Path,
    base: u32,
    progress: &dyn Fn(u64),
) -> Option<Result<(Vec<String>, String), String>> {
    use std::io::{Read, Write};
    let format = image::export_format(to).ok()?;
    if format == image::ExportFormat::Dir
        || !["bin/tar", "usr/bin/tar"]
            .iter()
            .any(|p| src.join(p).symlink_metadata().is_ok())
    {
        return None;
    }
    let res = (|| -> Result<(Vec<String>, String), String> {
        let tmp = to.with_file_name(format!(
            ".{}.part-{}",
            to.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let werr = |e: std::io::Error| format!("export: write {}: {e}", tmp.display());
        let file = std::fs::File::create(&tmp).map_err(werr)?;
        let mut out: Box<dyn Write> = match format {
            image::ExportFormat::Tar => Box::new(file),
            image::ExportFormat::TarZst => Box::new(
                crate::image::zstd_encoder(file)
                    .map_err(werr)?
                    .auto_finish(),
            ),
            image::ExportFormat::TarXz => Box::new(liblzma::write::XzEncoder::new(file, 6)),
            image::ExportFormat::TarGz => Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::new(6),
            )),
            image::ExportFormat::Dir => unreachable!(),
        };
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("export: pipe: {e}"))?;
        let mut spec = crate::sandbox::SandboxSpec::new(src);
        spec.userns = Some(crate::sandbox::IdMap::new(base));
        let argv: Vec<String> = [
            "tar",
            "--create",
            "--file=-",
            "--directory=/",
            "--one-file-system",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "--sparse",
            "--sort=name",
            ".",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (er, ew) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("export: pipe: {e}"))?;
        let errs = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::fs::File::from(er).read_to_string(&mut s);
            s
        });
        let runner = std::thread::spawn(move || {
            crate::sandbox::run(
                &spec,
                &argv,
                std::process::Stdio::null(),
                std::process::Stdio::from(w),
                std::process::Stdio::from(ew),
            )
        });
        let mut rf = std::fs::File::from(r);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let copied: Result<(), String> = loop {
            match rf.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if let Err(e) = out.write_all(&buf[..n]) {
                        break Err(werr(e));
                    }
                    total += n as u64;
                    progress(total);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("export: read tar stream: {e}")),
            }
        };
        drop(rf);
        let status = runner.join().map_err(|_| "export: tar thread panicked")?;
        let stderr = errs.join().unwrap_or_default();
        let finished = out.flush().map_err(werr);
        drop(out);
        let outcome = (|| {
            copied?;
            finished?;
            match status {
                Ok(s) if s.success() => Ok(()),
                // 1 = "file changed as we read it": the sandbox's own mount points
                // (/proc, /sys, /dev) in a tree nothing else runs in
                Ok(crate::sandbox::ExitStatusInfo::Exited(1))
                    if stderr.lines().all(|l| {
                        l.trim().is_empty() || l.ends_with("file changed as we read it")
                    }) =>
                {
                    Ok(())
                }
                Ok(s) => Err(format!(
                    "export: tar in the tree {s}: {}",
                    stderr.trim_end()
                )),
                Err(e) => Err(format!("export: {e}")),
            }
        })();
        if let Err(e) = outcome {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let size = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        std::fs::rename(&tmp, to)
            .map_err(|e| format!("export: rename to {}: {e}", to.display()))?;
        Ok((
            vec![to.display().to_string()],
            format!(
                "exported {format:?} with canonical owners (ids {base}.. → 0..) to {}: {:.1} MiB in, {:.1} MiB out",
                to.display(),
                total as f64 / 1048576.0,
                size as f64 / 1048576.0
            ),
        ))
    })();
    Some(res)
}
