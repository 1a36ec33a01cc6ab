//! Against the host's real mirror (read from its APT sources at run time): full
//! bookworm minbase bootstraps — plain, offline from the cache, and owned by a
//! shifted id range — checked with the tree's own dpkg. Skips with a reason when
//! there is no http mirror or it cannot be reached.

use nspawn::testkit::scratch::{bookworm_minbase, host_mirror, mirror_unreachable, Scratch};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The tests here run one at a time: they share the cache, and one checks that no
/// sandbox process of any run is left.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A cache that outlives the test keeps repeated runs fast and offline-capable.

const BIN: &str = env!("CARGO_BIN_EXE_packer-plugin-nspawn");

/// A real bootstrap (the base-tree cache off: these tests are about building trees).
fn bootstrap(mirror: &str, target: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--cache", "off"];
    args.extend_from_slice(extra);
    bookworm_minbase(BIN, mirror, target, &args)
        .output()
        .unwrap()
}

/// `dpkg-query` and `dpkg --audit/--verify` of the tree, run by its own dpkg.
fn dpkg_state(root: &Path) -> (Vec<String>, String) {
    let q = Command::new("chroot")
        .arg(root)
        .args(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Package}\n"])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let mut lines: Vec<String> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    let mut problems = String::new();
    for args in [&["dpkg", "--audit"][..], &["dpkg", "--verify"][..]] {
        let o = Command::new("chroot")
            .arg(root)
            .args(args)
            .output()
            .unwrap();
        problems.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    (lines, problems)
}

#[test]
fn bookworm_minbase_full_offline_and_private_users() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mirror) = host_mirror() else {
        eprintln!("SKIP: no http(s) mirror in the host's APT sources");
        return;
    };
    let scratch = Scratch::new("real-");

    // 1. A full bootstrap: every package configured, dpkg finds nothing to complain about.
    let plain: PathBuf = scratch.path().join("plain");
    let out = bootstrap(&mirror, &plain, &[]);
    if mirror_unreachable(&out) {
        eprintln!(
            "SKIP: mirror {mirror} unreachable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        out.status.success(),
        "bootstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for d in ["bin", "sbin", "lib", "lib64"] {
        assert_eq!(
            std::fs::read_link(plain.join(d)).unwrap(),
            Path::new("usr").join(d)
        );
    }
    let (pkgs, problems) = dpkg_state(&plain);
    assert_eq!(pkgs.len(), 88, "{pkgs:?}");
    assert!(pkgs.iter().all(|l| l.starts_with("ii ")), "{pkgs:?}");
    assert_eq!(problems, "", "dpkg --audit / --verify");
    assert!(
        !plain.join("usr/sbin/policy-rc.d").exists(),
        "policy-rc.d removed"
    );
    assert!(plain.join("var/log/bootstrap.log").exists());

    // 2. --foreign stops after unpack: every package unpacked, not configured.
    let foreign = scratch.path().join("foreign");
    let out = bootstrap(&mirror, &foreign, &["--foreign"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = std::fs::read_to_string(foreign.join("var/lib/dpkg/status")).unwrap();
    assert_eq!(
        status.matches("\nStatus: install ok unpacked\n").count(),
        88
    );

    // 3. Offline from the cache the first run filled: the same package set.
    let offline = scratch.path().join("offline");
    let out = bootstrap(&mirror, &offline, &["--offline"]);
    assert!(
        out.status.success(),
        "offline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dpkg_state(&offline).0, pkgs);

    // 4. Owned by a shifted id range, configured in a user namespace.
    let base: u32 = 0x6_0000 * 16; // 6291456, a multiple of 65536
    let shifted = scratch.path().join("shifted");
    let out = bootstrap(&mirror, &shifted, &["--private-users", &base.to_string()]);
    assert!(
        out.status.success(),
        "userns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shadow = std::fs::metadata(shifted.join("etc/shadow")).unwrap();
    assert_eq!((shadow.uid(), shadow.gid()), (base, base + 42));
    let root = std::fs::metadata(&shifted).unwrap();
    assert_eq!(root.uid(), base);
    let su = std::fs::metadata(shifted.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid kept through the shift");
    let (upkgs, _) = dpkg_state(&shifted);
    assert_eq!(upkgs, pkgs);
}

fn staging_of(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(".staging-")
        })
}

fn spawn_bootstrap(mirror: &str, target: &Path, extra: &[&str]) -> std::process::Child {
    let mut args = vec!["--cache", "off"];
    args.extend_from_slice(extra);
    bookworm_minbase(BIN, mirror, target, &args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the run is unpacking or configuring (its staging tree has dpkg's database).
fn wait_for_staging(dir: &Path, child: &mut std::process::Child) -> bool {
    for _ in 0..600 {
        if let Some(s) = staging_of(dir) {
            if s.join("var/lib/dpkg/status").exists() {
                return true;
            }
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn interrupted_runs_leave_no_tree_and_touch_no_existing_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mirror) = host_mirror() else {
        eprintln!("SKIP: no http(s) mirror in the host's APT sources");
        return;
    };
    let scratch = Scratch::new("real-");
    let target = scratch.path().join("m");

    // Ctrl-C (SIGINT) during the second stage: nothing at TARGET, no staging tree left,
    // no process of the run left (its sandbox dies with it).
    let mut child = spawn_bootstrap(&mirror, &target, &[]);
    if !wait_for_staging(scratch.path(), &mut child) {
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if mirror_unreachable(&out) {
            eprintln!("SKIP: mirror unreachable: {err}");
            return;
        }
        panic!("the run ended before it could be interrupted: {err}");
    }
    std::thread::sleep(std::time::Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(!target.exists(), "no tree at TARGET after Ctrl-C");
    assert!(staging_of(scratch.path()).is_none(), "staging tree removed");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ps = Command::new("pgrep")
        .args(["-f", "__sandbox-child"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "no sandbox helper left: {}",
        String::from_utf8_lossy(&ps.stdout)
    );

    // An existing machine survives a run killed with SIGKILL over it (with --force).
    std::fs::create_dir_all(target.join("etc")).unwrap();
    std::fs::write(target.join("etc/keep"), b"precious").unwrap();
    let mut child = bookworm_minbase(BIN, &mirror, &target, &["--cache", "off", "--force"])
        .spawn()
        .unwrap();
    assert!(
        wait_for_staging(scratch.path(), &mut child),
        "run reached unpack"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(target.join("etc/keep")).unwrap(), b"precious");
    assert!(
        staging_of(scratch.path()).is_some(),
        "SIGKILL leaves a staging tree (not at TARGET)"
    );
    // Without --force the existing target is refused before anything happens.
    let out = bootstrap(&mirror, &target, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read(target.join("etc/keep")).unwrap(), b"precious");
    // With --force, the next run removes the dead run's staging tree and replaces the target.
    let out = bootstrap(&mirror, &target, &["--force", "--foreign"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        staging_of(scratch.path()).is_none(),
        "dead run's staging tree removed"
    );
    assert!(!target.join("etc/keep").exists() && target.join("usr/bin/dpkg").exists());
}
