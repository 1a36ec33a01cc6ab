//! Raw disk images, as `machinectl import-raw` takes them: a bare filesystem image (ext4,
//! btrfs, xfs, ...) or a GPT disk with a root partition. The image is attached read-only to
//! a loop device (the `losetup` binary), the filesystem mounted read-only in a private
//! temporary directory, and the tree copied out with [`super::clone_tree`].

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{CloneReport, ImageError};

/// GPT partition types of a root filesystem (x86-64, arm64, x86, generic Linux data).
const ROOT_TYPES: [&str; 3] = [
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
    "b921b045-1df0-41c3-af44-4c6f280d3fae",
    "44479540-f297-41b2-9af7-d131d5f0458a",
];
const LINUX_DATA: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn run(image: &Path, cmd: &mut Command) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Raw {
        path: image.to_path_buf(),
        msg: format!("cannot run {:?}: {e}", cmd.get_program()),
    })?;
    if !out.status.success() {
        return Err(ImageError::Raw {
            path: image.to_path_buf(),
            msg: format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A probe value of `dev` (`TYPE`, `PART_ENTRY_TYPE`), empty if unknown.
fn probe(dev: &Path, tag: &str) -> String {
    Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(dev)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// The block device holding the root filesystem: the loop device itself, or one of its
/// partitions (a device node is made in `scratch` when udev did not create one).
fn root_device(image: &Path, loopdev: &str, scratch: &Path) -> Result<PathBuf, ImageError> {
    let base = Path::new(loopdev)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = Path::new("/sys/class/block");
    let mut parts: Vec<(String, String)> = std::fs::read_dir(sys.join(&base))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
            n.starts_with(&format!("{base}p"))
                .then(|| (n, dev.trim().to_string()))
        })
        .collect();
    parts.sort();
    if parts.is_empty() {
        return Ok(PathBuf::from(loopdev));
    }
    let mut nodes = Vec::new();
    for (name, majmin) in &parts {
        let node = Path::new("/dev").join(name);
        let node = if node.exists() {
            node
        } else {
            let (ma, mi) = majmin.split_once(':').unwrap_or(("0", "0"));
            let dev = nix::sys::stat::makedev(ma.parse().unwrap_or(0), mi.parse().unwrap_or(0));
            let p = scratch.join(name);
            nix::sys::stat::mknod(
                &p,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                dev,
            )
            .map_err(|e| ImageError::Raw {
                path: image.to_path_buf(),
                msg: format!("mknod {}: {e}", p.display()),
            })?;
            p
        };
        let ty = probe(&node, "PART_ENTRY_TYPE");
        nodes.push((node, ty));
    }
    if let Some((n, _)) = nodes.iter().find(|(_, t)| ROOT_TYPES.contains(&t.as_str())) {
        return Ok(n.clone());
    }
    let data: Vec<_> = nodes.iter().filter(|(_, t)| t == LINUX_DATA).collect();
    if let [(n, _)] = data.as_slice() {
        return Ok(n.clone());
    }
    Err(ImageError::Raw {
        path: image.to_path_buf(),
        msg: format!(
            "no root partition: {} partition(s), none of a root type and not exactly one Linux data partition",
            nodes.len()
        ),
    })
}

/// Copies the root filesystem of the raw image `image` to `dest`.
pub(crate) fn import_raw(image: &Path, dest: &Path) -> Result<CloneReport, ImageError> {
    let err = |msg: String| ImageError::Raw {
        path: image.to_path_buf(),
        msg,
    };
    if !Path::new("/dev/loop-control").exists() {
        return Err(err(
            "no /dev/loop-control on this host: loop devices are needed to import raw images"
                .into(),
        ));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    let scratch = tempfile::Builder::new()
        .prefix(".raw-import-")
        .tempdir_in(parent)
        .map_err(|e| err(format!("scratch directory in {}: {e}", parent.display())))?;
    let loopdev = run(
        image,
        Command::new("losetup")
            .args(["--find", "--show", "--read-only", "--partscan"])
            .arg(image),
    )?;
    let _loop = Loop(loopdev.clone());
    let dev = root_device(image, &loopdev, scratch.path())?;
    let fstype = probe(&dev, "TYPE");
    if fstype.is_empty() {
        return Err(err(format!("{}: no filesystem recognized", dev.display())));
    }
    let mp = scratch.path().join("root");
    std::fs::create_dir(&mp).map_err(|e| err(format!("mkdir {}: {e}", mp.display())))?;
    use nix::mount::MsFlags;
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    nix::mount::mount(
        Some(dev.as_path()),
        &mp,
        Some(fstype.as_str()),
        flags,
        None::<&str>,
    )
    .map_err(|e| err(format!("mount {} ({fstype}) read-only: {e}", dev.display())))?;
    let mounted = Mounted(mp.clone());
    let r = super::clone_tree(&mp, dest);
    drop(mounted);
    r
}
