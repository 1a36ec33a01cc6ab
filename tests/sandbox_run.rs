//! Runs commands in real sandboxes (needs root): a tiny root made of a few
//! directories, the host's /usr bound read-only, and bin/lib/lib64 symlinks into it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nspawn::sandbox::{run, shift_tree, ExitStatusInfo, IdMap, SandboxError, SandboxSpec};

const HELPER: &str = env!("CARGO_BIN_EXE_packer-plugin-nspawn");

fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: sandbox tests need root");
        return false;
    }
    true
}

/// A scratch root under /var/tmp with usr bound from the host.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::Builder::new()
            .prefix("sandbox-test-")
            .tempdir_in("/var/tmp")
            .unwrap();
        for d in ["usr", "etc", "tmp", "root", "var/tmp"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        for l in ["bin", "sbin", "lib", "lib64"] {
            std::os::unix::fs::symlink(format!("usr/{l}"), dir.path().join(l)).unwrap();
        }
        Root { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn spec(&self) -> SandboxSpec {
        let mut s = SandboxSpec::new(self.path());
        s.bind_ro = vec![(PathBuf::from("/usr"), PathBuf::from("/usr"))];
        s.helper = Some(HELPER.into());
        s
    }
}

/// Runs `sh -c script`, returning the status and stdout.
fn sh(spec: &SandboxSpec, script: &str) -> Result<(ExitStatusInfo, String), SandboxError> {
    let out = tempfile::tempfile().unwrap();
    let st = run(
        spec,
        &["/bin/sh".into(), "-c".into(), script.into()],
        Stdio::null(),
        Stdio::from(out.try_clone().unwrap()),
        Stdio::inherit(),
    )?;
    use std::io::{Read, Seek};
    let mut out = out;
    out.rewind().unwrap();
    let mut s = String::new();
    out.read_to_string(&mut s).unwrap();
    Ok((st, s))
}

#[test]
fn pid_namespace_hostname_net_dev() {
    if !can_run() {
        return;
    }
    let root = Root::new();
    let mut spec = root.spec();
    spec.hostname = Some("sbx-test".into());
    let (st, out) = sh(
        &spec,
        "echo pid=$$; echo init=$(cat /proc/1/cmdline | tr '\\0' ' '); echo host=$(cat /proc/sys/kernel/hostname); \
         echo procs=$(ls /proc | grep -c '^[0-9]'); \
         echo nets=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ,); \
         echo lo=$(cat /sys/class/net/lo/operstate 2>/dev/null || echo nosys); \
         echo hi > /dev/null && echo devnull=ok; head -c 4 /dev/zero | wc -c; \
         test -L /dev/ptmx && test -d /dev/pts && echo pts=ok; \
         test -w /usr/bin/env || echo usr=ro; echo uid=$(id -u); pwd",
    )
    .unwrap();
    assert_eq!(st, ExitStatusInfo::Exited(0), "{out}");
    eprintln!("{out}");
    // The command is pid 2: pid 1 is our tiny init, which reaps and reports.
    assert!(out.contains("pid=2\n"), "{out}");
    assert!(out.contains(&format!("init={HELPER}")), "{out}");
    assert!(out.contains("host=sbx-test\n"), "{out}");
    // init, sh, and the ls of the pipeline (plus grep) — not the host's processes
    let procs: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs <= 5, "{out}");
    assert!(out.contains("nets=lo,\n"), "{out}");
    assert!(out.contains("devnull=ok\n"), "{out}");
    assert!(out.contains("\n4\n"), "{out}");
    assert!(out.contains("pts=ok\n"), "{out}");
    assert!(out.contains("usr=ro\n"), "{out}");
    assert!(out.contains("uid=0\n"), "{out}");
    assert!(out.ends_with("/\n"), "{out}");
    // The host's hostname is unchanged.
    assert_ne!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        "sbx-test\n"
    );
}

