use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;
use crate::testkit::deb::{Compression, DebBuilder};

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("unpack-test")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

/// Writes `b` as `<dir>/<pkg>_<ver>_<arch>.deb` and returns the input.
fn write_deb(dir: &Path, name: &str, b: &DebBuilder) -> DebInput {
    let path = dir.join(format!("{name}_1.0_amd64.deb"));
    fs::write(&path, b.build()).unwrap();
    DebInput {
        package: name.to_string(),
        path,
    }
}

fn opts(m: MergedUsr) -> UnpackOptions {
    UnpackOptions {
        merged_usr: m,
        jobs: 2,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A path longer than the 100 bytes of a tar header name (GNU LongName).
fn long_name() -> String {
    format!("usr/share/long/{}", "x".repeat(120))
}

#[test]
fn round_trip_every_compression() {
    for dc in Compression::ALL {
        for cc in Compression::ALL {
            let t = scratch();
            let root = t.path().join("root");
            fs::create_dir(&root).unwrap();
            let b = DebBuilder::new("hello", "1.0", "amd64")
                .control_field("Depends", "libc6")
                .file("usr/bin/hello", 0o755, b"#!/bin/sh\necho hello\n")
                .file("usr/share/doc/hello/copyright", 0o644, &vec![b'x'; 300_000])
                .symlink("usr/bin/hi", "hello")
                .file(&long_name(), 0o644, b"long")
                .maintainer_script("postinst", "#!/bin/sh\nexit 0\n")
                .data_compression(dc)
                .control_compression(cc);
            let input = write_deb(t.path(), "hello", &b);
            let p = unpack_one(&root, &input, &opts(MergedUsr::No))
                .unwrap_or_else(|e| panic!("{dc:?}/{cc:?}: {e}"));
            assert_eq!(p.package, "hello");
            assert_eq!(p.architecture, "amd64");
            assert!(!p.multi_arch_same);
            assert_eq!(p.control.control, b.control_stanza());
            assert_eq!(p.control.member("postinst").unwrap().mode, 0o755);
            assert!(p.control.member("md5sums").is_some());
            assert_eq!(
                p.paths,
                vec![
                    "/.",
                    "/usr",
                    "/usr/bin",
                    "/usr/bin/hello",
                    "/usr/share",
                    "/usr/share/doc",
                    "/usr/share/doc/hello",
                    "/usr/share/doc/hello/copyright",
                    "/usr/bin/hi",
                    "/usr/share/long",
                    &format!("/{}", long_name()),
                ]
            );
            assert_eq!(p.data_bytes, 21 + 300_000 + 4);
            assert_eq!(fs::read(root.join(long_name())).unwrap(), b"long");
            assert_eq!(
                fs::read(root.join("usr/bin/hello")).unwrap(),
                b"#!/bin/sh\necho hello\n"
            );
            assert_eq!(
                fs::read_link(root.join("usr/bin/hi")).unwrap(),
                PathBuf::from("hello")
            );
            let m = fs::metadata(root.join("usr/bin/hello")).unwrap();
            assert_eq!(m.mtime() as u64, crate::testkit::deb::MTIME);
            // Directory mtimes are set after their children were written.
            let m = fs::metadata(root.join("usr/share/doc/hello")).unwrap();
            assert_eq!(m.mtime() as u64, crate::testkit::deb::MTIME);
            assert_eq!(read_control(&input.path).unwrap(), p.control);
        }
    }
}

#[test]
fn modes_owners_links_nodes_xattrs() {
    if !is_root() {
        eprintln!("SKIP: needs root for chown/mknod/security.capability");
        return;
    }
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let cap: Vec<u8> = {
        let mut v = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00];
        v.extend([0u8; 12]);
        v
    };
    assert_eq!(cap.len(), 20);
    let b = DebBuilder::new("tools", "2", "amd64")
        .file("usr/bin/su", 0o4755, b"su")
        .file_owned("usr/bin/chage", 0o2755, 0, 42, b"chage")
        .dir("var/local", 0o2775)
        .file("bin/gunzip", 0o755, b"gz")
        .hardlink("bin/uncompress", "bin/gunzip")
        .hardlink("usr/bin/su2", "usr/bin/su")
        .fifo("run/initctl", 0o600)
        .char_device("dev/null", 0o666, 1, 3)
        .file("usr/bin/ping", 0o755, b"ping")
        .xattr("usr/bin/ping", "security.capability", &cap)
        .xattr("usr/bin/ping", "user.test", b"hello")
        .conffile("etc/tools.conf", b"a=1\n")
        .symlink("lib64/ld.so", "/usr/lib/x86_64-linux-gnu/ld.so");
    let input = write_deb(t.path(), "tools", &b);
    let pkgs = unpack_all(&root, &[input], &opts(MergedUsr::Yes), &|_| {}).unwrap();
    let p = &pkgs[0];

    let m = fs::metadata(root.join("usr/bin/su")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    assert_eq!((m.uid(), m.gid()), (0, 0));
    let m = fs::metadata(root.join("usr/bin/chage")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o2755);
    assert_eq!(m.gid(), 42);
    let m = fs::metadata(root.join("var/local")).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o7777, 0o2775);
    // Hard links, including one through the merged-/usr bin/ path.
    let a = fs::metadata(root.join("usr/bin/gunzip")).unwrap();
    let b2 = fs::metadata(root.join("usr/bin/uncompress")).unwrap();
    assert_eq!(a.ino(), b2.ino());
    assert_eq!(a.nlink(), 2);
    assert_eq!(
        fs::metadata(root.join("usr/bin/su2")).unwrap().ino(),
        fs::metadata(root.join("usr/bin/su")).unwrap().ino()
    );
    let f = fs::symlink_metadata(root.join("run/initctl")).unwrap();
    assert!(f.file_type().is_fifo());
    assert_eq!(f.mode() & 0o7777, 0o600);
    let d = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(d.file_type().is_char_device());
    assert_eq!(d.rdev(), nix::sys::stat::makedev(1, 3));
    assert_eq!(d.mode() & 0o7777, 0o666);
    assert_eq!(
        xattr::get(root.join("usr/bin/ping"), "security.capability").unwrap(),
        Some(cap)
    );
    assert_eq!(
        xattr::get(root.join("usr/bin/ping"), "user.test").unwrap(),
        Some(b"hello".to_vec())
    );
    // Conffile as .dpkg-new.
    assert!(!root.join("etc/tools.conf").exists());
    assert_eq!(
        fs::read(root.join("etc/tools.conf.dpkg-new")).unwrap(),
        b"a=1\n"
    );
    assert_eq!(p.conffiles, vec!["/etc/tools.conf".to_string()]);
    // merged-/usr: the original paths are recorded, the top-level dirs became links.
    assert!(p.paths.contains(&"/bin/uncompress".to_string()));
    assert!(p.paths.contains(&"/lib64/ld.so".to_string()));
    assert!(!p.paths.iter().any(|x| x.starts_with("/usr/bin/gunzip")));
    for d in ["bin", "lib64"] {
        assert_eq!(
            fs::read_link(root.join(d)).unwrap(),
            PathBuf::from(format!("usr/{d}"))
        );
    }
    assert!(!root.join("sbin").exists());
    assert_eq!(
        fs::read_link(root.join("usr/lib64/ld.so")).unwrap(),
        PathBuf::from("/usr/lib/x86_64-linux-gnu/ld.so")
    );
}

#[test]
fn merged_usr_accepts_shipped_top_level_links() {
    // trixie's base-files ships ./bin -> usr/bin itself.
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let base = DebBuilder::new("base-files", "13", "amd64")
        .symlink("bin", "usr/bin")
        .symlink("lib", "usr/lib")
        .dir("usr/bin", 0o755);
    let core = DebBuilder::new("coreutils", "9", "amd64")
        .file("bin/ls", 0o755, b"ls")
        .file("lib/x.so", 0o644, b"x");
    let inputs = [
        write_deb(t.path(), "base-files", &base),
        write_deb(t.path(), "coreutils", &core),
    ];
    let pkgs = unpack_all(&root, &inputs, &opts(MergedUsr::Yes), &|_| {}).unwrap();
    assert_eq!(pkgs[0].package, "base-files");
    assert_eq!(pkgs[1].package, "coreutils");
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        fs::read_link(root.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    assert_eq!(fs::read(root.join("bin/ls")).unwrap(), b"ls");
    assert_eq!(fs::read(root.join("usr/lib/x.so")).unwrap(), b"x");

    // A top-level link elsewhere is refused.
    let bad = DebBuilder::new("evil", "1", "amd64").symlink("sbin", "/tmp");
    let input = write_deb(t.path(), "evil", &bad);
    let e = unpack_one(&root, &input, &opts(MergedUsr::Yes)).unwrap_err();
    assert!(e.to_string().contains("package evil"), "{e}");
}

#[test]
fn finish_merged_usr_moves_real_directories() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("sbin")).unwrap();
    fs::create_dir_all(root.join("usr/sbin")).unwrap();
    fs::create_dir_all(root.join("usr/lib")).unwrap();
    fs::write(root.join("sbin/init"), b"i").unwrap();
    finish_merged_usr(&root).unwrap();
    assert_eq!(
        fs::read_link(root.join("sbin")).unwrap(),
        Path::new("usr/sbin")
    );
    assert_eq!(
        fs::read_link(root.join("lib")).unwrap(),
        Path::new("usr/lib")
    );
    assert_eq!(fs::read(root.join("usr/sbin/init")).unwrap(), b"i");
    assert!(!root.join("bin").exists() && fs::symlink_metadata(root.join("bin")).is_err());
    // Idempotent.
    finish_merged_usr(&root).unwrap();
}

