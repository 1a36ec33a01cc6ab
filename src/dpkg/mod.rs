//! The dpkg database for a set of packages unpacked by [`crate::unpack`].
//!
//! [`write_database`] writes `var/lib/dpkg/` so that `dpkg --configure -a` can finish the
//! installation: `status` (every package `install ok unpacked`, shipped conffiles recorded as
//! `newconffile` because they were extracted as `.dpkg-new`), `info/<pkg>[:<arch>].*` (file list,
//! md5sums, conffiles, maintainer scripts, triggers, shlibs, symbols, templates, config),
//! `info/format`, `arch`, `available`, and the empty `updates/`, `triggers/` and
//! `alternatives/` directories. `Priority` and `Section` of the packages the caller names
//! come from the archive's stanza in `available`, as in debootstrap's tree. Trigger interest files are left to dpkg, which rebuilds them
//! during `--configure`.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::unpack::UnpackedPackage;

/// Errors writing the dpkg database; each names the file or package concerned.
#[derive(Debug, thiserror::Error)]
pub enum DpkgError {
    /// Writing `path` failed.
    #[error("writing {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The control paragraph of `package` cannot be turned into a status entry.
    #[error("package {package}: {msg}")]
    Control { package: String, msg: String },
}

/// Control members that dpkg keeps in `info/`, and whether they are executable scripts.
const INFO_MEMBERS: [(&str, bool); 11] = [
    ("md5sums", false),
    ("conffiles", false),
    ("preinst", true),
    ("postinst", true),
    ("prerm", true),
    ("postrm", true),
    ("config", true),
    ("templates", false),
    ("triggers", false),
    ("shlibs", false),
    ("symbols", false),
];

/// Writes `target/var/lib/dpkg` for `pkgs`; `available` is written verbatim as `available`.
///
/// Packages for which `archive_classified` is true get `Priority` and `Section` from their
/// stanza in `available` (see [`archive_classification`]); the others keep their control's.
/// debootstrap's tree has the archive's values for its required set, which dpkg installed
/// before debootstrap wrote `available`, and the control's for the rest, which it unpacked
/// afterwards (unpacking a `.deb` sets both from its control).
pub fn write_database(
    target: &Path,
    native_arch: &str,
    pkgs: &[UnpackedPackage],
    available: &str,
    archive_classified: &dyn Fn(&UnpackedPackage) -> bool,
) -> Result<(), DpkgError> {
    let admin = target.join("var/lib/dpkg");
    for d in ["", "info", "updates", "triggers", "alternatives"] {
        let p = admin.join(d);
        fs::create_dir_all(&p).map_err(|source| DpkgError::Io { path: p, source })?;
    }

    let mut sorted: Vec<&UnpackedPackage> = pkgs.iter().collect();
    sorted.sort_by(|a, b| {
        (a.package.as_str(), a.architecture.as_str())
            .cmp(&(b.package.as_str(), b.architecture.as_str()))
    });

    let classification = archive_classification(available);
    let mut status = String::new();
    for p in &sorted {
        if !status.is_empty() {
            status.push('\n');
        }
        let key = (p.package.clone(), p.architecture.clone());
        let overrides = match classification.get(&key) {
            Some(o) if archive_classified(p) => o.as_slice(),
            _ => &[],
        };
        status.push_str(&status_stanza_overriding(p, overrides)?);
        write_info(&admin.join("info"), p)?;
    }

    write_file(&admin.join("info/format"), b"1\n", 0o644)?;
    write_file(
        &admin.join("arch"),
        format!("{native_arch}\n").as_bytes(),
        0o644,
    )?;
    write_file(&admin.join("available"), available.as_bytes(), 0o644)?;
    write_file(&admin.join("status"), status.as_bytes(), 0o644)?;
    Ok(())
}

/// `<pkg>` or, for `Multi-Arch: same`, `<pkg>:<arch>`.
pub fn info_name(p: &UnpackedPackage) -> String {
    if p.multi_arch_same {
        format!("{}:{}", p.package, p.architecture)
    } else {
        p.package.clone()
    }
}

