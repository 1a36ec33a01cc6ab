//! Against the host's real mirror (read from its APT sources at run time): a full
//! bookworm minbase bootstrap to the end of unpack. Skips with a reason when
//! there is no http mirror or it cannot be reached.

use std::path::Path;
use std::process::Command;

#[test]
fn bookworm_minbase_unpacks_completely() {
    let Some(host) = nspawn::archive::sources::host_defaults() else {
        eprintln!("SKIP: no APT sources on this host");
        return;
    };
    if !host.mirror.starts_with("http") {
        eprintln!("SKIP: host mirror {} is not http(s)", host.mirror);
        return;
    }
    // A cache that outlives the test keeps repeated runs fast and offline-capable.
    let cache = Path::new("/var/tmp/packer-plugin-nspawn-test-cache");
    let scratch = tempfile::Builder::new()
        .prefix("real-minbase-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let target = scratch.path().join("bookworm");
    let out = Command::new(env!("CARGO_BIN_EXE_packer-plugin-nspawn"))
        .args([
            "bootstrap",
            "--quiet",
            "--suite",
            "bookworm",
            "--variant",
            "minbase",
        ])
        .arg("--mirror")
        .arg(&host.mirror)
        .arg("--cache-dir")
        .arg(cache)
        .arg(&target)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && (err.contains("resolve host") || err.contains("connect")) {
        eprintln!("SKIP: mirror {} unreachable: {err}", host.mirror);
        return;
    }
    assert!(out.status.success(), "bootstrap failed: {err}");
    eprintln!("{err}");

    for d in ["bin", "sbin", "lib", "lib64"] {
        assert_eq!(
            std::fs::read_link(target.join(d)).unwrap(),
            Path::new("usr").join(d),
            "/{d} is merged into /usr"
        );
    }
    for f in [
        "usr/bin/bash",
        "usr/bin/dpkg",
        "usr/bin/apt",
        "etc/debian_version",
    ] {
        assert!(target.join(f).exists(), "{f} present");
    }
    let status = std::fs::read_to_string(target.join("var/lib/dpkg/status")).unwrap();
    let n = status.matches("\nStatus: install ok unpacked\n").count();
    assert_eq!(n, 88, "every bookworm minbase package recorded as unpacked");
    assert!(target.join("var/lib/dpkg/info/libc6:amd64.list").exists());
    assert!(target
        .join("var/lib/dpkg/info/base-passwd.preinst")
        .exists());
    // dpkg itself reads the database we wrote.
    if Path::new("/usr/bin/dpkg-query").exists() {
        let q = Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                target.join("var/lib/dpkg").display()
            ))
            .args(["-W", "-f", "${db:Status-Abbrev} ${Package}\n"])
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
        let text = String::from_utf8_lossy(&q.stdout);
        assert_eq!(text.lines().count(), 88);
        assert!(text.lines().all(|l| l.starts_with("iU ")), "{text}");
    }
}
