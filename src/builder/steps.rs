//! The build steps in order, and the unwinding on failure or cancellation.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::comm::{NspawnComm, Target};
use super::config::{Settings, Source, BOOT_PACKAGES};
use super::{image_api, BuildStepError, BUILDER_ID};
use crate::bootstrap::{self, remove_tree};
use crate::machine::{BootSpec, Machine, NetworkMode};
use crate::packer::{provision_hook_data, Artifact, RunContext, Ui, HOOK_PROVISION};
use crate::sandbox::{IdMap, PrivateUsers, SandboxSpec};

/// Everything a failed build must undo.
struct Work {
    name: String,
    staging: PathBuf,
    machine: Option<Machine>,
    /// The id base the tree is owned by (user-namespaced tree), if any.
    base: Option<u32>,
    timings: BuildTimings,
}

/// Wall time of every phase of a build, in seconds (with sizes where they matter);
/// shown at the end, written as JSON next to the artifact and kept in its state.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BuildTimings {
    /// `bootstrap`, `import` or `clone`.
    pub source: String,
    pub source_seconds: f64,
    /// The bootstrap's own phases (resolve, download, unpack, configure, cache copy).
    pub bootstrap: Option<bootstrap::Timings>,
    pub download_mib_per_s: Option<f64>,
    /// What the base-tree cache did.
    pub cache: Option<String>,
    pub boot_to_ready: Option<f64>,
    /// All provisioners (Packer runs them in one hook call).
    pub provision: f64,
    /// What the provisioners did, one communicator operation each (a shell provisioner
    /// is an upload of its script and a command; a file provisioner an upload or download).
    pub provision_steps: Vec<super::comm::CommOp>,
    pub stop: Option<f64>,
    pub scrub: Option<f64>,
    pub export: Option<ExportTimings>,
    pub total: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportTimings {
    pub seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// bytes_out / bytes_in.
    pub ratio: f64,
}

impl BuildTimings {
    /// One line per phase, for the end of the build.
    pub fn lines(&self) -> Vec<String> {
        let mut v = vec![format!("{}: {:.2} s", self.source, self.source_seconds)];
        if let Some(b) = &self.bootstrap {
            v.push(format!(
                "  resolve {:.2} s, download {:.2} s ({:.1} MiB, {:.0} MiB/s), unpack {:.2} s, configure {:.2} s, cache copy {:.2} s",
                b.resolve,
                b.download,
                b.download_bytes as f64 / 1048576.0,
                self.download_mib_per_s.unwrap_or(0.0),
                b.unpack,
                b.configure,
                b.cache_copy
            ));
        }
        if let Some(c) = &self.cache {
            v.push(format!("  base-tree cache: {c}"));
        }
        if let Some(b) = self.boot_to_ready {
            v.push(format!("boot to ready: {b:.2} s"));
        }
        v.push(format!("provisioning: {:.2} s", self.provision));
        for op in &self.provision_steps {
            v.push(format!(
                "  {} {}: {:.2} s{}",
                op.op,
                op.detail,
                op.seconds,
                if op.ok { "" } else { " (failed)" }
            ));
        }
        if let Some(x) = self.stop {
            v.push(format!("stop: {x:.2} s"));
        }
        if let Some(x) = self.scrub {
            v.push(format!("scrub: {x:.3} s"));
        }
        if let Some(e) = &self.export {
            v.push(format!(
                "export: {:.2} s, {:.1} MiB → {:.1} MiB (ratio {:.2})",
                e.seconds,
                e.bytes_in as f64 / 1048576.0,
                e.bytes_out as f64 / 1048576.0,
                e.ratio
            ));
        }
        v.push(format!("total: {:.2} s", self.total));
        v
    }
}

