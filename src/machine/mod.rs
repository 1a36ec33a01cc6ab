//! Booted machines: a root tree started with `systemd-nspawn --boot`, known to be
//! ready when its systemd says so, commands run inside it by joining its namespaces
//! ourselves, and a clean stop that leaves no process, cgroup or nspawn state behind.
//!
//! How a [`Machine::boot`] works on a host without systemd as PID 1 (no bus, no
//! machined; see docs/bootstrap.md §4):
//!
//! * nspawn runs with `--register=no --keep-unit` (without `--keep-unit` it would ask
//!   the absent system bus for a scope), `--settings=no --link-journal=no`, the
//!   console read-only into a log file, and `--notify-ready=yes` with `NOTIFY_SOCKET`
//!   pointing at a datagram socket we bind: nspawn reports the container's PID 1
//!   (`X_NSPAWN_LEADER_PID=`) and, once the container's systemd has finished
//!   starting up, `READY=1`.
//! * nspawn is started inside a dedicated cgroup (`packer-nspawn-NAME` in the
//!   `name=systemd` and the cgroup2 hierarchy), entered between fork and exec. A
//!   user-namespaced boot on a hybrid host needs it; every boot gets one because it
//!   lets cleanup find every process. On a hybrid host the container is given a pure
//!   cgroup2 view (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`).
//! * A tree built for a user namespace (`--private-users=BASE` at bootstrap) boots
//!   with `--private-users=BASE:65536 --private-users-ownership=off`: the files stay
//!   as they are, their owners already are the container's ids.
//! * [`Machine::exec`] uses the sandbox helper in enter mode (`setns` into the
//!   leader's namespaces, `chroot` to its root, fork into its pid namespace); no
//!   `nsenter`, `machinectl` or `systemd-run -M`. Exit codes and signal deaths are
//!   reported exactly.
//! * [`Machine::poweroff`] sends `SIGRTMIN+4` to the container's systemd, waits for
//!   nspawn, kills what is left if it takes too long, and removes the cgroups and the
//!   `/run/systemd/nspawn/*/NAME` entries nspawn leaves on a `/run` that is not tmpfs.
//!   Dropping a [`Machine`] that was not powered off kills it the same way.

mod cgroup;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use crate::sandbox::ExitStatusInfo;
use crate::sandbox::{EnterSpec, SandboxError, DEFAULT_PATH};

/// Where per-machine runtime state (notify socket, default console log) lives.
pub const STATE_DIR: &str = "/run/packer-plugin-nspawn";
/// Lines of console output quoted in boot and poweroff errors.
pub const CONSOLE_TAIL_LINES: usize = 30;

/// The machine's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// Share the host's network namespace.
    #[default]
    Host,
    /// `--private-network`: a network namespace with only `lo`.
    Private,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The root tree.
    pub root: PathBuf,
    /// Machine name (`-M`): letters, digits, `-`, `_`, `.`; at most 64 characters.
    pub name: String,
    /// The id base the tree was built for (`--private-users=BASE` at bootstrap); None
    /// for a plain tree owned by host ids 0..65535.
    pub private_users: Option<u32>,
    /// More `systemd-nspawn` arguments, appended after ours.
    pub extra_args: Vec<String>,
    /// How long the boot may take until the container's systemd reports ready.
    pub timeout: Duration,
    pub network: NetworkMode,
    /// Where the console output goes (kept after poweroff); None = a file in the
    /// machine's state directory, removed with it.
    pub console_log: Option<PathBuf>,
    /// The sandbox helper for [`Machine::exec`]; None = `/proc/self/exe` (whose
    /// `main` must call [`crate::sandbox::maybe_run_child`] first).
    pub helper: Option<PathBuf>,
}

impl BootSpec {
    /// A plain boot of `root` as `name`, host network, 60 s timeout.
    pub fn new(root: impl Into<PathBuf>, name: &str) -> Self {
        BootSpec {
            root: root.into(),
            name: name.to_string(),
            private_users: None,
            extra_args: Vec::new(),
            timeout: Duration::from_secs(60),
            network: NetworkMode::Host,
            console_log: None,
            helper: None,
        }
    }
}

