//! Our own container for commands in a root tree: new mount, pid, uts, ipc and
//! (optionally) network and user namespaces, created with direct syscalls — no
//! `unshare`, `chroot`, `nsenter` or `systemd-nspawn` binaries. It serves the
//! debootstrap second stage ([`second_stage`]) and provisioning without booting.
//! The same helper also runs commands inside a booted machine ([`enter`]): it joins
//! the namespaces of the machine's PID 1 with `setns` instead of creating new ones.
//!
//! How a [`run`] works:
//!
//! * The calling process (possibly multi-threaded, e.g. under tokio) re-executes a
//!   helper — our own binary, `/proc/self/exe` by default — with the hidden argument
//!   `__sandbox-child <fd>`; `main()` hands that to [`maybe_run_child`] before any
//!   thread starts, because `unshare(CLONE_NEWUSER)` fails in a threaded process.
//! * The helper reads the spec from the sync socket, unshares the namespaces and says
//!   so; the parent (real root) then writes `/proc/PID/{uid,gid}_map` (`0 BASE 65536`,
//!   no newuidmap, no /etc/subuid) and lets it continue. The helper becomes root of
//!   the user namespace (`setresuid/setresgid(0)`) and forks the pid-namespace init.
//! * The init (pid 1) sets up the mounts — rprivate `/`, the root bound onto itself,
//!   `/proc`, a tmpfs `/dev` with device nodes (bind-mounted from the host inside a
//!   user namespace, where mknod is refused), devpts, `/sys` read-only where
//!   permitted, read-only binds — brings `lo` up in a private netns, sets the
//!   hostname, `pivot_root`s (or `chroot`s when pivot_root is refused) and forks the
//!   command (pid 2), which `execve`s. The init reaps everything, reports the
//!   command's status and exits; the kernel then kills whatever the command left
//!   behind in the pid namespace, so no daemon outlives a run.
//! * All mount targets inside the root are resolved with `openat2(RESOLVE_IN_ROOT)`
//!   and mounted through `/proc/self/fd/N`, so symlinks in the tree cannot point a
//!   mount at the host.

mod child;
mod idmap;
mod proto;
mod shift;
mod stage2;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use idmap::{pick_base, IdMap, PrivateUsers, PICK_MAX, PICK_MIN, RANGE};
pub use shift::{rewrite_cap_xattr, shift_acl_xattr, shift_tree, ShiftReport};
pub use stage2::{second_stage, second_stage_phased};

use proto::{ChildSpec, Msg};

/// The hidden first argument that turns our binary into the sandbox helper.
pub const CHILD_ARG: &str = "__sandbox-child";