fn write_info(info: &Path, p: &UnpackedPackage) -> Result<(), DpkgError> {
    let base = info_name(p);
    let mut list = String::with_capacity(p.paths.iter().map(|s| s.len() + 1).sum());
    for path in &p.paths {
        list.push_str(path);
        list.push('\n');
    }
    write_file(&info.join(format!("{base}.list")), list.as_bytes(), 0o644)?;
    for (name, script) in INFO_MEMBERS {
        if let Some(m) = p.control.member(name) {
            let mode = if script {
                0o755
            } else if m.mode == 0 {
                0o644
            } else {
                m.mode & 0o7777
            };
            write_file(&info.join(format!("{base}.{name}")), &m.data, mode)?;
        }
    }
    Ok(())
}

/// `Priority` and `Section` lines of each `(Package, Architecture)` stanza in `available`.
///
/// dpkg keeps both per package rather than per version, and a stanza read from `available`
/// (the archive's, carrying the archive's overrides) replaces what the `.deb`'s control
/// said, while the `.deb` only fills them in when unset. So once debootstrap has written
/// `available` and run dpkg again, the status file holds the archive's classification
/// (e.g. `apt` is `Priority: required` in the archive but `important` in its control).
fn archive_classification(available: &str) -> HashMap<(String, String), Vec<(String, String)>> {
    let mut out = HashMap::new();
    for stanza in available.split("\n\n") {
        let (mut pkg, mut arch, mut fields) = (None, None, Vec::new());
        for line in stanza.lines() {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let name = name.trim();
            if name.eq_ignore_ascii_case("Package") {
                pkg = Some(value.trim().to_string());
            } else if name.eq_ignore_ascii_case("Architecture") {
                arch = Some(value.trim().to_string());
            } else if name.eq_ignore_ascii_case("Priority") || name.eq_ignore_ascii_case("Section")
            {
                fields.push((name.to_string(), line.to_string()));
            }
        }
        if let (Some(pkg), Some(arch)) = (pkg, arch) {
            if !fields.is_empty() {
                out.insert((pkg, arch), fields);
            }
        }
    }
    out
}

/// The `status` paragraph of `p`: its control fields with `Status: install ok unpacked` right
/// after `Package`, and `Conffiles:` for the shipped conffiles (hash `newconffile`).
pub fn status_stanza(p: &UnpackedPackage) -> Result<String, DpkgError> {
    status_stanza_overriding(p, &[])
}

/// [`status_stanza`] with the fields named in `overrides` (`(name, whole line)`) taking
/// the given line instead of the control's, or added after the control's fields.
fn status_stanza_overriding(
    p: &UnpackedPackage,
    overrides: &[(String, String)],
) -> Result<String, DpkgError> {
    let err = |msg: &str| DpkgError::Control {
        package: p.package.clone(),
        msg: msg.to_string(),
    };
    // Split into fields; a field is its first line plus continuation lines.
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in p.control.control.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some(last) = fields.last_mut() else {
                return Err(err("control starts with a continuation line"));
            };
            last.1.push('\n');
            last.1.push_str(line);
        } else {
            let Some((name, _)) = line.split_once(':') else {
                return Err(err(&format!("malformed control line {line:?}")));
            };
            fields.push((name.trim().to_string(), line.to_string()));
        }
    }
    let Some(pkg_idx) = fields
        .iter()
        .position(|(n, _)| n.eq_ignore_ascii_case("Package"))
    else {
        return Err(err("control has no Package field"));
    };
    let mut out = String::new();
    out.push_str(&fields[pkg_idx].1);
    out.push('\n');
    out.push_str("Status: install ok unpacked\n");
    let mut used = vec![false; overrides.len()];
    for (i, (name, text)) in fields.iter().enumerate() {
        if i == pkg_idx
            || name.eq_ignore_ascii_case("Status")
            || name.eq_ignore_ascii_case("Conffiles")
        {
            continue;
        }
        let text = match overrides
            .iter()
            .position(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(k) => {
                used[k] = true;
                &overrides[k].1
            }
            None => text,
        };
        out.push_str(text);
        out.push('\n');
    }
    for (k, (_, text)) in overrides.iter().enumerate() {
        if !used[k] {
            out.push_str(text);
            out.push('\n');
        }
    }
    if !p.conffiles.is_empty() {
        out.push_str("Conffiles:\n");
        for c in &p.conffiles {
            out.push_str(&format!(" {c} newconffile\n"));
        }
    }
    Ok(out)
}

