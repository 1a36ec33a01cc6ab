//! The dedicated cgroup a machine's `systemd-nspawn` is started in: one directory per
//! mounted hierarchy that systemd cares about (the named v1 `name=systemd` one and the
//! cgroup2 one), created before the boot, entered by the nspawn process between fork
//! and exec, swept of processes and removed depth-first afterwards.
//!
//! On a hybrid host without systemd as PID 1 a user-namespaced boot only works from
//! such a cgroup (nspawn hands the subtree to the container's id range); every boot
//! uses one so that cleanup can find each process the machine left.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use nix::sys::statfs::{FsType, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};

/// How the host mounts its cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The hierarchies a machine gets a directory in (mount points).
    pub hierarchies: Vec<PathBuf>,
    /// v1 controllers plus `name=systemd` with cgroup2 at `unified/`.
    pub hybrid: bool,
}

fn fs_magic(p: &Path) -> Option<FsType> {
    nix::sys::statfs::statfs(p)
        .ok()
        .map(|s| s.filesystem_type())
}

/// Reads the layout under `/sys/fs/cgroup`.
pub fn detect() -> Layout {
    detect_at(Path::new("/sys/fs/cgroup"))
}

fn detect_at(base: &Path) -> Layout {
    if fs_magic(base) == Some(CGROUP2_SUPER_MAGIC) {
        return Layout {
            hierarchies: vec![base.to_path_buf()],
            hybrid: false,
        };
    }
    let mut hierarchies = Vec::new();
    let named = base.join("systemd");
    let v1 = fs_magic(&named) == Some(CGROUP_SUPER_MAGIC);
    if v1 {
        hierarchies.push(named);
    }
    let unified = base.join("unified");
    let v2 = fs_magic(&unified) == Some(CGROUP2_SUPER_MAGIC);
    if v2 {
        hierarchies.push(unified);
    }
    Layout {
        hierarchies,
        hybrid: v1 && v2,
    }
}

/// The machine's cgroup directories, one per hierarchy.
#[derive(Debug)]
pub struct Group {
    pub dirs: Vec<PathBuf>,
}

impl Group {
    /// Creates `<hierarchy>/<leaf>` in every hierarchy of `layout`. A directory that is
    /// already there must be empty of processes (a stale one from a killed run is
    /// reused); one with processes means the machine name is in use.
    pub fn create(layout: &Layout, leaf: &str) -> Result<Group, (PathBuf, std::io::Error)> {
        let mut made = Group { dirs: Vec::new() };
        for h in &layout.hierarchies {
            let dir = h.join(leaf);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if !procs(&dir).is_empty() {
                        return Err((dir, std::io::Error::from_raw_os_error(libc::EBUSY)));
                    }
                }
                Err(e) => {
                    let _ = made.remove(Duration::ZERO);
                    return Err((dir, e));
                }
            }
            made.dirs.push(dir);
        }
        Ok(made)
    }

    /// Opens each `cgroup.procs` for writing, for [`enter_self`] in a `pre_exec` hook.
    pub fn open_procs(&self) -> Result<Vec<OwnedFd>, (PathBuf, nix::Error)> {
        self.dirs
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                nix::fcntl::open(&p, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| (p, e))
            })
            .collect()
    }

    /// Every process in the group's subtrees.
    pub fn members(&self) -> Vec<i32> {
        let mut all = Vec::new();
        for d in &self.dirs {
            walk(d, &mut |dir| all.extend(procs(dir)));
        }
        all.sort_unstable();
        all.dedup();
        all
    }

    /// SIGKILLs every member until none is left or `within` has passed; returns the
    /// pids still there.
    pub fn kill_all(&self, within: Duration) -> Vec<i32> {
        let deadline = Instant::now() + within;
        loop {
            let left = self.members();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            for pid in &left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes every directory of the group, deepest first (nspawn and the container's
    /// systemd make `payload/…` and `supervisor/` below ours). Retries `EBUSY` (exiting
    /// processes leave their cgroup a moment late) until `within` has passed.
    pub fn remove(&self, within: Duration) -> Result<(), (PathBuf, std::io::Error)> {
        let deadline = Instant::now() + within;
        for d in &self.dirs {
            let mut order = Vec::new();
            walk(d, &mut |dir| order.push(dir.to_path_buf()));
            order.reverse(); // walk is pre-order: children come after their parent
            for dir in order {
                loop {
                    match std::fs::remove_dir(&dir) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                        Err(e)
                            if e.raw_os_error() == Some(libc::EBUSY)
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => return Err((dir, e)),
                    }
                }
            }
        }
        Ok(())
    }
}

/// Moves the calling process into the cgroups behind `fds` (writes "0" to each
/// `cgroup.procs`). Async-signal-safe: only write(2), no allocation, so it may run in
/// a `pre_exec` hook.
pub fn enter_self(fds: &[i32]) -> std::io::Result<()> {
    for fd in fds {
        // SAFETY: write(2) reads one byte from a static buffer; an invalid descriptor is
        // reported as EBADF and touches no memory.
        let n = unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raw numbers of owned descriptors, for a `pre_exec` closure (which must not allocate).
pub fn raw(fds: &[OwnedFd]) -> Vec<i32> {
    fds.iter().map(AsRawFd::as_raw_fd).collect()
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Calls `f` on `dir` and then on every directory below it (pre-order; cgroup file
/// systems have no symlinks).
fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if !dir.is_dir() {
        return;
    }
    f(dir);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), f);
            }
        }
    }
}

/// A cgroup leaf name for a machine: `packer-nspawn-NAME`.
pub fn leaf_for(machine: &str) -> String {
    format!("packer-nspawn-{machine}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_a_plain_directory_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let l = detect_at(d.path());
        assert!(l.hierarchies.is_empty());
        assert!(!l.hybrid);
    }

    #[test]
    fn walk_is_preorder_and_remove_goes_depth_first() {
        let d = tempfile::tempdir().unwrap();
        let top = d.path().join("m");
        std::fs::create_dir_all(top.join("payload/init.scope")).unwrap();
        std::fs::create_dir_all(top.join("supervisor")).unwrap();
        let mut seen = Vec::new();
        walk(&top, &mut |p| seen.push(p.to_path_buf()));
        assert_eq!(seen[0], top);
        let g = Group {
            dirs: vec![top.clone()],
        };
        assert!(g.members().is_empty());
        g.remove(Duration::ZERO).unwrap();
        assert!(!top.exists());
    }
}