/// Errors of the sandbox, each naming the step and its subject.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox: {what}")]
    Spec { what: String },
    #[error("create sync socket for the sandbox helper: {0}")]
    Socket(#[source] nix::Error),
    #[error("start sandbox helper {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox handshake with helper pid {pid}: {detail}")]
    Handshake { pid: u32, detail: String },
    #[error("write {file} of sandbox helper pid {pid}: {source}")]
    IdMapWrite {
        pid: u32,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A setup step inside the sandbox failed (the message names the step, the
    /// subject and the errno, e.g. "mount proc on /var/tmp/x/proc: EPERM").
    #[error("sandbox for {root}: {message}")]
    Setup { root: PathBuf, message: String },
    #[error("sandbox helper for {root} ended ({status}) without reporting the command's status")]
    NoStatus { root: PathBuf, status: String },
    #[error("wait for sandbox helper pid {pid}: {source}")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("id range for {path}: {detail}")]
    IdRange { path: PathBuf, detail: String },
    #[error("shift ownership: {step} {path}: {source}")]
    Shift {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shift ownership: {path} is owned by id {id}, outside 0..{} and outside {}..+{}", map.count, map.host_base, map.count)]
    UnmappableId { path: PathBuf, id: u32, map: IdMap },
    #[error("second stage: {step} {path}: {source}")]
    StageFile {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("second stage: {what} {status}: {tail}")]
    StageCommand {
        what: String,
        status: ExitStatusInfo,
        tail: String,
    },
    #[error("second stage: write log: {0}")]
    Log(#[source] std::io::Error),
}

/// How the command in the sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatusInfo {
    /// Normal exit with this code.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl ExitStatusInfo {
    pub fn success(&self) -> bool {
        *self == ExitStatusInfo::Exited(0)
    }
}

impl std::fmt::Display for ExitStatusInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitStatusInfo::Exited(c) => write!(f, "exited with status {c}"),
            ExitStatusInfo::Signaled(s) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by signal {s} ({sig})"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// What to run a command in.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The tree that becomes `/`.
    pub root: PathBuf,
    /// User namespace mapping 0.. to `host_base..`; None = no user namespace.
    pub userns: Option<IdMap>,
    /// Hostname in the new uts namespace (None keeps the host's name, in a private copy).
    pub hostname: Option<String>,
    /// The complete environment of the command (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory inside the root.
    pub cwd: PathBuf,
    /// Read-only bind mounts: host path → path inside the root.
    pub bind_ro: Vec<(PathBuf, PathBuf)>,
    /// true = share the host's network; false = a new netns with only `lo` up.
    pub network: bool,
    /// The executable re-run as the helper; None = `/proc/self/exe` (the process's
    /// own binary, whose `main` must call [`maybe_run_child`] first).
    pub helper: Option<PathBuf>,
}

/// The PATH the second stage and debootstrap use inside a target.
pub const DEFAULT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

impl SandboxSpec {
    /// A spec for `root` with no user namespace, no network, `/` as cwd and a minimal
    /// environment (PATH only).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SandboxSpec {
            root: root.into(),
            userns: None,
            hostname: None,
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            cwd: PathBuf::from("/"),
            bind_ro: Vec::new(),
            network: false,
            helper: None,
        }
    }

    /// Sets (or replaces) one environment variable.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }
}

/// The helper entry point. Call it first thing in `main()`, before clap and before
/// any thread is started: if this process was started as the sandbox helper
/// (`argv[1] == "__sandbox-child"`), it runs the helper and returns its exit code;
/// otherwise it returns None and does nothing.
pub fn maybe_run_child() -> Option<std::process::ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != CHILD_ARG {
        return None;
    }
    let fd = args
        .next()
        .and_then(|a| a.to_str().and_then(|s| s.parse::<i32>().ok()))
        .unwrap_or(-1);
    Some(std::process::ExitCode::from(child::helper_main(fd)))
}

