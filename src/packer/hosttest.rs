//! `hosttest`: a builder for testing the protocol layer through real Packer.
//! Its communicator runs commands on the host, in a scratch directory
//! (relative paths resolve there; absolute paths are used as they are).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::api::{
    provision_hook_data, Artifact, BuildError, Builder, Communicator, Prepared, RemoteCmd,
    RunContext, HOOK_PROVISION,
};
use super::config::Config;
use super::rpc::BoxFuture;
use super::spec::{ConfigSpec, CtyType, ObjectSpec};

/// Builder id reported in artifacts.
pub const BUILDER_ID: &str = "nspawn.hosttest";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extra {
    note: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostConfig {
    scratch_dir: Option<String>,
    message: Option<String>,
    count: Option<f64>,
    verbose: Option<bool>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    extra: Option<Extra>,
    mode: Option<String>,
    sleep_seconds: Option<f64>,
}

/// The test builder.
#[derive(Default)]
pub struct HostTest {
    cfg: Mutex<HostConfig>,
    build_name: Mutex<String>,
}

/// Factory for [`super::launch::BuilderSet`].
pub fn factory() -> Arc<dyn Builder> {
    Arc::new(HostTest::default())
}

impl Builder for HostTest {
    fn config_spec(&self) -> ConfigSpec {
        ObjectSpec::new()
            .attr("scratch_dir", CtyType::String)
            .attr("message", CtyType::String)
            .attr("count", CtyType::Number)
            .attr("verbose", CtyType::Bool)
            .attr("tags", CtyType::list(CtyType::String))
            .attr("labels", CtyType::map(CtyType::String))
            .block("extra", ObjectSpec::new().attr("note", CtyType::String))
            .attr("mode", CtyType::String)
            .attr("sleep_seconds", CtyType::Number)
    }

    fn prepare(&self, config: Config) -> Result<Prepared, Vec<String>> {
        let cfg: HostConfig = config.decode().map_err(|e| vec![e])?;
        let mut errs = Vec::new();
        match cfg.mode.as_deref() {
            None | Some("normal") | Some("fail") => {}
            Some(other) => errs.push(format!(
                "mode: must be \"normal\" or \"fail\", got {other:?}"
            )),
        }
        if cfg.count.is_some_and(|c| c < 0.0) {
            errs.push("count: must not be negative".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        let mut warnings = Vec::new();
        if cfg.scratch_dir.is_none() {
            warnings.push("scratch_dir is not set; a temporary directory will be used".into());
        }
        *self.cfg.lock().unwrap() = cfg;
        *self.build_name.lock().unwrap() = config.packer.build_name.clone();
        Ok(Prepared {
            generated_vars: vec!["HostTestScratch".into()],
            warnings,
        })
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<'_, Result<Option<Artifact>, BuildError>> {
        Box::pin(async move {
            let cfg = self.cfg.lock().unwrap().clone();
            let scratch = match &cfg.scratch_dir {
                Some(d) => PathBuf::from(d),
                None => tempfile::Builder::new()
                    .prefix("hosttest-")
                    .tempdir()?
                    .keep(),
            };
            std::fs::create_dir_all(&scratch)?;
            let ui = &ctx.ui;
            ui.say(&format!(
                "hosttest: scratch directory {}",
                scratch.display()
            ))
            .await;
            ui.message(&format!(
                "hosttest: message={} count={} verbose={} tags={} labels={} extra.note={}",
                cfg.message.as_deref().unwrap_or("<unset>"),
                cfg.count.map(|c| c.to_string()).unwrap_or("<unset>".into()),
                cfg.verbose
                    .map(|c| c.to_string())
                    .unwrap_or("<unset>".into()),
                cfg.tags.join(","),
                cfg.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                cfg.extra
                    .as_ref()
                    .and_then(|e| e.note.as_deref())
                    .unwrap_or("<unset>"),
            ))
            .await;
            ui.machine(
                "hosttest-config",
                &["scratch", &scratch.display().to_string()],
            )
            .await;
            if cfg.mode.as_deref() == Some("fail") {
                return Err("hosttest: failing as asked by mode = \"fail\"".into());
            }
            if let Some(s) = cfg.sleep_seconds.filter(|s| *s > 0.0) {
                ui.say(&format!("hosttest: sleeping {s} s")).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs_f64(s)) => {}
                    _ = ctx.cancel.cancelled() => return Err("hosttest: build cancelled".into()),
                }
            }
            let comm = Arc::new(HostCommunicator {
                scratch: scratch.clone(),
                cancel: ctx.cancel.clone(),
            });
            let mut generated = Map::new();
            generated.insert(
                "HostTestScratch".into(),
                Value::from(scratch.display().to_string()),
            );
            let data = provision_hook_data("hosttest", "hosttest", &generated);
            ctx.hook.run(HOOK_PROVISION, &data, comm).await?;
            if ctx.cancel.is_cancelled() {
                return Err("hosttest: build cancelled".into());
            }
            let art_file = scratch.join("artifact.txt");
            std::fs::write(
                &art_file,
                format!("built by {}\n", self.build_name.lock().unwrap()),
            )?;
            let mut state = Map::new();
            state.insert("generated_data".into(), Value::Object(generated));
            let f2 = art_file.clone();
            Ok(Some(Artifact {
                builder_id: BUILDER_ID.into(),
                id: scratch.display().to_string(),
                files: vec![art_file.display().to_string()],
                description: format!("hosttest scratch directory {}", scratch.display()),
                state,
                destroy: Some(Arc::new(move || {
                    std::fs::remove_file(&f2).map_err(|e| format!("removing {}: {e}", f2.display()))
                })),
            }))
        })
    }
}

/// Runs commands and copies files on the host, rooted at a scratch directory.
pub struct HostCommunicator {
    pub scratch: PathBuf,
    pub cancel: CancellationToken,
}

impl HostCommunicator {
    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.scratch.join(p)
        }
    }
}