/// Errors of booting, using and stopping a machine, each naming the machine and step.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(
        "machine {name}: systemd-nspawn not found in PATH (apt-get install systemd-container)"
    )]
    NspawnMissing { name: String },
    #[error("machine {name}: {what}")]
    Spec { name: String, what: String },
    #[error("machine {name}: {step} {path}: {source}")]
    Io {
        name: String,
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machine {name}: start {exe}: {source}")]
    Spawn {
        name: String,
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("machine {name}: systemd-nspawn {status} before the machine was ready; last console lines:\n{console}")]
    BootExited {
        name: String,
        status: String,
        console: String,
    },
    #[error(
        "machine {name}: not ready within {timeout:?}, killed; last console lines:\n{console}"
    )]
    BootTimeout {
        name: String,
        timeout: Duration,
        console: String,
    },
    #[error("machine {name}: run {command:?}: {source}")]
    Exec {
        name: String,
        command: String,
        #[source]
        source: SandboxError,
    },
    #[error("machine {name}: poweroff: {detail}; last console lines:\n{console}")]
    Poweroff {
        name: String,
        detail: String,
        console: String,
    },
    #[error("machine {name}: clean up {path}: {detail}")]
    Cleanup {
        name: String,
        path: PathBuf,
        detail: String,
    },
}

/// Output of [`Machine::exec_output`].
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: ExitStatusInfo,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A booted machine. Power it off with [`Machine::poweroff`]; dropping it kills it.
#[derive(Debug)]
pub struct Machine {
    name: String,
    root: PathBuf,
    nspawn: Child,
    leader: i32,
    group: cgroup::Group,
    state_dir: PathBuf,
    console: PathBuf,
    own_console: bool,
    helper: Option<PathBuf>,
    ready_after: Duration,
    finished: bool,
    /// (st_dev, st_ino) of the root: names nspawn's lock file for it.
    root_id: (u64, u64),
}

/// The `systemd-nspawn` binary from PATH (or the usual places), if installed.
pub fn nspawn_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("systemd-nspawn"))
        .find(|p| p.is_file())
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "machine name {name:?} must have 1 to 64 characters"
        ));
    }
    if !name.chars().all(ok_char) || name.starts_with(['.', '-']) {
        return Err(format!(
            "machine name {name:?}: only letters, digits, '-', '_' and '.' (not first) are allowed"
        ));
    }
    Ok(())
}

/// The arguments for `systemd-nspawn` (without the binary).
fn nspawn_args(spec: &BootSpec, root: &Path, keep_unit: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--boot".into(),
        "--register=no".into(),
        "--settings=no".into(),
        "--link-journal=no".into(),
        "--notify-ready=yes".into(),
        "--console=read-only".into(),
        format!("--directory={}", root.display()),
        format!("--machine={}", spec.name),
    ];
    if keep_unit {
        a.push("--keep-unit".into());
    }
    if let Some(base) = spec.private_users {
        a.push(format!("--private-users={base}:{}", crate::sandbox::RANGE));
        a.push("--private-users-ownership=off".into());
    }
    if spec.network == NetworkMode::Private {
        a.push("--private-network".into());
    }
    a.extend(spec.extra_args.iter().cloned());
    a
}

/// Parsed `sd_notify` datagram fields we act on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Notify {
    ready: bool,
    leader: Option<i32>,
    status: Option<String>,
}

fn parse_notify(msg: &str) -> Notify {
    let mut n = Notify::default();
    for line in msg.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => n.ready = true,
            Some(("X_NSPAWN_LEADER_PID", v)) => n.leader = v.trim().parse().ok(),
            Some(("STATUS", v)) => n.status = Some(v.to_string()),
            _ => {}
        }
    }
    n
}

/// Drops ANSI escape sequences (systemd colours its status lines).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if ('@'..='~').contains(&d) {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

/// The last `n` lines of a console log, without colour codes.
pub fn console_tail(path: &Path, n: usize) -> String {
    let mut raw = Vec::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_end(&mut raw))
        .is_err()
    {
        return format!("(console log {} unreadable)", path.display());
    }
    let text = strip_ansi(&String::from_utf8_lossy(&raw));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Children of `ppid` whose comm is `comm`, from /proc.
fn children_named(ppid: i32, comm: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let parent = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<i32>().ok());
        if name == comm && parent == Some(ppid) {
            out.push(pid);
        }
    }
    out
}

