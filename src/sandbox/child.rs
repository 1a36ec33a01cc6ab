//! The helper side of a sandbox run: the re-executed binary (helper), the
//! pid-namespace init it forks, and the command the init forks. See the `sandbox`
//! module documentation for the sequence. Failures are reported to the parent as
//! `ERROR <step> <subject>: <errno>` on the sync socket.

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{fchmodat, mkdirat, mknodat, umask, FchmodatFlags, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use super::proto::{self, ChildSpec, Msg};
use super::DEFAULT_PATH;
use crate::sys;

/// Entry of the helper process; returns its exit code.
pub(super) fn helper_main(fd: i32) -> u8 {
    let sock = match sys::adopt_inherited_fd(fd) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: sync socket {fd}: {e}", super::CHILD_ARG);
            return 125;
        }
    };
    let _ = sys::set_cloexec(&sock);
    match helper(&sock) {
        Ok(code) => code,
        Err(msg) => {
            let _ = proto::send(&sock, &Msg::Error(msg));
            1
        }
    }
}

fn helper(sock: &OwnedFd) -> Result<u8, String> {
    // Die with the process that started us (the calling thread waits for us, so it
    // outlives a normal run), and take signals again: a parent may block them to
    // handle Ctrl-C on a thread of its own, and the mask survives exec.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let spec: ChildSpec = match proto::recv(sock)? {
        Some(Msg::Spec(json)) => {
            serde_json::from_str(&json).map_err(|e| format!("decode spec: {e}"))?
        }
        Some(other) => return Err(format!("expected SPEC, got {other:?}")),
        None => return Ok(1),
    };
    if let Some(pid) = spec.enter {
        return enter(sock, &spec, pid);
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    if spec.userns {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    if !spec.network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    unshare(flags).map_err(|e| format!("unshare {flags:?}: {e}"))?;
    proto::send(sock, &Msg::Unshared).map_err(|e| format!("send UNSHARED: {e}"))?;
    match proto::recv(sock)? {
        Some(Msg::Go) => {}
        Some(other) => return Err(format!("expected GO, got {other:?}")),
        None => return Ok(1),
    }
    if spec.userns {
        nix::unistd::setgroups(&[])
            .map_err(|e| format!("setgroups([]) in the user namespace: {e}"))?;
        let (g, u) = (Gid::from_raw(0), Uid::from_raw(0));
        nix::unistd::setresgid(g, g, g)
            .map_err(|e| format!("setresgid(0) in the user namespace: {e}"))?;
        nix::unistd::setresuid(u, u, u)
            .map_err(|e| format!("setresuid(0) in the user namespace: {e}"))?;
    }
    match sys::fork_single_threaded().map_err(|e| format!("fork the sandbox init: {e}"))? {
        ForkResult::Child => {
            let code = match init(sock, &spec) {
                Ok(()) => 0,
                Err(m) => {
                    let _ = proto::send(sock, &Msg::Error(m));
                    1
                }
            };
            sys::exit_now(code)
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, c)) => return Ok(c as u8),
                Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as u8),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("wait for the sandbox init: {e}")),
            }
        },
    }
}

