//! End to end: the `nspawn` builder driven by the real Packer 1.6.6, booting real
//! systemd-nspawn machines bootstrapped from the host's mirror. Machines live on a
//! tmpfs per test. Skipped (with the reason printed) when packer, systemd-nspawn,
//! root or an http(s) mirror in the host's APT sources is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const PACKER: &str = "/usr/bin/packer";
const CACHE: &str = "/var/tmp/packer-plugin-nspawn-test-cache";

struct Env {
    dir: tempfile::TempDir,
    machines: PathBuf,
    mirror: String,
    tag: String,
}

impl Env {
    fn new(tag: &str) -> Option<Env> {
        if !Path::new(PACKER).exists() {
            eprintln!("SKIP: {PACKER} is not installed");
            return None;
        }
        if nspawn::machine::nspawn_binary().is_none() {
            eprintln!("SKIP: systemd-nspawn not installed (apt-get install systemd-container)");
            return None;
        }
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: needs root (bootstrap and systemd-nspawn)");
            return None;
        }
        let Some(mirror) = nspawn::archive::sources::host_defaults()
            .map(|h| h.mirror)
            .filter(|m| m.starts_with("http"))
        else {
            eprintln!("SKIP: no http(s) mirror in the host's APT sources");
            return None;
        };
        std::fs::create_dir_all("/var/tmp").unwrap();
        let dir = tempfile::Builder::new()
            .prefix("builder-e2e-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let plugins = dir.path().join("cfg/.packer.d/plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        std::os::unix::fs::symlink(
            env!("CARGO_BIN_EXE_packer-plugin-nspawn"),
            plugins.join("packer-builder-nspawn"),
        )
        .unwrap();
        let machines = dir.path().join("machines");
        std::fs::create_dir_all(&machines).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &machines,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("mode=0755"),
        )
        .expect("mount a tmpfs for machines_dir");
        Some(Env {
            dir,
            machines,
            mirror,
            tag: format!("{tag}{}", std::process::id()),
        })
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.work().join(name), text).unwrap();
    }

    fn packer(&self, args: &[&str]) -> Command {
        let mut c = Command::new(PACKER);
        c.args(args)
            .current_dir(self.work())
            .env("HOME", self.dir.path().join("home"))
            .env("PACKER_CONFIG_DIR", self.dir.path().join("cfg"))
            .env("CHECKPOINT_DISABLE", "1")
            .env("PACKER_LOG", "1")
            .env("PACKER_LOG_PATH", self.dir.path().join("packer.log"))
            .env_remove("PACKER_PLUGIN_PATH")
            .stdin(Stdio::null());
        c
    }

    /// Runs packer; returns (success, output, wall time).
    fn run(&self, args: &[&str]) -> (bool, String, Duration) {
        let t = Instant::now();
        let out: Output = self.packer(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text, t.elapsed())
    }

    /// A machine name unique to this test process.
    fn name(&self, n: &str) -> String {
        format!("{}-{n}", self.tag)
    }

    /// Common source options.
    fn common(&self) -> String {
        format!(
            "  machines_dir = \"{}\"\n  cache_dir = \"{CACHE}\"\n  mirror = \"{}\"\n  suite = \"bookworm\"\n  timeout = \"60s\"\n",
            self.machines.display(),
            self.mirror
        )
    }

    fn staging_left(&self) -> Vec<String> {
        std::fs::read_dir(&self.machines)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.machines, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn unreachable_mirror(out: &str) -> bool {
    out.contains("dns error")
        || out.contains("Connection refused")
        || out.contains("connect")
            && (out.contains("timed out") || out.contains("error sending request"))
}

fn ready_times(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.split("ready after ").nth(1))
        .map(|s| s.split(' ').take(2).collect::<Vec<_>>().join(" "))
        .collect()
}

fn nspawn_processes(name: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("systemd-nspawn") && cmd.contains(name) {
            v.push(cmd);
        }
    }
    v
}

fn mounts_under(p: &Path) -> Vec<String> {
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let p = p.display().to_string();
    m.lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| mp.starts_with(&p) && mp != p)
        })
        .map(String::from)
        .collect()
}