/// Mount points from /proc/self/mountinfo (octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            let mut out = Vec::new();
            let b = p.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 3 < b.len() {
                    if let Ok(v) = u8::from_str_radix(&p[i + 1..i + 4], 8) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            PathBuf::from(String::from_utf8_lossy(&out).into_owned())
        })
        .collect()
}

/// The per-machine entries nspawn leaves under `/run/systemd/nspawn` when `/run` is
/// not a tmpfs.
fn nspawn_leftovers(name: &str) -> Vec<PathBuf> {
    ["propagate", "unix-export"]
        .iter()
        .map(|d| Path::new("/run/systemd/nspawn").join(d).join(name))
        .collect()
}

impl Machine {
    /// Boots `spec.root` and waits until its systemd reports ready (or fails, or the
    /// timeout passes: then the machine is killed, everything is cleaned up and the
    /// error quotes the last console lines).
    pub fn boot(spec: &BootSpec) -> Result<Machine, MachineError> {
        let name = spec.name.clone();
        validate_name(&name).map_err(|what| MachineError::Spec {
            name: name.clone(),
            what,
        })?;
        let exe =
            nspawn_binary().ok_or_else(|| MachineError::NspawnMissing { name: name.clone() })?;
        let io = |step: &'static str, path: &Path| {
            let (name, path) = (name.clone(), path.to_path_buf());
            move |source| MachineError::Io {
                name,
                step,
                path,
                source,
            }
        };
        let root = std::fs::canonicalize(&spec.root).map_err(io("open root", &spec.root))?;
        if !root.is_dir() {
            return Err(io("open root", &root)(std::io::Error::from_raw_os_error(
                libc::ENOTDIR,
            )));
        }
        if let Some(base) = spec.private_users {
            if base == 0 || base % crate::sandbox::RANGE != 0 {
                return Err(MachineError::Spec {
                    name,
                    what: format!(
                        "private users base {base} must be a non-zero multiple of {}",
                        crate::sandbox::RANGE
                    ),
                });
            }
        }
        if spec.timeout.is_zero() {
            return Err(MachineError::Spec {
                name,
                what: "boot timeout is zero".into(),
            });
        }

        let root_id = {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(&root).map_err(io("stat root", &root))?;
            (md.dev(), md.ino())
        };

        let layout = cgroup::detect();
        let group = cgroup::Group::create(&layout, &cgroup::leaf_for(&name)).map_err(
            |(path, source)| {
                if source.raw_os_error() == Some(libc::EBUSY) {
                    MachineError::Spec {
                        name: name.clone(),
                        what: format!(
                            "cgroup {} has processes: a machine of that name is running",
                            path.display()
                        ),
                    }
                } else {
                    io("create cgroup", &path)(source)
                }
            },
        )?;