fn io_err(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildStepError {
    let path = path.to_path_buf();
    move |source| BuildStepError::Io { step, path, source }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    // A plain thread: the bootstrap starts its own tokio runtime, which must not
    // happen on a thread that belongs to ours.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.expect("worker thread panicked")
}

/// Runs the build; on error or cancellation the machine is stopped and the
/// staging tree removed (kept with `-on-error=abort`).
pub async fn run(s: Settings, ctx: RunContext) -> Result<Option<Artifact>, BuildStepError> {
    let target = s.machines_dir.join(&s.name);
    let staging = s
        .machines_dir
        .join(format!(".{}.build-{}", s.name, std::process::id()));
    let mut work = Work {
        name: s.name.clone(),
        staging,
        machine: None,
        base: None,
        timings: BuildTimings::default(),
    };
    let started = Instant::now();
    let res = build(&s, &ctx, &mut work, &target).await;
    match res {
        Ok(a) => {
            ctx.ui
                .say(&format!(
                    "nspawn: build finished in {:.1} s",
                    started.elapsed().as_secs_f64()
                ))
                .await;
            Ok(Some(a))
        }
        Err(e) => {
            let e = if ctx.cancel.is_cancelled() {
                BuildStepError::Cancelled
            } else {
                e
            };
            unwind(&s, &ctx.ui, work, &e).await;
            Err(e)
        }
    }
}

async fn unwind(s: &Settings, ui: &Ui, mut work: Work, e: &BuildStepError) {
    let cancelled = matches!(e, BuildStepError::Cancelled);
    // -on-error=ask: ask before anything is cleaned up, as Packer's own builders do
    // (retrying a step is not offered: our steps are not restartable one by one).
    let keep = match s.on_error.as_str() {
        "abort" => !cancelled,
        "ask" if !cancelled => {
            ui.error(&format!("nspawn: build failed: {e}")).await;
            match ui
                .ask("[c] Clean up and exit, [a] abort without cleanup (keep the machine's tree):")
                .await
            {
                Ok(a) => a.trim_start().starts_with(['a', 'A']),
                Err(err) => {
                    ui.message(&format!("nspawn: cannot ask ({err}); cleaning up"))
                        .await;
                    false
                }
            }
        }
        _ => false,
    };
    if let Some(m) = work.machine.take() {
        ui.say("nspawn: stopping the machine").await;
        let t = s.timeout;
        if let Err(err) = blocking(move || m.poweroff(t)).await {
            let text = err.to_string();
            if matches!(e, BuildStepError::Cancelled) {
                // the console lines do not help after a cancel
                let first = text
                    .split("; last console lines")
                    .next()
                    .unwrap_or_default();
                ui.message(&format!("nspawn: {first}")).await;
            } else {
                ui.error(&format!("nspawn: {text}")).await;
            }
        }
    }
    super::comm::kill_own_helpers();
    if keep && work.staging.exists() {
        let users = work
            .base
            .map(|b| format!(" --private-users={b}:65536 --private-users-ownership=off"))
            .unwrap_or_default();
        ui.error(&format!(
            "nspawn: -on-error={mode}: the machine's tree is kept at {p}\n\
             enter it with:  systemd-nspawn -D {p} -M {n}{users}\n\
             or boot it with: systemd-nspawn --boot -D {p} -M {n}{users}\n\
             remove it with: rm -rf {p} (the next build of {n} removes it too)",
            p = work.staging.display(),
            n = work.name,
            mode = s.on_error,
        ))
        .await;
        return;
    }
    let st = work.staging.clone();
    if st.symlink_metadata().is_ok() {
        let r = blocking(move || remove_tree(&st)).await;
        if let Err(err) = r {
            ui.error(&format!(
                "nspawn: removing the staging tree {}: {err}",
                work.staging.display()
            ))
            .await;
        }
    }
}

fn check_cancel(ctx: &RunContext) -> Result<(), BuildStepError> {
    if ctx.cancel.is_cancelled() {
        Err(BuildStepError::Cancelled)
    } else {
        Ok(())
    }
}

async fn build(
    s: &Settings,
    ctx: &RunContext,
    work: &mut Work,
    target: &Path,
) -> Result<Artifact, BuildStepError> {
    let started = Instant::now();
    let ui = &ctx.ui;
    // 1. Prepare the target.
    if target.symlink_metadata().is_ok() && !s.force {
        return Err(BuildStepError::Exists {
            name: s.name.clone(),
            dir: s.machines_dir.display().to_string(),
        });
    }
    std::fs::create_dir_all(&s.machines_dir).map_err(io_err("create", &s.machines_dir))?;
    bootstrap::remove_stale(&s.machines_dir, &s.name, &["build", "old"]);
    if work.staging.symlink_metadata().is_ok() {
        remove_tree(&work.staging).map_err(io_err("remove", &work.staging))?;
    }
    if let Some(to) = &s.export {
        if to.symlink_metadata().is_ok() {
            if !s.force {
                return Err(BuildStepError::Other {
                    what: format!(
                        "prepare target: export {} already exists (use -force to replace it)",
                        to.display()
                    ),
                });
            }
            remove_tree(to).map_err(io_err("remove old export", to))?;
        }
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d).map_err(io_err("create", d))?;
        }
    }
    if target.exists() {
        ui.say(&format!(
            "nspawn: -force: machine {} will be replaced when this build succeeds",
            s.name
        ))
        .await;
    }

    // 2. The tree.
    let t0 = Instant::now();
    match &s.source {
        Source::Bootstrap => {
            let mut include = s.include.clone();
            if s.boot {
                for p in BOOT_PACKAGES {
                    if !include.iter().any(|i| i == p) {
                        include.push(p.to_string());
                    }
                }
            }
            let opts = bootstrap::Options {
                suite: s.suite.clone(),
                mirror: s.mirror.clone(),
                components: s.components.clone(),
                variant: s.variant,
                include,
                exclude: s.exclude.clone(),
                keyring: s.keyring.clone(),
                cache_dir: s.cache_dir.clone(),
                force: true,
                quiet: true,
                cache: s.cache,
                cache_limit: s.cache_limit,
                private_users: if s.private_users {
                    PrivateUsers::Base(pick_base(target))
                } else {
                    PrivateUsers::No
                },
                ..Default::default()
            };
            let settled = opts.settle()?;
            ui.say(&format!(
                "nspawn: bootstrapping {} ({}, {}) from {} into {}",
                settled.suite,
                s.variant,
                settled.arch,
                settled.mirror,
                work.staging.display()
            ))
            .await;
            let st = work.staging.clone();
            let out = blocking(move || bootstrap::bootstrap(&opts, &st)).await?;
            ui.message(&format!(
                "nspawn: bootstrap: {} packages in {:.1} s (resolve {:.1} s, download {:.1} s, {} cached, unpack {:.1} s, configure {:.1} s)",
                out.packages,
                out.timings.total,
                out.timings.resolve,
                out.timings.download,
                out.timings.cached_packages,
                out.timings.unpack,
                out.timings.configure,
            ))
            .await;
            ui.message(&format!(
                "nspawn: base-tree cache: {} ({:.1} s)",
                out.cache, out.timings.cache_copy
            ))
            .await;
            for w in &out.warnings {
                ui.message(&format!("nspawn: bootstrap warning: {w}")).await;
            }
            work.base = out.private_users_base;
            work.timings.download_mib_per_s = (out.timings.download > 0.0)
                .then(|| out.timings.download_bytes as f64 / 1048576.0 / out.timings.download);
            work.timings.cache = Some(out.cache.clone());
            work.timings.bootstrap = Some(out.timings.clone());
        }
        Source::Import(src) => {
            ui.say(&format!(
                "nspawn: importing {src} into {}",
                work.staging.display()
            ))
            .await;
            let (src2, st) = (src.clone(), work.staging.clone());
            let r = with_progress(ui, "import", move |p| image_api::import(&src2, &st, p)).await;
            r.map_err(BuildStepError::Image)?;
        }
        Source::Clone(from) => {
            let src = s.machines_dir.join(from);
            if !src.is_dir() {
                return Err(BuildStepError::Other {
                    what: format!(
                        "clone: machine {from} not found in {}",
                        s.machines_dir.display()
                    ),
                });
            }
            ui.say(&format!(
                "nspawn: cloning machine {from} into {}",
                work.staging.display()
            ))
            .await;
            let st = work.staging.clone();
            let r = blocking(move || image_api::clone_tree(&src, &st)).await;
            ui.message(&format!("nspawn: {}", r.map_err(BuildStepError::Image)?))
                .await;
        }
    }
    work.timings.source = match &s.source {
        Source::Bootstrap => "bootstrap",
        Source::Import(_) => "import",
        Source::Clone(_) => "clone",
    }
    .into();
    work.timings.source_seconds = t0.elapsed().as_secs_f64();
    ui.message(&format!(
        "nspawn: tree ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    ))
    .await;
    check_cancel(ctx)?;

    // Ownership: a tree built for a user namespace (bootstrapped with
    // private_users, or imported/cloned from such a tree) is owned by a range of
    // host ids; /etc tells which (the tree's top directory may be new).
    if work.base.is_none() {
        use std::os::unix::fs::MetadataExt;
        let probe = ["etc", "usr", "."]
            .iter()
            .map(|p| work.staging.join(p))
            .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir()))
            .unwrap_or_else(|| work.staging.clone());
        let uid = std::fs::symlink_metadata(&probe)
            .map_err(io_err("inspect", &probe))?
            .uid();
        if uid != 0 {
            if uid % 65536 != 0 {
                return Err(BuildStepError::Other {
                    what: format!(
                        "private_users: {} is owned by uid {uid}, neither root nor the start of a 65536-id range",
                        probe.display()
                    ),
                });
            }
            work.base = Some(uid);
            let _ = std::os::unix::fs::lchown(&work.staging, Some(uid), Some(uid));
            ui.message(&format!(
                "nspawn: the tree is owned by the id range at {uid}; it runs with private users"
            ))
            .await;
        } else if s.private_users {
            let map = IdMap::new(pick_base(target));
            ui.say(&format!(
                "nspawn: private_users: shifting the tree to ids {}..",
                map.host_base
            ))
            .await;
            let st = work.staging.clone();
            blocking(move || crate::sandbox::shift_tree(&st, &map)).await?;
            work.base = Some(map.host_base);
        }
    }
    write_hostname(&work.staging, &s.name, work.base)?;

    // 3. Boot, or the no-boot sandbox.
    let comm_target = if s.boot {
        if !has_init(&work.staging) {
            return Err(BuildStepError::Other {
                what: format!(
                    "boot: {} has no /sbin/init or systemd; install systemd in the image or set boot = false",
                    work.staging.display()
                ),
            });
        }
        let mut spec = BootSpec::new(&work.staging, &s.name);
        spec.private_users = work.base;
        spec.extra_args = s.nspawn_args.clone();
        spec.timeout = s.timeout;
        spec.network = NetworkMode::Host;
        ui.say(&format!(
            "nspawn: booting {} (timeout {:?})",
            s.name, s.timeout
        ))
        .await;
        let m = blocking(move || Machine::boot(&spec)).await?;
        ui.message(&format!(
            "nspawn: machine {} ready after {:.3} s (leader pid {})",
            s.name,
            m.ready_after().as_secs_f64(),
            m.leader()
        ))
        .await;
        let leader = m.leader();
        work.timings.boot_to_ready = Some(m.ready_after().as_secs_f64());
        work.machine = Some(m);
        Target::Booted { leader }
    } else {
        ui.say("nspawn: boot = false: provisioning in our own namespaces on the tree")
            .await;
        let mut spec = SandboxSpec::new(&work.staging);
        spec.userns = work.base.map(IdMap::new);
        spec.hostname = Some(s.name.clone());
        spec.network = true;
        Target::Tree(Box::new(spec))
    };
    check_cancel(ctx)?;

    // 4. Provision.
    let comm = Arc::new(NspawnComm {
        target: comm_target,
        env: s.env.clone(),
        cancel: ctx.cancel.clone(),
        ops: Default::default(),
    });
    let mut generated = Map::new();
    generated.insert("MachineName".into(), Value::from(s.name.clone()));
    generated.insert(
        "MachinePath".into(),
        Value::from(target.display().to_string()),
    );
    let data = provision_hook_data(&s.name, "nspawn", &generated);
    let tp = Instant::now();
    let hook = ctx.hook.run(HOOK_PROVISION, &data, comm.clone()).await;
    work.timings.provision_steps = comm.ops.lock().map(|v| v.clone()).unwrap_or_default();
    check_cancel(ctx)?;
    hook.map_err(|e| BuildStepError::Other {
        what: format!("provisioning: {e}"),
    })?;
    work.timings.provision = tp.elapsed().as_secs_f64();
    ui.message(&format!(
        "nspawn: provisioning took {:.1} s",
        tp.elapsed().as_secs_f64()
    ))
    .await;

    // 5. Stop.
    if let Some(m) = work.machine.take() {
        ui.say(&format!("nspawn: powering off {}", s.name)).await;
        let t = s.timeout;
        let ts = Instant::now();
        let r = blocking(move || m.poweroff(t)).await;
        work.timings.stop = Some(ts.elapsed().as_secs_f64());
        if let Err(e) = r {
            ui.error(&format!("nspawn: {e}")).await;
        } else {
            ui.message(&format!(
                "nspawn: stopped in {:.2} s",
                ts.elapsed().as_secs_f64()
            ))
            .await;
        }
    }
    super::comm::kill_own_helpers();
    check_cancel(ctx)?;

    // 6. Scrub.
    if s.scrub {
        let tsc = Instant::now();
        let removed = scrub(&work.staging, work.base);
        work.timings.scrub = Some(tsc.elapsed().as_secs_f64());
        ui.message(&format!(
            "nspawn: scrubbed host identity: {}",
            removed.join(", ")
        ))
        .await;
    }

    // 7. Export.
    let mut files = Vec::new();
    if let Some(to) = &s.export {
        ui.say(&format!("nspawn: exporting to {}", to.display()))
            .await;
        let (st, to2, base) = (work.staging.clone(), to.clone(), work.base);
        let bytes_in = crate::cache::fingerprint(&work.staging)
            .map(|(_, b, _)| b)
            .unwrap_or(0);
        let te = Instant::now();
        let out = with_progress(ui, "export", move |p| {
            base.and_then(|b| image_api::export_unshifted(&st, &to2, b, p))
                .unwrap_or_else(|| image_api::export(&st, &to2, p))
        })
        .await;
        let (f, line) = out.map_err(BuildStepError::Image)?;
        files = f;
        let bytes_out = if to.is_file() {
            std::fs::metadata(to).map(|m| m.len()).unwrap_or(0)
        } else {
            bytes_in
        };
        work.timings.export = Some(ExportTimings {
            seconds: te.elapsed().as_secs_f64(),
            bytes_in,
            bytes_out,
            ratio: if bytes_in > 0 {
                bytes_out as f64 / bytes_in as f64
            } else {
                0.0
            },
        });
        ui.message(&format!(
            "nspawn: {line} in {:.1} s",
            te.elapsed().as_secs_f64()
        ))
        .await;
    }
    check_cancel(ctx)?;

    // 8. Rename to the machine's name; the timings go next to the artifact.
    commit(&work.staging, target)?;
    work.timings.total = started.elapsed().as_secs_f64();
    let timings_json = serde_json::to_value(&work.timings).unwrap_or(Value::Null);
    let timings_path = match &s.export {
        Some(to) => to.with_file_name(format!(
            "{}.timings.json",
            to.file_name().unwrap_or_default().to_string_lossy()
        )),
        None => s.machines_dir.join(format!("{}.timings.json", s.name)),
    };
    if let Err(e) = std::fs::write(
        &timings_path,
        serde_json::to_vec_pretty(&timings_json).unwrap_or_default(),
    ) {
        ui.error(&format!("nspawn: writing {}: {e}", timings_path.display()))
            .await;
    }
    ui.say("nspawn: timings").await;
    for l in work.timings.lines() {
        ui.message(&format!("nspawn:   {l}")).await;
    }
    ui.message(&format!(
        "nspawn: timings written to {}",
        timings_path.display()
    ))
    .await;
    let mut state = Map::new();
    state.insert("timings".into(), timings_json);
    state.insert(
        "timings_file".into(),
        Value::from(timings_path.display().to_string()),
    );
    state.insert("generated_data".into(), Value::Object(generated));
    state.insert("MachineName".into(), Value::from(s.name.clone()));
    state.insert(
        "MachinePath".into(),
        Value::from(target.display().to_string()),
    );
    let t2 = target.to_path_buf();
    Ok(Artifact {
        builder_id: BUILDER_ID.into(),
        id: s.name.clone(),
        description: if files.is_empty() {
            format!("nspawn machine {} at {}", s.name, target.display())
        } else {
            format!(
                "nspawn machine {} at {}, exported to {}",
                s.name,
                target.display(),
                files.join(", ")
            )
        },
        files,
        state,
        destroy: Some(Arc::new(move || {
            remove_tree(&t2).map_err(|e| format!("removing machine {}: {e}", t2.display()))
        })),
    })
}