/// base (bootstrap, export .tar.zst) → import of that file → clone of the base,
/// each with shell and file provisioners; a failing command fails its build with
/// the real exit code; an import over http://127.0.0.1; -force and its absence.
fn example_flow(tag: &str, private_users: bool) {
    let Some(env) = Env::new(tag) else { return };
    let pu = if private_users {
        "  private_users = true\n"
    } else {
        ""
    };
    let (base, imp, cln, bad, web) = (
        env.name("base"),
        env.name("imported"),
        env.name("cloned"),
        env.name("failing"),
        env.name("web"),
    );
    let export = env.work().join("base.tar.zst");
    env.write("up.txt", "uploaded\n");
    std::fs::set_permissions(
        env.work().join("up.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o751),
    )
    .unwrap();
    let common = env.common();
    env.write(
        "base.pkr.hcl",
        &format!(
            r#"source "nspawn" "base" {{
{common}{pu}  name = "{base}"
  variant = "minbase"
  export = "{export}"
}}
build {{
  sources = ["source.nspawn.base"]
  provisioner "shell" {{
    inline = ["echo built-in-base > /etc/marker", "cat /proc/1/comm"]
  }}
}}
"#,
            export = export.display()
        ),
    );
    let (ok, out, t_base) = env.run(&["build", "base.pkr.hcl"]);
    if !ok && unreachable_mirror(&out) {
        eprintln!("SKIP: mirror {} unreachable: {out}", env.mirror);
        return;
    }
    assert!(ok, "base build failed:\n{out}");
    assert!(out.contains("systemd"), "{out}");
    assert!(export.is_file());
    let m = env.machines.join(&base);
    assert_eq!(
        std::fs::read_to_string(m.join("etc/marker")).unwrap(),
        "built-in-base\n"
    );
    assert_eq!(std::fs::read(m.join("etc/machine-id")).unwrap(), b"");
    assert!(!m.join("var/lib/dbus/machine-id").exists());
    // the export has canonical owners, whatever range the tree is owned by
    let f = std::fs::File::open(&export).unwrap();
    let mut ar = tar::Archive::new(zstd::Decoder::new(f).unwrap());
    let mut n = 0;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        let uid = e.header().uid().unwrap();
        assert!(
            uid < 65536,
            "{} owned by {uid}",
            e.path().unwrap().display()
        );
        n += 1;
    }
    assert!(n > 1000, "{n} entries");
    assert!(env.staging_left().is_empty(), "{:?}", env.staging_left());
    // Per-phase timings: printed at the end and written next to the artifact.
    assert!(out.contains("nspawn: timings"), "{out}");
    let tj = export.with_file_name("base.tar.zst.timings.json");
    let timings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&tj).expect("timings JSON next to the export"))
            .unwrap();
    for phase in [
        "source_seconds",
        "boot_to_ready",
        "provision",
        "stop",
        "scrub",
        "total",
    ] {
        assert!(timings[phase].as_f64().is_some(), "{phase} in {timings}");
    }
    assert!(
        timings["bootstrap"]["resolve"].as_f64().is_some(),
        "{timings}"
    );
    assert!(
        timings["export"]["bytes_out"].as_u64().unwrap() > 0,
        "{timings}"
    );
    assert!(
        timings["export"]["ratio"].as_f64().unwrap() < 1.0,
        "{timings}"
    );
    eprintln!(
        "{tag}: base build {:.1?} (boot to ready {:?})",
        t_base,
        ready_times(&out)
    );

    // import of the export and clone of the base, with shell + file provisioners
    let provs = |marker: &str| {
        format!(
            r#"  provisioner "shell" {{
    inline = ["cat /etc/marker", "test \"$FOO\" = bar", "echo {marker} > /tmp/in-tmp", "echo to-stderr 1>&2"]
  }}
  provisioner "file" {{
    source = "up.txt"
    destination = "/tmp/up.txt"
  }}
  provisioner "shell" {{
    inline = ["stat -c %a /tmp/up.txt", "cat /tmp/up.txt"]
  }}
  provisioner "file" {{
    source = "/tmp/in-tmp"
    destination = "down-{marker}.txt"
    direction = "download"
  }}