        let state_dir = Path::new(STATE_DIR).join(&name);
        let (console, own_console) = match &spec.console_log {
            Some(p) => (p.clone(), false),
            None => (state_dir.join("console.log"), true),
        };
        // From here on a failure must undo what exists: a Machine without a live
        // nspawn is not constructible, so tear down by hand.
        let undo = |group: &cgroup::Group| {
            let _ = group.remove(Duration::from_secs(1));
            let _ = std::fs::remove_dir_all(&state_dir);
        };
        let prepared = (|| {
            std::fs::create_dir_all(STATE_DIR).map_err(io("create", Path::new(STATE_DIR)))?;
            let _ = std::fs::remove_dir_all(&state_dir); // stale, from a killed run
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&state_dir)
                .map_err(io("create", &state_dir))?;
            let sock_path = state_dir.join("notify");
            let sock = UnixDatagram::bind(&sock_path).map_err(io("bind", &sock_path))?;
            let log = File::create(&console).map_err(io("create", &console))?;
            let procs = group
                .open_procs()
                .map_err(|(p, e)| io("open", &p)(std::io::Error::from(e)))?;
            Ok((sock, sock_path, log, procs))
        })();
        let (sock, sock_path, log, procs) = match prepared {
            Ok(v) => v,
            Err(e) => {
                undo(&group);
                return Err(e);
            }
        };

        let keep_unit = !Path::new("/run/systemd/system").is_dir();
        let mut cmd = Command::new(&exe);
        cmd.args(nspawn_args(spec, &root, keep_unit))
            .env("NOTIFY_SOCKET", &sock_path)
            .current_dir("/")
            .stdin(Stdio::null());
        if layout.hybrid && std::env::var_os("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY").is_none() {
            cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        match log.try_clone() {
            Ok(l2) => {
                cmd.stdout(log).stderr(l2);
            }
            Err(e) => {
                undo(&group);
                return Err(io("open", &console)(e));
            }
        }
        let raw = cgroup::raw(&procs);
        // SAFETY: the hook runs between fork and exec and only calls write(2) on
        // descriptor numbers from a vector allocated before the fork (no allocation,
        // async-signal-safe).
        unsafe {
            cmd.pre_exec(move || cgroup::enter_self(&raw));
        }
        let started = Instant::now();
        let nspawn = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                undo(&group);
                return Err(MachineError::Spawn { name, exe, source });
            }
        };
        drop(cmd);
        drop(procs);

        let mut m = Machine {
            name,
            root,
            nspawn,
            leader: 0,
            group,
            state_dir,
            console,
            own_console,
            helper: spec.helper.clone(),
            ready_after: Duration::ZERO,
            finished: false,
            root_id,
        };
        match m.wait_ready(&sock, started + spec.timeout) {
            Ok(()) => {
                m.ready_after = started.elapsed();
                tracing::debug!(machine = %m.name, leader = m.leader, ready_after = ?m.ready_after, "machine ready");
                Ok(m)
            }
            Err(fail) => {
                let cleanup = m.teardown();
                let mut console = console_tail(&m.console, CONSOLE_TAIL_LINES);
                m.remove_state();
                if let Err(e) = cleanup {
                    console.push_str(&format!("\n(and cleanup failed: {e})"));
                }
                let name = m.name.clone();
                Err(match fail {
                    Wait::Exited(status) => MachineError::BootExited {
                        name,
                        status: status_text(&status),
                        console,
                    },
                    Wait::Timeout => MachineError::BootTimeout {
                        name,
                        timeout: spec.timeout,
                        console,
                    },
                    Wait::Io(path, source) => MachineError::Io {
                        name,
                        step: "read notifications on",
                        path,
                        source,
                    },
                })
            }
        }
    }

    fn wait_ready(&mut self, sock: &UnixDatagram, deadline: Instant) -> Result<(), Wait> {
        let mut buf = vec![0u8; 4096];
        let sock_path = self.state_dir.join("notify");
        loop {
            match self.nspawn.try_wait() {
                Ok(Some(status)) => return Err(Wait::Exited(status)),
                Ok(None) => {}
                Err(e) => return Err(Wait::Io(PathBuf::from("nspawn"), e)),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Wait::Timeout);
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            sock.set_read_timeout(Some(slice.max(Duration::from_millis(1))))
                .map_err(|e| Wait::Io(sock_path.clone(), e))?;
            match sock.recv(&mut buf) {
                Ok(n) => {
                    let note = parse_notify(&String::from_utf8_lossy(&buf[..n]));
                    if let Some(pid) = note.leader {
                        self.leader = pid;
                    }
                    if let Some(s) = note.status {
                        tracing::debug!(machine = %self.name, status = %s, "nspawn");
                    }
                    if note.ready {
                        if self.leader <= 0 {
                            let pid = self.nspawn.id() as i32;
                            self.leader =
                                children_named(pid, "systemd").first().copied().unwrap_or(0);
                        }
                        if self.leader <= 0 {
                            return Err(Wait::Io(
                                PathBuf::from(format!("/proc (children of {})", self.nspawn.id())),
                                std::io::Error::new(
                                    std::io::ErrorKind::NotFound,
                                    "ready, but the container's PID 1 was not found",
                                ),
                            ));
                        }
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Wait::Io(sock_path.clone(), e)),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The container's PID 1 (its systemd), as a host pid.
    pub fn leader(&self) -> i32 {
        self.leader
    }

    /// The `systemd-nspawn` process.
    pub fn nspawn_pid(&self) -> u32 {
        self.nspawn.id()
    }

    /// Time from starting nspawn to the container's `READY=1`.
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    /// The console log file.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The machine's cgroup directories (one per hierarchy).
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.group.dirs
    }

    /// Runs `argv` as root inside the machine (all its namespaces, its root as `/`,
    /// cwd `/`) and waits for it. `env` is the command's whole environment, with
    /// PATH, HOME, USER and LOGNAME defaulted for root when absent.
    pub fn exec(
        &self,
        argv: &[String],
        env: &[(String, String)],
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<ExitStatusInfo, MachineError> {
        let mut full: Vec<(String, String)> = env.to_vec();
        for (k, v) in [
            ("PATH", DEFAULT_PATH),
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
        ] {
            if !full.iter().any(|(key, _)| key == k) {
                full.push((k.into(), v.into()));
            }
        }
        let target = EnterSpec {
            pid: self.leader,
            env: full,
            cwd: PathBuf::from("/"),
            helper: self.helper.clone(),
        };
        crate::sandbox::enter(&target, argv, stdin, stdout, stderr).map_err(|source| {
            MachineError::Exec {
                name: self.name.clone(),
                command: argv.join(" "),
                source,
            }
        })
    }

    /// [`Machine::exec`] with stdin from /dev/null and stdout/stderr collected.
    pub fn exec_output(
        &self,
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<ExecOutput, MachineError> {
        let pipe = |what: &'static str| {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| MachineError::Io {
                name: self.name.clone(),
                step: "create pipe for",
                path: PathBuf::from(what),
                source: e.into(),
            })
        };
        let (out_r, out_w) = pipe("stdout")?;
        let (err_r, err_w) = pipe("stderr")?;
        let reader = |fd: std::os::fd::OwnedFd| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = File::from(fd).read_to_end(&mut v);
                v
            })
        };
        let (out_t, err_t) = (reader(out_r), reader(err_r));
        let status = self.exec(
            argv,
            env,
            Stdio::null(),
            Stdio::from(out_w),
            Stdio::from(err_w),
        );
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        Ok(ExecOutput {
            status: status?,
            stdout,
            stderr,
        })
    }

    /// Asks the container's systemd to power off (`SIGRTMIN+4`), waits up to
    /// `timeout` for nspawn to exit, kills everything if it does not, and removes the
    /// machine's cgroups and nspawn's leftovers. An error says what went wrong after
    /// the cleanup was done anyway.
    pub fn poweroff(mut self, timeout: Duration) -> Result<(), MachineError> {
        self.finished = true;
        let signalled = crate::sys::kill_signo(self.leader, crate::sys::sigrtmin_plus(4));
        let deadline = Instant::now() + timeout;
        let exited = loop {
            match self.nspawn.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(25))
                }
                _ => break None,
            }
        };
        let cleanup = self.teardown();
        let console = || console_tail(&self.console, CONSOLE_TAIL_LINES);
        let name = self.name.clone();
        let result = match (exited, signalled) {
            (None, _) => Err(MachineError::Poweroff {
                name,
                detail: format!("systemd-nspawn still running after {timeout:?}, killed"),
                console: console(),
            }),
            (Some(s), Err(e)) if !s.success() => Err(MachineError::Poweroff {
                name,
                detail: format!(
                    "signal to PID 1 ({}) failed: {e}; systemd-nspawn {}",
                    self.leader,
                    status_text(&s)
                ),
                console: console(),
            }),
            (Some(s), _) if !s.success() => Err(MachineError::Poweroff {
                name,
                detail: format!("systemd-nspawn {}", status_text(&s)),
                console: console(),
            }),
            _ => cleanup,
        };
        self.remove_state();
        result
    }

    /// Kills whatever is left (container, nspawn, any process in our cgroups), reaps
    /// nspawn, removes the cgroups and nspawn's per-machine leftovers.
    fn teardown(&mut self) -> Result<(), MachineError> {
        self.finished = true;
        if self.leader > 0 && self.nspawn.try_wait().ok().flatten().is_none() {
            // SIGKILL to a pid namespace's init from outside ends the whole namespace.
            let _ = crate::sys::kill_signo(self.leader, libc::SIGKILL);
        }
        let _ = self.nspawn.kill();
        let left = self.group.kill_all(Duration::from_secs(5));
        let killed = {
            use std::os::unix::process::ExitStatusExt;
            self.nspawn.wait().is_ok_and(|s| s.signal().is_some())
        };
        let name = self.name.clone();
        if killed {
            // A killed nspawn cannot remove the locks it holds on the tree; nobody else
            // holds them (they were ours), so they go too.
            let (dev, ino) = self.root_id;
            let mut locks = vec![PathBuf::from(format!(
                "/run/systemd/nspawn/locks/inode-{dev}:{ino}"
            ))];
            if let (Some(parent), Some(base)) = (self.root.parent(), self.root.file_name()) {
                locks.push(parent.join(format!(".#{}.lck", base.to_string_lossy())));
            }
            for l in locks {
                let _ = std::fs::remove_file(l);
            }
        }
        if !left.is_empty() {
            return Err(MachineError::Cleanup {
                name,
                path: self.group.dirs.first().cloned().unwrap_or_default(),
                detail: format!("processes {left:?} survived SIGKILL"),
            });
        }
        self.group
            .remove(Duration::from_secs(2))
            .map_err(|(path, e)| MachineError::Cleanup {
                name: name.clone(),
                path,
                detail: e.to_string(),
            })?;
        let mounts = mount_points();
        for dir in nspawn_leftovers(&name) {
            if !dir.exists() {
                continue;
            }
            if let Some(m) = mounts.iter().find(|m| m.starts_with(&dir)) {
                return Err(MachineError::Cleanup {
                    name,
                    path: dir.clone(),
                    detail: format!("still mounted: {}", m.display()),
                });
            }
            std::fs::remove_dir_all(&dir).map_err(|e| MachineError::Cleanup {
                name: name.clone(),
                path: dir.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }

    fn remove_state(&self) {
        if self.own_console {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        } else {
            let _ = std::fs::remove_file(self.state_dir.join("notify"));
            let _ = std::fs::remove_dir(&self.state_dir);
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.teardown() {
                tracing::warn!("{e}");
            }
            self.remove_state();
        }
    }
}

enum Wait {
    Exited(ExitStatus),
    Timeout,
    Io(PathBuf, std::io::Error),
}

fn status_text(s: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Machine>();
        send_sync::<MachineError>();
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("pm-plain-123").is_ok());
        assert!(validate_name("a.b_c").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn notify_messages() {
        let n = parse_notify("STATUS=Container running.\nX_NSPAWN_LEADER_PID=4242");
        assert_eq!(n.leader, Some(4242));
        assert!(!n.ready);
        assert_eq!(n.status.as_deref(), Some("Container running."));
        assert!(parse_notify("READY=1\n").ready);
        assert!(!parse_notify("READY=0\n").ready);
    }

    #[test]
    fn args_per_mode() {
        let mut s = BootSpec::new("/x", "m1");
        let a = nspawn_args(&s, Path::new("/x"), true);
        for want in [
            "--boot",
            "--register=no",
            "--keep-unit",
            "--notify-ready=yes",
            "--directory=/x",
            "--machine=m1",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        assert!(!a.iter().any(|x| x.starts_with("--private-users")));
        s.private_users = Some(6553600);
        s.network = NetworkMode::Private;
        s.extra_args = vec!["--bind-ro=/etc/hosts".into()];
        let a = nspawn_args(&s, Path::new("/x"), false);
        assert!(!a.iter().any(|x| x == "--keep-unit"));
        assert!(a.iter().any(|x| x == "--private-users=6553600:65536"));
        assert!(a.iter().any(|x| x == "--private-users-ownership=off"));
        assert!(a.iter().any(|x| x == "--private-network"));
        assert_eq!(a.last().unwrap(), "--bind-ro=/etc/hosts");
    }

    #[test]
    fn console_tail_strips_colours_and_keeps_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let mut text = String::new();
        for i in 0..40 {
            text.push_str(&format!("\u{1b}[0;32m  OK  \u{1b}[0m] line {i}\r\n"));
        }
        std::fs::write(&p, text).unwrap();
        let t = console_tail(&p, 30);
        assert_eq!(t.lines().count(), 30);
        assert!(t.starts_with("  OK  ] line 10"), "{t}");
        assert!(!t.contains('\u{1b}'));
    }

    #[test]
    fn bad_specs_fail_before_starting_anything() {
        let mut s = BootSpec::new("/nonexistent/tree", "ok-name");
        if nspawn_binary().is_some() {
            let e = Machine::boot(&s).unwrap_err();
            assert!(matches!(e, MachineError::Io { .. }), "{e}");
        }
        s.name = "bad/name".into();
        assert!(matches!(
            Machine::boot(&s).unwrap_err(),
            MachineError::Spec { .. }
        ));
    }
}