#[test]
fn existing_directory_symlink_is_kept() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("usr/share/real")).unwrap();
    std::os::unix::fs::symlink("real", root.join("usr/share/alias")).unwrap();
    std::os::unix::fs::symlink("/usr/share/real", root.join("usr/share/abs")).unwrap();
    let b = DebBuilder::new("docs", "1", "all")
        .dir("usr/share/alias", 0o755)
        .file("usr/share/alias/a", 0o644, b"a")
        .file("usr/share/abs/b", 0o644, b"b");
    let input = write_deb(t.path(), "docs", &b);
    unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap();
    assert!(fs::symlink_metadata(root.join("usr/share/alias"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(root.join("usr/share/real/a")).unwrap(), b"a");
    assert_eq!(fs::read(root.join("usr/share/real/b")).unwrap(), b"b");

    // Pre-created merged-/usr links (MergedUsr::No): ./bin/ is kept as the link, and a symlink
    // entry over an existing real directory leaves the directory alone.
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    fs::create_dir_all(root.join("opt/keep")).unwrap();
    let b = DebBuilder::new("legacy", "1", "amd64")
        .dir("bin", 0o755)
        .file("bin/sh", 0o755, b"sh")
        .symlink("opt/keep", "elsewhere");
    let input = write_deb(t.path(), "legacy", &b);
    let p = unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap();
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(fs::read(root.join("usr/bin/sh")).unwrap(), b"sh");
    assert!(fs::symlink_metadata(root.join("opt/keep"))
        .unwrap()
        .is_dir());
    assert!(p.paths.contains(&"/bin/sh".to_string()));
}

#[test]
fn replaces_files_but_not_directories() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/old"), b"old").unwrap();
    std::os::unix::fs::symlink("/nonexistent", root.join("etc/link")).unwrap();
    let b = DebBuilder::new("over", "1", "all")
        .file("etc/old", 0o600, b"new")
        .file("etc/link", 0o644, b"not through the link");
    let input = write_deb(t.path(), "over", &b);
    unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap();
    assert_eq!(fs::read(root.join("etc/old")).unwrap(), b"new");
    assert_eq!(
        fs::metadata(root.join("etc/old"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(fs::symlink_metadata(root.join("etc/link"))
        .unwrap()
        .is_file());
}

/// Asserts that unpacking `b` fails naming the package and `entry`, and that nothing but
/// the target and the .deb exists in the scratch directory.
fn assert_refused(b: DebBuilder, entry: &str, prepare: impl Fn(&Path)) {
    let t = scratch();
    let root = t.path().join("a/b/root");
    fs::create_dir_all(&root).unwrap();
    prepare(&root);
    let input = write_deb(t.path(), "evil", &b);
    let e = unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("package evil"), "{msg}");
    assert!(msg.contains(entry), "{msg} should name {entry}");
    assert!(msg.contains(&input.path.display().to_string()), "{msg}");
    let mut outside: Vec<String> = walkdir::WalkDir::new(t.path())
        .into_iter()
        .map(|e| e.unwrap().path().to_path_buf())
        .filter(|p| !p.starts_with(&root) && p.extension().is_none_or(|x| x != "deb"))
        .map(|p| p.strip_prefix(t.path()).unwrap().display().to_string())
        .collect();
    outside.sort();
    assert_eq!(
        outside,
        vec!["", "a", "a/b"],
        "something was written outside"
    );
}

#[test]
fn refuses_parent_dir_entry() {
    let b = DebBuilder::new("evil", "1", "all").raw_entry("../escape", b"x");
    assert_refused(b, "../escape", |_| {});
    let b = DebBuilder::new("evil", "1", "all").raw_entry("./usr/../../escape", b"x");
    assert_refused(b, "./usr/../../escape", |_| {});
}

#[test]
fn refuses_absolute_entry() {
    let b = DebBuilder::new("evil", "1", "all").raw_entry("/abs/path", b"x");
    assert_refused(b, "/abs/path", |_| {});
}

#[test]
fn refuses_hardlink_outside() {
    let b = DebBuilder::new("evil", "1", "all").hardlink("usr/x", "../x");
    // The builder normalises "../x" to "./../x".
    assert_refused(b, "./usr/x", |_| {});
}

#[test]
fn refuses_writing_through_an_escaping_symlink() {
    // Shipped by the package itself.
    let b = DebBuilder::new("evil", "1", "all")
        .symlink("usr/out", "../../..")
        .file("usr/out/pwned", 0o644, b"x");
    assert_refused(b, "./usr/out/pwned", |_| {});
    // Already present in the target.
    // (The builder lists the parent ./etc/out/ first; that entry is already refused.)
    let b = DebBuilder::new("evil", "1", "all").file("etc/out/pwned", 0o644, b"x");
    assert_refused(b, "./etc/out/", |root| {
        fs::create_dir(root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("etc/out")).unwrap();
    });
    // A hard link whose target goes through it.
    let b = DebBuilder::new("evil", "1", "all")
        .symlink("up", "..")
        .hardlink("stolen", "up/secret");
    assert_refused(b, "./stolen", |_| {});
}

#[test]
fn absolute_symlinks_resolve_inside_the_target() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    // "/" inside the target is the target; "/../.." climbs above it and is refused.
    let b = DebBuilder::new("abs", "1", "all")
        .symlink("etc/alt", "/var/lib")
        .file("etc/alt/f", 0o644, b"f");
    let input = write_deb(t.path(), "abs", &b);
    unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap();
    assert_eq!(fs::read(root.join("var/lib/f")).unwrap(), b"f");
    let b = DebBuilder::new("abs2", "1", "all")
        .symlink("etc/up", "/../..")
        .file("etc/up/f", 0o644, b"f");
    let input = write_deb(t.path(), "abs2", &b);
    let e = unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap_err();
    assert!(e.to_string().contains("escapes the target"), "{e}");
}

#[test]
fn corrupt_inputs_name_the_file() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let good = DebBuilder::new("c", "1", "all")
        .file("usr/share/c", 0o644, &vec![7u8; 100_000])
        .data_compression(Compression::None)
        .build();

    let check = |name: &str, bytes: &[u8], want: &str| {
        let path = t.path().join(format!("{name}_1_all.deb"));
        fs::write(&path, bytes).unwrap();
        let input = DebInput {
            package: name.into(),
            path: path.clone(),
        };
        let e = unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("package {name}")), "{msg}");
        assert!(msg.contains(want), "{msg} should contain {want}");
    };
    check("truncated", &good[..good.len() - 5000], "data.tar");
    let mut bad = good.clone();
    bad[..8].copy_from_slice(b"!<arcX>\n");
    check("badmagic", &bad, "bad ar magic");
    check("empty", b"", "ar magic");
    // Only debian-binary + control.tar.
    let mut nodata = b"!<arch>\n".to_vec();
    let hdr = std::str::from_utf8(&good[8..68]).unwrap();
    assert!(hdr.starts_with("debian-binary"));
    let mut off = 8;
    for _ in 0..2 {
        let size: usize = std::str::from_utf8(&good[off + 48..off + 58])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let end = off + 60 + size + size % 2;
        nodata.extend_from_slice(&good[off..end]);
        off = end;
    }
    check("nodata", &nodata, "missing data.tar member");
    let e = read_control(&t.path().join("badmagic_1_all.deb")).unwrap_err();
    assert!(e.to_string().contains("package badmagic"), "{e}");
}