"#
        )
    };
    let mut t = Duration::ZERO;
    let mut readies = Vec::new();
    for (src, name, from) in [
        ("imp", &imp, format!("import = \"{}\"", export.display())),
        ("cln", &cln, format!("clone = \"{base}\"")),
    ] {
        env.write(
            &format!("{src}.pkr.hcl"),
            &format!(
                r#"source "nspawn" "{src}" {{
{common}{pu}  name = "{name}"
  {from}
  env = {{ FOO = "bar" }}
}}
build {{
  sources = ["source.nspawn.{src}"]
{p}
}}
"#,
                p = provs(src)
            ),
        );
        let (ok, out, took) = env.run(&["build", &format!("{src}.pkr.hcl")]);
        assert!(ok, "{src} build failed:\n{out}");
        assert!(out.contains("751"), "upload keeps the mode:\n{out}");
        assert!(out.contains("to-stderr"), "{out}");
        t += took;
        readies.extend(ready_times(&out));
    }
    for n in ["imp", "cln"] {
        assert_eq!(
            std::fs::read_to_string(env.work().join(format!("down-{n}.txt"))).unwrap(),
            format!("{n}\n"),
            "download from the container's own /tmp"
        );
    }
    for n in [&imp, &cln] {
        assert_eq!(
            std::fs::read_to_string(env.machines.join(n).join("etc/marker")).unwrap(),
            "built-in-base\n"
        );
    }
    eprintln!("{tag}: import + clone builds {t:.1?} (boot to ready {readies:?})");

    // boot = false: provisioning on the tree in our own namespaces, no systemd
    let nb = env.name("noboot");
    env.write(
        "noboot.pkr.hcl",
        &format!(
            r#"source "nspawn" "nb" {{
{common}{pu}  name = "{nb}"
  clone = "{base}"
  boot = false
}}
build {{
  sources = ["source.nspawn.nb"]
  provisioner "shell" {{ inline = ["echo pid1=$(cat /proc/1/comm)", "id -u", "echo nb > /etc/marker2"] }}
  provisioner "file" {{
    source = "up.txt"
    destination = "/root/up.txt"
  }}
}}
"#
        ),
    );
    let (ok, out, t) = env.run(&["build", "noboot.pkr.hcl"]);
    assert!(ok, "boot = false build failed:\n{out}");
    assert!(!out.contains("pid1=systemd"), "{out}");
    assert!(env.machines.join(&nb).join("etc/marker2").exists());
    assert!(env.machines.join(&nb).join("root/up.txt").exists());
    eprintln!("{tag}: boot = false build {t:.1?}");

    // a failing command fails the build with its real exit code; nothing is left
    env.write(
        "failing.pkr.hcl",
        &format!(
            r#"source "nspawn" "bad" {{
{common}{pu}  name = "{bad}"
  clone = "{base}"
}}
build {{
  sources = ["source.nspawn.bad"]
  provisioner "shell" {{ inline = ["echo going to fail", "exit 42"] }}
}}
"#
        ),
    );
    let (ok, out, _) = env.run(&["build", "failing.pkr.hcl"]);
    assert!(!ok, "{out}");
    assert!(out.contains("exit status: 42"), "{out}");
    assert!(!env.machines.join(&bad).exists());
    assert!(env.staging_left().is_empty(), "{:?}", env.staging_left());
    assert!(nspawn_processes(&bad).is_empty());

    // -on-error=abort keeps the failed tree and says how to enter it
    let (ok, out, _) = env.run(&["build", "-on-error=abort", "failing.pkr.hcl"]);
    assert!(!ok, "{out}");
    assert!(out.contains("systemd-nspawn -D"), "{out}");
    let kept = env.staging_left();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(env.machines.join(&kept[0]).join("etc/marker").exists());
    assert!(
        nspawn_processes(&bad).is_empty(),
        "the kept machine is stopped"
    );
    nspawn::bootstrap::remove_tree(&env.machines.join(&kept[0])).unwrap();

    // -on-error=ask without a terminal: the question cannot be asked, so it cleans up
    let (ok, out, _) = env.run(&["build", "-on-error=ask", "failing.pkr.hcl"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot ask") || out.contains("Clean up"),
        "{out}"
    );
    assert!(env.staging_left().is_empty(), "{:?}", env.staging_left());
    assert!(nspawn_processes(&bad).is_empty());

    // import over http from 127.0.0.1
    let server = nspawn::testkit::http::HttpServer::start(env.work());
    let url = server.url("/base.tar.zst");
    env.write(
        "web.pkr.hcl",
        &format!(
            r#"source "nspawn" "web" {{
{common}{pu}  name = "{web}"
  import = "{url}"
}}
build {{
  sources = ["source.nspawn.web"]
  provisioner "shell" {{ inline = ["cat /etc/marker"] }}
}}
"#
        ),
    );
    let (ok, out, t) = env.run(&["build", "web.pkr.hcl"]);
    assert!(ok, "http import failed:\n{out}");
    assert!(out.contains("built-in-base"), "{out}");
    eprintln!("{tag}: http import build {t:.1?}");

    // same name again: refused without -force, the first stays intact
    let (ok, out, _) = env.run(&["build", "web.pkr.hcl"]);
    assert!(!ok, "{out}");
    assert!(out.contains("already exists"), "{out}");
    assert!(env.machines.join(&web).join("etc/marker").exists());
    // with -force it is replaced
    std::fs::write(env.machines.join(&web).join("old-build"), "").unwrap();
    let (ok, out, _) = env.run(&["build", "-force", "web.pkr.hcl"]);
    assert!(ok, "-force build failed:\n{out}");
    assert!(!env.machines.join(&web).join("old-build").exists());
    assert!(env.staging_left().is_empty(), "{:?}", env.staging_left());
    if private_users {
        use std::os::unix::fs::MetadataExt;
        for n in [&base, &imp, &cln, &web] {
            let uid = std::fs::metadata(env.machines.join(n)).unwrap().uid();
            assert!(
                uid >= 65536 && uid % 65536 == 0,
                "{n} owned by {uid}, not a private-users range"
            );
        }
    }
}