/// Writes `path` through a temporary file in the same directory and a rename.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), DpkgError> {
    let err = |source| DpkgError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".dpkg-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::deb::DebBuilder;
    use crate::unpack::{unpack_all, DebInput, MergedUsr, UnpackOptions};
    use std::process::Command;

    fn build_set(root: &Path, dir: &Path) -> Vec<UnpackedPackage> {
        let libfoo = DebBuilder::new("libfoo1", "1.2-3", "amd64")
            .control_field("Multi-Arch", "same")
            .control_field("Depends", "base-files")
            .control_field("Priority", "optional")
            .control_field("Description", "foo library\n Longer text.\n .\n More.")
            .file("usr/lib/x86_64-linux-gnu/libfoo.so.1", 0o644, b"ELF")
            .maintainer_script("triggers", "activate-noawait ldconfig\n")
            .maintainer_script("shlibs", "libfoo 1 libfoo1 (>= 1.2)\n");
        let base = DebBuilder::new("base-files", "12.4", "amd64")
            .control_field("Essential", "yes")
            .control_field("Priority", "required")
            .conffile("etc/issue", b"Debian\n")
            .conffile("etc/motd", b"hi\n")
            .file("usr/bin/hello", 0o755, b"x")
            .maintainer_script("postinst", "#!/bin/sh\nexit 0\n")
            .maintainer_script("preinst", "#!/bin/sh\nexit 0\n");
        let inputs: Vec<DebInput> = [("libfoo1", libfoo), ("base-files", base)]
            .into_iter()
            .map(|(n, b)| {
                let path = dir.join(format!("{n}.deb"));
                fs::write(&path, b.build()).unwrap();
                DebInput {
                    package: n.into(),
                    path,
                }
            })
            .collect();
        let opts = UnpackOptions {
            merged_usr: MergedUsr::Yes,
            jobs: 2,
        };
        unpack_all(root, &inputs, &opts, &|_| {}).unwrap()
    }

    #[test]
    fn status_and_info_files() {
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let pkgs = build_set(&root, t.path());
        write_database(&root, "amd64", &pkgs, "Package: libfoo1\n", &|_| true).unwrap();
        let admin = root.join("var/lib/dpkg");
        let status = fs::read_to_string(admin.join("status")).unwrap();
        let stanzas: Vec<&str> = status.split("\n\n").collect();
        assert_eq!(stanzas.len(), 2, "{status}");
        assert!(stanzas[0]
            .starts_with("Package: base-files\nStatus: install ok unpacked\nVersion: 12.4\n"));
        assert!(stanzas[0].ends_with("Conffiles:\n /etc/issue newconffile\n /etc/motd newconffile"));
        assert!(stanzas[1].starts_with("Package: libfoo1\nStatus: install ok unpacked\n"));
        assert!(stanzas[1].contains("Multi-Arch: same\n"));
        assert!(stanzas[1].contains("Description: foo library\n Longer text.\n .\n More.\n"));
        assert!(!stanzas[1].contains("Conffiles"));

        let info = admin.join("info");
        let list = fs::read_to_string(info.join("libfoo1:amd64.list")).unwrap();
        assert_eq!(
            list,
            "/.\n/usr\n/usr/lib\n/usr/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu/libfoo.so.1\n"
        );
        assert!(info.join("libfoo1:amd64.md5sums").exists());
        assert!(info.join("libfoo1:amd64.triggers").exists());
        assert!(info.join("libfoo1:amd64.shlibs").exists());
        assert!(!info.join("libfoo1.list").exists());
        let md5 = fs::read_to_string(info.join("base-files.md5sums")).unwrap();
        assert!(md5.contains("  etc/issue\n") && md5.contains("  usr/bin/hello\n"));
        assert_eq!(
            fs::read_to_string(info.join("base-files.conffiles")).unwrap(),
            "/etc/issue\n/etc/motd\n"
        );
        let mode = |p: &str| fs::metadata(info.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("base-files.postinst"), 0o755);
        assert_eq!(mode("base-files.preinst"), 0o755);
        assert_eq!(mode("base-files.list"), 0o644);
        assert_eq!(fs::read_to_string(info.join("format")).unwrap(), "1\n");
        assert_eq!(fs::read_to_string(admin.join("arch")).unwrap(), "amd64\n");
        assert_eq!(
            fs::read_to_string(admin.join("available")).unwrap(),
            "Package: libfoo1\n"
        );
        for d in ["updates", "triggers", "alternatives"] {
            assert!(admin.join(d).is_dir());
        }
        assert!(!admin.join("status.dpkg-tmp").exists());
    }

    #[test]
    fn archive_priority_and_section_win() {
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let pkgs = build_set(&root, t.path());
        let available = "Package: libfoo1\nArchitecture: amd64\nPriority: important\nSection: libs\nDescription: x\n more\n\nPackage: base-files\nArchitecture: i386\nPriority: optional\n";
        write_database(&root, "amd64", &pkgs, available, &|p| {
            p.package != "libfoo1"
        })
        .unwrap();
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        assert!(
            status.contains("\nPriority: optional\n"),
            "libfoo1 not classified"
        );
        write_database(&root, "amd64", &pkgs, available, &|_| true).unwrap();
        let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
        let stanzas: Vec<&str> = status.split("\n\n").collect();
        // Another architecture's stanza does not apply.
        assert!(stanzas[0].contains("\nPriority: required\n"), "{status}");
        assert!(stanzas[1].contains("\nPriority: important\n"), "{status}");
        assert!(!stanzas[1].contains("Priority: optional"), "{status}");
        assert!(stanzas[1].contains("\nSection: libs\n"), "{status}");
    }

    #[test]
    fn dpkg_parses_the_database() {
        let have = |b: &str| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !have("dpkg") || !have("dpkg-query") {
            eprintln!("SKIP: dpkg/dpkg-query not installed on this host");
            return;
        }
        let native = Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .unwrap();
        let native = String::from_utf8_lossy(&native.stdout).trim().to_string();
        if native != "amd64" {
            eprintln!("SKIP: the test packages are amd64, host dpkg is {native}");
            return;
        }
        let t = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        let pkgs = build_set(&root, t.path());
        write_database(&root, "amd64", &pkgs, "", &|_| true).unwrap();
        let admin = root.join("var/lib/dpkg");

        let out = Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args([
                "-W",
                "-f",
                "${Package}:${Architecture} ${Version} ${Status}\\n",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "dpkg-query failed: {stderr}");
        assert!(stderr.is_empty(), "dpkg-query warned: {stderr}");
        assert_eq!(
            stdout,
            "base-files:amd64 12.4 install ok unpacked\nlibfoo1:amd64 1.2-3 install ok unpacked\n"
        );

        let out = Command::new("dpkg-query")
            .arg(format!("--admindir={}", admin.display()))
            .args(["-L", "libfoo1:amd64"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("/usr/lib/x86_64-linux-gnu/libfoo.so.1")
        );

        let out = Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .arg("--audit")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // --audit reports the unpacked-but-unconfigured packages; it must not report parse
        // errors or missing files.
        assert!(!stderr.contains("error"), "dpkg --audit: {stderr}");
        assert!(
            stdout.contains("unpacked but not yet configured"),
            "{stdout}"
        );
        assert!(
            stdout.contains("base-files") && stdout.contains("libfoo1"),
            "{stdout}"
        );
        assert!(!stdout.contains("missing"), "{stdout}");
    }
}
