//! shift_tree on a real tree (needs root): hardlinks shifted once, setuid/setgid kept,
//! security.capability rewritten to v3 rooted at the base, restartable.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nspawn::sandbox::{shift_tree, IdMap, SandboxError};

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: shift tests need root (lchown, security.* xattrs)");
        return false;
    }
    true
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shift-test-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn ids(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

/// v2 capability value: cap_net_raw permitted + effective.
fn cap_v2_net_raw() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

#[test]
fn shift_hardlinks_setuid_caps() {
    if !can_run() {
        return;
    }
    let d = scratch();
    let r = d.path();
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::create_dir_all(r.join("var/mail")).unwrap();
    std::fs::write(r.join("usr/bin/perl"), "x").unwrap();
    std::fs::hard_link(r.join("usr/bin/perl"), r.join("usr/bin/perl5.36")).unwrap();
    std::fs::write(r.join("usr/bin/su"), "x").unwrap();
    std::fs::set_permissions(
        r.join("usr/bin/su"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::write(r.join("usr/bin/wall"), "x").unwrap();
    std::os::unix::fs::lchown(r.join("usr/bin/wall"), Some(0), Some(5)).unwrap();
    std::fs::set_permissions(
        r.join("usr/bin/wall"),
        std::fs::Permissions::from_mode(0o2755),
    )
    .unwrap();
    std::fs::write(r.join("usr/bin/ping"), "x").unwrap();
    let caps_supported = xattr::set(
        r.join("usr/bin/ping"),
        "security.capability",
        &cap_v2_net_raw(),
    )
    .is_ok();
    std::os::unix::fs::lchown(r.join("var/mail"), Some(0), Some(8)).unwrap();
    std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
    std::os::unix::fs::lchown(r.join("bin"), Some(3), Some(3)).unwrap();

    let base = 0x30_0000u32;
    let map = IdMap::new(base);
    let rep = shift_tree(r, &map).unwrap();
    eprintln!("{rep:?}");
    assert_eq!(rep.hardlinks_skipped, 1);
    assert_eq!(rep.already_shifted, 0);
    assert_eq!(rep.setid_restored, 2);
    assert_eq!(ids(r), (base, base));
    assert_eq!(
        ids(&r.join("usr/bin/perl")),
        (base, base),
        "hardlink shifted once"
    );
    assert_eq!(ids(&r.join("var/mail")), (base, base + 8));
    assert_eq!(
        ids(&r.join("bin")),
        (base + 3, base + 3),
        "symlink itself, not its target"
    );
    assert_eq!(ids(&r.join("usr/bin")), (base, base));
    let mode = |p: &str| std::fs::metadata(r.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("usr/bin/su"), 0o4755);
    assert_eq!(mode("usr/bin/wall"), 0o2755);
    assert_eq!(ids(&r.join("usr/bin/wall")), (base, base + 5));
    if caps_supported {
        assert_eq!(rep.caps_rewritten, 1);
        let v = xattr::get(r.join("usr/bin/ping"), "security.capability")
            .unwrap()
            .expect("capability kept");
        assert_eq!(v.len(), 24, "v3: {v:?}");
        assert_eq!(u32::from_le_bytes(v[0..4].try_into().unwrap()), 0x0300_0001);
        assert_eq!(u32::from_le_bytes(v[4..8].try_into().unwrap()), 1 << 13);
        assert_eq!(u32::from_le_bytes(v[20..24].try_into().unwrap()), base);
    } else {
        eprintln!("SKIP (part): file system refuses security.capability");
    }

    // Running it again changes nothing (restartable after an interruption).
    let again = shift_tree(r, &map).unwrap();
    assert_eq!(again.shifted, 0);
    assert_eq!(again.already_shifted, rep.shifted);
    assert_eq!(ids(&r.join("var/mail")), (base, base + 8));
}

#[test]
fn shift_refuses_unmappable_ids_and_bad_ranges() {
    if !can_run() {
        return;
    }
    let d = scratch();
    std::fs::write(d.path().join("f"), "x").unwrap();
    std::os::unix::fs::lchown(d.path().join("f"), Some(70_000), None).unwrap();
    let e = shift_tree(d.path(), &IdMap::new(0x40_0000)).unwrap_err();
    assert!(
        matches!(e, SandboxError::UnmappableId { id: 70_000, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("/f"), "{e}");
    let e = shift_tree(d.path(), &IdMap::new(1000)).unwrap_err();
    assert!(matches!(e, SandboxError::IdRange { .. }), "{e}");
}