#[test]
fn example_template_flow() {
    example_flow("e", false);
}

#[test]
fn example_template_flow_private_users() {
    example_flow("p", true);
}

#[test]
fn validate_names_the_option() {
    let Some(env) = Env::new("v") else { return };
    env.write(
        "v.pkr.hcl",
        r#"source "nspawn" "v" {
  import = "/nonexistent.tar"
  clone = "other"
  timeout = "soon"
  export = "/tmp/x.tar.bz2"
  variant = "huge"
}
build { sources = ["source.nspawn.v"] }
"#,
    );
    let (ok, out, _) = env.run(&["validate", "v.pkr.hcl"]);
    assert!(!ok);
    for opt in ["import and clone", "timeout:", "export:", "variant:"] {
        assert!(out.contains(opt), "{opt} not named:\n{out}");
    }
}

#[test]
fn sigterm_during_provisioning_leaves_nothing() {
    let Some(env) = Env::new("s") else { return };
    let name = env.name("sig");
    env.write(
        "s.pkr.hcl",
        &format!(
            r#"source "nspawn" "s" {{
{}  name = "{name}"
}}
build {{
  sources = ["source.nspawn.s"]
  provisioner "shell" {{ inline = ["echo provisioning-now", "sleep 300"] }}
}}
"#,
            env.common()
        ),
    );
    let log = env.work().join("s.out");
    let mut child = env
        .packer(&["build", "s.pkr.hcl"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("provisioning-now") {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            if unreachable_mirror(&text) {
                eprintln!("SKIP: mirror unreachable: {text}");
                return;
            }
            panic!("packer ended ({st}) before provisioning:\n{text}");
        }
        assert!(Instant::now() < deadline, "no provisioning:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "sigterm: packer exited {st} {:.1?} after SIGTERM",
        t.elapsed()
    );
    assert!(!st.success(), "{text}");
    assert!(nspawn_processes(&name).is_empty(), "nspawn still runs");
    assert!(mounts_under(&env.machines).is_empty(), "mounts left");
    assert!(env.staging_left().is_empty(), "{:?}", env.staging_left());
    assert!(!env.machines.join(&name).exists());
    let cg = format!("packer-nspawn-{name}");
    let leftover: Vec<String> = walk_cgroups(Path::new("/sys/fs/cgroup"), &cg);
    assert!(leftover.is_empty(), "cgroups left: {leftover:?}");
}

fn walk_cgroups(root: &Path, leaf: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in walkdir::WalkDir::new(root)
        .max_depth(3)
        .into_iter()
        .flatten()
    {
        if e.file_type().is_dir() && e.file_name().to_string_lossy().contains(leaf) {
            v.push(e.path().display().to_string());
        }
    }
    v
}
