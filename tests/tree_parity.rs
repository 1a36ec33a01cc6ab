//! Tree parity with debootstrap: for bookworm minbase and default, build the tree with
//! our `bootstrap` and with the host's `debootstrap` from the same mirror (the host's,
//! read at run time), then compare
//!
//! * every path (no symlinks followed): type, permission bits incl. setuid/setgid/sticky,
//!   owner, group, link target, size of regular files, and the content of small regular
//!   files under `/etc`;
//! * the dpkg database as dpkg reports it: package, version, status and recorded conffile
//!   hashes (`dpkg-query`), diversions, stat overrides, alternatives;
//! * `passwd`, `group`, `gshadow`, and `shadow` without the last-change date;
//!
//! and require every package `ii`, `dpkg --audit` silent and `dpkg --verify` clean in ours.
//! The only differences allowed are listed in [`allowed`], each with its reason. Any other
//! difference fails the test with a readable list.
//!
//! Needs root, `debootstrap` and the network; skips with a reason otherwise. Both trees
//! are built on a tmpfs mounted by the test. Run with `--nocapture` to see the timings;
//! `NSPAWN_PARITY_KEEP=1` leaves the tmpfs mounted for inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nspawn::testkit::scratch::{host_mirror, Scratch};
use sha2::{Digest, Sha256};

/// Our package cache, shared with the other real-mirror tests.
const CACHE: &str = "/var/tmp/packer-plugin-nspawn-test-cache";
/// debootstrap's own persistent `--cache-dir` (it must exist before the run).
const DEBOOTSTRAP_CACHE: &str = "/var/tmp/packer-plugin-nspawn-debootstrap-cache";
/// Regular files under /etc up to this size are compared by content.
const SMALL: u64 = 64 * 1024;
/// Lines of differences shown in a failure.
const SHOW: usize = 50;

/// The two builds of a variant take a CPU each on a shared 2-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Why the test cannot run here, if it cannot.
fn skip_reason(mirror: Option<&str>) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (debootstrap, chroot and mount need it)".into());
    }
    let has_debootstrap = Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_debootstrap {
        return Some("debootstrap is not installed".into());
    }
    let Some(mirror) = mirror else {
        return Some("no http mirror in the host's APT sources".into());
    };
    // host[:port] of http://host[:port]/path
    let rest = mirror.split_once("://").map_or(mirror, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap_or_default();
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    use std::net::ToSocketAddrs;
    let reachable = addr.to_socket_addrs().ok().is_some_and(|mut addrs| {
        addrs.any(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(10)).is_ok())
    });
    if !reachable {
        return Some(format!("mirror {mirror} unreachable"));
    }
    None
}

fn check(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 20),
        tail(&String::from_utf8_lossy(&out.stderr), 20)
    );
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn build_ours(mirror: &str, variant: &str, target: &Path) -> Duration {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_packer-plugin-nspawn"))
        .args([
            "bootstrap",
            "--quiet",
            "--cache",
            "off",
            "--suite",
            "bookworm",
            "--variant",
        ])
        .arg(variant)
        .arg("--mirror")
        .arg(mirror)
        .arg("--cache-dir")
        .arg(CACHE)
        .arg(target)
        .output()
        .unwrap();
    check("packer-plugin-nspawn bootstrap", &out);
    t.elapsed()
}

fn build_debootstrap(mirror: &str, variant: &str, target: &Path) -> Duration {
    std::fs::create_dir_all(DEBOOTSTRAP_CACHE).unwrap();
    let t = Instant::now();
    let mut cmd = Command::new("debootstrap");
    if variant != "default" {
        cmd.arg(format!("--variant={variant}"));
    }
    let out = cmd
        .arg(format!("--cache-dir={DEBOOTSTRAP_CACHE}"))
        .arg("bookworm")
        .arg(target)
        .arg(mirror)
        .output()
        .unwrap();
    check("debootstrap", &out);
    t.elapsed()
}

/// What the test records about one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    link: Option<String>,
    size: Option<u64>,
    sha256: Option<String>,
    rdev: Option<u64>,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:04o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )?;
        if let Some(l) = &self.link {
            write!(f, " -> {l}")?;
        }
        if let Some(s) = self.size {
            write!(f, " {s} bytes")?;
        }
        if let Some(h) = &self.sha256 {
            write!(f, " sha256 {}", &h[..12])?;
        }
        if let Some(r) = self.rdev {
            write!(f, " dev {}:{}", libc::major(r), libc::minor(r))?;
        }
        Ok(())
    }
}