/// `*` and `?` glob match.
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&pat[1..], s) || (!s.is_empty() && glob_match(pat, &s[1..])),
        (Some(b'?'), Some(_)) => glob_match(&pat[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob_match(&pat[1..], &s[1..]),
        _ => false,
    }
}

fn copy_tree(src: &Path, dst: &Path, exclude: &[String]) -> io::Result<()> {
    let excluded = |p: &Path| {
        let Ok(rel) = p.strip_prefix(src) else {
            return false;
        };
        let rels = rel.to_string_lossy();
        !rels.is_empty()
            && exclude.iter().any(|pat| {
                glob_match(pat.as_bytes(), rels.as_bytes())
                    || rel
                        .file_name()
                        .is_some_and(|n| glob_match(pat.as_bytes(), n.to_string_lossy().as_bytes()))
            })
    };
    // filter_entry prunes whole excluded subtrees
    for e in walkdir::WalkDir::new(src)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| !excluded(e.path()))
    {
        let e = e.map_err(io::Error::other)?;
        let rel = e.path().strip_prefix(src).unwrap();
        let target = dst.join(rel);
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&target)?;
        } else {
            if let Some(p) = target.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

impl Communicator for HostCommunicator {
    fn start(&self, cmd: RemoteCmd) -> BoxFuture<'_, io::Result<i32>> {
        Box::pin(async move {
            use std::process::Stdio;
            let RemoteCmd {
                command,
                stdin,
                stdout,
                stderr,
            } = cmd;
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c")
                .arg(&command)
                .current_dir(&self.scratch)
                .kill_on_drop(true)
                .process_group(0)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(if stdout.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stderr(if stderr.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                });
            let mut child = c.spawn()?;
            let mut tasks = Vec::new();
            if let (Some(mut from), Some(mut to)) = (child.stdout.take(), stdout) {
                tasks.push(tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                    let _ = to.shutdown().await;
                }));
            }
            if let (Some(mut from), Some(mut to)) = (child.stderr.take(), stderr) {
                tasks.push(tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                    let _ = to.shutdown().await;
                }));
            }
            if let (Some(mut to), Some(mut from)) = (child.stdin.take(), stdin) {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                    let _ = to.shutdown().await;
                });
            }
            let status = tokio::select! {
                s = child.wait() => s?,
                _ = self.cancel.cancelled() => {
                    // the whole process group: the shell and what it started
                    if let Some(pid) = child.id() {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    let _ = child.kill().await;
                    child.wait().await?
                }
            };
            for t in tasks {
                let _ = t.await;
            }
            use std::os::unix::process::ExitStatusExt;
            Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        })
    }

    fn upload(
        &self,
        dst: String,
        mut data: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        mode: Option<u32>,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let p = self.resolve(&dst);
            if let Some(d) = p.parent() {
                tokio::fs::create_dir_all(d).await?;
            }
            let mut f = tokio::fs::File::create(&p).await?;
            tokio::io::copy(&mut data, &mut f).await?;
            f.flush().await?;
            if let Some(m) = mode {
                use std::os::unix::fs::PermissionsExt;
                tokio::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).await?;
            }
            Ok(())
        })
    }

    fn upload_dir(
        &self,
        dst: String,
        src: PathBuf,
        exclude: Vec<String>,
    ) -> BoxFuture<'_, io::Result<()>> {
        let dst = self.resolve(&dst);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let contents_only = src.as_os_str().to_string_lossy().ends_with('/');
                let target = if contents_only {
                    dst
                } else {
                    dst.join(src.file_name().unwrap_or_default())
                };
                std::fs::create_dir_all(&target)?;
                copy_tree(&src, &target, &exclude)
            })
            .await
            .map_err(io::Error::other)?
        })
    }

    fn download(
        &self,
        src: String,
        mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    ) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let mut f = tokio::fs::File::open(self.resolve(&src)).await?;
            tokio::io::copy(&mut f, &mut out).await?;
            out.shutdown().await?;
            Ok(())
        })
    }

    fn download_dir(
        &self,
        src: String,
        dst: PathBuf,
        exclude: Vec<String>,
    ) -> BoxFuture<'_, io::Result<()>> {
        let src = self.resolve(&src);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dst)?;
                copy_tree(&src, &dst, &exclude)
            })
            .await
            .map_err(io::Error::other)?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(b"*.log", b"a.log"));
        assert!(!glob_match(b"*.log", b"a.txt"));
        assert!(glob_match(b"a?c", b"abc"));
    }

    #[tokio::test]
    async fn dirs_with_excludes() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("d/sub")).unwrap();
        std::fs::write(src.path().join("d/keep.txt"), "k").unwrap();
        std::fs::write(src.path().join("d/skip.log"), "s").unwrap();
        std::fs::write(src.path().join("d/sub/x.txt"), "x").unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let c = HostCommunicator {
            scratch: scratch.path().to_path_buf(),
            cancel: CancellationToken::new(),
        };
        // without a trailing slash the directory itself is copied
        c.upload_dir("dst".into(), src.path().join("d"), vec!["*.log".into()])
            .await
            .unwrap();
        assert!(scratch.path().join("dst/d/keep.txt").exists());
        assert!(scratch.path().join("dst/d/sub/x.txt").exists());
        assert!(!scratch.path().join("dst/d/skip.log").exists());
        // with a trailing slash, its contents
        let mut with_slash = src.path().join("d").into_os_string();
        with_slash.push("/");
        c.upload_dir("dst2".into(), with_slash.into(), vec!["sub".into()])
            .await
            .unwrap();
        assert!(scratch.path().join("dst2/keep.txt").exists());
        assert!(!scratch.path().join("dst2/sub").exists());
        let back = tempfile::tempdir().unwrap();
        c.download_dir("dst/d".into(), back.path().to_path_buf(), vec![])
            .await
            .unwrap();
        assert!(back.path().join("sub/x.txt").exists());
    }

    #[tokio::test]
    async fn communicator_runs_and_copies() {
        let d = tempfile::tempdir().unwrap();
        let c = HostCommunicator {
            scratch: d.path().to_path_buf(),
            cancel: CancellationToken::new(),
        };
        let (w, mut r) = tokio::io::duplex(1024);
        let st = c
            .start(RemoteCmd {
                command: "echo hi; exit 3".into(),
                stdin: None,
                stdout: Some(Box::new(w)),
                stderr: None,
            })
            .await
            .unwrap();
        assert_eq!(st, 3);
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s)
            .await
            .unwrap();
        assert_eq!(s, "hi\n");
        c.upload("f.txt".into(), Box::new(&b"data"[..]), Some(0o640))
            .await
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(d.path().join("f.txt")).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o640);
    }
}
