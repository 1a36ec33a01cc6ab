//! The debootstrap second stage for a tree the native unpacker produced (every
//! package `install ok unpacked`, conffiles as `.dpkg-new`, `info/` files in place):
//! block service starts with `policy-rc.d`, run the preinsts (base-passwd first), then
//! `dpkg --configure -a`, each inside a [`sandbox`](super) run.
//!
//! Why `--force-confold`: in a fresh tree every conffile is recorded as `newconffile`
//! and dpkg installs the `.dpkg-new` without asking, so the option changes nothing
//! there — but if the caller pre-seeded a file at a conffile path (resolv.conf,
//! hostname, an apt source) dpkg would otherwise prompt, read EOF from our null stdin
//! and fail. Keeping the existing file is what debootstrap does for its base set
//! (`dpkg --force-confold --skip-same-version --configure -a`). `--force-depends` and
//! `--force-configure-any` are not used: all packages are unpacked before configuring,
//! so dpkg can order the whole set itself, and a real dependency problem should fail.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::{run, ExitStatusInfo, SandboxError, SandboxSpec, DEFAULT_PATH};

const ADMINDIR: &str = "/var/lib/dpkg";
const POLICY_RC_D: &str = "usr/sbin/policy-rc.d";
/// Prefix of the driver script's failure line.
const MARK: &str = "@@stage2-failed ";

/// Single-quotes `s` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Lines of output kept for error messages.
const TAIL_LINES: usize = 15;

/// Runs the second stage in `root` (which overrides `spec_base.root`); `spec_base`
/// supplies the user namespace, hostname, binds and helper. Output of every command
/// goes to `log`; the tail of a failing command's output is in the error.
///
/// All preinsts run first, then one `dpkg --configure -a`; see [`second_stage_phased`]
/// for debootstrap's order.
pub fn second_stage(
    root: &Path,
    spec_base: &SandboxSpec,
    log: &mut dyn Write,
) -> Result<(), SandboxError> {
    second_stage_phased(root, spec_base, log, &[])
}

/// [`second_stage`] in debootstrap's order when `required` (package names) is not empty:
///
/// 1. the required set (and any unpacked dependency of it): preinsts, then
///    `dpkg --configure` of exactly those packages;
/// 2. the targets of the other packages' unsatisfied `Pre-Depends` with their
///    dependencies — what debootstrap's `dpkg --predep-package` loop installs before
///    the rest (for bookworm's default set: libssl3, systemd, systemd-sysv,
///    cron-daemon-common);
/// 3. everything else: preinsts, then `dpkg --configure -a`.
///
/// The order is visible in the result: maintainer scripts allocate uids and gids in
/// the order they run, and `passwd`'s postinst must run before anything that adds
/// users with `/etc/shadow` missing (systemd-sysusers would create it first).
pub fn second_stage_phased(
    root: &Path,
    spec_base: &SandboxSpec,
    log: &mut dyn Write,
    required: &[String],
) -> Result<(), SandboxError> {
    let mut spec = spec_base.clone();
    spec.root = root.to_path_buf();
    spec.cwd = PathBuf::from("/");
    spec.set_env("PATH", DEFAULT_PATH);
    spec.set_env("DEBIAN_FRONTEND", "noninteractive");
    spec.set_env("DEBCONF_NONINTERACTIVE_SEEN", "true");

    let status_path = root.join("var/lib/dpkg/status");
    let text = std::fs::read_to_string(&status_path).map_err(|source| SandboxError::StageFile {
        step: "read",
        path: status_path.clone(),
        source,
    })?;
    let pkgs = parse_status(&text);
    let dpkg_version = pkgs
        .iter()
        .find(|p| p.name == "dpkg")
        .map(|p| p.version.clone());

    let guard = PolicyRcd::install(root, spec.userns.map(|m| m.host_base))?;

    // One sandbox for the whole stage: a driver script runs each phase's preinsts
    // with the environment dpkg gives them, then its `dpkg --configure`. Setting up
    // namespaces and mounts once instead of once per script saves most of the
    // stage's overhead.
    spec.set_env("DPKG_MAINTSCRIPT_PACKAGE_REFCOUNT", "1");
    spec.set_env("DPKG_ROOT", "");
    spec.set_env("DPKG_ADMINDIR", ADMINDIR);
    if let Some(v) = &dpkg_version {
        spec.set_env("DPKG_RUNNING_VERSION", v);
    }
    let mut script = String::from("set -u\n");
    // Packages configured by an earlier phase (`pkgs` is the status before the stage).
    let mut done: HashSet<&str> = HashSet::new();
    for (phase, names) in phases(&pkgs, required).into_iter().enumerate() {
        let members: Vec<&Pkg> = pkgs
            .iter()
            .filter(|p| {
                p.unpacked()
                    && !done.contains(p.name.as_str())
                    && names.as_ref().is_none_or(|n| n.contains(&p.name))
            })
            .collect();
        done.extend(members.iter().map(|p| p.name.as_str()));
        if members.is_empty() {
            continue;
        }
        preinst_lines(&mut script, root, &members);
        let targets = match names {
            None => "-a".to_string(),
            Some(_) => members
                .iter()
                .map(|p| sh_quote(&p.dpkg_name()))
                .collect::<Vec<_>>()
                .join(" "),
        };
        script.push_str(&format!(
            "echo {msg}\n\
             dpkg --force-confold --configure {targets} \
             || {{ rc=$?; echo \"{MARK}dpkg --force-confold --configure exited with status $rc\"; exit $rc; }}\n",
            msg = sh_quote(&format!(
                "I: configuring packages (phase {}, {} packages)",
                phase + 1,
                members.len()
            )),
        ));
    }
    let argv = ["/bin/sh".to_string(), "-c".into(), script];
    match run_logged(&spec, &argv, log, "second stage") {
        Err(SandboxError::StageCommand { status, tail, .. }) => {
            // The driver names the failing step in its last marker line.
            let what = tail
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix(MARK))
                .and_then(|l| l.rsplit_once(" exited with status "))
                .map(|(w, _)| w.to_string())
                .unwrap_or_else(|| "second stage".into());
            let tail: String = tail
                .lines()
                .filter(|l| !l.starts_with(MARK))
                .collect::<Vec<_>>()
                .join("\n");
            // (policy-rc.d goes when `guard` is dropped.)
            return Err(SandboxError::StageCommand { what, status, tail });
        }
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    guard.remove()
}