#[test]
fn conffiles_flags_and_multi_arch() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let b = DebBuilder::new("libfoo1", "1", "amd64")
        .control_field("Multi-Arch", "same")
        .conffile("etc/foo.conf", b"x")
        .maintainer_script(
            "conffiles",
            "/etc/foo.conf\nremove-on-upgrade /etc/gone.conf\n",
        );
    let input = write_deb(t.path(), "libfoo1", &b);
    let p = unpack_one(&root, &input, &opts(MergedUsr::No)).unwrap();
    assert!(p.multi_arch_same);
    assert_eq!(p.conffiles, vec!["/etc/foo.conf"]);
    assert!(root.join("etc/foo.conf.dpkg-new").exists());
}

#[test]
fn unpack_all_reports_the_failing_package() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let mut inputs: Vec<DebInput> = (0..4)
        .map(|i| {
            let b = DebBuilder::new(&format!("ok{i}"), "1", "all").file("usr/share/x", 0o644, b"x");
            write_deb(t.path(), &format!("ok{i}"), &b)
        })
        .collect();
    let bad = DebBuilder::new("bad", "1", "all").raw_entry("/etc/shadow", b"x");
    inputs.insert(2, write_deb(t.path(), "bad", &bad));
    let e = unpack_all(&root, &inputs, &opts(MergedUsr::Yes), &|_| {}).unwrap_err();
    assert!(e.to_string().contains("package bad"), "{e}");
    assert!(
        e.to_string()
            .contains("entry /etc/shadow escapes the target"),
        "{e}"
    );
}

