//! Acceptance test of booting: a bookworm minbase tree with systemd, built by our own
//! bootstrap CLI from the host's mirror, in each mode — plain, and built with
//! `--private-users=BASE` — boots under systemd-nspawn until `systemctl
//! is-system-running` says `running`; commands run inside report their exit status
//! exactly; poweroff leaves no nspawn process, cgroup or mount behind.
//!
//! Skips with a reason when systemd-nspawn is missing (`apt-get install
//! systemd-container`) or the host has no reachable http mirror.

use nspawn::testkit::scratch::{bookworm_minbase, host_mirror, mirror_unreachable, Scratch};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nspawn::machine::{BootSpec, ExitStatusInfo, Machine, MachineError, NetworkMode};

const HELPER: &str = env!("CARGO_BIN_EXE_packer-plugin-nspawn");
/// A multiple of 65536, away from nspawn's `pick` range.
const BASE: u32 = 6_553_600;

/// Boots one at a time: two vCPUs, and the timings are reported.
static SERIAL: Mutex<()> = Mutex::new(());

fn bootstrap(mirror: &str, target: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["--include", "systemd,systemd-sysv,dbus"];
    args.extend_from_slice(extra);
    bookworm_minbase(HELPER, mirror, target, &args)
        .output()
        .unwrap()
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Host processes whose command line names this machine.
fn processes_of(name: &str) -> Vec<(i32, String)> {
    let needle = format!("--machine={name}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.split(' ').any(|a| a == needle) {
            out.push((pid, text));
        }
    }
    out
}

fn mounts_under(p: &Path) -> Vec<String> {
    let needle = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&needle)))
        .map(String::from)
        .collect()
}