/// The package sets of [`second_stage_phased`], in order; `None` is "all the rest"
/// (`--configure -a`, always last). Only unpacked packages are named.
fn phases(pkgs: &[Pkg], required: &[String]) -> Vec<Option<HashSet<String>>> {
    if required.is_empty() {
        return vec![None];
    }
    let mut pending: HashSet<&str> = pkgs
        .iter()
        .filter(|p| p.unpacked())
        .map(|p| p.name.as_str())
        .collect();
    let by_name: HashMap<&str, &Pkg> = pkgs.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut providers: HashMap<&str, Vec<&str>> = HashMap::new();
    for p in pkgs {
        for v in &p.provides {
            providers.entry(v.as_str()).or_default().push(&p.name);
        }
    }
    // The package that satisfies an alternative group: None if one is configured
    // already (or none exists), else the first pending candidate.
    let pick = |group: &[String], pending: &HashSet<&str>| -> Option<String> {
        let mut cands: Vec<&str> = Vec::new();
        for alt in group {
            if by_name.contains_key(alt.as_str()) {
                cands.push(alt);
            }
            cands.extend(providers.get(alt.as_str()).into_iter().flatten());
        }
        if cands.iter().any(|c| !pending.contains(c)) {
            return None;
        }
        cands.first().map(|c| c.to_string())
    };
    // `seed` plus its pending dependencies (Depends and Pre-Depends).
    let closure = |seed: Vec<String>, pending: &HashSet<&str>| -> HashSet<String> {
        let mut set: HashSet<String> = HashSet::new();
        let mut todo = seed;
        while let Some(n) = todo.pop() {
            if !pending.contains(n.as_str()) || !set.insert(n.clone()) {
                continue;
            }
            let p = by_name[n.as_str()];
            for g in p.depends.iter().chain(&p.pre_depends) {
                todo.extend(pick(g, pending));
            }
        }
        set
    };
    let first = closure(required.to_vec(), &pending);
    pending.retain(|n| !first.contains(*n));
    let mut targets = Vec::new();
    for p in pkgs.iter().filter(|p| pending.contains(p.name.as_str())) {
        for g in &p.pre_depends {
            targets.extend(pick(g, &pending));
        }
    }
    let second = closure(targets, &pending);
    vec![Some(first), Some(second), None]
}