/// Runs a blocking job that reports the bytes done so far through a callback,
/// printing progress every 2 s.
async fn with_progress<T: Send + 'static>(
    ui: &Ui,
    what: &'static str,
    f: impl FnOnce(&dyn Fn(u64)) -> T + Send + 'static,
) -> T {
    let bytes = Arc::new(AtomicU64::new(0));
    let b2 = bytes.clone();
    let job = blocking(move || {
        let cb = move |n: u64| {
            b2.fetch_max(n, Ordering::Relaxed);
        };
        f(&cb)
    });
    tokio::pin!(job);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    loop {
        tokio::select! {
            r = &mut job => {
                let n = bytes.load(Ordering::Relaxed);
                if n > 0 {
                    ui.message(&format!("nspawn: {what}: {:.1} MiB", n as f64 / 1048576.0)).await;
                }
                return r;
            }
            _ = tick.tick() => {
                let n = bytes.load(Ordering::Relaxed);
                ui.message(&format!("nspawn: {what}: {:.1} MiB so far", n as f64 / 1048576.0)).await;
            }
        }
    }
}

/// The id base for a new user-namespaced tree at `target`.
fn pick_base(target: &Path) -> u32 {
    PrivateUsers::Pick
        .resolve(target)
        .map(|m| m.host_base)
        .unwrap_or(crate::sandbox::PICK_MIN)
}