/// Runs `argv` in a sandbox made from `spec` and waits for it. Blocking. The status
/// distinguishes an exit code from death by a signal; errors are failures to set the
/// sandbox up (including exec of `argv[0]`), never the command's own failure.
pub fn run(
    spec: &SandboxSpec,
    argv: &[String],
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<ExitStatusInfo, SandboxError> {
    if argv.is_empty() {
        return Err(SandboxError::Spec {
            what: "empty command".into(),
        });
    }
    let root = std::fs::canonicalize(&spec.root).map_err(|source| SandboxError::Root {
        path: spec.root.clone(),
        source,
    })?;
    if !root.is_dir() {
        return Err(SandboxError::Root {
            path: root,
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    if let Some(map) = &spec.userns {
        map.validate().map_err(|detail| SandboxError::IdRange {
            path: root.clone(),
            detail,
        })?;
    }
    for (host, inside) in &spec.bind_ro {
        if !host.is_absolute() || !inside.is_absolute() {
            return Err(SandboxError::Spec {
                what: format!(
                    "bind {} -> {}: both paths must be absolute",
                    host.display(),
                    inside.display()
                ),
            });
        }
    }
    let wire = ChildSpec {
        root: root.clone(),
        userns: spec.userns.is_some(),
        hostname: spec.hostname.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
        bind_ro: spec.bind_ro.clone(),
        network: spec.network,
        argv: argv.to_vec(),
        enter: None,
    };
    launch(
        &wire,
        spec.helper.as_deref(),
        spec.userns.as_ref(),
        (stdin, stdout, stderr),
    )
}

/// Where [`enter`] runs a command: inside the namespaces of a running process.
#[derive(Debug, Clone)]
pub struct EnterSpec {
    /// The process whose user (if different from ours), cgroup, ipc, uts, net, pid
    /// and mount namespaces are joined, and whose root becomes `/`.
    pub pid: i32,
    /// The complete environment of the command (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Working directory inside the root.
    pub cwd: PathBuf,
    /// As [`SandboxSpec::helper`].
    pub helper: Option<PathBuf>,
}

/// Runs `argv` as root inside the namespaces of the running process `target.pid`
/// (e.g. a booted machine's PID 1) and waits for it: the helper joins them with
/// `setns`, `chroot`s to the process's root and forks the command into its pid
/// namespace. Status and errors as for [`run`].
pub fn enter(
    target: &EnterSpec,
    argv: &[String],
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<ExitStatusInfo, SandboxError> {
    if argv.is_empty() {
        return Err(SandboxError::Spec {
            what: "empty command".into(),
        });
    }
    if target.pid <= 0 {
        return Err(SandboxError::Spec {
            what: format!("enter: bad pid {}", target.pid),
        });
    }
    let wire = ChildSpec {
        root: PathBuf::from(format!("/proc/{}/root", target.pid)),
        userns: false,
        hostname: None,
        env: target.env.clone(),
        cwd: target.cwd.clone(),
        bind_ro: Vec::new(),
        network: true,
        argv: argv.to_vec(),
        enter: Some(target.pid),
    };
    launch(
        &wire,
        target.helper.as_deref(),
        None,
        (stdin, stdout, stderr),
    )
}

/// Starts the helper for `wire`, drives the protocol and reaps it.
fn launch(
    wire: &ChildSpec,
    helper: Option<&Path>,
    userns: Option<&IdMap>,
    (stdin, stdout, stderr): (Stdio, Stdio, Stdio),
) -> Result<ExitStatusInfo, SandboxError> {
    let root = wire.root.clone();
    let json = serde_json::to_string(wire).map_err(|e| SandboxError::Spec {
        what: format!("encode spec: {e}"),
    })?;
    let exe = helper
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let (ours, theirs) = crate::sys::seqpacket_pair().map_err(SandboxError::Socket)?;
    let child_fd = theirs.as_raw_fd();
    let mut child = {
        let mut cmd = Command::new(&exe);
        cmd.arg(CHILD_ARG)
            .arg(child_fd.to_string())
            .env_clear()
            .current_dir("/")
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the hook runs between fork and exec in the child and only calls
        // fcntl(F_SETFD) on a descriptor number (async-signal-safe, no allocation).
        unsafe {
            cmd.pre_exec(move || crate::sys::clear_cloexec(child_fd).map_err(std::io::Error::from));
        }
        cmd.spawn().map_err(|source| SandboxError::Spawn {
            exe: exe.clone(),
            source,
        })?
        // `cmd` (holding our copies of the stdio descriptors) is dropped here, so
        // pipes given as stdout/stderr see EOF once the sandbox is gone.
    };
    drop(theirs);
    let pid = child.id();
    let outcome = drive(&ours, pid, &json, userns);
    if outcome.is_err() {
        let _ = child.kill();
    }
    drop(ours);
    let status = child
        .wait()
        .map_err(|source| SandboxError::Wait { pid, source })?;
    match outcome {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(SandboxError::NoStatus {
            root,
            status: status.to_string(),
        }),
        Err(Failure::Setup(message)) => Err(SandboxError::Setup { root, message }),
        Err(Failure::Other(e)) => Err(e),
    }
}

enum Failure {
    Setup(String),
    Other(SandboxError),
}

/// The parent's side of the protocol: returns the command's status (None if the
/// sandbox ended without one).
fn drive(
    sock: &OwnedFd,
    pid: u32,
    json: &str,
    userns: Option<&IdMap>,
) -> Result<Option<ExitStatusInfo>, Failure> {
    let hs = |detail: String| Failure::Other(SandboxError::Handshake { pid, detail });
    proto::send(sock, &Msg::Spec(json.to_string())).map_err(|e| hs(format!("send spec: {e}")))?;
    match proto::recv(sock).map_err(hs)? {
        Some(Msg::Unshared) => {}
        Some(Msg::Error(m)) => return Err(Failure::Setup(m)),
        Some(other) => return Err(hs(format!("expected UNSHARED, got {other:?}"))),
        None => return Err(hs("helper exited before creating namespaces".into())),
    }
    if let Some(map) = userns {
        write_id_maps(pid, map).map_err(Failure::Other)?;
    }
    proto::send(sock, &Msg::Go).map_err(|e| hs(format!("send GO: {e}")))?;
    let mut status = None;
    let mut error = None;
    while let Some(msg) = proto::recv(sock).map_err(hs)? {
        match msg {
            Msg::Exit(c) => status = Some(ExitStatusInfo::Exited(c)),
            Msg::Signal(s) => status = Some(ExitStatusInfo::Signaled(s)),
            Msg::Error(m) => {
                error.get_or_insert(m);
            }
            other => return Err(hs(format!("unexpected {other:?}"))),
        }
    }
    match error {
        Some(m) => Err(Failure::Setup(m)),
        None => Ok(status),
    }
}

/// Writes `0 BASE COUNT` to the helper's uid_map and gid_map. `setgroups` is left at
/// "allow" (we are privileged in the parent namespace), so tools inside such as apt
/// can still drop supplementary groups.
fn write_id_maps(pid: u32, map: &IdMap) -> Result<(), SandboxError> {
    let text = map.proc_map_text();
    for file in ["uid_map", "gid_map"] {
        let path = Path::new("/proc").join(pid.to_string()).join(file);
        std::fs::write(&path, &text).map_err(|source| SandboxError::IdMapWrite {
            pid,
            file,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_display() {
        assert_eq!(
            ExitStatusInfo::Exited(3).to_string(),
            "exited with status 3"
        );
        assert_eq!(
            ExitStatusInfo::Signaled(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert!(ExitStatusInfo::Exited(0).success());
        assert!(!ExitStatusInfo::Signaled(0).success());
    }

    #[test]
    fn spec_env_replace() {
        let mut s = SandboxSpec::new("/x");
        s.set_env("PATH", "/bin");
        s.set_env("A", "1");
        assert_eq!(
            s.env,
            vec![("PATH".into(), "/bin".into()), ("A".into(), "1".into())]
        );
    }

    #[test]
    fn run_rejects_bad_specs() {
        let s = SandboxSpec::new("/nonexistent/root/for/test");
        let e = run(
            &s,
            &["/bin/true".into()],
            Stdio::null(),
            Stdio::null(),
            Stdio::null(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/root/for/test"), "{e}");
        assert!(matches!(
            run(&s, &[], Stdio::null(), Stdio::null(), Stdio::null()),
            Err(SandboxError::Spec { .. })
        ));
    }

    #[test]
    fn helper_that_is_not_a_helper_is_reported() {
        // /bin/true ignores the protocol and exits: the parent must not hang.
        let mut s = SandboxSpec::new("/");
        s.helper = Some("/bin/true".into());
        let e = run(
            &s,
            &["/bin/sh".into()],
            Stdio::null(),
            Stdio::null(),
            Stdio::null(),
        )
        .unwrap_err();
        assert!(matches!(e, SandboxError::Handshake { .. }), "{e}");
    }
}