/// Appends `preinst install` of `members` to the driver script (base-passwd's first:
/// it creates the account files).
fn preinst_lines(script: &mut String, root: &Path, members: &[&Pkg]) {
    let mut order = members.to_vec();
    order.sort_by_key(|p| p.name != "base-passwd"); // stable: the rest keep status order
    for pkg in order {
        let Some(path) = pkg.info_file(root, "preinst") else {
            continue;
        };
        // dpkg runs a new package's preinst from `tmp.ci/`, where debconf's frontend reads
        // the package name off `tmp.ci/control`; from `info/` it cannot tell and would
        // register the templates the preinst loads to the owner "unknown": hence
        // DEBCONF_PACKAGE. Everything is quoted so no name can become shell syntax.
        let (n, a, p) = (sh_quote(&pkg.name), sh_quote(&pkg.arch), sh_quote(&path));
        script.push_str(&format!(
            "echo {msg}\n\
             DPKG_MAINTSCRIPT_PACKAGE={n} DPKG_MAINTSCRIPT_ARCH={a} DPKG_MAINTSCRIPT_NAME=preinst \
             DEBCONF_PACKAGE={n} {p} install \
             || {{ rc=$?; echo \"{MARK}preinst of \"{n}\" exited with status $rc\"; exit $rc; }}\n",
            msg = sh_quote(&format!("I: running preinst install of {}", pkg.name)),
        ));
    }
}

/// One package of the status file (the fields the second stage needs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pkg {
    name: String,
    arch: String,
    version: String,
    status: String,
    multi_arch_same: bool,
    /// Alternative groups of package names (versions and arch qualifiers dropped).
    depends: Vec<Vec<String>>,
    pre_depends: Vec<Vec<String>>,
    provides: Vec<String>,
}

impl Pkg {
    fn unpacked(&self) -> bool {
        self.status == "install ok unpacked"
    }

    /// The name dpkg accepts on its command line for this instance.
    fn dpkg_name(&self) -> String {
        if self.multi_arch_same {
            format!("{}:{}", self.name, self.arch)
        } else {
            self.name.clone()
        }
    }

    /// Path inside the root of `info/<pkg>[:arch].<what>`, if the file exists.
    fn info_file(&self, root: &Path, what: &str) -> Option<String> {
        let mut names = vec![format!("{}:{}.{what}", self.name, self.arch)];
        let plain = format!("{}.{what}", self.name);
        if self.multi_arch_same {
            names.push(plain);
        } else {
            names.insert(0, plain);
        }
        names
            .into_iter()
            .map(|n| format!("{ADMINDIR}/info/{n}"))
            .find(|p| root.join(&p[1..]).is_file())
    }
}

fn parse_status(text: &str) -> Vec<Pkg> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut f: HashMap<&str, &str> = HashMap::new();
        for line in stanza.lines() {
            if line.starts_with([' ', '\t']) {
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                f.insert(k.trim(), v.trim());
            }
        }
        let Some(name) = f.get("Package") else {
            continue;
        };
        out.push(Pkg {
            name: name.to_string(),
            arch: f.get("Architecture").unwrap_or(&"all").to_string(),
            version: f.get("Version").unwrap_or(&"").to_string(),
            status: f.get("Status").unwrap_or(&"").to_string(),
            multi_arch_same: f.get("Multi-Arch") == Some(&"same"),
            depends: relation_names(f.get("Depends").copied()),
            pre_depends: relation_names(f.get("Pre-Depends").copied()),
            provides: relation_names(f.get("Provides").copied())
                .into_iter()
                .flatten()
                .collect(),
        });
    }
    out
}