/// Namespaces joined in enter mode, in the order `nsenter` uses: the user namespace
/// first (it grants the capabilities the others need), the mount namespace last.
const ENTER_ORDER: [(&str, CloneFlags); 7] = [
    ("user", CloneFlags::CLONE_NEWUSER),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Enter mode: join the namespaces of `pid`, chroot to its root, fork the command
/// into its pid namespace, wait and report the command's status.
fn enter(sock: &OwnedFd, spec: &ChildSpec, pid: i32) -> Result<u8, String> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    // Everything is opened before the first setns: afterwards /proc is another one.
    let root = nix::fcntl::open(
        &proc_dir.join("root"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open /proc/{pid}/root: {e}"))?;
    let mut joins = Vec::new();
    for (name, flag) in ENTER_ORDER {
        let theirs = proc_dir.join("ns").join(name);
        let md =
            std::fs::metadata(&theirs).map_err(|e| format!("stat {}: {e}", theirs.display()))?;
        let ours = std::fs::metadata(Path::new("/proc/self/ns").join(name))
            .map_err(|e| format!("stat /proc/self/ns/{name}: {e}"))?;
        use std::os::unix::fs::MetadataExt;
        if (md.dev(), md.ino()) == (ours.dev(), ours.ino()) {
            continue; // already there (setns into one's own user namespace is EINVAL)
        }
        let fd = nix::fcntl::open(&theirs, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| format!("open {}: {e}", theirs.display()))?;
        joins.push((name, flag, fd));
    }
    proto::send(sock, &Msg::Unshared).map_err(|e| format!("send UNSHARED: {e}"))?;
    match proto::recv(sock)? {
        Some(Msg::Go) => {}
        Some(other) => return Err(format!("expected GO, got {other:?}")),
        None => return Ok(1),
    }
    // The mount namespace is joined by the forked command alone: once this process
    // is in it, its /proc is the machine's, in which this process does not exist.
    let mut in_userns = false;
    let mut mnt = None;
    for (name, flag, fd) in joins {
        if flag == CloneFlags::CLONE_NEWNS {
            mnt = Some(fd);
            continue;
        }
        nix::sched::setns(&fd, flag)
            .map_err(|e| format!("setns into the {name} namespace of pid {pid}: {e}"))?;
        in_userns |= name == "user";
    }
    let cmd = match sys::fork_single_threaded().map_err(|e| format!("fork the command: {e}"))? {
        ForkResult::Child => {
            let err = match enter_root(pid, mnt.as_ref(), &root, in_userns) {
                Ok(()) => exec_command(spec),
                Err(e) => e,
            };
            let _ = proto::send(sock, &Msg::Error(err));
            sys::exit_now(127)
        }
        ForkResult::Parent { child } => child,
    };
    let status = loop {
        match waitpid(cmd, None) {
            Ok(WaitStatus::Exited(_, code)) => break Msg::Exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => break Msg::Signal(sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("wait for the command: {e}")),
        }
    };
    let _ = proto::send(sock, &status);
    Ok(0)
}

/// In the command forked in enter mode: join the mount namespace, make the target's
/// root ours, become root of the user namespace if one was joined.
fn enter_root(
    pid: i32,
    mnt: Option<&OwnedFd>,
    root: &OwnedFd,
    in_userns: bool,
) -> Result<(), String> {
    if let Some(fd) = mnt {
        nix::sched::setns(fd, CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("setns into the mnt namespace of pid {pid}: {e}"))?;
    }
    nix::unistd::fchdir(root).map_err(|e| format!("chdir to /proc/{pid}/root: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot to /proc/{pid}/root: {e}"))?;
    if in_userns {
        nix::unistd::setgroups(&[])
            .map_err(|e| format!("setgroups([]) in the user namespace of pid {pid}: {e}"))?;
        let (g, u) = (Gid::from_raw(0), Uid::from_raw(0));
        nix::unistd::setresgid(g, g, g)
            .map_err(|e| format!("setresgid(0) in the user namespace of pid {pid}: {e}"))?;
        nix::unistd::setresuid(u, u, u)
            .map_err(|e| format!("setresuid(0) in the user namespace of pid {pid}: {e}"))?;
    }
    Ok(())
}

/// Pid 1 of the new pid namespace: mounts, pivot, then fork + reap the command.
fn init(sock: &OwnedFd, spec: &ChildSpec) -> Result<(), String> {
    // If the helper dies (e.g. killed by the parent to cancel), take the namespace down.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let old_umask = umask(Mode::empty());
    setup(spec)?;
    umask(old_umask);
    let cmd = match sys::fork_single_threaded().map_err(|e| format!("fork the command: {e}"))? {
        ForkResult::Child => {
            let err = exec_command(spec);
            let _ = proto::send(sock, &Msg::Error(err));
            sys::exit_now(127)
        }
        ForkResult::Parent { child } => child,
    };
    let status = loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == cmd => break Msg::Exit(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == cmd => break Msg::Signal(sig as i32),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(format!("wait for the command: {e}")),
        }
    };
    let _ = proto::send(sock, &status);
    // Returning ends pid 1; the kernel kills everything else left in the namespace.
    Ok(())
}

fn setup(spec: &ChildSpec) -> Result<(), String> {
    let root = spec.root.as_path();
    let r = root.display();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make / rprivate: {e}"))?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind {r} onto itself: {e}"))?;
    let rootfd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {r}: {e}"))?;
    let t = Tree {
        fd: rootfd,
        path: root,
    };

    let proc_dir = t.ensure_dir("proc")?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("proc"),
        sys::fd_path(&proc_dir).as_str(),
        Some("proc"),
        nosuid_nodev_noexec,
        None::<&str>,
    )
    .map_err(|e| format!("mount proc on {r}/proc: {e}"))?;

    setup_dev(&t, spec.userns)?;

    let sys_dir = t.ensure_dir("sys")?;
    match mount(
        Some("sysfs"),
        sys::fd_path(&sys_dir).as_str(),
        Some("sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        // Not permitted in a user namespace without its own netns: /sys stays empty.
        Ok(()) | Err(Errno::EPERM) | Err(Errno::EACCES) => {}
        Err(e) => return Err(format!("mount sysfs on {r}/sys: {e}")),
    }

    for (host, inside) in &spec.bind_ro {
        bind_ro(&t, host, inside)?;
    }

    if let Some(name) = &spec.hostname {
        nix::unistd::sethostname(name).map_err(|e| format!("set hostname {name:?}: {e}"))?;
    }
    if !spec.network {
        sys::interface_up(c"lo").map_err(|e| format!("bring up lo in the new netns: {e}"))?;
    }

    nix::unistd::fchdir(&t.fd).map_err(|e| format!("chdir to {r}: {e}"))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => umount2(".", MntFlags::MNT_DETACH)
            .map_err(|e| format!("detach the old root after pivot_root into {r}: {e}"))?,
        // pivot_root is refused when / is the initramfs (rootfs); chroot is enough there.
        Err(Errno::EINVAL) => {
            nix::unistd::chroot(".").map_err(|e| format!("chroot into {r}: {e}"))?
        }
        Err(e) => return Err(format!("pivot_root into {r}: {e}")),
    }
    nix::unistd::chdir("/").map_err(|e| format!("chdir to / in {r}: {e}"))?;
    Ok(())
}