fn has_init(root: &Path) -> bool {
    [
        "sbin/init",
        "usr/sbin/init",
        "lib/systemd/systemd",
        "usr/lib/systemd/systemd",
    ]
    .iter()
    .any(|p| root.join(p).symlink_metadata().is_ok())
}

/// `root/rel` if no directory on the way is a symlink (which could lead out of
/// the tree); None otherwise.
fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    let rel = Path::new(rel);
    let n = rel.components().count();
    for (i, c) in rel.components().enumerate() {
        let Component::Normal(c) = c else {
            return None;
        };
        p.push(c);
        if i + 1 < n {
            match p.symlink_metadata() {
                Ok(m) if m.is_dir() => {}
                _ => return None,
            }
        }
    }
    Some(p)
}

fn chown_base(p: &Path, base: Option<u32>) {
    if let Some(b) = base {
        let _ = std::os::unix::fs::lchown(p, Some(b), Some(b));
    }
}

/// Writes `/etc/hostname` (the build ran under a staging name).
fn write_hostname(root: &Path, name: &str, base: Option<u32>) -> Result<(), BuildStepError> {
    let Some(p) = inside(root, "etc/hostname") else {
        return Ok(());
    };
    if p.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        let _ = std::fs::remove_file(&p);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{name}\n").as_bytes()))
        .map_err(io_err("write", &p))?;
    chown_base(&p, base);
    Ok(())
}

