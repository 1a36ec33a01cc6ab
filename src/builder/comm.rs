//! The communicator provisioners use: commands run as root inside the machine by
//! our sandbox helper — joining a booted machine's namespaces (`setns`), or, with
//! `boot = false`, in fresh namespaces on the tree like the second stage. Files
//! travel through `cat` and `tar` run inside, so the container's own mounts
//! (its `/tmp`, for instance) are honoured.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::packer::{BoxFuture, Communicator, RemoteCmd};
use crate::sandbox::{self, EnterSpec, ExitStatusInfo, SandboxSpec, DEFAULT_PATH};

/// Where commands run.
#[derive(Debug, Clone)]
pub enum Target {
    /// A booted machine: join the namespaces of its PID 1.
    Booted { leader: i32 },
    /// No boot: a fresh sandbox on the tree per command.
    Tree(Box<SandboxSpec>),
}

/// The builder's communicator.
pub struct NspawnComm {
    pub target: Target,
    /// Environment added to every command (`env` option).
    pub env: Vec<(String, String)>,
    pub cancel: CancellationToken,
    /// Every communicator operation with its wall time, in order: what the
    /// provisioners did (Packer runs them all inside one hook call).
    pub ops: std::sync::Mutex<Vec<CommOp>>,
}

/// One communicator operation of a provisioner.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CommOp {
    /// `command`, `upload`, `upload_dir`, `download` or `download_dir`.
    pub op: &'static str,
    pub detail: String,
    pub seconds: f64,
    pub ok: bool,
}

impl NspawnComm {
    /// Runs `fut` and records it in [`NspawnComm::ops`] (the first line of
    /// `detail`, at most 80 characters).
    async fn timed<T>(
        &self,
        op: &'static str,
        detail: &str,
        fut: impl std::future::Future<Output = io::Result<T>>,
    ) -> io::Result<T> {
        let t = std::time::Instant::now();
        let r = fut.await;
        let first = detail.lines().next().unwrap_or("");
        let mut shown: String = first.chars().take(80).collect();
        if shown.len() < detail.trim_end().len() {
            shown.push_str(" …");
        }
        if let Ok(mut v) = self.ops.lock() {
            v.push(CommOp {
                op,
                detail: shown,
                seconds: t.elapsed().as_secs_f64(),
                ok: r.is_ok(),
            });
        }
        r
    }
}

fn full_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = extra.to_vec();
    for (k, v) in [
        ("PATH", DEFAULT_PATH),
        ("HOME", "/root"),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("TERM", "dumb"),
    ] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.into(), v.into()));
        }
    }
    env
}