/// The root tree, opened once; every path inside is resolved as if the tree were `/`.
struct Tree<'a> {
    fd: OwnedFd,
    path: &'a Path,
}

impl Tree<'_> {
    fn rel(p: &Path) -> PathBuf {
        p.components()
            .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
            .collect()
    }

    fn shown(&self, rel: &Path) -> String {
        self.path.join(rel).display().to_string()
    }

    fn open(&self, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(self.fd.as_fd(), rel, how)
    }

    /// Opens (O_PATH) the directory `p` inside the tree, creating missing components
    /// (also where a dangling symlink points, resolved inside the tree).
    fn ensure_dir(&self, p: impl AsRef<Path>) -> Result<OwnedFd, String> {
        self.ensure_dir_depth(p.as_ref(), 0)
    }

    fn ensure_dir_depth(&self, p: &Path, depth: u32) -> Result<OwnedFd, String> {
        let rel = Self::rel(p);
        let dir = OFlag::O_PATH | OFlag::O_DIRECTORY;
        match self.open(&rel, dir) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(format!("open {}: {e}", self.shown(&rel))),
        }
        let (parent, name) = self.split(&rel)?;
        let pfd = self.ensure_dir_depth(parent, depth)?;
        match mkdirat(&pfd, name, Mode::from_bits_truncate(0o755)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => {
                // A dangling symlink: create what it names, inside the tree.
                if let Ok(target) = nix::fcntl::readlinkat(&pfd, name) {
                    if depth >= 40 {
                        return Err(format!("open {}: {}", self.shown(&rel), Errno::ELOOP));
                    }
                    self.ensure_dir_depth(&parent.join(PathBuf::from(target)), depth + 1)?;
                }
            }
            Err(e) => return Err(format!("mkdir {}: {e}", self.shown(&rel))),
        }
        self.open(&rel, dir)
            .map_err(|e| format!("open {}: {e}", self.shown(&rel)))
    }

    /// Opens (O_PATH) the non-directory `p` inside the tree, creating an empty file
    /// (and missing parents) if nothing is there.
    fn ensure_file(&self, p: impl AsRef<Path>) -> Result<OwnedFd, String> {
        let rel = Self::rel(p.as_ref());
        match self.open(&rel, OFlag::O_PATH) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(format!("open {}: {e}", self.shown(&rel))),
        }
        let (parent, name) = self.split(&rel)?;
        let pfd = self.ensure_dir(parent)?;
        let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW;
        match nix::fcntl::openat(
            &pfd,
            name,
            flags | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        ) {
            Ok(_) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("create {}: {e}", self.shown(&rel))),
        }
        self.open(&rel, OFlag::O_PATH)
            .map_err(|e| format!("open {}: {e}", self.shown(&rel)))
    }

    fn split<'p>(&self, rel: &'p Path) -> Result<(&'p Path, &'p std::ffi::OsStr), String> {
        match (rel.parent(), rel.file_name()) {
            (Some(p), Some(n)) => Ok((p, n)),
            _ => Err(format!("cannot create {}", self.shown(rel))),
        }
    }
}

