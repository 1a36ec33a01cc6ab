//! Scratch space for tests that build whole root filesystems: a tmpfs mounted on
//! a fresh directory under /var/tmp (deleting big trees on the disk is slow),
//! unmounted on drop; and the host's mirror, read at run time.

use std::path::Path;
use std::process::Command;

/// The persistent `.deb`/index cache the real-mirror tests share.
pub const TEST_CACHE: &str = "/var/tmp/packer-plugin-nspawn-test-cache";

/// A scratch directory with a tmpfs on it (the disk if mounting fails).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    mounted: bool,
    keep: bool,
}

impl Scratch {
    /// A new scratch tmpfs; `prefix` names the directory under /var/tmp.
    pub fn new(prefix: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/var/tmp")
            .expect("scratch directory under /var/tmp");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("note: no tmpfs for scratch, using the disk");
        }
        Scratch {
            dir: Some(dir),
            mounted,
            keep: false,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("scratch dir").path()
    }

    /// Leave the tmpfs mounted and the directory in place on drop (for debugging).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let dir = self.dir.take().expect("scratch dir");
        if self.keep {
            eprintln!("kept: {}", dir.keep().display());
            return;
        }
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
        }
    }
}

/// The host's http(s) mirror from its APT sources, if it has one.
pub fn host_mirror() -> Option<String> {
    let host = crate::archive::sources::host_defaults()?;
    host.mirror.starts_with("http").then_some(host.mirror)
}

/// `bin bootstrap --quiet --suite bookworm --variant minbase --mirror M --cache-dir
/// TEST_CACHE EXTRA... TARGET`: the command the real-mirror tests run (`bin` is the
/// test's `CARGO_BIN_EXE_…`).
pub fn bookworm_minbase(bin: &str, mirror: &str, target: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "bootstrap",
        "--quiet",
        "--suite",
        "bookworm",
        "--variant",
        "minbase",
    ])
    .arg("--mirror")
    .arg(mirror)
    .arg("--cache-dir")
    .arg(TEST_CACHE)
    .args(extra)
    .arg(target);
    c
}

/// Whether a failed command's stderr says the mirror could not be reached.
pub fn mirror_unreachable(out: &std::process::Output) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    !out.status.success() && (err.contains("resolve host") || err.contains("connect"))
}
