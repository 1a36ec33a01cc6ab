//! second_stage (needs root).
//!
//! * `synthetic_*`: a scratch root whose /usr is the host's (read-only) and whose
//!   dpkg database lists three made-up unpacked packages with preinsts that record
//!   their order and environment; the host's dpkg then configures them.
//! * `real_tree`: runs on a tree a native unpack produced when `NSPAWN_STAGE2_TREE`
//!   names one (a scratch copy is the caller's business: the tree is modified);
//!   `NSPAWN_STAGE2_USERNS=BASE` shifts it first and runs in a user namespace.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nspawn::sandbox::{
    run, second_stage, shift_tree, ExitStatusInfo, IdMap, SandboxError, SandboxSpec,
};

const HELPER: &str = env!("CARGO_BIN_EXE_packer-plugin-nspawn");

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: second-stage tests need root");
        return false;
    }
    if !Path::new("/usr/bin/dpkg").exists() {
        eprintln!("SKIP: the host has no dpkg to borrow");
        return false;
    }
    true
}

fn synthetic_root(failing: bool) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("stage2-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let r = d.path();
    for dir in [
        "usr/sbin",
        "etc",
        "tmp",
        "var/log",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    for l in ["bin", "sbin", "lib", "lib64"] {
        std::os::unix::fs::symlink(format!("usr/{l}"), r.join(l)).unwrap();
    }
    let mut status = String::new();
    for (pkg, ma) in [("aaa-first", ""), ("base-passwd", ""), ("libzzz", "same")] {
        status.push_str(&format!(
            "Package: {pkg}\nStatus: install ok unpacked\nPriority: required\nMaintainer: t <t@t>\nArchitecture: amd64\n{}Version: 1.0\nDescription: test\n\n",
            if ma.is_empty() { String::new() } else { format!("Multi-Arch: {ma}\n") }
        ));
        let key = if ma == "same" {
            format!("{pkg}:amd64")
        } else {
            pkg.to_string()
        };
        std::fs::write(r.join(format!("var/lib/dpkg/info/{key}.list")), "").unwrap();
        let body = if failing && pkg == "libzzz" {
            "#!/bin/sh\necho about to fail\necho 'it broke' >&2\nexit 1\n".to_string()
        } else {
            "#!/bin/sh\necho \"$DPKG_MAINTSCRIPT_PACKAGE $DPKG_MAINTSCRIPT_NAME $1 $DPKG_MAINTSCRIPT_ARCH root=[$DPKG_ROOT] $DPKG_ADMINDIR $DEBIAN_FRONTEND pid=$$\" >> /tmp/preinsts\n".to_string()
        };
        let p = r.join(format!("var/lib/dpkg/info/{key}.preinst"));
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(r.join("var/lib/dpkg/status"), status).unwrap();
    std::fs::write(r.join("var/lib/dpkg/available"), "").unwrap();
    d
}

fn base_spec() -> SandboxSpec {
    let mut s = SandboxSpec::new("/nonexistent");
    s.bind_ro = vec![(PathBuf::from("/usr"), PathBuf::from("/usr"))];
    s.helper = Some(HELPER.into());
    s
}

#[test]
fn synthetic_preinsts_then_configure() {
    if !can_run() {
        return;
    }
    let d = synthetic_root(false);
    let r = d.path();
    let mut log = Vec::new();
    second_stage(r, &base_spec(), &mut log).unwrap();
    let log = String::from_utf8_lossy(&log);
    eprintln!("{log}");
    let pre = std::fs::read_to_string(r.join("tmp/preinsts")).unwrap();
    let lines: Vec<&str> = pre.lines().collect();
    assert_eq!(lines.len(), 3, "{pre}");
    assert!(
        lines[0]
            .starts_with("base-passwd preinst install amd64 root=[] /var/lib/dpkg noninteractive"),
        "{pre}"
    );
    assert!(lines[1].starts_with("aaa-first preinst install"), "{pre}");
    assert!(lines[2].starts_with("libzzz preinst install"), "{pre}");
    let status = std::fs::read_to_string(r.join("var/lib/dpkg/status")).unwrap();
    assert_eq!(
        status.matches("Status: install ok installed").count(),
        3,
        "{status}"
    );
    assert!(
        !r.join("usr/sbin/policy-rc.d").exists(),
        "policy-rc.d removed"
    );
    assert!(
        log.contains("I: running preinst install of base-passwd"),
        "{log}"
    );
}

#[test]
fn synthetic_failing_preinst_names_package_and_tail() {
    if !can_run() {
        return;
    }
    let d = synthetic_root(true);
    let mut log = Vec::new();
    let e = second_stage(d.path(), &base_spec(), &mut log).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, SandboxError::StageCommand { .. }), "{msg}");
    assert!(
        msg.starts_with("second stage: preinst of libzzz exited with status 1: "),
        "{msg}"
    );
    assert!(msg.contains("about to fail\nit broke"), "{msg}");
    assert!(
        !d.path().join("usr/sbin/policy-rc.d").exists(),
        "policy-rc.d removed on failure too"
    );
}

fn dpkg_query(spec: &SandboxSpec) -> String {
    let out = tempfile::tempfile().unwrap();
    let st = run(
        spec,
        &[
            "dpkg-query".into(),
            "-W".into(),
            "-f=${db:Status-Abbrev}${Package}\\n".into(),
        ],
        Stdio::null(),
        Stdio::from(out.try_clone().unwrap()),
        Stdio::inherit(),
    )
    .unwrap();
    assert_eq!(st, ExitStatusInfo::Exited(0));
    use std::io::{Read, Seek};
    let mut out = out;
    out.rewind().unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).unwrap();
    s
}

#[test]
fn real_tree() {
    let Some(tree) = std::env::var_os("NSPAWN_STAGE2_TREE") else {
        eprintln!("SKIP: set NSPAWN_STAGE2_TREE to a natively unpacked tree (it is modified)");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let root = PathBuf::from(tree);
    let mut spec = SandboxSpec::new(&root);
    spec.helper = Some(HELPER.into());
    spec.hostname = Some("stage2".into());
    if let Some(base) = std::env::var("NSPAWN_STAGE2_USERNS")
        .ok()
        .and_then(|b| b.parse::<u32>().ok())
    {
        let map = IdMap::new(base);
        let t = std::time::Instant::now();
        let rep = shift_tree(&root, &map).unwrap();
        eprintln!("shift: {rep:?} in {:?}", t.elapsed());
        spec.userns = Some(map);
    }
    let t = std::time::Instant::now();
    let mut log = Vec::new();
    let res = second_stage(&root, &spec, &mut log);
    eprintln!(
        "second stage took {:?}; log {} bytes",
        t.elapsed(),
        log.len()
    );
    std::fs::write("/var/tmp/stage2-test.log", &log).unwrap();
    res.unwrap();
    let q = dpkg_query(&spec);
    let total = q.lines().count();
    let ii = q.lines().filter(|l| l.starts_with("ii ")).count();
    eprintln!("{ii}/{total} ii");
    assert!(total > 0 && ii == total, "{q}");
    assert!(!root.join("usr/sbin/policy-rc.d").exists());
    if let Some(map) = spec.userns {
        let shadow = std::fs::metadata(root.join("etc/shadow")).unwrap();
        assert!(map.contains_host(shadow.uid()) && map.contains_host(shadow.gid()));
    }
}