/// Every path under `root` ("/" for the root itself), symlinks not followed.
fn walk(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap();
        let name = format!("/{}", rel.display());
        let md = e.path().symlink_metadata().unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "link"
        } else if ft.is_file() {
            "file"
        } else if ft.is_char_device() {
            "chr"
        } else if ft.is_block_device() {
            "blk"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let small_etc = ft.is_file() && name.starts_with("/etc/") && md.len() <= SMALL;
        out.insert(
            name,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                link: ft
                    .is_symlink()
                    .then(|| std::fs::read_link(e.path()).unwrap().display().to_string()),
                size: ft.is_file().then_some(md.len()),
                sha256: small_etc
                    .then(|| hex::encode(Sha256::digest(std::fs::read(e.path()).unwrap()))),
                rdev: (ft.is_char_device() || ft.is_block_device()).then_some(md.rdev()),
            },
        );
    }
    out
}

/// Runs `argv` chrooted into `root` and returns its stdout; it must succeed.
fn in_root(root: &Path, argv: &[&str]) -> String {
    in_root_ok(root, argv, &[0])
}

/// [`in_root`] accepting the exit codes `ok`.
fn in_root_ok(root: &Path, argv: &[&str], ok: &[i32]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    if !out.status.code().is_some_and(|c| ok.contains(&c)) {
        check(&format!("chroot {} {argv:?}", root.display()), &out);
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(String::from).collect();
    v.sort();
    v
}

/// The database views and account files of a tree, each as sorted lines.
fn views(root: &Path) -> BTreeMap<&'static str, Vec<String>> {
    let mut v = BTreeMap::new();
    v.insert(
        "dpkg-query (package version status)",
        sorted_lines(&in_root(
            root,
            &[
                "dpkg-query",
                "-W",
                "-f",
                "${binary:Package} ${Version} ${db:Status-Abbrev}\n",
            ],
        )),
    );
    // One line per recorded conffile: package, path, hash (and flags).
    let conffiles = in_root(
        root,
        &[
            "dpkg-query",
            "-W",
            "-f",
            "${binary:Package}\n${Conffiles}\n",
        ],
    );
    let mut lines = Vec::new();
    let mut pkg = String::new();
    for l in conffiles.lines() {
        if let Some(c) = l.strip_prefix(' ') {
            lines.push(format!("{pkg} {c}"));
        } else if !l.is_empty() {
            pkg = l.to_string();
        }
    }
    lines.sort();
    v.insert("dpkg-query (conffiles)", lines);
    v.insert(
        "dpkg-divert --list",
        sorted_lines(&in_root(root, &["dpkg-divert", "--list"])),
    );
    v.insert(
        "dpkg-statoverride --list",
        // Exit code 1: no overrides.
        sorted_lines(&in_root_ok(root, &["dpkg-statoverride", "--list"], &[0, 1])),
    );
    v.insert(
        "update-alternatives --get-selections",
        sorted_lines(&in_root(root, &["update-alternatives", "--get-selections"])),
    );
    for f in ["passwd", "group", "gshadow"] {
        let text = std::fs::read_to_string(root.join("etc").join(f)).unwrap();
        v.insert(
            match f {
                "passwd" => "/etc/passwd",
                "group" => "/etc/group",
                _ => "/etc/gshadow",
            },
            text.lines().map(String::from).collect(),
        );
    }
    // shadow minus field 3, the date of the last password change (the day of the build).
    let shadow = std::fs::read_to_string(root.join("etc/shadow")).unwrap();
    v.insert(
        "/etc/shadow (without the change date)",
        shadow
            .lines()
            .map(|l| {
                let mut f: Vec<&str> = l.split(':').collect();
                if f.len() > 2 {
                    f[2] = "*";
                }
                f.join(":")
            })
            .collect(),
    );
    v
}