/// Removes host identity from the stopped tree; returns what was done.
pub(crate) fn scrub(root: &Path, base: Option<u32>) -> Vec<String> {
    let mut done = Vec::new();
    if let Some(p) = inside(root, "etc/machine-id") {
        if p.symlink_metadata().is_ok_and(|m| !m.is_file()) {
            let _ = std::fs::remove_file(&p);
        }
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o444)
            .open(&p);
        if r.is_ok() {
            chown_base(&p, base);
            done.push("/etc/machine-id emptied".to_string());
        }
    }
    for rel in [
        "var/lib/dbus/machine-id",
        "var/lib/systemd/random-seed",
        "var/lib/systemd/credential.secret",
    ] {
        if let Some(p) = inside(root, rel) {
            if p.symlink_metadata().is_ok_and(|m| !m.is_dir()) && std::fs::remove_file(&p).is_ok() {
                done.push(format!("/{rel} removed"));
            }
        }
    }
    // Journals are kept per machine-id: the build's id must not ship.
    if let Some(j) = inside(root, "var/log/journal/x") {
        let dir = j.parent().unwrap().to_path_buf();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit()) {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                    done.push(format!("/var/log/journal/{n} removed"));
                }
            }
        }
    }
    done
}

/// Renames the staging tree to the machine's name, replacing an old one last.
fn commit(staging: &Path, target: &Path) -> Result<(), BuildStepError> {
    bootstrap::replace_tree(staging, target).map_err(io_err("rename staging tree to", target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_empties_ids_and_refuses_symlinked_dirs() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("var/lib/dbus")).unwrap();
        std::fs::create_dir_all(r.join("var/log/journal/0123456789abcdef0123456789abcdef"))
            .unwrap();
        std::fs::write(
            r.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        std::fs::write(r.join("var/lib/dbus/machine-id"), "x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("random-seed"), "keep").unwrap();
        std::fs::create_dir_all(r.join("var/lib")).unwrap();
        std::os::unix::fs::symlink(outside.path(), r.join("var/lib/systemd")).unwrap();
        let done = scrub(r, None);
        assert_eq!(std::fs::read(r.join("etc/machine-id")).unwrap(), b"");
        assert!(!r.join("var/lib/dbus/machine-id").exists());
        assert!(outside.path().join("random-seed").exists(), "{done:?}");
        assert!(!r
            .join("var/log/journal/0123456789abcdef0123456789abcdef")
            .exists());
    }

    #[test]
    fn commit_replaces() {
        let d = tempfile::tempdir().unwrap();
        let st = d.path().join(".m.build-1");
        let t = d.path().join("m");
        std::fs::create_dir_all(&st).unwrap();
        std::fs::write(st.join("new"), "").unwrap();
        std::fs::create_dir_all(&t).unwrap();
        std::fs::write(t.join("old"), "").unwrap();
        commit(&st, &t).unwrap();
        assert!(t.join("new").exists() && !t.join("old").exists() && !st.exists());
    }
}