const DEV_NODES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn setup_dev(t: &Tree, userns: bool) -> Result<(), String> {
    let r = t.path.display();
    let dev_under = t.ensure_dir("dev")?;
    mount(
        Some("tmpfs"),
        sys::fd_path(&dev_under).as_str(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=4m"),
    )
    .map_err(|e| format!("mount tmpfs on {r}/dev: {e}"))?;
    // Re-resolve: the new lookup crosses into the tmpfs just mounted.
    let dev = t
        .open(Path::new("dev"), OFlag::O_PATH | OFlag::O_DIRECTORY)
        .map_err(|e| format!("open {r}/dev: {e}"))?;
    let devp = sys::fd_path(&dev);
    let rw = Mode::from_bits_truncate(0o666);
    for (name, major, minor) in DEV_NODES {
        let made = !userns
            && match mknodat(
                &dev,
                name,
                SFlag::S_IFCHR,
                rw,
                libc::makedev(major as u32, minor as u32),
            ) {
                Ok(()) => true,
                // mknod is refused in a user namespace (and by some LSMs): bind instead.
                Err(Errno::EPERM) => false,
                Err(e) => return Err(format!("mknod {r}/dev/{name}: {e}")),
            };
        if !made {
            let flags = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
            nix::fcntl::openat(&dev, name, flags, rw)
                .map_err(|e| format!("create {r}/dev/{name}: {e}"))?;
            let host = format!("/dev/{name}");
            mount(
                Some(host.as_str()),
                format!("{devp}/{name}").as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| format!("bind {host} onto {r}/dev/{name}: {e}"))?;
        }
    }
    mkdirat(&dev, "pts", Mode::from_bits_truncate(0o755))
        .map_err(|e| format!("mkdir {r}/dev/pts: {e}"))?;
    let pts = format!("{devp}/pts");
    let pts_flags = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    let with_gid = "newinstance,ptmxmode=0666,mode=0620,gid=5";
    if mount(
        Some("devpts"),
        pts.as_str(),
        Some("devpts"),
        pts_flags,
        Some(with_gid),
    )
    .is_err()
    {
        mount(
            Some("devpts"),
            pts.as_str(),
            Some("devpts"),
            pts_flags,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )
        .map_err(|e| format!("mount devpts on {r}/dev/pts: {e}"))?;
    }
    mkdirat(&dev, "shm", Mode::from_bits_truncate(0o1777))
        .map_err(|e| format!("mkdir {r}/dev/shm: {e}"))?;
    fchmodat(
        &dev,
        "shm",
        Mode::from_bits_truncate(0o1777),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(|e| format!("chmod {r}/dev/shm: {e}"))?;
    for (target, name) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        nix::unistd::symlinkat(target, &dev, name)
            .map_err(|e| format!("symlink {r}/dev/{name}: {e}"))?;
    }
    Ok(())
}

fn bind_ro(t: &Tree, host: &Path, inside: &Path) -> Result<(), String> {
    let shown = t.shown(&Tree::rel(inside));
    let md = std::fs::metadata(host).map_err(|e| format!("bind source {}: {e}", host.display()))?;
    let target = if md.is_dir() {
        t.ensure_dir(inside)?
    } else {
        t.ensure_file(inside)?
    };
    mount(
        Some(host),
        sys::fd_path(&target).as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind {} onto {shown}: {e}", host.display()))?;
    // The new mount is on top now; resolve again to reach it and remount it read-only,
    // keeping the flags a user namespace is not allowed to clear.
    let top = t
        .open(&Tree::rel(inside), OFlag::O_PATH)
        .map_err(|e| format!("open {shown}: {e}"))?;
    let top_path = sys::fd_path(&top);
    let st = nix::sys::statvfs::statvfs(top_path.as_str())
        .map_err(|e| format!("statvfs {shown}: {e}"))?;
    use nix::sys::statvfs::FsFlags;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if st.flags().contains(fs) {
            flags |= ms;
        }
    }
    mount(
        None::<&str>,
        top_path.as_str(),
        None::<&str>,
        flags,
        None::<&str>,
    )
    .map_err(|e| format!("make {shown} read-only: {e}"))
}

/// In the forked command process: returns only on failure, with the message to report.
fn exec_command(spec: &ChildSpec) -> String {
    if let Err(e) = sys::reset_signals_for_exec() {
        return format!("reset signal dispositions: {e}");
    }
    let _ = nix::unistd::setsid();
    if let Err(e) = nix::unistd::chdir(&spec.cwd) {
        return format!("chdir to {} inside the root: {e}", spec.cwd.display());
    }
    let to_c = |s: &str| CString::new(s.as_bytes()).map_err(|_| format!("NUL byte in {s:?}"));
    let argv: Result<Vec<CString>, String> = spec.argv.iter().map(|a| to_c(a)).collect();
    let env: Result<Vec<CString>, String> = spec
        .env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect();
    let (argv, env) = match (argv, env) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(m), _) | (_, Err(m)) => return m,
    };
    let prog = &spec.argv[0];
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.clone()]
    } else {
        let path = spec
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str())
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{prog}"))
            .collect()
    };
    let mut last = Errno::ENOENT;
    for c in candidates {
        let Ok(cpath) = CString::new(c) else { continue };
        match nix::unistd::execve(&cpath, &argv, &env) {
            // Not there: keep looking; a more telling error (EACCES, ENOEXEC) wins.
            Err(Errno::ENOENT | Errno::ENOTDIR) => {}
            Err(e) => last = e,
            Ok(never) => match never {},
        }
    }
    format!("exec {prog}: {last}")
}