/// Why a path may differ between the two trees, or `None` if it must not.
///
/// `ours`/`theirs` are the entries (absent = the path exists only in the other tree).
fn allowed(
    path: &str,
    ours: Option<&Entry>,
    theirs: Option<&Entry>,
    reordered: &BTreeSet<String>,
) -> Option<&'static str> {
    let exists_in_both = ours.is_some() && theirs.is_some();
    let same_shape = |a: Option<&Entry>, b: Option<&Entry>| match (a, b) {
        (Some(a), Some(b)) => {
            a.kind == b.kind && a.mode == b.mode && a.uid == b.uid && a.gid == b.gid
        }
        _ => false,
    };
    // --- Written by debootstrap itself (bootstrap.md §1.6, §1.9, §4.6) ---
    // Its one-line sources.list; ours is deb822 under sources.list.d (below).
    if path == "/etc/apt/sources.list" {
        return Some("debootstrap's own sources.list");
    }
    // Copied from the build host by debootstrap; we write none (nspawn supplies one
    // at run time, and the build host's resolver does not belong in an image).
    if path == "/etc/resolv.conf" {
        return Some("debootstrap copies the host's resolv.conf; we write none");
    }
    // The host's name in debootstrap's tree, the machine's name in ours.
    if path == "/etc/hostname" && exists_in_both {
        return Some("hostname: host's (debootstrap) vs machine name (ours)");
    }
    // Device nodes and /dev links debootstrap makes with mknod; a machine gets its
    // /dev from systemd-nspawn.
    if path.starts_with("/dev/") {
        return Some("debootstrap's /dev nodes");
    }
    // util-linux's utab, left by the mounts debootstrap makes inside the chroot.
    if path == "/run/mount" || path.starts_with("/run/mount/") {
        return Some("left by debootstrap's mounts in the chroot");
    }
    // dselect access method debootstrap sets up (`apt apt`).
    if path == "/var/lib/dpkg/cmethopt" {
        return Some("debootstrap's dselect method");
    }
    // We record the native architecture explicitly (as mmdebstrap does); debootstrap
    // relies on dpkg's compiled-in default. Same effective value.
    if path == "/var/lib/dpkg/arch" {
        return Some("native arch recorded explicitly by us");
    }
    // The Packages stanzas of the installed set in both; order and the set of base
    // stanzas written by debootstrap's setup_available differ, hence the size.
    if path == "/var/lib/dpkg/available" && exists_in_both {
        return Some("available: same stanzas, different order");
    }
    // --- Per run by nature ---
    if path.starts_with("/var/log/") && path.ends_with(".log") && exists_in_both {
        return Some("logs of the run");
    }
    // debootstrap's log of the whole run; ours holds the second stage's output.
    if path == "/var/log/bootstrap.log" {
        return Some("logs of the run");
    }
    // debootstrap leaves the .debs it installed in apt's archive cache; ours stay in
    // our package cache outside the tree.
    if path.starts_with("/var/cache/apt/archives/") && path.ends_with(".deb") {
        return Some("debootstrap leaves its .debs behind");
    }
    // debootstrap leaves its Release/InRelease/Packages files in apt's lists.
    if let Some(rest) = path.strip_prefix("/var/lib/apt/lists/") {
        if rest != "partial" && rest != "lock" {
            return Some("debootstrap leaves its indices behind");
        }
    }
    // dpkg's copy of the status file before its last write: which state that was
    // depends on how the run split its dpkg calls.
    if path == "/var/lib/dpkg/status-old" && same_shape(ours, theirs) {
        return Some("dpkg's backup of the previous status");
    }
    // debconf's backup copies of its databases.
    if path.starts_with("/var/cache/debconf/") && path.ends_with("-old") {
        return Some("debconf backup of the previous database state");
    }
    // The linker cache's bytes depend on directory order; type, mode and owner are
    // still compared.
    if matches!(path, "/etc/ld.so.cache" | "/var/cache/ldconfig/aux-cache")
        && same_shape(ours, theirs)
    {
        return Some("ld.so cache contents");
    }
    // systemd's postinst initializes it from a random source (default variant).
    if path == "/etc/machine-id" && same_shape(ours, theirs) {
        return Some("random machine id");
    }
    // The same groups with the same ids, in another order: debootstrap installs the
    // targets of Pre-Depends one by one in the order of dpkg's package hash
    // (`--predep-package`: libssl3, systemd, systemd-sysv, cron-daemon-common), we
    // configure them in one dpkg run, so `crontab` (gid 101 in both) is added before
    // systemd's groups instead of after them.
    if reordered.contains(path) && same_shape(ours, theirs) {
        return Some("same group lines, another order (pre-dependency installs)");
    }
    // --- Our documented differences (README, bootstrap::write_system_files) ---
    // The archive the tree was built from, in deb822 format.
    if path == "/etc/apt/sources.list.d/debian.sources" && theirs.is_none() {
        return Some("our deb822 sources (instead of sources.list)");
    }
    // /etc/hosts naming the machine: debootstrap leaves none (minbase) or netbase's,
    // which lacks the machine's name (default; dpkg --force-confold keeps ours).
    if path == "/etc/hosts" && (theirs.is_none() || same_shape(ours, theirs)) {
        return Some("our /etc/hosts with the machine name");
    }
    None
}

/// Human-readable differences between the two trees, after the allowed ones.
fn compare(
    ours: &BTreeMap<String, Entry>,
    theirs: &BTreeMap<String, Entry>,
    reordered: &BTreeSet<String>,
    allowed_seen: &mut BTreeMap<&'static str, BTreeSet<String>>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    let paths: BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
    for p in paths {
        let (a, b) = (ours.get(p), theirs.get(p));
        if a == b {
            continue;
        }
        if let Some(why) = allowed(p, a, b, reordered) {
            allowed_seen.entry(why).or_default().insert(p.clone());
            continue;
        }
        diffs.push(match (a, b) {
            (Some(a), None) => format!("only in ours:        {p}  ({a})"),
            (None, Some(b)) => format!("only in debootstrap: {p}  ({b})"),
            (Some(a), Some(b)) => {
                format!("differs: {p}\n    ours:        {a}\n    debootstrap: {b}")
            }
            (None, None) => unreachable!(),
        });
    }
    diffs
}