#[test]
fn unpack_all_many_packages_in_parallel() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let inputs: Vec<DebInput> = (0..12)
        .map(|i| {
            let mut b = DebBuilder::new(&format!("p{i}"), "1", "amd64");
            for j in 0..30 {
                b = b.file(&format!("usr/share/common/p{i}/f{j}"), 0o644, b"data");
                b = b.file(&format!("usr/lib/p{i}-{j}.so"), 0o644, b"lib");
            }
            b = b.file(&format!("bin/p{i}"), 0o755, b"bin");
            write_deb(t.path(), &format!("p{i}"), &b)
        })
        .collect();
    let seen = std::sync::Mutex::new(Vec::new());
    let pkgs = unpack_all(&root, &inputs, &opts(MergedUsr::Yes), &|p| {
        seen.lock().unwrap().push(p.package.clone())
    })
    .unwrap();
    let names: Vec<&str> = pkgs.iter().map(|p| p.package.as_str()).collect();
    let want: Vec<String> = (0..12).map(|i| format!("p{i}")).collect();
    assert_eq!(names, want);
    assert_eq!(seen.lock().unwrap().len(), 12);
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(fs::read(root.join("bin/p11")).unwrap(), b"bin");
    assert_eq!(fs::read_dir(root.join("usr/lib")).unwrap().count(), 12 * 30);
}

