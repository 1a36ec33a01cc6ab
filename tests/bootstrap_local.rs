//! Bootstrap against archives the tests generate and sign themselves, served as
//! `file://` and by a local HTTP server, including tampered and faulty ones.
//! Nothing half-made may be left in the target's directory or the cache.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nspawn::bootstrap::{self, BootstrapError, Options};
use nspawn::fetch::FetchError;
use nspawn::testkit::deb::DebBuilder;
use nspawn::testkit::http::{Fault, HttpServer};
use nspawn::testkit::repo::{sample_repo, TestRepo};

struct Env {
    _dir: tempfile::TempDir,
    repo: TestRepo,
    cache: PathBuf,
    machines: PathBuf,
}

fn env() -> Env {
    let dir = tempfile::Builder::new()
        .prefix("nspawn-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let repo = sample_repo(&dir.path().join("repo"), "testing");
    let cache = dir.path().join("cache");
    let machines = dir.path().join("machines");
    std::fs::create_dir_all(&machines).unwrap();
    Env {
        _dir: dir,
        repo,
        cache,
        machines,
    }
}

fn opts(e: &Env, mirror: &str) -> Options {
    Options {
        suite: Some("testing".into()),
        mirror: Some(mirror.into()),
        keyring: Some(e.repo.keyring()),
        cache_dir: e.cache.clone(),
        quiet: true,
        arch: Some("amd64".into()),
        // The sample archive's packages are stand-ins without a real dpkg: stop after unpack.
        foreign: true,
        // These tests are about the bootstrap itself; the tree cache has its own tests.
        cache: nspawn::cache::Mode::Off,
        ..Default::default()
    }
}

/// Only the finished target may be in the machines dir: no staging or old trees.
fn assert_clean(machines: &Path, expect: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(machines)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names, expect,
        "machines dir holds exactly the finished trees"
    );
}

fn assert_cache_has_no_partials(cache: &Path) {
    if let Ok(rd) = std::fs::read_dir(cache) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.contains(".part-"), "partial download left in cache: {n}");
        }
    }
}

const EXPECTED: &[&str] = &[
    "apt",
    "base-files",
    "gpgv",
    "gzip",
    "libc6",
    "login",
    "mawk",
];

#[test]
fn print_debs_resolves_the_sample_archive() {
    let e = env();
    let names = bootstrap::print_debs(&opts(&e, &e.repo.url())).unwrap();
    assert_eq!(names, EXPECTED);
}