/// Exit status as Packer expects it: a signal death is 128 + signal.
pub fn packer_status(s: ExitStatusInfo) -> i32 {
    match s {
        ExitStatusInfo::Exited(c) => c,
        ExitStatusInfo::Signaled(n) => 128 + n,
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Kills every sandbox helper this process started (and, through their
/// parent-death signal, what runs under them).
pub fn kill_own_helpers() {
    let me = std::process::id().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces: split after the last ')'
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        let ppid = after.split_whitespace().nth(1).unwrap_or("");
        if ppid != me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline
            .split(|b| *b == 0)
            .nth(1)
            .is_some_and(|a| a == sandbox::CHILD_ARG.as_bytes())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl NspawnComm {
    /// Runs `argv` inside, blocking.
    fn exec_blocking(
        target: &Target,
        env: Vec<(String, String)>,
        argv: &[String],
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> io::Result<ExitStatusInfo> {
        let r = match target {
            Target::Booted { leader } => {
                let spec = EnterSpec {
                    pid: *leader,
                    env,
                    cwd: PathBuf::from("/"),
                    helper: None,
                };
                sandbox::enter(&spec, argv, stdin, stdout, stderr)
            }
            Target::Tree(spec) => {
                let mut spec = (**spec).clone();
                spec.env = env;
                sandbox::run(&spec, argv, stdin, stdout, stderr)
            }
        };
        r.map_err(|e| io::Error::other(format!("run {:?} in the machine: {e}", argv.join(" "))))
    }

    /// Runs `argv` with optional async streams; returns the exit status.
    async fn run(
        &self,
        argv: Vec<String>,
        extra_env: &[(String, String)],
        stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
        stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
        stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    ) -> io::Result<ExitStatusInfo> {
        if self.cancel.is_cancelled() {
            // e.g. a provisioner's clean-up command after the cancel
            return Err(io::Error::other(format!(
                "{:?}: not started, the build is cancelled",
                argv.join(" ")
            )));
        }
        let mut env = full_env(&self.env);
        env.extend(extra_env.iter().cloned());
        let handle = tokio::runtime::Handle::current();
        // stdout/stderr: pipes read by blocking threads that forward each chunk
        // to Packer's writer as it arrives.
        let mut forwarders = Vec::new();
        let mut out_stdio = |w: Option<Box<dyn AsyncWrite + Send + Unpin>>| -> io::Result<Stdio> {
            let Some(mut w) = w else {
                return Ok(Stdio::null());
            };
            let (r, wr) = pipe()?;
            let h = handle.clone();
            forwarders.push(std::thread::spawn(move || {
                let mut f = std::fs::File::from(r);
                let mut buf = vec![0u8; 32 * 1024];
                let mut broken = false;
                loop {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if !broken && h.block_on(w.write_all(&buf[..n])).is_err() {
                                broken = true;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = h.block_on(async {
                    let _ = w.flush().await;
                    w.shutdown().await
                });
            }));
            Ok(Stdio::from(wr))
        };
        let so = out_stdio(stdout)?;
        let se = out_stdio(stderr)?;
        let si = match stdin {
            None => Stdio::null(),
            Some(mut from) => {
                let (r, w) = pipe()?;
                let mut to = tokio::fs::File::from_std(std::fs::File::from(w));
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                    let _ = to.flush().await;
                    drop(to);
                });
                Stdio::from(r)
            }
        };
        let target = self.target.clone();
        let job = tokio::task::spawn_blocking(move || {
            Self::exec_blocking(&target, env, &argv, si, so, se)
        });
        tokio::pin!(job);
        let status = tokio::select! {
            r = &mut job => r,
            _ = self.cancel.cancelled() => {
                self.kill_running();
                (&mut job).await
            }
        }
        .map_err(io::Error::other)??;
        if self.cancel.is_cancelled() {
            // A command orphaned by the cancel may still hold the pipes until the
            // machine is powered off: do not wait for it.
            return Ok(status);
        }
        for f in forwarders {
            let _ = tokio::task::spawn_blocking(move || f.join()).await;
        }
        Ok(status)
    }

    /// Stops what runs inside (cancellation): the helpers die, which takes a
    /// no-boot sandbox down with them; a booted machine's PID 1 is killed, which
    /// ends its pid namespace at once (the build is discarded anyway, and a
    /// clean shutdown with an orphaned command takes seconds).
    fn kill_running(&self) {
        if let Target::Booted { leader } = self.target {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(leader),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        kill_own_helpers();
    }

    async fn checked(
        &self,
        what: &str,
        argv: Vec<String>,
        stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
        stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    ) -> io::Result<()> {
        let (w, mut r) = tokio::io::duplex(64 * 1024);
        let errs = tokio::spawn(async move {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s).await;
            s
        });
        let st = self
            .run(argv, &[], stdin, stdout, Some(Box::new(w)))
            .await?;
        let err = errs.await.unwrap_or_default();
        if !st.success() {
            return Err(io::Error::other(format!(
                "{what}: {st}: {}",
                err.trim_end()
            )));
        }
        Ok(())
    }
}

fn sh(script: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        script.into(),
        "sh".into(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// `*` and `?` glob match (Packer's excludes are simple patterns).
fn glob(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&pat[1..], s) || (!s.is_empty() && glob(pat, &s[1..])),
        (Some(b'?'), Some(_)) => glob(&pat[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// Whether the relative path `rel` (or its final component) matches an exclude.
pub fn excluded(rel: &Path, exclude: &[String]) -> bool {
    let s = rel.to_string_lossy();
    let s = s.trim_start_matches("./");
    if s.is_empty() || s == "." {
        return false;
    }
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    exclude.iter().any(|p| {
        let p = p.trim_end_matches('/');
        glob(p.as_bytes(), s.as_bytes()) || glob(p.as_bytes(), name.as_bytes())
    })
}

/// A tar stream of `src` (its contents, or the directory itself), minus excludes.
fn tar_host_dir(src: &Path, exclude: &[String], out: impl Write) -> io::Result<()> {
    let contents_only = src.as_os_str().to_string_lossy().ends_with('/');
    let base = if contents_only {
        src.to_path_buf()
    } else {
        src.parent().unwrap_or(Path::new("/")).to_path_buf()
    };
    let top = if contents_only {
        PathBuf::new()
    } else {
        PathBuf::from(src.file_name().unwrap_or_default())
    };
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let root = base.join(&top);
    for e in walkdir::WalkDir::new(&root)
        .min_depth(if contents_only { 1 } else { 0 })
        .into_iter()
        .filter_entry(|e| {
            let rel = e.path().strip_prefix(&root).unwrap_or(e.path());
            !excluded(rel, exclude)
        })
    {
        let e = e.map_err(io::Error::other)?;
        let rel = e.path().strip_prefix(&base).unwrap_or(e.path());
        if rel.as_os_str().is_empty() {
            continue;
        }
        b.append_path_with_name(e.path(), rel)?;
    }
    b.into_inner()?.flush()
}

impl Communicator for NspawnComm {
    fn start(&self, cmd: RemoteCmd) -> BoxFuture<'_, io::Result<i32>> {
        Box::pin(async move {
            let RemoteCmd {
                command,
                stdin,
                stdout,
                stderr,
            } = cmd;
            let detail = command.clone();
            let argv = vec!["/bin/sh".to_string(), "-c".into(), command];
            self.timed("command", &detail, async {
                let st = self.run(argv, &[], stdin, stdout, stderr).await?;
                Ok(packer_status(st))
            })
            .await
        })
    }

    fn upload(
        &self,
        dst: String,
        data: Box<dyn AsyncRead + Send + Unpin>,
        mode: Option<u32>,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let mode = format!("{:o}", mode.unwrap_or(0o644) & 0o7777);
            let argv = sh(
                "d=$(dirname -- \"$1\") && mkdir -p -- \"$d\" && cat > \"$1\" && chmod \"$2\" -- \"$1\"",
                &[&dst, &mode],
            );
            self.timed(
                "upload",
                &dst,
                self.checked(&format!("upload to {dst}"), argv, Some(data), None),
            )
            .await
        })
    }

    fn upload_dir(
        &self,
        dst: String,
        src: PathBuf,
        exclude: Vec<String>,
    ) -> BoxFuture<'_, io::Result<()>> {
        let detail = dst.clone();
        Box::pin(async move {
            let inner = async move {
                let (r, w) = pipe()?;
                let producer = tokio::task::spawn_blocking(move || {
                    tar_host_dir(&src, &exclude, std::fs::File::from(w))
                });
                let reader = tokio::fs::File::from_std(std::fs::File::from(r));
                let argv = sh(
                    "mkdir -p -- \"$1\" && tar -x --no-same-owner -C \"$1\" -f -",
                    &[&dst],
                );
                let res = self
                    .checked(
                        &format!("upload directory to {dst}"),
                        argv,
                        Some(Box::new(reader)),
                        None,
                    )
                    .await;
                let made = producer.await.map_err(io::Error::other)?;
                res?;
                made
            };
            self.timed("upload_dir", &detail, inner).await
        })
    }

    fn download(
        &self,
        src: String,
        out: Box<dyn AsyncWrite + Send + Unpin>,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            self.timed(
                "download",
                &src,
                self.checked(
                    &format!("download {src}"),
                    sh("cat -- \"$1\"", &[&src]),
                    None,
                    Some(out),
                ),
            )
            .await
        })
    }

    fn download_dir(
        &self,
        src: String,
        dst: PathBuf,
        exclude: Vec<String>,
    ) -> BoxFuture<'_, io::Result<()>> {
        let detail = src.clone();
        Box::pin(async move {
            let inner = async move {
                let (r, w) = pipe()?;
                let dst2 = dst.clone();
                let consumer = tokio::task::spawn_blocking(move || -> io::Result<()> {
                    std::fs::create_dir_all(&dst2)?;
                    let mut ar = tar::Archive::new(std::fs::File::from(r));
                    ar.set_preserve_permissions(true);
                    for entry in ar.entries()? {
                        let mut entry = entry?;
                        let rel = entry.path()?.into_owned();
                        if rel
                            .ancestors()
                            .filter(|a| !a.as_os_str().is_empty())
                            .any(|a| excluded(a, &exclude))
                        {
                            continue;
                        }
                        entry.unpack_in(&dst2)?;
                    }
                    Ok(())
                });
                let writer = tokio::fs::File::from_std(std::fs::File::from(w));
                let res = self
                    .checked(
                        &format!("download directory {src}"),
                        sh("cd -- \"$1\" && tar -c -f - .", &[&src]),
                        None,
                        Some(Box::new(writer)),
                    )
                    .await;
                let got = consumer.await.map_err(io::Error::other)?;
                res?;
                got
            };
            self.timed("download_dir", &detail, inner).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes() {
        let ex = vec!["*.log".to_string(), "sub".to_string()];
        assert!(excluded(Path::new("a/b.log"), &ex));
        assert!(excluded(Path::new("./sub"), &ex));
        assert!(!excluded(Path::new("a/keep.txt"), &ex));
        assert!(!excluded(Path::new("."), &ex));
    }

    #[test]
    fn statuses() {
        assert_eq!(packer_status(ExitStatusInfo::Exited(3)), 3);
        assert_eq!(packer_status(ExitStatusInfo::Signaled(9)), 137);
    }

    #[test]
    fn host_tar_honours_excludes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("d/sub")).unwrap();
        std::fs::write(d.path().join("d/a.txt"), "a").unwrap();
        std::fs::write(d.path().join("d/x.log"), "x").unwrap();
        std::fs::write(d.path().join("d/sub/b"), "b").unwrap();
        let mut buf = Vec::new();
        tar_host_dir(
            &d.path().join("d"),
            &["*.log".into(), "sub".into()],
            &mut buf,
        )
        .unwrap();
        let mut ar = tar::Archive::new(&buf[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"d/a.txt".to_string()), "{names:?}");
        assert!(!names
            .iter()
            .any(|n| n.contains("x.log") || n.contains("sub")));
    }
}