/// Account files whose line order may differ (see [`allowed`]) as long as the lines are
/// the same.
const ORDER_FREE: [&str; 4] = ["/etc/group", "/etc/group-", "/etc/gshadow", "/etc/gshadow-"];

/// The [`ORDER_FREE`] files that hold the same lines in both trees.
fn reordered(ours: &Path, theirs: &Path) -> BTreeSet<String> {
    let lines = |root: &Path, f: &str| {
        std::fs::read_to_string(root.join(&f[1..])).map(|t| sorted_lines(&t))
    };
    ORDER_FREE
        .iter()
        .filter(|f| {
            lines(ours, f)
                .ok()
                .is_some_and(|a| Some(a) == lines(theirs, f).ok())
        })
        .map(|f| f.to_string())
        .collect()
}

fn compare_views(
    ours: &BTreeMap<&'static str, Vec<String>>,
    theirs: &BTreeMap<&'static str, Vec<String>>,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (name, a) in ours {
        let b = &theirs[name];
        let sa: BTreeSet<&String> = a.iter().collect();
        let sb: BTreeSet<&String> = b.iter().collect();
        for l in sa.difference(&sb) {
            diffs.push(format!("{name}: only in ours:        {l}"));
        }
        for l in sb.difference(&sa) {
            diffs.push(format!("{name}: only in debootstrap: {l}"));
        }
        if sa == sb && a != b && !ORDER_FREE.contains(name) {
            diffs.push(format!("{name}: same lines in a different order"));
        }
    }
    diffs
}

fn parity(variant: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mirror = host_mirror();
    if let Some(why) = skip_reason(mirror.as_deref()) {
        eprintln!("SKIP: {why}");
        return;
    }
    let mirror = mirror.unwrap();
    let mut scratch = Scratch::new("parity-");
    if std::env::var_os("NSPAWN_PARITY_KEEP").is_some() {
        scratch.keep();
    }
    let ours_root: PathBuf = scratch.path().join(format!("ours-{variant}"));
    let theirs_root: PathBuf = scratch.path().join(format!("debootstrap-{variant}"));

    let t_ours = build_ours(&mirror, variant, &ours_root);
    let t_theirs = build_debootstrap(&mirror, variant, &theirs_root);
    eprintln!(
        "bookworm {variant}: ours {:.1} s, debootstrap {:.1} s",
        t_ours.as_secs_f64(),
        t_theirs.as_secs_f64()
    );

    // Ours on its own: complete and consistent by dpkg's standards.
    let status = in_root(
        &ours_root,
        &["dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Package}\n"],
    );
    let not_ii: Vec<&str> = status.lines().filter(|l| !l.starts_with("ii ")).collect();
    assert!(not_ii.is_empty(), "packages not ii: {not_ii:?}");
    assert_eq!(
        in_root(&ours_root, &["dpkg", "--audit"]),
        "",
        "dpkg --audit"
    );
    assert_eq!(
        in_root(&ours_root, &["dpkg", "--verify"]),
        "",
        "dpkg --verify"
    );

    let mut allowed_seen = BTreeMap::new();
    let reordered = reordered(&ours_root, &theirs_root);
    let mut diffs = compare(
        &walk(&ours_root),
        &walk(&theirs_root),
        &reordered,
        &mut allowed_seen,
    );
    diffs.extend(compare_views(&views(&ours_root), &views(&theirs_root)));

    eprintln!("bookworm {variant}: allowed differences:");
    for (why, paths) in &allowed_seen {
        let shown: Vec<&str> = paths.iter().take(4).map(String::as_str).collect();
        let more = paths.len().saturating_sub(shown.len());
        let more = if more > 0 {
            format!(" (+{more} more)")
        } else {
            String::new()
        };
        eprintln!("  {why}: {}{more}", shown.join(", "));
    }
    if !diffs.is_empty() {
        let full =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tree_parity-{variant}.txt"));
        let _ = std::fs::write(&full, diffs.join("\n") + "\n");
        let text: Vec<String> = diffs
            .iter()
            .flat_map(|d| d.lines().map(String::from).collect::<Vec<_>>())
            .collect();
        panic!(
            "bookworm {variant}: {} difference(s) from debootstrap's tree (first {SHOW} lines; all in {}):\n{}",
            diffs.len(),
            full.display(),
            text[..text.len().min(SHOW)].join("\n")
        );
    }
}

#[test]
fn bookworm_minbase_matches_debootstrap() {
    parity("minbase");
}

#[test]
fn bookworm_default_matches_debootstrap() {
    parity("default");
}
