//! Image round trips: a small tree with every kind of entry is exported to each format and
//! imported back (from a path, a `file://` URL and an `http://` URL), cloned, and imported
//! from a raw ext4 image; refusals leave nothing behind.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nspawn::image::{self, ImageError, ImportFormat};

/// `security.capability` v2 granting cap_net_raw (bit 13) permitted + effective.
const CAP_NET_RAW: [u8; 20] = [
    0x01, 0, 0, 0x02, 0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("image-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn mtime(p: &Path, secs: i64) {
    let t = filetime::FileTime::from_unix_time(secs, 0);
    filetime::set_symlink_file_times(p, t, t).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Builds the sample tree at `root` (which must not exist).
fn sample_tree(root: &Path) {
    let d = |p: &str| {
        let p = root.join(p);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    d("");
    d("etc");
    d("usr/bin");
    d("dev");
    d("run");
    let home = d("home/user");
    chown(&home, 1000, 1000);
    chmod(&home, 0o750);
    let f = |p: &str, data: &[u8], mode: u32| {
        let p = root.join(p);
        std::fs::write(&p, data).unwrap();
        chmod(&p, mode);
        p
    };
    f("etc/hostname", b"image-test\n", 0o644);
    let owned = f("home/user/notes", b"mine\n", 0o600);
    chown(&owned, 1000, 1000);
    let hello = f("usr/bin/hello", &vec![7u8; 200_000], 0o755);
    xattr::set(&hello, "user.origin", b"sample").unwrap();
    let su = f("usr/bin/su", b"#!/bin/sh\n", 0o4755);
    chown(&su, 0, 0);
    chmod(&su, 0o4755);
    let ping = f("usr/bin/ping", b"ping", 0o755);
    xattr::set(&ping, "security.capability", &CAP_NET_RAW).unwrap();
    std::fs::hard_link(&hello, root.join("usr/bin/hello-again")).unwrap();
    std::os::unix::fs::symlink("hello", root.join("usr/bin/hi")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    let fifo = root.join("run/initctl");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let null = root.join("dev/null");
    nix::sys::stat::mknod(
        &null,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    chmod(&null, 0o666);
    // Fixed mtimes, children before parents.
    for e in walkdir::WalkDir::new(root).contents_first(true) {
        let e = e.unwrap();
        mtime(e.path(), 1_600_000_000 + e.depth() as i64);
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    data: Option<Vec<u8>>,
    link: Option<PathBuf>,
    rdev: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The first path (in walk order) sharing this inode.
    same_as: Option<PathBuf>,
}

/// Every entry below `root` (the root itself excluded), by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<u64, PathBuf> = HashMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e.unwrap();
        let md = e.path().symlink_metadata().unwrap();
        let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "chr"
        } else {
            "other"
        };
        let mut xattrs = BTreeMap::new();
        if !ft.is_symlink() {
            for n in xattr::list(e.path()).unwrap() {
                let n = n.to_string_lossy().into_owned();
                if n == "security.selinux" {
                    continue;
                }
                let v = xattr::get(e.path(), &n).unwrap().unwrap_or_default();
                xattrs.insert(n, v);
            }
        }
        let same_as = (ft.is_file() && md.nlink() > 1).then(|| {
            inodes
                .entry(md.ino())
                .or_insert_with(|| rel.clone())
                .clone()
        });
        out.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: md.mtime(),
                size: if ft.is_dir() { 0 } else { md.len() },
                data: ft.is_file().then(|| std::fs::read(e.path()).unwrap()),
                link: ft
                    .is_symlink()
                    .then(|| std::fs::read_link(e.path()).unwrap()),
                rdev: md.rdev(),
                xattrs,
                same_as,
            },
        );
    }
    out
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    assert_eq!(ka, kb, "entries of {} vs {}", a.display(), b.display());
    for (k, ea) in &sa {
        assert_eq!(
            ea,
            &sb[k],
            "entry {} of {} vs {}",
            k.display(),
            a.display(),
            b.display()
        );
    }
}

/// Names in `dir` starting with `.` (staging, temp and download leftovers).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn no_progress(_: u64) {}

#[test]
fn export_import_every_format() {
    if !is_root() {
        eprintln!("SKIP: needs root for owners, device nodes and security.capability");
        return;
    }
    let t = scratch();
    let src = t.path().join("src");
    sample_tree(&src);
    // The sample itself must have what we want to check.
    let snap = snapshot(&src);
    assert_eq!(
        snap[Path::new("usr/bin/ping")].xattrs["security.capability"],
        CAP_NET_RAW
    );
    assert_eq!(snap[Path::new("usr/bin/su")].mode, 0o4755);

    let www = t.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let server = nspawn::testkit::http::HttpServer::start(&www);

    for (suffix, want) in [
        ("tar", ImportFormat::Tar),
        ("tar.zst", ImportFormat::TarZst),
        ("tar.xz", ImportFormat::TarXz),
        ("tar.gz", ImportFormat::TarGz),
    ] {
        let ball = t.path().join(format!("rootfs.{suffix}"));
        let last = std::cell::Cell::new(0u64);
        let rep = image::export(&src, &ball, &|n| last.set(n)).unwrap();
        assert!(ball.is_file());
        assert_eq!(rep.bytes_out, std::fs::metadata(&ball).unwrap().len());
        assert_eq!(last.get(), rep.bytes_in);
        assert!(rep.bytes_in > 200_000, "{rep:?}");
        if suffix != "tar" {
            assert!(rep.ratio() > 2.0, "{suffix}: {rep:?}");
        }
        assert_eq!(
            image::detect_format(ball.to_str().unwrap(), None).unwrap(),
            want
        );
        // Exporting again onto the same path is refused.
        assert!(matches!(
            image::export(&src, &ball, &no_progress),
            Err(ImageError::DestExists { .. })
        ));

        // From a path.
        let dest = t.path().join(format!("from-path-{suffix}"));
        let r = image::import(ball.to_str().unwrap(), &dest, &no_progress).unwrap();
        assert_eq!(r.format, want);
        assert_eq!(r.bytes_read, rep.bytes_out);
        assert_same_tree(&src, &dest);

        // From a file:// URL.
        let dest = t.path().join(format!("from-file-url-{suffix}"));
        image::import(&format!("file://{}", ball.display()), &dest, &no_progress).unwrap();
        assert_same_tree(&src, &dest);

        // From http://, with a published checksum for the compressed formats.
        let served = www.join(format!("rootfs.{suffix}"));
        std::fs::copy(&ball, &served).unwrap();
        if suffix != "tar" {
            let sum = nspawn::fetch::sha256_file(&served).unwrap();
            std::fs::write(
                www.join(format!("rootfs.{suffix}.sha256")),
                format!("{sum}  rootfs.{suffix}\n"),
            )
            .unwrap();
        }
        let dest = t.path().join(format!("from-http-{suffix}"));
        let r = image::import(
            &server.url(&format!("/rootfs.{suffix}")),
            &dest,
            &no_progress,
        )
        .unwrap();
        assert_eq!(r.downloaded, Some(rep.bytes_out));
        assert_eq!(r.sha256_verified, suffix != "tar");
        assert_same_tree(&src, &dest);
    }
    assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
}

#[test]
fn http_checksum_mismatch_is_refused() {
    let t = scratch();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/x"), b"x").unwrap();
    let www = t.path().join("www");
    std::fs::create_dir(&www).unwrap();
    image::export(&src, &www.join("r.tar.gz"), &no_progress).unwrap();
    std::fs::write(
        www.join("SHA256SUMS"),
        format!("{}  r.tar.gz\n", "ab".repeat(32)),
    )
    .unwrap();
    let server = nspawn::testkit::http::HttpServer::start(&www);
    let url = server.url("/r.tar.gz");
    let dest = t.path().join("dest");
    let e = image::import(&url, &dest, &no_progress).unwrap_err();
    assert!(matches!(e, ImageError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains(&url), "{e}");
    assert!(!dest.exists());
    assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
}

#[test]
fn clone_tree_keeps_everything_and_hardlinks() {
    if !is_root() {
        eprintln!("SKIP: needs root for owners, device nodes and security.capability");
        return;
    }
    let t = scratch();
    let src = t.path().join("src");
    sample_tree(&src);
    let dest = t.path().join("clone");
    let r = image::clone_tree(&src, &dest).unwrap();
    assert_eq!(r.hardlinks, 1, "{r:?}");
    assert_eq!(r.symlinks, 2, "{r:?}");
    assert_eq!(r.special, 2, "{r:?}");
    assert_same_tree(&src, &dest);
    let a = std::fs::metadata(dest.join("usr/bin/hello")).unwrap();
    let b = std::fs::metadata(dest.join("usr/bin/hello-again")).unwrap();
    assert_eq!(a.ino(), b.ino());
    // The root's metadata is copied too.
    let (ms, md) = (src.metadata().unwrap(), dest.metadata().unwrap());
    assert_eq!((ms.mode(), ms.mtime()), (md.mode(), md.mtime()));

    // Export to a directory is a clone as well.
    let dir = t.path().join("exported");
    let rep = image::export(&src, &dir, &no_progress).unwrap();
    assert_eq!(rep.format, image::ExportFormat::Dir);
    assert_same_tree(&src, &dir);
    // Import of a directory too.
    let imp = t.path().join("imported");
    let r = image::import(src.to_str().unwrap(), &imp, &no_progress).unwrap();
    assert_eq!(r.format, ImportFormat::Dir);
    assert_same_tree(&src, &imp);
    assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
}

/// A tar whose second entry is `name`, written raw so no library check interferes.
fn tar_with_entry(path: &Path, name: &[u8]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(3);
    h.set_path("etc/ok").unwrap();
    h.set_cksum();
    b.append(&h, &b"ok\n"[..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(5);
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, &b"evil\n"[..]).unwrap();
    b.finish().unwrap();
}

#[test]
fn escaping_entries_are_refused_and_leave_nothing() {
    let t = scratch();
    let work = t.path().join("work");
    std::fs::create_dir(&work).unwrap();
    for (i, name) in [&b"../evil"[..], b"etc/../../evil", b"/evil"]
        .iter()
        .enumerate()
    {
        let ball = t.path().join(format!("bad{i}.tar"));
        tar_with_entry(&ball, name);
        let dest = work.join("dest");
        let e = image::import(ball.to_str().unwrap(), &dest, &no_progress).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(std::str::from_utf8(name).unwrap())
                && msg.contains(ball.to_str().unwrap()),
            "{msg}"
        );
        assert!(!dest.exists(), "half tree left at {}", dest.display());
        assert!(!t.path().join("evil").exists() && !work.join("evil").exists());
        assert!(!Path::new("/evil").exists());
        assert!(leftovers(&work).is_empty(), "{:?}", leftovers(&work));
    }
}

#[test]
fn existing_dest_is_refused() {
    let t = scratch();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    let ball = t.path().join("r.tar");
    image::export(&src, &ball, &no_progress).unwrap();
    let dest = t.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep"), b"keep").unwrap();
    let e = image::import(ball.to_str().unwrap(), &dest, &no_progress).unwrap_err();
    assert!(matches!(e, ImageError::DestExists { .. }), "{e}");
    assert!(e.to_string().contains(dest.to_str().unwrap()), "{e}");
    assert_eq!(std::fs::read(dest.join("keep")).unwrap(), b"keep");
    let e = image::clone_tree(&src, &dest).unwrap_err();
    assert!(matches!(e, ImageError::DestExists { .. }), "{e}");
}

#[test]
fn truncated_zst_is_an_error_naming_the_file() {
    let t = scratch();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("usr")).unwrap();
    // Incompressible content so that half the file is half the tree.
    let mut data = vec![0u8; 1 << 20];
    let mut x: u32 = 12345;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(src.join("usr/blob"), &data).unwrap();
    std::fs::write(src.join("usr/tail"), b"tail").unwrap();
    let ball = t.path().join("r.tar.zst");
    image::export(&src, &ball, &no_progress).unwrap();
    let len = std::fs::metadata(&ball).unwrap().len();
    for cut in [len / 2, len - 3] {
        let cut_ball = t.path().join(format!("cut{cut}.tar.zst"));
        let bytes = std::fs::read(&ball).unwrap();
        std::fs::write(&cut_ball, &bytes[..cut as usize]).unwrap();
        let dest = t.path().join("dest");
        let e = image::import(cut_ball.to_str().unwrap(), &dest, &no_progress).unwrap_err();
        assert!(e.to_string().contains(cut_ball.to_str().unwrap()), "{e}");
        assert!(!dest.exists());
        assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
    }
}

#[test]
fn single_rootfs_directory_is_unwrapped() {
    let t = scratch();
    let ball = t.path().join("wrapped.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&ball).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for d in ["rootfs/", "rootfs/etc/", "rootfs/usr/", "rootfs/usr/bin/"] {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(0);
            b.append_data(&mut h, d, std::io::empty()).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(2);
        b.append_data(&mut h, "rootfs/etc/hostname", &b"x\n"[..])
            .unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    let dest = t.path().join("dest");
    let r = image::import(ball.to_str().unwrap(), &dest, &no_progress).unwrap();
    assert_eq!(r.unwrapped.as_deref(), Some("rootfs"));
    assert_eq!(std::fs::read(dest.join("etc/hostname")).unwrap(), b"x\n");
    assert!(dest.join("usr/bin").is_dir() && !dest.join("rootfs").exists());
}

#[test]
fn raw_ext4_image_is_imported() {
    if !is_root() {
        eprintln!("SKIP: raw import needs root (loop devices, mount)");
        return;
    }
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(mkfs) = mkfs else {
        eprintln!("SKIP: mkfs.ext4 (e2fsprogs) is not installed");
        return;
    };
    let t = scratch();
    let src = t.path().join("src");
    sample_tree(&src);
    let img = t.path().join("disk.img");
    let out = std::process::Command::new(mkfs)
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("16M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dest = t.path().join("dest");
    match image::import(img.to_str().unwrap(), &dest, &no_progress) {
        Ok(r) => assert_eq!(r.format, ImportFormat::Raw),
        Err(e @ ImageError::Raw { .. }) => {
            eprintln!("SKIP: raw import cannot work on this host: {e}");
            assert!(!dest.exists());
            return;
        }
        Err(e) => panic!("{e}"),
    }
    // mkfs.ext4 -d adds lost+found.
    std::fs::remove_dir(dest.join("lost+found")).unwrap();
    assert_same_tree(&src, &dest);
    assert!(leftovers(t.path()).is_empty(), "{:?}", leftovers(t.path()));
}