/// `a (>= 1) | b:any, c` → `[[a, b], [c]]`.
fn relation_names(field: Option<&str>) -> Vec<Vec<String>> {
    let Some(field) = field else {
        return Vec::new();
    };
    field
        .split(',')
        .map(|group| {
            group
                .split('|')
                .filter_map(|alt| {
                    let name = alt.split(['(', '[', '<']).next()?.trim();
                    let name = name.split(':').next()?.trim();
                    (!name.is_empty()).then(|| name.to_string())
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// `/usr/sbin/policy-rc.d` answering 101 ("action forbidden") so that no maintainer
/// script starts a service; removed afterwards unless it was there before.
struct PolicyRcd {
    path: PathBuf,
    ours: bool,
}

impl PolicyRcd {
    fn install(root: &Path, owner: Option<u32>) -> Result<Self, SandboxError> {
        let path = root.join(POLICY_RC_D);
        let file_err = |step, source| SandboxError::StageFile {
            step,
            path: path.clone(),
            source,
        };
        // Write through real directories only: never follow a link out of the tree.
        for dir in ["usr", "usr/sbin"] {
            let md = std::fs::symlink_metadata(root.join(dir)).map_err(|e| file_err("check", e))?;
            if !md.is_dir() {
                return Err(file_err(
                    "check",
                    std::io::Error::other(format!("{dir} is not a directory")),
                ));
            }
        }
        if std::fs::symlink_metadata(&path).is_ok() {
            return Ok(PolicyRcd { path, ours: false });
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| file_err("create", e))?;
        f.write_all(b"#!/bin/sh\nexit 101\n")
            .map_err(|e| file_err("write", e))?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(|e| file_err("chmod", e))?;
        if let Some(base) = owner {
            std::os::unix::fs::fchown(&f, Some(base), Some(base))
                .map_err(|e| file_err("chown", e))?;
        }
        Ok(PolicyRcd { path, ours: true })
    }

    fn remove(mut self) -> Result<(), SandboxError> {
        if std::mem::take(&mut self.ours) {
            std::fs::remove_file(&self.path).map_err(|source| SandboxError::StageFile {
                step: "remove",
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

impl Drop for PolicyRcd {
    fn drop(&mut self) {
        if self.ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Runs a command with stdout and stderr into `log` (stdin /dev/null); a failure
/// becomes `StageCommand` with the last lines of output.
fn run_logged(
    spec: &SandboxSpec,
    argv: &[String],
    log: &mut dyn Write,
    what: &str,
) -> Result<(), SandboxError> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SandboxError::Spec {
            what: format!("pipe for the output of {what}: {e}"),
        })?;
    let w2 = w.try_clone().map_err(|e| SandboxError::Spec {
        what: format!("pipe for the output of {what}: {e}"),
    })?;
    let mut tail = Tail::default();
    let status = std::thread::scope(|s| {
        let h = s.spawn(move || run(spec, argv, Stdio::null(), Stdio::from(w), Stdio::from(w2)));
        // run() drops its copies of the write end once the helper is spawned, so this
        // reaches EOF when the sandbox (and everything in it) is gone.
        let mut r = std::fs::File::from(r);
        let mut buf = [0u8; 16 * 1024];
        let mut log_err = None;
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    tail.push(&buf[..n]);
                    if log_err.is_none() {
                        log_err = log.write_all(&buf[..n]).err();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let res = h.join().unwrap_or_else(|_| {
            Err(SandboxError::Spec {
                what: format!("sandbox thread for {what} panicked"),
            })
        });
        match log_err {
            Some(e) if res.is_ok() => Err(SandboxError::Log(e)),
            _ => res,
        }
    })?;
    if status != ExitStatusInfo::Exited(0) {
        return Err(SandboxError::StageCommand {
            what: what.to_string(),
            status,
            tail: tail.text(),
        });
    }
    Ok(())
}

/// The last bytes of a stream, for error messages.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    const KEEP: usize = 8 * 1024;

    fn push(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
        if self.0.len() > 2 * Self::KEEP {
            self.0.drain(..self.0.len() - Self::KEEP);
        }
    }

    fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.0);
        let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        lines[from..].join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let text = "Package: base-passwd\nStatus: install ok unpacked\nVersion: 3.6.1\nArchitecture: amd64\nDescription: x\n more\n\nPackage: libc6\nStatus: install ok unpacked\nMulti-Arch: same\nArchitecture: amd64\nVersion: 2.36\nConffiles:\n /etc/ld.so.conf.d/x86_64-linux-gnu.conf newconffile\n\nPackage: done\nStatus: install ok installed\nArchitecture: all\n";
        let p = parse_status(text);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].name, "base-passwd");
        assert!(p[0].unpacked() && !p[0].multi_arch_same);
        assert!(p[1].multi_arch_same);
        assert_eq!(p[1].version, "2.36");
        assert!(!p[2].unpacked());
    }

    #[test]
    fn phases_follow_debootstrap() {
        let text = "Package: libc6\nStatus: install ok unpacked\nArchitecture: amd64\nMulti-Arch: same\n\n\
Package: passwd\nStatus: install ok unpacked\nDepends: libc6 (>= 2.34), login:any\n\n\
Package: login\nStatus: install ok unpacked\nPre-Depends: libc6\n\n\
Package: libssl3\nStatus: install ok unpacked\nDepends: libc6\n\n\
Package: systemd\nStatus: install ok unpacked\nPre-Depends: libssl3 (>= 3), libc6\nDepends: libsd (= 1)\n\n\
Package: libsd\nStatus: install ok unpacked\n\n\
Package: systemd-sysv\nStatus: install ok unpacked\nPre-Depends: systemd\n\n\
Package: init\nStatus: install ok unpacked\nPre-Depends: systemd-sysv | sysvinit-core\n\n\
Package: tool\nStatus: install ok unpacked\nPre-Depends: awk\nDepends: init\n\n\
Package: mawk\nStatus: install ok installed\nProvides: awk\n";
        let pkgs = parse_status(text);
        assert_eq!(pkgs[1].depends, vec![vec!["libc6"], vec!["login"]]);
        assert_eq!(phases(&pkgs, &[]), vec![None]);
        let set = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<HashSet<_>>());
        assert_eq!(
            phases(&pkgs, &["passwd".into()]),
            vec![
                set(&["passwd", "libc6", "login"]),
                // systemd's pre-dependency, init's and systemd-sysv's, with dependencies;
                // tool's awk is provided by a configured package.
                set(&["libssl3", "systemd", "libsd", "systemd-sysv"]),
                None
            ]
        );
        assert_eq!(pkgs[0].dpkg_name(), "libc6:amd64");
    }

    #[test]
    fn info_file_lookup() {
        let d = tempfile::tempdir().unwrap();
        let info = d.path().join("var/lib/dpkg/info");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(info.join("libc6:amd64.preinst"), "").unwrap();
        std::fs::write(info.join("base-passwd.preinst"), "").unwrap();
        let mk = |n: &str, same| Pkg {
            name: n.into(),
            arch: "amd64".into(),
            version: String::new(),
            status: "install ok unpacked".into(),
            multi_arch_same: same,
            depends: Vec::new(),
            pre_depends: Vec::new(),
            provides: Vec::new(),
        };
        assert_eq!(
            mk("libc6", true).info_file(d.path(), "preinst").as_deref(),
            Some("/var/lib/dpkg/info/libc6:amd64.preinst")
        );
        assert_eq!(
            mk("base-passwd", false)
                .info_file(d.path(), "preinst")
                .as_deref(),
            Some("/var/lib/dpkg/info/base-passwd.preinst")
        );
        assert_eq!(mk("mawk", false).info_file(d.path(), "preinst"), None);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let mut t = Tail::default();
        for i in 0..5000 {
            t.push(format!("line {i}\n").as_bytes());
        }
        let s = t.text();
        assert_eq!(s.lines().count(), TAIL_LINES);
        assert!(s.ends_with("line 4999"));
    }

    #[test]
    fn policy_rc_d_in_and_out() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/sbin")).unwrap();
        let g = PolicyRcd::install(d.path(), None).unwrap();
        let p = d.path().join(POLICY_RC_D);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "#!/bin/sh\nexit 101\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755
        );
        g.remove().unwrap();
        assert!(!p.exists());
        // A pre-existing policy-rc.d is left alone.
        std::fs::write(&p, "mine").unwrap();
        drop(PolicyRcd::install(d.path(), None).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "mine");
        // Dropped without remove() (error path): still cleaned up.
        std::fs::remove_file(&p).unwrap();
        drop(PolicyRcd::install(d.path(), None).unwrap());
        assert!(!p.exists());
        // usr/sbin as a symlink is refused.
        let e = tempfile::tempdir().unwrap();
        std::fs::create_dir(e.path().join("usr")).unwrap();
        std::os::unix::fs::symlink("/tmp", e.path().join("usr/sbin")).unwrap();
        assert!(PolicyRcd::install(e.path(), None).is_err());
    }
}