#[test]
fn exit_codes_and_signals() {
    if !can_run() {
        return;
    }
    let root = Root::new();
    let spec = root.spec();
    assert_eq!(sh(&spec, "exit 3").unwrap().0, ExitStatusInfo::Exited(3));
    assert_eq!(
        sh(&spec, "kill -9 $$").unwrap().0,
        ExitStatusInfo::Signaled(9)
    );
    assert_eq!(
        sh(&spec, "kill -TERM $$").unwrap().0,
        ExitStatusInfo::Signaled(15)
    );
    // A missing program is a setup error naming it, not an exit status.
    let e = run(
        &spec,
        &["no-such-program".into()],
        Stdio::null(),
        Stdio::null(),
        Stdio::null(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("exec no-such-program: ENOENT"),
        "{e}"
    );
    // PATH from the spec is searched.
    assert_eq!(
        run(
            &spec,
            &["true".into()],
            Stdio::null(),
            Stdio::null(),
            Stdio::null()
        )
        .unwrap(),
        ExitStatusInfo::Exited(0)
    );
    // A bad cwd is reported with the path.
    let mut s2 = spec.clone();
    s2.cwd = "/does/not/exist".into();
    let e = sh(&s2, "true").unwrap_err();
    assert!(e.to_string().contains("chdir to /does/not/exist"), "{e}");
    // SIGPIPE is back at its default for the command (Rust ignores it in the helper).
    let (st, out) = sh(&spec, "yes | head -n 1; echo ${PIPESTATUS:-done}").unwrap();
    assert_eq!(st, ExitStatusInfo::Exited(0));
    assert!(out.starts_with("y\n"), "{out}");
    let (_, out) = sh(
        &spec,
        "while read k v; do [ \"$k\" = SigIgn: ] && echo $v; done < /proc/self/status",
    )
    .unwrap();
    assert_eq!(
        u64::from_str_radix(out.trim(), 16).unwrap() & (1 << 12),
        0,
        "SIGPIPE ignored: {out}"
    );
}

fn host_pids_with_cmdline(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
            {
                v.push(pid);
            }
        }
    }
    v
}

#[test]
fn background_daemon_does_not_outlive_the_run() {
    if !can_run() {
        return;
    }
    let root = Root::new();
    let spec = root.spec();
    // A unique argument so we find exactly our daemon on the host.
    let tag = format!("{}", 1000 + std::process::id() % 1000);
    let script = format!("sleep {tag}.5 </dev/null >/dev/null 2>&1 & setsid sleep {tag}.25 </dev/null >/dev/null 2>&1 & echo started");
    let (st, out) = sh(&spec, &script).unwrap();
    assert_eq!(st, ExitStatusInfo::Exited(0));
    assert_eq!(out, "started\n");
    let left = host_pids_with_cmdline(&format!("sleep {tag}."));
    assert!(left.is_empty(), "daemons survived: {left:?}");
}

#[test]
fn network_shared_when_asked() {
    if !can_run() {
        return;
    }
    let root = Root::new();
    let mut spec = root.spec();
    spec.network = true;
    let (st, out) = sh(&spec, "tail -n +3 /proc/net/dev | wc -l").unwrap();
    assert_eq!(st, ExitStatusInfo::Exited(0));
    let host = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count()
        - 2;
    assert_eq!(out.trim().parse::<usize>().unwrap(), host);
}

#[test]
fn symlinked_mount_targets_stay_inside_the_root() {
    if !can_run() {
        return;
    }
    let root = Root::new();
    // proc points at an absolute path: resolved inside the root, not on the host.
    let outside = tempfile::Builder::new()
        .prefix("sandbox-outside-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("proc")).unwrap();
    let (st, _) = sh(&root.spec(), "test -r /proc/self/status").unwrap();
    assert_eq!(st, ExitStatusInfo::Exited(0));
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "nothing was created or mounted on the host path"
    );
    // The directory the symlink names was created inside the root instead.
    let inside = root.path().join(outside.path().strip_prefix("/").unwrap());
    assert!(inside.is_dir());
}

#[test]
fn user_namespace_maps_root_to_base() {
    if !can_run() {
        return;
    }
    let root = Root::new();
    let base = 0x5A0000u32;
    let map = IdMap::new(base);
    shift_tree(root.path(), &map).unwrap();
    assert_eq!(
        std::fs::metadata(root.path().join("tmp")).unwrap().uid(),
        base
    );
    let mut spec = root.spec();
    spec.userns = Some(map);
    let (st, out) = sh(
        &spec,
        "id -u; id -g; cat /proc/self/uid_map; echo x > /tmp/made; mkdir /tmp/d; \
         chown 1000:100 /tmp/d; echo hi >/dev/null && echo devnull=ok; \
         ls /sys | head -1 | grep -q . && echo sys=yes || echo sys=no",
    )
    .unwrap();
    eprintln!("{out}");
    assert_eq!(st, ExitStatusInfo::Exited(0), "{out}");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("0"));
    assert_eq!(lines.next(), Some("0"));
    let m: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(m, ["0", &base.to_string(), "65536"]);
    assert!(out.contains("devnull=ok"), "{out}");
    let made = std::fs::metadata(root.path().join("tmp/made")).unwrap();
    assert_eq!((made.uid(), made.gid()), (base, base));
    let d = std::fs::metadata(root.path().join("tmp/d")).unwrap();
    assert_eq!((d.uid(), d.gid()), (base + 1000, base + 100));
}
