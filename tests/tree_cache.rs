//! The base-tree cache, end to end on generated archives: a hit, a miss per kind
//! of input with its reason, a corrupted entry detected and rebuilt, refresh, and
//! two concurrent builds with one key.

use std::path::{Path, PathBuf};

use nspawn::bootstrap::{self, Options};
use nspawn::cache::{Mode, TreeCache};
use nspawn::testkit::deb::DebBuilder;
use nspawn::testkit::http::HttpServer;
use nspawn::testkit::repo::{sample_repo, TestRepo};

struct Env {
    dir: tempfile::TempDir,
    repo: TestRepo,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tree-cache-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let repo = sample_repo(&dir.path().join("repo"), "testing");
        Env { dir, repo }
    }
    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join("machines").join(name)
    }
    fn opts(&self) -> Options {
        Options {
            suite: Some("testing".into()),
            mirror: Some(self.repo.url()),
            keyring: Some(self.repo.keyring()),
            cache_dir: self.cache(),
            quiet: true,
            arch: Some("amd64".into()),
            foreign: true,
            cache: Mode::Auto,
            ..Default::default()
        }
    }
}

fn listing(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .flatten()
        .filter(|e| !e.path().ends_with("etc/hostname") && !e.path().ends_with("etc/hosts"))
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            let md = e.path().symlink_metadata().unwrap();
            format!(
                "{} {:o} {} {} {}",
                e.path().strip_prefix(root).unwrap().display(),
                md.mode(),
                md.uid(),
                md.gid(),
                if md.is_file() { md.size() } else { 0 }
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn hit_then_misses_with_reasons() {
    let e = Env::new();
    let first = bootstrap::bootstrap(&e.opts(), &e.target("a")).unwrap();
    assert!(
        first.cache.starts_with("miss: the cache is empty; stored "),
        "{}",
        first.cache
    );
    assert!(first.timings.unpack > 0.0);

    // Same inputs, another machine: copied from the cache, nothing fetched or unpacked.
    let hit = bootstrap::bootstrap(&e.opts(), &e.target("b")).unwrap();
    assert!(hit.cache.starts_with("hit "), "{}", hit.cache);
    assert_eq!(hit.timings.unpack, 0.0);
    assert_eq!(
        hit.timings.downloaded_packages + hit.timings.cached_packages,
        0
    );
    assert_eq!(listing(&e.target("a")), listing(&e.target("b")));
    assert_eq!(
        std::fs::read_to_string(e.target("b").join("etc/hostname")).unwrap(),
        "b\n"
    );
    assert!(std::fs::read_to_string(e.target("b").join("etc/hosts"))
        .unwrap()
        .contains("127.0.1.1\tb\n"));

    // An option changes: the miss names it (and the package it adds).
    let mut o = e.opts();
    o.include = vec!["unrelated".into()];
    let out = bootstrap::bootstrap(&o, &e.target("c")).unwrap();
    assert!(
        out.cache.contains("include: (none) → unrelated"),
        "{}",
        out.cache
    );
    assert!(out.cache.contains("+unrelated"), "{}", out.cache);

    // The private-users base changes.
    let mut o = e.opts();
    o.private_users = nspawn::sandbox::PrivateUsers::Base(6_553_600);
    let out = bootstrap::bootstrap(&o, &e.target("d")).unwrap();
    assert!(
        out.cache.contains("private_users: no → 6553600"),
        "{}",
        out.cache
    );

    // The mirror changes (same archive over HTTP).
    let server = HttpServer::start(&e.repo.root);
    let mut o = e.opts();
    o.mirror = Some(server.url(""));
    let out = bootstrap::bootstrap(&o, &e.target("e")).unwrap();
    assert!(out.cache.contains("mirror: file://"), "{}", out.cache);

    // The archive changes: a new Release and a new package version.
    let mut repo = e.repo;
    repo.add(
        "main",
        &DebBuilder::new("gpgv", "2.2.41", "amd64")
            .control_field("Priority", "optional")
            .file("usr/bin/gpgv", 0o755, b"gpgv2"),
    );
    repo.publish();
    let e = Env { dir: e.dir, repo };
    let out = bootstrap::bootstrap(&e.opts(), &e.target("f")).unwrap();
    assert!(out.cache.contains("release: "), "{}", out.cache);
    assert!(out.cache.contains("gpgv 2.2.40 → 2.2.41"), "{}", out.cache);

    let entries = TreeCache::new(&e.cache(), 0).entries();
    assert_eq!(entries.len(), 5, "one tree per distinct key");
}

#[test]
fn corrupted_entry_is_detected_and_rebuilt() {
    let e = Env::new();
    bootstrap::bootstrap(&e.opts(), &e.target("a")).unwrap();
    let c = TreeCache::new(&e.cache(), 0);
    let entry = &c.entries()[0];
    std::fs::write(
        entry.rootfs().join("usr/bin/mawk"),
        b"#!/bin/sh\necho tampered\n",
    )
    .unwrap();
    let out = bootstrap::bootstrap(&e.opts(), &e.target("b")).unwrap();
    assert!(
        out.cache.contains("modified after it was stored"),
        "{}",
        out.cache
    );
    assert!(out.timings.unpack > 0.0, "rebuilt, not copied");
    assert_ne!(
        std::fs::read(e.target("b").join("usr/bin/mawk")).unwrap(),
        b"#!/bin/sh\necho tampered\n"
    );
    // The rebuilt entry is good again.
    let out = bootstrap::bootstrap(&e.opts(), &e.target("c")).unwrap();
    assert!(out.cache.starts_with("hit "), "{}", out.cache);
}

#[test]
fn refresh_and_off() {
    let e = Env::new();
    bootstrap::bootstrap(&e.opts(), &e.target("a")).unwrap();
    let mut o = e.opts();
    o.cache = Mode::Refresh;
    let out = bootstrap::bootstrap(&o, &e.target("b")).unwrap();
    assert!(out.cache.contains("stored"), "{}", out.cache);
    assert!(out.timings.unpack > 0.0);
    o.cache = Mode::Off;
    let out = bootstrap::bootstrap(&o, &e.target("c")).unwrap();
    assert_eq!(out.cache, "off");
    assert_eq!(TreeCache::new(&e.cache(), 0).entries().len(), 1);
}

#[test]
fn concurrent_builds_with_one_key() {
    let e = Env::new();
    let (o1, o2) = (e.opts(), e.opts());
    let (t1, t2) = (e.target("x"), e.target("y"));
    let h1 = std::thread::spawn(move || bootstrap::bootstrap(&o1, &t1).map(|o| o.cache));
    let h2 = std::thread::spawn(move || bootstrap::bootstrap(&o2, &t2).map(|o| o.cache));
    let (r1, r2) = (h1.join().unwrap().unwrap(), h2.join().unwrap().unwrap());
    eprintln!("{r1} / {r2}");
    assert_eq!(listing(&e.target("x")), listing(&e.target("y")));
    let c = TreeCache::new(&e.cache(), 0);
    assert_eq!(c.entries().len(), 1, "one entry for one key");
    let leftovers: Vec<_> = std::fs::read_dir(c.root())
        .unwrap()
        .flatten()
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let out = bootstrap::bootstrap(&e.opts(), &e.target("z")).unwrap();
    assert!(out.cache.starts_with("hit "), "{}", out.cache);
}