fn boot_and_check(tag: &str, private_users: Option<u32>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if nspawn::machine::nspawn_binary().is_none() {
        eprintln!("SKIP: systemd-nspawn not installed (apt-get install systemd-container)");
        return;
    }
    let Some(mirror) = host_mirror() else {
        eprintln!("SKIP: no http(s) mirror in the host's APT sources");
        return;
    };
    let scratch = Scratch::new("machine-");
    let root: PathBuf = scratch.path().join(tag);
    let base_arg = private_users.map(|b| b.to_string());
    let mut extra = Vec::new();
    if let Some(b) = &base_arg {
        extra.extend(["--private-users", b.as_str()]);
    }
    let t = Instant::now();
    let out = bootstrap(&mirror, &root, &extra);
    if mirror_unreachable(&out) {
        eprintln!(
            "SKIP: mirror {mirror} unreachable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        out.status.success(),
        "bootstrap --include systemd,systemd-sysv,dbus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{tag}: bootstrap in {:.2?}", t.elapsed());

    let name = format!("pm-{tag}-{}", std::process::id());
    let mut spec = BootSpec::new(&root, &name);
    spec.private_users = private_users;
    spec.timeout = Duration::from_secs(120);
    spec.helper = Some(HELPER.into());
    let m = Machine::boot(&spec).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{tag}: boot to READY=1 in {:.3?} (leader pid {})",
        m.ready_after(),
        m.leader()
    );
    let cgroups = m.cgroups().to_vec();
    assert!(!cgroups.is_empty());
    assert!(!processes_of(&name).is_empty(), "nspawn runs");

    let t = Instant::now();
    let state = m
        .exec_output(&argv(&["systemctl", "is-system-running", "--wait"]), &[])
        .unwrap();
    let text = String::from_utf8_lossy(&state.stdout).trim().to_string();
    if text != "running" {
        let failed = m
            .exec_output(&argv(&["systemctl", "--failed", "--no-pager"]), &[])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        panic!(
            "{tag}: is-system-running = {text:?} ({}; stderr {:?}); failed units:\n{failed}",
            state.status,
            String::from_utf8_lossy(&state.stderr)
        );
    }
    assert_eq!(state.status, ExitStatusInfo::Exited(0));
    eprintln!(
        "{tag}: is-system-running --wait = running after {:.3?} more",
        t.elapsed()
    );

    // Exact statuses, exit codes and signal deaths.
    let run = |a: &[&str]| m.exec_output(&argv(a), &[]).unwrap();
    assert_eq!(
        run(&["sh", "-c", "exit 3"]).status,
        ExitStatusInfo::Exited(3)
    );
    assert_eq!(
        run(&["sh", "-c", "kill -9 $$"]).status,
        ExitStatusInfo::Signaled(9)
    );
    // We really are inside: its pid namespace (pid 1 is systemd), its id mapping, its
    // environment as given, root.
    let o = run(&[
        "sh",
        "-c",
        "cat /proc/1/comm; id -u; cat /proc/self/uid_map",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("systemd"), "{text}");
    assert_eq!(lines.next(), Some("0"), "{text}");
    let map: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    match private_users {
        Some(b) => assert_eq!(map, ["0", &b.to_string(), "65536"], "{text}"),
        None => assert_eq!(map, ["0", "0", "4294967295"], "{text}"),
    }
    let o = m
        .exec_output(
            &argv(&["sh", "-c", "printf %s \"$GREETING\""]),
            &[("GREETING".into(), "hi there".into())],
        )
        .unwrap();
    assert_eq!(o.stdout, b"hi there");
    let e = m
        .exec_output(&argv(&["/no/such/program"]), &[])
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/program"), "{e}");
    let t = Instant::now();
    for _ in 0..10 {
        assert!(run(&["true"]).status.success());
    }
    eprintln!("{tag}: exec of true: {:.1?} each", t.elapsed() / 10);

    let t = Instant::now();
    m.poweroff(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{tag}: poweroff in {:.3?}", t.elapsed());

    assert_eq!(processes_of(&name), Vec::<(i32, String)>::new());
    for c in &cgroups {
        assert!(!c.exists(), "cgroup {} left", c.display());
    }
    assert_eq!(mounts_under(&root), Vec::<String>::new());
    assert!(!Path::new("/run/systemd/nspawn/propagate")
        .join(&name)
        .exists());
    assert_clean(&name, &root, &cgroups);

    if private_users.is_none() {
        // Dropping a running machine kills it and cleans up the same way. This one has
        // a private network: only lo.
        spec.network = NetworkMode::Private;
        let m = Machine::boot(&spec).unwrap_or_else(|e| panic!("{e}"));
        let o = m
            .exec_output(&argv(&["cat", "/proc/net/dev"]), &[])
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let ifaces: Vec<&str> = text
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next())
            .map(str::trim)
            .collect();
        assert_eq!(ifaces, ["lo"], "{text}");
        let cgroups = m.cgroups().to_vec();
        drop(m);
        assert_clean(&name, &root, &cgroups);
        // So does a boot that runs out of time.
        spec.timeout = Duration::from_millis(100);
        let e = Machine::boot(&spec).unwrap_err();
        assert!(matches!(e, MachineError::BootTimeout { .. }), "{e}");
        assert_clean(&name, &root, &cgroups);
    }
}

fn assert_clean(name: &str, root: &Path, cgroups: &[PathBuf]) {
    assert_eq!(processes_of(name), Vec::<(i32, String)>::new());
    for c in cgroups {
        assert!(!c.exists(), "cgroup {} left", c.display());
    }
    assert_eq!(mounts_under(root), Vec::<String>::new());
    assert!(!Path::new("/run/systemd/nspawn/propagate")
        .join(name)
        .exists());
    assert!(!Path::new(nspawn::machine::STATE_DIR).join(name).exists());
    let lock = {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(root).unwrap();
        format!("/run/systemd/nspawn/locks/inode-{}:{}", md.dev(), md.ino())
    };
    assert!(!Path::new(&lock).exists(), "{lock} left");
}

#[test]
fn boots_plain_tree() {
    boot_and_check("plain", None);
}

#[test]
fn boots_private_users_tree() {
    boot_and_check("userns", Some(BASE));
}

/// A tree nspawn refuses: the error comes quickly, quotes the console and leaves
/// nothing behind.
#[test]
fn failed_boot_is_reported_and_cleaned_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if nspawn::machine::nspawn_binary().is_none() {
        eprintln!("SKIP: systemd-nspawn not installed (apt-get install systemd-container)");
        return;
    }
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let name = format!("pm-empty-{}", std::process::id());
    let mut spec = BootSpec::new(d.path(), &name);
    spec.timeout = Duration::from_secs(30);
    spec.helper = Some(HELPER.into());
    let e = Machine::boot(&spec).unwrap_err();
    assert!(matches!(e, MachineError::BootExited { .. }), "{e}");
    eprintln!("failed boot reported as: {e}");
    let text = e.to_string();
    assert!(text.contains(&name), "{text}");
    assert!(text.contains("OS"), "console quoted: {text}");
    assert_eq!(processes_of(&name), Vec::<(i32, String)>::new());
    for h in ["systemd", "unified"] {
        let cg = Path::new("/sys/fs/cgroup")
            .join(h)
            .join(format!("packer-nspawn-{name}"));
        assert!(!cg.exists(), "{} left", cg.display());
    }
    assert!(!Path::new(nspawn::machine::STATE_DIR).join(&name).exists());
}

/// The enter mode of the sandbox helper, without nspawn: entering our own process
/// joins nothing new and still reports exit codes and signals exactly.
#[test]
fn enter_own_process() {
    let target = nspawn::sandbox::EnterSpec {
        pid: std::process::id() as i32,
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: PathBuf::from("/"),
        helper: Some(HELPER.into()),
    };
    let go = |script: &str| {
        nspawn::sandbox::enter(
            &target,
            &argv(&["sh", "-c", script]),
            std::process::Stdio::null(),
            std::process::Stdio::null(),
            std::process::Stdio::null(),
        )
        .unwrap()
    };
    assert_eq!(go("exit 3"), ExitStatusInfo::Exited(3));
    assert_eq!(go("kill -9 $$"), ExitStatusInfo::Signaled(9));
    let bad = nspawn::sandbox::EnterSpec {
        pid: i32::MAX,
        ..target.clone()
    };
    let e = nspawn::sandbox::enter(
        &bad,
        &argv(&["true"]),
        std::process::Stdio::null(),
        std::process::Stdio::null(),
        std::process::Stdio::null(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(&i32::MAX.to_string()), "{e}");
}
