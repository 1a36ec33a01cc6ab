//! The calls into `crate::image` (import, clone, export). Until that module is
//! merged they fail with a clear "not available yet" error.

use std::path::Path;

/// Imports `source` (file, directory or http(s) URL) into `dest`.
pub fn import(source: &str, _dest: &Path, _progress: &dyn Fn(u64)) -> Result<(), String> {
    Err(format!(
        "import {source}: importing images is not available yet in this build of the plugin"
    ))
}

/// Copies the tree `src` to `dest`.
pub fn clone_tree(src: &Path, _dest: &Path) -> Result<(), String> {
    Err(format!(
        "clone {}: cloning machines is not available yet in this build of the plugin",
        src.display()
    ))
}

/// Exports the tree `src` to `to` (format from the suffix); returns the files written.
pub fn export(_src: &Path, to: &Path, _progress: &dyn Fn(u64)) -> Result<Vec<String>, String> {
    Err(format!(
        "export {}: exporting images is not available yet in this build of the plugin",
        to.display()
    ))
}