#[test]
fn cli_print_debs_and_bad_options() {
    let e = env();
    let bin = env!("CARGO_BIN_EXE_packer-plugin-nspawn");
    let out = Command::new(bin)
        .args([
            "bootstrap",
            "--print-debs",
            "--suite",
            "testing",
            "--arch",
            "amd64",
        ])
        .arg("--mirror")
        .arg(e.repo.url())
        .arg("--keyring")
        .arg(e.repo.keyring())
        .arg("--cache-dir")
        .arg(&e.cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(printed, EXPECTED);

    let out = Command::new(bin)
        .args(["bootstrap", "--print-debs", "--variant", "huge"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("huge"));

    let out = Command::new(bin)
        .args([
            "bootstrap",
            "--print-debs",
            "--mirror",
            "ftp://x.invalid/debian",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--mirror") || err.contains("mirror"), "{err}");

    let out = Command::new(bin)
        .args([
            "bootstrap",
            "--print-debs",
            "--suite",
            "testing",
            "--include",
            "no-such-pkg",
        ])
        .arg("--mirror")
        .arg(e.repo.url())
        .arg("--keyring")
        .arg(e.repo.keyring())
        .arg("--cache-dir")
        .arg(&e.cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-pkg"));
}

#[test]
fn http_bootstrap_unpacks_everything_and_reuses_connections() {
    let e = env();
    let server = HttpServer::start(&e.repo.root);
    let target = e.machines.join("m1");
    let out = bootstrap::bootstrap(&opts(&e, &server.url("")), &target).unwrap();
    assert_eq!(out.packages, EXPECTED.len());
    assert_eq!(out.timings.downloaded_packages, EXPECTED.len());
    // One resolver lookup, a handful of kept-alive connections for ~10 files.
    assert!(
        server.connections() <= 8,
        "{} connections",
        server.connections()
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains("/by-hash/SHA256/")),
        "indices fetched by hash: {:?}",
        server.requests()
    );

    // merged-/usr: the top-level dirs are links into /usr.
    for d in ["bin", "lib", "lib64"] {
        let l = std::fs::read_link(target.join(d)).unwrap();
        assert_eq!(l, PathBuf::from(format!("usr/{d}")));
    }
    let su = std::fs::metadata(target.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    let expiry = std::fs::metadata(target.join("usr/bin/expiry")).unwrap();
    assert_eq!((expiry.mode() & 0o7777, expiry.gid()), (0o2755, 42));
    let a = std::fs::metadata(target.join("usr/bin/gunzip")).unwrap();
    let b = std::fs::metadata(target.join("usr/bin/uncompress")).unwrap();
    assert_eq!(a.ino(), b.ino(), "hardlink kept");
    assert_eq!(
        xattr::get(target.join("usr/bin/ping"), "security.capability").unwrap(),
        Some(nspawn::testkit::repo::CAP_NET_RAW_V2.to_vec()),
        "file capability kept"
    );
    assert_eq!(
        std::fs::read_link(target.join("usr/bin/awk")).unwrap(),
        PathBuf::from("mawk")
    );
    assert_eq!(
        std::fs::metadata(target.join("var/local")).unwrap().mode() & 0o7777,
        0o2775
    );
    // Conffiles wait as .dpkg-new for dpkg --configure; those of the required set are
    // also in place already, as debootstrap's first stage leaves them.
    assert!(target.join("etc/issue.dpkg-new").exists());
    assert_eq!(
        std::fs::read(target.join("etc/issue")).unwrap(),
        std::fs::read(target.join("etc/issue.dpkg-new")).unwrap()
    );
    // The dpkg database.
    let status = std::fs::read_to_string(target.join("var/lib/dpkg/status")).unwrap();
    for p in EXPECTED {
        assert!(status.contains(&format!("Package: {p}\n")), "{p} in status");
    }
    assert_eq!(
        status.matches("Status: install ok unpacked").count(),
        EXPECTED.len()
    );
    assert!(status.contains(" /etc/issue newconffile"));
    assert!(target.join("var/lib/dpkg/info/libc6:amd64.list").exists());
    assert!(target.join("var/lib/dpkg/info/login.postinst").exists());
    let list = std::fs::read_to_string(target.join("var/lib/dpkg/info/gzip.list")).unwrap();
    assert!(list.lines().any(|l| l == "/bin/uncompress"), "{list}");
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // What debootstrap writes itself, adapted: sources with the keyring that verified them.
    let sources =
        std::fs::read_to_string(target.join("etc/apt/sources.list.d/archive.sources")).unwrap();
    assert!(
        sources.contains(&format!("URIs: {}", server.url(""))),
        "{sources}"
    );
    assert!(sources.contains("Suites: testing"));
    assert!(sources.contains("Signed-By: /etc/apt/keyrings/archive-keyring.gpg"));
    assert!(target
        .join("etc/apt/keyrings/archive-keyring.gpg")
        .is_file());
    assert_eq!(
        std::fs::read_to_string(target.join("etc/hostname")).unwrap(),
        "m1\n"
    );
    assert!(!target.join("etc/resolv.conf").exists());
    assert_clean(&e.machines, &["m1"]);

    // A second run is served from the cache and refuses the existing target.
    let err = bootstrap::bootstrap(&opts(&e, &server.url("")), &target).unwrap_err();
    assert!(matches!(err, BootstrapError::TargetExists(_)), "{err}");
    let mut o = opts(&e, &server.url(""));
    o.force = true;
    let out = bootstrap::bootstrap(&o, &target).unwrap();
    assert_eq!(out.timings.cached_packages, EXPECTED.len());
    assert_eq!(out.timings.downloaded_packages, 0);
    assert_clean(&e.machines, &["m1"]);
}

#[test]
fn tampered_inrelease_is_a_signature_error() {
    let e = env();
    let p = e.repo.root.join("dists/testing/InRelease");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replacen("Label: Test", "Label: Tesu", 1)).unwrap();
    let target = e.machines.join("m");
    let err = bootstrap::bootstrap(&opts(&e, &e.repo.url()), &target).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("InRelease") && msg.contains("no valid signature"),
        "{msg}"
    );
    assert_clean(&e.machines, &[]);
}

#[test]
fn tampered_packages_is_a_checksum_error_naming_the_file() {
    let e = env();
    let dir = e.repo.root.join("dists/testing/main/binary-amd64");
    // Replace every served form of the index (and its by-hash copies) with other bytes.
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    std::io::Write::write_all(&mut xz, b"Package: evil\nVersion: 1\nFilename: x\n").unwrap();
    let evil = xz.finish().unwrap();
    std::fs::write(dir.join("Packages.xz"), &evil).unwrap();
    for f in std::fs::read_dir(dir.join("by-hash/SHA256")).unwrap() {
        std::fs::write(f.unwrap().path(), &evil).unwrap();
    }
    let target = e.machines.join("m");
    let err = bootstrap::bootstrap(&opts(&e, &e.repo.url()), &target).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("main/binary-amd64/Packages.xz") && msg.contains("checksum"),
        "{msg}"
    );
    assert_clean(&e.machines, &[]);
    assert_cache_has_no_partials(&e.cache.join("lists"));
}

#[test]
fn tampered_deb_is_a_checksum_error_naming_the_package() {
    let e = env();
    let server = HttpServer::start(&e.repo.root);
    let pkg = e
        .repo
        .packages()
        .iter()
        .find(|p| p.package == "gzip")
        .unwrap()
        .clone();
    let path = e.repo.root.join(&pkg.filename);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let target = e.machines.join("m");
    let err = bootstrap::bootstrap(&opts(&e, &server.url("")), &target).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("package gzip") && msg.contains("checksum"),
        "{msg}"
    );
    assert_clean(&e.machines, &[]);
    assert_cache_has_no_partials(&e.cache);
    assert!(!std::fs::read_dir(&e.cache).unwrap().any(|f| f
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("gzip_")));
}

#[test]
fn path_escaping_deb_is_refused() {
    let mut e = env();
    e.repo.add(
        "main",
        &DebBuilder::new("evil", "1", "amd64")
            .control_field("Priority", "required")
            .raw_entry("./../../escaped-by-evil", b"owned"),
    );
    e.repo.publish();
    let target = e.machines.join("m");
    let err = bootstrap::bootstrap(&opts(&e, &e.repo.url()), &target).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("evil"), "{msg}");
    assert!(!e
        .machines
        .parent()
        .unwrap()
        .join("escaped-by-evil")
        .exists());
    assert!(!Path::new("/var/escaped-by-evil").exists());
    assert_clean(&e.machines, &[]);
}

