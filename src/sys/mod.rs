//! The small syscall wrapper layer: every call the sandbox needs that nix does not
//! wrap safely (or that needs an `unsafe` block for another reason) lives here,
//! behind a safe function with the precondition spelled out. Everything else uses
//! nix directly.
//!
//! Rules: each `unsafe` block carries a `// SAFETY:` comment; functions return
//! `nix::Result` (an errno) and leave naming the step and subject to the caller.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::ForkResult;

/// A connected pair of `SOCK_SEQPACKET` unix sockets, both close-on-exec.
///
/// Seqpacket keeps message boundaries and makes every small send atomic, so the
/// three processes of a sandbox (helper, init, command) can report on one socket.
pub fn seqpacket_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two c_ints, as socketpair(2) requires.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    Errno::result(rc)?;
    // SAFETY: on success socketpair(2) returned two fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one packet on a socket without raising SIGPIPE if the peer is gone
/// (`EPIPE` is returned instead).
pub fn send_packet(fd: &impl AsRawFd, buf: &[u8]) -> nix::Result<usize> {
    // SAFETY: `buf` is a valid readable slice for its whole length during the call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    Errno::result(n).map(|n| n as usize)
}

/// Clear `FD_CLOEXEC` on `fd` so it survives `execve`. Async-signal-safe (one
/// `fcntl`, no allocation), so it may run in a `pre_exec` hook.
pub fn clear_cloexec(fd: RawFd) -> nix::Result<()> {
    // SAFETY: fcntl(F_SETFD) only changes the descriptor flags; an invalid number is
    // reported as EBADF and touches no memory.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

/// Set `FD_CLOEXEC` on `fd`.
pub fn set_cloexec(fd: &OwnedFd) -> nix::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

/// Take ownership of a descriptor inherited by number (the sandbox helper's sync
/// socket, whose number arrives on the command line).
pub fn adopt_inherited_fd(fd: RawFd) -> nix::Result<OwnedFd> {
    if fd < 0 {
        return Err(Errno::EBADF);
    }
    // SAFETY: fcntl(F_GETFD) only queries the descriptor table; a closed number is EBADF.
    Errno::result(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: the descriptor is open (checked above) and was inherited across execve for
    // this process alone to own; no other object in this process refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Number of threads of the calling process, read from /proc/self/task.
pub fn thread_count() -> std::io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// `fork()` for a process known to be single-threaded.
///
/// Returns `EDEADLK` without forking if the process has more than one thread:
/// after a fork in a threaded process only async-signal-safe code may run, and the
/// sandbox child code allocates freely.
pub fn fork_single_threaded() -> nix::Result<ForkResult> {
    match thread_count() {
        Ok(1) => {}
        _ => return Err(Errno::EDEADLK),
    }
    // SAFETY: the process has exactly one thread (checked above), so the child gets a
    // consistent copy of all locks and allocator state and may run arbitrary code.
    unsafe { nix::unistd::fork() }
}

/// Ends the calling process at once with `code`, without running atexit handlers or
/// flushing stdio buffers: the right exit for a forked child, whose copies of the
/// parent's buffers must not be written twice.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) takes a plain integer and never returns; it touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Restore default dispositions for the signals the Rust runtime changes
/// (SIGPIPE is ignored by std at startup, and an ignored disposition survives
/// `execve`) and clear the signal mask, before exec'ing a foreign command.
pub fn reset_signals_for_exec() -> nix::Result<()> {
    for sig in [
        Signal::SIGPIPE,
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
    ] {
        // SAFETY: installing SIG_DFL does not register any Rust code as a handler, so no
        // handler can observe inconsistent state.
        unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) }?;
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// Bring the interface `name` (e.g. "lo") up in the calling process's network
/// namespace with `SIOCGIFFLAGS`/`SIOCSIFFLAGS`.
pub fn interface_up(name: &CStr) -> nix::Result<()> {
    let bytes = name.to_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(Errno::ENAMETOOLONG);
    }
    // SAFETY: socket(2) has no memory-safety preconditions.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    Errno::result(raw)?;
    // SAFETY: `raw` is a fresh descriptor returned by socket(2) above; we own it.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is a plain C struct (names and a union of integers); all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads `ifr_name` and writes `ifr_ifru.ifru_flags` of the valid,
    // exclusively borrowed `req`.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel filled the flags member of the union in the call above.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads `ifr_name` and `ifr_ifru.ifru_flags` from the valid `req`.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Sends signal number `signo` to `pid`; unlike nix's `kill` it takes any number,
/// including real-time signals such as `SIGRTMIN+4` (systemd's "power off").
pub fn kill_signo(pid: i32, signo: i32) -> nix::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    Errno::result(unsafe { libc::kill(pid, signo) }).map(drop)
}

/// The number of `SIGRTMIN+n`.
pub fn sigrtmin_plus(n: i32) -> i32 {
    libc::SIGRTMIN() + n
}

/// `/proc/self/fd/N` for a descriptor: the path through which mount(2) and friends
/// reach exactly the object the descriptor refers to (no path re-resolution).
pub fn fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqpacket_keeps_message_boundaries() {
        let (a, b) = seqpacket_pair().unwrap();
        nix::unistd::write(&a, b"one").unwrap();
        nix::unistd::write(&a, b"two!").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(nix::unistd::read(&b, &mut buf).unwrap(), 3);
        assert_eq!(nix::unistd::read(&b, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"two!");
    }

    #[test]
    fn cloexec_round_trip() {
        let (a, _b) = seqpacket_pair().unwrap();
        clear_cloexec(a.as_raw_fd()).unwrap();
        let flags = fcntl(&a, FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        set_cloexec(&a).unwrap();
        let flags = fcntl(&a, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        assert_eq!(clear_cloexec(-1), Err(Errno::EBADF));
    }

    #[test]
    fn fork_refuses_in_threaded_process() {
        // The test harness runs tests on worker threads, so this process is threaded.
        let _keep =
            std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        assert_eq!(fork_single_threaded().err(), Some(Errno::EDEADLK));
    }
}
