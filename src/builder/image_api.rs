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