#[test]
fn truncated_downloads_are_retried_then_fail_clearly() {
    let e = env();
    let server = HttpServer::start(&e.repo.root);
    let pkg = e
        .repo
        .packages()
        .iter()
        .find(|p| p.package == "mawk")
        .unwrap()
        .clone();
    // Once: retried and the build succeeds.
    server.fault(&pkg.filename, Fault::Truncate, 1);
    server.fault("InRelease", Fault::Unavailable, 1);
    let target = e.machines.join("m");
    bootstrap::bootstrap(&opts(&e, &server.url("")), &target).unwrap();
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|r| r.ends_with(&pkg.filename))
            .count(),
        2
    );
    // Always: a clear error naming the URL after the retries, nothing left behind.
    std::fs::remove_dir_all(&e.cache).unwrap();
    server.fault(&pkg.filename, Fault::Truncate, 100);
    let target2 = e.machines.join("m2");
    let err = bootstrap::bootstrap(&opts(&e, &server.url("")), &target2).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            BootstrapError::Fetch(FetchError::Truncated { .. } | FetchError::Transport { .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&pkg.filename) && msg.contains("attempt"),
        "{msg}"
    );
    assert_clean(&e.machines, &["m"]);
    assert_cache_has_no_partials(&e.cache);
}

#[test]
fn offline_uses_the_cache_and_names_what_is_missing() {
    let e = env();
    let server = HttpServer::start(&e.repo.root);
    let online = opts(&e, &server.url(""));
    bootstrap::bootstrap(&online, &e.machines.join("a")).unwrap();
    drop(server); // no network from here on
    let mut off = online.clone();
    off.offline = true;
    let out = bootstrap::bootstrap(&off, &e.machines.join("b")).unwrap();
    assert_eq!(out.timings.cached_packages, EXPECTED.len());
    // Remove one .deb from the cache: the error names it and nothing is written.
    let gz = std::fs::read_dir(&e.cache)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("gpgv_")
        })
        .unwrap();
    std::fs::remove_file(gz).unwrap();
    let err = bootstrap::bootstrap(&off, &e.machines.join("c")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("gpgv") && msg.contains("offline"), "{msg}");
    assert_clean(&e.machines, &["a", "b"]);
}