/// Unpacks every `.deb` in `$NSPAWN_TEST_DEBS` into `$NSPAWN_TEST_OUT` (or a scratch dir) and
/// prints the time taken. Run explicitly:
/// `NSPAWN_TEST_DEBS=/path/to/debs cargo test --lib unpack::tests::real_debs -- --ignored --nocapture`
#[test]
#[ignore]
fn real_debs() {
    let Ok(dir) = std::env::var("NSPAWN_TEST_DEBS") else {
        eprintln!("SKIP: NSPAWN_TEST_DEBS not set");
        return;
    };
    let mut inputs: Vec<DebInput> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .map(|path| DebInput {
            package: path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .split('_')
                .next()
                .unwrap()
                .to_string(),
            path,
        })
        .collect();
    inputs.sort_by(|a, b| a.package.cmp(&b.package));
    let t = scratch();
    let root = std::env::var("NSPAWN_TEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| t.path().join("root"));
    fs::create_dir_all(&root).unwrap();
    let jobs = std::env::var("NSPAWN_TEST_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(0);
    let start = std::time::Instant::now();
    let pkgs = unpack_all(
        &root,
        &inputs,
        &UnpackOptions {
            merged_usr: MergedUsr::Yes,
            jobs,
        },
        &|_| {},
    )
    .unwrap();
    let el = start.elapsed();
    let bytes: u64 = pkgs.iter().map(|p| p.data_bytes).sum();
    let entries: usize = pkgs.iter().map(|p| p.paths.len()).sum();
    eprintln!(
        "unpacked {} packages, {} entries, {:.1} MiB in {:.3} s",
        pkgs.len(),
        entries,
        bytes as f64 / 1048576.0,
        el.as_secs_f64()
    );
    let start = std::time::Instant::now();
    crate::dpkg::write_database(&root, "amd64", &pkgs, "", &|_| true).unwrap();
    eprintln!(
        "dpkg database written in {:.3} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn place_conffiles_copies_new_conffiles_to_absent_live_paths() {
    let t = scratch();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let b = DebBuilder::new("cfg", "1.0", "amd64")
        .file("etc/a.conf", 0o644, b"a=1\n")
        .file_owned("etc/secret", 0o640, 0, 42, b"s\n")
        .file("etc/kept", 0o644, b"shipped\n")
        .symlink("etc/link.conf", "a.conf")
        .maintainer_script(
            "conffiles",
            "/etc/a.conf\n/etc/secret\n/etc/kept\n/etc/link.conf\n",
        );
    let input = write_deb(t.path(), "cfg", &b);
    let p = unpack_one(&root, &input, &opts(MergedUsr::Yes)).unwrap();
    finish_merged_usr(&root).unwrap();
    fs::write(root.join("etc/kept"), b"mine\n").unwrap();

    place_conffiles(&root, &[&p]).unwrap();

    let etc = root.join("etc");
    assert_eq!(fs::read(etc.join("a.conf")).unwrap(), b"a=1\n");
    assert_eq!(fs::read(etc.join("a.conf.dpkg-new")).unwrap(), b"a=1\n");
    let md = fs::metadata(etc.join("secret")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    if is_root() {
        assert_eq!((md.uid(), md.gid()), (0, 42));
    }
    assert_eq!(
        fs::read(etc.join("kept")).unwrap(),
        b"mine\n",
        "existing file kept"
    );
    // A symlink conffile is never turned into a copy.
    assert!(!fs::symlink_metadata(etc.join("link.conf")).is_ok_and(|m| m.file_type().is_file()));
    // Idempotent.
    place_conffiles(&root, &[&p]).unwrap();
}
