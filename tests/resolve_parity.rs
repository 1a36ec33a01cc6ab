//! `bootstrap --print-debs` must print exactly what `debootstrap --print-debs`
//! prints for the same suite, variant and mirror (the host's mirror, read at run
//! time). Skips with a reason when debootstrap or the mirror is unavailable.

use std::process::Command;

fn mirror() -> Option<String> {
    let d = nspawn::archive::sources::host_defaults()?;
    d.mirror.starts_with("http").then_some(d.mirror)
}

fn sorted_words(s: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(s)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    v
}

fn parity(suite: &str, variant: &str) {
    if !std::path::Path::new("/usr/sbin/debootstrap").exists() {
        eprintln!("SKIP: debootstrap is not installed");
        return;
    }
    let Some(mirror) = mirror() else {
        eprintln!("SKIP: no http(s) mirror in the host's APT sources");
        return;
    };
    let scratch = tempfile::Builder::new()
        .prefix("parity-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cache = scratch.path().join("cache");
    let ours = Command::new(env!("CARGO_BIN_EXE_packer-plugin-nspawn"))
        .args([
            "bootstrap",
            "--quiet",
            "--print-debs",
            "--suite",
            suite,
            "--variant",
            variant,
        ])
        .arg("--mirror")
        .arg(&mirror)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    if !ours.status.success() {
        let err = String::from_utf8_lossy(&ours.stderr);
        if err.contains("resolve host") || err.contains("Transport") || err.contains("connect") {
            eprintln!("SKIP: mirror {mirror} unreachable: {err}");
            return;
        }
        panic!("our bootstrap --print-debs failed: {err}");
    }
    let dv = if variant == "default" { "-" } else { variant };
    let theirs = Command::new("/usr/sbin/debootstrap")
        .args(["--print-debs", &format!("--variant={dv}"), suite])
        .arg(scratch.path().join("db"))
        .arg(&mirror)
        .output()
        .unwrap();
    assert!(
        theirs.status.success(),
        "debootstrap failed: {}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    let (a, b) = (sorted_words(&ours.stdout), sorted_words(&theirs.stdout));
    let only_ours: Vec<_> = a.iter().filter(|x| !b.contains(x)).collect();
    let only_theirs: Vec<_> = b.iter().filter(|x| !a.contains(x)).collect();
    assert!(
        only_ours.is_empty() && only_theirs.is_empty(),
        "{suite}/{variant}: only ours {only_ours:?}, only debootstrap {only_theirs:?}"
    );
    eprintln!(
        "{suite}/{variant}: {} packages, identical to debootstrap",
        a.len()
    );
}

#[test]
fn bookworm_minbase() {
    parity("bookworm", "minbase");
}
#[test]
fn bookworm_default() {
    parity("bookworm", "default");
}
#[test]
fn bookworm_buildd() {
    parity("bookworm", "buildd");
}
#[test]
fn trixie_minbase() {
    parity("trixie", "minbase");
}
#[test]
fn trixie_default() {
    parity("trixie", "default");
}
#[test]
fn trixie_buildd() {
    parity("trixie", "buildd");
}