#[test]
fn corrupted_cache_entry_is_replaced() {
    let e = env();
    bootstrap::bootstrap(&opts(&e, &e.repo.url()), &e.machines.join("a")).unwrap();
    let f = std::fs::read_dir(&e.cache)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("login_")
        })
        .unwrap();
    std::fs::write(&f, b"garbage").unwrap();
    let out = bootstrap::bootstrap(&opts(&e, &e.repo.url()), &e.machines.join("b")).unwrap();
    assert_eq!(out.timings.downloaded_packages, 1);
    assert_eq!(out.timings.cached_packages, EXPECTED.len() - 1);
    assert_ne!(std::fs::read(&f).unwrap(), b"garbage");
}

#[test]
fn detached_release_signature_is_the_fallback() {
    let e = env();
    std::fs::remove_file(e.repo.root.join("dists/testing/InRelease")).unwrap();
    let names = bootstrap::print_debs(&opts(&e, &e.repo.url())).unwrap();
    assert_eq!(names, EXPECTED);
    // A tampered Release with its old detached signature is refused.
    let p = e.repo.root.join("dists/testing/Release");
    let t = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, t.replacen("Label: Test", "Label: Tesu", 1)).unwrap();
    let err = bootstrap::print_debs(&opts(&e, &e.repo.url())).unwrap_err();
    assert!(err.to_string().contains("no valid signature"), "{err}");
}

#[test]
fn valid_until_is_enforced_unless_overridden() {
    let mut e = env();
    e.repo
        .extra_release_fields
        .push("Valid-Until: Mon, 01 Jan 2024 00:00:00 UTC".into());
    e.repo.publish();
    let err = bootstrap::print_debs(&opts(&e, &e.repo.url())).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Valid-Until") && msg.contains("2024"), "{msg}");
    let mut o = opts(&e, &e.repo.url());
    o.ignore_valid_until = true;
    assert_eq!(bootstrap::print_debs(&o).unwrap(), EXPECTED);
}

#[test]
fn wrong_keyring_and_wrong_suite_are_named() {
    let e = env();
    let other = nspawn::testkit::signing::TestKey::generate("Other <o@example.invalid>");
    let k = e.repo.root.join("other.gpg");
    std::fs::write(&k, other.public_bytes()).unwrap();
    let mut o = opts(&e, &e.repo.url());
    o.keyring = Some(k);
    let err = bootstrap::print_debs(&o).unwrap_err();
    assert!(err.to_string().contains("not in keyring"), "{err}");
    let mut o = opts(&e, &e.repo.url());
    o.suite = Some("nosuchsuite".into());
    let err = bootstrap::print_debs(&o).unwrap_err();
    assert!(err.to_string().contains("nosuchsuite"), "{err}");
}
