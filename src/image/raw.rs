//! Raw disk images, as `machinectl import-raw` takes them: a bare filesystem image (ext4,
//! btrfs, xfs, ...) or a GPT disk with a root partition. The image is attached read-only to
//! a loop device (the `losetup` binary; for a GPT disk, with the offset and size of the root
//! partition, found by reading the GPT here), the filesystem mounted read-only in a private
//! temporary directory, and the tree copied out with [`super::clone_tree`].

use std::io::{self, Read, Seek, SeekFrom};
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

/// A probe value of `dev` (`TYPE`), empty if unknown.
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

/// One GPT partition: type GUID (lower case), byte offset and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Partition {
    pub type_guid: String,
    pub offset: u64,
    pub len: u64,
}

fn guid_string(b: &[u8]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        b[8],
        b[9],
        hex::encode(&b[10..16])
    )
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// The partitions of the primary GPT of `img`, `None` when it has no (valid) GPT. Read here
/// rather than by the kernel, which may lack partition-table support or loop partition scans.
pub(crate) fn read_gpt(img: &mut (impl Read + Seek)) -> io::Result<Option<Vec<Partition>>> {
    for sector in [512u64, 4096] {
        let mut hdr = [0u8; 92];
        img.seek(SeekFrom::Start(sector))?;
        if img.read_exact(&mut hdr).is_err() || &hdr[..8] != b"EFI PART" {
            continue;
        }
        let u32_at = |o: usize| u32::from_le_bytes(hdr[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(hdr[o..o + 8].try_into().expect("8 bytes"));
        let hsize = u32_at(12) as usize;
        let mut check = hdr;
        check[16..20].fill(0);
        if hsize != 92 || crc32(&check) != u32_at(16) {
            continue;
        }
        let (lba, count, esize) = (u64_at(72), u32_at(80) as usize, u32_at(84) as usize);
        if !(128..=4096).contains(&esize) || count > 1024 {
            continue;
        }
        let mut entries = vec![0u8; count * esize];
        img.seek(SeekFrom::Start(lba * sector))?;
        img.read_exact(&mut entries)?;
        if crc32(&entries) != u32_at(88) {
            continue;
        }
        let parts = entries
            .chunks(esize)
            .filter(|e| e[..16].iter().any(|b| *b != 0))
            .map(|e| {
                let first = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
                let last = u64::from_le_bytes(e[40..48].try_into().expect("8 bytes"));
                Partition {
                    type_guid: guid_string(&e[..16]),
                    offset: first * sector,
                    len: (last + 1).saturating_sub(first) * sector,
                }
            })
            .collect();
        return Ok(Some(parts));
    }
    Ok(None)
}

/// The root partition: the first of a root type, else the only Linux data partition.
pub(crate) fn pick_root(parts: &[Partition]) -> Result<&Partition, String> {
    if let Some(p) = parts
        .iter()
        .find(|p| ROOT_TYPES.contains(&p.type_guid.as_str()))
    {
        return Ok(p);
    }
    let data: Vec<_> = parts.iter().filter(|p| p.type_guid == LINUX_DATA).collect();
    match data.as_slice() {
        [p] => Ok(p),
        _ => Err(format!(
            "GPT with {} partition(s) but no root partition (types: {})",
            parts.len(),
            parts
                .iter()
                .map(|p| p.type_guid.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
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
    let mut f = std::fs::File::open(image).map_err(|e| err(format!("open: {e}")))?;
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(err("is a directory".into()));
    }
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_ok() && &magic == b"QFI\xfb" {
        return Err(err(
            "is a qcow2 image; only raw images are supported (convert it to raw first)".into(),
        ));
    }
    let gpt = read_gpt(&mut f).map_err(|e| err(format!("reading the partition table: {e}")))?;
    let mut losetup = Command::new("losetup");
    losetup.args(["--find", "--show", "--read-only"]);
    if let Some(parts) = &gpt {
        let root = pick_root(parts).map_err(err)?;
        losetup
            .arg("--offset")
            .arg(root.offset.to_string())
            .arg("--sizelimit")
            .arg(root.len.to_string());
    }
    let loopdev = run(image, losetup.arg(image))?;
    let _loop = Loop(loopdev.clone());
    let dev = PathBuf::from(&loopdev);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn part(t: &str) -> Partition {
        Partition {
            type_guid: t.into(),
            offset: 1 << 20,
            len: 1 << 20,
        }
    }

    #[test]
    fn root_partition_choice() {
        let esp = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let p = [part(esp), part(ROOT_TYPES[0])];
        assert_eq!(pick_root(&p).unwrap().type_guid, ROOT_TYPES[0]);
        let p = [part(esp), part(LINUX_DATA)];
        assert_eq!(pick_root(&p).unwrap().type_guid, LINUX_DATA);
        let p = [part(LINUX_DATA), part(LINUX_DATA)];
        assert!(pick_root(&p).is_err());
        let e = pick_root(&[part(esp)]).unwrap_err();
        assert!(e.contains(esp), "{e}");
    }

    #[test]
    fn no_gpt_in_a_bare_filesystem() {
        let mut c = io::Cursor::new(vec![0u8; 8192]);
        assert_eq!(read_gpt(&mut c).unwrap(), None);
        assert_eq!(
            guid_string(&[
                0xe3, 0xbc, 0x68, 0x4f, 0xcd, 0xe8, 0xb1, 0x4d, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84,
                0xb7, 0x09
            ]),
            ROOT_TYPES[0]
        );
    }
}
